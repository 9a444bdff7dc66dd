//! The reconcile metrics: every reconcile counted, timed and queued.

use std::time::Instant;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::backoff::{Retries, succeeded};
use super::error::Error;
use crate::api::{Condition, ConditionStatus, has_condition};
use crate::error::ErrorCategory;
use crate::metrics::Metrics;

/// A reconcile that takes longer than this is logged at info level as slow.
const SLOW_RECONCILE: std::time::Duration = std::time::Duration::from_secs(10);

tokio::task_local! {
    /// The failure the status last written by the running reconcile ends in (see
    /// [`failure_of`]), for `pequod_reconcile_total{result="error"}`.
    static ENDED_IN: std::cell::RefCell<Option<String>>;
}

/// The failure a status ends in: a failed module fetch (`CueFetched=False`), schema extraction
/// (`SchemaExtracted=False`) or render (`Rendered=False`), or a degraded graph
/// (`Degraded=True`: failed applies or readiness, a refused graph). The condition's reason
/// names it. A paused object has not failed.
pub fn failure_of(conditions: &[Condition]) -> Option<&str> {
    use crate::api::condition_types::{CUE_FETCHED, DEGRADED, PAUSED, RENDERED, SCHEMA_EXTRACTED};
    if has_condition(conditions, PAUSED, ConditionStatus::True, None) {
        return None;
    }
    let failing = [
        (CUE_FETCHED, ConditionStatus::False),
        (SCHEMA_EXTRACTED, ConditionStatus::False),
        (RENDERED, ConditionStatus::False),
        (DEGRADED, ConditionStatus::True),
    ];
    failing.iter().find_map(|(type_, status)| {
        conditions
            .iter()
            .find(|c| c.type_ == *type_ && c.status == *status)
            .map(|c| c.reason.as_str())
    })
}

/// Notes that the running reconcile's status ends in `conditions`' failure, or in none.
/// Outside a measured reconcile it does nothing.
pub(super) fn note_status(conditions: &[Condition]) {
    let failure = failure_of(conditions).map(str::to_string);
    let _ = ENDED_IN.try_with(|ended| *ended.borrow_mut() = failure);
}

/// Reasons of failure conditions whose `pequod_reconcile_errors_total` series exist from
/// start-up: a failed fetch, a failed render, failed nodes.
pub const FAILURE_REASONS: [&str; 3] = [
    crate::api::reasons::CUE_FETCH_FAILED,
    crate::api::reasons::CUE_RENDER_FAILED,
    crate::api::reasons::NODE_FAILED,
];

/// Runs one reconcile of the object of `meta` inside `span` (which names it), counted and
/// timed in the reconcile metrics under `controller`; a success clears the object's backoff.
/// `reconcile` makes the reconcile's future once a worker is free.
pub async fn measured<F, C: Retries>(
    metrics: &Metrics,
    controller: &'static str,
    span: tracing::Span,
    (ctx, meta): (&C, &ObjectMeta),
    reconcile: impl FnOnce() -> F,
) -> Result<kube::runtime::controller::Action, Error>
where
    F: Future<Output = Result<kube::runtime::controller::Action, Error>>,
{
    use tracing::Instrument;
    async move {
        let queued = metrics.queued(controller);
        let waited = Instant::now();
        let Some(_permit) = ctx.workers().acquire().await else {
            // Shutting down: the next leader (or the next start) lists the object again.
            return Ok(kube::runtime::controller::Action::await_change());
        };
        drop(queued);
        // Made and boxed only now: a reconcile's future is large (tens of KiB), and thousands
        // wait for a worker after a restart or a burst of changes. Boxed also because moving it
        // by value through this frame (as unoptimized builds do) overflowed worker stacks.
        let reconcile = Box::pin(reconcile());
        let waited = waited.elapsed();
        let measure = ReconcileMeasure::start(metrics, controller);
        let (result, failure) = ENDED_IN
            .scope(std::cell::RefCell::new(None), async {
                let result = reconcile.await;
                (result, ENDED_IN.with(|ended| ended.borrow_mut().take()))
            })
            .await;
        measure.finish(&result, failure.as_deref(), waited);
        if result.is_ok() {
            succeeded(ctx, meta);
        }
        result
    }
    .instrument(span)
    .await
}

struct ReconcileMeasure<'a> {
    metrics: &'a Metrics,
    controller: &'static str,
    started: Instant,
}

impl<'a> ReconcileMeasure<'a> {
    fn start(metrics: &'a Metrics, controller: &'static str) -> Self {
        Self {
            metrics,
            controller,
            started: Instant::now(),
        }
    }

    /// Records the reconcile: an error, or a status that ends in `failure`, counts as
    /// `result="error"` with its reason as `error_type`.
    fn finish<T>(self, result: &Result<T, Error>, failure: Option<&str>, waited: std::time::Duration) {
        let m = self.metrics;
        let took = self.started.elapsed();
        m.reconcile_duration_seconds
            .with_label_values(&[self.controller])
            .observe(took.as_secs_f64());
        let error_type = match result {
            Ok(_) => failure,
            Err(e) => Some(e.reason()),
        };
        match error_type {
            None => m.reconcile_total.with_label_values(&[self.controller, "success"]).inc(),
            Some(error_type) => {
                m.reconcile_total.with_label_values(&[self.controller, "error"]).inc();
                m.reconcile_errors_total
                    .with_label_values(&[self.controller, error_type])
                    .inc();
            }
        }
        let (duration_ms, queued_ms) = (took.as_millis() as u64, waited.as_millis() as u64);
        let error_type = error_type.unwrap_or_default();
        if took >= SLOW_RECONCILE {
            tracing::info!(duration_ms, queued_ms, error_type, "slow reconcile");
        } else {
            tracing::debug!(duration_ms, queued_ms, error_type, "reconcile finished");
        }
    }
}

