//! The ResourceGraph controller: applies a graph's nodes in dependency order, waits on their
//! readiness gates, corrects drift, prunes removed nodes and tears the graph down in reverse
//! order when it is deleted.
//!
//! Reconciles never wait inside the worker: each applies what can be applied now, records it,
//! and returns; watch events of the applied objects (see [`super::watches`]) and readiness
//! deadlines bring the graph back.

mod status;
mod teardown;
mod waves;

use status::{count_managed, last_status, publish, refuse, write_status};
use teardown::{cleanup, prune};
use waves::{NodeOutcome, authorization, outputs, report_nodes, run_waves};

use crate::api::condition_types::AUTHORIZED;
use crate::api::names::{
    GRAPH_FINALIZER, GRAPH_STATUS_MANAGER, PREDECESSOR_ANNOTATION, PROOF_ANNOTATION, TRANSFORM_LABEL,
};
use crate::api::reasons;
use crate::error::ErrorCategory;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::DynamicObject;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::harness::{Error, StatusMemory, now, reconcile_event, truncate};
use super::watches::{GraphCache, ObjectWatches, ReadTarget};
use crate::api::Transform;
use crate::api::{
    Condition, InventoryEntry, Node, NodePhase, NodeState, ResourceGraph, ResourceGraphStatus, ResourceRef,
    set_condition,
};
use crate::apply::{Applied, Applier, ApplyError, Read, Resolved, ServiceAccount};
use crate::authority::{self, Actor, GraphAccounts, TrustedNamespaces};
use crate::executor::object::{GraphIdentity, Predecessor, desired_object, gvk_label};
use crate::executor::ownership::{self, LetGo, Refusal};
use crate::executor::progress;
use crate::executor::proof::{Grant, GraphKey, Origin};
use crate::executor::write::{self, Write};
use crate::graph::{self, Dag, reference};
use crate::metrics::Metrics;
use crate::readiness::Registry;
use crate::runtime::health::Health;
use crate::runtime::shards::Shards;
use crate::runtime::shutdown::Shutdown;
use GRAPH_FINALIZER as FINALIZER;

const CONTROLLER: &str = "resourcegraph";

/// Most (graph, instance) pairs remembered as checked; beyond it they are checked again.
const MAX_REMEMBERED_SOURCES: usize = 100_000;

/// Everything a reconcile needs. Shared by all reconciles.
pub struct Context {
    pub client: Client,
    pub applier: Applier,
    /// Verifies the proof of graphs Pequod rendered.
    pub key: GraphKey,
    /// Whom graphs without a trusted Transform's authority act as.
    pub accounts: GraphAccounts,
    /// The Transforms, against which every rendered graph's grant is checked on every pass.
    transforms: Option<Store<Transform>>,
    trusted: TrustedNamespaces,
    /// What service accounts may read, for reads from the object caches.
    reads: super::access::ReadReviews,
    /// (graph uid, instance uid) of rendered graphs whose instance was found.
    sources: Mutex<HashSet<(String, String)>>,
    pub watches: Arc<ObjectWatches>,
    pub readiness: Registry,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Most nodes of one graph applied at the same time.
    pub apply_concurrency: usize,
    /// (graph uid, node id) → (hash of the object last applied, resourceVersion it produced):
    /// lets a reconcile skip objects nobody touched since.
    applied: Mutex<HashMap<(String, String), (String, String)>>,
    /// Inventory entries counted into `pequod_resources_managed`, per graph uid.
    counted: Mutex<HashMap<String, BTreeSet<InventoryEntry>>>,
    /// Statuses this process wrote, see [`StatusMemory`].
    written: StatusMemory<ResourceGraphStatus>,
    backoff: super::harness::Backoff,
    workers: super::harness::Workers,
    /// The shards this replica holds, when graphs are shared among replicas.
    shards: Option<Arc<Shards>>,
}

super::harness::backoff::controller_context!(Context, reports ResourceGraph);

