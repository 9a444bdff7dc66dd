//! The Transform controller: fetches a platform module, generates its CRD (refusing breaking
//! schema changes and names it does not own), generates RBAC from `managedResources`, and hands
//! the kind to the instance supervisor. Deleting a Transform waits until no instance is left.

use crate::api::condition_types::{
    AUTHORIZED, CRD_GENERATED, CUE_FETCHED, RBAC_CONFIGURED, ROLLED_OUT, SCHEMA_EXTRACTED,
};
use crate::api::names::{
    AGGREGATE_LABEL, CUE_MODULE_LABEL, GENERATED_MANAGER, MANAGED_BY_LABEL, MANAGED_BY_VALUE, PAUSED_ANNOTATION,
    TRANSFORM_FINALIZER, TRANSFORM_STATUS_MANAGER,
};
use crate::api::reasons;
use crate::error::ErrorCategory;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{ClusterRole, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{PredicateConfig, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde_json::json;

mod status;
mod versions;

use super::harness::{Error, StatusMemory};
use super::instance::{ServeSpec, Supervisor, TransformKey};
use super::rollout_driver::RolloutOrder;
use crate::api::{
    CueRefType, GeneratedCrd, GeneratedRbac, RbacScope, Transform, TransformPhase, TransformStatus, with_served,
};
use crate::authority::{self, TrustedNamespaces};
use crate::conversion::ConversionWebhook;
use crate::crd::{self, CrdParams, KindNames, compat, reserved};
use crate::cue::Renderer;
use crate::executor::object::contains;
use crate::executor::proof::Allowance;
use crate::executor::proof::GraphKey;
use crate::metrics::Metrics;
use crate::rbac::{self, Generated, ManagerIdentity, RbacMode, ServedKind, TransformIdentity};
use crate::rollout::Policy;
use crate::runtime::health::Health;
use crate::runtime::shutdown::Shutdown;
use crate::source::{Fetcher, breaker};
use status::{Draft, TransformStop};

const CONTROLLER: &str = "transform";
/// How long a generated CRD may take to become Established.
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(60);
/// Safety resync; module changes of ConfigMap sources arrive through a watch.
const RESYNC: Duration = Duration::from_secs(600);
/// How often a Transform waiting for an administrator's RBAC looks again.
const RBAC_POLL: Duration = Duration::from_secs(5);
/// How often a deleted Transform looks again whether its instances are gone.
const INSTANCE_POLL: Duration = Duration::from_secs(5);

/// Everything a reconcile needs. Shared by all reconciles.
pub struct Context {
    pub client: Client,
    pub fetcher: Fetcher,
    pub renderer: Renderer,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub manager: ManagerIdentity,
    pub supervisor: Supervisor,
    /// Signs and checks the list of module versions each Transform served.
    key: GraphKey,
    written: StatusMemory<TransformStatus>,
    backoff: super::harness::Backoff,
    workers: super::harness::Workers,
    /// Namespaces whose Transforms may give their instances more than their own namespace.
    trusted: TrustedNamespaces,
    /// Whether the manager writes Transforms' RBAC or an administrator does.
    rbac_mode: RbacMode,
    /// Where generated CRDs send conversions, with the CA bundle that trusts it; None when
    /// the webhook is disabled (`--webhook-bind-address=0`).
    pub conversion_webhook: Option<ConversionWebhook>,
    /// Whether every module version served is published for the other replicas, which serve
    /// the instances of their shards (`--shards`).
    publish_modules: bool,
}

super::harness::backoff::controller_context!(Context, reports Transform);

impl Context {
    pub fn new(
        client: Client,
        fetcher: Fetcher,
        renderer: Renderer,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        supervisor: Supervisor,
        key: GraphKey,
    ) -> Self {
        Self {
            client,
            fetcher,
            renderer,
            recorder,
            metrics,
            manager: ManagerIdentity::from_env(),
            supervisor,
            key,
            written: StatusMemory::default(),
            backoff: super::harness::Backoff::default(),
            workers: super::harness::Workers::default(),
            trusted: TrustedNamespaces::new(Vec::new()),
            rbac_mode: RbacMode::Generate,
            conversion_webhook: None,
            publish_modules: false,
        }
    }
}

impl Context {
    /// Trusts the Transforms of `trusted` (by default none).
    pub fn trusting(mut self, trusted: TrustedNamespaces) -> Self {
        self.trusted = trusted;
        self
    }

    /// Who writes Transforms' RBAC (by default the manager).
    pub fn with_rbac_mode(mut self, mode: RbacMode) -> Self {
        self.rbac_mode = mode;
        self
    }

    /// The conversion webhook generated CRDs name (by default none).
    pub fn with_conversion_webhook(mut self, webhook: Option<ConversionWebhook>) -> Self {
        self.conversion_webhook = webhook;
        self
    }

    /// Publishes every module version served, for the replicas sharing the instances.
    pub fn publishing_modules(mut self) -> Self {
        self.publish_modules = true;
        self
    }
}

/// Runs the controller until shutdown.
pub async fn run(ctx: Arc<Context>, concurrency: u16, health: Arc<Health>, shutdown: Shutdown) {
    let client = ctx.client.clone();
    // Every change reaches the cache; only changes a reconcile acts on trigger one. The
    // rollout driver writes the status as instances move, and the pipeline (a CRD read, RBAC
    // reads, access reviews) has nothing to do for a status write.
    let (transforms, writer) = reflector::store();
    let events = watcher(Api::<Transform>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    let changes = super::harness::applied_once_listed(events, transforms.clone(), ())
        .predicate_filter(reconcile_inputs, PredicateConfig::default());
    let controller = Controller::for_stream(changes, transforms.clone()).with_config(super::harness::runner_config(
        &ctx.workers,
        concurrency,
        &shutdown,
    ));
    let controller = controller
        // A generated CRD changing (Established, edited, deleted) brings its Transform back.
        // These watches only map events to Transforms, so they carry metadata only: a large
        // or numerous object someone labels costs the operator little.
        .watches_stream(
            watcher(
                Api::<PartialObjectMeta<CustomResourceDefinition>>::all(client.clone()),
                watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}")),
            )
            .default_backoff()
            .touched_objects(),
            |crd| owner_of(crd.labels(), crd.annotations()),
        )
        .watches_stream(
            watcher(
                Api::<PartialObjectMeta<ClusterRole>>::all(client.clone()),
                watcher::Config::default().labels(&format!("{}=true", AGGREGATE_LABEL)),
            )
            .default_backoff()
            .touched_objects(),
            |role| owner_of(role.labels(), role.annotations()),
        )
        // Editing a ConfigMap module rolls its Transforms forward.
        .watches_stream(
            watcher(
                Api::<PartialObjectMeta<ConfigMap>>::all(client),
                watcher::Config::default().labels(&format!("{CUE_MODULE_LABEL}=true")),
            )
            .default_backoff()
            .touched_objects(),
            move |cm| transforms_using(&transforms, &cm),
        )
        .graceful_shutdown_on(shutdown.clone().wait_owned());
    super::harness::run_controller(controller, reconcile, ctx, "transform-controller", health, shutdown).await;
}

/// The Transforms whose module is the ConfigMap `cm`.
fn transforms_using(
    transforms: &reflector::Store<Transform>,
    cm: &PartialObjectMeta<ConfigMap>,
) -> Vec<ObjectRef<Transform>> {
    let namespace = cm.namespace().unwrap_or_default();
    let name = cm.name_any();
    transforms
        .state()
        .into_iter()
        .filter(|t| {
            t.spec.cue_ref.type_ == CueRefType::Configmap
                && t.spec.cue_ref.ref_ == name
                && t.namespace().as_deref() == Some(namespace.as_str())
        })
        .map(|t| ObjectRef::from_obj(&*t))
        .collect()
}

/// What a reconcile of a Transform acts on besides its status: its spec (the generation), its
/// labels, annotations (pause, approval) and finalizers, and its deletion.
fn reconcile_inputs(t: &Transform) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    t.metadata.generation.hash(&mut hasher);
    t.labels().hash(&mut hasher);
    t.annotations().hash(&mut hasher);
    t.finalizers().hash(&mut hasher);
    let deleted = t.metadata.deletion_timestamp.as_ref().map(|d| d.0.as_second());
    deleted.hash(&mut hasher);
    Some(hasher.finish())
}

/// The Transform a generated object belongs to, from its labels.
fn owner_of(labels: &BTreeMap<String, String>, annotations: &BTreeMap<String, String>) -> Option<ObjectRef<Transform>> {
    let (namespace, name) = crate::rbac::maker(labels, annotations)?;
    Some(ObjectRef::new(name).within(namespace))
}

async fn reconcile(t: Arc<Transform>, ctx: Arc<Context>) -> Result<Action, Error> {
    super::harness::reconciled(&ctx.metrics, CONTROLLER, (&*ctx, &*t), || async {
        if is_paused(&t) {
            pause(&t, &ctx).await
        } else if t.metadata.deletion_timestamp.is_some() {
            cleanup(&t, &ctx).await
        } else {
            let t = super::harness::finalized(&api(&t, &ctx), &*t, TRANSFORM_FINALIZER).await?;
            generate(&t, &ctx).await
        }
    })
    .await
}

fn is_paused(t: &Transform) -> bool {
    t.annotations().get(PAUSED_ANNOTATION).is_some_and(|v| v == "true")
}

fn api(t: &Transform, ctx: &Context) -> Api<Transform> {
    Api::namespaced(ctx.client.clone(), &t.namespace().unwrap_or_default())
}

fn key(t: &Transform) -> TransformKey {
    TransformKey {
        name: t.name_any(),
        namespace: t.namespace().unwrap_or_default(),
    }
}

/// A Transform's status under construction, with its events and its write.
type StatusUpdate<'a> = super::harness::status::StatusUpdate<'a, Transform, TransformStatus>;

impl Context {
    fn status_update<'a>(&'a self, t: &'a Transform) -> StatusUpdate<'a> {
        let writer = super::harness::status::StatusWriter {
            api: api(t, self),
            type_meta: (crate::api::API_VERSION, "Transform"),
            manager: TRANSFORM_STATUS_MANAGER,
            memory: &self.written,
            recorder: &self.recorder,
            owned: without_rollout,
        };
        StatusUpdate::start(t, t.object_ref(&()), writer, t.status.as_ref())
    }
}

/// The rollout driver writes its part of the status with a field manager of its own.
fn without_rollout(s: &TransformStatus) -> TransformStatus {
    let mut s = s.clone();
    s.rollout = None;
    s.conditions.retain(|c| c.type_ != ROLLED_OUT);
    s
}

async fn pause(t: &Transform, ctx: &Context) -> Result<Action, Error> {
    let mut update = ctx.status_update(t);
    let message = format!("{PAUSED_ANNOTATION} is \"true\": the Transform is not reconciled, deletion included");
    update.pause(&message);
    update.write().await?;
    Ok(Action::await_change())
}

/// The API resource of the kind a Transform generates.
fn api_resource(group: &str, version: &str, names: &KindNames) -> ApiResource {
    ApiResource {
        group: group.to_string(),
        version: version.to_string(),
        api_version: format!("{group}/{version}"),
        kind: names.kind.clone(),
        plural: names.plural.clone(),
    }
}

/// A Transform's pipeline: fetch the module, extract its schema, build the CRD, apply it,
/// wait until it is Established, generate RBAC, serve the kind. Each step returns what the
/// next needs or why it stopped; the status is decided here once and written once.
async fn generate(t: &Transform, ctx: &Context) -> Result<Action, Error> {
    let mut update = ctx.status_update(t);
    update.resume();
    show_new_spec(t, &mut update).await?;
    let result = serve_transform(t, ctx, &mut update).await;
    let action = update.conclude(result)?;
    update.write().await?;
    Ok(action)
}

/// Shows a new spec being worked on at once (phase `Fetching`); content changes of the same
/// spec go straight to the result, so that resyncs write nothing.
async fn show_new_spec(t: &Transform, update: &mut StatusUpdate<'_>) -> Result<(), Error> {
    if update.old.observed_generation == t.metadata.generation {
        return Ok(());
    }
    let mut progress = update.old.clone();
    progress.phase = Some(TransformPhase::Fetching);
    progress.observed_generation = t.metadata.generation;
    update.checkpoint(progress).await?;
    Ok(())
}

async fn serve_transform(t: &Transform, ctx: &Context, update: &mut StatusUpdate<'_>) -> Result<Action, TransformStop> {
    let namespace = t.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let allowance = authorize(t, &namespace, &ctx.trusted, update)?;
    let policy = rollout_policy(t)?;
    let (fetched, retry) = fetch_module(t, ctx, update).await?;
    let source_digest = fetched.digest.clone();
    // A failure below waits for a change of the Transform; a tag or branch must also be
    // looked at again, since a fixed module may be pushed under the same name.
    let next_look = fetched.moves.then_some(ctx.fetcher.poll_interval());
    let settled = next_look.map_or_else(Action::await_change, Action::requeue);

    let (module, schema, files) = load_module(ctx, fetched, &t.spec.settings, &settled).await?;
    update.extracted();
    let conversion = versions::conversion_config(ctx, t, (&module, &schema), &settled)?;
    let (names, desired) = desired_crd(t, &namespace, &schema, conversion, &settled)?;
    let crd_name = desired.metadata.name.clone().unwrap_or_default();
    let storage = crd::storage_version(&schema, &t.spec.version);
    let resource = api_resource(&t.spec.group, &storage, &names);
    let previous = renamed_from(t, ctx, update, &crd_name).await?;
    let (established, schema_changed) =
        apply_crd(t, ctx, update, &desired, (&module, &schema, &files), &settled).await?;
    await_established(update, &established, &crd_name, &settled)?;
    generate_rbac(t, ctx, update, &resource).await?;

    if let Some(previous) = &previous {
        let crds: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
        if let Some(old_crd) = crds.get_opt(&previous.name).await?
            && owned_by(&old_crd, t)
        {
            crds.delete(&previous.name, &DeleteParams::default()).await?;
            ctx.supervisor.stop_kind(&previous.api_version, &previous.kind).await?;
        }
    }
    let served = record_served(t, ctx, update, &module.digest).await?;
    ctx.supervisor
        .serve(ServeSpec {
            transform: key(t),
            resource: resource.clone(),
            order: RolloutOrder {
                transform: Arc::new(t.clone()),
                target: module.clone(),
                policy,
                schema_changed,
                allowance,
                served,
            },
            namespace: (t.spec.rbac_scope == RbacScope::Namespace).then(|| namespace.clone()),
        })
        .await;
    // After serving: instances that cannot be moved never stop the kind from being served.
    let migrating = versions::migrate_storage(ctx, t, update, &established, &schema, &storage).await?;

    let generated = GeneratedCrd {
        api_version: resource.api_version.clone(),
        kind: names.kind.clone(),
        name: crd_name,
        plural: names.plural.clone(),
    };
    update.serving(generated, source_digest);
    Ok(Action::requeue(migrating.or(retry).or(next_look).unwrap_or(RESYNC)))
}

/// Records `digest` among the module versions the Transform has served before any instance
/// renders with it, with Pequod's proof of the list: the executor checks every rendered
/// graph's version against it, and instances render only versions on it. A list without a
/// valid proof (written by someone else, or by an earlier release) is not believed: it starts
/// again from the version loaded now. Returns the list.
async fn record_served(
    t: &Transform,
    ctx: &Context,
    update: &mut StatusUpdate<'_>,
    digest: &str,
) -> Result<Vec<String>, TransformStop> {
    let old = &update.old;
    let uid = t.uid().unwrap_or_default();
    let proven = ctx
        .key
        .verify_served(&uid, &old.served_digests, old.served_digests_proof.as_deref());
    let earlier = if proven { old.served_digests.clone() } else { Vec::new() };
    let served = with_served(&earlier, digest);
    let proof = ctx.key.sign_served(&uid, &served);
    if old.served_digests != served || old.served_digests_proof.as_deref() != Some(proof.as_str()) {
        let mut recorded = old.clone();
        recorded.served_digests = served.clone();
        recorded.served_digests_proof = Some(proof.clone());
        update.checkpoint(recorded).await?;
    }
    update.new.served_digests = served.clone();
    update.new.served_digests_proof = Some(proof);
    Ok(served)
}

/// The Transform's rollout policy, or why it is invalid.
fn rollout_policy(t: &Transform) -> Result<Policy, TransformStop> {
    Policy::from_spec(t.spec.rollout.as_ref()).map_err(|message| {
        TransformStop::failed(
            crate::api::condition_types::READY,
            reasons::INVALID_ROLLOUT,
            format!("spec.rollout: {message}"),
            reasons::INVALID_ROLLOUT,
            Action::await_change(),
        )
    })
}

/// What the Transform's instances may reach (see [`crate::authority`]); a Transform asking for
/// more than its namespace allows is refused before anything is fetched or generated.
fn authorize(
    t: &Transform,
    namespace: &str,
    trusted: &TrustedNamespaces,
    update: &mut StatusUpdate<'_>,
) -> Result<Allowance, TransformStop> {
    let allowance = authority::allowance(&t.spec, namespace, trusted).map_err(|message| {
        TransformStop::failed(
            AUTHORIZED,
            reasons::NOT_ALLOWED,
            message,
            reasons::NOT_ALLOWED,
            Action::await_change(),
        )
    })?;
    update.authorized(allowance, namespace);
    Ok(allowance)
}

/// Fetches the module. A cached resolution standing in for an unreachable remote is used, and
/// reported; the second value is when to try the remote again.
async fn fetch_module(
    t: &Transform,
    ctx: &Context,
    update: &mut StatusUpdate<'_>,
) -> Result<(crate::source::Fetched, Option<Duration>), TransformStop> {
    let source_label = t.spec.cue_ref.type_.as_str();
    let started = std::time::Instant::now();
    let namespace = t.namespace().unwrap_or_default();
    let fetched = ctx.fetcher.fetch(&t.spec.cue_ref, &namespace, &t.name_any()).await;
    let took = started.elapsed();
    ctx.metrics
        .cue_fetch_duration_seconds
        .with_label_values(&[source_label])
        .observe(took.as_secs_f64());
    let fresh = matches!(&fetched, Ok(f) if f.stale.is_none());
    tracing::debug!(
        source = source_label,
        reference = %t.spec.cue_ref.ref_,
        duration_ms = took.as_millis() as u64,
        ok = fresh,
        "fetch finished"
    );
    ctx.metrics
        .cue_fetch_total
        .with_label_values(&[source_label, if fresh { "success" } else { "failure" }])
        .inc();
    let fetched = match fetched {
        Ok(f) => f,
        Err(e) => return Err(fetch_failed(t, ctx, update, &e).await),
    };
    let retry = match &fetched.stale {
        Some(why) => {
            let failures = ctx.backoff.fetch_failed(&t.metadata);
            update.fetched_stale(why);
            Some(breaker::retry_delay(failures))
        }
        None => {
            ctx.backoff.fetch_succeeded(&t.metadata);
            let what = format!("{source_label} module {} ({})", fetched.platform, fetched.digest);
            update.fetched(what);
            None
        }
    };
    Ok((fetched, retry))
}

/// A failed fetch: retried with backoff; a Transform still served says its instances keep
/// the last good module.
async fn fetch_failed(
    t: &Transform,
    ctx: &Context,
    update: &StatusUpdate<'_>,
    e: &crate::source::SourceError,
) -> TransformStop {
    let failures = ctx.backoff.fetch_failed(&t.metadata);
    let mut message = e.to_string();
    if ctx.supervisor.serves(&key(t)).await
        && let Some(digest) = update.old.resolved_cue_ref.as_ref().map(|r| r.digest.clone())
    {
        message.push_str(&format!(
            "; existing instances keep being served with the last good module {digest}"
        ));
    }
    let then = Action::requeue(breaker::retry_delay(failures));
    TransformStop::failed(CUE_FETCHED, e.reason(), message, reasons::CUE_FETCH_FAILED, then)
}

/// Loads the module with the Transform's settings and converts its `#Input` into a schema;
/// the files are kept for the conversion webhook.
async fn load_module(
    ctx: &Context,
    fetched: crate::source::Fetched,
    settings: &crate::api::Settings,
    settled: &Action,
) -> Result<
    (
        crate::cue::Module,
        Arc<crate::cue::ModuleSchema>,
        crate::cue::ModuleFiles,
    ),
    TransformStop,
> {
    let loaded = async {
        let files = fetched.files.with_settings(settings)?;
        let module = ctx.renderer.load(files.clone(), &fetched.platform).await?;
        let schema = ctx.renderer.schema(&module).await?;
        Ok::<_, crate::cue::RenderError>((module, schema, files))
    };
    match loaded.await {
        Ok(loaded) => Ok(loaded),
        Err(e) if e.is_transient() => Err(TransformStop::Error(Error::CueUnavailable(e))),
        Err(e) => Err(TransformStop::failed(
            SCHEMA_EXTRACTED,
            e.reason(),
            e.to_string(),
            reasons::CUE_RENDER_FAILED,
            settled.clone(),
        )),
    }
}

/// The kind's names and the CRD to generate.
fn desired_crd(
    t: &Transform,
    namespace: &str,
    schema: &crate::cue::ModuleSchema,
    conversion: Option<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::WebhookClientConfig>,
    settled: &Action,
) -> Result<(KindNames, CustomResourceDefinition), TransformStop> {
    let names = crd::kind_names(&t.name_any(), schema, &t.spec.short_names)
        .and_then(|names| reserved::check(&t.spec.group, &names).map(|()| names))
        .map_err(|e| {
            let reason = e.reason();
            TransformStop::failed(
                CRD_GENERATED,
                reason,
                e.to_string(),
                reasons::CRD_GENERATION_FAILED,
                settled.clone(),
            )
        })?;
    let desired = crd::build_crd(
        &names,
        schema,
        &CrdParams {
            group: &t.spec.group,
            version: &t.spec.version,
            categories: &t.spec.categories,
            transform_name: &t.name_any(),
            transform_namespace: namespace,
            conversion,
        },
    );
    Ok((names, desired))
}

/// The CRD generated before under another name (the kind, plural or group changed), which is
/// replaced once the new one serves; refused while instances of the old kind exist.
async fn renamed_from(
    t: &Transform,
    ctx: &Context,
    update: &StatusUpdate<'_>,
    crd_name: &str,
) -> Result<Option<GeneratedCrd>, TransformStop> {
    let previous = update
        .old
        .generated_crd
        .clone()
        .filter(|g| g.name != crd_name && update.old.phase.is_some());
    let Some(previous) = previous else {
        return Ok(None);
    };
    let crds: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
    if let Some(old_crd) = crds.get_opt(&previous.name).await?
        && owned_by(&old_crd, t)
    {
        let instances = versions::count_instances(ctx, t, &old_crd).await?;
        if instances > 0 {
            let message = format!(
                "the generated CRD would change from {} to {crd_name}, but {instances} instance(s) of {} exist; \
                 delete them first or keep the kind's names and group",
                previous.name, previous.kind
            );
            let then = Action::requeue(RESYNC);
            return Err(TransformStop::breaking(message, then));
        }
    }
    Ok(Some(previous))
}

/// Creates or updates the CRD: refused when another owner has it, when the change would break
/// stored instances (a version's schema narrowed, a version still holding objects removed, a
/// conversion that does not round-trip them); written only when it differs (the second value
/// says whether it was).
async fn apply_crd(
    t: &Transform,
    ctx: &Context,
    update: &mut StatusUpdate<'_>,
    desired: &CustomResourceDefinition,
    (module, schema, files): (&crate::cue::Module, &crate::cue::ModuleSchema, &crate::cue::ModuleFiles),
    settled: &Action,
) -> Result<(CustomResourceDefinition, bool), TransformStop> {
    let crds: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
    let crd_name = desired.metadata.name.clone().unwrap_or_default();
    let written = match crds.get_opt(&crd_name).await? {
        Some(live) => {
            if let Some(conflict) = ownership_conflict(&live, t) {
                return Err(TransformStop::failed(
                    CRD_GENERATED,
                    reasons::KIND_CONFLICT,
                    conflict,
                    reasons::KIND_CONFLICT,
                    settled.clone(),
                ));
            }
            let breaking = compat::crd_breaking_changes(&live, desired);
            if !breaking.is_empty() {
                let message = format!(
                    "{} breaking change(s) refused; the CRD and the served module stay as they were: {}. \
                     To change a field incompatibly, add a version with a conversion to the module's #Versions \
                     (docs/versions.md)",
                    breaking.len(),
                    breaking.join("; ")
                );
                let then = settled.clone();
                return Err(TransformStop::breaking(message, then));
            }
            versions::refuse_removing_stored(ctx, t, &update.old, &live, desired, settled).await?;
            let unchanged = contains(&serde_json::to_value(&live)?, &serde_json::to_value(desired)?);
            if !unchanged {
                versions::check_round_trips(ctx, t, &live, module, schema, settled).await?;
            }
            versions::publish_module(ctx, t, &update.old, (schema, files), settled).await?;
            if unchanged {
                (live, false)
            } else {
                let params = PatchParams::apply(GENERATED_MANAGER).force();
                (crds.patch(&crd_name, &params, &Patch::Apply(desired)).await?, true)
            }
        }
        None => {
            versions::publish_module(ctx, t, &update.old, (schema, files), settled).await?;
            (crds.create(&PostParams::default(), desired).await?, true)
        }
    };
    let (crd, changed) = written;
    update.crd_written(&crd_name, changed);
    Ok((crd, changed))
}

/// Waits until the apiserver serves the CRD (the CRD watch brings the Transform back; the
/// requeue bounds the wait), failing when it refuses the names or takes too long.
fn await_established(
    update: &mut Draft,
    crd: &CustomResourceDefinition,
    crd_name: &str,
    settled: &Action,
) -> Result<(), TransformStop> {
    match crd_state(crd) {
        CrdState::Established => {
            update.established(crd_name);
            Ok(())
        }
        CrdState::NamesRefused(message) => {
            let message = format!("the apiserver refused the names of CRD {crd_name}: {message}");
            let then = settled.clone();
            Err(TransformStop::failed(
                CRD_GENERATED,
                reasons::NAMES_NOT_ACCEPTED,
                message,
                reasons::CRD_GENERATION_FAILED,
                then,
            ))
        }
        CrdState::Pending => {
            let age = crd
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| jiff::Timestamp::now().duration_since(t.0).as_secs())
                .unwrap_or(0);
            let then = Action::requeue(ESTABLISH_TIMEOUT);
            if age as u64 > ESTABLISH_TIMEOUT.as_secs() {
                let message = format!(
                    "CRD {crd_name} is not Established after {}s",
                    ESTABLISH_TIMEOUT.as_secs()
                );
                return Err(TransformStop::failed(
                    CRD_GENERATED,
                    reasons::CRD_NOT_ESTABLISHED,
                    message,
                    reasons::CRD_GENERATION_FAILED,
                    then,
                ));
            }
            update.waiting_for_established(crd_name);
            Err(TransformStop::Waiting(then))
        }
    }
}

