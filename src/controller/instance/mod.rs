//! Platform instances: one controller per generated kind renders each instance through its
//! module into a ResourceGraph and reports the graph's progress back on the instance.
//!
//! The [`Supervisor`] starts a kind's controller when its Transform becomes Ready, swaps the
//! module when the Transform's content changes (re-rendering every instance), and stops the
//! controller when the Transform is deleted, so that nothing outlives its Transform.

use crate::api::condition_types::{READY, RENDERED};
use crate::api::names::{
    INSTANCE_FINALIZER, INSTANCE_MANAGER, PIN_ANNOTATION, PREDECESSOR_ANNOTATION, PROOF_ANNOTATION,
    RECONCILE_REQUEST_ANNOTATION,
};
use crate::api::reasons;
use crate::error::ErrorCategory;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::{Notify, mpsc, watch};
use tracing::info_span;

mod status;

use super::fleet_plan::instance_key;
use super::harness::{Error, StatusDraft, StatusMemory, reconcile_id};
use super::rollout_driver::{Driver, RolloutOrder, SelectionCell};
use super::serving::Publisher;
use super::watches::{GraphCache, Lookup, ObjectWatches};
use crate::api::{InstanceStatus, MAX_STATUS_VIOLATIONS, ResourceGraph, Severity};
use crate::apply::Applier;
use crate::cue::{Module, Renderer, input_hash, render_input};
use crate::executor::object::Predecessor;
use crate::executor::proof::{Allowance, Grant, GraphKey};
use crate::instance_graph::{
    InstanceRef, graph_name, legacy_graph_name, node_summaries, render_hash, resource_graph, with_module_gates,
};
use crate::metrics::Metrics;
use crate::rollout::{Selection, Wanted, choose};
use crate::runtime::shards::Shards;
use crate::runtime::shutdown::Shutdown;
use status::{Controls, Draft, InstanceStop};

const CONTROLLER: &str = "instance";
/// Reconciles of one kind in flight: enough for a full render batch to form, so that many
/// instances changing at once (a module update) share few cue calls.
const CONCURRENCY: u16 = 200;
/// Safety resync; graph progress arrives through the ResourceGraph watch.
const RESYNC: Duration = Duration::from_secs(600);
/// How long a new instance's first status waits for its graph's first report, counted from the
/// graph's creation.
const FIRST_REPORT_BOUND: Duration = Duration::from_secs(300);
/// Bound on waiting for a deleted instance's graph to be torn down without any event.
const TEARDOWN_POLL: Duration = Duration::from_secs(30);

/// Names a Transform.
pub type TransformKey = crate::api::NamespacedName;

/// A kind to serve and how.
#[derive(Debug, Clone)]
pub struct ServeSpec {
    pub transform: TransformKey,
    pub resource: ApiResource,
    /// The module version the Transform loaded and how it reaches the instances.
    pub order: RolloutOrder,
    /// Serve only this namespace (Transforms with `rbacScope: Namespace`).
    pub namespace: Option<String>,
}

/// What a kind's reconciles read besides the module selection: what its Transform grants.
#[derive(Clone)]
struct KindState {
    allowance: Allowance,
    transform: TransformKey,
    transform_uid: String,
    /// The module versions the Transform has served.
    served: Vec<String>,
}

/// A kind as the leader published it for every replica (with `--shards`): served here for
/// the instances of the shards this replica holds.
#[derive(Debug, Clone)]
pub struct Followed {
    pub transform: TransformKey,
    pub transform_uid: String,
    pub resource: ApiResource,
    pub namespace: Option<String>,
    pub allowance: Allowance,
    pub served: Vec<String>,
    pub selection: Selection,
}

impl KindState {
    fn followed(f: &Followed) -> Self {
        Self {
            allowance: f.allowance,
            transform: f.transform.clone(),
            transform_uid: f.transform_uid.clone(),
            served: f.served.clone(),
        }
    }

    fn of(spec: &ServeSpec) -> Self {
        Self {
            allowance: spec.order.allowance,
            transform: spec.transform.clone(),
            transform_uid: spec.order.transform.uid().unwrap_or_default(),
            served: spec.order.served.clone(),
        }
    }
}

/// Shared by every kind's controller.
pub struct Shared {
    pub client: Client,
    pub renderer: Renderer,
    pub applier: Applier,
    /// Signs the graphs this controller writes (see [`crate::executor::proof`]).
    pub key: GraphKey,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// The executor's object caches: rollout plans read live objects from them.
    pub watches: Option<Arc<ObjectWatches>>,
    /// The graph cache: instances read their graphs from it and are woken by its changes.
    pub graphs: Arc<GraphCache>,
    /// The shards this replica holds, when instances are shared among replicas: an instance
    /// belongs to the shard of its graph.
    pub shards: Option<Arc<Shards>>,
    written: StatusMemory<InstanceStatus>,
}

impl Shared {
    pub fn new(
        client: Client,
        renderer: Renderer,
        applier: Applier,
        key: GraphKey,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        graphs: Arc<GraphCache>,
    ) -> Self {
        Self {
            client,
            renderer,
            applier,
            key,
            recorder,
            metrics,
            watches: None,
            graphs,
            shards: None,
            written: StatusMemory::default(),
        }
    }

    /// Lets rollout plans read live objects from the executor's caches.
    pub fn with_object_watches(mut self, watches: Arc<ObjectWatches>) -> Self {
        self.watches = Some(watches);
        self
    }

    /// Serves only the instances of the shards this replica holds.
    pub fn sharing(mut self, shards: Arc<Shards>) -> Self {
        self.shards = Some(shards);
        self
    }
}

struct Running {
    resource: ApiResource,
    namespace: Option<String>,
    state: Arc<RwLock<KindState>>,
    selection: SelectionCell,
    /// None for a kind served as the leader published it.
    orders: Option<watch::Sender<RolloutOrder>>,
    rerender: mpsc::UnboundedSender<()>,
    nudge: mpsc::UnboundedSender<ObjectRef<DynamicObject>>,
    stop: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

/// Starts and stops the controllers of generated kinds. Cheap to clone.
///
/// Alone, a replica runs for each kind its instance controller and its rollout driver. When
/// replicas share the instances (`--shards`), the leader's supervisor runs only the rollout
/// drivers and publishes what they decide ([`Publisher`]); every replica's supervisor serves
/// the kinds as published ([`Supervisor::follow`]) for the instances of its shards.
#[derive(Clone)]
pub struct Supervisor {
    shared: Arc<Shared>,
    shutdown: Shutdown,
    running: Arc<tokio::sync::Mutex<HashMap<TransformKey, Running>>>,
    publisher: Option<Arc<Publisher>>,
}

impl Supervisor {
    pub fn new(shared: Arc<Shared>, shutdown: Shutdown) -> Self {
        Self {
            shared,
            shutdown,
            running: Arc::default(),
            publisher: None,
        }
    }

