//! Rollouts of a module version: which instances move to the target version, in what order,
//! and when a rollout waits, stops or is complete; and which version each instance renders
//! with meanwhile. Pure: the Transform controller feeds [`step`] with the instances as the
//! kind's controller sees them and the time, and the kind's controller asks [`choose`].
//!
//! An instance moves only when it is admitted. Until then it keeps the version its graph was
//! rendered with (`status.moduleDigest`), so that a rollout that stops leaves every instance it
//! did not reach untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::condition_types::ROLLED_OUT;
use crate::api::{
    Condition, DEFAULT_PROTECTED_KINDS, InstancePhase, PlanSummary, RolloutPhase, RolloutPolicy, RolloutStatus,
    RolloutStrategy, reasons, set_condition,
};
use crate::cue::Module;

/// How long a batch may take to be Ready unless the Transform says otherwise.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(300);
/// Most instances named in a message.
const MAX_NAMED: usize = 5;

/// An instance, by namespace and name.
pub type InstanceKey = crate::api::NamespacedName;

/// An instance as a rollout sees it.
#[derive(Debug, Clone)]
pub struct Member {
    pub key: InstanceKey,
    pub labels: BTreeMap<String, String>,
    /// The module version its graph was rendered with.
    pub digest: Option<String>,
    pub phase: Option<InstancePhase>,
    /// Pinned to a version of its own: the rollout leaves it alone.
    pub pinned: bool,
}

impl Member {
    fn on(&self, target: &str) -> bool {
        self.digest.as_deref() == Some(target)
    }

    fn healthy(&self, target: &str) -> bool {
        self.on(target) && self.phase == Some(InstancePhase::Ready)
    }

    fn failed(&self, target: &str) -> bool {
        self.on(target) && self.phase == Some(InstancePhase::Failed)
    }
}

/// Instances per batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    Count(u32),
    Percent(u32),
}

impl BatchSize {
    fn of(self, eligible: usize) -> usize {
        match self {
            Self::Count(n) => n as usize,
            Self::Percent(p) => (eligible * p as usize).div_ceil(100),
        }
        .max(1)
    }
}

/// A Transform's rollout policy, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub staged: bool,
    pub batch: BatchSize,
    pub canaries: Option<Selector>,
    pub health_timeout: Duration,
    pub failure_budget: u32,
    pub paused: bool,
    pub protected_kinds: Vec<String>,
}

impl Policy {
    /// The policy `spec.rollout` asks for, or why it is invalid.
    pub fn from_spec(spec: Option<&RolloutPolicy>) -> Result<Self, String> {
        let default = RolloutPolicy::default();
        let spec = spec.unwrap_or(&default);
        let batch = match &spec.batch_size {
            None => BatchSize::Count(1),
            Some(IntOrString::Int(n)) if *n >= 1 => BatchSize::Count(*n as u32),
            Some(IntOrString::Int(n)) => return Err(format!("batchSize {n} is not a positive count")),
            Some(IntOrString::String(s)) => match s.strip_suffix('%').map(str::parse::<u32>) {
                Some(Ok(p)) if (1..=100).contains(&p) => BatchSize::Percent(p),
                _ => match s.parse::<u32>() {
                    Ok(n) if n >= 1 => BatchSize::Count(n),
                    _ => {
                        return Err(format!(
                            "batchSize {s:?} is neither a positive count nor a percentage from 1% to 100%"
                        ));
                    }
                },
            },
        };
        let canaries = spec.canary_selector.as_ref().map(Selector::new).transpose()?;
        Ok(Self {
            staged: spec.strategy == RolloutStrategy::Staged,
            batch,
            canaries,
            health_timeout: spec
                .health_timeout_seconds
                .map_or(DEFAULT_HEALTH_TIMEOUT, |s| Duration::from_secs(s.max(1) as u64)),
            failure_budget: spec.failure_budget.unwrap_or(0).max(0) as u32,
            paused: spec.paused,
            protected_kinds: spec
                .protected_kinds
                .clone()
                .unwrap_or_else(|| DEFAULT_PROTECTED_KINDS.iter().map(|k| k.to_string()).collect()),
        })
    }
}

