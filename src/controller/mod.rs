//! Controllers: the kube-facing loops around the pure core.

pub mod resourcegraph;
pub mod watches;

use std::time::Instant;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::metrics::Metrics;

/// Errors that end a reconcile early; everything else becomes status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("encoding status: {0}")]
    Serialization(#[from] serde_json::Error),
    #[error("object has no {0}")]
    MissingField(&'static str),
}

impl Error {
    /// Stable reason string for metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(s)) if s.code == 409 => "Conflict",
            Self::Kube(_) => "ApiError",
            Self::Serialization(_) => "SerializationError",
            Self::MissingField(_) => "InvalidObject",
        }
    }
}

/// Times one reconcile and records `pequod_reconcile_*` when it ends.
pub struct ReconcileMeasure<'a> {
    metrics: &'a Metrics,
    controller: &'static str,
    started: Instant,
}

impl<'a> ReconcileMeasure<'a> {
    pub fn start(metrics: &'a Metrics, controller: &'static str) -> Self {
        Self {
            metrics,
            controller,
            started: Instant::now(),
        }
    }

    pub fn finish<T>(self, result: &Result<T, Error>) {
        let m = self.metrics;
        m.reconcile_duration_seconds
            .with_label_values(&[self.controller])
            .observe(self.started.elapsed().as_secs_f64());
        match result {
            Ok(_) => m.reconcile_total.with_label_values(&[self.controller, "success"]).inc(),
            Err(e) => {
                m.reconcile_total.with_label_values(&[self.controller, "error"]).inc();
                m.reconcile_errors_total
                    .with_label_values(&[self.controller, e.reason()])
                    .inc();
            }
        }
    }
}

/// The current time at the apiserver's precision (seconds), so that a timestamp written and
/// read back compares equal.
pub fn now() -> Time {
    let ts = jiff::Timestamp::now();
    Time(jiff::Timestamp::from_second(ts.as_second()).unwrap_or(ts))
}

/// A short random id for the reconcile span, so that all lines of one reconcile can be found.
pub fn reconcile_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:x}-{n}", std::process::id())
}
