//! The executor's decisions, apart from any I/O: what a graph may reach, and what to write for
//! a node given the object as it is. The ResourceGraph controller observes, asks these
//! functions, writes what they say and records the outcome.

use crate::api::names::{ADOPTED_FROM_ANNOTATION, LEGACY_FIELD_MANAGER};
use serde_json::{Value, json};

use super::object::{GraphIdentity, set_annotation};
use super::ownership::{self, Owner, Refusal};
use super::proof::{Allowance, Origin};
use crate::api::{ApplyMode, Node};

/// API groups whose objects hand out or widen power over the cluster: RBAC, admission
/// webhooks and policies, CRDs and aggregated APIs. A Transform outside the trusted namespaces
/// may not name them in its generated RBAC (see [`crate::authority`]).
pub const GUARDED_GROUPS: [&str; 4] = [
    "rbac.authorization.k8s.io",
    "admissionregistration.k8s.io",
    "apiextensions.k8s.io",
    "apiregistration.k8s.io",
];

/// Why a node of a graph with `origin` in `graph_namespace` may not be applied at all, or None
/// when it may. `namespaced` is the kind's scope as discovery reports it.
///
/// These are the rules of the graph's shape, not of its power: what a graph may write is
/// decided by the apiserver, as the service account a graph without a trusted Transform acts
/// as (see [`crate::authority::graph_actor`]), or within a trusted Transform's allowance.
/// Every graph keeps namespaced objects in its own namespace, where its owner reference can
/// reach them; cluster-scoped objects need a rendered graph whose Transform allows them.
pub fn confinement(node: &Node, namespaced: bool, graph_namespace: &str, origin: Origin) -> Option<Refusal> {
    let what = format!(
        "{} {}",
        node.kind(),
        node.object["metadata"]["name"].as_str().unwrap_or_default()
    );
    let refuse = |why: String| {
        Some(Refusal {
            reason: "NotAllowed",
            message: format!("node {}: {what} {why}; nothing was applied", node.id),
        })
    };
    if !namespaced {
        return match origin {
            Origin::Rendered(Allowance::Cluster) => None,
            Origin::Rendered(_) => {
                refuse("is cluster-scoped and the graph's Transform does not allow cluster-scoped objects".into())
            }
            Origin::HandWritten => {
                refuse("is cluster-scoped; only graphs rendered from a Transform that allows it may write one".into())
            }
        };
    }
    if let Some(other) = node.object["metadata"]["namespace"]
        .as_str()
        .filter(|ns| !ns.is_empty() && *ns != graph_namespace)
    {
        return refuse(format!(
            "is in namespace {other}; a graph writes only in its own namespace {graph_namespace}"
        ));
    }
    None
}

/// Where a graph's `Read` nodes may read besides its own namespace, when it reads with the
/// operator's rights: its Transform's `readNamespaces`. A graph that acts as a service account
/// reads wherever the apiserver lets that account read.
pub fn read_confinement(
    node: &Node,
    namespaced: bool,
    graph_namespace: &str,
    origin: Origin,
    readable: &[String],
) -> Option<Refusal> {
    let what = format!("{} {}", node.kind(), node.name());
    let refuse = |why: String| {
        Some(Refusal {
            reason: "NotAllowed",
            message: format!("node {}: reading {what} {why}; nothing was read", node.id),
        })
    };
    let operator = matches!(origin, Origin::Rendered(Allowance::Namespace | Allowance::Cluster));
    if !namespaced {
        return match origin {
            Origin::Rendered(Allowance::Cluster) | Origin::HandWritten | Origin::Rendered(Allowance::Restricted) => {
                None
            }
            Origin::Rendered(_) => {
                refuse("is cluster-scoped and the graph's Transform does not allow cluster-scoped objects".into())
            }
        };
    }
    match node.object["metadata"]["namespace"]
        .as_str()
        .filter(|ns| !ns.is_empty())
    {
        Some(other) if other != graph_namespace && operator && !readable.iter().any(|r| r == other) => refuse(format!(
            "in namespace {other} is not allowed: its Transform's readNamespaces are {}",
            if readable.is_empty() {
                "none".to_string()
            } else {
                readable.join(", ")
            }
        )),
        _ => None,
    }
}