/// A label selector, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Selector {
    labels: BTreeMap<String, String>,
    expressions: Vec<(String, Operator, BTreeSet<String>)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Selector {
    fn new(selector: &LabelSelector) -> Result<Self, String> {
        let mut expressions = Vec::new();
        for e in selector.match_expressions.iter().flatten() {
            let operator = match e.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => return Err(format!("canarySelector: unknown operator {other:?}")),
            };
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            let needs_values = matches!(operator, Operator::In | Operator::NotIn);
            if needs_values == values.is_empty() {
                return Err(format!(
                    "canarySelector: operator {} {} values",
                    e.operator,
                    if needs_values { "needs" } else { "takes no" }
                ));
            }
            expressions.push((e.key.clone(), operator, values));
        }
        Ok(Self {
            labels: selector.match_labels.clone().unwrap_or_default(),
            expressions,
        })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|(key, operator, values)| {
                let value = labels.get(key);
                match operator {
                    Operator::In => value.is_some_and(|v| values.contains(v)),
                    Operator::NotIn => value.is_none_or(|v| !values.contains(v)),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }
}

/// Which instances may render with the target version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    All,
    Only(BTreeSet<InstanceKey>),
}

impl Admission {
    pub fn admits(&self, key: &InstanceKey) -> bool {
        match self {
            Self::All => true,
            Self::Only(keys) => keys.contains(key),
        }
    }
}

/// The batch in progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub number: u32,
    pub started: jiff::Timestamp,
    pub members: BTreeSet<InstanceKey>,
}

/// What a rollout remembers between steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Memory {
    pub target: String,
    pub batch: Option<Batch>,
    /// Every instance admitted so far.
    pub reached: BTreeSet<InstanceKey>,
}

impl Memory {
    pub fn new(target: &str) -> Self {
        Self {
            target: target.to_string(),
            batch: None,
            reached: BTreeSet::new(),
        }
    }

    /// The memory of a rollout a previous process ran, from what the instances and the
    /// Transform's status show: the instances on the target were reached, and those of them
    /// not Ready yet are the batch in progress.
    pub fn resume(target: &str, members: &[Member], batch: Option<(u32, jiff::Timestamp)>) -> Self {
        let on_target = || members.iter().filter(|m| !m.pinned && m.on(target));
        let reached = on_target().map(|m| m.key.clone()).collect();
        let batch = batch.map(|(number, started)| Batch {
            number,
            started,
            members: on_target()
                .filter(|m| !m.healthy(target))
                .map(|m| m.key.clone())
                .collect(),
        });
        Self {
            target: target.to_string(),
            batch,
            reached,
        }
    }
}

/// Whether the target version may start moving instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Open,
    /// It deletes or replaces this many objects of protected kinds, and is not approved.
    AwaitingApproval(usize),
}

/// Instances by where they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: u32,
    pub updated: u32,
    pub pending: u32,
    pub failed: u32,
    pub pinned: u32,
}

/// One step of a rollout: what the Transform's status says and which instances may move.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub phase: RolloutPhase,
    pub reason: &'static str,
    pub message: String,
    pub admission: Admission,
    pub counts: Counts,
    /// A new batch began in this step.
    pub started_batch: bool,
    /// When to look again without any event; `None` waits for a change.
    pub recheck: Option<Duration>,
}

/// How often a rollout in progress looks at its instances.
pub const PROGRESS_POLL: Duration = Duration::from_secs(2);
/// How often a rollout stopped by its health gate looks whether the instances recovered.
pub const BLOCKED_POLL: Duration = Duration::from_secs(15);

