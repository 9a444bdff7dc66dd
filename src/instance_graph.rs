//! Platform instances, the pure parts: names, labels and the ResourceGraph rendered from an
//! instance.

use crate::api::condition_types::READY;
use crate::api::names::{
    GRAPH_FINALIZER, INSTANCE_GROUP_LABEL, INSTANCE_KIND_LABEL, INSTANCE_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE,
    TRANSFORM_LABEL,
};
use crate::api::reasons;
pub use crate::naming::label_value;
use crate::naming::{MAX_SUBDOMAIN, shortened_name};
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use sha2::{Digest, Sha256};

use serde_json::{Value, json};

use crate::api::{
    ConditionStatus, GraphPhase, InstancePhase, MAX_NODE_SUMMARIES, Node, NodeSummary, ResourceGraph,
    ResourceGraphSpec, Severity, SourceRef, Violation,
};

use crate::cue::RenderOutput;

/// Identity of an instance of a generated kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRef {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub namespace: String,
    pub uid: Option<String>,
}

/// Name of an instance's ResourceGraph: `<kind>.<group>-<name>` in lower case, so that
/// instances of same-named kinds of two API groups never share a graph. Names that would
/// exceed the apiserver's limit (253) are shortened with a hash suffix.
pub fn graph_name(kind: &str, group: &str, name: &str) -> String {
    shortened_name(
        &format!("{}.{}-{}", kind.to_ascii_lowercase(), group.to_ascii_lowercase(), name),
        MAX_SUBDOMAIN,
    )
}

/// The name earlier releases gave an instance's graph, `<kind>-<name>`: a graph of that name
/// owned by the instance is taken over by the one of [`graph_name`].
pub fn legacy_graph_name(kind: &str, name: &str) -> String {
    shortened_name(&format!("{}-{}", kind.to_ascii_lowercase(), name), MAX_SUBDOMAIN)
}

/// The API group of an `apiVersion` (empty for the core group).
pub fn group_of(api_version: &str) -> &str {
    api_version.rsplit_once('/').map_or("", |(g, _)| g)
}

/// Hash over everything a render depends on: the module's content and the input.
pub fn render_hash(module_digest: &str, input_hash: &str) -> String {
    let digest = Sha256::digest(format!("{module_digest}\n{input_hash}").as_bytes());
    format!("sha256:{}", hex::encode(digest))
}

/// The labels that find an instance's graph: by Transform, and by the instance's name and kind.
fn graph_labels(instance: &InstanceRef, transform: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
        (TRANSFORM_LABEL.to_string(), label_value(transform)),
        (INSTANCE_LABEL.to_string(), label_value(&instance.name)),
        (INSTANCE_KIND_LABEL.to_string(), label_value(&instance.kind)),
        (
            INSTANCE_GROUP_LABEL.to_string(),
            label_value(group_of(&instance.api_version)),
        ),
    ])
}

/// The ResourceGraph an instance renders to, owned by the instance when its uid is known.
pub fn resource_graph(
    instance: &InstanceRef,
    transform: &str,
    render_hash: &str,
    output: &RenderOutput,
    rendered_at: Time,
) -> ResourceGraph {
    let labels = graph_labels(instance, transform);
    let owner = instance.uid.as_ref().map(|uid| OwnerReference {
        api_version: instance.api_version.clone(),
        kind: instance.kind.clone(),
        name: instance.name.clone(),
        uid: uid.clone(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    });
    ResourceGraph {
        metadata: ObjectMeta {
            name: Some(graph_name(
                &instance.kind,
                group_of(&instance.api_version),
                &instance.name,
            )),
            namespace: Some(instance.namespace.clone()),
            labels: Some(labels),
            owner_references: owner.map(|o| vec![o]),
            // Set in the same write that creates the graph, so that the graph controller
            // need not write it again.
            finalizers: Some(vec![GRAPH_FINALIZER.to_string()]),
            ..Default::default()
        },
        spec: ResourceGraphSpec {
            source_ref: Some(SourceRef {
                api_version: instance.api_version.clone(),
                kind: instance.kind.clone(),
                name: instance.name.clone(),
                namespace: Some(instance.namespace.clone()),
                uid: instance.uid.clone(),
            }),
            service_account_name: None,
            metadata: output.metadata.clone(),
            graph: crate::api::Graph {
                nodes: output.nodes.clone(),
            },
            violations: output.violations.clone(),
            render_hash: Some(render_hash.to_string()),
            rendered_at: Some(rendered_at),
            outputs: output.status.clone(),
            legacy_shape: false,
        },
        status: None,
    }
}

/// How a kind's objects are scoped, as discovery reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Namespaced,
    Cluster,
    /// Discovery does not know the kind; the executor reports it when applying.
    Unknown,
}

