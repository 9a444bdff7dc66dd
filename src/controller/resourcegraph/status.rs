//! The graph's status and events: the last one known, its write, a refused graph.

use super::*;

/// Records a graph that is not applied at all (invalid, or reaching too far): Valid and Ready
/// false with `reason`, one `event_reason` Warning when this is news.
pub(super) async fn refuse(
    rg: &ResourceGraph,
    ctx: &Context,
    old: &ResourceGraphStatus,
    mut status: ResourceGraphStatus,
    reason: &str,
    message: &str,
    event_reason: &str,
) -> Result<Action, Error> {
    let news = progress::refused(old, &mut status, (reason, message), &now(), rg.metadata.generation);
    if news {
        publish(ctx, rg, EventType::Warning, event_reason, message).await;
    }
    write_status(rg, ctx, old, status).await?;
    // A Transform may stand behind its graph again without the graph changing (its status
    // catches up, an allowance is restored); every other refusal waits for a new spec.
    Ok(if reason == reasons::GRANT_WITHDRAWN {
        Action::requeue(crate::controller::harness::RETRY)
    } else {
        Action::await_change()
    })
}

pub(super) fn warning(reason: &str, note: String) -> Event {
    Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(truncate(note)),
        action: "Apply".into(),
        secondary: None,
    }
}

pub(super) async fn publish(ctx: &Context, rg: &ResourceGraph, type_: EventType, reason: &str, note: &str) {
    publish_event(ctx, rg, reconcile_event(type_, reason, note)).await;
}

pub(super) async fn publish_event(ctx: &Context, rg: &ResourceGraph, event: Event) {
    crate::controller::harness::publish(&ctx.recorder, rg.object_ref(&()), event);
}

/// The graph's status as last known: the one this process wrote, when the cached graph
/// predates that write.
pub(super) fn last_status(rg: &ResourceGraph, ctx: &Context, uid: &str) -> ResourceGraphStatus {
    ctx.written
        .last(uid, rg.metadata.resource_version.as_ref(), rg.status.as_ref())
}

pub(super) async fn write_status(
    rg: &ResourceGraph,
    ctx: &Context,
    old: &ResourceGraphStatus,
    status: ResourceGraphStatus,
) -> Result<(), Error> {
    if ctx.shards.as_ref().is_some_and(|s| !s.fence().open()) {
        return Err(Error::ShardLost);
    }
    let writer = crate::controller::harness::status::StatusWriter {
        api: api(rg, ctx),
        type_meta: (crate::api::API_VERSION, "ResourceGraph"),
        manager: GRAPH_STATUS_MANAGER,
        memory: &ctx.written,
        recorder: &ctx.recorder,
        owned: crate::controller::harness::status::whole,
    };
    writer.write(rg, old, &status).await
}

/// Updates `pequod_resources_managed` from the inventory's changes.
pub(super) fn count_managed(ctx: &Context, graph_uid: &str, inventory: BTreeSet<InventoryEntry>) {
    let mut counted = ctx.counted.lock().unwrap_or_else(|p| p.into_inner());
    let before = counted.remove(graph_uid).unwrap_or_default();
    let gauge = |e: &InventoryEntry| {
        ctx.metrics.resources_managed.with_label_values(&[
            &gvk_label(&e.api_version, &e.kind),
            e.namespace.as_deref().unwrap_or(""),
        ])
    };
    for gone in before.difference(&inventory) {
        gauge(gone).dec();
    }
    for new in inventory.difference(&before) {
        gauge(new).inc();
    }
    if !inventory.is_empty() {
        counted.insert(graph_uid.to_string(), inventory);
    }
}