/// Names of the controllers in the `controller` label of the reconcile metrics.
pub const CONTROLLERS: [&str; 3] = ["transform", "instance", "resourcegraph"];

/// Creates every reconcile series at zero, so that /metrics lists them (and rates work)
/// before the first reconcile or error happens.
pub fn init_metrics(metrics: &Metrics) {
    for controller in CONTROLLERS {
        for result in ["success", "error"] {
            metrics.reconcile_total.with_label_values(&[controller, result]);
        }
        metrics.reconcile_duration_seconds.with_label_values(&[controller]);
        for reason in Error::REASONS.iter().chain(&FAILURE_REASONS) {
            metrics.reconcile_errors_total.with_label_values(&[controller, reason]);
        }
        metrics.reconcile_queue_depth.with_label_values(&[controller]);
        metrics
            .reconcile_queue_oldest_wait_seconds
            .with_label_values(&[controller]);
    }
}

#[cfg(test)]
mod tests {
    use super::super::backoff::Backoff;
    use super::super::lifecycle::Workers;
    use super::*;

    #[test]
    fn a_status_ends_in_the_failure_of_its_fetch_render_or_graph() {
        use crate::api::condition_types::{CUE_FETCHED, DEGRADED, PAUSED, READY, RENDERED};
        let c = |type_: &str, ok: bool, reason: &str| Condition::new(type_, ok, reason, "");
        assert_eq!(failure_of(&[c(READY, false, "Progressing")]), None);
        assert_eq!(
            failure_of(&[c(CUE_FETCHED, false, "CueFetchFailed"), c(READY, true, "Ready")]),
            Some("CueFetchFailed")
        );
        assert_eq!(
            failure_of(&[c(RENDERED, false, "CueRenderFailed")]),
            Some("CueRenderFailed")
        );
        assert_eq!(failure_of(&[c(DEGRADED, true, "NodeFailed")]), Some("NodeFailed"));
        assert_eq!(failure_of(&[c(DEGRADED, false, "AllNodesReady")]), None);
        assert_eq!(
            failure_of(&[c(RENDERED, false, "CueRenderFailed"), c(PAUSED, true, "Paused")]),
            None
        );
    }

    struct Counting(Backoff, Workers);
    impl Retries for Counting {
        fn backoff(&self) -> &Backoff {
            &self.0
        }
        fn workers(&self) -> &Workers {
            &self.1
        }
    }

    /// A reconcile through [`measured`] whose status (written through [`note_status`]) has
    /// `conditions`.
    async fn reconcile_ending_in(metrics: &Metrics, ctx: &Counting, conditions: Vec<Condition>) {
        let meta = ObjectMeta::default();
        let span = tracing::Span::none();
        let result = measured(metrics, "instance", span, (ctx, &meta), || async move {
            note_status(&conditions);
            Ok(kube::runtime::controller::Action::await_change())
        })
        .await;
        assert!(result.is_ok());
    }

    #[tokio::test]
    async fn a_reconcile_that_ends_in_a_failure_condition_counts_as_an_error() {
        use crate::api::condition_types::{READY, RENDERED};
        let metrics = Metrics::new().unwrap();
        let ctx = Counting(Backoff::default(), Workers::default());
        let count = |result: &str| metrics.reconcile_total.with_label_values(&["instance", result]).get();
        reconcile_ending_in(&metrics, &ctx, vec![Condition::new(READY, true, "Ready", "")]).await;
        reconcile_ending_in(
            &metrics,
            &ctx,
            vec![Condition::new(RENDERED, false, "CueRenderFailed", "")],
        )
        .await;
        assert_eq!((count("success"), count("error")), (1, 1));
        assert_eq!(
            metrics
                .reconcile_errors_total
                .with_label_values(&["instance", "CueRenderFailed"])
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn reconciles_beyond_the_limit_wait_in_the_queue() {
        let metrics = std::sync::Arc::new(Metrics::new().unwrap());
        let ctx = std::sync::Arc::new(Counting(Backoff::default(), Workers::default()));
        let shutdown = crate::runtime::shutdown::Shutdown::new();
        ctx.workers().limit(1, shutdown.clone());
        let (release, released) = tokio::sync::watch::channel(false);
        let start = |n: u32| {
            let (metrics, ctx, mut released) = (metrics.clone(), ctx.clone(), released.clone());
            tokio::spawn(async move {
                let meta = ObjectMeta::default();
                measured(
                    &metrics,
                    "transform",
                    tracing::Span::none(),
                    (&*ctx, &meta),
                    || async move {
                        let _ = released.wait_for(|r| *r).await;
                        let _ = n;
                        Ok(kube::runtime::controller::Action::await_change())
                    },
                )
                .await
            })
        };
        let running = [start(1), start(2), start(3)];
        let depth = || metrics.reconcile_queue_depth.with_label_values(&["transform"]).get();
        for _ in 0..100 {
            if depth() == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(depth(), 2, "one runs, two wait");
        release.send_replace(true);
        for r in running {
            r.await.unwrap().unwrap();
        }
        assert_eq!(depth(), 0);
        assert_eq!(
            metrics
                .reconcile_total
                .with_label_values(&["transform", "success"])
                .get(),
            3
        );
    }
}
