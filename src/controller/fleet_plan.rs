//! What a module version would do to every instance of a kind, the kube side: each instance is
//! rendered with it, confined as the kind's controller confines it, compared with the graph it
//! has ([`crate::rollout::plan`] decides) and checked against the live objects with
//! server-side apply dry runs. The rollout driver plans with it before a rollout moves any
//! instance, and `pequod plan` prints it.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::watches::{ObjectWatches, live_object};
use crate::api::ResourceGraph;
use crate::api::names::{INSTANCE_GROUP_LABEL, INSTANCE_KIND_LABEL};
use crate::apply::{Applier, Read};
use crate::cue::{Module, Renderer, render_input};
use crate::executor::object::{GraphIdentity, desired_object};
use crate::executor::ownership::refusal;
use crate::executor::write::field_manager;
use crate::instance_graph::{graph_name, label_value};
use crate::rollout::InstanceKey;
use crate::rollout::plan::{Change, InstancePlan, ReadPlan, UNKNOWN_UNTIL_APPLIED};

/// What planning needs from the operator.
pub struct Tools<'a> {
    pub client: &'a Client,
    pub renderer: &'a Renderer,
    pub applier: &'a Applier,
    /// The executor's object caches, where live objects are read first (the operator has
    /// them; `pequod plan` asks the apiserver).
    pub watches: Option<&'a ObjectWatches>,
    /// The Transform's `readNamespaces`: where its `Read` nodes may read besides an
    /// instance's own namespace, as the executor allows.
    pub read_namespaces: &'a [String],
}

/// What `module` would do to each of `instances`: each is rendered with it (the renders form
/// batches), confined as the kind's controller confines it, and compared with the graph it has.
/// The graphs are read with one list.
pub async fn plan_instances(
    tools: &Tools<'_>,
    resource: &ApiResource,
    namespace: Option<&str>,
    instances: &[Arc<DynamicObject>],
    module: &Module,
    cluster_scoped: bool,
) -> Result<Vec<InstancePlan>, kube::Error> {
    let graphs: Api<ResourceGraph> = match namespace {
        Some(ns) => Api::namespaced(tools.client.clone(), ns),
        None => Api::all(tools.client.clone()),
    };
    let selector = format!(
        "{INSTANCE_KIND_LABEL}={},{INSTANCE_GROUP_LABEL}={}",
        label_value(&resource.kind),
        label_value(&resource.group)
    );
    let graphs: BTreeMap<(String, String), ResourceGraph> = graphs
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .map(|g| ((g.namespace().unwrap_or_default(), g.name_any()), g))
        .collect();
    // In a stable order, so that summaries and tables read the same each time.
    let mut instances: Vec<&Arc<DynamicObject>> = instances.iter().collect();
    instances.sort_by_key(|o| instance_key(o));
    let renders = instances.iter().map(|obj| {
        let spec = obj.data.get("spec").cloned().unwrap_or_else(|| json!({}));
        tools.renderer.render(module, render_input(&obj.metadata, &spec))
    });
    let renders = futures::future::join_all(renders).await;
    let mut plans = Vec::with_capacity(instances.len());
    let mut pairs = instances.into_iter().zip(renders).peekable();
    while pairs.peek().is_some() {
        let chunk = pairs.by_ref().take(DRY_RUNS_IN_FLIGHT).map(|(obj, rendered)| {
            let graph = graphs
                .get(&(
                    obj.namespace().unwrap_or_default(),
                    graph_name(&resource.kind, &resource.group, &obj.name_any()),
                ))
                .filter(|g| {
                    obj.uid()
                        .is_some_and(|uid| g.owner_references().iter().any(|o| o.uid == uid))
                });
            plan_instance(tools, obj, graph, rendered, cluster_scoped)
        });
        plans.extend(futures::future::join_all(chunk).await);
    }
    Ok(plans)
}

/// Instances whose objects are dry-run at the same time.
const DRY_RUNS_IN_FLIGHT: usize = 16;

