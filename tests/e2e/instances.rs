//! Platform instances against the real apiserver: the README flow from a Transform to a Ready
//! WebService, updates, policy, namespace confinement, module roll-forward and deletion.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams};
use kube::{Api, ResourceExt};
use pequod::api::{GraphPhase, ResourceGraph};
use serde_json::{Value, json};

use crate::support::grants::{acting_reason, forget_grants, patch_graph_as, serve_grants};
use crate::support::instances::{apply_instance, config_data, instance_condition, wait_instance};
use crate::support::modules::{labelled_module, note_module, put_module};
use crate::support::transforms::{WAIT, apply_transform, delete_transform, group, setup};
use crate::support::{self, TEST_MANAGER, TestEnv, kubectl_as, wait_for};

fn status_field<'a>(obj: &'a DynamicObject, pointer: &str) -> Option<&'a Value> {
    obj.data.pointer(&format!("/status{pointer}"))
}

async fn serve_webservice(env: &TestEnv, transforms: &Api<pequod::api::Transform>) -> Api<DynamicObject> {
    apply_transform(
        transforms,
        "webservice",
        json!({"cueRef": {"type": "embedded", "ref": "webservice"}, "group": group(env)}),
    )
    .await;
    support::wait_transform_ready(transforms, "webservice").await;
    support::dynamic_api(
        &env.client,
        &format!("{}/v1alpha1", group(env)),
        "WebService",
        &env.namespace,
    )
    .await
}

#[tokio::test]
async fn a_webservice_goes_from_transform_to_ready_updates_and_is_deleted_in_order() {
    let (env, transforms) = setup("instance-readme").await;
    let webservices = serve_webservice(&env, &transforms).await;
    let api_version = format!("{}/v1alpha1", group(&env));
    apply_instance(
        &webservices,
        &api_version,
        "WebService",
        "my-app",
        json!({"image": "nginx:latest", "port": 80, "replicas": 3}),
    )
    .await;

    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.namespace);
    let services: Api<Service> = Api::namespaced(env.client.clone(), &env.namespace);
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let deployment = wait_for("the Deployment", WAIT, || async {
        deployments
            .get_opt("my-app")
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "absent".to_string())
    })
    .await;
    let spec = deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    let container = &spec.template.spec.as_ref().unwrap().containers[0];
    assert_eq!(container.image.as_deref(), Some("nginx:latest"));
    assert_eq!(container.ports.as_ref().unwrap()[0].container_port, 80);
    let managers: Vec<_> = deployment
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();

    // The graph is named after kind and instance, owned by the instance, signed as rendered by
    // Pequod, and applies as a field manager of its own.
    let graph = format!("webservice.{}-my-app", group(&env));
    let rg = graphs.get(&graph).await.unwrap();
    assert!(
        rg.annotations()["pequod.io/graph-proof"].starts_with("v2:namespace:"),
        "{:?}",
        rg.annotations()
    );
    assert!(
        managers.contains(&format!("pequod-{}", rg.uid().unwrap())),
        "{managers:?}"
    );
    let owner = &rg.owner_references()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("WebService", "my-app"));
    assert_eq!(rg.labels()["pequod.io/transform"], "webservice");

    // Nothing patches status: the deployment controller makes a ReplicaSet and its pods, the
    // scheduler binds them to simulated nodes, kwok runs them, and the Deployment becomes
    // Available. The Service, which waits for that, follows.
    assert_eq!(support::wait_rolled_out(&env.client, &env.namespace, "my-app").await, 3);
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(env.client.clone(), &env.namespace);
    let running: Vec<_> = pods
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/instance=my-app"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .collect();
    assert_eq!(running.len(), 3);
    assert!(
        running.iter().all(|p| p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .is_some_and(|n| n.starts_with("kwok-node-"))),
        "pods run on the simulated nodes"
    );
    let obj = wait_instance(&webservices, "my-app", "Ready", "True", "Ready").await;
    assert_eq!(status_field(&obj, "/phase"), Some(&json!("Ready")));
    assert_eq!(status_field(&obj, "/resourceGraph"), Some(&json!(graph)));
    assert!(
        status_field(&obj, "/moduleDigest")
            .unwrap()
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    let nodes = status_field(&obj, "/nodes").unwrap().as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes[1]["kind"], "Service");
    assert_eq!(nodes[1]["phase"], "Ready");
    assert_eq!(
        graphs.get(&graph).await.unwrap().status.unwrap().phase,
        Some(GraphPhase::Completed)
    );
    let service = services.get("my-app").await.unwrap();
    assert_eq!(service.spec.unwrap().ports.unwrap()[0].port, 80);

    // The module's own status fields, projected from the live Deployment, and its columns.
    let url = format!("http://my-app.{}.svc.cluster.local:80", env.namespace);
    let replicas = |want: i64| {
        let webservices = webservices.clone();
        let url = url.clone();
        move || {
            let webservices = webservices.clone();
            let url = url.clone();
            async move {
                let obj = webservices.get("my-app").await.map_err(|e| e.to_string())?;
                let field = |name: &str| status_field(&obj, &format!("/{name}")).cloned();
                match (field("url"), field("readyReplicas"), field("availableReplicas")) {
                    (Some(u), Some(r), Some(a)) if u == json!(url) && r == json!(want) && a == json!(want) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        }
    };
    wait_for("url and 3 available replicas in the status", WAIT, replicas(3)).await;
    let listed = std::process::Command::new(support::tool("kubectl", "KUBECTL"))
        .arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .args(["get", "webservices", "-n", &env.namespace])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    let header: Vec<&str> = listed.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "READY", "PHASE", "URL", "AVAILABLE", "AGE"],
        "{listed}"
    );
    assert!(
        listed.contains(&url) && listed.lines().nth(1).unwrap().contains(" 3 "),
        "{listed}"
    );

    // An update reaches the Deployment.
    let five_replicas = json!({"image": "nginx:latest", "port": 80, "replicas": 5});
    apply_instance(
        &webservices,
        &api_version,
        "WebService",
        "my-app",
        five_replicas.clone(),
    )
    .await;
    wait_for("5 replicas on the Deployment", WAIT, || async {
        let d = deployments.get("my-app").await.map_err(|e| e.to_string())?;
        match d.spec.and_then(|s| s.replicas) {
            Some(5) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // The status follows the live Deployment as it scales, without a render.
    wait_for("5 available replicas in the status", WAIT, replicas(5)).await;

    // A policy violation blocks the change and is shown; the running version stays.
    apply_instance(
        &webservices,
        &api_version,
        "WebService",
        "my-app",
        json!({"image": "evil.example.com/miner:1", "port": 80, "replicas": 5}),
    )
    .await;
    let obj = wait_instance(&webservices, "my-app", "PolicyCompliant", "False", "PolicyViolation").await;
    let (_, _, message) = instance_condition(&obj, "PolicyCompliant").unwrap();
    assert!(message.contains("spec.image"), "{message}");
    assert_eq!(status_field(&obj, "/phase"), Some(&json!("Failed")));
    assert_eq!(status_field(&obj, "/violations/0/path"), Some(&json!("spec.image")));
    let d = deployments.get("my-app").await.unwrap();
    assert_eq!(
        d.spec.unwrap().template.spec.unwrap().containers[0].image.as_deref(),
        Some("nginx:latest")
    );
    support::wait_events(&env.client, &env.namespace, "my-app", &["PolicyViolation"]).await;
    // A first Ready was said by the condition alone; Ready again after the failure is news.
    assert!(
        !support::event_reasons(&env.client, &env.namespace, "my-app")
            .await
            .contains(&"Ready".to_string())
    );
    apply_instance(&webservices, &api_version, "WebService", "my-app", five_replicas).await;
    wait_instance(&webservices, "my-app", "Ready", "True", "Ready").await;
    support::wait_events(&env.client, &env.namespace, "my-app", &["PolicyViolation", "Ready"]).await;

    // Deleting the instance tears everything down, the Service before the Deployment.
    webservices.delete("my-app", &DeleteParams::default()).await.unwrap();
    wait_for("the instance, its graph and its objects to be gone", WAIT, || async {
        let gone = (
            webservices
                .get_opt("my-app")
                .await
                .map_err(|e| e.to_string())?
                .is_none(),
            graphs.get_opt(&graph).await.map_err(|e| e.to_string())?.is_none(),
            services.get_opt("my-app").await.map_err(|e| e.to_string())?.is_none(),
            deployments
                .get_opt("my-app")
                .await
                .map_err(|e| e.to_string())?
                .is_none(),
        );
        if gone == (true, true, true, true) {
            Ok(())
        } else {
            Err(format!("{gone:?}"))
        }
    })
    .await;
    delete_transform(&transforms, "webservice").await;
    env.cleanup().await;
}

#[tokio::test]
async fn long_instance_names_get_valid_labels_and_names_that_cannot_fit_are_reported() {
    let (env, transforms) = setup("instance-long-names").await;
    let webservices = serve_webservice(&env, &transforms).await;
    let api_version = format!("{}/v1alpha1", group(&env));
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.namespace);
    let services: Api<Service> = Api::namespaced(env.client.clone(), &env.namespace);
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);

    // 60 characters: every name the module makes fits (a Service's at most 63), but the graph's
    // name, which holds kind, group and instance name, does not fit a label.
    let long = format!("long-{}", "n".repeat(55));
    assert_eq!(long.len(), 60);
    apply_instance(
        &webservices,
        &api_version,
        "WebService",
        &long,
        json!({"image": "nginx:latest", "port": 80, "replicas": 1}),
    )
    .await;
    let obj = wait_instance(&webservices, &long, "Ready", "True", "Ready").await;
    let graph = format!("webservice.{}-{long}", group(&env));
    assert_eq!(status_field(&obj, "/resourceGraph"), Some(&json!(graph)));
    let rg = graphs.get(&graph).await.unwrap();
    for (key, value) in rg.labels() {
        assert!(value.len() <= 63, "graph label {key}={value}");
    }
    let service = services.get(&long).await.unwrap();
    let labels = service.labels();
    let labelled = &labels["pequod.io/resourcegraph"];
    assert!(labelled.len() <= 63 && *labelled != graph, "{labelled}");
    assert_eq!(service.annotations()["pequod.io/resourcegraph-name"], graph);
    assert_eq!(labels["pequod.io/node"], "service");
    assert!(deployments.get(&long).await.is_ok());

    // The watch leads from the object's shortened label to its graph: a deleted Service is
    // put back.
    services.delete(&long, &DeleteParams::default()).await.unwrap();
    let uid = service.uid().unwrap();
    wait_for("the Service to be recreated", WAIT, || async {
        match services.get_opt(&long).await.map_err(|e| e.to_string())? {
            Some(s) if s.uid().as_deref() != Some(uid.as_str()) => Ok(()),
            other => Err(format!("{:?}", other.map(|s| s.uid()))),
        }
    })
    .await;

    // 64 characters: the instance name is valid, but no Service (nor label value) can carry
    // it. Nothing is written, and the instance says why.
    let too_long = format!("long-{}", "t".repeat(59));
    assert_eq!(too_long.len(), 64);
    apply_instance(
        &webservices,
        &api_version,
        "WebService",
        &too_long,
        json!({"image": "nginx:latest", "port": 80}),
    )
    .await;
    let obj = wait_instance(&webservices, &too_long, "Ready", "False", "InvalidName").await;
    let (_, _, message) = instance_condition(&obj, "Ready").unwrap();
    assert!(message.contains("64 characters"), "{message}");
    // Rendered, then refused by the graph rules: the instance tells the two apart.
    assert_eq!(
        instance_condition(&obj, "Rendered").map(|(s, r, _)| (s, r)),
        Some(("True".to_string(), "Rendered".to_string()))
    );
    assert_eq!(status_field(&obj, "/phase"), Some(&json!("Failed")));
    assert!(deployments.get_opt(&too_long).await.unwrap().is_none());
    assert!(services.get_opt(&too_long).await.unwrap().is_none());

    // Teardown finds the long-named graph's objects too.
    for name in [&long, &too_long] {
        webservices.delete(name, &DeleteParams::default()).await.unwrap();
    }
    wait_for("the long-named instance's objects to be gone", WAIT, || async {
        let gone = (
            graphs.get_opt(&graph).await.map_err(|e| e.to_string())?.is_none(),
            services.get_opt(&long).await.map_err(|e| e.to_string())?.is_none(),
            deployments.get_opt(&long).await.map_err(|e| e.to_string())?.is_none(),
        );
        if gone == (true, true, true) {
            Ok(())
        } else {
            Err(format!("{gone:?}"))
        }
    })
    .await;
    delete_transform(&transforms, "webservice").await;
    env.cleanup().await;
}

