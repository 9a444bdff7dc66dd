//! How a pass over a graph reads in its status, apart from any I/O: each node's state from
//! what happened to it, and the graph's phase and conditions from its nodes' states. The one
//! status decision of a reconcile is [`conclude`].

use crate::api::condition_types::{DEGRADED, PROGRESSING, READY, VALID};
use crate::api::reasons;
use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::Value;

use crate::api::{
    Condition, ConditionStatus, DEFAULT_READY_TIMEOUT_SECONDS, GraphPhase, InventoryEntry, Node, NodePhase, NodeState,
    ReadyGate, ResourceGraphStatus, has_condition, set_condition,
};
use crate::readiness::{GateState, Registry};

/// Prefix of the error of a node whose readiness gate timed out.
pub const READINESS_TIMEOUT: &str = "readiness timed out";
/// Prefix of the error of a node whose readiness expression's evaluation ran out of time.
pub const EXPRESSION_TIMEOUT: &str = "expression timed out";
/// When a node whose expression timed out is evaluated again without any event: the pool may
/// have been busy with other graphs' evaluations.
pub const EXPRESSION_RETRY: Duration = Duration::from_secs(30);
/// When a readiness check put off for want of an evaluation slot is tried again.
pub const DEFERRED_RETRY: Duration = Duration::from_secs(5);

/// A node's new state: the previous one when nothing changed, so timestamps stay put.
pub fn transition(
    previous: Option<&NodeState>,
    phase: NodePhase,
    message: Option<String>,
    last_error: Option<String>,
    time: &Time,
) -> NodeState {
    let mut state = previous.cloned().unwrap_or_else(|| NodeState::new(phase));
    if state.phase != phase || state.last_transition_time.is_none() {
        state.last_transition_time = Some(time.clone());
        if matches!(phase, NodePhase::Ready | NodePhase::Adopted) {
            state.ready_at = Some(time.clone());
        }
    }
    state.phase = phase;
    state.message = message;
    if last_error.is_some() || !matches!(phase, NodePhase::Error) {
        state.last_error = last_error;
    }
    state
}

/// Whether a node counts as done for its dependants.
pub fn is_ready(state: &NodeState) -> bool {
    matches!(state.phase, NodePhase::Ready | NodePhase::Adopted)
}

/// Whether a node is processed in this pass: when its dependencies are ready, or, once this
/// graph has applied it (it is in the inventory), always. Gates order the first creation
/// only: an object deleted or edited while an upstream gate has regressed (a rollout in
/// progress or stuck) is corrected at once, not when the upstream recovers.
pub fn may_process(waiting_on: &[&str], applied_before: bool) -> bool {
    waiting_on.is_empty() || applied_before
}

/// Most dependencies a waiting message names; the rest are counted.
const LISTED_DEPENDENCIES: usize = 5;
/// Most entries (waiting or failed nodes) a condition's message names; the rest are counted.
const LISTED_NODES: usize = 10;
/// Most bytes of one dependency's or node's message quoted in another message.
const QUOTED_BYTES: usize = 200;
/// Bytes of `message`, and as many of `lastError`, that all node states of a graph share:
/// each node's are cut to this divided by the node count, within [`NODE_TEXT_BYTES`].
const NODE_TEXT_BUDGET: usize = 96 * 1024;
/// Least and most bytes of one node's `message` or `lastError`.
pub const NODE_TEXT_BYTES: (usize, usize) = (96, 1024);

/// What a node waits on: each dependency not ready yet, with its phase and, unless it is
/// waiting itself (its message would nest), its message; at most [`LISTED_DEPENDENCIES`].
pub fn waiting_message(dependencies: &[&str], states: &BTreeMap<String, NodeState>) -> String {
    let described = dependencies.iter().map(|dep| match states.get(*dep) {
        Some(s) => match s.message.as_deref() {
            Some(m) if s.phase != NodePhase::Pending => format!("{dep} ({:?}: {})", s.phase, cut(m, QUOTED_BYTES)),
            _ => format!("{dep} ({:?})", s.phase),
        },
        None => dep.to_string(),
    });
    format!("waiting for {}", listed(described, ", ", LISTED_DEPENDENCIES))
}

