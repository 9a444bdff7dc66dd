//! ResourceGraphs shared among replicas in shards (`--shards`): every replica works, the
//! shards of a replica that dies or is cut off are taken over, and no object is ever written by
//! two replicas in turn.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams};
use pequod::api::{GraphPhase, ResourceGraph};
use serde_json::json;
use support::OperatorProcess;

use super::{SERIAL, WAIT, leader_flags, support};

const SHARDS: u32 = 6;
const GRAPHS: usize = 18;

fn graph(name: &str, version: u32) -> serde_json::Value {
    json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph", "metadata": {"name": name},
           "spec": {"nodes": [{"id": "config", "object": {"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": name}, "data": {"version": version.to_string()}}}]}})
}

/// Who holds each shard's Lease (unheld shards are left out).
async fn shard_holders(leases: &Api<Lease>) -> BTreeMap<u32, String> {
    let mut holders = BTreeMap::new();
    for shard in 0..SHARDS {
        if let Ok(Some(lease)) = leases.get_opt(&format!("pequod-leader-shard-{shard}")).await
            && let Some(holder) = lease.spec.and_then(|s| s.holder_identity).filter(|h| !h.is_empty())
        {
            holders.insert(shard, holder);
        }
    }
    holders
}

/// How many shards each replica holds, once every shard is held and by `replicas` of them.
async fn shares_of(leases: &Api<Lease>, replicas: usize) -> Result<BTreeMap<String, usize>, String> {
    let holders = shard_holders(leases).await;
    let mut shares: BTreeMap<String, usize> = BTreeMap::new();
    for holder in holders.values() {
        *shares.entry(holder.clone()).or_default() += 1;
    }
    if holders.len() == SHARDS as usize && shares.len() == replicas {
        Ok(shares)
    } else {
        Err(format!("{holders:?}"))
    }
}

/// Waits until `replicas` replicas hold every shard, as many each.
async fn even_shares(leases: &Api<Lease>, replicas: usize, what: &str) -> BTreeMap<String, usize> {
    support::wait_for(what, WAIT, || async {
        let shares = shares_of(leases, replicas).await?;
        if shares.values().all(|n| *n == SHARDS as usize / replicas) {
            Ok(shares)
        } else {
            Err(format!("{shares:?}"))
        }
    })
    .await
}

/// The identity of `operator` among lease holders: `<host>_<pid in hex><8 hex digits>`.
fn identity_of<'a>(operator: &OperatorProcess, holders: impl IntoIterator<Item = &'a String>) -> String {
    let pid = format!("_{:x}", operator.pid());
    holders
        .into_iter()
        .find(|h| h.len() > 8 && h[..h.len() - 8].ends_with(&pid))
        .cloned()
        .unwrap_or_else(|| panic!("no lease holder with pid {pid}"))
}

async fn apply_all(graphs: &Api<ResourceGraph>, version: u32) {
    for i in 0..GRAPHS {
        let name = format!("g{i}");
        graphs
            .patch(
                &name,
                &PatchParams::apply(support::TEST_MANAGER),
                &Patch::Apply(graph(&name, version)),
            )
            .await
            .unwrap();
    }
}

