//! Pure preparation and comparison of the objects a graph applies.

use crate::api::names::{
    DELETION_POLICY_ANNOTATION, GRAPH_LABEL, GRAPH_NAME_ANNOTATION, GRAPH_NAMESPACE_LABEL, GRAPH_UID_ANNOTATION,
    MANAGED_BY_LABEL, MANAGED_BY_VALUE, NODE_LABEL,
};
use crate::naming::label_value;
use serde_json::{Value, json};

use crate::api::Node;

/// The managers of `object` other than `manager`, sorted.
pub fn other_managers(object: &kube::api::DynamicObject, manager: &str) -> Vec<String> {
    let mut managers: Vec<String> = object
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .filter(|m| m != manager)
        .collect();
    managers.sort();
    managers.dedup();
    managers
}

/// Sets an annotation on an object about to be applied.
pub fn set_annotation(object: &mut Value, key: &str, value: &str) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
        if let Some(a) = annotations.as_object_mut() {
            a.insert(key.into(), json!(value));
        }
    }
}

/// The graph an object is applied for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphIdentity {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// The graph, in the same namespace, whose objects this one takes over: set only for a
    /// graph Pequod rendered and signed (see [`crate::api::names::PREDECESSOR_ANNOTATION`]).
    pub predecessor: Option<Predecessor>,
}

/// A graph another takes over from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Predecessor {
    pub uid: String,
    pub name: String,
}

impl Predecessor {
    /// Parses the annotation's `<uid>/<name>`.
    pub fn parse(value: &str) -> Option<Self> {
        let (uid, name) = value.split_once('/')?;
        (!uid.is_empty() && !name.is_empty()).then(|| Self {
            uid: uid.to_string(),
            name: name.to_string(),
        })
    }

    /// The annotation's value.
    pub fn annotation(&self) -> String {
        format!("{}/{}", self.uid, self.name)
    }
}

/// The object to apply for `node`: namespace defaulted (or removed for cluster-scoped kinds),
/// Pequod's labels added, and an owner reference to the graph where Kubernetes allows one
/// (same namespace only: owners cannot cross namespaces or scopes).
pub fn desired_object(node: &Node, graph: &GraphIdentity, namespaced: bool) -> Value {
    let mut object = node.object.clone();
    let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
        return object;
    };
    for server_owned in [
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "managedFields",
        "generation",
        "selfLink",
    ] {
        meta.remove(server_owned);
    }
    if namespaced {
        if meta.get("namespace").and_then(Value::as_str).is_none_or(str::is_empty) {
            meta.insert("namespace".into(), json!(graph.namespace));
        }
    } else {
        meta.remove("namespace");
    }
    let labels = meta.entry("labels").or_insert_with(|| json!({}));
    if let Some(labels) = labels.as_object_mut() {
        labels.insert(MANAGED_BY_LABEL.into(), json!(MANAGED_BY_VALUE));
        labels.insert(GRAPH_LABEL.into(), json!(label_value(&graph.name)));
        labels.insert(GRAPH_NAMESPACE_LABEL.into(), json!(label_value(&graph.namespace)));
        labels.insert(NODE_LABEL.into(), json!(label_value(&node.id)));
    }
    let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
    if let Some(annotations) = annotations.as_object_mut() {
        annotations.insert(GRAPH_UID_ANNOTATION.into(), json!(graph.uid));
        // Only where the label cannot hold the name, so that objects of other graphs stay as
        // earlier releases wrote them.
        if label_value(&graph.name) != graph.name {
            annotations.insert(GRAPH_NAME_ANNOTATION.into(), json!(graph.name));
        }
    }
    let same_namespace = namespaced && meta.get("namespace").and_then(Value::as_str) == Some(graph.namespace.as_str());
    if same_namespace {
        meta.insert(
            "ownerReferences".into(),
            json!([{
                "apiVersion": crate::api::API_VERSION,
                "kind": "ResourceGraph",
                "name": graph.name,
                "uid": graph.uid,
                "controller": true,
                "blockOwnerDeletion": true,
            }]),
        );
    }
    object
}

/// Whether an object's labels (`label` reads one) name the graph `name` in `namespace`, as
/// [`desired_object`] writes them.
pub fn labels_name_graph<'a>(label: impl Fn(&str) -> Option<&'a str>, name: &str, namespace: &str) -> bool {
    label(GRAPH_LABEL) == Some(label_value(name).as_str())
        && label(GRAPH_NAMESPACE_LABEL) == Some(label_value(namespace).as_str())
}

