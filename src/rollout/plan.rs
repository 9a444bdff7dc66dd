//! What a new module version would do to one instance: its graph as rendered now against the
//! graph it has, node by node. Pure; `pequod plan` feeds it with the cluster's graphs and the
//! candidate module's renders. Only field paths are reported, never values, so a Secret's
//! content never appears.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::InstanceKey;
use crate::api::{MAX_PLAN_LINES, Node, PlanSummary, Severity, Violation};

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
    /// A new object whose name is taken by one this graph did not make: the graph would refuse
    /// to write it (the executor's `AlreadyExists` or `OwnedByAnotherGraph`).
    Refused {
        object: ObjectKey,
        why: String,
    },
}

/// What a module version would do to one instance.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstancePlan {
    pub namespace: String,
    pub name: String,
    pub changes: Vec<Change>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub violations: Vec<Violation>,
    /// Why it would fail to render.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The objects its `Read` nodes read: never changed, shown with what the plan found.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reads: Vec<ReadPlan>,
}

/// An object a `Read` node reads, and what the plan found of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadPlan {
    pub object: ObjectKey,
    /// `resourceVersion <n>` as the plan read it, `absent`, or `unknown until applied` when
    /// the plan could not read it.
    pub observed: String,
}

/// What a plan says of a `Read` node's object it could not read.
pub const UNKNOWN_UNTIL_APPLIED: &str = "unknown until applied";

/// The objects `nodes` read, each to be looked at (see [`ReadPlan::observed`]).
pub fn reads(nodes: &[Node]) -> Vec<ReadPlan> {
    nodes
        .iter()
        .filter(|n| n.is_read())
        .map(|n| ReadPlan {
            object: ObjectKey {
                kind: n.kind().to_string(),
                name: if n.name().is_empty() {
                    "(by selector)".to_string()
                } else {
                    n.name().to_string()
                },
            },
            observed: UNKNOWN_UNTIL_APPLIED.to_string(),
        })
        .collect()
}

/// Longest line told about one instance.
const MAX_LINE: usize = 300;

impl InstancePlan {
    pub fn key(&self) -> InstanceKey {
        InstanceKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    fn errors(&self) -> usize {
        self.violations.iter().filter(|v| v.severity == Severity::Error).count()
    }

    /// Deletions and replacements of `protected` kinds.
    pub fn destructive<'a>(&'a self, protected: &'a [String]) -> impl Iterator<Item = (&'static str, &'a ObjectKey)> {
        self.changes.iter().filter_map(move |c| match c {
            Change::Delete { object } if protected.contains(&object.kind) => Some(("delete", object)),
            Change::Replace { object, .. } if protected.contains(&object.kind) => Some(("replace", object)),
            _ => None,
        })
    }

    /// What the plan does to the instance in one line, or `None` when it does nothing.
    pub fn line(&self) -> Option<String> {
        if let Some(error) = &self.error {
            return Some(bounded(format!(
                "fails to render: {}",
                error.lines().next().unwrap_or_default()
            )));
        }
        let mut parts = Vec::new();
        for (label, pick) in [
            (
                "created",
                (|c: &Change| matches!(c, Change::Create { .. })) as fn(&Change) -> bool,
            ),
            ("updated", |c| matches!(c, Change::Update { .. })),
            ("replaced", |c| matches!(c, Change::Replace { .. })),
            ("deleted", |c| matches!(c, Change::Delete { .. })),
            ("refused", |c| matches!(c, Change::Refused { .. })),
        ] {
            let objects: Vec<String> = self
                .changes
                .iter()
                .filter(|c| pick(c))
                .map(|c| c.object().to_string())
                .collect();
            if !objects.is_empty() {
                parts.push(format!("{} {label} ({})", objects.len(), objects.join(", ")));
            }
        }
        if self.errors() > 0 {
            parts.push(format!("{} policy violation(s)", self.errors()));
        }
        (!parts.is_empty()).then(|| bounded(parts.join(", ")))
    }
}

fn bounded(mut line: String) -> String {
    if line.len() > MAX_LINE {
        let mut end = MAX_LINE;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push('…');
    }
    line
}

impl Change {
    pub fn object(&self) -> &ObjectKey {
        match self {
            Self::Create { object }
            | Self::Update { object, .. }
            | Self::Delete { object }
            | Self::Refused { object, .. }
            | Self::Replace { object, .. } => object,
        }
    }
}

