//! The conversion webhook's serving certificate, kept in the Secret `pequod-webhook-tls` of
//! the operator's namespace (`ca.crt`, `ca.key`, `tls.crt`, `tls.key`). Whichever replica finds
//! the Secret absent makes it: a self-signed CA valid 10 years, and a serving certificate it
//! signs. Any replica re-issues the serving certificate with the same CA when a third of its
//! life is left or the names it should be valid for changed. Every replica reads the Secret at
//! start and every 30 s, swaps what it serves through [`CertResolver`] (no restart), and
//! publishes the CA bundle for generated CRDs' `caBundle`. No Secret value is ever logged.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use super::endpoint::{SubjectName, WebhookUrl};
use crate::api::names::{MANAGED_BY_LABEL, MANAGED_BY_VALUE, WEBHOOK_TLS_SECRET};
use crate::error::ErrorCategory;
use crate::runtime::health::{Health, Probe};
use crate::runtime::shutdown::Shutdown;

/// Data keys of the Secret: the PEM bundle of trusted CAs, the CA's key, and the serving
/// certificate and key.
pub const CA_CERT_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_KEY_KEY: &str = "tls.key";

/// Life of the CA made with the Secret.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default life of a serving certificate (`--webhook-cert-validity`).
pub const DEFAULT_SERVING_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Shortest serving certificate life allowed.
pub const MIN_SERVING_VALIDITY: Duration = Duration::from_secs(60);
/// How often every replica reads the Secret again.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Longest a certificate is backdated, for clocks a little behind the operator's.
const MAX_BACKDATE_SECONDS: i64 = 60;
/// Attempts at one read-and-write of the Secret when other replicas write it meanwhile.
const WRITE_ATTEMPTS: usize = 3;
/// The readiness check that waits for the first certificate.
pub const READINESS_CHECK: &str = "webhook-certificate";

const CA_COMMON_NAME: &str = "pequod-webhook-ca";

/// Why the certificate could not be read, made or renewed.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("reading or writing Secret {namespace}/{WEBHOOK_TLS_SECRET}: {source}")]
    Api {
        namespace: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error(
        "Secret {namespace}/{WEBHOOK_TLS_SECRET}: {key} {problem}; delete the Secret to have a new CA and certificate made"
    )]
    Malformed {
        namespace: String,
        key: &'static str,
        problem: String,
    },
    #[error("Secret {namespace}/{WEBHOOK_TLS_SECRET} kept changing while it was renewed")]
    Contended { namespace: String },
    #[error("generating a certificate: {0}")]
    Generate(String),
}

impl ErrorCategory for CertificateError {
    fn reason(&self) -> &'static str {
        match self {
            Self::Api { .. } => "ApiError",
            Self::Malformed { .. } => "MalformedSecret",
            Self::Contended { .. } => "Conflict",
            Self::Generate(_) => "CertificateGenerationFailed",
        }
    }

    fn is_transient(&self) -> bool {
        !matches!(self, Self::Malformed { .. })
    }
}

fn generate_error(e: impl std::fmt::Display) -> CertificateError {
    CertificateError::Generate(e.to_string())
}

// Decisions (pure).

/// The names the serving certificate must be valid for: the Service's two DNS names and the
/// host of `--webhook-url`, sorted, without duplicates.
pub fn wanted_names(service: &str, namespace: &str, url: Option<&WebhookUrl>) -> Vec<SubjectName> {
    let mut names = vec![
        SubjectName::Dns(format!("{service}.{namespace}.svc")),
        SubjectName::Dns(format!("{service}.{namespace}.svc.cluster.local")),
    ];
    names.extend(url.map(|u| u.host.clone()));
    names.sort();
    names.dedup();
    names
}

/// What a serving certificate says of itself. Times are seconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    pub not_before: i64,
    pub not_after: i64,
    /// Its subject alternative names, sorted.
    pub names: Vec<SubjectName>,
}

/// Why a serving certificate is issued again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReissueReason {
    /// Less than a third of its life is left (or none).
    Expiring { not_after: i64 },
    /// It is not valid for the names wanted.
    Names { has: Vec<SubjectName> },
    /// `tls.crt` or `tls.key` cannot be used.
    Unusable(String),
}

