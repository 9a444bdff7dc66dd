//! Real remote module sources for tests: OCI registries (distribution's `docker-registry` on
//! loopback, with a temporary storage folder) and git repositories (served over `file://`
//! and by `git daemon`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pequod::cue::ModuleFiles;
use pequod::source::credentials::RegistryCredentials;
use pequod::source::oci::{self, Registries};
use pequod::source::reference::OciReference;

use super::{control_plane, free_port};

pub const REGISTRY_USER: &str = "robot";
pub const REGISTRY_PASSWORD: &str = "s3cret-pull";

pub fn registry_binary() -> PathBuf {
    std::env::var_os("PEQUOD_TEST_REGISTRY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/docker-registry"))
}

/// How a test registry authenticates.
#[derive(Clone, Copy)]
enum Auth {
    None,
    Htpasswd,
    /// Bearer tokens from [`TokenServer`] at this port.
    Token(u16),
}

/// Writes a registry configuration (and the htpasswd file or token certificate) into `dir`.
fn registry_config(dir: &Path, port: u16, auth: Auth) -> PathBuf {
    std::fs::create_dir_all(dir.join("data")).expect("registry folder");
    let mut config = format!(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: pequod-test\n",
        dir.join("data").display()
    );
    if let Auth::Token(token_port) = auth {
        config.push_str(&format!(
            "auth:\n  token:\n    realm: http://127.0.0.1:{token_port}/token\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
            dir.join("token.pem").display()
        ));
    }
    if matches!(auth, Auth::Htpasswd) {
        let hash = bcrypt::hash(REGISTRY_PASSWORD, 4).expect("bcrypt");
        std::fs::write(dir.join("htpasswd"), format!("{REGISTRY_USER}:{hash}\n")).expect("htpasswd");
        config.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: pequod-test\n    path: {}\n",
            dir.join("htpasswd").display()
        ));
    }
    let path = dir.join("config.yml");
    std::fs::write(&path, config).expect("registry config");
    path
}

pub fn wait_listening(addr: &str, what: &str) {
    let started = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what} did not listen on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Registries that live as long as the control plane (stopped with it), for the shared operator.
pub struct SharedRegistries {
    /// Anonymous pulls and pushes.
    pub open: String,
    /// htpasswd: pulls and pushes need [`REGISTRY_USER`].
    pub private: String,
    /// Bearer tokens (the flow of Docker Hub, GHCR and most hosted registries): anyone may
    /// pull `public/*`; [`REGISTRY_USER`] may pull and push everything.
    pub token: String,
}

static SHARED: std::sync::OnceLock<SharedRegistries> = std::sync::OnceLock::new();

/// A registry the shared operator reaches (it is in its `--insecure-registries`) that a test
/// may stop and resume, holding the lock meanwhile; and its address.
pub struct OutageRegistry {
    pub addr: String,
    pub registry: tokio::sync::Mutex<Registry>,
}

static OUTAGE: std::sync::OnceLock<OutageRegistry> = std::sync::OnceLock::new();

pub fn outage_registry() -> &'static OutageRegistry {
    OUTAGE.get_or_init(|| {
        // Started from a thread that lives as long as the process: any test may come first.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(Registry::start());
            loop {
                std::thread::park();
            }
        });
        let registry = rx.recv().expect("outage registry");
        OutageRegistry {
            addr: registry.addr.clone(),
            registry: tokio::sync::Mutex::new(registry),
        }
    })
}

pub fn shared_registries() -> &'static SharedRegistries {
    SHARED.get_or_init(|| {
        let cp = control_plane::shared();
        let base = std::env::temp_dir().join(format!("pequod-registries-{}", std::process::id()));
        let start = |name: &'static str, auth: Auth| {
            let port = free_port();
            let dir = base.join(name);
            std::fs::create_dir_all(&dir).expect("registry folder");
            if let Auth::Token(_) = auth {
                std::fs::write(dir.join("token.pem"), &token_server().certificate_pem).expect("token certificate");
            }
            let config = registry_config(&dir, port, auth);
            cp.spawn_process(
                name,
                &registry_binary(),
                &["serve".into(), config.display().to_string()],
                &[],
            );
            let addr = format!("127.0.0.1:{port}");
            wait_listening(&addr, name);
            addr
        };
        SharedRegistries {
            open: start("registry-open", Auth::None),
            private: start("registry-private", Auth::Htpasswd),
            token: start("registry-token", Auth::Token(token_server().port)),
        }
    })
}

