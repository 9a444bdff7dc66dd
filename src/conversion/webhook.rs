//! The conversion webhook's HTTP side: `POST /convert/{namespace}/{transform}/{digest}` over
//! HTTPS, answering the apiserver's ConversionReviews for the kind of a Transform with the
//! module of that digest. Every replica serves it, leader or not: a module this replica has
//! not loaded is fetched from the Transform's source, when the Transform's status records that
//! digest. Reviews are bounded (body size, objects, reviews at once) and answered within the
//! apiserver's 10 s deadline.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client};
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::certificate::CertResolver;
use super::published::{self, PublishError};
use super::review::{self, Answer, Outcome, ServedKind};
use crate::api::Transform;
use crate::cue::conversion::{Conversion, ConversionError};
use crate::cue::{Module, RenderError, Renderer, is_digest};
use crate::error::ErrorCategory;
use crate::lru::Lru;
use crate::metrics::Metrics;

/// Longest a review may take, from its arrival to its answer: the apiserver gives up after 10 s.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(8);
/// Longest a review's body may take to arrive, from the request's arrival: the apiserver sends
/// it at once, and a body that trickles holds its share of memory meanwhile.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(3);
/// Most conversions at once (each a cue call), taken only once a review is read and parsed.
const MAX_CONCURRENT_CONVERSIONS: usize = 4;
/// Bytes of memory the reviews in flight may hold together; a review waits, within its
/// deadline, for its share. A body counts twice its bytes (the body, then its objects' text, or
/// the answer), from the moment each piece arrives; specs count twice the bound of their parsed
/// size (parsed, and converted). 128 MiB is two of the largest bodies.
pub const REVIEW_MEMORY_BYTES: usize = 128 * 1024 * 1024;
/// A body's bytes count this many times against [`REVIEW_MEMORY_BYTES`].
const BODY_MEMORY_FACTOR: usize = 2;
/// A spec's parsed size bound counts this many times against [`REVIEW_MEMORY_BYTES`].
const SPEC_MEMORY_FACTOR: usize = 2;
/// Size of the pieces an answer is sent in: the memory it holds is given back after the last.
const ANSWER_CHUNK_BYTES: usize = 1024 * 1024;
/// How long a kind read from a CRD is reused.
const KIND_TTL: Duration = Duration::from_secs(60);
/// Most kinds remembered.
const MAX_KINDS: usize = 256;

/// The module a review is for: the path's Transform and module digest (`sha256:<hex>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub namespace: String,
    pub transform: String,
    pub digest: String,
}

impl Target {
    /// The target of the path segments, or why they name none.
    pub fn from_path(namespace: &str, transform: &str, hex: &str) -> Result<Self, String> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        if !name_ok(namespace) || !name_ok(transform) {
            return Err("the path must name a Transform: /convert/NAMESPACE/NAME/DIGEST".into());
        }
        let digest = format!("sha256:{hex}");
        if !is_digest(&digest) {
            return Err("the digest must be 64 lower-case hex digits (a module digest without sha256:)".into());
        }
        Ok(Self {
            namespace: namespace.to_string(),
            transform: transform.to_string(),
            digest,
        })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}@{}", self.namespace, self.transform, self.digest)
    }
}

/// Why a review could not be converted (answered Failure with this message).
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("Transform {namespace}/{name} not found")]
    TransformNotFound { namespace: String, name: String },
    #[error("Transform {namespace}/{name} has no generated CRD yet")]
    NoCrd { namespace: String, name: String },
    #[error("CustomResourceDefinition {name} not found")]
    CrdNotFound { name: String },
    #[error("module {digest} is not published for Transform {namespace}/{name}'s conversions")]
    NotPublished {
        namespace: String,
        name: String,
        digest: String,
    },
    #[error("reading {what}: {source}")]
    Api {
        what: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("reading the published module of Transform {namespace}/{name}: {source}")]
    Published {
        namespace: String,
        name: String,
        #[source]
        source: PublishError,
    },
    #[error("loading module {digest}: {source}")]
    Load {
        digest: String,
        #[source]
        source: RenderError,
    },
    #[error("loading the module stopped: {0}")]
    Stopped(String),
    /// The error of a load shared by several reviews.
    #[error(transparent)]
    Shared(Arc<WebhookError>),
}

impl ErrorCategory for WebhookError {
    fn reason(&self) -> &'static str {
        match self {
            Self::TransformNotFound { .. } => "TransformNotFound",
            Self::NoCrd { .. } | Self::CrdNotFound { .. } => "CRDNotFound",
            Self::NotPublished { .. } => "ModuleNotPublished",
            Self::Api { .. } => "ApiError",
            Self::Published { source, .. } => source.reason(),
            Self::Load { source, .. } => source.reason(),
            Self::Stopped(_) => "Stopped",
            Self::Shared(inner) => inner.reason(),
        }
    }

    fn is_transient(&self) -> bool {
        match self {
            Self::Api { .. } | Self::Stopped(_) => true,
            Self::Published { source, .. } => source.is_transient(),
            Self::Load { source, .. } => source.is_transient(),
            Self::Shared(inner) => inner.is_transient(),
            _ => false,
        }
    }
}

