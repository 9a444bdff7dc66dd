//! Whose an object is, and what a graph may do with it when it lets go: pure decisions.
//!
//! Labels and owner references can be written by anyone who may write the object, and graph
//! names are reused; a graph's uid is not. Pequod stamps every object it writes with the uid of
//! its graph ([`GRAPH_UID_ANNOTATION`]) and records the object's own uid in the graph's
//! inventory. Teardown and pruning delete only what carries this graph's uid and, where the
//! inventory recorded one, is still the object Pequod wrote; anything else is left alone.

use std::collections::{BTreeSet, HashSet};

use crate::api::names::{ADOPTED_FROM_ANNOTATION, GRAPH_UID_ANNOTATION};
use serde_json::Value;

use super::object::{GraphIdentity, LabelledGraph, is_orphan, labelled_graph, labels_name_graph};
use crate::api::{ApplyMode, InventoryEntry};

/// Whose an existing object is, as seen from one graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This graph wrote it.
    ThisGraph,
    /// The graph this one takes over from wrote it: this graph may write it, and makes it its own.
    Predecessor,
    /// Another graph wrote it (`namespace/name` of that graph when its labels say).
    AnotherGraph(String),
    /// No graph wrote it.
    Nobody,
}

/// Whose `live` is. Objects written before the uid annotation existed are recognised by a
/// graph's uid in their owner references, or by its name and namespace in their labels
/// (objects outside the graph's namespace carry no owner reference).
pub fn owner(live: &Value, graph: &GraphIdentity) -> Owner {
    let meta = &live["metadata"];
    let label = |key: &str| meta["labels"][key].as_str();
    let labelled = labelled_graph(label, |key: &str| meta["annotations"][key].as_str());
    let named = || match &labelled {
        Some(LabelledGraph {
            name,
            namespace: Some(ns),
        }) => format!("{ns}/{name}"),
        Some(LabelledGraph { name, namespace: None }) => name.to_string(),
        None => "unknown".to_string(),
    };
    let predecessor = graph.predecessor.as_ref();
    let is_predecessor = |uid: &str| predecessor.is_some_and(|p| p.uid == uid);
    if let Some(uid) = meta["annotations"][GRAPH_UID_ANNOTATION].as_str() {
        return if uid == graph.uid {
            Owner::ThisGraph
        } else if is_predecessor(uid) {
            Owner::Predecessor
        } else {
            Owner::AnotherGraph(named())
        };
    }
    let owner_uids: Vec<&str> = meta["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["uid"].as_str())
        .collect();
    let labelled_by = |name: &str| labels_name_graph(label, name, &graph.namespace);
    if owner_uids.contains(&graph.uid.as_str()) || labelled_by(&graph.name) {
        Owner::ThisGraph
    } else if owner_uids.iter().any(|u| is_predecessor(u)) || predecessor.is_some_and(|p| labelled_by(&p.name)) {
        Owner::Predecessor
    } else if labelled.is_some() {
        Owner::AnotherGraph(named())
    } else {
        Owner::Nobody
    }
}

/// Why a node may not write an object that already exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Stable reason for the node's event.
    pub reason: &'static str,
    pub message: String,
}

/// Whether a node in `mode` may write `live`, an object that already exists under the node's
/// name: always when this graph made it; never when another graph did; and an object no graph
/// made only through `Adopt`, since `Apply` would silently make it this graph's (and deletable
/// with it). `Create` writes nothing to an existing object, so it is never refused. `managers`
/// are the object's field managers, named in the refusal.
pub fn refusal(mode: ApplyMode, live: &Value, graph: &GraphIdentity, managers: &[String]) -> Option<Refusal> {
    let meta = &live["metadata"];
    let what = format!(
        "{} {}",
        live["kind"].as_str().unwrap_or("object"),
        meta["name"].as_str().unwrap_or_default()
    );
    match (owner(live, graph), mode) {
        (_, ApplyMode::Read) => Some(Refusal {
            reason: "NotAllowed",
            message: format!("{what} is read by this graph, never written"),
        }),
        (Owner::ThisGraph | Owner::Predecessor, _) | (_, ApplyMode::Create) | (Owner::Nobody, ApplyMode::Adopt) => None,
        (Owner::AnotherGraph(other), _) => Some(Refusal {
            reason: "OwnedByAnotherGraph",
            message: format!("{what} belongs to ResourceGraph {other}; nothing was written"),
        }),
        (Owner::Nobody, ApplyMode::Apply) => Some(Refusal {
            reason: "AlreadyExists",
            message: format!(
                "{what} already exists and was not made by this graph (field managers: {}); nothing was written. Set the node's applyPolicy.mode to Adopt to take it over",
                if managers.is_empty() {
                    "none".to_string()
                } else {
                    managers.join(", ")
                }
            ),
        }),
    }
}

