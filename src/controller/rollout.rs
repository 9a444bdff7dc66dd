//! Module rollouts, the kube side. For each served kind a driver plans what the module version
//! the Transform loaded last does to every instance, holds it behind the destructive-change
//! gate, and moves instances to it as the Transform's rollout policy says ([`crate::rollout`]
//! decides). It writes `status.rollout` and the `RolledOut` condition of the Transform with a
//! field manager of its own, so that it runs on instance changes without the Transform's
//! pipeline (fetching, CRD, RBAC) running each time.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::{Notify, mpsc, watch};
use tracing::Instrument;

use super::harness::Error;
use super::harness::status::{StatusMemory, StatusWriter};
use super::watches::{ObjectWatches, live_object};
use crate::api::condition_types::ROLLED_OUT;
use crate::api::names::{
    APPROVAL_ANNOTATION, INSTANCE_GROUP_LABEL, INSTANCE_KIND_LABEL, PIN_ANNOTATION, ROLLOUT_STATUS_MANAGER,
};
use crate::api::{PlanSummary, ResourceGraph, RolloutPhase, Transform, TransformStatus, reasons};
use crate::apply::{Applier, GraphIdentity, desired_object};
use crate::cue::{Module, Renderer, render_input};
use crate::executor::ownership::refusal;
use crate::executor::plan::field_manager;
use crate::executor::proof::Allowance;
use crate::instance_graph::{graph_name, label_value};
use crate::plan::InstancePlan;
use crate::rollout::{self, Affected, Gate, InstanceKey, Member, Memory, Policy, Selection, Step};
use crate::runtime::metrics::Metrics;

/// How long the driver lets instance changes gather before it looks.
const SETTLE: Duration = Duration::from_millis(300);
/// How long a driver whose plan failed waits before planning again.
const PLAN_RETRY: Duration = Duration::from_secs(5);
/// Safety resync of a driver without anything to wait for.
const RESYNC: Duration = Duration::from_secs(600);

/// What the Transform asks of its kind's rollout: the version it loaded and its policy.
#[derive(Clone, Debug)]
pub struct RolloutOrder {
    pub transform: Arc<Transform>,
    pub target: Module,
    pub policy: Policy,
    /// What the kind's graphs may reach, as the Transform was authorized.
    pub allowance: Allowance,
    /// Whether loading the target changed the kind's CRD (compatibly: a breaking change
    /// stops the Transform before any rollout).
    pub schema_changed: bool,
    /// The module versions the Transform has served (`status.servedDigests`), the target
    /// last: the only ones its instances may render with.
    pub served: Vec<String>,
}

/// The selection a kind's reconciles read; the driver replaces it.
pub type SelectionCell = Arc<RwLock<Arc<Selection>>>;

/// What planning needs from the operator.
pub struct Tools<'a> {
    pub client: &'a Client,
    pub renderer: &'a Renderer,
    pub applier: &'a Applier,
    /// The executor's object caches, where live objects are read first (the operator has
    /// them; `pequod plan` asks the apiserver).
    pub watches: Option<&'a ObjectWatches>,
}

