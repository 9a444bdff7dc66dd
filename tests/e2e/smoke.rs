//! The control plane itself behaves as the rest of the suite relies on.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{Patch, PatchParams};

use crate::support::{self, TEST_MANAGER};

#[tokio::test]
async fn pequod_crds_apply_and_become_established() {
    let env = support::env("crds").await;
    support::install_crds(&env.client).await;
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    for name in [
        "transforms.platform.platform.example.com",
        "resourcegraphs.platform.platform.example.com",
    ] {
        let crd = crds.get(name).await.unwrap();
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "{name} is not Established");
    }
    // The apiserver enforces the schema: a node without an object is refused.
    let graphs = support::dynamic_api(
        &env.client,
        "platform.platform.example.com/v1alpha1",
        "ResourceGraph",
        &env.namespace,
    )
    .await;
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

#[tokio::test]
async fn kustomize_default_applies() {
    let env = support::env("kustomize").await;
    let kubectl = support::tool("kubectl", "KUBECTL");
    let mut cmd = std::process::Command::new(&kubectl);
    cmd.arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .args(["apply", "--server-side", "-k"]);
    cmd.arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default"));
    if env.external {
        // Never install a second operator into someone's cluster from a test.
        cmd.arg("--dry-run=server");
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e} (run `make tools`)", kubectl.display()));
    assert!(
        out.status.success(),
        "kubectl apply -k config/default failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if !env.external {
        let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), "pequod-system");
        let deployment = support::wait_for("the operator Deployment", Duration::from_secs(10), || {
            let deployments = deployments.clone();
            async move {
                deployments
                    .get("pequod-controller-manager")
                    .await
                    .map_err(|e| e.to_string())
            }
        })
        .await;
        let pod = deployment.spec.unwrap().template.spec.unwrap();
        let container = &pod.containers[0];
        assert_eq!(container.name, "manager");
        let security = container.security_context.clone().unwrap();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(security.capabilities.unwrap().drop.unwrap(), ["ALL"]);
        assert_eq!(pod.security_context.unwrap().run_as_non_root, Some(true));
    }
    env.cleanup().await;
}