/// The next step of the rollout to `target`.
pub fn step(
    policy: &Policy,
    target: &str,
    members: &[Member],
    gate: Gate,
    memory: &mut Memory,
    now: jiff::Timestamp,
) -> Step {
    let eligible: Vec<&Member> = members.iter().filter(|m| !m.pinned).collect();
    let updated = eligible.iter().filter(|m| m.on(target)).count() as u32;
    let mut counts = Counts {
        total: members.len() as u32,
        updated,
        pending: eligible.len() as u32 - updated,
        failed: eligible.iter().filter(|m| m.failed(target)).count() as u32,
        pinned: (members.len() - eligible.len()) as u32,
    };
    let short = short_digest(target);
    let held = |memory: &Memory| Admission::Only(memory.reached.clone());
    if let Gate::AwaitingApproval(n) = gate {
        return Step {
            phase: RolloutPhase::Blocked,
            reason: reasons::APPROVAL_REQUIRED,
            message: format!(
                "module {short} deletes or replaces {n} object(s) of protected kinds (see status.rollout.plan); \
                 approve with the annotation {}={target}",
                crate::api::names::APPROVAL_ANNOTATION
            ),
            admission: held(memory),
            counts,
            started_batch: false,
            recheck: None,
        };
    }
    if !policy.staged {
        return immediate(policy, target, &eligible, counts, memory);
    }

    // The batch in progress: its instances are Ready, failed, or still have time.
    let timed_out = memory
        .batch
        .as_ref()
        .is_some_and(|b| elapsed(b.started, now) > policy.health_timeout);
    let in_batch = |m: &Member| memory.batch.as_ref().is_some_and(|b| b.members.contains(&m.key));
    let failed: Vec<&InstanceKey> = eligible
        .iter()
        .filter(|m| memory.reached.contains(&m.key) && !m.healthy(target))
        .filter(|m| m.failed(target) || !in_batch(m) || timed_out)
        .map(|m| &m.key)
        .collect();
    let waiting = eligible
        .iter()
        .filter(|m| in_batch(m) && !m.healthy(target) && !m.failed(target) && !timed_out)
        .count();
    counts.failed = failed.len() as u32;
    let batch_number = memory.batch.as_ref().map_or(0, |b| b.number);
    if failed.len() as u32 > policy.failure_budget {
        return Step {
            phase: RolloutPhase::Blocked,
            reason: reasons::HEALTH_GATE_FAILED,
            message: format!(
                "{} updated instance(s) are not Ready (failure budget {}): {}; instances not reached stay on their module. \
                 Fix forward with a new module version, or roll back by pointing the Transform at the earlier one",
                failed.len(),
                policy.failure_budget,
                name_some(failed.iter().copied())
            ),
            admission: held(memory),
            counts,
            started_batch: false,
            recheck: Some(BLOCKED_POLL),
        };
    }
    if waiting > 0 {
        let batch = memory.batch.as_ref().map_or(0, |b| b.members.len());
        let remaining = memory.batch.as_ref().map_or(Duration::ZERO, |b| {
            policy.health_timeout.saturating_sub(elapsed(b.started, now))
        });
        return Step {
            phase: RolloutPhase::Progressing,
            reason: reasons::ROLLOUT_PROGRESSING,
            // No countdown in the message: the status would be written on every look.
            message: format!(
                "batch {batch_number}: {} of {batch} instance(s) Ready on module {short}; each has {}s from the \
                 batch's start (status.rollout.batchStartedAt)",
                batch - waiting,
                policy.health_timeout.as_secs()
            ),
            admission: held(memory),
            counts,
            started_batch: false,
            recheck: Some(PROGRESS_POLL.min(remaining.max(Duration::from_secs(1)))),
        };
    }
    let ordered = order(&eligible, policy.canaries.as_ref());
    // An instance without a graph yet is new: it takes the current version by itself (the
    // target once the rollout is complete), and joins a batch once it has one.
    let next: BTreeSet<InstanceKey> = ordered
        .into_iter()
        .filter(|m| m.digest.is_some() && !m.on(target) && !memory.reached.contains(&m.key))
        .take(policy.batch.of(eligible.len()))
        .map(|m| m.key.clone())
        .collect();
    if next.is_empty() {
        memory.batch = None;
        return complete(target, counts);
    }
    if policy.paused {
        return Step {
            phase: RolloutPhase::Paused,
            reason: reasons::ROLLOUT_PAUSED,
            message: format!(
                "spec.rollout.paused: {} of {} instance(s) on module {short}; no further instance moves",
                counts.updated,
                eligible.len()
            ),
            admission: held(memory),
            counts,
            started_batch: false,
            recheck: None,
        };
    }
    let message = format!(
        "batch {}: moving {} instance(s) to module {short}: {}",
        batch_number + 1,
        next.len(),
        name_some(next.iter())
    );
    memory.reached.extend(next.iter().cloned());
    memory.batch = Some(Batch {
        number: batch_number + 1,
        started: now,
        members: next,
    });
    Step {
        phase: RolloutPhase::Progressing,
        reason: reasons::ROLLOUT_PROGRESSING,
        message,
        admission: held(memory),
        counts,
        started_batch: true,
        recheck: Some(PROGRESS_POLL),
    }
}