/// What `module` would do to each of `instances`: each is rendered with it (the renders form
/// batches), confined as the kind's controller confines it, and compared with the graph it has.
/// The graphs are read with one list.
pub async fn plan_instances(
    tools: &Tools<'_>,
    resource: &ApiResource,
    namespace: Option<&str>,
    instances: &[Arc<DynamicObject>],
    module: &Module,
    cluster_scoped: bool,
) -> Result<Vec<InstancePlan>, kube::Error> {
    let graphs: Api<ResourceGraph> = match namespace {
        Some(ns) => Api::namespaced(tools.client.clone(), ns),
        None => Api::all(tools.client.clone()),
    };
    let selector = format!(
        "{INSTANCE_KIND_LABEL}={},{INSTANCE_GROUP_LABEL}={}",
        label_value(&resource.kind),
        label_value(&resource.group)
    );
    let graphs: BTreeMap<(String, String), ResourceGraph> = graphs
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .map(|g| ((g.namespace().unwrap_or_default(), g.name_any()), g))
        .collect();
    // In a stable order, so that summaries and tables read the same each time.
    let mut instances: Vec<&Arc<DynamicObject>> = instances.iter().collect();
    instances.sort_by_key(|o| instance_key(o));
    let renders = instances.iter().map(|obj| {
        let spec = obj.data.get("spec").cloned().unwrap_or_else(|| json!({}));
        tools.renderer.render(module, render_input(&obj.metadata, &spec))
    });
    let renders = futures::future::join_all(renders).await;
    let mut plans = Vec::with_capacity(instances.len());
    let mut pairs = instances.into_iter().zip(renders).peekable();
    while pairs.peek().is_some() {
        let chunk = pairs.by_ref().take(DRY_RUNS_IN_FLIGHT).map(|(obj, rendered)| {
            let graph = graphs
                .get(&(
                    obj.namespace().unwrap_or_default(),
                    graph_name(&resource.kind, &resource.group, &obj.name_any()),
                ))
                .filter(|g| {
                    obj.uid()
                        .is_some_and(|uid| g.owner_references().iter().any(|o| o.uid == uid))
                });
            plan_instance(tools, obj, graph, rendered, cluster_scoped)
        });
        plans.extend(futures::future::join_all(chunk).await);
    }
    Ok(plans)
}

/// Instances whose objects are dry-run at the same time.
const DRY_RUNS_IN_FLIGHT: usize = 16;

async fn plan_instance(
    tools: &Tools<'_>,
    obj: &DynamicObject,
    graph: Option<&ResourceGraph>,
    rendered: crate::cue::RenderResult,
    cluster_scoped: bool,
) -> InstancePlan {
    let namespace = obj.namespace().unwrap_or_default();
    let mut plan = InstancePlan {
        namespace: namespace.clone(),
        name: obj.name_any(),
        changes: Vec::new(),
        violations: Vec::new(),
        error: None,
    };
    let output = match rendered {
        Ok(output) => output,
        Err(e) => {
            plan.error = Some(e.to_string());
            return plan;
        }
    };
    let (nodes, violations) = tools.applier.confined(&output, &namespace, cluster_scoped).await;
    plan.violations = violations;
    let current = graph.map(|g| g.spec.graph.nodes.as_slice()).unwrap_or_default();
    let changes = crate::plan::diff(current, &nodes);
    plan.changes = match graph {
        Some(graph) => check_live(tools, graph, &nodes, changes).await,
        None => changes,
    };
    plan
}