impl Context {
    pub fn new(
        client: Client,
        applier: Applier,
        key: GraphKey,
        watches: Arc<ObjectWatches>,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        apply_concurrency: usize,
    ) -> Self {
        Self {
            client,
            applier,
            key,
            accounts: GraphAccounts::default(),
            transforms: None,
            trusted: TrustedNamespaces::new(Vec::new()),
            reads: Default::default(),
            sources: Mutex::default(),
            watches,
            readiness: Registry::default(),
            recorder,
            metrics,
            apply_concurrency: apply_concurrency.max(1),
            applied: Mutex::default(),
            counted: Mutex::default(),
            written: StatusMemory::default(),
            backoff: super::harness::Backoff::default(),
            workers: super::harness::Workers::default(),
            shards: None,
        }
    }
}

impl Context {
    /// Graphs without a trusted Transform's authority act as `accounts` says.
    pub fn acting_as(mut self, accounts: GraphAccounts) -> Self {
        self.accounts = accounts;
        self
    }

    /// Rendered graphs are checked against these Transforms, trusted as `trusted` says.
    /// Reconciles only the graphs of the shards this replica holds, and writes only while it
    /// holds them.
    pub fn sharing(mut self, shards: Arc<Shards>) -> Self {
        let fence = shards.clone();
        self.applier = self.applier.fenced_by(Arc::new(move || fence.fence().open()));
        self.shards = Some(shards);
        self
    }

    pub fn checking_grants(mut self, transforms: Store<Transform>, trusted: TrustedNamespaces) -> Self {
        self.transforms = Some(transforms);
        self.trusted = trusted;
        self
    }

    /// The `readNamespaces` of the Transform a rendered graph was signed for while it still
    /// stands behind the graph, or why it no longer does (see [`authority::withdrawn`]). A
    /// refusal from the cache is confirmed with the apiserver first: the cache may not have seen
    /// a module version served a moment ago. Without Transforms to check, none.
    async fn standing(&self, grant: &Grant) -> Result<Vec<String>, String> {
        let Some(store) = self.transforms.as_ref() else {
            return Ok(Vec::new());
        };
        if tokio::time::timeout(Duration::from_secs(30), store.wait_until_ready())
            .await
            .is_err()
        {
            return Err("the Transforms are not listed yet".into());
        }
        let cached = store
            .state()
            .into_iter()
            .find(|t| t.metadata.uid.as_deref() == Some(grant.transform_uid.as_str()));
        let reads = |t: &Transform| t.spec.read_namespaces.clone();
        let Some(why) = self.check_grant(grant, cached.as_deref()) else {
            return Ok(cached.as_deref().map(reads).unwrap_or_default());
        };
        // A Transform the synced cache does not hold is gone; one it holds may have served a
        // version a moment ago that the cache has not seen: read that one Transform afresh.
        let Some(t) = cached else {
            return Err(why);
        };
        let api = Api::<Transform>::namespaced(self.client.clone(), &t.namespace().unwrap_or_default());
        match api.get_opt(&t.name_any()).await {
            Ok(fresh) => match self.check_grant(grant, fresh.as_ref()) {
                Some(why) => Err(why),
                None => Ok(fresh.as_ref().map(reads).unwrap_or_default()),
            },
            Err(e) => Err(format!("Transform {} could not be read: {e}", t.name_any())),
        }
    }

    /// [`authority::withdrawn`] with the Transform's list of served versions, believed only
    /// with Pequod's proof.
    fn check_grant(&self, grant: &Grant, transform: Option<&Transform>) -> Option<String> {
        let served = transform
            .and_then(|t| t.status.as_ref())
            .filter(|s| {
                self.key.verify_served(
                    &grant.transform_uid,
                    &s.served_digests,
                    s.served_digests_proof.as_deref(),
                )
            })
            .map(|s| s.served_digests.as_slice())
            .unwrap_or_default();
        authority::withdrawn(grant, transform, served, &self.trusted)
    }

