//! Readiness gates: pure checks of a live object against a node's `readyWhen` entries.
//!
//! Each gate type is a [`Check`] in a [`Registry`]; a new kind of gate is a new entry, and the
//! executor does not change.
//!
//! Readiness expressions are user code: each is refused at compile time above a worst-case
//! cost ([`cost`]), and the executor evaluates them on a bounded pool with a deadline
//! ([`pool`]), never on the reconcile workers.

pub mod cloud;
pub mod cost;
pub mod pool;

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::api::{ReadyGate, ReadyGateType};

/// Outcome of one gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateState {
    Ready,
    /// Not yet; the text says what is missing.
    Waiting(String),
    /// Will not become ready without a change (a failed Job, say).
    Failed(String),
    /// The check ran out of time (an expression's evaluation past its deadline); the text says
    /// which node and how.
    TimedOut(String),
    /// Not checked yet: every evaluation slot is held by other graphs' expressions. The node
    /// waits, as for [`GateState::Waiting`], and is looked at again soon.
    Deferred(String),
}

/// One kind of readiness gate.
pub trait Check: Send + Sync {
    /// `object` is the live object, or None when it does not exist.
    fn check(&self, gate: &ReadyGate, object: Option<&Value>) -> GateState;

    /// Whether the check runs user code of unbounded cost, and so belongs on the evaluation
    /// pool rather than on a reconcile worker.
    fn is_user_code(&self) -> bool {
        false
    }

    /// Why the check may not run over `object` at all (user code too dear for its size), or
    /// Ok: asked before an evaluation slot is taken.
    fn admit(&self, _gate: &ReadyGate, _object: &Value) -> Result<(), String> {
        Ok(())
    }
}

/// The gate types Pequod knows, by type, and the pool their user code runs on.
pub struct Registry {
    checks: HashMap<ReadyGateType, Arc<dyn Check>>,
    pool: pool::EvaluationPool,
}

impl Default for Registry {
    fn default() -> Self {
        Self::with_pool(pool::EvaluationPool::default())
    }
}

impl Registry {
    /// The built-in gates, with expressions evaluated on `pool`.
    pub fn with_pool(pool: pool::EvaluationPool) -> Self {
        let mut registry = Self {
            checks: HashMap::new(),
            pool,
        };
        registry.register(ReadyGateType::Exists, Exists);
        registry.register(ReadyGateType::ConditionMatch, ConditionMatch);
        registry.register(ReadyGateType::DeploymentAvailable, DeploymentAvailable);
        registry.register(ReadyGateType::StatefulSetReady, StatefulSetReady);
        registry.register(ReadyGateType::JobComplete, JobComplete);
        registry.register(ReadyGateType::FieldMatch, FieldMatch);
        registry.register(ReadyGateType::Expression, Expression::default());
        registry.register(ReadyGateType::CloudResourceReady, CloudResourceReady);
        registry
    }

    pub fn register(&mut self, type_: ReadyGateType, check: impl Check + 'static) {
        self.checks.insert(type_, Arc::new(check));
    }