/// What letting go of an inventory entry's object does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LetGo {
    /// Pequod made it and nothing asks to keep it: delete it.
    Delete,
    /// Pequod wrote it, but it is to keep running: remove Pequod's marks and leave it.
    Release(String),
    /// Not this graph's to touch: leave it exactly as it is.
    Leave(String),
}

/// What a graph does with `live`, the object of `entry`, when the node goes away or the graph
/// is deleted.
pub fn let_go(entry: &InventoryEntry, live: &Value, graph: &GraphIdentity) -> LetGo {
    let what = format!("{} {}", entry.kind, entry.name);
    match owner(live, graph) {
        Owner::ThisGraph => {}
        Owner::Predecessor => {
            return LetGo::Leave(format!(
                "{what} still belongs to ResourceGraph {}, which this graph took over from; left to it",
                graph.predecessor.as_ref().map_or("", |p| p.name.as_str())
            ));
        }
        Owner::AnotherGraph(other) => {
            return LetGo::Leave(format!("{what} belongs to ResourceGraph {other}; left in place"));
        }
        Owner::Nobody => {
            return LetGo::Leave(format!("{what} was not made by this graph; left in place"));
        }
    }
    let live_uid = live["metadata"]["uid"].as_str();
    if let (Some(recorded), Some(live_uid)) = (entry.uid.as_deref(), live_uid)
        && recorded != live_uid
    {
        return LetGo::Leave(format!(
            "{what} is not the object this graph made (uid {live_uid}, recorded {recorded}); left in place"
        ));
    }
    if is_orphan(live) {
        return LetGo::Release(format!("{what} asks to be orphaned; released"));
    }
    if live["metadata"]["annotations"][ADOPTED_FROM_ANNOTATION].is_string() {
        return LetGo::Release(format!("{what} was adopted, not made by this graph; released"));
    }
    LetGo::Delete
}

/// Whether two entries name the same object (their nodes and waves aside).
fn same_object(a: &InventoryEntry, b: &InventoryEntry) -> bool {
    a.api_version == b.api_version && a.kind == b.kind && a.namespace == b.namespace && a.name == b.name
}

/// The entries of `inventory` a pass prunes: objects none of `current` (what this pass
/// applied) names, of nodes gone from the spec (`in_spec`) or whose object changed identity.
/// A node still in the spec that applied nothing this pass keeps its object.
pub fn stale(
    inventory: &[InventoryEntry],
    current: &BTreeSet<InventoryEntry>,
    in_spec: &HashSet<&str>,
) -> Vec<InventoryEntry> {
    inventory
        .iter()
        .filter(|e| !current.iter().any(|c| same_object(c, e)))
        .filter(|e| !in_spec.contains(e.node_id.as_str()) || current.iter().any(|c| c.node_id == e.node_id))
        .cloned()
        .collect()
}

/// `entries` split into those in the graph's `namespace` (or cluster-scoped), which teardown
/// looks at, and the others: a graph writes only in its own namespace, so an entry elsewhere
/// was written into its status by someone else and is neither read nor deleted.
pub fn within<'a>(
    entries: &'a [InventoryEntry],
    namespace: &str,
) -> (Vec<&'a InventoryEntry>, Vec<&'a InventoryEntry>) {
    entries
        .iter()
        .partition(|e| e.namespace.as_ref().is_none_or(|ns| ns == namespace))
}

/// The wave teardown deletes from now: the highest one that still has objects (`waves`, of
/// every object still there, deletable or not). Lower waves wait until it is gone.
pub fn top_wave(waves: impl IntoIterator<Item = u32>) -> Option<u32> {
    waves.into_iter().max()
}

