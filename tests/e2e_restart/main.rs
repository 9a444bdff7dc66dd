//! The operator killed in the middle of its work converges after a restart, with no object
//! duplicated or lost; expensive readiness expressions do not stall it. A test binary of its
//! own: no other operator may run beside it (nor evaluate its expensive graphs).

use pequod_testkit as support;

mod api_versions;
mod shards;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use pequod::api::{GraphPhase, NodePhase, ResourceGraph};
use serde_json::json;
use support::OperatorProcess;
use support::modules::{NOTE_MODULE, put_module};
use support::transforms::{apply_transform, group};

const WAIT: Duration = Duration::from_secs(90);

/// The tests of this binary each run their own operator; never two at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An operator that trusts the Transforms of every namespace (tests make their own).
fn start(kubeconfig: &std::path::Path) -> OperatorProcess {
    OperatorProcess::start(kubeconfig, &support::tool("cue", "PEQUOD_TEST_CUE"), &[TRUST_ALL])
}

const TRUST_ALL: &str = "--trusted-transform-namespaces=*";

#[tokio::test]
async fn killed_operator_converges_after_restart_without_duplicates() {
    let _serial = SERIAL.lock().await;
    let env = support::env("restart").await;
    support::install_crds(&env.client).await;
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.namespace);
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);

    let mut nodes = vec![json!({
        "id": "deployment",
        "object": {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "app"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "app"}},
                "template": {"metadata": {"labels": {"app": "app"}}, "spec": {"containers": [{"name": "app", "image": "nginx:1.27"}],
                    "nodeSelector": support::held_pods_selector(&env.namespace)}}}},
        "readyWhen": [{"type": "DeploymentAvailable"}],
    })];
    for i in 0..5 {
        nodes.push(json!({"id": format!("config-{i}"), "dependsOn": ["deployment"],
            "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("config-{i}")}}}));
    }
    let rg = json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph", "metadata": {"name": "g"}, "spec": {"nodes": nodes}});

    let first = start(&env.kubeconfig);
    graphs
        .patch("g", &PatchParams::apply(support::TEST_MANAGER), &Patch::Apply(rg))
        .await
        .unwrap();
    support::wait_for("the deployment applied and waiting", WAIT, || async {
        let rg = graphs.get("g").await.map_err(|e| e.to_string())?;
        match rg.status.and_then(|s| s.node_states.get("deployment").map(|n| n.phase)) {
            Some(NodePhase::WaitingReady) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    first.kill();
    let deployment_uid = deployments.get("app").await.unwrap().uid();

    // While no operator runs, the deployment rolls out.
    support::admit_pods(&env.client, &env.namespace).await;
    support::wait_rolled_out(&env.client, &env.namespace, "app").await;

    let second = start(&env.kubeconfig);
    let converged = support::wait_for("the graph to complete after the restart", WAIT, || async {
        let rg = graphs.get("g").await.map_err(|e| e.to_string())?;
        let status = rg.status.clone().unwrap_or_default();
        if status.phase == Some(GraphPhase::Completed) {
            Ok(status)
        } else {
            Err(format!("{status:?}"))
        }
    })
    .await;
    assert_eq!(converged.inventory.len(), 6);
    assert_eq!(
        deployments.get("app").await.unwrap().uid(),
        deployment_uid,
        "the deployment was not recreated"
    );
    let labelled = ListParams::default().labels("pequod.io/resourcegraph=g");
    assert_eq!(deployments.list(&labelled).await.unwrap().items.len(), 1);
    assert_eq!(cms.list(&labelled).await.unwrap().items.len(), 5);

    // Killed again, the graph is deleted while no operator runs: the finalizer holds it,
    // and the next operator tears it down from the recorded inventory.
    second.kill();
    graphs.delete("g", &DeleteParams::default()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        graphs.get_opt("g").await.unwrap().is_some(),
        "the finalizer holds the graph"
    );
    let _third = start(&env.kubeconfig);
    support::wait_for("teardown after the restart", WAIT, || async {
        let left = cms.list(&labelled).await.map_err(|e| e.to_string())?.items.len()
            + deployments
                .list(&labelled)
                .await
                .map_err(|e| e.to_string())?
                .items
                .len();
        let graph = graphs.get_opt("g").await.map_err(|e| e.to_string())?;
        if left == 0 && graph.is_none() {
            Ok(())
        } else {
            Err(format!("{left} objects left, graph present: {}", graph.is_some()))
        }
    })
    .await;
    env.cleanup().await;
}

const NOTES: usize = 20;

/// The `Note` module as a ConfigMap and Transform `note` serving it in group `group`, both in
/// the test's namespace.
async fn put_note_transform(env: &support::TestEnv, group: &str) {
    put_module(&env.client, &env.namespace, "note-module", NOTE_MODULE).await;
    let transforms = Api::namespaced(env.client.clone(), &env.namespace);
    apply_transform(
        &transforms,
        "note",
        json!({"cueRef": {"type": "configmap", "ref": "note-module"}, "group": group}),
    )
    .await;
}

/// Applies Notes `n0` to `n<count-1>`.
async fn apply_notes(notes: &Api<kube::api::DynamicObject>, api_version: &str, count: usize) {
    for i in 0..count {
        let obj = json!({"apiVersion": api_version, "kind": "Note", "metadata": {"name": format!("n{i}")}, "spec": {"text": format!("{i}")}});
        notes
            .patch(
                &format!("n{i}"),
                &PatchParams::apply(support::TEST_MANAGER),
                &Patch::Apply(obj),
            )
            .await
            .unwrap();
    }
}

/// Waits until `count` Notes report `Ready=True`.
async fn wait_notes_ready(notes: &Api<kube::api::DynamicObject>, count: usize, what: &str) {
    support::wait_for(what, WAIT, || async {
        let list = notes.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
        let ready = list
            .items
            .iter()
            .filter(|o| {
                o.data["status"]["conditions"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
            })
            .count();
        if ready == count {
            Ok(())
        } else {
            Err(format!("{ready} of {count} Ready"))
        }
    })
    .await;
}

#[tokio::test]
async fn killed_operator_converges_on_instances_after_restart() {
    let _serial = SERIAL.lock().await;
    let env = support::env("restart-instances").await;
    support::install_crds(&env.client).await;
    let group = group(&env);
    let api_version = format!("{group}/v1alpha1");
    put_note_transform(&env, &group).await;

    let first = start(&env.kubeconfig);
    let transforms: Api<pequod::api::Transform> = Api::namespaced(env.client.clone(), &env.namespace);
    support::wait_transform_ready(&transforms, "note").await;
    let notes = support::dynamic_api(&env.client, &api_version, "Note", &env.namespace).await;
    apply_notes(&notes, &api_version, NOTES).await;
    // Killed once some graphs exist, before all instances are done.
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    support::wait_for("the first graphs", WAIT, || async {
        let n = graphs
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .len();
        if n > 0 { Ok(()) } else { Err("none yet".into()) }
    })
    .await;
    first.kill();

    let _second = start(&env.kubeconfig);
    wait_notes_ready(&notes, NOTES, "every instance Ready after the restart").await;
    let labelled = ListParams::default().labels("pequod.io/instance-kind=Note");
    assert_eq!(graphs.list(&labelled).await.unwrap().items.len(), NOTES);
    let objects = ListParams::default().labels("app.kubernetes.io/managed-by=pequod");
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(env.client.clone(), &env.namespace);
    assert_eq!(cms.list(&objects).await.unwrap().items.len(), NOTES);
    assert_eq!(accounts.list(&objects).await.unwrap().items.len(), NOTES);
    env.cleanup().await;
}

#[tokio::test]
async fn a_leader_cut_off_from_the_apiserver_stops_before_a_standby_takes_over() {
    let _serial = SERIAL.lock().await;
    let env = support::env("leader-stall").await;
    support::install_crds(&env.client).await;
    let flags = leader_flags(&env.namespace);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let cue = support::tool("cue", "PEQUOD_TEST_CUE");
    // The leader reaches the apiserver through a proxy that will stop forwarding.
    let proxy = support::StallingProxy::start(support::apiserver_address(&env.operator_kubeconfig)).await;
    let via_proxy = support::kubeconfig_via(&env.operator_kubeconfig, proxy.addr);
    let mut leader = OperatorProcess::start(&via_proxy, &cue, &flags);
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(env.client.clone(), &env.namespace);
    let holder = || lease_holder(&leases);
    let first_holder = support::wait_for("the proxied operator to lead", WAIT, holder).await;
    let standby = OperatorProcess::start(&env.operator_kubeconfig, &cue, &flags);
    wait_ready(&standby).await;

    // Every request of the leader now hangs: none fails, none returns.
    proxy.stall();
    let stalled = std::time::Instant::now();
    let mut exited = None;
    let mut took_over = None;
    while exited.is_none() || took_over.is_none() {
        assert!(stalled.elapsed() < WAIT, "exited: {exited:?}, took over: {took_over:?}");
        if exited.is_none() && leader.try_wait().unwrap().is_some() {
            exited = Some(stalled.elapsed());
        }
        if took_over.is_none() && holder().await.is_ok_and(|h| h != first_holder) {
            took_over = Some(stalled.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (exited, took_over) = (exited.unwrap(), took_over.unwrap());
    // The leader gives up within its renew deadline (plus one retry period), the standby
    // takes over only once the lease expired: never two leaders at once.
    assert!(
        exited < Duration::from_secs(3 + 1 + 1),
        "the cut-off leader stopped after {exited:?}"
    );
    assert!(
        exited < took_over,
        "stopped after {exited:?}, taken over after {took_over:?}"
    );
    env.cleanup().await;
}

/// Leader election with the Lease in `namespace`: a 4 s lease, renewed every second, given up
/// after 3 s without renewal.
fn leader_flags(namespace: &str) -> Vec<String> {
    vec![
        "--leader-elect".into(),
        format!("--leader-election-namespace={namespace}"),
        "--leader-elect-lease-duration=4".into(),
        "--leader-elect-renew-deadline=3".into(),
        "--leader-elect-retry-period=1".into(),
    ]
}

/// Who holds the leader Lease.
async fn lease_holder(leases: &Api<k8s_openapi::api::coordination::v1::Lease>) -> Result<String, String> {
    leases
        .get_opt("pequod-leader")
        .await
        .map_err(|e| e.to_string())?
        .and_then(|l| l.spec?.holder_identity)
        .ok_or_else(|| "no holder".to_string())
}

/// Waits until an operator's /readyz answers 200 (a standby is ready without leading).
async fn wait_ready(operator: &OperatorProcess) {
    support::wait_for("the operator to be ready", WAIT, || async {
        match support::http_get(&operator.probes, "/readyz").await {
            Ok((200, body)) => Ok(body),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

fn configmap_graph(name: &str) -> serde_json::Value {
    json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph", "metadata": {"name": name},
           "spec": {"nodes": [{"id": "config", "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}}]}})
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_standby_takes_over_when_it_dies() {
    let _serial = SERIAL.lock().await;
    let env = support::env("leader").await;
    support::install_crds(&env.client).await;
    let flags = leader_flags(&env.namespace);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let cue = support::tool("cue", "PEQUOD_TEST_CUE");
    let first = OperatorProcess::start(&env.kubeconfig, &cue, &flags);
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(env.client.clone(), &env.namespace);
    let holder = || lease_holder(&leases);
    let first_holder = support::wait_for("the first operator to lead", WAIT, holder).await;
    let second = OperatorProcess::start(&env.kubeconfig, &cue, &flags);
    // The standby is ready (probes answer) but does not reconcile.
    wait_ready(&second).await;

    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    let completed = |name: &'static str| {
        let graphs = graphs.clone();
        async move {
            let rg = graphs.get(name).await.map_err(|e| e.to_string())?;
            match rg.status.and_then(|s| s.phase) {
                Some(GraphPhase::Completed) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    };
    graphs
        .patch(
            "before",
            &PatchParams::apply(support::TEST_MANAGER),
            &Patch::Apply(configmap_graph("before")),
        )
        .await
        .unwrap();
    support::wait_for("the leader to apply the first graph", WAIT, || completed("before")).await;
    let reconciles = "pequod_reconcile_total{controller=\"resourcegraph\"";
    assert!(support::metric_sum(&first.metrics, reconciles).await > 0.0);
    assert_eq!(
        support::metric_sum(&second.metrics, reconciles).await,
        0.0,
        "the standby reconciled"
    );
    assert_eq!(holder().await.unwrap(), first_holder);

    // The leader dies without releasing the lease: the standby takes over once it expires.
    let killed = std::time::Instant::now();
    first.kill();
    let second_holder = support::wait_for("the standby to take over", WAIT, || async {
        match holder().await {
            Ok(h) if h != first_holder => Ok(h),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let takeover = killed.elapsed();
    assert!(takeover < Duration::from_secs(4 + 3), "took over after {takeover:?}");
    assert_ne!(second_holder, first_holder);
    graphs
        .patch(
            "after",
            &PatchParams::apply(support::TEST_MANAGER),
            &Patch::Apply(configmap_graph("after")),
        )
        .await
        .unwrap();
    support::wait_for("the new leader to apply the second graph", WAIT, || completed("after")).await;
    assert!(cms.get_opt("after").await.unwrap().is_some());
    assert!(support::metric_sum(&second.metrics, reconciles).await > 0.0);

    // A leader stopped gracefully releases the lease instead of letting it expire.
    // SAFETY: signalling the child process this test started.
    unsafe {
        libc::kill(second.pid() as libc::pid_t, libc::SIGTERM);
    }
    support::wait_for("the lease released on SIGTERM", WAIT, || async {
        match holder().await {
            Err(_) => Ok(()),
            Ok(h) => Err(format!("still held by {h}")),
        }
    })
    .await;
    drop(second);
    env.cleanup().await;
}

/// A Note module whose ConfigMap carries `version`.
fn versioned_note(version: &str) -> String {
    NOTE_MODULE.replace(
        "data: text: input.spec.text",
        &format!("data: {{text: input.spec.text, version: \"{version}\"}}"),
    )
}

#[tokio::test]
async fn a_registry_outage_keeps_instances_served_across_a_restart_and_is_reported() {
    let _serial = SERIAL.lock().await;
    let env = support::env("registry-outage").await;
    support::install_crds(&env.client).await;
    let mut registry = support::remote::Registry::start();
    let digest = support::remote::publish(
        &registry.addr,
        "platforms/note",
        "stable",
        &versioned_note("1"),
        &pequod::source::credentials::RegistryCredentials::Anonymous,
    )
    .await;
    let cache = tempfile::tempdir().unwrap();
    let flags = [
        format!("--insecure-registries={}", registry.addr),
        format!("--cache-dir={}", cache.path().display()),
        "--fetch-timeout=5".to_string(),
        TRUST_ALL.to_string(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let cue = support::tool("cue", "PEQUOD_TEST_CUE");
    let group = group(&env);
    let api_version = format!("{group}/v1alpha1");
    let reference = format!("{}/platforms/note:stable", registry.addr);
    let transform = |nudge: u32| {
        json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "Transform",
            "metadata": {"name": "note", "annotations": {"test.pequod.io/nudge": nudge.to_string()}},
            "spec": {"cueRef": {"type": "oci", "ref": reference}, "group": group}})
    };
    let transforms: Api<pequod::api::Transform> = Api::namespaced(env.client.clone(), &env.namespace);
    let apply_transform = |nudge: u32| {
        let transforms = transforms.clone();
        let t = transform(nudge);
        async move {
            transforms
                .patch(
                    "note",
                    &PatchParams::apply(support::TEST_MANAGER).force(),
                    &Patch::Apply(t),
                )
                .await
                .unwrap();
        }
    };
    let fetched = |want: bool, reason: &'static str| {
        let transforms = transforms.clone();
        async move {
            support::wait_for(&format!("CueFetched={want} ({reason})"), WAIT, || async {
                let t = transforms.get("note").await.map_err(|e| e.to_string())?;
                let conditions = t.status.clone().unwrap_or_default().conditions;
                let c = conditions.iter().find(|c| c.type_ == "CueFetched");
                let ready = conditions.iter().any(|c| c.type_ == "Ready" && c.is_true());
                match c {
                    Some(c) if c.is_true() == want && c.reason == reason && ready => Ok(c.message.clone()),
                    other => Err(format!("{other:?}; ready {ready}")),
                }
            })
            .await
        }
    };
    let notes = || support::dynamic_api(&env.client, &api_version, "Note", &env.namespace);
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    let set_text = |text: &'static str| {
        let api_version = api_version.clone();
        async move {
            let obj =
                json!({"apiVersion": api_version, "kind": "Note", "metadata": {"name": "n"}, "spec": {"text": text}});
            notes()
                .await
                .patch("n", &PatchParams::apply(support::TEST_MANAGER), &Patch::Apply(obj))
                .await
                .unwrap();
        }
    };
    let wait_text = |text: &'static str| {
        let cms = cms.clone();
        async move {
            support::wait_for(&format!("ConfigMap n with text {text}"), WAIT, || async {
                let data = cms.get("n").await.map_err(|e| e.to_string())?.data.unwrap_or_default();
                match (data.get("text"), data.get("version")) {
                    (Some(t), Some(v)) if t == text && v == "1" => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            })
            .await
        }
    };

    apply_transform(0).await;
    let first = OperatorProcess::start(&env.kubeconfig, &cue, &flags);
    fetched(true, "Fetched").await;
    set_text("one").await;
    wait_text("one").await;

    // The registry goes away: the failure is reported, the kind keeps being served.
    registry.stop();
    apply_transform(1).await;
    let message = fetched(false, "CueFetchFailed").await;
    assert!(message.contains(&format!("serving {digest}")), "{message}");
    assert!(
        message.contains("Connection refused") || message.contains("connection refused"),
        "{message}"
    );
    support::wait_events(&env.client, &env.namespace, "note", &["CueFetchFailed"]).await;
    set_text("two").await;
    wait_text("two").await;
    let (_, metrics) = support::http_get(&first.metrics, "/metrics").await.unwrap();
    let failures: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("pequod_cue_fetch_total{") && l.contains("\"failure\"") && l.contains("\"oci\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(failures >= 1.0, "{metrics}");

    // A restart during the outage serves the kind again from the cache.
    first.kill();
    let second = OperatorProcess::start(&env.kubeconfig, &cue, &flags);
    fetched(false, "CueFetchFailed").await;
    set_text("three").await;
    wait_text("three").await;

    // The registry is back: the next fetch succeeds.
    registry.resume();
    apply_transform(2).await;
    let message = fetched(true, "Fetched").await;
    assert!(message.contains(&digest), "{message}");
    drop(second);
    env.cleanup().await;
}

/// Points the APIService of `group`/v1 at a Service that does not exist (`broken`), as an
/// aggregated API that went down does, or gives it back to the apiserver.
async fn set_api_broken(client: &kube::Client, group: &str, broken: bool) {
    let services: Api<kube::api::DynamicObject> =
        support::dynamic_api(client, "apiregistration.k8s.io/v1", "APIService", "").await;
    let patch = if broken {
        json!({"metadata": {"labels": {"kube-aggregator.kubernetes.io/automanaged": null}},
            "spec": {"service": {"namespace": "default", "name": "pequod-nowhere", "port": 443}, "insecureSkipTLSVerify": true}})
    } else {
        json!({"metadata": {"labels": {"kube-aggregator.kubernetes.io/automanaged": "true"}},
            "spec": {"service": null, "insecureSkipTLSVerify": false}})
    };
    services
        .patch(&format!("v1.{group}"), &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    let want = if broken { 503 } else { 200 };
    // The client's own retries would hold a 503 for minutes.
    let client = support::client_without_retries(&support::control_plane::shared().kubeconfig).await;
    let client = &client;
    support::wait_for("discovery of the group to answer as set", WAIT, || async {
        let request = http::Request::get(format!("/apis/{group}/v1"))
            .body(Vec::new())
            .unwrap();
        let code = match client.request_text(request).await {
            Ok(_) => 200,
            Err(kube::Error::Api(s)) => s.code,
            Err(e) => return Err(e.to_string()),
        };
        (code == want).then_some(()).ok_or(format!("answered {code}"))
    })
    .await;
}

#[tokio::test]
async fn a_kind_that_cannot_be_looked_up_holds_deletion_and_keeps_the_objects() {
    let _serial = SERIAL.lock().await;
    let env = support::env("discovery").await;
    support::install_crds(&env.client).await;
    let group = format!("{}.pequod.test", env.namespace);
    let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("widgets.{group}")},
        "spec": {"group": group, "scope": "Namespaced", "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}});
    support::apply_yaml(&env.client, "", &serde_json::to_string(&crd).unwrap()).await;
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    let nodes = json!([
        {"id": "config", "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "config"}}},
        {"id": "widget", "dependsOn": ["config"], "object": {"apiVersion": format!("{group}/v1"), "kind": "Widget",
            "metadata": {"name": "w"}, "size": 3}},
    ]);
    let rg = json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph",
        "metadata": {"name": "g"}, "spec": {"nodes": nodes}});
    let first = start(&env.kubeconfig);
    support::wait_for("the widget kind served", WAIT, || async {
        graphs
            .patch("g", &PatchParams::apply(support::TEST_MANAGER), &Patch::Apply(&rg))
            .await
            .map_err(|e| e.to_string())?;
        let rg = graphs.get("g").await.map_err(|e| e.to_string())?;
        match rg.status.and_then(|s| s.phase) {
            Some(GraphPhase::Completed) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    first.kill();

    // A fresh operator knows no kind yet: looking the widget up fails while its API is down.
    set_api_broken(&env.client, &group, true).await;
    let second = start(&env.kubeconfig);
    graphs.delete("g", &DeleteParams::default()).await.unwrap();
    support::wait_for("deletion waiting on the widget's lookup", WAIT, || async {
        let rg = graphs.get("g").await.map_err(|e| e.to_string())?;
        let ready = rg
            .status
            .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"))
            .ok_or("no Ready condition")?;
        (ready.reason == "Deleting" && ready.message.contains("cannot look up Widget w"))
            .then_some(())
            .ok_or(ready.message)
    })
    .await;
    // A held deletion is retried every 5 s: once the operator has been round again, it has had
    // its chance to let the lower wave go, and must not have.
    let reconciles = "pequod_reconcile_total{controller=\"resourcegraph\"";
    let seen = support::metric_sum(&second.metrics, reconciles).await;
    support::wait_for("the held deletion retried", WAIT, || async {
        let now = support::metric_sum(&second.metrics, reconciles).await;
        (now > seen).then_some(()).ok_or(format!("{now} reconciles"))
    })
    .await;
    let held = graphs.get("g").await.unwrap();
    assert!(
        held.finalizers()
            .iter()
            .any(|f| f == pequod::api::names::GRAPH_FINALIZER)
    );
    assert!(
        cms.get_opt("config").await.unwrap().is_some(),
        "the lower wave waits for the widget"
    );
    second.kill();

    set_api_broken(&env.client, &group, false).await;
    let widgets = support::dynamic_api(&env.client, &format!("{group}/v1"), "Widget", &env.namespace).await;
    assert!(
        widgets.get_opt("w").await.unwrap().is_some(),
        "the widget outlived the outage"
    );
    let third = start(&env.kubeconfig);
    support::wait_for("the graph and its objects gone", WAIT, || async {
        let left = (
            graphs.get_opt("g").await.map_err(|e| e.to_string())?.is_some(),
            widgets.get_opt("w").await.map_err(|e| e.to_string())?.is_some(),
            cms.get_opt("config").await.map_err(|e| e.to_string())?.is_some(),
        );
        (left == (false, false, false)).then_some(()).ok_or(format!("{left:?}"))
    })
    .await;
    third.kill();
    env.cleanup().await;
}

#[tokio::test]
async fn an_instance_s_graph_of_the_earlier_naming_is_taken_over_without_touching_its_objects() {
    let _serial = SERIAL.lock().await;
    let env = support::env("upgrade").await;
    support::install_crds(&env.client).await;
    let ns = env.namespace.clone();
    let group = group(&env);
    let api_version = format!("{group}/v1alpha1");
    put_note_transform(&env, &group).await;
    let first = start(&env.kubeconfig);
    let transforms: Api<pequod::api::Transform> = Api::namespaced(env.client.clone(), &ns);
    support::wait_transform_ready(&transforms, "note").await;
    first.kill();

    // What the previous release left for instance `old`, written here while no operator runs:
    // its graph `note-old` (no proof, no group in its name) and the graph's objects, marked
    // with that graph and applied by the one field manager every graph shared.
    let notes = support::dynamic_api(&env.client, &api_version, "Note", &ns).await;
    let instance =
        json!({"apiVersion": api_version, "kind": "Note", "metadata": {"name": "old"}, "spec": {"text": "hello"}});
    let instance = notes
        .patch(
            "old",
            &PatchParams::apply(support::TEST_MANAGER),
            &Patch::Apply(instance),
        )
        .await
        .unwrap();
    let nodes = json!([
        {"id": "config", "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "old", "namespace": ns},
            "data": {"text": "hello"}}, "readyWhen": [{"type": "Exists"}]},
        {"id": "account", "dependsOn": ["config"], "object": {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "old", "namespace": ns}}, "readyWhen": [{"type": "Exists"}]},
    ]);
    let legacy = json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph",
        "metadata": {"name": "note-old", "finalizers": [pequod::api::names::GRAPH_FINALIZER],
            "labels": {"app.kubernetes.io/managed-by": "pequod", "pequod.io/transform": "note",
                "pequod.io/instance": "old", "pequod.io/instance-kind": "Note"},
            "ownerReferences": [{"apiVersion": api_version, "kind": "Note", "name": "old", "uid": instance.uid().unwrap(),
                "controller": true, "blockOwnerDeletion": true}]},
        "spec": {"sourceRef": {"apiVersion": api_version, "kind": "Note", "name": "old", "namespace": ns, "uid": instance.uid()},
            "nodes": nodes, "renderHash": "sha256:earlier"}});
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &ns);
    let legacy = graphs
        .patch(
            "note-old",
            &PatchParams::apply("pequod-instance"),
            &Patch::Apply(legacy),
        )
        .await
        .unwrap();
    let marks = |node: &str| {
        json!({"labels": {"app.kubernetes.io/managed-by": "pequod", "pequod.io/resourcegraph": "note-old",
                "pequod.io/resourcegraph-namespace": ns, "pequod.io/node": node},
            "annotations": {"pequod.io/resourcegraph-uid": legacy.uid().unwrap()},
            "ownerReferences": [{"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph",
                "name": "note-old", "uid": legacy.uid().unwrap(), "controller": true, "blockOwnerDeletion": true}]})
    };
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &ns);
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(env.client.clone(), &ns);
    let mut config_meta = marks("config");
    config_meta["name"] = json!("old");
    let mut account_meta = marks("account");
    account_meta["name"] = json!("old");
    let config = cms
        .patch(
            "old",
            &PatchParams::apply("pequod"),
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": config_meta, "data": {"text": "hello"}}),
            ),
        )
        .await
        .unwrap();
    let account = accounts
        .patch(
            "old",
            &PatchParams::apply("pequod"),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": account_meta})),
        )
        .await
        .unwrap();

    // The new release takes the graph over under its new name.
    let second = start(&env.kubeconfig);
    let graph = format!("note.{group}-old");
    let taken_over = support::wait_for("the new graph Completed and the old one gone", WAIT, || async {
        let old = graphs.get_opt("note-old").await.map_err(|e| e.to_string())?;
        let new = graphs.get_opt(&graph).await.map_err(|e| e.to_string())?;
        match (old, new) {
            (None, Some(new)) if new.status.as_ref().and_then(|s| s.phase) == Some(GraphPhase::Completed) => Ok(new),
            (old, new) => Err(format!(
                "old: {:?}, new: {:?}",
                old.map(|o| o.status.and_then(|s| s.phase)),
                new.map(|n| n.status.and_then(|s| s.phase))
            )),
        }
    })
    .await;
    let own = format!("pequod-{}", taken_over.uid().unwrap());
    let now = (cms.get("old").await.unwrap(), accounts.get("old").await.unwrap());
    assert_eq!(now.0.uid(), config.uid(), "the ConfigMap is the same object");
    assert_eq!(now.1.uid(), account.uid(), "the ServiceAccount is the same object");
    assert_eq!(now.0.data.as_ref().unwrap()["text"], "hello");
    for (kind, meta) in [("ConfigMap", &now.0.metadata), ("ServiceAccount", &now.1.metadata)] {
        let managers: Vec<_> = meta
            .managed_fields
            .iter()
            .flatten()
            .filter_map(|m| m.manager.clone())
            .collect();
        assert_eq!(managers, std::slice::from_ref(&own), "{kind}");
        let owners: Vec<_> = meta.owner_references.iter().flatten().map(|o| o.uid.clone()).collect();
        assert_eq!(owners, [taken_over.uid().unwrap()], "{kind}");
        assert_eq!(
            meta.labels.as_ref().unwrap()["pequod.io/resourcegraph"],
            graph,
            "{kind}"
        );
    }
    support::wait_events(&env.client, &ns, "old", &["GraphRenamed"]).await;

    // The objects are the new graph's now: deleting the instance deletes them.
    support::delete_and_wait_gone(&notes, "old", WAIT).await;
    assert!(cms.get_opt("old").await.unwrap().is_none());
    assert!(accounts.get_opt("old").await.unwrap().is_none());
    drop(second);
    env.cleanup().await;
}

#[tokio::test]
async fn a_transform_outside_the_trusted_namespaces_gets_only_its_own_namespace() {
    let _serial = SERIAL.lock().await;
    let env = support::env("untrusted-transform").await;
    support::install_crds(&env.client).await;
    let ns = env.namespace.clone();
    let group = group(&env);
    let api_version = format!("{group}/v1alpha1");
    // A module that renders what its instance asks for: a ConfigMap, or a RoleBinding
    // granting `admin` in the namespace to whoever the instance names.
    let module = r#"package grant

#Metadata: kind: "Grant"

#Input: {
	user:  string
	admin: bool | *false
}

#Render: {
	input: {metadata: {name: string, namespace: string, ...}, spec: #Input}
	output: nodes: [
		if !input.spec.admin {
			{id: "config", object: {apiVersion: "v1", kind: "ConfigMap", metadata: name: input.metadata.name, data: user: input.spec.user}}
		},
		if input.spec.admin {
			{id: "binding", object: {apiVersion: "rbac.authorization.k8s.io/v1", kind: "RoleBinding", metadata: name: input.metadata.name,
				roleRef: {apiGroup: "rbac.authorization.k8s.io", kind: "ClusterRole", name: "admin"},
				subjects: [{apiGroup: "rbac.authorization.k8s.io", kind: "User", name: input.spec.user}]}}
		},
	]
}
"#;
    put_module(&env.client, &ns, "grant-module", module).await;
    let transforms: Api<pequod::api::Transform> = Api::namespaced(env.client.clone(), &ns);
    let apply_grant = |spec: serde_json::Value| apply_transform(&transforms, "grant", spec);
    let refused = |fragment: &'static str| {
        let transforms = transforms.clone();
        async move {
            support::wait_for("the Transform refused", WAIT, || async {
                let t = transforms.get("grant").await.map_err(|e| e.to_string())?;
                let status = t.status.unwrap_or_default();
                let authorized = status.conditions.iter().find(|c| c.type_ == "Authorized");
                match authorized {
                    Some(c)
                        if c.reason == "NotAllowed"
                            && c.message.contains(fragment)
                            && t.metadata.generation == status.observed_generation =>
                    {
                        Ok(())
                    }
                    other => Err(format!("{other:?}")),
                }
            })
            .await
        }
    };
    let cue_ref = json!({"type": "configmap", "ref": "grant-module"});
    // The default trusts only the operator's own namespace.
    let _operator = OperatorProcess::start(&env.kubeconfig, &support::tool("cue", "PEQUOD_TEST_CUE"), &[]);

    apply_grant(json!({"cueRef": cue_ref, "group": group})).await;
    refused("set rbacScope: Namespace").await;
    support::wait_events(&env.client, &ns, "grant", &["NotAllowed"]).await;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(env.client.clone());
    assert!(
        crds.get_opt(&format!("grants.{group}")).await.unwrap().is_none(),
        "nothing generated"
    );
    apply_grant(
        json!({"cueRef": cue_ref, "group": group, "rbacScope": "Namespace", "allowClusterScopedResources": true}),
    )
    .await;
    refused("allowClusterScopedResources").await;
    apply_grant(json!({"cueRef": cue_ref, "group": group, "rbacScope": "Namespace",
        "managedResources": [{"apiGroup": "rbac.authorization.k8s.io", "resources": ["rolebindings"]}]}))
    .await;
    refused("rbac.authorization.k8s.io").await;
    apply_grant(json!({"cueRef": cue_ref, "group": group, "rbacScope": "Namespace",
        "managedResources": [{"resources": ["*"]}]}))
    .await;
    refused("wildcards").await;

    // Within its rights the Transform serves its kind, and its instances' graphs act as the
    // namespace's default service account, which its owner gave `edit`: ordinary objects are
    // applied, a RoleBinding is not, however the module renders one.
    let owner: Api<k8s_openapi::api::rbac::v1::RoleBinding> = Api::namespaced(env.client.clone(), &ns);
    owner
        .delete("graphs-own-the-namespace", &Default::default())
        .await
        .unwrap();
    support::apply_yaml(
        &env.client,
        &ns,
        &format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: graphs-edit\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: edit}}\n\
             subjects: [{{kind: ServiceAccount, name: default, namespace: {ns}}}]\n"
        ),
    )
    .await;
    apply_grant(json!({"cueRef": cue_ref, "group": group, "rbacScope": "Namespace",
        "managedResources": [{"resources": ["configmaps"]}]}))
    .await;
    support::wait_transform_ready(&transforms, "grant").await;
    let t = transforms.get("grant").await.unwrap();
    let authorized = t
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Authorized")
        .unwrap();
    assert_eq!(authorized.reason, "Restricted");
    let grants = support::dynamic_api(&env.client, &api_version, "Grant", &ns).await;
    for (name, admin) in [("reader", false), ("escalate", true)] {
        let obj = json!({"apiVersion": api_version, "kind": "Grant", "metadata": {"name": name}, "spec": {"user": "mallory", "admin": admin}});
        grants
            .patch(name, &PatchParams::apply(support::TEST_MANAGER), &Patch::Apply(obj))
            .await
            .unwrap();
    }
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &ns);
    support::wait_for("the ordinary object applied", WAIT, || async {
        cms.get_opt("reader")
            .await
            .map_err(|e| e.to_string())?
            .map(|_| ())
            .ok_or("absent".to_string())
    })
    .await;
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &ns);
    let graph = format!("grant.{group}-escalate");
    support::wait_for("the RoleBinding refused", WAIT, || async {
        let rg = graphs.get(&graph).await.map_err(|e| e.to_string())?;
        let authorized = rg
            .status
            .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Authorized"));
        match authorized {
            Some(c) if c.reason == "Forbidden" && c.message.contains(&format!("service account {ns}/default")) => {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let bindings: Api<k8s_openapi::api::rbac::v1::RoleBinding> = Api::namespaced(env.client.clone(), &ns);
    assert!(bindings.get_opt("escalate").await.unwrap().is_none());
    env.cleanup().await;
}

#[tokio::test]
async fn a_staged_rollout_interrupted_by_a_restart_resumes_its_batch() {
    let _serial = SERIAL.lock().await;
    let env = support::env("restart-rollout").await;
    support::install_crds(&env.client).await;
    let group = group(&env);
    let api_version = format!("{group}/v1alpha1");
    put_module(&env.client, &env.namespace, "note-module", NOTE_MODULE).await;
    let transforms: Api<pequod::api::Transform> = Api::namespaced(env.client.clone(), &env.namespace);
    apply_transform(
        &transforms,
        "note",
        json!({"cueRef": {"type": "configmap", "ref": "note-module"}, "group": group,
               "rollout": {"strategy": "Staged", "batchSize": 1, "healthTimeoutSeconds": 600}}),
    )
    .await;

    let first = start(&env.kubeconfig);
    support::wait_transform_ready(&transforms, "note").await;
    let notes = support::dynamic_api(&env.client, &api_version, "Note", &env.namespace).await;
    let names = ["n0", "n1", "n2"];
    for name in names {
        let obj =
            json!({"apiVersion": api_version, "kind": "Note", "metadata": {"name": name}, "spec": {"text": name}});
        notes
            .patch(name, &PatchParams::apply(support::TEST_MANAGER), &Patch::Apply(obj))
            .await
            .unwrap();
    }
    let digest = |name: &'static str| {
        let notes = notes.clone();
        async move {
            let obj = notes.get(name).await.unwrap();
            obj.data
                .pointer("/status/moduleDigest")
                .and_then(|d| d.as_str())
                .map(String::from)
        }
    };
    let rollout = || {
        let transforms = transforms.clone();
        async move { transforms.get("note").await.unwrap().status.and_then(|s| s.rollout) }
    };
    support::wait_for("the first version everywhere", WAIT, || async {
        match rollout().await {
            Some(r) if r.updated == 3 => Ok(r.target_digest),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // v2 makes each note wait for a field only the test sets: batch 1 (n0) stays waiting.
    let gated = NOTE_MODULE
        .replace("data: text: input.spec.text}\n\t\treadyWhen: [{type: \"Exists\"}]",
                 "data: {text: input.spec.text, version: \"2\"}}\n\t\treadyWhen: [{type: \"FieldMatch\", path: \"data.ok\", value: \"yes\"}]");
    assert_ne!(gated, NOTE_MODULE);
    put_module(&env.client, &env.namespace, "note-module", &gated).await;
    let waiting = support::wait_for("batch 1 on v2", WAIT, || async {
        match rollout().await {
            Some(r) if r.batch == Some(1) && r.updated == 1 => Ok(r),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let v1 = waiting.current_digest.clone().unwrap();
    assert_eq!(digest("n0").await.as_deref(), Some(waiting.target_digest.as_str()));
    first.kill();

    // The new operator resumes batch 1: the others keep waiting, and the batch's clock too.
    let second = start(&env.kubeconfig);
    // The new operator exports the rollout's counts once it has taken its step over the
    // instances: from then on it has decided whether batch 1 goes on.
    let updated = format!(
        "pequod_rollout_instances{{namespace=\"{}\",state=\"updated\",transform=\"note\"}} 1",
        env.namespace
    );
    support::wait_for("the new operator's rollout step", WAIT, || async {
        let (_, text) = support::http_get(&second.metrics, "/metrics").await?;
        text.lines()
            .any(|l| l == updated)
            .then_some(())
            .ok_or_else(|| format!("no `{updated}`"))
    })
    .await;
    let resumed = rollout().await.unwrap();
    assert_eq!(
        (resumed.batch, resumed.batch_started_at.clone(), resumed.updated),
        (Some(1), waiting.batch_started_at.clone(), 1),
        "{resumed:?}"
    );
    for name in ["n1", "n2"] {
        assert_eq!(digest(name).await.as_deref(), Some(v1.as_str()), "{name}");
    }
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    let ok = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "n0"}, "data": {"ok": "yes"}});
    cms.patch("n0", &PatchParams::apply(support::TEST_MANAGER), &Patch::Apply(ok))
        .await
        .unwrap();
    support::wait_for("batch 2 (n1) on v2", WAIT, || async {
        match rollout().await {
            Some(r) if r.batch == Some(2) && r.updated == 2 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(digest("n1").await.as_deref(), Some(waiting.target_digest.as_str()));
    assert_eq!(digest("n2").await.as_deref(), Some(v1.as_str()));
    env.cleanup().await;
}

/// A graph whose ConfigMap holds `keys` keys, with a readiness expression that passes the
/// cost estimate (which counts a map as 100 keys) but compares every key with every other.
fn expensive_graph(name: &str, keys: usize) -> serde_json::Value {
    let data: serde_json::Map<String, serde_json::Value> =
        (0..keys).map(|i| (format!("key-{i:05}"), json!("v"))).collect();
    json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph", "metadata": {"name": name},
           "spec": {"nodes": [{"id": "pairs", "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data},
                               "readyWhen": [{"type": "Expression", "expression": "self.data.all(k, !self.data.exists(j, size(j) > 99))"}]}]}})
}

#[tokio::test]
async fn expensive_expressions_time_out_without_stopping_health_other_graphs_or_shutdown() {
    let _serial = SERIAL.lock().await;
    let env = support::env("expensive-expressions").await;
    support::install_crds(&env.client).await;
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let mut operator = start(&env.kubeconfig);
    wait_ready(&operator).await;

    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    let expensive: Vec<String> = (0..cores + 2).map(|i| format!("expensive-{i}")).collect();
    for name in &expensive {
        graphs
            .patch(
                name,
                &PatchParams::apply(support::TEST_MANAGER),
                &Patch::Apply(expensive_graph(name, 3000)),
            )
            .await
            .unwrap();
    }
    for name in &expensive {
        // Refused before it runs, over an object this large; were it admitted, timed out.
        support::wait_for("the expensive expression refused or timed out", WAIT, || async {
            let rg = graphs.get(name).await.map_err(|e| e.to_string())?;
            let node = rg.status.and_then(|s| s.node_states.get("pairs").cloned());
            match node {
                Some(n)
                    if n.last_error
                        .as_deref()
                        .is_some_and(|e| e.starts_with("expression timed out") || e.contains("above the limit")) =>
                {
                    assert!(n.message.unwrap_or_default().contains("node pairs"));
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }

    // While the evaluations still run, other graphs converge and the probes answer at once.
    let others: Vec<String> = (0..3).map(|i| format!("cheap-{i}")).collect();
    for name in &others {
        graphs
            .patch(
                name,
                &PatchParams::apply(support::TEST_MANAGER),
                &Patch::Apply(configmap_graph(name)),
            )
            .await
            .unwrap();
    }
    for name in &others {
        support::wait_for("another graph to complete", WAIT, || async {
            let rg = graphs.get(name).await.map_err(|e| e.to_string())?;
            match rg.status.and_then(|s| s.phase) {
                Some(GraphPhase::Completed) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }
    for _ in 0..5 {
        let asked = std::time::Instant::now();
        let answer =
            tokio::time::timeout(Duration::from_secs(2), support::http_get(&operator.probes, "/healthz")).await;
        assert!(
            matches!(answer, Ok(Ok((200, _)))),
            "/healthz: {answer:?} after {:?}",
            asked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // SIGTERM is not held up by the evaluations still running.
    // SAFETY: signalling the child we started.
    unsafe {
        libc::kill(operator.pid() as libc::pid_t, libc::SIGTERM);
    }
    support::wait_for("pequod to exit after SIGTERM", Duration::from_secs(30), || {
        let status = operator.try_wait();
        async move {
            match status {
                Ok(Some(status)) => Ok(status),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    env.cleanup().await;
}

/// A ResourceGraph whose one node nests `levels` deep: the apiserver stores it, the JSON
/// decoder of any kube-rs client refuses it past 128.
fn nested_graph(name: &str, levels: usize) -> serde_json::Value {
    let mut deep = json!(1);
    for _ in 0..levels {
        deep = json!({"a": deep});
    }
    json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph", "metadata": {"name": name},
           "spec": {"graph": {"nodes": [{"id": "config", "resource": {"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": name}, "data": {"k": "v"}, "extra": deep}}]}}})
}

/// Writes an ordinary graph `name` and waits until it completes beside the deep ones.
async fn complete_beside(dynamic: &Api<kube::api::DynamicObject>, graphs: &Api<ResourceGraph>, name: &str) {
    dynamic
        .patch(
            name,
            &PatchParams::apply(support::TEST_MANAGER),
            &Patch::Apply(configmap_graph(name)),
        )
        .await
        .unwrap();
    support::wait_for(&format!("graph {name} to complete"), WAIT, || async {
        match graphs.get(name).await.map(|g| g.status.and_then(|s| s.phase)) {
            Ok(Some(GraphPhase::Completed)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// Writes a graph nested `levels` deep with kubectl (this test's own client could not decode
/// the apiserver's answer either).
fn put_nested(env: &support::TestEnv, name: &str, levels: usize) {
    let out = support::kubectl_with_input(
        &env.kubeconfig,
        &["apply", "-n", &env.namespace, "-f", "-"],
        &nested_graph(name, levels).to_string(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn a_graph_nested_too_deep_to_decode_does_not_stop_the_others_after_a_restart() {
    let _serial = SERIAL.lock().await;
    let env = support::env("restart-deep").await;
    support::install_crds(&env.client).await;
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let dynamic = support::graph_api(&env.client, &env.namespace).await;
    // Written by someone who may write graphs in one namespace; the apiserver accepts it.
    put_nested(&env, "deep", 200);
    // The operator starts with it in the list of every graph.
    let operator = start(&env.kubeconfig);
    complete_beside(&dynamic, &graphs, "after").await;
    // Its watch events are left out too: a second one written now stops nothing.
    put_nested(&env, "deeper", 300);
    complete_beside(&dynamic, &graphs, "later").await;
    let log = std::fs::read_to_string(&operator.log).unwrap_or_default();
    assert!(
        log.contains("nested too deep to decode"),
        "the operator says what it left out"
    );
    operator.kill();
    env.cleanup().await;
}