/// What the webhook needs of the cluster and of cue: the operator's is [`ModuleConverter`].
pub trait Converter: Send + Sync + 'static {
    /// The kind the CRD of `target`'s Transform serves.
    fn served_kind(&self, target: &Target) -> impl Future<Output = Result<ServedKind, WebhookError>> + Send;

    /// `items` converted with `target`'s module: one result per item, in order.
    fn convert(
        &self,
        target: &Target,
        items: &[Conversion],
    ) -> impl Future<Output = Result<Vec<Result<Value, ConversionError>>, WebhookError>> + Send;
}

/// The webhook's state.
pub struct Webhook<C> {
    converter: C,
    metrics: Arc<Metrics>,
    conversions: Semaphore,
    memory: MemoryBudget,
    timeout: Duration,
    body_timeout: Duration,
    max_body: usize,
}

impl<C: Converter> Webhook<C> {
    pub fn new(converter: C, metrics: Arc<Metrics>) -> Self {
        Self {
            converter,
            metrics,
            conversions: Semaphore::new(MAX_CONCURRENT_CONVERSIONS),
            memory: MemoryBudget::new(REVIEW_MEMORY_BYTES),
            timeout: REVIEW_TIMEOUT,
            body_timeout: BODY_TIMEOUT,
            max_body: review::MAX_REVIEW_BYTES,
        }
    }

    /// With other deadlines than [`REVIEW_TIMEOUT`] and [`BODY_TIMEOUT`] (tests).
    pub fn with_timeouts(mut self, review: Duration, body: Duration) -> Self {
        self.timeout = review;
        self.body_timeout = body;
        self
    }

    /// With a smaller body limit than [`review::MAX_REVIEW_BYTES`] (tests).
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        self.max_body = bytes.min(review::MAX_REVIEW_BYTES);
        self
    }

    /// With less memory for reviews than [`REVIEW_MEMORY_BYTES`] (tests).
    pub fn with_memory(mut self, bytes: usize) -> Self {
        self.memory = MemoryBudget::new(bytes.min(REVIEW_MEMORY_BYTES));
        self
    }

    /// Converts `request` for `target`, within `reserved`'s share of memory, which grows to
    /// hold the specs parsed.
    async fn answer(&self, target: &Target, request: review::Request, reserved: &mut Reservation) -> Answer {
        let failed = |message: String| review::failure(&request.uid, &message, Vec::new());
        let kind = match self.converter.served_kind(target).await {
            Ok(kind) => kind,
            Err(e) => {
                tracing::warn!(%target, error = %e, reason = e.reason(), "conversion failed: the served kind is unknown");
                return failed(e.to_string());
            }
        };
        // Specs are parsed only once the memory they take is set aside.
        let specs_bytes = request.parsed_specs_bound().saturating_mul(SPEC_MEMORY_FACTOR);
        if let Err(e) = reserved.grow(specs_bytes).await {
            tracing::info!(%target, error = %e, reason = e.reason(), "conversion refused: not enough memory");
            return failed(e.to_string());
        }
        let plan = match review::plan(&request, &kind) {
            Ok(plan) => plan,
            Err(message) => return failed(message),
        };
        if plan.conversions.is_empty() {
            return review::answer(request, &plan, Vec::new());
        }
        let Ok(_converting) = self.conversions.acquire().await else {
            return failed("the conversion webhook is stopping".into());
        };
        match self.converter.convert(target, &plan.conversions).await {
            Ok(converted) => review::answer(request, &plan, converted),
            Err(e) => {
                tracing::warn!(%target, error = %e, reason = e.reason(), "conversion failed: the module is unavailable");
                failed(e.to_string())
            }
        }
    }
}

/// Memory the reviews in flight may hold together, in bytes.
struct MemoryBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl MemoryBudget {
    fn new(total: usize) -> Self {
        // Permits are taken up to u32::MAX at once.
        let total = total.min(u32::MAX as usize);
        Self {
            bytes: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// An empty share, to grow as a review needs.
    fn reserve(&self) -> Reservation {
        Reservation {
            bytes: self.bytes.clone(),
            total: self.total,
            held: None,
        }
    }
}

/// The share of the memory budget one review holds; given back when dropped, which is once its
/// answer is sent (the answer's body holds it).
struct Reservation {
    bytes: Arc<Semaphore>,
    total: usize,
    held: Option<OwnedSemaphorePermit>,
}

/// Why a review cannot have the memory it needs.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "the review needs about {bytes} bytes of memory; the conversion webhook has {total} for all reviews at once: convert fewer objects at once"
    )]
    OverBudget { bytes: usize, total: usize },
    #[error("the conversion webhook is stopping")]
    Closed,
}

