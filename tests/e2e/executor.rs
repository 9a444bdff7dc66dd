//! The ResourceGraph executor against the real apiserver, driven by the operator process.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams};
use kube::{Api, ResourceExt};
use pequod::api::{GraphPhase, NodePhase, ResourceGraph};
use serde_json::{Value, json};

use crate::support::{self, TEST_MANAGER, TestEnv, kubectl_as, metric};

const WAIT: Duration = Duration::from_secs(45);

async fn setup(test: &str) -> (TestEnv, Api<ResourceGraph>) {
    let env = support::env(test).await;
    support::operator(&env.client).await;
    let graphs = Api::namespaced(env.client.clone(), &env.namespace);
    (env, graphs)
}

async fn apply_graph(graphs: &Api<ResourceGraph>, name: &str, nodes: Value) {
    let rg = json!({
        "apiVersion": "platform.platform.example.com/v1alpha1",
        "kind": "ResourceGraph",
        "metadata": {"name": name},
        "spec": {"nodes": nodes},
    });
    graphs
        .patch(name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(rg))
        .await
        .unwrap();
}

fn configmap(id: &str, deps: &[&str]) -> Value {
    json!({"id": id, "dependsOn": deps, "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": id}, "data": {"node": id}}, "readyWhen": [{"type": "Exists"}]})
}

fn deployment_node(name: &str, replicas: i64) -> Value {
    json!({
        "id": "deployment",
        "object": {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "app", "image": "nginx:1.27"}]}},
            },
        },
        "readyWhen": [{"type": "DeploymentAvailable"}],
    })
}

/// A Deployment node whose pods stay Pending until the test admits them.
fn held_deployment_node(env: &TestEnv, name: &str, replicas: i64) -> Value {
    let mut node = deployment_node(name, replicas);
    node["object"]["spec"]["template"]["spec"]["nodeSelector"] = support::held_pods_selector(&env.namespace);
    node
}

fn service_node(name: &str) -> Value {
    json!({
        "id": "service",
        "dependsOn": ["deployment"],
        "object": {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": {"selector": {"app": name}, "ports": [{"port": 80, "protocol": "TCP"}]}},
        "readyWhen": [{"type": "Exists"}],
    })
}

/// The graph's `Valid` condition.
fn valid_condition(rg: ResourceGraph) -> pequod::api::Condition {
    graph_condition(&rg, "Valid")
}

fn graph_condition(rg: &ResourceGraph, type_: &str) -> pequod::api::Condition {
    rg.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .cloned()
        .unwrap_or_else(|| panic!("a {type_} condition: {:?}", rg.status))
}

/// Waits until `check` accepts the graph, showing its status on timeout.
async fn wait_graph(
    graphs: &Api<ResourceGraph>,
    name: &str,
    what: &str,
    check: impl Fn(&ResourceGraph) -> bool,
) -> ResourceGraph {
    support::wait_for(what, WAIT, || async {
        let rg = graphs.get(name).await.map_err(|e| e.to_string())?;
        if check(&rg) {
            Ok(rg)
        } else {
            Err(format!("{:?}", rg.status))
        }
    })
    .await
}

fn phase_is(phase: GraphPhase) -> impl Fn(&ResourceGraph) -> bool {
    move |rg| rg.status.as_ref().and_then(|s| s.phase) == Some(phase)
}

fn node_phase(rg: &ResourceGraph, id: &str) -> Option<NodePhase> {
    rg.status.as_ref()?.node_states.get(id).map(|s| s.phase)
}

#[tokio::test]
async fn chain_waits_for_deployment_availability_then_applies_the_service() {
    let (env, graphs) = setup("chain").await;
    apply_graph(
        &graphs,
        "web",
        json!([held_deployment_node(&env, "web", 2), service_node("web")]),
    )
    .await;

    let rg = wait_graph(&graphs, "web", "the deployment applied and waiting", |rg| {
        node_phase(rg, "deployment") == Some(NodePhase::WaitingReady)
    })
    .await;
    let service_state = &rg.status.as_ref().unwrap().node_states["service"];
    assert_eq!(service_state.phase, NodePhase::Pending);
    assert!(
        service_state
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("waiting for deployment"),
        "{service_state:?}"
    );
    let services: Api<Service> = Api::namespaced(env.client.clone(), &env.namespace);
    assert!(
        services.get_opt("web").await.unwrap().is_none(),
        "the service must wait for the deployment"
    );

    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.namespace);
    let d = deployments.get("web").await.unwrap();
    let labels = d.labels();
    assert_eq!(labels["pequod.io/resourcegraph"], "web");
    assert_eq!(labels["pequod.io/node"], "deployment");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "pequod");
    assert_eq!(d.owner_references()[0].name, "web");
    // Each graph applies as a field manager of its own.
    let own_manager = format!("pequod-{}", graphs.get("web").await.unwrap().uid().unwrap());
    assert!(
        d.managed_fields()
            .iter()
            .any(|m| m.manager.as_deref() == Some(own_manager.as_str()))
    );

    // The scheduler places the pods, kwok runs them, the deployment controller reports the
    // Deployment Available, and only then does the Service follow.
    support::admit_pods(&env.client, &env.namespace).await;
    let rg = wait_graph(&graphs, "web", "the graph completed", phase_is(GraphPhase::Completed)).await;
    assert_eq!(
        deployments.get("web").await.unwrap().status.unwrap().ready_replicas,
        Some(2)
    );
    let status = rg.status.unwrap();
    assert_eq!(status.ready_nodes.as_deref(), Some("2/2"));
    assert!(status.conditions.iter().any(|c| c.type_ == "Ready" && c.is_true()));
    assert_eq!(status.inventory.len(), 2);
    assert!(services.get_opt("web").await.unwrap().is_some());
    support::wait_events(&env.client, &env.namespace, "web", &["Ready"]).await;
    env.cleanup().await;
}