/// Keeps every rendered object inside the instance's namespace: a missing namespace is filled
/// in, another namespace is a violation (except for a `Read` node, which the executor checks
/// against the Transform's readNamespaces), and cluster-scoped objects are violations unless
/// the Transform allows them. A developer must not reach outside their namespace through a
/// module.
pub fn confine(
    nodes: &mut [Node],
    namespace: &str,
    allow_cluster_scoped: bool,
    scope_of: impl Fn(&Node) -> Scope,
) -> Vec<Violation> {
    let mut violations = Vec::new();
    for node in nodes.iter_mut() {
        let scope = scope_of(node);
        let kind = node.kind().to_string();
        // What a Read node may read elsewhere is the executor's to decide, with its
        // Transform's readNamespaces and the rights of whoever reads.
        let read = node.is_read();
        let Some(meta) = node.object.get_mut("metadata").and_then(Value::as_object_mut) else {
            continue;
        };
        let name = meta.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
        let declared = meta
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .map(str::to_string);
        match scope {
            Scope::Cluster if !allow_cluster_scoped => violations.push(Violation {
                path: format!("nodes.{}", node.id),
                message: format!(
                    "{kind} {name} is cluster-scoped; the Transform does not allow cluster-scoped objects \
                     (spec.allowClusterScopedResources)"
                ),
                severity: Severity::Error,
            }),
            Scope::Cluster => {}
            Scope::Namespaced | Scope::Unknown => match declared {
                Some(other) if other != namespace && !read => violations.push(Violation {
                    path: format!("nodes.{}.metadata.namespace", node.id),
                    message: format!(
                        "{kind} {name} targets namespace {other}; objects of an instance must stay in its namespace {namespace}"
                    ),
                    severity: Severity::Error,
                }),
                Some(_) => {}
                None if scope == Scope::Namespaced => {
                    meta.insert("namespace".into(), json!(namespace));
                }
                None => {}
            },
        }
    }
    violations
}

/// Adds the module's readiness expressions (`#Metadata.readyWhen`, by node id) to the nodes
/// they name, as `Expression` gates.
pub fn with_module_gates(mut nodes: Vec<Node>, ready_when: &BTreeMap<String, String>) -> Vec<Node> {
    for node in &mut nodes {
        if let Some(expression) = ready_when.get(&node.id) {
            node.ready_when.push(crate::api::ReadyGate {
                type_: crate::api::ReadyGateType::Expression,
                condition_type: None,
                condition_status: None,
                path: None,
                value: None,
                expression: Some(expression.clone()),
                timeout: None,
            });
        }
    }
    nodes
}

/// Most characters of a node message kept in an instance's status.
const MAX_SUMMARY_MESSAGE: usize = 256;

/// One line per node of the graph, in spec order, bounded in number and length.
pub fn node_summaries(rg: &ResourceGraph) -> Vec<NodeSummary> {
    let states = rg.status.as_ref().map(|s| &s.node_states);
    rg.spec
        .graph
        .nodes
        .iter()
        .take(MAX_NODE_SUMMARIES)
        .map(|node| {
            let state = states.and_then(|s| s.get(&node.id));
            let message = state
                .and_then(|s| s.last_error.clone().or_else(|| s.message.clone()))
                .map(|m| {
                    if m.chars().count() > MAX_SUMMARY_MESSAGE {
                        m.chars().take(MAX_SUMMARY_MESSAGE - 1).collect::<String>() + "…"
                    } else {
                        m
                    }
                });
            NodeSummary {
                id: node.id.clone(),
                kind: node.kind().to_string(),
                name: node.name().to_string(),
                phase: state.map(|s| s.phase).unwrap_or(crate::api::NodePhase::Pending),
                message,
            }
        })
        .collect()
}