impl std::fmt::Display for ReissueReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Expiring { not_after } => write!(f, "less than a third of its life is left (it ends at {not_after})"),
            Self::Names { has } => {
                let has: Vec<String> = has.iter().map(ToString::to_string).collect();
                write!(f, "it is valid for other names ({})", has.join(", "))
            }
            Self::Unusable(why) => write!(f, "it cannot be used: {why}"),
        }
    }
}

/// Why the serving certificate `facts` should be issued again at `now`, if it should.
pub fn reissue_reason(facts: &CertificateFacts, wanted: &[SubjectName], now: i64) -> Option<ReissueReason> {
    if facts.names != wanted {
        return Some(ReissueReason::Names {
            has: facts.names.clone(),
        });
    }
    let lifetime = facts.not_after.saturating_sub(facts.not_before).max(0);
    let left = facts.not_after.saturating_sub(now);
    (left.saturating_mul(3) < lifetime || left <= 0).then_some(ReissueReason::Expiring {
        not_after: facts.not_after,
    })
}

/// The validity window `(not_before, not_after)` of a serving certificate issued at `now` for
/// `validity` seconds by a CA that ends at `ca_not_after`. It is backdated a little for clocks
/// behind this one, never by more than half its validity (so that a third of its life is left
/// when issued), and ends no later than the CA.
pub fn serving_window(now: i64, validity: i64, ca_not_after: i64) -> (i64, i64) {
    let backdate = MAX_BACKDATE_SECONDS.min(validity / 2);
    (now - backdate, now.saturating_add(validity).min(ca_not_after))
}

/// The facts of the first certificate of `pem`.
pub fn certificate_facts(pem: &str) -> Result<CertificateFacts, String> {
    let der = first_certificate(pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| e.to_string())?;
    let validity = cert.validity();
    let mut names = Vec::new();
    if let Some(san) = cert.subject_alternative_name().map_err(|e| e.to_string())? {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => names.push(SubjectName::Dns(dns.to_string())),
                x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                    if let Some(ip) = ip_of(bytes) {
                        names.push(SubjectName::Ip(ip));
                    }
                }
                _ => {}
            }
        }
    }
    names.sort();
    names.dedup();
    Ok(CertificateFacts {
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
        names,
    })
}

fn ip_of(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}

fn first_certificate(pem: &str) -> Result<CertificateDer<'static>, String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| "holds no PEM certificate".to_string())?
        .map_err(|e| e.to_string())
}

// Issuing.

/// A CA and its key, as PEM.
struct IssuedCa {
    cert: String,
    key: String,
}

/// A serving certificate and its key, as PEM.
#[derive(Debug)]
struct IssuedServing {
    cert: String,
    key: String,
}

fn time_of(seconds: i64) -> Result<time::OffsetDateTime, CertificateError> {
    time::OffsetDateTime::from_unix_timestamp(seconds).map_err(generate_error)
}

/// A random positive serial number.
fn serial_number() -> Result<rcgen::SerialNumber, CertificateError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CertificateError::Generate("the system's random number generator failed".into()))?;
    bytes[0] &= 0x7f;
    Ok(rcgen::SerialNumber::from_slice(&bytes))
}

