//! Versions of a kind across operator processes: a storage migration resumed after a restart,
//! conversions served by a replica that is not the leader, and the webhook's certificate
//! rotated while instances are read.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{DynamicObject, ListParams};
use pequod::api::{StorageMigrationPhase, Transform};
use serde_json::json;
use support::OperatorProcess;
use support::modules::{V1ALPHA1_WEB, put_module, two_version_web};
use support::transforms::{apply_transform, group};

use super::{SERIAL, TRUST_ALL, WAIT, leader_flags, support, wait_ready};

async fn web_transform(env: &support::TestEnv) -> Api<Transform> {
    let transforms: Api<Transform> = Api::namespaced(env.client.clone(), &env.namespace);
    apply_transform(
        &transforms,
        "web",
        json!({
            "cueRef": {"type": "configmap", "ref": "web-module"},
            "group": group(env),
            "version": "v1alpha1",
            "managedResources": [{"resources": ["configmaps"]}],
        }),
    )
    .await;
    transforms
}

async fn web_api(env: &support::TestEnv, version: &str) -> Api<DynamicObject> {
    support::dynamic_api(&env.client, &format!("{}/{version}", group(env)), "Web", &env.namespace).await
}

/// Creates `count` v1alpha1 instances through one module of one version, and waits until the
/// kind is served.
async fn v1alpha1_instances(env: &support::TestEnv, count: usize) -> Api<Transform> {
    put_module(&env.client, &env.namespace, "web-module", V1ALPHA1_WEB).await;
    let transforms = web_transform(env).await;
    support::transforms::wait_condition(&transforms, "web", "Ready", true, "Ready").await;
    let alpha = web_api(env, "v1alpha1").await;
    let api_version = format!("{}/v1alpha1", group(env));
    for i in 0..count {
        let spec = json!({"image": "nginx", "port": format!("{}", 1000 + i)});
        support::instances::apply_instance(&alpha, &api_version, "Web", &format!("w{i:03}"), spec).await;
    }
    transforms
}

/// Waits until the Transform serves its kind in v1beta1 (the module of two versions).
async fn serving_v1beta1(env: &support::TestEnv, transforms: &Api<Transform>) {
    let want = format!("{}/v1beta1", group(env));
    support::wait_for("the kind served in v1beta1", WAIT, || async {
        let t = transforms.get("web").await.map_err(|e| e.to_string())?;
        let served = t
            .status
            .as_ref()
            .and_then(|s| s.generated_crd.as_ref())
            .map(|c| c.api_version.clone());
        if served.as_deref() == Some(want.as_str()) {
            Ok(())
        } else {
            Err(format!("{served:?}"))
        }
    })
    .await;
}

fn migration(t: &Transform) -> Option<pequod::api::StorageMigration> {
    t.status.as_ref()?.storage_migration.clone()
}

