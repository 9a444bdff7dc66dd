//! Attacks of a hostile user with ordinary rights (edit their instances, write ResourceGraphs
//! in their namespace, own a Transform in an untrusted namespace) on Pequod's defences. Each
//! test fails when the attack works.

use std::time::Duration;

use kube::api::DeleteParams;
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::support::grants::{acting_reason, forget_grants, patch_graph_as, serve_grants};
use crate::support::instances::{apply_instance, wait_instance};
use crate::support::transforms::{WAIT, group, setup};
use crate::support::{self, kubectl_as, wait_for};

fn ok(out: std::process::Output) {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Rights used: edit my own instances (with their metadata), write ResourceGraphs in my
/// namespace. The executor checks that a signed graph is owned by the instance its signed
/// `sourceRef` names by comparing the owner reference's uid only, and remembers per graph uid
/// that the instance existed. An owner reference with the instance's uid under a kind the
/// garbage collector cannot resolve keeps the graph alive after the instance is gone (the
/// collector retries forever instead of deleting), and the remembered lookup keeps the graph
/// acting with the Transform's authority: the instance's ClusterRole outlives it, and is written
/// again when deleted.
#[tokio::test]
async fn a_signed_graph_owned_by_its_instance_uid_under_another_kind_does_not_outlive_it() {
    let (env, transforms) = setup("fake-owner-kind").await;
    let user = format!("dev-{}", env.namespace);
    let (grants, graphs, api_version) = serve_grants(&env, &transforms, &user).await;
    let group = group(&env);
    // The user may also edit their instances.
    support::apply_yaml(
        &env.client,
        &env.namespace,
        &format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: instance-editor\nrules:\n\
             - apiGroups: [{group}]\n  resources: [grants]\n  verbs: [\"*\"]\n---\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: instance-editor\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: instance-editor}}\n\
             subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {user}}}]\n"
        ),
    )
    .await;
    let _ = api_version;
    let graph = format!("grant.{group}-kept");
    let role = format!("{}-kept", env.namespace);
    let instance_kind = format!("grants.{group}");
    apply_instance(&grants, &format!("{group}/v1alpha1"), "Grant", "kept", json!({})).await;
    let instance = wait_instance(&grants, "kept", "Ready", "True", "Ready").await;
    let uid = instance.uid().unwrap();
    assert_eq!(acting_reason(&graphs, &graph).await, "TransformAuthority");
    let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(env.client.clone());
    assert!(roles.get_opt(&role).await.unwrap().is_some());

    // 1. The instance is paused: Pequod leaves it (and its finalizer) alone.
    ok(kubectl_as(
        &env,
        &user,
        &["annotate", &instance_kind, "kept", "pequod.io/paused=true"],
        "",
    ));
    // 2. The graph's owner reference keeps the instance's uid under a kind nobody serves: the
    //    spec, and so the proof, is untouched.
    let owner = json!([{"op": "replace", "path": "/metadata/ownerReferences", "value": [{
        "apiVersion": "gone.example.com/v1", "kind": "Gone", "name": "kept", "uid": uid, "controller": true}]}]);
    patch_graph_as(&env, &user, &graph, &owner.to_string());
    tokio::time::sleep(Duration::from_secs(3)).await;
    // 3. The instance is deleted without its finalizer.
    ok(kubectl_as(
        &env,
        &user,
        &[
            "patch",
            &instance_kind,
            "kept",
            "--type=json",
            "-p",
            r#"[{"op": "remove", "path": "/metadata/finalizers"}]"#,
        ],
        "",
    ));
    ok(kubectl_as(
        &env,
        &user,
        &["delete", &instance_kind, "kept", "--wait=true"],
        "",
    ));
    wait_for("the instance gone", WAIT, || async {
        match grants.get_opt("kept").await {
            Ok(None) => Ok(()),
            other => Err(format!("{:?}", other.map(|o| o.map(|o| o.metadata)))),
        }
    })
    .await;

    // The ClusterRole is deleted by an administrator cleaning up; a graph still acting with the
    // Transform's authority writes it again.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let _ = roles.delete(&role, &DeleteParams::default()).await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let left = graphs.get_opt(&graph).await.unwrap();
    let authority = left
        .as_ref()
        .and_then(|g| g.status.as_ref())
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "Authorized" && c.status == pequod::api::ConditionStatus::True)
        })
        .map(|c| c.reason.clone());
    let valid = left
        .as_ref()
        .and_then(|g| g.status.as_ref())
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Valid"))
        .map(|c| (c.status, c.reason.clone()));
    let rewritten = roles.get_opt(&role).await.unwrap().is_some();

    forget_grants(env, &transforms, &graphs, &graph, &role).await;
    assert!(
        !rewritten,
        "the graph of deleted instance kept (graph left: {}, Authorized: {authority:?}, Valid: {valid:?}); \
         ClusterRole {role} written again after the instance was gone: {rewritten}",
        left.is_some()
    );
}