    /// The first gate of node `node` that does not pass, with its state; None when all pass (a
    /// node without gates passes once its object exists). What the executor calls: checks of
    /// user code run on the evaluation pool, and one that does not finish by the pool's
    /// deadline is [`GateState::TimedOut`].
    pub async fn first_unready_bounded<'g>(
        &self,
        node: &str,
        gates: &'g [ReadyGate],
        object: &Value,
    ) -> Option<(Option<&'g ReadyGate>, GateState)> {
        if gates.is_empty() {
            return None;
        }
        let mut shared: Option<Arc<Value>> = None;
        for (index, gate) in gates.iter().enumerate() {
            let state = match self.checks.get(&gate.type_) {
                Some(check) if check.is_user_code() => match check.admit(gate, object) {
                    Err(why) => GateState::Failed(format!("the readiness expression of node {node} {why}")),
                    Ok(()) => {
                        let object = shared.get_or_insert_with(|| Arc::new(object.clone())).clone();
                        let key = evaluation_key(node, index, &object);
                        let (check, owned_gate) = (check.clone(), gate.clone());
                        self.pool
                            .run(&key, move || check.check(&owned_gate, Some(&object)))
                            .await
                            .unwrap_or_else(|e| evaluation_failed(node, &e))
                    }
                },
                Some(check) => check.check(gate, Some(object)),
                None => unregistered(gate),
            };
            if state != GateState::Ready {
                return Some((Some(gate), state));
            }
        }
        None
    }

    /// Like [`Self::first_unready_bounded`] for an object that may not exist, with every check
    /// run right here, user code included: for tools and tests, not for the reconcile workers.
    pub fn first_unready<'g>(
        &self,
        gates: &'g [ReadyGate],
        object: Option<&Value>,
    ) -> Option<(Option<&'g ReadyGate>, GateState)> {
        if gates.is_empty() {
            return object
                .is_none()
                .then(|| (None, GateState::Waiting("the object does not exist".into())));
        }
        gates.iter().find_map(|gate| {
            let state = match self.checks.get(&gate.type_) {
                Some(check) => check.check(gate, object),
                None => unregistered(gate),
            };
            (state != GateState::Ready).then_some((Some(gate), state))
        })
    }

    /// All gates of a node: Ready when every one is; otherwise the state of the first that is
    /// not. Runs every check right here, as [`Self::first_unready`] does.
    pub fn evaluate(&self, gates: &[ReadyGate], object: Option<&Value>) -> GateState {
        self.first_unready(gates, object)
            .map_or(GateState::Ready, |(_, state)| state)
    }
}

fn unregistered(gate: &ReadyGate) -> GateState {
    GateState::Failed(format!("no readiness check registered for {:?}", gate.type_))
}

/// What the pool knows an evaluation by: the gate (its node and position) on one object.
fn evaluation_key(node: &str, gate: usize, object: &Value) -> String {
    let field = |pointer: &str| object.pointer(pointer).and_then(Value::as_str).unwrap_or_default();
    let identity = match field("/metadata/uid") {
        "" => format!(
            "{}/{}/{}/{}",
            field("/apiVersion"),
            field("/kind"),
            field("/metadata/namespace"),
            field("/metadata/name")
        ),
        uid => uid.to_string(),
    };
    format!("{identity}#{node}#{gate}")
}

/// A gate whose evaluation gave no result: timed out, or failed, naming the node.
fn evaluation_failed(node: &str, error: &pool::EvaluationError) -> GateState {
    let message = format!("the readiness expression of node {node} {error}");
    // Other graphs' evaluations hold every slot: this gate's expression did nothing wrong,
    // so the node waits rather than fails.
    if matches!(error, pool::EvaluationError::Busy { .. }) {
        GateState::Deferred(message)
    } else if error.is_timeout() {
        GateState::TimedOut(message)
    } else {
        GateState::Failed(message)
    }
}

fn exists(object: Option<&Value>) -> Result<&Value, GateState> {
    object.ok_or_else(|| GateState::Waiting("the object does not exist".into()))
}

/// The status of condition `type_` in `status.conditions`.
fn condition<'a>(object: &'a Value, type_: &str) -> Option<&'a Value> {
    object
        .pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(type_))
}