    /// Runs only the kinds' rollouts, publishing what they decide for every replica.
    pub fn publishing(mut self, publisher: Arc<Publisher>) -> Self {
        self.publisher = Some(publisher);
        self
    }

    /// Serves `spec.resource` for its Transform: starts its controller, or updates the module
    /// of a running one (every instance then renders again).
    pub async fn serve(&self, spec: ServeSpec) {
        let mut running = self.running.lock().await;
        if let Some(r) = running.get(&spec.transform)
            && r.resource == spec.resource
            && r.namespace == spec.namespace
        {
            update_running(r, spec);
            return;
        }
        if let Some(old) = running.remove(&spec.transform) {
            self.stop_running(old).await;
        }
        tracing::info!(kind = %spec.resource.kind, api_version = %spec.resource.api_version, transform = %spec.transform, "serving kind");
        let transform = spec.transform.clone();
        let state = KindState::of(&spec);
        // Until the driver has looked, every instance keeps the version its graph has.
        let selection = Selection::hold(spec.order.target.clone(), None);
        let (orders, orders_rx) = watch::channel(spec.order);
        let started = self.start(
            (spec.resource, spec.namespace),
            state,
            selection,
            Some((orders, orders_rx)),
        );
        running.insert(transform, started);
    }

    /// Serves a kind as the leader published it, or updates it: a changed allowance renders
    /// every instance again, a changed selection the instances it moves.
    pub async fn follow(&self, f: Followed) {
        let mut running = self.running.lock().await;
        if let Some(r) = running.get(&f.transform)
            && r.resource == f.resource
            && r.namespace == f.namespace
        {
            follow_running(r, &f);
            return;
        }
        if let Some(old) = running.remove(&f.transform) {
            self.stop_running(old).await;
        }
        tracing::info!(kind = %f.resource.kind, api_version = %f.resource.api_version, transform = %f.transform, "serving kind as published");
        let state = KindState::followed(&f);
        let started = self.start((f.resource, f.namespace), state, f.selection, None);
        running.insert(f.transform, started);
    }

    /// Starts every kind's controller again, after the shards held changed: the instances of
    /// the shards taken are listed, those of the shards given up forgotten.
    pub async fn restart_all(&self) {
        let mut running = self.running.lock().await;
        let keys: Vec<TransformKey> = running.keys().cloned().collect();
        for key in keys {
            let Some(old) = running.remove(&key) else { continue };
            let state = old.state.read().unwrap_or_else(|p| p.into_inner()).clone();
            let selection = (*old.selection.read().unwrap_or_else(|p| p.into_inner()).clone()).clone();
            let place = (old.resource.clone(), old.namespace.clone());
            self.stop_running(old).await;
            running.insert(key, self.start(place, state, selection, None));
        }
    }

    /// Starts a kind's instance controller and, given orders, its rollout driver; with a
    /// publisher, only the rollout driver.
    fn start(
        &self,
        (resource, namespace): (ApiResource, Option<String>),
        state: KindState,
        selection: Selection,
        orders: Option<(watch::Sender<RolloutOrder>, watch::Receiver<RolloutOrder>)>,
    ) -> Running {
        let state = Arc::new(RwLock::new(state));
        let selection: SelectionCell = Arc::new(RwLock::new(Arc::new(selection)));
        let (rerender, rerender_rx) = mpsc::unbounded_channel();
        let (nudge, nudged) = mpsc::unbounded_channel();
        let stop = Shutdown::new();
        let ctx = Arc::new(KindContext {
            shared: self.shared.clone(),
            state: state.clone(),
            selection: selection.clone(),
            changed: Arc::default(),
            resource: resource.clone(),
            backoff: super::harness::Backoff::default(),
            workers: super::harness::Workers::default(),
        });
        let (orders, orders_rx) = orders.unzip();
        let stops = (stop.clone(), self.shutdown.clone());
        let task = match (orders_rx, &self.publisher) {
            (Some(orders), Some(publisher)) => {
                tokio::spawn(run_rollout(ctx, namespace.clone(), orders, publisher.clone(), stops))
            }
            (orders, _) => tokio::spawn(run_kind(
                ctx,
                namespace.clone(),
                (rerender.clone(), rerender_rx),
                (nudge.clone(), nudged),
                orders,
                stops,
            )),
        };
        Running {
            resource,
            namespace,
            state,
            selection,
            orders,
            rerender,
            nudge,
            stop,
            task,
        }
    }

    /// Whether a Transform's kind is being served.
    pub async fn serves(&self, transform: &TransformKey) -> bool {
        self.running.lock().await.contains_key(transform)
    }

    /// Stops serving a Transform's kind; returns when its controller has finished (and every
    /// replica was told, with a publisher).
    pub async fn stop(&self, transform: &TransformKey) -> Result<(), kube::Error> {
        let removed = self.running.lock().await.remove(transform);
        if let Some(r) = removed {
            tracing::info!(kind = %r.resource.kind, %transform, "no longer serving kind");
            self.stop_running(r).await;
        }
        self.withdraw(transform).await
    }

    /// Stops serving a kind whatever Transform served it (after the kind was renamed).
    pub async fn stop_kind(&self, api_version: &str, kind: &str) -> Result<(), kube::Error> {
        let mut running = self.running.lock().await;
        let keys: Vec<TransformKey> = running
            .iter()
            .filter(|(_, r)| r.resource.api_version == api_version && r.resource.kind == kind)
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            if let Some(r) = running.remove(&key) {
                self.stop_running(r).await;
                self.withdraw(&key).await?;
            }
        }
        Ok(())
    }

    async fn stop_running(&self, r: Running) {
        r.stop.trigger();
        if let Err(e) = r.task.await {
            tracing::warn!(error = %e, kind = %r.resource.kind, "kind controller ended abnormally");
        }
    }

    /// Tells every replica to stop serving the Transform's kind (with a publisher).
    async fn withdraw(&self, transform: &TransformKey) -> Result<(), kube::Error> {
        match &self.publisher {
            Some(publisher) => publisher.withdraw(transform).await,
            None => Ok(()),
        }
    }
}

struct KindContext {
    shared: Arc<Shared>,
    state: Arc<RwLock<KindState>>,
    /// Which module version each instance renders with (the rollout driver decides).
    selection: SelectionCell,
    /// Tells the rollout driver that an instance was reconciled.
    changed: Arc<Notify>,
    resource: ApiResource,
    backoff: super::harness::Backoff,
    workers: super::harness::Workers,
}

super::harness::backoff::controller_context!(KindContext);