/// A registry of a test's own that can be stopped and started again on the same port and
/// storage; stopped when dropped.
pub struct Registry {
    pub addr: String,
    config: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("registry folder");
        let port = free_port();
        let config = registry_config(dir.path(), port, Auth::None);
        let mut registry = Self {
            addr: format!("127.0.0.1:{port}"),
            config,
            child: None,
            _dir: dir,
        };
        registry.resume();
        registry
    }

    /// The folder the registry keeps its repositories in.
    pub fn storage(&self) -> PathBuf {
        self._dir.path().join("data")
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn resume(&mut self) {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(registry_binary());
        command
            .arg("serve")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe. The kernel stops the registry when the thread
        // that started it ends, should the test die before dropping it.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = command.spawn().expect("start docker-registry");
        self.child = Some(child);
        wait_listening(&self.addr, "registry");
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn registries(insecure: &str) -> Registries {
    Registries {
        insecure: vec![insecure.to_string()],
        timeout: Duration::from_secs(30),
        proxy: None,
    }
}

/// Pushes a one-file module (`module.cue`) as Pequod publishes it; returns the manifest digest.
pub async fn publish(registry: &str, repository: &str, tag: &str, source: &str, auth: &RegistryCredentials) -> String {
    let files = ModuleFiles::new(BTreeMap::from([("module.cue".to_string(), source.to_string())])).unwrap();
    let reference = OciReference::parse(&format!("{registry}/{repository}:{tag}")).unwrap();
    registries(registry)
        .publish(&reference.to_client_reference(None), &files, auth)
        .await
        .unwrap_or_else(|e| panic!("publish {reference}: {e}"))
}

/// Pushes a module the way `cue mod publish` lays it out: a zip layer holding the module root
/// (with `cue.mod/module.cue`) and the module file as a second layer. Returns the manifest digest.
pub async fn publish_cue_module(registry: &str, repository: &str, tag: &str, files: &[(&str, &str)]) -> String {
    let module_file = "module: \"example.com/platforms@v0\"\nlanguage: version: \"v0.9.0\"\n";
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, content) in files.iter().chain([("cue.mod/module.cue", module_file)].iter()) {
        zip.start_file(*name, zip::write::SimpleFileOptions::default()).unwrap();
        zip.write_all(content.as_bytes()).unwrap();
    }
    let zip = zip.finish().unwrap().into_inner();
    let layers = vec![
        (zip, oci::CUE_MODULE_ZIP),
        (module_file.as_bytes().to_vec(), oci::CUE_MODULE_FILE),
    ];
    publish_layers(registry, repository, tag, layers).await
}

/// Pushes an artifact of CUE's module media type with `layers` (content, media type) as they
/// are. Returns the manifest digest.
pub async fn publish_layers(registry: &str, repository: &str, tag: &str, layers: Vec<(Vec<u8>, &str)>) -> String {
    use oci_client::client::{Config, ImageLayer};
    use oci_client::manifest::OciImageManifest;
    use oci_client::secrets::RegistryAuth;

    let layers: Vec<ImageLayer> = layers
        .into_iter()
        .map(|(data, media_type)| ImageLayer::new(data, media_type.to_string(), None))
        .collect();
    let config = Config::new(b"{}".to_vec(), oci::CUE_MODULE_ARTIFACT.to_string(), None);
    let mut manifest = OciImageManifest::build(&layers, &config, None);
    manifest.artifact_type = Some(oci::CUE_MODULE_ARTIFACT.to_string());
    let reference: oci_client::Reference = format!("{registry}/{repository}:{tag}").parse().unwrap();
    let client = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    client
        .push(&reference, &layers, config, &RegistryAuth::Anonymous, Some(manifest))
        .await
        .expect("push CUE module artifact");
    client
        .fetch_manifest_digest(&reference, &RegistryAuth::Anonymous)
        .await
        .expect("digest of pushed artifact")
}

/// A git repository in a temporary folder, committed to with the `git` command.
pub struct GitRepo {
    dir: tempfile::TempDir,
}

impl GitRepo {
    /// A new repository inside `base`.
    pub fn new_in(base: &Path) -> Self {
        let repo = Self {
            dir: tempfile::tempdir_in(base).expect("git folder"),
        };
        repo.git(&["init", "--quiet", "--initial-branch=main"]);
        repo
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(["-c", "user.name=Pequod Tests", "-c", "user.email=tests@pequod.invalid"])
            .args(args)
            .current_dir(self.dir.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .expect("run git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Writes `files` (relative paths) and commits them; returns the commit.
    pub fn commit(&self, files: &[(&str, &str)], message: &str) -> String {
        for (name, content) in files {
            let path = self.dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        self.git(&["add", "--all"]);
        self.git(&["commit", "--quiet", "-m", message]);
        self.git(&["rev-parse", "HEAD"])
    }

    pub fn file_url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }

    /// Its folder's name: its path under a [`GitServer`].
    pub fn name(&self) -> String {
        self.dir.path().file_name().unwrap().to_string_lossy().into_owned()
    }
}

/// A folder whose repositories `git daemon` serves at `git://<addr>/<folder name>`, until
/// the control plane stops.
pub struct GitServer {
    pub base: PathBuf,
    pub url: String,
}

static GIT_SERVER: std::sync::OnceLock<GitServer> = std::sync::OnceLock::new();

pub fn git_server() -> &'static GitServer {
    GIT_SERVER.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("pequod-git-{}", std::process::id()));
        std::fs::create_dir_all(&base).expect("git server folder");
        let port = free_port();
        let git = Command::new("sh")
            .args(["-c", "command -v git"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .expect("git on PATH");
        control_plane::shared().spawn_process(
            "git-daemon",
            Path::new(&git),
            &[
                "daemon".into(),
                "--reuseaddr".into(),
                "--export-all".into(),
                "--listen=127.0.0.1".into(),
                format!("--port={port}"),
                format!("--base-path={}", base.display()),
                base.display().to_string(),
            ],
            &[],
        );
        let addr = format!("127.0.0.1:{port}");
        wait_listening(&addr, "git daemon");
        GitServer {
            base,
            url: format!("git://{addr}"),
        }
    })
}

/// Serves `app` on a free loopback port from a thread of its own, for the rest of the process.
fn serve_in_background(app: axum::Router) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    listener.set_nonblocking(true).expect("nonblocking listener");
    let addr = listener.local_addr().expect("listener address");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            axum::serve(listener, app).await.expect("test server");
        });
    });
    addr
}