#[tokio::test]
async fn a_storage_migration_interrupted_by_a_restart_resumes_where_it_stopped() {
    let _serial = SERIAL.lock().await;
    let env = support::env("migration-restart").await;
    support::install_crds(&env.client).await;
    let cue = support::tool("cue", "PEQUOD_TEST_CUE");
    let first = OperatorProcess::start(&env.kubeconfig, &cue, &[TRUST_ALL]);
    const COUNT: usize = 150;
    let transforms = v1alpha1_instances(&env, COUNT).await;

    put_module(&env.client, &env.namespace, "web-module", &two_version_web("")).await;
    // Killed once the first chunk is recorded and before the last one.
    let seen = support::wait_for("the migration's first chunk", WAIT, || async {
        let t = transforms.get("web").await.map_err(|e| e.to_string())?;
        match migration(&t) {
            Some(m) if m.migrated > 0 && m.phase == StorageMigrationPhase::Migrating => Ok(m),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    first.kill();
    assert!(seen.remaining > 0, "{seen:?}");

    let second = OperatorProcess::start(&env.kubeconfig, &cue, &[TRUST_ALL]);
    let done = support::wait_for("the migration to complete after the restart", WAIT, || async {
        let t = transforms.get("web").await.map_err(|e| e.to_string())?;
        match migration(&t) {
            Some(m) if m.phase == StorageMigrationPhase::Complete => Ok(m),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // Resumed after `last`: each instance rewritten once, give or take the chunk in flight
    // when the first process died.
    assert!(
        done.migrated >= COUNT as i64 && done.migrated < (COUNT + 100) as i64,
        "{done:?}"
    );
    let rewritten_by_second = support::metric_sum(&second.metrics, "pequod_storage_migration_objects_total").await;
    assert!(
        rewritten_by_second <= (COUNT as i64 - seen.migrated) as f64,
        "the restarted operator started over: {rewritten_by_second} rewrites after {seen:?}"
    );
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    let crd = crds.get(&format!("webs.{}", group(&env))).await.unwrap();
    assert_eq!(crd.status.unwrap().stored_versions.unwrap(), ["v1beta1"]);
    let beta = web_api(&env, "v1beta1").await;
    let listed = beta.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), COUNT);
    for (i, item) in listed.items.iter().enumerate() {
        assert_eq!(item.data["spec"]["listenPort"], 1000 + i, "{item:?}");
    }
    drop(second);
    env.cleanup().await;
}

#[tokio::test]
async fn a_replica_that_does_not_lead_serves_conversions() {
    let _serial = SERIAL.lock().await;
    let env = support::env("follower-converts").await;
    support::install_crds(&env.client).await;
    let cue = support::tool("cue", "PEQUOD_TEST_CUE");
    // The leader names the standby's webhook in CRDs: every conversion goes to the standby.
    let standby_webhook = format!("127.0.0.1:{}", support::free_port());
    let mut flags = leader_flags(&env.namespace);
    flags.push(TRUST_ALL.to_string());
    let with = |extra: String| -> Vec<String> { flags.iter().cloned().chain([extra]).collect() };
    let leader_args = with(format!("--webhook-url=https://{standby_webhook}"));
    let leader = OperatorProcess::start(
        &env.kubeconfig,
        &cue,
        &leader_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(env.client.clone(), &env.namespace);
    support::wait_for("the first operator to lead", WAIT, || super::lease_holder(&leases)).await;
    let standby_args = with(format!("--webhook-bind-address={standby_webhook}"));
    let follower = OperatorProcess::start(
        &env.kubeconfig,
        &cue,
        &standby_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    wait_ready(&follower).await;
    assert_eq!(follower.webhook, standby_webhook);
    let transforms = v1alpha1_instances(&env, 3).await;
    put_module(&env.client, &env.namespace, "web-module", &two_version_web("")).await;
    serving_v1beta1(&env, &transforms).await;
    support::wait_for("the CRD to convert through the standby", WAIT, || async {
        let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
        let crd = crds
            .get(&format!("webs.{}", group(&env)))
            .await
            .map_err(|e| e.to_string())?;
        let url = crd
            .spec
            .conversion
            .and_then(|c| c.webhook)
            .and_then(|w| w.client_config)
            .and_then(|c| c.url)
            .unwrap_or_default();
        if url.contains(&follower.webhook) {
            Ok(())
        } else {
            Err(url)
        }
    })
    .await;
    let beta = web_api(&env, "v1beta1").await;
    let converted = support::wait_for("instances read in v1beta1", WAIT, || async {
        beta.get("w001").await.map_err(|e| e.to_string())
    })
    .await;
    assert_eq!(converted.data["spec"]["listenPort"], 1001);
    let follower_conversions = support::metric_sum(&follower.metrics, "pequod_conversion_requests_total").await;
    assert!(follower_conversions > 0.0, "the standby converted nothing");
    assert_eq!(
        support::metric_sum(&follower.metrics, "pequod_reconcile_total{controller=\"transform\"").await,
        0.0,
        "the standby reconciled"
    );
    let _ = transforms;
    drop(leader);
    drop(follower);
    env.cleanup().await;
}

#[tokio::test]
async fn the_webhook_certificate_rotates_while_instances_are_read() {
    let _serial = SERIAL.lock().await;
    let env = support::env("webhook-rotation").await;
    support::install_crds(&env.client).await;
    let cue = support::tool("cue", "PEQUOD_TEST_CUE");
    // The operator's own namespace is the test's: its certificate Secret is the test's alone.
    let launch = support::Launch {
        env: vec![("POD_NAMESPACE".into(), env.namespace.clone())],
        ..Default::default()
    };
    let operator = OperatorProcess::start_with(
        &env.kubeconfig,
        &cue,
        &[TRUST_ALL, "--webhook-cert-validity=90"],
        &launch,
    );
    let transforms = v1alpha1_instances(&env, 20).await;
    put_module(&env.client, &env.namespace, "web-module", &two_version_web("")).await;
    serving_v1beta1(&env, &transforms).await;
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let serving_cert = || async {
        let secret = secrets.get("pequod-webhook-tls").await.map_err(|e| e.to_string())?;
        secret
            .data
            .and_then(|d| d.get("tls.crt").cloned())
            .map(|c| c.0)
            .ok_or_else(|| "no tls.crt".to_string())
    };
    let alpha = web_api(&env, "v1alpha1").await;
    let beta = web_api(&env, "v1beta1").await;
    support::wait_for("instances read in v1beta1", WAIT, || async {
        beta.get("w000").await.map_err(|e| e.to_string())
    })
    .await;
    let first_cert = serving_cert().await.unwrap();
    // Read in a version other than the stored one, through the webhook, until the certificate
    // was re-issued and served for a while: no read may fail.
    let started = Instant::now();
    let mut reads = 0;
    let mut rotated_at = None;
    while started.elapsed() < Duration::from_secs(150) {
        // Reading the version instances are not stored in converts every one of them.
        let listed = alpha
            .list(&ListParams::default())
            .await
            .unwrap_or_else(|e| panic!("read {reads} failed: {e}"));
        assert_eq!(listed.items.len(), 20);
        reads += 1;
        if rotated_at.is_none() && serving_cert().await.unwrap() != first_cert {
            rotated_at = Some(Instant::now());
        }
        if rotated_at.is_some_and(|at| at.elapsed() > Duration::from_secs(40)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rotated_at = rotated_at.expect("the serving certificate was not re-issued");
    assert!(
        rotated_at.elapsed() > Duration::from_secs(40),
        "read for too short a time after rotation"
    );
    assert!(reads > 50, "{reads} reads");
    // A new connection, as the apiserver makes one, gets the re-issued certificate, trusted
    // through the CRD's caBundle, which did not change.
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    let crd = crds.get(&format!("webs.{}", group(&env))).await.unwrap();
    let ca = crd
        .spec
        .conversion
        .and_then(|c| c.webhook)
        .and_then(|w| w.client_config)
        .and_then(|c| c.ca_bundle)
        .expect("the CRD names the webhook's CA")
        .0;
    let served = support::verified_server_certificate(&operator.webhook, "127.0.0.1", &ca)
        .await
        .unwrap_or_else(|e| panic!("a new handshake failed: {e}"));
    let current = serving_cert().await.unwrap();
    let current_der = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(&current)
            .unwrap()
            .to_vec()
    };
    assert_eq!(served, current_der, "the webhook serves the certificate in the Secret");
    assert_ne!(current, first_cert);
    drop(operator);
    env.cleanup().await;
}
