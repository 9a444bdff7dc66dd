//! `make demo`: Pequod on a local control plane with simulated nodes, running the samples
//! until Ctrl-C. With PEQUOD_TEST_KUBECONFIG set it runs against that cluster instead.
//!
//! It applies the sample Transform and ResourceGraph, waits for the WebService kind, applies
//! the sample WebService `my-app` (3 replicas) and waits until its pods run and it is Ready,
//! then shows what Pequod made with kubectl.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kube::Api;
use kube::api::DynamicObject;
use pequod_testkit as support;

fn kubectl(kubeconfig: &Path, args: &[&str]) {
    println!("\n$ kubectl {}", args.join(" "));
    let status = Command::new(support::tool("kubectl", "KUBECTL"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .status();
    if let Err(e) = status {
        println!("(kubectl failed: {e})");
    }
}

#[tokio::main]
async fn main() {
    let env = support::env("demo").await;
    println!("control plane ready; kubeconfig: {}", env.kubeconfig.display());
    support::install_crds(&env.client).await;
    println!("Pequod CRDs installed and Established");

    let metrics = format!("127.0.0.1:{}", support::free_port());
    let probes = format!("127.0.0.1:{}", support::free_port());
    let webhook = format!("127.0.0.1:{}", support::free_port());
    let mut operator = Command::new(support::pequod_binary())
        .env("KUBECONFIG", &env.kubeconfig)
        .args([
            "--metrics-bind-address",
            &metrics,
            "--health-probe-bind-address",
            &probes,
            "--webhook-bind-address",
            &webhook,
            "--webhook-url",
            &format!("https://{webhook}"),
            "--zap-encoder=console",
        ])
        .arg("--cue-binary")
        .arg(support::tool("cue", "PEQUOD_TEST_CUE"))
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start pequod");
    support::wait_for("the operator to be ready", Duration::from_secs(60), || async {
        match support::http_get(&probes, "/readyz").await {
            Ok((200, body)) => Ok(body),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    println!("operator running: metrics on http://{metrics}/metrics, probes on http://{probes}/readyz");

    let samples = support::repo_root().join("config/samples");
    for file in [
        "platform_v1alpha1_transform.yaml",
        "resourcegraph_service_account.yaml",
        "platform_v1alpha1_resourcegraph.yaml",
    ] {
        let sample = std::fs::read_to_string(samples.join(file)).expect("sample");
        support::apply_yaml(&env.client, "default", &sample).await;
    }
    let transforms: Api<pequod::api::Transform> = Api::namespaced(env.client.clone(), "pequod-system");
    support::wait_transform_ready(&transforms, "webservice").await;
    let instance = std::fs::read_to_string(samples.join("webservice_instance.yaml")).expect("sample");
    support::apply_yaml(&env.client, "default", &instance).await;
    let webservices = support::dynamic_api(&env.client, "apps.mycompany.com/v1alpha1", "WebService", "default").await;
    support::wait_for("WebService my-app Ready", Duration::from_secs(120), || async {
        let obj: DynamicObject = webservices.get("my-app").await.map_err(|e| e.to_string())?;
        match obj.data.pointer("/status/phase").and_then(|p| p.as_str()) {
            Some("Ready") => Ok(()),
            other => Err(format!("phase {other:?}")),
        }
    })
    .await;

    let kc = &env.kubeconfig;
    kubectl(kc, &["get", "crds", "-l", "app.kubernetes.io/managed-by=pequod"]);
    kubectl(kc, &["get", "transforms", "-A", "-o", "wide"]);
    kubectl(kc, &["get", "webservices", "-A"]);
    kubectl(kc, &["get", "resourcegraphs", "-A"]);
    kubectl(
        kc,
        &[
            "get",
            "deployments,pods,services",
            "-n",
            "default",
            "-l",
            "app.kubernetes.io/instance=my-app",
            "-o",
            "wide",
        ],
    );
    kubectl(
        kc,
        &[
            "get",
            "configmaps,services",
            "-n",
            "default",
            "-l",
            "pequod.io/resourcegraph=sample-graph",
        ],
    );
    kubectl(kc, &["describe", "resourcegraph", "sample-graph", "-n", "default"]);
    println!(
        "\nThe demo keeps running. In another terminal:\n  export KUBECONFIG={}\n  kubectl get webservices -A\nPress Ctrl-C to stop and clean up.",
        env.kubeconfig.display()
    );
    let _ = tokio::signal::ctrl_c().await;
    println!("stopping");
    let _ = operator.kill();
    let _ = operator.wait();
    env.cleanup().await;
}
