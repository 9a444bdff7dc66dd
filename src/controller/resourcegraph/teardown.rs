//! Letting go of a graph's objects: pruning removed nodes, and the teardown of a deleted graph
//! in reverse wave order.

use super::status::{publish, write_status};
use super::waves::{live_object, planned};
use super::*;

/// Whether an inventory entry's object still exists. The caches hold only objects that carry
/// Pequod's labels, so a miss is asked of the apiserver: an object with the same name but
/// without them is someone else's, and teardown says so rather than pass it over in silence.
pub(super) async fn existing(
    ctx: &Context,
    acting: &Acting,
    entry: &InventoryEntry,
) -> Result<Option<(Resolved, DynamicObject)>, ApplyError> {
    let resolved = ctx.applier.resolve(&entry.api_version, &entry.kind).await?;
    let object = live_object(ctx, acting, &resolved, entry).await?;
    Ok(object.map(|o| (resolved, o)))
}

/// Lets go of the objects of `entries` in reverse wave order: deletes what this graph made
/// (only the highest wave that still has objects; lower waves wait until it is gone), releases
/// what is to keep running, and leaves alone what is not this graph's (see
/// [`ownership::let_go`]), saying so in an event. An entry that could not be looked up counts
/// as present, since a failed lookup says nothing about whether the object is gone, and holds
/// back every lower wave. Returns the entries still present, and why lookups failed.
pub(super) async fn teardown(
    ctx: &Context,
    rg: &ResourceGraph,
    (graph, acting): (&GraphIdentity, &Acting),
    entries: &[InventoryEntry],
) -> (Vec<InventoryEntry>, Vec<String>) {
    let (present, unknown, failures) = look_up(ctx, graph, acting, entries).await;
    let mut to_delete = Vec::new();
    let mut remaining = unknown;
    for (entry, resolved, object) in present {
        match ownership::let_go(&entry, &serde_json::to_value(&object).unwrap_or_default(), graph) {
            LetGo::Delete => to_delete.push((entry, resolved, object)),
            LetGo::Release(why) => {
                if !release(ctx, rg, (graph, acting), (&resolved, &object), &why).await {
                    remaining.push(entry);
                }
            }
            LetGo::Leave(why) => publish(ctx, rg, EventType::Warning, reasons::OBJECT_NOT_OWNED, &why).await,
        }
    }
    let top = ownership::top_wave(
        to_delete
            .iter()
            .map(|(e, _, _)| e.wave)
            .chain(remaining.iter().map(|e| e.wave)),
    );
    for (entry, resolved, object) in to_delete {
        if ownership::delete_now(entry.wave, top, object.metadata.deletion_timestamp.is_some())
            && let Err(e) = acting
                .applier
                .delete(&resolved, entry.namespace.as_deref(), &entry.name)
                .await
        {
            tracing::warn!(error = %e, name = %entry.name, "deleting object failed");
        }
        remaining.push(entry);
    }
    (remaining, failures)
}

/// An entry's object found, with its kind.
type Present = (InventoryEntry, Resolved, DynamicObject);

/// Looks up the entries' objects: those present, the entries whose lookup failed, and why.
async fn look_up(
    ctx: &Context,
    graph: &GraphIdentity,
    acting: &Acting,
    entries: &[InventoryEntry],
) -> (Vec<Present>, Vec<InventoryEntry>, Vec<String>) {
    let mut present: Vec<Present> = Vec::new();
    let mut unknown: Vec<InventoryEntry> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    // An entry outside the graph's namespace is neither read nor deleted (its existence would
    // be told).
    let (entries, foreign) = ownership::within(entries, &graph.namespace);
    for entry in foreign {
        tracing::warn!(kind = %entry.kind, name = %entry.name, "an inventory entry outside the graph's namespace is ignored");
    }
    for entry in entries {
        match existing(ctx, acting, entry).await {
            Ok(Some((resolved, object))) => present.push((entry.clone(), resolved, object)),
            Ok(None) => {}
            // A kind the apiserver says it no longer serves has no objects left.
            Err(ApplyError::UnknownKind { .. }) => {}
            Err(e) => {
                tracing::warn!(error = %e, kind = %entry.kind, name = %entry.name, "looking up object to delete failed");
                failures.push(format!("{} {}: {e}", entry.kind, entry.name));
                unknown.push(entry.clone());
            }
        }
    }
    (present, unknown, failures)
}

/// Removes objects of nodes no longer in the spec (or whose object changed identity).
/// Returns (entries still present, entries the graph waits on).
pub(super) async fn prune(
    rg: &ResourceGraph,
    ctx: &Context,
    graph: &GraphIdentity,
    acting: &Acting,
    inventory: &[InventoryEntry],
    current: &BTreeSet<InventoryEntry>,
) -> (Vec<InventoryEntry>, Vec<InventoryEntry>) {
    // A node that now reads keeps nothing it wrote before: its old object is stale.
    let in_spec: HashSet<&str> = rg
        .spec
        .graph
        .nodes
        .iter()
        .filter(|n| !n.is_read())
        .map(|n| n.id.as_str())
        .collect();
    let stale = ownership::stale(inventory, current, &in_spec);
    if stale.is_empty() {
        return (Vec::new(), Vec::new());
    }
    // An object the graph made and now only reads is let go (its marks and owner reference
    // removed), never deleted.
    let (now_read, stale): (Vec<InventoryEntry>, Vec<InventoryEntry>) = stale
        .into_iter()
        .partition(|e| rg.spec.graph.nodes.iter().any(|n| reads(n, e, &graph.namespace)));
    let mut kept = let_go_of_read(ctx, rg, (graph, acting), &now_read).await;
    if stale.is_empty() {
        return (kept.clone(), kept);
    }
    let (remaining, _) = teardown(ctx, rg, (graph, acting), &stale).await;
    kept.extend(remaining);
    (kept.clone(), kept)
}

