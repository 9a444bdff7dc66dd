//! The conversion webhook's HTTP side: `POST /convert/{namespace}/{transform}/{digest}` over
//! HTTPS, answering the apiserver's ConversionReviews for the kind of a Transform with the
//! module of that digest. Every replica serves it, leader or not.
//!
//! The apiserver presents no credentials to conversion webhooks, so the webhook cannot tell it
//! from any other caller that reaches the port; what a caller can make it do is bounded instead:
//!
//! - The body is read first, before any lookup or conversion, within [`BODY_TIMEOUT`] (3 s) of the
//!   request's arrival (408 after) and [`review::MAX_REVIEW_BYTES`] (32 MiB; 413), holding no
//!   conversion permit: a body that trickles holds only memory, and not for long.
//! - Memory: the reviews in flight share [`REVIEW_MEMORY_BYTES`] (128 MiB). A body counts twice
//!   its bytes as they arrive; its objects stay JSON text, at most 10,000 of at most 1.5 MiB
//!   each (past either the review is answered Failure, nothing parsed); only the specs to
//!   convert are parsed, each on its own, once twice the bound of their parsed size is set
//!   aside. A review waits for its share within its deadline; one that could never fit is
//!   refused at once. The answer's body holds the share until it is sent.
//! - The path must be exactly the one the CRD generated for its Transform names as its
//!   conversion webhook's ([`super::served`]); only then is a module used. Every other path is
//!   answered "no conversion is served at this path", API errors "the conversion webhook could
//!   not read its configuration": callers learn nothing of which Transforms, CRDs or digests
//!   exist, and the detail is logged. What was read is remembered by Transform (60 s when it
//!   serves, 10 s when not), one read is shared by the reviews that wait for it, and reads are
//!   budgeted per client (20 a second) and over all (50), so made-up paths cost the apiserver
//!   little.
//! - Modules come only from this replica's module store or from the ConfigMap
//!   `pequod-conversion-<digest>` the leader published in the operator's namespace (checked
//!   against the digest): the webhook never fetches a module and holds no source credentials.
//! - At most `MAX_CONCURRENT_CONVERSIONS` (4) conversions at once, a permit taken only once the
//!   review is read and parsed; every review is answered within [`REVIEW_TIMEOUT`] (8 s; the
//!   apiserver waits 10 s).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{ConnectInfo, Path, State};
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
use super::endpoint::conversion_path;
use super::published::{self, PublishError};
use super::review::{self, Answer, Outcome, ServedKind};
use super::served::{Found, Known, NOT_SERVED_MESSAGE, NotServed, ServedPaths, crd_conversion, decide};
use crate::api::Transform;
use crate::cue::conversion::{Conversion, ConversionError};
use crate::cue::{Module, RenderError, Renderer, is_digest};
use crate::error::ErrorCategory;
use crate::metrics::Metrics;
use crate::runtime::secure::{ClientBudgets, client_key};

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
/// Most lookups of a Transform and its CRD (two API requests) started each second for one
/// client (an IPv4 address or an IPv6 /64), and for all: paths not known recently cost the
/// apiserver requests, and made-up ones must not cost it many.
const MAX_LOOKUPS_PER_CLIENT: u32 = 20;
const MAX_LOOKUPS_PER_SECOND: u32 = 50;

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

/// What the caller is told when the webhook could not read what it needs from the cluster;
/// the error itself is logged.
pub const CONFIGURATION_MESSAGE: &str = "the conversion webhook could not read its configuration";
/// What the caller is told when the module could not be loaded; the error itself is logged.
pub const MODULE_MESSAGE: &str = "the conversion webhook could not load the module of this conversion";
/// What the caller is told when it had too many paths looked up.
pub const THROTTLED_MESSAGE: &str = "too many conversion paths looked up at once; try again in a second";

/// Why a review could not be converted. Callers may be anyone, so they are told only
/// [`WebhookError::message_for_caller`]; the error itself, with its detail, is logged.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("no conversion is served at this path: {}", .0.reason())]
    NotServed(NotServed),
    /// Too many Transforms looked up for this client, or for all, this second.
    #[error("too many conversion paths looked up this second")]
    Throttled,
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
    #[error("the lookup stopped: {0}")]
    Stopped(String),
    /// The error of a lookup or load shared by several reviews.
    #[error(transparent)]
    Shared(Arc<WebhookError>),
}

