//! The ResourceGraph controller: applies a graph's nodes in dependency order, waits on their
//! readiness gates, corrects drift, prunes removed nodes and tears the graph down in reverse
//! order when it is deleted.
//!
//! Reconciles never wait inside the worker: each applies what can be applied now, records it,
//! and returns; watch events of the applied objects (see [`super::watches`]) and readiness
//! deadlines bring the graph back.

use crate::api::condition_types::{AUTHORIZED, DEGRADED, PROGRESSING, READY, VALID};
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
use super::watches::{Lookup, ObjectWatches};
use crate::api::Transform;
use crate::api::{
    Condition, ConditionStatus, GraphPhase, InventoryEntry, Node, NodePhase, NodeState, ResourceGraph,
    ResourceGraphStatus, ResourceRef, has_condition, set_condition,
};
use crate::apply::{
    Applied, Applier, ApplyError, GraphIdentity, Predecessor, Resolved, ServiceAccount, desired_object, gvk_label,
};
use crate::authority::{self, Actor, GraphAccounts, TrustedNamespaces};
use crate::executor::ownership::{self, LetGo, Refusal};
use crate::executor::plan::{self, Write};
use crate::executor::progress;
use crate::executor::proof::{Grant, GraphKey, Origin};
use crate::graph::{self, Dag, reference};
use crate::readiness::Registry;
use crate::runtime::health::Health;
use crate::runtime::metrics::Metrics;
use crate::runtime::shutdown::Shutdown;
use GRAPH_FINALIZER as FINALIZER;

const CONTROLLER: &str = "resourcegraph";
/// Most (graph, instance) pairs remembered as checked; beyond it they are checked again.
const MAX_REMEMBERED_SOURCES: usize = 100_000;
/// What a graph in the shape of earlier releases is told.
const DEPRECATED_SHAPE_MESSAGE: &str = "the graph is valid; it is written in the shape of earlier releases \
     (spec.nodes with object and dependsOn), which is read until the API's next version: write spec.graph.nodes \
     with resource and dependencies";

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
}

impl super::harness::Retries for Context {
    fn backoff(&self) -> &super::harness::Backoff {
        &self.backoff
    }
    fn workers(&self) -> &super::harness::Workers {
        &self.workers
    }
}

