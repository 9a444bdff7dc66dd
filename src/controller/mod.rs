//! Controllers: the kube-facing loops around the pure core.

pub mod access;
pub mod instance;
pub mod resourcegraph;
pub mod rollout;
pub mod transform;
pub mod watches;

use std::time::Instant;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use crate::api::{Condition, ConditionStatus, has_condition, set_condition};

use crate::error::ErrorCategory;
use crate::runtime::metrics::Metrics;

/// Errors that end a reconcile early; everything else becomes status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("encoding status: {0}")]
    Serialization(#[from] serde_json::Error),
    #[error("object has no {0}")]
    MissingField(&'static str),
    #[error("{0}")]
    CueUnavailable(String),
}

impl Error {
    /// Every value [`ErrorCategory::reason`] returns.
    pub const REASONS: [&'static str; 5] = [
        "Conflict",
        "ApiError",
        "SerializationError",
        "InvalidObject",
        "CueUnavailable",
    ];
}

impl ErrorCategory for Error {
    fn reason(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(s)) if s.code == 409 => "Conflict",
            Self::Kube(_) => "ApiError",
            Self::Serialization(_) => "SerializationError",
            Self::MissingField(_) => "InvalidObject",
            Self::CueUnavailable(_) => "CueUnavailable",
        }
    }

    /// An object missing a field the apiserver always sets, or a status that cannot be
    /// encoded, does not mend by retrying; the API and cue may.
    fn is_transient(&self) -> bool {
        matches!(self, Self::Kube(_) | Self::CueUnavailable(_))
    }
}

/// Retry delay after a node or module failure that may pass by itself.
pub const RETRY: std::time::Duration = std::time::Duration::from_secs(15);

/// First and longest delay of a reconcile's retries after transient errors.
const BACKOFF_MIN: std::time::Duration = std::time::Duration::from_secs(1);
const BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(300);

/// The delay before the next try after `failures` consecutive transient errors of one
/// object: 1 s, doubling, at most 5 minutes.
pub fn backoff_delay(failures: u32) -> std::time::Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
    BACKOFF_MIN.saturating_mul(factor).min(BACKOFF_MAX)
}

/// Consecutive failed reconciles per object, for [`backoff_delay`].
#[derive(Default)]
pub struct Backoff(std::sync::Mutex<std::collections::HashMap<String, u32>>);

impl Backoff {
    /// Counts a failure of `key` and returns how long to wait.
    fn failed(&self, key: &str) -> std::time::Duration {
        let mut failures = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = failures.entry(key.to_string()).or_insert(0);
        *count = count.saturating_add(1);
        backoff_delay(*count)
    }

    /// Forgets `key`'s failures after a reconcile that succeeded (or will not be retried).
    fn reset(&self, key: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// A controller context that keeps its objects' [`Backoff`].
pub trait Retries {
    fn backoff(&self) -> &Backoff;
}

/// Identifies an object in a [`Backoff`].
fn backoff_key(meta: &ObjectMeta) -> String {
    meta.uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default()
        )
    })
}

/// The error policy of every controller: a transient error tries the object again after an
/// exponential backoff of its own; a permanent one waits for the object to change.
pub fn error_policy<K, C>(
    obj: std::sync::Arc<K>,
    error: &Error,
    ctx: std::sync::Arc<C>,
) -> kube::runtime::controller::Action
where
    K: kube::Resource,
    C: Retries,
{
    let key = backoff_key(obj.meta());
    if error.is_transient() {
        let delay = ctx.backoff().failed(&key);
        tracing::warn!(error = %error, reason = error.reason(), retry_in = ?delay, "reconcile failed");
        kube::runtime::controller::Action::requeue(delay)
    } else {
        ctx.backoff().reset(&key);
        tracing::warn!(error = %error, reason = error.reason(), "reconcile failed; waiting for a change");
        kube::runtime::controller::Action::await_change()
    }
}