impl super::harness::backoff::Reported for KindContext {
    type Object = DynamicObject;
    fn recorder(&self) -> &kube::runtime::events::Recorder {
        &self.shared.recorder
    }
    fn dyntype(&self) -> ApiResource {
        self.resource.clone()
    }
}

impl KindContext {
    /// Sharing the instances: writes stop once this replica's shard Leases went unrenewed
    /// for a renew deadline (another replica may take them over).
    fn may_write(&self) -> Result<(), Error> {
        match &self.shared.shards {
            Some(shards) if !shards.fence().open() => Err(Error::ShardLost),
            _ => Ok(()),
        }
    }

    /// Whether the graph cache holds graph `name` of `namespace` when it exists.
    fn caches_graph(&self, namespace: &str, name: &str) -> bool {
        self.shared.shards.as_ref().is_none_or(|s| s.holds(namespace, name))
    }

    fn current(&self) -> (Arc<Selection>, KindState) {
        let selection = self.selection.read().unwrap_or_else(|p| p.into_inner()).clone();
        let state = self.state.read().unwrap_or_else(|p| p.into_inner()).clone();
        (selection, state)
    }
}

impl Running {
    /// Replaces what the kind's Transform grants; a changed allowance (or a Transform made
    /// again) renders every instance again.
    fn grant(&self, new: KindState) {
        let changed = {
            let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
            let changed = state.allowance != new.allowance || state.transform_uid != new.transform_uid;
            *state = new;
            changed
        };
        if changed {
            tracing::info!(kind = %self.resource.kind, "allowance changed; rendering every instance again");
            let _ = self.rerender.send(());
        }
    }
}

/// Updates a running kind's controller in place: a changed allowance renders every instance
/// again, and the rollout driver moves instances to a new module version.
fn update_running(r: &Running, spec: ServeSpec) {
    r.grant(KindState::of(&spec));
    // The rollout driver moves instances to a new module version (and, with a publisher,
    // publishes what changed).
    if let Some(orders) = &r.orders {
        orders.send_if_modified(|order| {
            let modified = order.target != spec.order.target
                || order.policy != spec.order.policy
                || order.transform.annotations() != spec.order.transform.annotations()
                || order.allowance != spec.order.allowance
                || order.served != spec.order.served
                || order.transform.uid() != spec.order.transform.uid();
            *order = spec.order;
            modified
        });
    }
}

/// Updates a kind served as published: a changed allowance renders every instance again, a
/// changed selection the instances whose version it changes.
fn follow_running(r: &Running, f: &Followed) {
    r.grant(KindState::followed(f));
    let old = {
        let mut cell = r.selection.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *cell, Arc::new(f.selection.clone()))
    };
    nudge_affected(&old, &f.selection, &r.resource, (&r.nudge, &r.rerender));
}

/// Looks again at the instances whose version or pending line differs between two selections.
pub(super) fn nudge_affected(
    old: &Selection,
    new: &Selection,
    resource: &ApiResource,
    (nudge, nudge_all): (
        &mpsc::UnboundedSender<ObjectRef<DynamicObject>>,
        &mpsc::UnboundedSender<()>,
    ),
) {
    match crate::rollout::affected(old, new) {
        crate::rollout::Affected::None => {}
        crate::rollout::Affected::All => {
            let _ = nudge_all.send(());
        }
        crate::rollout::Affected::Some(keys) => {
            for key in keys {
                let reference = ObjectRef::new_with(&key.name, resource.clone()).within(&key.namespace);
                let _ = nudge.send(reference);
            }
        }
    }
}

type Nudges = (
    mpsc::UnboundedSender<ObjectRef<DynamicObject>>,
    mpsc::UnboundedReceiver<ObjectRef<DynamicObject>>,
);

/// A kind's instance controller, with its rollout driver when given orders.
async fn run_kind(
    ctx: Arc<KindContext>,
    namespace: Option<String>,
    (rerender_tx, rerender): (mpsc::UnboundedSender<()>, mpsc::UnboundedReceiver<()>),
    (nudge, nudged): Nudges,
    orders: Option<watch::Receiver<RolloutOrder>>,
    (stop, shutdown): (Shutdown, Shutdown),
) {
    let resource = ctx.resource.clone();
    let writer = kube::runtime::reflector::store::Writer::new(resource.clone());
    let store = writer.as_reader();
    let shards = ctx.shared.shards.clone();
    let listed = watcher(instances_api(&ctx, namespace.as_deref()), watcher::Config::default())
        .default_backoff()
        .modify(super::cache::packed_instance)
        // Sharing the instances: only those of the shards held are cached and reconciled here.
        .filter(move |event| futures::future::ready(in_held_shards(event, shards.as_deref(), &resource)))
        .reflect(writer);
    let resource = ctx.resource.clone();
    let listed = super::harness::applied_once_listed(listed, store.clone(), resource.clone());
    let controller = Controller::for_stream_with(listed, store.clone(), resource.clone());
    let driver = orders.map(|orders| {
        let driver = Driver::of(
            &ctx,
            namespace.clone(),
            store.clone(),
            orders,
            (nudge, rerender_tx),
            None,
        );
        tokio::spawn(driver.run(kind_stopped(&stop, &shutdown)))
    });
    // Graph changes wake their instance through the graph cache, once it holds them.
    let woken = ctx.shared.graphs.subscribe(&resource);
    let run = controller
        .reconcile_on(futures::stream::unfold(woken, |mut rx| async move {
            rx.recv().await.map(|instance| (instance, rx))
        }))
        .with_config(super::harness::runner_config(&ctx.workers, CONCURRENCY, &shutdown))
        .reconcile_all_on(futures::stream::unfold(rerender, |mut rx| async move {
            rx.recv().await.map(|()| ((), rx))
        }))
        .reconcile_on(futures::stream::unfold(nudged, |mut rx| async move {
            rx.recv().await.map(|reference| (reference, rx))
        }))
        .graceful_shutdown_on(kind_stopped(&stop, &shutdown))
        .run(reconcile, super::harness::error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    super::harness::drive(run, store, kind_stopped(&stop, &shutdown)).await;
    if let Some(driver) = driver {
        let _ = driver.await;
    }
}

/// A kind's rollout driver alone, on the leader of replicas sharing the instances: it reads
/// every instance's rollout fields from a watch of its own and publishes what it decides.
async fn run_rollout(
    ctx: Arc<KindContext>,
    namespace: Option<String>,
    orders: watch::Receiver<RolloutOrder>,
    publisher: Arc<Publisher>,
    (stop, shutdown): (Shutdown, Shutdown),
) {
    let writer = kube::runtime::reflector::store::Writer::new(ctx.resource.clone());
    let store = writer.as_reader();
    let changed = ctx.changed.clone();
    let listed = watcher(instances_api(&ctx, namespace.as_deref()), watcher::Config::default())
        .default_backoff()
        .modify(super::cache::rollout_projection)
        .reflect(writer)
        .applied_objects()
        .for_each(move |_| {
            changed.notify_one();
            futures::future::ready(())
        });
    // Nobody here reconciles instances: the replicas learn the selection from what is published.
    let (nudge, _) = mpsc::unbounded_channel();
    let (nudge_all, _) = mpsc::unbounded_channel();
    let driver = Driver::of(&ctx, namespace, store, orders, (nudge, nudge_all), Some(publisher));
    tokio::select! {
        () = listed => {}
        () = driver.run(kind_stopped(&stop, &shutdown)) => {}
    }
}

fn instances_api(ctx: &KindContext, namespace: Option<&str>) -> Api<DynamicObject> {
    kind_api(&ctx.shared.client, &ctx.resource, namespace)
}

/// The instances of `resource`, of `namespace` only when given.
pub(super) fn kind_api(client: &Client, resource: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
        None => Api::all_with(client.clone(), resource),
    }
}

