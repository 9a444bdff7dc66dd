//! Instance benchmark against the local control plane:
//! - 500 instances of a generated kind created at once, until every one is Ready: total time,
//!   cue invocations (batching should make them far fewer than 500), operator RSS;
//! - a resync with nothing changed (every instance reconciled again through its graph):
//!   cue invocations and write requests (target: none of either);
//! - a cold restart: write requests (target: none) and the cue calls a cold render cache costs.
//!
//! `make bench-instances` runs it.

use pequod_testkit as support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use pequod::api::{ResourceGraph, Transform};
use serde_json::json;
use support::OperatorProcess;

const INSTANCES: usize = if option_env!("PEQUOD_BENCH_QUICK").is_some() {
    100
} else {
    500
};

fn start(kubeconfig: &std::path::Path) -> OperatorProcess {
    OperatorProcess::start(
        kubeconfig,
        &support::tool("cue", "PEQUOD_TEST_CUE"),
        &["--max-concurrent-reconciles=16", "--zap-log-level=warn"],
    )
}

/// Write requests the apiserver has served, by `resource[ subresource]`.
async fn writes(client: &Client) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for (key, value) in support::apiserver_requests(client).await {
        let mut parts = key.splitn(2, ' ');
        let (verb, rest) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        // The apiserver rewrites the `kubernetes` Endpoints itself; that write is not Pequod's.
        if ["POST", "PATCH", "PUT", "DELETE"].contains(&verb) && !rest.starts_with("endpoints") {
            *out.entry(rest.to_string()).or_insert(0.0) += value;
        }
    }
    out
}

fn diff(
    after: &std::collections::BTreeMap<String, f64>,
    before: &std::collections::BTreeMap<String, f64>,
) -> std::collections::BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect()
}

async fn ready_count(api: &Api<DynamicObject>) -> usize {
    let list = api.list(&ListParams::default()).await.unwrap();
    list.items
        .iter()
        .filter(|o| {
            o.data["status"]["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
        })
        .count()
}

#[tokio::main]
async fn main() {
    let env = support::env("bench-instances").await;
    support::install_crds(&env.client).await;
    let group = format!("{}.bench.example.com", env.namespace);
    let operator = start(&env.kubeconfig);

    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "note-module", "labels": {"pequod.io/cue-module": "true"}}, "data": {"note.cue": support::NOTE_MODULE}});
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(env.client.clone(), &env.namespace)
        .patch("note-module", &PatchParams::apply("bench"), &Patch::Apply(cm))
        .await
        .unwrap();
    let transforms: Api<Transform> = Api::namespaced(env.client.clone(), &env.namespace);
    let t = json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "Transform", "metadata": {"name": "note"},
                   "spec": {"cueRef": {"type": "configmap", "ref": "note-module"}, "group": group}});
    transforms
        .patch("note", &PatchParams::apply("bench"), &Patch::Apply(t))
        .await
        .unwrap();
    let api_version = format!("{group}/v1alpha1");
    support::wait_transform_ready(&transforms, "note").await;
    let notes = support::dynamic_api(&env.client, &api_version, "Note", &env.namespace).await;

    let cue_before = support::metric_sum(&operator.metrics, "pequod_cue_invocations_total{command=\"export\"").await;
    let started = Instant::now();
    futures::stream::iter(0..INSTANCES)
        .for_each_concurrent(32, |i| {
            let notes = notes.clone();
            let api_version = api_version.clone();
            async move {
                let obj = json!({"apiVersion": api_version, "kind": "Note", "metadata": {"name": format!("n{i}")}, "spec": {"text": format!("note {i}")}});
                notes
                    .patch(&format!("n{i}"), &PatchParams::apply("bench"), &Patch::Apply(obj))
                    .await
                    .unwrap();
            }
        })
        .await;
    let created = started.elapsed();
    loop {
        let ready = ready_count(&notes).await;
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
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = operator.rss_mib();

    // Resync with nothing changed: touching each graph brings its instance back through the
    // owner watch; the 500 label patches below are the only writes expected.
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let reconciles_before =
        support::metric_sum(&operator.metrics, "pequod_reconcile_total{controller=\"instance\"").await;
    let cue_before = support::metric_sum(&operator.metrics, "pequod_cue_invocations_total{command=\"export\"").await;
    let writes_before = writes(&env.client).await;
    futures::stream::iter(0..INSTANCES)
        .for_each_concurrent(32, |i| {
            let graphs = graphs.clone();
            async move {
                let patch = json!({"metadata": {"labels": {"bench.pequod.io/touched": "yes"}}});
                graphs
                    .patch(&format!("note-n{i}"), &PatchParams::default(), &Patch::Merge(patch))
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
    let mut resync_writes = diff(&writes(&env.client).await, &writes_before);
    if let Some(v) = resync_writes.get_mut("resourcegraphs") {
        *v -= INSTANCES as f64;
    }
    resync_writes.retain(|_, v| *v > 0.0);
    let resync_cue =
        support::metric_sum(&operator.metrics, "pequod_cue_invocations_total{command=\"export\"").await - cue_before;
    drop(operator);

    // Cold restart: nothing changed, so nothing is written; renders run again (in batches).
    let writes_before = writes(&env.client).await;
    let operator = start(&env.kubeconfig);
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
    let restart_writes = diff(&writes(&env.client).await, &writes_before);
    let restart_cue = support::metric_sum(&operator.metrics, "pequod_cue_invocations_total{command=\"export\"").await;

    println!("instance benchmark (Kubernetes 1.20 local control plane, 2 objects per instance)");
    println!("  {INSTANCES} instances created               {:>9.2?}", created);
    println!("  {INSTANCES} instances Ready                 {:>9.2?}", converged);
    println!("  cue invocations while converging     {:>9}", cue_calls);
    println!(
        "  operator RSS after                   {:>8.1} MiB  (target < 128 MiB)",
        rss
    );
    println!("  resync: cue invocations              {:>9}    (target 0)", resync_cue);
    println!(
        "  resync: operator writes              {:>9?}   (target none)",
        resync_writes
    );
    println!(
        "  restart: writes                      {:>9?}   (target none)",
        restart_writes
    );
    println!("  restart: cue invocations             {:>9}", restart_cue);
}