impl super::harness::backoff::Reported for Context {
    type Object = ResourceGraph;
    fn recorder(&self) -> &kube::runtime::events::Recorder {
        &self.recorder
    }
    fn dyntype(&self) {}
}

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
    pub fn checking_grants(mut self, transforms: Store<Transform>, trusted: TrustedNamespaces) -> Self {
        self.transforms = Some(transforms);
        self.trusted = trusted;
        self
    }

    /// Why the Transform a rendered graph was signed for no longer stands behind it (see
    /// [`authority::withdrawn`]), or None. A refusal from the cache is confirmed with the
    /// apiserver first: the cache may not have seen a module version served a moment ago.
    async fn withdrawn(&self, grant: &Grant) -> Option<String> {
        let store = self.transforms.as_ref()?;
        if tokio::time::timeout(Duration::from_secs(30), store.wait_until_ready())
            .await
            .is_err()
        {
            return Some("the Transforms are not listed yet".into());
        }
        let find = |all: Vec<Arc<Transform>>| {
            all.into_iter()
                .find(|t| t.metadata.uid.as_deref() == Some(grant.transform_uid.as_str()))
        };
        let cached = find(store.state());
        let why = self.check_grant(grant, cached.as_deref())?;
        // A Transform the synced cache does not hold is gone; one it holds may have served a
        // version a moment ago that the cache has not seen: read that one Transform afresh.
        let Some(t) = cached else {
            return Some(why);
        };
        let api = Api::<Transform>::namespaced(self.client.clone(), &t.namespace().unwrap_or_default());
        match api.get_opt(&t.name_any()).await {
            Ok(fresh) => self.check_grant(grant, fresh.as_ref()),
            Err(e) => Some(format!("Transform {} could not be read: {e}", t.name_any())),
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
}

/// Runs the controller until shutdown. `triggers` names graphs whose objects changed.
pub async fn run(
    ctx: Arc<Context>,
    triggers: tokio::sync::mpsc::UnboundedReceiver<ObjectRef<ResourceGraph>>,
    concurrency: u16,
    health: Arc<Health>,
    shutdown: Shutdown,
) {
    let api: Api<ResourceGraph> = Api::all(ctx.client.clone());
    let controller = Controller::new(api, watcher::Config::default().any_semantic())
        .with_config(super::harness::runner_config(&ctx.workers, concurrency, &shutdown))
        .reconcile_on(futures::stream::unfold(triggers, |mut rx| async move {
            rx.recv().await.map(|r| (r, rx))
        }))
        .graceful_shutdown_on(shutdown.clone().wait_owned());
    let store = controller.store();
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
    super::harness::reconciled(&ctx.metrics, CONTROLLER, (&*ctx, &*rg), async {
        if rg.metadata.deletion_timestamp.is_some() {
            cleanup(&rg, &ctx).await
        } else {
            let rg = super::harness::finalized(&api(&rg, &ctx), &*rg, FINALIZER).await?;
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
        },
        Actor::ServiceAccount(account) => Acting {
            applier: ctx.applier.acting_as(&account)?,
            account: Some(account),
        },
    })
}

/// The graph's actor once its grant is checked: a rendered graph whose Transform no longer
/// stands behind it applies nothing.
async fn acting(rg: &ResourceGraph, ctx: &Context, grant: Option<&Grant>) -> Result<Acting, Refusal> {
    let withdrawn = match grant {
        Some(grant) => match ctx.withdrawn(grant).await {
            Some(why) => Some(why),
            None => ctx.source_gone(rg).await,
        },
        None => None,
    };
    if let Some(why) = withdrawn {
        return Err(Refusal {
            reason: reasons::GRANT_WITHDRAWN,
            message: format!("{why}; nothing is applied until it is rendered again"),
        });
    }
    actor(rg, ctx, Grant::origin(grant))
}

fn metric_name(g: &GraphIdentity) -> String {
    format!("{}/{}", g.namespace, g.name)
}

/// One node's result in a pass.
struct NodeOutcome {
    id: String,
    state: NodeState,
    inventory: Option<InventoryEntry>,
    /// When the node must be looked at again without any event (a readiness deadline).
    requeue: Option<Duration>,
    /// Whether a retry may succeed without a change (an API error, say).
    transient: bool,
    /// The reason the node failed for in this pass, if it did.
    failure: Option<&'static str>,
    event: Option<Event>,
    /// The object as observed in this pass, for the references of later nodes and outputs.
    live: Option<Value>,
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

    let dag = match graph::validate(&rg.spec.graph.nodes).and_then(|dag| {
        graph::validate_outputs(&rg.spec.outputs, &rg.spec.graph.nodes)?;
        Ok(dag)
    }) {
        Ok(dag) => dag,
        Err(e) => {
            return refuse(
                rg,
                ctx,
                &old,
                status,
                e.reason(),
                &e.to_string(),
                reasons::INVALID_GRAPH,
            )
            .await;
        }
    };
    let acting = match acting(rg, ctx, grant.as_ref()).await {
        Ok(acting) => acting,
        Err(refused) => return refuse(rg, ctx, &old, status, refused.reason, &refused.message, refused.reason).await,
    };
    if let Some(refused) = confinement(rg, ctx, origin).await {
        return refuse(rg, ctx, &old, status, refused.reason, &refused.message, refused.reason).await;
    }
    let valid = if rg.spec.legacy_shape {
        Condition::new(VALID, true, reasons::DEPRECATED_SHAPE, DEPRECATED_SHAPE_MESSAGE)
    } else {
        Condition::new(VALID, true, reasons::VALID, "the graph is valid")
    };
    set_condition(&mut status.conditions, valid, &time, generation);

    let mut outcomes = run_waves(ctx, rg, &graph, (origin, &acting), &dag, &old, &time).await;
    let authorized = authorization(&acting, grant.as_ref(), &outcomes);
    set_condition(&mut status.conditions, authorized, &time, generation);
    report_nodes(ctx, rg, &old, &mut outcomes, &time).await;

    // Inventory: what this spec applied (a node that failed this pass keeps the object it
    // applied before: it is still this graph's), plus pruned objects not yet gone.
    let current: BTreeSet<InventoryEntry> = outcomes
        .values()
        .filter_map(|o| {
            o.inventory
                .clone()
                .or_else(|| old.inventory.iter().find(|e| e.node_id == o.id).cloned())
        })
        .collect();
    let (pruning, prune_waiting) = prune(rg, ctx, &graph, &acting, &old.inventory, &current).await;
    status.inventory = current.iter().cloned().chain(pruning).collect();
    count_managed(ctx, &graph.uid, status.inventory.iter().cloned().collect());
    status.node_states = outcomes.iter().map(|(id, o)| (id.clone(), o.state.clone())).collect();
    status.outputs = outputs(&rg.spec.outputs, &outcomes, &old.outputs);

    let total = rg.spec.graph.nodes.len();
    let conclusion = progress::conclude(&old, &mut status, total, &prune_waiting, &time, generation);
    if let Some((result, seconds)) = conclusion.finished {
        ctx.metrics
            .dag_execution_duration_seconds
            .with_label_values(&[&metric_name(&graph), result])
            .observe(seconds);
    }
    if conclusion.became_ready {
        let note = format!("all {total} nodes are ready");
        publish(ctx, rg, EventType::Normal, reasons::READY, &note).await;
    }
    write_status(rg, ctx, &old, status).await?;

    let transient = outcomes.values().any(|o| o.transient);
    let deadline = outcomes.values().filter_map(|o| o.requeue).min();
    let next = progress::next_check(super::harness::RETRY, transient, !prune_waiting.is_empty(), deadline);
    Ok(Action::requeue(next))
}

/// The graph's outputs resolved against the objects of this pass. An output whose field is
/// not set yet is left out; one whose node was not looked at in this pass (it waits on its
/// dependencies) keeps its last value, so that the status does not flap.
fn outputs(
    templates: &BTreeMap<String, Value>,
    outcomes: &BTreeMap<String, NodeOutcome>,
    last: &BTreeMap<String, Value>,
) -> BTreeMap<String, Value> {
    let live = |node: &str| outcomes.get(node).and_then(|o| o.live.as_ref());
    templates
        .iter()
        .filter_map(|(name, template)| match reference::resolve(template, &live) {
            Ok(value) => Some((name.clone(), value)),
            Err(missing) if live(&missing.reference.node).is_none() => {
                last.get(name).map(|v| (name.clone(), v.clone()))
            }
            Err(_) => None,
        })
        .collect()
}

/// Applies the nodes wave by wave: a node whose dependencies are all ready is processed (those
/// of one wave at the same time, up to the concurrency limit); the others wait, saying on what.
async fn run_waves(
    ctx: &Context,
    rg: &ResourceGraph,
    graph: &GraphIdentity,
    (origin, acting): (Origin, &Acting),
    dag: &Dag,
    old: &ResourceGraphStatus,
    time: &Time,
) -> BTreeMap<String, NodeOutcome> {
    let nodes: BTreeMap<&str, &Node> = rg.spec.graph.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    let mut outcomes: BTreeMap<String, NodeOutcome> = BTreeMap::new();
    let mut states: BTreeMap<String, NodeState> = BTreeMap::new();
    for (wave, ids) in dag.waves.iter().enumerate() {
        let mut eligible = Vec::new();
        for id in ids {
            let waiting: Vec<&str> = dag.dependencies[id]
                .iter()
                .filter(|d| !states.get(*d).is_some_and(progress::is_ready))
                .map(String::as_str)
                .collect();
            let applied_before = old.inventory.iter().any(|e| &e.node_id == id);
            if progress::may_process(&waiting, applied_before) {
                eligible.push(id.clone());
                continue;
            }
            let message = progress::waiting_message(&waiting, &states);
            let state = progress::transition(old.node_states.get(id), NodePhase::Pending, Some(message), None, time);
            states.insert(id.clone(), state.clone());
            outcomes.insert(
                id.clone(),
                NodeOutcome {
                    id: id.clone(),
                    state,
                    inventory: old.inventory.iter().find(|e| &e.node_id == id).cloned(),
                    requeue: None,
                    transient: false,
                    failure: None,
                    event: None,
                    live: None,
                },
            );
        }
        let lives: BTreeMap<&str, &Value> = outcomes
            .iter()
            .filter_map(|(id, o)| o.live.as_ref().map(|l| (id.as_str(), l)))
            .collect();
        let results: Vec<NodeOutcome> = futures::stream::iter(eligible)
            .map(|id| {
                let node = nodes[id.as_str()];
                let previous = old.node_states.get(&id);
                // References to earlier nodes' live fields are filled in now.
                let resolved = reference::resolve(&node.object, &|n: &str| lives.get(n).copied());
                async move {
                    match resolved {
                        Ok(object) if object == node.object => {
                            process_node(ctx, graph, (origin, acting), node, wave as u32, previous, time).await
                        }
                        Ok(object) => {
                            let node = Node { object, ..node.clone() };
                            process_node(ctx, graph, (origin, acting), &node, wave as u32, previous, time).await
                        }
                        Err(missing) => waiting_for_field(node, previous, time, &missing),
                    }
                }
            })
            .buffer_unordered(ctx.apply_concurrency)
            .collect()
            .await;
        for outcome in results {
            states.insert(outcome.id.clone(), outcome.state.clone());
            outcomes.insert(outcome.id.clone(), outcome);
        }
    }
    outcomes
}

/// Publishes the pass's node events and times the nodes that finished.
async fn report_nodes(
    ctx: &Context,
    rg: &ResourceGraph,
    old: &ResourceGraphStatus,
    outcomes: &mut BTreeMap<String, NodeOutcome>,
    time: &Time,
) {
    for (id, outcome) in outcomes.iter_mut() {
        if let Some(event) = outcome.event.take() {
            publish_event(ctx, rg, event).await;
        }
        if let Some((result, seconds)) = progress::node_finished(old.node_states.get(id), &outcome.state, time) {
            ctx.metrics
                .dag_node_execution_duration_seconds
                .with_label_values(&[id, result])
                .observe(seconds);
        }
    }
}

/// The first node the graph may not apply, among those whose kind discovery knows (the others
/// are checked when they resolve): a graph that reaches too far applies nothing.
async fn confinement(rg: &ResourceGraph, ctx: &Context, origin: Origin) -> Option<Refusal> {
    let namespace = rg.namespace().unwrap_or_default();
    for node in &rg.spec.graph.nodes {
        if let Ok(resolved) = ctx.applier.resolve(node.api_version(), node.kind()).await
            && let Some(refused) = plan::confinement(node, resolved.namespaced, &namespace, origin)
        {
            return Some(refused);
        }
    }
    None
}

/// Records a graph that is not applied at all (invalid, or reaching too far): Valid and Ready
/// false with `reason`, one `event_reason` Warning when this is news.
async fn refuse(
    rg: &ResourceGraph,
    ctx: &Context,
    old: &ResourceGraphStatus,
    mut status: ResourceGraphStatus,
    reason: &str,
    message: &str,
    event_reason: &str,
) -> Result<Action, Error> {
    let (time, generation) = (now(), rg.metadata.generation);
    for condition in [
        Condition::new(VALID, false, reason, message),
        Condition::new(READY, false, reason, "the graph is not applied; nothing was written"),
        Condition::new(PROGRESSING, false, reason, "the graph is not applied"),
        Condition::new(DEGRADED, true, reason, message),
    ] {
        set_condition(&mut status.conditions, condition, &time, generation);
    }
    status.phase = Some(GraphPhase::Failed);
    let news = old.phase != Some(GraphPhase::Failed)
        || !has_condition(&old.conditions, VALID, ConditionStatus::False, Some(reason))
        || old.conditions.iter().any(|c| c.type_ == VALID && c.message != message);
    if news {
        publish(ctx, rg, EventType::Warning, event_reason, message).await;
    }
    write_status(rg, ctx, old, status).await?;
    // A Transform may stand behind its graph again without the graph changing (its status
    // catches up, an allowance is restored); every other refusal waits for a new spec.
    Ok(if reason == reasons::GRANT_WITHDRAWN {
        Action::requeue(super::harness::RETRY)
    } else {
        Action::await_change()
    })
}

/// The `Authorized` condition of a pass: whose rights the graph acts with, and what the
/// apiserver refused that account.
fn authorization(acting: &Acting, grant: Option<&Grant>, outcomes: &BTreeMap<String, NodeOutcome>) -> Condition {
    let Some(account) = &acting.account else {
        let allowance = grant.map_or("", |g| g.allowance.as_str());
        return Condition::new(
            AUTHORIZED,
            true,
            reasons::TRANSFORM_AUTHORITY,
            format!("applied with its Transform's authority ({allowance})"),
        );
    };
    let refused: Vec<String> = outcomes
        .values()
        .filter(|o| o.failure == Some(reasons::FORBIDDEN))
        .map(|o| format!("node {}: {}", o.id, o.state.message.as_deref().unwrap_or_default()))
        .collect();
    if refused.is_empty() {
        Condition::new(
            AUTHORIZED,
            true,
            reasons::SERVICE_ACCOUNT,
            format!("acts as service account {account}"),
        )
    } else {
        Condition::new(
            AUTHORIZED,
            false,
            reasons::FORBIDDEN,
            truncate(format!(
                "acts as service account {account}, which may not do what {} of its nodes need: {}",
                refused.len(),
                refused.join("; ")
            )),
        )
    }
}

fn hash(value: &Value) -> String {
    hex::encode(Sha256::digest(value.to_string().as_bytes()))
}

/// Why a node failed in this pass.
struct Failure {
    message: String,
    /// Whether a retry may succeed without a change.
    transient: bool,
    /// Stable reason of its event.
    reason: &'static str,
}

impl Failure {
    fn of(e: &ApplyError) -> Self {
        Self {
            message: e.to_string(),
            transient: e.is_transient(),
            reason: e.reason(),
        }
    }

    fn refused(refusal: Refusal, transient: bool) -> Self {
        Self {
            message: refusal.message,
            transient,
            reason: refusal.reason,
        }
    }
}

/// One node's pass: resolve its kind, check that the graph may reach it, look at the object,
/// ask the planner, write what it says, and read the outcome.
async fn process_node(
    ctx: &Context,
    graph: &GraphIdentity,
    (origin, acting): (Origin, &Acting),
    node: &Node,
    wave: u32,
    previous: Option<&NodeState>,
    time: &Time,
) -> NodeOutcome {
    let resolved = match ctx.applier.resolve(node.api_version(), node.kind()).await {
        Ok(r) => r,
        Err(e) => return failed(node, previous, time, Failure::of(&e)),
    };
    if let Some(refused) = plan::confinement(node, resolved.namespaced, &graph.namespace, origin) {
        return failed(node, previous, time, Failure::refused(refused, false));
    }
    let (desired, inventory) = planned(node, wave, graph, &resolved);
    let live = match live_object(ctx, acting, &resolved, &inventory).await {
        Ok(live) => live,
        Err(e) => return failed(node, previous, time, Failure::of(&e)),
    };
    let desired_hash = hash(&desired);
    let memory_key = (graph.uid.clone(), node.id.clone());
    let unchanged_since_apply = live.as_ref().is_some_and(|l| {
        ctx.applied.lock().unwrap_or_else(|p| p.into_inner()).get(&memory_key)
            == Some(&(desired_hash.clone(), l.resource_version().unwrap_or_default()))
    });
    let live_value = live.as_ref().map(|l| typed(l, node));
    let plan = plan::plan_node(node, desired, live_value.as_ref(), graph, unchanged_since_apply);
    let (object, applied_at) = match (plan.write, live) {
        // Retried: the object may go away, or be adopted by a changed node.
        (Write::Refuse(refused), _) => return failed(node, previous, time, Failure::refused(refused, true)),
        (Write::Nothing, Some(live)) => (live, previous.and_then(|p| p.applied_at.clone())),
        (Write::Nothing, None) => {
            let vanished = Failure {
                message: "the object vanished".into(),
                transient: true,
                reason: reasons::APPLY_FAILED,
            };
            return failed(node, previous, time, vanished);
        }
        (write, live) => match write_node(acting, graph, node, &resolved, &plan.desired, write, live).await {
            Ok(Applied { object, wrote: true }) => {
                let rv = object.resource_version().unwrap_or_default();
                ctx.applied
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(memory_key, (desired_hash, rv));
                (object, Some(time.clone()))
            }
            // Created a moment earlier by someone else (Create mode): found, not written.
            Ok(Applied { object, wrote: false }) => (object, previous.and_then(|p| p.applied_at.clone())),
            Err(e) => return failed(node, previous, time, Failure::of(&e)),
        },
    };
    let written = Written {
        object,
        inventory,
        applied_at,
        adopted_from: plan.adopted_from,
    };
    observed_node(ctx, graph, node, written, previous, time).await
}

/// The object as it is. The cache holds only objects that already carry Pequod's labels: a
/// miss is absent or not this graph's, and the apiserver tells which before any write, so that
/// an object this graph did not make is never taken over by accident. A graph acting as a
/// service account reads from the cache only what an access review says the account may read;
/// everything else it reads with the account's own rights.
async fn live_object(
    ctx: &Context,
    acting: &Acting,
    resolved: &Resolved,
    entry: &InventoryEntry,
) -> Result<Option<DynamicObject>, ApplyError> {
    let namespace = entry.namespace.as_deref();
    if let Lookup::Known(Some(o)) = ctx.watches.lookup(resolved, namespace, &entry.name) {
        let readable = match &acting.account {
            None => true,
            Some(account) => ctx
                .reads
                .may_get(&ctx.client, account, &resolved.resource, namespace)
                .await
                .unwrap_or(false),
        };
        if readable {
            return Ok(Some((*o).clone()));
        }
    }
    acting.applier.get(resolved, namespace, &entry.name).await
}

/// Carries out a planned [`Write::Apply`]: applies the object as the graph's field manager
/// (taking it over from the predecessor graph when asked) and releases earlier managers.
async fn write_node(
    acting: &Acting,
    graph: &GraphIdentity,
    node: &Node,
    resolved: &Resolved,
    desired: &Value,
    write: Write,
    live: Option<DynamicObject>,
) -> Result<Applied, ApplyError> {
    let Write::Apply {
        reclaim,
        take_over,
        release_managers,
    } = write
    else {
        return Err(ApplyError::Invalid {
            message: "nothing to write".into(),
        });
    };
    let manager = plan::field_manager(node, graph);
    let desired = if take_over {
        &plan::taking_over(desired, &graph.uid)
    } else {
        desired
    };
    let applied = acting
        .applier
        .apply(node, &manager, resolved, desired, live.as_ref(), reclaim)
        .await?;
    let empty = plan::manager_release(desired);
    for earlier in release_managers {
        if let Err(e) = acting.applier.release_manager(resolved, &empty, &earlier).await {
            // The next pass finds the manager again and retries.
            tracing::warn!(error = %e, node = %node.id, manager = %earlier, "releasing an earlier field manager failed");
        }
    }
    Ok(applied)
}

/// A node whose object references a field an earlier node does not have yet: nothing is
/// applied (never an empty value); the earlier object's watch brings the graph back.
fn waiting_for_field(
    node: &Node,
    previous: Option<&NodeState>,
    time: &Time,
    missing: &reference::Missing,
) -> NodeOutcome {
    NodeOutcome {
        id: node.id.clone(),
        state: progress::transition(previous, NodePhase::Pending, Some(missing.to_string()), None, time),
        inventory: None,
        requeue: None,
        transient: false,
        failure: None,
        event: None,
        live: None,
    }
}

/// A failed node's outcome, with one event per failure rather than one per pass.
fn failed(node: &Node, previous: Option<&NodeState>, time: &Time, failure: Failure) -> NodeOutcome {
    let Failure {
        message,
        transient,
        reason,
    } = failure;
    let news = previous.is_none_or(|p| p.phase != NodePhase::Error || p.last_error.as_deref() != Some(&message));
    NodeOutcome {
        id: node.id.clone(),
        state: progress::transition(
            previous,
            NodePhase::Error,
            Some(message.clone()),
            Some(message.clone()),
            time,
        ),
        inventory: None,
        requeue: None,
        transient,
        failure: Some(reason),
        event: news.then(|| warning(reason, format!("node {}: {message}", node.id))),
        live: None,
    }
}

/// A node's object once written (or found), and what the pass knows of it.
struct Written {
    object: DynamicObject,
    /// The entry the object has in the inventory if it is this graph's.
    inventory: InventoryEntry,
    applied_at: Option<Time>,
    /// Field managers the object had before the node adopted it.
    adopted_from: Option<String>,
}

/// A node's outcome once its object is written (or found): inventory, readiness, state.
async fn observed_node(
    ctx: &Context,
    graph: &GraphIdentity,
    node: &Node,
    written: Written,
    previous: Option<&NodeState>,
    time: &Time,
) -> NodeOutcome {
    let Written {
        object,
        inventory,
        applied_at,
        adopted_from,
    } = written;
    let value = typed(&object, node);
    let resource_ref = ResourceRef {
        api_version: node.api_version().into(),
        kind: node.kind().into(),
        namespace: inventory.namespace.clone(),
        name: inventory.name.clone(),
        uid: object.uid(),
    };
    // Only what this graph wrote goes into its inventory, with the uid that teardown checks: an
    // object a Create node merely found stays someone else's.
    let inventory = (ownership::owner(&value, graph) == ownership::Owner::ThisGraph).then(|| InventoryEntry {
        uid: object.uid(),
        ..inventory
    });
    let (phase, message, requeue, error) = progress::readiness(&ctx.readiness, node, &value, previous, time).await;
    let event = error
        .as_ref()
        .filter(|_| previous.is_none_or(|p| p.phase != NodePhase::Error))
        .map(|e| warning(progress::readiness_event_reason(e), format!("node {}: {e}", node.id)));
    let adopting = node.apply_policy.mode == crate::api::ApplyMode::Adopt;
    let phase = if phase == NodePhase::Ready && adopting && adopted_from.is_some() {
        NodePhase::Adopted
    } else {
        phase
    };
    let mut state = progress::transition(previous, phase, message, error, time);
    state.applied_at = applied_at;
    state.adopted = adopting.then_some(adopted_from.is_some());
    state.previous_managers = adopted_from
        .iter()
        .flat_map(|m| m.split(','))
        .map(str::to_string)
        .collect();
    state.resource_ref = Some(resource_ref);
    NodeOutcome {
        id: node.id.clone(),
        state,
        inventory,
        requeue,
        transient: false,
        failure: None,
        event,
        live: Some(value),
    }
}

/// `object` as JSON with its `apiVersion` and `kind`, which objects listed into a watch cache
/// come without: comparisons with the desired object and gates (a Secret's values are never
/// quoted) need them.
fn typed(object: &DynamicObject, node: &Node) -> Value {
    let mut value = serde_json::to_value(object).unwrap_or_default();
    if let Some(fields) = value.as_object_mut() {
        fields.entry("apiVersion").or_insert_with(|| node.api_version().into());
        fields.entry("kind").or_insert_with(|| node.kind().into());
    }
    value
}

fn warning(reason: &str, note: String) -> Event {
    Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(truncate(note)),
        action: "Apply".into(),
        secondary: None,
    }
}

