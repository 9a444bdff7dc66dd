//! Run mode: wires the servers, health checks, conversion webhook and controllers together
//! until shutdown.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Client};
use tokio::task::JoinSet;

use crate::apply::Applier;
use crate::authority::{GraphAccounts, TrustedNamespaces};
use crate::cli::RunArgs;
use crate::controller::instance::{self, Supervisor};
use crate::controller::serving::{Followers, Publisher};
use crate::controller::watches::{GraphCache, GraphScope, ObjectWatches};
use crate::controller::{resourcegraph, transform};
use crate::conversion::certificate::{self, CertResolver, CertificateStore};
use crate::conversion::webhook::{self, ModuleConverter, Webhook};
use crate::conversion::{ConversionWebhook, WebhookEndpoint};
use crate::cue::{CueCli, Renderer, RendererConfig};
use crate::executor::proof::GraphKey;
use crate::metrics::Metrics;
use crate::rbac::RbacMode;
use crate::runtime::health::{Health, Probe};
use crate::runtime::leader::{Elector, Timing};
use crate::runtime::shards::{Keeper, LeaseConfig, Shards, Stopped};
use crate::runtime::shutdown::Shutdown;
use crate::runtime::signing_key;
use crate::runtime::startup::StartupError;
use crate::runtime::{secure, server};
use crate::source::{Fetcher, FetcherConfig};

/// How often a cue binary that could not be started is tried again for /readyz.
const CUE_RETRY_INTERVAL: Duration = Duration::from_secs(30);
/// Longest pause between attempts to read or make the graph-signing key.
const KEY_RETRY_MAX: Duration = Duration::from_secs(30);
/// The readiness check that waits for the graph-signing key.
const KEY_CHECK: &str = "graph-signing-key";
/// Longest wait at shutdown for the shard leases to be handed over.
const SHARD_RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Runs the operator until a shutdown signal: servers, health and the conversion webhook
/// first (on every replica), then, as the leader and once the graph-signing key is loaded,
/// the controllers.
pub async fn run(args: RunArgs) -> Result<(), StartupError> {
    let timing = leader_timing(&args)?;
    crate::graph::reference::mark_sensitive(args.sensitive_kinds.clone());
    let metrics = Arc::new(Metrics::new()?);
    crate::controller::init_metrics(&metrics);
    let health = Arc::new(Health::new());
    health.register(Probe::Readiness, "cue", "not checked yet");

    let shutdown = Shutdown::new();
    shutdown.trigger_on_signals();
    let mut tasks: JoinSet<Result<(), StartupError>> = JoinSet::new();
    let identity = leader_identity();
    let (config, client) = connect(&identity).await?;
    serve_metrics(&args, &metrics, &client, &shutdown, &mut tasks)?;
    serve_probes(&args, &health, &shutdown, &mut tasks)?;

    let cue = args.cue.runner().with_metrics(metrics.clone());
    tasks.spawn(check_cue_binary(cue.clone(), health.clone(), shutdown.clone()));
    // One renderer and one fetcher, shared by the webhook and the controllers.
    let renderer = Renderer::new(cue, RendererConfig::new(&args.cue.cache_dir), metrics.clone());
    let fetcher = fetcher(&args, &client, &metrics);
    let converter = ModuleConverter::new(client.clone(), renderer.clone(), own_namespace());
    let webhook = serve_webhook(&args, converter, &client, &metrics, &health, &shutdown, &mut tasks)?;

    let controllers_done = Shutdown::new();
    let wiring = |key| Wiring {
        args: &args,
        client: client.clone(),
        config: config.clone(),
        key,
        metrics: metrics.clone(),
        health: health.clone(),
        shutdown: shutdown.clone(),
        renderer: renderer.clone(),
        fetcher: fetcher.clone(),
        webhook: webhook.clone(),
    };
    let mut keeper = None;
    if args.shards > 1 {
        // Every replica serves the instances and graphs of its shards; the leader also runs
        // the Transforms and the rollouts, and publishes how each kind is served.
        let Some(key) = graph_key(&client, &own_namespace(), &health, &shutdown).await else {
            return join_all(tasks).await;
        };
        let w = wiring(key);
        let (shards, kept) = keep_shards(&args, &client, &identity, timing, controllers_done.clone());
        keeper = Some(kept);
        let graph_side = start_graph_side(&w, Some(shards.clone()), &mut tasks);
        let instances = instance_side(&w, graph_side, Some(shards.clone()));
        follow_published(&w, &instances, shards, &mut tasks);
        match acquire_leadership(&args, &client, &identity, timing, &shutdown).await {
            Leadership::Leader(elector) => hold_leadership(*elector, controllers_done.clone()),
            Leadership::Unelected | Leadership::ShutDown => {}
        }
        if !shutdown.is_triggered() {
            let publisher = Arc::new(Publisher::new(client.clone(), own_namespace(), w.key.clone()));
            let guarded = publisher.clone().guard(shutdown.clone());
            tasks.spawn(async move {
                guarded.await;
                Ok(())
            });
            start_transform_side(&w, instances, Some(publisher), &mut tasks);
        }
    } else {
        match acquire_leadership(&args, &client, &identity, timing, &shutdown).await {
            Leadership::Unelected => {}
            Leadership::Leader(elector) => hold_leadership(*elector, controllers_done.clone()),
            Leadership::ShutDown => return join_all(tasks).await,
        }
        let Some(key) = graph_key(&client, &own_namespace(), &health, &shutdown).await else {
            let result = join_all(tasks).await;
            controllers_done.trigger();
            return result;
        };
        let w = wiring(key);
        let graph_side = start_graph_side(&w, None, &mut tasks);
        let instances = instance_side(&w, graph_side, None);
        start_transform_side(&w, instances, None, &mut tasks);
    }

    tracing::info!(version = env!("CARGO_PKG_VERSION"), "pequod started");
    shutdown.wait().await;
    tracing::info!("shutting down");
    let result = join_all(tasks).await;
    controllers_done.trigger();
    // Gives the elector a moment to release the lease, and the keeper its shards.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let Some(keeper) = keeper {
        let _ = tokio::time::timeout(SHARD_RELEASE_WAIT, keeper).await;
    }
    result
}

