//! Executor benchmark against the local control plane, measured side by side in one run:
//! - 200 graphs of 3 nodes (Exists gates) converging, against the same 600 server-side
//!   applies issued directly with the same concurrency;
//! - the write requests a resync of the 200 completed graphs sends (target: none);
//! - the operator's resident memory with 1,000 graphs.
//!
//! `make bench-executor` runs it.

use pequod_testkit as support;
use support::control_plane::{audit_mark, writes_since};

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use pequod::api::{GraphPhase, ResourceGraph};
use serde_json::json;
use support::OperatorProcess;

const GRAPHS: usize = 200;
const MANY_GRAPHS: usize = if option_env!("PEQUOD_BENCH_QUICK").is_some() {
    200
} else {
    1000
};
const RECONCILES: u16 = 16;
const APPLY_CONCURRENCY: u16 = 3;

fn start(kubeconfig: &std::path::Path) -> OperatorProcess {
    let reconciles = format!("--max-concurrent-reconciles={RECONCILES}");
    let applies = format!("--apply-concurrency={APPLY_CONCURRENCY}");
    OperatorProcess::start(
        kubeconfig,
        &support::tool("cue", "PEQUOD_TEST_CUE"),
        &[&reconciles, &applies, "--zap-log-level=warn"],
    )
}