/// Lets go of `object` (see [`crate::apply::Applier::release`]) and says `why` in an event;
/// whether it was released.
async fn release(
    ctx: &Context,
    rg: &ResourceGraph,
    (graph, acting): (&GraphIdentity, &Acting),
    (resolved, object): (&Resolved, &DynamicObject),
    why: &str,
) -> bool {
    match acting.applier.release(resolved, object, &graph.uid).await {
        Ok(()) => {
            publish(ctx, rg, EventType::Normal, reasons::OBJECT_RELEASED, why).await;
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, name = %object.name_any(), "releasing object failed");
            false
        }
    }
}

/// Whether `node` reads the object of inventory entry `e`.
fn reads(node: &Node, e: &InventoryEntry, graph_namespace: &str) -> bool {
    let namespace = node.namespace().unwrap_or(graph_namespace);
    node.is_read()
        && node.api_version() == e.api_version
        && node.kind() == e.kind
        && node.name() == e.name
        && e.namespace.as_deref().is_none_or(|ns| ns == namespace)
}

/// Releases the objects of `entries`, which the graph wrote and its nodes now only read;
/// returns the entries whose release failed, to try again.
async fn let_go_of_read(
    ctx: &Context,
    rg: &ResourceGraph,
    (graph, acting): (&GraphIdentity, &Acting),
    entries: &[InventoryEntry],
) -> Vec<InventoryEntry> {
    let mut failed = Vec::new();
    for entry in entries {
        match existing(ctx, acting, entry).await {
            Ok(Some((resolved, object))) => {
                let ours = ownership::owner(&serde_json::to_value(&object).unwrap_or_default(), graph)
                    == ownership::Owner::ThisGraph;
                if !ours {
                    continue;
                }
                let why = format!(
                    "{} {} is now only read by node {}: released, not deleted",
                    entry.kind, entry.name, entry.node_id
                );
                if !release(ctx, rg, (graph, acting), (&resolved, &object), &why).await {
                    failed.push(entry.clone());
                }
            }
            Ok(None) | Err(ApplyError::UnknownKind { .. }) => {}
            Err(_) => failed.push(entry.clone()),
        }
    }
    failed
}

pub(super) async fn cleanup(rg: &ResourceGraph, ctx: &Context) -> Result<Action, Error> {
    if !rg.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let (graph, grant) = identity(rg, ctx)?;
    // Teardown deletes only what carries this graph's uid; a graph acting as a service account
    // deletes with its rights, even once its Transform is gone.
    let origin = Grant::origin(grant.as_ref());
    let named = rg.spec.service_account_name.as_deref();
    // An account the lock refuses falls back to the default one, which it allows.
    let actor = authority::graph_actor(origin, named, &graph.namespace, &ctx.accounts)
        .or_else(|_| authority::graph_actor(origin, None, &graph.namespace, &ctx.accounts))
        .unwrap_or(Actor::ServiceAccount(ServiceAccount {
            namespace: graph.namespace.clone(),
            name: ctx.accounts.default.clone(),
        }));
    let acting = acting_with(ctx, actor)?;
    let old = rg.status.clone().unwrap_or_default();
    // The inventory, plus the spec's objects in case the operator stopped between applying
    // an object and recording it.
    let mut entries: Vec<InventoryEntry> = old.inventory.clone();
    if let Ok(dag) = graph::validate(&rg.spec.graph.nodes) {
        for entry in spec_entries(rg, ctx, &graph, &dag).await {
            if !entries.iter().any(|e| {
                e.kind == entry.kind
                    && e.name == entry.name
                    && e.namespace == entry.namespace
                    && e.api_version == entry.api_version
            }) {
                entries.push(entry);
            }
        }
    }
    let (remaining, failures) = teardown(ctx, rg, (&graph, &acting), &entries).await;
    count_managed(ctx, &graph.uid, remaining.iter().cloned().collect());
    if !remaining.is_empty() {
        let mut status = old.clone();
        progress::deleting(&mut status, remaining, &failures, &now(), rg.metadata.generation);
        write_status(rg, ctx, &old, status).await?;
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    ctx.watches.keep_reads(&ObjectRef::from_obj(rg), Vec::new());
    crate::controller::harness::remove_finalizer(&api(rg, ctx), rg, FINALIZER).await?;
    let name = metric_name(&graph);
    let _ = ctx.metrics.dag_nodes_total.remove_label_values(&[&name]);
    for result in ["success", "failure"] {
        let _ = ctx
            .metrics
            .dag_execution_duration_seconds
            .remove_label_values(&[&name, result]);
    }
    ctx.applied
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(uid, _), _| uid != &graph.uid);
    ctx.written.forget(&graph.uid);
    Ok(Action::await_change())
}

/// Inventory entries for the spec's nodes, as they would be applied.
pub(super) async fn spec_entries(
    rg: &ResourceGraph,
    ctx: &Context,
    graph: &GraphIdentity,
    dag: &Dag,
) -> Vec<InventoryEntry> {
    let mut entries = Vec::new();
    for (wave, ids) in dag.waves.iter().enumerate() {
        for id in ids {
            // What a Read node names is never the graph's to delete.
            let Some(node) = rg.spec.graph.nodes.iter().find(|n| &n.id == id && !n.is_read()) else {
                continue;
            };
            if let Ok(resolved) = ctx.applier.resolve(node.api_version(), node.kind()).await {
                entries.push(planned(node, wave as u32, graph, &resolved).1);
            }
        }
    }
    entries
}
