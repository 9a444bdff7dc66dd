//! Controllers: the kube-facing loops around the pure core.

pub mod access;
pub mod cache;
pub mod fleet_plan;
pub mod harness;
pub mod instance;
pub mod resourcegraph;
pub mod rollout_driver;
pub mod serving;
pub mod transform;
pub mod watches;

pub use harness::{Error, init_metrics};