/// Generates the RBAC that serving the kind and applying its objects needs, or, when an
/// administrator writes it (`--generate-rbac=false`), checks that the manager holds it.
async fn generate_rbac(
    t: &Transform,
    ctx: &Context,
    update: &mut StatusUpdate<'_>,
    resource: &ApiResource,
) -> Result<(), TransformStop> {
    if ctx.rbac_mode == RbacMode::External {
        return check_rbac(t, ctx, update, resource).await;
    }
    let then = Action::requeue(super::harness::RETRY);
    match configure_rbac(t, ctx, resource).await {
        Ok(generated) => {
            let message = format!("{} rule(s) for the manager", generated.rule_count);
            update.rbac_configured(message);
            update.new.generated_rbac = Some(generated);
            Ok(())
        }
        Err(e @ RbacError::NotOurs { .. }) => Err(TransformStop::failed(
            RBAC_CONFIGURED,
            reasons::RBAC_CONFLICT,
            e.to_string(),
            reasons::RBAC_CONFLICT,
            then,
        )),
        Err(e) => Err(TransformStop::failed(
            RBAC_CONFIGURED,
            reasons::RBAC_FAILED,
            format!("generating RBAC: {e}"),
            reasons::RBAC_FAILED,
            then,
        )),
    }
}

/// Asks the apiserver whether the manager holds every rule the Transform needs; until it
/// does, the Transform waits with the missing rules in its status and is looked at again.
async fn check_rbac(
    t: &Transform,
    ctx: &Context,
    update: &mut StatusUpdate<'_>,
    resource: &ApiResource,
) -> Result<(), TransformStop> {
    let namespace = t.namespace().unwrap_or_default();
    let rules = transform_rules(t, resource);
    let needed = rbac::required_access(&rules, t.spec.rbac_scope, &namespace);
    let missing = super::access::missing(&ctx.client, needed).await?;
    if missing.is_empty() {
        let message = format!("the manager holds the {} rule(s) the Transform needs", rules.len());
        update.rbac_configured(message);
        update.new.generated_rbac = None;
        return Ok(());
    }
    let message = format!(
        "the manager lacks {} permission(s) and does not grant itself any; an administrator applies \
         the output of `pequod rbac {namespace}/{}`: {}",
        missing.len(),
        t.name_any(),
        rbac::describe_missing(&missing)
    );
    update.rbac_missing(&message);
    Err(TransformStop::Waiting(Action::requeue(RBAC_POLL)))
}

