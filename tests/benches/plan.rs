//! Plan benchmark against the local control plane with simulated nodes: what planning a module
//! change for 500 WebServices (a Deployment and a Service each) costs, measured side by side in
//! one run:
//! - `pequod plan` from outside the cluster: wall time, cue processes (counted by a wrapper
//!   around the cue binary) and apiserver requests;
//! - the operator's own plan when the module changes under a paused staged rollout (nothing
//!   moves; the Transform's status gets the plan): wall time from the module edit to the plan
//!   on the status, cue processes and apiserver requests.
//!
//! The candidate adds a label to every object, so each instance has two updates, each checked
//! with a server-side apply dry run. Then the rollout of that plan: unpaused in batches of 10%,
//! until every instance has the candidate; its wall time, the Transform's reconciles, the
//! apiserver requests and the operator's writes. `make bench-plan` runs it.

use pequod_testkit as support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use kube::Api;
use kube::api::{Patch, PatchParams};
use pequod::api::{RolloutPhase, Transform};
use serde_json::{Value, json};
use support::OperatorProcess;
use support::modules::put_module_files;
use support::transforms::apply_transform;

const INSTANCES: usize = if option_env!("PEQUOD_BENCH_QUICK").is_some() {
    100
} else {
    500
};

const FILES: [(&str, &str); 3] = [
    ("policy.cue", include_str!("../../cue/platform/webservice/policy.cue")),
    ("render.cue", include_str!("../../cue/platform/webservice/render.cue")),
    ("schema.cue", include_str!("../../cue/platform/webservice/schema.cue")),
];