type Tasks = JoinSet<Result<(), StartupError>>;
/// The graphs whose applied objects changed, from the shared watches.
type GraphTriggers =
    tokio::sync::mpsc::UnboundedReceiver<kube::runtime::reflector::ObjectRef<crate::api::ResourceGraph>>;

/// The graphs the graph cache lists or sees change.
type GraphEvents = tokio::sync::mpsc::UnboundedReceiver<Arc<crate::api::ResourceGraph>>;

/// The leader election's timing, checked when the operator elects a leader.
fn leader_timing(args: &RunArgs) -> Result<Timing, StartupError> {
    let timing = Timing {
        lease_duration: Duration::from_secs(args.leader_elect_lease_duration),
        renew_deadline: Duration::from_secs(args.leader_elect_renew_deadline),
        retry_period: Duration::from_secs(args.leader_elect_retry_period),
    };
    if args.leader_elect {
        timing.validate().map_err(StartupError::InvalidFlags)?;
    } else if args.shards > 1 {
        // Without an elected leader every replica would serve the kinds.
        return Err(StartupError::InvalidFlags("--shards above 1 needs --leader-elect"));
    }
    Ok(timing)
}

/// The cluster's configuration (kept for impersonation) and a client.
async fn connect(identity: &str) -> Result<(kube::Config, Client), StartupError> {
    let mut config = kube::Config::infer()
        .await
        .map_err(|e| StartupError::Kubeconfig(kube::Error::InferConfig(e)))?;
    // Names the replica in the apiserver's audit log, so that its writes can be told apart.
    if let Ok(agent) = axum::http::HeaderValue::from_str(&format!("pequod/{} {identity}", env!("CARGO_PKG_VERSION"))) {
        config.headers.push((axum::http::header::USER_AGENT, agent));
    }
    // kube retries a 503 up to 15 times with delays growing to minutes: one aggregated API that
    // is down would hold a reconcile worker that long. Reconciles fail fast and retry on their
    // own schedule, with the failure in status.
    config.default_retry = false;
    let client = crate::apply::nesting::client(config.clone()).map_err(StartupError::Kubeconfig)?;
    Ok((config, client))
}