async fn publish(ctx: &Context, rg: &ResourceGraph, type_: EventType, reason: &str, note: &str) {
    publish_event(ctx, rg, reconcile_event(type_, reason, note)).await;
}

async fn publish_event(ctx: &Context, rg: &ResourceGraph, event: Event) {
    super::harness::publish(&ctx.recorder, rg.object_ref(&()), event);
}

/// The graph's status as last known: the one this process wrote, when the cached graph
/// predates that write.
fn last_status(rg: &ResourceGraph, ctx: &Context, uid: &str) -> ResourceGraphStatus {
    ctx.written
        .last(uid, rg.metadata.resource_version.as_ref(), rg.status.as_ref())
}

async fn write_status(
    rg: &ResourceGraph,
    ctx: &Context,
    old: &ResourceGraphStatus,
    status: ResourceGraphStatus,
) -> Result<(), Error> {
    let writer = super::harness::status::StatusWriter {
        api: api(rg, ctx),
        type_meta: (crate::api::API_VERSION, "ResourceGraph"),
        manager: GRAPH_STATUS_MANAGER,
        memory: &ctx.written,
        recorder: &ctx.recorder,
        owned: super::harness::status::whole,
    };
    writer.write(rg, old, &status).await
}

/// Updates `pequod_resources_managed` from the inventory's changes.
fn count_managed(ctx: &Context, graph_uid: &str, inventory: BTreeSet<InventoryEntry>) {
    let mut counted = ctx.counted.lock().unwrap_or_else(|p| p.into_inner());
    let before = counted.remove(graph_uid).unwrap_or_default();
    let gauge = |e: &InventoryEntry| {
        ctx.metrics.resources_managed.with_label_values(&[
            &gvk_label(&e.api_version, &e.kind),
            e.namespace.as_deref().unwrap_or(""),
        ])
    };
    for gone in before.difference(&inventory) {
        gauge(gone).dec();
    }
    for new in inventory.difference(&before) {
        gauge(new).inc();
    }
    if !inventory.is_empty() {
        counted.insert(graph_uid.to_string(), inventory);
    }
}

