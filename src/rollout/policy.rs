//! A Transform's rollout policy (`spec.rollout`), checked: batches, canaries, health gate.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::api::{DEFAULT_PROTECTED_KINDS, RolloutPolicy, RolloutStrategy};

/// How long a batch may take to be Ready unless the Transform says otherwise.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(300);

/// Instances per batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    Count(u32),
    Percent(u32),
}

impl BatchSize {
    pub(super) fn of(self, eligible: usize) -> usize {
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
