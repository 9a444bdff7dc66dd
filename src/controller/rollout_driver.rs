//! Module rollouts, the kube side. For each served kind a driver plans what the module version
//! the Transform loaded last does to every instance ([`super::fleet_plan`]), holds it behind
//! the destructive-change gate, and moves instances to it as the Transform's rollout policy
//! says ([`crate::rollout`] decides). It writes `status.rollout` and the `RolledOut` condition of the Transform with a
//! field manager of its own, so that it runs on instance changes without the Transform's
//! pipeline (fetching, CRD, RBAC) running each time.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::{Notify, mpsc, watch};
use tracing::Instrument;

use super::fleet_plan::{Tools, instance_key, plan_instances};
use super::harness::Error;
use super::harness::status::{StatusMemory, StatusWriter};
use super::serving::{Publisher, Serving};
use super::watches::ObjectWatches;
use crate::api::condition_types::ROLLED_OUT;
use crate::api::names::{APPROVAL_ANNOTATION, PIN_ANNOTATION, ROLLOUT_STATUS_MANAGER};
use crate::api::{PlanSummary, RolloutPhase, Transform, TransformStatus, reasons};
use crate::apply::Applier;
use crate::cue::{Module, Renderer};
use crate::executor::proof::Allowance;
use crate::metrics::Metrics;
use crate::rollout::{self, Gate, InstanceKey, Member, Memory, Policy, Selection, Step};

/// How long the driver lets instance changes gather before it looks, while a rollout moves.
const SETTLE: Duration = Duration::from_millis(300);
/// How long it lets them gather when every instance may render with the target (the rollout
/// is complete, or moves every instance at once): a look then only counts instances for the
/// Transform's status, and it costs a pass over every instance.
const SETTLE_COUNTING: Duration = Duration::from_secs(5);
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

/// An instance as a rollout sees it. Only the two status fields it needs are read: the
/// driver looks at every instance on each pass.
pub fn member(obj: &DynamicObject) -> Member {
    let RolloutFields { status } = super::cache::body_fields(obj);
    Member {
        key: instance_key(obj),
        labels: obj.labels().clone(),
        digest: status.module_digest.as_ref().and_then(|d| d.as_str().map(String::from)),
        phase: status.phase.and_then(|p| serde_json::from_value(p).ok()),
        pinned: obj.annotations().contains_key(PIN_ANNOTATION),
    }
}

/// The status fields a rollout reads of every instance, without the rest of its body.
#[derive(serde::Deserialize, Default)]
struct RolloutFields {
    #[serde(default)]
    status: RolloutStatusFields,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RolloutStatusFields {
    #[serde(default)]
    module_digest: Option<serde_json::Value>,
    #[serde(default)]
    phase: Option<serde_json::Value>,
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
    /// Publishes the selection for the replicas that serve the instances (`--shards`); the
    /// store then holds only what [`member`] reads, and plans list the instances.
    pub publisher: Option<Arc<Publisher>>,
}

/// The rollout the driver is running.
struct Tracked {
    target: Module,
    /// The version before this rollout; `None` once it is complete.
    current: Option<Module>,
    memory: Memory,
    summary: PlanSummary,
    pending: BTreeMap<InstanceKey, String>,
    /// Whether the last pass admitted every instance to the target: later passes only count.
    counting_only: bool,
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
            let settle = if tracked.as_ref().is_some_and(|t| t.counting_only) {
                SETTLE_COUNTING
            } else {
                SETTLE
            };
            tokio::select! {
                () = &mut stopped => break,
                changed = self.orders.changed() => if changed.is_err() { break },
                // A new order cuts the settling short.
                () = self.changed.notified() => { let _ = tokio::time::timeout(settle, self.orders.changed()).await; }
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
        t.counting_only = step.admission == rollout::Admission::All;
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
        // The replicas serving the instances keep the last selection published until this one is.
        let published = self.publish(&order).await;
        if let Err(e) = &published {
            tracing::warn!(error = %e, kind = %self.resource.kind, "publishing the selection failed");
            let note = format!("the replicas serving the instances keep the selection published before: {e}");
            self.event(
                &order.transform,
                EventType::Warning,
                reasons::SERVING_NOT_PUBLISHED,
                note,
            );
        }
        if let Err(e) = self.report(&order, t, &step).await {
            tracing::warn!(error = %e, kind = %self.resource.kind, "writing the rollout status failed");
            return PLAN_RETRY;
        }
        match published {
            Ok(()) => step.recheck.unwrap_or(RESYNC),
            Err(_) => PLAN_RETRY,
        }
    }