/// The first `most` items joined by `separator`, and how many more there are.
fn listed(items: impl ExactSizeIterator<Item = String>, separator: &str, most: usize) -> String {
    let more = items.len().saturating_sub(most);
    let mut text = items.take(most).collect::<Vec<_>>().join(separator);
    if more > 0 {
        text.push_str(&format!("{separator}and {more} more"));
    }
    text
}

/// `text` cut to at most `max` bytes (at a character boundary), with `...` when cut.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// The most bytes of `message`, and of `lastError`, that each node of a graph of `total`
/// nodes keeps: the status of a large graph stays compact (its events carry the full text).
pub fn node_text_bytes(total: usize) -> usize {
    (NODE_TEXT_BUDGET / total.max(1)).clamp(NODE_TEXT_BYTES.0, NODE_TEXT_BYTES.1)
}

/// Phase, message, requeue deadline and error of a node whose object is applied, from its
/// gates. Expressions are evaluated on the registry's evaluation pool, with its deadline.
pub async fn readiness(
    registry: &Registry,
    node: &Node,
    object: &Value,
    previous: Option<&NodeState>,
    time: &Time,
) -> (NodePhase, Option<String>, Option<Duration>, Option<String>) {
    let unready = registry.first_unready_bounded(&node.id, &node.ready_when, object).await;
    judge_readiness(node, unready, previous, time)
}

/// The event reason of a node's readiness error.
pub fn readiness_event_reason(error: &str) -> &'static str {
    if error.starts_with(READINESS_TIMEOUT) {
        reasons::READINESS_TIMEOUT
    } else if error.starts_with(EXPRESSION_TIMEOUT) {
        reasons::EXPRESSION_TIMEOUT
    } else {
        reasons::READINESS_FAILED
    }
}

/// [`readiness`] once the gates are checked: `unready` is the first gate that does not pass.
pub fn judge_readiness(
    node: &Node,
    unready: Option<(Option<&ReadyGate>, GateState)>,
    previous: Option<&NodeState>,
    time: &Time,
) -> (NodePhase, Option<String>, Option<Duration>, Option<String>) {
    let Some((gate, state)) = unready else {
        return (NodePhase::Ready, Some(ready_message(&node.ready_when)), None, None);
    };
    let reason_is_deferred = matches!(state, GateState::Deferred(_));
    match state {
        GateState::Ready => (NodePhase::Ready, Some(ready_message(&node.ready_when)), None, None),
        GateState::Failed(reason) => (
            NodePhase::Error,
            Some(reason.clone()),
            None,
            Some(format!("readiness failed: {reason}")),
        ),
        GateState::TimedOut(reason) => (
            NodePhase::Error,
            Some(reason.clone()),
            Some(EXPRESSION_RETRY),
            Some(format!("{EXPRESSION_TIMEOUT}: {reason}")),
        ),
        GateState::Waiting(reason) | GateState::Deferred(reason) => {
            let timeout = gate
                .and_then(|g| g.timeout)
                .unwrap_or(DEFAULT_READY_TIMEOUT_SECONDS)
                .max(1) as u64;
            // Only an earlier timeout keeps the node failed; an earlier apply error does not.
            let timed_out_before = previous.is_some_and(|p| {
                p.phase == NodePhase::Error
                    && p.last_error
                        .as_deref()
                        .is_some_and(|e| e.starts_with(READINESS_TIMEOUT))
            });
            let since = previous
                .filter(|p| p.phase == NodePhase::WaitingReady)
                .and_then(|p| p.last_transition_time.clone())
                .unwrap_or_else(|| time.clone());
            let elapsed = seconds_between(&since, time) as u64;
            if timed_out_before || elapsed >= timeout {
                let error = format!("{READINESS_TIMEOUT} after {timeout}s: {reason}");
                (NodePhase::Error, Some(reason), None, Some(error))
            } else {
                let left = Duration::from_secs(timeout - elapsed + 1);
                // A check put off for want of an evaluation slot is tried again soon; others
                // wait for their object to change, or for their timeout.
                let next = if reason_is_deferred {
                    left.min(DEFERRED_RETRY)
                } else {
                    left
                };
                (NodePhase::WaitingReady, Some(reason), Some(next), None)
            }
        }
    }
}

