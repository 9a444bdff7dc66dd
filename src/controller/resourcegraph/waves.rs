//! A pass over a graph's nodes, wave by wave: each node's live object, its write, its readiness.

use super::status::{publish_event, warning};
use super::*;

/// One node's result in a pass.
pub(super) struct NodeOutcome {
    pub(super) id: String,
    pub(super) state: NodeState,
    pub(super) inventory: Option<InventoryEntry>,
    /// When the node must be looked at again without any event (a readiness deadline).
    pub(super) requeue: Option<Duration>,
    /// Whether a retry may succeed without a change (an API error, say).
    pub(super) transient: bool,
    /// The reason the node failed for in this pass, if it did.
    pub(super) failure: Option<&'static str>,
    pub(super) event: Option<Event>,
    /// The object as observed in this pass, for the references of later nodes and outputs.
    pub(super) live: Option<Value>,
}

/// The graph's outputs resolved against the objects of this pass. An output whose field is
/// not set yet is left out; one whose node was not looked at in this pass (it waits on its
/// dependencies) keeps its last value, so that the status does not flap.
pub(super) fn outputs(
    templates: &BTreeMap<String, Value>,
    outcomes: &BTreeMap<String, NodeOutcome>,
    last: &BTreeMap<String, Value>,
) -> BTreeMap<String, Value> {
    let live = |node: &str| outcomes.get(node).and_then(|o| o.live.as_ref());
    templates
        .iter()
        .filter_map(|(name, template)| match reference::resolve(template, &live) {
            Ok(value) => Some((name.clone(), value)),
            Err(missing) if live(&missing.reference.node).is_none() => {
                last.get(name).map(|v| (name.clone(), v.clone()))
            }
            Err(_) => None,
        })
        .collect()
}

/// Applies the nodes wave by wave: a node whose dependencies are all ready is processed (those
/// of one wave at the same time, up to the concurrency limit); the others wait, saying on what.
pub(super) async fn run_waves(
    ctx: &Context,
    rg: &ResourceGraph,
    graph: &GraphIdentity,
    (origin, acting): (Origin, &Acting),
    dag: &Dag,
    old: &ResourceGraphStatus,
    time: &Time,
) -> BTreeMap<String, NodeOutcome> {
    let nodes: BTreeMap<&str, &Node> = rg.spec.graph.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    let mut outcomes: BTreeMap<String, NodeOutcome> = BTreeMap::new();
    let mut states: BTreeMap<String, NodeState> = BTreeMap::new();
    for (wave, ids) in dag.waves.iter().enumerate() {
        let eligible = hold_waiting(ids, dag, (old, time), &mut states, &mut outcomes);
        let lives: BTreeMap<&str, &Value> = outcomes
            .iter()
            .filter_map(|(id, o)| o.live.as_ref().map(|l| (id.as_str(), l)))
            .collect();
        let results = process_wave(
            (ctx, graph, (origin, acting)),
            (&nodes, &lives),
            (wave as u32, eligible),
            old,
            time,
        )
        .await;
        for outcome in results {
            states.insert(outcome.id.clone(), outcome.state.clone());
            outcomes.insert(outcome.id.clone(), outcome);
        }
    }
    outcomes
}

/// The nodes of one wave that may be processed; each of the others waits, its outcome saying
/// on what.
fn hold_waiting(
    ids: &[String],
    dag: &Dag,
    (old, time): (&ResourceGraphStatus, &Time),
    states: &mut BTreeMap<String, NodeState>,
    outcomes: &mut BTreeMap<String, NodeOutcome>,
) -> Vec<String> {
    let mut eligible = Vec::new();
    for id in ids {
        let waiting: Vec<&str> = dag.dependencies[id]
            .iter()
            .filter(|d| !states.get(*d).is_some_and(progress::is_ready))
            .map(String::as_str)
            .collect();
        let applied_before = old.inventory.iter().any(|e| &e.node_id == id);
        if progress::may_process(&waiting, applied_before) {
            eligible.push(id.clone());
            continue;
        }
        let message = progress::waiting_message(&waiting, states);
        let state = progress::transition(old.node_states.get(id), NodePhase::Pending, Some(message), None, time);
        states.insert(id.clone(), state.clone());
        outcomes.insert(
            id.clone(),
            NodeOutcome {
                id: id.clone(),
                state,
                inventory: old.inventory.iter().find(|e| &e.node_id == id).cloned(),
                requeue: None,
                transient: false,
                failure: None,
                event: None,
                live: None,
            },
        );
    }
    eligible
}

