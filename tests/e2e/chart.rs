//! The Helm chart against the real apiserver: installed, upgraded with a changed value that
//! reaches the Deployment, and uninstalled without taking the CRDs or anyone's graphs along.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{Patch, PatchParams};
use pequod::api::ResourceGraph;
use serde_json::json;

use crate::support::transforms::WAIT;
use crate::support::{self, TEST_MANAGER, wait_for};

fn helm(env: &support::TestEnv, args: &[&str]) {
    let out = std::process::Command::new(support::tool("helm", "HELM"))
        .args(args)
        .args(["--namespace", &env.namespace, "--kubeconfig"])
        .arg(&env.kubeconfig)
        .output()
        .expect("run helm (hack/install-tools.sh installs it)");
    assert!(
        out.status.success(),
        "helm {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn manager_args(deployment: &Deployment) -> Vec<String> {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .and_then(|c| c.args.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn the_chart_installs_upgrades_and_uninstalls_leaving_crds_and_graphs() {
    let env = support::env("chart").await;
    // The shared operator installs the CRDs; the chart finds them and leaves them be.
    support::operator(&env.client).await;
    let chart = support::repo_root().join("charts/pequod");
    let chart = chart.to_str().unwrap();
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.namespace);

    // Installed as released: `hack/release.sh chart` pushes the chart as an OCI artifact whose
    // default image is the release's, and helm installs it from the registry.
    let registry = &support::remote::shared_registries().open;
    let version = env!("CARGO_PKG_VERSION");
    let release = std::process::Command::new(support::repo_root().join("hack/release.sh"))
        .arg("chart")
        .env("REGISTRY", registry)
        .env("PEQUOD_RELEASE_PLAIN_HTTP", "true")
        .env("HELM", support::tool("helm", "HELM"))
        .output()
        .unwrap();
    assert!(
        release.status.success(),
        "hack/release.sh chart: {}",
        String::from_utf8_lossy(&release.stderr)
    );
    let released = format!("oci://{registry}/charts/pequod");
    helm(
        &env,
        &[
            "install",
            "pequod",
            &released,
            "--version",
            version,
            "--plain-http",
            "--wait=false",
        ],
    );
    let installed = wait_for("the manager Deployment", WAIT, || async {
        deployments
            .get_opt("pequod-controller-manager")
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "absent".to_string())
    })
    .await;
    let image = installed
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .and_then(|c| c.image.clone());
    assert_eq!(image, Some(format!("{registry}/pequod:{version}")));
    let roles: Api<ClusterRole> = Api::all(env.client.clone());
    assert!(roles.get_opt("pequod-manager-role").await.unwrap().is_some());

    // A value changed by an upgrade reaches the Deployment.
    helm(
        &env,
        &[
            "upgrade",
            "pequod",
            chart,
            "--reuse-values",
            "--set",
            "extraArgs={--max-concurrent-reconciles=8}",
        ],
    );
    wait_for("the upgraded arguments", WAIT, || async {
        let d = deployments
            .get("pequod-controller-manager")
            .await
            .map_err(|e| e.to_string())?;
        let args = manager_args(&d);
        args.iter()
            .any(|a| a == "--max-concurrent-reconciles=8")
            .then_some(())
            .ok_or(format!("{args:?}"))
    })
    .await;

    // A developer's graph, then the chart uninstalled: the operator goes, the CRDs and the
    // graph stay.
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let graph = json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph",
        "metadata": {"name": "kept"}, "spec": {"graph": {"nodes": [{"id": "config",
        "resource": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kept"}}}]}}});
    graphs
        .patch("kept", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(graph))
        .await
        .unwrap();
    helm(&env, &["uninstall", "pequod"]);
    wait_for("the manager Deployment gone", WAIT, || async {
        match deployments
            .get_opt("pequod-controller-manager")
            .await
            .map_err(|e| e.to_string())?
        {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        }
    })
    .await;
    assert!(roles.get_opt("pequod-manager-role").await.unwrap().is_none());
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    for crd in [
        "resourcegraphs.platform.platform.example.com",
        "transforms.platform.platform.example.com",
    ] {
        assert!(crds.get_opt(crd).await.unwrap().is_some(), "{crd} kept");
    }
    assert!(graphs.get_opt("kept").await.unwrap().is_some(), "the graph kept");
    env.cleanup().await;
}
