//! Pequod: a Kubernetes operator that turns CUE modules into self-service platform APIs.

pub mod api;
pub mod apply;
pub mod authority;
pub mod canonical;
pub mod cli;
pub mod commands;
pub mod controller;
pub mod conversion;
pub mod crd;
pub mod cue;
pub mod error;
pub mod executor;
pub mod graph;
pub mod instance_graph;
pub mod lru;
pub mod metrics;
pub mod naming;
pub mod operator;
pub mod rbac;
pub mod readiness;
pub mod rollout;
pub mod runtime;
pub mod source;

#[cfg(test)]
mod layers;