/// A module whose objects are set by the instance: a ConfigMap in `targetNamespace` (if any),
/// and a Namespace when `namespace` is set.
const ESCAPE_MODULE: &str = r#"package escape

#Metadata: kind: "Escape"

#Input: {
	targetNamespace?: string
	namespace?: string
}

#Render: {
	input: {metadata: {name: string, namespace: string, ...}, spec: #Input}
	output: nodes: [{
		id: "config"
		object: {
			apiVersion: "v1"
			kind: "ConfigMap"
			metadata: {
				name: input.metadata.name
				if input.spec.targetNamespace != _|_ {namespace: input.spec.targetNamespace}
			}
			data: owner: input.metadata.name
		}
	}, if input.spec.namespace != _|_ {
		id: "namespace"
		object: {apiVersion: "v1", kind: "Namespace", metadata: name: input.spec.namespace}
	}]
}
"#;

#[tokio::test]
async fn objects_stay_in_the_instance_namespace_unless_the_transform_allows_cluster_scope() {
    let (env, transforms) = setup("instance-confinement").await;
    let group = group(&env);
    let api_version = format!("{group}/v1alpha1");
    put_module(&env.client, &env.namespace, "escape-module", ESCAPE_MODULE).await;
    apply_transform(
        &transforms,
        "escape",
        json!({"cueRef": {"type": "configmap", "ref": "escape-module"}, "group": group}),
    )
    .await;
    support::wait_transform_ready(&transforms, "escape").await;
    let escapes = support::dynamic_api(&env.client, &api_version, "Escape", &env.namespace).await;
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);

    // Another namespace: refused, nothing rendered into a graph.
    apply_instance(
        &escapes,
        &api_version,
        "Escape",
        "out",
        json!({"targetNamespace": "kube-system"}),
    )
    .await;
    let obj = wait_instance(&escapes, "out", "PolicyCompliant", "False", "PolicyViolation").await;
    let (_, _, message) = instance_condition(&obj, "PolicyCompliant").unwrap();
    assert!(message.contains("kube-system"), "{message}");
    assert!(graphs.get_opt(&format!("escape.{group}-out")).await.unwrap().is_none());
    assert!(
        Api::<ConfigMap>::namespaced(env.client.clone(), "kube-system")
            .get_opt("out")
            .await
            .unwrap()
            .is_none()
    );

    // No namespace: filled in with the instance's.
    apply_instance(&escapes, &api_version, "Escape", "home", json!({})).await;
    wait_instance(&escapes, "home", "Ready", "True", "Ready").await;
    let rg = graphs.get(&format!("escape.{group}-home")).await.unwrap();
    assert_eq!(
        rg.spec.graph.nodes[0].object["metadata"]["namespace"],
        json!(env.namespace)
    );

    // A cluster-scoped object: refused by default, applied once the Transform allows it.
    let extra_namespace = format!("{}-extra", env.namespace);
    apply_instance(
        &escapes,
        &api_version,
        "Escape",
        "cluster",
        json!({"namespace": extra_namespace}),
    )
    .await;
    let obj = wait_instance(&escapes, "cluster", "PolicyCompliant", "False", "PolicyViolation").await;
    let (_, _, message) = instance_condition(&obj, "PolicyCompliant").unwrap();
    assert!(message.contains("allowClusterScopedResources"), "{message}");
    apply_transform(
        &transforms,
        "escape",
        json!({"cueRef": {"type": "configmap", "ref": "escape-module"}, "group": group, "allowClusterScopedResources": true}),
    )
    .await;
    wait_instance(&escapes, "cluster", "Ready", "True", "Ready").await;
    let namespaces: Api<Namespace> = Api::all(env.client.clone());
    assert!(namespaces.get_opt(&extra_namespace).await.unwrap().is_some());

    // The graph's allowances come with Pequod's proof, which nobody else can make: a graph
    // edited by someone who may write graphs is hand-written, refused, and rendered again.
    let rendered = graphs.get(&format!("escape.{group}-cluster")).await.unwrap();
    let hijack = format!("{}-hijack", env.namespace);
    let namespace_node = rendered
        .spec
        .graph
        .nodes
        .iter()
        .position(|n| n.kind() == "Namespace")
        .expect("a Namespace node");
    let mut edited = serde_json::to_value(&rendered.spec).unwrap();
    edited["graph"]["nodes"][namespace_node]["resource"]["metadata"]["name"] = json!(hijack);
    graphs
        .patch(
            &format!("escape.{group}-cluster"),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"graph": edited["graph"]}})),
        )
        .await
        .unwrap();
    wait_for("the edited graph rendered again", WAIT, || async {
        let rg = graphs
            .get(&format!("escape.{group}-cluster"))
            .await
            .map_err(|e| e.to_string())?;
        let name = rg.spec.graph.nodes[namespace_node].object["metadata"]["name"].clone();
        (name == json!(extra_namespace) && rg.metadata.generation > rendered.metadata.generation)
            .then_some(())
            .ok_or(format!("node names {name}"))
    })
    .await;
    wait_instance(&escapes, "cluster", "Ready", "True", "Ready").await;
    // A proof copied onto a graph of another name proves nothing.
    let mut copy = serde_json::to_value(&rendered).unwrap();
    copy["metadata"] = json!({"name": "copy", "annotations": rendered.annotations()});
    copy["spec"]["graph"]["nodes"][namespace_node]["resource"]["metadata"]["name"] = json!(hijack);
    copy.as_object_mut().unwrap().remove("status");
    graphs
        .patch("copy", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&copy))
        .await
        .unwrap();
    wait_for("the copied graph refused", WAIT, || async {
        let rg = graphs.get("copy").await.map_err(|e| e.to_string())?;
        let valid = rg
            .status
            .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Valid"));
        match valid {
            Some(c) if c.reason == "NotAllowed" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(namespaces.get_opt(&hijack).await.unwrap().is_none());
    graphs.delete("copy", &DeleteParams::default()).await.unwrap();

    // The allowance withdrawn: the instance's new render is blocked and its last graph stays,
    // but that graph's proof no longer stands (its Transform grants less now), so it applies
    // nothing, not even the object it made before.
    apply_transform(
        &transforms,
        "escape",
        json!({"cueRef": {"type": "configmap", "ref": "escape-module"}, "group": group}),
    )
    .await;
    let cluster_graph = format!("escape.{group}-cluster");
    wait_for("the graph's grant withdrawn", WAIT, || async {
        let rg = graphs.get(&cluster_graph).await.map_err(|e| e.to_string())?;
        let valid = rg
            .status
            .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Valid"));
        match valid {
            Some(c) if c.reason == "GrantWithdrawn" && c.message.contains("now grants namespace") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    support::wait_events(&env.client, &env.namespace, &cluster_graph, &["GrantWithdrawn"]).await;
    namespaces
        .delete(&extra_namespace, &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the namespace gone", WAIT, || async {
        match namespaces.get_opt(&extra_namespace).await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        }
    })
    .await;
    // A pass of the graph happens at least every 15 s while its grant is withdrawn.
    tokio::time::sleep(std::time::Duration::from_secs(20)).await;
    assert!(
        namespaces.get_opt(&extra_namespace).await.unwrap().is_none(),
        "a graph whose grant was withdrawn re-created a cluster-scoped object"
    );
    // Granted again: rendered, signed and applied again.
    apply_transform(
        &transforms,
        "escape",
        json!({"cueRef": {"type": "configmap", "ref": "escape-module"}, "group": group, "allowClusterScopedResources": true}),
    )
    .await;
    wait_for("the namespace made again", WAIT, || async {
        namespaces
            .get_opt(&extra_namespace)
            .await
            .map_err(|e| e.to_string())?
            .filter(|ns| ns.metadata.deletion_timestamp.is_none())
            .map(|_| ())
            .ok_or_else(|| "absent".to_string())
    })
    .await;

    for name in ["out", "home", "cluster"] {
        escapes.delete(name, &DeleteParams::default()).await.unwrap();
    }
    wait_for(
        "the cluster-scoped object to be deleted with its instance",
        WAIT,
        || async {
            match namespaces.get_opt(&extra_namespace).await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(ns) if ns.metadata.deletion_timestamp.is_some() => Ok(()),
                Some(_) => Err("still there".into()),
            }
        },
    )
    .await;
    delete_transform(&transforms, "escape").await;
    env.cleanup().await;
}

/// Two Transforms of the test's group, `note` and `memo`, each with a module of its own;
/// returns `note` as served, and the module version `memo` served.
async fn serve_note_and_memo(
    env: &TestEnv,
    transforms: &Api<pequod::api::Transform>,
) -> (pequod::api::Transform, String) {
    let group = group(env);
    for (name, kind) in [("note", "Note"), ("memo", "Memo")] {
        let module = format!("{name}-module");
        put_module(&env.client, &env.namespace, &module, &labelled_module(kind, "1")).await;
        apply_transform(
            transforms,
            name,
            json!({"cueRef": {"type": "configmap", "ref": module}, "group": group}),
        )
        .await;
    }
    let note = support::wait_transform_ready(transforms, "note").await;
    let memo = support::wait_transform_ready(transforms, "memo").await;
    let memo_digest = served(&memo).last().cloned().expect("memo served a version");
    (note, memo_digest)
}

fn served(t: &pequod::api::Transform) -> Vec<String> {
    t.status.as_ref().map(|s| s.served_digests.clone()).unwrap_or_default()
}

#[tokio::test]
async fn an_instance_may_be_pinned_only_to_a_version_its_own_transform_served() {
    let (env, transforms) = setup("pin-elsewhere").await;
    let group = group(&env);
    let api_version = format!("{group}/v1alpha1");
    let (note, memo_digest) = serve_note_and_memo(&env, &transforms).await;
    assert!(!served(&note).contains(&memo_digest), "{:?}", served(&note));

    let notes = support::dynamic_api(&env.client, &api_version, "Note", &env.namespace).await;
    apply_instance(&notes, &api_version, "Note", "alpha", json!({"text": "a"})).await;
    wait_instance(&notes, "alpha", "Ready", "True", "Ready").await;
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let graph = format!("note.{group}-alpha");
    let before = graphs.get(&graph).await.unwrap();

    // A developer who may only edit their instance pins it to another Transform's module.
    let pin = json!({"metadata": {"annotations": {"pequod.io/pinned-module-digest": memo_digest}}});
    notes
        .patch("alpha", &PatchParams::default(), &Patch::Merge(pin))
        .await
        .unwrap();
    let alpha = wait_instance(&notes, "alpha", "Rendered", "False", "VersionNotServed").await;
    let (_, _, message) = instance_condition(&alpha, "Rendered").unwrap();
    assert!(message.contains("was never served by Transform"), "{message}");
    let after = graphs.get(&graph).await.unwrap();
    assert_eq!(after.spec, before.spec, "the instance keeps its graph");
    let configmaps: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    assert!(configmaps.get_opt("memo-alpha").await.unwrap().is_none());
    assert!(configmaps.get_opt("note-alpha").await.unwrap().is_some());

    support::delete_and_wait_gone(&notes, "alpha", WAIT).await;
    for name in ["note", "memo"] {
        delete_transform(&transforms, name).await;
    }
    env.cleanup().await;
}

#[tokio::test]
async fn module_edits_re_render_every_instance_and_kinds_do_not_share_graphs() {
    let (env, transforms) = setup("instance-rollout").await;
    let group = group(&env);
    let api_version = format!("{group}/v1alpha1");
    for kind in ["Memo", "Task"] {
        let lower = kind.to_ascii_lowercase();
        put_module(
            &env.client,
            &env.namespace,
            &format!("{lower}-module"),
            &labelled_module(kind, "1"),
        )
        .await;
        apply_transform(
            &transforms,
            &lower,
            json!({"cueRef": {"type": "configmap", "ref": format!("{lower}-module")}, "group": group}),
        )
        .await;
        support::wait_transform_ready(&transforms, &lower).await;
    }
    let memos = support::dynamic_api(&env.client, &api_version, "Memo", &env.namespace).await;
    let tasks = support::dynamic_api(&env.client, &api_version, "Task", &env.namespace).await;
    // Same instance name in two kinds.
    apply_instance(&memos, &api_version, "Memo", "same", json!({"text": "memo"})).await;
    apply_instance(&tasks, &api_version, "Task", "same", json!({"text": "task"})).await;
    for name in ["a", "b", "c"] {
        apply_instance(&memos, &api_version, "Memo", name, json!({"text": name})).await;
    }
    for name in ["same", "a", "b", "c"] {
        wait_instance(&memos, name, "Ready", "True", "Ready").await;
    }
    wait_instance(&tasks, "same", "Ready", "True", "Ready").await;
    let memo = config_data(&env.client, &env.namespace, "memo-same").await.unwrap();
    let task = config_data(&env.client, &env.namespace, "task-same").await.unwrap();
    assert_eq!((memo["text"].as_str(), task["text"].as_str()), ("memo", "task"));
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    assert!(graphs.get_opt(&format!("memo.{group}-same")).await.unwrap().is_some());
    assert!(graphs.get_opt(&format!("task.{group}-same")).await.unwrap().is_some());

    let before = status_field(&memos.get("a").await.unwrap(), "/moduleDigest").cloned();
    put_module(
        &env.client,
        &env.namespace,
        "memo-module",
        &labelled_module("Memo", "2"),
    )
    .await;
    wait_for("every Memo re-rendered with module version 2", WAIT, || async {
        let mut stale = Vec::new();
        for name in ["same", "a", "b", "c"] {
            let data = config_data(&env.client, &env.namespace, &format!("memo-{name}")).await;
            if data.as_ref().and_then(|d| d.get("version")).map(String::as_str) != Some("2") {
                stale.push(name);
            }
        }
        if stale.is_empty() {
            Ok(())
        } else {
            Err(format!("stale: {stale:?}"))
        }
    })
    .await;
    let after = wait_for("the new module digest on the instance", WAIT, || async {
        let obj = memos.get("a").await.map_err(|e| e.to_string())?;
        match status_field(&obj, "/moduleDigest").cloned() {
            Some(d) if Some(&d) != before.as_ref() => Ok(d),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(after.as_str().unwrap().starts_with("sha256:"));
    // The other kind was not touched.
    let task = config_data(&env.client, &env.namespace, "task-same").await.unwrap();
    assert_eq!(task["version"], "1");

    for name in ["same", "a", "b", "c"] {
        memos.delete(name, &DeleteParams::default()).await.unwrap();
    }
    tasks.delete("same", &DeleteParams::default()).await.unwrap();
    delete_transform(&transforms, "memo").await;
    delete_transform(&transforms, "task").await;
    env.cleanup().await;
}

#[tokio::test]
async fn same_named_kinds_of_two_groups_never_share_a_graph() {
    let (env, transforms) = setup("instance-groups").await;
    let mut apis = Vec::new();
    for team in ["a", "b"] {
        let group = format!("{team}.{}", group(&env));
        let module = format!("memo-{team}-module");
        put_module(&env.client, &env.namespace, &module, &labelled_module("Memo", team)).await;
        apply_transform(
            &transforms,
            &format!("memo-{team}"),
            json!({"cueRef": {"type": "configmap", "ref": module}, "group": group}),
        )
        .await;
        support::wait_transform_ready(&transforms, &format!("memo-{team}")).await;
        let api_version = format!("{group}/v1alpha1");
        let memos = support::dynamic_api(&env.client, &api_version, "Memo", &env.namespace).await;
        apis.push((api_version, memos));
    }
    let (a, b) = (&apis[0], &apis[1]);
    apply_instance(&a.1, &a.0, "Memo", "same", json!({"text": "from a"})).await;
    wait_instance(&a.1, "same", "Ready", "True", "Ready").await;
    // Each instance has a graph of its own, named after its group. Both render ConfigMap
    // `memo-same`: the second graph is refused it, and the first's object does not change.
    apply_instance(&b.1, &b.0, "Memo", "same", json!({"text": "from b"})).await;
    let obj = wait_instance(&b.1, "same", "Ready", "False", "NodeFailed").await;
    let message = instance_condition(&obj, "Ready").unwrap().2;
    let first_graph = format!("memo.a.{}-same", group(&env));
    assert!(
        message.contains(&format!("belongs to ResourceGraph {}/{first_graph}", env.namespace)),
        "{message}"
    );
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let second_graph = format!("memo.b.{}-same", group(&env));
    assert!(graphs.get_opt(&second_graph).await.unwrap().is_some());
    let data = config_data(&env.client, &env.namespace, "memo-same").await.unwrap();
    assert_eq!((data["text"].as_str(), data["version"].as_str()), ("from a", "a"));

    // Deleting the second instance leaves the first's graph and objects.
    support::delete_and_wait_gone(&b.1, "same", WAIT).await;
    assert!(graphs.get_opt(&second_graph).await.unwrap().is_none());
    assert!(graphs.get_opt(&first_graph).await.unwrap().is_some());
    assert_eq!(
        config_data(&env.client, &env.namespace, "memo-same").await.unwrap()["text"],
        "from a"
    );
    support::delete_and_wait_gone(&a.1, "same", WAIT).await;
    for team in ["a", "b"] {
        delete_transform(&transforms, &format!("memo-{team}")).await;
    }
    env.cleanup().await;
}

/// Renders what the apiserver or the graph rules refuse, on request.
const REFUSED_MODULE: &str = r#"package refused

import "list"

#Metadata: kind: "Refused"

#Input: {
	mode: "gates" | "badid" | "labels"
}

#Render: {
	input: {metadata: {name: string, namespace: string, ...}, spec: #Input}
	if input.spec.mode != "labels" {
		output: nodes: [{
			id: [ if input.spec.mode == "badid" {"not a valid id"}, "config"][0]
			object: {apiVersion: "v1", kind: "ConfigMap", metadata: name: input.metadata.name}
			readyWhen: [ for i in list.Range(0, 17, 1) {type: "Exists"}]
		}]
	}
	if input.spec.mode == "labels" {
		output: nodes: [{
			id: "config"
			object: {apiVersion: "v1", kind: "ConfigMap", metadata: {name: input.metadata.name, labels: a: "b"}}
		}, {
			id: "copy"
			object: {apiVersion: "v1", kind: "ConfigMap", metadata: {name: "\(input.metadata.name)-copy", labels: "${config.metadata.labels}"}}
		}]
	}
}
"#;

#[tokio::test]
async fn graphs_the_apiserver_or_the_graph_rules_refuse_are_reported_on_the_instance() {
    let (env, transforms) = setup("instance-refused").await;
    let group = group(&env);
    let api_version = format!("{group}/v1alpha1");
    put_module(&env.client, &env.namespace, "refused-module", REFUSED_MODULE).await;
    apply_transform(
        &transforms,
        "refused",
        json!({"cueRef": {"type": "configmap", "ref": "refused-module"}, "group": group}),
    )
    .await;
    support::wait_transform_ready(&transforms, "refused").await;
    let refused = support::dynamic_api(&env.client, &api_version, "Refused", &env.namespace).await;

    // 17 readiness gates: the graph passes Pequod's checks but not the CRD's (at most 16).
    apply_instance(&refused, &api_version, "Refused", "gates", json!({"mode": "gates"})).await;
    let obj = wait_instance(&refused, "gates", "Ready", "False", "GraphRejected").await;
    let (_, _, message) = instance_condition(&obj, "Ready").unwrap();
    assert!(message.contains("readyWhen"), "{message}");
    assert_eq!(status_field(&obj, "/phase"), Some(&json!("Failed")));

    // An id that cannot be a label value: rendered, then refused by the graph rules before any
    // write; the instance tells the two apart.
    apply_instance(&refused, &api_version, "Refused", "badid", json!({"mode": "badid"})).await;
    let obj = wait_instance(&refused, "badid", "Ready", "False", "InvalidNodeId").await;
    let (_, _, message) = instance_condition(&obj, "Ready").unwrap();
    assert!(
        message.contains("the rendered graph was refused") && message.contains("not a valid id"),
        "{message}"
    );
    let (rendered, _, _) = instance_condition(&obj, "Rendered").unwrap();
    assert_eq!(rendered, "True");
    support::wait_events(&env.client, &env.namespace, "badid", &["GraphRejected"]).await;

    // A reference in place of a whole map: whatever the apiserver answers, the instance says it.
    apply_instance(&refused, &api_version, "Refused", "labels", json!({"mode": "labels"})).await;
    wait_for("the refusal on the instance", WAIT, || async {
        let obj = refused.get("labels").await.map_err(|e| e.to_string())?;
        match instance_condition(&obj, "Ready") {
            Some((s, r, m)) if s == "False" && r != "Progressing" && r != "Ready" => Ok(m),
            other => Err(format!("{other:?}; status {:?}", obj.data.get("status"))),
        }
    })
    .await;

    for name in ["gates", "badid", "labels"] {
        refused.delete(name, &DeleteParams::default()).await.unwrap();
    }
    delete_transform(&transforms, "refused").await;
    env.cleanup().await;
}

/// A module whose input says how much memory its evaluation takes: `n` strings of 1 MB.
const HUNGRY_MODULE: &str = r#"package m

import ("list", "strings")

#Metadata: kind: "Hungry"

#Input: {n: int, note: string}

#Render: {
	input: {metadata: {name: string, namespace: string, ...}, spec: #Input}
	_big: [for i in list.Range(0, input.spec.n, 1) {strings.Repeat("x", 1000000) + "\(i)"}]
	output: nodes: [{
		id: "cm"
		object: {
			apiVersion: "v1", kind: "ConfigMap", metadata: name: input.metadata.name
			data: {note: input.spec.note, megabytes: "\(div(len(strings.Join(_big, "")), 1000000))"}
		}
	}]
}
"#;

#[tokio::test]
async fn a_hostile_instance_fails_alone_and_its_error_stays_its_own() {
    let (env, transforms) = setup("instance-hostile").await;
    let group = group(&env);
    let api_version = format!("{group}/v1alpha1");
    put_module(&env.client, &env.namespace, "hungry-module", HUNGRY_MODULE).await;
    apply_transform(
        &transforms,
        "hungry",
        json!({"cueRef": {"type": "configmap", "ref": "hungry-module"}, "group": group,
               "managedResources": [{"resources": ["configmaps"]}]}),
    )
    .await;
    support::wait_transform_ready(&transforms, "hungry").await;
    let hungry = support::dynamic_api(&env.client, &api_version, "Hungry", &env.namespace).await;
    // Applied together, so rendered in one batch: 400 MB against cue's 160 MiB.
    let spec = |n: u32, note: &str| json!({"n": n, "note": note});
    let apply = [
        ("hostile", spec(400, "hostile-note")),
        ("first", spec(1, "first-note")),
        ("second", spec(2, "second-note")),
    ];
    futures::future::join_all(
        apply
            .iter()
            .map(|(name, spec)| apply_instance(&hungry, &api_version, "Hungry", name, spec.clone())),
    )
    .await;

    let obj = wait_instance(&hungry, "hostile", "Rendered", "False", "CueMemoryLimit").await;
    let message = instance_condition(&obj, "Rendered").unwrap().2;
    assert!(message.contains("160 MiB"), "{message}");
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    for (name, megabytes) in [("first", "1"), ("second", "2")] {
        let obj = wait_instance(&hungry, name, "Ready", "True", "Ready").await;
        let status = obj.data["status"].to_string();
        assert!(
            !status.contains("hostile-note") && !status.contains("MiB"),
            "{name} shows another instance's error: {status}"
        );
        let cm = cms.get(name).await.unwrap();
        assert_eq!(cm.data.unwrap()["megabytes"], megabytes);
    }
    assert!(cms.get_opt("hostile").await.unwrap().is_none());

    for (name, _) in &apply {
        hungry.delete(name, &DeleteParams::default()).await.unwrap();
    }
    delete_transform(&transforms, "hungry").await;
    env.cleanup().await;
}

#[tokio::test]
async fn deleting_an_instance_that_collided_with_another_team_s_objects_leaves_them_alone() {
    let (env, transforms) = setup("instance-collision").await;
    let webservices = serve_webservice(&env, &transforms).await;
    let api_version = format!("{}/v1alpha1", group(&env));
    // Another team's Deployment and Service named `payments`, already in the namespace.
    let theirs = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: payments\n  namespace: {ns}\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {{team: b}}\n  template:\n    metadata:\n      labels: {{team: b}}\n    spec:\n      containers: [{{name: pay, image: 'registry.k8s.io/pause:3.10'}}]\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: payments\n  namespace: {ns}\nspec:\n  selector: {{team: b}}\n  ports: [{{port: 8080, protocol: TCP}}]\n",
        ns = env.namespace
    );
    let applied = support::apply_yaml(&env.client, &env.namespace, &theirs).await;
    let uids: Vec<String> = applied.iter().map(|o| o.uid().unwrap()).collect();
    support::wait_rolled_out(&env.client, &env.namespace, "payments").await;

    apply_instance(
        &webservices,
        &api_version,
        "WebService",
        "payments",
        json!({"image": "nginx:1.27", "port": 80, "replicas": 1}),
    )
    .await;
    // The Deployment is the other team's: it is not taken over, nothing is written to it.
    let obj = wait_instance(&webservices, "payments", "Ready", "False", "NodeFailed").await;
    let message = instance_condition(&obj, "Ready").unwrap().2;
    assert!(
        message.contains("Deployment payments already exists and was not made by this graph"),
        "{message}"
    );

    // The instance goes once its graph is torn down.
    support::delete_and_wait_gone(&webservices, "payments", WAIT).await;
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let graph = format!("webservice.{}-payments", group(&env));
    assert!(graphs.get_opt(&graph).await.unwrap().is_none());
    let deployment = Api::<Deployment>::namespaced(env.client.clone(), &env.namespace)
        .get("payments")
        .await
        .expect("the other team's Deployment survives");
    let service = Api::<Service>::namespaced(env.client.clone(), &env.namespace)
        .get("payments")
        .await
        .expect("the other team's Service survives");
    assert_eq!(vec![deployment.uid().unwrap(), service.uid().unwrap()], uids);
    assert_eq!(
        deployment.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some("registry.k8s.io/pause:3.10")
    );
    assert_eq!(service.spec.unwrap().ports.unwrap()[0].port, 8080);
    assert!(
        !deployment
            .metadata
            .labels
            .unwrap_or_default()
            .contains_key("pequod.io/resourcegraph")
    );
    support::wait_events(&env.client, &env.namespace, &graph, &["ObjectNotOwned"]).await;
    delete_transform(&transforms, "webservice").await;
    env.cleanup().await;
}

/// Sets (or, with `None`, removes) an annotation of an instance with a merge patch, as
/// `kubectl annotate` does.
async fn annotate(api: &Api<DynamicObject>, name: &str, key: &str, value: Option<&str>) {
    let patch = json!({"metadata": {"annotations": {key: value}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap_or_else(|e| panic!("annotate {name}: {e}"));
}

#[tokio::test]
async fn an_instance_can_be_paused_reconciled_now_and_protected_from_deletion() {
    let (env, transforms) = setup("instance-controls").await;
    let group = group(&env);
    let api_version = format!("{group}/v1alpha1");
    put_module(&env.client, &env.namespace, "note-module", &note_module("")).await;
    apply_transform(
        &transforms,
        "note",
        json!({"cueRef": {"type": "configmap", "ref": "note-module"}, "group": group,
               "managedResources": [{"resources": ["configmaps"]}]}),
    )
    .await;
    support::wait_transform_ready(&transforms, "note").await;
    let notes = support::dynamic_api(&env.client, &api_version, "Note", &env.namespace).await;
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    let text = |cm: ConfigMap| cm.data.unwrap_or_default().get("text").cloned();
    apply_instance(&notes, &api_version, "Note", "memo", json!({"text": "first"})).await;
    wait_instance(&notes, "memo", "Ready", "True", "Ready").await;

    // Paused: a new spec is not rendered or applied until the annotation goes.
    annotate(&notes, "memo", "pequod.io/paused", Some("true")).await;
    wait_instance(&notes, "memo", "Paused", "True", "Paused").await;
    apply_instance(&notes, &api_version, "Note", "memo", json!({"text": "second"})).await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(text(cms.get("memo").await.unwrap()).as_deref(), Some("first"));
    annotate(&notes, "memo", "pequod.io/paused", None).await;
    wait_instance(&notes, "memo", "Paused", "False", "Resumed").await;
    wait_for("the new text applied once resumed", WAIT, || async {
        match text(cms.get("memo").await.map_err(|e| e.to_string())?) {
            Some(t) if t == "second" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    support::wait_events(&env.client, &env.namespace, "memo", &["Paused"]).await;

    // Reconcile now: handled once, carried to the graph, which runs a pass.
    let requested = "2026-11-30T18:30:00Z";
    annotate(&notes, "memo", "pequod.io/reconcile-requested-at", Some(requested)).await;
    let obj = wait_for("the request handled", WAIT, || async {
        let obj = notes.get("memo").await.map_err(|e| e.to_string())?;
        match status_field(&obj, "/lastHandledReconcileAt") {
            Some(v) if v == requested => Ok(obj),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let graph_name = status_field(&obj, "/resourceGraph")
        .and_then(Value::as_str)
        .unwrap()
        .to_string();
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let graph = graphs.get(&graph_name).await.unwrap();
    assert_eq!(
        graph
            .annotations()
            .get("pequod.io/reconcile-requested-at")
            .map(String::as_str),
        Some(requested)
    );

    // Protected: deletion waits, with the objects kept, until the annotation goes.
    annotate(&notes, "memo", "pequod.io/deletion-protection", Some("true")).await;
    notes.delete("memo", &DeleteParams::default()).await.unwrap();
    wait_instance(&notes, "memo", "Ready", "False", "DeletionProtected").await;
    support::wait_events(&env.client, &env.namespace, "memo", &["DeletionProtected"]).await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert!(cms.get_opt("memo").await.unwrap().is_some(), "the object stays");
    assert!(graphs.get_opt(&graph_name).await.unwrap().is_some(), "the graph stays");
    annotate(&notes, "memo", "pequod.io/deletion-protection", None).await;
    support::delete_and_wait_gone(&notes, "memo", WAIT).await;
    wait_for("the object torn down", WAIT, || async {
        match cms.get_opt("memo").await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        }
    })
    .await;
    delete_transform(&transforms, "note").await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_worker_s_deployment_takes_its_config_map_name_through_a_reference() {
    let (env, transforms) = setup("instance-worker").await;
    let group = group(&env);
    apply_transform(
        &transforms,
        "worker",
        json!({"cueRef": {"type": "embedded", "ref": "worker"}, "group": group}),
    )
    .await;
    support::wait_transform_ready(&transforms, "worker").await;
    let api_version = format!("{group}/v1alpha1");
    let workers = support::dynamic_api(&env.client, &api_version, "Worker", &env.namespace).await;
    apply_instance(
        &workers,
        &api_version,
        "Worker",
        "mailer",
        json!({"image": "busybox:1.36", "config": {"QUEUE": "mail"}}),
    )
    .await;
    wait_instance(&workers, "mailer", "Ready", "True", "Ready").await;
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let graph = graphs.get(&format!("worker.{group}-mailer")).await.unwrap();
    let node = graph.spec.graph.nodes.iter().find(|n| n.id == "deployment").unwrap();
    let declared = &node.object["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"];
    assert_eq!(declared, "${config.metadata.name}", "the graph holds the reference");
    let deployment = Api::<Deployment>::namespaced(env.client.clone(), &env.namespace)
        .get("mailer")
        .await
        .unwrap();
    let container = &deployment.spec.unwrap().template.spec.unwrap().containers[0];
    let from = container.env_from.as_ref().unwrap()[0].config_map_ref.as_ref().unwrap();
    assert_eq!(
        from.name, "mailer-config",
        "the executor filled it in from the live ConfigMap"
    );
    support::delete_and_wait_gone(&workers, "mailer", WAIT).await;
    delete_transform(&transforms, "worker").await;
    env.cleanup().await;
}

#[tokio::test]
async fn pequod_plan_tells_what_a_module_would_change_for_each_instance() {
    let (env, transforms) = setup("plan").await;
    let group = group(&env);
    let api_version = format!("{group}/v1alpha1");
    let current = note_module("");
    put_module(&env.client, &env.namespace, "note-module", &current).await;
    apply_transform(
        &transforms,
        "note",
        json!({"cueRef": {"type": "configmap", "ref": "note-module"}, "group": group}),
    )
    .await;
    support::wait_transform_ready(&transforms, "note").await;
    let notes = support::dynamic_api(&env.client, &api_version, "Note", &env.namespace).await;
    for name in ["alpha", "beta", "gamma"] {
        apply_instance(
            &notes,
            &api_version,
            "Note",
            name,
            json!({"text": format!("{name} text")}),
        )
        .await;
    }
    for name in ["alpha", "beta", "gamma"] {
        wait_instance(&notes, name, "Ready", "True", "Ready").await;
    }

    // The candidate adds a field to each note, a copy beside it, and a policy gamma breaks.
    let candidate = current
        .replace(
            "data: text: input.spec.text}",
            "data: {text: input.spec.text, version: \"2\"}}",
        )
        .replace(
            "\t}]\n}",
            "\t}, {\n\t\tid: \"copy\"\n\t\tobject: {apiVersion: \"v1\", kind: \"ConfigMap\", metadata: name: \"\\(input.metadata.name)-copy\", data: text: input.spec.text}\n\t}]\n\toutput: violations: [ if input.spec.text == \"gamma text\" {path: \"spec.text\", message: \"gamma is retired\", severity: \"Error\"}]\n}",
        );
    assert_ne!(candidate, current, "the candidate differs");
    // Someone else already set alpha's version: the dry run against the live object shows
    // that the candidate changes nothing there.
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    let preset =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "alpha"}, "data": {"version": "2"}});
    cms.patch(
        "alpha",
        &PatchParams::apply("someone-else").force(),
        &Patch::Apply(preset),
    )
    .await
    .unwrap();
    let plan = support::plan_json(&env, "note", "note.cue", &candidate);
    assert_eq!(
        plan["schema"],
        json!({"changed": false, "breaking": []}),
        "#Input is the same"
    );
    assert!(plan["module"].as_str().unwrap().starts_with("sha256:"));
    let plans = plan["instances"].as_array().unwrap();
    assert_eq!(plans.len(), 3, "{plans:?}");
    for plan in plans {
        let name = plan["name"].as_str().unwrap();
        let mut changes =
            vec![json!({"change": "create", "object": {"kind": "ConfigMap", "name": format!("{name}-copy")}})];
        if name != "alpha" {
            changes.insert(
                0,
                json!({"change": "update", "object": {"kind": "ConfigMap", "name": name}, "paths": ["data.version"]}),
            );
        }
        assert_eq!(plan["changes"], json!(changes), "{name}");
        let violations = plan.get("violations").and_then(Value::as_array).map_or(0, Vec::len);
        assert_eq!(violations, usize::from(name == "gamma"), "{name}: {plan}");
    }
    // Nothing changed in the cluster.
    assert!(cms.get_opt("alpha-copy").await.unwrap().is_none());
    let beta = cms.get("beta").await.unwrap().data.unwrap();
    assert!(!beta.contains_key("version"));
    delete_transform_after(&notes, &transforms).await;
    env.cleanup().await;
}

async fn delete_transform_after(notes: &Api<DynamicObject>, transforms: &Api<pequod::api::Transform>) {
    for name in ["alpha", "beta", "gamma"] {
        support::delete_and_wait_gone(notes, name, WAIT).await;
    }
    delete_transform(transforms, "note").await;
}

/// Where a database's secret could leak to: the instance, its graph (spec, status and
/// annotations) and the namespace's events, serialized whole.
async fn leaks(env: &TestEnv, databases: &Api<DynamicObject>, graph: &str, secrets: &[String]) -> Vec<String> {
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(env.client.clone(), &env.namespace);
    let places = [
        (
            "the instance",
            serde_json::to_string(&databases.get("orders").await.unwrap()).unwrap(),
        ),
        (
            "its graph",
            serde_json::to_string(&graphs.get(graph).await.unwrap()).unwrap(),
        ),
        (
            "the events",
            serde_json::to_string(&events.list(&Default::default()).await.unwrap()).unwrap(),
        ),
    ];
    let mut found = Vec::new();
    for (place, text) in places {
        for secret in secrets {
            if text.contains(secret.as_str()) {
                found.push(format!("{place} holds {secret}"));
            }
        }
    }
    found
}

#[tokio::test]
async fn a_database_waits_for_its_volume_runs_and_keeps_its_generated_password_to_its_secret() {
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, Secret};
    use k8s_openapi::api::storage::v1::StorageClass;

    let (env, transforms) = setup("instance-database").await;
    let api_version = format!("{}/v1alpha1", group(&env));
    apply_transform(
        &transforms,
        "database",
        json!({"cueRef": {"type": "embedded", "ref": "database"}, "group": group(&env)}),
    )
    .await;
    support::wait_transform_ready(&transforms, "database").await;
    let databases = support::dynamic_api(&env.client, &api_version, "Database", &env.namespace).await;

    // This control plane has no volume provisioner: a claim binds only to a volume someone
    // made. The test's own StorageClass keeps its volume from any other test's claim.
    let class = format!("e2e-{}", env.namespace);
    let classes: Api<StorageClass> = Api::all(env.client.clone());
    let volumes: Api<PersistentVolume> = Api::all(env.client.clone());
    let storage_class: StorageClass = serde_json::from_value(json!({
        "metadata": {"name": class},
        "provisioner": "kubernetes.io/no-provisioner",
        "volumeBindingMode": "Immediate",
    }))
    .unwrap();
    classes.create(&Default::default(), &storage_class).await.unwrap();

    apply_instance(
        &databases,
        &api_version,
        "Database",
        "orders",
        json!({"storage": "1Gi", "storageClassName": class}),
    )
    .await;

    // Without a volume the claim stays Pending, the pod cannot be scheduled, and Pequod waits
    // on the StatefulSet's readiness.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(env.client.clone(), &env.namespace);
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.namespace);
    wait_for("the instance waiting for its StatefulSet", WAIT, || async {
        let obj = databases.get("orders").await.map_err(|e| e.to_string())?;
        let waiting = status_field(&obj, "/nodes")
            .and_then(Value::as_array)
            .and_then(|nodes| nodes.iter().find(|n| n["id"] == "statefulset"))
            .is_some_and(|n| n["phase"] == "WaitingReady");
        let claim = claims.get_opt("data-orders-0").await.map_err(|e| e.to_string())?;
        let pending = claim.and_then(|c| c.status?.phase).as_deref() == Some("Pending");
        if waiting && pending {
            Ok(())
        } else {
            Err(format!("claim pending: {pending}; status {:?}", obj.data.get("status")))
        }
    })
    .await;
    let obj = databases.get("orders").await.unwrap();
    assert_eq!(instance_condition(&obj, "Ready").map(|c| c.0).as_deref(), Some("False"));
    let pod = pods.get("orders-0").await.unwrap();
    assert_eq!(pod.spec.and_then(|s| s.node_name), None, "no node before the volume");

    // A volume of the class: the volume controller binds the claim, the scheduler places
    // the pod, kwok runs it, and the StatefulSet becomes ready.
    let volume: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": class},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": class,
            "hostPath": {"path": format!("/tmp/{class}")},
        },
    }))
    .unwrap();
    volumes.create(&Default::default(), &volume).await.unwrap();
    let obj = wait_instance(&databases, "orders", "Ready", "True", "Ready").await;
    let claim = claims.get("data-orders-0").await.unwrap();
    assert_eq!(claim.spec.unwrap().volume_name.as_deref(), Some(class.as_str()));
    assert_eq!(claim.status.unwrap().phase.as_deref(), Some("Bound"));
    let pod = pods.get("orders-0").await.unwrap();
    assert!(
        pod.spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .is_some_and(|n| n.starts_with("kwok-node-")),
        "the pod runs on a simulated node"
    );
    assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Running"));
    let nodes = status_field(&obj, "/nodes").unwrap().as_array().unwrap();
    let kinds: Vec<&str> = nodes.iter().filter_map(|n| n["kind"].as_str()).collect();
    assert_eq!(kinds, ["Secret", "Service", "StatefulSet"]);

    // The module's status, from the live Service and StatefulSet; of the Secret, its name.
    let host = format!("orders-0.orders.{}.svc.cluster.local", env.namespace);
    wait_for("endpoint and a ready server in the status", WAIT, || async {
        let obj = databases.get("orders").await.map_err(|e| e.to_string())?;
        let field = |name: &str| status_field(&obj, &format!("/{name}")).cloned();
        let want = [
            ("host", json!(host)),
            ("port", json!(5432)),
            ("endpoint", json!(format!("{host}:5432"))),
            ("secretName", json!("orders-credentials")),
            ("database", json!("app")),
            ("readyReplicas", json!(1)),
        ];
        match want.iter().find(|(name, value)| field(name).as_ref() != Some(value)) {
            None => Ok(()),
            Some((name, _)) => Err(format!("{name}: {:?}", obj.data.get("status"))),
        }
    })
    .await;

    // The StatefulSet reads the Secret by name; the password Pequod generated is in the
    // Secret only.
    let statefulsets: Api<StatefulSet> = Api::namespaced(env.client.clone(), &env.namespace);
    let sts = statefulsets.get("orders").await.unwrap();
    let env_vars = sts.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    let password_ref = env_vars
        .iter()
        .find(|e| e.name == "POSTGRES_PASSWORD")
        .and_then(|e| e.value_from.as_ref()?.secret_key_ref.clone())
        .unwrap();
    assert_eq!(
        (password_ref.name.as_str(), password_ref.key.as_str()),
        ("orders-credentials", "password")
    );
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let secret = secrets.get("orders-credentials").await.unwrap();
    let data = secret.data.clone().unwrap();
    assert_eq!(data["username"].0, b"app");
    let password = String::from_utf8(data["password"].0.clone()).unwrap();
    assert_eq!(password.len(), 48);
    assert!(password.chars().all(|c| c.is_ascii_hexdigit()), "{password}");
    let encoded = serde_json::to_value(&data["password"])
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let graph = format!("database.{}-orders", group(&env));
    let secret_forms = [password.clone(), encoded];
    let found = leaks(&env, &databases, &graph, &secret_forms).await;
    assert!(found.is_empty(), "{found:?}");

    // A change renders and applies the graph again; the Secret, created once, is not
    // written again, so the database keeps the password it started with.
    apply_instance(
        &databases,
        &api_version,
        "Database",
        "orders",
        json!({"storage": "1Gi", "storageClassName": class, "resources": {"cpu": "500m", "memory": "1Gi"}}),
    )
    .await;
    wait_for("the new resources rolled out", WAIT, || async {
        let sts = statefulsets.get("orders").await.map_err(|e| e.to_string())?;
        let cpu = sts.spec.as_ref().and_then(|s| {
            let c = &s.template.spec.as_ref()?.containers[0];
            c.resources.as_ref()?.requests.as_ref()?.get("cpu").cloned()
        });
        let status = sts.status.clone().unwrap_or_default();
        let rolled = status.update_revision.is_some()
            && status.current_revision == status.update_revision
            && status.ready_replicas == Some(1);
        match cpu {
            Some(q) if q.0 == "500m" && rolled => Ok(()),
            other => Err(format!("{other:?} {status:?}")),
        }
    })
    .await;
    wait_instance(&databases, "orders", "Ready", "True", "Ready").await;
    let again = secrets.get("orders-credentials").await.unwrap();
    assert_eq!(again.metadata.resource_version, secret.metadata.resource_version);
    assert_eq!(again.data.unwrap()["password"], data["password"]);
    let found = leaks(&env, &databases, &graph, &secret_forms).await;
    assert!(found.is_empty(), "{found:?}");

    // Deleting the Database deletes its objects, the Secret with them; its volume's claim is
    // kept (retainVolumes defaults to true).
    databases.delete("orders", &DeleteParams::default()).await.unwrap();
    wait_for("the Database and its objects to be gone", WAIT, || async {
        let gone = (
            databases.get_opt("orders").await.map_err(|e| e.to_string())?.is_none(),
            statefulsets
                .get_opt("orders")
                .await
                .map_err(|e| e.to_string())?
                .is_none(),
            secrets
                .get_opt("orders-credentials")
                .await
                .map_err(|e| e.to_string())?
                .is_none(),
        );
        if gone == (true, true, true) {
            Ok(())
        } else {
            Err(format!("{gone:?}"))
        }
    })
    .await;
    assert!(
        claims.get_opt("data-orders-0").await.unwrap().is_some(),
        "the claim is kept"
    );

    delete_transform(&transforms, "database").await;
    claims.delete("data-orders-0", &DeleteParams::default()).await.unwrap();
    volumes.delete(&class, &DeleteParams::default()).await.unwrap();
    classes.delete(&class, &DeleteParams::default()).await.unwrap();
    env.cleanup().await;
}

/// Rights used: write ResourceGraphs in one namespace (and read them, as that right brings).
/// A graph an instance had, copied while it existed and re-created verbatim (without its owner
/// reference) after the instance was deleted, must not act with the Transform's authority: the
/// instance is gone, so nobody asked for its objects any more.
#[tokio::test]
async fn a_signed_graph_re_created_after_its_instance_was_deleted_acts_with_no_authority() {
    let (env, transforms) = setup("signed-replay").await;
    let user = format!("dev-{}", env.namespace);
    let (grants, graphs, api_version) = serve_grants(&env, &transforms, &user).await;
    let graph = format!("grant.{}-mine", group(&env));
    let role = format!("{}-mine", env.namespace);
    apply_instance(&grants, &api_version, "Grant", "mine", json!({})).await;
    wait_instance(&grants, "mine", "Ready", "True", "Ready").await;
    let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(env.client.clone());
    assert!(roles.get_opt(&role).await.unwrap().is_some());

    // The user keeps a copy of the signed graph, as anyone who may read graphs can.
    let signed = graphs.get(&graph).await.unwrap();
    let copy = json!({
        "apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph",
        "metadata": {"name": graph, "annotations": signed.annotations(), "labels": signed.labels()},
        "spec": signed.spec,
    });

    // The instance is deleted, with its graph and its ClusterRole.
    support::delete_and_wait_gone(&grants, "mine", WAIT).await;
    wait_for("the graph deleted with its instance", WAIT, || async {
        match graphs.get_opt(&graph).await {
            Ok(None) => Ok(()),
            other => Err(format!("{:?}", other.map(|g| g.map(|g| g.status)))),
        }
    })
    .await;
    wait_for("the ClusterRole deleted", WAIT, || async {
        match roles.get_opt(&role).await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    let out = kubectl_as(&env, &user, &["apply", "-f", "-"], &copy.to_string());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reason = acting_reason(&graphs, &graph).await;
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let recreated = roles.get_opt(&role).await.unwrap().is_some();
    assert!(
        reason != "TransformAuthority" && !recreated,
        "the replayed graph of a deleted instance acts with its Transform's authority ({reason}); ClusterRole \
         {role} re-created: {recreated}"
    );

    forget_grants(env, &transforms, &graphs, &graph, &role).await;
}

/// Rights used: write ResourceGraphs in one namespace. Taking the owner reference off an
/// instance's signed graph (metadata is not signed) detaches it: the instance's deletion must
/// still take the graph's objects with it, and the detached graph must not keep acting with
/// the Transform's authority.
#[tokio::test]
async fn a_signed_graph_detached_from_its_instance_does_not_outlive_it() {
    let (env, transforms) = setup("signed-detach").await;
    let user = format!("dev-{}", env.namespace);
    let (grants, graphs, api_version) = serve_grants(&env, &transforms, &user).await;
    let graph = format!("grant.{}-kept", group(&env));
    let role = format!("{}-kept", env.namespace);
    apply_instance(&grants, &api_version, "Grant", "kept", json!({})).await;
    wait_instance(&grants, "kept", "Ready", "True", "Ready").await;
    let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(env.client.clone());
    assert!(roles.get_opt(&role).await.unwrap().is_some());

    patch_graph_as(
        &env,
        &user,
        &graph,
        r#"[{"op": "remove", "path": "/metadata/ownerReferences"}]"#,
    );
    support::delete_and_wait_gone(&grants, "kept", WAIT).await;

    let outcome = wait_for(
        "the instance's objects gone with it",
        std::time::Duration::from_secs(60),
        || async {
            let role_left = roles.get_opt(&role).await.map_err(|e| e.to_string())?.is_some();
            let graph = graphs.get_opt(&graph).await.map_err(|e| e.to_string())?;
            let authority = graph
                .as_ref()
                .and_then(|g| g.status.as_ref())
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Authorized"))
                .map(|c| c.reason.clone());
            if !role_left && authority.as_deref() != Some("TransformAuthority") {
                Ok(())
            } else {
                Err(format!(
                    "ClusterRole {role} left: {role_left}; graph left: {}, Authorized: {authority:?}",
                    graph.is_some()
                ))
            }
        },
    );
    outcome.await;

    forget_grants(env, &transforms, &graphs, &graph, &role).await;
}

/// Rights used: own a Transform, with its status (`transforms/status`), and edit its
/// instances. `status.servedDigests` decides which module versions an instance may be pinned
/// to; a version of another Transform's module written into it must still be refused.
#[tokio::test]
async fn a_version_written_into_served_digests_by_hand_is_not_served() {
    let (env, transforms) = setup("served-by-hand").await;
    let group = group(&env);
    let api_version = format!("{group}/v1alpha1");
    let (note, memo_digest) = serve_note_and_memo(&env, &transforms).await;

    // The owner of `note` adds memo's version to note's served versions.
    let mut forged = served(&note);
    forged.push(memo_digest.clone());
    transforms
        .patch_status(
            "note",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"servedDigests": forged}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;

    let notes = support::dynamic_api(&env.client, &api_version, "Note", &env.namespace).await;
    let obj = json!({"apiVersion": api_version, "kind": "Note",
        "metadata": {"name": "alpha", "annotations": {"pequod.io/pinned-module-digest": memo_digest}},
        "spec": {"text": "a"}});
    notes
        .patch("alpha", &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(obj))
        .await
        .unwrap();
    let configmaps: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    let rendered_by_memo = wait_for("the pin decided", WAIT, || async {
        if configmaps
            .get_opt("memo-alpha")
            .await
            .map_err(|e| e.to_string())?
            .is_some()
        {
            return Ok(true);
        }
        let obj = notes.get("alpha").await.map_err(|e| e.to_string())?;
        match instance_condition(&obj, "Rendered") {
            Some((s, r, _)) if s == "False" && r == "VersionNotServed" => Ok(false),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        !rendered_by_memo,
        "an instance of note was rendered with memo's module, whose version was written into note's status by hand"
    );

    let _ = notes.delete("alpha", &DeleteParams::default()).await;
    for name in ["note", "memo"] {
        delete_transform(&transforms, name).await;
    }
    env.cleanup().await;
}

/// A new instance costs seven writes: its three objects, its graph and the graph's status, its
/// finalizer and its status (written once, when the graph first reports); no event repeats
/// what the conditions say. Its graph is read from the operator's cache, not the apiserver,
/// once it holds the render.
#[tokio::test]
async fn a_new_instance_converges_in_seven_writes_and_without_events() {
    let (env, transforms) = setup("instance-writes").await;
    put_module(
        &env.client,
        &env.namespace,
        "chain-module",
        crate::support::modules::CHAIN_MODULE,
    )
    .await;
    apply_transform(
        &transforms,
        "chain",
        json!({"cueRef": {"type": "configmap", "ref": "chain-module"}, "group": group(&env),
               "managedResources": [{"resources": ["configmaps"]}]}),
    )
    .await;
    support::wait_transform_ready(&transforms, "chain").await;
    let api_version = format!("{}/v1alpha1", group(&env));
    let chains = support::dynamic_api(&env.client, &api_version, "Chain", &env.namespace).await;

    const INSTANCES: u64 = 5;
    let mark = support::control_plane::audit_mark();
    for i in 0..INSTANCES {
        apply_instance(
            &chains,
            &api_version,
            "Chain",
            &format!("c{i}"),
            json!({"value": format!("v{i}")}),
        )
        .await;
    }
    for i in 0..INSTANCES {
        wait_instance(&chains, &format!("c{i}"), "Ready", "True", "Ready").await;
    }
    // Writes that trail Ready belong to converging.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let writes = support::control_plane::writes_in(mark, &env.namespace);
    let count = |key: &str| writes.get(key).copied().unwrap_or(0);
    assert_eq!(count("patch configmaps"), 3 * INSTANCES, "{writes:?}");
    assert_eq!(
        count("patch resourcegraphs"),
        INSTANCES,
        "the graph, with its finalizer: {writes:?}"
    );
    assert_eq!(count("patch chains"), INSTANCES, "the finalizer: {writes:?}");
    assert_eq!(count("patch chains/status"), INSTANCES, "one status each: {writes:?}");
    assert_eq!(count("patch resourcegraphs/status"), INSTANCES, "{writes:?}");
    // Each graph is read from the apiserver once, before it is first written: the next passes
    // find it in the graph cache, as written when the watch has not brought it yet.
    let requests = support::control_plane::requests_in(mark, &env.namespace);
    let graph_reads = requests.get("get resourcegraphs").copied().unwrap_or(0);
    assert!(graph_reads <= INSTANCES, "{requests:?}");
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(env.client.clone(), &env.namespace);
    let about_instances: Vec<String> = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| matches!(e.involved_object.kind.as_deref(), Some("Chain" | "ResourceGraph")))
        .map(|e| format!("{:?} {:?}", e.involved_object.name, e.reason))
        .collect();
    assert!(
        about_instances.is_empty(),
        "no event repeats a condition: {about_instances:?}"
    );
    env.cleanup().await;
}