fn graph(i: usize) -> ResourceGraph {
    let nodes: Vec<_> = (0..3)
        .map(|n| json!({"id": format!("cm{n}"), "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("g{i}-cm{n}")}, "data": {"n": n.to_string()}}, "readyWhen": [{"type": "Exists"}]}))
        .collect();
    serde_json::from_value(json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph", "metadata": {"name": format!("g{i}")}, "spec": {"nodes": nodes}})).unwrap()
}

async fn create_graphs(graphs: &Api<ResourceGraph>, range: std::ops::Range<usize>) {
    futures::stream::iter(range)
        .for_each_concurrent(32, |i| async move {
            graphs.create(&PostParams::default(), &graph(i)).await.unwrap();
        })
        .await;
}

async fn wait_completed(graphs: &Api<ResourceGraph>, count: usize, timeout: Duration) {
    let started = Instant::now();
    loop {
        let list = graphs.list(&Default::default()).await.unwrap();
        let done = list
            .items
            .iter()
            .filter(|g| g.status.as_ref().and_then(|s| s.phase) == Some(GraphPhase::Completed))
            .count();
        if done >= count {
            return;
        }
        assert!(started.elapsed() < timeout, "only {done} of {count} graphs completed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// kube-apiserver CPU seconds used while `work` runs.
async fn apiserver_cpu_of<F, Fut>(work: F) -> f64
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let before = support::cpu_seconds_by_process();
    work().await;
    let after = support::cpu_seconds_by_process();
    after.get("kube-apiserver").copied().unwrap_or(0.0) - before.get("kube-apiserver").copied().unwrap_or(0.0)
}

#[tokio::main]
async fn main() {
    let baseline_env = support::env("bench-direct").await;
    support::install_crds(&baseline_env.client).await;

    // Direct: 600 server-side applies, the concurrency the operator gets below.
    let cms: Api<ConfigMap> = Api::namespaced(baseline_env.client.clone(), &baseline_env.namespace);
    let direct_cpu_before = support::cpu_seconds_by_process();
    let started = Instant::now();
    futures::stream::iter(0..GRAPHS * 3)
        .for_each_concurrent(usize::from(RECONCILES * APPLY_CONCURRENCY), |i| {
            let cms = cms.clone();
            async move {
                let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("direct-{i}")}, "data": {"n": "x"}});
                cms.patch(&format!("direct-{i}"), &PatchParams::apply("bench"), &Patch::Apply(cm)).await.unwrap();
            }
        })
        .await;
    let direct = started.elapsed();
    let direct_cpu_after = support::cpu_seconds_by_process();

    // Executor: the graphs exist before the operator starts; the clock runs from its start.
    let env = support::env("bench-executor").await;
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    create_graphs(&graphs, 0..GRAPHS).await;
    let requests_before = support::apiserver_requests(&env.client).await;
    let mark = audit_mark();
    let cpu_before = support::cpu_seconds_by_process();
    let started = Instant::now();
    let operator = start(&env.operator_kubeconfig);
    wait_completed(&graphs, GRAPHS, Duration::from_secs(300)).await;
    let executor = started.elapsed();
    let cpu_after = support::cpu_seconds_by_process();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let converge_writes = writes_since(mark);
    let reconciles = support::metric_sum(&operator.metrics, "pequod_reconcile_duration_seconds_count").await;
    let reconcile_mean_ms = 1000.0
        * support::metric_sum(&operator.metrics, "pequod_reconcile_duration_seconds_sum").await
        / reconciles.max(1.0);
    if std::env::var_os("PEQUOD_BENCH_REQUESTS").is_some() {
        for (k, v) in support::apiserver_requests(&env.client).await {
            let d = v - requests_before.get(&k).copied().unwrap_or(0.0);
            if d > 0.0 {
                println!("  requests during convergence: {k:<40} {d}");
            }
        }
    }
    drop(operator);

    // What one write of a graph costs the apiserver, with the operator stopped: a merge patch
    // of its metadata (as for the finalizer) and an apply of its status unchanged.
    let metadata_cpu = apiserver_cpu_of(|| async {
        futures::stream::iter(0..GRAPHS)
            .for_each_concurrent(48, |i| {
                let graphs = graphs.clone();
                async move {
                    let patch = json!({"metadata": {"labels": {"bench.pequod.io/touched": "yes"}}});
                    graphs
                        .patch(&format!("g{i}"), &PatchParams::default(), &Patch::Merge(patch))
                        .await
                        .unwrap();
                }
            })
            .await;
    })
    .await;
    let status_cpu = apiserver_cpu_of(|| async {
        futures::stream::iter(0..GRAPHS)
            .for_each_concurrent(48, |i| {
                let graphs = graphs.clone();
                async move {
                    let rg = graphs.get(&format!("g{i}")).await.unwrap();
                    let body = json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph", "status": rg.status});
                    graphs
                        .patch_status(&format!("g{i}"), &PatchParams::apply("bench").force(), &Patch::Apply(body))
                        .await
                        .unwrap();
                }
            })
            .await;
    })
    .await;

    // Resync: a restarted operator reconciles every graph; nothing changed, so nothing is written.
    let mark = audit_mark();
    let operator = start(&env.operator_kubeconfig);
    tokio::time::sleep(Duration::from_secs(15)).await;
    let resync_writes: u64 = writes_since(mark).values().sum();
    let rss_200 = operator.rss_mib();

    // Memory with 1,000 graphs (3,000 objects).
    create_graphs(&graphs, GRAPHS..MANY_GRAPHS).await;
    wait_completed(&graphs, MANY_GRAPHS, Duration::from_secs(900)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_1000 = operator.rss_mib();

    println!(
        "executor benchmark (Kubernetes v1.37.2 local control plane, {RECONCILES} reconciles x {APPLY_CONCURRENCY} applies)"
    );
    println!("  {} direct server-side applies       {:>9.2?}", GRAPHS * 3, direct);
    let apiserver = |after: &std::collections::BTreeMap<String, f64>,
                     before: &std::collections::BTreeMap<String, f64>| {
        after.get("kube-apiserver").copied().unwrap_or(0.0) - before.get("kube-apiserver").copied().unwrap_or(0.0)
    };
    println!(
        "    CPU used meanwhile by kube-apiserver {:>6.2} s",
        apiserver(&direct_cpu_after, &direct_cpu_before)
    );
    println!("  {GRAPHS} graphs x 3 nodes converged      {:>9.2?}", executor);
    for name in ["pequod", "kube-apiserver", "etcd", "kube-controller"] {
        let used = cpu_after.get(name).copied().unwrap_or(0.0) - cpu_before.get(name).copied().unwrap_or(0.0);
        println!("    CPU used meanwhile by {name:<16} {used:>6.2} s");
    }
    println!(
        "  reconciles during convergence       {:>9}    mean {:.1} ms",
        reconciles, reconcile_mean_ms
    );
    println!(
        "  operator writes while converging    {:>9}    ({:.2} per graph) {converge_writes:?}",
        converge_writes.values().sum::<u64>(),
        converge_writes.values().sum::<u64>() as f64 / GRAPHS as f64
    );
    println!(
        "  ratio executor / direct             {:>9.2}x  (target <= 1.5x)",
        executor.as_secs_f64() / direct.as_secs_f64()
    );
    println!(
        "  apiserver CPU per graph write: metadata merge patch {:.1} ms, status apply {:.1} ms; per direct ConfigMap apply {:.1} ms",
        1000.0 * metadata_cpu / GRAPHS as f64,
        1000.0 * status_cpu / GRAPHS as f64,
        1000.0 * apiserver(&direct_cpu_after, &direct_cpu_before) / (GRAPHS * 3) as f64
    );
    println!(
        "  writes during a resync of {GRAPHS}      {:>9}    (target 0)",
        resync_writes
    );
    println!("  operator RSS, {GRAPHS} graphs            {:>8.1} MiB", rss_200);
    println!(
        "  operator RSS, {MANY_GRAPHS} graphs           {:>8.1} MiB  (target < 128 MiB)",
        rss_1000
    );
}