impl WebhookError {
    /// The Failure message the caller gets: one per kind of trouble, never the detail (which
    /// Transforms or CRDs exist, their versions, the apiserver's errors).
    pub fn message_for_caller(&self) -> &'static str {
        match self {
            Self::NotServed(_) => NOT_SERVED_MESSAGE,
            Self::Throttled => THROTTLED_MESSAGE,
            Self::Api { .. } | Self::Stopped(_) => CONFIGURATION_MESSAGE,
            Self::Published {
                source: PublishError::Api(_),
                ..
            } => CONFIGURATION_MESSAGE,
            Self::NotPublished { .. } | Self::Published { .. } | Self::Load { .. } => MODULE_MESSAGE,
            Self::Shared(inner) => inner.message_for_caller(),
        }
    }

    /// Whether the path serves no conversion (logged at debug level: anyone can send these).
    fn is_not_served(&self) -> bool {
        match self {
            Self::NotServed(_) | Self::Throttled => true,
            Self::Shared(inner) => inner.is_not_served(),
            _ => false,
        }
    }
}

impl ErrorCategory for WebhookError {
    fn reason(&self) -> &'static str {
        match self {
            Self::NotServed(why) => why.reason(),
            Self::Throttled => "Throttled",
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
            Self::Api { .. } | Self::Stopped(_) | Self::Throttled => true,
            Self::Published { source, .. } => source.is_transient(),
            Self::Load { source, .. } => source.is_transient(),
            Self::Shared(inner) => inner.is_transient(),
            _ => false,
        }
    }
}

/// A target whose path the CRD of its Transform names: only such a target's module converts.
#[derive(Debug)]
pub struct ServedTarget<'a> {
    target: &'a Target,
}

impl ServedTarget<'_> {
    pub fn target(&self) -> &Target {
        self.target
    }
}