#[tokio::test]
async fn diamond_applies_both_middle_nodes_in_one_wave() {
    let (env, graphs) = setup("diamond").await;
    apply_graph(
        &graphs,
        "diamond",
        json!([
            configmap("top", &[]),
            configmap("left", &["top"]),
            configmap("right", &["top"]),
            configmap("bottom", &["left", "right"])
        ]),
    )
    .await;
    let rg = wait_graph(
        &graphs,
        "diamond",
        "the diamond completed",
        phase_is(GraphPhase::Completed),
    )
    .await;
    let status = rg.status.unwrap();
    let wave = |id: &str| status.inventory.iter().find(|e| e.node_id == id).unwrap().wave;
    assert_eq!((wave("top"), wave("left"), wave("right"), wave("bottom")), (0, 1, 1, 2));
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    for id in ["top", "left", "right", "bottom"] {
        assert!(cms.get_opt(id).await.unwrap().is_some(), "{id} applied");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn a_cycle_is_refused_and_nothing_is_applied() {
    let (env, graphs) = setup("cycle").await;
    apply_graph(&graphs, "loop", json!([configmap("a", &["b"]), configmap("b", &["a"])])).await;
    let rg = wait_graph(&graphs, "loop", "the graph failed", phase_is(GraphPhase::Failed)).await;
    let valid = valid_condition(rg);
    assert!(!valid.is_true());
    assert_eq!(valid.reason, "DependencyCycle");
    assert!(valid.message.contains("a -> b -> a"), "{}", valid.message);
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    assert!(cms.get_opt("a").await.unwrap().is_none() && cms.get_opt("b").await.unwrap().is_none());
    support::wait_events(&env.client, &env.namespace, "loop", &["InvalidGraph"]).await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_existing_object_is_written_only_by_its_own_graph_or_through_adoption() {
    let (env, graphs) = setup("existing").await;
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    let theirs =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": {"owner": "them"}});
    let before = cms
        .patch("shared", &PatchParams::apply("someone-else"), &Patch::Apply(theirs))
        .await
        .unwrap();

    // Apply, whatever its conflict policy, does not take over an object no graph made.
    let ours = |policy: &str, owner: &str| json!([{"id": "cm", "applyPolicy": {"conflictPolicy": policy}, "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": {"owner": owner}}}]);
    for (policy, owner) in [("Error", "pequod"), ("Error", "pequod-2"), ("Force", "pequod-3")] {
        apply_graph(&graphs, "g", ours(policy, owner)).await;
        let generation = graphs.get("g").await.unwrap().metadata.generation;
        let rg = wait_graph(&graphs, "g", "the node refused", move |rg: &ResourceGraph| {
            rg.status.as_ref().and_then(|s| s.observed_generation) == generation
                && rg.status.as_ref().and_then(|s| s.phase) == Some(GraphPhase::Failed)
        })
        .await;
        let error = rg.status.as_ref().unwrap().node_states["cm"]
            .last_error
            .clone()
            .unwrap();
        assert!(
            error.contains("already exists and was not made by this graph") && error.contains("someone-else"),
            "{error}"
        );
    }
    let after = cms.get("shared").await.unwrap();
    assert_eq!(after.data.as_ref().unwrap()["owner"], "them");
    assert_eq!(
        after.metadata.resource_version, before.metadata.resource_version,
        "nothing was written"
    );
    // Reconciles that meet the same refusal again record no new event.
    support::wait_events(&env.client, &env.namespace, "g", &["AlreadyExists"]).await;
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(env.client.clone(), &env.namespace);
    let refusals: Vec<_> = events
        .list(&kube::api::ListParams::default().fields("involvedObject.name=g"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("AlreadyExists"))
        .collect();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert!(
        refusals[0].count.unwrap_or(1) == 1 && refusals[0].series.is_none(),
        "the event was repeated: {:?}",
        refusals[0]
    );

    // Adopt takes it over.
    apply_graph(&graphs, "g", json!([{"id": "cm", "applyPolicy": {"mode": "Adopt"}, "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": {"owner": "pequod"}}}])).await;
    wait_graph(
        &graphs,
        "g",
        "the adopted graph completed",
        phase_is(GraphPhase::Completed),
    )
    .await;
    assert_eq!(cms.get("shared").await.unwrap().data.unwrap()["owner"], "pequod");

    // Another graph naming the same object is refused, whatever its mode.
    for mode in ["Apply", "Adopt"] {
        apply_graph(&graphs, "h", json!([{"id": "cm", "applyPolicy": {"mode": mode, "conflictPolicy": "Force"}, "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": {"owner": "h"}}}])).await;
        let generation = graphs.get("h").await.unwrap().metadata.generation;
        let rg = wait_graph(&graphs, "h", "the other graph refused", move |rg: &ResourceGraph| {
            rg.status.as_ref().and_then(|s| s.observed_generation) == generation
                && rg.status.as_ref().and_then(|s| s.phase) == Some(GraphPhase::Failed)
        })
        .await;
        let error = rg.status.unwrap().node_states["cm"].last_error.clone().unwrap();
        assert!(
            error.contains(&format!("belongs to ResourceGraph {}/g", env.namespace)),
            "{mode}: {error}"
        );
    }
    assert_eq!(cms.get("shared").await.unwrap().data.unwrap()["owner"], "pequod");
    // Deleting the refused graph leaves the object to its own graph.
    support::delete_and_wait_gone(&graphs, "h", WAIT).await;
    assert_eq!(cms.get("shared").await.unwrap().data.unwrap()["owner"], "pequod");
    env.cleanup().await;
}

#[tokio::test]
async fn create_mode_never_updates_adopt_records_previous_managers_and_deletion_spares_what_is_not_made() {
    let (env, graphs) = setup("modes").await;
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    let existing =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "legacy"}, "data": {"k": "old"}});
    cms.patch("legacy", &PatchParams::apply("legacy-tool"), &Patch::Apply(existing))
        .await
        .unwrap();

    apply_graph(&graphs, "g", json!([
        {"id": "once", "applyPolicy": {"mode": "Create"}, "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "once"}, "data": {"k": "initial"}}},
        {"id": "legacy", "applyPolicy": {"mode": "Adopt"}, "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "legacy"}, "data": {"k": "new"}}},
    ]))
    .await;
    let rg = wait_graph(&graphs, "g", "the graph completed", phase_is(GraphPhase::Completed)).await;
    let legacy = &rg.status.as_ref().unwrap().node_states["legacy"];
    assert_eq!(legacy.phase, NodePhase::Adopted);
    assert_eq!(legacy.adopted, Some(true));
    assert_eq!(legacy.previous_managers, ["legacy-tool"]);
    let adopted = cms.get("legacy").await.unwrap();
    assert_eq!(adopted.annotations()["pequod.io/adopted-from"], "legacy-tool");
    assert_eq!(adopted.data.unwrap()["k"], "new");

    // Someone edits the Create-mode object: Pequod leaves it alone, even when reconciled again.
    // The graph then changes its Adopt node: once that change is applied, the pass that applied
    // it went over the Create node too.
    let edit = json!({"data": {"k": "edited"}});
    cms.patch("once", &PatchParams::default(), &Patch::Merge(edit))
        .await
        .unwrap();
    apply_graph(&graphs, "g", json!([
        {"id": "once", "applyPolicy": {"mode": "Create"}, "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "once"}, "data": {"k": "initial"}}},
        {"id": "legacy", "applyPolicy": {"mode": "Adopt"}, "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "legacy"}, "data": {"k": "newer"}}},
    ]))
    .await;
    support::wait_for("the graph's change applied", WAIT, || async {
        let legacy = cms.get("legacy").await.map_err(|e| e.to_string())?;
        let rg = graphs.get("g").await.map_err(|e| e.to_string())?;
        let status = rg.status.unwrap_or_default();
        let observed =
            status.observed_generation == rg.metadata.generation && status.phase == Some(GraphPhase::Completed);
        match legacy.data.unwrap_or_default().get("k") {
            Some(k) if k == "newer" && observed => Ok(()),
            other => Err(format!("{other:?}; observed {observed}")),
        }
    })
    .await;
    assert_eq!(cms.get("once").await.unwrap().data.unwrap()["k"], "edited");

    // Deleting the graph deletes what it made, releases what it adopted, and leaves alone what
    // a Create node merely found.
    let found =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "found"}, "data": {"k": "theirs"}});
    let found_uid = cms
        .patch("found", &PatchParams::apply("legacy-tool"), &Patch::Apply(found))
        .await
        .unwrap()
        .uid();
    apply_graph(&graphs, "g", json!([
        {"id": "once", "applyPolicy": {"mode": "Create"}, "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "once"}, "data": {"k": "initial"}}},
        {"id": "legacy", "applyPolicy": {"mode": "Adopt"}, "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "legacy"}, "data": {"k": "new"}}},
        {"id": "found", "applyPolicy": {"mode": "Create"}, "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "found"}, "data": {"k": "mine"}}},
    ]))
    .await;
    let rg = wait_graph(&graphs, "g", "the graph completed", phase_is(GraphPhase::Completed)).await;
    let inventory: Vec<String> = rg.status.unwrap().inventory.into_iter().map(|e| e.name).collect();
    assert!(!inventory.contains(&"found".to_string()), "{inventory:?}");
    support::delete_and_wait_gone(&graphs, "g", WAIT).await;
    assert!(
        cms.get_opt("once").await.unwrap().is_none(),
        "made by the graph: deleted"
    );
    let released = cms.get("legacy").await.expect("adopted: released, not deleted");
    assert!(!released.labels().contains_key("pequod.io/resourcegraph"));
    assert!(!released.annotations().contains_key("pequod.io/adopted-from"));
    assert!(!released.annotations().contains_key("pequod.io/resourcegraph-uid"));
    let found = cms.get("found").await.expect("found by Create: left alone");
    assert_eq!((found.uid(), found.data.unwrap()["k"].as_str()), (found_uid, "theirs"));
    support::wait_events(&env.client, &env.namespace, "g", &["ObjectReleased"]).await;
    env.cleanup().await;
}

#[tokio::test]
async fn objects_of_earlier_releases_move_to_the_graph_s_own_field_manager_unchanged() {
    let (env, graphs) = setup("field-manager").await;
    // What earlier releases left: an object marked with the graph's name and applied by the one
    // field manager all graphs shared.
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    let legacy = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings",
        "labels": {"app.kubernetes.io/managed-by": "pequod", "pequod.io/resourcegraph": "app",
            "pequod.io/resourcegraph-namespace": env.namespace, "pequod.io/node": "settings"}},
        "data": {"mode": "fast", "dropped": "yes"}});
    let before = cms
        .patch("settings", &PatchParams::apply("pequod"), &Patch::Apply(legacy))
        .await
        .unwrap();
    let node = json!({"id": "settings", "object": {"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "settings"}, "data": {"mode": "fast"}}});
    apply_graph(&graphs, "app", json!([node])).await;
    let rg = wait_graph(&graphs, "app", "completed", phase_is(GraphPhase::Completed)).await;
    let own = format!("pequod-{}", rg.uid().unwrap());
    let after = support::wait_for("the shared field manager released", WAIT, || async {
        let cm = cms.get("settings").await.map_err(|e| e.to_string())?;
        let managers: Vec<String> = cm.managed_fields().iter().filter_map(|m| m.manager.clone()).collect();
        (managers == [own.clone()]).then_some(cm).ok_or(format!("{managers:?}"))
    })
    .await;
    assert_eq!(after.uid(), before.uid(), "the object is not recreated");
    let data = after.data.unwrap();
    assert_eq!(data["mode"], "fast");
    // The field the graph no longer declares went with the manager that alone had set it.
    assert!(!data.contains_key("dropped"), "{data:?}");
    env.cleanup().await;
}

#[tokio::test]
async fn drift_is_corrected() {
    let (env, graphs) = setup("drift").await;
    apply_graph(&graphs, "web", json!([deployment_node("web", 2), service_node("web")])).await;
    wait_graph(&graphs, "web", "deployment applied", |rg| {
        node_phase(rg, "deployment").is_some()
    })
    .await;
    wait_graph(&graphs, "web", "completed", phase_is(GraphPhase::Completed)).await;

    let services: Api<Service> = Api::namespaced(env.client.clone(), &env.namespace);
    let old_uid = services.get("web").await.unwrap().uid();
    services.delete("web", &DeleteParams::default()).await.unwrap();
    support::wait_for("the deleted service to be recreated", WAIT, || async {
        match services.get_opt("web").await.map_err(|e| e.to_string())? {
            Some(s) if s.uid() != old_uid => Ok(()),
            other => Err(format!("{:?}", other.map(|s| s.uid()))),
        }
    })
    .await;

    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.namespace);
    let scale =
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 7}});
    deployments
        .patch("web", &PatchParams::apply("intruder").force(), &Patch::Apply(scale))
        .await
        .unwrap();
    support::wait_for("replicas restored to 2", WAIT, || async {
        let d = deployments.get("web").await.map_err(|e| e.to_string())?;
        match d.spec.and_then(|s| s.replicas) {
            Some(2) => Ok(()),
            other => Err(format!("replicas {other:?}")),
        }
    })
    .await;
    env.cleanup().await;
}

