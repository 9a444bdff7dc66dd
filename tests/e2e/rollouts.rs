//! Module rollouts against the real apiserver: the plan on the Transform, staged batches held
//! by a health gate, a rollout that stops and is rolled back, the destructive-change approval,
//! pinning, and a rollback from the cache while the registry is down.

use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim};
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::{Api, ResourceExt};
use pequod::api::{RolloutPhase, RolloutStatus, Transform};
use serde_json::{Value, json};

use crate::support::instances::{apply_instance, instance_condition, wait_instance};
use crate::support::modules::put_module;
use crate::support::transforms::{WAIT, apply_transform, condition, delete_transform, failed, group, setup};
use crate::support::{self, TEST_MANAGER, TestEnv, wait_for};

const NAMES: [&str; 3] = ["alpha", "beta", "gamma"];

/// A Note module. `version` goes into each note's data; `extra` adds a second ConfigMap per
/// note; `gated` makes a note Ready only once someone sets its `data.ok` to "yes"; `claim`
/// adds a PersistentVolumeClaim per note.
fn module(version: &str, extra: bool, gated: bool, claim: bool) -> String {
    let (ready, gate_field) = if gated {
        (
            r#"[{type: "FieldMatch", path: "data.ok", value: "yes"}]"#,
            r#", gated: "true""#,
        )
    } else {
        (r#"[{type: "Exists"}]"#, "")
    };
    let mut nodes = vec![format!(
        r#"{{
		id: "note"
		object: {{apiVersion: "v1", kind: "ConfigMap", metadata: name: input.metadata.name, data: {{text: input.spec.text, version: "{version}"{gate_field}}}}}
		readyWhen: {ready}
	}}"#
    )];
    if extra {
        nodes.push(
            r#"{
		id: "extra"
		object: {apiVersion: "v1", kind: "ConfigMap", metadata: name: "\(input.metadata.name)-extra", data: text: input.spec.text}
	}"#
            .to_string(),
        );
    }
    if claim {
        nodes.push(
            r#"{
		id: "data"
		object: {apiVersion: "v1", kind: "PersistentVolumeClaim", metadata: name: "\(input.metadata.name)-data",
			spec: {accessModes: ["ReadWriteOnce"], resources: requests: storage: "1Gi"}}
		readyWhen: [{type: "Exists"}]
	}"#
            .to_string(),
        );
    }
    format!(
        r#"package note

#Metadata: kind: "Note"

#Input: text: string

#Render: {{
	input: {{metadata: {{name: string, namespace: string, ...}}, spec: #Input}}
	output: nodes: [{}]
}}
"#,
        nodes.join(", ")
    )
}

fn rollout(t: &Transform) -> Option<&RolloutStatus> {
    t.status.as_ref()?.rollout.as_ref()
}