/// The field manager a node's object is applied with: the node's own, else one per graph, so
/// that the apiserver itself reports two graphs setting the same field. Bounded: `pequod-`
/// and a uid are 43 characters.
pub fn field_manager(node: &Node, graph: &GraphIdentity) -> String {
    node.apply_policy
        .field_manager
        .clone()
        .unwrap_or_else(|| format!("pequod-{}", graph.uid))
}

/// What to do with a node whose object is `live` (None when absent).
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Leave the object as it is: the node may not write it.
    Refuse(Refusal),
    /// Leave the object as it is: it already holds what the node declares (or Create found it).
    Nothing,
    /// Apply the desired object.
    Apply {
        /// Force fields Pequod set before and someone else changed since (drift).
        reclaim: bool,
        /// The object is the predecessor graph's: drop its owner reference first (an object
        /// has one controlling owner), then make it this graph's.
        take_over: bool,
        /// Field managers Pequod used before for this object (the one all graphs shared in
        /// earlier releases, the predecessor's): released once this graph's manager holds the
        /// fields, so that fields the graph no longer declares go away.
        release_managers: Vec<String>,
    },
}

impl Write {
    fn apply(reclaim: bool) -> Self {
        Self::Apply {
            reclaim,
            take_over: false,
            release_managers: Vec::new(),
        }
    }
}

/// The decision for one node, with the object to write.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeWrite {
    pub write: Write,
    /// The object to apply, with the adoption record when the node adopts.
    pub desired: Value,
    /// Field managers the object had before Pequod adopted it (Adopt only).
    pub adopted_from: Option<String>,
}

/// Decides what to write for `node`. `live` is the object as JSON with its managed fields;
/// `unchanged_since_apply` says the live object is the very one this process last applied
/// with the same desired object (then no comparison is needed).
pub fn decide_write(
    node: &Node,
    mut desired: Value,
    live: Option<&Value>,
    graph: &GraphIdentity,
    unchanged_since_apply: bool,
) -> NodeWrite {
    let manager = field_manager(node, graph);
    let Some(live) = live else {
        return NodeWrite {
            write: Write::apply(false),
            desired,
            adopted_from: None,
        };
    };
    let managers = managers(live);
    let others = others_than(&managers, &manager);
    if let Some(refused) = ownership::refusal(node.apply_policy.mode, live, graph, &others) {
        return NodeWrite {
            write: Write::Refuse(refused),
            desired,
            adopted_from: None,
        };
    }
    let owner = ownership::owner(live, graph);
    let applies = |name: &str| managers.iter().any(|(m, op)| m == name && op == "Apply");
    let earlier_managers = earlier_pequod_managers(node, &owner, graph, applies);
    let pequod_applied = applies(&manager) || !earlier_managers.is_empty();
    let adopted_from = adoption_record(node, live, pequod_applied, &others);
    if let Some(from) = &adopted_from {
        set_annotation(&mut desired, ADOPTED_FROM_ANNOTATION, from);
    }
    let write = match node.apply_policy.mode {
        ApplyMode::Create | ApplyMode::Read => Write::Nothing,
        _ if owner == Owner::Predecessor || !earlier_managers.is_empty() => Write::Apply {
            reclaim: true,
            take_over: owner == Owner::Predecessor,
            release_managers: earlier_managers,
        },
        _ if unchanged_since_apply => Write::Nothing,
        _ => match super::object::first_difference(live, &desired)
            .or_else(|| super::object::stale_field(live, &desired, &manager))
        {
            None => Write::Nothing,
            Some(path) => {
                tracing::debug!(node = %node.id, %path, "the live object differs from the desired one");
                Write::apply(pequod_applied)
            }
        },
    };
    NodeWrite {
        write,
        desired,
        adopted_from,
    }
}

