//! What a new module version would do to one instance: its graph as rendered now against the
//! graph it has, node by node. Pure; `pequod plan` feeds it with the cluster's graphs and the
//! candidate module's renders. Only field paths are reported, never values, so a Secret's
//! content never appears.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::api::Node;

/// Most changed field paths reported for one object.
pub const MAX_PATHS: usize = 20;

/// An object, by what identifies it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ObjectKey {
    pub kind: String,
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

fn key(node: &Node) -> ObjectKey {
    ObjectKey {
        kind: node.kind().to_string(),
        name: node.name().to_string(),
    }
}

/// One change to one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "camelCase")]
pub enum Change {
    Create {
        object: ObjectKey,
    },
    /// Fields that change, as dotted paths.
    Update {
        object: ObjectKey,
        paths: Vec<String>,
    },
    /// Pruned: the new render no longer has it.
    Delete {
        object: ObjectKey,
    },
    /// Deleted and created again: its identity or a field the apiserver does not let change.
    Replace {
        object: ObjectKey,
        why: String,
    },
}

/// Fields the apiserver refuses to change in place, by kind: changing one means deleting the
/// object and creating it again.
const IMMUTABLE: &[(&str, &str)] = &[
    ("Deployment", "spec.selector"),
    ("StatefulSet", "spec.selector"),
    ("StatefulSet", "spec.serviceName"),
    ("StatefulSet", "spec.volumeClaimTemplates"),
    ("DaemonSet", "spec.selector"),
    ("Job", "spec.template"),
    ("Job", "spec.selector"),
    ("Service", "spec.clusterIP"),
    ("PersistentVolumeClaim", "spec.storageClassName"),
    ("PersistentVolumeClaim", "spec.accessModes"),
];

/// The changes from the `current` nodes (the graph the instance has; none for a new one) to
/// the `candidate` nodes, in candidate order, then the deletions.
pub fn diff(current: &[Node], candidate: &[Node]) -> Vec<Change> {
    let by_id: BTreeMap<&str, &Node> = current.iter().map(|n| (n.id.as_str(), n)).collect();
    let by_key: BTreeMap<ObjectKey, &Node> = current.iter().map(|n| (key(n), n)).collect();
    let mut kept: Vec<ObjectKey> = Vec::new();
    let mut changes = Vec::new();
    for node in candidate {
        let new_key = key(node);
        let old = by_key.get(&new_key).copied();
        match (old, by_id.get(node.id.as_str())) {
            (Some(old), _) => {
                kept.push(new_key.clone());
                if let Some(change) = compare(old, node, new_key) {
                    changes.push(change);
                }
            }
            // The same node now names another object: the old one goes, the new one comes.
            (None, Some(old)) if key(old) != new_key => {
                kept.push(key(old));
                changes.push(Change::Replace {
                    object: key(old),
                    why: format!("node {} now names {new_key}", node.id),
                });
                changes.push(Change::Create { object: new_key });
            }
            (None, _) => changes.push(Change::Create { object: new_key }),
        }
    }
    for node in current {
        let old_key = key(node);
        if !kept.contains(&old_key) {
            changes.push(Change::Delete { object: old_key });
        }
    }
    changes
}

fn compare(old: &Node, new: &Node, object: ObjectKey) -> Option<Change> {
    let mut paths = Vec::new();
    changed_paths(&old.object, &new.object, "", &mut paths);
    paths.retain(|p| !p.starts_with("metadata.resourceVersion"));
    if paths.is_empty() {
        return None;
    }
    if let Some((_, field)) = IMMUTABLE.iter().find(|(kind, field)| {
        *kind == object.kind && paths.iter().any(|p| p == field || p.starts_with(&format!("{field}.")))
    }) {
        return Some(Change::Replace {
            object,
            why: format!("{field} cannot change in place"),
        });
    }
    paths.truncate(MAX_PATHS);
    Some(Change::Update { object, paths })
}

/// Dotted paths of the fields that differ between `old` and `new`.
fn changed_paths(old: &Value, new: &Value, prefix: &str, out: &mut Vec<String>) {
    if out.len() > MAX_PATHS {
        return;
    }
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => changed_paths(x, y, &join(k), out),
                    _ => out.push(join(k)),
                }
            }
        }
        (a, b) if a != b => out.push(prefix.to_string()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(id: &str, object: Value) -> Node {
        serde_json::from_value(json!({"id": id, "object": object})).unwrap()
    }

    fn deployment(name: &str, replicas: i64, app: &str) -> Node {
        node(
            "deployment",
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                   "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": app}}}}),
        )
    }

    fn object(kind: &str, name: &str) -> ObjectKey {
        ObjectKey {
            kind: kind.into(),
            name: name.into(),
        }
    }

    #[test]
    fn each_kind_of_change_is_told_apart() {
        let service = node(
            "service",
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}}),
        );
        let config = node(
            "config",
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "web"}, "data": {"a": "1"}}),
        );
        let current = [deployment("web", 1, "web"), service.clone(), config];
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<Node>, Vec<Change>)> = vec![
            ("nothing", current.to_vec(), vec![]),
            ("a field", vec![deployment("web", 3, "web"), service.clone(), current[2].clone()],
             vec![Change::Update { object: object("Deployment", "web"), paths: vec!["spec.replicas".into()] }]),
            ("an immutable field", vec![deployment("web", 1, "other"), service.clone(), current[2].clone()],
             vec![Change::Replace { object: object("Deployment", "web"), why: "spec.selector cannot change in place".into() }]),
            ("a removed node", vec![deployment("web", 1, "web"), service.clone()],
             vec![Change::Delete { object: object("ConfigMap", "web") }]),
            ("a renamed object", vec![deployment("web-v2", 1, "web"), service.clone(), current[2].clone()],
             vec![Change::Replace { object: object("Deployment", "web"), why: "node deployment now names Deployment/web-v2".into() },
                  Change::Create { object: object("Deployment", "web-v2") }]),
        ];
        for (case, candidate, expected) in cases {
            assert_eq!(diff(&current, &candidate), expected, "{case}");
        }
        assert_eq!(
            diff(&[], &current[..1]),
            vec![Change::Create {
                object: object("Deployment", "web")
            }],
            "a new instance"
        );
    }

    #[test]
    fn a_secret_s_values_are_never_reported() {
        let secret = |value: &str| {
            node(
                "creds",
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "c"}, "stringData": {"password": value}}),
            )
        };
        let changes = diff(&[secret("hunter2")], &[secret("swordfish")]);
        let text = serde_json::to_string(&changes).unwrap();
        assert!(text.contains("stringData.password"), "{text}");
        assert!(!text.contains("hunter2") && !text.contains("swordfish"), "{text}");
    }

    #[test]
    fn paths_are_bounded() {
        let wide = |v: i64| {
            let data: serde_json::Map<String, Value> = (0..100).map(|i| (format!("k{i}"), json!(v))).collect();
            node(
                "config",
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": data}),
            )
        };
        let Change::Update { paths, .. } = &diff(&[wide(1)], &[wide(2)])[0] else {
            panic!("an update");
        };
        assert_eq!(paths.len(), MAX_PATHS);
    }
}
