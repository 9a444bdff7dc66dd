//! Secure metrics: HTTPS with a mounted or self-signed certificate, and authentication and
//! authorization of each scrape by the apiserver (TokenReview, then SubjectAccessReview for
//! `get` on the non-resource URL `/metrics`), as kubebuilder operators do.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lru::Lru;
use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::{Api, PostParams};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use crate::runtime::shutdown::Shutdown;

/// How long an answer of the apiserver about a token is reused: scrapes come every few
/// seconds and each would otherwise cost two API calls.
const DECISION_TTL: Duration = Duration::from_secs(60);
/// Age at which a token's positive decision is renewed in the background while it is still
/// served: a known-good scraper is never made to wait for a review, nor refused for lack of
/// review budget.
const RENEW_AFTER: Duration = Duration::from_secs(40);
/// Most positive decisions kept. Only tokens allowed to read /metrics get here, so made-up
/// tokens cannot push a scraper's out.
const MAX_ALLOWED: usize = 256;
/// Most negative decisions kept.
const MAX_REFUSED: usize = 1024;
/// Longest a client may take to finish the TLS handshake, and to send its request headers:
/// a client that connects and stays silent does not hold a task for ever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most TokenReviews per second for tokens not seen recently, from one client (an IPv4
/// address or an IPv6 /64): a flood of made-up tokens is answered 429 rather than passed on to
/// the apiserver, and uses up only its own client's budget.
const MAX_REVIEWS_PER_CLIENT: u32 = 5;
/// Most such TokenReviews per second over all clients: what the apiserver is asked at most.
const MAX_REVIEWS_PER_SECOND: u32 = 50;
/// Most clients whose budgets are tracked; the least recently seen are forgotten first (a
/// forgotten client starts again with a full budget).
const MAX_CLIENTS: usize = 4096;

/// Why secure metrics could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {message}")]
    Read { path: String, message: String },
    #[error("generating a self-signed certificate: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The TLS configuration: the certificate in `cert_dir` (`tls.crt`, `tls.key`, as cert-manager
/// and Kubernetes TLS Secrets name them), or a self-signed one generated now.
pub fn tls_config(cert_dir: Option<&Path>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (certs, key) = match cert_dir {
        Some(dir) => {
            let read_err = |path: &Path, e: &dyn std::fmt::Display| TlsError::Read {
                path: path.display().to_string(),
                message: e.to_string(),
            };
            let cert_path = dir.join("tls.crt");
            let key_path = dir.join("tls.key");
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
                .map_err(|e| read_err(&cert_path, &e))?
                .collect::<Result<_, _>>()
                .map_err(|e| read_err(&cert_path, &e))?;
            let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| read_err(&key_path, &e))?;
            (certs, key)
        }
        None => {
            let names = vec!["localhost".to_string(), hostname()];
            let generated = rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(generated.signing_key.serialize_der()));
            (vec![generated.cert.der().clone()], key)
        }
    };
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

fn hostname() -> String {
    std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "pequod".to_string())
}

/// Serves `router` over TLS on `listener` until shutdown (secure metrics, and the conversion
/// webhook).
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    tls: Arc<rustls::ServerConfig>,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.wait() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    continue;
                }
            },
        };
        // The peer's address, for the middleware's per-client review budgets.
        let router = router.clone().layer(axum::Extension(ConnectInfo(peer)));
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("TLS handshake timed out");
                    return;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(router);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

/// Outcome of checking a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// The token is missing or the apiserver does not know it: 401.
    Unauthenticated(String),
    /// The token's user may not get /metrics: 403.
    Forbidden(String),
    /// Too many unknown tokens at once: 429, nothing asked of the apiserver.
    Throttled,
}

/// Asks the apiserver who a bearer token is and whether it may read /metrics.
pub struct Authorizer {
    client: kube::Client,
    decisions: Mutex<Decisions>,
    reviews: Mutex<ClientBudgets>,
    /// Audiences a token must be meant for; empty: the apiserver's own.
    audiences: Vec<String>,
}

