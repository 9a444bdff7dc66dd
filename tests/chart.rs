//! The Helm chart (charts/pequod) installs what the kustomize configuration does: the same
//! objects, names, manager container and RBAC as `config/default`, `config/restricted` and
//! `config/prometheus`, so the two never drift; and the manager of `config/default` runs
//! unprivileged. Needs `bin/helm` and `bin/kubectl`
//! (hack/install-tools.sh), or `HELM` and `KUBECTL`; no cluster.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use pequod_testkit as support;

const NAMESPACE: &str = "pequod-system";
/// The oldest Kubernetes release supported (the chart's kubeVersion).
const KUBE_VERSION: &str = "1.34.0";

fn root(path: &str) -> PathBuf {
    support::repo_root().join(path)
}

fn run(mut command: Command) -> String {
    let shown = format!("{command:?}");
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{shown}: {e} (run hack/install-tools.sh)"));
    assert!(
        out.status.success(),
        "{shown} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// The objects of a kustomization, by kind and name.
fn kustomize(dir: &str) -> BTreeMap<(String, String), Value> {
    let mut command = Command::new(support::tool("kubectl", "KUBECTL"));
    command.arg("kustomize").arg(root(dir));
    by_name(documents(&run(command)))
}

/// The chart rendered into `pequod-system` with `--set` values.
fn helm(set: &[&str]) -> BTreeMap<(String, String), Value> {
    let mut command = Command::new(support::tool("helm", "HELM"));
    command.args(["template", "pequod"]).arg(root("charts/pequod")).args([
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
    ]);
    for value in set {
        command.args(["--set", value]);
    }
    by_name(documents(&run(command)))
}

fn by_name(objects: Vec<Value>) -> BTreeMap<(String, String), Value> {
    objects
        .into_iter()
        .map(|o| {
            let key = (
                o["kind"].as_str().unwrap().to_string(),
                o["metadata"]["name"].as_str().unwrap().to_string(),
            );
            (key, o)
        })
        .collect()
}

/// The chart's objects are kustomize's (less the CRDs, which the chart keeps in crds/, and the
/// Namespace, which `helm install --create-namespace` makes), with the same namespaces, labels
/// (the chart adds Helm's), manager pod, RBAC rules, bindings and Service.
fn assert_same(kustomized: &BTreeMap<(String, String), Value>, rendered: &BTreeMap<(String, String), Value>) {
    let expected: Vec<_> = kustomized
        .keys()
        .filter(|(kind, _)| kind != "CustomResourceDefinition" && kind != "Namespace")
        .collect();
    let actual: Vec<_> = rendered.keys().collect();
    assert_eq!(actual, expected, "the chart renders other objects than kustomize");
    for (key, want) in kustomized {
        let Some(got) = rendered.get(key) else { continue };
        let what = format!("{}/{}", key.0, key.1);
        assert_eq!(
            got["metadata"]["namespace"], want["metadata"]["namespace"],
            "{what}: namespace"
        );
        assert_subset(&want["metadata"]["labels"], &got["metadata"]["labels"], &what);
        let fields: &[&str] = match key.0.as_str() {
            "ClusterRole" | "Role" => &["rules", "aggregationRule"],
            "ClusterRoleBinding" | "RoleBinding" => &["roleRef", "subjects"],
            "Service" | "ServiceMonitor" | "PrometheusRule" => &["spec"],
            "ConfigMap" => &["data"],
            _ => &[],
        };
        for field in fields {
            assert_eq!(got[field], want[field], "{what}: {field} differs from kustomize");
        }
        if key.0 == "Deployment" {
            let (got, want) = (&got["spec"], &want["spec"]);
            assert_eq!(got["replicas"], want["replicas"], "{what}: replicas");
            assert_eq!(got["selector"], want["selector"], "{what}: selector");
            let template = |spec: &Value| {
                let mut pod = spec["template"]["spec"].clone();
                for container in pod["containers"].as_array_mut().unwrap() {
                    let container = container.as_object_mut().unwrap();
                    container.remove("image");
                    container.remove("imagePullPolicy");
                }
                pod
            };
            assert_eq!(template(got), template(want), "{what}: pod spec differs from kustomize");
            assert_eq!(
                got["template"]["metadata"]["annotations"], want["template"]["metadata"]["annotations"],
                "{what}: pod annotations"
            );
            assert_subset(
                &want["template"]["metadata"]["labels"],
                &got["template"]["metadata"]["labels"],
                &what,
            );
        }
    }
}

fn assert_subset(want: &Value, got: &Value, what: &str) {
    for (label, value) in want.as_object().into_iter().flatten() {
        assert_eq!(&got[label], value, "{what}: label {label}");
    }
}

fn manager_args(objects: &BTreeMap<(String, String), Value>) -> Vec<String> {
    let deployment = &objects[&("Deployment".to_string(), "pequod-controller-manager".to_string())];
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn chart_version_and_app_version_are_the_cargo_version() {
    let chart: Value =
        serde_yaml::from_str(&std::fs::read_to_string(root("charts/pequod/Chart.yaml")).unwrap()).unwrap();
    assert_eq!(chart["version"], env!("CARGO_PKG_VERSION"), "Chart.yaml version");
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"), "Chart.yaml appVersion");
}

#[test]
fn chart_crds_and_monitoring_files_are_those_of_config() {
    let listed = |dir: &str| {
        let mut names: Vec<_> = std::fs::read_dir(root(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    let bases = listed("config/crd/bases");
    assert_eq!(
        listed("charts/pequod/crds"),
        bases,
        "charts/pequod/crds holds other files than config/crd/bases"
    );
    let mut pairs: Vec<_> = bases
        .iter()
        .map(|n| (format!("config/crd/bases/{n}"), format!("charts/pequod/crds/{n}")))
        .collect();
    for n in ["rules.yaml", "dashboard.json"] {
        pairs.push((format!("config/prometheus/{n}"), format!("charts/pequod/files/{n}")));
    }
    for (source, copy) in pairs {
        assert!(
            std::fs::read(root(&source)).unwrap() == std::fs::read(root(&copy)).unwrap(),
            "{copy} differs from {source}: cp {source} {copy}"
        );
    }
}

#[test]
fn chart_lints() {
    for set in [
        "rbac.restricted=false",
        "rbac.restricted=true,metrics.serviceMonitor.enabled=true,metrics.prometheusRule.enabled=true,metrics.grafanaDashboard.enabled=true",
    ] {
        let mut command = Command::new(support::tool("helm", "HELM"));
        command
            .args(["lint", "--strict", "--set", set])
            .arg(root("charts/pequod"));
        run(command);
    }
}

/// The manager of `config/default` runs with a read-only root filesystem, no privilege
/// escalation, no capabilities, and as a non-root user.
#[test]
fn kustomize_default_runs_the_manager_unprivileged() {
    let objects = kustomize("config/default");
    let deployment = &objects[&("Deployment".to_string(), "pequod-controller-manager".to_string())];
    assert_eq!(deployment["metadata"]["namespace"], NAMESPACE);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["name"], "manager");
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
}

#[test]
fn chart_defaults_render_config_default() {
    assert_same(&kustomize("config/default"), &helm(&[]));
}

#[test]
fn chart_restricted_renders_config_restricted() {
    assert_same(&kustomize("config/restricted"), &helm(&["rbac.restricted=true"]));
}

#[test]
fn chart_monitoring_renders_config_prometheus() {
    // config/prometheus is kustomized alone, without config/default's namespace and prefix.
    let kustomized = kustomize("config/prometheus")
        .into_iter()
        .map(|((kind, name), mut o)| {
            o["metadata"]["namespace"] = NAMESPACE.into();
            ((kind, format!("pequod-{name}")), o)
        })
        .collect::<BTreeMap<_, _>>();
    let rendered = helm(&[
        "metrics.serviceMonitor.enabled=true",
        "metrics.prometheusRule.enabled=true",
        "metrics.grafanaDashboard.enabled=true",
    ])
    .into_iter()
    .filter(|(key, _)| kustomized.contains_key(key))
    .collect();
    assert_eq!(
        kustomized.len(),
        3,
        "config/prometheus has a ServiceMonitor, a PrometheusRule and a dashboard"
    );
    assert_same(&kustomized, &rendered);
}

/// The conversion webhook's Service sends port 443 to the manager's port `webhook` (9443, the
/// default `--webhook-bind-address`), under the name the operator's `--webhook-service`
/// defaults to, in both installations.
fn assert_webhook_service(objects: &BTreeMap<(String, String), Value>, what: &str) {
    let service = &objects[&("Service".to_string(), "pequod-webhook-service".to_string())];
    assert_eq!(service["metadata"]["namespace"], NAMESPACE, "{what}");
    let port = &service["spec"]["ports"][0];
    assert_eq!(port["port"], 443, "{what}: the port CRDs name");
    assert_eq!(port["targetPort"], "webhook", "{what}");
    let deployment = &objects[&("Deployment".to_string(), "pequod-controller-manager".to_string())];
    let pod = &deployment["spec"]["template"];
    for (label, value) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(
            &pod["metadata"]["labels"][label], value,
            "{what}: the Service selects the manager"
        );
    }
    let ports = pod["spec"]["containers"][0]["ports"].as_array().unwrap();
    let webhook = ports
        .iter()
        .find(|p| p["name"] == "webhook")
        .expect("a port named webhook");
    assert_eq!(webhook["containerPort"], 9443, "{what}");
}

#[test]
fn both_installations_serve_the_conversion_webhook() {
    assert_webhook_service(&kustomize("config/default"), "config/default");
    assert_webhook_service(&helm(&[]), "the chart");
    assert_webhook_service(&helm(&["rbac.restricted=true"]), "the restricted chart");
}

#[test]
fn chart_values_reach_the_manager() {
    let objects = helm(&[
        "leaderElection=false",
        "metrics.secure=false",
        "trustedTransformNamespaces={platform,team-a}",
        "defaultServiceAccount=pequod-graphs",
        "extraArgs={--log-level=debug}",
        "image.repository=registry.example.com/pequod",
        "image.tag=dev",
    ]);
    assert_eq!(
        manager_args(&objects),
        [
            "--metrics-bind-address=:8443",
            "--health-probe-bind-address=:8081",
            "--trusted-transform-namespaces=platform,team-a",
            "--default-service-account=pequod-graphs",
            "--log-level=debug",
        ]
    );
    let deployment = &objects[&("Deployment".to_string(), "pequod-controller-manager".to_string())];
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.example.com/pequod:dev"
    );
    let defaults = helm(&[]);
    let deployment = &defaults[&("Deployment".to_string(), "pequod-controller-manager".to_string())];
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("pequod:{}", env!("CARGO_PKG_VERSION")),
        "the image tag defaults to the appVersion"
    );

    let mut command = Command::new(support::tool("helm", "HELM"));
    command
        .args([
            "template",
            "pequod",
            "--kube-version",
            KUBE_VERSION,
            "--set",
            "replicas=2",
            "--set",
            "leaderElection=false",
        ])
        .arg(root("charts/pequod"));
    let out = command.output().unwrap();
    assert!(!out.status.success(), "two replicas without leader election rendered");
    assert!(String::from_utf8_lossy(&out.stderr).contains("leaderElection"));
}