impl MemoryError {
    /// Stable reason, for logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::OverBudget { .. } => "OverMemoryBudget",
            Self::Closed => "Stopping",
        }
    }
}

impl Reservation {
    fn held(&self) -> usize {
        self.held.as_ref().map_or(0, OwnedSemaphorePermit::num_permits)
    }

    /// `bytes` more, once the budget has them (callers bound the wait). A review that could
    /// never fit is refused at once.
    async fn grow(&mut self, bytes: usize) -> Result<(), MemoryError> {
        if bytes == 0 {
            return Ok(());
        }
        let wanted = self.held().saturating_add(bytes);
        let over = || MemoryError::OverBudget {
            bytes: wanted,
            total: self.total,
        };
        if wanted > self.total {
            return Err(over());
        }
        let count = u32::try_from(bytes).map_err(|_| over())?;
        let permit = self
            .bytes
            .clone()
            .acquire_many_owned(count)
            .await
            .map_err(|_| MemoryError::Closed)?;
        match &mut self.held {
            Some(held) => held.merge(permit),
            None => self.held = Some(permit),
        }
        Ok(())
    }
}

/// Why a request's body was not read (answered without a review).
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("a review body has at most {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the review body did not arrive within {seconds}s")]
    TooSlow { seconds: f64 },
    #[error("the review body could not be read: {message}")]
    Broken { message: String },
    #[error(transparent)]
    Memory(MemoryError),
    #[error("the conversion webhook is holding as many reviews as its memory allows; try again")]
    Busy,
}