    /// Why a rendered graph no longer belongs to the instance it was rendered from (its signed
    /// `sourceRef`), or None. The graph must be owned by that instance, which must exist: a
    /// copy of a signed graph kept after its instance was deleted, or one cut loose from it,
    /// acts with no Transform's authority. The instance is looked up once per graph.
    async fn source_gone(&self, rg: &ResourceGraph) -> Option<String> {
        let source = rg.spec.source_ref.as_ref();
        let Some((source, uid)) = source.and_then(|s| Some((s, s.uid.as_deref()?))) else {
            return Some("the graph names no instance it was rendered from".into());
        };
        let what = format!("{} {}", source.kind, source.name);
        // The owner must be the instance itself, not only its uid under another kind: the
        // garbage collector deletes the graph once that owner is gone only if it can find it.
        if !rg.owner_references().iter().any(|o| {
            o.uid == uid
                && o.controller == Some(true)
                && o.api_version == source.api_version
                && o.kind == source.kind
                && o.name == source.name
        }) {
            return Some(format!(
                "the graph is no longer owned by {what}, which it was rendered from"
            ));
        }
        let key = (rg.uid().unwrap_or_default(), uid.to_string());
        if self.sources.lock().unwrap_or_else(|p| p.into_inner()).contains(&key) {
            return None;
        }
        let namespace = source.namespace.as_deref().or(rg.metadata.namespace.as_deref());
        let found = match self.applier.resolve(&source.api_version, &source.kind).await {
            Ok(resolved) => self.applier.get(&resolved, namespace, &source.name).await,
            Err(e) => Err(e),
        };
        match found {
            Ok(Some(instance)) if instance.metadata.uid.as_deref() == Some(uid) => {
                let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
                if sources.len() >= MAX_REMEMBERED_SOURCES {
                    sources.clear();
                }
                sources.insert(key);
                None
            }
            Ok(_) => Some(format!("{what}, which the graph was rendered from, no longer exists")),
            Err(e) => Some(format!(
                "{what}, which the graph was rendered from, could not be read: {e}"
            )),
        }
    }
}

/// Whose rights a pass reads and writes with: the operator's, within a trusted Transform's
/// allowance, or a service account's.
struct Acting {
    applier: Applier,
    account: Option<ServiceAccount>,
    /// Namespaces besides its own where the graph's `Read` nodes may read with the
    /// operator's rights: its Transform's `readNamespaces`.
    readable: Vec<String>,
}

/// Runs the controller until shutdown over the graph cache and the graphs it reports
/// (`graphs`); `triggers` names graphs whose objects changed.
pub async fn run(
    ctx: Arc<Context>,
    (cache, graphs): (
        Arc<GraphCache>,
        tokio::sync::mpsc::UnboundedReceiver<Arc<ResourceGraph>>,
    ),
    triggers: tokio::sync::mpsc::UnboundedReceiver<ObjectRef<ResourceGraph>>,
    concurrency: u16,
    health: Arc<Health>,
    shutdown: Shutdown,
) {
    let store = cache.store();
    let listed = futures::stream::unfold(graphs, |mut rx| async move { rx.recv().await.map(|g| (g, rx)) });
    let controller = Controller::for_shared_stream(listed, store.clone())
        .with_config(super::harness::runner_config(&ctx.workers, concurrency, &shutdown))
        .reconcile_on(futures::stream::unfold(triggers, |mut rx| async move {
            rx.recv().await.map(|r| (r, rx))
        }))
        .graceful_shutdown_on(shutdown.clone().wait_owned());
    let controller = controller.watches_stream(transform_changes(&ctx.client), {
        let graphs = store.clone();
        move |t: Transform| graphs_of(&graphs, &t)
    });
    ctx.watches.know_graphs(store);
    super::harness::run_controller(controller, reconcile, ctx, "resourcegraph-controller", health, shutdown).await;
}