/// Every instance moves at once; the rollout is complete when all are on the target.
fn immediate(policy: &Policy, target: &str, eligible: &[&Member], counts: Counts, memory: &mut Memory) -> Step {
    let short = short_digest(target);
    if policy.paused {
        return Step {
            phase: RolloutPhase::Paused,
            reason: reasons::ROLLOUT_PAUSED,
            message: format!("spec.rollout.paused: no instance moves to module {short}"),
            admission: Admission::Only(memory.reached.clone()),
            counts,
            started_batch: false,
            recheck: None,
        };
    }
    memory.reached.extend(eligible.iter().map(|m| m.key.clone()));
    if counts.pending == 0 {
        return complete(target, counts);
    }
    Step {
        phase: RolloutPhase::Progressing,
        reason: reasons::ROLLOUT_PROGRESSING,
        message: format!("{} of {} instance(s) on module {short}", counts.updated, eligible.len()),
        admission: Admission::All,
        counts,
        started_batch: false,
        recheck: Some(PROGRESS_POLL),
    }
}

fn complete(target: &str, counts: Counts) -> Step {
    let failed = if counts.failed > 0 {
        format!(", {} of them failed", counts.failed)
    } else {
        String::new()
    };
    Step {
        phase: RolloutPhase::Complete,
        reason: reasons::ROLLOUT_COMPLETE,
        message: format!(
            "{} instance(s) on module {}{failed}",
            counts.updated,
            short_digest(target)
        ),
        admission: Admission::All,
        counts,
        started_batch: false,
        recheck: None,
    }
}

/// Canaries first, then the others; by namespace and name within each.
fn order<'a>(eligible: &[&'a Member], canaries: Option<&Selector>) -> Vec<&'a Member> {
    let mut ordered = eligible.to_vec();
    ordered.sort_by_key(|m| (!canaries.is_some_and(|s| s.matches(&m.labels)), m.key.clone()));
    ordered
}

fn elapsed(since: jiff::Timestamp, now: jiff::Timestamp) -> Duration {
    Duration::from_secs(now.duration_since(since).as_secs().max(0) as u64)
}

fn name_some<'a>(keys: impl Iterator<Item = &'a InstanceKey>) -> String {
    let keys: Vec<&InstanceKey> = keys.collect();
    let mut named: Vec<String> = keys.iter().take(MAX_NAMED).map(|k| k.to_string()).collect();
    if keys.len() > MAX_NAMED {
        named.push(format!("and {} more", keys.len() - MAX_NAMED));
    }
    named.join(", ")
}

/// `sha256:0123456789ab`: enough to tell versions apart in a message.
pub fn short_digest(digest: &str) -> &str {
    let end = digest.find(':').map_or(12, |i| i + 13).min(digest.len());
    &digest[..end]
}

/// What a step shows on the Transform: `status.rollout`, the `RolledOut` condition, and the
/// events of the transition from what was shown before.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub status: RolloutStatus,
    pub condition: Condition,
    /// (warning, reason, message), published once the status is written.
    pub events: Vec<(bool, &'static str, String)>,
}

/// The rollout to `target` as `step` left it. `current` is the version before the rollout
/// (`None` once complete); `shown` is the status and condition shown before, if any.
pub fn report(
    step: &Step,
    (target, current): (&str, Option<&str>),
    memory: &Memory,
    summary: &PlanSummary,
    shown: Option<&(RolloutStatus, Condition)>,
    (now, generation): (&Time, Option<i64>),
) -> Report {
    let counts = step.counts;
    let status = RolloutStatus {
        phase: Some(step.phase),
        target_digest: target.to_string(),
        current_digest: Some(current.unwrap_or(target).to_string()),
        progress: Some(format!("{}/{}", counts.updated, counts.total - counts.pinned)),
        total: counts.total as i32,
        updated: counts.updated as i32,
        pending: counts.pending as i32,
        failed: counts.failed as i32,
        pinned: counts.pinned as i32,
        batch: memory.batch.as_ref().map(|b| b.number as i32),
        batch_started_at: memory.batch.as_ref().map(|b| Time(b.started)),
        message: Some(step.message.clone()),
        plan: Some(summary.clone()),
    };
    let wanted = Condition::new(
        ROLLED_OUT,
        step.phase == RolloutPhase::Complete,
        step.reason,
        step.message.clone(),
    );
    let mut conditions: Vec<Condition> = shown.iter().map(|(_, c)| c.clone()).collect();
    set_condition(&mut conditions, wanted.clone(), now, generation);
    let condition = conditions.into_iter().next().unwrap_or(wanted);
    let mut events = Vec::new();
    if step.started_batch {
        events.push((false, reasons::BATCH_STARTED, step.message.clone()));
    }
    let transition = shown.is_none_or(|(s, c)| s.phase != Some(step.phase) || c.reason != step.reason);
    if transition && step.phase != RolloutPhase::Progressing {
        events.push((step.phase == RolloutPhase::Blocked, step.reason, step.message.clone()));
    }
    Report {
        status,
        condition,
        events,
    }
}

