//! Pequod's CRDs as the apiserver serves them: the schema generated from the Rust types is
//! enforced. (That the CRDs become Established is Kubernetes' promise; `install_crds` waits for
//! it.) The kustomize installation is checked statically, in `tests/chart.rs`.

use kube::api::{Patch, PatchParams};

use crate::support::{self, TEST_MANAGER};

#[tokio::test]
async fn the_graph_schema_refuses_a_node_without_an_object() {
    let env = support::env("crds").await;
    support::install_crds(&env.client).await;
    let graphs = support::graph_api(&env.client, &env.namespace).await;
    let bad = serde_json::json!({
        "apiVersion": "platform.platform.example.com/v1alpha1",
        "kind": "ResourceGraph",
        "metadata": {"name": "bad"},
        "spec": {"nodes": [{"id": "a", "applyPolicy": {"mode": "Sometimes"}}]},
    });
    let err = graphs
        .patch("bad", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&bad))
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("object") && message.contains("Sometimes"),
        "unexpected error: {message}"
    );
    env.cleanup().await;
}
