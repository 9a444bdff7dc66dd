//! The restricted installation (`config/restricted`) against the real apiserver: the operator
//! runs with the manager service account's own token and `--generate-rbac=false`; it gains no
//! permission whatever Transforms and graphs ask, and writes only what an administrator
//! granted with `pequod rbac`. A test binary of its own: it replaces the manager role.

use pequod_testkit as support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::{Api, Client};
use pequod::api::Transform;
use serde_json::{Value, json};
use support::instances::{apply_instance, instance_condition};
use support::modules::put_module;
use support::transforms::{apply_transform, failed, group};
use support::{OperatorProcess, restricted};

const WAIT: Duration = Duration::from_secs(120);
const MANAGER_ROLE: &str = "pequod-manager-role";

/// A module whose one object is of `kind` (`ConfigMap` or `Secret`), holding the input's value
/// in `field` (`data` or `stringData`).
fn module(kind: &str, field: &str) -> String {
    format!(
        r#"package m

#Metadata: kind: "{kind}Holder"

#Input: {{
	value: string
}}

#Render: {{
	input: {{metadata: {{name: string, namespace: string, ...}}, spec: #Input}}
	output: nodes: [{{
		id: "object"
		object: {{apiVersion: "v1", kind: "{kind}", metadata: name: input.metadata.name, {field}: value: input.spec.value}}
	}}]
}}
"#
    )
}

/// A trusted Transform's module that tries to bind cluster-admin to the manager.
const GRAB_MODULE: &str = r#"package m

#Metadata: kind: "Grab"

#Input: {}

#Render: {
	input: {metadata: {name: string, namespace: string, ...}, spec: #Input}
	output: nodes: [{
		id: "binding"
		object: {
			apiVersion: "rbac.authorization.k8s.io/v1", kind: "ClusterRoleBinding"
			metadata: name: "grab-\(input.metadata.namespace)"
			roleRef: {apiGroup: "rbac.authorization.k8s.io", kind: "ClusterRole", name: "cluster-admin"}
			subjects: [{kind: "ServiceAccount", name: "pequod-controller-manager", namespace: "pequod-system"}]
		}
	}]
}
"#;

fn aggregated_resources(role: &ClusterRole) -> Vec<String> {
    role.rules
        .iter()
        .flatten()
        .filter(|r| r.verbs.iter().any(|v| v == "create"))
        .flat_map(|r| r.resources.clone().unwrap_or_default())
        .collect()
}

async fn apply(client: &Client, namespace: &str, value: Value) {
    let yaml = serde_yaml::to_string(&value).unwrap();
    support::apply_yaml(client, namespace, &yaml).await;
}

const MANAGER: &str = "system:serviceaccount:pequod-system:pequod-controller-manager";

/// What the manager may do in `namespace` and cluster-wide, as `kubectl auth can-i --list`
/// tells it: one line per rule, sorted.
fn manager_permissions(kubeconfig: &std::path::Path, namespace: &str) -> Vec<String> {
    let out = restricted::kubectl(
        kubeconfig,
        &["auth", "can-i", "--list", "--as", MANAGER, "-n", namespace],
        "",
    );
    let mut lines: Vec<String> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect();
    lines.sort();
    lines
}