/// The graph an object's labels name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelledGraph<'a> {
    pub name: &'a str,
    /// Absent on objects labelled before graphs could write outside their namespace.
    pub namespace: Option<&'a str>,
}

/// The graph an object's labels (`label` reads one) name, with its full name from
/// [`GRAPH_NAME_ANNOTATION`] (`annotation` reads one) when the label holds the shortened form
/// of that name; None when the object carries no graph label.
pub fn labelled_graph<'a>(
    label: impl Fn(&str) -> Option<&'a str>,
    annotation: impl Fn(&str) -> Option<&'a str>,
) -> Option<LabelledGraph<'a>> {
    let labelled = label(GRAPH_LABEL)?;
    Some(LabelledGraph {
        name: crate::naming::labelled_name(labelled, annotation(GRAPH_NAME_ANNOTATION)),
        namespace: label(GRAPH_NAMESPACE_LABEL),
    })
}

/// Whether `live` already holds every field of `desired` with the same value: then applying
/// would change nothing and is skipped. Lists must match element by element.
pub fn contains(live: &Value, desired: &Value) -> bool {
    first_difference(live, desired).is_none()
}

/// Where `live` first differs from `desired` (the JSON pointer of a field `desired` sets and
/// `live` lacks or holds another value; empty for the whole value), or None when `live` holds
/// every field of `desired`.
pub fn first_difference(live: &Value, desired: &Value) -> Option<String> {
    let same = match (live, desired) {
        (Value::Object(l), Value::Object(d)) => {
            return d.iter().find_map(|(k, dv)| match l.get(k) {
                None => Some(format!("/{k}")),
                Some(lv) => first_difference(lv, dv).map(|rest| format!("/{k}{rest}")),
            });
        }
        (Value::Array(l), Value::Array(d)) if l.len() == d.len() => {
            return l
                .iter()
                .zip(d)
                .enumerate()
                .find_map(|(i, (lv, dv))| first_difference(lv, dv).map(|rest| format!("/{i}{rest}")));
        }
        (Value::Number(l), Value::Number(d)) => l.as_f64() == d.as_f64(),
        (l, d) => l == d,
    };
    (!same).then(String::new)
}

/// A field `manager` set with server-side apply that `desired` no longer declares (a dotted
/// path), or None. Applying then removes it: skipping the apply because `live` holds every
/// desired field would leave it behind. Fields are followed through maps only; list items
/// (`k:`, `v:`, `i:` entries) count as present when their list is declared.
/// The field set may be the JSON text the object caches keep (see
/// [`crate::controller::cache::trim_applied`]).
pub fn stale_field(live: &Value, desired: &Value, manager: &str) -> Option<String> {
    let owned = live["metadata"]["managedFields"]
        .as_array()?
        .iter()
        .find(|m| m["manager"] == manager && m["operation"] == "Apply")?
        .get("fieldsV1")?;
    match owned {
        Value::String(text) => missing_field(&serde_json::from_str(text).ok()?, desired, ""),
        tree => missing_field(tree, desired, ""),
    }
}

fn missing_field(owned: &Value, desired: &Value, prefix: &str) -> Option<String> {
    let fields = owned.as_object()?;
    fields.iter().find_map(|(key, below)| {
        let name = key.strip_prefix("f:")?;
        let path = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        };
        match desired.get(name) {
            None => Some(path),
            Some(value) if value.is_object() => missing_field(below, value, &path),
            Some(_) => None,
        }
    })
}

/// Whether an object asks to be left running when Pequod lets go of it.
pub fn is_orphan(object: &Value) -> bool {
    object
        .pointer(&format!(
            "/metadata/annotations/{}",
            DELETION_POLICY_ANNOTATION.replace('/', "~1")
        ))
        .and_then(Value::as_str)
        .is_some_and(|v| v.eq_ignore_ascii_case("orphan"))
}