/// Serves /metrics, over HTTPS to authorized clients with `--metrics-secure`.
fn serve_metrics(
    args: &RunArgs,
    metrics: &Arc<Metrics>,
    client: &Client,
    shutdown: &Shutdown,
    tasks: &mut Tasks,
) -> Result<(), StartupError> {
    let addr = args.metrics_bind_address;
    let Some(listener) = server::listen(addr).map_err(|source| StartupError::Bind { addr, source })? else {
        return Ok(());
    };
    let router = server::metrics_router(metrics.clone());
    if args.metrics_secure {
        let tls = secure::tls_config(args.metrics_cert_dir.as_deref())?;
        let auth =
            Arc::new(secure::Authorizer::new(client.clone()).for_audiences(args.metrics_token_audiences.clone()));
        let router = router.layer(axum::middleware::from_fn_with_state(auth, secure::authorize));
        tracing::info!(%addr, "serving /metrics over HTTPS to authorized clients");
        let serve = secure::serve_tls(listener, router, tls, shutdown.clone());
        tasks.spawn(async move { serve.await.map_err(StartupError::Server) });
    } else {
        tracing::info!(%addr, "serving /metrics");
        let serve = server::serve(listener, router, shutdown.clone());
        tasks.spawn(async move { serve.await.map_err(StartupError::Server) });
    }
    Ok(())
}

/// Serves /healthz and /readyz.
fn serve_probes(
    args: &RunArgs,
    health: &Arc<Health>,
    shutdown: &Shutdown,
    tasks: &mut Tasks,
) -> Result<(), StartupError> {
    let addr = args.health_probe_bind_address;
    if let Some(listener) = server::listen(addr).map_err(|source| StartupError::Bind { addr, source })? {
        tracing::info!(%addr, "serving /healthz and /readyz");
        let serve = server::serve(listener, server::probes_router(health.clone()), shutdown.clone());
        tasks.spawn(async move { serve.await.map_err(StartupError::Server) });
    }
    Ok(())
}

/// Serves the conversion webhook, on every replica, with its certificate kept current from its
/// Secret. Returns what generated CRDs need to name it; None when it is disabled.
fn serve_webhook(
    args: &RunArgs,
    converter: ModuleConverter,
    client: &Client,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
    shutdown: &Shutdown,
    tasks: &mut Tasks,
) -> Result<Option<ConversionWebhook>, StartupError> {
    let addr = args.webhook_bind_address;
    let Some(listener) = server::listen(addr).map_err(|source| StartupError::Bind { addr, source })? else {
        tracing::info!("conversion webhook disabled: Transforms whose module declares several versions are refused");
        return Ok(None);
    };
    let namespace = own_namespace();
    let names = certificate::wanted_names(&args.webhook_service, &namespace, args.webhook_url.as_ref());
    let validity = Duration::from_secs(args.webhook_cert_validity);
    let store = CertificateStore::new(client.clone(), &namespace, names, validity);
    let resolver = Arc::new(CertResolver::default());
    let (ca_sender, ca_bundle) = tokio::sync::watch::channel(None);
    health.register(Probe::Readiness, certificate::READINESS_CHECK, "not loaded yet");
    let (h, s, r) = (health.clone(), shutdown.clone(), resolver.clone());
    tasks.spawn(async move {
        certificate::keep_current(store, r, ca_sender, h, s).await;
        Ok(())
    });

    let tls = webhook::tls_config(resolver).map_err(StartupError::Webhook)?;
    let router = webhook::router(Arc::new(Webhook::new(converter, metrics.clone())));
    tracing::info!(%addr, "serving the conversion webhook over HTTPS");
    let serve = secure::serve_tls(listener, router, tls, shutdown.clone());
    tasks.spawn(async move { serve.await.map_err(StartupError::Server) });

    let endpoint = match &args.webhook_url {
        Some(url) => WebhookEndpoint::Url(url.base.clone()),
        None => WebhookEndpoint::Service {
            namespace,
            name: args.webhook_service.clone(),
        },
    };
    Ok(Some(ConversionWebhook { endpoint, ca_bundle }))
}

