//! Instance benchmark against the local control plane with simulated nodes:
//! - 500 WebServices (the embedded module: a Deployment of 1 pod, then a Service) created at
//!   once, until every one is Ready, which takes its pod scheduled and running: total time, cue
//!   invocations (batching should make them far fewer than 500), operator RSS, and the writes
//!   the operator made per converged instance, counted by the apiserver's audit log;
//! - a minute at rest: operator writes and cue processes (target: none of either);
//! - a resync with nothing changed (every instance reconciled again through its graph):
//!   cue invocations and operator writes (target: none of either);
//! - live status: every pod is deleted and comes back, so each Deployment's replicas drop and
//!   return; the instances' `availableReplicas` follow through status projection and the
//!   Service's CEL readiness gate is evaluated on every pass: operator CPU, writes per instance
//!   and cue invocations (target: none);
//! - a cold restart: operator writes (target: none) and the cue calls a cold render cache costs.
//!
//! `make bench-instances` runs it.

use pequod_testkit as support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use pequod::api::{ResourceGraph, Transform};
use serde_json::json;
use support::OperatorProcess;
use support::control_plane::{audit_mark, writes_since};
use support::transforms::apply_transform;

const INSTANCES: usize = if option_env!("PEQUOD_BENCH_QUICK").is_some() {
    100
} else {
    500
};
const AT_REST: Duration = Duration::from_secs(60);

fn start(env: &support::TestEnv) -> OperatorProcess {
    OperatorProcess::start(
        &env.operator_kubeconfig,
        &support::tool("cue", "PEQUOD_TEST_CUE"),
        &[
            "--max-concurrent-reconciles=16",
            "--zap-log-level=warn",
            "--trusted-transform-namespaces=*",
        ],
    )
}

/// Every cue process the operator started, whatever the command.
async fn cue_processes(operator: &OperatorProcess) -> f64 {
    support::metric_sum(&operator.metrics, "pequod_cue_invocations_total").await
}

fn total(writes: &BTreeMap<String, u64>) -> u64 {
    writes.values().sum()
}