/// `group/version/Kind` (`v1/Service` for the core group): the `gvk` metric label.
pub fn gvk_label(api_version: &str, kind: &str) -> String {
    format!("{api_version}/{kind}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph() -> GraphIdentity {
        GraphIdentity {
            name: "g".into(),
            namespace: "team".into(),
            uid: "uid-1".into(),
            predecessor: None,
        }
    }

    fn node(object: Value) -> Node {
        serde_json::from_value(json!({"id": "svc", "object": object})).unwrap()
    }

    #[test]
    fn namespaced_objects_get_namespace_labels_and_owner() {
        let n = node(
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "labels": {"app": "x"}, "resourceVersion": "5"}}),
        );
        let o = desired_object(&n, &graph(), true);
        assert_eq!(o["metadata"]["namespace"], "team");
        assert_eq!(o["metadata"]["labels"]["app"], "x");
        assert_eq!(o["metadata"]["labels"][GRAPH_LABEL], "g");
        assert_eq!(o["metadata"]["labels"][NODE_LABEL], "svc");
        assert_eq!(o["metadata"]["labels"][MANAGED_BY_LABEL], "pequod");
        assert_eq!(o["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        assert_eq!(o["metadata"]["annotations"]["pequod.io/resourcegraph-uid"], "uid-1");
        assert!(o["metadata"].get("resourceVersion").is_none());
    }

    #[test]
    fn cluster_scoped_and_foreign_namespace_objects_get_marks_but_no_owner() {
        let n = node(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n", "namespace": "x"}}));
        let o = desired_object(&n, &graph(), false);
        assert!(o["metadata"].get("namespace").is_none());
        assert!(o["metadata"].get("ownerReferences").is_none());
        assert_eq!(o["metadata"]["labels"][GRAPH_NAMESPACE_LABEL], "team");
        assert_eq!(o["metadata"]["annotations"]["pequod.io/resourcegraph-uid"], "uid-1");
        let elsewhere =
            node(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "other"}}));
        let o = desired_object(&elsewhere, &graph(), true);
        assert_eq!(o["metadata"]["namespace"], "other");
        assert!(o["metadata"].get("ownerReferences").is_none());
    }

    #[test]
    fn short_names_are_labelled_as_before_and_long_ones_are_shortened_and_found_again() {
        let n = node(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}));
        let o = desired_object(&n, &graph(), true);
        assert!(o["metadata"]["annotations"].get(GRAPH_NAME_ANNOTATION).is_none());
        for length in [62, 63, 64, 253] {
            let long = GraphIdentity {
                name: "g".repeat(length),
                ..graph()
            };
            let o = desired_object(&n, &long, true);
            let meta = &o["metadata"];
            let labelled = meta["labels"][GRAPH_LABEL].as_str().unwrap();
            assert!(crate::naming::is_label_value(labelled) && labelled.len() <= 63);
            assert_eq!(labelled == long.name, length <= 63, "{length}");
            assert_eq!(meta["ownerReferences"][0]["name"], json!(long.name));
            let label = |key: &str| meta["labels"][key].as_str();
            let annotation = |key: &str| meta["annotations"][key].as_str();
            assert!(labels_name_graph(label, &long.name, "team"), "{length}");
            assert!(!labels_name_graph(label, &long.name, "other"));
            assert!(!labels_name_graph(label, &"g".repeat(length + 1), "team"));
            assert_eq!(
                labelled_graph(label, annotation),
                Some(LabelledGraph {
                    name: long.name.as_str(),
                    namespace: Some("team")
                })
            );
        }
    }

    #[test]
    fn a_name_annotation_that_does_not_match_the_label_is_ignored() {
        let meta = json!({"labels": {GRAPH_LABEL: "web"}, "annotations": {GRAPH_NAME_ANNOTATION: "other"}});
        let found = labelled_graph(|k| meta["labels"][k].as_str(), |k| meta["annotations"][k].as_str());
        assert_eq!(
            found,
            Some(LabelledGraph {
                name: "web",
                namespace: None
            })
        );
        assert_eq!(labelled_graph(|_| None, |_| Some("x")), None);
    }

    #[test]
    fn contains_ignores_server_added_fields_but_not_changed_ones() {
        let desired = json!({"spec": {"replicas": 3, "ports": [{"port": 80}]}});
        let live =
            json!({"spec": {"replicas": 3, "ports": [{"port": 80, "protocol": "TCP"}], "strategy": {}}, "status": {}});
        assert!(contains(&live, &desired));
        assert!(!contains(
            &json!({"spec": {"replicas": 5, "ports": [{"port": 80}]}}),
            &desired
        ));
        assert!(!contains(&json!({"spec": {"replicas": 3, "ports": []}}), &desired));
        assert!(contains(&json!({"a": 1.0}), &json!({"a": 1})));
    }

    #[test]
    fn orphan_annotation_is_read_case_insensitively() {
        assert!(is_orphan(
            &json!({"metadata": {"annotations": {"pequod.io/deletion-policy": "Orphan"}}})
        ));
        assert!(is_orphan(
            &json!({"metadata": {"annotations": {"pequod.io/deletion-policy": "orphan"}}})
        ));
        assert!(!is_orphan(
            &json!({"metadata": {"annotations": {"pequod.io/deletion-policy": "Delete"}}})
        ));
        assert!(!is_orphan(&json!({"metadata": {}})));
    }
}
