//! The operator process's run-time, apart from the domain: HTTP serving of metrics and probes
//! (plain and secure), health, leader election, graceful shutdown, logs, the graph-signing key and start-up errors.
//! The metrics themselves are `crate::metrics`, on the ground floor: the domain records into
//! them.

pub mod health;
pub mod leader;
pub mod secure;
pub mod server;
pub mod shards;
pub mod shutdown;
pub mod signing_key;
pub mod startup;
pub mod telemetry;