/// Whether a watch event concerns this replica: every event when instances are not shared,
/// else those of instances whose graph is in a shard it holds (and the list's markers).
fn in_held_shards(
    event: &Result<watcher::Event<DynamicObject>, watcher::Error>,
    shards: Option<&Shards>,
    resource: &ApiResource,
) -> bool {
    let (Some(shards), Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj) | watcher::Event::Delete(obj))) =
        (shards, event)
    else {
        return true;
    };
    let graph = graph_name(&resource.kind, &resource.group, &obj.name_any());
    shards.holds(&obj.namespace().unwrap_or_default(), &graph)
}

impl Driver {
    fn of(
        ctx: &KindContext,
        namespace: Option<String>,
        store: kube::runtime::reflector::Store<DynamicObject>,
        orders: watch::Receiver<RolloutOrder>,
        (nudge, nudge_all): (
            mpsc::UnboundedSender<ObjectRef<DynamicObject>>,
            mpsc::UnboundedSender<()>,
        ),
        publisher: Option<Arc<Publisher>>,
    ) -> Self {
        Driver {
            client: ctx.shared.client.clone(),
            renderer: ctx.shared.renderer.clone(),
            applier: ctx.shared.applier.clone(),
            recorder: ctx.shared.recorder.clone(),
            metrics: ctx.shared.metrics.clone(),
            watches: ctx.shared.watches.clone(),
            resource: ctx.resource.clone(),
            namespace,
            store,
            selection: ctx.selection.clone(),
            orders,
            changed: ctx.changed.clone(),
            nudge,
            nudge_all,
            written: Default::default(),
            publisher,
        }
    }
}

/// Resolves when the kind's controller is stopped or the operator shuts down.
fn kind_stopped(stop: &Shutdown, shutdown: &Shutdown) -> impl std::future::Future<Output = ()> + Send + 'static {
    let (stop, shutdown) = (stop.clone(), shutdown.clone());
    async move {
        tokio::select! {
            _ = stop.wait() => {}
            _ = shutdown.wait() => {}
        }
    }
}

async fn reconcile(obj: Arc<DynamicObject>, ctx: Arc<KindContext>) -> Result<Action, Error> {
    // Sharing the instances: an instance of a shard held elsewhere is that replica's; its
    // shard is not handed over while this pass runs.
    let graph = graph_name(&ctx.resource.kind, &ctx.resource.group, &obj.name_any());
    let namespace = obj.namespace().unwrap_or_default();
    let super::harness::ShardEntry::Entered(_held) =
        super::harness::enter_shard(ctx.shared.shards.as_deref(), &namespace, &graph).await?
    else {
        return Ok(Action::await_change());
    };
    // The cache holds the body as text; the pass reads it whole.
    let obj = Arc::new(super::cache::unpacked_object(&obj));
    let span = info_span!(
        "reconcile",
        controller = CONTROLLER,
        kind = %ctx.resource.kind,
        namespace = obj.namespace().unwrap_or_default(),
        name = obj.name_any(),
        reconcile_id = reconcile_id()
    );
    super::harness::measured(
        &ctx.shared.metrics,
        CONTROLLER,
        span,
        (&*ctx, &obj.metadata),
        || async {
            let controls = Controls::of(&obj.metadata, &cached_status(&obj).unwrap_or_default());
            if controls.paused {
                hold(&obj, &ctx, StatusDraft::pause).await
            } else if obj.metadata.deletion_timestamp.is_some() {
                if controls.protected {
                    hold(&obj, &ctx, StatusDraft::deletion_protected).await
                } else {
                    cleanup(&obj, &ctx).await
                }
            } else {
                ctx.may_write()?;
                let obj = super::harness::finalized(&api(&obj, &ctx), &*obj, INSTANCE_FINALIZER).await?;
                let rendered = render(&obj, &ctx, controls.reconcile_request).await;
                ctx.changed.notify_one();
                rendered
            }
        },
    )
    .await
}

fn api(obj: &DynamicObject, ctx: &KindContext) -> Api<DynamicObject> {
    Api::namespaced_with(
        ctx.shared.client.clone(),
        &obj.namespace().unwrap_or_default(),
        &ctx.resource,
    )
}

fn graphs(obj: &DynamicObject, ctx: &KindContext) -> Api<ResourceGraph> {
    Api::namespaced(ctx.shared.client.clone(), &obj.namespace().unwrap_or_default())
}

/// The status the watch cache holds for the instance.
fn cached_status(obj: &DynamicObject) -> Option<InstanceStatus> {
    obj.data
        .get("status")
        .and_then(|s| serde_json::from_value(s.clone()).ok())
}

/// An instance's status under construction, with its events and its write.
type StatusUpdate<'a> = super::harness::status::StatusUpdate<'a, DynamicObject, InstanceStatus>;

impl KindContext {
    fn status_update<'a>(&'a self, obj: &'a DynamicObject) -> StatusUpdate<'a> {
        let cached = cached_status(obj);
        let writer = super::harness::status::StatusWriter {
            api: api(obj, self),
            type_meta: (&self.resource.api_version, &self.resource.kind),
            manager: INSTANCE_MANAGER,
            memory: &self.shared.written,
            recorder: &self.shared.recorder,
            owned: super::harness::status::whole,
        };
        StatusUpdate::start(obj, obj.object_ref(&self.resource), writer, cached.as_ref())
    }
}