/// The field managers an earlier Pequod (the legacy manager, the predecessor graph) applied
/// the object with, to be released; none when the node names its own field manager or the
/// object is not this graph's or its predecessor's.
fn earlier_pequod_managers(
    node: &Node,
    owner: &Owner,
    graph: &GraphIdentity,
    applies: impl Fn(&str) -> bool,
) -> Vec<String> {
    if node.apply_policy.field_manager.is_none() && matches!(owner, Owner::ThisGraph | Owner::Predecessor) {
        std::iter::once(LEGACY_FIELD_MANAGER.to_string())
            .chain(graph.predecessor.iter().map(|p| format!("pequod-{}", p.uid)))
            .filter(|m| applies(m))
            .collect()
    } else {
        Vec::new()
    }
}

/// Who managed an adopted object before Pequod: recorded on the object itself, so that no
/// stale read of the graph's status can lose it.
fn adoption_record(node: &Node, live: &Value, pequod_applied: bool, others: &[String]) -> Option<String> {
    (node.apply_policy.mode == ApplyMode::Adopt)
        .then(|| {
            live["metadata"]["annotations"][ADOPTED_FROM_ANNOTATION]
                .as_str()
                .map(str::to_string)
                .or_else(|| (!pequod_applied && !others.is_empty()).then(|| others.join(",")))
        })
        .flatten()
}

/// `desired` for the first apply of a graph taking an object over from its predecessor: the
/// owner reference to this graph does not claim to be the controller yet, since the
/// predecessor's still does (an object has at most one). Releasing the predecessor's managers
/// removes its reference, and the next pass makes this graph the controller.
pub fn taking_over(desired: &Value, graph_uid: &str) -> Value {
    let mut first = desired.clone();
    if let Some(owners) = first["metadata"]["ownerReferences"].as_array_mut() {
        for owner in owners.iter_mut().filter(|o| o["uid"] == graph_uid) {
            owner["controller"] = json!(false);
        }
    }
    first
}

