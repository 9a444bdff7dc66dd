//! Resolving a Transform's `cueRef` to module files: embedded, inline, ConfigMap, git and
//! OCI sources. Remote sources go through a per-host circuit breaker and the module cache.

pub mod archive;
pub mod breaker;
pub mod cache;
pub mod credentials;
pub mod git;
pub mod guard;
pub mod oci;
pub mod policy;
pub mod reference;

use crate::api::names::CUE_MODULE_LABEL;
use crate::error::ErrorCategory;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};

use self::archive::{ArchiveError, ArchiveFormat};
use self::breaker::Breakers;
use self::cache::ModuleCache;
use self::credentials::{CredentialsError, GitCredentials, RegistryCredentials};
use self::git::{Git, GitError};
use self::oci::{OciError, Registries};
use self::reference::{GitReference, GitRevision, ModulePath, OciReference, ReferenceError};
use crate::api::{CueRef, CueRefType};
use crate::cue::{ModuleError, ModuleFiles};
use crate::metrics::Metrics;

/// Why a module could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("ConfigMap {namespace}/{name} not found")]
    ConfigMapNotFound { namespace: String, name: String },
    #[error("ConfigMap {namespace}/{name} is not labelled {CUE_MODULE_LABEL}=\"true\"")]
    ConfigMapNotLabelled { namespace: String, name: String },
    #[error("ConfigMap {namespace}/{name}: {source}")]
    ConfigMapContent {
        namespace: String,
        name: String,
        #[source]
        source: ModuleError,
    },
    #[error("reading {what} {namespace}/{name}: {source}")]
    Kube {
        what: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("{0}")]
    Module(#[from] ModuleError),
    #[error("{0}")]
    Reference(#[from] ReferenceError),
    #[error("pull Secret {namespace}/{name} not found")]
    SecretNotFound { namespace: String, name: String },
    #[error("{0}")]
    Credentials(#[from] CredentialsError),
    #[error("{0}")]
    Git(#[from] GitError),
    #[error("{0}")]
    Oci(#[from] OciError),
    #[error("{what}: {source}")]
    Archive {
        what: String,
        #[source]
        source: ArchiveError,
    },
    #[error("{0}")]
    NotAllowed(String),
    #[error("cannot start the connection guard: {0}")]
    Guard(String),
    #[error("{host} is not asked for {retry_in}s after {failures} failures in a row; last error: {last_error}")]
    CircuitOpen {
        host: String,
        failures: u32,
        retry_in: u64,
        last_error: String,
    },
}

impl ErrorCategory for SourceError {
    fn reason(&self) -> &'static str {
        match self {
            Self::Reference(_) => "InvalidReference",
            Self::SecretNotFound { .. } | Self::Credentials(_) => "PullSecretInvalid",
            Self::Archive { .. } | Self::Module(_) | Self::ConfigMapContent { .. } => "InvalidModule",
            Self::CircuitOpen { .. } => "CircuitOpen",
            Self::NotAllowed(_) => "SourceNotAllowed",
            _ => "CueFetchFailed",
        }
    }

    /// An unreachable or failing remote, an open circuit, or a pull Secret not created yet.
    fn is_transient(&self) -> bool {
        self.is_remote_failure() || matches!(self, Self::CircuitOpen { .. } | Self::SecretNotFound { .. })
    }
}

impl SourceError {
    /// Whether the remote could not be reached or failed on its side: this counts towards
    /// its host's circuit breaker and lets a cached resolution stand in. A refusal (bad
    /// credentials, unknown tag) does neither: it is the reference's problem, not the host's.
    fn is_remote_failure(&self) -> bool {
        match self {
            Self::Git(GitError::Timeout { .. }) | Self::Oci(OciError::Timeout { .. }) => true,
            Self::Git(GitError::Failed { unavailable, .. }) | Self::Oci(OciError::Registry { unavailable, .. }) => {
                *unavailable
            }
            _ => false,
        }
    }
}

/// A fetched module and what it was resolved to.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub files: ModuleFiles,
    /// Label in metrics and messages: module, ConfigMap or repository name.
    pub platform: String,
    /// What the reference resolved to: the manifest digest (OCI), the commit (git), or the
    /// files' own digest (embedded, inline, ConfigMap).
    pub digest: String,
    /// Set when the remote could not be asked and a cached resolution was used instead.
    pub stale: Option<String>,
    /// Whether the reference may point at other content later without a change to the
    /// Transform or a watched object (a tag or a branch), so it must be looked at again.
    pub moves: bool,
}

/// Settings of remote fetching.
#[derive(Debug, Clone)]
pub struct FetcherConfig {
    /// `PEQUOD_CACHE_DIR`; remote modules go to `<cache_dir>/sources`.
    pub cache_dir: PathBuf,
    pub max_cache_bytes: u64,
    /// How long a tag or branch resolution may stand in when the remote cannot be asked.
    pub resolution_ttl: Duration,
    pub git_binary: PathBuf,
    /// Registries (and git servers) reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Whether `file://` repositories may be fetched.
    pub allow_local: bool,
    /// Bound on one remote operation.
    pub timeout: Duration,
    /// How often a tag or branch is resolved again.
    pub poll_interval: Duration,
}

impl FetcherConfig {
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            max_cache_bytes: 100 * 1024 * 1024,
            resolution_ttl: Duration::from_secs(24 * 3600),
            git_binary: PathBuf::from("git"),
            insecure_registries: Vec::new(),
            allow_local: false,
            timeout: Duration::from_secs(60),
            poll_interval: Duration::from_secs(600),
        }
    }
}

