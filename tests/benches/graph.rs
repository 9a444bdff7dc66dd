//! One large graph against the local control plane: a graph of 100 ConfigMap nodes, then one of
//! 1,000, each in 10 dependency waves, applied by one operator in one run. For each: time from
//! creation to Completed, the operator's CPU and resident memory, the apiserver requests and
//! the operator's writes meanwhile, and the graph's bytes (spec, status, the whole object as
//! stored, managed fields included).
//!
//! `make bench-graph` runs it.

use pequod_testkit as support;
use support::control_plane::{audit_mark, writes_since};

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube::Api;
use kube::api::{DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use pequod::api::{GraphPhase, ResourceGraph};
use serde_json::{Value, json};
use support::OperatorProcess;

const WAVES: usize = 10;

/// `count` ConfigMap nodes in [`WAVES`] waves: each node after the first wave depends on the
/// node one wave before it, and each has an `Exists` gate.
fn graph(name: &str, count: usize) -> ResourceGraph {
    let per_wave = count / WAVES;
    let nodes: Vec<Value> = (0..count)
        .map(|i| {
            let deps: Vec<String> = (i >= per_wave).then(|| format!("cm-{:04}", i - per_wave)).into_iter().collect();
            json!({"id": format!("cm-{i:04}"), "dependencies": deps, "readyWhen": [{"type": "Exists"}],
                   "resource": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("{name}-{i:04}")}, "data": {"index": i.to_string()}}})
        })
        .collect();
    serde_json::from_value(
        json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph",
        "metadata": {"name": name}, "spec": {"graph": {"nodes": nodes}}}),
    )
    .unwrap()
}

struct Measured {
    nodes: usize,
    completed: Duration,
    operator_cpu: f64,
    rss_mib: f64,
    requests: BTreeMap<String, f64>,
    writes: BTreeMap<String, u64>,
    spec_bytes: usize,
    status_bytes: usize,
    managed_fields_bytes: usize,
    object_bytes: usize,
}

async fn measure(env: &support::TestEnv, operator: &OperatorProcess, name: &str, nodes: usize) -> Measured {
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let requests_before = support::apiserver_requests(&env.client).await;
    let mark = audit_mark();
    let cpu_before = operator.cpu_seconds();
    let started = Instant::now();
    graphs
        .create(&PostParams::default(), &graph(name, nodes))
        .await
        .unwrap();
    loop {
        let rg = graphs.get(name).await.unwrap();
        match rg.status.as_ref().and_then(|s| s.phase) {
            Some(GraphPhase::Completed) => break,
            Some(GraphPhase::Failed) => panic!("{name} failed: {:?}", rg.status.map(|s| s.conditions)),
            _ => {}
        }
        assert!(started.elapsed() < Duration::from_secs(900), "{name} did not complete");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let completed = started.elapsed();
    let operator_cpu = operator.cpu_seconds() - cpu_before;
    let requests_after = support::apiserver_requests(&env.client).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = writes_since(mark);
    let requests = requests_after
        .iter()
        .map(|(k, v)| (k.clone(), v - requests_before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect();

    // The object as the apiserver returns it, managed fields included.
    let gvk = GroupVersionKind::gvk("platform.platform.example.com", "v1alpha1", "ResourceGraph");
    let raw: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), &env.namespace, &ApiResource::from_gvk(&gvk));
    let object = serde_json::to_value(raw.get(name).await.unwrap()).unwrap();
    let bytes = |v: &Value| serde_json::to_vec(v).unwrap().len();
    Measured {
        nodes,
        completed,
        operator_cpu,
        rss_mib: operator.rss_mib(),
        requests,
        writes,
        spec_bytes: bytes(&object["spec"]),
        status_bytes: bytes(&object["status"]),
        managed_fields_bytes: bytes(&object["metadata"]["managedFields"]),
        object_bytes: bytes(&object),
    }
}

#[tokio::main]
async fn main() {
    let env = support::env("bench-graph").await;
    support::install_crds(&env.client).await;
    let operator = OperatorProcess::start(
        &env.operator_kubeconfig,
        &support::tool("cue", "PEQUOD_TEST_CUE"),
        &["--zap-log-level=warn"],
    );
    // The operator is up and idle before the first graph.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_idle = operator.rss_mib();
    let small = measure(&env, &operator, "small", 100).await;
    let large = measure(&env, &operator, "large", 1000).await;

    println!(
        "graph benchmark (local control plane, default --apply-concurrency=8, {WAVES} waves of ConfigMaps with Exists gates)"
    );
    println!("  operator RSS when idle                 {rss_idle:>8.1} MiB");
    for m in [&small, &large] {
        let requests: f64 = m.requests.values().sum();
        let writes: u64 = m.writes.values().sum();
        println!("  {} nodes", m.nodes);
        println!("    created to Completed                 {:>9.2?}", m.completed);
        println!("    operator CPU                         {:>8.2} s", m.operator_cpu);
        println!("    operator RSS afterwards              {:>8.1} MiB", m.rss_mib);
        println!("    apiserver requests (all clients)     {requests:>8}");
        for (k, v) in &m.requests {
            println!("      {k:<44} {v}");
        }
        println!("    operator writes                      {writes:>8} {:?}", m.writes);
        println!(
            "    bytes: spec {}, status {} ({} per node), managed fields {}, object {}",
            m.spec_bytes,
            m.status_bytes,
            m.status_bytes / m.nodes,
            m.managed_fields_bytes,
            m.object_bytes
        );
    }
    println!(
        "  ratio 1,000 / 100 nodes: time {:.2}x, operator CPU {:.2}x, requests {:.2}x, object bytes {:.2}x",
        large.completed.as_secs_f64() / small.completed.as_secs_f64(),
        large.operator_cpu / small.operator_cpu.max(0.001),
        large.requests.values().sum::<f64>() / small.requests.values().sum::<f64>().max(1.0),
        large.object_bytes as f64 / small.object_bytes as f64
    );
}
