//! The operator killed in the middle of its work converges after a restart, with no object
//! duplicated or lost. A test binary of its own: no other operator may run beside it.

#[path = "../e2e/support/mod.rs"]
mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use pequod::api::{GraphPhase, NodePhase, ResourceGraph};
use serde_json::json;
use support::OperatorProcess;

const WAIT: Duration = Duration::from_secs(45);

fn start(kubeconfig: &std::path::Path) -> OperatorProcess {
    OperatorProcess::start(kubeconfig, &support::tool("cue", "PEQUOD_TEST_CUE"), &[])
}

#[tokio::test]
async fn killed_operator_converges_after_restart_without_duplicates() {
    let env = support::env("restart").await;
    support::install_crds(&env.client).await;
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.namespace);
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);

    let mut nodes = vec![json!({
        "id": "deployment",
        "object": {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "app"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "app"}},
                "template": {"metadata": {"labels": {"app": "app"}}, "spec": {"containers": [{"name": "app", "image": "nginx:1.27"}]}}}},
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

    // While no operator runs, the deployment becomes available.
    let d = deployments.get("app").await.unwrap();
    let status = json!({"status": {"observedGeneration": d.metadata.generation, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1,
        "conditions": [{"type": "Available", "status": "True", "reason": "Simulated", "message": "", "lastUpdateTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    deployments
        .patch_status("app", &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();

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