/// Processes the eligible nodes of one wave at the same time, up to the concurrency limit.
async fn process_wave(
    (ctx, graph, (origin, acting)): (&Context, &GraphIdentity, (Origin, &Acting)),
    (nodes, lives): (&BTreeMap<&str, &Node>, &BTreeMap<&str, &Value>),
    (wave, eligible): (u32, Vec<String>),
    old: &ResourceGraphStatus,
    time: &Time,
) -> Vec<NodeOutcome> {
    futures::stream::iter(eligible)
        .map(|id| {
            let node = nodes[id.as_str()];
            let previous = old.node_states.get(&id);
            // References to earlier nodes' live fields are filled in now.
            let resolved = reference::resolve(&node.object, &|n: &str| lives.get(n).copied());
            async move {
                match resolved {
                    Ok(object) if object == node.object => {
                        process_node(ctx, graph, (origin, acting), node, wave, previous, time).await
                    }
                    Ok(object) => {
                        let node = Node { object, ..node.clone() };
                        process_node(ctx, graph, (origin, acting), &node, wave, previous, time).await
                    }
                    Err(missing) => waiting_for_field(node, previous, time, &missing),
                }
            }
        })
        .buffer_unordered(ctx.apply_concurrency)
        .collect()
        .await
}

/// Publishes the pass's node events and times the nodes that finished.
pub(super) async fn report_nodes(
    ctx: &Context,
    rg: &ResourceGraph,
    old: &ResourceGraphStatus,
    outcomes: &mut BTreeMap<String, NodeOutcome>,
    time: &Time,
) {
    for (id, outcome) in outcomes.iter_mut() {
        if let Some(event) = outcome.event.take() {
            publish_event(ctx, rg, event).await;
        }
        if let Some((result, seconds)) = progress::node_finished(old.node_states.get(id), &outcome.state, time) {
            ctx.metrics
                .dag_node_execution_duration_seconds
                .with_label_values(&[id, result])
                .observe(seconds);
        }
    }
}

/// The `Authorized` condition of a pass: whose rights the graph acts with, and what the
/// apiserver refused that account.
pub(super) fn authorization(
    acting: &Acting,
    grant: Option<&Grant>,
    outcomes: &BTreeMap<String, NodeOutcome>,
) -> Condition {
    let Some(account) = &acting.account else {
        let allowance = grant.map_or("", |g| g.allowance.as_str());
        return Condition::new(
            AUTHORIZED,
            true,
            reasons::TRANSFORM_AUTHORITY,
            format!("applied with its Transform's authority ({allowance})"),
        );
    };
    let refused: Vec<String> = outcomes
        .values()
        .filter(|o| o.failure == Some(reasons::FORBIDDEN))
        .map(|o| format!("node {}: {}", o.id, o.state.message.as_deref().unwrap_or_default()))
        .collect();
    if refused.is_empty() {
        Condition::new(
            AUTHORIZED,
            true,
            reasons::SERVICE_ACCOUNT,
            format!("acts as service account {account}"),
        )
    } else {
        Condition::new(
            AUTHORIZED,
            false,
            reasons::FORBIDDEN,
            truncate(format!(
                "acts as service account {account}, which may not do what {} of its nodes need: {}",
                refused.len(),
                refused.join("; ")
            )),
        )
    }
}

pub(super) fn hash(value: &Value) -> String {
    hex::encode(Sha256::digest(value.to_string().as_bytes()))
}

/// Why a node failed in this pass.
pub(super) struct Failure {
    message: String,
    /// Whether a retry may succeed without a change.
    pub(super) transient: bool,
    /// Stable reason of its event.
    reason: &'static str,
}

impl Failure {
    fn of(e: &ApplyError) -> Self {
        Self {
            message: e.to_string(),
            transient: e.is_transient(),
            reason: e.reason(),
        }
    }

    /// The object the planner saw is gone by the time of the write.
    fn vanished() -> Self {
        Self {
            message: "the object vanished".into(),
            transient: true,
            reason: reasons::APPLY_FAILED,
        }
    }

    fn refused(refusal: Refusal, transient: bool) -> Self {
        Self {
            message: refusal.message,
            transient,
            reason: refusal.reason,
        }
    }
}

/// Whether `live` is the very object this process last applied for the node, from the same
/// desired object.
fn applied_unchanged(ctx: &Context, memory_key: &(String, String), desired_hash: &str, live: &DynamicObject) -> bool {
    ctx.applied.lock().unwrap_or_else(|p| p.into_inner()).get(memory_key)
        == Some(&(desired_hash.to_string(), live.resource_version().unwrap_or_default()))
}