/// Forgets an object's failures once a reconcile of it succeeded.
pub fn succeeded<C: Retries>(ctx: &C, meta: &ObjectMeta) {
    ctx.backoff().reset(&backoff_key(meta));
}

/// Runs one reconcile of the object of `meta` inside `span` (which names it), counted and
/// timed in the reconcile metrics under `controller`; a success clears the object's backoff.
pub async fn measured<F, C: Retries>(
    metrics: &Metrics,
    controller: &'static str,
    span: tracing::Span,
    (ctx, meta): (&C, &ObjectMeta),
    reconcile: F,
) -> Result<kube::runtime::controller::Action, Error>
where
    F: Future<Output = Result<kube::runtime::controller::Action, Error>>,
{
    use tracing::Instrument;
    // Boxed: a reconcile's future is large, and moving it by value through this frame (as
    // unoptimized builds do, more than once) overflowed worker stacks.
    let reconcile = Box::pin(reconcile);
    async move {
        let measure = ReconcileMeasure::start(metrics, controller);
        let result = reconcile.await;
        measure.finish(&result);
        if result.is_ok() {
            succeeded(ctx, meta);
        }
        result
    }
    .instrument(span)
    .await
}

/// `obj` with `finalizer` on it: as it is, or as returned by adding the finalizer.
pub async fn finalized<'a, K>(api: &kube::Api<K>, obj: &'a K, finalizer: &str) -> Result<std::borrow::Cow<'a, K>, Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    use kube::ResourceExt;
    if obj.finalizers().iter().any(|f| f == finalizer) {
        Ok(std::borrow::Cow::Borrowed(obj))
    } else {
        add_finalizer(api, obj, finalizer).await.map(std::borrow::Cow::Owned)
    }
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

    fn finish<T>(self, result: &Result<T, Error>) {
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

/// Per object uid: (resourceVersion a status was computed from, status written). A reconcile
/// that still sees that resourceVersion works from the written status instead of the stale
/// cached one, so it neither repeats writes nor re-announces transitions.
pub struct StatusMemory<S> {
    written: std::sync::Mutex<std::collections::HashMap<String, (String, S)>>,
}

impl<S> Default for StatusMemory<S> {
    fn default() -> Self {
        Self {
            written: std::sync::Mutex::default(),
        }
    }
}

impl<S: Clone + Default> StatusMemory<S> {
    /// The status as last known for an object seen at `resource_version` with `cached` status.
    pub fn last(&self, uid: &str, resource_version: Option<&String>, cached: Option<&S>) -> S {
        let written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        match written.get(uid) {
            Some((version, status)) if Some(version) == resource_version => status.clone(),
            _ => cached.cloned().unwrap_or_default(),
        }
    }

    pub fn remember(&self, uid: String, resource_version: String, status: S) {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid, (resource_version, status));
    }

    pub fn forget(&self, uid: &str) {
        self.written.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
    }
}

impl<S: Clone + Default + PartialEq + serde::Serialize> StatusMemory<S> {
    /// Applies `new` as the status of `obj` (`type_meta`: its apiVersion and kind) with field
    /// manager `manager`, unless it equals `old`, and remembers it.
    pub async fn write<K>(
        &self,
        api: &kube::Api<K>,
        obj: &K,
        type_meta: (&str, &str),
        manager: &str,
        old: &S,
        new: S,
    ) -> Result<(), Error>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        use kube::ResourceExt;
        if &new == old {
            return Ok(());
        }
        let body = serde_json::json!({"apiVersion": type_meta.0, "kind": type_meta.1, "status": new});
        api.patch_status(
            &obj.name_any(),
            &kube::api::PatchParams::apply(manager).force(),
            &kube::api::Patch::Apply(body),
        )
        .await?;
        if let (Some(uid), Some(version)) = (obj.uid(), obj.resource_version()) {
            self.remember(uid, version, new);
        }
        Ok(())
    }
}

/// A status with conditions and an observed generation.
pub trait ConditionedStatus: Clone + Default {
    fn conditions(&self) -> &[Condition];
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;
    fn set_observed_generation(&mut self, generation: Option<i64>);
}