/// Fetches modules for the Transform controller and the conversion webhook. Cheap to clone:
/// clones share the cache and the circuit breakers.
#[derive(Clone)]
pub struct Fetcher {
    client: Client,
    poll_interval: Duration,
    cache: Arc<ModuleCache>,
    breakers: Arc<Breakers>,
    git: Git,
    registries: Registries,
    policy: policy::SourcePolicy,
}

/// A pull Secret as read: `namespace/name`, its annotations and its data.
struct PullSecret {
    name: String,
    annotations: std::collections::BTreeMap<String, String>,
    data: std::collections::BTreeMap<String, k8s_openapi::ByteString>,
}

/// One remote module: where to ask, how to name it, and how to get it.
struct Remote<'a> {
    kind: &'static str,
    /// The pull Secret the module is fetched with (`namespace/name`), or empty.
    credentials: String,
    host: String,
    target: Target,
    path: &'a ModulePath,
}

/// What a reference names.
enum Target {
    /// A digest or commit: known without asking the remote.
    Pinned(String),
    /// A tag or branch, by its identity in resolution records.
    Floating(String),
}

impl Remote<'_> {
    fn floating(&self) -> Option<&str> {
        match &self.target {
            Target::Floating(identity) => Some(identity),
            Target::Pinned(_) => None,
        }
    }
}

impl Fetcher {
    pub fn new(client: Client, config: FetcherConfig, metrics: Arc<Metrics>) -> Self {
        let root = config.cache_dir.join("sources");
        // Scratch repositories of git operations a process did not finish (it died).
        if let Ok(entries) = std::fs::read_dir(root.join("work")) {
            for entry in entries.flatten() {
                cache::remove_abandoned(&entry.path());
            }
        }
        let policy = policy::SourcePolicy {
            allow_local: config.allow_local,
            insecure_hosts: config.insecure_registries.clone(),
        };
        Self {
            client,
            policy,
            poll_interval: config.poll_interval,
            cache: Arc::new(ModuleCache::open(
                &root,
                config.max_cache_bytes,
                config.resolution_ttl,
                metrics,
            )),
            breakers: Arc::default(),
            git: Git {
                binary: config.git_binary,
                work_root: root.join("work"),
                timeout: config.timeout,
            },
            registries: Registries {
                insecure: config.insecure_registries,
                timeout: config.timeout,
                proxy: None,
            },
        }
    }

    /// How often a tag or branch should be resolved again to notice that it moved.
    pub fn poll_interval(&self) -> Duration {
        self.poll_interval
    }