#[tokio::test]
async fn drift_is_corrected_while_an_upstream_rollout_is_stuck() {
    let (env, graphs) = setup("drift-stuck").await;
    let mut deployment = deployment_node("web", 1);
    deployment["object"]["spec"]["strategy"] = json!({"type": "Recreate"});
    apply_graph(&graphs, "web", json!([deployment, service_node("web")])).await;
    wait_graph(&graphs, "web", "completed", phase_is(GraphPhase::Completed)).await;

    // A rollout that cannot finish: the new pod can be scheduled on no node (the simulated
    // nodes run any image, so a bad image would not do), and Recreate took the old one down.
    let mut stuck = held_deployment_node(&env, "web", 1);
    stuck["object"]["spec"]["strategy"] = json!({"type": "Recreate"});
    assert_eq!(stuck["id"], "deployment");
    apply_graph(&graphs, "web", json!([stuck, service_node("web")])).await;
    wait_graph(&graphs, "web", "the deployment's gate regressed", |rg| {
        node_phase(rg, "deployment") == Some(NodePhase::WaitingReady)
    })
    .await;

    let services: Api<Service> = Api::namespaced(env.client.clone(), &env.namespace);
    let old_uid = services.get("web").await.unwrap().uid();
    services.delete("web", &DeleteParams::default()).await.unwrap();
    support::wait_for(
        "the deleted service recreated during the stuck rollout",
        WAIT,
        || async {
            match services.get_opt("web").await.map_err(|e| e.to_string())? {
                Some(s) if s.uid() != old_uid => Ok(()),
                other => Err(format!("{:?}", other.map(|s| s.uid()))),
            }
        },
    )
    .await;
    let rg = graphs.get("web").await.unwrap();
    assert_eq!(
        node_phase(&rg, "deployment"),
        Some(NodePhase::WaitingReady),
        "still stuck"
    );

    // An update the apiserver refuses fails the node; its Deployment stays this graph's.
    let mut refused = deployment_node("web", 1);
    refused["object"]["spec"]["strategy"] = json!({"type": "Recreate", "rollingUpdate": {"maxSurge": 1}});
    apply_graph(&graphs, "web", json!([refused, service_node("web")])).await;
    let rg = wait_graph(&graphs, "web", "the refused update", |rg| {
        node_phase(rg, "deployment") == Some(NodePhase::Error)
    })
    .await;
    let inventory = rg.status.unwrap().inventory;
    assert!(
        inventory
            .iter()
            .any(|e| e.node_id == "deployment" && e.kind == "Deployment"),
        "{inventory:?}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn removed_nodes_are_pruned_and_orphans_released() {
    let (env, graphs) = setup("prune").await;
    let managed = format!(
        "pequod_resources_managed{{gvk=\"v1/ConfigMap\",namespace=\"{}\"}}",
        env.namespace
    );
    let orphan = json!({"id": "keep", "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "keep", "annotations": {"pequod.io/deletion-policy": "Orphan"}}}});
    apply_graph(
        &graphs,
        "g",
        json!([configmap("a", &[]), configmap("b", &["a"]), orphan]),
    )
    .await;
    wait_graph(&graphs, "g", "completed", phase_is(GraphPhase::Completed)).await;
    assert_eq!(metric(&env, &managed).await, 3.0);

    apply_graph(&graphs, "g", json!([configmap("a", &[])])).await;
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    support::wait_for("b pruned and keep released", WAIT, || async {
        let b = cms.get_opt("b").await.map_err(|e| e.to_string())?;
        let keep = cms.get("keep").await.map_err(|e| e.to_string())?;
        let released = !keep.labels().contains_key("pequod.io/resourcegraph") && keep.owner_references().is_empty();
        if b.is_none() && released {
            Ok(())
        } else {
            Err(format!("b present: {}, keep labels: {:?}", b.is_some(), keep.labels()))
        }
    })
    .await;
    let rg = wait_graph(&graphs, "g", "inventory shrunk", |rg| {
        rg.status.as_ref().is_some_and(|s| s.inventory.len() == 1)
    })
    .await;
    assert_eq!(rg.status.unwrap().phase, Some(GraphPhase::Completed));
    assert!(cms.get_opt("a").await.unwrap().is_some());
    assert_eq!(
        metric(&env, &managed).await,
        1.0,
        "pruning lowers pequod_resources_managed"
    );
    graphs.delete("g", &DeleteParams::default()).await.unwrap();
    support::wait_for("the graph deleted", WAIT, || async {
        if graphs.get_opt("g").await.map_err(|e| e.to_string())?.is_none() {
            Ok(())
        } else {
            Err("present".into())
        }
    })
    .await;
    assert_eq!(
        metric(&env, &managed).await,
        0.0,
        "deletion lowers pequod_resources_managed"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn deletion_goes_in_reverse_order_and_waits_for_each_wave() {
    let (env, graphs) = setup("teardown").await;
    // The leaf carries a finalizer of someone else's, so its wave cannot finish until released.
    let leaf = json!({"id": "leaf", "dependsOn": ["root"], "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "leaf", "finalizers": ["example.com/hold"]}}});
    apply_graph(&graphs, "g", json!([configmap("root", &[]), leaf])).await;
    wait_graph(&graphs, "g", "completed", phase_is(GraphPhase::Completed)).await;

    graphs.delete("g", &DeleteParams::default()).await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    support::wait_for("the leaf to be deleting", WAIT, || async {
        let leaf = cms.get("leaf").await.map_err(|e| e.to_string())?;
        if leaf.metadata.deletion_timestamp.is_some() {
            Ok(())
        } else {
            Err("not deleting yet".into())
        }
    })
    .await;
    // The graph says it waits for the leaf: its deletion pass has seen the leaf's wave unfinished.
    let rg = wait_graph(&graphs, "g", "the deletion waiting for the leaf", |rg| {
        rg.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.message.contains("waiting for ConfigMap leaf"))
    })
    .await;
    assert!(
        cms.get_opt("root").await.unwrap().is_some(),
        "root must wait until the leaf is gone"
    );
    let ready = rg
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert!(
        ready.message.contains("waiting for ConfigMap leaf"),
        "{}",
        ready.message
    );

    cms.patch(
        "leaf",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    support::wait_for("root deleted and the graph gone", WAIT, || async {
        let root = cms.get_opt("root").await.map_err(|e| e.to_string())?;
        let graph = graphs.get_opt("g").await.map_err(|e| e.to_string())?;
        if root.is_none() && graph.is_none() {
            Ok(())
        } else {
            Err(format!("root: {}, graph: {}", root.is_some(), graph.is_some()))
        }
    })
    .await;
    env.cleanup().await;
}

#[tokio::test]
async fn readiness_timeout_fails_the_node_and_keeps_dependants_pending() {
    let (env, graphs) = setup("timeout").await;
    let slow = json!({"id": "slow", "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "slow"}},
        "readyWhen": [{"type": "FieldMatch", "path": "data.ready", "value": "yes", "timeout": 2}]});
    apply_graph(&graphs, "g", json!([slow, configmap("after", &["slow"])])).await;
    let rg = wait_graph(&graphs, "g", "the gate timed out", phase_is(GraphPhase::Failed)).await;
    let status = rg.status.unwrap();
    let slow = &status.node_states["slow"];
    assert_eq!(slow.phase, NodePhase::Error);
    assert!(
        slow.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("readiness timed out after 2s"),
        "{slow:?}"
    );
    assert_eq!(status.node_states["after"].phase, NodePhase::Pending);
    assert!(
        status.node_states["after"]
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("waiting for slow")
    );
    support::wait_events(&env.client, &env.namespace, "g", &["ReadinessTimeout"]).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_user_who_may_write_graphs_in_one_namespace_reaches_nothing_beyond_it() {
    let (env, graphs) = setup("graph-writer").await;
    let elsewhere = support::env("graph-writer-elsewhere").await;
    let user = format!("dev-{}", env.namespace);
    let secret_value = "aHVudGVyMg==";
    // The user may write ResourceGraphs only; their graphs act as the service account `graphs`,
    // which the namespace's owner gave the built-in `edit` role.
    support::apply_yaml(
        &env.client,
        &env.namespace,
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\ndata:\n  password: {secret_value}\n---\n\
             apiVersion: v1\nkind: ResourceQuota\nmetadata:\n  name: quota\nspec:\n  hard:\n    pods: \"10\"\n---\n\
             apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: graphs\n---\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: graphs-edit\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: edit}}\n\
             subjects: [{{kind: ServiceAccount, name: graphs, namespace: {ns}}}]\n---\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: graph-writer\nrules:\n\
             - apiGroups: [platform.platform.example.com]\n  resources: [resourcegraphs]\n  verbs: [\"*\"]\n---\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: graph-writer\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: graph-writer}}\n\
             subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {user}}}]\n",
            ns = env.namespace
        ),
    )
    .await;
    let can_i = kubectl_as(&env, &user, &["auth", "can-i", "create", "clusterrolebindings"], "");
    assert_eq!(
        String::from_utf8_lossy(&can_i.stdout).trim(),
        "no",
        "the user alone cannot"
    );

    let binding = format!("{}-admin", env.namespace);
    let namespace = format!("{}-new", env.namespace);
    let graph = |name: &str, nodes: Value, annotations: Value| {
        json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph",
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"serviceAccountName": "graphs", "nodes": nodes}})
    };
    let none = json!({});
    let secret_node = json!({"id": "db", "applyPolicy": {"mode": "Create"},
        "object": {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"}}});
    // Refused before anything is applied: by the graph's shape (Valid=False, NotAllowed).
    let shapeless = [
        graph(
            "escalate",
            json!([{"id": "binding", "object": {"apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding", "metadata": {"name": binding},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}}]),
            none.clone(),
        ),
        graph(
            "elsewhere",
            json!([{"id": "config", "object": {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "planted", "namespace": elsewhere.namespace}}}]),
            none.clone(),
        ),
        // A made-up proof is no proof.
        graph(
            "cluster-scoped",
            json!([{"id": "ns", "object": {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": namespace}}}]),
            json!({"pequod.io/graph-proof": format!("v2:cluster:uid:sha256:{}:{}", "a".repeat(64), "ab".repeat(32))}),
        ),
    ];
    // Refused when the graph is checked: what would tell a Secret's values.
    let telling = [
        graph(
            "peek",
            json!([{"id": "peek", "applyPolicy": {"mode": "Create"},
            "object": {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"}},
            "readyWhen": [{"type": "FieldMatch", "path": "data.password", "value": "x"}]}]),
            none.clone(),
        ),
        graph(
            "annotations",
            json!([secret_node.clone(), {"id": "copy", "object": {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "copy"}, "data": {"all": "${db.metadata.annotations}"}}}]),
            none.clone(),
        ),
    ];
    // Applied as the account, which the apiserver refuses: more than `edit` allows.
    let forbidden = [
        graph(
            "local-binding",
            json!([{"id": "binding", "object": {"apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding", "metadata": {"name": "admin"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}}]),
            none.clone(),
        ),
        graph(
            "quota",
            json!([{"id": "quota", "applyPolicy": {"mode": "Adopt"}, "object": {"apiVersion": "v1",
            "kind": "ResourceQuota", "metadata": {"name": "quota"}, "spec": {"hard": {"pods": "10000"}}}}]),
            none.clone(),
        ),
        graph(
            "endpoints",
            json!([{"id": "endpoints", "object": {"apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": "planted"}, "subsets": [{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 80}]}]}}]),
            none.clone(),
        ),
        graph(
            "transform",
            json!([{"id": "transform", "object": {"apiVersion": "platform.platform.example.com/v1alpha1",
            "kind": "Transform", "metadata": {"name": "planted"},
            "spec": {"cueRef": {"type": "embedded", "ref": "webservice"}, "allowClusterScopedResources": true}}}]),
            none.clone(),
        ),
    ];
    let allowed = graph("allowed", json!([configmap("mine", &[])]), none);
    let manifests: Vec<String> = shapeless
        .iter()
        .chain(&telling)
        .chain(&forbidden)
        .chain([&allowed])
        .map(|g| serde_json::to_string(g).unwrap())
        .collect();
    let out = kubectl_as(&env, &user, &["apply", "-f", "-"], &manifests.join("\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let rg = wait_graph(
        &graphs,
        "allowed",
        "the allowed graph completed",
        phase_is(GraphPhase::Completed),
    )
    .await;
    let authorized = graph_condition(&rg, "Authorized");
    assert_eq!(
        (authorized.status, authorized.reason.as_str()),
        (pequod::api::ConditionStatus::True, "ServiceAccount")
    );
    assert!(
        authorized.message.contains(&format!("{}/graphs", env.namespace)),
        "{}",
        authorized.message
    );
    for (graphs_refused, event) in [(&shapeless[..], "NotAllowed"), (&telling[..], "InvalidGraph")] {
        for g in graphs_refused {
            let name = g["metadata"]["name"].as_str().unwrap();
            let rg = wait_graph(&graphs, name, "the graph refused", phase_is(GraphPhase::Failed)).await;
            let valid = valid_condition(rg);
            assert_eq!(valid.reason, "NotAllowed", "{name}: {}", valid.message);
            support::wait_events(&env.client, &env.namespace, name, &[event]).await;
        }
    }
    let annotations = valid_condition(graphs.get("annotations").await.unwrap());
    assert!(
        annotations.message.starts_with("node \"copy\": "),
        "the node holding the reference is named: {}",
        annotations.message
    );
    for g in &forbidden {
        let name = g["metadata"]["name"].as_str().unwrap();
        let rg = wait_graph(&graphs, name, "the apiserver's refusal shown", |rg| {
            rg.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Authorized" && c.reason == "Forbidden")
            })
        })
        .await;
        let authorized = graph_condition(&rg, "Authorized");
        assert_eq!(authorized.status, pequod::api::ConditionStatus::False, "{name}");
        assert!(
            authorized
                .message
                .contains(&format!("service account {}/graphs", env.namespace))
                && authorized.message.contains("forbidden"),
            "{name}: {}",
            authorized.message
        );
        support::wait_events(&env.client, &env.namespace, name, &["Forbidden"]).await;
    }

    let bindings: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> = Api::all(env.client.clone());
    assert!(bindings.get_opt(&binding).await.unwrap().is_none());
    let role_bindings: Api<k8s_openapi::api::rbac::v1::RoleBinding> =
        Api::namespaced(env.client.clone(), &env.namespace);
    assert!(role_bindings.get_opt("admin").await.unwrap().is_none());
    let quotas: Api<k8s_openapi::api::core::v1::ResourceQuota> = Api::namespaced(env.client.clone(), &env.namespace);
    let quota = quotas.get("quota").await.unwrap();
    assert_eq!(
        quota
            .spec
            .and_then(|s| s.hard)
            .and_then(|h| h.get("pods").cloned())
            .map(|q| q.0),
        Some("10".to_string()),
        "the quota was not raised"
    );
    let endpoints: Api<k8s_openapi::api::core::v1::Endpoints> = Api::namespaced(env.client.clone(), &env.namespace);
    assert!(endpoints.get_opt("planted").await.unwrap().is_none());
    let transforms: Api<pequod::api::Transform> = Api::namespaced(env.client.clone(), &env.namespace);
    assert!(transforms.get_opt("planted").await.unwrap().is_none());
    let planted: Api<ConfigMap> = Api::namespaced(env.client.clone(), &elsewhere.namespace);
    assert!(planted.get_opt("planted").await.unwrap().is_none());
    let copies: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    assert!(copies.get_opt("copy").await.unwrap().is_none());
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(env.client.clone());
    assert!(namespaces.get_opt(&namespace).await.unwrap().is_none());

    // Nothing the user can read tells the Secret's value.
    let statuses = serde_json::to_string(&graphs.list(&Default::default()).await.unwrap().items).unwrap();
    assert!(!statuses.contains(secret_value) && !statuses.contains("hunter2"));
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(env.client.clone(), &env.namespace);
    let events = serde_json::to_string(&events.list(&Default::default()).await.unwrap().items).unwrap();
    assert!(!events.contains(secret_value) && !events.contains("hunter2"));
    elsewhere.cleanup().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_graph_in_the_shape_of_earlier_releases_is_read_and_moving_it_to_the_documented_shape_loses_nothing() {
    let (env, graphs) = setup("legacy-shape").await;
    apply_graph(&graphs, "g", json!([configmap("a", &[]), configmap("b", &["a"])])).await;
    let rg = wait_graph(
        &graphs,
        "g",
        "the earlier shape applied",
        phase_is(GraphPhase::Completed),
    )
    .await;
    let valid = graph_condition(&rg, "Valid");
    assert_eq!(valid.reason, "DeprecatedShape", "{}", valid.message);
    assert!(valid.message.contains("spec.graph.nodes"), "{}", valid.message);
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    let uid = |cm: ConfigMap| cm.metadata.uid.unwrap();
    let before = (uid(cms.get("a").await.unwrap()), uid(cms.get("b").await.unwrap()));
    let inventory_before = rg.status.unwrap().inventory;

    // Both shapes at once are refused by the apiserver.
    let both = json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph",
        "metadata": {"name": "both"}, "spec": {"nodes": [configmap("x", &[])],
        "graph": {"nodes": [{"id": "x", "resource": configmap("x", &[])["object"]}]}}});
    let refused = graphs
        .patch("both", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(both))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("spec.graph.nodes"), "{refused}");

    // The same graph written in the documented shape by the same writer.
    let documented = json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph",
    "metadata": {"name": "g"}, "spec": {"graph": {"nodes": [
        {"id": "a", "resource": configmap("a", &[])["object"], "readyWhen": [{"type": "Exists"}]},
        {"id": "b", "resource": configmap("b", &[])["object"], "dependencies": ["a"], "readyWhen": [{"type": "Exists"}]},
    ]}}});
    graphs
        .patch(
            "g",
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(documented),
        )
        .await
        .unwrap();
    let rg = wait_graph(&graphs, "g", "the documented shape read", |rg| {
        rg.status.as_ref().is_some_and(|s| {
            s.phase == Some(GraphPhase::Completed)
                && s.conditions.iter().any(|c| c.type_ == "Valid" && c.reason == "Valid")
        })
    })
    .await;
    assert!(!rg.spec.legacy_shape);
    let stored = kube::Api::<DynamicObject>::namespaced_with(
        env.client.clone(),
        &env.namespace,
        &kube::discovery::ApiResource::erase::<ResourceGraph>(&()),
    )
    .get("g")
    .await
    .unwrap();
    assert_eq!(stored.data["spec"].get("nodes"), None, "the earlier field is gone");
    let after = (uid(cms.get("a").await.unwrap()), uid(cms.get("b").await.unwrap()));
    assert_eq!(before, after, "no object was re-created");
    assert_eq!(rg.status.unwrap().inventory, inventory_before, "nothing pruned");
    let reasons = support::event_reasons(&env.client, &env.namespace, "g").await;
    assert!(
        !reasons.iter().any(|r| r == "ObjectReleased" || r == "ObjectNotOwned"),
        "{reasons:?}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_graph_cannot_aggregate_rules_into_another_role() {
    let (env, graphs) = setup("aggregation").await;
    let role_name = format!("{}-escalate", env.namespace);
    let role = json!({"id": "role", "object": {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": role_name, "labels": {"pequod.io/aggregate-to-manager": "true"}},
        "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}});
    apply_graph(&graphs, "g", json!([configmap("a", &[]), role])).await;
    let rg = wait_graph(&graphs, "g", "the graph refused", phase_is(GraphPhase::Failed)).await;
    let valid = valid_condition(rg);
    assert_eq!(valid.reason, "NotAllowed");
    assert!(
        valid.message.contains("pequod.io/aggregate-to-manager"),
        "{}",
        valid.message
    );
    let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(env.client.clone());
    assert!(roles.get_opt(&role_name).await.unwrap().is_none());
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    assert!(
        cms.get_opt("a").await.unwrap().is_none(),
        "nothing of a refused graph is applied"
    );
    support::wait_events(&env.client, &env.namespace, "g", &["InvalidGraph"]).await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_object_cache_holds_only_what_existing_graphs_made() {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    use pequod::controller::watches::{Lookup, ObjectWatches};

    let (env, graphs) = setup("object-cache").await;
    let cm = |name: &str| json!({"id": name, "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"k": "v"}}});
    apply_graph(&graphs, "cache", json!([cm("ours")])).await;
    let graph = wait_graph(&graphs, "cache", "completed", phase_is(GraphPhase::Completed)).await;

    // Someone else's ConfigMaps wearing the graph's labels: with no uid, with a made-up one,
    // and with the graph's own (copied by someone who may read the graph).
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    for (name, annotations) in [
        ("labelled", json!({})),
        (
            "forged",
            json!({"pequod.io/resourcegraph-uid": "00000000-0000-0000-0000-000000000000"}),
        ),
        ("copied", json!({"pequod.io/resourcegraph-uid": graph.uid()})),
    ] {
        let object = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "annotations": annotations,
                         "labels": {"app.kubernetes.io/managed-by": "pequod", "pequod.io/resourcegraph": "cache"}},
            "data": {"big": "x".repeat(100_000)}});
        cms.patch(name, &PatchParams::apply(TEST_MANAGER), &Patch::Apply(object))
            .await
            .unwrap();
    }

    // The cache as the operator builds it, against the graphs of the test's namespace.
    let (store, writer) = reflector::store();
    let graph_watch = watcher(graphs.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .for_each(|_| futures::future::ready(()));
    let graph_watch = tokio::spawn(graph_watch);
    store.wait_until_ready().await.unwrap();
    let (watches, _triggers) = ObjectWatches::new(env.client.clone(), pequod::runtime::shutdown::Shutdown::new());
    watches.know_graphs(store);
    let resolved = pequod::apply::Resolved {
        resource: kube::api::ApiResource::erase::<ConfigMap>(&()),
        namespaced: true,
    };
    let cached = |name: &'static str| {
        let watches = watches.clone();
        let resolved = resolved.clone();
        let namespace = env.namespace.clone();
        move || match watches.lookup(&resolved, Some(&namespace), name) {
            Lookup::Known(found) => Ok(found.is_some()),
            Lookup::Unknown => Err("not listed yet".to_string()),
        }
    };
    let ours = cached("ours");
    support::wait_for("the cache listed", WAIT, || async { ours() }).await;
    assert!(ours().unwrap(), "the graph's own object is cached");
    assert!(
        !cached("labelled")().unwrap(),
        "a labelled object without the uid is not"
    );
    assert!(
        !cached("forged")().unwrap(),
        "a labelled object with another uid is not"
    );

    // An object that stops naming the graph leaves the cache. (Not the graph's own object: the
    // graph would put its annotation back at once.)
    let copied = cached("copied");
    assert!(copied().unwrap(), "a copied uid gets in (docs/rbac.md says so)");
    cms.patch(
        "copied",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"pequod.io/resourcegraph-uid": null}}})),
    )
    .await
    .unwrap();
    support::wait_for("the tampered object to leave the cache", WAIT, || async {
        match copied() {
            Ok(false) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    graph_watch.abort();
    env.cleanup().await;
}

#[tokio::test]
async fn nodes_use_earlier_nodes_live_fields_and_outputs_follow_them() {
    let (env, graphs) = setup("references").await;
    // No gate on the Deployment: the ConfigMap may be processed at once, but one of its values
    // is a field the Deployment has only once its pods are available.
    let mut deployment = held_deployment_node(&env, "web", 1);
    deployment["readyWhen"] = json!([]);
    let config = json!({"id": "config", "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "web-endpoints"},
        "data": {"service": "${service.metadata.name}", "address": "${service.spec.clusterIP}:${service.spec.ports.0.port}",
                 "available": "n=${deployment.status.availableReplicas}"}}});
    let mut service = service_node("web");
    service["dependsOn"] = json!([]);
    let rg = json!({
        "apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph",
        "metadata": {"name": "refs"},
        "spec": {"nodes": [config, deployment, service],
                 "outputs": {"clusterIP": "${service.spec.clusterIP}", "available": "${deployment.status.availableReplicas}", "fixed": 7}},
    });
    graphs
        .patch("refs", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(rg))
        .await
        .unwrap();

    // The missing field is a node state, and nothing is applied with an empty value.
    let rg =
        wait_graph(&graphs, "refs", "the ConfigMap waiting for the field", |rg| {
            rg.status.as_ref().and_then(|s| s.node_states.get("config")).is_some_and(|s| {
            s.phase == NodePhase::Pending
                && s.message.as_deref()
                    == Some("waiting for ${deployment.status.availableReplicas}: node deployment has no such field yet")
        })
        })
        .await;
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    assert!(cms.get_opt("web-endpoints").await.unwrap().is_none());
    let status = rg.status.unwrap();
    let services: Api<Service> = Api::namespaced(env.client.clone(), &env.namespace);
    let cluster_ip = services.get("web").await.unwrap().spec.unwrap().cluster_ip.unwrap();
    assert_eq!(status.outputs.get("clusterIP"), Some(&json!(cluster_ip)));
    assert_eq!(status.outputs.get("fixed"), Some(&json!(7)));
    assert!(!status.outputs.contains_key("available"), "{:?}", status.outputs);

    // Once the pods run, the field exists: the watch brings the graph back and it applies.
    support::admit_pods(&env.client, &env.namespace).await;
    let cm = support::wait_for("the ConfigMap with the live values", WAIT, || async {
        match cms.get_opt("web-endpoints").await.map_err(|e| e.to_string())? {
            Some(cm) => Ok(cm),
            None => Err(format!("absent; {:?}", graphs.get("refs").await.map(|g| g.status))),
        }
    })
    .await;
    let data = cm.data.unwrap();
    assert_eq!(data["service"], "web");
    assert_eq!(data["address"], format!("{cluster_ip}:80"));
    assert_eq!(data["available"], "n=1", "inside text, a number becomes text");
    let rg = wait_graph(&graphs, "refs", "the output of the available replicas", |rg| {
        rg.status.as_ref().and_then(|s| s.outputs.get("available")) == Some(&json!(1))
    })
    .await;
    assert_eq!(rg.status.unwrap().phase, Some(GraphPhase::Completed));

    // A reference to a Secret's content is refused before anything is applied.
    let leak = json!({
        "apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph",
        "metadata": {"name": "leak"},
        "spec": {"nodes": [
            {"id": "creds", "object": {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"p": "x"}}},
            {"id": "copy", "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "copy"}, "data": {"p": "${creds.data.p}"}}}]},
    });
    graphs
        .patch("leak", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(leak))
        .await
        .unwrap();
    let rg = wait_graph(&graphs, "leak", "refused", phase_is(GraphPhase::Failed)).await;
    let valid = valid_condition(rg);
    assert_eq!(valid.reason, "NotAllowed", "{}", valid.message);
    assert!(cms.get_opt("copy").await.unwrap().is_none());
    env.cleanup().await;
}

#[tokio::test]
async fn expression_gates_follow_the_live_object_and_bad_ones_are_refused() {
    let (env, graphs) = setup("expression-gate").await;
    let node = |expression: &str| {
        json!([{"id": "flag", "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "flag"}, "data": {"owner": "graph"}},
                "readyWhen": [{"type": "Expression", "expression": expression}]}])
    };
    apply_graph(&graphs, "gated", node("has(self.data.go) && self.data.go == 'yes'")).await;
    let rg = wait_graph(&graphs, "gated", "the gate waiting", |rg| {
        node_phase(rg, "flag") == Some(NodePhase::WaitingReady)
    })
    .await;
    let message = rg.status.unwrap().node_states["flag"]
        .message
        .clone()
        .unwrap_or_default();
    assert!(message.contains("has(self.data.go)"), "{message}");

    // Someone else sets the field the graph does not declare: the watch brings the graph back.
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    let go = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "flag"}, "data": {"go": "yes"}});
    cms.patch("flag", &PatchParams::apply("release-manager"), &Patch::Apply(go))
        .await
        .unwrap();
    wait_graph(&graphs, "gated", "completed", phase_is(GraphPhase::Completed)).await;

    apply_graph(&graphs, "broken", node("self.data.go ==")).await;
    let rg = wait_graph(&graphs, "broken", "refused", phase_is(GraphPhase::Failed)).await;
    let valid = valid_condition(rg);
    assert_eq!(valid.reason, "InvalidExpression", "{}", valid.message);
    assert!(valid.message.contains("not valid CEL"), "{}", valid.message);
    env.cleanup().await;
}

/// A graph of `count` ConfigMap nodes in waves of `wave` nodes (each depends on the node one
/// wave before it), in the documented shape, each object carrying `padding` bytes of data.
fn wide_graph(name: &str, count: usize, wave: usize, padding: usize) -> Value {
    let nodes: Vec<Value> = (0..count)
        .map(|i| {
            let deps: Vec<String> = (i >= wave).then(|| format!("n{}", i - wave)).into_iter().collect();
            json!({"id": format!("n{i}"), "dependencies": deps, "resource": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("{name}-{i}")}, "data": {"pad": "x".repeat(padding)}}})
        })
        .collect();
    json!({
        "apiVersion": "platform.platform.example.com/v1alpha1",
        "kind": "ResourceGraph",
        "metadata": {"name": name},
        "spec": {"graph": {"nodes": nodes}},
    })
}

#[tokio::test]
async fn graphs_beyond_a_hundred_nodes_complete_and_beyond_the_limits_are_refused() {
    let (env, graphs) = setup("large-graphs").await;
    let apply = |name: &'static str, graph: Value| {
        let graphs = graphs.clone();
        async move {
            graphs
                .patch(name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(graph))
                .await
        }
    };
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);

    // 150 nodes in 3 waves: applied and Completed.
    apply("wide", wide_graph("wide", 150, 50, 0)).await.unwrap();
    let rg = support::wait_for("150 nodes Completed", Duration::from_secs(180), || async {
        let rg = graphs.get("wide").await.map_err(|e| e.to_string())?;
        let status = rg.status.clone().unwrap_or_default();
        if status.phase == Some(GraphPhase::Completed) {
            Ok(rg)
        } else {
            Err(format!("{:?} {:?}", status.phase, status.ready_nodes))
        }
    })
    .await;
    let status = rg.status.unwrap();
    assert_eq!(status.ready_nodes.as_deref(), Some("150/150"));
    assert_eq!((status.node_states.len(), status.inventory.len()), (150, 150));
    assert_eq!(status.inventory.iter().map(|e| e.wave).max(), Some(2));
    let made = cms.list(&Default::default()).await.unwrap();
    assert_eq!(
        made.items.iter().filter(|c| c.name_any().starts_with("wide-")).count(),
        150
    );

    // 1,001 nodes: the apiserver's CRD validation refuses the graph; nothing is stored.
    let refused = apply("too-many", wide_graph("too-many", 1001, 1001, 0))
        .await
        .unwrap_err();
    let text = refused.to_string();
    assert!(
        text.contains("spec.graph.nodes") && text.contains("must have at most 1000 items"),
        "{text}"
    );
    assert!(graphs.get_opt("too-many").await.unwrap().is_none());

    // 300 nodes of 2 KiB each (about 640 KiB): within the apiserver's limits, so stored, and
    // refused by Pequod for its bytes; nothing of it is applied.
    apply("too-large", wide_graph("too-large", 300, 300, 2048))
        .await
        .unwrap();
    let rg = wait_graph(&graphs, "too-large", "the graph refused", phase_is(GraphPhase::Failed)).await;
    let valid = valid_condition(rg);
    assert!(!valid.is_true());
    assert_eq!(valid.reason, "GraphTooLarge");
    assert!(
        valid.message.contains("at most 524288 are allowed"),
        "{}",
        valid.message
    );
    assert!(cms.get_opt("too-large-0").await.unwrap().is_none());
    support::wait_events(&env.client, &env.namespace, "too-large", &["InvalidGraph"]).await;
    env.cleanup().await;
}