const TOKEN_SERVICE: &str = "pequod-test-registry";
const TOKEN_ISSUER: &str = "pequod-test-token-server";

/// A registry token server: answers `GET /token?service=..&scope=repository:<name>:<actions>`
/// with a JWT signed by a key whose self-signed certificate the registry trusts.
pub struct TokenServer {
    pub port: u16,
    pub certificate_pem: String,
}

static TOKEN_SERVER: std::sync::OnceLock<TokenServer> = std::sync::OnceLock::new();

fn token_server() -> &'static TokenServer {
    TOKEN_SERVER.get_or_init(|| {
        let generated =
            rcgen::generate_simple_self_signed(vec!["pequod-test-token-server".into()]).expect("certificate");
        let certificate_pem = generated.cert.pem();
        let certificate_der = generated.cert.der().to_vec();
        let rng = ring::rand::SystemRandom::new();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &generated.signing_key.serialize_der(),
            &rng,
        )
        .expect("token signing key");
        let signer = std::sync::Arc::new((key, certificate_der));
        let app = axum::Router::new().route(
            "/token",
            axum::routing::get(move |uri, headers| issue_token(signer.clone(), uri, headers)),
        );
        let port = serve_in_background(app).port();
        TokenServer { port, certificate_pem }
    })
}

async fn issue_token(
    signer: std::sync::Arc<(ring::signature::EcdsaKeyPair, Vec<u8>)>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
) -> Result<axum::Json<serde_json::Value>, axum::http::StatusCode> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

    let user = match headers.get("authorization").and_then(|v| v.to_str().ok()) {
        None => None,
        Some(value) => {
            let decoded = value
                .strip_prefix("Basic ")
                .and_then(|b| STANDARD.decode(b).ok())
                .and_then(|b| String::from_utf8(b).ok());
            match decoded.as_deref().and_then(|d| d.split_once(':')) {
                Some((REGISTRY_USER, REGISTRY_PASSWORD)) => Some(REGISTRY_USER),
                _ => return Err(axum::http::StatusCode::UNAUTHORIZED),
            }
        }
    };
    let query: BTreeMap<String, String> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect();
    let mut access = Vec::new();
    if let Some(scope) = query.get("scope")
        && let Some(("repository", rest)) = scope.split_once(':')
        && let Some((name, actions)) = rest.rsplit_once(':')
    {
        let granted: Vec<&str> = actions
            .split(',')
            .filter(|a| user.is_some() || (*a == "pull" && name.starts_with("public/")))
            .collect();
        access.push(serde_json::json!({"type": "repository", "name": name, "actions": granted}));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [STANDARD.encode(&signer.1)]});
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER, "sub": user.unwrap_or(""), "aud": TOKEN_SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", rand_id()), "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = signer
        .0
        .sign(&ring::rand::SystemRandom::new(), signing_input.as_bytes())
        .map_err(|_| axum::http::StatusCode::INTERNAL_SERVER_ERROR)?;
    let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()));
    Ok(axum::Json(
        serde_json::json!({"token": token, "access_token": token, "expires_in": 300}),
    ))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A token the git HTTP server accepts (with any username).