/// Waits until the Transform's rollout satisfies `check`; returns its status.
async fn wait_rollout(
    transforms: &Api<Transform>,
    name: &str,
    what: &str,
    check: impl Fn(&RolloutStatus) -> bool,
) -> RolloutStatus {
    wait_for(&format!("Transform {name}: rollout {what}"), WAIT, || async {
        let t = transforms.get(name).await.map_err(|e| e.to_string())?;
        match rollout(&t) {
            Some(r) if check(r) => Ok(r.clone()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// The module version of the instance's graph.
async fn digest_of(notes: &Api<DynamicObject>, name: &str) -> Option<String> {
    let obj = notes.get(name).await.unwrap();
    obj.data.pointer("/status/moduleDigest")?.as_str().map(String::from)
}

async fn wait_digest(notes: &Api<DynamicObject>, name: &str, digest: &str) -> DynamicObject {
    wait_for(&format!("{name} on module {digest}"), WAIT, || async {
        let obj = notes.get(name).await.map_err(|e| e.to_string())?;
        match obj.data.pointer("/status/moduleDigest").and_then(Value::as_str) {
            Some(d) if d == digest => Ok(obj),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// Serves the Note kind from the ConfigMap module `source` with `rollout`, with three Ready
/// notes; returns the notes' API and the rollout's first (complete) status.
async fn serve_notes(
    env: &TestEnv,
    transforms: &Api<Transform>,
    source: &str,
    rollout: Value,
) -> (Api<DynamicObject>, String) {
    put_module(&env.client, &env.namespace, "note-module", source).await;
    apply_transform(
        transforms,
        "note",
        json!({"cueRef": {"type": "configmap", "ref": "note-module"}, "group": group(env), "rollout": rollout}),
    )
    .await;
    support::wait_transform_ready(transforms, "note").await;
    let api_version = format!("{}/v1alpha1", group(env));
    let notes = support::dynamic_api(&env.client, &api_version, "Note", &env.namespace).await;
    for name in NAMES {
        apply_instance(&notes, &api_version, "Note", name, json!({"text": name})).await;
    }
    for name in NAMES {
        wait_instance(&notes, name, "Ready", "True", "Ready").await;
    }
    let first = wait_rollout(transforms, "note", "complete", |r| {
        r.phase == Some(RolloutPhase::Complete) && r.updated == 3
    })
    .await;
    (notes, first.target_digest)
}

/// Sets `data.ok: "yes"` on a note's ConfigMap, as another manager: what its gate waits for.
async fn approve_note(configmaps: &Api<ConfigMap>, name: &str) {
    let patch = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"ok": "yes"}});
    configmaps
        .patch(name, &PatchParams::apply(TEST_MANAGER), &Patch::Apply(patch))
        .await
        .unwrap();
}

async fn version_of(configmaps: &Api<ConfigMap>, name: &str) -> Option<String> {
    configmaps
        .get(name)
        .await
        .unwrap()
        .data
        .unwrap_or_default()
        .get("version")
        .cloned()
}

async fn delete_all(env: &TestEnv, notes: &Api<DynamicObject>, transforms: &Api<Transform>) {
    for name in NAMES {
        support::delete_and_wait_gone(notes, name, WAIT).await;
    }
    delete_transform(transforms, "note").await;
    let _ = env;
}

#[tokio::test]
async fn a_staged_rollout_plans_then_moves_one_instance_at_a_time_once_the_previous_is_ready() {
    let (env, transforms) = setup("rollout-staged").await;
    let policy = |paused: bool| {
        json!({"strategy": "Staged", "batchSize": 1, "healthTimeoutSeconds": 600, "paused": paused,
               "canarySelector": {"matchLabels": {"tier": "canary"}}})
    };
    let (notes, v1) = serve_notes(&env, &transforms, &module("1", true, false, false), policy(false)).await;
    let configmaps: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    let canary = json!({"metadata": {"labels": {"tier": "canary"}}});
    notes
        .patch("gamma", &PatchParams::default(), &Patch::Merge(canary))
        .await
        .unwrap();
    let spec = |paused: bool| json!({"cueRef": {"type": "configmap", "ref": "note-module"}, "group": group(&env), "rollout": policy(paused)});

    // v2 removes the extra ConfigMap and waits for each note to be approved.
    put_module(
        &env.client,
        &env.namespace,
        "note-module",
        &module("2", false, true, false),
    )
    .await;
    let started = wait_rollout(&transforms, "note", "to v2", |r| {
        r.target_digest != v1 && r.batch == Some(1)
    })
    .await;
    let v2 = started.target_digest.clone();
    let plan = started.plan.clone().expect("a plan");
    assert_eq!(plan.digest, v2);
    assert_eq!(plan.schema.as_deref(), Some("unchanged"), "#Input is the same");
    assert_eq!(
        (
            plan.instances,
            plan.affected,
            plan.updated,
            plan.deleted,
            plan.created,
            plan.destructive
        ),
        (3, 3, 3, 3, 0, 0),
        "{plan:?}"
    );
    assert!(
        plan.lines.contains(&format!(
            "{}/beta: 1 updated (ConfigMap/beta), 1 deleted (ConfigMap/beta-extra)",
            env.namespace
        )),
        "{:?}",
        plan.lines
    );
    assert_eq!(started.current_digest.as_deref(), Some(v1.as_str()));

    // Batch 1 is the canary gamma alone; it waits for its gate, and nothing else moves.
    wait_digest(&notes, "gamma", &v2).await;
    wait_for("gamma's extra ConfigMap to be pruned", WAIT, || async {
        match configmaps.get_opt("gamma-extra").await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    for name in ["alpha", "beta"] {
        assert_eq!(
            digest_of(&notes, name).await.as_deref(),
            Some(v1.as_str()),
            "{name} waits"
        );
        assert_eq!(
            version_of(&configmaps, name).await.as_deref(),
            Some("1"),
            "{name} untouched"
        );
        assert!(configmaps.get_opt(&format!("{name}-extra")).await.unwrap().is_some());
    }
    let beta = notes.get("beta").await.unwrap();
    let pending = beta
        .data
        .pointer("/status/pendingChange")
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert!(pending.contains("1 deleted (ConfigMap/beta-extra)"), "{pending}");
    let progressing = rollout(&transforms.get("note").await.unwrap()).cloned().unwrap();
    assert_eq!(
        (
            progressing.phase,
            progressing.updated,
            progressing.pending,
            progressing.progress.as_deref()
        ),
        (Some(RolloutPhase::Progressing), 1, 2, Some("1/3"))
    );

    // Paused, a Ready batch starts no other; resumed, the next goes.
    apply_transform(&transforms, "note", spec(true)).await;
    approve_note(&configmaps, "gamma").await;
    wait_instance(&notes, "gamma", "Ready", "True", "Ready").await;
    wait_rollout(&transforms, "note", "paused", |r| r.phase == Some(RolloutPhase::Paused)).await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(digest_of(&notes, "alpha").await.as_deref(), Some(v1.as_str()), "paused");
    apply_transform(&transforms, "note", spec(false)).await;

    // Each approval lets the next batch go.
    wait_digest(&notes, "alpha", &v2).await;
    for (ready, next) in [("alpha", Some("beta")), ("beta", None)] {
        approve_note(&configmaps, ready).await;
        wait_instance(&notes, ready, "Ready", "True", "Ready").await;
        if let Some(next) = next {
            wait_digest(&notes, next, &v2).await;
        } else {
            assert_eq!(digest_of(&notes, "beta").await.as_deref(), Some(v2.as_str()));
        }
    }
    let done = wait_rollout(&transforms, "note", "complete", |r| {
        r.phase == Some(RolloutPhase::Complete)
    })
    .await;
    assert_eq!(
        (done.updated, done.failed, done.current_digest.as_deref()),
        (3, 0, Some(v2.as_str()))
    );
    let t = transforms.get("note").await.unwrap();
    let rolled_out = condition(&t, "RolledOut").unwrap();
    assert_eq!(
        (rolled_out.is_true(), rolled_out.reason.as_str()),
        (true, "RolloutComplete")
    );
    support::wait_events(
        &env.client,
        &env.namespace,
        "note",
        &["RolloutStarted", "BatchStarted", "RolloutPaused", "RolloutComplete"],
    )
    .await;
    let series = format!(
        "pequod_rollout_phase{{namespace=\"{}\",phase=\"Complete\",transform=\"note\"}}",
        env.namespace
    );
    assert_eq!(support::metric(&env, &series).await, 1.0);
    let batches = format!(
        "pequod_rollout_batches_total{{namespace=\"{}\",transform=\"note\"}}",
        env.namespace
    );
    assert_eq!(support::metric(&env, &batches).await, 3.0);

    delete_all(&env, &notes, &transforms).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_batch_that_fails_its_health_gate_blocks_the_rollout_and_a_rollback_goes_back_in_stages() {
    let (env, transforms) = setup("rollout-blocked").await;
    let staged = json!({"strategy": "Staged", "batchSize": 1, "healthTimeoutSeconds": 5});
    let v1_source = module("1", true, false, false);
    let (notes, v1) = serve_notes(&env, &transforms, &v1_source, staged).await;
    let configmaps: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);

    // v2 keeps the version: what it adds (the gate's field) must go again on the way back,
    // although the rest of the object already is as v1 has it.
    let v2_source = module("1", false, true, false);
    put_module(&env.client, &env.namespace, "note-module", &v2_source).await;
    let blocked = wait_rollout(&transforms, "note", "blocked", |r| {
        r.phase == Some(RolloutPhase::Blocked)
    })
    .await;
    let v2 = blocked.target_digest.clone();
    assert_ne!(v2, v1);
    assert_eq!(
        (blocked.updated, blocked.failed, blocked.pending),
        (1, 1, 2),
        "{blocked:?}"
    );
    assert!(
        blocked.message.as_deref().unwrap_or_default().contains("/alpha"),
        "{blocked:?}"
    );
    let t = transforms.get("note").await.unwrap();
    let rolled_out = condition(&t, "RolledOut").unwrap();
    assert_eq!(rolled_out.reason, "HealthGateFailed");
    support::wait_events(&env.client, &env.namespace, "note", &["HealthGateFailed"]).await;

    // Nothing the rollout did not reach moved.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    for name in ["beta", "gamma"] {
        assert_eq!(digest_of(&notes, name).await.as_deref(), Some(v1.as_str()), "{name}");
        assert_eq!(version_of(&configmaps, name).await.as_deref(), Some("1"), "{name}");
        assert!(
            configmaps.get_opt(&format!("{name}-extra")).await.unwrap().is_some(),
            "{name}"
        );
    }

    // Rolling back is pointing at v1 again: alpha goes back, through a plan and a batch.
    put_module(&env.client, &env.namespace, "note-module", &v1_source).await;
    let back = wait_rollout(&transforms, "note", "back to v1", |r| {
        r.target_digest == v1 && r.phase == Some(RolloutPhase::Complete)
    })
    .await;
    assert_eq!(back.updated, 3);
    let plan = back.plan.unwrap();
    assert_eq!(
        (plan.affected, plan.created, plan.updated),
        (1, 1, 1),
        "only alpha changes: {plan:?}"
    );
    wait_digest(&notes, "alpha", &v1).await;
    // What v2 added is gone again, not only what it changed.
    wait_for("alpha's ConfigMap as v1 has it", WAIT, || async {
        let data = configmaps
            .get("alpha")
            .await
            .map_err(|e| e.to_string())?
            .data
            .unwrap_or_default();
        match (data.get("version").map(String::as_str), data.contains_key("gated")) {
            (Some("1"), false) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(configmaps.get_opt("alpha-extra").await.unwrap().is_some());

    delete_all(&env, &notes, &transforms).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_change_that_prunes_a_persistent_volume_claim_waits_for_approval() {
    let (env, transforms) = setup("rollout-approval").await;
    let (notes, v1) = serve_notes(&env, &transforms, &module("1", false, false, true), json!({})).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(env.client.clone(), &env.namespace);
    assert!(claims.get_opt("alpha-data").await.unwrap().is_some());

    put_module(
        &env.client,
        &env.namespace,
        "note-module",
        &module("2", false, false, false),
    )
    .await;
    let blocked = wait_rollout(&transforms, "note", "awaiting approval", |r| {
        r.target_digest != v1 && r.phase == Some(RolloutPhase::Blocked)
    })
    .await;
    let v2 = blocked.target_digest.clone();
    let plan = blocked.plan.clone().unwrap();
    assert_eq!(plan.destructive, 3);
    assert!(
        plan.destructive_changes.contains(&format!(
            "{}/alpha: delete PersistentVolumeClaim/alpha-data",
            env.namespace
        )),
        "{plan:?}"
    );
    let message = blocked.message.unwrap_or_default();
    assert!(
        message.contains(&format!("pequod.io/approve-destructive-change={v2}")),
        "{message}"
    );
    support::wait_events(&env.client, &env.namespace, "note", &["ApprovalRequired"]).await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    for name in NAMES {
        assert_eq!(digest_of(&notes, name).await.as_deref(), Some(v1.as_str()), "{name}");
        let claim = claims.get(&format!("{name}-data")).await.unwrap();
        assert!(claim.metadata.deletion_timestamp.is_none(), "{name}'s claim is kept");
    }

    // An approval of another version does nothing; one naming v2 lets it go.
    let annotate = |value: &str| json!({"metadata": {"annotations": {"pequod.io/approve-destructive-change": value}}});
    transforms
        .patch("note", &PatchParams::default(), &Patch::Merge(annotate("sha256:0000")))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(digest_of(&notes, "alpha").await.as_deref(), Some(v1.as_str()));
    transforms
        .patch("note", &PatchParams::default(), &Patch::Merge(annotate(&v2)))
        .await
        .unwrap();
    wait_rollout(&transforms, "note", "complete", |r| {
        r.target_digest == v2 && r.phase == Some(RolloutPhase::Complete)
    })
    .await;
    for name in NAMES {
        wait_digest(&notes, name, &v2).await;
        wait_for(&format!("{name}'s claim to be pruned"), WAIT, || async {
            match claims.get_opt(&format!("{name}-data")).await {
                Ok(None) => Ok(()),
                Ok(Some(c)) if c.metadata.deletion_timestamp.is_some() => Ok(()),
                other => Err(format!("{:?}", other.map(|c| c.map(|c| c.name_any())))),
            }
        })
        .await;
    }

    delete_all(&env, &notes, &transforms).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_pinned_instance_stays_and_a_rollback_comes_from_the_cache_while_the_registry_is_down() {
    use pequod::source::credentials::RegistryCredentials;
    let (env, transforms) = setup("rollout-pin").await;
    let mut registry = support::remote::outage_registry().registry.lock().await;
    let repository = format!("{}/note", env.namespace);
    let anonymous = RegistryCredentials::Anonymous;
    let d1 = support::remote::publish(
        &registry.addr,
        &repository,
        "v1",
        &module("1", false, false, false),
        &anonymous,
    )
    .await;
    let d2 = support::remote::publish(
        &registry.addr,
        &repository,
        "v2",
        &module("2", false, false, false),
        &anonymous,
    )
    .await;
    let address = registry.addr.clone();
    let at = |digest: &str| json!({"cueRef": {"type": "oci", "ref": format!("{address}/{repository}@{digest}")}, "group": group(&env)});
    apply_transform(&transforms, "note", at(&d1)).await;
    support::wait_transform_ready(&transforms, "note").await;
    let api_version = format!("{}/v1alpha1", group(&env));
    let notes = support::dynamic_api(&env.client, &api_version, "Note", &env.namespace).await;
    for name in ["alpha", "beta"] {
        apply_instance(&notes, &api_version, "Note", name, json!({"text": name})).await;
        wait_instance(&notes, name, "Ready", "True", "Ready").await;
    }
    let m1 = digest_of(&notes, "beta").await.unwrap();
    let pin = json!({"metadata": {"annotations": {"pequod.io/pinned-module-digest": m1}}});
    notes
        .patch("beta", &PatchParams::default(), &Patch::Merge(pin))
        .await
        .unwrap();
    wait_for("beta shows its pin", WAIT, || async {
        let obj = notes.get("beta").await.map_err(|e| e.to_string())?;
        match obj.data.pointer("/status/pinnedModuleDigest").and_then(Value::as_str) {
            Some(d) if d == m1 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // v2 reaches alpha; beta stays on its pin.
    apply_transform(&transforms, "note", at(&d2)).await;
    let moved = wait_rollout(&transforms, "note", "on v2", |r| {
        r.target_digest != m1 && r.phase == Some(RolloutPhase::Complete)
    })
    .await;
    assert_eq!(
        (moved.updated, moved.pinned, moved.progress.as_deref()),
        (1, 1, Some("1/1"))
    );
    let m2 = moved.target_digest.clone();
    wait_digest(&notes, "alpha", &m2).await;
    let configmaps: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    assert_eq!(version_of(&configmaps, "alpha").await.as_deref(), Some("2"));
    assert_eq!(digest_of(&notes, "beta").await.as_deref(), Some(m1.as_str()));
    assert_eq!(version_of(&configmaps, "beta").await.as_deref(), Some("1"));

    // With the registry down, v1 comes from the cache: alpha goes back.
    registry.stop();
    apply_transform(&transforms, "note", at(&d1)).await;
    wait_rollout(&transforms, "note", "back on v1", |r| {
        r.target_digest == m1 && r.phase == Some(RolloutPhase::Complete)
    })
    .await;
    wait_digest(&notes, "alpha", &m1).await;
    wait_for("alpha's ConfigMap back at version 1", WAIT, || async {
        match version_of(&configmaps, "alpha").await.as_deref() {
            Some("1") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let t = support::wait_transform_ready(&transforms, "note").await;
    let fetched = condition(&t, "CueFetched").unwrap();
    assert!(fetched.is_true(), "{fetched:?}");

    // A pin that is no digest names nothing: the instance says so and keeps its graph.
    let bad = json!({"metadata": {"annotations": {"pequod.io/pinned-module-digest": "../../etc"}}});
    notes
        .patch("alpha", &PatchParams::default(), &Patch::Merge(bad))
        .await
        .unwrap();
    let alpha = wait_instance(&notes, "alpha", "Rendered", "False", "ModuleUnavailable").await;
    let (_, _, message) = instance_condition(&alpha, "Rendered").unwrap();
    assert!(message.contains("is not a module digest"), "{message}");
    assert_eq!(alpha.data.pointer("/status/pinnedModuleDigest"), None);
    assert_eq!(version_of(&configmaps, "alpha").await.as_deref(), Some("1"));

    for name in ["alpha", "beta"] {
        support::delete_and_wait_gone(&notes, name, WAIT).await;
    }
    delete_transform(&transforms, "note").await;
    registry.resume();
    env.cleanup().await;
}

#[tokio::test]
async fn pequod_plan_reports_what_the_apiserver_or_the_graph_would_refuse() {
    let (env, transforms) = setup("plan-immutable").await;
    // An immutable ConfigMap: its data cannot change in place, which only the apiserver knows.
    let immutable = |version: &str| module(version, false, false, false).replace("data: {", "immutable: true, data: {");
    put_module(&env.client, &env.namespace, "note-module", &immutable("1")).await;
    apply_transform(
        &transforms,
        "note",
        json!({"cueRef": {"type": "configmap", "ref": "note-module"}, "group": group(&env)}),
    )
    .await;
    support::wait_transform_ready(&transforms, "note").await;
    let api_version = format!("{}/v1alpha1", group(&env));
    let notes = support::dynamic_api(&env.client, &api_version, "Note", &env.namespace).await;
    apply_instance(&notes, &api_version, "Note", "alpha", json!({"text": "alpha"})).await;
    wait_instance(&notes, "alpha", "Ready", "True", "Ready").await;

    // The candidate also adds a ConfigMap whose name someone else's ConfigMap holds.
    let configmaps: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    let taken = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "alpha-taken"}, "data": {"owner": "another team"}});
    configmaps
        .patch("alpha-taken", &PatchParams::apply("another-team"), &Patch::Apply(taken))
        .await
        .unwrap();
    let candidate = immutable("2").replace(
        "\t}]\n}",
        "\t}, {\n\t\tid: \"taken\"\n\t\tobject: {apiVersion: \"v1\", kind: \"ConfigMap\", metadata: name: \"\\(input.metadata.name)-taken\"}\n\t}]\n}",
    );
    assert!(candidate.contains("-taken"), "{candidate}");
    let plan = support::plan_json(&env, "note", "note.cue", &candidate);
    let changes = &plan["instances"][0]["changes"];
    assert_eq!(
        changes[0],
        json!({"change": "replace", "object": {"kind": "ConfigMap", "name": "alpha"},
               "why": "the apiserver refuses to change data.version in place"}),
        "{plan}"
    );
    assert_eq!(changes[1]["change"], "refused", "{plan}");
    assert_eq!(
        changes[1]["object"],
        json!({"kind": "ConfigMap", "name": "alpha-taken"})
    );
    let why = changes[1]["why"].as_str().unwrap();
    assert!(
        why.contains("already exists and was not made by this graph") && why.contains("another-team"),
        "{why}"
    );
    assert!(!why.contains("another team"), "no value of the object is told: {why}");
    assert_eq!(
        (
            plan["summary"]["replaced"].as_i64(),
            plan["summary"]["refused"].as_i64()
        ),
        (Some(1), Some(1))
    );

    // The operator plans the same when the module changes.
    put_module(&env.client, &env.namespace, "note-module", &candidate).await;
    let planned = wait_rollout(&transforms, "note", "the candidate planned", |r| {
        r.plan
            .as_ref()
            .is_some_and(|p| p.digest == plan["module"].as_str().unwrap_or_default())
    })
    .await
    .plan
    .unwrap();
    assert_eq!((planned.replaced, planned.refused), (1, 1), "{planned:?}");

    support::delete_and_wait_gone(&notes, "alpha", WAIT).await;
    delete_transform(&transforms, "note").await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_invalid_rollout_policy_fails_the_transform_with_a_reason_until_fixed() {
    let (env, transforms) = setup("rollout-invalid").await;
    put_module(
        &env.client,
        &env.namespace,
        "note-module",
        &module("1", false, false, false),
    )
    .await;
    let spec = |batch: Value| {
        json!({"cueRef": {"type": "configmap", "ref": "note-module"}, "group": group(&env),
               "rollout": {"strategy": "Staged", "batchSize": batch}})
    };
    apply_transform(&transforms, "note", spec(json!("0%"))).await;
    let (_, message) = failed(&transforms, "note", "Ready", "InvalidRollout").await;
    assert!(message.contains("batchSize \"0%\""), "{message}");
    support::wait_events(&env.client, &env.namespace, "note", &["InvalidRollout"]).await;
    apply_transform(&transforms, "note", spec(json!("50%"))).await;
    support::wait_transform_ready(&transforms, "note").await;
    delete_transform(&transforms, "note").await;
    env.cleanup().await;
}