fn int(object: &Value, pointer: &str) -> i64 {
    object.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

/// Whether the object's controller has seen its latest spec.
fn observed_latest(object: &Value) -> bool {
    int(object, "/status/observedGeneration") >= int(object, "/metadata/generation")
}

struct Exists;
impl Check for Exists {
    fn check(&self, _: &ReadyGate, object: Option<&Value>) -> GateState {
        match exists(object) {
            Ok(_) => GateState::Ready,
            Err(w) => w,
        }
    }
}

struct ConditionMatch;
impl Check for ConditionMatch {
    fn check(&self, gate: &ReadyGate, object: Option<&Value>) -> GateState {
        let object = match exists(object) {
            Ok(o) => o,
            Err(w) => return w,
        };
        let Some(type_) = gate.condition_type.as_deref() else {
            return GateState::Failed("ConditionMatch needs conditionType".into());
        };
        let want = gate.condition_status.as_deref().unwrap_or("True");
        match condition(object, type_)
            .and_then(|c| c.get("status"))
            .and_then(Value::as_str)
        {
            Some(status) if status == want => GateState::Ready,
            Some(status) => GateState::Waiting(format!("condition {type_} is {status}, want {want}")),
            None => GateState::Waiting(format!("condition {type_} is not reported yet")),
        }
    }
}

/// What the resource's cloud controller (ACK, Config Connector, ASO) reports: see [`cloud`].
struct CloudResourceReady;
impl Check for CloudResourceReady {
    fn check(&self, _: &ReadyGate, object: Option<&Value>) -> GateState {
        match exists(object) {
            Ok(o) => cloud::cloud_resource_state(o),
            Err(w) => w,
        }
    }
}

struct DeploymentAvailable;
impl Check for DeploymentAvailable {
    fn check(&self, _: &ReadyGate, object: Option<&Value>) -> GateState {
        let object = match exists(object) {
            Ok(o) => o,
            Err(w) => return w,
        };
        if !observed_latest(object) {
            return GateState::Waiting("the deployment controller has not observed the latest spec".into());
        }
        let available = condition(object, "Available")
            .and_then(|c| c.get("status"))
            .and_then(Value::as_str);
        if available != Some("True") {
            return GateState::Waiting("condition Available is not True".into());
        }
        let want = object.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
        let updated = int(object, "/status/updatedReplicas");
        if updated < want {
            return GateState::Waiting(format!("{updated} of {want} replicas updated"));
        }
        GateState::Ready
    }
}

struct StatefulSetReady;
impl Check for StatefulSetReady {
    fn check(&self, _: &ReadyGate, object: Option<&Value>) -> GateState {
        let object = match exists(object) {
            Ok(o) => o,
            Err(w) => return w,
        };
        if !observed_latest(object) {
            return GateState::Waiting("the statefulset controller has not observed the latest spec".into());
        }
        let want = object.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
        let ready = int(object, "/status/readyReplicas");
        let updated = int(object, "/status/updatedReplicas");
        if ready < want || updated < want {
            return GateState::Waiting(format!("{ready} of {want} replicas ready, {updated} updated"));
        }
        GateState::Ready
    }
}

struct JobComplete;
impl Check for JobComplete {
    fn check(&self, _: &ReadyGate, object: Option<&Value>) -> GateState {
        let object = match exists(object) {
            Ok(o) => o,
            Err(w) => return w,
        };
        let status = |t| {
            condition(object, t)
                .and_then(|c| c.get("status"))
                .and_then(Value::as_str)
                == Some("True")
        };
        if status("Complete") {
            GateState::Ready
        } else if status("Failed") {
            let reason = condition(object, "Failed")
                .and_then(|c| c.get("message"))
                .and_then(Value::as_str)
                .unwrap_or("");
            GateState::Failed(
                format!("the job failed: {reason}")
                    .trim_end_matches([':', ' '])
                    .to_string(),
            )
        } else {
            GateState::Waiting("the job has not completed".into())
        }
    }
}

struct FieldMatch;
impl Check for FieldMatch {
    fn check(&self, gate: &ReadyGate, object: Option<&Value>) -> GateState {
        let object = match exists(object) {
            Ok(o) => o,
            Err(w) => return w,
        };
        let (Some(path), Some(want)) = (gate.path.as_deref(), gate.value.as_ref()) else {
            return GateState::Failed("FieldMatch needs path and value".into());
        };
        let pointer: String = path
            .trim_start_matches('.')
            .split('.')
            .map(|p| format!("/{p}"))
            .collect();
        match object.pointer(&pointer) {
            Some(got) if got == want => GateState::Ready,
            // A gate's message lands in status and events, which more people may read than may
            // read a Secret: its live values are never quoted.
            Some(_) if is_secret(object) => GateState::Waiting(format!("{path} does not match, want {want}")),
            Some(got) => GateState::Waiting(format!("{path} is {}, want {want}", shortened(got))),
            None => GateState::Waiting(format!("{path} is not set, want {want}")),
        }
    }
}

/// Most characters (bytes) of an expression.
pub const MAX_EXPRESSION: usize = 1024;

/// Why a readiness expression cannot be used. Every variant is the graph's `InvalidExpression`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpressionError {
    #[error("the expression is empty")]
    Empty,
    #[error("the expression has more than {MAX_EXPRESSION} characters")]
    TooLong,
    #[error("{expression:?} is not valid CEL: {why}")]
    NotCel { expression: String, why: String },
    #[error(
        "the expression is too expensive: its estimated worst-case cost is {cost}, over the limit of {limit} (each list or map of the object counted as {} items, each string as {} characters)",
        cost::ASSUMED_ITEMS,
        cost::ASSUMED_CHARS
    )]
    TooExpensive { cost: u64, limit: u64 },
}