fn ready_message(gates: &[ReadyGate]) -> String {
    if gates.is_empty() {
        "applied".into()
    } else {
        let names: Vec<String> = gates.iter().map(|g| format!("{:?}", g.type_)).collect();
        format!("ready ({})", names.join(", "))
    }
}

fn seconds_between(since: &Time, until: &Time) -> i64 {
    (until.0.as_second() - since.0.as_second()).max(0)
}

/// When a node reached a terminal phase (Ready, Adopted, Error) in this pass: its result and
/// the seconds since it was applied.
pub fn node_finished(previous: Option<&NodeState>, state: &NodeState, time: &Time) -> Option<(&'static str, f64)> {
    let terminal = |p: NodePhase| matches!(p, NodePhase::Ready | NodePhase::Adopted | NodePhase::Error);
    if !terminal(state.phase) || previous.is_some_and(|p| terminal(p.phase)) {
        return None;
    }
    let result = if state.phase == NodePhase::Error {
        "failure"
    } else {
        "success"
    };
    let since = previous
        .and_then(|p| p.applied_at.clone())
        .or_else(|| state.applied_at.clone())?;
    Some((result, seconds_between(&since, time) as f64))
}

/// What a pass concluded besides the status itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Conclusion {
    /// The graph became Ready in this pass (worth an event).
    pub became_ready: bool,
    /// An execution ended in this pass: its result and duration in seconds.
    pub finished: Option<(&'static str, f64)>,
}

/// Sets the graph's phase, timestamps and conditions in `status` (whose `node_states` hold
/// this pass's states) from its nodes and the objects still being pruned.
pub fn conclude(
    old: &ResourceGraphStatus,
    status: &mut ResourceGraphStatus,
    total: usize,
    prune_waiting: &[InventoryEntry],
    time: &Time,
    generation: Option<i64>,
) -> Conclusion {
    trim_node_texts(status, total);
    let states = &status.node_states;
    let ready = states.values().filter(|s| is_ready(s)).count();
    let errors: Vec<String> = states
        .iter()
        .filter(|(_, s)| s.phase == NodePhase::Error)
        .map(|(id, s)| {
            format!(
                "{id}: {}",
                cut(s.last_error.as_deref().unwrap_or("error"), QUOTED_BYTES)
            )
        })
        .collect();
    let complete = ready == total && prune_waiting.is_empty();
    let phase = if !errors.is_empty() {
        GraphPhase::Failed
    } else if complete {
        GraphPhase::Completed
    } else {
        GraphPhase::Executing
    };
    let waiting: Vec<String> = states
        .iter()
        .filter(|(_, s)| !is_ready(s))
        .map(|(id, s)| format!("{id}: {}", cut(s.message.as_deref().unwrap_or("pending"), QUOTED_BYTES)))
        .chain(prune_waiting.iter().map(|e| format!("pruning {} {}", e.kind, e.name)))
        .collect();
    let conditions = graph_conditions(complete, errors, waiting, (ready, total));
    status.ready_nodes = Some(format!("{ready}/{total}"));
    let finished = record_execution(old, status, phase, time);
    status.phase = Some(phase);
    for condition in conditions {
        set_condition(&mut status.conditions, condition, time, generation);
    }
    Conclusion {
        became_ready: complete && !has_condition(&old.conditions, READY, ConditionStatus::True, None),
        finished,
    }
}

/// Cuts each node's message and last error to its share of the status.
fn trim_node_texts(status: &mut ResourceGraphStatus, total: usize) {
    let most = node_text_bytes(total);
    for state in status.node_states.values_mut() {
        for text in [&mut state.message, &mut state.last_error].into_iter().flatten() {
            if text.len() > most {
                *text = cut(text, most);
            }
        }
    }
}

