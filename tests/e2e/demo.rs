//! `make demo`: the main job on a local control plane, kept running until Ctrl-C.
//!
//! Ignored in the normal test run; `make demo` runs it with `--ignored --nocapture`.
//! With PEQUOD_TEST_KUBECONFIG set it runs against that cluster instead.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support;

fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) {
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

#[tokio::test]
#[ignore = "interactive demo: run with `make demo`"]
async fn demo() {
    let env = support::env("demo").await;
    println!("control plane ready; kubeconfig: {}", env.kubeconfig.display());
    support::install_crds(&env.client).await;
    println!("Pequod CRDs installed and Established");

    let metrics = format!("127.0.0.1:{}", support::free_port());
    let probes = format!("127.0.0.1:{}", support::free_port());
    let mut operator = Command::new(env!("CARGO_BIN_EXE_pequod"))
        .env("KUBECONFIG", &env.kubeconfig)
        .args([
            "--metrics-bind-address",
            &metrics,
            "--health-probe-bind-address",
            &probes,
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

    let samples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/samples");
    for file in [
        "platform_v1alpha1_transform.yaml",
        "platform_v1alpha1_resourcegraph.yaml",
    ] {
        let sample = std::fs::read_to_string(samples.join(file)).expect("sample");
        support::apply_yaml(&env.client, &env.namespace, &sample).await;
    }
    let transforms: kube::Api<pequod::api::Transform> = kube::Api::namespaced(env.client.clone(), "default");
    support::wait_transform_ready(&transforms, "webservice").await;
    let instance = std::fs::read_to_string(samples.join("webservice_instance.yaml")).expect("sample");
    support::apply_yaml(&env.client, &env.namespace, &instance).await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    kubectl(
        &env.kubeconfig,
        &["get", "crds", "-l", "app.kubernetes.io/managed-by=pequod"],
    );
    kubectl(&env.kubeconfig, &["get", "transforms", "-A", "-o", "wide"]);
    kubectl(&env.kubeconfig, &["get", "webservices", "-A"]);
    kubectl(&env.kubeconfig, &["get", "resourcegraphs", "-A"]);
    kubectl(
        &env.kubeconfig,
        &[
            "get",
            "configmaps,services",
            "-n",
            "default",
            "-l",
            "pequod.io/resourcegraph=sample-graph",
        ],
    );
    kubectl(
        &env.kubeconfig,
        &["describe", "resourcegraph", "sample-graph", "-n", "default"],
    );
    println!(
        "\nThe demo keeps running. In another terminal:\n  export KUBECONFIG={}\n  kubectl get transforms -A\nPress Ctrl-C to stop and clean up.",
        env.kubeconfig.display()
    );
    let _ = tokio::signal::ctrl_c().await;
    println!("stopping");
    let _ = operator.kill();
    let _ = operator.wait();
    env.cleanup().await;
}