/// Which module version each instance of a kind renders with.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// The version the Transform loaded last.
    pub target: Module,
    /// The version every instance had when the rollout began; `None` once it is complete.
    pub current: Option<Module>,
    pub admission: Admission,
    /// What the target would change, for each instance it has not reached.
    pub pending: BTreeMap<InstanceKey, String>,
}

impl Selection {
    /// A kind served for the first time, or again after a restart, before its rollout is
    /// looked at: every instance keeps its version; new ones get `current`, else the target.
    pub fn hold(target: Module, current: Option<Module>) -> Self {
        Self {
            target,
            current,
            admission: Admission::Only(BTreeSet::new()),
            pending: BTreeMap::new(),
        }
    }
}

/// The version an instance renders with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    Target,
    Current,
    /// Another version, by digest: the one it is pinned to, or the one it stays on.
    Version(String),
}

/// The version `key` renders with: the one it is pinned to, the target once admitted, else
/// the one its graph has (`recorded`); an instance without a graph gets the current version.
pub fn choose(selection: &Selection, key: &InstanceKey, recorded: Option<&str>, pin: Option<&str>) -> Wanted {
    let current = selection.current.as_ref().map(|m| m.digest.as_str());
    let by_digest = |digest: &str| {
        if digest == selection.target.digest {
            Wanted::Target
        } else if Some(digest) == current {
            Wanted::Current
        } else {
            Wanted::Version(digest.to_string())
        }
    };
    if let Some(pin) = pin {
        return by_digest(pin);
    }
    if selection.admission.admits(key) {
        return Wanted::Target;
    }
    match (recorded, current) {
        (Some(recorded), _) => by_digest(recorded),
        (None, Some(_)) => Wanted::Current,
        (None, None) => Wanted::Target,
    }
}

/// Instances whose version or pending line may differ between two selections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Affected {
    None,
    All,
    Some(BTreeSet<InstanceKey>),
}