/// Ready, Progressing and Degraded: complete, failed (`errors`), or still applying (`waiting`).
fn graph_conditions(
    complete: bool,
    errors: Vec<String>,
    waiting: Vec<String>,
    (ready, total): (usize, usize),
) -> [Condition; 3] {
    if complete {
        [
            Condition::new(
                READY,
                true,
                reasons::ALL_NODES_READY,
                format!("all {total} nodes are ready"),
            ),
            Condition::new(PROGRESSING, false, reasons::COMPLETED, "nothing left to apply"),
            Condition::new(DEGRADED, false, reasons::ALL_NODES_READY, "no node failed"),
        ]
    } else if !errors.is_empty() {
        let summary = listed(errors.into_iter(), "; ", LISTED_NODES);
        [
            Condition::new(
                READY,
                false,
                reasons::NODE_FAILED,
                format!("{ready}/{total} nodes ready; failed: {summary}"),
            ),
            Condition::new(PROGRESSING, false, reasons::NODE_FAILED, "blocked by failed nodes"),
            Condition::new(DEGRADED, true, reasons::NODE_FAILED, summary),
        ]
    } else {
        [
            Condition::new(
                READY,
                false,
                reasons::PROGRESSING,
                format!("{ready}/{total} nodes ready"),
            ),
            Condition::new(
                PROGRESSING,
                true,
                reasons::APPLYING,
                listed(waiting.into_iter(), "; ", LISTED_NODES),
            ),
            Condition::new(DEGRADED, false, reasons::PROGRESSING, "no node failed"),
        ]
    }
}

/// The execution's timestamps when the phase changes to `phase`; the result and duration when
/// an execution ended.
fn record_execution(
    old: &ResourceGraphStatus,
    status: &mut ResourceGraphStatus,
    phase: GraphPhase,
    time: &Time,
) -> Option<(&'static str, f64)> {
    if status.phase == Some(phase) {
        return None;
    }
    // An execution starts whenever the graph leaves a settled state (or has none yet),
    // including one that completes within this very pass.
    if old.phase != Some(GraphPhase::Executing) {
        status.started_at = Some(time.clone());
        status.completed_at = None;
    }
    if !matches!(phase, GraphPhase::Completed | GraphPhase::Failed) {
        return None;
    }
    status.completed_at = Some(time.clone());
    let result = if phase == GraphPhase::Completed {
        "success"
    } else {
        "failure"
    };
    status
        .started_at
        .as_ref()
        .map(|started| (result, seconds_between(started, time) as f64))
}

/// Records a graph that is not applied at all (invalid, or reaching too far): Valid, Ready and
/// Progressing false and Degraded true with `reason`, phase Failed. Returns whether this is
/// news to tell in an event: the graph was not refused before, or for another reason or
/// message.
pub fn refused(
    old: &ResourceGraphStatus,
    status: &mut ResourceGraphStatus,
    (reason, message): (&str, &str),
    time: &Time,
    generation: Option<i64>,
) -> bool {
    // Ready says why too: it is what an instance shows of its graph.
    let not_applied = format!("the graph is not applied, nothing was written: {message}");
    for condition in [
        Condition::new(VALID, false, reason, message),
        Condition::new(READY, false, reason, not_applied),
        Condition::new(PROGRESSING, false, reason, "the graph is not applied"),
        Condition::new(DEGRADED, true, reason, message),
    ] {
        set_condition(&mut status.conditions, condition, time, generation);
    }
    status.phase = Some(GraphPhase::Failed);
    old.phase != Some(GraphPhase::Failed)
        || !has_condition(&old.conditions, VALID, ConditionStatus::False, Some(reason))
        || old.conditions.iter().any(|c| c.type_ == VALID && c.message != message)
}

/// Message of the Valid condition of a graph in the shape of earlier releases.
pub const DEPRECATED_SHAPE_MESSAGE: &str = "the graph is valid; it is written in the shape of earlier releases \
     (spec.nodes with object and dependsOn), which is read until the API's next version: write spec.graph.nodes \
     with resource and dependencies";

/// Records a graph that passed validation, in the current shape or in that of earlier
/// releases (`legacy_shape`).
pub fn validated(status: &mut ResourceGraphStatus, legacy_shape: bool, time: &Time, generation: Option<i64>) {
    let valid = if legacy_shape {
        Condition::new(VALID, true, reasons::DEPRECATED_SHAPE, DEPRECATED_SHAPE_MESSAGE)
    } else {
        Condition::new(VALID, true, reasons::VALID, "the graph is valid")
    };
    set_condition(&mut status.conditions, valid, time, generation);
}

