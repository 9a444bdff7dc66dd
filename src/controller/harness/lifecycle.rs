//! A controller's life: its workers, readiness, liveness and shutdown.

use super::backoff::{Reported, Retries, error_policy};
use super::error::Error;
use super::metrics::measured;
use crate::metrics::Metrics;
use crate::runtime::health::{Health, Probe};
use crate::runtime::shutdown::Shutdown;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;

/// How many reconciles of a controller run at once. kube's runner hands over up to
/// [`WAITING_WINDOW`] more reconciles than there are workers; they wait here, so that the wait
/// can be measured (`pequod_reconcile_queue_depth`, `pequod_reconcile_queue_oldest_wait_seconds`).
/// Reconciles beyond the window stay in kube's scheduler, which holds any number of them
/// cheaply: its runner looks at every reconcile it has handed over each time one makes
/// progress, so handing over all of them (thousands after a burst) made each step cost as many
/// polls as there were waiting reconciles. kube still runs one reconcile per object at a time
/// and merges triggers of an object that waits or runs.
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
    pub(super) async fn acquire(&self) -> Option<Option<tokio::sync::OwnedSemaphorePermit>> {
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

/// How many due reconciles wait for a worker in the controller, at most; the queue metrics
/// count them.
pub const WAITING_WINDOW: u16 = 64;

/// kube's runner configuration for a controller that runs `concurrency` reconciles at once
/// through `workers`.
pub fn runner_config(
    workers: &Workers,
    concurrency: u16,
    shutdown: &crate::runtime::shutdown::Shutdown,
) -> kube::runtime::controller::Config {
    workers.limit(concurrency.into(), shutdown.clone());
    kube::runtime::controller::Config::default().concurrency(concurrency.saturating_add(WAITING_WINDOW))
}

/// A short random id for the reconcile span, so that all lines of one reconcile can be found.
pub fn reconcile_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:x}-{n}", std::process::id())
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

/// Runs `controller` until shutdown under readiness and liveness check `check`: ready once its
/// cache synced, failing liveness should its loop end outside shutdown. Failed reconciles go
/// through [`error_policy`].
pub async fn run_controller<K, C, F>(
    controller: kube::runtime::Controller<K>,
    reconcile: impl FnMut(std::sync::Arc<K>, std::sync::Arc<C>) -> F,
    ctx: std::sync::Arc<C>,
    check: &'static str,
    health: std::sync::Arc<Health>,
    shutdown: Shutdown,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + std::fmt::Debug + Unpin + Send + Sync + 'static,
    C: Reported<Object = K>,
    F: std::future::Future<Output = Result<kube::runtime::controller::Action, Error>> + Send + 'static,
{
    use futures::StreamExt;
    let store = controller.store();
    health.register(Probe::Readiness, check, "cache not synced yet");
    health.set(Probe::Liveness, check, Ok(()));
    tokio::spawn(report_when_synced(store.clone(), health.clone(), check));
    let run = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    drive(run, store, shutdown.clone().wait_owned()).await;
    health.set(Probe::Readiness, check, Err("stopped".into()));
    report_stopped(&health, check, &shutdown);
}

/// Runs one reconcile of `obj` through [`measured`], inside a span that names the controller,
/// the object and the reconcile, so that all lines of one reconcile can be found.
pub async fn reconciled<K, C, F>(
    metrics: &Metrics,
    controller: &'static str,
    (ctx, obj): (&C, &K),
    reconcile: impl FnOnce() -> F,
) -> Result<kube::runtime::controller::Action, Error>
where
    K: kube::Resource,
    C: Retries,
    F: std::future::Future<Output = Result<kube::runtime::controller::Action, Error>>,
{
    use kube::ResourceExt;
    let span = tracing::info_span!(
        "reconcile",
        controller,
        namespace = obj.namespace().unwrap_or_default(),
        name = obj.name_any(),
        reconcile_id = reconcile_id()
    );
    measured(metrics, controller, span, (ctx, obj.meta()), reconcile).await
}

/// Where a reconcile stands with the shard of its object when objects are shared among
/// replicas (`--shards`).
pub enum ShardEntry<'a> {
    /// Go on; the shard is not handed over while the guard lives (None: not sharing).
    Entered(Option<tokio::sync::RwLockReadGuard<'a, bool>>),
    /// Another replica holds the shard: the object is its.
    Elsewhere,
}

/// Enters the shard of `namespace/name`; a shard held here but fenced fails with `ShardLost`,
/// so that the object's retries survive a late renewal.
pub async fn enter_shard<'a>(
    shards: Option<&'a crate::runtime::shards::Shards>,
    namespace: &str,
    name: &str,
) -> Result<ShardEntry<'a>, Error> {
    let Some(shards) = shards else {
        return Ok(ShardEntry::Entered(None));
    };
    match shards.enter(namespace, name).await {
        Some(held) => Ok(ShardEntry::Entered(Some(held))),
        None if shards.fenced(namespace, name) => Err(Error::ShardLost),
        None => Ok(ShardEntry::Elsewhere),
    }
}