impl BodyError {
    fn status(&self) -> StatusCode {
        match self {
            Self::TooLarge { .. } | Self::Memory(MemoryError::OverBudget { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::TooSlow { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::Broken { .. } => StatusCode::BAD_REQUEST,
            Self::Memory(MemoryError::Closed) | Self::Busy => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Stable reason, for logs.
    fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "BodyTooLarge",
            Self::TooSlow { .. } => "BodyTooSlow",
            Self::Broken { .. } => "BodyBroken",
            Self::Memory(e) => e.reason(),
            Self::Busy => "MemoryBusy",
        }
    }
}

/// The webhook's routes.
pub fn router<C: Converter>(webhook: Arc<Webhook<C>>) -> Router {
    Router::new()
        .route("/convert/{namespace}/{transform}/{digest}", post(convert::<C>))
        .with_state(webhook)
}

async fn convert<C: Converter>(
    State(hook): State<Arc<Webhook<C>>>,
    Path((namespace, transform, digest)): Path<(String, String, String)>,
    body: Body,
) -> Response {
    let arrived = tokio::time::Instant::now();
    let target = match Target::from_path(&namespace, &transform, &digest) {
        Ok(target) => target,
        Err(why) => return hook.refuse(StatusCode::NOT_FOUND, why),
    };
    // The body is read first, under its own deadline and holding only memory: a body that
    // trickles holds no conversion and is cut off soon.
    let mut reserved = hook.memory.reserve();
    let bytes = match hook.read_body(body, &mut reserved, arrived + hook.body_timeout).await {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::debug!(%target, error = %e, reason = e.reason(), "refused a review body");
            return hook.refuse(e.status(), e.to_string());
        }
    };
    let request = match review::parse(&bytes) {
        Ok(request) => request,
        Err(e) => {
            tracing::debug!(%target, reason = e.reason(), "refused a request that is not a conversion review");
            return hook.refuse(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    drop(bytes);
    let (uid, objects, desired) = (
        request.uid.clone(),
        request.objects.len(),
        request.desired_api_version.clone(),
    );
    let started = Instant::now();
    let deadline = arrived + hook.timeout;
    let answer = match tokio::time::timeout_at(deadline, hook.answer(&target, request, &mut reserved)).await {
        Ok(answer) => answer,
        Err(_) => review::failure(
            &uid,
            &format!("the conversion did not finish within {}s", hook.timeout.as_secs_f64()),
            Vec::new(),
        ),
    };
    let took_ms = started.elapsed().as_millis() as u64;
    match &answer.outcome {
        Outcome::Success { objects } => {
            hook.count("success");
            hook.metrics.conversion_objects_total.inc_by(*objects as u64);
            tracing::debug!(%target, %uid, %desired, objects, took_ms, "converted");
        }
        Outcome::Failure { objects: failed } => {
            hook.count("failure");
            // Names only: messages may quote field values.
            tracing::info!(%target, %uid, %desired, objects, failed = %failed.join(","), took_ms, "conversion review answered Failure");
        }
    }
    encoded(&answer, reserved)
}

/// The review of `answer` as the HTTP response, its buffer allocated once at about its size.
/// The response's body holds `reserved` until it is sent or dropped.
fn encoded(answer: &Answer, reserved: Reservation) -> Response {
    let mut body = Vec::with_capacity(answer.encoded_bytes);
    if let Err(e) = serde_json::to_writer(&mut body, &answer.review) {
        tracing::warn!(error = %e, "encoding a conversion review failed");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let body = Bytes::from(body);
    let length = body.len();
    let chunks: Vec<Bytes> = (0..body.len())
        .step_by(ANSWER_CHUNK_BYTES)
        .map(|start| body.slice(start..body.len().min(start + ANSWER_CHUNK_BYTES)))
        .collect();
    let held_until_sent = futures::stream::iter(chunks).map(move |chunk| {
        let _held = &reserved;
        Ok::<Bytes, std::convert::Infallible>(chunk)
    });
    // The length is told, so the pieces go unframed as the one body they are.
    (
        [
            (header::CONTENT_TYPE, "application/json".to_string()),
            (header::CONTENT_LENGTH, length.to_string()),
        ],
        Body::from_stream(held_until_sent),
    )
        .into_response()
}

impl<C: Converter> Webhook<C> {
    fn count(&self, result: &str) {
        self.metrics
            .conversion_requests_total
            .with_label_values(&[result])
            .inc();
    }

    /// A request answered without a review.
    fn refuse(&self, status: StatusCode, message: String) -> Response {
        self.count("invalid");
        (status, message + "\n").into_response()
    }

    /// The body, read by `deadline` and within the body limit; `reserved` grows by its bytes
    /// (twice) as they arrive, waiting for the memory within the same deadline.
    async fn read_body(
        &self,
        body: Body,
        reserved: &mut Reservation,
        deadline: tokio::time::Instant,
    ) -> Result<Bytes, BodyError> {
        let too_large = BodyError::TooLarge { limit: self.max_body };
        if usize::try_from(body.size_hint().lower()).map_or(true, |declared| declared > self.max_body) {
            return Err(too_large);
        }
        let too_slow = || BodyError::TooSlow {
            seconds: self.body_timeout.as_secs_f64(),
        };
        let mut pieces: Vec<Bytes> = Vec::new();
        let mut received = 0usize;
        let mut stream = body.into_data_stream();
        while let Some(piece) = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| too_slow())?
        {
            let piece = piece.map_err(|e| BodyError::Broken { message: e.to_string() })?;
            received += piece.len();
            if received > self.max_body {
                return Err(too_large);
            }
            match tokio::time::timeout_at(deadline, reserved.grow(piece.len() * BODY_MEMORY_FACTOR)).await {
                Ok(Ok(())) => pieces.push(piece),
                Ok(Err(e)) => return Err(BodyError::Memory(e)),
                Err(_) => return Err(BodyError::Busy),
            }
        }
        if pieces.len() == 1 {
            return Ok(pieces.swap_remove(0));
        }
        let mut whole = Vec::with_capacity(received);
        for piece in pieces {
            whole.extend_from_slice(&piece);
        }
        Ok(Bytes::from(whole))
    }
}

/// The TLS configuration of the webhook: the certificate `resolver` holds at each handshake.
pub fn tls_config(resolver: Arc<CertResolver>) -> Result<Arc<rustls::ServerConfig>, String> {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    Ok(Arc::new(config))
}

/// The kind a CRD serves: its group, kind and every version it lists (a version no longer
/// served may still be stored).
pub fn served_kind_of(crd: &CustomResourceDefinition) -> ServedKind {
    ServedKind {
        group: crd.spec.group.clone(),
        kind: crd.spec.names.kind.clone(),
        versions: crd.spec.versions.iter().map(|v| v.name.clone()).collect(),
    }
}

type ModuleLoad = Shared<BoxFuture<'static, Result<Module, Arc<WebhookError>>>>;

/// The operator's converter: kinds from the Transforms' CRDs, modules from the renderer's
/// store or, on a replica that has not loaded one, as the leader published it (never from
/// the module's source: the webhook holds no source credentials and fetches nothing).
pub struct ModuleConverter {
    loader: Loader,
    kinds: Mutex<Lru<(Instant, ServedKind)>>,
    /// Loads under way, by digest: concurrent reviews for one digest share one fetch, which
    /// goes on when they give up.
    loads: Mutex<HashMap<String, ModuleLoad>>,
}

/// What loading a module takes; cloned into each load's task.
#[derive(Clone)]
struct Loader {
    client: Client,
    renderer: Renderer,
    /// The operator's namespace, where modules are published.
    namespace: String,
}

impl ModuleConverter {
    pub fn new(client: Client, renderer: Renderer, namespace: String) -> Self {
        Self {
            loader: Loader {
                client,
                renderer,
                namespace,
            },
            kinds: Mutex::new(Lru::default()),
            loads: Mutex::default(),
        }
    }

    fn cached_kind(&self, key: &str) -> Option<ServedKind> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        match kinds.get(key) {
            Some((at, kind)) if at.elapsed() < KIND_TTL => Some(kind.clone()),
            Some(_) => {
                kinds.remove(key);
                None
            }
            None => None,
        }
    }

    fn remember_kind(&self, key: String, kind: &ServedKind) {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        while kinds.len() >= MAX_KINDS && kinds.pop_oldest().is_some() {}
        kinds.insert(key, (Instant::now(), kind.clone()), 1);
    }

    async fn module(&self, target: &Target) -> Result<Module, WebhookError> {
        if let Some(module) = self.loader.renderer.find(&target.digest, &target.transform).await {
            return Ok(module);
        }
        let load = {
            let mut loads = self.loads.lock().unwrap_or_else(|p| p.into_inner());
            loads.retain(|_, load| load.peek().is_none());
            loads
                .entry(target.digest.clone())
                .or_insert_with(|| {
                    let (loader, target) = (self.loader.clone(), target.clone());
                    tokio::spawn(async move { loader.load(&target).await.map_err(Arc::new) })
                        .map(|joined| joined.unwrap_or_else(|e| Err(Arc::new(WebhookError::Stopped(e.to_string())))))
                        .boxed()
                        .shared()
                })
                .clone()
        };
        load.await.map_err(WebhookError::Shared)
    }
}

impl Loader {
    async fn transform(&self, target: &Target) -> Result<Transform, WebhookError> {
        Api::<Transform>::namespaced(self.client.clone(), &target.namespace)
            .get_opt(&target.transform)
            .await
            .map_err(|e| WebhookError::Api {
                what: format!("Transform {}/{}", target.namespace, target.transform),
                source: Box::new(e),
            })?
            .ok_or_else(|| WebhookError::TransformNotFound {
                namespace: target.namespace.clone(),
                name: target.transform.clone(),
            })
    }

    /// Loads `target`'s module as published for its Transform (its content checked against
    /// the digest).
    async fn load(&self, target: &Target) -> Result<Module, WebhookError> {
        let published_error = |source| WebhookError::Published {
            namespace: target.namespace.clone(),
            name: target.transform.clone(),
            source,
        };
        let transform = (target.namespace.as_str(), target.transform.as_str());
        let files = published::read(&self.client, &self.namespace, &target.digest, transform)
            .await
            .map_err(published_error)?
            .ok_or_else(|| WebhookError::NotPublished {
                namespace: target.namespace.clone(),
                name: target.transform.clone(),
                digest: target.digest.clone(),
            })?;
        let module = self
            .renderer
            .load(files, &target.transform)
            .await
            .map_err(|source| WebhookError::Load {
                digest: target.digest.clone(),
                source,
            })?;
        tracing::info!(%target, "loaded a published module for conversions");
        Ok(module)
    }
}

impl Converter for ModuleConverter {
    async fn served_kind(&self, target: &Target) -> Result<ServedKind, WebhookError> {
        let key = target.to_string();
        if let Some(kind) = self.cached_kind(&key) {
            return Ok(kind);
        }
        let transform = self.loader.transform(target).await?;
        let crd_name = transform
            .status
            .and_then(|s| s.generated_crd)
            .map(|crd| crd.name)
            .ok_or_else(|| WebhookError::NoCrd {
                namespace: target.namespace.clone(),
                name: target.transform.clone(),
            })?;
        let crd = Api::<CustomResourceDefinition>::all(self.loader.client.clone())
            .get_opt(&crd_name)
            .await
            .map_err(|e| WebhookError::Api {
                what: format!("CustomResourceDefinition {crd_name}"),
                source: Box::new(e),
            })?
            .ok_or(WebhookError::CrdNotFound { name: crd_name })?;
        let kind = served_kind_of(&crd);
        self.remember_kind(key, &kind);
        Ok(kind)
    }

    async fn convert(
        &self,
        target: &Target,
        items: &[Conversion],
    ) -> Result<Vec<Result<Value, ConversionError>>, WebhookError> {
        let module = self.module(target).await?;
        Ok(self.loader.renderer.convert(&module, items).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::shutdown::Shutdown;
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// Converts `port` (a string) into `listenPort` (a number), failing on anything else.
    struct FakeConverter {
        calls: AtomicUsize,
        delay: Duration,
    }

    impl Converter for FakeConverter {
        async fn served_kind(&self, target: &Target) -> Result<ServedKind, WebhookError> {
            if target.transform != "web" {
                return Err(WebhookError::TransformNotFound {
                    namespace: target.namespace.clone(),
                    name: target.transform.clone(),
                });
            }
            Ok(ServedKind {
                group: "pequod.io".into(),
                kind: "WebService".into(),
                versions: vec!["v1beta1".into(), "v1alpha1".into()],
            })
        }

        async fn convert(
            &self,
            _target: &Target,
            items: &[Conversion],
        ) -> Result<Vec<Result<Value, ConversionError>>, WebhookError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            Ok(items
                .iter()
                .map(
                    |item| match item.spec["port"].as_str().and_then(|p| p.parse::<u16>().ok()) {
                        Some(port) => Ok(json!({"listenPort": port})),
                        None => Err(ConversionError::Field {
                            path: "spec.port".into(),
                            message: "not a port number".into(),
                        }),
                    },
                )
                .collect())
        }
    }

    fn review_body(objects: Vec<Value>) -> String {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "ConversionReview",
            "request": {"uid": "u-7", "desiredAPIVersion": "pequod.io/v1beta1", "objects": objects},
        })
        .to_string()
    }

    fn instance(name: &str, port: &str) -> Value {
        json!({
            "apiVersion": "pequod.io/v1alpha1",
            "kind": "WebService",
            "metadata": {"name": name, "namespace": "team"},
            "spec": {"port": port},
        })
    }

    /// A webhook over HTTPS on a free loopback port, with a certificate for 127.0.0.1, and a
    /// client that trusts its CA.
    struct Served {
        addr: std::net::SocketAddr,
        client: reqwest_like::Client,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
        hook: Arc<Webhook<FakeConverter>>,
        resolver: Arc<CertResolver>,
    }

    /// A self-signed certificate for 127.0.0.1, and the same ready to serve.
    fn self_signed() -> (
        rustls::pki_types::CertificateDer<'static>,
        Arc<rustls::sign::CertifiedKey>,
    ) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let cert = params.self_signed(&key).unwrap();
        let der_key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signing = rustls::crypto::ring::sign::any_supported_type(&der_key).unwrap();
        let served = rustls::sign::CertifiedKey::new(vec![cert.der().clone()], signing);
        (cert.der().clone(), Arc::new(served))
    }

    async fn serve(delay: Duration, timeout: Duration) -> Served {
        serve_with(delay, |hook| hook.with_timeouts(timeout, BODY_TIMEOUT)).await
    }

    /// A webhook whose fake converter takes `delay`, as `configure` sets it up.
    async fn serve_with(
        delay: Duration,
        configure: impl FnOnce(Webhook<FakeConverter>) -> Webhook<FakeConverter>,
    ) -> Served {
        let (cert, served) = self_signed();
        let resolver = Arc::new(CertResolver::default());
        resolver.set(served);

        let metrics = Arc::new(Metrics::new().unwrap());
        let converter = FakeConverter {
            calls: AtomicUsize::new(0),
            delay,
        };
        let hook = Arc::new(configure(
            Webhook::new(converter, metrics.clone()).with_body_limit(1024),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = Shutdown::new();
        tokio::spawn(crate::runtime::secure::serve_tls(
            listener,
            router(hook.clone()),
            tls_config(resolver.clone()).unwrap(),
            shutdown.clone(),
        ));
        Served {
            addr,
            client: reqwest_like::Client::trusting(cert),
            metrics,
            shutdown,
            hook,
            resolver,
        }
    }

    /// A minimal HTTPS/1.1 client over tokio-rustls: enough for one POST per connection.
    mod reqwest_like {
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        pub struct Client {
            connector: tokio_rustls::TlsConnector,
        }

        impl Client {
            pub fn trusting(ca: rustls::pki_types::CertificateDer<'static>) -> Self {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca).unwrap();
                let config =
                    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                        .with_safe_default_protocol_versions()
                        .unwrap()
                        .with_root_certificates(roots)
                        .with_no_client_auth();
                Self {
                    connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
                }
            }

            /// Whether a TLS handshake with `addr` succeeds.
            pub async fn handshake(&self, addr: std::net::SocketAddr) -> bool {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                self.connector.connect(name, tcp).await.is_ok()
            }

            /// Status and body of `POST path` with `body`.
            pub async fn post(&self, addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
                response(self.post_partly(addr, path, body.len(), body).await).await
            }

            /// Sends `POST path` declaring a body of `declared` bytes but sending only `sent`;
            /// the connection stays open for [`response`].
            pub async fn post_partly(
                &self,
                addr: std::net::SocketAddr,
                path: &str,
                declared: usize,
                sent: &str,
            ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let mut tls = self.connector.connect(name, tcp).await.unwrap();
                let request = format!(
                    "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n{sent}"
                );
                tls.write_all(request.as_bytes()).await.unwrap();
                tls.flush().await.unwrap();
                tls
            }
        }

        /// Status and body of the response on `tls`.
        pub async fn response(mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> (u16, String) {
            let mut response = Vec::new();
            let _ = tls.read_to_end(&mut response).await;
            let response = String::from_utf8_lossy(&response).into_owned();
            let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            let body = response
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
            (status, body)
        }
    }

    fn requests(metrics: &Metrics, result: &str) -> u64 {
        metrics.conversion_requests_total.with_label_values(&[result]).get()
    }

    #[tokio::test]
    async fn a_review_is_converted_over_https() {
        let served = serve(Duration::ZERO, REVIEW_TIMEOUT).await;
        let path = format!("/convert/team/web/{HEX}");
        let body = review_body(vec![instance("a", "80"), instance("b", "81")]);
        let (status, text) = served.client.post(served.addr, &path, &body).await;
        assert_eq!(status, 200, "{text}");
        let review: Value = serde_json::from_str(&text).unwrap();
        let response = &review["response"];
        assert_eq!(response["uid"], "u-7");
        assert_eq!(response["result"]["status"], "Success");
        assert_eq!(response["convertedObjects"][0]["apiVersion"], "pequod.io/v1beta1");
        assert_eq!(response["convertedObjects"][1]["spec"], json!({"listenPort": 81}));
        assert_eq!(requests(&served.metrics, "success"), 1);
        assert_eq!(served.metrics.conversion_objects_total.get(), 2);
        served.shutdown.trigger();
    }

    #[tokio::test]
    async fn a_new_certificate_is_served_from_the_next_handshake_without_a_restart() {
        let served = serve(Duration::ZERO, REVIEW_TIMEOUT).await;
        assert!(served.client.handshake(served.addr).await);
        let (renewed, key) = self_signed();
        served.resolver.set(key);
        assert!(
            !served.client.handshake(served.addr).await,
            "the old certificate is gone"
        );
        let renewed_client = reqwest_like::Client::trusting(renewed);
        assert!(renewed_client.handshake(served.addr).await);
        served.shutdown.trigger();
    }

    #[tokio::test]
    async fn failures_are_answered_as_failed_reviews() {
        let served = serve(Duration::ZERO, REVIEW_TIMEOUT).await;
        let path = format!("/convert/team/web/{HEX}");
        let body = review_body(vec![instance("a", "80"), instance("b", "eighty")]);
        let (status, text) = served.client.post(served.addr, &path, &body).await;
        assert_eq!(status, 200);
        let review: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(review["response"]["uid"], "u-7");
        assert_eq!(review["response"]["result"]["status"], "Failure");
        assert_eq!(
            review["response"]["result"]["message"],
            "team/b: spec.port: not a port number"
        );

        let unknown = format!("/convert/team/gone/{HEX}");
        let (_, text) = served.client.post(served.addr, &unknown, &body).await;
        let review: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(review["response"]["result"]["message"], "Transform team/gone not found");
        assert_eq!(requests(&served.metrics, "failure"), 2);
        assert_eq!(served.metrics.conversion_objects_total.get(), 0);
        served.shutdown.trigger();
    }

    #[tokio::test]
    async fn a_slow_conversion_is_answered_failure_naming_the_timeout() {
        let served = serve(Duration::from_secs(5), Duration::from_millis(300)).await;
        let path = format!("/convert/team/web/{HEX}");
        let started = Instant::now();
        let (status, text) = served
            .client
            .post(served.addr, &path, &review_body(vec![instance("a", "80")]))
            .await;
        assert!(started.elapsed() < Duration::from_secs(3), "answered at the deadline");
        assert_eq!(status, 200);
        let review: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(review["response"]["result"]["status"], "Failure");
        assert_eq!(
            review["response"]["result"]["message"],
            "the conversion did not finish within 0.3s"
        );
        served.shutdown.trigger();
    }

    #[tokio::test]
    async fn requests_that_are_no_reviews_are_refused() {
        let served = serve(Duration::ZERO, REVIEW_TIMEOUT).await;
        let good = format!("/convert/team/web/{HEX}");
        let (status, _) = served.client.post(served.addr, &good, "{}").await;
        assert_eq!(status, 400);
        let (status, _) = served
            .client
            .post(served.addr, "/convert/team/web/not-a-digest", &review_body(vec![]))
            .await;
        assert_eq!(status, 404);
        let (status, _) = served.client.post(served.addr, "/other", "{}").await;
        assert_eq!(status, 404);
        assert_eq!(requests(&served.metrics, "invalid"), 2);
        assert_eq!(served.hook.converter.calls.load(Ordering::SeqCst), 0);
        served.shutdown.trigger();
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_unread() {
        let served = serve(Duration::ZERO, REVIEW_TIMEOUT).await;
        let path = format!("/convert/team/web/{HEX}");
        let huge = " ".repeat(1025);
        let (status, _) = served.client.post(served.addr, &path, &huge).await;
        assert_eq!(status, 413);
        served.shutdown.trigger();
    }

    #[tokio::test]
    async fn objects_already_at_the_desired_version_need_no_converter() {
        let served = serve(Duration::ZERO, REVIEW_TIMEOUT).await;
        let path = format!("/convert/team/web/{HEX}");
        let mut stored = instance("a", "80");
        stored["apiVersion"] = json!("pequod.io/v1beta1");
        let (_, text) = served.client.post(served.addr, &path, &review_body(vec![stored])).await;
        let review: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(review["response"]["result"]["status"], "Success");
        assert_eq!(served.hook.converter.calls.load(Ordering::SeqCst), 0);
        served.shutdown.trigger();
    }

    #[tokio::test]
    async fn slow_bodies_hold_no_conversion_and_are_cut_off() {
        let body_timeout = Duration::from_millis(1500);
        let served = serve_with(Duration::ZERO, |hook| hook.with_timeouts(REVIEW_TIMEOUT, body_timeout)).await;
        let path = format!("/convert/team/web/{HEX}");
        // More stalled bodies than conversions run at once.
        let mut stalled = Vec::new();
        for _ in 0..MAX_CONCURRENT_CONVERSIONS + 1 {
            stalled.push(
                served
                    .client
                    .post_partly(served.addr, &path, 500, "{\"apiVersion\"")
                    .await,
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;

        let started = Instant::now();
        let (status, text) = served
            .client
            .post(served.addr, &path, &review_body(vec![instance("a", "80")]))
            .await;
        assert_eq!(status, 200, "{text}");
        let review: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(review["response"]["result"]["status"], "Success");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "answered at once, not after the stalled bodies: {:?}",
            started.elapsed()
        );

        for tls in stalled {
            let (status, text) = reqwest_like::response(tls).await;
            assert_eq!(status, 408, "{text}");
            assert_eq!(text, "the review body did not arrive within 1.5s\n");
        }
        assert_eq!(
            requests(&served.metrics, "invalid"),
            MAX_CONCURRENT_CONVERSIONS as u64 + 1
        );
        served.shutdown.trigger();
    }

    #[tokio::test]
    async fn bodies_in_flight_share_the_memory_budget() {
        let body = review_body(vec![instance("a", "80")]);
        let spec_bound = review::parsed_size_bound(r#"{"port":"80"}"#).unwrap();
        let needed = body.len() * BODY_MEMORY_FACTOR + spec_bound * SPEC_MEMORY_FACTOR;
        let body_timeout = Duration::from_millis(1000);
        let served = serve_with(Duration::ZERO, |hook| {
            hook.with_timeouts(REVIEW_TIMEOUT, body_timeout)
                .with_memory(needed + 1000)
        })
        .await;
        let path = format!("/convert/team/web/{HEX}");
        // 600 bytes received hold 1,200 of the budget: too much for the review to fit beside.
        let stalled = served
            .client
            .post_partly(served.addr, &path, 1000, &" ".repeat(600))
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;

        let started = Instant::now();
        let (status, text) = served.client.post(served.addr, &path, &body).await;
        assert_eq!(status, 200, "{text}");
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "the review waited for the stalled body's memory: {:?}",
            started.elapsed()
        );
        let review: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(review["response"]["result"]["status"], "Success");
        assert_eq!(reqwest_like::response(stalled).await.0, 408);
        // Both answered and sent: all the memory is back.
        assert_eq!(served.hook.memory.bytes.available_permits(), needed + 1000);
        served.shutdown.trigger();
    }

    #[tokio::test]
    async fn a_review_needing_more_memory_than_the_webhook_has_is_refused_before_conversion() {
        let body = review_body(vec![instance("a", "80"), instance("b", "81")]);
        let served = serve_with(Duration::ZERO, |hook| {
            hook.with_memory(body.len() * BODY_MEMORY_FACTOR + 100)
        })
        .await;
        let path = format!("/convert/team/web/{HEX}");
        let (status, text) = served.client.post(served.addr, &path, &body).await;
        assert_eq!(status, 200, "{text}");
        let review: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(review["response"]["result"]["status"], "Failure");
        let message = review["response"]["result"]["message"].as_str().unwrap();
        assert!(message.contains("bytes of memory"), "{message}");
        assert_eq!(served.hook.converter.calls.load(Ordering::SeqCst), 0);
        served.shutdown.trigger();

        // A body that could never fit is refused as it arrives.
        let small = serve_with(Duration::ZERO, |hook| hook.with_memory(100)).await;
        let (status, _) = small.client.post(small.addr, &path, &body).await;
        assert_eq!(status, 413);
        small.shutdown.trigger();
    }

    #[test]
    fn the_path_names_a_transform_and_a_digest() {
        let target = Target::from_path("team", "web", HEX).unwrap();
        assert_eq!(target.digest, format!("sha256:{HEX}"));
        assert!(Target::from_path("team", "web", &HEX.to_uppercase()).is_err());
        assert!(Target::from_path("team", "web", &HEX[1..]).is_err());
        assert!(Target::from_path("", "web", HEX).is_err());
        assert!(Target::from_path("team", "We b", HEX).is_err());
    }

    #[test]
    fn the_kind_lists_every_version_of_the_crd() {
        let crd: CustomResourceDefinition = serde_json::from_value(json!({
            "metadata": {"name": "webservices.pequod.io"},
            "spec": {
                "group": "pequod.io",
                "names": {"kind": "WebService", "plural": "webservices"},
                "scope": "Namespaced",
                "versions": [
                    {"name": "v1beta1", "served": true, "storage": true},
                    {"name": "v1alpha1", "served": false, "storage": false},
                ],
            },
        }))
        .unwrap();
        assert_eq!(
            served_kind_of(&crd),
            ServedKind {
                group: "pequod.io".into(),
                kind: "WebService".into(),
                versions: vec!["v1beta1".into(), "v1alpha1".into()],
            }
        );
    }
}