/// Whether an inventory entry's object still exists. The caches hold only objects that carry
/// Pequod's labels, so a miss is asked of the apiserver: an object with the same name but
/// without them is someone else's, and teardown says so rather than pass it over in silence.
async fn existing(
    ctx: &Context,
    acting: &Acting,
    entry: &InventoryEntry,
) -> Result<Option<(Resolved, DynamicObject)>, ApplyError> {
    let resolved = ctx.applier.resolve(&entry.api_version, &entry.kind).await?;
    let object = live_object(ctx, acting, &resolved, entry).await?;
    Ok(object.map(|o| (resolved, o)))
}

/// Lets go of the objects of `entries` in reverse wave order: deletes what this graph made
/// (only the highest wave that still has objects; lower waves wait until it is gone), releases
/// what is to keep running, and leaves alone what is not this graph's (see
/// [`ownership::let_go`]), saying so in an event. An entry that could not be looked up counts
/// as present, since a failed lookup says nothing about whether the object is gone, and holds
/// back every lower wave. Returns the entries still present, and why lookups failed.
async fn teardown(
    ctx: &Context,
    rg: &ResourceGraph,
    (graph, acting): (&GraphIdentity, &Acting),
    entries: &[InventoryEntry],
) -> (Vec<InventoryEntry>, Vec<String>) {
    let mut present: Vec<(InventoryEntry, Resolved, DynamicObject)> = Vec::new();
    let mut unknown: Vec<InventoryEntry> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    // A graph writes only in its own namespace; an entry elsewhere was written into the status
    // by someone else, and is neither read nor deleted (its existence would be told).
    let (entries, foreign): (Vec<&InventoryEntry>, Vec<&InventoryEntry>) = entries
        .iter()
        .partition(|e| e.namespace.as_ref().is_none_or(|ns| *ns == graph.namespace));
    for entry in foreign {
        tracing::warn!(kind = %entry.kind, name = %entry.name, "an inventory entry outside the graph's namespace is ignored");
    }
    for entry in entries {
        match existing(ctx, acting, entry).await {
            Ok(Some((resolved, object))) => present.push((entry.clone(), resolved, object)),
            Ok(None) => {}
            // A kind the apiserver says it no longer serves has no objects left.
            Err(ApplyError::UnknownKind { .. }) => {}
            Err(e) => {
                tracing::warn!(error = %e, kind = %entry.kind, name = %entry.name, "looking up object to delete failed");
                failures.push(format!("{} {}: {e}", entry.kind, entry.name));
                unknown.push(entry.clone());
            }
        }
    }
    let mut to_delete = Vec::new();
    let mut remaining = unknown;
    for (entry, resolved, object) in present {
        match ownership::let_go(&entry, &serde_json::to_value(&object).unwrap_or_default(), graph) {
            LetGo::Delete => to_delete.push((entry, resolved, object)),
            LetGo::Release(why) => match acting.applier.release(&resolved, &object, &graph.uid).await {
                Ok(()) => publish(ctx, rg, EventType::Normal, reasons::OBJECT_RELEASED, &why).await,
                Err(e) => {
                    tracing::warn!(error = %e, name = %entry.name, "releasing object failed");
                    remaining.push(entry);
                }
            },
            LetGo::Leave(why) => publish(ctx, rg, EventType::Warning, reasons::OBJECT_NOT_OWNED, &why).await,
        }
    }
    let top = to_delete
        .iter()
        .map(|(e, _, _)| e.wave)
        .chain(remaining.iter().map(|e| e.wave))
        .max();
    for (entry, resolved, object) in to_delete {
        let deletable = Some(entry.wave) == top && object.metadata.deletion_timestamp.is_none();
        if deletable
            && let Err(e) = acting
                .applier
                .delete(&resolved, entry.namespace.as_deref(), &entry.name)
                .await
        {
            tracing::warn!(error = %e, name = %entry.name, "deleting object failed");
        }
        remaining.push(entry);
    }
    (remaining, failures)
}