/// The field managers other than `manager`, each once, sorted.
fn others_than(managers: &[(String, String)], manager: &str) -> Vec<String> {
    managers
        .iter()
        .filter(|(m, _)| m != manager)
        .map(|(m, _)| m.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// (manager, operation) of every managed-fields entry of `live`.
fn managers(live: &Value) -> Vec<(String, String)> {
    live["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            Some((
                m["manager"].as_str()?.to_string(),
                m["operation"].as_str().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

/// The object that, applied by an earlier field manager, leaves it owning no field: its entry
/// disappears, and the graph's own manager keeps every field it applied.
pub fn manager_release(desired: &Value) -> Value {
    let mut metadata = json!({"name": desired["metadata"]["name"]});
    if let Some(ns) = desired["metadata"]["namespace"].as_str() {
        metadata["namespace"] = json!(ns);
    }
    json!({
        "apiVersion": desired["apiVersion"],
        "kind": desired["kind"],
        "metadata": metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ConflictPolicy;
    use crate::executor::ownership::tests::graph;

    fn node(object: Value, mode: ApplyMode, gates: Value) -> Node {
        let mut n: Node = serde_json::from_value(json!({"id": "n", "object": object, "readyWhen": gates})).unwrap();
        n.apply_policy.mode = mode;
        n
    }

    fn object(api_version: &str, kind: &str, namespace: Option<&str>) -> Value {
        let mut o = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}});
        if let Some(ns) = namespace {
            o["metadata"]["namespace"] = json!(ns);
        }
        o
    }

    #[test]
    fn read_nodes_read_elsewhere_only_where_their_transform_or_the_apiserver_allows() {
        let read = |namespace: Option<&str>| node(object("v1", "ConfigMap", namespace), ApplyMode::Read, json!([]));
        let platform = vec!["platform".to_string()];
        let rendered = Origin::Rendered(Allowance::Namespace);
        #[rustfmt::skip]
        type Case<'a> = (&'a str, Option<&'a str>, bool, Origin, &'a [String], bool);
        let cases: Vec<Case> = vec![
            ("own namespace, rendered", Some("team"), true, rendered, &[], true),
            ("no namespace, rendered", None, true, rendered, &[], true),
            (
                "a readNamespace, rendered",
                Some("platform"),
                true,
                rendered,
                &platform,
                true,
            ),
            (
                "another namespace, rendered",
                Some("kube-system"),
                true,
                rendered,
                &platform,
                false,
            ),
            // As a service account: the apiserver decides.
            (
                "another namespace, hand-written",
                Some("kube-system"),
                true,
                Origin::HandWritten,
                &[],
                true,
            ),
            (
                "another namespace, untrusted Transform",
                Some("kube-system"),
                true,
                Origin::Rendered(Allowance::Restricted),
                &[],
                true,
            ),
            (
                "cluster-scoped, rendered without allowance",
                None,
                false,
                rendered,
                &[],
                false,
            ),
            (
                "cluster-scoped, rendered with allowance",
                None,
                false,
                Origin::Rendered(Allowance::Cluster),
                &[],
                true,
            ),
        ];
        for (case, namespace, namespaced, origin, readable, allowed) in cases {
            let refusal = read_confinement(&read(namespace), namespaced, "team", origin, readable);
            assert_eq!(refusal.is_none(), allowed, "{case}: {refusal:?}");
            if let Some(r) = refusal {
                assert!(r.message.ends_with("nothing was read"), "{case}: {}", r.message);
            }
        }
        let message = read_confinement(&read(Some("kube-system")), true, "team", rendered, &platform)
            .unwrap()
            .message;
        assert!(message.contains("readNamespaces are platform"), "{message}");
    }

    #[test]
    fn confinement_table() {
        let rendered = Origin::Rendered(Allowance::Namespace);
        let rendered_cluster = Origin::Rendered(Allowance::Cluster);
        let restricted = Origin::Rendered(Allowance::Restricted);
        let hand = Origin::HandWritten;
        #[rustfmt::skip]
        let cases: Vec<(&str, Value, bool, Origin, bool)> = vec![
            ("ConfigMap in the graph's namespace", object("v1", "ConfigMap", Some("team")), true, hand, true),
            ("ConfigMap without a namespace", object("v1", "ConfigMap", None), true, hand, true),
            ("ConfigMap elsewhere, hand-written", object("v1", "ConfigMap", Some("kube-system")), true, hand, false),
            ("ConfigMap elsewhere, rendered", object("v1", "ConfigMap", Some("kube-system")), true, rendered_cluster, false),
            ("Namespace, hand-written", object("v1", "Namespace", None), false, hand, false),
            ("Namespace, rendered without allowance", object("v1", "Namespace", None), false, rendered, false),
            ("Namespace, untrusted Transform", object("v1", "Namespace", None), false, restricted, false),
            ("Namespace, rendered with allowance", object("v1", "Namespace", None), false, rendered_cluster, true),
            ("ClusterRoleBinding, hand-written", object("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", None), false, hand, false),
            // Whether the graph's service account may write it is the apiserver's to say.
            ("RoleBinding in its namespace, hand-written", object("rbac.authorization.k8s.io/v1", "RoleBinding", Some("team")), true, hand, true),
            ("RoleBinding in its namespace, rendered", object("rbac.authorization.k8s.io/v1", "RoleBinding", Some("team")), true, rendered, true),
            ("webhook, hand-written", object("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration", None), false, hand, false),
            ("CRD, hand-written", object("apiextensions.k8s.io/v1", "CustomResourceDefinition", None), false, hand, false),
        ];
        for (case, obj, namespaced, origin, allowed) in cases {
            let n = node(obj, ApplyMode::Apply, json!([]));
            let refusal = confinement(&n, namespaced, "team", origin);
            assert_eq!(refusal.is_none(), allowed, "{case}: {refusal:?}");
            if let Some(r) = refusal {
                assert_eq!(r.reason, "NotAllowed", "{case}");
                assert!(r.message.ends_with("nothing was applied"), "{case}: {}", r.message);
            }
        }
    }

    fn live(annotations: Value, managers: &[(&str, &str)]) -> Value {
        let fields: Vec<Value> = managers
            .iter()
            .map(|(m, op)| json!({"manager": m, "operation": op}))
            .collect();
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "x", "namespace": "team", "uid": "o1", "annotations": annotations, "managedFields": fields},
            "data": {"a": "1"},
        })
    }

    fn desired(value: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "team",
            "annotations": {"pequod.io/resourcegraph-uid": "uid-web"}}, "data": {"a": value}})
    }

    #[test]
    fn a_field_the_node_no_longer_declares_is_applied_away() {
        let g = graph();
        let mut object = live(json!({"pequod.io/resourcegraph-uid": "uid-web"}), &[]);
        object["data"]["b"] = json!("2");
        object["metadata"]["managedFields"] = json!([{"manager": "pequod-uid-web", "operation": "Apply",
            "fieldsV1": {"f:data": {"f:a": {}, "f:b": {}}, "f:metadata": {"f:annotations": {"f:pequod.io/resourcegraph-uid": {}}}}}]);
        let n = node(desired("1"), ApplyMode::Apply, json!([]));
        let decision = decide_write(&n, desired("1"), Some(&object), &g, false);
        assert_eq!(
            decision.write,
            Write::apply(true),
            "data.b was Pequod's and is no longer declared"
        );
        // Another manager's field is not Pequod's to remove.
        object["metadata"]["managedFields"][0]["fieldsV1"] = json!({"f:data": {"f:a": {}}});
        object["metadata"]["managedFields"]
            .as_array_mut()
            .unwrap()
            .push(json!({"manager": "someone", "operation": "Apply", "fieldsV1": {"f:data": {"f:b": {}}}}));
        let decision = decide_write(&n, desired("1"), Some(&object), &g, false);
        assert_eq!(decision.write, Write::Nothing);
    }

    #[test]
    fn write_table() {
        let g = graph();
        let ours = json!({"pequod.io/resourcegraph-uid": "uid-web"});
        let own = "pequod-uid-web";
        let apply = |reclaim, release_legacy: bool| Write::Apply {
            reclaim,
            take_over: false,
            release_managers: if release_legacy {
                vec!["pequod".to_string()]
            } else {
                Vec::new()
            },
        };
        type Case = (&'static str, ApplyMode, Option<Value>, &'static str, bool, Write);
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("absent", ApplyMode::Apply, None, "1", false, apply(false, false)),
            ("absent, Create", ApplyMode::Create, None, "1", false, apply(false, false)),
            ("ours, same", ApplyMode::Apply, Some(live(ours.clone(), &[(own, "Apply")])), "1", false, Write::Nothing),
            ("ours, changed spec", ApplyMode::Apply, Some(live(ours.clone(), &[(own, "Apply")])), "2", false, apply(true, false)),
            ("ours, known unchanged", ApplyMode::Apply, Some(live(ours.clone(), &[(own, "Apply")])), "2", true, Write::Nothing),
            ("ours, written by the shared manager of earlier releases", ApplyMode::Apply, Some(live(ours.clone(), &[("pequod", "Apply")])), "1", false, apply(true, true)),
            ("ours, drifted by kubectl", ApplyMode::Apply, Some(live(ours.clone(), &[(own, "Apply"), ("kubectl", "Update")])), "2", false, apply(true, false)),
            ("someone else's", ApplyMode::Apply, Some(live(json!({}), &[("helm", "Update")])), "1", false, Write::Refuse(Refusal { reason: "AlreadyExists", message: String::new() })),
            ("someone else's, Create finds it", ApplyMode::Create, Some(live(json!({}), &[("helm", "Update")])), "1", false, Write::Nothing),
            ("someone else's, adopted", ApplyMode::Adopt, Some(live(json!({}), &[("helm", "Update")])), "1", false, apply(false, false)),
            ("someone else's, adopted and changed", ApplyMode::Adopt, Some(live(json!({}), &[("helm", "Update")])), "2", false, apply(false, false)),
            ("another graph's", ApplyMode::Adopt, Some(live(json!({"pequod.io/resourcegraph-uid": "uid-api"}), &[("pequod-uid-api", "Apply")])), "1", false, Write::Refuse(Refusal { reason: "OwnedByAnotherGraph", message: String::new() })),
        ];
        for (case, mode, live, value, unchanged, want) in cases {
            let n = node(object("v1", "ConfigMap", Some("team")), mode, json!([]));
            let decision = decide_write(&n, desired(value), live.as_ref(), &g, unchanged);
            match (&decision.write, &want) {
                (Write::Refuse(got), Write::Refuse(w)) => assert_eq!(got.reason, w.reason, "{case}"),
                _ => assert_eq!(decision.write, want, "{case}"),
            }
        }
    }

    #[test]
    fn adoption_records_the_previous_managers_once() {
        let g = graph();
        let n = node(object("v1", "ConfigMap", Some("team")), ApplyMode::Adopt, json!([]));
        let theirs = live(json!({}), &[("helm", "Update"), ("kubectl", "Apply")]);
        let decision = decide_write(&n, desired("2"), Some(&theirs), &g, false);
        assert_eq!(decision.adopted_from.as_deref(), Some("helm,kubectl"));
        assert_eq!(
            decision.desired["metadata"]["annotations"][ADOPTED_FROM_ANNOTATION],
            "helm,kubectl"
        );
        let recorded = live(
            json!({"pequod.io/resourcegraph-uid": "uid-web", "pequod.io/adopted-from": "helm"}),
            &[("pequod-uid-web", "Apply"), ("helm", "Update")],
        );
        let decision = decide_write(&n, desired("2"), Some(&recorded), &g, false);
        assert_eq!(decision.adopted_from.as_deref(), Some("helm"), "the first record stays");
    }

    #[test]
    fn a_node_s_own_field_manager_is_kept_and_the_default_is_per_graph() {
        let g = graph();
        let mut n = node(object("v1", "ConfigMap", None), ApplyMode::Apply, json!([]));
        assert_eq!(field_manager(&n, &g), "pequod-uid-web");
        n.apply_policy.field_manager = Some("team-tool".into());
        n.apply_policy.conflict_policy = ConflictPolicy::Force;
        assert_eq!(field_manager(&n, &g), "team-tool");
        let legacy = live(
            json!({"pequod.io/resourcegraph-uid": "uid-web"}),
            &[("pequod", "Apply")],
        );
        assert_eq!(
            decide_write(&n, desired("1"), Some(&legacy), &g, false).write,
            Write::Nothing,
            "a node naming its own manager has nothing to migrate"
        );
    }

    #[test]
    fn a_graph_taking_over_writes_its_predecessor_s_objects_and_releases_its_managers() {
        let mut g = graph();
        g.uid = "uid-new".into();
        g.predecessor = Some(crate::executor::object::Predecessor {
            uid: "uid-web".into(),
            name: "web".into(),
        });
        let n = node(object("v1", "ConfigMap", Some("team")), ApplyMode::Apply, json!([]));
        let theirs = live(
            json!({"pequod.io/resourcegraph-uid": "uid-web"}),
            &[("pequod", "Apply"), ("pequod-uid-web", "Apply"), ("kubectl", "Update")],
        );
        let decision = decide_write(&n, desired("1"), Some(&theirs), &g, false);
        assert_eq!(
            decision.write,
            Write::Apply {
                reclaim: true,
                take_over: true,
                release_managers: vec!["pequod".into(), "pequod-uid-web".into()],
            }
        );
        let done = live(
            json!({"pequod.io/resourcegraph-uid": "uid-new"}),
            &[("pequod-uid-new", "Apply")],
        );
        let mut same = desired("1");
        same["metadata"]["annotations"]["pequod.io/resourcegraph-uid"] = json!("uid-new");
        assert_eq!(decide_write(&n, same, Some(&done), &g, false).write, Write::Nothing);
    }

    #[test]
    fn a_take_over_does_not_claim_the_controller_at_first() {
        let desired = json!({"metadata": {"ownerReferences": [
            {"uid": "uid-new", "controller": true}, {"uid": "uid-team", "controller": false}]}});
        let first = taking_over(&desired, "uid-new");
        assert_eq!(first["metadata"]["ownerReferences"][0]["controller"], false);
        assert_eq!(
            first["metadata"]["ownerReferences"][1],
            desired["metadata"]["ownerReferences"][1]
        );
    }

    #[test]
    fn the_manager_release_names_only_the_object() {
        assert_eq!(
            manager_release(&desired("1")),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "team"}})
        );
    }
}
