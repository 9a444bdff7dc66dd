//! Rollouts of a module version: which instances move to the target version, in what order,
//! and when a rollout waits, stops or is complete; and which version each instance renders
//! with meanwhile. Pure: the kind's rollout driver (`controller/rollout_driver.rs`) feeds [`step()`]
//! with the instances as the kind's controller sees them and the time, and the kind's
//! controller asks [`choose()`].
//!
//! An instance moves only when it is admitted. Until then it keeps the version its graph was
//! rendered with (`status.moduleDigest`), so that a rollout that stops leaves every instance it
//! did not reach untouched.
//!
//! [`policy`] checks `spec.rollout`, [`step()`] decides, [`report`] shows the decision on the
//! Transform, [`selection`] tells each instance its version, and [`plan`] says what a module
//! version does to each instance (the fleet's diff and its summary).

pub mod plan;
pub mod policy;
pub mod report;
pub mod selection;
pub mod step;

pub use policy::{BatchSize, DEFAULT_HEALTH_TIMEOUT, Policy, Selector};
pub use report::{Report, report};
pub use selection::{Admission, Affected, Selection, Wanted, affected, choose};
pub use step::{BLOCKED_POLL, Batch, Counts, Gate, Member, Memory, PROGRESS_POLL, Step, step};

/// An instance, by namespace and name.
pub type InstanceKey = crate::api::NamespacedName;

/// `sha256:0123456789ab`: enough to tell versions apart in a message.
pub fn short_digest(digest: &str) -> &str {
    let end = digest.find(':').map_or(12, |i| i + 13).min(digest.len());
    &digest[..end]
}

#[cfg(test)]
mod tests;
