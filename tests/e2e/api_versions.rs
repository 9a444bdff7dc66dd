//! Several versions of a platform kind on the real apiserver: the conversion webhook the
//! operator serves, the round trip checked before a CRD is written, storage migration,
//! deprecation, and the removal of a version.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::DynamicObject;
use pequod::api::StorageMigrationPhase;
use serde_json::json;

use crate::support::instances::{apply_instance, config_data, wait_instance};
use crate::support::modules::{V1ALPHA1_WEB, put_module, two_version_web, v1beta1_web};
use crate::support::transforms::{WAIT, apply_transform, delete_transform, failed, group, setup};
use crate::support::{self, wait_for};

async fn web_api(env: &support::TestEnv, version: &str) -> Api<DynamicObject> {
    support::dynamic_api(&env.client, &format!("{}/{version}", group(env)), "Web", &env.namespace).await
}

async fn web_transform(env: &support::TestEnv, transforms: &Api<pequod::api::Transform>, version: &str) {
    apply_transform(
        transforms,
        "web",
        json!({
            "cueRef": {"type": "configmap", "ref": "web-module"},
            "group": group(env),
            "version": version,
            "managedResources": [{"resources": ["configmaps"]}],
        }),
    )
    .await;
}

/// Waits until the Transform serves the module with `digest_changed_from` behind it and says
/// `Ready`; returns it.
async fn wait_serving_new_module(
    transforms: &Api<pequod::api::Transform>,
    previous_digest: Option<&str>,
) -> pequod::api::Transform {
    wait_for("the Transform to serve the new module", WAIT, || async {
        let t = transforms.get("web").await.map_err(|e| e.to_string())?;
        let status = t.status.clone().unwrap_or_default();
        let digest = status.resolved_cue_ref.as_ref().map(|r| r.digest.clone());
        let ready = support::transforms::condition(&t, "Ready").is_some_and(|c| c.is_true());
        match digest {
            Some(d) if ready && previous_digest != Some(d.as_str()) => Ok(t),
            _ => Err(format!("{:?} {:?}", status.phase, status.conditions)),
        }
    })
    .await
}

fn digest_of(t: &pequod::api::Transform) -> String {
    t.status
        .as_ref()
        .and_then(|s| s.resolved_cue_ref.as_ref())
        .map(|r| r.digest.clone())
        .unwrap_or_default()
}

async fn stored_versions(env: &support::TestEnv) -> Vec<String> {
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    crds.get(&format!("webs.{}", group(env)))
        .await
        .unwrap()
        .status
        .and_then(|s| s.stored_versions)
        .unwrap_or_default()
}