/// Why a readiness expression cannot be used, if it cannot: it must be CEL that parses, and
/// whose estimated worst-case cost is within [`cost::MAX_COST`].
pub fn check_expression(expression: &str) -> Result<(), ExpressionError> {
    compile(expression).map(|_| ())
}

fn compile(expression: &str) -> Result<cel::Program, ExpressionError> {
    if expression.trim().is_empty() {
        return Err(ExpressionError::Empty);
    }
    if expression.len() > MAX_EXPRESSION {
        return Err(ExpressionError::TooLong);
    }
    let program = cel::Program::compile(expression).map_err(|e| ExpressionError::NotCel {
        expression: expression.to_string(),
        why: first_line(&e.to_string()).to_string(),
    })?;
    let cost = cost::estimate(program.expression());
    if cost > cost::MAX_COST {
        return Err(ExpressionError::TooExpensive {
            cost,
            limit: cost::MAX_COST,
        });
    }
    Ok(program)
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// A CEL expression over the live object, `self`. Compiled programs are kept by their text
/// (modules repeat the same few expressions over many instances).
#[derive(Default)]
struct Expression {
    compiled: std::sync::Mutex<HashMap<String, std::sync::Arc<cel::Program>>>,
}

/// Most compiled expressions kept; past it the cache starts over.
const MAX_COMPILED: usize = 1024;

impl Expression {
    fn program(&self, expression: &str) -> Result<std::sync::Arc<cel::Program>, ExpressionError> {
        let mut compiled = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(program) = compiled.get(expression) {
            return Ok(program.clone());
        }
        let program = compile(expression)?;
        if compiled.len() >= MAX_COMPILED {
            compiled.clear();
        }
        let program = std::sync::Arc::new(program);
        compiled.insert(expression.to_string(), program.clone());
        Ok(program)
    }
}

impl Check for Expression {
    fn is_user_code(&self) -> bool {
        true
    }

    fn admit(&self, gate: &ReadyGate, object: &Value) -> Result<(), String> {
        let Some(program) = gate.expression.as_deref().and_then(|e| self.program(e).ok()) else {
            // Refused by the check itself, with the reason.
            return Ok(());
        };
        let cost = cost::estimate_over(program.expression(), object);
        if cost > cost::MAX_COST {
            return Err(format!(
                "is not evaluated: over this object it could cost {cost}, above the limit of {}",
                cost::MAX_COST
            ));
        }
        Ok(())
    }

    fn check(&self, gate: &ReadyGate, object: Option<&Value>) -> GateState {
        let object = match exists(object) {
            Ok(o) => o,
            Err(w) => return w,
        };
        let Some(expression) = gate.expression.as_deref() else {
            return GateState::Failed("Expression needs an expression".into());
        };
        let program = match self.program(expression) {
            Ok(p) => p,
            Err(why) => return GateState::Failed(why.to_string()),
        };
        let mut context = cel::Context::default();
        let bound = cel::to_value(object)
            .map_err(|e| e.to_string())
            .and_then(|value| context.add_variable("self", value).map_err(|e| e.to_string()));
        if let Err(why) = bound {
            return GateState::Failed(format!("the object cannot be read by CEL: {why}"));
        }
        match program.execute(&context) {
            Ok(cel::Value::Bool(true)) => GateState::Ready,
            Ok(cel::Value::Bool(false)) => GateState::Waiting(format!("{expression} is false")),
            Ok(other) => GateState::Failed(format!("{expression} gives {:?}, not a boolean", other.type_of())),
            // A field not set yet: wait. The error is quoted only when it cannot carry a
            // Secret's value.
            Err(_) if is_secret(object) => GateState::Waiting(format!("{expression} cannot be evaluated yet")),
            Err(e) => {
                let why = e.to_string();
                GateState::Waiting(format!(
                    "{expression} cannot be evaluated yet: {}",
                    shortened(&Value::String(why))
                ))
            }
        }
    }
}

/// Whether a gate's message may not quote the object's values (a Secret, or a kind marked
/// sensitive).
fn is_secret(object: &Value) -> bool {
    object
        .get("kind")
        .and_then(Value::as_str)
        .is_some_and(crate::graph::reference::is_sensitive)
}

/// Most characters of a live value a gate's message quotes.
const MAX_QUOTED_CHARS: usize = 64;

fn shortened(value: &Value) -> String {
    cut(&value.to_string(), MAX_QUOTED_CHARS)
}

/// `text`, of at most `chars` characters and `...` when longer.
fn cut(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gate(v: Value) -> ReadyGate {
        serde_json::from_value(v).unwrap()
    }

    fn deployment(generation: i64, observed: i64, available: &str, replicas: i64, updated: i64) -> Value {
        json!({
            "metadata": {"generation": generation},
            "spec": {"replicas": replicas},
            "status": {"observedGeneration": observed, "updatedReplicas": updated,
                "conditions": [{"type": "Available", "status": available}]},
        })
    }

    #[test]
    fn no_gates_means_ready_once_the_object_exists() {
        let r = Registry::default();
        assert_eq!(r.evaluate(&[], Some(&json!({}))), GateState::Ready);
        assert!(matches!(r.evaluate(&[], None), GateState::Waiting(_)));
    }

    #[test]
    fn deployment_available_needs_the_latest_generation_and_all_replicas() {
        let r = Registry::default();
        let g = [gate(json!({"type": "DeploymentAvailable"}))];
        assert_eq!(r.evaluate(&g, Some(&deployment(2, 2, "True", 3, 3))), GateState::Ready);
        assert!(
            matches!(r.evaluate(&g, Some(&deployment(3, 2, "True", 3, 3))), GateState::Waiting(m) if m.contains("latest spec"))
        );
        assert!(
            matches!(r.evaluate(&g, Some(&deployment(2, 2, "False", 3, 3))), GateState::Waiting(m) if m.contains("Available"))
        );
        assert!(
            matches!(r.evaluate(&g, Some(&deployment(2, 2, "True", 3, 1))), GateState::Waiting(m) if m == "1 of 3 replicas updated")
        );
        assert!(matches!(r.evaluate(&g, None), GateState::Waiting(_)));
    }

    #[test]
    fn condition_match_defaults_to_true() {
        let r = Registry::default();
        let obj = json!({"status": {"conditions": [{"type": "Synced", "status": "True"}, {"type": "Ready", "status": "False"}]}});
        assert_eq!(
            r.evaluate(
                &[gate(json!({"type": "ConditionMatch", "conditionType": "Synced"}))],
                Some(&obj)
            ),
            GateState::Ready
        );
        assert_eq!(
            r.evaluate(
                &[gate(json!({"type": "ConditionMatch", "conditionType": "Ready"}))],
                Some(&obj)
            ),
            GateState::Waiting("condition Ready is False, want True".into())
        );
        assert_eq!(
            r.evaluate(
                &[gate(
                    json!({"type": "ConditionMatch", "conditionType": "Ready", "conditionStatus": "False"})
                )],
                Some(&obj)
            ),
            GateState::Ready
        );
        assert!(matches!(
            r.evaluate(&[gate(json!({"type": "ConditionMatch"}))], Some(&obj)),
            GateState::Failed(_)
        ));
    }

    #[test]
    fn statefulset_job_and_field_gates() {
        let r = Registry::default();
        let sts = json!({"metadata": {"generation": 1}, "spec": {"replicas": 2}, "status": {"observedGeneration": 1, "readyReplicas": 2, "updatedReplicas": 2}});
        assert_eq!(
            r.evaluate(&[gate(json!({"type": "StatefulSetReady"}))], Some(&sts)),
            GateState::Ready
        );
        let job_done = json!({"status": {"conditions": [{"type": "Complete", "status": "True"}]}});
        let job_failed = json!({"status": {"conditions": [{"type": "Failed", "status": "True", "message": "BackoffLimitExceeded"}]}});
        assert_eq!(
            r.evaluate(&[gate(json!({"type": "JobComplete"}))], Some(&job_done)),
            GateState::Ready
        );
        assert_eq!(
            r.evaluate(&[gate(json!({"type": "JobComplete"}))], Some(&job_failed)),
            GateState::Failed("the job failed: BackoffLimitExceeded".into())
        );
        let pvc = json!({"status": {"phase": "Bound", "capacity": {"storage": 10}}});
        let field = |path: &str, value: Value| gate(json!({"type": "FieldMatch", "path": path, "value": value}));
        assert_eq!(
            r.evaluate(&[field("status.phase", json!("Bound"))], Some(&pvc)),
            GateState::Ready
        );
        assert_eq!(
            r.evaluate(&[field(".status.capacity.storage", json!(10))], Some(&pvc)),
            GateState::Ready
        );
        assert_eq!(
            r.evaluate(&[field("status.phase", json!("Lost"))], Some(&pvc)),
            GateState::Waiting("status.phase is \"Bound\", want \"Lost\"".into())
        );
        let long = json!({"data": {"blob": "x".repeat(500)}});
        let GateState::Waiting(message) = r.evaluate(&[field("data.blob", json!("y"))], Some(&long)) else {
            panic!("waiting expected");
        };
        assert!(message.len() < 100 && message.contains("..."), "{message}");
    }

    #[test]
    fn field_match_never_quotes_a_secret() {
        let r = Registry::default();
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "data": {"password": "aHVudGVyMg=="}});
        let gate = gate(json!({"type": "FieldMatch", "path": "data.password", "value": "x"}));
        assert_eq!(
            r.evaluate(std::slice::from_ref(&gate), Some(&secret)),
            GateState::Waiting("data.password does not match, want \"x\"".into())
        );
        let whole = gate_with_path("data");
        let GateState::Waiting(message) = r.evaluate(&[whole], Some(&secret)) else {
            panic!("waiting expected");
        };
        assert!(!message.contains("aHVudGVyMg"), "{message}");
    }

    fn gate_with_path(path: &str) -> ReadyGate {
        gate(json!({"type": "FieldMatch", "path": path, "value": {}}))
    }

    #[test]
    fn every_gate_must_pass_and_new_checks_can_be_registered() {
        struct Never;
        impl Check for Never {
            fn check(&self, _: &ReadyGate, _: Option<&Value>) -> GateState {
                GateState::Waiting("never".into())
            }
        }
        let mut r = Registry::default();
        r.register(ReadyGateType::FieldMatch, Never);
        let gates = [
            gate(json!({"type": "Exists"})),
            gate(json!({"type": "FieldMatch", "path": "a", "value": 1})),
        ];
        assert_eq!(
            r.evaluate(&gates, Some(&json!({"a": 1}))),
            GateState::Waiting("never".into())
        );
    }

    #[test]
    fn expressions_are_cel_over_the_live_object() {
        let r = Registry::default();
        let gate = |e: &str| gate(json!({"type": "Expression", "expression": e}));
        let deployment = json!({"spec": {"replicas": 2}, "status": {"readyReplicas": 2,
                                "conditions": [{"type": "Available", "status": "True"}]}});
        let ready = gate(
            "self.status.readyReplicas >= self.spec.replicas && self.status.conditions.exists(c, c.type == 'Available' && c.status == 'True')",
        );
        assert_eq!(
            r.evaluate(std::slice::from_ref(&ready), Some(&deployment)),
            GateState::Ready
        );
        let scaling = json!({"spec": {"replicas": 3}, "status": {"readyReplicas": 2, "conditions": []}});
        assert!(
            matches!(r.evaluate(std::slice::from_ref(&ready), Some(&scaling)), GateState::Waiting(m) if m.ends_with("is false"))
        );
        let early = json!({"spec": {"replicas": 3}});
        assert!(
            matches!(r.evaluate(std::slice::from_ref(&ready), Some(&early)), GateState::Waiting(m) if m.contains("cannot be evaluated yet"))
        );
        assert!(
            matches!(r.evaluate(&[gate("self.spec.replicas")], Some(&deployment)), GateState::Failed(m) if m.contains("not a boolean"))
        );
        assert!(
            matches!(r.evaluate(&[gate("self.spec. ==")], Some(&deployment)), GateState::Failed(m) if m.contains("not valid CEL"))
        );
        assert!(matches!(
            r.evaluate(std::slice::from_ref(&ready), None),
            GateState::Waiting(_)
        ));
        // A Secret's values never reach the message.
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "data": {"p": "aHVudGVyMg=="}});
        let probe = gate("self.data.p + 1 == 2");
        let GateState::Waiting(message) = r.evaluate(&[probe], Some(&secret)) else {
            panic!("an error is a wait");
        };
        assert!(!message.contains("aHVudGVyMg"), "{message}");
    }

    #[test]
    fn expressions_are_checked_before_use() {
        assert!(check_expression("self.status.phase == 'Running'").is_ok());
        assert!(check_expression("").is_err());
        assert!(
            check_expression("self.status.")
                .unwrap_err()
                .to_string()
                .contains("not valid CEL")
        );
        assert_eq!(
            check_expression(&"a".repeat(MAX_EXPRESSION + 1)),
            Err(ExpressionError::TooLong)
        );
    }

    #[test]
    fn expensive_expressions_are_refused_with_their_cost_and_the_limit() {
        let nested = "self.a.all(x, self.b.all(y, self.c.exists(z, x == y && y == z)))";
        let Err(ExpressionError::TooExpensive { cost, limit }) = check_expression(nested) else {
            panic!("refused expected");
        };
        assert!(cost > limit && limit == cost::MAX_COST, "{cost} {limit}");
        let message = check_expression(nested).unwrap_err().to_string();
        assert!(
            message.contains(&cost.to_string()) && message.contains(&cost::MAX_COST.to_string()),
            "{message}"
        );
        // A refused expression never runs: the gate fails with the same message.
        let registry = Registry::default();
        let g = gate(json!({"type": "Expression", "expression": nested}));
        assert_eq!(
            registry.evaluate(&[g], Some(&json!({"a": [1], "b": [1], "c": [1]}))),
            GateState::Failed(message)
        );
    }

    fn expression_gate(expression: &str) -> ReadyGate {
        gate(json!({"type": "Expression", "expression": expression}))
    }

    fn numbers_object(uid: &str, count: i64) -> Value {
        let numbers: Vec<i64> = (0..count).collect();
        json!({"metadata": {"uid": uid}, "spec": {"a": numbers, "b": numbers}})
    }

    // One runtime thread: were expressions evaluated on it, the cheap gate would wait for the
    // expensive ones.
    #[tokio::test(flavor = "current_thread")]
    async fn expressions_too_slow_for_their_object_time_out_while_cheap_ones_pass() {
        let deadline = std::time::Duration::from_millis(50);
        let registry = Registry::with_pool(pool::EvaluationPool::new(3, deadline));
        // Within the cost limit for lists of 400 numbers, but slower than the deadline here.
        let slow = [expression_gate("self.spec.a.all(x, self.spec.b.all(y, y >= 0u))")];
        check_expression(slow[0].expression.as_deref().unwrap()).unwrap();
        let cheap = [expression_gate("self.spec.a.exists(x, x == 3)")];
        let (big1, big2, small) = (
            numbers_object("u1", 400),
            numbers_object("u2", 400),
            numbers_object("u3", 10),
        );
        let started = std::time::Instant::now();
        let (first, second, fast) = tokio::join!(
            registry.first_unready_bounded("slow-1", &slow, &big1),
            registry.first_unready_bounded("slow-2", &slow, &big2),
            registry.first_unready_bounded("fast", &cheap, &small),
        );
        assert_eq!(fast, None, "the cheap gate passes");
        for (node, outcome) in [("slow-1", first), ("slow-2", second)] {
            let Some((_, GateState::TimedOut(message))) = outcome else {
                panic!("{node}: a timeout expected, got {outcome:?}");
            };
            assert!(
                message.contains(&format!("node {node}")) && message.contains("deadline"),
                "{message}"
            );
        }
        assert!(started.elapsed() < deadline * 4, "{:?}", started.elapsed());
        // Still running: the gate is not evaluated again, and says so.
        let again = registry.first_unready_bounded("slow-1", &slow, &big1).await;
        assert!(
            matches!(&again, Some((_, GateState::TimedOut(m))) if m.contains("still running")),
            "{again:?}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_expression_too_dear_for_its_object_takes_no_evaluation_slot() {
        // One slot, held by nothing: a refused expression must not even ask for it.
        let registry = Registry::with_pool(pool::EvaluationPool::new(1, std::time::Duration::from_secs(5)));
        let slow = [expression_gate("self.spec.a.all(x, self.spec.b.all(y, y >= 0u))")];
        let started = std::time::Instant::now();
        let outcome = registry
            .first_unready_bounded("hog", &slow, &numbers_object("u", 4000))
            .await;
        assert!(
            matches!(&outcome, Some((_, GateState::Failed(m))) if m.contains("node hog") && m.contains("above the limit")),
            "{outcome:?}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let cheap = [expression_gate("self.spec.a.exists(x, x == 3)")];
        assert_eq!(
            registry
                .first_unready_bounded("other", &cheap, &numbers_object("v", 10))
                .await,
            None
        );
    }

    #[tokio::test]
    async fn built_in_gates_and_panics_of_the_interpreter_through_the_pool() {
        let registry = Registry::default();
        let exists = [gate(json!({"type": "Exists"}))];
        assert_eq!(registry.first_unready_bounded("n", &exists, &json!({})).await, None);
        // The interpreter panics on a comprehension over a number: a failure, not a crash of
        // the operator.
        let odd = [expression_gate("self.spec.replicas.all(x, x > 0)")];
        let outcome = registry
            .first_unready_bounded("n", &odd, &json!({"spec": {"replicas": 2}}))
            .await;
        assert!(
            matches!(&outcome, Some((_, GateState::Failed(m))) if m.contains("node n")),
            "{outcome:?}"
        );
    }
}