/// An instance's pipeline: render it (in a batch of its module), check policies and confine
/// its objects, publish its signed graph (taking over one of the earlier naming), mirror the
/// graph's progress. The status is written once, at the end.
async fn render(obj: &DynamicObject, ctx: &KindContext, request: Option<String>) -> Result<Action, Error> {
    let mut update = ctx.status_update(obj);
    update.resume();
    let result = serve_instance(obj, ctx, &mut update, request.as_deref()).await;
    let action = match result {
        Ok(Served::Reported(action)) => action,
        // No status until the graph reports, which wakes the instance; the bound's end wakes it
        // if no report comes. Looking again meanwhile would cost a pass per waiting instance.
        Ok(Served::AwaitingFirstReport(left)) => return Ok(Action::requeue(left)),
        Err(InstanceStop::Settled(action)) => action,
        Err(InstanceStop::Retry(e)) => {
            ctx.may_write()?;
            update.write().await?;
            return Err(e);
        }
        Err(InstanceStop::Error(e)) => return Err(e),
    };
    ctx.may_write()?;
    update.write().await?;
    Ok(action)
}

/// How a pass that got through ends.
enum Served {
    /// The status says how the graph is doing.
    Reported(Action),
    /// A new instance's graph has not reported yet: its report wakes the instance, whose first
    /// status then says how it went (one write instead of two). Holds what is left of the wait.
    AwaitingFirstReport(Duration),
}

/// What one pass works on: the kind's current module and what its Transform grants, and the
/// graph's name.
struct Pass {
    module: crate::cue::Module,
    allowance: Allowance,
    transform: TransformKey,
    transform_uid: String,
    namespace: String,
    name: String,
    graph: String,
    /// A reconcile the owner asked for (`pequod.io/reconcile-requested-at`): render afresh
    /// and apply the graph even when nothing changed.
    request: Option<String>,
}

impl Pass {
    /// What the graph of this pass is signed with.
    fn grant(&self) -> Grant {
        Grant {
            allowance: self.allowance,
            transform_uid: self.transform_uid.clone(),
            module_digest: self.module.digest.clone(),
        }
    }
}

/// The pipeline; `request` is a reconcile the owner asked for, which renders afresh and
/// applies the graph even when nothing changed.
async fn serve_instance(
    obj: &DynamicObject,
    ctx: &KindContext,
    update: &mut StatusUpdate<'_>,
    request: Option<&str>,
) -> Result<Served, InstanceStop> {
    let (selection, state) = ctx.current();
    let module = choose_module(obj, ctx, update, &selection, &state).await?;
    let name = obj.name_any();
    let pass = Pass {
        namespace: obj.namespace().ok_or(Error::MissingField("metadata.namespace"))?,
        graph: graph_name(&ctx.resource.kind, &ctx.resource.group, &name),
        name,
        module,
        allowance: state.allowance,
        transform: state.transform,
        transform_uid: state.transform_uid,
        request: request.map(String::from),
    };
    update.new.resource_graph = Some(pass.graph.clone());
    let spec = obj.data.get("spec").cloned().unwrap_or_else(|| json!({}));
    let input = render_input(&obj.metadata, &spec);
    let hash = render_hash(&pass.module.digest, &input_hash(&input));
    // The module's readiness expressions, checked when its Transform was applied.
    let schema = ctx
        .shared
        .renderer
        .schema(&pass.module)
        .await
        .map_err(Error::CueUnavailable)?;
    let (rg, predecessor) = match unchanged_graph(obj, ctx, update, &pass, &hash) {
        // The status shows this render and the cache holds its graph: nothing to render or write.
        Some(rg) => (rg, None),
        None => render_and_publish(obj, ctx, update, &pass, (input, &hash), &schema).await?,
    };
    // The time now, not the pass's start: the graph may have been created since.
    if request.is_none()
        && update.events.is_empty()
        && let Some(left) = awaits_first_report(&update.old, &rg, &super::harness::now())
    {
        return Ok(Served::AwaitingFirstReport(left));
    }
    if let Some(request) = request {
        update.reconcile_handled(request);
    }
    update.new.module_digest = Some(pass.module.digest.clone());
    let ready = update.mirror_progress(&rg, schema.status.as_ref());
    let retired = retire_predecessor(obj, ctx, update, &pass, predecessor, ready).await?;
    Ok(Served::Reported(Action::requeue(if retired {
        TEARDOWN_POLL
    } else {
        RESYNC
    })))
}

/// The instance's graph from the cache when nothing is left to do but mirror it: no reconcile
/// is requested, the status shows this module's render, and the cached graph holds this render
/// as Pequod signed it (see [`serves_as_is`]). A restart or resync then costs no render.
fn unchanged_graph(
    obj: &DynamicObject,
    ctx: &KindContext,
    update: &StatusUpdate<'_>,
    pass: &Pass,
    hash: &str,
) -> Option<ResourceGraph> {
    let shown = update.old.module_digest.as_deref() == Some(pass.module.digest.as_str())
        && update.was(RENDERED, crate::api::ConditionStatus::True, reasons::RENDERED);
    if pass.request.is_some() || !shown {
        return None;
    }
    current_in_cache(obj, ctx, pass, hash)
}

/// Renders the instance (in a batch of its module), checks policies and confinement, and
/// publishes the signed graph: the graph, and the one of the earlier naming it takes over from.
async fn render_and_publish(
    obj: &DynamicObject,
    ctx: &KindContext,
    update: &mut StatusUpdate<'_>,
    pass: &Pass,
    (input, hash): (serde_json::Value, &str),
    schema: &crate::cue::ModuleSchema,
) -> Result<(ResourceGraph, Option<ResourceGraph>), InstanceStop> {
    let output = render_instance(ctx, update, pass, input).await?;
    let nodes = check_policies(obj, ctx, update, pass, &output).await?;
    let nodes = with_module_gates(nodes, &schema.metadata.ready_when);
    let (live, predecessor) = find_graphs(obj, ctx, update, pass, hash).await?;
    let rg = publish_graph(
        obj,
        ctx,
        update,
        pass,
        (&output, nodes, hash),
        live,
        predecessor.as_ref(),
    )
    .await?;
    Ok((rg, predecessor))
}

/// Once the graph holds every object, the earlier one has nothing left and goes; says whether
/// one was deleted.
async fn retire_predecessor(
    obj: &DynamicObject,
    ctx: &KindContext,
    update: &mut StatusUpdate<'_>,
    pass: &Pass,
    predecessor: Option<ResourceGraph>,
    ready: bool,
) -> Result<bool, InstanceStop> {
    let Some(old) = predecessor.filter(|p| ready && p.metadata.deletion_timestamp.is_none()) else {
        return Ok(false);
    };
    ctx.may_write()?;
    match graphs(obj, ctx)
        .delete(&old.name_any(), &DeleteParams::background())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    let note = format!(
        "ResourceGraph {} took over every object of {}, which is deleted",
        pass.graph,
        old.name_any()
    );
    update.event(EventType::Normal, reasons::GRAPH_RENAMED, &note);
    Ok(true)
}