/// Whether this replica may reconcile.
enum Leadership {
    /// No leader election (`--leader-elect=false`): it reconciles.
    Unelected,
    Leader(Box<Elector>),
    /// Shutdown came before the lease.
    ShutDown,
}

/// Waits for the lease when the operator elects a leader. Standby replicas serve probes and
/// metrics but do not reconcile; their readiness does not wait for the controllers, so that
/// rolling updates can proceed.
async fn acquire_leadership(
    args: &RunArgs,
    client: &Client,
    identity: &str,
    timing: Timing,
    shutdown: &Shutdown,
) -> Leadership {
    if !args.leader_elect {
        return Leadership::Unelected;
    }
    let namespace = lease_namespace(args);
    let mut elector = Elector::new(
        Api::<Lease>::namespaced(client.clone(), &namespace),
        &args.leader_election_id,
        identity,
        timing,
    );
    tracing::info!(lease = %args.leader_election_id, %namespace, identity = %elector.identity(), "waiting to become the leader");
    if elector.acquire(shutdown).await {
        Leadership::Leader(Box::new(elector))
    } else {
        Leadership::ShutDown
    }
}

/// Renews the lease until the controllers are `done`; a lost lease ends the process.
fn hold_leadership(mut elector: Elector, done: Shutdown) {
    tokio::spawn(async move {
        // Renewal continues while the controllers drain after a shutdown signal, and the
        // lease is released only once they have stopped.
        if !elector.hold(&done).await {
            tracing::error!("leader election lost: exiting so that no two replicas reconcile at once");
            std::process::exit(1);
        }
    });
}

fn lease_namespace(args: &RunArgs) -> String {
    args.leader_election_namespace.clone().unwrap_or_else(own_namespace)
}

/// Keeps this replica's shard leases until the controllers are `done` (then hands them over);
/// a shard lost ends the process, as a lost leader lease does.
fn keep_shards(
    args: &RunArgs,
    client: &Client,
    identity: &str,
    timing: Timing,
    done: Shutdown,
) -> (Arc<Shards>, tokio::task::JoinHandle<()>) {
    let config = LeaseConfig {
        api: Api::<Lease>::namespaced(client.clone(), &lease_namespace(args)),
        prefix: args.leader_election_id.clone(),
        identity: identity.to_string(),
        timing,
    };
    tracing::info!(shards = args.shards, identity, "sharing ResourceGraphs among replicas");
    let (keeper, shards) = Keeper::new(config, args.shards);
    let task = tokio::spawn(async move {
        if let Stopped::Lost(shard) = keeper.run(done).await {
            tracing::error!(
                shard,
                "shard lease lost: exiting so that no two replicas reconcile a graph at once"
            );
            std::process::exit(1);
        }
    });
    (shards, task)
}

/// What the controllers are built from.
struct Wiring<'a> {
    args: &'a RunArgs,
    client: Client,
    config: kube::Config,
    key: GraphKey,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: Shutdown,
    renderer: Renderer,
    fetcher: Fetcher,
    /// None when the conversion webhook is disabled.
    webhook: Option<ConversionWebhook>,
}

/// What the graph controller shares with the instances' controllers.
struct GraphSide {
    watches: Arc<ObjectWatches>,
    graph_cache: Arc<GraphCache>,
    applier: Applier,
    recorder: Recorder,
}