#[tokio::main]
async fn main() {
    let env = support::env("bench-instances").await;
    support::install_crds(&env.client).await;
    let group = format!("{}.bench.example.com", env.namespace);
    let operator = start(&env);

    let transforms: Api<Transform> = Api::namespaced(env.client.clone(), &env.namespace);
    apply_transform(
        &transforms,
        "webservice",
        json!({"cueRef": {"type": "embedded", "ref": "webservice"}, "group": group}),
    )
    .await;
    let api_version = format!("{group}/v1alpha1");
    support::wait_transform_ready(&transforms, "webservice").await;
    let webservices = support::dynamic_api(&env.client, &api_version, "WebService", &env.namespace).await;

    let cue_before = support::metric_sum(&operator.metrics, "pequod_cue_invocations_total{command=\"export\"").await;
    let mark = audit_mark();
    let started = Instant::now();
    support::apply_webservices(&webservices, &api_version, INSTANCES).await;
    let created = started.elapsed();
    loop {
        let ready = support::ready_count(&webservices).await;
        if ready == INSTANCES {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "only {ready} of {INSTANCES} ready"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let converged = started.elapsed();
    let cue_calls =
        support::metric_sum(&operator.metrics, "pequod_cue_invocations_total{command=\"export\"").await - cue_before;
    // Status writes that trail the last Ready are part of converging.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let converge_writes = writes_since(mark);
    let rss = operator.rss_mib();
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(env.client.clone(), &env.namespace)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .count();

    // At rest: nothing changes, so the operator neither writes nor starts cue.
    let mark = audit_mark();
    let cue_before = cue_processes(&operator).await;
    tokio::time::sleep(AT_REST).await;
    let rest_writes = writes_since(mark);
    let rest_cue = cue_processes(&operator).await - cue_before;

    // Resync with nothing changed: touching each graph brings its instance back through the
    // owner watch. The touches are the benchmark's own writes, not the operator's.
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let reconciles_before =
        support::metric_sum(&operator.metrics, "pequod_reconcile_total{controller=\"instance\"").await;
    let cue_before = cue_processes(&operator).await;
    let mark = audit_mark();
    futures::stream::iter(0..INSTANCES)
        .for_each_concurrent(32, |i| {
            let graphs = graphs.clone();
            let group = group.clone();
            async move {
                let patch = json!({"metadata": {"labels": {"bench.pequod.io/touched": "yes"}}});
                graphs
                    .patch(
                        &format!("webservice.{group}-w{i}"),
                        &PatchParams::default(),
                        &Patch::Merge(patch),
                    )
                    .await
                    .unwrap();
            }
        })
        .await;
    loop {
        let reconciled = support::metric_sum(&operator.metrics, "pequod_reconcile_total{controller=\"instance\"").await
            - reconciles_before;
        if reconciled >= INSTANCES as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let resync_writes = writes_since(mark);
    let resync_cue = cue_processes(&operator).await - cue_before;

    // Live status: the pods go and come back; the status follows without cue.
    let pods_api = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(env.client.clone(), &env.namespace);
    let cue_before = cue_processes(&operator).await;
    let cpu_before = operator.cpu_seconds();
    let mark = audit_mark();
    let live_started = Instant::now();
    pods_api
        .delete_collection(&Default::default(), &ListParams::default())
        .await
        .unwrap();
    // First the projections see the pods gone, then back.
    let available = |want: i64| {
        let webservices = webservices.clone();
        async move {
            let list = webservices.list(&ListParams::default()).await.unwrap();
            list.items
                .iter()
                .filter(|w| w.data["status"]["availableReplicas"].as_i64().unwrap_or(0) == want)
                .count()
        }
    };
    while available(1).await == INSTANCES && live_started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    loop {
        if available(1).await == INSTANCES && support::ready_count(&webservices).await == INSTANCES {
            break;
        }
        assert!(
            live_started.elapsed() < Duration::from_secs(900),
            "the instances' status did not follow the pods back"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let live_followed = live_started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let live_writes = writes_since(mark);
    let live_cpu = operator.cpu_seconds() - cpu_before;
    let live_cue = cue_processes(&operator).await - cue_before;
    drop(operator);

    // Cold restart: nothing changed, so nothing is written; renders run again (in batches).
    let mark = audit_mark();
    let operator = start(&env);
    support::wait_for(
        "the restarted operator to reconcile every instance",
        Duration::from_secs(300),
        || async {
            let n = support::metric_sum(&operator.metrics, "pequod_reconcile_total{controller=\"instance\"").await;
            if n >= INSTANCES as f64 {
                Ok(())
            } else {
                Err(format!("{n}"))
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let restart_writes = writes_since(mark);
    let restart_cue = cue_processes(&operator).await;

    println!(
        "instance benchmark (Kubernetes v1.37.2 local control plane with kwok nodes; a Deployment of 1 pod and a Service per instance)"
    );
    println!("  {INSTANCES} instances created               {:>9.2?}", created);
    println!(
        "  {INSTANCES} instances Ready                 {:>9.2?}   ({pods} pods running)",
        converged
    );
    println!("  cue invocations while converging     {:>9}", cue_calls);
    println!(
        "  operator writes while converging     {:>9}    ({:.2} per instance) {converge_writes:?}",
        total(&converge_writes),
        total(&converge_writes) as f64 / INSTANCES as f64
    );
    println!(
        "  operator RSS after                   {:>8.1} MiB  (target < 128 MiB)",
        rss
    );
    println!(
        "  {}s at rest: operator writes         {:>9}    (target 0) {rest_writes:?}",
        AT_REST.as_secs(),
        total(&rest_writes)
    );
    println!(
        "  {}s at rest: cue processes          {:>9}    (target 0)",
        AT_REST.as_secs(),
        rest_cue
    );
    println!("  resync: cue invocations              {:>9}    (target 0)", resync_cue);
    println!(
        "  resync: operator writes              {:>9}    (target 0) {resync_writes:?}",
        total(&resync_writes)
    );
    println!("  live status: pods gone and back       {:>9.2?}", live_followed);
    println!(
        "  live status: operator writes         {:>9}    ({:.2} per instance) {live_writes:?}",
        total(&live_writes),
        total(&live_writes) as f64 / INSTANCES as f64
    );
    println!(
        "  live status: operator CPU            {:>8.2} s  ({:.2} ms per instance)",
        live_cpu,
        live_cpu * 1000.0 / INSTANCES as f64
    );
    println!("  live status: cue invocations         {:>9}    (target 0)", live_cue);
    println!(
        "  restart: operator writes             {:>9}    (target 0) {restart_writes:?}",
        total(&restart_writes)
    );
    println!("  restart: cue processes               {:>9}", restart_cue);
}