pub const GIT_TOKEN: &str = "glpat-pequod-test";

/// `git http-backend` behind HTTP basic authentication, serving the [`GitServer`]'s
/// repositories at `http://<addr>/<folder name>`: [`REGISTRY_USER`] with
/// [`REGISTRY_PASSWORD`], or any username with [`GIT_TOKEN`].
pub fn git_http_server() -> &'static str {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        let base = git_server().base.clone();
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| git_cgi(base.clone(), request));
        let addr = serve_in_background(app);
        format!("http://{addr}")
    })
}

async fn git_cgi(base: PathBuf, request: axum::extract::Request) -> axum::response::Response {
    use axum::http::{HeaderValue, StatusCode};
    use axum::response::IntoResponse;
    use base64::Engine;
    use tokio::io::AsyncWriteExt;

    let authorized = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .is_some_and(|d| match d.split_once(':') {
            Some((user, password)) => (user == REGISTRY_USER && password == REGISTRY_PASSWORD) || password == GIT_TOKEN,
            None => false,
        });
    if !authorized {
        let mut response = (StatusCode::UNAUTHORIZED, "authentication required").into_response();
        response.headers_mut().insert(
            "www-authenticate",
            HeaderValue::from_static("Basic realm=\"pequod-test\""),
        );
        return response;
    }
    let headers = request.headers().clone();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let mut command = tokio::process::Command::new("git");
    command
        .arg("http-backend")
        .env("GIT_PROJECT_ROOT", &base)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", request.method().as_str())
        .env("PATH_INFO", request.uri().path())
        .env("QUERY_STRING", request.uri().query().unwrap_or(""))
        .env("CONTENT_TYPE", header("content-type"))
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("GIT_PROTOCOL", header("git-protocol"))
        .env("REMOTE_USER", REGISTRY_USER)
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let body = axum::body::to_bytes(request.into_body(), 64 << 20)
        .await
        .unwrap_or_default();
    let mut child = command.spawn().expect("git http-backend");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let output = child.wait_with_output().await.expect("git http-backend output");
    let _ = writer.await;
    // CGI: headers, a blank line, then the body.
    let out = output.stdout;
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").map(|p| (p, 4));
    let split = split.or_else(|| out.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2)));
    let Some((end, gap)) = split else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "bad CGI output").into_response();
    };
    let mut response = axum::response::Response::new(axum::body::Body::from(out[end + gap..].to_vec()));
    for line in String::from_utf8_lossy(&out[..end]).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split(' ').next().and_then(|c| c.parse().ok()).unwrap_or(500);
            *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        } else if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    response
}

/// `sshd` on loopback accepting one generated key for the current user, so git can fetch
/// the [`GitServer`]'s repositories at `ssh://<user>@<addr><path>`.
pub struct SshServer {
    pub addr: String,
    pub user: String,
    pub private_key: String,
    /// The known_hosts line of the server's host key.
    pub known_hosts: String,
}

pub fn ssh_server() -> &'static SshServer {
    static SERVER: std::sync::OnceLock<SshServer> = std::sync::OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pequod-sshd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("sshd folder");
        for key in ["host", "client"] {
            let status = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(key))
                .status()
                .expect("ssh-keygen");
            assert!(status.success(), "ssh-keygen {key}");
        }
        std::fs::copy(dir.join("client.pub"), dir.join("authorized_keys")).expect("authorized_keys");
        let port = free_port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nAuthorizedKeysFile {keys}\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\nPermitRootLogin prohibit-password\n",
                host = dir.join("host").display(),
                keys = dir.join("authorized_keys").display(),
            ),
        )
        .expect("sshd_config");
        // sshd's privilege-separation folder; only root can (and must) have it.
        let _ = std::fs::create_dir_all("/run/sshd");
        let sshd = std::env::var_os("PEQUOD_TEST_SSHD").map(PathBuf::from).unwrap_or_else(|| "/usr/sbin/sshd".into());
        control_plane::shared().spawn_process(
            "sshd",
            &sshd,
            &["-D".into(), "-e".into(), "-f".into(), config.display().to_string()],
            &[],
        );
        let addr = format!("127.0.0.1:{port}");
        wait_listening(&addr, "sshd");
        let host_key = std::fs::read_to_string(dir.join("host.pub")).expect("host key");
        let host_key: Vec<&str> = host_key.split_whitespace().take(2).collect();
        let user = Command::new("id").arg("-un").output().expect("id -un");
        SshServer {
            addr: addr.clone(),
            user: String::from_utf8_lossy(&user.stdout).trim().to_string(),
            private_key: std::fs::read_to_string(dir.join("client")).expect("client key"),
            known_hosts: format!("[127.0.0.1]:{port} {}", host_key.join(" ")),
        }
    })
}
