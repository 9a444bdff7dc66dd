//! One shared watch per kind of applied object, with a cache of the objects Pequod made; and
//! the one watch and cache of ResourceGraphs ([`GraphCache`]).
//!
//! Every ResourceGraph that applies a Deployment shares the one Deployment watch. An event on
//! an object triggers a reconcile of the graph its labels name, which is how drift is noticed
//! and readiness progresses without polling.
//!
//! Anyone may put Pequod's labels on their objects, so the cache keeps only objects whose
//! labels and graph-uid annotation name a ResourceGraph that exists: a labelled object of
//! anyone else is never held. A miss costs one GET, which the executor makes anyway for
//! objects it does not find (see [`live_object`]).

use crate::api::names::{GRAPH_LABEL, GRAPH_UID_ANNOTATION, MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use futures::{FutureExt, StreamExt, TryStreamExt};
use kube::ResourceExt;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::mpsc;

use crate::api::ResourceGraph;
use crate::apply::{Applier, ApplyError, Resolved};
use crate::executor::object::labelled_graph;
use crate::runtime::shards::Shards;
use crate::runtime::shutdown::Shutdown;

struct KindWatch {
    store: Store<DynamicObject>,
    synced: Arc<AtomicBool>,
    /// Objects looked up before the first list was in (and so read from the apiserver): a
    /// change between that read and the list reaches the cache only as part of the list.
    unlisted_reads: Arc<Mutex<UnlistedReads>>,
    task: tokio::task::JoinHandle<()>,
    resolved: Resolved,
}

impl Drop for KindWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The object caches, one per kind, started on first use.
pub struct ObjectWatches {
    client: Client,
    trigger: mpsc::UnboundedSender<ObjectRef<ResourceGraph>>,
    kinds: Mutex<HashMap<String, KindWatch>>,
    shutdown: Shutdown,
    /// The ResourceGraphs that exist, once their controller's cache is there.
    graphs: Arc<OnceLock<Store<ResourceGraph>>>,
    /// The shards this replica holds, when graphs are shared among replicas.
    shards: Arc<OnceLock<Arc<Shards>>>,
    /// Watches of the objects graphs read but do not manage.
    reads: ExternalWatches,
}

/// The object as it is: from its kind's cache when `watches` are given, the cache has it and
/// `may_read_cached` says the reader may see it there; else from the apiserver with the rights
/// of `applier`. The caches hold only objects that already carry Pequod's labels: a miss is
/// absent or not a graph's, and the apiserver tells which.
pub async fn live_object<F: std::future::Future<Output = bool>>(
    watches: Option<&ObjectWatches>,
    applier: &Applier,
    resolved: &Resolved,
    (namespace, name): (Option<&str>, &str),
    may_read_cached: impl FnOnce() -> F,
) -> Result<Option<DynamicObject>, ApplyError> {
    if let Some(watches) = watches
        && let Lookup::Known(Some(cached)) = watches.lookup(resolved, namespace, name)
        && may_read_cached().await
    {
        return Ok(Some(super::cache::unpacked_object(&cached)));
    }
    applier.get(resolved, namespace, name).await
}

/// What a cache knows of an object.
pub enum Lookup<K = DynamicObject> {
    /// The cache has listed the kind: the object, or None when absent.
    Known(Option<Arc<K>>),
    /// The watch has not finished its first list; ask the apiserver.
    Unknown,
}

impl ObjectWatches {
    /// The watches and the stream of graphs to reconcile because one of their objects changed.
    pub fn new(client: Client, shutdown: Shutdown) -> (Arc<Self>, mpsc::UnboundedReceiver<ObjectRef<ResourceGraph>>) {
        let (trigger, triggers) = mpsc::unbounded_channel();
        (
            Arc::new(Self {
                client,
                reads: ExternalWatches::new(trigger.clone(), shutdown.clone()),
                trigger,
                kinds: Mutex::default(),
                shutdown,
                graphs: Arc::default(),
                shards: Arc::default(),
            }),
            triggers,
        )
    }

    /// Caches only the objects of graphs in the shards held, and lists every kind again when
    /// they change (lookups ask the apiserver until the new list is in).
    pub fn know_shards(self: &Arc<Self>, shards: Arc<Shards>) {
        let mut held = shards.subscribe();
        if self.shards.set(shards).is_err() {
            return;
        }
        let watches = Arc::downgrade(self);
        tokio::spawn(async move {
            while held.changed().await.is_ok() {
                let Some(watches) = watches.upgrade() else { return };
                // Every kind watched lists again at once (dropping a watch stops it), so that
                // changes to objects of the graphs held keep waking them.
                let mut kinds = lock(&watches.kinds);
                let resolved: Vec<Resolved> = kinds.values().map(|w| w.resolved.clone()).collect();
                for resolved in resolved {
                    kinds.insert(resolved.key(), watches.start(&resolved));
                }
            }
        });
    }

    /// Makes `graph` watch the objects its `Read` nodes read, exactly (see
    /// [`ExternalWatches::keep`]), forgetting graphs that no longer exist or are of shards no
    /// longer held. Whether every one is watched.
    pub fn keep_reads(&self, graph: &ObjectRef<ResourceGraph>, targets: Vec<(ReadTarget, Api<DynamicObject>)>) -> bool {
        let graphs = self.graphs.get();
        let shards = self.shards.get();
        let gone = |g: &ObjectRef<ResourceGraph>| {
            let namespace = g.namespace.as_deref().unwrap_or_default();
            graphs.is_some_and(|store| store.get(g).is_none()) || shards.is_some_and(|s| !s.holds(namespace, &g.name))
        };
        self.reads.keep(graph, targets, gone)
    }

    /// Hands over the ResourceGraph controller's cache, against which objects are checked.
    pub fn know_graphs(&self, graphs: Store<ResourceGraph>) {
        let _ = self.graphs.set(graphs);
    }

    /// Looks an object up in its kind's cache, starting the kind's watch if needed; its body
    /// is packed ([`super::cache::packed_applied`]): [`live_object`] reads it whole.
    pub fn lookup(&self, resolved: &Resolved, namespace: Option<&str>, name: &str) -> Lookup {
        let mut kinds = lock(&self.kinds);
        let watch = kinds.entry(resolved.key()).or_insert_with(|| self.start(resolved));
        if !watch.synced.load(Ordering::Acquire) {
            lock(&watch.unlisted_reads).remember(namespace, name);
            return Lookup::Unknown;
        }
        let mut key = ObjectRef::<DynamicObject>::new_with(name, resolved.resource.clone());
        if resolved.namespaced {
            key = key.within(namespace.unwrap_or_default());
        }
        Lookup::Known(watch.store.get(&key))
    }

    fn start(&self, resolved: &Resolved) -> KindWatch {
        let writer = reflector::store::Writer::new(resolved.resource.clone());
        let store = writer.as_reader();
        let synced = Arc::new(AtomicBool::new(false));
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resolved.resource);
        // Only objects Pequod applied: the label selector keeps the list small, and the check
        // below keeps what others labelled out of the cache.
        let config = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE},{GRAPH_LABEL}"));
        let graphs = self.graphs.clone();
        let shards = self.shards.clone();
        let ours = move |obj: &DynamicObject| match graphs.get() {
            Some(store) => made_by_existing_graph(obj, |key| {
                let held = shards
                    .get()
                    .is_none_or(|s| s.holds(key.namespace.as_deref().unwrap_or_default(), &key.name));
                held.then(|| store.get(key).and_then(|g| g.metadata.uid.clone()))
                    .flatten()
            }),
            // Before the graph cache exists nothing reconciles, so nothing looks objects up.
            None => true,
        };
        let trigger = self.trigger.clone();
        let kind = resolved.key();
        let shutdown = self.shutdown.clone();
        let unlisted_reads: Arc<Mutex<UnlistedReads>> = Arc::default();
        let (listed, before, resource) = (unlisted_reads.clone(), store.clone(), resolved.resource.clone());
        let (missed_trigger, listing_synced) = (trigger.clone(), synced.clone());
        let namespaced = resolved.namespaced;
        // A change made while the watch was not running (before its first list, or between a
        // failed watch and its relist) arrives only in a list, not as a change: the graph of an
        // object that changed meanwhile is woken, as for any change.
        let changed_unseen = move |obj: &DynamicObject| {
            let namespace = obj.metadata.namespace.as_deref();
            let changed = if listing_synced.load(Ordering::Acquire) {
                let mut key = ObjectRef::<DynamicObject>::new_with(&obj.name_any(), resource.clone());
                if namespaced {
                    key = key.within(namespace.unwrap_or_default());
                }
                before
                    .get(&key)
                    .is_none_or(|old| old.metadata.resource_version != obj.metadata.resource_version)
            } else {
                lock(&listed).contains(namespace, &obj.name_any())
            };
            if changed && let Some(graph) = owning_graph(obj) {
                let _ = missed_trigger.send(graph);
            }
        };
        let unlisted_reads_done = unlisted_reads.clone();
        let done_synced = synced.clone();
        let events = watcher(api, config)
            .default_backoff()
            .modify(super::cache::packed_applied)
            .try_filter_map(move |event| {
                futures::future::ready(Ok(match event {
                    // An object that stops being ours leaves the cache; one never ours never enters.
                    watcher::Event::Apply(obj) if !ours(&obj) => Some(watcher::Event::Delete(obj)),
                    watcher::Event::InitApply(obj) if !ours(&obj) => None,
                    watcher::Event::InitApply(obj) => {
                        changed_unseen(&obj);
                        Some(watcher::Event::InitApply(obj))
                    }
                    other => Some(other),
                }))
            })
            .reflect(writer)
            .for_each(move |event| {
                match event {
                    Ok(watcher::Event::InitDone) => {
                        done_synced.store(true, Ordering::Release);
                        lock(&unlisted_reads_done).clear();
                    }
                    Ok(watcher::Event::Apply(obj) | watcher::Event::Delete(obj)) => {
                        if let Some(graph) = owning_graph(&obj) {
                            let _ = trigger.send(graph);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(%kind, error = %e, "watch of applied objects failed; retrying"),
                }
                futures::future::ready(())
            });
        let task = tokio::spawn(async move {
            tokio::select! {
                _ = events => {}
                _ = shutdown.wait() => {}
            }
        });
        KindWatch {
            store,
            synced,
            unlisted_reads,
            task,
            resolved: resolved.clone(),
        }
    }
}

/// The objects of a kind looked up before its first list was in, by namespace and name;
/// bounded, since only the first list of a kind reads it.
#[derive(Default)]
struct UnlistedReads(std::collections::HashSet<(Option<String>, String)>);

/// Most lookups remembered before a kind's first list; past it the rest wait for their
/// graphs' next pass.
const MAX_UNLISTED_READS: usize = 10_000;

impl UnlistedReads {
    fn remember(&mut self, namespace: Option<&str>, name: &str) {
        if self.0.len() < MAX_UNLISTED_READS {
            self.0.insert((namespace.map(str::to_string), name.to_string()));
        }
    }

    fn contains(&self, namespace: Option<&str>, name: &str) -> bool {
        self.0.contains(&(namespace.map(str::to_string), name.to_string()))
    }

    fn clear(&mut self) {
        self.0 = Default::default();
    }
}

/// A generated kind's controller, woken when one of its instances' graphs changes.
struct KindSubscriber {
    resource: ApiResource,
    wake: mpsc::UnboundedSender<ObjectRef<DynamicObject>>,
}

type Subscribers = Arc<Mutex<HashMap<(String, String), KindSubscriber>>>;

/// The one watch and cache of ResourceGraphs. The graph controller reconciles from it; each
/// generated kind's controller reads its instances' graphs from it and is woken by their
/// changes only once the cache holds them, so a graph read after a wake-up is never older than
/// the change that woke it.
///
/// A graph this process wrote is answered as written until the watch brings that version or a
/// later one: the instance's next pass, which the instance's own change starts at once, would
/// otherwise find the cache behind and read the graph from the apiserver.
pub struct GraphCache {
    store: Store<ResourceGraph>,
    subscribers: Subscribers,
    written: Written,
}

/// Graphs as this process last wrote them, until the watch has seen that version.
type Written = Arc<Mutex<HashMap<ObjectRef<ResourceGraph>, Arc<ResourceGraph>>>>;

/// Which graphs a replica caches and reconciles when graphs are shared in shards: those of
/// the shards it holds (an instance is in the shard of its graph, so its replica has it).
#[derive(Clone)]
pub struct GraphScope {
    pub shards: Arc<Shards>,
}

impl GraphScope {
    fn shard(&self, graph: &ResourceGraph) -> u32 {
        self.shards
            .shard_of(&graph.namespace().unwrap_or_default(), &graph.name_any())
    }

    /// Whether `graph` was queued by the last completed list, under the same take of its shard.
    fn queued_by(&self, graph: &ResourceGraph, listed: &BTreeMap<u32, u64>, held: &BTreeMap<u32, u64>) -> bool {
        let shard = self.shard(graph);
        listed.get(&shard).is_some() && listed.get(&shard) == held.get(&shard)
    }

    /// Whether `graph` is cached and reconciled here.
    fn keeps(&self, graph: &ResourceGraph, held: &BTreeMap<u32, u64>) -> bool {
        held.contains_key(&self.shard(graph))
    }
}

impl GraphCache {
    /// Starts the watch of every ResourceGraph (of the shards held, with a `scope`); returns
    /// the cache and the graphs to reconcile (each one listed or changed). A change of the
    /// shards held lists the graphs again, so that those of a shard taken over are reconciled.
    pub fn start(
        client: Client,
        shutdown: Shutdown,
        scope: Option<GraphScope>,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Arc<ResourceGraph>>) {
        let writer = reflector::store::Writer::default();
        let store = writer.as_reader();
        let subscribers: Subscribers = Arc::default();
        let (changed, graphs) = mpsc::unbounded_channel();
        let written: Written = Arc::default();
        let cache = Arc::new(Self {
            store,
            subscribers: subscribers.clone(),
            written: written.clone(),
        });
        let watch = GraphWatch {
            api: Api::<ResourceGraph>::all(client),
            store: writer.as_reader(),
            listed_with: BTreeMap::new(),
            listed: Vec::new(),
            writer,
            subscribers,
            written,
            changed,
        };
        tokio::spawn(watch.run(scope, shutdown));
        (cache, graphs)
    }
    /// The cache, as the graph controller reads it.
    pub fn store(&self) -> Store<ResourceGraph> {
        self.store.clone()
    }

    /// Graph `name` in `namespace` as the cache holds it, or as this process wrote it when the
    /// cache has not seen that write yet; Unknown before the first list.
    pub fn lookup(&self, namespace: &str, name: &str) -> Lookup<ResourceGraph> {
        if !self.synced() {
            return Lookup::Unknown;
        }
        let key = ObjectRef::new(name).within(namespace);
        let cached = self.store.get(&key);
        let mut written = lock(&self.written);
        match (written.get(&key), &cached) {
            (Some(mine), Some(seen)) if !is_older(seen, mine) => {
                written.remove(&key);
            }
            (Some(mine), _) => return Lookup::Known(Some(mine.clone())),
            (None, _) => {}
        }
        Lookup::Known(cached.map(|graph| Arc::new(super::cache::unpacked_graph(&graph))))
    }

    /// Remembers `graph` as this process just wrote it (the apiserver's answer to the write).
    pub fn wrote(&self, mut graph: ResourceGraph) {
        super::cache::without_managed_fields(&mut graph);
        lock(&self.written).insert(ObjectRef::from_obj(&graph), Arc::new(graph));
    }

    fn synced(&self) -> bool {
        self.store
            .wait_until_ready()
            .now_or_never()
            .is_some_and(|ready| ready.is_ok())
    }

    /// The instances of `resource` whose graphs change, from now on; replaces an earlier
    /// subscriber of the same kind.
    pub fn subscribe(&self, resource: &ApiResource) -> mpsc::UnboundedReceiver<ObjectRef<DynamicObject>> {
        let (wake, woken) = mpsc::unbounded_channel();
        let subscriber = KindSubscriber {
            resource: resource.clone(),
            wake,
        };
        lock(&self.subscribers).insert((resource.group.clone(), resource.kind.clone()), subscriber);
        woken
    }
}

/// The watch behind a [`GraphCache`].
struct GraphWatch {
    api: Api<ResourceGraph>,
    writer: reflector::store::Writer<ResourceGraph>,
    /// What the writer last published: during a list it still holds the graphs listed before.
    store: Store<ResourceGraph>,
    /// The shards held when a list last completed: their graphs were queued then.
    listed_with: BTreeMap<u32, u64>,
    /// Graphs a list in progress brought that are to be queued, and whose instances are to be
    /// woken, once the list completes: readers find them in the store only then.
    listed: Vec<(ObjectRef<ResourceGraph>, bool)>,
    subscribers: Subscribers,
    written: Written,
    changed: mpsc::UnboundedSender<Arc<ResourceGraph>>,
}

impl GraphWatch {
    async fn run(mut self, scope: Option<GraphScope>, shutdown: Shutdown) {
        let mut held = scope.as_ref().map(|s| s.shards.subscribe());
        loop {
            if let Some(held) = held.as_mut() {
                held.mark_unchanged();
            }
            // With how many times each was taken, read as the list starts.
            let now_held = scope.as_ref().map(|s| s.shards.held_takes()).unwrap_or_default();
            let mut events = watcher(self.api.clone(), watcher::Config::default().any_semantic())
                .default_backoff()
                .modify(super::cache::packed_graph)
                .boxed();
            let scope_changed = async {
                match held.as_mut() {
                    Some(held) => {
                        let _ = held.changed().await;
                    }
                    None => futures::future::pending::<()>().await,
                }
            };
            tokio::pin!(scope_changed);
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    // Lists again with the new scope; the store keeps its graphs until then.
                    () = &mut scope_changed => break,
                    event = events.next() => match event {
                        Some(event) => self.handle(event, scope.as_ref(), &now_held),
                        None => return,
                    },
                }
            }
        }
    }

    fn handle(
        &mut self,
        event: Result<watcher::Event<ResourceGraph>, watcher::Error>,
        scope: Option<&GraphScope>,
        held: &BTreeMap<u32, u64>,
    ) {
        let keeps = |g: &ResourceGraph, held| scope.is_none_or(|s| s.keeps(g, held));
        let event = match event {
            Ok(event) => event,
            Err(e) => return tracing::debug!(error = %e, "watch of ResourceGraphs failed; retrying"),
        };
        match &event {
            watcher::Event::Apply(graph) | watcher::Event::InitApply(graph) => {
                if !keeps(graph, held) {
                    return;
                }
                // A list again (the shards held changed, or the watch fell behind) brings every
                // graph: one this process already had, unchanged, wakes nobody, and is queued only
                // if the last completed list did not queue it under the same take of its shard (a
                // list cut short queued only part of them; a shard taken again may have had its
                // graphs' retries with another replica since).
                let listing = matches!(event, watcher::Event::InitApply(_));
                let relisted = listing
                    && self
                        .store
                        .get(&ObjectRef::from_obj(graph))
                        .is_some_and(|had| had.metadata.resource_version == graph.metadata.resource_version);
                self.writer.apply_watcher_event(&event);
                caught_up(&self.written, graph);
                let queued_before = scope.is_none_or(|s| s.queued_by(graph, &self.listed_with, held));
                let queue = !(relisted && queued_before);
                if listing {
                    if queue || !relisted {
                        self.listed.push((ObjectRef::from_obj(graph), queue));
                    }
                    return;
                }
                wake_owner(&self.subscribers, graph);
                if queue {
                    let _ = self.changed.send(Arc::new(graph.clone()));
                }
            }
            watcher::Event::Delete(graph) => {
                self.writer.apply_watcher_event(&event);
                // A graph deleted since it was written is never answered as written.
                lock(&self.written).remove(&ObjectRef::from_obj(graph));
                wake_owner(&self.subscribers, graph);
            }
            watcher::Event::InitDone => {
                self.writer.apply_watcher_event(&event);
                self.listed_with = held.clone();
                for (key, queue) in std::mem::take(&mut self.listed) {
                    let Some(graph) = self.store.get(&key) else { continue };
                    wake_owner(&self.subscribers, &graph);
                    if queue {
                        let _ = self.changed.send(graph);
                    }
                }
            }
            watcher::Event::Init => {
                self.listed.clear();
                self.writer.apply_watcher_event(&event);
            }
        }
    }
}