/// Implements [`ConditionedStatus`] for status types with `conditions` and `observed_generation`.
macro_rules! conditioned_status {
    ($($status:ty),*) => {$(
        impl ConditionedStatus for $status {
            fn conditions(&self) -> &[Condition] {
                &self.conditions
            }
            fn conditions_mut(&mut self) -> &mut Vec<Condition> {
                &mut self.conditions
            }
            fn set_observed_generation(&mut self, generation: Option<i64>) {
                self.observed_generation = generation;
            }
        }
    )*};
}

conditioned_status!(crate::api::TransformStatus, crate::api::InstanceStatus);

/// A status under construction: the last known one (`old`, for transition checks) and the
/// next one, with the time and generation its conditions are stamped with.
pub struct StatusDraft<S> {
    pub old: S,
    pub new: S,
    pub time: Time,
    generation: Option<i64>,
    /// Events decided with the status, published when it is written.
    pub events: Vec<kube::runtime::events::Event>,
}

impl<S: ConditionedStatus> StatusDraft<S> {
    /// Starts from what `memory` last wrote for the object, else its `cached` status.
    pub fn start(memory: &StatusMemory<S>, meta: &ObjectMeta, cached: Option<&S>) -> Self {
        let uid = meta.uid.clone().unwrap_or_default();
        let old = memory.last(&uid, meta.resource_version.as_ref(), cached);
        let mut new = old.clone();
        new.set_observed_generation(meta.generation);
        Self {
            old,
            new,
            time: now(),
            generation: meta.generation,
            events: Vec::new(),
        }
    }

    /// Sets condition `type_` and, on its transition (it had another status or reason),
    /// records the event `(event_type, event_reason)` with `message`.
    pub fn condition_with_event(
        &mut self,
        type_: &str,
        ok: bool,
        reason: &str,
        message: impl Into<String>,
        (event_type, event_reason): (kube::runtime::events::EventType, &str),
    ) {
        let message = message.into();
        let status = if ok {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        };
        if !self.was(type_, status, reason) {
            self.event(event_type, event_reason, &message);
        }
        self.condition(type_, ok, reason, message);
    }

    /// A draft over `status` as a reconcile of `generation` starts it, for tests of status
    /// transitions.
    #[cfg(test)]
    pub fn for_test(status: &S, generation: i64) -> Self {
        let meta = ObjectMeta {
            uid: Some("uid".into()),
            generation: Some(generation),
            ..Default::default()
        };
        Self::start(&StatusMemory::default(), &meta, Some(status))
    }

    /// The reasons of the events recorded so far.
    #[cfg(test)]
    pub fn event_reasons(&self) -> Vec<String> {
        self.events.iter().map(|e| e.reason.clone()).collect()
    }

    /// Records an event, published with the status.
    pub fn event(&mut self, type_: kube::runtime::events::EventType, reason: &str, note: &str) {
        self.events.push(reconcile_event(type_, reason, note));
    }

    pub fn condition(&mut self, type_: &str, ok: bool, reason: &str, message: impl Into<String>) {
        set_condition(
            self.new.conditions_mut(),
            Condition::new(type_, ok, reason, message),
            &self.time,
            self.generation,
        );
    }

    /// `pequod.io/paused` holds the object: condition `Paused`, with an event on transition.
    pub fn paused(&mut self, message: impl Into<String>) {
        self.condition_with_event(
            crate::api::condition_types::PAUSED,
            true,
            crate::api::reasons::PAUSED,
            message,
            (kube::runtime::events::EventType::Normal, crate::api::reasons::PAUSED),
        );
    }

    /// An object reconciled again after a pause says so (`Paused=False`, `Resumed`).
    pub fn resumed(&mut self, message: &str) {
        let paused = crate::api::condition_types::PAUSED;
        if self.old.conditions().iter().any(|c| c.type_ == paused) {
            self.condition(paused, false, crate::api::reasons::RESUMED, message);
        }
    }

