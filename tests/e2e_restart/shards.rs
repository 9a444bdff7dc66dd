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

/// The flags of a replica electing a leader and sharing in `SHARDS` shards, with `extra`.
fn sharded_flags(env: &support::TestEnv, extra: &[&str]) -> Vec<String> {
    let mut flags = leader_flags(&env.namespace);
    flags.push(format!("--shards={SHARDS}"));
    flags.extend(extra.iter().map(|f| f.to_string()));
    flags
}

/// For each object written whose name `keep` accepts (`resource[/subresource] name`), its
/// writers in the order the apiserver received their writes, a writer named again only after
/// another wrote.
fn writers_in_turn(
    writes: &[support::control_plane::AuditedWrite],
    keep: impl Fn(&str) -> bool,
) -> BTreeMap<&str, Vec<&str>> {
    let mut writers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for write in writes.iter().filter(|w| keep(&w.object)) {
        let order = writers.entry(&write.object).or_default();
        if order.last() != Some(&write.agent.as_str()) {
            order.push(&write.agent);
        }
    }
    writers
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

/// A namespace with Pequod's CRDs for replicas sharing graphs: their flags, cue, and the
/// shard Leases and graphs the tests read.
struct GraphShards {
    env: support::TestEnv,
    flags: Vec<String>,
    cue: std::path::PathBuf,
    leases: Api<Lease>,
    graphs: Api<ResourceGraph>,
}

async fn graph_shards(name: &str) -> GraphShards {
    let env = support::env(name).await;
    support::install_crds(&env.client).await;
    GraphShards {
        flags: sharded_flags(&env, &[]),
        cue: support::tool("cue", "PEQUOD_TEST_CUE"),
        leases: Api::namespaced(env.client.clone(), &env.namespace),
        graphs: Api::namespaced(env.client.clone(), &env.namespace),
        env,
    }
}

#[tokio::test]
async fn replicas_share_the_graphs_and_take_over_the_shards_of_one_that_dies_or_is_cut_off() {
    let _serial = SERIAL.lock().await;
    let GraphShards {
        env,
        flags,
        cue,
        leases,
        graphs,
    } = graph_shards("shards").await;
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();

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
    let writers = writers_in_turn(&writes, |object| {
        !object.starts_with("leases") && !object.starts_with("events")
    });
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

/// Every Note's ConfigMap carries `version`.
async fn notes_at(configmaps: &Api<ConfigMap>, count: usize, version: &str, what: &str) {
    support::wait_for(what, WAIT, || async {
        let mut behind = Vec::new();
        for i in 0..count {
            let cm = configmaps.get_opt(&format!("n{i}")).await.map_err(|e| e.to_string())?;
            let at = cm.and_then(|c| c.data?.get("version").cloned());
            if at.as_deref() != Some(version) {
                behind.push(format!("n{i}: {at:?}"));
            }
        }
        if behind.is_empty() {
            Ok(())
        } else {
            Err(behind.join(", "))
        }
    })
    .await;
}

#[tokio::test]
async fn instances_are_shared_among_replicas_and_follow_the_leader_s_rollout() {
    let _serial = SERIAL.lock().await;
    let env = support::env("shards-instances").await;
    support::install_crds(&env.client).await;
    let group = support::transforms::group(&env);
    let api_version = format!("{group}/v1alpha1");
    let transforms: Api<pequod::api::Transform> = Api::namespaced(env.client.clone(), &env.namespace);
    let note = |paused: bool| {
        json!({"cueRef": {"type": "configmap", "ref": "note-module"}, "group": group,
               "rollout": {"strategy": "Staged", "batchSize": 100, "healthTimeoutSeconds": 600, "paused": paused}})
    };
    support::modules::put_module(&env.client, &env.namespace, "note-module", &super::versioned_note("1")).await;
    support::transforms::apply_transform(&transforms, "note", note(false)).await;
    let flags = sharded_flags(&env, &[super::TRUST_ALL]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let cue = support::tool("cue", "PEQUOD_TEST_CUE");
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.namespace);
    let first = OperatorProcess::start(&env.operator_kubeconfig, &cue, &flags);
    support::wait_for("the first replica to lead", WAIT, || super::lease_holder(&leases)).await;
    let second = OperatorProcess::start(&env.operator_kubeconfig, &cue, &flags);
    let shares = even_shares(&leases, 2, "two replicas to hold two shards each").await;
    let first_id = identity_of(&first, shares.keys());

    let mark = support::control_plane::audit_mark();
    support::wait_transform_ready(&transforms, "note").await;
    let notes = support::dynamic_api(&env.client, &api_version, "Note", &env.namespace).await;
    let configmaps: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    const NOTES: usize = 12;
    super::apply_notes(&notes, &api_version, NOTES).await;
    super::wait_notes_ready(&notes, NOTES, "every note Ready").await;
    notes_at(&configmaps, NOTES, "1", "every note at version 1").await;
    // Both replicas render the instances of their shards and apply their graphs.
    for operator in [&first, &second] {
        for controller in ["instance", "resourcegraph"] {
            let reconciles = support::metric_sum(
                &operator.metrics,
                &format!("pequod_reconcile_total{{controller=\"{controller}\""),
            )
            .await;
            assert!(reconciles > 0.0, "a replica ran no {controller} reconcile");
        }
    }

    // A paused rollout admits no instance: neither replica moves one to version 2.
    support::transforms::apply_transform(&transforms, "note", note(true)).await;
    support::modules::put_module(&env.client, &env.namespace, "note-module", &super::versioned_note("2")).await;
    support::wait_for("the rollout to version 2 to pause", WAIT, || async {
        let t = transforms.get("note").await.map_err(|e| e.to_string())?;
        let rollout = t.status.and_then(|s| s.rollout).ok_or("no rollout")?;
        match (rollout.phase, rollout.current_digest) {
            (Some(pequod::api::RolloutPhase::Paused), Some(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    notes_at(&configmaps, NOTES, "1", "every note still at version 1").await;
    // Resumed, it admits them all, on both replicas.
    support::transforms::apply_transform(&transforms, "note", note(false)).await;
    notes_at(&configmaps, NOTES, "2", "every note at version 2").await;

    // Each instance and its objects were written by the replica holding its shard alone.
    let writes = support::control_plane::write_log_in(mark, &env.namespace);
    let writers = writers_in_turn(&writes, |object| object.starts_with("notes"));
    assert!(writers.len() >= NOTES, "{} instances written", writers.len());
    for (object, order) in &writers {
        assert_eq!(order.len(), 1, "{object} written by {order:?}");
    }
    let agents: BTreeSet<&str> = writers.values().flatten().copied().collect();
    assert_eq!(agents.len(), 2, "instance writers: {agents:?}");

    // The leader dies: the other replica leads, takes its shards and serves every instance.
    first.kill();
    support::wait_for("the second replica to lead", WAIT, || async {
        match super::lease_holder(&leases).await {
            Ok(holder) if holder != first_id => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    even_shares(&leases, 1, "the second replica to hold every shard").await;
    support::modules::put_module(&env.client, &env.namespace, "note-module", &super::versioned_note("3")).await;
    notes_at(&configmaps, NOTES, "3", "every note at version 3 after the leader died").await;
    super::apply_notes(&notes, &api_version, NOTES + 1).await;
    super::wait_notes_ready(&notes, NOTES + 1, "a new note Ready after the leader died").await;

    // Deleting the instances tears their graphs down.
    for i in 0..=NOTES {
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
    drop(second);
    env.cleanup().await;
}

#[tokio::test]
async fn a_shard_lease_rewritten_to_name_a_replica_that_did_not_take_it_is_taken_and_served() {
    let _serial = SERIAL.lock().await;
    let GraphShards {
        env,
        flags,
        cue,
        leases,
        graphs,
    } = graph_shards("shards-tampered").await;
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let first = OperatorProcess::start(&env.operator_kubeconfig, &cue, &flags);
    let second = OperatorProcess::start(&env.operator_kubeconfig, &cue, &flags);
    let shares = even_shares(&leases, 2, "two replicas to hold three shards each").await;
    let second_id = identity_of(&second, shares.keys());
    apply_all(&graphs, 1).await;
    converged(&env, 1, "every graph applied").await;

    // Someone with write access to Leases names the second replica as holder of a shard the
    // first holds. The first loses it (and stops); the second must serve it, not only renew it.
    let holders = shard_holders(&leases).await;
    let in_shard = |shard: u32| {
        (0..GRAPHS)
            .filter(|i| pequod::runtime::shards::shard_of(&env.namespace, &format!("g{i}"), SHARDS) == shard)
            .count()
    };
    let (&shard, _) = holders
        .iter()
        .find(|(s, h)| **h != second_id && in_shard(**s) > 0)
        .expect("a shard of the first replica with graphs");
    let name = format!("pequod-leader-shard-{shard}");
    let mut lease = leases.get(&name).await.unwrap();
    lease.spec.as_mut().unwrap().holder_identity = Some(second_id.clone());
    leases.replace(&name, &Default::default(), &lease).await.unwrap();
    even_shares(&leases, 1, "the second replica to hold every shard").await;
    apply_all(&graphs, 2).await;
    converged(&env, 2, "every graph updated, those of the rewritten shard included").await;
    drop((first, second));
    env.cleanup().await;
}