    /// Fetches the module `cue_ref` points at. ConfigMaps and pull Secrets are read in
    /// `namespace` (the Transform's).
    pub async fn fetch(&self, cue_ref: &CueRef, namespace: &str, transform_name: &str) -> Result<Fetched, SourceError> {
        let local = |files: ModuleFiles, platform: String| Fetched {
            digest: files.digest(),
            files,
            platform,
            stale: None,
            moves: false,
        };
        match cue_ref.type_ {
            CueRefType::Embedded => Ok(local(ModuleFiles::embedded(&cue_ref.ref_)?, cue_ref.ref_.clone())),
            CueRefType::Inline => Ok(local(ModuleFiles::inline(&cue_ref.ref_)?, transform_name.to_string())),
            CueRefType::Configmap => {
                let files = self.config_map(&cue_ref.ref_, namespace).await?;
                Ok(local(files, cue_ref.ref_.clone()))
            }
            CueRefType::Git => self.fetch_git(cue_ref, namespace).await,
            CueRefType::Oci => self.fetch_oci(cue_ref, namespace).await,
        }
    }

    async fn config_map(&self, name: &str, namespace: &str) -> Result<ModuleFiles, SourceError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let cm = api
            .get_opt(name)
            .await
            .map_err(|source| SourceError::Kube {
                what: "ConfigMap",
                namespace: namespace.into(),
                name: name.into(),
                source: Box::new(source),
            })?
            .ok_or_else(|| SourceError::ConfigMapNotFound {
                namespace: namespace.into(),
                name: name.into(),
            })?;
        let labelled = cm
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(CUE_MODULE_LABEL))
            .is_some_and(|v| v == "true");
        if !labelled {
            return Err(SourceError::ConfigMapNotLabelled {
                namespace: namespace.into(),
                name: name.into(),
            });
        }
        ModuleFiles::from_config_map_data(&cm.data.unwrap_or_default()).map_err(|source| {
            SourceError::ConfigMapContent {
                namespace: namespace.into(),
                name: name.into(),
                source,
            }
        })
    }

    /// The pull Secret, if the reference names one.
    async fn secret_data(&self, cue_ref: &CueRef, namespace: &str) -> Result<Option<PullSecret>, SourceError> {
        let Some(secret) = &cue_ref.pull_secret_ref else {
            return Ok(None);
        };
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let found = api
            .get_opt(&secret.name)
            .await
            .map_err(|source| SourceError::Kube {
                what: "Secret",
                namespace: namespace.into(),
                name: secret.name.clone(),
                source: Box::new(source),
            })?
            .ok_or_else(|| SourceError::SecretNotFound {
                namespace: namespace.into(),
                name: secret.name.clone(),
            })?;
        Ok(Some(PullSecret {
            name: format!("{namespace}/{}", secret.name),
            annotations: found.metadata.annotations.unwrap_or_default(),
            data: found.data.unwrap_or_default(),
        }))
    }

    async fn fetch_git(&self, cue_ref: &CueRef, namespace: &str) -> Result<Fetched, SourceError> {
        let reference = GitReference::parse(&cue_ref.ref_)?;
        if let Some(why) = self.policy.refuse_git(&reference.url) {
            return Err(SourceError::NotAllowed(why));
        }
        let endpoint = policy::git_endpoint(&reference.url)
            .ok_or_else(|| SourceError::Reference(ReferenceError::Git(reference.url.clone())))?;
        if let Some(why) = guard::refuse_resolved(&endpoint.host).await {
            return Err(SourceError::NotAllowed(why));
        }
        let path = ModulePath::parse(cue_ref.path.as_deref())?;
        let (credentials, auth) = match self.secret_data(cue_ref, namespace).await? {
            Some(secret) => {
                let auth = credentials::git(&secret.name, &secret.data)?;
                if matches!(auth, GitCredentials::Basic { .. }) {
                    credentials::bound_to_host(&secret.name, &secret.annotations, &reference.host())?;
                }
                (secret.name, auth)
            }
            None => (String::new(), GitCredentials::Anonymous),
        };
        let remote = Remote {
            kind: "git",
            credentials,
            host: reference.host(),
            target: match &reference.revision {
                GitRevision::Commit(sha) => Target::Pinned(sha.clone()),
                GitRevision::Head => Target::Floating(format!("git:{}", reference.display_url())),
                GitRevision::Named(name) => Target::Floating(format!("git:{}?ref={name}", reference.display_url())),
            },
            path: &path,
        };
        let platform = platform_of_repository(&reference.display_url(), &path);
        let fetch_revision = match &reference.revision {
            GitRevision::Commit(sha) => sha.clone(),
            GitRevision::Head => "HEAD".to_string(),
            GitRevision::Named(name) => name.clone(),
        };
        let guard = start_guard().await?;
        let guard = &guard;
        let (reference, endpoint, path, auth) = (&reference, &endpoint, &path, &auth);
        self.remote(
            &remote,
            platform,
            || async move {
                let route = git_route(reference, endpoint, guard).await?;
                let resolved = self.git.resolve(reference, &route, auth).await;
                resolved.map_err(|e| checked(e.into(), guard))
            },
            |_| async move {
                let route = git_route(reference, endpoint, guard).await?;
                let fetched = self.git.fetch(reference, &route, &fetch_revision, path, auth).await;
                let (sha, tar) = fetched.map_err(|e| checked(e.into(), guard))?;
                Ok((sha, ArchiveFormat::Tar, tar))
            },
        )
        .await
    }

    async fn fetch_oci(&self, cue_ref: &CueRef, namespace: &str) -> Result<Fetched, SourceError> {
        let reference = OciReference::parse(&cue_ref.ref_)?;
        if let Some(why) = self.policy.refuse_registry(&reference.registry) {
            return Err(SourceError::NotAllowed(why));
        }
        if let Some(why) = guard::refuse_resolved(&reference.registry).await {
            return Err(SourceError::NotAllowed(why));
        }
        let path = ModulePath::parse(cue_ref.path.as_deref())?;
        let (credentials, auth) = match self.secret_data(cue_ref, namespace).await? {
            Some(secret) => {
                let auth = credentials::registry(&secret.name, &secret.data, &reference.registry)?;
                if !secret.data.contains_key(".dockerconfigjson") {
                    credentials::bound_to_host(&secret.name, &secret.annotations, &reference.registry)?;
                }
                (secret.name, auth)
            }
            None => (String::new(), RegistryCredentials::Anonymous),
        };
        let auth = &auth;
        let remote = Remote {
            kind: "oci",
            credentials,
            host: reference.host(),
            target: match &reference.digest {
                Some(digest) => Target::Pinned(digest.clone()),
                None => Target::Floating(format!("oci:{reference}")),
            },
            path: &path,
        };
        let platform = reference.repository.clone();
        let guard = start_guard().await?;
        let guard = &guard;
        let registries = &Registries {
            proxy: Some(guard.proxy_url()),
            ..self.registries.clone()
        };
        self.remote(
            &remote,
            platform,
            || async {
                let resolved = registries.resolve(&reference.to_client_reference(None), auth).await;
                resolved.map_err(|e| checked(e.into(), guard))
            },
            |digest: String| {
                let pinned = reference.to_client_reference(Some(&digest));
                async move {
                    let pulled = registries.pull(&pinned, auth).await;
                    pulled.map_err(|e| checked(e.into(), guard))
                }
            },
        )
        .await
    }

    /// Resolution and fetch shared by git and OCI: ask the remote (unless its circuit is
    /// open) what a tag or branch points at, serve that digest from the cache or download it.
    /// A pinned digest in the cache needs no remote at all.
    /// When the remote cannot be asked, a resolution younger than the TTL whose module is
    /// cached stands in, marked stale.
    async fn remote<R, RF, D, DF>(
        &self,
        remote: &Remote<'_>,
        platform: String,
        resolve: R,
        download: D,
    ) -> Result<Fetched, SourceError>
    where
        R: FnOnce() -> RF,
        RF: Future<Output = Result<String, SourceError>>,
        D: FnOnce(String) -> DF,
        DF: Future<Output = Result<(String, ArchiveFormat, Vec<u8>), SourceError>>,
    {
        let resolved = match &remote.target {
            Target::Pinned(digest) => digest.clone(),
            Target::Floating(identity) => match self.ask(&remote.host, resolve).await {
                Ok(digest) => {
                    self.cache.record_resolution(identity, &digest, SystemTime::now());
                    digest
                }
                Err(error) => return self.stand_in(remote, platform, error),
            },
        };
        let key = ModuleCache::key(remote.kind, &resolved, remote.path.as_str(), &remote.credentials);
        if let Some(files) = self.cache.get(&key) {
            return Ok(Fetched {
                files,
                platform,
                digest: resolved,
                stale: None,
                moves: remote.floating().is_some(),
            });
        }
        let (digest, format, bytes) = self.ask(&remote.host, || download(resolved.clone())).await?;
        let what = format!("{} {digest}", remote.kind);
        let files = archive::module_files(format, &bytes, remote.path, &what)
            .map_err(|source| SourceError::Archive { what, source })?;
        // A tag may have moved between resolving and fetching: file under what was fetched.
        if let Some(floating) = remote.floating()
            && digest != resolved
        {
            self.cache.record_resolution(floating, &digest, SystemTime::now());
        }
        let key = ModuleCache::key(remote.kind, &digest, remote.path.as_str(), &remote.credentials);
        if let Err(e) = self.cache.put(&key, &files) {
            tracing::warn!(error = %e, key, "cannot cache module; it is fetched again next time");
        }
        Ok(Fetched {
            files,
            platform,
            digest,
            stale: None,
            moves: remote.floating().is_some(),
        })
    }

    /// Runs a remote operation through `host`'s circuit breaker.
    async fn ask<T, F, Fut>(&self, host: &str, operation: F) -> Result<T, SourceError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, SourceError>>,
    {
        self.breakers
            .check(host, Instant::now())
            .map_err(|open| SourceError::CircuitOpen {
                host: open.host,
                failures: open.failures,
                retry_in: open.retry_in.as_secs().max(1),
                last_error: open.last_error,
            })?;
        let result = operation().await;
        match &result {
            Ok(_) => self.breakers.success(host),
            Err(e) if e.is_remote_failure() => self.breakers.failure(host, &e.to_string(), Instant::now()),
            Err(_) => {}
        }
        result
    }

    fn stand_in(&self, remote: &Remote<'_>, platform: String, error: SourceError) -> Result<Fetched, SourceError> {
        let reachable_failure = error.is_remote_failure() || matches!(error, SourceError::CircuitOpen { .. });
        let Some(floating) = remote.floating().filter(|_| reachable_failure) else {
            return Err(error);
        };
        let Some((resolution, age)) = self.cache.last_resolution(floating, SystemTime::now()) else {
            return Err(error);
        };
        let key = ModuleCache::key(
            remote.kind,
            &resolution.digest,
            remote.path.as_str(),
            &remote.credentials,
        );
        let Some(files) = self.cache.get(&key) else {
            return Err(error);
        };
        Ok(Fetched {
            files,
            platform,
            stale: Some(format!(
                "{error}; serving {} as resolved {} min ago",
                resolution.digest,
                age.as_secs() / 60
            )),
            digest: resolution.digest,
            moves: true,
        })
    }
}