/// What the webhook needs of the cluster and of cue: the operator's is [`ModuleConverter`].
pub trait Converter: Send + Sync + 'static {
    /// The kind converted at `target`'s path, once the CRD of its Transform names exactly that
    /// path as its conversion webhook's; `client` is the caller's address, whose lookups are
    /// budgeted.
    fn served_kind(
        &self,
        target: &Target,
        client: IpAddr,
    ) -> impl Future<Output = Result<ServedKind, WebhookError>> + Send;

    /// `items` converted with `served`'s module: one result per item, in order.
    fn convert(
        &self,
        served: &ServedTarget<'_>,
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

    /// Converts `request` for `target`, sent by `client`, within `reserved`'s share of memory,
    /// which grows to hold the specs parsed. No object is looked at before the path is known
    /// to be served.
    async fn answer(
        &self,
        target: &Target,
        client: IpAddr,
        request: review::Request,
        reserved: &mut Reservation,
    ) -> Answer {
        let failed = |message: &str| review::failure(&request.uid, message, Vec::new());
        let kind = match self.converter.served_kind(target, client).await {
            Ok(kind) => kind,
            Err(e) if e.is_not_served() => {
                tracing::debug!(%target, %client, reason = e.reason(), "refused a review: no conversion at this path");
                return failed(e.message_for_caller());
            }
            Err(e) => {
                // Logged with its detail where it happened, once for the reviews sharing it.
                tracing::debug!(%target, reason = e.reason(), "conversion failed: the served kind is unknown");
                return failed(e.message_for_caller());
            }
        };
        let served = ServedTarget { target };
        // Specs are parsed only once the memory they take is set aside.
        let specs_bytes = request.parsed_specs_bound().saturating_mul(SPEC_MEMORY_FACTOR);
        if let Err(e) = reserved.grow(specs_bytes).await {
            tracing::info!(%target, error = %e, reason = e.reason(), "conversion refused: not enough memory");
            return failed(&e.to_string());
        }
        let plan = match review::plan(&request, &kind) {
            Ok(plan) => plan,
            Err(message) => {
                // Kinds, versions and object names only: no field values.
                tracing::info!(%target, %message, "conversion review refused: objects not of the kind or over the limits");
                return failed(&message);
            }
        };
        if plan.conversions.is_empty() {
            return review::answer(request, &plan, Vec::new());
        }
        let Ok(_converting) = self.conversions.acquire().await else {
            return failed("the conversion webhook is stopping");
        };
        match self.converter.convert(&served, &plan.conversions).await {
            Ok(converted) => review::answer(request, &plan, converted),
            Err(e) => {
                tracing::warn!(%target, error = %e, reason = e.reason(), "conversion failed: the module is unavailable");
                failed(e.message_for_caller())
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
    request: axum::extract::Request,
) -> Response {
    let arrived = tokio::time::Instant::now();
    // The peer's address ([`ConnectInfo`], set by `serve_tls`) chooses the lookup budget;
    // without one, all such requests share the unspecified address's.
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
    let body = request.into_body();
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
    let answer = match tokio::time::timeout_at(deadline, hook.answer(&target, client, request, &mut reserved)).await {
        Ok(answer) => answer,
        Err(_) => {
            tracing::warn!(%target, %uid, %desired, objects, "conversion review timed out");
            review::failure(
                &uid,
                &format!("the conversion did not finish within {}s", hook.timeout.as_secs_f64()),
                Vec::new(),
            )
        }
    };
    hook.record(&target, &uid, &desired, objects, started, &answer.outcome);
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
    /// Counts and logs how the review `uid` of `objects` objects to `desired` ended.
    fn record(&self, target: &Target, uid: &str, desired: &str, objects: usize, started: Instant, outcome: &Outcome) {
        let took_ms = started.elapsed().as_millis() as u64;
        match outcome {
            Outcome::Success { objects } => {
                self.count("success");
                self.metrics.conversion_objects_total.inc_by(*objects as u64);
                tracing::debug!(%target, %uid, %desired, objects, took_ms, "converted");
            }
            Outcome::Failure { objects: failed } if failed.is_empty() => {
                self.count("failure");
                // Its cause was logged where it arose, at its level: a path that serves
                // nothing, which anyone can send, only at debug.
                tracing::debug!(%target, %uid, %desired, objects, took_ms, "conversion review answered Failure");
            }
            Outcome::Failure { objects: failed } => {
                self.count("failure");
                // Names only: messages may quote field values.
                tracing::info!(%target, %uid, %desired, objects, failed = %failed.join(","), took_ms, "conversion review answered Failure");
            }
        }
    }

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

type ModuleLoad = Shared<BoxFuture<'static, Result<Module, Arc<WebhookError>>>>;
type Lookup = Shared<BoxFuture<'static, Result<Found, Arc<WebhookError>>>>;

/// The operator's converter: kinds from the Transforms' CRDs, each served only at the path its
/// CRD names; modules from the renderer's store or, on a replica that has not loaded one, as
/// the leader published it (never from the module's source: the webhook holds no source
/// credentials and fetches nothing).
pub struct ModuleConverter {
    loader: Loader,
    /// What was last read of each Transform's CRD; the lookups' tasks record into it.
    served: Arc<Mutex<ServedPaths>>,
    /// Lookups under way, by Transform: concurrent reviews for one Transform share one.
    lookups: Mutex<HashMap<String, Lookup>>,
    /// Lookups started per client and over all, each second.
    lookup_budgets: Mutex<ClientBudgets>,
    /// Loads under way, by digest: concurrent reviews for one digest share one fetch, which
    /// goes on when they give up.
    loads: Mutex<HashMap<String, ModuleLoad>>,
}

/// What looking up Transforms and loading modules take; cloned into each task.
#[derive(Clone)]
struct Loader {
    client: Client,
    renderer: Renderer,
    /// The operator's namespace, where modules are published.
    namespace: String,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl ModuleConverter {
    pub fn new(client: Client, renderer: Renderer, namespace: String) -> Self {
        Self {
            loader: Loader {
                client,
                renderer,
                namespace,
            },
            served: Arc::default(),
            lookups: Mutex::default(),
            lookup_budgets: Mutex::new(ClientBudgets::with_limits(
                MAX_LOOKUPS_PER_CLIENT,
                MAX_LOOKUPS_PER_SECOND,
                Instant::now(),
            )),
            loads: Mutex::default(),
        }
    }

    /// What `target`'s Transform and its CRD serve: read once for all the reviews waiting for
    /// it, and only within `client`'s budget when no read is under way.
    async fn look_up(&self, target: &Target, client: IpAddr) -> Result<Found, WebhookError> {
        let key = format!("{}/{}", target.namespace, target.transform);
        let lookup = {
            let mut lookups = lock(&self.lookups);
            lookups.retain(|_, lookup| lookup.peek().is_none());
            match lookups.get(&key) {
                Some(lookup) => lookup.clone(),
                None => {
                    if !lock(&self.lookup_budgets).spend(&client_key(client), Instant::now()) {
                        return Err(WebhookError::Throttled);
                    }
                    let (loader, served, target) = (self.loader.clone(), self.served.clone(), target.clone());
                    let key_of_task = key.clone();
                    let lookup = tokio::spawn(async move {
                        let found = loader.crd_conversion(&target).await.map_err(|e| {
                            tracing::warn!(%target, error = %e, reason = e.reason(), "reading a conversion's Transform and CRD failed");
                            Arc::new(e)
                        })?;
                        lock(&served).record(&key_of_task, &found, Instant::now());
                        let path = conversion_path(&target.namespace, &target.transform, &target.digest);
                        // Logged once per lookup, so at most every few seconds per Transform;
                        // made-up names are noise, and only at debug level.
                        match decide(&found, &path) {
                            Err(why) if why.transform_exists() => {
                                tracing::info!(%target, reason = why.reason(), "refused conversions at a path its Transform's CRD does not name");
                            }
                            Err(why) => tracing::debug!(%target, reason = why.reason(), "refused conversions for a Transform that does not exist"),
                            Ok(_) => {}
                        }
                        Ok(found)
                    })
                    .map(|joined| joined.unwrap_or_else(|e| Err(Arc::new(WebhookError::Stopped(e.to_string())))))
                    .boxed()
                    .shared();
                    lookups.insert(key, lookup.clone());
                    lookup
                }
            }
        };
        lookup.await.map_err(WebhookError::Shared)
    }

    async fn module(&self, target: &Target) -> Result<Module, WebhookError> {
        if let Some(module) = self.loader.renderer.find(&target.digest, &target.transform).await {
            return Ok(module);
        }
        let load = {
            let mut loads = lock(&self.loads);
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
    /// What the CRD of `target`'s Transform converts, read from the apiserver.
    async fn crd_conversion(&self, target: &Target) -> Result<Found, WebhookError> {
        let api_error = |what: String| {
            move |e| WebhookError::Api {
                what,
                source: Box::new(e),
            }
        };
        let transform = Api::<Transform>::namespaced(self.client.clone(), &target.namespace)
            .get_opt(&target.transform)
            .await
            .map_err(api_error(format!(
                "Transform {}/{}",
                target.namespace, target.transform
            )))?;
        let Some(transform) = transform else {
            return Ok(Err(NotServed::TransformNotFound));
        };
        let Some(crd_name) = transform.status.and_then(|s| s.generated_crd).map(|crd| crd.name) else {
            return Ok(Err(NotServed::NoCrd));
        };
        let crd = Api::<CustomResourceDefinition>::all(self.client.clone())
            .get_opt(&crd_name)
            .await
            .map_err(api_error(format!("CustomResourceDefinition {crd_name}")))?;
        Ok(crd.as_ref().map_or(Err(NotServed::CrdNotFound), crd_conversion))
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
    async fn served_kind(&self, target: &Target, client: IpAddr) -> Result<ServedKind, WebhookError> {
        let key = format!("{}/{}", target.namespace, target.transform);
        let path = conversion_path(&target.namespace, &target.transform, &target.digest);
        if let Known::Decided(decided) = lock(&self.served).known(&key, &path, Instant::now()) {
            return decided.map_err(WebhookError::NotServed);
        }
        let found = self.look_up(target, client).await?;
        decide(&found, &path).map_err(WebhookError::NotServed)
    }

    async fn convert(
        &self,
        served: &ServedTarget<'_>,
        items: &[Conversion],
    ) -> Result<Vec<Result<Value, ConversionError>>, WebhookError> {
        let module = self.module(served.target()).await?;
        Ok(self.loader.renderer.convert(&module, items).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversion::served::CrdConversion;
    use crate::runtime::shutdown::Shutdown;
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// Converts `port` (a string) into `listenPort` (a number), failing on anything else.
    struct FakeConverter {
        calls: AtomicUsize,
        delay: Duration,
    }

    /// Serves `team/web` at [`HEX`]; `team/broken` fails as the apiserver might.
    impl Converter for FakeConverter {
        async fn served_kind(&self, target: &Target, _client: IpAddr) -> Result<ServedKind, WebhookError> {
            let found = match (target.namespace.as_str(), target.transform.as_str()) {
                ("team", "web") => Ok(CrdConversion {
                    path: conversion_path("team", "web", &format!("sha256:{HEX}")),
                    kind: ServedKind {
                        group: "pequod.io".into(),
                        kind: "WebService".into(),
                        versions: vec!["v1beta1".into(), "v1alpha1".into()],
                    },
                }),
                ("team", "no-crd") => Err(NotServed::NoCrd),
                ("team", "broken") => {
                    return Err(WebhookError::Api {
                        what: "Transform team/broken".into(),
                        source: Box::new(kube::Error::Service(
                            "dial tcp 10.96.0.1:443: connection refused".into(),
                        )),
                    });
                }
                _ => Err(NotServed::TransformNotFound),
            };
            let path = conversion_path(&target.namespace, &target.transform, &target.digest);
            decide(&found, &path).map_err(WebhookError::NotServed)
        }

        async fn convert(
            &self,
            _served: &ServedTarget<'_>,
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
        assert_eq!(requests(&served.metrics, "failure"), 1);
        assert_eq!(served.metrics.conversion_objects_total.get(), 0);
        served.shutdown.trigger();
    }

    #[tokio::test]
    async fn every_path_that_serves_nothing_gets_the_same_answer_and_no_detail() {
        let served = serve(Duration::ZERO, REVIEW_TIMEOUT).await;
        let other_hex = "f".repeat(64);
        let body = review_body(vec![instance("a", "80")]);
        let message_at = |path: String| {
            let (client, addr, body) = (&served.client, served.addr, &body);
            async move {
                let (status, text) = client.post(addr, &path, body).await;
                assert_eq!(status, 200, "{path}: {text}");
                let review: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(review["response"]["result"]["status"], "Failure", "{path}");
                assert_eq!(review["response"]["convertedObjects"], json!([]), "{path}");
                review["response"]["result"]["message"].as_str().unwrap().to_string()
            }
        };
        for path in [
            format!("/convert/team/gone/{HEX}"),
            format!("/convert/team/no-crd/{HEX}"),
            format!("/convert/team/web/{other_hex}"),
            format!("/convert/other/web/{HEX}"),
        ] {
            assert_eq!(message_at(path).await, NOT_SERVED_MESSAGE);
        }
        let broken = message_at(format!("/convert/team/broken/{HEX}")).await;
        assert_eq!(
            broken, CONFIGURATION_MESSAGE,
            "the apiserver's error is logged, not told"
        );
        assert_eq!(served.hook.converter.calls.load(Ordering::SeqCst), 0);
        assert_eq!(requests(&served.metrics, "failure"), 5);
        served.shutdown.trigger();
    }

    #[test]
    fn callers_are_told_one_message_per_kind_of_trouble() {
        let api = || WebhookError::Api {
            what: "CustomResourceDefinition webservices.pequod.io".into(),
            source: Box::new(kube::Error::Service("connection refused".into())),
        };
        for why in [
            NotServed::TransformNotFound,
            NotServed::NoCrd,
            NotServed::CrdNotFound,
            NotServed::NoWebhook,
            NotServed::OtherPath,
        ] {
            assert_eq!(WebhookError::NotServed(why).message_for_caller(), NOT_SERVED_MESSAGE);
        }
        assert_eq!(api().message_for_caller(), CONFIGURATION_MESSAGE);
        assert_eq!(
            WebhookError::Shared(Arc::new(api())).message_for_caller(),
            CONFIGURATION_MESSAGE
        );
        let published = WebhookError::Published {
            namespace: "team".into(),
            name: "web".into(),
            source: PublishError::Api(kube::Error::Service("forbidden".into())),
        };
        assert_eq!(published.message_for_caller(), CONFIGURATION_MESSAGE);
        let not_published = WebhookError::NotPublished {
            namespace: "team".into(),
            name: "web".into(),
            digest: format!("sha256:{HEX}"),
        };
        assert_eq!(not_published.message_for_caller(), MODULE_MESSAGE);
        assert_eq!(WebhookError::Throttled.message_for_caller(), THROTTLED_MESSAGE);
        assert!(
            api().to_string().contains("connection refused"),
            "the log keeps the detail"
        );
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

    /// An apiserver that knows the Transforms `team/web` (whose CRD names the path of
    /// [`HEX`]) and `team/no-crd`, fails on `team/broken`, and counts the requests it gets.
    mod fake_apiserver {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};

        use axum::Json;
        use axum::extract::{Path, State};
        use axum::http::StatusCode;
        use serde_json::{Value, json};

        use super::HEX;
        use crate::conversion::endpoint::conversion_path;

        #[derive(Default)]
        pub struct Fake {
            requests: AtomicUsize,
        }

        impl Fake {
            pub fn requests(&self) -> usize {
                self.requests.load(Ordering::SeqCst)
            }
        }

        fn status(code: StatusCode) -> (StatusCode, Json<Value>) {
            let reason = if code == StatusCode::NOT_FOUND {
                "NotFound"
            } else {
                "InternalError"
            };
            let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": reason, "reason": reason, "code": code.as_u16()});
            (code, Json(body))
        }

        async fn transform(
            State(fake): State<Arc<Fake>>,
            Path((namespace, name)): Path<(String, String)>,
        ) -> (StatusCode, Json<Value>) {
            fake.requests.fetch_add(1, Ordering::SeqCst);
            let mut transform = json!({
                "apiVersion": "platform.platform.example.com/v1alpha1",
                "kind": "Transform",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"cueRef": {"type": "embedded", "ref": "webservice"}},
            });
            match (namespace.as_str(), name.as_str()) {
                ("team", "web") => {
                    transform["status"] = json!({"generatedCRD": {"apiVersion": "pequod.io/v1beta1",
                        "kind": "WebService", "name": "webservices.pequod.io", "plural": "webservices"}});
                    (StatusCode::OK, Json(transform))
                }
                ("team", "no-crd") => (StatusCode::OK, Json(transform)),
                ("team", "broken") => status(StatusCode::INTERNAL_SERVER_ERROR),
                _ => status(StatusCode::NOT_FOUND),
            }
        }

        async fn crd(State(fake): State<Arc<Fake>>, Path(name): Path<String>) -> (StatusCode, Json<Value>) {
            fake.requests.fetch_add(1, Ordering::SeqCst);
            if name != "webservices.pequod.io" {
                return status(StatusCode::NOT_FOUND);
            }
            let path = conversion_path("team", "web", &format!("sha256:{HEX}"));
            let crd = json!({
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": name},
                "spec": {
                    "group": "pequod.io",
                    "names": {"kind": "WebService", "plural": "webservices"},
                    "scope": "Namespaced",
                    "versions": [
                        {"name": "v1beta1", "served": true, "storage": true},
                        {"name": "v1alpha1", "served": true, "storage": false},
                    ],
                    "conversion": {"strategy": "Webhook", "webhook": {"conversionReviewVersions": ["v1"],
                        "clientConfig": {"service": {"namespace": "pequod-system",
                            "name": "pequod-webhook-service", "path": path, "port": 443}}}},
                },
            });
            (StatusCode::OK, Json(crd))
        }

        /// The fake and a client of it.
        pub async fn start() -> (Arc<Fake>, kube::Client) {
            let fake = Arc::new(Fake::default());
            let router = axum::Router::new()
                .route(
                    "/apis/platform.platform.example.com/v1alpha1/namespaces/{namespace}/transforms/{name}",
                    axum::routing::get(transform),
                )
                .route(
                    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}",
                    axum::routing::get(crd),
                )
                .with_state(fake.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, router).await });
            let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
            (fake, client)
        }
    }

    #[tokio::test]
    async fn paths_are_read_once_and_made_up_ones_cost_the_apiserver_little() {
        let (fake, client) = fake_apiserver::start().await;
        let cache = tempfile::tempdir().unwrap();
        let renderer = Renderer::new(
            crate::cue::CueCli::new("cue", Duration::from_secs(1), 1),
            crate::cue::RendererConfig::new(cache.path()),
            Arc::new(Metrics::new().unwrap()),
        );
        let converter = ModuleConverter::new(client, renderer, "pequod-system".into());
        let apiserver: IpAddr = "10.0.0.1".parse().unwrap();
        let stranger: IpAddr = "10.0.0.66".parse().unwrap();
        let target = |name: &str, hex: &str| Target::from_path("team", name, hex).unwrap();
        let not_served = |result: Result<ServedKind, WebhookError>| match result {
            Err(WebhookError::NotServed(why)) => why,
            other => panic!("expected NotServed, got {other:?}"),
        };

        // Concurrent reviews of one Transform share one read of it and its CRD.
        let web = target("web", HEX);
        let (first, second) = tokio::join!(
            converter.served_kind(&web, apiserver),
            converter.served_kind(&web, apiserver)
        );
        assert_eq!(first.unwrap().kind, "WebService");
        assert_eq!(second.unwrap().versions, ["v1beta1", "v1alpha1"]);
        assert_eq!(fake.requests(), 2, "the Transform and its CRD, once");
        assert!(converter.served_kind(&web, apiserver).await.is_ok());
        assert_eq!(fake.requests(), 2, "known: nothing asked");

        // Other digests of a known Transform are refused from what is known.
        for i in 0..100 {
            let why = not_served(
                converter
                    .served_kind(&target("web", &format!("{i:064x}")), stranger)
                    .await,
            );
            assert_eq!(why, NotServed::OtherPath);
        }
        assert_eq!(fake.requests(), 2);

        // A made-up Transform costs one request, then none while it is remembered.
        for _ in 0..100 {
            let why = not_served(converter.served_kind(&target("gone", HEX), stranger).await);
            assert_eq!(why, NotServed::TransformNotFound);
        }
        assert_eq!(fake.requests(), 3);

        // Many made-up names from one client: a few lookups a second, the rest refused unasked.
        let mut throttled = 0;
        for i in 0..100 {
            match converter
                .served_kind(&target(&format!("made-up-{i}"), HEX), stranger)
                .await
            {
                Err(WebhookError::Throttled) => throttled += 1,
                other => assert_eq!(not_served(other), NotServed::TransformNotFound),
            }
        }
        let made_up_requests = fake.requests() - 3;
        assert!(
            made_up_requests <= 2 * MAX_LOOKUPS_PER_CLIENT as usize,
            "{made_up_requests} requests"
        );
        assert_eq!(throttled + made_up_requests, 100);

        // The apiserver's own budget is untouched by the stranger's.
        let why = not_served(converter.served_kind(&target("no-crd", HEX), apiserver).await);
        assert_eq!(why, NotServed::NoCrd);
        // An error of the apiserver is the caller's to retry, not remembered.
        let broken = target("broken", HEX);
        for _ in 0..2 {
            let error = converter.served_kind(&broken, apiserver).await.unwrap_err();
            assert_eq!(error.message_for_caller(), CONFIGURATION_MESSAGE, "{error}");
        }
        assert_eq!(fake.requests(), 3 + made_up_requests + 3);
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
}