/// One node's pass: resolve its kind, check that the graph may reach it, look at the object,
/// ask the planner, write what it says, and read the outcome.
pub(super) async fn process_node(
    ctx: &Context,
    graph: &GraphIdentity,
    (origin, acting): (Origin, &Acting),
    node: &Node,
    wave: u32,
    previous: Option<&NodeState>,
    time: &Time,
) -> NodeOutcome {
    let resolved = match ctx.applier.resolve(node.api_version(), node.kind()).await {
        Ok(r) => r,
        Err(e) => return failed(node, previous, time, Failure::of(&e)),
    };
    if let Some(refused) = node_confinement(node, &resolved, &graph.namespace, origin, &acting.readable) {
        return failed(node, previous, time, Failure::refused(refused, false));
    }
    if node.is_read() {
        return read_node(ctx, graph, acting, node, &resolved, previous, time).await;
    }
    let (desired, inventory) = planned(node, wave, graph, &resolved);
    let live = match live_object(ctx, acting, &resolved, &inventory).await {
        Ok(live) => live,
        Err(e) => return failed(node, previous, time, Failure::of(&e)),
    };
    let desired_hash = hash(&desired);
    let memory_key = (graph.uid.clone(), node.id.clone());
    let unchanged_since_apply = live
        .as_ref()
        .is_some_and(|l| applied_unchanged(ctx, &memory_key, &desired_hash, l));
    let live_value = live.as_ref().map(|l| typed(l, node));
    let plan = write::decide_write(node, desired, live_value.as_ref(), graph, unchanged_since_apply);
    let (object, applied_at) = match (plan.write, live) {
        // Retried: the object may go away, or be adopted by a changed node.
        (Write::Refuse(refused), _) => return failed(node, previous, time, Failure::refused(refused, true)),
        (Write::Nothing, Some(live)) => (live, previous.and_then(|p| p.applied_at.clone())),
        (Write::Nothing, None) => return failed(node, previous, time, Failure::vanished()),
        (write, live) => match write_node(acting, graph, node, &resolved, &plan.desired, write, live).await {
            Ok(Applied { object, wrote: true }) => {
                let rv = object.resource_version().unwrap_or_default();
                ctx.applied
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(memory_key, (desired_hash, rv));
                (object, Some(time.clone()))
            }
            // Created a moment earlier by someone else (Create mode): found, not written.
            Ok(Applied { object, wrote: false }) => (object, previous.and_then(|p| p.applied_at.clone())),
            Err(e) => return failed(node, previous, time, Failure::of(&e)),
        },
    };
    let written = Written {
        object,
        inventory,
        applied_at,
        adopted_from: plan.adopted_from,
    };
    observed_node(ctx, graph, node, written, previous, time).await
}

/// The namespace a `Read` node reads in: the one it names, else the graph's (none for a
/// cluster-scoped kind).
pub(super) fn read_namespace<'a>(node: &'a Node, resolved: &Resolved, graph_namespace: &'a str) -> Option<&'a str> {
    resolved.namespaced.then(|| node.namespace().unwrap_or(graph_namespace))
}

/// What a `Read` node reads, as its watch is keyed.
pub(super) fn read_target(node: &Node, resolved: &Resolved, graph_namespace: &str, acting: &Acting) -> ReadTarget {
    ReadTarget {
        kind: resolved.key(),
        namespace: read_namespace(node, resolved, graph_namespace).map(str::to_string),
        name: (!node.name().is_empty()).then(|| node.name().to_string()),
        selector: node.read_selector(),
        reader: acting.account.as_ref().map(|a| a.username()),
    }
}