/// The rules a Transform's kind and managed resources need.
fn transform_rules(t: &Transform, resource: &ApiResource) -> Vec<k8s_openapi::api::rbac::v1::PolicyRule> {
    rbac::rules(
        &t.spec.managed_resources,
        &ServedKind {
            group: &resource.group,
            plural: &resource.plural,
        },
    )
}

/// Whether a CRD was generated by this Transform.
fn owned_by(crd: &CustomResourceDefinition, t: &Transform) -> bool {
    crate::rbac::made_by(Some(crd.labels()), &t.namespace().unwrap_or_default(), &t.name_any())
}

/// Why an existing CRD cannot be taken over, if it cannot.
fn ownership_conflict(crd: &CustomResourceDefinition, t: &Transform) -> Option<String> {
    if owned_by(crd, t) {
        return None;
    }
    let labels = crd.labels();
    let name = crd.name_any();
    match crate::rbac::maker(labels, crd.annotations()) {
        Some((ns, owner)) if labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY_VALUE) => Some(
            format!("CRD {name} is generated by Transform {ns}/{owner}; two Transforms cannot generate the same kind"),
        ),
        _ => Some(format!(
            "CRD {name} exists and was not created by Pequod; it is never taken over"
        )),
    }
}

enum CrdState {
    Established,
    NamesRefused(String),
    Pending,
}