/// A new self-signed CA valid from `now` for [`CA_VALIDITY`].
fn new_ca(now: i64) -> Result<IssuedCa, CertificateError> {
    let key = rcgen::KeyPair::generate().map_err(generate_error)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = time_of(now - MAX_BACKDATE_SECONDS)?;
    params.not_after = time_of(now.saturating_add(CA_VALIDITY.as_secs() as i64))?;
    params.serial_number = Some(serial_number()?);
    let cert = params.self_signed(&key).map_err(generate_error)?;
    Ok(IssuedCa {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A serving certificate for `names`, valid `validity` seconds from `now`, signed by the CA of
/// `ca_bundle` whose key is `ca_key` (both PEM).
fn issue_serving(
    ca_bundle: &str,
    ca_key: &str,
    names: &[SubjectName],
    now: i64,
    validity: i64,
) -> Result<IssuedServing, String> {
    let ca_key = rcgen::KeyPair::from_pem(ca_key).map_err(|e| format!("{CA_KEY_KEY}: {e}"))?;
    let (ca_der, ca_not_after) = ca_of_key(ca_bundle, &ca_key)?;
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca_der, ca_key).map_err(|e| format!("{CA_CERT_KEY}: {e}"))?;
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(first) = names.first() {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, first.to_string());
    }
    params.subject_alt_names = names
        .iter()
        .map(|name| match name {
            SubjectName::Dns(dns) => rcgen::string::Ia5String::try_from(dns.as_str())
                .map(rcgen::SanType::DnsName)
                .map_err(|e| format!("{dns}: {e}")),
            SubjectName::Ip(ip) => Ok(rcgen::SanType::IpAddress(*ip)),
        })
        .collect::<Result<_, _>>()?;
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let (not_before, not_after) = serving_window(now, validity, ca_not_after);
    params.not_before = time_of(not_before).map_err(|e| e.to_string())?;
    params.not_after = time_of(not_after).map_err(|e| e.to_string())?;
    params.serial_number = Some(serial_number().map_err(|e| e.to_string())?);
    let cert = params.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
    Ok(IssuedServing {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// The certificate of `bundle` whose public key is `key`'s, and when it ends.
fn ca_of_key(bundle: &str, key: &rcgen::KeyPair) -> Result<(CertificateDer<'static>, i64), String> {
    use rcgen::PublicKeyData;
    let public = key.subject_public_key_info();
    for der in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        let der = der.map_err(|e| format!("{CA_CERT_KEY}: {e}"))?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| format!("{CA_CERT_KEY}: {e}"))?;
        if cert.public_key().raw == public.as_slice() {
            let not_after = cert.validity().not_after.timestamp();
            return Ok((der.clone(), not_after));
        }
    }
    Err(format!("{CA_CERT_KEY} holds no certificate of {CA_KEY_KEY}"))
}

// The Secret.

/// What the Secret holds, as PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    pub ca_bundle: String,
    ca_key: Option<String>,
    pub tls_cert: String,
    tls_key: String,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys stay out of any output.
        f.debug_struct("Material").finish_non_exhaustive()
    }
}

impl Material {
    fn of(secret: &Secret, namespace: &str) -> Result<Self, CertificateError> {
        let data = secret.data.as_ref();
        let text = |key: &'static str| -> Result<Option<String>, CertificateError> {
            data.and_then(|d| d.get(key))
                .map(|bytes| {
                    String::from_utf8(bytes.0.clone()).map_err(|_| CertificateError::Malformed {
                        namespace: namespace.to_string(),
                        key,
                        problem: "is not PEM text".into(),
                    })
                })
                .transpose()
        };
        let ca_bundle =
            text(CA_CERT_KEY)?
                .filter(|b| !b.trim().is_empty())
                .ok_or_else(|| CertificateError::Malformed {
                    namespace: namespace.to_string(),
                    key: CA_CERT_KEY,
                    problem: "is missing".into(),
                })?;
        Ok(Self {
            ca_bundle,
            ca_key: text(CA_KEY_KEY)?,
            tls_cert: text(TLS_CERT_KEY)?.unwrap_or_default(),
            tls_key: text(TLS_KEY_KEY)?.unwrap_or_default(),
        })
    }

    fn data(&self) -> BTreeMap<String, ByteString> {
        let mut data = BTreeMap::from([
            (CA_CERT_KEY.to_string(), ByteString(self.ca_bundle.clone().into_bytes())),
            (TLS_CERT_KEY.to_string(), ByteString(self.tls_cert.clone().into_bytes())),
            (TLS_KEY_KEY.to_string(), ByteString(self.tls_key.clone().into_bytes())),
        ]);
        if let Some(key) = &self.ca_key {
            data.insert(CA_KEY_KEY.to_string(), ByteString(key.clone().into_bytes()));
        }
        data
    }

    /// The serving certificate and key, ready for rustls.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(self.tls_cert.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{TLS_CERT_KEY}: {e}"))?;
        if chain.is_empty() {
            return Err(format!("{TLS_CERT_KEY} holds no PEM certificate"));
        }
        let key = PrivateKeyDer::from_pem_slice(self.tls_key.as_bytes()).map_err(|e| format!("{TLS_KEY_KEY}: {e}"))?;
        let signing =
            rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| format!("{TLS_KEY_KEY}: {e}"))?;
        let certified = CertifiedKey::new(chain, signing);
        certified
            .keys_match()
            .map_err(|e| format!("{TLS_KEY_KEY} is not the key of {TLS_CERT_KEY}: {e}"))?;
        Ok(Arc::new(certified))
    }
}

