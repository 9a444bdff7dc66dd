//! External references on the real apiserver: `Read` nodes read objects Pequod does not
//! manage (a platform ConfigMap in another namespace), wait for them, follow their changes
//! through watches, and never write, list in the inventory or delete them.

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use pequod::api::{NodePhase, ResourceGraph};
use serde_json::{Value, json};

use crate::support::instances::{apply_instance, instance_condition};
use crate::support::transforms::{WAIT, apply_transform, delete_transform, group, setup};
use crate::support::{self, TEST_MANAGER, TestEnv, wait_for};

/// A module whose instances read ConfigMap `shared-db` of namespace `platform` and pass its
/// `endpoint` into a ConfigMap of their own.
fn reader_module(platform: &str) -> String {
    format!(
        r#"package reader
#Input: {{suffix: string | *"app"}}
#Render: {{
	input: {{metadata: {{name: string, namespace: string, ...}}, spec: #Input}}
	output: nodes: [{{
		id: "shared"
		object: {{apiVersion: "v1", kind: "ConfigMap", metadata: {{name: "shared-db", namespace: "{platform}"}}}}
		applyPolicy: mode: "Read"
	}}, {{
		id: "app"
		object: {{
			apiVersion: "v1"
			kind:       "ConfigMap"
			metadata: name: "\(input.metadata.name)-\(input.spec.suffix)"
			data: DB: "${{shared.data.endpoint}}"
		}}
	}}]
}}
"#
    )
}