/// The module's files, with every object's labels extended by `part_of` when given.
fn module(part_of: Option<&str>) -> BTreeMap<String, String> {
    FILES
        .iter()
        .map(|(name, source)| {
            let source = match part_of {
                Some(value) => source.replace(
                    r#"_labels: _selector & {"app.kubernetes.io/managed-by": "pequod"}"#,
                    &format!(r#"_labels: _selector & {{"app.kubernetes.io/managed-by": "pequod", "app.kubernetes.io/part-of": "{value}"}}"#),
                ),
                None => source.to_string(),
            };
            (name.to_string(), source)
        })
        .collect()
}

/// Requests the apiserver served between two readings, largest first.
fn requests_between(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> (f64, Vec<(String, f64)>) {
    let mut by_kind: Vec<(String, f64)> = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    by_kind.sort_by(|a, b| b.1.total_cmp(&a.1));
    (by_kind.iter().map(|(_, v)| v).sum(), by_kind)
}

#[tokio::main]
async fn main() {
    let env = support::env("bench-plan").await;
    support::install_crds(&env.client).await;
    let group = format!("{}.bench.example.com", env.namespace);
    let cue = support::tool("cue", "PEQUOD_TEST_CUE");
    let operator = OperatorProcess::start(
        &env.operator_kubeconfig,
        &cue,
        &["--zap-log-level=warn", "--trusted-transform-namespaces=*"],
    );
    put_module_files(&env.client, &env.namespace, "webservice-module", module(None)).await;
    let transforms: Api<Transform> = Api::namespaced(env.client.clone(), &env.namespace);
    apply_transform(
        &transforms,
        "webservice",
        json!({"cueRef": {"type": "configmap", "ref": "webservice-module"}, "group": group,
               "rollout": {"strategy": "Staged", "paused": true}}),
    )
    .await;
    support::wait_transform_ready(&transforms, "webservice").await;
    let api_version = format!("{group}/v1alpha1");
    let webservices = support::dynamic_api(&env.client, &api_version, "WebService", &env.namespace).await;
    support::apply_webservices(&webservices, &api_version, INSTANCES).await;
    let started = Instant::now();
    while support::ready_count(&webservices).await < INSTANCES {
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "the instances did not become Ready"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Let the last status writes settle.
    tokio::time::sleep(Duration::from_secs(5)).await;

    // `pequod plan` with a cue that counts its processes.
    let dir = tempfile::tempdir().unwrap();
    let candidate = dir.path().join("candidate");
    std::fs::create_dir_all(&candidate).unwrap();
    for (name, source) in module(Some("platform")) {
        std::fs::write(candidate.join(name), source).unwrap();
    }
    let counter = dir.path().join("cue-calls");
    let wrapper = dir.path().join("cue");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho >> {}\nexec {} \"$@\"\n",
            counter.display(),
            cue.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let before = support::apiserver_requests(&env.client).await;
    let cli_started = Instant::now();
    let out = std::process::Command::new(support::pequod_binary())
        .env("KUBECONFIG", &env.kubeconfig)
        .env("PEQUOD_CACHE_DIR", dir.path().join("cache"))
        .args([
            "plan",
            "--transform",
            &format!("{}/webservice", env.namespace),
            "--module",
        ])
        .arg(&candidate)
        .args(["-o", "json", "--cue-binary"])
        .arg(&wrapper)
        .output()
        .unwrap();
    let cli_time = cli_started.elapsed();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (cli_requests, cli_by_kind) = requests_between(&before, &support::apiserver_requests(&env.client).await);
    let cli_cue = std::fs::read_to_string(&counter).unwrap_or_default().lines().count();
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let digest = plan["module"].as_str().unwrap().to_string();
    let planned = plan["instances"].as_array().unwrap();
    let updates = planned
        .iter()
        .flat_map(|p| p["changes"].as_array().cloned().unwrap_or_default())
        .filter(|c| c["change"] == "update")
        .count();
    assert_eq!(planned.len(), INSTANCES);
    assert_eq!(updates, 2 * INSTANCES, "a Deployment and a Service per instance change");

    // The operator's plan, for the same candidate.
    let cue_metric = "pequod_cue_invocations_total";
    let cue_before = support::metric_sum(&operator.metrics, cue_metric).await;
    let before = support::apiserver_requests(&env.client).await;
    let in_cluster_started = Instant::now();
    put_module_files(
        &env.client,
        &env.namespace,
        "webservice-module",
        module(Some("platform")),
    )
    .await;
    let summary = support::wait_for("the plan on the Transform", Duration::from_secs(600), || async {
        let t = transforms.get("webservice").await.map_err(|e| e.to_string())?;
        match t.status.and_then(|s| s.rollout).and_then(|r| r.plan) {
            Some(plan) if plan.digest == digest => Ok(plan),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let in_cluster_time = in_cluster_started.elapsed();
    let (in_cluster_requests, in_cluster_by_kind) =
        requests_between(&before, &support::apiserver_requests(&env.client).await);
    let in_cluster_cue = support::metric_sum(&operator.metrics, cue_metric).await - cue_before;
    assert_eq!(
        (summary.instances as usize, summary.updated as usize),
        (INSTANCES, 2 * INSTANCES)
    );

    println!(
        "plan benchmark (Kubernetes v1.37.2 local control plane with kwok nodes; {INSTANCES} WebServices, a Deployment and a Service each; the candidate changes both)"
    );
    println!(
        "  pequod plan:        {:>9.2?}  {:>4} cue processes  {:>6} apiserver requests ({:.1} per instance)",
        cli_time,
        cli_cue,
        cli_requests,
        cli_requests / INSTANCES as f64
    );
    println!("                      {cli_by_kind:?}");
    println!(
        "  operator's plan:    {:>9.2?}  {:>4} cue processes  {:>6} apiserver requests ({:.1} per instance)",
        in_cluster_time,
        in_cluster_cue,
        in_cluster_requests,
        in_cluster_requests / INSTANCES as f64
    );
    println!("                      {in_cluster_by_kind:?}");
    println!(
        "  planned: {} instances, {} updates ({} dry runs), {} affected",
        summary.instances, summary.updated, updates, summary.affected
    );

    // The rollout of the candidate. Its driver writes the Transform's status as batches start
    // and instances move; only the unpausing is a change of the Transform's spec.
    let transform_reconciles = "pequod_reconcile_total{controller=\"transform\"";
    let reconciles_before = support::metric_sum(&operator.metrics, transform_reconciles).await;
    let before = support::apiserver_requests(&env.client).await;
    let mark = support::control_plane::audit_mark();
    let rollout_started = Instant::now();
    let unpause = json!({"spec": {"rollout": {"paused": false, "batchSize": "10%"}}});
    transforms
        .patch("webservice", &PatchParams::default(), &Patch::Merge(unpause))
        .await
        .unwrap();
    support::wait_for("the rollout to complete", Duration::from_secs(1800), || async {
        let t = transforms.get("webservice").await.map_err(|e| e.to_string())?;
        match t.status.and_then(|s| s.rollout) {
            Some(r) if r.target_digest == digest && r.phase == Some(RolloutPhase::Complete) => Ok(()),
            other => Err(format!("{:?}", other.map(|r| (r.phase, r.updated, r.progress)))),
        }
    })
    .await;
    let rollout_time = rollout_started.elapsed();
    // Status writes that trail the last batch are part of the rollout.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rollout_reconciles = support::metric_sum(&operator.metrics, transform_reconciles).await - reconciles_before;
    let (rollout_requests, rollout_by_kind) =
        requests_between(&before, &support::apiserver_requests(&env.client).await);
    let rollout_writes = support::control_plane::writes_since(mark);
    println!(
        "  rollout in batches of 10%: {:>9.2?}  {} Transform reconciles  {} apiserver requests ({:.1} per instance)  {} operator writes",
        rollout_time,
        rollout_reconciles,
        rollout_requests,
        rollout_requests / INSTANCES as f64,
        rollout_writes.values().sum::<u64>()
    );
    println!("                      {rollout_by_kind:?}");
    println!("                      {rollout_writes:?}");
    drop(operator);
}