/// Requests allowed in the current second, of a budget of `limit` a second.
#[derive(Debug)]
struct SecondBudget {
    second: Instant,
    spent: u32,
    limit: u32,
}

impl SecondBudget {
    fn new(limit: u32, now: Instant) -> Self {
        Self {
            second: now,
            spent: 0,
            limit,
        }
    }

    /// Whether one more request fits in the second that `now` falls in.
    fn spend(&mut self, now: Instant) -> bool {
        if now.duration_since(self.second) >= Duration::from_secs(1) {
            self.second = now;
            self.spent = 0;
        }
        if self.spent >= self.limit {
            return false;
        }
        self.spent += 1;
        true
    }
}

/// Per-second budgets of requests passed on to the apiserver for clients it does not know
/// (the metrics' TokenReviews, the conversion webhook's lookups of paths): one per client,
/// and one over all.
#[derive(Debug)]
pub(crate) struct ClientBudgets {
    clients: Lru<SecondBudget>,
    per_client: u32,
    overall: SecondBudget,
}

impl ClientBudgets {
    /// The TokenReview budgets.
    fn new(now: Instant) -> Self {
        Self::with_limits(MAX_REVIEWS_PER_CLIENT, MAX_REVIEWS_PER_SECOND, now)
    }

    /// `per_client` requests a second for each client, `overall` for all together.
    pub(crate) fn with_limits(per_client: u32, overall: u32, now: Instant) -> Self {
        Self {
            clients: Lru::default(),
            per_client,
            overall: SecondBudget::new(overall, now),
        }
    }

    /// Whether `client` may have one more request passed on at `now`. A client over its own
    /// budget is refused without touching the overall one, so that it cannot use up others'.
    pub(crate) fn spend(&mut self, client: &str, now: Instant) -> bool {
        if self.clients.get(client).is_none() {
            while self.clients.len() >= MAX_CLIENTS && self.clients.pop_oldest().is_some() {}
            self.clients
                .insert(client.to_string(), SecondBudget::new(self.per_client, now), 1);
        }
        let admitted = self.clients.get_mut(client).is_some_and(|b| b.spend(now));
        admitted && self.overall.spend(now)
    }
}

/// The client a budget belongs to: its IPv4 address, or the /64 of its IPv6 address (one
/// host holds a whole /64 and could otherwise take a new budget per address).
pub(crate) fn client_key(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// A token allowed to read /metrics.
#[derive(Debug)]
struct Allowed {
    at: Instant,
    /// A background review of the token is under way.
    renewing: bool,
}

/// What is known about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Known {
    /// A decision young enough to answer with.
    Answer(Decision),
    /// Allowed, and old enough to be renewed: answered so, and reviewed in the background.
    AnswerAndRenew,
    /// Nothing, or too old: review it now.
    Unknown,
}

/// Decisions by token hash. Positive and negative ones are kept apart, each bounded, the least
/// recently used going first: a flood of made-up tokens only ever pushes out negative ones.
#[derive(Debug, Default)]
struct Decisions {
    allowed: Lru<Allowed>,
    refused: Lru<(Instant, Decision)>,
}

impl Decisions {
    fn known(&mut self, key: &str, now: Instant) -> Known {
        if let Some(allowed) = self.allowed.get_mut(key) {
            let age = now.saturating_duration_since(allowed.at);
            if age < RENEW_AFTER || (allowed.renewing && age < DECISION_TTL) {
                return Known::Answer(Decision::Allowed);
            }
            if age < DECISION_TTL {
                allowed.renewing = true;
                return Known::AnswerAndRenew;
            }
            self.allowed.remove(key);
            return Known::Unknown;
        }
        match self.refused.get(key) {
            Some((at, decision)) if now.saturating_duration_since(*at) < DECISION_TTL => {
                Known::Answer(decision.clone())
            }
            _ => Known::Unknown,
        }
    }

