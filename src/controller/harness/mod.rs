//! What every controller shares: the error that ends a reconcile, its retries, the status it
//! writes, its events and finalizers, its metrics, and the controller's life from start to
//! shutdown.

pub mod backoff;
pub mod error;
pub mod events;
pub mod finalizer;
pub mod lifecycle;
pub mod metrics;
pub mod status;

pub use backoff::{Backoff, RETRY, Reported, Retries, error_policy};
pub use error::Error;
pub use events::{publish, reconcile_event, truncate};
pub use finalizer::{finalized, remove_finalizer};
pub use lifecycle::{
    ShardEntry, Workers, applied_once_listed, drive, enter_shard, reconcile_id, reconciled, report_stopped,
    report_when_synced, run_controller, runner_config, synced,
};
pub use metrics::{init_metrics, measured};
pub use status::{ConditionedStatus, StatusConditions, StatusDraft, StatusMemory, now};