/// What to do with the Secret as found.
#[derive(Debug)]
enum Step {
    Serve,
    Reissue(ReissueReason),
}

/// Whether the serving certificate of `material` can be served as it is at `now`.
fn step(material: &Material, wanted: &[SubjectName], now: i64) -> Step {
    let facts = match certificate_facts(&material.tls_cert) {
        Ok(facts) => facts,
        Err(why) => return Step::Reissue(ReissueReason::Unusable(format!("{TLS_CERT_KEY}: {why}"))),
    };
    if let Err(why) = material.certified_key() {
        return Step::Reissue(ReissueReason::Unusable(why));
    }
    match reissue_reason(&facts, wanted, now) {
        Some(reason) => Step::Reissue(reason),
        None => Step::Serve,
    }
}

/// Reads and writes the Secret of the serving certificate.
pub struct CertificateStore {
    api: Api<Secret>,
    namespace: String,
    names: Vec<SubjectName>,
    validity: Duration,
}

impl CertificateStore {
    /// The Secret in `namespace`, for a serving certificate valid `validity` for `names`.
    pub fn new(client: Client, namespace: &str, names: Vec<SubjectName>, validity: Duration) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            names,
            validity: validity.max(MIN_SERVING_VALIDITY),
        }
    }

    fn api_error(&self, source: kube::Error) -> CertificateError {
        CertificateError::Api {
            namespace: self.namespace.clone(),
            source: Box::new(source),
        }
    }

    fn malformed(&self, key: &'static str, problem: String) -> CertificateError {
        CertificateError::Malformed {
            namespace: self.namespace.clone(),
            key,
            problem,
        }
    }

    /// What to serve: the Secret's certificate, after making the Secret when it is absent
    /// or re-issuing its serving certificate when it is due. Another replica writing the
    /// Secret meanwhile is fine: its write is read and judged again.
    pub async fn sync(&self) -> Result<Material, CertificateError> {
        for _ in 0..WRITE_ATTEMPTS {
            let written = match self.api.get_opt(WEBHOOK_TLS_SECRET).await {
                Err(e) => return Err(self.api_error(e)),
                Ok(None) => self.create().await?,
                Ok(Some(secret)) => {
                    let material = Material::of(&secret, &self.namespace)?;
                    match step(&material, &self.names, unix_now()) {
                        Step::Serve => return Ok(material),
                        Step::Reissue(reason) => self.reissue(secret, material, &reason).await?,
                    }
                }
            };
            if let Some(material) = written {
                return Ok(material);
            }
        }
        Err(CertificateError::Contended {
            namespace: self.namespace.clone(),
        })
    }

    /// Makes the Secret; None when another replica made it first.
    async fn create(&self) -> Result<Option<Material>, CertificateError> {
        let now = unix_now();
        let ca = new_ca(now)?;
        let serving = issue_serving(&ca.cert, &ca.key, &self.names, now, self.validity_seconds())
            .map_err(CertificateError::Generate)?;
        let material = Material {
            ca_bundle: ca.cert,
            ca_key: Some(ca.key),
            tls_cert: serving.cert,
            tls_key: serving.key,
        };
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(WEBHOOK_TLS_SECRET.into()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into())])),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(material.data()),
            ..Default::default()
        };
        match self.api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(namespace = %self.namespace, secret = WEBHOOK_TLS_SECRET, names = %describe(&self.names), "made the conversion webhook's CA and serving certificate");
                Ok(Some(material))
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
            Err(e) => Err(self.api_error(e)),
        }
    }

    /// Writes a new serving certificate into `secret` (as read, with its resourceVersion);
    /// None when another replica wrote the Secret first.
    async fn reissue(
        &self,
        mut secret: Secret,
        material: Material,
        reason: &ReissueReason,
    ) -> Result<Option<Material>, CertificateError> {
        let ca_key = material
            .ca_key
            .as_deref()
            .ok_or_else(|| self.malformed(CA_KEY_KEY, "is missing, so the certificate cannot be renewed".into()))?;
        let serving = issue_serving(
            &material.ca_bundle,
            ca_key,
            &self.names,
            unix_now(),
            self.validity_seconds(),
        )
        .map_err(|why| self.malformed(CA_CERT_KEY, format!("cannot sign: {why}")))?;
        let renewed = Material {
            tls_cert: serving.cert,
            tls_key: serving.key,
            ..material
        };
        secret.data = Some(renewed.data());
        match self
            .api
            .replace(WEBHOOK_TLS_SECRET, &PostParams::default(), &secret)
            .await
        {
            Ok(_) => {
                tracing::info!(namespace = %self.namespace, secret = WEBHOOK_TLS_SECRET, %reason, names = %describe(&self.names), "issued a new serving certificate for the conversion webhook");
                Ok(Some(renewed))
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
            Err(e) => Err(self.api_error(e)),
        }
    }

    fn validity_seconds(&self) -> i64 {
        i64::try_from(self.validity.as_secs()).unwrap_or(i64::MAX)
    }
}

