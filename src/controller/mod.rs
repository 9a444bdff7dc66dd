//! Controllers: the kube-facing loops around the pure core.

pub mod access;
pub mod fleet_plan;
pub mod instance;
pub mod resourcegraph;
pub mod rollout_driver;
pub mod transform;
pub mod watches;

use std::time::Instant;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use crate::api::{Condition, ConditionStatus, has_condition, set_condition};

use crate::error::ErrorCategory;
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

/// A controller context that keeps its objects' [`Backoff`] and its [`Workers`].
pub trait Retries {
    fn backoff(&self) -> &Backoff;
    fn workers(&self) -> &Workers;
}

/// How many reconciles of a controller run at once. kube's runner starts every reconcile that
/// is due (its concurrency is left unlimited); the surplus waits here, so that the wait can be
/// measured (`pequod_reconcile_queue_depth`, `pequod_reconcile_queue_oldest_wait_seconds`).
/// kube still runs one reconcile per object at a time and merges triggers of an object that
/// waits or runs.
#[derive(Default)]
pub struct Workers {
    gate: std::sync::OnceLock<(
        std::sync::Arc<tokio::sync::Semaphore>,
        crate::runtime::shutdown::Shutdown,
    )>,
}

impl Workers {
    /// Sets the limit when the controller starts; a later call changes nothing. Reconciles
    /// still waiting at shutdown are dropped rather than started.
    pub fn limit(&self, concurrency: usize, shutdown: crate::runtime::shutdown::Shutdown) {
        let _ = self.gate.set((
            std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency.max(1))),
            shutdown,
        ));
    }

    /// Waits for a free worker (first come, first served). None when shutdown came first.
    async fn acquire(&self) -> Option<Option<tokio::sync::OwnedSemaphorePermit>> {
        let Some((gate, shutdown)) = self.gate.get() else {
            return Some(None);
        };
        tokio::select! {
            biased;
            permit = gate.clone().acquire_owned() => permit.ok().map(Some),
            _ = shutdown.wait() => None,
        }
    }
}

/// kube's runner configuration for a controller that runs `concurrency` reconciles at once
/// through `workers`.
pub fn runner_config(
    workers: &Workers,
    concurrency: u16,
    shutdown: &crate::runtime::shutdown::Shutdown,
) -> kube::runtime::controller::Config {
    workers.limit(concurrency.into(), shutdown.clone());
    kube::runtime::controller::Config::default().concurrency(0)
}

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
fn note_status(conditions: &[Condition]) {
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
        let queued = metrics.queued(controller);
        let waited = Instant::now();
        let Some(_permit) = ctx.workers().acquire().await else {
            // Shutting down: the next leader (or the next start) lists the object again.
            return Ok(kube::runtime::controller::Action::await_change());
        };
        drop(queued);
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

/// A status whose conditions tell whether a reconcile ended in a failure.
pub trait StatusConditions {
    fn status_conditions(&self) -> &[Condition];
}

impl StatusConditions for crate::api::ResourceGraphStatus {
    fn status_conditions(&self) -> &[Condition] {
        &self.conditions
    }
}

impl<S: Clone + Default + PartialEq + serde::Serialize + StatusConditions> StatusMemory<S> {
    /// Applies `new` as the status of `obj` (`type_meta`: its apiVersion and kind) with field
    /// manager `manager`, unless it equals `old`, and remembers it. Whether it ends in a
    /// failure is noted for the reconcile metrics, written or not.
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
        note_status(new.status_conditions());
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

        impl StatusConditions for $status {
            fn status_conditions(&self) -> &[Condition] {
                &self.conditions
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

    #[test]
    fn transient_errors_back_off_per_object_and_permanent_ones_wait_for_a_change() {
        use std::time::Duration;
        assert_eq!(
            [1, 2, 3, 9, 10, 40].map(backoff_delay),
            [1, 2, 4, 256, 300, 300].map(Duration::from_secs)
        );
        struct Ctx(Backoff, Workers);
        impl Retries for Ctx {
            fn backoff(&self) -> &Backoff {
                &self.0
            }
            fn workers(&self) -> &Workers {
                &self.1
            }
        }
        let ctx = std::sync::Arc::new(Ctx(Backoff::default(), Workers::default()));
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
        let result = measured(metrics, "instance", span, (ctx, &meta), async move {
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
                    async move {
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