/// Removes objects of nodes no longer in the spec (or whose object changed identity).
/// Returns (entries still present, entries the graph waits on).
async fn prune(
    rg: &ResourceGraph,
    ctx: &Context,
    graph: &GraphIdentity,
    acting: &Acting,
    inventory: &[InventoryEntry],
    current: &BTreeSet<InventoryEntry>,
) -> (Vec<InventoryEntry>, Vec<InventoryEntry>) {
    let same_object = |a: &InventoryEntry, b: &InventoryEntry| {
        a.api_version == b.api_version && a.kind == b.kind && a.namespace == b.namespace && a.name == b.name
    };
    let in_spec: HashSet<&str> = rg.spec.graph.nodes.iter().map(|n| n.id.as_str()).collect();
    let stale: Vec<InventoryEntry> = inventory
        .iter()
        .filter(|e| !current.iter().any(|c| same_object(c, e)))
        .filter(|e| !in_spec.contains(e.node_id.as_str()) || current.iter().any(|c| c.node_id == e.node_id))
        .cloned()
        .collect();
    if stale.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let (remaining, _) = teardown(ctx, rg, (graph, acting), &stale).await;
    (remaining.clone(), remaining)
}

async fn cleanup(rg: &ResourceGraph, ctx: &Context) -> Result<Action, Error> {
    if !rg.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let (graph, grant) = identity(rg, ctx)?;
    // Teardown deletes only what carries this graph's uid; a graph acting as a service account
    // deletes with its rights, even once its Transform is gone.
    let origin = Grant::origin(grant.as_ref());
    let named = rg.spec.service_account_name.as_deref();
    // An account the lock refuses falls back to the default one, which it allows.
    let actor = authority::graph_actor(origin, named, &graph.namespace, &ctx.accounts)
        .or_else(|_| authority::graph_actor(origin, None, &graph.namespace, &ctx.accounts))
        .unwrap_or(Actor::ServiceAccount(ServiceAccount {
            namespace: graph.namespace.clone(),
            name: ctx.accounts.default.clone(),
        }));
    let acting = acting_with(ctx, actor)?;
    let old = rg.status.clone().unwrap_or_default();
    // The inventory, plus the spec's objects in case the operator stopped between applying
    // an object and recording it.
    let mut entries: Vec<InventoryEntry> = old.inventory.clone();
    if let Ok(dag) = graph::validate(&rg.spec.graph.nodes) {
        for entry in spec_entries(rg, ctx, &graph, &dag).await {
            if !entries.iter().any(|e| {
                e.kind == entry.kind
                    && e.name == entry.name
                    && e.namespace == entry.namespace
                    && e.api_version == entry.api_version
            }) {
                entries.push(entry);
            }
        }
    }
    let (remaining, failures) = teardown(ctx, rg, (&graph, &acting), &entries).await;
    count_managed(ctx, &graph.uid, remaining.iter().cloned().collect());
    if !remaining.is_empty() {
        let top = remaining.iter().map(|e| e.wave).max().unwrap_or(0);
        let waiting: Vec<String> = remaining
            .iter()
            .filter(|e| e.wave == top)
            .map(|e| format!("{} {}", e.kind, e.name))
            .collect();
        let mut status = old.clone();
        let time = now();
        set_condition(
            &mut status.conditions,
            Condition::new(
                READY,
                false,
                reasons::DELETING,
                format!(
                    "deleting in reverse dependency order; waiting for {}{}",
                    waiting.join(", "),
                    if failures.is_empty() {
                        String::new()
                    } else {
                        format!("; cannot look up {}", failures.join("; "))
                    }
                ),
            ),
            &time,
            rg.metadata.generation,
        );
        status.inventory = remaining;
        write_status(rg, ctx, &old, status).await?;
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    super::harness::remove_finalizer(&api(rg, ctx), rg, FINALIZER).await?;
    let name = metric_name(&graph);
    let _ = ctx.metrics.dag_nodes_total.remove_label_values(&[&name]);
    for result in ["success", "failure"] {
        let _ = ctx
            .metrics
            .dag_execution_duration_seconds
            .remove_label_values(&[&name, result]);
    }
    ctx.applied
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(uid, _), _| uid != &graph.uid);
    ctx.written.forget(&graph.uid);
    Ok(Action::await_change())
}

/// The object to apply for a node and the inventory entry it will have.
fn planned(node: &Node, wave: u32, graph: &GraphIdentity, resolved: &Resolved) -> (Value, InventoryEntry) {
    let desired = desired_object(node, graph, resolved.namespaced);
    let (namespace, name) = crate::apply::identity(&desired);
    let entry = InventoryEntry {
        node_id: node.id.clone(),
        api_version: node.api_version().into(),
        kind: node.kind().into(),
        namespace,
        name,
        wave,
        uid: None,
    };
    (desired, entry)
}

/// Inventory entries for the spec's nodes, as they would be applied.
async fn spec_entries(rg: &ResourceGraph, ctx: &Context, graph: &GraphIdentity, dag: &Dag) -> Vec<InventoryEntry> {
    let mut entries = Vec::new();
    for (wave, ids) in dag.waves.iter().enumerate() {
        for id in ids {
            let Some(node) = rg.spec.graph.nodes.iter().find(|n| &n.id == id) else {
                continue;
            };
            if let Ok(resolved) = ctx.applier.resolve(node.api_version(), node.kind()).await {
                entries.push(planned(node, wave as u32, graph, &resolved).1);
            }
        }
    }
    entries
}