    /// Whether the previous status had condition `type_` with `status` and `reason`.
    pub fn was(&self, type_: &str, status: ConditionStatus, reason: &str) -> bool {
        has_condition(self.old.conditions(), type_, status, Some(reason))
    }
}

/// Cuts an event note to the length the events API accepts.
pub fn truncate(mut s: String) -> String {
    if s.len() > 1000 {
        let mut cut = 1000;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Publishes an event in the background: an event must not hold up the reconcile.
pub fn publish(
    recorder: &kube::runtime::events::Recorder,
    reference: k8s_openapi::api::core::v1::ObjectReference,
    event: kube::runtime::events::Event,
) {
    let recorder = recorder.clone();
    tokio::spawn(async move {
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::warn!(error = %e, reason = %event.reason, "publishing event failed");
        }
    });
}

/// A Reconcile event of the given type.
pub fn reconcile_event(
    type_: kube::runtime::events::EventType,
    reason: &str,
    note: impl Into<String>,
) -> kube::runtime::events::Event {
    kube::runtime::events::Event {
        type_,
        reason: reason.into(),
        note: Some(truncate(note.into())),
        action: "Reconcile".into(),
        secondary: None,
    }
}

/// Adds `finalizer` to `obj`. The resourceVersion makes the patch fail rather than race
/// another writer of the list.
pub async fn add_finalizer<K>(api: &kube::Api<K>, obj: &K, finalizer: &str) -> Result<K, Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    use kube::ResourceExt;
    let finalizers: Vec<String> = obj
        .finalizers()
        .iter()
        .cloned()
        .chain([finalizer.to_string()])
        .collect();
    let patch = serde_json::json!({"metadata": {"finalizers": finalizers, "resourceVersion": obj.resource_version()}});
    Ok(api
        .patch(
            &obj.name_any(),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(patch),
        )
        .await?)
}

/// Removes `finalizer` from `obj`, guarded by its resourceVersion like [`add_finalizer`].
pub async fn remove_finalizer<K>(api: &kube::Api<K>, obj: &K, finalizer: &str) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    use kube::ResourceExt;
    let finalizers: Vec<String> = obj.finalizers().iter().filter(|f| *f != finalizer).cloned().collect();
    let patch = serde_json::json!({"metadata": {"finalizers": finalizers, "resourceVersion": obj.resource_version()}});
    match api
        .patch(
            &obj.name_any(),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        // Already gone: the finalizer was the last thing holding it.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Marks readiness check `check` passing once `store` has synced.
pub async fn report_when_synced<K>(
    store: kube::runtime::reflector::Store<K>,
    health: std::sync::Arc<crate::runtime::health::Health>,
    check: &'static str,
) where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    if synced(&store).await {
        health.set(crate::runtime::health::Probe::Readiness, check, Ok(()));
    }
}

/// Waits until `store` has its first list; false when it never will (its writer is gone).
pub async fn synced<K>(store: &kube::runtime::reflector::Store<K>) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    // The store wakes only one of several waiters when it becomes ready (the controller
    // itself is another), so ask again until it answers.
    loop {
        match tokio::time::timeout(std::time::Duration::from_millis(250), store.wait_until_ready()).await {
            Ok(Ok(())) => return true,
            Ok(Err(_)) => return false,
            Err(_) => {}
        }
    }
}

/// A controller whose loop ended while the process is not shutting down no longer makes
/// progress: /healthz fails so that the kubelet restarts the process.
pub fn report_stopped(
    health: &crate::runtime::health::Health,
    check: &'static str,
    shutdown: &crate::runtime::shutdown::Shutdown,
) {
    if !shutdown.is_triggered() {
        tracing::error!(controller = check, "controller stopped unexpectedly");
        health.set(
            crate::runtime::health::Probe::Liveness,
            check,
            Err("the controller stopped unexpectedly".into()),
        );
    }
}