    /// Keeps the apiserver's answer about a token. Throttling is no answer and is not kept.
    fn record(&mut self, key: &str, decision: &Decision, now: Instant) {
        match decision {
            Decision::Throttled => {}
            Decision::Allowed => {
                self.refused.remove(key);
                make_room(&mut self.allowed, MAX_ALLOWED);
                let fresh = Allowed {
                    at: now,
                    renewing: false,
                };
                self.allowed.insert(key.to_string(), fresh, 1);
            }
            refused => {
                self.allowed.remove(key);
                make_room(&mut self.refused, MAX_REFUSED);
                self.refused.insert(key.to_string(), (now, refused.clone()), 1);
            }
        }
    }

    /// A background review did not get an answer: the next scrape tries again.
    fn renewal_failed(&mut self, key: &str) {
        if let Some(allowed) = self.allowed.get_mut(key) {
            allowed.renewing = false;
        }
    }
}

/// Makes room for one entry: the least recently used go.
fn make_room<V>(entries: &mut Lru<V>, max: usize) {
    while entries.len() >= max && entries.pop_oldest().is_some() {}
}

/// Why a reviewed token is not meant for the audiences asked for. An apiserver that returns
/// no audience for a token it authenticated is not audience-aware for it; such a token is
/// valid only for the apiserver itself, so it is refused when audiences are asked for.
fn audience_mismatch(wanted: &[String], granted: Option<&[String]>) -> Option<String> {
    if wanted.is_empty() || granted.unwrap_or_default().iter().any(|a| wanted.contains(a)) {
        return None;
    }
    Some(format!("the token is not meant for {}", wanted.join(" or ")))
}

impl Authorizer {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            decisions: Mutex::default(),
            reviews: Mutex::new(ClientBudgets::new(Instant::now())),
            audiences: Vec::new(),
        }
    }

    /// Accepts only tokens meant for one of `audiences` (none: the apiserver's audiences).
    pub fn for_audiences(mut self, audiences: Vec<String>) -> Self {
        self.audiences = audiences;
        self
    }

    /// Whether `token`, sent from `peer`, may read /metrics.
    pub async fn check(self: &Arc<Self>, peer: IpAddr, token: Option<&str>) -> Result<Decision, kube::Error> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Ok(Decision::Unauthenticated("no bearer token".into()));
        };
        let key = hex::encode(Sha256::digest(token.as_bytes()));
        let known = self.decisions().known(&key, Instant::now());
        match known {
            Known::Answer(decision) => return Ok(decision),
            Known::AnswerAndRenew => {
                self.renew(key, token.to_string());
                return Ok(Decision::Allowed);
            }
            Known::Unknown => {}
        }
        let admitted = self
            .reviews
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spend(&client_key(peer), Instant::now());
        if !admitted {
            return Ok(Decision::Throttled);
        }
        let decision = self.ask(token).await?;
        self.decisions().record(&key, &decision, Instant::now());
        Ok(decision)
    }

    /// Reviews an allowed token again in the background, outside any budget: only tokens
    /// that were allowed are renewed, at most once a [`RENEW_AFTER`] each.
    fn renew(self: &Arc<Self>, key: String, token: String) {
        let auth = Arc::clone(self);
        tokio::spawn(async move {
            match auth.ask(&token).await {
                Ok(decision) => auth.decisions().record(&key, &decision, Instant::now()),
                Err(e) => {
                    tracing::debug!(error = %e, "renewing a metrics token's review failed");
                    auth.decisions().renewal_failed(&key);
                }
            }
        });
    }

    fn decisions(&self) -> std::sync::MutexGuard<'_, Decisions> {
        self.decisions.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn ask(&self, token: &str) -> Result<Decision, kube::Error> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let status = reviewed.status.unwrap_or_default();
        if let Some(why) = audience_mismatch(&self.audiences, status.audiences.as_deref()) {
            return Ok(Decision::Unauthenticated(why));
        }
        let Some(user) = status.user.filter(|_| status.authenticated == Some(true)) else {
            return Ok(Decision::Unauthenticated(
                status.error.unwrap_or_else(|| "the token is not valid".into()),
            ));
        };
        let name = user.username.clone().unwrap_or_default();
        let access = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some("/metrics".into()),
                    verb: Some("get".into()),
                }),
                resource_attributes: None,
            },
            ..Default::default()
        };
        let reviewed = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &access)
            .await?;
        let allowed = reviewed.status.as_ref().is_some_and(|s| s.allowed);
        Ok(if allowed {
            Decision::Allowed
        } else {
            Decision::Forbidden(format!("{name} may not get /metrics"))
        })
    }
}