/// Starts the ResourceGraph controller: of every graph, or of the graphs in the shards this
/// replica holds.
fn start_graph_side(w: &Wiring<'_>, sharing: Option<Arc<Shards>>, tasks: &mut Tasks) -> GraphSide {
    let (watches, triggers) = ObjectWatches::new(w.client.clone(), w.shutdown.clone());
    let scope = sharing.map(|shards| GraphScope { shards });
    let (graph_cache, graph_events) = GraphCache::start(w.client.clone(), w.shutdown.clone(), scope.clone());
    let recorder = event_recorder(&w.client);
    let applier = Applier::new(w.client.clone(), w.metrics.clone()).with_impersonation(w.config.clone());
    let mut graphs = resourcegraph::Context::new(
        w.client.clone(),
        applier.clone(),
        w.key.clone(),
        watches.clone(),
        recorder.clone(),
        w.metrics.clone(),
        w.args.apply_concurrency.into(),
    );
    if let Some(scope) = scope {
        watches.know_shards(scope.shards.clone());
        let (gauge, mut held) = (w.metrics.shards_held.clone(), scope.shards.subscribe());
        tokio::spawn(async move {
            loop {
                gauge.set(held.borrow_and_update().len() as i64);
                if held.changed().await.is_err() {
                    break;
                }
            }
        });
        graphs = graphs.sharing(scope.shards);
    }
    start_graph_controller(w, graphs, (graph_cache.clone(), graph_events), triggers, tasks);
    GraphSide {
        watches,
        graph_cache,
        applier,
        recorder,
    }
}

/// What the instances' controllers share, with the graph side's applier, caches and watches;
/// with `shards`, of the instances of the shards held.
fn instance_side(w: &Wiring<'_>, graph_side: GraphSide, shards: Option<Arc<Shards>>) -> Arc<instance::Shared> {
    let GraphSide {
        watches,
        graph_cache,
        applier,
        recorder,
    } = graph_side;
    let shared = instance::Shared::new(
        w.client.clone(),
        w.renderer.clone(),
        applier,
        w.key.clone(),
        recorder,
        w.metrics.clone(),
        graph_cache,
    )
    .with_object_watches(watches);
    Arc::new(match shards {
        Some(shards) => shared.sharing(shards),
        None => shared,
    })
}

/// Serves, on every replica sharing the instances, the kinds the leader publishes.
fn follow_published(w: &Wiring<'_>, instances: &Arc<instance::Shared>, shards: Arc<Shards>, tasks: &mut Tasks) {
    let followers = Followers {
        client: w.client.clone(),
        namespace: own_namespace(),
        key: w.key.clone(),
        renderer: w.renderer.clone(),
        supervisor: Supervisor::new(instances.clone(), w.shutdown.clone()),
        shards,
    };
    let shutdown = w.shutdown.clone();
    tasks.spawn(async move {
        followers.run(shutdown).await;
        Ok(())
    });
}

/// Starts the Transform controller, which serves each kind through the supervisor: its
/// instances and rollout, or (with a `publisher`, when replicas share the instances) its
/// rollout alone, published for the replicas.
fn start_transform_side(
    w: &Wiring<'_>,
    instances: Arc<instance::Shared>,
    publisher: Option<Arc<Publisher>>,
    tasks: &mut Tasks,
) {
    let recorder = instances.recorder.clone();
    let supervisor = Supervisor::new(instances, w.shutdown.clone());
    let (supervisor, publishing) = match publisher {
        Some(publisher) => (supervisor.publishing(publisher), true),
        None => (supervisor, false),
    };
    let renderer = w.renderer.clone();
    let transforms = transform::Context::new(
        w.client.clone(),
        w.fetcher.clone(),
        renderer,
        recorder,
        w.metrics.clone(),
        supervisor,
        w.key.clone(),
    )
    .trusting(trusted_namespaces(w.args))
    .with_rbac_mode(if w.args.generate_rbac {
        RbacMode::Generate
    } else {
        RbacMode::External
    })
    .with_conversion_webhook(w.webhook.clone());
    let transforms = Arc::new(if publishing {
        transforms.publishing_modules()
    } else {
        transforms
    });
    let (h, s, n) = (w.health.clone(), w.shutdown.clone(), w.args.max_concurrent_reconciles);
    tasks.spawn(async move {
        transform::run(transforms, n, h, s).await;
        Ok(())
    });
}

