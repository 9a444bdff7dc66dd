//! The `Grant` scenario of the graph-authority tests: a Transform allowed to give a
//! cluster-scoped object (a ClusterRole per instance), and a user who may write only
//! ResourceGraphs in the test's namespace.

use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::Api;
use kube::api::{DeleteParams, DynamicObject};
use pequod::api::{ConditionStatus, ResourceGraph, Transform};
use serde_json::json;

use crate::modules::put_module;
use crate::transforms::{WAIT, apply_transform, delete_transform, group};
use crate::{TestEnv, wait_for};

/// A module of kind `Grant` whose instances each keep one ClusterRole, `<namespace>-<name>`,
/// with no rules: a cluster-scoped object only a Transform allowing it may give.
pub const GRANT_MODULE: &str = r#"package grant

#Metadata: kind: "Grant"

#Input: {
	note?: string
}

#Render: {
	input: {metadata: {name: string, namespace: string, ...}, spec: #Input}
	output: nodes: [{
		id: "role"
		object: {
			apiVersion: "rbac.authorization.k8s.io/v1"
			kind: "ClusterRole"
			metadata: name: "\(input.metadata.namespace)-\(input.metadata.name)"
			rules: []
		}
	}]
}
"#;

/// A Transform `grant` allowing cluster-scoped objects, a Role for `user` that allows
/// ResourceGraphs only; returns the `Grant` instances' API, the graphs' API and the kind's
/// apiVersion.
pub async fn serve_grants(
    env: &TestEnv,
    transforms: &Api<Transform>,
    user: &str,
) -> (Api<DynamicObject>, Api<ResourceGraph>, String) {
    let group = group(env);
    let api_version = format!("{group}/v1alpha1");
    put_module(&env.client, &env.namespace, "grant-module", GRANT_MODULE).await;
    apply_transform(
        transforms,
        "grant",
        json!({"cueRef": {"type": "configmap", "ref": "grant-module"}, "group": group,
               "allowClusterScopedResources": true,
               "managedResources": [{"apiGroup": "rbac.authorization.k8s.io", "resources": ["clusterroles"]}]}),
    )
    .await;
    crate::wait_transform_ready(transforms, "grant").await;
    crate::apply_yaml(
        &env.client,
        &env.namespace,
        &format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: graph-writer\nrules:\n\
             - apiGroups: [platform.platform.example.com]\n  resources: [resourcegraphs]\n  verbs: [\"*\"]\n---\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: graph-writer\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: graph-writer}}\n\
             subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {user}}}]\n"
        ),
    )
    .await;
    let grants = crate::dynamic_api(&env.client, &api_version, "Grant", &env.namespace).await;
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    (grants, graphs, api_version)
}

/// Removes what a test of [`serve_grants`] left: the graph, the ClusterRole, the Transform, the
/// namespace.
pub async fn forget_grants(
    env: TestEnv,
    transforms: &Api<Transform>,
    graphs: &Api<ResourceGraph>,
    graph: &str,
    role: &str,
) {
    let roles: Api<ClusterRole> = Api::all(env.client.clone());
    let _ = graphs.delete(graph, &DeleteParams::default()).await;
    let _ = roles.delete(role, &DeleteParams::default()).await;
    delete_transform(transforms, "grant").await;
    env.cleanup().await;
}

/// `kubectl --as user patch resourcegraph graph --type=json -p patch`, which must succeed.
pub fn patch_graph_as(env: &TestEnv, user: &str, graph: &str, patch: &str) {
    let out = crate::kubectl_as(
        env,
        user,
        &["patch", "resourcegraph", graph, "--type=json", "-p", patch],
        "",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Whose rights the graph acts with, once it says: the reason of `Authorized`, or of a `Valid`
/// refusal.
pub async fn acting_reason(graphs: &Api<ResourceGraph>, name: &str) -> String {
    wait_for("the graph says whose rights it acts with", WAIT, || async {
        let rg = graphs.get(name).await.map_err(|e| e.to_string())?;
        let conditions = rg.status.map(|s| s.conditions).unwrap_or_default();
        if let Some(c) = conditions
            .iter()
            .find(|c| c.type_ == "Valid" && c.status == ConditionStatus::False)
        {
            return Ok(c.reason.clone());
        }
        conditions
            .iter()
            .find(|c| c.type_ == "Authorized")
            .map(|c| c.reason.clone())
            .ok_or_else(|| format!("{conditions:?}"))
    })
    .await
}
