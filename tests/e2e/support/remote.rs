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

fn registry_binary() -> PathBuf {
    std::env::var_os("PEQUOD_TEST_REGISTRY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/docker-registry"))
}

/// Writes a registry configuration (and htpasswd file when `auth`) into `dir`.
fn registry_config(dir: &Path, port: u16, auth: bool) -> PathBuf {
    std::fs::create_dir_all(dir.join("data")).expect("registry folder");
    let mut config = format!(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: pequod-test\n",
        dir.join("data").display()
    );
    if auth {
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

fn wait_listening(addr: &str, what: &str) {
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
}

static SHARED: std::sync::OnceLock<SharedRegistries> = std::sync::OnceLock::new();

pub fn shared_registries() -> &'static SharedRegistries {
    SHARED.get_or_init(|| {
        let cp = control_plane::shared();
        let base = std::env::temp_dir().join(format!("pequod-registries-{}", std::process::id()));
        let start = |name: &'static str, auth: bool| {
            let port = free_port();
            let config = registry_config(&base.join(name), port, auth);
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
            open: start("registry-open", false),
            private: start("registry-private", true),
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
        let config = registry_config(dir.path(), port, false);
        let mut registry = Self {
            addr: format!("127.0.0.1:{port}"),
            config,
            child: None,
            _dir: dir,
        };
        registry.resume();
        registry
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn resume(&mut self) {
        let child = Command::new(registry_binary())
            .arg("serve")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
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
    use oci_client::client::{Config, ImageLayer};
    use oci_client::manifest::OciImageManifest;
    use oci_client::secrets::RegistryAuth;

    let module_file = "module: \"example.com/platforms@v0\"\nlanguage: version: \"v0.9.0\"\n";
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, content) in files.iter().chain([("cue.mod/module.cue", module_file)].iter()) {
        zip.start_file(*name, zip::write::SimpleFileOptions::default()).unwrap();
        zip.write_all(content.as_bytes()).unwrap();
    }
    let zip = zip.finish().unwrap().into_inner();
    let layers = [
        ImageLayer::new(zip, oci::CUE_MODULE_ZIP.to_string(), None),
        ImageLayer::new(module_file.as_bytes().to_vec(), oci::CUE_MODULE_FILE.to_string(), None),
    ];
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