/// Drives a controller's `run` future until it ends, or until `stop` resolves. Once stopped, a
/// controller whose cache has synced drains its in-flight reconciles (kube's graceful
/// shutdown); one that never synced has nothing in flight, and kube's runner would wait for a
/// sync that can no longer come, so it is dropped at once.
pub async fn drive<K>(
    run: impl std::future::Future<Output = ()>,
    store: kube::runtime::reflector::Store<K>,
    stop: impl std::future::Future<Output = ()>,
) where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    tokio::pin!(run);
    tokio::select! {
        _ = &mut run => return,
        _ = stop => {}
    }
    let synced = matches!(
        tokio::time::timeout(std::time::Duration::from_millis(50), store.wait_until_ready()).await,
        Ok(Ok(()))
    );
    if synced {
        run.await;
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
        for reason in Error::REASONS {
            metrics.reconcile_errors_total.with_label_values(&[controller, reason]);
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn transient_errors_back_off_per_object_and_permanent_ones_wait_for_a_change() {
        use std::time::Duration;
        assert_eq!(
            [1, 2, 3, 9, 10, 40].map(backoff_delay),
            [1, 2, 4, 256, 300, 300].map(Duration::from_secs)
        );
        struct Ctx(Backoff);
        impl Retries for Ctx {
            fn backoff(&self) -> &Backoff {
                &self.0
            }
        }
        let ctx = std::sync::Arc::new(Ctx(Backoff::default()));
        let object = |uid: &str| {
            std::sync::Arc::new(k8s_openapi::api::core::v1::ConfigMap {
                metadata: ObjectMeta {
                    uid: Some(uid.into()),
                    ..Default::default()
                },
                ..Default::default()
            })
        };
        let transient = Error::CueUnavailable("cue is not there".into());
        let policy = |uid: &str, e: &Error| format!("{:?}", error_policy(object(uid), e, ctx.clone()));
        let after = |secs: u64| {
            format!(
                "{:?}",
                kube::runtime::controller::Action::requeue(Duration::from_secs(secs))
            )
        };
        assert_eq!(policy("a", &transient), after(1));
        assert_eq!(policy("a", &transient), after(2));
        assert_eq!(policy("b", &transient), after(1), "each object backs off on its own");
        succeeded(&*ctx, &object("a").metadata);
        assert_eq!(policy("a", &transient), after(1), "a success starts over");
        assert_eq!(
            policy("a", &Error::MissingField("metadata.uid")),
            format!("{:?}", kube::runtime::controller::Action::await_change())
        );
    }

    use super::*;

    #[test]
    fn every_error_reason_is_listed_for_metric_initialization() {
        let conflict = kube::Error::Api(Box::new(kube::core::Status {
            code: 409,
            ..Default::default()
        }));
        let errors = [
            Error::Kube(conflict),
            Error::Kube(kube::Error::LinesCodecMaxLineLengthExceeded),
            Error::Serialization(serde_json::from_str::<u8>("x").unwrap_err()),
            Error::MissingField("metadata.uid"),
            Error::CueUnavailable("no cue".into()),
        ];
        let reasons: Vec<&str> = errors.iter().map(Error::reason).collect();
        assert_eq!(reasons, Error::REASONS);
    }

    #[test]
    fn a_controller_stopping_outside_shutdown_fails_liveness() {
        use crate::runtime::health::{Health, Probe};
        let health = Health::new();
        let shutdown = crate::runtime::shutdown::Shutdown::new();
        health.set(Probe::Liveness, "transform-controller", Ok(()));

        shutdown.trigger();
        report_stopped(&health, "transform-controller", &shutdown);
        assert!(
            health.report(Probe::Liveness).ok,
            "stopping during shutdown is expected"
        );

        let running = crate::runtime::shutdown::Shutdown::new();
        report_stopped(&health, "transform-controller", &running);
        let report = health.report(Probe::Liveness);
        assert!(!report.ok);
        assert!(
            report
                .body
                .contains("transform-controller failed: the controller stopped unexpectedly")
        );
    }
}