/// The instance's phase and Ready condition (status, reason, message) from its graph. A graph
/// whose status predates its spec is still being applied, whatever its status says.
pub fn graph_progress(rg: &ResourceGraph) -> (InstancePhase, bool, String, String) {
    let Some(status) = rg
        .status
        .as_ref()
        .filter(|s| s.observed_generation == rg.metadata.generation)
    else {
        return (
            InstancePhase::Applying,
            false,
            reasons::APPLYING.into(),
            "the ResourceGraph is being applied".into(),
        );
    };
    let ready = status.conditions.iter().find(|c| c.type_ == READY);
    let message = ready.map(|c| c.message.clone()).unwrap_or_default();
    match status.phase {
        Some(GraphPhase::Completed) if ready.is_some_and(|c| c.status == ConditionStatus::True) => (
            InstancePhase::Ready,
            true,
            reasons::READY.into(),
            format!("all {} resources are ready", rg.spec.graph.nodes.len()),
        ),
        Some(GraphPhase::Failed) => (
            InstancePhase::Failed,
            false,
            ready
                .map(|c| c.reason.clone())
                .unwrap_or_else(|| reasons::GRAPH_FAILED.into()),
            message,
        ),
        _ => (
            InstancePhase::Applying,
            false,
            ready
                .map(|c| c.reason.clone())
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| reasons::APPLYING.into()),
            message,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Condition, NodePhase, NodeState, ResourceGraphStatus};

    #[test]
    fn graph_names_separate_kinds_and_groups_and_stay_within_limits() {
        let g = "apps.example.com";
        assert_eq!(
            graph_name("WebService", g, "my-app"),
            "webservice.apps.example.com-my-app"
        );
        assert_ne!(graph_name("WebService", g, "x"), graph_name("Worker", g, "x"));
        assert_ne!(
            graph_name("WebService", g, "x"),
            graph_name("WebService", "web.example.com", "x")
        );
        let long = graph_name("WebService", g, &"a".repeat(300));
        assert_eq!(long.len(), 253);
        assert_ne!(long, graph_name("WebService", g, &"a".repeat(299)));
        assert_eq!(legacy_graph_name("WebService", "my-app"), "webservice-my-app");
    }

    #[test]
    fn graph_names_at_the_limit_are_kept_and_beyond_it_shortened_as_before() {
        let prefix = "webservice.apps.example.com-";
        let fits = "a".repeat(253 - prefix.len());
        assert_eq!(
            graph_name("WebService", "apps.example.com", &fits),
            format!("{prefix}{fits}")
        );
        // The form earlier releases gave a name over the limit, so their graphs are found again.
        let over = format!("{prefix}{fits}b");
        let hash = hex::encode(Sha256::digest(over.as_bytes()));
        assert_eq!(
            graph_name("WebService", "apps.example.com", &format!("{fits}b")),
            format!("{}-{}", &over[..236], &hash[..16])
        );
        let legacy = legacy_graph_name("WebService", &"a".repeat(253));
        assert_eq!(legacy.len(), 253);
        assert!(crate::naming::is_dns1123_subdomain(&legacy));
    }

    #[test]
    fn a_long_instance_name_gives_a_graph_with_valid_labels_only() {
        for length in [33, 34, 60, 63, 64, 253] {
            let instance = InstanceRef {
                api_version: "apps.example.com/v1alpha1".into(),
                kind: "WebService".into(),
                name: "a".repeat(length),
                namespace: "team".into(),
                uid: None,
            };
            let output = RenderOutput {
                metadata: None,
                nodes: Vec::new(),
                violations: Vec::new(),
                status: Default::default(),
            };
            let rg = resource_graph(
                &instance,
                &"t".repeat(length),
                "h",
                &output,
                Time(jiff::Timestamp::UNIX_EPOCH),
            );
            for (key, value) in rg.metadata.labels.unwrap() {
                assert_eq!(crate::naming::label_problem(&key, &value), None, "{length}");
            }
            let name = rg.metadata.name.unwrap();
            assert!(crate::naming::is_dns1123_subdomain(&name), "{name}");
        }
    }

    #[test]
    fn long_groups_become_distinct_label_values() {
        assert_eq!(label_value("apps.example.com"), "apps.example.com");
        let a = label_value(&format!("{}.a.example.com", "x".repeat(60)));
        let b = label_value(&format!("{}.b.example.com", "x".repeat(60)));
        assert!(a.len() <= 63 && b.len() <= 63);
        assert_ne!(a, b);
    }

    #[test]
    fn graph_is_labelled_owned_and_hashed() {
        let instance = InstanceRef {
            api_version: "apps.example.com/v1alpha1".into(),
            kind: "WebService".into(),
            name: "my-app".into(),
            namespace: "team".into(),
            uid: Some("uid-1".into()),
        };
        let output = RenderOutput {
            metadata: None,
            nodes: Vec::new(),
            violations: Vec::new(),
            status: Default::default(),
        };
        let hash = render_hash("sha256:m", "sha256:i");
        assert_ne!(hash, render_hash("sha256:m2", "sha256:i"));
        let now = Time(jiff::Timestamp::UNIX_EPOCH);
        let rg = resource_graph(&instance, "webservice", &hash, &output, now);
        let labels = rg.metadata.labels.unwrap();
        assert_eq!(labels[INSTANCE_LABEL], "my-app");
        assert_eq!(labels[INSTANCE_KIND_LABEL], "WebService");
        assert_eq!(labels[INSTANCE_GROUP_LABEL], "apps.example.com");
        assert_eq!(labels[TRANSFORM_LABEL], "webservice");
        let owner = &rg.metadata.owner_references.unwrap()[0];
        assert_eq!((owner.uid.as_str(), owner.controller), ("uid-1", Some(true)));
        assert_eq!(rg.spec.render_hash.as_deref(), Some(hash.as_str()));
        assert_eq!(rg.metadata.namespace.as_deref(), Some("team"));
    }

    fn nodes(objects: &[Value]) -> Vec<Node> {
        objects
            .iter()
            .enumerate()
            .map(|(i, o)| serde_json::from_value(json!({"id": format!("n{i}"), "object": o})).unwrap())
            .collect()
    }

    fn scope(node: &Node) -> Scope {
        match node.kind() {
            "Namespace" | "ClusterRole" => Scope::Cluster,
            "Mystery" => Scope::Unknown,
            _ => Scope::Namespaced,
        }
    }

    #[test]
    fn confinement_fills_in_the_namespace_and_refuses_escapes() {
        let mut n = nodes(&[
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}}),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b", "namespace": "team"}}),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "c", "namespace": "kube-system"}}),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "d"}}),
            json!({"apiVersion": "x/v1", "kind": "Mystery", "metadata": {"name": "e"}}),
        ]);
        let violations = confine(&mut n, "team", false, scope);
        assert_eq!(n[0].object["metadata"]["namespace"], "team");
        assert!(n[4].object["metadata"].get("namespace").is_none());
        let paths: Vec<&str> = violations.iter().map(|v| v.path.as_str()).collect();
        assert_eq!(paths, ["nodes.n2.metadata.namespace", "nodes.n3"]);
        assert!(violations.iter().all(|v| v.severity == Severity::Error));
        assert!(violations[0].message.contains("kube-system"));
    }

    #[test]
    fn cluster_scoped_objects_pass_when_the_transform_allows_them() {
        let mut n = nodes(&[json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "d"}})]);
        assert!(confine(&mut n, "team", true, scope).is_empty());
    }

    fn graph_with(status: Option<ResourceGraphStatus>, generation: i64) -> ResourceGraph {
        let mut rg = ResourceGraph::new(
            "g",
            ResourceGraphSpec {
                source_ref: None,
                service_account_name: None,
                metadata: None,
                graph: crate::api::Graph {
                    nodes: nodes(&[json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}})]),
                },
                violations: Vec::new(),
                render_hash: None,
                rendered_at: None,
                outputs: Default::default(),
                legacy_shape: false,
            },
        );
        rg.metadata.generation = Some(generation);
        rg.status = status;
        rg
    }

    #[test]
    fn progress_follows_an_up_to_date_graph_only() {
        let ready = ResourceGraphStatus {
            phase: Some(GraphPhase::Completed),
            observed_generation: Some(2),
            conditions: vec![Condition::new("Ready", true, "Ready", "all nodes ready")],
            ..Default::default()
        };
        assert_eq!(
            graph_progress(&graph_with(Some(ready.clone()), 2)).0,
            InstancePhase::Ready
        );
        assert_eq!(graph_progress(&graph_with(Some(ready), 3)).0, InstancePhase::Applying);
        assert_eq!(graph_progress(&graph_with(None, 1)).0, InstancePhase::Applying);
        let failed = ResourceGraphStatus {
            phase: Some(GraphPhase::Failed),
            observed_generation: Some(1),
            conditions: vec![Condition::new("Ready", false, "ApplyFailed", "service: conflict")],
            ..Default::default()
        };
        let (phase, ok, reason, message) = graph_progress(&graph_with(Some(failed), 1));
        assert_eq!(
            (phase, ok, reason.as_str(), message.as_str()),
            (InstancePhase::Failed, false, "ApplyFailed", "service: conflict")
        );
    }

    #[test]
    fn summaries_name_each_node_with_its_state() {
        let mut status = ResourceGraphStatus::default();
        status.node_states.insert(
            "n0".into(),
            NodeState {
                message: Some("applying".into()),
                last_error: Some("x".repeat(1000)),
                ..NodeState::new(NodePhase::Error)
            },
        );
        let summaries = node_summaries(&graph_with(Some(status), 1));
        assert_eq!(summaries.len(), 1);
        assert_eq!(
            (summaries[0].kind.as_str(), summaries[0].name.as_str()),
            ("Service", "web")
        );
        assert_eq!(summaries[0].phase, NodePhase::Error);
        assert_eq!(summaries[0].message.as_ref().unwrap().chars().count(), 256);
    }
}