/// Checks each update against the live object with a server-side apply dry run, as the graph's
/// executor would apply it: its paths become those the apply would change there (an update
/// the live object already holds drops out), and an immutable field the apiserver refuses makes
/// it a replacement. A creation whose name is held by an object the graph may not write is
/// refused, as the executor would refuse it. A node with `${…}` references, whose values exist
/// only at apply time, keeps what the comparison with the graph told.
async fn check_live(
    tools: &Tools<'_>,
    graph: &ResourceGraph,
    nodes: &[crate::api::Node],
    changes: Vec<crate::plan::Change>,
) -> Vec<crate::plan::Change> {
    use crate::plan::Change;
    let identity = GraphIdentity {
        name: graph.name_any(),
        namespace: graph.namespace().unwrap_or_default(),
        uid: graph.uid().unwrap_or_default(),
        predecessor: None,
    };
    let mut checked = Vec::with_capacity(changes.len());
    for change in changes {
        let (object, paths) = match &change {
            Change::Update { object, paths } => (object, paths.as_slice()),
            Change::Create { object } => (object, [].as_slice()),
            _ => {
                checked.push(change);
                continue;
            }
        };
        let node = nodes
            .iter()
            .find(|n| n.kind() == object.kind && n.name() == object.name)
            .filter(|n| !n.object.to_string().contains("${"));
        let Some(node) = node else {
            checked.push(change);
            continue;
        };
        let Ok(resolved) = tools.applier.resolve(node.api_version(), node.kind()).await else {
            checked.push(change);
            continue;
        };
        let desired = desired_object(node, &identity, resolved.namespaced);
        let namespace = desired.pointer("/metadata/namespace").and_then(|v| v.as_str());
        // The caches hold only objects of existing graphs: one in the way of a new object may
        // be anyone's, so creations ask the apiserver.
        let creating = matches!(change, Change::Create { .. });
        let cache = tools.watches.filter(|_| !creating);
        let live = live_object(cache, tools.applier, &resolved, (namespace, &object.name), || async {
            true
        })
        .await
        .ok()
        .flatten();
        let Some(live) = live else {
            checked.push(change);
            continue;
        };
        if let Change::Create { .. } = change {
            // The name is taken: the graph writes the object only when it is its own to write.
            let managers = crate::apply::other_managers(&live, "");
            let refused = serde_json::to_value(&live)
                .ok()
                .and_then(|live| refusal(node.apply_policy.mode, &live, &identity, &managers));
            checked.push(match refused {
                Some(r) => Change::Refused {
                    object: object.clone(),
                    why: r.message,
                },
                None => change,
            });
            continue;
        }
        let manager = field_manager(node, &identity);
        match tools
            .applier
            .dry_run(&resolved, namespace, &object.name, &desired, &manager)
            .await
        {
            Ok(after) => {
                let (live, after) = (serde_json::to_value(&live), serde_json::to_value(&after));
                let live_paths = match (live, after) {
                    (Ok(live), Ok(after)) => crate::plan::live_changes(&live, &after),
                    _ => paths.to_vec(),
                };
                if !live_paths.is_empty() {
                    checked.push(Change::Update {
                        object: object.clone(),
                        paths: live_paths,
                    });
                }
            }
            // The apiserver's message may quote live values: only the paths are told.
            Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains("immutable") => {
                checked.push(Change::Replace {
                    object: object.clone(),
                    why: format!("the apiserver refuses to change {} in place", paths.join(", ")),
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, object = %object, "dry run failed; the plan keeps the graph's comparison");
                checked.push(change);
            }
        }
    }
    checked
}

/// An instance as a rollout sees it. Only the two status fields it needs are read: the
/// driver looks at every instance on each pass.
pub fn member(obj: &DynamicObject) -> Member {
    let field = |pointer: &str| obj.data.pointer(pointer).cloned();
    Member {
        key: instance_key(obj),
        labels: obj.labels().clone(),
        digest: field("/status/moduleDigest").and_then(|d| d.as_str().map(String::from)),
        phase: field("/status/phase").and_then(|p| serde_json::from_value(p).ok()),
        pinned: obj.annotations().contains_key(PIN_ANNOTATION),
    }
}

pub fn instance_key(obj: &DynamicObject) -> InstanceKey {
    InstanceKey {
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
    }
}

/// Runs one kind's rollouts until `stopped`.
pub struct Driver {
    pub client: Client,
    pub renderer: Renderer,
    pub applier: Applier,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub watches: Option<Arc<ObjectWatches>>,
    pub resource: ApiResource,
    pub namespace: Option<String>,
    pub store: Store<DynamicObject>,
    pub selection: SelectionCell,
    pub orders: watch::Receiver<RolloutOrder>,
    /// Notified when an instance was reconciled.
    pub changed: Arc<Notify>,
    pub nudge: mpsc::UnboundedSender<ObjectRef<DynamicObject>>,
    pub nudge_all: mpsc::UnboundedSender<()>,
    /// The rollout's part of the Transform's status as this driver last wrote it.
    pub written: StatusMemory<TransformStatus>,
}

/// The rollout the driver is running.
struct Tracked {
    target: Module,
    /// The version before this rollout; `None` once it is complete.
    current: Option<Module>,
    memory: Memory,
    summary: PlanSummary,
    pending: BTreeMap<InstanceKey, String>,
}

impl Driver {
    pub async fn run(mut self, stopped: impl std::future::Future<Output = ()>) {
        tokio::pin!(stopped);
        let mut tracked: Option<Tracked> = None;
        loop {
            let span =
                tracing::info_span!("rollout", kind = %self.resource.kind, api_version = %self.resource.api_version);
            let wait = tokio::select! {
                wait = self.pass(&mut tracked).instrument(span) => wait,
                () = &mut stopped => break,
            };
            tokio::select! {
                () = &mut stopped => break,
                changed = self.orders.changed() => if changed.is_err() { break },
                () = self.changed.notified() => tokio::time::sleep(SETTLE).await,
                () = tokio::time::sleep(wait) => {}
            }
        }
        let transform = self.orders.borrow().transform.clone();
        forget_metrics(&self.metrics, &transform);
    }

    /// Looks at the instances once; returns how long to wait at most before the next look.
    async fn pass(&mut self, tracked: &mut Option<Tracked>) -> Duration {
        let order = self.orders.borrow_and_update().clone();
        if !super::harness::synced(&self.store).await {
            return RESYNC;
        }
        let instances = self.store.state();
        let members: Vec<Member> = instances.iter().map(|o| member(o)).collect();
        if tracked.as_ref().map(|t| &t.target.digest) != Some(&order.target.digest) {
            match self.begin(&order, tracked.take(), &instances, &members).await {
                Ok(begun) => *tracked = Some(begun),
                Err(e) => {
                    tracing::warn!(error = %e, kind = %self.resource.kind, "planning the rollout failed; trying again");
                    return PLAN_RETRY;
                }
            }
        }
        let Some(t) = tracked.as_mut() else {
            return PLAN_RETRY;
        };
        let target = order.target.digest.clone();
        let approved = order.transform.annotations().get(APPROVAL_ANNOTATION) == Some(&target);
        let gate = match t.summary.destructive {
            n if n > 0 && !approved => Gate::AwaitingApproval(n as usize),
            _ => Gate::Open,
        };
        let step = rollout::step(
            &order.policy,
            &target,
            &members,
            gate,
            &mut t.memory,
            jiff::Timestamp::now(),
        );
        if step.phase == RolloutPhase::Complete {
            t.current = None;
        }
        self.select(Selection {
            target: order.target.clone(),
            current: t.current.clone(),
            admission: step.admission.clone(),
            pending: if step.phase == RolloutPhase::Complete {
                BTreeMap::new()
            } else {
                t.pending.clone()
            },
        });
        if let Err(e) = self.report(&order, t, &step).await {
            tracing::warn!(error = %e, kind = %self.resource.kind, "writing the rollout status failed");
            return PLAN_RETRY;
        }
        step.recheck.unwrap_or(RESYNC)
    }

    /// Starts the rollout to the order's target: where the instances come from, and the plan.
    async fn begin(
        &self,
        order: &RolloutOrder,
        previous: Option<Tracked>,
        instances: &[Arc<DynamicObject>],
        members: &[Member],
    ) -> Result<Tracked, kube::Error> {
        let target = &order.target;
        let recorded = order.transform.status.as_ref().and_then(|s| s.rollout.clone());
        let (current, resumed) = match (&previous, &recorded) {
            (Some(p), _) => (p.current.as_ref().unwrap_or(&p.target).digest.clone().into(), None),
            (None, Some(r)) if r.target_digest == target.digest => (r.current_digest.clone(), Some(r)),
            (None, Some(r)) if r.phase == Some(RolloutPhase::Complete) => (Some(r.target_digest.clone()), None),
            (None, Some(r)) => (r.current_digest.clone().or(Some(r.target_digest.clone())), None),
            (None, None) => (None, None),
        };
        let current = match current.filter(|d| *d != target.digest) {
            Some(digest) => {
                let found = self.renderer.find(&digest, &target.platform).await;
                if found.is_none() {
                    tracing::warn!(%digest, kind = %self.resource.kind, "the module version instances had is not in the cache; new instances get the target");
                }
                found
            }
            None => None,
        };
        let memory = match resumed {
            Some(r) => {
                let batch = r
                    .batch
                    .zip(r.batch_started_at.as_ref())
                    .map(|(n, t)| (n.max(0) as u32, t.0));
                Memory::resume(&target.digest, members, batch)
            }
            None => Memory::new(&target.digest),
        };
        let tools = Tools {
            client: &self.client,
            renderer: &self.renderer,
            applier: &self.applier,
            watches: self.watches.as_deref(),
        };
        let cluster_scoped = order.allowance == Allowance::Cluster;
        let plans = plan_instances(
            &tools,
            &self.resource,
            self.namespace.as_deref(),
            instances,
            target,
            cluster_scoped,
        )
        .await?;
        let mut summary = crate::plan::summarize(&target.digest, &plans, &order.policy.protected_kinds);
        summary.schema = Some(
            if order.schema_changed {
                "changed, none breaking"
            } else {
                "unchanged"
            }
            .to_string(),
        );
        let pending = plans
            .iter()
            .filter_map(|p| {
                p.line().map(|line| {
                    (
                        p.key(),
                        format!("module {}: {line}", rollout::short_digest(&target.digest)),
                    )
                })
            })
            .collect();
        if previous.is_some() || recorded.as_ref().is_some_and(|r| r.target_digest != target.digest) {
            let message = format!(
                "rolling out module {}: {} of {} instance(s) change, {} object(s) created, {} updated, {} replaced, {} deleted",
                rollout::short_digest(&target.digest),
                summary.affected,
                summary.instances,
                summary.created,
                summary.updated,
                summary.replaced,
                summary.deleted
            );
            self.event(&order.transform, EventType::Normal, reasons::ROLLOUT_STARTED, message);
        }
        Ok(Tracked {
            target: target.clone(),
            current,
            memory,
            summary,
            pending,
        })
    }

    /// Replaces the kind's selection and looks again at the instances it may move.
    fn select(&self, selection: Selection) {
        let old = {
            let mut cell = self.selection.write().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *cell, Arc::new(selection))
        };
        let new = self.selection.read().unwrap_or_else(|p| p.into_inner()).clone();
        match rollout::affected(&old, &new) {
            Affected::None => {}
            Affected::All => {
                let _ = self.nudge_all.send(());
            }
            Affected::Some(keys) => {
                for key in keys {
                    let reference = ObjectRef::new_with(&key.name, self.resource.clone()).within(&key.namespace);
                    let _ = self.nudge.send(reference);
                }
            }
        }
    }

    /// Writes the rollout's part of the Transform's status when it changed, with its events
    /// and metrics.
    async fn report(&self, order: &RolloutOrder, t: &mut Tracked, step: &Step) -> Result<(), Error> {
        let transform: &Transform = &order.transform;
        let last = self.written.last(
            &transform.uid().unwrap_or_default(),
            transform.resource_version().as_ref(),
            transform.status.as_ref(),
        );
        let shown = last
            .rollout
            .clone()
            .zip(last.conditions.iter().find(|c| c.type_ == ROLLED_OUT).cloned());
        let versions = (t.target.digest.as_str(), t.current.as_ref().map(|m| m.digest.as_str()));
        let now = Time(jiff::Timestamp::now());
        let report = rollout::report(
            step,
            versions,
            &t.memory,
            &t.summary,
            shown.as_ref(),
            (&now, transform.metadata.generation),
        );
        self.metrics_of(transform, step);
        if shown.as_ref() == Some(&(report.status.clone(), report.condition.clone())) {
            return Ok(());
        }
        let writer = StatusWriter {
            api: Api::namespaced(self.client.clone(), &transform.namespace().unwrap_or_default()),
            type_meta: (crate::api::API_VERSION, "Transform"),
            manager: ROLLOUT_STATUS_MANAGER,
            memory: &self.written,
            recorder: &self.recorder,
            owned: rollout_part,
        };
        let new = TransformStatus {
            rollout: Some(report.status),
            conditions: vec![report.condition],
            ..TransformStatus::default()
        };
        writer.write(transform, &last, &new).await?;
        for (warning, reason, note) in report.events {
            if reason == reasons::BATCH_STARTED {
                let namespace = transform.namespace().unwrap_or_default();
                self.metrics
                    .rollout_batches_total
                    .with_label_values(&[namespace.as_str(), transform.name_any().as_str()])
                    .inc();
            }
            let type_ = if warning { EventType::Warning } else { EventType::Normal };
            self.event(transform, type_, reason, note);
        }
        Ok(())
    }

    fn metrics_of(&self, transform: &Transform, step: &Step) {
        let namespace = transform.namespace().unwrap_or_default();
        let name = transform.name_any();
        let labels = |last: &str| [namespace.clone(), name.clone(), last.to_string()];
        let c = step.counts;
        for (state, n) in [
            ("updated", c.updated),
            ("pending", c.pending),
            ("failed", c.failed),
            ("pinned", c.pinned),
        ] {
            let l = labels(state);
            self.metrics
                .rollout_instances
                .with_label_values(&[l[0].as_str(), l[1].as_str(), l[2].as_str()])
                .set(n as i64);
        }
        for phase in PHASES {
            let l = labels(phase_name(phase));
            self.metrics
                .rollout_phase
                .with_label_values(&[l[0].as_str(), l[1].as_str(), l[2].as_str()])
                .set(i64::from(phase == step.phase));
        }
    }

    fn event(&self, transform: &Transform, type_: EventType, reason: &str, note: String) {
        super::harness::publish(
            &self.recorder,
            transform.object_ref(&()),
            Event {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: "Rollout".into(),
                secondary: None,
            },
        );
    }
}