#[tokio::test]
async fn a_kind_moves_from_v1alpha1_to_v1beta1_without_instance_authors_doing_anything() {
    let (env, transforms) = setup("api-versions").await;
    put_module(&env.client, &env.namespace, "web-module", V1ALPHA1_WEB).await;
    web_transform(&env, &transforms, "v1alpha1").await;
    let first = wait_serving_new_module(&transforms, None).await;
    let alpha = web_api(&env, "v1alpha1").await;
    apply_instance(
        &alpha,
        &format!("{}/v1alpha1", group(&env)),
        "Web",
        "old",
        json!({"image": "nginx", "port": "8080"}),
    )
    .await;
    wait_instance(&alpha, "old", "Ready", "True", "Ready").await;

    // The plan of the new module shows the instance in each version, and changes nothing.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.cue"), two_version_web("")).unwrap();
    let out = std::process::Command::new(support::pequod_binary())
        .env("KUBECONFIG", &env.kubeconfig)
        .args(["plan", "--transform", &format!("{}/web", env.namespace), "--module"])
        .arg(dir.path())
        .args(["-o", "json", "--cue-binary"])
        .arg(support::tool("cue", "PEQUOD_TEST_CUE"))
        .env("PEQUOD_CACHE_DIR", dir.path().join("cache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let old_key = format!("{}/old", env.namespace);
    assert_eq!(
        plan["versions"][&old_key],
        json!({"v1alpha1": {"spec": {"image": "nginx", "port": "8080"}}, "v1beta1": {"spec": {"image": "nginx", "listenPort": 8080}}}),
        "{plan}"
    );
    assert_eq!(
        plan["instances"][0]["changes"],
        json!([]),
        "the rendered objects stay the same: {plan}"
    );

    // v1beta1 added with a renamed field of another type; v1alpha1 deprecated.
    put_module(&env.client, &env.namespace, "web-module", &two_version_web("")).await;
    let t = wait_serving_new_module(&transforms, Some(&digest_of(&first))).await;
    assert_eq!(
        t.status.as_ref().unwrap().generated_crd.as_ref().unwrap().api_version,
        format!("{}/v1beta1", group(&env)),
        "instances are served in the storage version"
    );
    let beta = web_api(&env, "v1beta1").await;
    let old_in_beta = beta.get("old").await.unwrap();
    assert_eq!(old_in_beta.data["spec"], json!({"image": "nginx", "listenPort": 8080}));
    assert_eq!(
        alpha.get("old").await.unwrap().data["spec"],
        json!({"image": "nginx", "port": "8080"})
    );

    // Written in either version, read in the other; rendered from the storage version.
    apply_instance(
        &beta,
        &format!("{}/v1beta1", group(&env)),
        "Web",
        "new",
        json!({"image": "httpd", "listenPort": 9090}),
    )
    .await;
    assert_eq!(alpha.get("new").await.unwrap().data["spec"]["port"], "9090");
    apply_instance(
        &alpha,
        &format!("{}/v1alpha1", group(&env)),
        "Web",
        "legacy",
        json!({"image": "caddy", "port": "7070"}),
    )
    .await;
    assert_eq!(beta.get("legacy").await.unwrap().data["spec"]["listenPort"], 7070);
    for (name, port) in [("old", "8080"), ("new", "9090"), ("legacy", "7070")] {
        wait_for(&format!("ConfigMap web-{name}"), WAIT, || async {
            match config_data(&env.client, &env.namespace, &format!("web-{name}")).await {
                Some(d) if d.get("port").map(String::as_str) == Some(port) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }

    // kubectl prints the deprecation warning for v1alpha1.
    let kubeconfig = support::control_plane::shared().kubeconfig.clone();
    let out = support::kubectl_with_input(
        &kubeconfig,
        &[
            "get",
            &format!("webs.v1alpha1.{}", group(&env)),
            "-n",
            &env.namespace,
            "-o",
            "name",
        ],
        "",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("Web v1alpha1 is deprecated; use v1beta1"), "{stderr}");

    // Storage moves to v1beta1; the status counts who still writes v1alpha1.
    let t = wait_for("the storage migration to complete", WAIT, || async {
        let t = transforms.get("web").await.map_err(|e| e.to_string())?;
        let migration = t.status.as_ref().and_then(|s| s.storage_migration.clone());
        match &migration {
            Some(m) if m.phase == StorageMigrationPhase::Complete => Ok(t),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(stored_versions(&env).await, ["v1beta1"]);
    let versions = &t.status.as_ref().unwrap().versions;
    let alpha_status = versions.iter().find(|v| v.name == "v1alpha1").unwrap();
    assert!(alpha_status.deprecated);
    assert_eq!(alpha_status.instances_last_written, 2, "old and legacy: {versions:?}");
    support::wait_events(&env.client, &env.namespace, "web", &["StorageMigrated"]).await;
    // The metrics of conversions and of the migration moved (tests/e2e/metrics.rs leaves them
    // to this test).
    let metrics = &support::operator(&env.client).await.metrics;
    for series in [
        "pequod_conversion_requests_total{result=\"success\"}",
        "pequod_conversion_objects_total",
        "pequod_conversion_duration_seconds_count",
    ] {
        assert!(
            support::metric_sum(metrics, series).await > 0.0,
            "{series} did not move"
        );
    }
    let migrated = format!(
        "pequod_storage_migration_objects_total{{namespace=\"{}\",transform=\"web\"}}",
        env.namespace
    );
    assert!(support::metric_sum(metrics, &migrated).await >= 2.0, "{migrated}");
    let remaining = format!(
        "pequod_storage_migration_remaining{{namespace=\"{}\",transform=\"web\"}}",
        env.namespace
    );
    assert_eq!(support::metric_sum(metrics, &remaining).await, 0.0, "{remaining}");

    // v1alpha1 removed: the Transform names v1beta1, and every instance keeps its fields.
    put_module(&env.client, &env.namespace, "web-module", &v1beta1_web()).await;
    web_transform(&env, &transforms, "v1beta1").await;
    wait_for("v1alpha1 to be gone from the CRD", WAIT, || async {
        let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
        let crd = crds
            .get(&format!("webs.{}", group(&env)))
            .await
            .map_err(|e| e.to_string())?;
        let names: Vec<String> = crd.spec.versions.iter().map(|v| v.name.clone()).collect();
        if names == ["v1beta1"] {
            Ok(())
        } else {
            Err(format!("{names:?}"))
        }
    })
    .await;
    for (name, port) in [("old", 8080), ("new", 9090), ("legacy", 7070)] {
        assert_eq!(beta.get(name).await.unwrap().data["spec"]["listenPort"], port);
    }
    for name in ["old", "new", "legacy"] {
        support::delete_and_wait_gone(&beta, name, WAIT).await;
    }
    delete_transform(&transforms, "web").await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_conversion_that_loses_a_field_is_refused_naming_instance_and_field_unless_declared_lossy() {
    let (env, transforms) = setup("lossy-conversion").await;
    put_module(&env.client, &env.namespace, "web-module", V1ALPHA1_WEB).await;
    web_transform(&env, &transforms, "v1alpha1").await;
    let first = wait_serving_new_module(&transforms, None).await;
    let alpha = web_api(&env, "v1alpha1").await;
    let api_version = format!("{}/v1alpha1", group(&env));
    apply_instance(
        &alpha,
        &api_version,
        "Web",
        "plain",
        json!({"image": "nginx", "port": "80"}),
    )
    .await;
    apply_instance(
        &alpha,
        &api_version,
        "Web",
        "debugged",
        json!({"image": "nginx", "port": "81", "debug": true}),
    )
    .await;

    put_module(&env.client, &env.namespace, "web-module", &two_version_web("")).await;
    let (_, message) = failed(&transforms, "web", "SchemaCompatible", "LossyConversion").await;
    assert!(message.contains(&format!("{}/debugged", env.namespace)), "{message}");
    assert!(message.contains("spec.debug"), "{message}");
    assert!(
        !message.contains("/plain"),
        "only failing instances are named: {message}"
    );
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    let crd = crds.get(&format!("webs.{}", group(&env))).await.unwrap();
    assert_eq!(crd.spec.versions.len(), 1, "the CRD stays as it was");
    support::wait_events(&env.client, &env.namespace, "web", &["LossyConversion"]).await;

    put_module(
        &env.client,
        &env.namespace,
        "web-module",
        &two_version_web("lossy: [\"debug\"]"),
    )
    .await;
    wait_serving_new_module(&transforms, Some(&digest_of(&first))).await;
    let beta = web_api(&env, "v1beta1").await;
    assert_eq!(beta.get("debugged").await.unwrap().data["spec"]["listenPort"], 81);
    for name in ["plain", "debugged"] {
        support::delete_and_wait_gone(&alpha, name, WAIT).await;
    }
    delete_transform(&transforms, "web").await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_version_objects_are_stored_in_cannot_be_removed() {
    let (env, transforms) = setup("stored-version").await;
    put_module(&env.client, &env.namespace, "web-module", V1ALPHA1_WEB).await;
    web_transform(&env, &transforms, "v1alpha1").await;
    let first = wait_serving_new_module(&transforms, None).await;
    let alpha = web_api(&env, "v1alpha1").await;
    let api_version = format!("{}/v1alpha1", group(&env));
    for i in 0..3 {
        apply_instance(
            &alpha,
            &api_version,
            "Web",
            &format!("w{i}"),
            json!({"image": "nginx", "port": "80"}),
        )
        .await;
    }
    // Straight to v1beta1 alone: v1alpha1 still holds the three instances.
    put_module(&env.client, &env.namespace, "web-module", &v1beta1_web()).await;
    web_transform(&env, &transforms, "v1beta1").await;
    let (_, message) = failed(&transforms, "web", "SchemaCompatible", "VersionStillStored").await;
    assert!(message.contains("v1alpha1"), "{message}");
    assert!(message.contains("3 instance(s)"), "{message}");
    assert_eq!(stored_versions(&env).await, ["v1alpha1"]);
    assert_eq!(
        digest_of(&transforms.get("web").await.unwrap()),
        digest_of(&first),
        "still served as before"
    );
    for i in 0..3 {
        assert_eq!(alpha.get(&format!("w{i}")).await.unwrap().data["spec"]["port"], "80");
    }
    // Back to the served module: nothing was lost.
    put_module(&env.client, &env.namespace, "web-module", V1ALPHA1_WEB).await;
    web_transform(&env, &transforms, "v1alpha1").await;
    support::transforms::wait_condition(&transforms, "web", "Ready", true, "Ready").await;
    for i in 0..3 {
        support::delete_and_wait_gone(&alpha, &format!("w{i}"), WAIT).await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    delete_transform(&transforms, "web").await;
    env.cleanup().await;
}
