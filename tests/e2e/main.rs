//! End-to-end tests against a real kube-apiserver (see support/control_plane.rs).

mod demo;
mod executor;
mod instances;
mod metrics;
mod operator_process;
mod remote;
mod smoke;
mod sources;
mod support;
mod transforms;