    /// Starts the rollout to the order's target: where the instances come from, and the plan.
    async fn begin(
        &self,
        order: &RolloutOrder,
        previous: Option<Tracked>,
        instances: &[Arc<DynamicObject>],
        members: &[Member],
    ) -> Result<Tracked, kube::Error> {
        let recorded = order.transform.status.as_ref().and_then(|s| s.rollout.as_ref());
        let (current, memory) = self.starting_point(order, previous.as_ref(), recorded, members).await;
        let finished = recorded
            .filter(|r| previous.is_none() && r.target_digest == order.target.digest)
            .filter(|r| r.phase == Some(RolloutPhase::Complete))
            .and_then(|r| r.plan.clone());
        let (summary, pending) = match finished {
            // A restart finds this rollout complete: its recorded plan stands and nothing waits,
            // so no instance is planned (rendered and dry-run) again.
            Some(summary) => (summary, BTreeMap::new()),
            None => self.plan(order, instances).await?,
        };
        if previous.is_some() || recorded.is_some_and(|r| r.target_digest != order.target.digest) {
            self.announce(order, &summary);
        }
        Ok(Tracked {
            target: order.target.clone(),
            current,
            memory,
            summary,
            pending,
            counting_only: false,
        })
    }

    /// The version instances come from (the previous rollout's, or the one the status records)
    /// and the rollout's memory, resumed when the status records a rollout to this same target.
    async fn starting_point(
        &self,
        order: &RolloutOrder,
        previous: Option<&Tracked>,
        recorded: Option<&crate::api::RolloutStatus>,
        members: &[Member],
    ) -> (Option<Module>, Memory) {
        let target = &order.target;
        let (current, resumed) = match (previous, recorded) {
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
        (current, memory)
    }

    /// Plans every instance with the order's target: the summary, and each changing instance's
    /// line while it waits.
    async fn plan(
        &self,
        order: &RolloutOrder,
        instances: &[Arc<DynamicObject>],
    ) -> Result<(PlanSummary, BTreeMap<InstanceKey, String>), kube::Error> {
        let target = &order.target;
        let tools = Tools {
            client: &self.client,
            renderer: &self.renderer,
            applier: &self.applier,
            watches: self.watches.as_deref(),
            read_namespaces: &order.transform.spec.read_namespaces,
        };
        let cluster_scoped = order.allowance == Allowance::Cluster;
        // The plan reads the instances whole: the store holds their bodies as text, or on a
        // sharded leader only the rollout's fields.
        let whole = match &self.publisher {
            Some(_) => self.list_instances().await?,
            None => instances
                .iter()
                .map(|o| Arc::new(super::cache::unpacked_object(o)))
                .collect(),
        };
        let plans = plan_instances(
            &tools,
            &self.resource,
            self.namespace.as_deref(),
            &whole,
            target,
            cluster_scoped,
        )
        .await?;
        let mut summary = crate::rollout::plan::summarize(&target.digest, &plans, &order.policy.protected_kinds);
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
        Ok((summary, pending))
    }

    /// Every instance of the kind, whole, a page at a time.
    async fn list_instances(&self) -> Result<Vec<Arc<DynamicObject>>, kube::Error> {
        let api = super::instance::kind_api(&self.client, &self.resource, self.namespace.as_deref());
        let mut params = kube::api::ListParams::default().limit(500);
        let mut all = Vec::new();
        loop {
            let page = api.list(&params).await?;
            all.extend(page.items.into_iter().map(Arc::new));
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(all),
            }
        }
    }

    /// The event that tells a rollout started, with what its plan changes.
    fn announce(&self, order: &RolloutOrder, summary: &PlanSummary) {
        let message = format!(
            "rolling out module {}: {} of {} instance(s) change, {} object(s) created, {} updated, {} replaced, {} deleted",
            rollout::short_digest(&order.target.digest),
            summary.affected,
            summary.instances,
            summary.created,
            summary.updated,
            summary.replaced,
            summary.deleted
        );
        self.event(&order.transform, EventType::Normal, reasons::ROLLOUT_STARTED, message);
    }

    /// Replaces the kind's selection and looks again at the instances it may move.
    fn select(&self, selection: Selection) {
        let old = {
            let mut cell = self.selection.write().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *cell, Arc::new(selection))
        };
        let new = self.selection.read().unwrap_or_else(|p| p.into_inner()).clone();
        super::instance::nudge_affected(&old, &new, &self.resource, (&self.nudge, &self.nudge_all));
    }

    /// Publishes the kind's selection and grants for the replicas serving its instances.
    async fn publish(&self, order: &RolloutOrder) -> Result<(), super::serving::ServingError> {
        let Some(publisher) = &self.publisher else {
            return Ok(());
        };
        let selection = self.selection.read().unwrap_or_else(|p| p.into_inner()).clone();
        let transform = crate::api::NamespacedName {
            namespace: order.transform.namespace().unwrap_or_default(),
            name: order.transform.name_any(),
        };
        let serving = Serving::of(
            (&transform, &order.transform.uid().unwrap_or_default()),
            &self.resource,
            self.namespace.as_deref(),
            (order.allowance, &order.served),
            &selection,
        );
        publisher.publish(&serving).await
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
