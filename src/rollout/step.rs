//! One step of a rollout: from the instances as the kind's controller sees them, the policy
//! and the time, which instances may move now and what the Transform's status says.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::policy::{Policy, Selector};
use super::selection::Admission;
use super::{InstanceKey, short_digest};
use crate::api::{InstancePhase, RolloutPhase, reasons};

/// Most instances named in a message.
const MAX_NAMED: usize = 5;

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
    let mut counts = Counts::of(members, &eligible, target);
    if let Gate::AwaitingApproval(n) = gate {
        return awaiting_approval(n, target, memory, counts);
    }
    if !policy.staged {
        return immediate(policy, target, &eligible, counts, memory);
    }
    let health = BatchHealth::of(policy, target, &eligible, memory, now);
    counts.failed = health.failed.len() as u32;
    if health.failed.len() as u32 > policy.failure_budget {
        return blocked_by_health(policy, &health.failed, memory, counts);
    }
    if health.waiting > 0 {
        return waiting_for_batch(policy, target, health.waiting, memory, counts, now);
    }
    let next = next_batch(policy, target, &eligible, memory);
    if next.is_empty() {
        memory.batch = None;
        return complete(target, counts);
    }
    if policy.paused {
        return paused_between_batches(target, eligible.len(), memory, counts);
    }
    start_batch(target, next, memory, counts, now)
}

impl Counts {
    fn of(members: &[Member], eligible: &[&Member], target: &str) -> Self {
        let updated = eligible.iter().filter(|m| m.on(target)).count() as u32;
        Self {
            total: members.len() as u32,
            updated,
            pending: eligible.len() as u32 - updated,
            failed: eligible.iter().filter(|m| m.failed(target)).count() as u32,
            pinned: (members.len() - eligible.len()) as u32,
        }
    }
}

/// Every instance reached so far, and no other, renders with the target.
fn held(memory: &Memory) -> Admission {
    Admission::Only(memory.reached.clone())
}

fn awaiting_approval(objects: usize, target: &str, memory: &Memory, counts: Counts) -> Step {
    Step {
        phase: RolloutPhase::Blocked,
        reason: reasons::APPROVAL_REQUIRED,
        message: format!(
            "module {} deletes or replaces {objects} object(s) of protected kinds (see status.rollout.plan); \
             approve with the annotation {}={target}",
            short_digest(target),
            crate::api::names::APPROVAL_ANNOTATION
        ),
        admission: held(memory),
        counts,
        started_batch: false,
        recheck: None,
    }
}

/// The batch in progress: its instances are Ready, failed, or still have time.
struct BatchHealth<'a> {
    /// Reached instances that are not Ready: failed, left out of the batch, or out of time.
    failed: Vec<&'a InstanceKey>,
    /// Instances of the batch that still have time to become Ready.
    waiting: usize,
}

impl<'a> BatchHealth<'a> {
    fn of(policy: &Policy, target: &str, eligible: &[&'a Member], memory: &Memory, now: jiff::Timestamp) -> Self {
        let timed_out = memory
            .batch
            .as_ref()
            .is_some_and(|b| elapsed(b.started, now) > policy.health_timeout);
        let in_batch = |m: &Member| memory.batch.as_ref().is_some_and(|b| b.members.contains(&m.key));
        let failed = eligible
            .iter()
            .filter(|m| memory.reached.contains(&m.key) && !m.healthy(target))
            .filter(|m| m.failed(target) || !in_batch(m) || timed_out)
            .map(|m| &m.key)
            .collect();
        let waiting = eligible
            .iter()
            .filter(|m| in_batch(m) && !m.healthy(target) && !m.failed(target) && !timed_out)
            .count();
        Self { failed, waiting }
    }
}

fn batch_number(memory: &Memory) -> u32 {
    memory.batch.as_ref().map_or(0, |b| b.number)
}

fn blocked_by_health(policy: &Policy, failed: &[&InstanceKey], memory: &Memory, counts: Counts) -> Step {
    Step {
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
    }
}

fn waiting_for_batch(
    policy: &Policy,
    target: &str,
    waiting: usize,
    memory: &Memory,
    counts: Counts,
    now: jiff::Timestamp,
) -> Step {
    let batch = memory.batch.as_ref().map_or(0, |b| b.members.len());
    let remaining = memory.batch.as_ref().map_or(Duration::ZERO, |b| {
        policy.health_timeout.saturating_sub(elapsed(b.started, now))
    });
    Step {
        phase: RolloutPhase::Progressing,
        reason: reasons::ROLLOUT_PROGRESSING,
        // No countdown in the message: the status would be written on every look.
        message: format!(
            "batch {}: {} of {batch} instance(s) Ready on module {}; each has {}s from the \
             batch's start (status.rollout.batchStartedAt)",
            batch_number(memory),
            batch - waiting,
            short_digest(target),
            policy.health_timeout.as_secs()
        ),
        admission: held(memory),
        counts,
        started_batch: false,
        recheck: Some(PROGRESS_POLL.min(remaining.max(Duration::from_secs(1)))),
    }
}

/// The instances the next batch moves, canaries first.
fn next_batch(policy: &Policy, target: &str, eligible: &[&Member], memory: &Memory) -> BTreeSet<InstanceKey> {
    // An instance without a graph yet is new: it takes the current version by itself (the
    // target once the rollout is complete), and joins a batch once it has one.
    order(eligible, policy.canaries.as_ref())
        .into_iter()
        .filter(|m| m.digest.is_some() && !m.on(target) && !memory.reached.contains(&m.key))
        .take(policy.batch.of(eligible.len()))
        .map(|m| m.key.clone())
        .collect()
}

fn paused_between_batches(target: &str, eligible: usize, memory: &Memory, counts: Counts) -> Step {
    Step {
        phase: RolloutPhase::Paused,
        reason: reasons::ROLLOUT_PAUSED,
        message: format!(
            "spec.rollout.paused: {} of {eligible} instance(s) on module {}; no further instance moves",
            counts.updated,
            short_digest(target)
        ),
        admission: held(memory),
        counts,
        started_batch: false,
        recheck: None,
    }
}

fn start_batch(
    target: &str,
    next: BTreeSet<InstanceKey>,
    memory: &mut Memory,
    counts: Counts,
    now: jiff::Timestamp,
) -> Step {
    let number = batch_number(memory) + 1;
    let message = format!(
        "batch {number}: moving {} instance(s) to module {}: {}",
        next.len(),
        short_digest(target),
        name_some(next.iter())
    );
    memory.reached.extend(next.iter().cloned());
    memory.batch = Some(Batch {
        number,
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
            admission: held(memory),
            counts,
            started_batch: false,
            recheck: None,
        };
    }
    // Only new keys are cloned: this runs on every pass, over every instance.
    for member in eligible {
        if !memory.reached.contains(&member.key) {
            memory.reached.insert(member.key.clone());
        }
    }
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