/// The module version the instance renders with (see [`crate::rollout::choose`]), and what
/// its status says about it: the version it is pinned to, and what the rollout under way will
/// change when it reaches the instance. Only a version its own Transform has served may be
/// chosen: the module cache holds every Transform's versions, and a pin to another's would
/// render that module with this Transform's allowance.
async fn choose_module(
    obj: &DynamicObject,
    ctx: &KindContext,
    update: &mut StatusUpdate<'_>,
    selection: &Selection,
    state: &KindState,
) -> Result<Module, InstanceStop> {
    let key = instance_key(obj);
    let pin = obj.annotations().get(PIN_ANNOTATION).map(String::as_str);
    update.new.pinned_module_digest = pin.filter(|p| crate::cue::is_digest(p)).map(String::from);
    let recorded = update.old.module_digest.clone();
    let module = match choose(selection, &key, recorded.as_deref(), pin) {
        Wanted::Target => selection.target.clone(),
        // The version the rollout started from is named in the Transform's status, which
        // whoever may write `transforms/status` could change: it too must have been served.
        Wanted::Current
            if selection
                .current
                .as_ref()
                .is_some_and(|c| !state.served.contains(&c.digest)) =>
        {
            let message = format!(
                "the rollout's current module version was never served by Transform {}; the instance keeps its graph",
                state.transform
            );
            return Err(update.render_failed(reasons::VERSION_NOT_SERVED, message, Action::requeue(RESYNC)));
        }
        Wanted::Current => selection.current.clone().unwrap_or_else(|| selection.target.clone()),
        Wanted::Version(digest) if crate::cue::is_digest(&digest) && !state.served.contains(&digest) => {
            let message = never_served(pin.is_some(), &digest, &state.transform);
            return Err(update.render_failed(reasons::VERSION_NOT_SERVED, message, Action::requeue(RESYNC)));
        }
        Wanted::Version(digest) => match ctx.shared.renderer.find(&digest, &selection.target.platform).await {
            Some(module) => module,
            None => {
                let message = not_in_cache(pin.is_some(), &digest);
                return Err(update.render_failed(reasons::MODULE_UNAVAILABLE, message, Action::requeue(RESYNC)));
            }
        },
    };
    update.new.pending_change = (module.digest != selection.target.digest)
        .then(|| selection.pending.get(&key).cloned())
        .flatten();
    Ok(module)
}

/// Renders the instance's `input` with its module.
async fn render_instance(
    ctx: &KindContext,
    update: &mut StatusUpdate<'_>,
    pass: &Pass,
    input: serde_json::Value,
) -> Result<Arc<crate::cue::RenderOutput>, InstanceStop> {
    let rendered = if pass.request.is_some() {
        ctx.shared.renderer.render_afresh(&pass.module, input).await
    } else {
        ctx.shared.renderer.render(&pass.module, input).await
    };
    match rendered {
        Ok(output) => {
            update.rendered(output.nodes.len(), &pass.module.digest);
            Ok(output)
        }
        // The render worked; the graph rules refused what it rendered.
        Err(crate::cue::RenderError::InvalidGraph(refused)) => {
            Err(update.graph_refused(&pass.module.digest, refused.reason(), refused.to_string()))
        }
        // Rendering is deterministic: after a failure only a change of the instance or the
        // module helps, which the resync and the module watch bring.
        Err(e) if e.is_transient() => Err(update.cue_unavailable(e)),
        Err(e) => Err(update.render_failed(e.reason(), e.to_string(), Action::requeue(RESYNC))),
    }
}

/// The module's policies and the instance's confinement: the nodes to publish, or why the
/// change is blocked (the last accepted graph stays).
async fn check_policies(
    obj: &DynamicObject,
    ctx: &KindContext,
    update: &mut StatusUpdate<'_>,
    pass: &Pass,
    output: &crate::cue::RenderOutput,
) -> Result<Vec<crate::api::Node>, InstanceStop> {
    let cluster_scoped = pass.allowance == Allowance::Cluster;
    let (nodes, violations) = ctx
        .shared
        .applier
        .confined(output, &pass.namespace, cluster_scoped)
        .await;
    // Each violation is counted once, when the instance first shows it.
    if update.old.violations != violations {
        for v in violations.iter().filter(|v| !update.old.violations.contains(v)) {
            let severity = match v.severity {
                Severity::Error => "Error",
                Severity::Warning => "Warning",
                Severity::Info => "Info",
            };
            ctx.shared
                .metrics
                .policy_violations_total
                .with_label_values(&[severity])
                .inc();
        }
    }
    if update.policies(&violations, MAX_STATUS_VIOLATIONS) {
        // The graph's own state is still worth showing.
        if let Some(rg) = graphs(obj, ctx).get_opt(&pass.graph).await? {
            update.new.nodes = node_summaries(&rg);
        }
        return Err(InstanceStop::Settled(Action::requeue(RESYNC)));
    }
    Ok(nodes)
}

/// The instance's graph as it is (refused when another owns the name), and the graph of the
/// earlier naming it still takes over from, if any. The cache answers when it holds the graph
/// of this render (`hash`); the apiserver answers otherwise, so that nothing is written on a
/// stale read.
async fn find_graphs(
    obj: &DynamicObject,
    ctx: &KindContext,
    update: &mut StatusUpdate<'_>,
    pass: &Pass,
    hash: &str,
) -> Result<(Option<ResourceGraph>, Option<ResourceGraph>), InstanceStop> {
    let graphs_api = graphs(obj, ctx);
    // The cache answers only when it shows the graph current; anything else is read afresh.
    let live = match current_in_cache(obj, ctx, pass, hash) {
        Some(cached) => Some(cached),
        None => graphs_api.get_opt(&pass.graph).await?,
    };
    if live
        .as_ref()
        .is_some_and(|g| !owns(obj, &ctx.resource, g, &ctx.shared.key))
    {
        let message = format!(
            "ResourceGraph {} exists and does not belong to this instance; it is left alone",
            pass.graph
        );
        update.fail(reasons::GRAPH_CONFLICT, message);
        return Err(InstanceStop::Settled(Action::requeue(RESYNC)));
    }
    let legacy = legacy_graph_name(&ctx.resource.kind, &pass.name);
    let predecessor = match &live {
        Some(g) if !g.annotations().contains_key(PREDECESSOR_ANNOTATION) => None,
        // No release creates graphs of the earlier naming: one the cache does not hold is gone
        // (sharing the graphs, the cache holds only those of the shards held here).
        _ => match ctx.shared.graphs.lookup(&pass.namespace, &legacy) {
            Lookup::Known(None) if ctx.caches_graph(&pass.namespace, &legacy) => None,
            _ => graphs_api.get_opt(&legacy).await?,
        }
        .filter(|g| owns(obj, &ctx.resource, g, &ctx.shared.key)),
    };
    Ok((live, predecessor))
}

