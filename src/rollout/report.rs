//! What a rollout step shows on the Transform: `status.rollout`, the `RolledOut` condition
//! and the events of a transition.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::step::{Memory, Step};
use crate::api::condition_types::ROLLED_OUT;
use crate::api::{Condition, PlanSummary, RolloutPhase, RolloutStatus, reasons, set_condition};

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
