//! Pequod: a Kubernetes operator that turns CUE modules into self-service platform APIs.

pub mod api;
pub mod cli;
pub mod cue;
pub mod error;
pub mod health;
pub mod metrics;
pub mod operator;
pub mod server;
pub mod shutdown;
pub mod telemetry;