/// Records a deleted graph whose objects are not all gone: its inventory is what `remaining`
/// holds, and Ready says which objects it waits for (those of the highest wave) and which it
/// could not look up (`failures`).
pub fn deleting(
    status: &mut ResourceGraphStatus,
    remaining: Vec<InventoryEntry>,
    failures: &[String],
    time: &Time,
    generation: Option<i64>,
) {
    let waiting = crate::executor::ownership::waiting_for(&remaining);
    let unknown = if failures.is_empty() {
        String::new()
    } else {
        format!("; cannot look up {}", failures.join("; "))
    };
    let message = format!(
        "deleting in reverse dependency order; waiting for {}{unknown}",
        waiting.join(", ")
    );
    set_condition(
        &mut status.conditions,
        Condition::new(READY, false, reasons::DELETING, message),
        time,
        generation,
    );
    status.inventory = remaining;
}

/// Settled graphs are looked at again after this long; watch events of their objects bring
/// them back at once, so this is only a safety net.
pub const RESYNC: Duration = Duration::from_secs(600);

/// When to look at the graph again: soon after a failure that may pass (or while objects are
/// being pruned), at the earliest readiness deadline, else at the resync.
pub fn next_check(retry: Duration, transient: bool, pruning: bool, deadline: Option<Duration>) -> Duration {
    match (transient || pruning, deadline) {
        (true, _) => retry,
        (false, Some(deadline)) => deadline,
        (false, None) => RESYNC,
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_check_put_off_for_want_of_a_slot_waits_and_is_tried_again_soon() {
        let n = node(json!([{"type": "Expression", "expression": "true"}]));
        let time = at(100);
        let busy = Some((n.ready_when.first(), GateState::Deferred("slots are busy".into())));
        let (phase, _, requeue, error) = judge_readiness(&n, busy, None, &time);
        assert_eq!(phase, NodePhase::WaitingReady);
        assert_eq!(requeue, Some(DEFERRED_RETRY));
        assert_eq!(error, None, "not a failure of the node");
    }

    #[test]
    fn gates_order_the_first_creation_only() {
        assert!(may_process(&[], false), "dependencies ready");
        assert!(!may_process(&["deployment"], false), "first creation waits");
        assert!(
            may_process(&["deployment"], true),
            "an applied node is kept as declared"
        );
    }
    use super::*;
    use serde_json::json;

    fn node(gates: Value) -> Node {
        serde_json::from_value(json!({"id": "n", "object": {}, "readyWhen": gates})).unwrap()
    }

    fn at(second: i64) -> Time {
        Time(jiff::Timestamp::from_second(second).unwrap())
    }

    fn state(phase: NodePhase, since: i64, last_error: Option<&str>) -> NodeState {
        NodeState {
            phase,
            message: None,
            last_error: last_error.map(str::to_string),
            last_transition_time: Some(at(since)),
            applied_at: Some(at(since)),
            ready_at: None,
            adopted: None,
            previous_managers: Vec::new(),
            resource_ref: None,
            observed_resource_version: None,
        }
    }

    #[tokio::test]
    async fn waiting_gate_times_out_from_when_waiting_began() {
        let registry = Registry::default();
        let n = node(json!([{"type": "FieldMatch", "path": "ready", "value": true, "timeout": 60}]));
        let object = json!({"ready": false});
        let waiting = state(NodePhase::WaitingReady, 1000, None);
        let (phase, _, requeue, error) = readiness(&registry, &n, &object, Some(&waiting), &at(1030)).await;
        assert_eq!(
            (phase, requeue, error),
            (NodePhase::WaitingReady, Some(Duration::from_secs(31)), None)
        );
        let (phase, _, _, error) = readiness(&registry, &n, &object, Some(&waiting), &at(1060)).await;
        assert_eq!(phase, NodePhase::Error);
        assert!(error.unwrap().starts_with("readiness timed out after 60s"));
    }

    #[tokio::test]
    async fn an_earlier_apply_error_does_not_count_as_a_timeout() {
        let registry = Registry::default();
        let n = node(json!([{"type": "FieldMatch", "path": "ready", "value": true}]));
        let object = json!({"ready": false});
        let apply_failed = state(NodePhase::Error, 0, Some("conflict with \"other\""));
        let (phase, _, requeue, _) = readiness(&registry, &n, &object, Some(&apply_failed), &at(10_000)).await;
        assert_eq!(phase, NodePhase::WaitingReady);
        assert_eq!(
            requeue,
            Some(Duration::from_secs(DEFAULT_READY_TIMEOUT_SECONDS as u64 + 1))
        );
        let timed_out = state(NodePhase::Error, 0, Some("readiness timed out after 300s: x"));
        let (phase, _, _, _) = readiness(&registry, &n, &object, Some(&timed_out), &at(10_000)).await;
        assert_eq!(
            phase,
            NodePhase::Error,
            "a timed-out node stays failed until its gate passes"
        );
        let (phase, _, _, _) = readiness(&registry, &n, &json!({"ready": true}), Some(&timed_out), &at(10_000)).await;
        assert_eq!(phase, NodePhase::Ready);
    }

    #[test]
    fn an_expression_that_timed_out_fails_the_node_and_is_tried_again() {
        let n = node(json!([{"type": "Expression", "expression": "self.ok"}]));
        let message = "the readiness expression of node n ran past its deadline of 1s";
        let unready = Some((n.ready_when.first(), GateState::TimedOut(message.into())));
        let (phase, shown, requeue, error) = judge_readiness(&n, unready, None, &at(10));
        assert_eq!(
            (phase, shown.as_deref(), requeue),
            (NodePhase::Error, Some(message), Some(EXPRESSION_RETRY))
        );
        let error = error.unwrap();
        assert_eq!(error, format!("expression timed out: {message}"));
        assert_eq!(readiness_event_reason(&error), "ExpressionTimeout");
        assert_eq!(
            readiness_event_reason("readiness timed out after 60s: x"),
            "ReadinessTimeout"
        );
        assert_eq!(
            readiness_event_reason("readiness failed: the job failed"),
            "ReadinessFailed"
        );
    }

    fn pass(states: &[(&str, NodePhase, Option<&str>)]) -> ResourceGraphStatus {
        ResourceGraphStatus {
            node_states: states
                .iter()
                .map(|(id, phase, error)| (id.to_string(), state(*phase, 100, *error)))
                .collect(),
            ..Default::default()
        }
    }

    fn condition<'a>(status: &'a ResourceGraphStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn the_status_of_a_large_graph_stays_compact() {
        // Waiting messages name a waiting dependency's phase only: they do not nest.
        let mut states = BTreeMap::new();
        states.insert("a".to_string(), state(NodePhase::WaitingReady, 100, None));
        states.get_mut("a").unwrap().message = Some("waiting for Available".into());
        let b = waiting_message(&["a"], &states);
        assert_eq!(b, "waiting for a (WaitingReady: waiting for Available)");
        let mut pending = state(NodePhase::Pending, 100, None);
        pending.message = Some(b);
        states.insert("b".to_string(), pending);
        assert_eq!(waiting_message(&["b"], &states), "waiting for b (Pending)");
        let many: Vec<String> = (0..8).map(|i| format!("d{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            waiting_message(&many, &states),
            "waiting for d0, d1, d2, d3, d4, and 3 more"
        );

        // 1,000 failed nodes with long errors: each keeps a short text, the conditions ten.
        let long = "e".repeat(5000);
        let failed: Vec<(String, NodePhase, Option<&str>)> = (0..1000)
            .map(|i| (format!("n{i:04}"), NodePhase::Error, Some(long.as_str())))
            .collect();
        let failed: Vec<(&str, NodePhase, Option<&str>)> =
            failed.iter().map(|(id, p, e)| (id.as_str(), *p, *e)).collect();
        let mut status = pass(&failed);
        conclude(&ResourceGraphStatus::default(), &mut status, 1000, &[], &at(160), None);
        assert_eq!(node_text_bytes(1000), 98);
        assert_eq!(node_text_bytes(3), 1024);
        assert!(
            status
                .node_states
                .values()
                .all(|s| s.last_error.as_ref().unwrap().len() <= 98)
        );
        let degraded = &condition(&status, "Degraded").message;
        assert!(degraded.ends_with("; and 990 more"), "{degraded}");
        assert!(degraded.len() < 10 * 210 + 20, "{}", degraded.len());
        let bytes = serde_json::to_vec(&status).unwrap().len();
        assert!(bytes < 256 * 1024, "{bytes} bytes: 5 MB uncut");
    }

    #[test]
    fn the_graph_s_phase_and_conditions_follow_its_nodes() {
        let entry = InventoryEntry {
            node_id: "gone".into(),
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: Some("team".into()),
            name: "old".into(),
            wave: 0,
            uid: None,
        };
        type States = Vec<(&'static str, NodePhase, Option<&'static str>)>;
        type Case = (
            &'static str,
            States,
            Vec<InventoryEntry>,
            GraphPhase,
            &'static str,
            &'static str,
        );
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("all ready", vec![("a", NodePhase::Ready, None), ("b", NodePhase::Adopted, None)], vec![], GraphPhase::Completed, "AllNodesReady", "all 2 nodes are ready"),
            ("one waiting", vec![("a", NodePhase::Ready, None), ("b", NodePhase::WaitingReady, None)], vec![], GraphPhase::Executing, "Progressing", "1/2 nodes ready"),
            ("ready but pruning", vec![("a", NodePhase::Ready, None), ("b", NodePhase::Ready, None)], vec![entry.clone()], GraphPhase::Executing, "Progressing", "2/2 nodes ready"),
            ("one failed", vec![("a", NodePhase::Error, Some("boom")), ("b", NodePhase::Pending, None)], vec![], GraphPhase::Failed, "NodeFailed", "0/2 nodes ready; failed: a: boom"),
        ];
        for (case, states, pruning, phase, reason, message) in cases {
            let old = ResourceGraphStatus::default();
            let mut status = pass(&states);
            let conclusion = conclude(&old, &mut status, 2, &pruning, &at(160), Some(3));
            assert_eq!(status.phase, Some(phase), "{case}");
            let ready = condition(&status, "Ready");
            assert_eq!(
                (ready.reason.as_str(), ready.message.as_str()),
                (reason, message),
                "{case}"
            );
            assert_eq!(ready.observed_generation, Some(3), "{case}");
            assert_eq!(conclusion.became_ready, phase == GraphPhase::Completed, "{case}");
        }
        let mut waiting = pass(&[("a", NodePhase::Ready, None), ("b", NodePhase::WaitingReady, None)]);
        waiting.node_states.get_mut("b").unwrap().message = Some("waiting for Available".into());
        conclude(
            &ResourceGraphStatus::default(),
            &mut waiting,
            2,
            &[entry],
            &at(160),
            None,
        );
        assert_eq!(
            condition(&waiting, "Progressing").message,
            "b: waiting for Available; pruning ConfigMap old"
        );
    }

    #[test]
    fn an_execution_is_timed_from_leaving_a_settled_state_to_the_next_one() {
        let mut status = pass(&[("a", NodePhase::WaitingReady, None)]);
        let old = ResourceGraphStatus {
            phase: Some(GraphPhase::Completed),
            ..Default::default()
        };
        let started = conclude(&old, &mut status, 1, &[], &at(100), None);
        assert_eq!((status.started_at.clone(), started.finished), (Some(at(100)), None));
        let old = status.clone();
        status.node_states.get_mut("a").unwrap().phase = NodePhase::Ready;
        let done = conclude(&old, &mut status, 1, &[], &at(130), None);
        assert_eq!(done.finished, Some(("success", 30.0)));
        assert_eq!(status.completed_at, Some(at(130)));
        let again = conclude(&status.clone(), &mut status, 1, &[], &at(190), None);
        assert_eq!((again.finished, again.became_ready), (None, false), "nothing new");
    }

    #[test]
    fn a_node_is_timed_once_from_its_apply_to_its_first_terminal_phase() {
        let applied = state(NodePhase::WaitingReady, 100, None);
        let mut ready = applied.clone();
        ready.phase = NodePhase::Ready;
        assert_eq!(node_finished(Some(&applied), &ready, &at(112)), Some(("success", 12.0)));
        assert_eq!(node_finished(Some(&ready), &ready, &at(200)), None);
    }

    #[test]
    fn the_next_check_prefers_a_retry_then_a_deadline_then_the_resync() {
        let retry = Duration::from_secs(15);
        let deadline = Some(Duration::from_secs(40));
        assert_eq!(next_check(retry, true, false, deadline), retry);
        assert_eq!(next_check(retry, false, true, None), retry);
        assert_eq!(next_check(retry, false, false, deadline), Duration::from_secs(40));
        assert_eq!(next_check(retry, false, false, None), RESYNC);
    }

    #[test]
    fn a_refused_graph_is_told_once_per_reason_and_message() {
        let refuse = |old: &ResourceGraphStatus, reason: &str, message: &str| {
            let mut status = old.clone();
            let news = refused(old, &mut status, (reason, message), &at(100), Some(1));
            (status, news)
        };
        let (first, news) = refuse(&ResourceGraphStatus::default(), "InvalidGraph", "a cycle");
        assert!(news);
        assert_eq!(first.phase, Some(GraphPhase::Failed));
        for (type_, status) in [
            (VALID, ConditionStatus::False),
            (READY, ConditionStatus::False),
            (PROGRESSING, ConditionStatus::False),
            (DEGRADED, ConditionStatus::True),
        ] {
            let c = condition(&first, type_);
            assert_eq!((c.status, c.reason.as_str()), (status, "InvalidGraph"), "{type_}");
        }
        // (refused again with reason, message) -> news
        let cases = [
            (("InvalidGraph", "a cycle"), false),
            (("InvalidGraph", "another cycle"), true),
            (("GrantWithdrawn", "a cycle"), true),
        ];
        for ((reason, message), news) in cases {
            assert_eq!(refuse(&first, reason, message).1, news, "{reason}: {message}");
        }
        let mut recovered = first.clone();
        recovered.phase = Some(GraphPhase::Completed);
        assert!(
            refuse(&recovered, "InvalidGraph", "a cycle").1,
            "refused again after a success"
        );
    }

    #[test]
    fn a_valid_graph_says_which_shape_it_is_written_in() {
        // (legacy shape) -> reason
        for (legacy, reason) in [(false, reasons::VALID), (true, reasons::DEPRECATED_SHAPE)] {
            let mut status = ResourceGraphStatus::default();
            validated(&mut status, legacy, &at(100), Some(2));
            let c = condition(&status, VALID);
            assert_eq!((c.status, c.reason.as_str()), (ConditionStatus::True, reason));
            assert_eq!(c.observed_generation, Some(2));
        }
    }

    #[test]
    fn a_deleted_graph_waits_for_its_highest_wave() {
        let entry = |kind: &str, wave: u32| InventoryEntry {
            node_id: kind.to_lowercase(),
            api_version: "v1".into(),
            kind: kind.into(),
            namespace: Some("team".into()),
            name: "web".into(),
            wave,
            uid: None,
        };
        let remaining = vec![entry("ConfigMap", 0), entry("Deployment", 1)];
        // (lookup failures) -> Ready's message
        let cases: [(&[String], &str); 2] = [
            (&[], "deleting in reverse dependency order; waiting for Deployment web"),
            (
                &["Service web: timed out".to_string()],
                "deleting in reverse dependency order; waiting for Deployment web; cannot look up Service web: timed out",
            ),
        ];
        for (failures, message) in cases {
            let mut status = ResourceGraphStatus::default();
            deleting(&mut status, remaining.clone(), failures, &at(100), Some(1));
            let ready = condition(&status, READY);
            assert_eq!(
                (ready.status, ready.reason.as_str()),
                (ConditionStatus::False, reasons::DELETING)
            );
            assert_eq!(ready.message, message);
            assert_eq!(status.inventory, remaining);
        }
    }
}
