//! Status conditions shared by every kind Pequod writes status to.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Status of a condition, as in `metav1.Condition`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl From<bool> for ConditionStatus {
    fn from(value: bool) -> Self {
        if value { Self::True } else { Self::False }
    }
}

/// One aspect of an object's current state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Type of condition in CamelCase, for example `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// Machine-readable CamelCase reason for the last transition.
    pub reason: String,
    /// Human-readable details.
    pub message: String,
    /// When the status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// The metadata.generation the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Condition {
    pub fn new(
        type_: impl Into<String>,
        status: impl Into<ConditionStatus>,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: None,
            observed_generation: None,
        }
    }

    pub fn is_true(&self) -> bool {
        self.status == ConditionStatus::True
    }
}

/// Whether `conditions` has one of `type_` with `status` and, when given, `reason`.
pub fn has_condition(conditions: &[Condition], type_: &str, status: ConditionStatus, reason: Option<&str>) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == status && reason.is_none_or(|r| c.reason == r))
}

/// Sets `new` in `conditions`, keeping `lastTransitionTime` when the status did not change so
/// that reconciles which change nothing leave the status byte-for-byte identical.
/// Returns whether anything changed.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition, now: &Time, generation: Option<i64>) -> bool {
    new.observed_generation = generation;
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            new.last_transition_time = if existing.status == new.status {
                existing.last_transition_time.clone().or_else(|| Some(now.clone()))
            } else {
                Some(now.clone())
            };
            if *existing == new {
                return false;
            }
            *existing = new;
            true
        }
        None => {
            new.last_transition_time = Some(now.clone());
            conditions.push(new);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn new_condition_gets_transition_time_and_generation() {
        let mut conditions = Vec::new();
        assert!(set_condition(
            &mut conditions,
            Condition::new("Ready", true, "Done", "ok"),
            &time(10),
            Some(3)
        ));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, Some(time(10)));
        assert_eq!(conditions[0].observed_generation, Some(3));
    }

    #[test]
    fn unchanged_condition_is_not_rewritten() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            Condition::new("Ready", true, "Done", "ok"),
            &time(10),
            Some(1),
        );
        let before = conditions.clone();
        assert!(!set_condition(
            &mut conditions,
            Condition::new("Ready", true, "Done", "ok"),
            &time(20),
            Some(1)
        ));
        assert_eq!(conditions, before);
    }

    #[test]
    fn message_change_keeps_transition_time_status_change_moves_it() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            Condition::new("Ready", false, "Waiting", "a"),
            &time(10),
            Some(1),
        );
        assert!(set_condition(
            &mut conditions,
            Condition::new("Ready", false, "Waiting", "b"),
            &time(20),
            Some(1)
        ));
        assert_eq!(conditions[0].last_transition_time, Some(time(10)));
        assert!(set_condition(
            &mut conditions,
            Condition::new("Ready", true, "Done", "c"),
            &time(30),
            Some(1)
        ));
        assert_eq!(conditions[0].last_transition_time, Some(time(30)));
        assert_eq!(conditions[0].message, "c");
    }
}