/// Whether an object to delete is deleted in this pass: it is of the `top` wave and not
/// already being deleted.
pub fn delete_now(wave: u32, top: Option<u32>, being_deleted: bool) -> bool {
    Some(wave) == top && !being_deleted
}

/// What a graph being deleted waits for: the objects of the highest wave still there.
pub fn waiting_for(remaining: &[InventoryEntry]) -> Vec<String> {
    let top = top_wave(remaining.iter().map(|e| e.wave));
    remaining
        .iter()
        .filter(|e| Some(e.wave) == top)
        .map(|e| format!("{} {}", e.kind, e.name))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// Graph `team/web`, uid `uid-web`, taking over from nothing.
    pub(crate) fn graph() -> GraphIdentity {
        GraphIdentity {
            name: "web".into(),
            namespace: "team".into(),
            uid: "uid-web".into(),
            predecessor: None,
        }
    }

    fn entry(uid: Option<&str>) -> InventoryEntry {
        InventoryEntry {
            node_id: "deployment".into(),
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            namespace: Some("team".into()),
            name: "web".into(),
            wave: 0,
            uid: uid.map(str::to_string),
        }
    }

    fn object(uid: &str, labels: Value, annotations: Value, owners: Value) -> Value {
        json!({"metadata": {"uid": uid, "labels": labels, "annotations": annotations, "ownerReferences": owners}})
    }

    fn ours(uid: &str) -> Value {
        object(
            uid,
            json!({"pequod.io/resourcegraph": "web", "pequod.io/resourcegraph-namespace": "team"}),
            json!({"pequod.io/resourcegraph-uid": "uid-web"}),
            json!([]),
        )
    }

    #[test]
    fn only_the_graph_uid_or_an_earlier_release_s_marks_make_an_object_this_graph_s() {
        let g = graph();
        let cases = [
            ("stamped with this graph's uid", ours("o1"), Owner::ThisGraph),
            (
                "stamped with another graph's uid, same labels",
                object(
                    "o1",
                    json!({"pequod.io/resourcegraph": "web", "pequod.io/resourcegraph-namespace": "team"}),
                    json!({"pequod.io/resourcegraph-uid": "uid-old"}),
                    json!([]),
                ),
                Owner::AnotherGraph("team/web".into()),
            ),
            (
                "an earlier release: owner reference with this uid",
                object("o1", json!({}), json!({}), json!([{"uid": "uid-web"}])),
                Owner::ThisGraph,
            ),
            (
                "an earlier release: this graph's labels, outside its namespace",
                object(
                    "o1",
                    json!({"pequod.io/resourcegraph": "web", "pequod.io/resourcegraph-namespace": "team"}),
                    json!({}),
                    json!([]),
                ),
                Owner::ThisGraph,
            ),
            (
                "another graph's labels",
                object(
                    "o1",
                    json!({"pequod.io/resourcegraph": "api", "pequod.io/resourcegraph-namespace": "team"}),
                    json!({}),
                    json!([]),
                ),
                Owner::AnotherGraph("team/api".into()),
            ),
            (
                "another team's object",
                object("o1", json!({"app": "payments"}), json!({}), json!([])),
                Owner::Nobody,
            ),
            ("no metadata at all", json!({}), Owner::Nobody),
        ];
        for (case, live, want) in cases {
            assert_eq!(owner(&live, &g), want, "{case}");
        }
    }

    #[test]
    fn a_graph_taking_over_sees_its_predecessor_s_objects_as_such() {
        let mut g = graph();
        g.name = "note.example.com-web".into();
        g.uid = "uid-new".into();
        g.predecessor = Some(crate::executor::object::Predecessor {
            uid: "uid-web".into(),
            name: "web".into(),
        });
        let cases = [
            ("stamped with the predecessor's uid", ours("o1"), Owner::Predecessor),
            (
                "an earlier release: owner reference to the predecessor",
                object("o1", json!({}), json!({}), json!([{"uid": "uid-web"}])),
                Owner::Predecessor,
            ),
            (
                "an earlier release: the predecessor's labels",
                object(
                    "o1",
                    json!({"pequod.io/resourcegraph": "web", "pequod.io/resourcegraph-namespace": "team"}),
                    json!({}),
                    json!([]),
                ),
                Owner::Predecessor,
            ),
        ];
        for (case, live, want) in cases {
            assert_eq!(owner(&live, &g), want, "{case}");
        }
        assert!(refusal(ApplyMode::Apply, &ours("o1"), &g, &[]).is_none());
        assert!(matches!(let_go(&entry(Some("o1")), &ours("o1"), &g), LetGo::Leave(_)));
        g.predecessor = None;
        assert_eq!(owner(&ours("o1"), &g), Owner::AnotherGraph("team/web".into()));
    }

    #[test]
    fn graphs_with_names_too_long_for_a_label_recognise_their_objects_by_the_shortened_label() {
        let long = "w".repeat(100);
        let mut g = graph();
        g.name = format!("{long}-new");
        g.predecessor = Some(crate::executor::object::Predecessor {
            uid: "uid-old".into(),
            name: long.clone(),
        });
        let labelled = |name: &str| json!({"pequod.io/resourcegraph": crate::naming::label_value(name), "pequod.io/resourcegraph-namespace": "team"});
        let annotated = |name: &str| json!({"pequod.io/resourcegraph-name": name});
        let cases = [
            (
                "this graph's labels",
                object("o1", labelled(&g.name), json!({}), json!([])),
                Owner::ThisGraph,
            ),
            (
                "the predecessor's labels",
                object("o1", labelled(&long), json!({}), json!([])),
                Owner::Predecessor,
            ),
            (
                "another graph's, named in full in the message",
                object(
                    "o1",
                    labelled(&format!("{long}-api")),
                    json!({"pequod.io/resourcegraph-uid": "uid-api", "pequod.io/resourcegraph-name": format!("{long}-api")}),
                    json!([]),
                ),
                Owner::AnotherGraph(format!("team/{long}-api")),
            ),
            (
                "a name annotation that the label does not shorten is not believed",
                object("o1", labelled("api"), annotated(&g.name), json!([])),
                Owner::AnotherGraph("team/api".into()),
            ),
        ];
        for (case, live, want) in cases {
            assert_eq!(owner(&live, &g), want, "{case}");
        }
    }

    #[test]
    fn an_existing_object_is_written_only_by_its_graph_or_through_adoption() {
        let g = graph();
        let mut theirs = object("o3", json!({"app": "payments"}), json!({}), json!([]));
        theirs["kind"] = json!("Deployment");
        theirs["metadata"]["name"] = json!("payments");
        let mut other = object(
            "o4",
            json!({"pequod.io/resourcegraph": "api", "pequod.io/resourcegraph-namespace": "team"}),
            json!({"pequod.io/resourcegraph-uid": "uid-api"}),
            json!([]),
        );
        other["kind"] = json!("Deployment");
        other["metadata"]["name"] = json!("payments");
        let managers = ["team-b-deployer".to_string()];
        let reason = |mode, live: &Value| refusal(mode, live, &g, &managers).map(|r| r.reason);
        let cases = [
            (ApplyMode::Apply, ours("o1"), None),
            (ApplyMode::Adopt, ours("o1"), None),
            (ApplyMode::Create, ours("o1"), None),
            (ApplyMode::Apply, theirs.clone(), Some("AlreadyExists")),
            (ApplyMode::Adopt, theirs.clone(), None),
            (ApplyMode::Create, theirs.clone(), None),
            (ApplyMode::Apply, other.clone(), Some("OwnedByAnotherGraph")),
            (ApplyMode::Adopt, other.clone(), Some("OwnedByAnotherGraph")),
            (ApplyMode::Create, other.clone(), None),
        ];
        for (mode, live, want) in cases {
            assert_eq!(reason(mode, &live), want, "{mode:?} on {}", live["metadata"]["uid"]);
        }
        let message = refusal(ApplyMode::Apply, &theirs, &g, &managers).unwrap().message;
        assert!(
            message.starts_with(
                "Deployment payments already exists and was not made by this graph (field managers: team-b-deployer)"
            ),
            "{message}"
        );
        let message = refusal(ApplyMode::Apply, &other, &g, &managers).unwrap().message;
        assert_eq!(
            message,
            "Deployment payments belongs to ResourceGraph team/api; nothing was written"
        );
    }

    #[test]
    fn teardown_deletes_only_what_this_graph_made() {
        let g = graph();
        let leave = |l: LetGo| matches!(l, LetGo::Leave(_));
        assert_eq!(let_go(&entry(Some("o1")), &ours("o1"), &g), LetGo::Delete);
        assert_eq!(
            let_go(&entry(None), &ours("o1"), &g),
            LetGo::Delete,
            "an entry from before uids were recorded"
        );
        assert!(
            leave(let_go(&entry(Some("o1")), &ours("o2"), &g)),
            "recreated under the same name"
        );
        let theirs = object("o3", json!({"app": "payments"}), json!({}), json!([]));
        let LetGo::Leave(why) = let_go(&entry(None), &theirs, &g) else {
            panic!("another team's object must be left");
        };
        assert_eq!(why, "Deployment web was not made by this graph; left in place");
        let other = object(
            "o4",
            json!({"pequod.io/resourcegraph": "api", "pequod.io/resourcegraph-namespace": "team"}),
            json!({"pequod.io/resourcegraph-uid": "uid-api"}),
            json!([]),
        );
        assert!(leave(let_go(&entry(None), &other, &g)));

        let mut orphan = ours("o1");
        orphan["metadata"]["annotations"]["pequod.io/deletion-policy"] = json!("Orphan");
        assert!(matches!(let_go(&entry(Some("o1")), &orphan, &g), LetGo::Release(_)));
        let mut adopted = ours("o1");
        adopted["metadata"]["annotations"]["pequod.io/adopted-from"] = json!("legacy-tool");
        assert!(matches!(let_go(&entry(Some("o1")), &adopted, &g), LetGo::Release(_)));
    }

    fn at(node: &str, kind: &str, name: &str, wave: u32) -> InventoryEntry {
        InventoryEntry {
            node_id: node.into(),
            api_version: "v1".into(),
            kind: kind.into(),
            namespace: Some("team".into()),
            name: name.into(),
            wave,
            uid: None,
        }
    }

    #[test]
    fn a_pass_prunes_the_objects_of_removed_nodes_and_renamed_objects_only() {
        let config = at("config", "ConfigMap", "web", 0);
        let renamed = at("config", "ConfigMap", "web-2", 0);
        let service = at("service", "Service", "web", 1);
        let failed = at("deployment", "Deployment", "web", 2);
        let inventory = [config.clone(), service.clone(), failed.clone()];
        let in_spec: HashSet<&str> = ["config", "deployment"].into();
        // (applied this pass, pruned)
        let cases = [
            (vec![config.clone()], vec![service.clone()]),
            (vec![renamed.clone()], vec![config.clone(), service.clone()]),
            (vec![config.clone(), failed.clone()], vec![service.clone()]),
            (vec![], vec![service.clone()]),
        ];
        for (applied, pruned) in cases {
            let current: BTreeSet<InventoryEntry> = applied.iter().cloned().collect();
            assert_eq!(stale(&inventory, &current, &in_spec), pruned, "applied {applied:?}");
        }
    }

    #[test]
    fn teardown_goes_from_the_highest_wave_down_inside_the_graph_s_namespace() {
        let mut elsewhere = at("config", "ConfigMap", "theirs", 0);
        elsewhere.namespace = Some("other".into());
        let mut cluster = at("role", "ClusterRole", "web", 0);
        cluster.namespace = None;
        let entries = [at("config", "ConfigMap", "web", 0), elsewhere.clone(), cluster.clone()];
        let (looked_at, foreign) = within(&entries, "team");
        assert_eq!(looked_at, [&entries[0], &cluster]);
        assert_eq!(foreign, [&elsewhere]);

        assert_eq!(top_wave([0, 2, 1]), Some(2));
        assert_eq!(top_wave([]), None);
        // (wave, top wave, being deleted) -> deleted now
        let cases = [
            ((2, Some(2), false), true),
            ((1, Some(2), false), false),
            ((2, Some(2), true), false),
            ((0, None, false), false),
        ];
        for ((wave, top, deleting), now) in cases {
            assert_eq!(delete_now(wave, top, deleting), now, "wave {wave} of top {top:?}");
        }

        let remaining = [
            at("config", "ConfigMap", "web", 0),
            at("deployment", "Deployment", "web", 2),
            at("job", "Job", "migrate", 2),
        ];
        assert_eq!(waiting_for(&remaining), ["Deployment web", "Job migrate"]);
        assert!(waiting_for(&[]).is_empty());
    }
}