/// Forgets a written graph once the watch brings its version or a later one.
fn caught_up(written: &Written, graph: &ResourceGraph) {
    let key = ObjectRef::from_obj(graph);
    let mut written = lock(written);
    if written.get(&key).is_some_and(|mine| !is_older(graph, mine)) {
        written.remove(&key);
    }
}

/// Whether `seen` is an older version of the graph than `mine`; a different graph of the same
/// name (another uid) is never older: it replaced the one written.
fn is_older(seen: &ResourceGraph, mine: &ResourceGraph) -> bool {
    seen.metadata.uid == mine.metadata.uid
        && super::harness::status::newer(
            mine.metadata.resource_version.as_ref(),
            seen.metadata.resource_version.as_deref().unwrap_or_default(),
        )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Wakes the controller of the instance that owns `graph` (its controlling owner reference).
fn wake_owner(subscribers: &Subscribers, graph: &ResourceGraph) {
    let Some(owner) = graph.owner_references().iter().find(|o| o.controller == Some(true)) else {
        return;
    };
    let group = owner.api_version.rsplit_once('/').map_or("", |(group, _)| group);
    let key = (group.to_string(), owner.kind.clone());
    let mut subscribers = lock(subscribers);
    let Some(subscriber) = subscribers.get(&key) else {
        return;
    };
    let instance =
        ObjectRef::new_with(&owner.name, subscriber.resource.clone()).within(&graph.namespace().unwrap_or_default());
    if subscriber.wake.send(instance).is_err() {
        // The kind's controller stopped.
        subscribers.remove(&key);
    }
}

/// Whether an object's labels and graph-uid annotation name a ResourceGraph that exists;
/// `uid_of` gives the uid of a graph by namespace and name.
fn made_by_existing_graph(obj: &DynamicObject, uid_of: impl Fn(&ObjectRef<ResourceGraph>) -> Option<String>) -> bool {
    let Some(graph) = owning_graph(obj) else {
        return false;
    };
    let claimed = obj
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(GRAPH_UID_ANNOTATION));
    claimed.is_some() && uid_of(&graph).as_ref() == claimed
}