/// Waits until every graph is Completed with its ConfigMap at `version`.
async fn converged(env: &support::TestEnv, version: u32, what: &str) {
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    support::wait_for(what, WAIT, || async {
        for i in 0..GRAPHS {
            let name = format!("g{i}");
            let rg = graphs.get(&name).await.map_err(|e| e.to_string())?;
            let status = rg.status.unwrap_or_default();
            if status.phase != Some(GraphPhase::Completed) || status.observed_generation != rg.metadata.generation {
                return Err(format!("{name}: {:?}", status.phase));
            }
            let cm = cms.get_opt(&name).await.map_err(|e| e.to_string())?;
            let at = cm.and_then(|c| c.data?.get("version").cloned());
            if at != Some(version.to_string()) {
                return Err(format!("{name}: version {at:?}"));
            }
        }
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn replicas_share_the_graphs_and_take_over_the_shards_of_one_that_dies_or_is_cut_off() {
    let _serial = SERIAL.lock().await;
    let env = support::env("shards").await;
    support::install_crds(&env.client).await;
    let mut flags = leader_flags(&env.namespace);
    flags.push(format!("--shards={SHARDS}"));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let cue = support::tool("cue", "PEQUOD_TEST_CUE");
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.namespace);
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);

    // The third replica reaches the apiserver through a proxy that will stop forwarding.
    let proxy = support::StallingProxy::start(support::apiserver_address(&env.operator_kubeconfig)).await;
    let via_proxy = support::kubeconfig_via(&env.operator_kubeconfig, proxy.addr);
    let first = OperatorProcess::start(&env.operator_kubeconfig, &cue, &flags);
    let second = OperatorProcess::start(&env.operator_kubeconfig, &cue, &flags);
    let mut third = OperatorProcess::start(&via_proxy, &cue, &flags);
    let shares = even_shares(&leases, 3, "three replicas to hold two shards each").await;
    let (first_id, third_id) = (identity_of(&first, shares.keys()), identity_of(&third, shares.keys()));

    let mark = support::control_plane::audit_mark();
    apply_all(&graphs, 1).await;
    converged(&env, 1, "every graph applied by the three replicas").await;
    for operator in [&first, &second, &third] {
        let reconciles =
            support::metric_sum(&operator.metrics, "pequod_reconcile_total{controller=\"resourcegraph\"").await;
        assert!(reconciles > 0.0, "a replica reconciled no graph");
        assert_eq!(support::metric_sum(&operator.metrics, "pequod_shards_held").await, 2.0);
    }

    // The first replica dies without handing its shards over: the others take them once
    // their leases expire (4 s), and only them.
    let before = shard_holders(&leases).await;
    let killed = Instant::now();
    first.kill();
    apply_all(&graphs, 2).await;
    let shares = even_shares(&leases, 2, "the two left to take the dead replica's shards").await;
    let takeover = killed.elapsed();
    assert!(!shares.contains_key(&first_id));
    assert!(
        takeover < Duration::from_secs(4 + 1 + 3),
        "took over after {takeover:?}"
    );
    let after = shard_holders(&leases).await;
    for (shard, holder) in &before {
        if *holder != first_id {
            assert_eq!(&after[shard], holder, "shard {shard} of a live replica moved");
        }
    }
    converged(&env, 2, "every graph updated after the first replica died").await;

    // The third replica is cut off: every request of it hangs. It stops within its renew
    // deadline (3 s), before the second takes its shards over.
    proxy.stall();
    let stalled = Instant::now();
    let (mut exited, mut took_over) = (None, None);
    while exited.is_none() || took_over.is_none() {
        assert!(
            stalled.elapsed() < WAIT,
            "exited: {exited:?}, taken over: {took_over:?}"
        );
        if exited.is_none() && third.try_wait().unwrap().is_some() {
            exited = Some(stalled.elapsed());
        }
        if took_over.is_none() && shares_of(&leases, 1).await.is_ok() {
            took_over = Some(stalled.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (exited, took_over) = (exited.unwrap(), took_over.unwrap());
    assert!(
        exited < Duration::from_secs(3 + 1 + 1),
        "the cut-off replica stopped after {exited:?}"
    );
    assert!(
        exited < took_over,
        "stopped after {exited:?}, taken over after {took_over:?}"
    );
    apply_all(&graphs, 3).await;
    converged(&env, 3, "every graph updated by the one replica left").await;

    // The audit log: each object's writers, in the order the apiserver received their writes,
    // never return to one that wrote before another (a handover is one way), and the work was
    // shared.
    let writes = support::control_plane::write_log_in(mark, &env.namespace);
    let mut writers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for write in writes
        .iter()
        .filter(|w| !w.object.starts_with("leases") && !w.object.starts_with("events"))
    {
        let order = writers.entry(&write.object).or_default();
        if order.last() != Some(&write.agent.as_str()) {
            order.push(&write.agent);
        }
    }
    assert!(writers.len() >= 2 * GRAPHS, "{} objects written", writers.len());
    for (object, order) in &writers {
        let distinct: BTreeSet<&&str> = order.iter().collect();
        assert_eq!(distinct.len(), order.len(), "{object} was written by turns: {order:?}");
    }
    let agents: BTreeSet<&str> = writers.values().flatten().copied().collect();
    assert_eq!(agents.len(), 3, "writers: {agents:?}");
    assert!(agents.iter().any(|a| a.ends_with(&first_id)) && agents.iter().any(|a| a.ends_with(&third_id)));
    drop(second);
    env.cleanup().await;
}

#[tokio::test]
async fn instances_render_on_the_leader_and_their_graphs_apply_and_go_on_every_replica() {
    let _serial = SERIAL.lock().await;
    let env = support::env("shards-instances").await;
    support::install_crds(&env.client).await;
    let group = support::transforms::group(&env);
    let api_version = format!("{group}/v1alpha1");
    super::put_note_transform(&env, &group).await;
    let mut flags = leader_flags(&env.namespace);
    flags.extend([super::TRUST_ALL.to_string(), "--shards=4".to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let cue = support::tool("cue", "PEQUOD_TEST_CUE");
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.namespace);
    let first = OperatorProcess::start(&env.operator_kubeconfig, &cue, &flags);
    support::wait_for("the first replica to lead", WAIT, || super::lease_holder(&leases)).await;
    let second = OperatorProcess::start(&env.operator_kubeconfig, &cue, &flags);
    support::wait_for("two replicas to hold two shards each", WAIT, || async {
        let holders = shard_holders(&leases).await;
        let distinct: BTreeSet<&String> = holders.values().collect();
        if holders.len() == 4 && distinct.len() == 2 {
            Ok(())
        } else {
            Err(format!("{holders:?}"))
        }
    })
    .await;

    let transforms: Api<pequod::api::Transform> = Api::namespaced(env.client.clone(), &env.namespace);
    support::wait_transform_ready(&transforms, "note").await;
    let notes = support::dynamic_api(&env.client, &api_version, "Note", &env.namespace).await;
    const NOTES: usize = 12;
    super::apply_notes(&notes, &api_version, NOTES).await;
    super::wait_notes_ready(&notes, NOTES, "every note Ready").await;
    // Instances render on the leader only; graphs apply where their shard is held.
    let reconciles = |controller: &'static str| {
        move |operator: &OperatorProcess| {
            let metrics = operator.metrics.clone();
            async move {
                support::metric_sum(
                    &metrics,
                    &format!("pequod_reconcile_total{{controller=\"{controller}\""),
                )
                .await
            }
        }
    };
    assert!(reconciles("instance")(&first).await > 0.0);
    assert_eq!(
        reconciles("instance")(&second).await,
        0.0,
        "a replica that does not lead rendered"
    );
    for operator in [&first, &second] {
        assert!(
            reconciles("resourcegraph")(operator).await > 0.0,
            "a replica applied no graph"
        );
    }

    // Deleting the instances tears their graphs down on the replicas holding them.
    for i in 0..NOTES {
        notes.delete(&format!("n{i}"), &Default::default()).await.unwrap();
    }
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    support::wait_for("every note, graph and ConfigMap gone", WAIT, || async {
        let managed = kube::api::ListParams::default().labels("app.kubernetes.io/managed-by=pequod");
        let left = (
            notes
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .len(),
            graphs
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .len(),
            cms.list(&managed).await.map_err(|e| e.to_string())?.items.len(),
        );
        if left == (0, 0, 0) {
            Ok(())
        } else {
            Err(format!("left: {left:?}"))
        }
    })
    .await;
    drop((first, second));
    env.cleanup().await;
}
