//! The operator process's run-time, apart from the domain: HTTP serving of metrics and probes
//! (plain and secure), health, leader election, graceful shutdown, logs and metrics.

pub mod health;
pub mod leader;
pub mod metrics;
pub mod secure;
pub mod server;
pub mod shutdown;
pub mod telemetry;