async fn make_namespace(env: &TestEnv, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"pequod.io/test": "true"}},
    }))
    .unwrap();
    Api::<Namespace>::all(env.client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

async fn put_shared(platform: &Api<ConfigMap>, endpoint: &str) -> ConfigMap {
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared-db"}, "data": {"endpoint": endpoint}});
    platform
        .patch(
            "shared-db",
            &PatchParams::apply("platform-team").force(),
            &Patch::Apply(cm),
        )
        .await
        .unwrap()
}

async fn app_db(env: &TestEnv, want: &str) {
    let configs: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    wait_for(&format!("app ConfigMap with DB={want}"), WAIT, || async {
        let got = configs
            .get_opt("orders-app")
            .await
            .map_err(|e| e.to_string())?
            .and_then(|c| c.data)
            .and_then(|d| d.get("DB").cloned());
        (got.as_deref() == Some(want)).then_some(()).ok_or(format!("{got:?}"))
    })
    .await;
}

async fn shared_node(env: &TestEnv, graph: &str) -> Option<pequod::api::NodeState> {
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    graphs
        .get_opt(graph)
        .await
        .ok()??
        .status?
        .node_states
        .get("shared")
        .cloned()
}

async fn wait_shared(env: &TestEnv, graph: &str, phase: NodePhase, message: &str) -> pequod::api::NodeState {
    wait_for(&format!("node shared {phase:?} saying {message:?}"), WAIT, || async {
        match shared_node(env, graph).await {
            Some(s) if s.phase == phase && s.message.as_deref().unwrap_or_default().contains(message) => Ok(s),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

#[tokio::test]
async fn a_module_reads_a_platform_config_map_it_does_not_own_and_follows_it() {
    let (env, transforms) = setup("reads").await;
    let platform_ns = format!("{}-platform", env.namespace);
    make_namespace(&env, &platform_ns).await;
    let platform: Api<ConfigMap> = Api::namespaced(env.client.clone(), &platform_ns);
    let module = reader_module(&platform_ns);
    let spec = |reads: Value| json!({"cueRef": {"type": "inline", "ref": module}, "group": group(&env), "readNamespaces": reads});

    // Not allowed by the Transform: the graph reads nothing and says why.
    apply_transform(&transforms, "reader", spec(json!([]))).await;
    support::wait_transform_ready(&transforms, "reader").await;
    let api_version = format!("{}/v1alpha1", group(&env));
    let readers = support::dynamic_api(&env.client, &api_version, "Reader", &env.namespace).await;
    apply_instance(&readers, &api_version, "Reader", "orders", json!({})).await;
    let refused = wait_for("the instance to say the read is not allowed", WAIT, || async {
        let obj = readers.get("orders").await.map_err(|e| e.to_string())?;
        match instance_condition(&obj, "Ready") {
            Some((s, _, m)) if s == "False" && m.contains("readNamespaces") => Ok(m),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(refused.contains(&platform_ns), "{refused}");

    // Allowed; the object does not exist yet: its dependants wait, saying on what.
    apply_transform(&transforms, "reader", spec(json!([platform_ns]))).await;
    let graph = format!("reader.{}-orders", group(&env));
    wait_shared(&env, &graph, NodePhase::Pending, "waiting for ConfigMap").await;

    // Created after the instance: the watch brings the graph back, the value flows.
    let created = put_shared(&platform, "db-1:5432").await;
    app_db(&env, "db-1:5432").await;
    let state = wait_shared(&env, &graph, NodePhase::Ready, "resourceVersion").await;
    assert_eq!(state.observed_resource_version, created.resource_version());
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let status = graphs.get(&graph).await.unwrap().status.unwrap();
    let inventory: Vec<&str> = status.inventory.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(inventory, ["orders-app"], "the read object is never in the inventory");

    // Changed: the dependant is applied again with the new value.
    let changed = put_shared(&platform, "db-2:5432").await;
    app_db(&env, "db-2:5432").await;
    let state = wait_shared(&env, &graph, NodePhase::Ready, "resourceVersion").await;
    assert_eq!(state.observed_resource_version, changed.resource_version());

    // `pequod plan` shows the read, with what it found.
    let plan = support::plan_json(&env, "reader", "module.cue", &module);
    let reads = plan.pointer("/instances/0/reads").cloned().unwrap_or_default();
    assert_eq!(reads[0]["object"]["name"], "shared-db", "{plan}");
    assert!(
        reads[0]["observed"]
            .as_str()
            .unwrap_or_default()
            .starts_with("resourceVersion"),
        "{plan}"
    );

    // Deleted: the dependant keeps running with the last value; the status says what is missing.
    platform.delete("shared-db", &DeleteParams::default()).await.unwrap();
    wait_shared(&env, &graph, NodePhase::Pending, "waiting for ConfigMap").await;
    let obj = readers.get("orders").await.unwrap();
    let (ready, _, _) = instance_condition(&obj, "Ready").unwrap();
    assert_eq!(ready, "False");
    app_db(&env, "db-2:5432").await;

    // Teardown deletes what the graph made and never touches what it read.
    let kept = put_shared(&platform, "db-3:5432").await;
    app_db(&env, "db-3:5432").await;
    support::delete_and_wait_gone(&readers, "orders", WAIT).await;
    let configs: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    assert!(configs.get_opt("orders-app").await.unwrap().is_none());
    let after = platform.get("shared-db").await.unwrap();
    assert_eq!(
        after.resource_version(),
        kept.resource_version(),
        "the read object was never written"
    );
    assert!(
        after.labels().keys().all(|k| !k.starts_with("pequod.io")),
        "{:?}",
        after.labels()
    );

    delete_transform(&transforms, "reader").await;
    let _ = Api::<Namespace>::all(env.client.clone())
        .delete(&platform_ns, &DeleteParams::default())
        .await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_hand_written_graph_reads_only_what_its_service_account_may_read() {
    let env = support::env("reads-hand").await;
    support::operator(&env.client).await;
    let elsewhere = format!("{}-other", env.namespace);
    make_namespace(&env, &elsewhere).await;
    put_shared(&Api::namespaced(env.client.clone(), &elsewhere), "secret-host").await;
    let graph = json!({
        "apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph",
        "metadata": {"name": "peek"},
        "spec": {"graph": {"nodes": [
            {"id": "shared", "resource": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared-db", "namespace": elsewhere}},
             "applyPolicy": {"mode": "Read"}},
            {"id": "copy", "resource": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "copy"}, "data": {"DB": "${shared.data.endpoint}"}}},
        ]}},
    });
    let graphs: Api<DynamicObject> = support::graph_api(&env.client, &env.namespace).await;
    graphs
        .patch("peek", &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(graph))
        .await
        .unwrap();
    // The namespace's default account owns its namespace only: the read is refused by the
    // apiserver, and nothing is copied.
    let graph_name = "peek";
    wait_for("the read to be refused", WAIT, || async {
        let state = shared_node(&env, graph_name).await;
        match state {
            Some(s)
                if s.phase == NodePhase::Error && s.message.as_deref().unwrap_or_default().contains("forbidden") =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let configs: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    assert!(configs.get_opt("copy").await.unwrap().is_none());
    let rg: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let authorized = rg.get("peek").await.unwrap().status.unwrap().conditions;
    assert!(
        authorized
            .iter()
            .any(|c| c.type_ == "Authorized" && c.status == pequod::api::ConditionStatus::False),
        "{authorized:?}"
    );
    support::delete_and_wait_gone(&graphs, "peek", WAIT).await;
    let _ = Api::<Namespace>::all(env.client.clone())
        .delete(&elsewhere, &DeleteParams::default())
        .await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_object_a_graph_wrote_and_now_only_reads_is_released_not_deleted() {
    let env = support::env("reads-handoff").await;
    support::operator(&env.client).await;
    let graphs: Api<DynamicObject> = support::graph_api(&env.client, &env.namespace).await;
    let apply = |node: Value| {
        let graphs = graphs.clone();
        async move {
            let graph = json!({
                "apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph",
                "metadata": {"name": "handoff"},
                "spec": {"graph": {"nodes": [node]}},
            });
            graphs
                .patch(
                    "handoff",
                    &PatchParams::apply(TEST_MANAGER).force(),
                    &Patch::Apply(graph),
                )
                .await
                .unwrap();
        }
    };
    apply(json!({"id": "shared", "resource": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": {"a": "1"}}})).await;
    let configs: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    wait_for("the graph to make the ConfigMap", WAIT, || async {
        match configs.get_opt("shared").await {
            Ok(Some(c)) if !c.owner_references().is_empty() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // The platform team takes it over: the node now only reads it.
    apply(
        json!({"id": "shared", "resource": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}},
                 "applyPolicy": {"mode": "Read"}}),
    )
    .await;
    wait_for("the ConfigMap to be released", WAIT, || async {
        match configs.get_opt("shared").await {
            Ok(Some(c))
                if c.owner_references().is_empty() && c.labels().keys().all(|k| !k.starts_with("pequod.io")) =>
            {
                Ok(())
            }
            other => Err(format!(
                "{:?}",
                other.map(|c| c.map(|c| (c.metadata.owner_references, c.metadata.labels)))
            )),
        }
    })
    .await;
    wait_shared(&env, "handoff", NodePhase::Ready, "resourceVersion").await;
    support::wait_events(&env.client, &env.namespace, "handoff", &["ObjectReleased"]).await;

    // Deleting the graph leaves it: nothing holds it for the garbage collector either.
    support::delete_and_wait_gone(&graphs, "handoff", WAIT).await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let kept = configs.get_opt("shared").await.unwrap();
    assert_eq!(
        kept.and_then(|c| c.data).and_then(|d| d.get("a").cloned()).as_deref(),
        Some("1")
    );
    env.cleanup().await;
}