#[tokio::test]
async fn the_restricted_manager_gains_no_permission_and_writes_only_what_an_admin_granted() {
    let env = support::env("restricted").await;
    if env.external {
        // Replacing the manager role of someone's cluster is not a test's business.
        return;
    }
    restricted::install(&env.kubeconfig);
    let roles: Api<ClusterRole> = Api::all(env.client.clone());
    support::wait_for("the base role aggregated into the manager role", WAIT, || async {
        let role = roles.get(MANAGER_ROLE).await.map_err(|e| e.to_string())?;
        let resources = aggregated_resources(&role);
        if resources.contains(&"transforms".to_string()) {
            Ok(())
        } else {
            Err(format!("{resources:?}"))
        }
    })
    .await;
    let before = manager_permissions(&env.kubeconfig, &env.namespace);
    for line in &before {
        let resource = line.split(' ').next().unwrap_or_default();
        assert!(!resource.starts_with('*'), "a wildcard rule: {line}");
        assert!(!line.contains("escalate") && !line.contains(" bind"), "{line}");
        assert!(!resource.starts_with("secrets"), "Secrets readable: {line}");
    }

    let kubeconfig = restricted::manager_kubeconfig(&env.client, &env.kubeconfig).await;
    let operator = OperatorProcess::start(
        &kubeconfig,
        &support::tool("cue", "PEQUOD_TEST_CUE"),
        &["--trusted-transform-namespaces=*", "--generate-rbac=false"],
    );
    support::wait_for(
        "the operator running as its service account to be ready",
        WAIT,
        || async {
            match support::http_get(&operator.probes, "/readyz").await {
                Ok((200, body)) => Ok(body),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    let group = group(&env);
    let transforms: Api<Transform> = Api::namespaced(env.client.clone(), &env.namespace);
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    for (kind, field) in [("ConfigMap", "data"), ("Secret", "stringData")] {
        let lower = kind.to_ascii_lowercase();
        put_module(
            &env.client,
            &env.namespace,
            &format!("{lower}-module"),
            &module(kind, field),
        )
        .await;
        // Both declare only ConfigMaps: the Secret module renders a kind nobody declared.
        apply_transform(
            &transforms,
            &lower,
            json!({"cueRef": {"type": "configmap", "ref": format!("{lower}-module")}, "group": group,
                   "managedResources": [{"resources": ["configmaps"]}]}),
        )
        .await;
    }

    // Attempts to gain permissions: a trusted Transform declaring RBAC kinds whose module binds
    // cluster-admin to the manager, and hand-written graphs with an aggregated ClusterRole and
    // a RoleBinding to admin.
    put_module(&env.client, &env.namespace, "grab-module", GRAB_MODULE).await;
    apply_transform(
        &transforms,
        "grab",
        json!({"cueRef": {"type": "configmap", "ref": "grab-module"}, "group": group,
               "allowClusterScopedResources": true,
               "managedResources": [{"apiGroup": "rbac.authorization.k8s.io",
                                     "resources": ["clusterroles", "clusterrolebindings"]}]}),
    )
    .await;
    let escalations = [
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": format!("{}-everything", env.namespace),
                            "labels": {"pequod.io/aggregate-to-manager": "true"}},
               "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "manager-admin", "namespace": env.namespace},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
               "subjects": [{"kind": "ServiceAccount", "name": "pequod-controller-manager", "namespace": "pequod-system"}]}),
    ];
    // The graphs act as a service account their namespace's owner gave `edit`.
    support::apply_yaml(
        &env.client,
        &env.namespace,
        &format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: graphs\n---\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: graphs-edit\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: edit}}\n\
             subjects: [{{kind: ServiceAccount, name: graphs, namespace: {}}}]\n",
            env.namespace
        ),
    )
    .await;
    for (i, object) in escalations.iter().enumerate() {
        apply(
            &env.client,
            &env.namespace,
            json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph",
                   "metadata": {"name": format!("escalation-{i}")},
                   "spec": {"serviceAccountName": "graphs", "nodes": [{"id": "rbac", "object": object}]}}),
        )
        .await;
    }
    let graphs = support::graph_api(&env.client, &env.namespace).await;
    for i in 0..escalations.len() {
        support::wait_for("the escalating graph refused", WAIT, || async {
            let graph = graphs
                .get(&format!("escalation-{i}"))
                .await
                .map_err(|e| e.to_string())?;
            let conditions = graph.data["status"]["conditions"].clone();
            let refused = conditions.as_array().into_iter().flatten().any(|c| {
                (c["type"] == "Valid" && c["status"] == "False" && c["reason"] == "NotAllowed")
                    || (c["type"] == "Authorized" && c["status"] == "False" && c["reason"] == "Forbidden")
            });
            if refused { Ok(()) } else { Err(conditions.to_string()) }
        })
        .await;
    }

    for name in ["configmap", "secret", "grab"] {
        let (_, message) = failed(&transforms, name, "RBACConfigured", "RBACMissing").await;
        assert!(
            message.contains(&format!("pequod rbac {}/{name}", env.namespace)),
            "{message}"
        );
        if name == "grab" {
            assert!(
                message.contains("clusterrolebindings.rbac.authorization.k8s.io"),
                "{message}"
            );
        } else {
            assert!(message.contains("configmaps in every namespace"), "{message}");
        }
    }
    let generated = roles
        .list(&kube::api::ListParams::default().labels("pequod.io/transform-namespace"))
        .await
        .unwrap();
    assert!(
        generated.items.is_empty(),
        "the manager wrote RBAC: {:?}",
        generated.items
    );
    assert_eq!(
        manager_permissions(&env.kubeconfig, &env.namespace),
        before,
        "the manager's permissions changed"
    );
    assert!(
        roles
            .get_opt(&format!("{}-everything", env.namespace))
            .await
            .unwrap()
            .is_none()
    );

    // An administrator grants what the two holders need; the manager then serves them.
    for name in ["configmap", "secret"] {
        let yaml = restricted::grant_transform(&env.kubeconfig, &env.namespace, name);
        assert!(
            yaml.contains("kind: ClusterRole") && !yaml.contains("escalate"),
            "{yaml}"
        );
        support::wait_transform_ready(&transforms, name).await;
    }
    let after = manager_permissions(&env.kubeconfig, &env.namespace);
    let gained: Vec<&String> = after.iter().filter(|l| !before.contains(l)).collect();
    assert!(
        gained.iter().any(|l| l.starts_with("configmaps ")),
        "the granted rules are held: {gained:?}"
    );
    assert!(gained.iter().all(|l| !l.contains("rbac")), "{gained:?}");

    let api_version = format!("{group}/v1alpha1");
    let holders = support::dynamic_api(&env.client, &api_version, "ConfigMapHolder", &env.namespace).await;
    let secret_holders = support::dynamic_api(&env.client, &api_version, "SecretHolder", &env.namespace).await;
    apply_instance(
        &holders,
        &api_version,
        "ConfigMapHolder",
        "allowed",
        json!({"value": "a"}),
    )
    .await;
    apply_instance(
        &secret_holders,
        &api_version,
        "SecretHolder",
        "refused",
        json!({"value": "b"}),
    )
    .await;
    support::wait_for(
        "the declared ConfigMap applied and its instance Ready",
        WAIT,
        || async {
            let obj = holders.get("allowed").await.map_err(|e| e.to_string())?;
            let cm = cms.get_opt("allowed").await.map_err(|e| e.to_string())?;
            match (instance_condition(&obj, "Ready"), cm) {
                (Some((s, _, _)), Some(_)) if s == "True" => Ok(()),
                other => Err(format!("{:?}", other.0)),
            }
        },
    )
    .await;

    let (_, reason, message) = support::wait_for("the undeclared Secret refused", WAIT, || async {
        let obj = secret_holders.get("refused").await.map_err(|e| e.to_string())?;
        match instance_condition(&obj, "Ready") {
            Some((s, r, m)) if s == "False" && r == "NodeFailed" => Ok((s, r, m)),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(message.contains("forbidden"), "{message}");
    assert_eq!(reason, "NodeFailed");
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    assert!(secrets.get_opt("refused").await.unwrap().is_none());

    // Without its permissions the operator's reconciles fail, and the failures are counted.
    Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(env.client.clone())
        .delete("pequod-manager-rolebinding", &Default::default())
        .await
        .unwrap();
    let touch = json!({"metadata": {"annotations": {"test.pequod.io/touched": "yes"}}});
    transforms
        .patch(
            "configmap",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(touch),
        )
        .await
        .unwrap();
    let series = "pequod_reconcile_errors_total{controller=\"transform\",error_type=\"ApiError\"}";
    support::wait_for("a counted reconcile error", WAIT, || async {
        let (_, text) = support::http_get(&operator.metrics, "/metrics").await?;
        let value: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0);
        if value > 0.0 {
            Ok(())
        } else {
            Err(format!("{series} = {value}"))
        }
    })
    .await;
    drop(operator);
    env.cleanup().await;
}