fn crd_state(crd: &CustomResourceDefinition) -> CrdState {
    let conditions = crd
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .cloned()
        .unwrap_or_default();
    let find = |t: &str| conditions.iter().find(|c| c.type_ == t);
    if let Some(c) = find("NamesAccepted")
        && c.status == "False"
    {
        return CrdState::NamesRefused(c.message.clone().unwrap_or_default());
    }
    match find("Established") {
        Some(c) if c.status == "True" => CrdState::Established,
        _ => CrdState::Pending,
    }
}

/// Applies the Transform's RBAC and removes the objects of the other scope.
/// Why a Transform's RBAC could not be configured.
#[derive(Debug, thiserror::Error)]
enum RbacError {
    #[error("{kind} {name} exists and was not made by this Transform; it is left alone")]
    NotOurs { kind: String, name: String },
    #[error(transparent)]
    Api(#[from] kube::Error),
}

async fn configure_rbac(t: &Transform, ctx: &Context, resource: &ApiResource) -> Result<GeneratedRbac, RbacError> {
    let namespace = t.namespace().unwrap_or_default();
    let name = t.name_any();
    let rules = transform_rules(t, resource);
    let rule_count = rules.len() as i32;
    let identity = TransformIdentity {
        name: &name,
        namespace: &namespace,
        owner: t.controller_owner_ref(&()),
    };
    let cluster_roles: Api<ClusterRole> = Api::all(ctx.client.clone());
    let roles: Api<Role> = Api::namespaced(ctx.client.clone(), &namespace);
    let bindings: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), &namespace);
    match rbac::generate(t.spec.rbac_scope, &identity, rules, &ctx.manager) {
        Generated::Cluster(role) => {
            let role_name = role.metadata.name.clone().unwrap_or_default();
            apply_if_changed(&cluster_roles, &role_name, &role, t).await?;
            delete_if_made_by(&bindings, &rbac::role_name(&name), t).await?;
            delete_if_made_by(&roles, &rbac::role_name(&name), t).await?;
            Ok(GeneratedRbac {
                cluster_role_name: Some(role_name),
                role_name: None,
                role_binding_name: None,
                rule_count,
            })
        }
        Generated::Namespace(generated) => {
            let (role, binding) = *generated;
            let role_name = role.metadata.name.clone().unwrap_or_default();
            apply_if_changed(&roles, &role_name, &role, t).await?;
            apply_if_changed(&bindings, &role_name, &binding, t).await?;
            delete_if_made_by(&cluster_roles, &rbac::cluster_role_name(&namespace, &name), t).await?;
            Ok(GeneratedRbac {
                cluster_role_name: None,
                role_name: Some(role_name.clone()),
                role_binding_name: Some(role_name),
                rule_count,
            })
        }
    }
}

