//! Run mode: wires the servers, health checks and controllers together until shutdown.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::{Api, Client};
use tokio::task::JoinSet;

use crate::apply::Applier;
use crate::authority::{GraphAccounts, TrustedNamespaces};
use crate::cli::RunArgs;
use crate::controller::instance::{self, Supervisor};
use crate::controller::watches::ObjectWatches;
use crate::controller::{resourcegraph, transform};
use crate::cue::{CueCli, Renderer, RendererConfig};
use crate::metrics::Metrics;
use crate::rbac::RbacMode;
use crate::runtime::health::{Health, Probe};
use crate::runtime::leader::{Elector, Timing};
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

pub async fn run(args: RunArgs) -> Result<(), StartupError> {
    let timing = Timing {
        lease_duration: Duration::from_secs(args.leader_elect_lease_duration),
        renew_deadline: Duration::from_secs(args.leader_elect_renew_deadline),
        retry_period: Duration::from_secs(args.leader_elect_retry_period),
    };
    if args.leader_elect {
        timing.validate().map_err(StartupError::InvalidFlags)?;
    }
    crate::graph::reference::mark_sensitive(args.sensitive_kinds.clone());
    let metrics = Arc::new(Metrics::new()?);
    crate::controller::init_metrics(&metrics);
    let health = Arc::new(Health::new());
    health.register(Probe::Readiness, "cue", "not checked yet");

    let shutdown = Shutdown::new();
    shutdown.trigger_on_signals();
    let mut tasks: JoinSet<Result<(), StartupError>> = JoinSet::new();

    let mut config = kube::Config::infer()
        .await
        .map_err(|e| StartupError::Kubeconfig(kube::Error::InferConfig(e)))?;
    // kube retries a 503 up to 15 times with delays growing to minutes: one aggregated API that
    // is down would hold a reconcile worker that long. Reconciles fail fast and retry on their
    // own schedule, with the failure in status.
    config.default_retry = false;
    let client = Client::try_from(config.clone()).map_err(StartupError::Kubeconfig)?;

    let addr = args.metrics_bind_address;
    if let Some(listener) = server::listen(addr).map_err(|source| StartupError::Bind { addr, source })? {
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
    }
    let addr = args.health_probe_bind_address;
    if let Some(listener) = server::listen(addr).map_err(|source| StartupError::Bind { addr, source })? {
        tracing::info!(%addr, "serving /healthz and /readyz");
        let serve = server::serve(listener, server::probes_router(health.clone()), shutdown.clone());
        tasks.spawn(async move { serve.await.map_err(StartupError::Server) });
    }

    let cue = args.cue.runner().with_metrics(metrics.clone());
    tasks.spawn(check_cue_binary(cue.clone(), health.clone(), shutdown.clone()));

    // Standby replicas serve probes and metrics but do not reconcile; their readiness does not
    // wait for the controllers, so that rolling updates can proceed.
    let mut elector = None;
    if args.leader_elect {
        let namespace = args.leader_election_namespace.clone().unwrap_or_else(own_namespace);
        let mut e = Elector::new(
            Api::<Lease>::namespaced(client.clone(), &namespace),
            &args.leader_election_id,
            &leader_identity(),
            timing,
        );
        tracing::info!(lease = %args.leader_election_id, %namespace, identity = %e.identity(), "waiting to become the leader");
        if !e.acquire(&shutdown).await {
            return join_all(tasks).await;
        }
        elector = Some(e);
    }
    let controllers_done = Shutdown::new();
    if let Some(mut e) = elector {
        let done = controllers_done.clone();
        tokio::spawn(async move {
            // Renewal continues while the controllers drain after a shutdown signal, and the
            // lease is released only once they have stopped.
            if !e.hold(&done).await {
                tracing::error!("leader election lost: exiting so that no two replicas reconcile at once");
                std::process::exit(1);
            }
        });
    }

    let Some(key) = graph_key(&client, &own_namespace(), &health, &shutdown).await else {
        let result = join_all(tasks).await;
        controllers_done.trigger();
        return result;
    };
    let (watches, triggers) = ObjectWatches::new(client.clone(), shutdown.clone());
    let reporter = kube::runtime::events::Reporter {
        controller: "pequod".into(),
        instance: std::env::var("POD_NAME")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok()),
    };
    let recorder = kube::runtime::events::Recorder::new(client.clone(), reporter);
    let applier = Applier::new(client.clone(), metrics.clone()).with_impersonation(config);
    let renderer = Renderer::new(cue, RendererConfig::new(&args.cue.cache_dir), metrics.clone());

    let graphs = Arc::new(
        resourcegraph::Context::new(
            client.clone(),
            applier.clone(),
            key.clone(),
            watches.clone(),
            recorder.clone(),
            metrics.clone(),
            args.apply_concurrency.into(),
        )
        .acting_as(GraphAccounts {
            default: args.default_service_account.clone(),
            locked: args.lock_service_account,
        })
        .checking_grants(watch_transforms(&client), trusted_namespaces(&args)),
    );
    let (h, s, n) = (health.clone(), shutdown.clone(), args.max_concurrent_reconciles);
    tasks.spawn(async move {
        resourcegraph::run(graphs, triggers, n, h, s).await;
        Ok(())
    });

    let supervisor = Supervisor::new(
        Arc::new(
            instance::Shared::new(
                client.clone(),
                renderer.clone(),
                applier,
                key.clone(),
                recorder.clone(),
                metrics.clone(),
            )
            .with_object_watches(watches),
        ),
        shutdown.clone(),
    );
    let fetcher = Fetcher::new(
        client.clone(),
        FetcherConfig {
            cache_dir: args.cue.cache_dir.clone(),
            max_cache_bytes: args.sources.cache_size_mb.saturating_mul(1024 * 1024),
            resolution_ttl: Duration::from_secs(args.sources.cache_ttl_hours * 3600),
            git_binary: args.sources.git_binary.clone(),
            insecure_registries: args.sources.insecure_registries.clone(),
            allow_local: args.sources.allow_local_sources,
            timeout: Duration::from_secs(args.sources.fetch_timeout),
            poll_interval: Duration::from_secs(args.sources.module_poll_interval),
        },
        metrics.clone(),
    );
    let transforms = Arc::new(
        transform::Context::new(
            client.clone(),
            fetcher,
            renderer,
            recorder,
            metrics.clone(),
            supervisor,
            key,
        )
        .trusting(trusted_namespaces(&args))
        .with_rbac_mode(if args.generate_rbac {
            RbacMode::Generate
        } else {
            RbacMode::External
        }),
    );
    let (h, s, n) = (health.clone(), shutdown.clone(), args.max_concurrent_reconciles);
    tasks.spawn(async move {
        transform::run(transforms, n, h, s).await;
        Ok(())
    });

    tracing::info!(version = env!("CARGO_PKG_VERSION"), "pequod started");
    shutdown.wait().await;
    tracing::info!("shutting down");
    let result = join_all(tasks).await;
    controllers_done.trigger();
    // Gives the elector a moment to release the lease.
    tokio::time::sleep(Duration::from_millis(200)).await;
    result
}

/// The graph-signing key (a Secret in `namespace`), read or made before any controller
/// starts. Until it can be, readiness says why and it is tried again: a namespace that does not
/// exist (a cluster with only the CRDs installed, as by `make install`) is created; one the
/// operator may not create is waited for. None when shutdown came first.
async fn graph_key(
    client: &Client,
    namespace: &str,
    health: &Health,
    shutdown: &Shutdown,
) -> Option<crate::executor::proof::GraphKey> {
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