async fn plan_instance(
    tools: &Tools<'_>,
    obj: &DynamicObject,
    graph: Option<&ResourceGraph>,
    rendered: crate::cue::RenderResult,
    cluster_scoped: bool,
) -> InstancePlan {
    let namespace = obj.namespace().unwrap_or_default();
    let mut plan = InstancePlan {
        namespace: namespace.clone(),
        name: obj.name_any(),
        changes: Vec::new(),
        violations: Vec::new(),
        error: None,
        reads: Vec::new(),
    };
    let output = match rendered {
        Ok(output) => output,
        Err(e) => {
            plan.error = Some(e.to_string());
            return plan;
        }
    };
    let (nodes, violations) = tools.applier.confined(&output, &namespace, cluster_scoped).await;
    plan.violations = violations;
    let current = graph.map(|g| g.spec.graph.nodes.as_slice()).unwrap_or_default();
    let changes = crate::rollout::plan::diff(current, &nodes);
    plan.reads = observe_reads(tools, &nodes, &namespace).await;
    plan.changes = match graph {
        Some(graph) => check_live(tools, graph, &nodes, changes).await,
        None => changes,
    };
    plan
}

/// What the `Read` nodes would read now, with the planner's rights: each object's
/// resourceVersion, `absent`, or [`UNKNOWN_UNTIL_APPLIED`] when it cannot be read.
async fn observe_reads(tools: &Tools<'_>, nodes: &[crate::api::Node], instance_namespace: &str) -> Vec<ReadPlan> {
    let mut reads = crate::rollout::plan::reads(nodes);
    for (plan, node) in reads.iter_mut().zip(nodes.iter().filter(|n| n.is_read())) {
        let Ok(resolved) = tools.applier.resolve(node.api_version(), node.kind()).await else {
            continue;
        };
        let namespace = resolved
            .namespaced
            .then(|| node.namespace().unwrap_or(instance_namespace));
        // Only what the executor would read: the instance's namespace and the Transform's.
        if let Some(elsewhere) = namespace.filter(|ns| *ns != instance_namespace)
            && !tools.read_namespaces.iter().any(|r| r == elsewhere)
        {
            plan.observed = format!("not allowed: namespace {elsewhere} is not among the Transform's readNamespaces");
            continue;
        }
        plan.observed = match tools.applier.read(&resolved, namespace, node).await {
            Ok(Read::One(object)) => format!("resourceVersion {}", object.resource_version().unwrap_or_default()),
            Ok(Read::Absent | Read::Several) => {
                "absent (or more than one match): its dependants would wait".to_string()
            }
            Err(_) => UNKNOWN_UNTIL_APPLIED.to_string(),
        };
    }
    reads
}

/// Checks each update against the live object with a server-side apply dry run, as the graph's
/// executor would apply it: its paths become those the apply would change there (an update
/// the live object already holds drops out), and an immutable field the apiserver refuses makes
/// it a replacement. A creation whose name is held by an object the graph may not write is
/// refused, as the executor would refuse it. A node with `${…}` references, whose values exist
/// only at apply time, keeps what the comparison with the graph told.
async fn check_live(
    tools: &Tools<'_>,
    graph: &ResourceGraph,
    nodes: &[crate::api::Node],
    changes: Vec<Change>,
) -> Vec<Change> {
    let identity = GraphIdentity {
        name: graph.name_any(),
        namespace: graph.namespace().unwrap_or_default(),
        uid: graph.uid().unwrap_or_default(),
        predecessor: None,
    };
    let mut checked = Vec::with_capacity(changes.len());
    for change in changes {
        if let Some(change) = check_change(tools, nodes, &identity, change).await {
            checked.push(change);
        }
    }
    checked
}