/// Applies an RBAC object of `t` unless it is already as desired; refuses one `t` did not make.
async fn apply_if_changed<K>(api: &Api<K>, name: &str, desired: &K, t: &Transform) -> Result<(), RbacError>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let desired_value = serde_json::to_value(desired).map_err(kube::Error::SerdeError)?;
    if let Some(live) = api.get_opt(name).await? {
        if !rbac::made_by(
            live.meta().labels.as_ref(),
            &t.namespace().unwrap_or_default(),
            &t.name_any(),
        ) {
            return Err(RbacError::NotOurs {
                kind: K::kind(&()).into_owned(),
                name: name.to_string(),
            });
        }
        let live_value = serde_json::to_value(&live).map_err(kube::Error::SerdeError)?;
        if contains(&live_value, &desired_value) {
            return Ok(());
        }
    }
    let mut body = desired_value;
    body["apiVersion"] = json!(K::api_version(&()));
    body["kind"] = json!(K::kind(&()));
    api.patch(
        name,
        &PatchParams::apply(GENERATED_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await?;
    Ok(())
}

/// Deletes an RBAC object of `t`; one `t` did not make is left alone.
async fn delete_if_made_by<K>(api: &Api<K>, name: &str, t: &Transform) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get_metadata_opt(name).await? {
        Some(live)
            if rbac::made_by(
                live.metadata.labels.as_ref(),
                &t.namespace().unwrap_or_default(),
                &t.name_any(),
            ) =>
        {
            delete_if_present(api, name).await
        }
        _ => Ok(()),
    }
}