/// The bounded summary of a fleet's plans that a Transform's status carries.
pub fn summarize(digest: &str, plans: &[InstancePlan], protected: &[String]) -> PlanSummary {
    let count = |pick: fn(&Change) -> bool| plans.iter().flat_map(|p| &p.changes).filter(|c| pick(c)).count() as i32;
    let destructive: Vec<String> = plans
        .iter()
        .flat_map(|p| {
            p.destructive(protected)
                .map(move |(what, object)| format!("{}: {what} {object}", p.key()))
        })
        .collect();
    let lines: Vec<String> = plans
        .iter()
        .filter_map(|p| p.line().map(|line| format!("{}: {line}", p.key())))
        .collect();
    PlanSummary {
        digest: digest.to_string(),
        instances: plans.len() as i32,
        affected: lines.len() as i32,
        created: count(|c| matches!(c, Change::Create { .. })),
        updated: count(|c| matches!(c, Change::Update { .. })),
        deleted: count(|c| matches!(c, Change::Delete { .. })),
        replaced: count(|c| matches!(c, Change::Replace { .. })),
        refused: count(|c| matches!(c, Change::Refused { .. })),
        violations: plans.iter().filter(|p| p.errors() > 0).count() as i32,
        render_failures: plans.iter().filter(|p| p.error.is_some()).count() as i32,
        schema: None,
        destructive: destructive.len() as i32,
        destructive_changes: destructive.into_iter().take(MAX_PLAN_LINES).collect(),
        lines: lines.into_iter().take(MAX_PLAN_LINES).collect(),
    }
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
    // What Read nodes name is never created, changed or deleted.
    let written = |nodes: &[Node]| nodes.iter().filter(|n| !n.is_read()).cloned().collect::<Vec<_>>();
    let (current, candidate) = (&written(current), &written(candidate));
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

/// Fields the apiserver maintains, which differ after any write.
const SERVER_FIELDS: &[&str] = &[
    "metadata.resourceVersion",
    "metadata.managedFields",
    "metadata.generation",
    "metadata.uid",
    "metadata.creationTimestamp",
    "status",
];

/// The fields a server-side apply dry run changes in a live object (`after` against `live`),
/// leaving out what the apiserver maintains; at most [`MAX_PATHS`].
pub fn live_changes(live: &Value, after: &Value) -> Vec<String> {
    let mut paths = Vec::new();
    changed_paths(live, after, "", &mut paths);
    paths.retain(|p| !SERVER_FIELDS.iter().any(|f| p == f || p.starts_with(&format!("{f}."))));
    paths.truncate(MAX_PATHS);
    paths
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
    fn read_objects_are_never_created_changed_or_deleted_and_are_listed_as_read() {
        let mut read = node(
            "endpoint",
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "db"}}),
        );
        read.apply_policy.mode = crate::api::ApplyMode::Read;
        let app = deployment("app", 1, "web");
        assert_eq!(
            diff(&[], &[read.clone(), app.clone()]),
            vec![Change::Create {
                object: object("Deployment", "app")
            }]
        );
        assert!(
            diff(&[read.clone(), app.clone()], std::slice::from_ref(&app)).is_empty(),
            "a read object dropped is not deleted"
        );
        let reads = reads(&[read, app]);
        assert_eq!(reads.len(), 1);
        assert_eq!(reads[0].object, object("ConfigMap", "db"));
        assert_eq!(reads[0].observed, UNKNOWN_UNTIL_APPLIED);
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
    fn a_fleet_plan_is_summarized_with_its_destructive_changes() {
        let plan = |name: &str, changes: Vec<Change>, error: Option<&str>| InstancePlan {
            namespace: "team".into(),
            name: name.into(),
            changes,
            violations: Vec::new(),
            error: error.map(String::from),
            reads: Vec::new(),
        };
        let plans = [
            plan(
                "a",
                vec![
                    Change::Delete {
                        object: object("PersistentVolumeClaim", "data"),
                    },
                    Change::Update {
                        object: object("Deployment", "a"),
                        paths: vec!["spec.replicas".into()],
                    },
                ],
                None,
            ),
            plan(
                "b",
                vec![Change::Delete {
                    object: object("ConfigMap", "b"),
                }],
                None,
            ),
            plan("c", vec![], None),
            plan("d", vec![], Some("#Input.replicas: conflicting values\nmore")),
        ];
        let protected: Vec<String> = vec!["PersistentVolumeClaim".into()];
        let summary = summarize("sha256:x", &plans, &protected);
        assert_eq!(
            (
                summary.instances,
                summary.affected,
                summary.updated,
                summary.deleted,
                summary.render_failures,
                summary.destructive
            ),
            (4, 3, 1, 2, 1, 1)
        );
        assert_eq!(
            summary.destructive_changes,
            vec!["team/a: delete PersistentVolumeClaim/data"]
        );
        assert_eq!(
            summary.lines,
            vec![
                "team/a: 1 updated (Deployment/a), 1 deleted (PersistentVolumeClaim/data)",
                "team/b: 1 deleted (ConfigMap/b)",
                "team/d: fails to render: #Input.replicas: conflicting values",
            ]
        );
        assert_eq!(plans[2].line(), None);
        let taken = plan(
            "e",
            vec![Change::Refused {
                object: object("ConfigMap", "e-taken"),
                why: "already exists".into(),
            }],
            None,
        );
        assert_eq!(taken.line().as_deref(), Some("1 refused (ConfigMap/e-taken)"));
        assert_eq!(summarize("sha256:x", &[taken], &protected).refused, 1);
        let many: Vec<InstancePlan> = (0..30)
            .map(|i| {
                plan(
                    &format!("i{i}"),
                    vec![Change::Create {
                        object: object("ConfigMap", "x"),
                    }],
                    None,
                )
            })
            .collect();
        let summary = summarize("sha256:x", &many, &protected);
        assert_eq!((summary.affected, summary.lines.len()), (30, MAX_PLAN_LINES));
    }

    #[test]
    fn a_dry_run_reports_what_it_changes_in_the_live_object_but_not_the_server_s_fields() {
        let live = json!({"metadata": {"name": "web", "resourceVersion": "1", "managedFields": [{"manager": "x"}],
                                       "labels": {"team": "a"}},
                          "spec": {"replicas": 2, "paused": false}, "status": {"replicas": 2}});
        let after = json!({"metadata": {"name": "web", "resourceVersion": "2", "managedFields": [{"manager": "y"}],
                                        "labels": {"team": "a"}, "generation": 2},
                           "spec": {"replicas": 3, "paused": false}, "status": {"replicas": 3}});
        assert_eq!(live_changes(&live, &after), vec!["spec.replicas"]);
        assert!(live_changes(&live, &live).is_empty());
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
