//! Secure metrics: HTTPS with a mounted or self-signed certificate, and authentication and
//! authorization of each scrape by the apiserver (TokenReview, then SubjectAccessReview for
//! `get` on the non-resource URL `/metrics`), as kubebuilder operators do.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lru::Lru;
use axum::Router;
use axum::extract::{Request, State};
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
/// Most decisions kept.
const MAX_DECISIONS: usize = 1024;
/// Longest a client may take to finish the TLS handshake, and to send its request headers:
/// a client that connects and stays silent does not hold a task for ever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most TokenReviews per second for tokens not seen recently: a flood of made-up tokens is
/// answered 429 rather than passed on to the apiserver.
const MAX_REVIEWS_PER_SECOND: u32 = 20;

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

/// Serves `router` over TLS on `listener` until shutdown.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    tls: Arc<rustls::ServerConfig>,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.wait() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a metrics connection failed");
                    continue;
                }
            },
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
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
                tracing::debug!(error = %e, "metrics connection ended with an error");
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
    /// Decisions by token hash, with when they were made; the least recently used go first.
    decisions: Mutex<Lru<(Instant, Decision)>>,
    reviews: Mutex<ReviewBudget>,
    /// Audiences a token must be meant for; empty: the apiserver's own.
    audiences: Vec<String>,
}

/// TokenReviews allowed in the current second.
#[derive(Debug)]
struct ReviewBudget {
    second: Instant,
    spent: u32,
}

impl ReviewBudget {
    /// Whether one more review fits in the second that `now` falls in.
    fn spend(&mut self, now: Instant) -> bool {
        if now.duration_since(self.second) >= Duration::from_secs(1) {
            self.second = now;
            self.spent = 0;
        }
        self.spent += 1;
        self.spent <= MAX_REVIEWS_PER_SECOND
    }
}

/// Makes room for one decision: the least recently used go.
fn make_room(decisions: &mut Lru<(Instant, Decision)>) {
    while decisions.len() >= MAX_DECISIONS && decisions.pop_oldest().is_some() {}
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
            reviews: Mutex::new(ReviewBudget {
                second: Instant::now(),
                spent: 0,
            }),
            audiences: Vec::new(),
        }
    }

    /// Accepts only tokens meant for one of `audiences` (none: the apiserver's audiences).
    pub fn for_audiences(mut self, audiences: Vec<String>) -> Self {
        self.audiences = audiences;
        self
    }

    pub async fn check(&self, token: Option<&str>) -> Result<Decision, kube::Error> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Ok(Decision::Unauthenticated("no bearer token".into()));
        };
        let key = hex::encode(Sha256::digest(token.as_bytes()));
        if let Some((at, decision)) = self.lock().get(&key)
            && at.elapsed() < DECISION_TTL
        {
            return Ok(decision.clone());
        }
        let admitted = self
            .reviews
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spend(Instant::now());
        if !admitted {
            return Ok(Decision::Throttled);
        }
        let decision = self.ask(token).await?;
        let mut decisions = self.lock();
        make_room(&mut decisions);
        decisions.insert(key, (Instant::now(), decision.clone()), 1);
        Ok(decision)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru<(Instant, Decision)>> {
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

/// Middleware: only requests whose bearer token may get /metrics pass.
pub async fn authorize(State(auth): State<Arc<Authorizer>>, request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match auth.check(token).await {
        Ok(Decision::Allowed) => next.run(request).await,
        Ok(Decision::Unauthenticated(why)) => {
            (StatusCode::UNAUTHORIZED, format!("unauthorized: {why}\n")).into_response()
        }
        Ok(Decision::Forbidden(why)) => (StatusCode::FORBIDDEN, format!("forbidden: {why}\n")).into_response(),
        Ok(Decision::Throttled) => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many unknown tokens; try again in a second\n",
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
        let mut budget = ReviewBudget {
            second: start,
            spent: 0,
        };
        let admitted = (0..MAX_REVIEWS_PER_SECOND + 5).filter(|_| budget.spend(start)).count();
        assert_eq!(admitted, MAX_REVIEWS_PER_SECOND as usize);
        assert!(budget.spend(start + Duration::from_millis(1001)), "a new second");
    }

    #[test]
    fn a_full_decision_cache_drops_the_least_recently_used_not_everything() {
        let mut decisions: Lru<(Instant, Decision)> = Lru::default();
        for i in 0..MAX_DECISIONS {
            decisions.insert(format!("t{i}"), (Instant::now(), Decision::Allowed), 1);
        }
        // t0 is the oldest, but was just used: t1 goes instead.
        assert!(decisions.get("t0").is_some());
        make_room(&mut decisions);
        assert_eq!(decisions.len(), MAX_DECISIONS - 1);
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