async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    // Looking first keeps a reconcile with nothing to delete free of write requests.
    if api.get_metadata_opt(name).await?.is_none() {
        return Ok(());
    }
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletion: waits until no instance of the generated kind is left (deleting the CRD would
/// delete them all), then removes the CRD and RBAC, stops serving the kind and lets go.
async fn cleanup(t: &Transform, ctx: &Context) -> Result<Action, Error> {
    if !t.finalizers().iter().any(|f| f == TRANSFORM_FINALIZER) {
        return Ok(Action::await_change());
    }
    let crds: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
    let owned_crd = match t.status.as_ref().and_then(|s| s.generated_crd.as_ref()) {
        Some(g) => crds.get_opt(&g.name).await?.filter(|crd| owned_by(crd, t)),
        None => None,
    };
    if let Some(crd) = &owned_crd {
        let instances = versions::count_instances(ctx, t, crd).await?;
        if instances > 0 {
            let mut update = ctx.status_update(t);
            let message = format!(
                "deletion waits until the {instances} instance(s) of {} are deleted; the CRD is kept until then",
                crd.spec.names.kind
            );
            update.waiting_for_instances(&message);
            update.write().await?;
            return Ok(Action::requeue(INSTANCE_POLL));
        }
    }
    let key = key(t);
    ctx.supervisor.stop(&key).await?;
    if let Some(crd) = owned_crd {
        delete_if_present(&crds, &crd.name_any()).await?;
    }
    crate::conversion::published::unpublish(&ctx.client, &ctx.manager.namespace, (&key.namespace, &key.name), &[])
        .await?;
    if ctx.rbac_mode == RbacMode::Generate {
        delete_rbac(t, ctx).await?;
    }
    super::harness::remove_finalizer(&api(t, ctx), t, TRANSFORM_FINALIZER).await?;
    ctx.written.forget(&t.uid().unwrap_or_default());
    ctx.backoff.forget(&t.metadata);
    Ok(Action::await_change())
}

/// Deletes the RBAC the manager generated for `t` (objects it did not make are left alone).
async fn delete_rbac(t: &Transform, ctx: &Context) -> Result<(), Error> {
    let namespace = t.namespace().unwrap_or_default();
    let name = t.name_any();
    delete_if_made_by(
        &Api::<ClusterRole>::all(ctx.client.clone()),
        &rbac::cluster_role_name(&namespace, &name),
        t,
    )
    .await?;
    delete_if_made_by(
        &Api::<RoleBinding>::namespaced(ctx.client.clone(), &namespace),
        &rbac::role_name(&name),
        t,
    )
    .await?;
    delete_if_made_by(
        &Api::<Role>::namespaced(ctx.client.clone(), &namespace),
        &rbac::role_name(&name),
        t,
    )
    .await?;
    Ok(())
}