/// Starts the ResourceGraph controller, acting as the graphs' service accounts and checking
/// the grants of their Transforms.
fn start_graph_controller(
    w: &Wiring<'_>,
    graphs: resourcegraph::Context,
    cache: (Arc<GraphCache>, GraphEvents),
    triggers: GraphTriggers,
    tasks: &mut Tasks,
) {
    let graphs = Arc::new(
        graphs
            .acting_as(GraphAccounts {
                default: w.args.default_service_account.clone(),
                locked: w.args.lock_service_account,
            })
            .checking_grants(watch_transforms(&w.client), trusted_namespaces(w.args)),
    );
    let (h, s, n) = (w.health.clone(), w.shutdown.clone(), w.args.max_concurrent_reconciles);
    tasks.spawn(async move {
        resourcegraph::run(graphs, cache, triggers, n, h, s).await;
        Ok(())
    });
}

/// Events are reported as `pequod`, by the pod that wrote them.
fn event_recorder(client: &Client) -> Recorder {
    let reporter = Reporter {
        controller: "pequod".into(),
        instance: std::env::var("POD_NAME")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok()),
    };
    Recorder::new(client.clone(), reporter)
}

/// The module fetcher, as the source flags say.
fn fetcher(args: &RunArgs, client: &Client, metrics: &Arc<Metrics>) -> Fetcher {
    let sources = &args.sources;
    Fetcher::new(
        client.clone(),
        FetcherConfig {
            cache_dir: args.cue.cache_dir.clone(),
            max_cache_bytes: sources.cache_size_mb.saturating_mul(1024 * 1024),
            resolution_ttl: Duration::from_secs(sources.cache_ttl_hours * 3600),
            git_binary: sources.git_binary.clone(),
            insecure_registries: sources.insecure_registries.clone(),
            allow_local: sources.allow_local_sources,
            timeout: Duration::from_secs(sources.fetch_timeout),
            poll_interval: Duration::from_secs(sources.module_poll_interval),
        },
        metrics.clone(),
    )
}

/// The graph-signing key (a Secret in `namespace`), read or made before any controller
/// starts. Until it can be, readiness says why and it is tried again: a namespace that does not
/// exist (a cluster with only the CRDs installed, as by `make install`) is created; one the
/// operator may not create is waited for. None when shutdown came first.
async fn graph_key(client: &Client, namespace: &str, health: &Health, shutdown: &Shutdown) -> Option<GraphKey> {
    health.register(Probe::Readiness, KEY_CHECK, "not loaded yet");
    let mut delay = Duration::from_secs(1);
    let mut tried_namespace = false;
    let mut last_reason = String::new();
    loop {
        let reason = match signing_key::load_or_create(client, namespace).await {
            Ok(key) => {
                health.set(Probe::Readiness, KEY_CHECK, Ok(()));
                return Some(key);
            }
            // The Secret could not be made because its namespace does not exist.
            Err(signing_key::KeyError::Api {
                source: kube::Error::Api(status),
                ..
            }) if status.code == 404 => {
                if !tried_namespace {
                    tried_namespace = true;
                    match create_namespace(client, namespace).await {
                        Ok(()) => {
                            tracing::info!(%namespace, "created the operator's namespace to keep its graph-signing key in");
                            continue;
                        }
                        Err(e) => tracing::warn!(%namespace, error = %e, "cannot create the operator's namespace"),
                    }
                }
                format!(
                    "namespace {namespace} does not exist and the operator could not create it; create it \
                     (kubectl create namespace {namespace}) or set POD_NAMESPACE to an existing namespace"
                )
            }
            Err(e) => e.to_string(),
        };
        if reason != last_reason {
            tracing::warn!(%reason, "waiting for the graph-signing key: no controller runs until it is loaded");
            last_reason.clone_from(&reason);
        }
        health.set(Probe::Readiness, KEY_CHECK, Err(reason));
        tokio::select! {
            _ = shutdown.wait() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(KEY_RETRY_MAX);
        tried_namespace = false;
    }
}

/// Creates namespace `name`, labelled as Pequod's; one that exists already is fine.
async fn create_namespace(client: &Client, name: &str) -> Result<(), kube::Error> {
    use crate::api::names::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
    let namespace = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            labels: Some([(MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string())].into()),
            ..Default::default()
        },
        ..Default::default()
    };
    match Api::<Namespace>::all(client.clone())
        .create(&kube::api::PostParams::default(), &namespace)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// A cache of every Transform, kept by a watch for as long as the process runs.