/// Middleware: only requests whose bearer token may get /metrics pass. The peer's address
/// ([`ConnectInfo`], set by [`bind_tls`]) chooses the review budget; without one, all such
/// requests share the budget of the unspecified address.
pub async fn authorize(State(auth): State<Arc<Authorizer>>, request: Request, next: Next) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match auth.check(peer, token).await {
        Ok(Decision::Allowed) => next.run(request).await,
        Ok(Decision::Unauthenticated(why)) => {
            (StatusCode::UNAUTHORIZED, format!("unauthorized: {why}\n")).into_response()
        }
        Ok(Decision::Forbidden(why)) => (StatusCode::FORBIDDEN, format!("forbidden: {why}\n")).into_response(),
        Ok(Decision::Throttled) => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many unknown tokens from this client; try again in a second\n",
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "reviewing a metrics token failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the apiserver could not review the token\n",
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reviews_of_unknown_tokens_are_limited_per_second() {
        let start = Instant::now();
        let mut budget = SecondBudget::new(MAX_REVIEWS_PER_CLIENT, start);
        let admitted = (0..MAX_REVIEWS_PER_CLIENT + 5).filter(|_| budget.spend(start)).count();
        assert_eq!(admitted, MAX_REVIEWS_PER_CLIENT as usize);
        assert!(budget.spend(start + Duration::from_millis(1001)), "a new second");
    }

    #[test]
    fn a_flooding_client_is_limited_and_another_still_gets_reviews() {
        let start = Instant::now();
        let mut budgets = ClientBudgets::new(start);
        let flooder = (0..1000).filter(|_| budgets.spend("10.0.0.66", start)).count();
        assert_eq!(flooder, MAX_REVIEWS_PER_CLIENT as usize);
        assert!(
            budgets.spend("10.0.0.7", start),
            "the scraper's own budget is untouched"
        );
        // Many flooding clients together are held to the overall budget.
        let many = (0..200)
            .filter(|i| budgets.spend(&format!("10.1.0.{i}"), start))
            .count();
        assert_eq!(many as u32, MAX_REVIEWS_PER_SECOND - MAX_REVIEWS_PER_CLIENT - 1);
        let later = start + Duration::from_secs(1);
        assert!(budgets.spend("10.0.0.7", later), "budgets refill each second");
    }

    #[test]
    fn tracked_clients_are_bounded() {
        let start = Instant::now();
        let mut budgets = ClientBudgets::new(start);
        for i in 0..MAX_CLIENTS + 10 {
            budgets.spend(&format!("client-{i}"), start + Duration::from_secs(i as u64));
        }
        assert_eq!(budgets.clients.len(), MAX_CLIENTS);
    }

    #[test]
    fn clients_are_addresses_and_ipv6_hosts_their_64() {
        assert_eq!(client_key("10.0.0.7".parse().unwrap()), "10.0.0.7");
        assert_eq!(client_key("::ffff:10.0.0.7".parse().unwrap()), "10.0.0.7");
        assert_eq!(
            client_key("2001:db8:1:2:aaaa::1".parse().unwrap()),
            client_key("2001:db8:1:2:bbbb::2".parse().unwrap())
        );
        assert_ne!(
            client_key("2001:db8:1:2::1".parse().unwrap()),
            client_key("2001:db8:1:3::1".parse().unwrap())
        );
    }

    #[test]
    fn an_allowed_token_is_renewed_before_it_expires_and_answered_meanwhile() {
        let start = Instant::now();
        let mut decisions = Decisions::default();
        assert_eq!(decisions.known("t", start), Known::Unknown);
        decisions.record("t", &Decision::Allowed, start);
        assert_eq!(
            decisions.known("t", start + Duration::from_secs(10)),
            Known::Answer(Decision::Allowed)
        );
        let due = start + RENEW_AFTER;
        assert_eq!(decisions.known("t", due), Known::AnswerAndRenew);
        assert_eq!(
            decisions.known("t", due + Duration::from_secs(1)),
            Known::Answer(Decision::Allowed),
            "one renewal at a time"
        );
        decisions.renewal_failed("t");
        assert_eq!(
            decisions.known("t", due + Duration::from_secs(2)),
            Known::AnswerAndRenew,
            "tried again"
        );
        decisions.record("t", &Decision::Allowed, due + Duration::from_secs(3));
        let renewed = start + DECISION_TTL + Duration::from_secs(10);
        assert_eq!(
            decisions.known("t", renewed),
            Known::Answer(Decision::Allowed),
            "renewed in time"
        );
        assert_eq!(
            decisions.known("t", renewed + DECISION_TTL),
            Known::Unknown,
            "never renewed: reviewed again"
        );
        // A renewal that finds the token revoked replaces the positive decision.
        decisions.record("u", &Decision::Allowed, start);
        decisions.record("u", &Decision::Forbidden("revoked".into()), start);
        assert_eq!(
            decisions.known("u", start),
            Known::Answer(Decision::Forbidden("revoked".into()))
        );
    }

    #[test]
    fn made_up_tokens_never_push_out_an_allowed_one() {
        let start = Instant::now();
        let mut decisions = Decisions::default();
        decisions.record("scraper", &Decision::Allowed, start);
        for i in 0..MAX_REFUSED * 3 {
            decisions.record(&format!("made-up-{i}"), &Decision::Unauthenticated("no".into()), start);
        }
        decisions.record("ignored", &Decision::Throttled, start);
        assert_eq!(decisions.refused.len(), MAX_REFUSED);
        assert_eq!(decisions.known("scraper", start), Known::Answer(Decision::Allowed));
        assert_eq!(decisions.known("ignored", start), Known::Unknown);
    }

    #[test]
    fn a_full_decision_cache_drops_the_least_recently_used_not_everything() {
        let mut decisions: Lru<(Instant, Decision)> = Lru::default();
        for i in 0..MAX_REFUSED {
            decisions.insert(format!("t{i}"), (Instant::now(), Decision::Allowed), 1);
        }
        // t0 is the oldest, but was just used: t1 goes instead.
        assert!(decisions.get("t0").is_some());
        make_room(&mut decisions, MAX_REFUSED);
        assert_eq!(decisions.len(), MAX_REFUSED - 1);
        assert!(decisions.get("t1").is_none(), "the least recently used went");
        assert!(decisions.get("t0").is_some() && decisions.get("t2").is_some());
    }

    #[test]
    fn tokens_must_be_meant_for_the_audiences_asked_for() {
        let wanted = vec!["pequod-metrics".to_string()];
        let granted = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(audience_mismatch(&[], None), None, "no audience asked for");
        assert_eq!(audience_mismatch(&wanted, Some(&granted(&["pequod-metrics"]))), None);
        assert!(audience_mismatch(&wanted, Some(&granted(&["https://kubernetes.default.svc"]))).is_some());
        assert!(audience_mismatch(&wanted, None).is_some(), "an audience-unaware answer");
    }

    #[test]
    fn a_self_signed_certificate_is_generated_without_a_cert_dir() {
        assert!(tls_config(None).is_ok());
    }

    #[test]
    fn a_mounted_certificate_is_read_and_a_missing_one_named() {
        let generated = rcgen::generate_simple_self_signed(vec!["pequod".into()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tls.crt"), generated.cert.pem()).unwrap();
        std::fs::write(dir.path().join("tls.key"), generated.signing_key.serialize_pem()).unwrap();
        assert!(tls_config(Some(dir.path())).is_ok());

        let empty = tempfile::tempdir().unwrap();
        let err = tls_config(Some(empty.path())).unwrap_err();
        assert!(err.to_string().contains("tls.crt"), "{err}");
    }
}
