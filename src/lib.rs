//! Pequod: a Kubernetes operator that turns CUE modules into self-service platform APIs.

pub mod api;
pub mod apply;
pub mod authority;
pub mod cli;
pub mod commands;
pub mod controller;
pub mod crd;
pub mod cue;
pub mod error;
pub mod executor;
pub mod graph;
pub mod health;
pub mod instance;
pub mod leader;
pub mod lru;
pub mod metrics;
pub mod operator;
pub mod rbac;
pub mod readiness;
pub mod secure;
pub mod server;
pub mod shutdown;
pub mod source;
pub mod telemetry;