fn watch_transforms(client: &Client) -> kube::runtime::reflector::Store<crate::api::Transform> {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    let (reader, writer) = reflector::store();
    let transforms = Api::<crate::api::Transform>::all(client.clone());
    let stream = reflector(writer, watcher(transforms, watcher::Config::default()))
        .default_backoff()
        .for_each(|_| futures::future::ready(()));
    tokio::spawn(stream);
    reader
}

/// The trusted Transform namespaces: the flag's, else the operator's own.
fn trusted_namespaces(args: &RunArgs) -> TrustedNamespaces {
    if args.trusted_transform_namespaces.is_empty() {
        TrustedNamespaces::new(vec![own_namespace()])
    } else {
        TrustedNamespaces::new(args.trusted_transform_namespaces.clone())
    }
}

/// The operator's own namespace: the pod's, else `pequod-system`.
fn own_namespace() -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| "pequod-system".to_string())
}

async fn join_all(mut tasks: JoinSet<Result<(), StartupError>>) -> Result<(), StartupError> {
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        if let Ok(Err(e)) = joined {
            tracing::error!(error = %e, "task failed during shutdown");
            result = Err(e);
        }
    }
    result
}

/// Unique per process, readable per pod: `<pod name>_<random>`.
fn leader_identity() -> String {
    let pod = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "pequod".to_string());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{pod}_{:x}{:08x}", std::process::id(), nanos)
}

/// Keeps the `cue` readiness check current: rendering is impossible without a working cue.
/// The binary is run once at start-up; after that every render reports whether it could start
/// cue, so a working operator at rest starts no process. Only while cue cannot be started is it
/// tried again, every [`CUE_RETRY_INTERVAL`].
async fn check_cue_binary(cue: CueCli, health: Arc<Health>, shutdown: Shutdown) -> Result<(), StartupError> {
    let mut availability = cue.availability();
    // A binary that starts but cannot even print its version is as unusable as a missing one.
    let mut broken = version_failure(&cue).await;
    loop {
        let state = match &broken {
            Some(e) => Some(Err(e.clone())),
            None => availability.borrow_and_update().clone(),
        };
        let failing = matches!(state, Some(Err(_)));
        if let Some(state) = state {
            health.set(Probe::Readiness, "cue", state);
        }
        tokio::select! {
            _ = shutdown.wait() => return Ok(()),
            changed = availability.changed() => if changed.is_err() { return Ok(()) },
            _ = tokio::time::sleep(CUE_RETRY_INTERVAL), if failing => broken = version_failure(&cue).await,
        }
    }
}

/// Why `cue version` failed, unless the binary could not be started at all (every run
/// reports that through [`CueCli::availability`]).
async fn version_failure(cue: &CueCli) -> Option<String> {
    let error = cue.version().await.err()?;
    tracing::warn!(error = %error, binary = %cue.binary().display(), "cue binary does not work");
    (!matches!(error, crate::cue::CueError::Spawn { .. })).then(|| error.to_string())
}