fn describe(names: &[SubjectName]) -> String {
    names.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

fn unix_now() -> i64 {
    jiff::Timestamp::now().as_second()
}

// Serving.

/// The certificate the webhook presents: swapped in place whenever the Secret changes.
#[derive(Default)]
pub struct CertResolver {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertResolver").finish_non_exhaustive()
    }
}

impl CertResolver {
    pub fn set(&self, key: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(key);
    }

    pub fn is_loaded(&self) -> bool {
        self.current.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Keeps `resolver` and `ca_bundle` current with the Secret until shutdown: read (made or
/// renewed as due) at once and every [`REFRESH_INTERVAL`]; while nothing could be loaded yet,
/// tried again sooner, and readiness says why.
pub async fn keep_current(
    store: CertificateStore,
    resolver: Arc<CertResolver>,
    ca_bundle: watch::Sender<Option<String>>,
    health: Arc<Health>,
    shutdown: Shutdown,
) {
    let mut keeper = Keeper {
        resolver,
        ca_bundle,
        health,
        served: None,
        last_error: String::new(),
        retry: Duration::from_secs(1),
    };
    loop {
        let result = store.sync().await.and_then(|m| {
            m.certified_key()
                .map(|k| (m, k))
                .map_err(|why| store.malformed(TLS_CERT_KEY, why))
        });
        let next = match result {
            Ok((material, key)) => keeper.loaded(&material, key),
            Err(e) => keeper.failed(&e),
        };
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep(next) => {}
        }
    }
}

/// What [`keep_current`] publishes to, and what it remembers between reads.
struct Keeper {
    resolver: Arc<CertResolver>,
    ca_bundle: watch::Sender<Option<String>>,
    health: Arc<Health>,
    /// The serving certificate (PEM) served now.
    served: Option<String>,
    last_error: String,
    retry: Duration,
}

impl Keeper {
    /// Serves `key` (of `material`) and publishes its CA bundle; returns when to read again.
    fn loaded(&mut self, material: &Material, key: Arc<CertifiedKey>) -> Duration {
        if self.served.as_deref() != Some(material.tls_cert.as_str()) {
            self.resolver.set(key);
            tracing::info!(
                secret = WEBHOOK_TLS_SECRET,
                "serving the conversion webhook's current certificate"
            );
            self.served = Some(material.tls_cert.clone());
        }
        self.ca_bundle.send_if_modified(|bundle| {
            let changed = bundle.as_deref() != Some(material.ca_bundle.as_str());
            if changed {
                *bundle = Some(material.ca_bundle.clone());
            }
            changed
        });
        self.health.set(Probe::Readiness, READINESS_CHECK, Ok(()));
        self.last_error.clear();
        self.retry = Duration::from_secs(1);
        REFRESH_INTERVAL
    }

    /// Reports `e`; returns when to read again. A certificate loaded before is still served
    /// (and readiness kept): it is read again at the usual interval.
    fn failed(&mut self, e: &CertificateError) -> Duration {
        let message = e.to_string();
        let loaded = self.resolver.is_loaded();
        if message != self.last_error {
            tracing::warn!(error = %message, reason = e.reason(), loaded, "cannot load the conversion webhook's certificate");
            self.last_error.clone_from(&message);
        }
        if loaded {
            return REFRESH_INTERVAL;
        }
        self.health.set(Probe::Readiness, READINESS_CHECK, Err(message));
        let next = self.retry;
        self.retry = (self.retry * 2).min(REFRESH_INTERVAL);
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 24 * 3600;

    fn names() -> Vec<SubjectName> {
        let url: WebhookUrl = "https://127.0.0.1:9443".parse().unwrap();
        wanted_names("pequod-webhook-service", "pequod-system", Some(&url))
    }

    fn facts(not_before: i64, not_after: i64) -> CertificateFacts {
        CertificateFacts {
            not_before,
            not_after,
            names: names(),
        }
    }

    #[test]
    fn the_names_are_the_service_s_and_the_url_s_host() {
        assert_eq!(
            names(),
            [
                SubjectName::Dns("pequod-webhook-service.pequod-system.svc".into()),
                SubjectName::Dns("pequod-webhook-service.pequod-system.svc.cluster.local".into()),
                SubjectName::Ip("127.0.0.1".parse().unwrap()),
            ]
        );
        let url: WebhookUrl = "https://pequod-webhook-service.pequod-system.svc".parse().unwrap();
        assert_eq!(
            wanted_names("pequod-webhook-service", "pequod-system", Some(&url)).len(),
            2,
            "a URL naming the Service adds nothing"
        );
        assert_eq!(wanted_names("s", "ns", None).len(), 2);
    }

    #[test]
    fn a_certificate_is_reissued_when_a_third_of_its_life_is_left() {
        let (start, end) = (0, 90 * DAY);
        assert_eq!(reissue_reason(&facts(start, end), &names(), DAY), None);
        assert_eq!(
            reissue_reason(&facts(start, end), &names(), 60 * DAY),
            None,
            "exactly a third left"
        );
        assert_eq!(
            reissue_reason(&facts(start, end), &names(), 60 * DAY + 1),
            Some(ReissueReason::Expiring { not_after: end })
        );
        assert!(
            reissue_reason(&facts(start, end), &names(), end + 1).is_some(),
            "expired"
        );
        assert!(
            reissue_reason(&facts(end, start), &names(), 0).is_some(),
            "ends before it starts"
        );
    }

    #[test]
    fn a_certificate_for_other_names_is_reissued() {
        let mut other = facts(0, 90 * DAY);
        other.names.pop();
        assert!(matches!(
            reissue_reason(&other, &names(), DAY),
            Some(ReissueReason::Names { .. })
        ));
    }

    #[test]
    fn the_serving_window_is_backdated_a_little_and_ends_with_the_ca() {
        assert_eq!(serving_window(1000, 90 * DAY, i64::MAX), (940, 1000 + 90 * DAY));
        assert_eq!(
            serving_window(1000, 60, i64::MAX),
            (970, 1060),
            "half the validity at most"
        );
        let (start, end) = serving_window(1000, 60, i64::MAX);
        assert_eq!(
            reissue_reason(&facts(start, end), &names(), 1000),
            None,
            "the shortest validity is not due at once"
        );
        assert_eq!(serving_window(1000, 90 * DAY, 5000), (940, 5000));
    }

    #[test]
    fn an_issued_certificate_has_the_names_and_window_and_is_served() {
        let now = jiff::Timestamp::now().as_second();
        let ca = new_ca(now).unwrap();
        let ca_facts = certificate_facts(&ca.cert).unwrap();
        assert_eq!(
            ca_facts.not_after - ca_facts.not_before,
            CA_VALIDITY.as_secs() as i64 + 60
        );
        let serving = issue_serving(&ca.cert, &ca.key, &names(), now, 90 * DAY).unwrap();
        let facts = certificate_facts(&serving.cert).unwrap();
        assert_eq!(facts.names, names());
        assert_eq!((facts.not_before, facts.not_after), (now - 60, now + 90 * DAY));
        let material = Material {
            ca_bundle: ca.cert.clone(),
            ca_key: Some(ca.key.clone()),
            tls_cert: serving.cert,
            tls_key: serving.key,
        };
        assert!(material.certified_key().is_ok());
        assert!(matches!(step(&material, &names(), now), Step::Serve));
        assert!(matches!(
            step(&material, &names(), now + 61 * DAY),
            Step::Reissue(ReissueReason::Expiring { .. })
        ));
        let mut broken = material.clone();
        broken.tls_key = ca.key.clone();
        assert!(matches!(
            step(&broken, &names(), now),
            Step::Reissue(ReissueReason::Unusable(_))
        ));
        assert!(format!("{material:?}").len() < 40, "no PEM in debug output");
    }

    #[test]
    fn the_signing_ca_is_found_in_a_bundle_by_its_key() {
        let now = jiff::Timestamp::now().as_second();
        let (old, ca) = (new_ca(now).unwrap(), new_ca(now).unwrap());
        let bundle = format!("{}{}", old.cert, ca.cert);
        let serving = issue_serving(&bundle, &ca.key, &names(), now, DAY).unwrap();
        // Verify the chain: the serving certificate is signed by `ca`.
        let ca_der = first_certificate(&ca.cert).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca_der.as_ref()).unwrap();
        let leaf_der = first_certificate(&serving.cert).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der.as_ref()).unwrap();
        assert_eq!(leaf.issuer(), ca_cert.subject());
        assert!(leaf.verify_signature(Some(ca_cert.public_key())).is_ok());
        let stranger = new_ca(now).unwrap();
        assert!(issue_serving(&old.cert, &stranger.key, &names(), now, DAY).is_err());
    }

    /// An apiserver that knows one Secret, for [`CertificateStore::sync`]: GET, POST (409 when
    /// it exists) and PUT (409 unless the resourceVersion is the stored one). It can hide the
    /// Secret from the next GET and answer the next PUT with a conflict, as a replica writing
    /// at the same moment would make it.
    mod fake_apiserver {
        use std::sync::{Arc, Mutex};

        use axum::Json;
        use axum::extract::State;
        use axum::http::StatusCode;
        use axum::routing::get;
        use serde_json::{Value, json};

        #[derive(Default)]
        pub struct Fake {
            pub secret: Option<Value>,
            pub version: u64,
            pub hide_next_get: bool,
            pub conflict_next_put: bool,
            pub writes: usize,
        }

        pub type Shared = Arc<Mutex<Fake>>;

        fn status(code: StatusCode, reason: &str) -> (StatusCode, Json<Value>) {
            let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": reason, "reason": reason, "code": code.as_u16()});
            (code, Json(body))
        }

        async fn read(State(fake): State<Shared>) -> (StatusCode, Json<Value>) {
            let mut fake = fake.lock().unwrap();
            match fake.secret.clone() {
                Some(_) if std::mem::take(&mut fake.hide_next_get) => status(StatusCode::NOT_FOUND, "NotFound"),
                Some(secret) => (StatusCode::OK, Json(secret)),
                None => status(StatusCode::NOT_FOUND, "NotFound"),
            }
        }

        async fn create(State(fake): State<Shared>, Json(mut secret): Json<Value>) -> (StatusCode, Json<Value>) {
            let mut fake = fake.lock().unwrap();
            if fake.secret.is_some() {
                return status(StatusCode::CONFLICT, "AlreadyExists");
            }
            fake.version += 1;
            fake.writes += 1;
            secret["metadata"]["resourceVersion"] = json!(fake.version.to_string());
            fake.secret = Some(secret.clone());
            (StatusCode::CREATED, Json(secret))
        }

        async fn replace(State(fake): State<Shared>, Json(mut secret): Json<Value>) -> (StatusCode, Json<Value>) {
            let mut fake = fake.lock().unwrap();
            if std::mem::take(&mut fake.conflict_next_put) {
                // Another replica's write lands first.
                fake.version += 1;
                let version = fake.version.to_string();
                if let Some(stored) = fake.secret.as_mut() {
                    stored["metadata"]["resourceVersion"] = json!(version);
                }
            }
            let stored = fake.secret.as_ref().map(|s| s["metadata"]["resourceVersion"].clone());
            if stored != Some(secret["metadata"]["resourceVersion"].clone()) {
                return status(StatusCode::CONFLICT, "Conflict");
            }
            fake.version += 1;
            fake.writes += 1;
            secret["metadata"]["resourceVersion"] = json!(fake.version.to_string());
            fake.secret = Some(secret.clone());
            (StatusCode::OK, Json(secret))
        }

        /// The fake's state and a client of it.
        pub async fn start() -> (Shared, kube::Client) {
            let fake = Shared::default();
            let router = axum::Router::new()
                .route("/api/v1/namespaces/ns/secrets", axum::routing::post(create))
                .route(
                    "/api/v1/namespaces/ns/secrets/pequod-webhook-tls",
                    get(read).put(replace),
                )
                .with_state(fake.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, router).await });
            let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
            (fake, client)
        }
    }

    fn store(client: &Client, url: &str) -> CertificateStore {
        let url: WebhookUrl = url.parse().unwrap();
        let names = wanted_names("pequod-webhook-service", "ns", Some(&url));
        CertificateStore::new(client.clone(), "ns", names, Duration::from_secs(90 * 24 * 3600))
    }

    #[tokio::test]
    async fn the_first_replica_makes_the_secret_and_the_others_read_it() {
        let (fake, client) = fake_apiserver::start().await;
        let first = store(&client, "https://127.0.0.1:9443").sync().await.unwrap();
        let secret: Secret = serde_json::from_value(fake.lock().unwrap().secret.clone().unwrap()).unwrap();
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        let keys: Vec<&str> = secret.data.as_ref().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, [CA_CERT_KEY, CA_KEY_KEY, TLS_CERT_KEY, TLS_KEY_KEY]);
        assert_eq!(Material::of(&secret, "ns").unwrap(), first);
        assert_eq!(certificate_facts(&first.tls_cert).unwrap().names, names_of_ns());

        // Another replica that missed the Secret is refused its own (AlreadyExists) and reads it.
        fake.lock().unwrap().hide_next_get = true;
        let second = store(&client, "https://127.0.0.1:9443").sync().await.unwrap();
        assert_eq!(second, first);
        assert_eq!(fake.lock().unwrap().writes, 1, "nothing written but the first Secret");
    }

    fn names_of_ns() -> Vec<SubjectName> {
        let url: WebhookUrl = "https://127.0.0.1:9443".parse().unwrap();
        wanted_names("pequod-webhook-service", "ns", Some(&url))
    }

    #[tokio::test]
    async fn other_names_reissue_the_certificate_with_the_same_ca_despite_a_conflict() {
        let (fake, client) = fake_apiserver::start().await;
        let first = store(&client, "https://127.0.0.1:9443").sync().await.unwrap();
        fake.lock().unwrap().conflict_next_put = true;
        let moved = store(&client, "https://pequod.example.com").sync().await.unwrap();
        assert_eq!(moved.ca_bundle, first.ca_bundle, "the same CA");
        assert_eq!(moved.ca_key, first.ca_key);
        assert_ne!(moved.tls_cert, first.tls_cert);
        assert_ne!(moved.tls_key, first.tls_key);
        assert!(
            certificate_facts(&moved.tls_cert)
                .unwrap()
                .names
                .contains(&SubjectName::Dns("pequod.example.com".into()))
        );
        let stored: Secret = serde_json::from_value(fake.lock().unwrap().secret.clone().unwrap()).unwrap();
        assert_eq!(Material::of(&stored, "ns").unwrap(), moved);
        assert_eq!(
            fake.lock().unwrap().writes,
            2,
            "the create, then one update after the conflict"
        );
    }

    #[test]
    fn a_secret_without_a_ca_bundle_is_malformed() {
        let secret = Secret::default();
        let err = Material::of(&secret, "ns").unwrap_err();
        assert_eq!(err.reason(), "MalformedSecret");
        assert!(err.to_string().contains("ca.crt is missing"), "{err}");
    }
}
