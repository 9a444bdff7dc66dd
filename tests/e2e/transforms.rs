//! The Transform controller against the real apiserver: CRD generation, schema evolution,
//! ownership, RBAC, pause and deletion.
//!
//! CRDs are cluster-scoped, so every test generates its kinds in an API group of its own.

use std::time::Duration;

use k8s_openapi::api::rbac::v1::{ClusterRole, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use pequod::api::TransformPhase;
use serde_json::{Value, json};

use crate::support::modules::{note_module, put_module};
use crate::support::transforms::{
    WAIT, apply_transform, condition, delete_transform, failed, group, setup, wait_condition,
};
use crate::support::{self, wait_for};

fn crd_spec_schema(crd: &CustomResourceDefinition) -> Value {
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .unwrap();
    serde_json::to_value(schema).unwrap()["properties"]["spec"].clone()
}

#[tokio::test]
async fn embedded_transform_generates_an_established_crd_with_the_module_schema() {
    let (env, transforms) = setup("transform-embedded").await;
    let group = group(&env);
    apply_transform(
        &transforms,
        "webservice",
        json!({"cueRef": {"type": "embedded", "ref": "webservice"}, "group": group, "shortNames": ["wsx"],
               "managedResources": [{"apiGroup": "apps", "resources": ["deployments"]}, {"resources": ["services"]}]}),
    )
    .await;
    let t = support::wait_transform_ready(&transforms, "webservice").await;
    let status = t.status.clone().unwrap();
    assert_eq!(status.phase, Some(TransformPhase::Ready));
    let generated = status.generated_crd.unwrap();
    assert_eq!(generated.kind, "WebService");
    assert_eq!(generated.name, format!("webservices.{group}"));
    assert_eq!(generated.api_version, format!("{group}/v1alpha1"));
    assert!(status.resolved_cue_ref.unwrap().digest.starts_with("sha256:"));
    for type_ in [
        "CueFetched",
        "SchemaExtracted",
        "SchemaCompatible",
        "CRDGenerated",
        "RBACConfigured",
    ] {
        assert!(
            condition(&t, type_).is_some_and(|c| c.is_true()),
            "{type_}: {:?}",
            condition(&t, type_)
        );
    }
    assert_eq!(status.observed_generation, t.metadata.generation);

    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    let crd = crds.get(&generated.name).await.unwrap();
    let established = crd.status.as_ref().unwrap().conditions.as_ref().unwrap();
    assert!(
        established
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
    );
    assert_eq!(
        crd.spec.names.short_names,
        Some(vec!["ws".to_string(), "wsx".to_string()])
    );
    let spec = crd_spec_schema(&crd);
    assert_eq!(spec["properties"]["replicas"]["minimum"].as_f64(), Some(0.0));
    assert_eq!(spec["properties"]["replicas"]["maximum"].as_f64(), Some(50.0));
    assert_eq!(spec["properties"]["replicas"]["default"], json!(1));
    assert_eq!(spec["properties"]["port"]["default"], json!(80));
    assert!(
        spec["properties"]["image"]["description"]
            .as_str()
            .unwrap()
            .contains("Container image")
    );
    assert_eq!(spec["required"], json!(["image"]));

    // The apiserver enforces the schema at admission.
    let (resource, _) = support::resolve(&env.client, &generated.api_version, "WebService").await;
    let instances: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), &env.namespace, &resource);
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": generated.api_version, "kind": "WebService",
        "metadata": {"name": "too-big"}, "spec": {"image": "nginx:1.27", "replicas": 100},
    }))
    .unwrap();
    let err = instances.create(&PostParams::default(), &bad).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 422 && s.message.contains("replicas")),
        "{err}"
    );

    // RBAC for the manager: the managed resources and the served kind.
    let role = Api::<ClusterRole>::all(env.client.clone())
        .get(&format!("pequod:transform:{}.webservice", env.namespace))
        .await
        .unwrap();
    assert_eq!(role.labels()["pequod.io/aggregate-to-manager"], "true");
    let rules = role.rules.unwrap();
    assert!(
        rules
            .iter()
            .any(|r| r.api_groups == Some(vec!["apps".into()]) && r.resources == Some(vec!["deployments".into()]))
    );
    assert!(rules.iter().any(|r| r.resources == Some(vec!["webservices".into()])));
    assert_eq!(
        t.status.as_ref().unwrap().generated_rbac.as_ref().unwrap().rule_count,
        rules.len() as i32
    );

    support::wait_events(&env.client, &env.namespace, "webservice", &["CRDGenerated", "Ready"]).await;

    delete_transform(&transforms, "webservice").await;
    env.cleanup().await;
}