/// The graph an object's labels name (by its full name when the label holds a shortened one).
fn owning_graph(obj: &DynamicObject) -> Option<ObjectRef<ResourceGraph>> {
    let labels = obj.metadata.labels.as_ref()?;
    let annotations = obj.metadata.annotations.as_ref();
    let graph = labelled_graph(
        |key: &str| labels.get(key).map(String::as_str),
        |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str),
    )?;
    let namespace = graph.namespace.or(obj.metadata.namespace.as_deref())?;
    Some(ObjectRef::new(graph.name).within(namespace))
}

/// What a `Read` node reads: its kind, namespace, name or label selector, and whose rights it
/// is read with (None: the operator's).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReadTarget {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub selector: Option<String>,
    pub reader: Option<String>,
}

/// Most objects watched for `Read` nodes at once, over all graphs; past it a graph's reads are
/// looked at again on a timer (see [`ExternalWatches::keep`]).
pub const MAX_READ_WATCHES: usize = 1000;
/// Most of those the graphs of one namespace may hold, so that no namespace takes them all.
pub const MAX_READ_WATCHES_PER_NAMESPACE: usize = 100;

type Readers = Arc<Mutex<std::collections::HashSet<ObjectRef<ResourceGraph>>>>;

struct ReadWatch {
    /// The graphs that read the object, woken by its changes.
    graphs: Readers,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ReadWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watches of objects graphs read but do not manage (`Read` nodes): one per object (or
/// selector) and reader, shared by the graphs that read it, each made with the reader's own
/// rights, so that a watch the reader may not make fails as its read does (and stops, to be
/// tried again at the graph's next pass). A change wakes every graph that reads the object.
pub struct ExternalWatches {
    trigger: mpsc::UnboundedSender<ObjectRef<ResourceGraph>>,
    watches: Mutex<ReadWatches>,
    shutdown: Shutdown,
}

/// The watches, and the graphs that hold any: a pass of a graph that reads nothing and held
/// nothing costs a lookup, not a walk over every watch.
#[derive(Default)]
struct ReadWatches {
    by_target: HashMap<ReadTarget, ReadWatch>,
    readers: std::collections::HashSet<ObjectRef<ResourceGraph>>,
}

impl ExternalWatches {
    fn new(trigger: mpsc::UnboundedSender<ObjectRef<ResourceGraph>>, shutdown: Shutdown) -> Self {
        Self {
            trigger,
            watches: Mutex::default(),
            shutdown,
        }
    }

    /// Makes `graph` watch exactly `targets` (each with the API it is read through), and no
    /// longer any other object; graphs `gone` says are gone (deleted, or of a shard no longer
    /// held) are forgotten, and watches no graph needs stop. A graph that joins a watch is
    /// woken once, as is every reader when a watch's first list is in: a change made between
    /// its read and the watch is not missed. Returns whether every target is watched (false
    /// past [`MAX_READ_WATCHES`] or [`MAX_READ_WATCHES_PER_NAMESPACE`]: the caller looks again
    /// on a timer).
    pub fn keep(
        &self,
        graph: &ObjectRef<ResourceGraph>,
        targets: Vec<(ReadTarget, Api<DynamicObject>)>,
        gone: impl Fn(&ObjectRef<ResourceGraph>) -> bool,
    ) -> bool {
        let mut all_watches = lock(&self.watches);
        if targets.is_empty() && !all_watches.readers.contains(graph) {
            return true;
        }
        if targets.is_empty() {
            all_watches.readers.remove(graph);
        } else {
            all_watches.readers.insert(graph.clone());
        }
        all_watches.readers.retain(|g| !gone(g));
        let watches = &mut all_watches.by_target;
        let wanted: std::collections::HashSet<&ReadTarget> = targets.iter().map(|(t, _)| t).collect();
        watches.retain(|target, watch| {
            let mut graphs = lock(&watch.graphs);
            if !wanted.contains(target) {
                graphs.remove(graph);
            }
            graphs.retain(|g| !gone(g));
            !graphs.is_empty()
        });
        let namespace = graph.namespace.clone();
        let mut of_namespace = watches
            .values()
            .filter(|w| lock(&w.graphs).iter().any(|g| g.namespace == namespace))
            .count();
        let mut all = true;
        for (target, api) in targets {
            if let Some(watch) = watches.get_mut(&target) {
                if lock(&watch.graphs).insert(graph.clone()) {
                    let _ = self.trigger.send(graph.clone());
                }
                if watch.task.is_finished() {
                    watch.task = self.start(&target, api, watch.graphs.clone());
                }
                continue;
            }
            if watches.len() >= MAX_READ_WATCHES || of_namespace >= MAX_READ_WATCHES_PER_NAMESPACE {
                all = false;
                continue;
            }
            of_namespace += 1;
            let graphs: Readers = Arc::new(Mutex::new(std::collections::HashSet::from([graph.clone()])));
            let task = self.start(&target, api, graphs.clone());
            watches.insert(target, ReadWatch { graphs, task });
        }
        all
    }

    fn start(&self, target: &ReadTarget, api: Api<DynamicObject>, graphs: Readers) -> tokio::task::JoinHandle<()> {
        let mut config = watcher::Config::default();
        if let Some(name) = &target.name {
            config = config.fields(&format!("metadata.name={name}"));
        }
        if let Some(selector) = &target.selector {
            config = config.labels(selector);
        }
        let (trigger, shutdown, kind) = (self.trigger.clone(), self.shutdown.clone(), target.kind.clone());
        tokio::spawn(async move {
            let events = watcher(api, config)
                .default_backoff()
                .take_while(|event| futures::future::ready(!matches!(event, Err(e) if forbidden(e))))
                .for_each(|event| {
                    let news = match event {
                        Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => true,
                        Ok(_) => false,
                        Err(e) => {
                            tracing::debug!(%kind, error = %e, "watch of a read object failed; retrying");
                            false
                        }
                    };
                    if news {
                        for graph in lock(&graphs).iter() {
                            let _ = trigger.send(graph.clone());
                        }
                    }
                    futures::future::ready(())
                });
            tokio::select! {
                _ = events => {}
                _ = shutdown.wait() => {}
            }
        })
    }
}

/// Whether the apiserver refused a watch to its reader: retrying would only be refused again.
fn forbidden(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 403,
        watcher::Error::WatchError(s) => s.code == 403,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(labels: serde_json::Value, annotations: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "x", "namespace": "team-a", "labels": labels, "annotations": annotations}
        }))
        .unwrap()
    }

    #[test]
    fn only_objects_naming_an_existing_graph_by_uid_are_ours() {
        let uid_of = |key: &ObjectRef<ResourceGraph>| {
            (key.name == "web" && key.namespace.as_deref() == Some("team-a")).then(|| "uid-1".to_string())
        };
        let labels = json!({GRAPH_LABEL: "web", MANAGED_BY_LABEL: MANAGED_BY_VALUE});
        assert!(made_by_existing_graph(
            &object(labels.clone(), json!({GRAPH_UID_ANNOTATION: "uid-1"})),
            uid_of
        ));
        assert!(
            !made_by_existing_graph(&object(labels.clone(), json!({GRAPH_UID_ANNOTATION: "uid-2"})), uid_of),
            "a uid of no graph"
        );
        assert!(!made_by_existing_graph(&object(labels, json!({})), uid_of), "no uid");
        let elsewhere = json!({GRAPH_LABEL: "web", (crate::api::names::GRAPH_NAMESPACE_LABEL): "team-b"});
        assert!(
            !made_by_existing_graph(&object(elsewhere, json!({GRAPH_UID_ANNOTATION: "uid-1"})), uid_of),
            "a graph of that name in another namespace"
        );
        assert!(!made_by_existing_graph(
            &object(json!({}), json!({GRAPH_UID_ANNOTATION: "uid-1"})),
            uid_of
        ));
    }

    fn graph(uid: &str, version: &str) -> ResourceGraph {
        serde_json::from_value(json!({
            "apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph",
            "metadata": {"name": "g", "namespace": "team-a", "uid": uid, "resourceVersion": version},
            "spec": {"nodes": []}
        }))
        .unwrap()
    }

    #[test]
    fn a_written_graph_is_forgotten_once_the_watch_brings_that_version_or_a_later_one() {
        let written: Written = Arc::default();
        let mine = graph("uid-1", "20");
        let remember = || {
            lock(&written).insert(ObjectRef::from_obj(&mine), Arc::new(mine.clone()));
        };
        remember();
        caught_up(&written, &graph("uid-1", "19"));
        assert_eq!(lock(&written).len(), 1, "an older version keeps the written one");
        caught_up(&written, &graph("uid-1", "20"));
        assert!(lock(&written).is_empty(), "the version written");
        remember();
        caught_up(&written, &graph("uid-1", "31"));
        assert!(lock(&written).is_empty(), "a later version");
        remember();
        caught_up(&written, &graph("uid-2", "5"));
        assert!(lock(&written).is_empty(), "a graph that replaced the one written");
        assert!(is_older(&graph("uid-1", "9"), &mine));
        assert!(!is_older(&graph("uid-1", "20"), &mine));
        assert!(
            !is_older(&graph("uid-2", "9"), &mine),
            "another graph of the name is not older"
        );
    }

    #[test]
    fn objects_of_a_graph_with_a_long_name_lead_to_that_graph() {
        let name = format!("webservice.apps.example.com-{}", "a".repeat(60));
        let labels = json!({GRAPH_LABEL: crate::naming::label_value(&name)});
        let obj = object(
            labels.clone(),
            json!({GRAPH_UID_ANNOTATION: "uid-1", (crate::api::names::GRAPH_NAME_ANNOTATION): name}),
        );
        let graph = owning_graph(&obj).unwrap();
        assert_eq!(
            (graph.name.as_str(), graph.namespace.as_deref()),
            (name.as_str(), Some("team-a"))
        );
        let uid_of = |key: &ObjectRef<ResourceGraph>| (key.name == name).then(|| "uid-1".to_string());
        assert!(made_by_existing_graph(&obj, uid_of));
        // Without the annotation the shortened label names no graph.
        let bare = object(labels, json!({GRAPH_UID_ANNOTATION: "uid-1"}));
        assert!(!made_by_existing_graph(&bare, uid_of));
    }
}