async fn start_guard() -> Result<guard::Guard, SourceError> {
    guard::Guard::start()
        .await
        .map_err(|e| SourceError::Guard(e.to_string()))
}

/// How git reaches `endpoint`: http(s) through the guard, ssh and `git://` at an address
/// checked here, so that git never resolves the name itself.
async fn git_route(
    reference: &GitReference,
    endpoint: &policy::GitEndpoint,
    guard: &guard::Guard,
) -> Result<git::Route, SourceError> {
    let url = &reference.url;
    let default_port = match endpoint.transport {
        policy::GitTransport::Local => return Ok(git::Route::direct(url)),
        policy::GitTransport::Https | policy::GitTransport::Http => {
            return Ok(git::Route::through_proxy(url, &guard.proxy_url()));
        }
        policy::GitTransport::Ssh => 22,
        policy::GitTransport::Daemon => 9418,
    };
    let addresses = guard::resolve_checked(&endpoint.host, endpoint.port.unwrap_or(default_port))
        .await
        .map_err(|unchecked| match unchecked {
            guard::Unchecked::Refused(why) => SourceError::NotAllowed(why),
            other => SourceError::Git(GitError::Failed {
                operation: "connect",
                url: reference.display_url(),
                message: other.to_string(),
                unavailable: true,
            }),
        })?;
    // Checked and not empty; ssh and git take one address.
    let address = addresses
        .first()
        .map(std::net::SocketAddr::ip)
        .ok_or_else(|| SourceError::NotAllowed(format!("{} has no address to connect to", endpoint.host)))?;
    let route = match endpoint.transport {
        policy::GitTransport::Daemon => git::Route::daemon_pinned(url, endpoint.port, address),
        _ => Some(git::Route::ssh_pinned(url, &endpoint.host, endpoint.port, address)),
    };
    route.ok_or_else(|| SourceError::Reference(ReferenceError::Git(url.clone())))
}

