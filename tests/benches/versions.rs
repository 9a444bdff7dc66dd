//! Versions benchmark against the local control plane: 500 instances of a kind written in
//! `v1alpha1`, then a module adding `v1beta1` (a renamed field of another type) as the storage
//! version, converted in CUE through the operator's webhook:
//! - the storage migration: time from the module change until every instance is stored in
//!   `v1beta1`, and the operator's writes by resource (the apiserver's audit log);
//! - a list of the 500 instances in `v1alpha1`, the version they are not stored in: the
//!   apiserver sends them to the webhook in one review; latency and cue calls, cold (every
//!   instance changed since anything converted it) and warm (every conversion cached), side by
//!   side with the same list in `v1beta1`, which converts nothing.
//!
//! `make bench-versions` runs it.

use pequod_testkit as support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::Api;
use kube::api::ListParams;
use pequod::api::{StorageMigrationPhase, Transform};
use serde_json::json;
use support::OperatorProcess;
use support::control_plane::{audit_mark, writes_since};
use support::modules::{V1ALPHA1_WEB, put_module, two_version_web};
use support::transforms::apply_transform;

const INSTANCES: usize = if option_env!("PEQUOD_BENCH_QUICK").is_some() {
    100
} else {
    500
};

/// Every cue process the operator started, whatever the command.
async fn cue_processes(operator: &OperatorProcess) -> f64 {
    support::metric_sum(&operator.metrics, "pequod_cue_invocations_total").await
}

/// Lists every instance in `api`'s version; returns how long it took.
async fn timed_list(api: &Api<kube::api::DynamicObject>) -> Duration {
    let started = Instant::now();
    let listed = api.list(&ListParams::default()).await.expect("list");
    assert_eq!(listed.items.len(), INSTANCES);
    started.elapsed()
}

#[tokio::main]
async fn main() {
    let env = support::env("bench-versions").await;
    support::install_crds(&env.client).await;
    let group = format!("{}.bench.example.com", env.namespace);
    let operator = OperatorProcess::start(
        &env.operator_kubeconfig,
        &support::tool("cue", "PEQUOD_TEST_CUE"),
        &[
            "--max-concurrent-reconciles=16",
            "--zap-log-level=warn",
            "--trusted-transform-namespaces=*",
        ],
    );
    put_module(&env.client, &env.namespace, "web-module", V1ALPHA1_WEB).await;
    let transforms: Api<Transform> = Api::namespaced(env.client.clone(), &env.namespace);
    apply_transform(
        &transforms,
        "web",
        json!({"cueRef": {"type": "configmap", "ref": "web-module"}, "group": group, "version": "v1alpha1",
               "managedResources": [{"resources": ["configmaps"]}]}),
    )
    .await;
    support::wait_transform_ready(&transforms, "web").await;
    let alpha_version = format!("{group}/v1alpha1");
    let alpha = support::dynamic_api(&env.client, &alpha_version, "Web", &env.namespace).await;
    futures::stream::iter(0..INSTANCES)
        .for_each_concurrent(16, |i| {
            let alpha = alpha.clone();
            let alpha_version = alpha_version.clone();
            async move {
                let spec = json!({"image": "nginx", "port": format!("{}", 1000 + i)});
                support::instances::apply_instance(&alpha, &alpha_version, "Web", &format!("w{i:04}"), spec).await;
            }
        })
        .await;
    support::wait_for("every instance rendered", Duration::from_secs(900), || async {
        let ready = support::ready_count(&alpha).await;
        if ready == INSTANCES {
            Ok(())
        } else {
            Err(format!("{ready} ready"))
        }
    })
    .await;

    // The module change: v1beta1 becomes the storage version.
    let mark = audit_mark();
    let started = Instant::now();
    put_module(&env.client, &env.namespace, "web-module", &two_version_web("")).await;
    let migration = support::wait_for("the storage migration", Duration::from_secs(900), || async {
        let t = transforms.get("web").await.map_err(|e| e.to_string())?;
        match t.status.and_then(|s| s.storage_migration) {
            Some(m) if m.phase == StorageMigrationPhase::Complete => Ok(m),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let migrated_in = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let migration_writes = writes_since(mark);

    // Every instance changed (through v1beta1, which converts nothing): the conversions the
    // migration and the round-trip check cached are of other content, so the first list in
    // v1alpha1 is cold. The lists wait until the operator has rendered the changes.
    let beta = support::dynamic_api(&env.client, &format!("{group}/v1beta1"), "Web", &env.namespace).await;
    let beta_version = format!("{group}/v1beta1");
    let conversion_metrics = || async {
        let sum = |series: &'static str| support::metric_sum(&operator.metrics, series);
        (
            sum("pequod_conversion_requests_total").await,
            sum("pequod_conversion_objects_total").await,
            sum("pequod_conversion_duration_seconds_count").await,
        )
    };
    let before_writes = conversion_metrics().await;
    let writes_started = Instant::now();
    futures::stream::iter(0..INSTANCES)
        .for_each_concurrent(16, |i| {
            let beta = beta.clone();
            let beta_version = beta_version.clone();
            async move {
                let spec = json!({"image": "nginx", "listenPort": 20000 + i});
                support::instances::apply_instance(&beta, &beta_version, "Web", &format!("w{i:04}"), spec).await;
            }
        })
        .await;
    let writes_took = writes_started.elapsed();
    let mut settled = cue_processes(&operator).await;
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let now = cue_processes(&operator).await;
        if now == settled {
            break;
        }
        settled = now;
    }
    let after_writes = conversion_metrics().await;
    let conversion_calls = || support::metric_sum(&operator.metrics, "pequod_conversion_duration_seconds_count");
    let stored = timed_list(&beta).await;
    let calls_before = conversion_calls().await;
    let cold = timed_list(&alpha).await;
    let cold_cue = conversion_calls().await - calls_before;
    let calls_before = conversion_calls().await;
    let warm = timed_list(&alpha).await;
    let warm_cue = conversion_calls().await - calls_before;
    let stored_again = timed_list(&beta).await;

    println!("instances: {INSTANCES}");
    println!(
        "storage migration: {:.1} s from the module change to Complete ({} rewritten)",
        migrated_in.as_secs_f64(),
        migration.migrated
    );
    println!("operator writes meanwhile: {migration_writes:?}");
    println!(
        "{INSTANCES} instances changed in v1beta1 in {:.1} s: the apiserver sent {} conversion review(s) of {} object(s), converted in {} cue call(s)",
        writes_took.as_secs_f64(),
        after_writes.0 - before_writes.0,
        after_writes.1 - before_writes.1,
        after_writes.2 - before_writes.2
    );
    println!(
        "list in v1beta1 (stored, no conversion): {:.0} ms, again {:.0} ms",
        stored.as_secs_f64() * 1000.0,
        stored_again.as_secs_f64() * 1000.0
    );
    println!(
        "list in v1alpha1 (converted), cold: {:.0} ms, {cold_cue} conversion cue call(s)",
        cold.as_secs_f64() * 1000.0
    );
    println!(
        "list in v1alpha1 (converted), warm: {:.0} ms, {warm_cue} conversion cue call(s)",
        warm.as_secs_f64() * 1000.0
    );
    println!(
        "ratio converted cold / stored: {:.2}x; warm / stored: {:.2}x",
        cold.as_secs_f64() / stored.as_secs_f64(),
        warm.as_secs_f64() / stored_again.as_secs_f64()
    );
    drop(operator);
    env.cleanup().await;
}