/// A `Read` node's pass: the object it names (or the one its selector matches), read from the
/// apiserver with the graph's rights (the caches hold only Pequod's objects), its gates
/// judged. Nothing is written, and nothing enters the inventory; the object's watch brings the
/// graph back when it appears or changes.
async fn read_node(
    ctx: &Context,
    graph: &GraphIdentity,
    acting: &Acting,
    node: &Node,
    resolved: &Resolved,
    previous: Option<&NodeState>,
    time: &Time,
) -> NodeOutcome {
    let namespace = read_namespace(node, resolved, &graph.namespace);
    let what = match (namespace, node.name()) {
        (Some(ns), "") => format!("the {} in {ns} its selector matches", node.kind()),
        (None, "") => format!("the {} its selector matches", node.kind()),
        (Some(ns), name) => format!("{} {ns}/{name}", node.kind()),
        (None, name) => format!("{} {name}", node.kind()),
    };
    let object = match acting.applier.read(resolved, namespace, node).await {
        Ok(Read::One(object)) => *object,
        Ok(Read::Absent) => {
            let message = format!("waiting for {what} to exist; Pequod reads it and never writes it");
            return pending(node, previous, time, message);
        }
        Ok(Read::Several) => {
            let failure = Failure {
                message: format!(
                    "more than one {} matches the selector of node {}; a Read node reads exactly one",
                    node.kind(),
                    node.id
                ),
                transient: false,
                reason: reasons::READ_FAILED,
            };
            return failed(node, previous, time, failure);
        }
        Err(e) => return failed(node, previous, time, Failure::of(&e)),
    };
    let value = typed(&object, node);
    let version = object.resource_version().unwrap_or_default();
    let (phase, message, requeue, error) = progress::readiness(&ctx.readiness, node, &value, previous, time).await;
    let message = match phase {
        NodePhase::Ready => Some(format!("read {what} at resourceVersion {version}")),
        _ => message,
    };
    let event = error
        .as_ref()
        .filter(|_| previous.is_none_or(|p| p.phase != NodePhase::Error))
        .map(|e| warning(progress::readiness_event_reason(e), format!("node {}: {e}", node.id)));
    let mut state = progress::transition(previous, phase, message, error, time);
    state.resource_ref = Some(ResourceRef {
        api_version: node.api_version().into(),
        kind: node.kind().into(),
        namespace: object.namespace(),
        name: object.name_any(),
        uid: object.uid(),
    });
    state.observed_resource_version = Some(version);
    NodeOutcome {
        id: node.id.clone(),
        state,
        inventory: None,
        requeue,
        transient: false,
        failure: None,
        event,
        live: Some(value),
    }
}

/// The object as it is ([`crate::controller::watches::live_object`]). An object this graph did not make
/// is never taken over by accident: the cache holds only objects of existing graphs, and a miss
/// asks the apiserver before any write. A graph acting as a service account reads from the
/// cache only what an access review says the account may read; everything else it reads with
/// the account's own rights.
pub(super) async fn live_object(
    ctx: &Context,
    acting: &Acting,
    resolved: &Resolved,
    entry: &InventoryEntry,
) -> Result<Option<DynamicObject>, ApplyError> {
    let namespace = entry.namespace.as_deref();
    let readable = || async {
        match &acting.account {
            None => true,
            Some(account) => ctx
                .reads
                .may_get(&ctx.client, account, &resolved.resource, namespace)
                .await
                .unwrap_or(false),
        }
    };
    crate::controller::watches::live_object(
        Some(&ctx.watches),
        &acting.applier,
        resolved,
        (namespace, &entry.name),
        readable,
    )
    .await
}

/// Carries out a planned [`Write::Apply`]: applies the object as the graph's field manager
/// (taking it over from the predecessor graph when asked) and releases earlier managers.
pub(super) async fn write_node(
    acting: &Acting,
    graph: &GraphIdentity,
    node: &Node,
    resolved: &Resolved,
    desired: &Value,
    write: Write,
    live: Option<DynamicObject>,
) -> Result<Applied, ApplyError> {
    let Write::Apply {
        reclaim,
        take_over,
        release_managers,
    } = write
    else {
        return Err(ApplyError::Invalid {
            message: "nothing to write".into(),
        });
    };
    let manager = write::field_manager(node, graph);
    let desired = if take_over {
        &write::taking_over(desired, &graph.uid)
    } else {
        desired
    };
    let applied = acting
        .applier
        .apply(node, &manager, resolved, desired, live.as_ref(), reclaim)
        .await?;
    let empty = write::manager_release(desired);
    for earlier in release_managers {
        if let Err(e) = acting.applier.release_manager(resolved, &empty, &earlier).await {
            // The next pass finds the manager again and retries.
            tracing::warn!(error = %e, node = %node.id, manager = %earlier, "releasing an earlier field manager failed");
        }
    }
    Ok(applied)
}

/// A node whose object references a field an earlier node does not have yet: nothing is
/// applied (never an empty value); the earlier object's watch brings the graph back.
pub(super) fn waiting_for_field(
    node: &Node,
    previous: Option<&NodeState>,
    time: &Time,
    missing: &reference::Missing,
) -> NodeOutcome {
    pending(node, previous, time, missing.to_string())
}