/// A fetch's error as the guard saw it: a refused connection is the reason the fetch failed,
/// and a host the guard could not reach is named (clients only see the proxy's error).
fn checked(error: SourceError, guard: &guard::Guard) -> SourceError {
    if let Some(why) = guard.refusal() {
        return SourceError::NotAllowed(why);
    }
    let Some(failure) = guard.failure() else {
        return error;
    };
    match error {
        SourceError::Git(GitError::Failed {
            operation,
            url,
            message,
            ..
        }) => SourceError::Git(GitError::Failed {
            operation,
            url,
            message: format!("{message} ({failure})"),
            unavailable: true,
        }),
        SourceError::Oci(OciError::Registry {
            operation,
            reference,
            message,
            ..
        }) => SourceError::Oci(OciError::Registry {
            operation,
            reference,
            message: format!("{message} ({failure})"),
            unavailable: true,
        }),
        other => other,
    }
}

/// Metrics label of a git module: the repository name and the folder.
fn platform_of_repository(url: &str, path: &ModulePath) -> String {
    let name = url
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or(url)
        .trim_end_matches(".git");
    if path.as_str().is_empty() {
        name.to_string()
    } else {
        format!("{name}/{}", path.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oci_ref(reference: &str) -> CueRef {
        CueRef {
            type_: CueRefType::Oci,
            ref_: reference.to_string(),
            path: None,
            pull_secret_ref: None,
        }
    }

    /// A fetcher whose registry and apiserver are the discard port, where nothing listens:
    /// every request is refused at once. The temporary folder is its cache.
    fn unreachable_fetcher() -> (&'static str, tempfile::TempDir, Fetcher) {
        let host = "127.0.0.1:9";
        let cache = tempfile::tempdir().unwrap();
        let mut config = FetcherConfig::new(cache.path());
        config.insecure_registries = vec![host.to_string()];
        let client = Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        (
            host,
            cache,
            Fetcher::new(client, config, Arc::new(Metrics::new().unwrap())),
        )
    }

    #[tokio::test]
    async fn a_module_fetched_with_a_pull_secret_is_not_served_to_a_transform_without_it() {
        let (host, _cache, fetcher) = unreachable_fetcher();
        let files = ModuleFiles::inline("package m\n#Input: {}\n").unwrap();
        let digest = format!("sha256:{}", "c".repeat(64));
        fetcher
            .cache
            .put(&ModuleCache::key("oci", &digest, "", "team/pull"), &files)
            .unwrap();
        // Naming the private module's digest is not enough: the registry must be asked, and
        // here it cannot be.
        let pinned = oci_ref(&format!("{host}/private/m@{digest}"));
        let err = fetcher.fetch(&pinned, "other", "t").await.unwrap_err();
        assert!(err.is_remote_failure(), "{err}");
    }

    #[tokio::test]
    async fn an_open_circuit_fails_fast_yet_cached_digests_and_recent_resolutions_still_serve() {
        let (host, _cache, fetcher) = unreachable_fetcher();
        let files = ModuleFiles::inline("package m\n#Input: {}\n").unwrap();
        let digest = format!("sha256:{}", "b".repeat(64));
        fetcher
            .cache
            .put(&ModuleCache::key("oci", &digest, "", ""), &files)
            .unwrap();

        let tag = oci_ref(&format!("{host}/platforms/m:v1"));
        for _ in 0..breaker::FAILURE_THRESHOLD {
            let err = fetcher.fetch(&tag, "ns", "t").await.unwrap_err();
            assert_eq!(err.reason(), "CueFetchFailed", "{err}");
            assert!(err.is_remote_failure(), "{err}");
        }
        let err = fetcher.fetch(&tag, "ns", "t").await.unwrap_err();
        assert_eq!(err.reason(), "CircuitOpen", "{err}");

        // A pinned digest that is cached needs no registry, open circuit or not.
        let pinned = fetcher
            .fetch(&oci_ref(&format!("{host}/platforms/m@{digest}")), "ns", "t")
            .await
            .unwrap();
        assert_eq!(
            (pinned.digest.as_str(), pinned.stale.is_none()),
            (digest.as_str(), true)
        );
        assert_eq!(pinned.files, files);

        // A tag resolved recently stands in, marked stale with the reason.
        fetcher
            .cache
            .record_resolution(&format!("oci:{host}/platforms/m:v1"), &digest, SystemTime::now());
        let stood_in = fetcher.fetch(&tag, "ns", "t").await.unwrap();
        assert_eq!(stood_in.digest, digest);
        let stale = stood_in.stale.unwrap();
        assert!(
            stale.contains("not asked") && stale.contains(&format!("serving {digest}")),
            "{stale}"
        );
    }

    #[tokio::test]
    async fn a_cached_commit_runs_no_git_command() {
        let cache = tempfile::tempdir().unwrap();
        let mut config = FetcherConfig::new(cache.path());
        // Any git command would fail to start.
        config.git_binary = "/nonexistent/git".into();
        let client = Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        let fetcher = Fetcher::new(client, config, Arc::new(Metrics::new().unwrap()));
        let files = ModuleFiles::inline("package m\n#Input: {}\n").unwrap();
        let sha = "0123456789abcdef0123456789abcdef01234567";
        fetcher
            .cache
            .put(&ModuleCache::key("git", sha, "platforms/m", ""), &files)
            .unwrap();
        let pinned = CueRef {
            type_: CueRefType::Git,
            ref_: format!("https://git.example.com/org/platforms.git?ref={sha}"),
            path: Some("platforms/m".into()),
            pull_secret_ref: None,
        };
        let fetched = fetcher.fetch(&pinned, "ns", "t").await.unwrap();
        assert_eq!((fetched.digest.as_str(), fetched.moves), (sha, false));
        assert_eq!(fetched.files, files);

        // A branch must be asked, and that needs git.
        let branch = CueRef {
            ref_: "https://git.example.com/org/platforms.git?ref=main".into(),
            ..pinned
        };
        let err = fetcher.fetch(&branch, "ns", "t").await.unwrap_err();
        assert!(err.to_string().contains("/nonexistent/git"), "{err}");
    }

    #[test]
    fn platform_names_of_repositories() {
        let root = ModulePath::parse(None).unwrap();
        let sub = ModulePath::parse(Some("platforms/web")).unwrap();
        assert_eq!(
            platform_of_repository("https://git.example.com/org/platforms.git", &root),
            "platforms"
        );
        assert_eq!(
            platform_of_repository("git@host:org/mods.git", &sub),
            "mods/platforms/web"
        );
        assert_eq!(platform_of_repository("file:///srv/repo/", &root), "repo");
    }

    #[test]
    fn reasons_are_stable() {
        let e = SourceError::CircuitOpen {
            host: "h".into(),
            failures: 3,
            retry_in: 30,
            last_error: "refused".into(),
        };
        assert_eq!(e.reason(), "CircuitOpen");
        assert!(e.to_string().contains("last error: refused"));
        assert_eq!(
            SourceError::Reference(ReferenceError::Path("..".into())).reason(),
            "InvalidReference"
        );
        assert_eq!(
            SourceError::SecretNotFound {
                namespace: "n".into(),
                name: "s".into()
            }
            .reason(),
            "PullSecretInvalid"
        );
        let timeout = SourceError::Oci(OciError::Timeout {
            operation: "pulling",
            reference: "r".into(),
            seconds: 1,
        });
        assert_eq!(timeout.reason(), "CueFetchFailed");
        assert!(timeout.is_remote_failure());
        let refused = |unavailable| {
            SourceError::Oci(OciError::Registry {
                operation: "pulling",
                reference: "r".into(),
                message: "Not authorized".into(),
                unavailable,
            })
        };
        assert!(!refused(false).is_remote_failure());
        assert!(refused(true).is_remote_failure());
    }
}