/// Changes of Transforms' specs, which may change what their graphs are granted; status
/// writes (rollouts write many) are left out.
fn transform_changes(client: &Client) -> impl futures::Stream<Item = Result<Transform, watcher::Error>> + use<> {
    use kube::runtime::WatchStreamExt;
    use kube::runtime::predicates;
    watcher(Api::<Transform>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .touched_objects()
        .predicate_filter(predicates::generation, Default::default())
}

/// The graphs a Transform's instances render to, by the Transform label: a pass checks each
/// one's grant against the Transform as it is now.
fn graphs_of(graphs: &Store<ResourceGraph>, t: &Transform) -> Vec<ObjectRef<ResourceGraph>> {
    let name = t.name_any();
    graphs
        .state()
        .iter()
        .filter(|g| g.labels().get(TRANSFORM_LABEL) == Some(&name))
        .map(|g| ObjectRef::from_obj(&**g))
        .collect()
}

async fn reconcile(rg: Arc<ResourceGraph>, ctx: Arc<Context>) -> Result<Action, Error> {
    // A graph of a shard held elsewhere is that replica's; its shard is not handed over while
    // this pass runs.
    let (namespace, name) = (rg.namespace().unwrap_or_default(), rg.name_any());
    let super::harness::ShardEntry::Entered(_held) =
        super::harness::enter_shard(ctx.shards.as_deref(), &namespace, &name).await?
    else {
        return Ok(Action::await_change());
    };
    // The cache holds node objects as text; the pass reads them whole.
    let rg = super::cache::unpacked_graph(&rg);
    super::harness::reconciled(&ctx.metrics, CONTROLLER, (&*ctx, &rg), || async {
        if rg.metadata.deletion_timestamp.is_some() {
            cleanup(&rg, &ctx).await
        } else {
            let rg = super::harness::finalized(&api(&rg, &ctx), &rg, FINALIZER).await?;
            apply_graph(&rg, &ctx).await
        }
    })
    .await
}

fn api(rg: &ResourceGraph, ctx: &Context) -> Api<ResourceGraph> {
    Api::namespaced(ctx.client.clone(), &rg.namespace().unwrap_or_default())
}

/// The graph's identity, and the grant it was signed with (None for a graph Pequod did not
/// render as it is). Only a graph Pequod rendered and signed may name a predecessor whose
/// objects it takes over.
fn identity(rg: &ResourceGraph, ctx: &Context) -> Result<(GraphIdentity, Option<Grant>), Error> {
    let namespace = rg.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let annotation = |key: &str| rg.annotations().get(key).map(String::as_str);
    let predecessor = annotation(PREDECESSOR_ANNOTATION);
    let grant = ctx.key.verify(
        &namespace,
        &rg.name_any(),
        &rg.spec,
        annotation(PROOF_ANNOTATION),
        predecessor,
    );
    let graph = GraphIdentity {
        name: rg.name_any(),
        namespace,
        uid: rg.uid().ok_or(Error::MissingField("metadata.uid"))?,
        predecessor: predecessor.filter(|_| grant.is_some()).and_then(Predecessor::parse),
    };
    Ok((graph, grant))
}

/// Whose rights the graph's reads and writes are made with (see [`authority::graph_actor`]),
/// or why it may not be applied at all.
fn actor(rg: &ResourceGraph, ctx: &Context, origin: Origin) -> Result<Acting, Refusal> {
    let not_allowed = |message: String| Refusal {
        reason: reasons::NOT_ALLOWED,
        message,
    };
    let actor = authority::graph_actor(
        origin,
        rg.spec.service_account_name.as_deref(),
        &rg.namespace().unwrap_or_default(),
        &ctx.accounts,
    )
    .map_err(not_allowed)?;
    acting_with(ctx, actor).map_err(|e| not_allowed(e.to_string()))
}

fn acting_with(ctx: &Context, actor: Actor) -> Result<Acting, kube::Error> {
    Ok(match actor {
        Actor::Operator => Acting {
            applier: ctx.applier.clone(),
            account: None,
            readable: Vec::new(),
        },
        Actor::ServiceAccount(account) => Acting {
            applier: ctx.applier.acting_as(&account)?,
            account: Some(account),
            readable: Vec::new(),
        },
    })
}

/// The graph's actor once its grant is checked: a rendered graph whose Transform no longer
/// stands behind it applies nothing.
async fn acting(rg: &ResourceGraph, ctx: &Context, grant: Option<&Grant>) -> Result<Acting, Refusal> {
    let standing = match grant {
        Some(grant) => match ctx.standing(grant).await {
            Ok(readable) => ctx.source_gone(rg).await.map_or(Ok(readable), Err),
            Err(why) => Err(why),
        },
        None => Ok(Vec::new()),
    };
    let readable = standing.map_err(|why| Refusal {
        reason: reasons::GRANT_WITHDRAWN,
        message: format!("{why}; nothing is applied until it is rendered again"),
    })?;
    let mut acting = actor(rg, ctx, Grant::origin(grant))?;
    acting.readable = readable;
    Ok(acting)
}

fn metric_name(g: &GraphIdentity) -> String {
    format!("{}/{}", g.namespace, g.name)
}

async fn apply_graph(rg: &ResourceGraph, ctx: &Context) -> Result<Action, Error> {
    let (graph, grant) = identity(rg, ctx)?;
    let origin = Grant::origin(grant.as_ref());
    let old = last_status(rg, ctx, &graph.uid);
    let (time, generation) = (now(), rg.metadata.generation);
    let mut status = ResourceGraphStatus {
        observed_generation: generation,
        ..old.clone()
    };
    ctx.metrics
        .dag_nodes_total
        .with_label_values(&[&metric_name(&graph)])
        .set(rg.spec.graph.nodes.len() as i64);
    let (dag, acting) = match admit(rg, ctx, grant.as_ref(), origin).await {
        Ok(admitted) => admitted,
        Err((reason, message, event_reason)) => {
            // A refused graph reads nothing, so it watches nothing.
            ctx.watches.keep_reads(&ObjectRef::from_obj(rg), Vec::new());
            return refuse(rg, ctx, &old, status, reason, &message, event_reason).await;
        }
    };
    progress::validated(&mut status, rg.spec.legacy_shape, &time, generation);

    let mut outcomes = run_waves(ctx, rg, &graph, (origin, &acting), &dag, &old, &time).await;
    let reads_watched = watch_reads(rg, ctx, &graph, &acting).await;
    let authorized = authorization(&acting, grant.as_ref(), &outcomes);
    set_condition(&mut status.conditions, authorized, &time, generation);
    report_nodes(ctx, rg, &old, &mut outcomes, &time).await;

    let read: HashSet<&str> = rg
        .spec
        .graph
        .nodes
        .iter()
        .filter(|n| n.is_read())
        .map(|n| n.id.as_str())
        .collect();
    let current = current_inventory(&outcomes, &old, &read);
    let (pruning, prune_waiting) = prune(rg, ctx, &graph, &acting, &old.inventory, &current).await;
    status.inventory = current.iter().cloned().chain(pruning).collect();
    count_managed(ctx, &graph.uid, status.inventory.iter().cloned().collect());
    status.node_states = outcomes.iter().map(|(id, o)| (id.clone(), o.state.clone())).collect();
    status.outputs = outputs(&rg.spec.outputs, &outcomes, &old.outputs);
    conclude(
        ctx,
        (rg, grant.is_some()),
        &graph,
        (&old, &mut status),
        &prune_waiting,
        (&time, generation),
    )
    .await;
    write_status(rg, ctx, &old, status).await?;

    let transient = outcomes.values().any(|o| o.transient);
    // Objects beyond the watches' bound are looked at again on a timer.
    let unwatched = (!reads_watched).then_some(READ_POLL);
    let deadline = outcomes.values().filter_map(|o| o.requeue).chain(unwatched).min();
    let next = progress::next_check(super::harness::RETRY, transient, !prune_waiting.is_empty(), deadline);
    Ok(Action::requeue(next))
}

/// The graph's order and who it acts as, or why it applies nothing: an invalid graph, a
/// withdrawn grant, a node that reaches too far. The refusal is (reason, message, event reason).
async fn admit(
    rg: &ResourceGraph,
    ctx: &Context,
    grant: Option<&Grant>,
    origin: Origin,
) -> Result<(Dag, Acting), (&'static str, String, &'static str)> {
    let dag = graph::validate(&rg.spec.graph.nodes)
        .and_then(|dag| {
            graph::validate_outputs(&rg.spec.outputs, &rg.spec.graph.nodes)?;
            Ok(dag)
        })
        .map_err(|e| (e.reason(), e.to_string(), reasons::INVALID_GRAPH))?;
    let acting = acting(rg, ctx, grant)
        .await
        .map_err(|refused| (refused.reason, refused.message, refused.reason))?;
    if let Some(refused) = confinement(rg, ctx, origin, &acting.readable).await {
        return Err((refused.reason, refused.message, refused.reason));
    }
    Ok((dag, acting))
}

/// How often the objects of `Read` nodes are read again when no watch can be spared for them.
const READ_POLL: Duration = Duration::from_secs(60);

/// Watches what the graph's `Read` nodes read, with the graph's rights, and nothing else it
/// watched before. Whether every one is watched.
async fn watch_reads(rg: &ResourceGraph, ctx: &Context, graph: &GraphIdentity, acting: &Acting) -> bool {
    let mut targets = Vec::new();
    for node in rg.spec.graph.nodes.iter().filter(|n| n.is_read()) {
        if let Ok(resolved) = ctx.applier.resolve(node.api_version(), node.kind()).await {
            let target = waves::read_target(node, &resolved, &graph.namespace, acting);
            let api = acting.applier.api(&resolved, target.namespace.as_deref());
            targets.push((target, api));
        }
    }
    ctx.watches.keep_reads(&ObjectRef::from_obj(rg), targets)
}

/// Inventory: what this spec applied (a node that failed this pass keeps the object it
/// applied before: it is still this graph's). A `Read` node's object is never the graph's.
fn current_inventory(
    outcomes: &BTreeMap<String, NodeOutcome>,
    old: &ResourceGraphStatus,
    read: &HashSet<&str>,
) -> BTreeSet<InventoryEntry> {
    outcomes
        .values()
        .filter(|o| !read.contains(o.id.as_str()))
        .filter_map(|o| {
            o.inventory
                .clone()
                .or_else(|| old.inventory.iter().find(|e| e.node_id == o.id).cloned())
        })
        .collect()
}

/// Concludes the pass in the status; a finished execution is measured, and a graph that
/// became ready says so, unless it was `rendered` for an instance, which says it instead.
async fn conclude(
    ctx: &Context,
    (rg, rendered): (&ResourceGraph, bool),
    graph: &GraphIdentity,
    (old, status): (&ResourceGraphStatus, &mut ResourceGraphStatus),
    prune_waiting: &[InventoryEntry],
    (time, generation): (&Time, Option<i64>),
) {
    let total = rg.spec.graph.nodes.len();
    let conclusion = progress::conclude(old, status, total, prune_waiting, time, generation);
    if let Some((result, seconds)) = conclusion.finished {
        ctx.metrics
            .dag_execution_duration_seconds
            .with_label_values(&[&metric_name(graph), result])
            .observe(seconds);
    }
    if conclusion.became_ready && !rendered {
        let note = format!("all {total} nodes are ready");
        publish(ctx, rg, EventType::Normal, reasons::READY, &note).await;
    }
}

/// The first node the graph may not apply, among those whose kind discovery knows (the others
/// are checked when they resolve): a graph that reaches too far applies nothing.
async fn confinement(rg: &ResourceGraph, ctx: &Context, origin: Origin, readable: &[String]) -> Option<Refusal> {
    let namespace = rg.namespace().unwrap_or_default();
    for node in &rg.spec.graph.nodes {
        if let Ok(resolved) = ctx.applier.resolve(node.api_version(), node.kind()).await
            && let Some(refused) = node_confinement(node, &resolved, &namespace, origin, readable)
        {
            return Some(refused);
        }
    }
    None
}

/// Why the node may not be applied, or read, at all.
fn node_confinement(
    node: &Node,
    resolved: &Resolved,
    namespace: &str,
    origin: Origin,
    readable: &[String],
) -> Option<Refusal> {
    if node.is_read() {
        write::read_confinement(node, resolved.namespaced, namespace, origin, readable)
    } else {
        write::confinement(node, resolved.namespaced, namespace, origin)
    }
}