/// The driver's part of a Transform's status: `status.rollout` and the `RolledOut` condition.
fn rollout_part(status: &TransformStatus) -> TransformStatus {
    TransformStatus {
        rollout: status.rollout.clone(),
        conditions: status
            .conditions
            .iter()
            .filter(|c| c.type_ == ROLLED_OUT)
            .cloned()
            .collect(),
        ..TransformStatus::default()
    }
}

const PHASES: [RolloutPhase; 4] = [
    RolloutPhase::Progressing,
    RolloutPhase::Paused,
    RolloutPhase::Blocked,
    RolloutPhase::Complete,
];

fn phase_name(phase: RolloutPhase) -> &'static str {
    match phase {
        RolloutPhase::Progressing => "Progressing",
        RolloutPhase::Paused => "Paused",
        RolloutPhase::Blocked => "Blocked",
        RolloutPhase::Complete => "Complete",
    }
}

/// Removes a Transform's rollout series (its kind is no longer served).
fn forget_metrics(metrics: &Metrics, transform: &Transform) {
    let namespace = transform.namespace().unwrap_or_default();
    let name = transform.name_any();
    for state in ["updated", "pending", "failed", "pinned"] {
        let _ = metrics
            .rollout_instances
            .remove_label_values(&[namespace.as_str(), name.as_str(), state]);
    }
    for phase in PHASES {
        let _ = metrics
            .rollout_phase
            .remove_label_values(&[namespace.as_str(), name.as_str(), phase_name(phase)]);
    }
    let _ = metrics
        .rollout_batches_total
        .remove_label_values(&[namespace.as_str(), name.as_str()]);
}
