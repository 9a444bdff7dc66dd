//! End-to-end tests against a real control plane (see the test kit, `testkit/`).

mod api_versions;
mod attacks;
mod chart;
mod clouds;
mod executor;
mod instances;
mod metrics;
mod operator_process;
mod reads;
mod remote;
mod rollouts;
mod smoke;
mod sources;
mod transforms;

use pequod_testkit as support;