pub fn affected(old: &Selection, new: &Selection) -> Affected {
    if old.target.digest != new.target.digest
        || old.current.as_ref().map(|m| &m.digest) != new.current.as_ref().map(|m| &m.digest)
        || old.pending != new.pending
    {
        return Affected::All;
    }
    match (&old.admission, &new.admission) {
        (Admission::All, Admission::All) => Affected::None,
        (Admission::Only(old), Admission::Only(new)) => {
            let changed: BTreeSet<InstanceKey> = old.symmetric_difference(new).cloned().collect();
            if changed.is_empty() {
                Affected::None
            } else {
                Affected::Some(changed)
            }
        }
        _ => Affected::All,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(secs: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn key(name: &str) -> InstanceKey {
        InstanceKey {
            namespace: "team".into(),
            name: name.into(),
        }
    }

    fn member(name: &str, digest: &str, phase: InstancePhase) -> Member {
        Member {
            key: key(name),
            labels: BTreeMap::new(),
            digest: Some(digest.into()),
            phase: Some(phase),
            pinned: false,
        }
    }

    fn staged(batch: serde_json::Value, budget: i32) -> Policy {
        let spec: RolloutPolicy = serde_json::from_value(json!({
            "strategy": "Staged", "batchSize": batch, "healthTimeoutSeconds": 60, "failureBudget": budget
        }))
        .unwrap();
        Policy::from_spec(Some(&spec)).unwrap()
    }

    fn admitted(step: &Step) -> Vec<String> {
        match &step.admission {
            Admission::All => vec!["*".into()],
            Admission::Only(keys) => keys.iter().map(|k| k.name.clone()).collect(),
        }
    }

    use InstancePhase::{Failed, Ready};

    #[test]
    fn batches_of_one_wait_for_each_instance_to_be_ready() {
        let policy = staged(json!(1), 0);
        let mut memory = Memory::new("new");
        let mut fleet = vec![
            member("a", "old", Ready),
            member("b", "old", Ready),
            member("c", "old", Ready),
        ];
        let first = step(&policy, "new", &fleet, Gate::Open, &mut memory, t(0));
        assert_eq!(
            (first.phase, admitted(&first), first.started_batch),
            (RolloutPhase::Progressing, vec!["a".into()], true)
        );

        // a is admitted but not rendered yet, then on the target but not Ready: b waits.
        let waiting = step(&policy, "new", &fleet, Gate::Open, &mut memory, t(5));
        assert_eq!((admitted(&waiting), waiting.started_batch), (vec!["a".into()], false));
        assert!(waiting.message.contains("0 of 1"), "{}", waiting.message);
        fleet[0] = member("a", "new", InstancePhase::Applying);
        assert_eq!(
            admitted(&step(&policy, "new", &fleet, Gate::Open, &mut memory, t(10))),
            vec!["a"]
        );

        fleet[0] = member("a", "new", Ready);
        let second = step(&policy, "new", &fleet, Gate::Open, &mut memory, t(15));
        assert_eq!(
            (admitted(&second), second.started_batch),
            (vec!["a".into(), "b".into()], true)
        );
        assert_eq!(memory.batch.as_ref().map(|b| b.number), Some(2));

        fleet[1] = member("b", "new", Ready);
        step(&policy, "new", &fleet, Gate::Open, &mut memory, t(20));
        fleet[2] = member("c", "new", Ready);
        let done = step(&policy, "new", &fleet, Gate::Open, &mut memory, t(25));
        assert_eq!(
            (done.phase, done.admission.clone()),
            (RolloutPhase::Complete, Admission::All)
        );
        assert_eq!(
            (done.counts.updated, done.counts.pending, done.counts.failed),
            (3, 0, 0)
        );
    }

    #[test]
    fn a_batch_not_ready_in_time_stops_the_rollout_beyond_the_budget() {
        for (budget, expected) in [(0, RolloutPhase::Blocked), (1, RolloutPhase::Progressing)] {
            let policy = staged(json!(1), budget);
            let mut memory = Memory::new("new");
            let mut fleet = vec![member("a", "old", Ready), member("b", "old", Ready)];
            step(&policy, "new", &fleet, Gate::Open, &mut memory, t(0));
            fleet[0] = member("a", "new", InstancePhase::Applying);
            // Within the timeout it waits; past it, a counts as failed.
            assert_eq!(
                step(&policy, "new", &fleet, Gate::Open, &mut memory, t(59)).phase,
                RolloutPhase::Progressing
            );
            let late = step(&policy, "new", &fleet, Gate::Open, &mut memory, t(61));
            assert_eq!(late.phase, expected, "budget {budget}");
            assert_eq!(late.counts.failed, 1);
            if expected == RolloutPhase::Blocked {
                assert_eq!(late.reason, reasons::HEALTH_GATE_FAILED);
                assert_eq!(admitted(&late), vec!["a"], "b is not reached");
                assert!(late.message.contains("team/a"), "{}", late.message);
                // An instance that recovers opens the gate again.
                fleet[0] = member("a", "new", Ready);
                let recovered = step(&policy, "new", &fleet, Gate::Open, &mut memory, t(70));
                assert_eq!(admitted(&recovered), vec!["a", "b"]);
            } else {
                assert_eq!(admitted(&late), vec!["a", "b"], "within budget the next batch starts");
            }
        }
    }

    #[test]
    fn a_new_instance_is_no_batch_of_its_own() {
        let policy = staged(json!(1), 0);
        let mut fresh = member("new", "x", InstancePhase::Pending);
        fresh.digest = None;
        let fleet = vec![member("a", "v1", Ready), fresh];
        let step = step(&policy, "v1", &fleet, Gate::Open, &mut Memory::new("v1"), t(0));
        assert_eq!((step.phase, step.started_batch), (RolloutPhase::Complete, false));
    }

    #[test]
    fn a_failed_instance_stops_the_rollout_at_once() {
        let policy = staged(json!(1), 0);
        let mut memory = Memory::new("new");
        let mut fleet = vec![member("a", "old", Ready), member("b", "old", Ready)];
        step(&policy, "new", &fleet, Gate::Open, &mut memory, t(0));
        fleet[0] = member("a", "new", Failed);
        let blocked = step(&policy, "new", &fleet, Gate::Open, &mut memory, t(1));
        assert_eq!((blocked.phase, blocked.counts.failed), (RolloutPhase::Blocked, 1));
    }

    #[test]
    fn canaries_go_first_and_percentages_round_up() {
        let mut spec: RolloutPolicy = serde_json::from_value(json!({
            "strategy": "Staged", "batchSize": "50%",
            "canarySelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["canary"]}]}
        }))
        .unwrap();
        let policy = Policy::from_spec(Some(&spec)).unwrap();
        let mut fleet: Vec<Member> = ["a", "b", "c"].iter().map(|n| member(n, "old", Ready)).collect();
        fleet[2].labels.insert("tier".into(), "canary".into());
        let first = step(&policy, "new", &fleet, Gate::Open, &mut Memory::new("new"), t(0));
        assert_eq!(admitted(&first), vec!["a", "c"], "50% of 3 is 2: the canary c, then a");

        spec.batch_size = Some(IntOrString::String("0%".into()));
        assert!(Policy::from_spec(Some(&spec)).is_err());
        spec.batch_size = Some(IntOrString::Int(0));
        assert!(Policy::from_spec(Some(&spec)).is_err());
        spec.batch_size = Some(IntOrString::String("3".into()));
        assert_eq!(Policy::from_spec(Some(&spec)).unwrap().batch, BatchSize::Count(3));
        spec.canary_selector =
            serde_json::from_value(json!({"matchExpressions": [{"key": "x", "operator": "Near"}]})).unwrap();
        assert!(Policy::from_spec(Some(&spec)).unwrap_err().contains("Near"));
    }

    #[test]
    fn approval_and_pause_hold_every_instance() {
        let fleet = vec![member("a", "old", Ready)];
        for policy in [staged(json!(1), 0), Policy::from_spec(None).unwrap()] {
            let gated = step(
                &policy,
                "new",
                &fleet,
                Gate::AwaitingApproval(2),
                &mut Memory::new("new"),
                t(0),
            );
            assert_eq!(
                (gated.phase, gated.reason),
                (RolloutPhase::Blocked, reasons::APPROVAL_REQUIRED)
            );
            assert!(
                gated.message.contains("pequod.io/approve-destructive-change=new"),
                "{}",
                gated.message
            );
            assert_eq!(admitted(&gated), Vec::<String>::new());
            let mut paused = policy.clone();
            paused.paused = true;
            let held = step(&paused, "new", &fleet, Gate::Open, &mut Memory::new("new"), t(0));
            assert_eq!((held.phase, admitted(&held)), (RolloutPhase::Paused, vec![]));
        }
    }

    #[test]
    fn immediate_admits_everyone_and_pinned_instances_are_left_alone() {
        let mut fleet = vec![member("a", "old", Ready), member("b", "old", Ready)];
        fleet[1].pinned = true;
        let policy = Policy::from_spec(None).unwrap();
        let first = step(&policy, "new", &fleet, Gate::Open, &mut Memory::new("new"), t(0));
        assert_eq!(
            (first.phase, first.admission.clone()),
            (RolloutPhase::Progressing, Admission::All)
        );
        assert_eq!((first.counts.pending, first.counts.pinned), (1, 1));
        fleet[0] = member("a", "new", InstancePhase::Applying);
        let done = step(&policy, "new", &fleet, Gate::Open, &mut Memory::new("new"), t(1));
        assert_eq!(
            (done.phase, done.counts.updated, done.counts.total),
            (RolloutPhase::Complete, 1, 2)
        );
    }

    #[test]
    fn a_resumed_rollout_keeps_its_batch_and_timer() {
        let policy = staged(json!(1), 0);
        let fleet = vec![member("a", "new", InstancePhase::Applying), member("b", "old", Ready)];
        let mut memory = Memory::resume("new", &fleet, Some((1, t(0))));
        let resumed = step(&policy, "new", &fleet, Gate::Open, &mut memory, t(30));
        assert_eq!(
            (resumed.phase, admitted(&resumed)),
            (RolloutPhase::Progressing, vec!["a".to_string()])
        );
        assert_eq!(
            step(&policy, "new", &fleet, Gate::Open, &mut memory, t(61)).phase,
            RolloutPhase::Blocked
        );
    }

    fn module(digest: &str) -> Module {
        Module {
            digest: digest.into(),
            package: "p".into(),
            platform: "p".into(),
            dir: "/".into(),
            has_metadata: false,
            has_status: false,
        }
    }

    #[test]
    fn instances_keep_their_version_until_admitted() {
        let mut selection = Selection::hold(module("new"), Some(module("old")));
        selection.admission = Admission::Only([key("a")].into());
        #[rustfmt::skip]
        let cases = [
            ("a", Some("old"), None, Wanted::Target),
            ("b", Some("old"), None, Wanted::Current),
            ("b", Some("new"), None, Wanted::Target),
            ("b", Some("older"), None, Wanted::Version("older".into())),
            ("b", None, None, Wanted::Current),
            ("a", Some("old"), Some("older"), Wanted::Version("older".into())),
            ("b", Some("old"), Some("new"), Wanted::Target),
        ];
        for (name, recorded, pin, wanted) in cases {
            assert_eq!(
                choose(&selection, &key(name), recorded, pin),
                wanted,
                "{name} {recorded:?} {pin:?}"
            );
        }
        assert_eq!(
            choose(&Selection::hold(module("new"), None), &key("b"), None, None),
            Wanted::Target
        );
    }

    #[test]
    fn only_instances_whose_version_may_change_are_looked_at_again() {
        let old = Selection::hold(module("new"), Some(module("old")));
        let mut new = old.clone();
        assert_eq!(affected(&old, &new), Affected::None);
        new.admission = Admission::Only([key("a")].into());
        assert_eq!(affected(&old, &new), Affected::Some([key("a")].into()));
        new.admission = Admission::All;
        assert_eq!(affected(&old, &new), Affected::All);
        assert_eq!(
            affected(&old, &Selection::hold(module("newer"), Some(module("old")))),
            Affected::All
        );
    }

    #[test]
    fn a_report_announces_transitions_once() {
        let now = Time(t(0));
        let summary = PlanSummary::default();
        let policy = staged(json!(1), 0);
        let fleet = vec![member("a", "old", Ready)];
        let mut memory = Memory::new("new");
        let gated = step(&policy, "new", &fleet, Gate::AwaitingApproval(1), &mut memory, t(0));
        let first = report(&gated, ("new", Some("old")), &memory, &summary, None, (&now, Some(1)));
        assert_eq!(
            first.events.iter().map(|e| (e.0, e.1)).collect::<Vec<_>>(),
            vec![(true, reasons::APPROVAL_REQUIRED)]
        );
        assert_eq!(
            (first.condition.is_true(), first.status.current_digest.as_deref()),
            (false, Some("old"))
        );
        let shown = (first.status.clone(), first.condition.clone());
        let again = report(
            &gated,
            ("new", Some("old")),
            &memory,
            &summary,
            Some(&shown),
            (&Time(t(9)), Some(1)),
        );
        assert!(again.events.is_empty(), "no second announcement");
        assert_eq!(
            again.condition.last_transition_time,
            first.condition.last_transition_time
        );

        let moving = step(&policy, "new", &fleet, Gate::Open, &mut memory, t(10));
        let batch = report(
            &moving,
            ("new", Some("old")),
            &memory,
            &summary,
            Some(&shown),
            (&now, Some(1)),
        );
        assert_eq!(
            batch.events.iter().map(|e| e.1).collect::<Vec<_>>(),
            vec![reasons::BATCH_STARTED]
        );
        assert_eq!(
            (batch.status.batch, batch.status.progress.as_deref()),
            (Some(1), Some("0/1"))
        );
    }

    #[test]
    fn digests_are_shortened_for_messages() {
        assert_eq!(short_digest("sha256:0123456789abcdef"), "sha256:0123456789ab");
        assert_eq!(short_digest("abc"), "abc");
    }
}