/// A node that waits, saying on what; nothing applied, nothing observed.
fn pending(node: &Node, previous: Option<&NodeState>, time: &Time, message: String) -> NodeOutcome {
    NodeOutcome {
        id: node.id.clone(),
        state: progress::transition(previous, NodePhase::Pending, Some(message), None, time),
        inventory: None,
        requeue: None,
        transient: false,
        failure: None,
        event: None,
        live: None,
    }
}

/// A failed node's outcome, with one event per failure rather than one per pass.
pub(super) fn failed(node: &Node, previous: Option<&NodeState>, time: &Time, failure: Failure) -> NodeOutcome {
    let Failure {
        message,
        transient,
        reason,
    } = failure;
    let news = previous.is_none_or(|p| p.phase != NodePhase::Error || p.last_error.as_deref() != Some(&message));
    NodeOutcome {
        id: node.id.clone(),
        state: progress::transition(
            previous,
            NodePhase::Error,
            Some(message.clone()),
            Some(message.clone()),
            time,
        ),
        inventory: None,
        requeue: None,
        transient,
        failure: Some(reason),
        event: news.then(|| warning(reason, format!("node {}: {message}", node.id))),
        live: None,
    }
}

/// A node's object once written (or found), and what the pass knows of it.
pub(super) struct Written {
    object: DynamicObject,
    /// The entry the object has in the inventory if it is this graph's.
    pub(super) inventory: InventoryEntry,
    applied_at: Option<Time>,
    /// Field managers the object had before the node adopted it.
    adopted_from: Option<String>,
}

/// A node's outcome once its object is written (or found): inventory, readiness, state.
pub(super) async fn observed_node(
    ctx: &Context,
    graph: &GraphIdentity,
    node: &Node,
    written: Written,
    previous: Option<&NodeState>,
    time: &Time,
) -> NodeOutcome {
    let Written {
        object,
        inventory,
        applied_at,
        adopted_from,
    } = written;
    let value = typed(&object, node);
    let resource_ref = ResourceRef {
        api_version: node.api_version().into(),
        kind: node.kind().into(),
        namespace: inventory.namespace.clone(),
        name: inventory.name.clone(),
        uid: object.uid(),
    };
    // Only what this graph wrote goes into its inventory, with the uid that teardown checks: an
    // object a Create node merely found stays someone else's.
    let inventory = (ownership::owner(&value, graph) == ownership::Owner::ThisGraph).then(|| InventoryEntry {
        uid: object.uid(),
        ..inventory
    });
    let (phase, message, requeue, error) = progress::readiness(&ctx.readiness, node, &value, previous, time).await;
    let event = error
        .as_ref()
        .filter(|_| previous.is_none_or(|p| p.phase != NodePhase::Error))
        .map(|e| warning(progress::readiness_event_reason(e), format!("node {}: {e}", node.id)));
    let adopting = node.apply_policy.mode == crate::api::ApplyMode::Adopt;
    let phase = if phase == NodePhase::Ready && adopting && adopted_from.is_some() {
        NodePhase::Adopted
    } else {
        phase
    };
    let mut state = progress::transition(previous, phase, message, error, time);
    state.applied_at = applied_at;
    state.adopted = adopting.then_some(adopted_from.is_some());
    state.previous_managers = adopted_from
        .iter()
        .flat_map(|m| m.split(','))
        .map(str::to_string)
        .collect();
    state.resource_ref = Some(resource_ref);
    NodeOutcome {
        id: node.id.clone(),
        state,
        inventory,
        requeue,
        transient: false,
        failure: None,
        event,
        live: Some(value),
    }
}

/// `object` as JSON with its `apiVersion` and `kind`, which objects listed into a watch cache
/// come without: comparisons with the desired object and gates (a Secret's values are never
/// quoted) need them.
pub(super) fn typed(object: &DynamicObject, node: &Node) -> Value {
    let mut value = serde_json::to_value(object).unwrap_or_default();
    if let Some(fields) = value.as_object_mut() {
        fields.entry("apiVersion").or_insert_with(|| node.api_version().into());
        fields.entry("kind").or_insert_with(|| node.kind().into());
    }
    value
}

/// The object to apply for a node and the inventory entry it will have.
pub(super) fn planned(node: &Node, wave: u32, graph: &GraphIdentity, resolved: &Resolved) -> (Value, InventoryEntry) {
    let desired = desired_object(node, graph, resolved.namespaced);
    let (namespace, name) = crate::apply::identity(&desired);
    let entry = InventoryEntry {
        node_id: node.id.clone(),
        api_version: node.api_version().into(),
        kind: node.kind().into(),
        namespace,
        name,
        wave,
        uid: None,
    };
    (desired, entry)
}