/// The instance's graph from the cache when it holds this render as Pequod signed it (see
/// [`serves_as_is`]), with no predecessor to take over from.
fn current_in_cache(obj: &DynamicObject, ctx: &KindContext, pass: &Pass, hash: &str) -> Option<ResourceGraph> {
    match ctx.shared.graphs.lookup(&pass.namespace, &pass.graph) {
        Lookup::Known(Some(cached)) if serves_as_is(obj, ctx, pass, &cached, hash, None) => {
            Some(Arc::unwrap_or_clone(cached))
        }
        _ => None,
    }
}

/// How much longer a new instance's first status waits for its graph's first report, if it
/// does: the instance has no status yet, and its graph has not reported on its current spec and
/// was created less than [`FIRST_REPORT_BOUND`] ago (a graph that takes longer is shown waiting).
fn awaits_first_report(
    old: &InstanceStatus,
    rg: &ResourceGraph,
    now: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> Option<Duration> {
    let reported = rg
        .status
        .as_ref()
        .is_some_and(|s| s.observed_generation.is_some() && s.observed_generation == rg.metadata.generation);
    if *old != InstanceStatus::default() || reported {
        return None;
    }
    let created = rg.metadata.creation_timestamp.as_ref()?;
    let age = now.0.as_second() - created.0.as_second();
    let bound = FIRST_REPORT_BOUND.as_secs() as i64;
    (0..bound)
        .contains(&age)
        .then(|| Duration::from_secs((bound - age) as u64))
}

/// The graph to serve: the live one when it holds this render and Pequod's valid proof (a
/// graph someone else edited does not), else the render applied and signed.
async fn publish_graph(
    obj: &DynamicObject,
    ctx: &KindContext,
    update: &mut StatusUpdate<'_>,
    pass: &Pass,
    (output, nodes, hash): (&crate::cue::RenderOutput, Vec<crate::api::Node>, &str),
    live: Option<ResourceGraph>,
    predecessor: Option<&ResourceGraph>,
) -> Result<ResourceGraph, InstanceStop> {
    let predecessor = predecessor.and_then(|g| {
        Some(
            Predecessor {
                uid: g.uid()?,
                name: g.name_any(),
            }
            .annotation(),
        )
    });
    let predecessor = predecessor.as_deref();
    if let Some(live) = live.filter(|g| serves_as_is(obj, ctx, pass, g, hash, predecessor)) {
        return Ok(live);
    }
    let mut rendered = output.clone();
    rendered.nodes = nodes;
    let desired = signed_graph(obj, ctx, update, pass, (&rendered, hash), predecessor);
    write_graph(obj, ctx, update, pass, &desired).await
}

/// Whether the live graph may be served as it is: no reconcile is requested, it holds this
/// render, carries Pequod's valid proof for this predecessor and is still owned by the instance.
fn serves_as_is(
    obj: &DynamicObject,
    ctx: &KindContext,
    pass: &Pass,
    g: &ResourceGraph,
    hash: &str,
    predecessor: Option<&str>,
) -> bool {
    let signed_as_rendered = || {
        let annotation = |key: &str| g.annotations().get(key).map(String::as_str);
        let claimed = annotation(PREDECESSOR_ANNOTATION);
        let proof = annotation(PROOF_ANNOTATION);
        claimed == predecessor
            && ctx
                .shared
                .key
                .verify(&pass.namespace, &pass.graph, &g.spec, proof, claimed)
                .is_some_and(|grant| grant == pass.grant())
    };
    // A graph someone cut loose from the instance (no owner reference) is written again.
    let owned = || {
        g.owner_references().iter().any(|o| {
            Some(&o.uid) == obj.uid().as_ref()
                && o.api_version == ctx.resource.api_version
                && o.kind == ctx.resource.kind
                && o.name == pass.name
        })
    };
    pass.request.is_none() && g.spec.render_hash.as_deref() == Some(hash) && signed_as_rendered() && owned()
}

/// The graph for this render, with its proof, its predecessor and any reconcile request.
fn signed_graph(
    obj: &DynamicObject,
    ctx: &KindContext,
    update: &StatusUpdate<'_>,
    pass: &Pass,
    (rendered, hash): (&crate::cue::RenderOutput, &str),
    predecessor: Option<&str>,
) -> ResourceGraph {
    let instance = InstanceRef {
        api_version: ctx.resource.api_version.clone(),
        kind: ctx.resource.kind.clone(),
        name: pass.name.clone(),
        namespace: pass.namespace.clone(),
        uid: obj.uid(),
    };
    let mut desired = resource_graph(&instance, &pass.transform.name, hash, rendered, update.time.clone());
    let proof = ctx
        .shared
        .key
        .sign(&pass.namespace, &pass.graph, &desired.spec, &pass.grant(), predecessor);
    let annotations = desired.metadata.annotations.get_or_insert_default();
    annotations.insert(PROOF_ANNOTATION.to_string(), proof);
    if let Some(p) = predecessor {
        annotations.insert(PREDECESSOR_ANNOTATION.to_string(), p.to_string());
    }
    // A changed annotation starts a pass of the graph, which applies every node.
    if let Some(request) = pass.request.as_deref() {
        annotations.insert(RECONCILE_REQUEST_ANNOTATION.to_string(), request.to_string());
    }
    desired
}

/// Applies the graph; a graph the apiserver refuses is said on the instance.
async fn write_graph(
    obj: &DynamicObject,
    ctx: &KindContext,
    update: &mut StatusUpdate<'_>,
    pass: &Pass,
    desired: &ResourceGraph,
) -> Result<ResourceGraph, InstanceStop> {
    let params = PatchParams::apply(INSTANCE_MANAGER).force();
    ctx.may_write()?;
    match graphs(obj, ctx)
        .patch(&pass.graph, &params, &Patch::Apply(desired))
        .await
    {
        Ok(rg) => {
            ctx.shared.graphs.wrote(rg.clone());
            Ok(rg)
        }
        // The apiserver refuses the graph itself (too large, say): retrying cannot help, so
        // say why on the instance.
        Err(kube::Error::Api(s)) if matches!(s.code, 400 | 413 | 422) => {
            let message = format!("the apiserver refused ResourceGraph {}: {}", pass.graph, s.message);
            update.fail(reasons::GRAPH_REJECTED, message);
            Err(InstanceStop::Settled(Action::requeue(RESYNC)))
        }
        // An internal error for a malformed object (a reference in place of a whole map, say)
        // looks like any other: said on the instance, and retried with backoff.
        Err(kube::Error::Api(s)) if s.code == 500 => {
            let message = format!("the apiserver failed on ResourceGraph {}: {}", pass.graph, s.message);
            update.fail(reasons::GRAPH_REJECTED, message);
            Err(InstanceStop::Retry(kube::Error::Api(s).into()))
        }
        Err(e) => Err(e.into()),
    }
}

/// Why a version the pin or the status names may not be used: its Transform never served it.
fn never_served(pinned: bool, digest: &str, transform: &TransformKey) -> String {
    let shown: String = digest.chars().take(80).collect();
    let whose = if pinned { PIN_ANNOTATION } else { "status.moduleDigest" };
    format!(
        "{whose}: module version {shown} was never served by Transform {transform}; only the versions in its \
         status.servedDigests may be used, and the instance keeps its graph"
    )
}

/// Why the version the pin or the status names cannot be rendered: it is not in the cache, or
/// the pin is no digest at all.
fn not_in_cache(pinned: bool, digest: &str) -> String {
    let shown: String = digest.chars().take(80).collect();
    if pinned && !crate::cue::is_digest(digest) {
        format!("{PIN_ANNOTATION}: {shown:?} is not a module digest (sha256: and 64 hex digits)")
    } else if pinned {
        format!("{PIN_ANNOTATION}: module version {shown} is not in the cache; the instance keeps its graph")
    } else {
        format!(
            "module version {shown} the instance was rendered with is not in the cache; it keeps its \
             graph until the rollout reaches it"
        )
    }
}

/// The group of an `apiVersion` (empty for the core group).
fn api_group(api_version: &str) -> &str {
    api_version.rsplit_once('/').map_or("", |(group, _)| group)
}

/// Whether `graph` is this instance's. Names and labels are shared by same-named kinds of two
/// API groups; the uid in the graph's owner reference is this instance's alone. A graph whose
/// owner reference someone removed is still the instance's when Pequod signed it for the
/// instance (its signed `sourceRef` names the instance's uid): it is written again, owner
/// reference included, and deleted with the instance.
fn owns(obj: &DynamicObject, resource: &ApiResource, graph: &ResourceGraph, key: &GraphKey) -> bool {
    let Some(uid) = obj.uid() else {
        return false;
    };
    if graph
        .owner_references()
        .iter()
        // The group, not the version: a graph rendered before the kind's storage version
        // changed names the instance in the version it had then.
        .any(|o| o.uid == uid && api_group(&o.api_version) == resource.group && o.kind == resource.kind)
    {
        return true;
    }
    let annotation = |k: &str| graph.annotations().get(k).map(String::as_str);
    graph.spec.source_ref.as_ref().and_then(|s| s.uid.as_deref()) == Some(uid.as_str())
        && key
            .verify(
                &graph.namespace().unwrap_or_default(),
                &graph.name_any(),
                &graph.spec,
                annotation(PROOF_ANNOTATION),
                annotation(PREDECESSOR_ANNOTATION),
            )
            .is_some()
}

/// Writes a status that says why the instance is left as it is (paused, or protected from
/// deletion), and waits for a change of the instance.
async fn hold(obj: &DynamicObject, ctx: &KindContext, say: fn(&mut Draft)) -> Result<Action, Error> {
    let mut update = ctx.status_update(obj);
    say(&mut update);
    ctx.may_write()?;
    update.write().await?;
    Ok(Action::await_change())
}

/// Deletion: deletes the instance's graph (which tears its objects down in reverse order) and
/// lets the instance go once the graph is gone.
async fn cleanup(obj: &DynamicObject, ctx: &KindContext) -> Result<Action, Error> {
    if !obj.finalizers().iter().any(|f| f == INSTANCE_FINALIZER) {
        return Ok(Action::await_change());
    }
    ctx.may_write()?;
    let graphs = graphs(obj, ctx);
    let name = obj.name_any();
    let mut live = None;
    // The graph, and the one of an earlier release's naming if it is still there.
    for graph in [
        graph_name(&ctx.resource.kind, &ctx.resource.group, &name),
        legacy_graph_name(&ctx.resource.kind, &name),
    ] {
        let Some(rg) = graphs
            .get_opt(&graph)
            .await?
            .filter(|g| owns(obj, &ctx.resource, g, &ctx.shared.key))
        else {
            continue;
        };
        if rg.metadata.deletion_timestamp.is_none() {
            match graphs.delete(&graph, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        live = live.or(Some((graph, rg)));
    }
    match live {
        Some((graph, rg)) => {
            let mut update = ctx.status_update(obj);
            let waiting = rg
                .status
                .as_ref()
                .and_then(|s| {
                    s.conditions
                        .iter()
                        .find(|c| c.type_ == READY && c.reason == reasons::DELETING)
                })
                .map(|c| c.message.clone())
                .unwrap_or_else(|| format!("deleting ResourceGraph {graph}"));
            update.deleting(waiting, &rg);
            update.write().await?;
            Ok(Action::requeue(TEARDOWN_POLL))
        }
        None => {
            super::harness::remove_finalizer(&api(obj, ctx), obj, INSTANCE_FINALIZER).await?;
            ctx.shared.written.forget(&obj.uid().unwrap_or_default());
            Ok(Action::await_change())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn graph(age_seconds: i64, generation: i64, observed: Option<i64>) -> ResourceGraph {
        let created = jiff::Timestamp::from_second(1_000_000 - age_seconds).unwrap();
        let mut rg: ResourceGraph = serde_json::from_value(json!({
            "apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph",
            "metadata": {"name": "g", "namespace": "team", "generation": generation},
            "spec": {"nodes": []}
        }))
        .unwrap();
        rg.metadata.creation_timestamp = Some(Time(created));
        if let Some(observed) = observed {
            rg.status = Some(crate::api::ResourceGraphStatus {
                observed_generation: Some(observed),
                ..Default::default()
            });
        }
        rg
    }

    #[test]
    fn a_new_instance_waits_for_its_graph_s_first_report_within_a_bound() {
        let now = Time(jiff::Timestamp::from_second(1_000_000).unwrap());
        let new = InstanceStatus::default();
        assert_eq!(
            awaits_first_report(&new, &graph(1, 1, None), &now),
            Some(Duration::from_secs(299)),
            "not reported yet: woken by the report, or at the bound"
        );
        assert!(
            awaits_first_report(&new, &graph(1, 2, Some(1)), &now).is_some(),
            "reported on an earlier spec"
        );
        assert_eq!(awaits_first_report(&new, &graph(1, 1, Some(1)), &now), None, "reported");
        assert_eq!(
            awaits_first_report(&new, &graph(301, 1, None), &now),
            None,
            "a graph slower than the bound is shown waiting"
        );
        assert_eq!(
            awaits_first_report(&new, &graph(-5, 1, None), &now),
            None,
            "a creation time in the future bounds nothing"
        );
        let shown = InstanceStatus {
            resource_graph: Some("g".into()),
            ..Default::default()
        };
        assert_eq!(
            awaits_first_report(&shown, &graph(1, 1, None), &now),
            None,
            "an instance with a status shows every change"
        );
    }
}