/// The objects a watch brings, as a controller's triggers: those of a list (the first, or one
/// again after the watch fell behind) only once the list is complete. The store a controller
/// reads takes a list's objects only then, and kube drops a reconcile of an object its store
/// does not hold: triggered earlier, an object this list brings for the first time would never
/// be reconciled.
pub fn applied_once_listed<K>(
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    store: Store<K>,
    dyntype: K::DynamicType,
) -> impl futures::Stream<Item = Result<K, watcher::Error>>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    use futures::StreamExt;
    events
        .scan(Vec::<ObjectRef<K>>::new(), move |listed, event| {
            let now: Vec<Result<K, watcher::Error>> = match event {
                Ok(watcher::Event::Apply(obj)) => vec![Ok(obj)],
                Ok(watcher::Event::InitApply(obj)) => {
                    listed.push(ObjectRef::from_obj_with(&obj, dyntype.clone()));
                    Vec::new()
                }
                Ok(watcher::Event::Init) => {
                    listed.clear();
                    Vec::new()
                }
                Ok(watcher::Event::InitDone) => {
                    let (refs, store) = (std::mem::take(listed), store.clone());
                    return futures::future::ready(Some(
                        futures::stream::iter(
                            refs.into_iter()
                                .filter_map(move |r| store.get(&r).map(|o| Ok((*o).clone()))),
                        )
                        .left_stream(),
                    ));
                }
                Ok(watcher::Event::Delete(_)) => Vec::new(),
                Err(e) => vec![Err(e)],
            };
            futures::future::ready(Some(futures::stream::iter(now).right_stream()))
        })
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::WatchStreamExt;

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

    fn cm(name: &str) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some(name.into());
        cm.metadata.namespace = Some("ns".into());
        cm
    }

    #[tokio::test]
    async fn a_list_s_objects_trigger_once_the_store_holds_them() {
        let writer = kube::runtime::reflector::store::Writer::<ConfigMap>::default();
        let store = writer.as_reader();
        let events = futures::stream::iter([
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(cm("a"))),
            Ok(watcher::Event::InitApply(cm("b"))),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(cm("c"))),
            Ok(watcher::Event::Delete(cm("a"))),
        ]);
        let seen = store.clone();
        let triggered: Vec<(String, usize)> = applied_once_listed(events.reflect(writer), store, ())
            .map(|o| {
                let name = o.unwrap().metadata.name.unwrap();
                // Each object is in the store when it triggers.
                let held = seen.get(&ObjectRef::new(&name).within("ns")).map_or(0, |_| 1);
                (name, held)
            })
            .collect()
            .await;
        assert_eq!(
            triggered,
            vec![("a".to_string(), 1), ("b".to_string(), 1), ("c".to_string(), 1)]
        );
    }
}