/// One change checked against its live object; `None` when the live object already holds it.
/// A change that cannot be checked (a delete, a node with `${…}`, an unknown kind, no live
/// object) stays as it is.
async fn check_change(
    tools: &Tools<'_>,
    nodes: &[crate::api::Node],
    identity: &GraphIdentity,
    change: Change,
) -> Option<Change> {
    let object = match &change {
        Change::Update { object, .. } | Change::Create { object } => object,
        _ => return Some(change),
    };
    let node = nodes
        .iter()
        .find(|n| n.kind() == object.kind && n.name() == object.name)
        .filter(|n| !n.object.to_string().contains("${"));
    let Some(node) = node else {
        return Some(change);
    };
    let Ok(resolved) = tools.applier.resolve(node.api_version(), node.kind()).await else {
        return Some(change);
    };
    let desired = desired_object(node, identity, resolved.namespaced);
    let namespace = desired.pointer("/metadata/namespace").and_then(|v| v.as_str());
    // The caches hold only objects of existing graphs: one in the way of a new object may
    // be anyone's, so creations ask the apiserver.
    let creating = matches!(change, Change::Create { .. });
    let cache = tools.watches.filter(|_| !creating);
    let live = live_object(cache, tools.applier, &resolved, (namespace, &object.name), || async {
        true
    })
    .await
    .ok()
    .flatten();
    let Some(live) = live else {
        return Some(change);
    };
    if creating {
        return Some(check_taken_name(node, identity, &live, change));
    }
    let dry_run = DryRun {
        resolved: &resolved,
        namespace,
        desired: &desired,
        manager: &field_manager(node, identity),
    };
    check_update(tools, dry_run, &live, change).await
}

/// A creation whose name is taken: the graph writes the object only when it is its own to
/// write, else the change is refused.
fn check_taken_name(node: &crate::api::Node, identity: &GraphIdentity, live: &DynamicObject, change: Change) -> Change {
    let managers = crate::executor::object::other_managers(live, "");
    let refused = serde_json::to_value(live)
        .ok()
        .and_then(|live| refusal(node.apply_policy.mode, &live, identity, &managers));
    match (refused, &change) {
        (Some(r), Change::Create { object }) => Change::Refused {
            object: object.clone(),
            why: r.message,
        },
        _ => change,
    }
}

/// What a server-side apply dry run of one node sends.
struct DryRun<'a> {
    resolved: &'a crate::apply::Resolved,
    namespace: Option<&'a str>,
    desired: &'a serde_json::Value,
    manager: &'a str,
}

/// An update checked by a dry run: its paths become those the apply would change (`None`
/// when there are none), and an immutable field the apiserver refuses makes it a replacement.
async fn check_update(tools: &Tools<'_>, dry_run: DryRun<'_>, live: &DynamicObject, change: Change) -> Option<Change> {
    let Change::Update { object, paths } = &change else {
        return Some(change);
    };
    let DryRun {
        resolved,
        namespace,
        desired,
        manager,
    } = dry_run;
    match tools
        .applier
        .dry_run(resolved, namespace, &object.name, desired, manager)
        .await
    {
        Ok(after) => {
            let (live, after) = (serde_json::to_value(live), serde_json::to_value(&after));
            let live_paths = match (live, after) {
                (Ok(live), Ok(after)) => crate::rollout::plan::live_changes(&live, &after),
                _ => paths.to_vec(),
            };
            (!live_paths.is_empty()).then(|| Change::Update {
                object: object.clone(),
                paths: live_paths,
            })
        }
        // The apiserver's message may quote live values: only the paths are told.
        Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains("immutable") => Some(Change::Replace {
            object: object.clone(),
            why: format!("the apiserver refuses to change {} in place", paths.join(", ")),
        }),
        Err(e) => {
            tracing::debug!(error = %e, object = %object, "dry run failed; the plan keeps the graph's comparison");
            Some(change)
        }
    }
}

/// An instance's key, the one the planner sorts by and the rollout admits.
pub fn instance_key(obj: &DynamicObject) -> InstanceKey {
    InstanceKey {
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
    }
}