#[tokio::test]
async fn configmap_module_edits_roll_the_crd_forward_and_breaking_changes_are_refused() {
    let (env, transforms) = setup("transform-evolution").await;
    let group = group(&env);
    let crd_name = format!("notes.{group}");
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());

    // The module does not exist yet: Failed, with an event, until it appears.
    apply_transform(
        &transforms,
        "note",
        json!({"cueRef": {"type": "configmap", "ref": "note-module"}, "group": group}),
    )
    .await;
    let (t, message) = failed(&transforms, "note", "CueFetched", "CueFetchFailed").await;
    assert_eq!(t.status.as_ref().unwrap().phase, Some(TransformPhase::Failed));
    assert!(message.contains("not found"));
    support::wait_events(&env.client, &env.namespace, "note", &["CueFetchFailed"]).await;

    put_module(
        &env.client,
        &env.namespace,
        "note-module",
        &note_module("size?: int & <=10"),
    )
    .await;
    let t = support::wait_transform_ready(&transforms, "note").await;
    let first_digest = t.status.unwrap().resolved_cue_ref.unwrap().digest;
    assert!(
        crd_spec_schema(&crds.get(&crd_name).await.unwrap())["properties"]
            .get("color")
            .is_none()
    );

    // Additive: a new optional field reaches the CRD.
    put_module(
        &env.client,
        &env.namespace,
        "note-module",
        &note_module("size?: int & <=10\n\t// The note's color.\n\tcolor?: string"),
    )
    .await;
    let crd = wait_for("the CRD to gain spec.color", WAIT, || async {
        let crd = crds.get(&crd_name).await.map_err(|e| e.to_string())?;
        let spec = crd_spec_schema(&crd);
        if spec["properties"].get("color").is_some() {
            Ok(crd)
        } else {
            Err(spec.to_string())
        }
    })
    .await;
    assert_eq!(
        crd_spec_schema(&crd)["properties"]["color"]["description"],
        "The note's color."
    );
    wait_for("the new module digest in the status", WAIT, || async {
        let t = transforms.get("note").await.map_err(|e| e.to_string())?;
        let digest = t
            .status
            .as_ref()
            .and_then(|s| s.resolved_cue_ref.as_ref())
            .map(|r| r.digest.clone());
        match digest {
            Some(d) if d != first_digest && condition(&t, "Ready").is_some_and(|c| c.is_true()) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Breaking: a field removed and a bound tightened are refused, each named.
    put_module(
        &env.client,
        &env.namespace,
        "note-module",
        &note_module("size?: int & <=5"),
    )
    .await;
    let (t, message) = failed(&transforms, "note", "SchemaCompatible", "BreakingChange").await;
    assert!(message.contains("spec.color: field removed"), "{message}");
    assert!(message.contains("spec.size: maximum lowered from 10 to 5"), "{message}");
    assert_eq!(t.status.as_ref().unwrap().phase, Some(TransformPhase::Failed));
    let spec = crd_spec_schema(&crds.get(&crd_name).await.unwrap());
    assert!(spec["properties"].get("color").is_some(), "the CRD stays as it was");
    assert_eq!(spec["properties"]["size"]["maximum"].as_f64(), Some(10.0));
    support::wait_events(&env.client, &env.namespace, "note", &["BreakingChange"]).await;

    delete_transform(&transforms, "note").await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_module_s_invalid_readiness_expression_or_status_is_refused_when_the_transform_is_applied() {
    let (env, transforms) = setup("module-rules").await;
    let group = group(&env);
    let cases = [
        (
            "bad-gate",
            "#Metadata: readyWhen: note: \"self.data.text ==\"\n",
            "InvalidModule",
            "readyWhen.note",
        ),
        (
            "bad-status",
            "#Status: {phase?: string}\n",
            "SchemaUnsupported",
            "#Status.phase is a field Pequod writes",
        ),
    ];
    for (name, extra, reason, text) in cases {
        let source = note_module("").replace("#Metadata: {", "#Metadata: {\n\tprinterColumns: []") + extra;
        put_module(&env.client, &env.namespace, name, &source).await;
        apply_transform(
            &transforms,
            name,
            json!({"cueRef": {"type": "configmap", "ref": name}, "group": format!("{name}.{group}")}),
        )
        .await;
        let (_, message) = failed(&transforms, name, "SchemaExtracted", reason).await;
        assert!(message.contains(text), "{name}: {message}");
        support::wait_events(&env.client, &env.namespace, name, &["CueRenderFailed"]).await;
    }
    env.cleanup().await;
}

#[tokio::test]
async fn kinds_owned_elsewhere_and_builtin_kinds_are_refused() {
    let (env, transforms) = setup("transform-conflicts").await;
    let group = group(&env);
    put_module(&env.client, &env.namespace, "note-module", &note_module("")).await;
    apply_transform(
        &transforms,
        "note",
        json!({"cueRef": {"type": "configmap", "ref": "note-module"}, "group": group}),
    )
    .await;
    support::wait_transform_ready(&transforms, "note").await;

    // A second Transform generating the same kind.
    apply_transform(
        &transforms,
        "note-again",
        json!({"cueRef": {"type": "configmap", "ref": "note-module"}, "group": group}),
    )
    .await;
    let (t, message) = failed(&transforms, "note-again", "CRDGenerated", "KindConflict").await;
    assert!(
        message.contains(&format!("Transform {}/note", env.namespace)),
        "{message}"
    );
    assert_eq!(t.status.as_ref().unwrap().phase, Some(TransformPhase::Failed));

    // A CRD Pequod did not create is never taken over.
    let foreign_group = format!("foreign.{group}");
    let foreign: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("notes.{foreign_group}")},
        "spec": {"group": foreign_group, "scope": "Namespaced",
                 "names": {"kind": "Note", "plural": "notes"},
                 "versions": [{"name": "v1alpha1", "served": true, "storage": true,
                               "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]},
    }))
    .unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    crds.create(&PostParams::default(), &foreign).await.unwrap();
    apply_transform(
        &transforms,
        "note-foreign",
        json!({"cueRef": {"type": "configmap", "ref": "note-module"}, "group": foreign_group}),
    )
    .await;
    let (_, message) = failed(&transforms, "note-foreign", "CRDGenerated", "KindConflict").await;
    assert!(message.contains("not created by Pequod"));

    // Built-in kinds.
    apply_transform(
        &transforms,
        "deployment",
        json!({"cueRef": {"type": "inline", "ref": "package d\n#Metadata: kind: \"Deployment\"\n#Input: {image: string}\n#Render: {input: _, output: nodes: []}\n"}, "group": group}),
    )
    .await;
    let (_, message) = failed(&transforms, "deployment", "CRDGenerated", "ReservedName").await;
    assert!(message.contains("built-in kind Deployment"));

    // A module whose schema does not evaluate: Failed with cue's message and an event.
    apply_transform(
        &transforms,
        "broken",
        json!({"cueRef": {"type": "inline", "ref": "package b\n#Input: {size: int & string}\n#Render: {input: _, output: nodes: []}\n"}, "group": group}),
    )
    .await;
    let (t, message) = failed(&transforms, "broken", "SchemaExtracted", "InvalidModule").await;
    assert_eq!(t.status.as_ref().unwrap().phase, Some(TransformPhase::Failed));
    assert!(message.contains("size"), "{:?}", condition(&t, "SchemaExtracted"));
    support::wait_events(&env.client, &env.namespace, "broken", &["CueRenderFailed"]).await;

    for name in ["note-again", "note-foreign", "deployment", "broken", "note"] {
        delete_transform(&transforms, name).await;
    }
    // Deleting a refused Transform leaves the CRD it did not own alone.
    assert!(crds.get_opt(&format!("notes.{foreign_group}")).await.unwrap().is_some());
    crds.delete(&format!("notes.{foreign_group}"), &DeleteParams::default())
        .await
        .unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn deletion_waits_for_instances_then_removes_the_crd_and_rbac() {
    let (env, transforms) = setup("transform-deletion").await;
    let group = group(&env);
    put_module(&env.client, &env.namespace, "note-module", &note_module("")).await;
    apply_transform(
        &transforms,
        "note",
        json!({"cueRef": {"type": "configmap", "ref": "note-module"}, "group": group, "rbacScope": "Namespace",
               "managedResources": [{"resources": ["configmaps"]}]}),
    )
    .await;
    support::wait_transform_ready(&transforms, "note").await;
    let roles: Api<Role> = Api::namespaced(env.client.clone(), &env.namespace);
    let bindings: Api<RoleBinding> = Api::namespaced(env.client.clone(), &env.namespace);
    let role = roles.get("pequod-transform-note").await.unwrap();
    assert!(
        role.rules
            .unwrap()
            .iter()
            .any(|r| r.resources == Some(vec!["configmaps".into()]))
    );
    let binding = bindings.get("pequod-transform-note").await.unwrap();
    assert_eq!(binding.subjects.unwrap()[0].name, "pequod-controller-manager");
    assert!(
        Api::<ClusterRole>::all(env.client.clone())
            .get_opt(&format!("pequod:transform:{}.note", env.namespace))
            .await
            .unwrap()
            .is_none()
    );

    let api_version = format!("{group}/v1alpha1");
    support::apply_yaml(
        &env.client,
        &env.namespace,
        &format!("apiVersion: {api_version}\nkind: Note\nmetadata:\n  name: shopping\nspec:\n  text: milk\n"),
    )
    .await;

    transforms.delete("note", &DeleteParams::default()).await.unwrap();
    let (_, message) = failed(&transforms, "note", "Ready", "WaitingForInstances").await;
    assert!(message.contains("1 instance(s) of Note"));
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    assert!(crds.get_opt(&format!("notes.{group}")).await.unwrap().is_some());

    let notes = support::dynamic_api(&env.client, &api_version, "Note", &env.namespace).await;
    notes.delete("shopping", &DeleteParams::default()).await.unwrap();
    wait_for("the Transform, its CRD and its RBAC to be gone", WAIT, || async {
        let transform = transforms.get_opt("note").await.map_err(|e| e.to_string())?;
        let crd = crds
            .get_opt(&format!("notes.{group}"))
            .await
            .map_err(|e| e.to_string())?;
        let role = roles
            .get_opt("pequod-transform-note")
            .await
            .map_err(|e| e.to_string())?;
        match (transform, crd, role) {
            (None, None, None) => Ok(()),
            other => Err(format!(
                "{:?}",
                (other.0.is_some(), other.1.is_some(), other.2.is_some())
            )),
        }
    })
    .await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_paused_transform_is_not_reconciled_until_resumed() {
    let (env, transforms) = setup("transform-pause").await;
    let group = group(&env);
    put_module(&env.client, &env.namespace, "note-module", &note_module("")).await;
    apply_transform(
        &transforms,
        "note",
        json!({"cueRef": {"type": "configmap", "ref": "note-module"}, "group": group}),
    )
    .await;
    support::wait_transform_ready(&transforms, "note").await;
    let pause = |value: &str| json!({"metadata": {"annotations": {"pequod.io/paused": value}}});
    transforms
        .patch("note", &PatchParams::default(), &Patch::Merge(pause("true")))
        .await
        .unwrap();
    wait_condition(&transforms, "note", "Paused", true, "Paused").await;

    // A spec change while paused is not acted on.
    apply_transform(
        &transforms,
        "note",
        json!({"cueRef": {"type": "configmap", "ref": "note-module"}, "group": group, "shortNames": ["nt"]}),
    )
    .await;
    // The paused reconcile stamps the new generation on `Paused`: it has seen the change.
    wait_for("the paused Transform to observe the change", WAIT, || async {
        let t = transforms.get("note").await.map_err(|e| e.to_string())?;
        match condition(&t, "Paused") {
            Some(c) if c.is_true() && c.observed_generation == t.metadata.generation => Ok(()),
            other => Err(format!("{other:?}; generation {:?}", t.metadata.generation)),
        }
    })
    .await;
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    let crd = crds.get(&format!("notes.{group}")).await.unwrap();
    assert_eq!(crd.spec.names.short_names, None);

    transforms
        .patch("note", &PatchParams::default(), &Patch::Merge(pause("false")))
        .await
        .unwrap();
    wait_condition(&transforms, "note", "Paused", false, "Resumed").await;
    wait_for("the short name to reach the CRD", WAIT, || async {
        let crd = crds.get(&format!("notes.{group}")).await.map_err(|e| e.to_string())?;
        match crd.spec.names.short_names {
            Some(s) if s == ["nt"] => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    delete_transform(&transforms, "note").await;
    env.cleanup().await;
}

#[tokio::test]
async fn alternatives_of_structs_are_enforced_by_the_apiserver_through_cel() {
    let (env, transforms) = setup("cel-alternatives").await;
    let module = "package src\n#Metadata: kind: \"Source\"\n// Where the code comes from.\n#Input: {from: {image: string} | {repo: string, tag: string}}\n#Render: {input: _, output: nodes: [{id: \"a\", object: {apiVersion: \"v1\", kind: \"ConfigMap\", metadata: name: input.metadata.name}}]}\n";
    apply_transform(
        &transforms,
        "source",
        json!({"cueRef": {"type": "inline", "ref": module}, "group": group(&env)}),
    )
    .await;
    support::wait_transform_ready(&transforms, "source").await;
    let api_version = format!("{}/v1alpha1", group(&env));
    let (resource, _) = support::resolve(&env.client, &api_version, "Source").await;
    let sources: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), &env.namespace, &resource);
    let instance = |name: &str, from: Value| -> DynamicObject {
        serde_json::from_value(
            json!({"apiVersion": api_version, "kind": "Source", "metadata": {"name": name}, "spec": {"from": from}}),
        )
        .unwrap()
    };

    // Both alternatives at once, and neither: the apiserver's CEL rule refuses them.
    for (name, from) in [
        ("both", json!({"image": "nginx", "repo": "r", "tag": "t"})),
        ("neither", json!({"tag": "t"})),
    ] {
        let err = sources
            .create(&PostParams::default(), &instance(name, from))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 422 && s.message.contains("set exactly one of: image; repo and tag")),
            "{name}: {err}"
        );
    }
    for (name, from) in [
        ("image", json!({"image": "nginx"})),
        ("repo", json!({"repo": "r", "tag": "t"})),
    ] {
        sources
            .create(&PostParams::default(), &instance(name, from))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for name in ["image", "repo"] {
        sources.delete(name, &DeleteParams::default()).await.unwrap();
    }
    delete_transform(&transforms, "source").await;
    env.cleanup().await;
}

#[tokio::test]
async fn rbac_objects_a_transform_did_not_make_are_neither_overwritten_nor_deleted() {
    let (env, transforms) = setup("rbac-foreign").await;
    // Someone else's ClusterRole under the name the Transform's would have.
    let name = pequod::rbac::cluster_role_name(&env.namespace, "webservice");
    let roles: Api<ClusterRole> = Api::all(env.client.clone());
    let foreign: ClusterRole = serde_json::from_value(json!({"metadata": {"name": name},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]}))
    .unwrap();
    let created = roles.create(&PostParams::default(), &foreign).await.unwrap();

    apply_transform(
        &transforms,
        "webservice",
        json!({"cueRef": {"type": "embedded", "ref": "webservice"}, "group": group(&env)}),
    )
    .await;
    let (_, message) = failed(&transforms, "webservice", "RBACConfigured", "RBACConflict").await;
    assert!(
        message.contains(&format!("ClusterRole {name} exists and was not made by this Transform")),
        "{message}"
    );
    support::wait_events(&env.client, &env.namespace, "webservice", &["RBACConflict"]).await;
    let live = roles.get(&name).await.unwrap();
    assert_eq!(
        live.metadata.resource_version, created.metadata.resource_version,
        "not written"
    );

    delete_transform(&transforms, "webservice").await;
    let live = roles.get(&name).await.expect("not deleted with the Transform");
    assert_eq!(live.uid(), created.uid());
    roles.delete(&name, &DeleteParams::default()).await.unwrap();
    env.cleanup().await;
}

/// The reconciles of Transform `name` in `namespace` so far: the distinct reconcile ids on
/// the shared operator's log lines.
async fn transform_reconciles(client: &Client, namespace: &str, name: &str) -> usize {
    let log = std::fs::read_to_string(&support::operator(client).await.log).unwrap_or_default();
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["controller"] == "transform" && l["name"] == name && l["namespace"] == namespace)
        .filter_map(|l| l["reconcile_id"].as_str().map(String::from))
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// Waits until Transform `name` has not been reconciled for `quiet`; returns its reconciles.
async fn settled_reconciles(client: &Client, namespace: &str, name: &str, quiet: Duration) -> usize {
    let mut last = transform_reconciles(client, namespace, name).await;
    for _ in 0..40 {
        tokio::time::sleep(quiet).await;
        let now = transform_reconciles(client, namespace, name).await;
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("Transform {name} kept being reconciled: {last} reconciles");
}

#[tokio::test]
async fn a_status_only_change_does_not_run_the_transform_pipeline_again() {
    let (env, transforms) = setup("transform-status-only").await;
    apply_transform(
        &transforms,
        "web",
        json!({"cueRef": {"type": "embedded", "ref": "webservice"}, "group": group(&env)}),
    )
    .await;
    support::wait_transform_ready(&transforms, "web").await;
    let quiet = Duration::from_secs(3);
    let before = settled_reconciles(&env.client, &env.namespace, "web", quiet).await;
    assert!(before > 0, "the Transform's reconciles are on the log");

    // Someone else writes the status, as the rollout driver does with a field manager of its
    // own: the Transform's spec, labels and annotations are as they were.
    let status = json!({
        "apiVersion": "platform.platform.example.com/v1alpha1",
        "kind": "Transform",
        "status": {"conditions": [{"type": "Probed", "status": "True", "reason": "Probed", "message": "",
                                   "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
    });
    transforms
        .patch_status(
            "web",
            &PatchParams::apply("status-writer").force(),
            &Patch::Apply(status),
        )
        .await
        .unwrap();
    // A dropped event leaves nothing to observe, and a later change cannot stand in for one:
    // the controller merges requests queued for the same object. A reconcile the patch
    // triggered would start within milliseconds; twice the quiet period is the measure.
    tokio::time::sleep(2 * quiet).await;
    assert_eq!(
        transform_reconciles(&env.client, &env.namespace, "web").await,
        before,
        "a status-only change reconciled the Transform"
    );

    // A label is a change the Transform reacts to (and shows the count would have moved).
    let label = json!({"metadata": {"labels": {"team": "web"}}});
    transforms
        .patch("web", &PatchParams::default(), &Patch::Merge(label))
        .await
        .unwrap();
    wait_for("a reconcile of the labelled Transform", WAIT, || async {
        match transform_reconciles(&env.client, &env.namespace, "web").await {
            n if n > before => Ok(()),
            n => Err(format!("{n} reconciles")),
        }
    })
    .await;
    delete_transform(&transforms, "web").await;
    env.cleanup().await;
}