fn expression_graph(name: &str, keys: usize, expression: &str) -> serde_json::Value {
    let data: serde_json::Map<String, serde_json::Value> = (0..keys)
        .map(|i| (format!("key-{i:05}"), json!("v")))
        .chain(std::iter::once(("ready".to_string(), json!("yes"))))
        .collect();
    json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph", "metadata": {"name": name},
           "spec": {"graph": {"nodes": [{"id": "gate", "resource": {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name}, "data": data},
                "readyWhen": [{"type": "Expression", "expression": expression, "timeout": 600}]}]}}})
}

/// Rights used: write ResourceGraphs in my namespace. The expression pool is shared by every
/// graph of every team: a few slots (one on a two-core machine). Expressions within the cost
/// estimate made at compile time (which assumes 100 items a collection) would run far longer
/// over a large object and hold every slot; another team's expression gates must still be
/// evaluated.
#[tokio::test]
async fn expression_gates_of_one_team_do_not_starve_another_team_s() {
    let (env, _transforms) = setup("cel-hog").await;
    let victim = support::env("cel-victim").await;
    let graphs: Api<pequod::api::ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let theirs: Api<pequod::api::ResourceGraph> = Api::namespaced(victim.client.clone(), &victim.namespace);
    let hogs: Vec<String> = (0..6).map(|i| format!("hog-{i}")).collect();
    let quadratic = "self.data.all(k, !self.data.exists(j, size(j) > 99))";
    for name in &hogs {
        graphs
            .patch(
                name,
                &kube::api::PatchParams::apply(support::TEST_MANAGER),
                &kube::api::Patch::Apply(expression_graph(name, 4000, quadratic)),
            )
            .await
            .unwrap();
    }
    // Over their real objects the hogs' expressions cost far more than the limit: refused
    // before they take a slot, or, were they admitted, overrunning.
    wait_for("the hogs' expressions refused or overrun", WAIT, || async {
        for name in &hogs {
            let rg = graphs.get(name).await.map_err(|e| e.to_string())?;
            let node = rg.status.and_then(|s| s.node_states.get("gate").cloned());
            if !node
                .and_then(|n| n.last_error)
                .is_some_and(|e| e.contains("above the limit") || e.starts_with("expression timed out"))
            {
                return Err(format!("{name} not refused yet"));
            }
        }
        Ok(())
    })
    .await;

    // Another team's graph with a cheap expression over a small object.
    theirs
        .patch(
            "cheap",
            &kube::api::PatchParams::apply(support::TEST_MANAGER),
            &kube::api::Patch::Apply(expression_graph("cheap", 1, "self.data.ready == 'yes'")),
        )
        .await
        .unwrap();
    let mut last = None;
    let started = std::time::Instant::now();
    let mut ready = false;
    while started.elapsed() < Duration::from_secs(75) {
        let rg = theirs.get("cheap").await.unwrap();
        let node = rg.status.and_then(|s| s.node_states.get("gate").cloned());
        if node.as_ref().is_some_and(|n| n.phase == pequod::api::NodePhase::Ready) {
            ready = true;
            break;
        }
        last = node.map(|n| (n.phase, n.last_error));
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    for name in &hogs {
        let _ = graphs.delete(name, &DeleteParams::default()).await;
    }
    let _ = theirs.delete("cheap", &DeleteParams::default()).await;
    victim.cleanup().await;
    env.cleanup().await;
    assert!(
        ready,
        "another team's cheap expression gate was not evaluated within 75 s while one team's graphs held the \
         evaluation slots: {last:?}"
    );
}
