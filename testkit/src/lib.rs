//! Pequod's end-to-end test kit: the shared local control plane (with simulated nodes), a
//! fresh namespace per test, the operator, and helpers to apply YAML, wait for conditions and
//! read metrics. The test binaries, the benchmarks and the demo use it.

pub mod control_plane;
pub mod grants;
pub mod instances;
pub mod modules;
pub mod remote;
pub mod restricted;
pub mod transforms;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiCapabilities, ApiResource, Scope};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, Config, ResourceExt};

pub const TEST_MANAGER: &str = "pequod-test";

/// Address of the shared operator's probes and metrics.
pub struct OperatorEndpoints {
    pub metrics: String,
    pub probes: String,
    pub log: PathBuf,
}

static OPERATOR: tokio::sync::OnceCell<OperatorEndpoints> = tokio::sync::OnceCell::const_new();

/// The operator shared by the tests of this binary, started once (with the CRDs installed) and
/// ready when this returns. It serves every test namespace.
pub async fn operator(client: &Client) -> &'static OperatorEndpoints {
    OPERATOR
        .get_or_init(|| async {
            install_crds(client).await;
            let cp = control_plane::shared();
            let metrics = format!("127.0.0.1:{}", free_port());
            let probes = format!("127.0.0.1:{}", free_port());
            let webhook = format!("127.0.0.1:{}", free_port());
            let cue = tool("cue", "PEQUOD_TEST_CUE");
            let cache = std::env::temp_dir().join(format!("pequod-test-cache-{}", std::process::id()));
            let registries = remote::shared_registries();
            let args = vec![
                // The test registries and git daemons listen on loopback ports over plain text;
                // the git repositories are local folders.
                format!(
                    "--insecure-registries={},{},{},{},127.0.0.1",
                    registries.open,
                    registries.private,
                    registries.token,
                    remote::outage_registry().addr
                ),
                "--allow-local-sources".to_string(),
                // Tags and branches are resolved again every few seconds, as tests push.
                "--module-poll-interval=3".to_string(),
                format!("--metrics-bind-address={metrics}"),
                format!("--health-probe-bind-address={probes}"),
                // The apiserver runs on this machine: CRDs name the webhook by its address.
                format!("--webhook-bind-address={webhook}"),
                format!("--webhook-url=https://{webhook}"),
                "--zap-log-level=debug".to_string(),
                // Test namespaces are made per test: trust them all (the default trusts only
                // the operator's own namespace; tests/e2e_restart covers it).
                "--trusted-transform-namespaces=*".to_string(),
                format!("--cue-binary={}", cue.display()),
                format!("--cache-dir={}", cache.display()),
            ];
            let log = cp.spawn_process(
                "pequod",
                &pequod_binary(),
                &args,
                &[("KUBECONFIG", &cp.operator_kubeconfig)],
            );
            let endpoints = OperatorEndpoints { metrics, probes, log };
            wait_for("the operator to be ready", Duration::from_secs(60), || async {
                match http_get(&endpoints.probes, "/readyz").await {
                    Ok((200, body)) => Ok(body),
                    other => Err(format!("{other:?}")),
                }
            })
            .await;
            endpoints
        })
        .await
}

pub async fn client_for(kubeconfig: &Path) -> Result<Client, String> {
    let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| e.to_string())?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Client::try_from(config).map_err(|e| e.to_string())
}

/// A client that reports a 429, 503 or 504 at once instead of retrying it for minutes.
pub async fn client_without_retries(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    config.default_retry = false;
    Client::try_from(config).expect("client")
}

/// A test's view of the cluster: a client and a namespace of its own.
pub struct TestEnv {
    pub client: Client,
    pub namespace: String,
    pub kubeconfig: PathBuf,
    /// The kubeconfig operators under test use (see [`control_plane::OPERATOR_USER`]).
    pub operator_kubeconfig: PathBuf,
    pub external: bool,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Starts (or reuses) the control plane and creates a fresh namespace named after the test.
pub async fn env(test: &str) -> TestEnv {
    let cp = control_plane::shared();
    let client = client_for(&cp.kubeconfig)
        .await
        .expect("client for the test control plane");
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let slug: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let namespace = format!(
        "t-{}-{}-{n}",
        &slug[..slug.len().min(40)].trim_end_matches('-'),
        std::process::id()
    );
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": namespace, "labels": {"pequod.io/test": "true"}},
    }))
    .expect("namespace object");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create test namespace");
    let writer = graph_writer_binding(&namespace);
    apply_yaml(&client, &namespace, &writer).await;
    TestEnv {
        client,
        namespace,
        kubeconfig: cp.kubeconfig.clone(),
        operator_kubeconfig: cp.operator_kubeconfig.clone(),
        external: cp.external,
    }
}

/// Hand-written graphs act as the `default` service account of their namespace. Tests of the
/// executor itself give it every namespaced right in their own namespace, as a namespace
/// owner would; tests of what a graph may not do use accounts of their own.
fn graph_writer_binding(namespace: &str) -> String {
    format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: pequod-test-namespace-owner\n\
         rules:\n- apiGroups: [\"*\"]\n  resources: [\"*\"]\n  verbs: [\"*\"]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: graphs-own-the-namespace\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: pequod-test-namespace-owner}}\n\
         subjects: [{{kind: ServiceAccount, name: default, namespace: {namespace}}}]\n"
    )
}

impl TestEnv {
    /// Deletes the namespace; on a throwaway control plane this is optional.
    pub async fn cleanup(self) {
        let _ = Api::<Namespace>::all(self.client)
            .delete(&self.namespace, &Default::default())
            .await;
    }
}

/// Polls `probe` until it returns Some, or panics after `timeout` naming what was awaited and
/// the last thing observed.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    loop {
        let last = match probe().await {
            Ok(value) => return value,
            Err(observed) => observed,
        };
        if started.elapsed() > timeout {
            control_plane::shared().assert_alive();
            if let Some(endpoints) = OPERATOR.get() {
                let log = std::fs::read_to_string(&endpoints.log).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                eprintln!("last lines of the operator log {}:", endpoints.log.display());
                for line in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("  {line}");
                }
            }
            panic!("timed out after {timeout:?} waiting for {what}; last observed: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Deletes `name` and waits until it is gone (finalizers included).
pub async fn delete_and_wait_gone<K>(api: &Api<K>, name: &str, timeout: Duration)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.delete(name, &Default::default())
        .await
        .unwrap_or_else(|e| panic!("delete {name}: {e}"));
    wait_for(&format!("{name} gone"), timeout, || async {
        match api.get_opt(name).await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(_) => Err("still there".into()),
        }
    })
    .await;
}

/// Resolves a kind through discovery (fresh every call, so kinds registered a moment ago work).
pub async fn resolve(client: &Client, api_version: &str, kind: &str) -> (ApiResource, ApiCapabilities) {
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    };
    let gvk = GroupVersionKind::gvk(group, version, kind);
    kube::discovery::pinned_kind(client, &gvk)
        .await
        .unwrap_or_else(|e| panic!("discover {api_version} {kind}: {e}"))
}

pub async fn dynamic_api(client: &Client, api_version: &str, kind: &str, namespace: &str) -> Api<DynamicObject> {
    let (ar, caps) = resolve(client, api_version, kind).await;
    match caps.scope {
        Scope::Namespaced => Api::namespaced_with(client.clone(), namespace, &ar),
        Scope::Cluster => Api::all_with(client.clone(), &ar),
    }
}

/// The ResourceGraphs of `namespace`, as dynamic objects.
pub async fn graph_api(client: &Client, namespace: &str) -> Api<DynamicObject> {
    dynamic_api(
        client,
        "platform.platform.example.com/v1alpha1",
        "ResourceGraph",
        namespace,
    )
    .await
}

/// Server-side applies every document of `yaml`; namespaced objects without a namespace land
/// in `namespace`.
pub async fn apply_yaml(client: &Client, namespace: &str, yaml: &str) -> Vec<DynamicObject> {
    let mut applied = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value: serde_json::Value = serde::Deserialize::deserialize(doc).expect("valid YAML");
        if value.is_null() {
            continue;
        }
        let obj: DynamicObject = serde_json::from_value(value.clone()).expect("a Kubernetes object");
        let types = obj.types.clone().expect("apiVersion and kind");
        let api = dynamic_api(
            client,
            &types.api_version,
            &types.kind,
            obj.namespace().as_deref().unwrap_or(namespace),
        )
        .await;
        let name = obj.name_any();
        let result = api
            .patch(&name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(&value))
            .await
            .unwrap_or_else(|e| panic!("apply {} {name}: {e}", types.kind));
        applied.push(result);
    }
    applied
}

/// Installs Pequod's CRDs from `pequod crd` and waits until they are Established, and makes the
/// operator's own namespace (where it keeps its graph-signing key).
pub async fn install_crds(client: &Client) {
    let system: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "pequod-system"},
    }))
    .expect("namespace object");
    Api::<Namespace>::all(client.clone())
        .patch(
            "pequod-system",
            &PatchParams::apply(TEST_MANAGER),
            &Patch::Apply(&system),
        )
        .await
        .expect("make namespace pequod-system");
    let out = std::process::Command::new(pequod_binary())
        .arg("crd")
        .output()
        .expect("run pequod crd");
    assert!(
        out.status.success(),
        "pequod crd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).expect("utf-8");
    for doc in serde_yaml::Deserializer::from_str(&yaml) {
        let crd: CustomResourceDefinition = serde::Deserialize::deserialize(doc).expect("a CRD");
        apply_crd(client, &crd).await;
    }
}

/// Applies `crd` and waits until it is Established.
pub async fn apply_crd(client: &Client, crd: &CustomResourceDefinition) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.name_any();
    crds.patch(&name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(crd))
        .await
        .unwrap_or_else(|e| panic!("apply CRD {name}: {e}"));
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(crds, &name, conditions::is_crd_established()),
    )
    .await
    .unwrap_or_else(|_| panic!("CRD {name} not Established within 30s"))
    .unwrap_or_else(|e| panic!("watching CRD {name}: {e}"));
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A plain HTTP/1.0 GET against a local endpoint: (status code, body).
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.map_err(|e| e.to_string())?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("malformed response: {response:.200}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// How [`OperatorProcess::start_with`] starts pequod.
#[derive(Default)]
pub struct Launch {
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Listen on `:PORT` (every interface, IPv6 and IPv4) rather than on 127.0.0.1; the
    /// process's `metrics` and `probes` still name the 127.0.0.1 address.
    pub all_interfaces: bool,
}

/// A pequod process of a test's own (not the shared operator): killed when dropped.
pub struct OperatorProcess {
    child: std::process::Child,
    pub metrics: String,
    pub probes: String,
    /// The conversion webhook's address (`127.0.0.1:PORT`), which it names in CRDs unless the
    /// test gave `--webhook-url` itself.
    pub webhook: String,
    /// Where its output goes.
    pub log: PathBuf,
}

impl OperatorProcess {
    /// Starts pequod against `kubeconfig` on free loopback ports with `cue` and `extra` flags.
    /// A port found free can be taken by another process before pequod binds it: a start that
    /// fails that way is tried again on other ports.
    pub fn start(kubeconfig: &Path, cue: &Path, extra: &[&str]) -> Self {
        Self::start_with(kubeconfig, cue, extra, &Launch::default())
    }

    /// As [`OperatorProcess::start`], with `launch`'s environment and addresses.
    pub fn start_with(kubeconfig: &Path, cue: &Path, extra: &[&str], launch: &Launch) -> Self {
        let mut attempts = 0;
        loop {
            let mut process = Self::spawn(kubeconfig, cue, extra, launch);
            attempts += 1;
            if attempts == 5 || !process.lost_its_port() {
                return process;
            }
        }
    }

    fn spawn(kubeconfig: &Path, cue: &Path, extra: &[&str], launch: &Launch) -> Self {
        let (metrics_port, probes_port) = (free_port(), free_port());
        let metrics = format!("127.0.0.1:{metrics_port}");
        let probes = format!("127.0.0.1:{probes_port}");
        // A test may choose the webhook's address, or where CRDs send conversions.
        let given = extra.iter().find_map(|f| f.strip_prefix("--webhook-bind-address="));
        let webhook = given.map_or_else(|| format!("127.0.0.1:{}", free_port()), str::to_string);
        let mut webhook_flags = Vec::new();
        if given.is_none() {
            webhook_flags.push(format!("--webhook-bind-address={webhook}"));
        }
        if !extra.iter().any(|f| f.starts_with("--webhook-url")) {
            webhook_flags.push(format!("--webhook-url=https://{webhook}"));
        }
        let (metrics_flag, probes_flag) = if launch.all_interfaces {
            (format!(":{metrics_port}"), format!(":{probes_port}"))
        } else {
            (metrics.clone(), probes.clone())
        };
        static STARTED: AtomicU32 = AtomicU32::new(0);
        let log = std::env::temp_dir().join(format!(
            "pequod-operator-{}-{}.log",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::SeqCst)
        ));
        let out = std::fs::File::create(&log).expect("operator log file");
        let err = out.try_clone().expect("operator log file");
        let child = std::process::Command::new(pequod_binary())
            .env("KUBECONFIG", kubeconfig)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .arg(format!("--metrics-bind-address={metrics_flag}"))
            .arg(format!("--health-probe-bind-address={probes_flag}"))
            .args(&webhook_flags)
            .arg("--cue-binary")
            .arg(cue)
            .args(extra)
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start pequod");
        Self {
            child,
            metrics,
            probes,
            webhook,
            log,
        }
    }

    /// Waits until the process listens on its probe port; true when it exited because one of
    /// its ports was taken meanwhile.
    fn lost_its_port(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(&self.probes).is_ok() {
                return false;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                return log.contains("Address already in use");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    /// SIGKILL: no graceful shutdown, as when a node dies.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// CPU time the process has used, user and system, in seconds (from /proc's stat, in
    /// clock ticks of `getconf CLK_TCK`).
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // The fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<f64>().ok()))
            .sum();
        let per_second = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
            .unwrap_or(100.0);
        ticks / per_second
    }

    /// Resident memory from /proc, in MiB.
    pub fn rss_mib(&self) -> f64 {
        status_mib(self.child.id(), "VmRSS")
    }

    /// Peak resident memory from /proc (`VmHWM`), in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        status_mib(self.child.id(), "VmHWM")
    }
}

/// A memory field of `/proc/PID/status`, in MiB (0 when unreadable).
fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

/// CPU seconds (user and system) used so far by every process, by command name (from
/// `/proc/PID/stat`, 100 clock ticks a second).
pub fn cpu_seconds_by_process() -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ... utime stime: fields 14 and 15, counted after the comm's ')'.
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map(|(_, c)| c).unwrap_or_default().to_string();
        let fields: Vec<&str> = tail.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        *out.entry(comm).or_insert(0.0) += (ticks(11) + ticks(12)) / 100.0;
    }
    out
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs kubectl with `kubeconfig` and `args`, feeding it `stdin`; returns its output.
pub fn kubectl_with_input(kubeconfig: &Path, args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = std::process::Command::new(tool("kubectl", "KUBECTL"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kubectl (run `make tools`)");
    child
        .stdin
        .take()
        .expect("kubectl stdin")
        .write_all(stdin.as_bytes())
        .expect("write to kubectl");
    child.wait_with_output().expect("kubectl output")
}

/// Runs kubectl as `user` (impersonated by the test's admin) in the test's namespace, with
/// `stdin`.
pub fn kubectl_as(env: &TestEnv, user: &str, args: &[&str], stdin: &str) -> std::process::Output {
    let args: Vec<&str> = ["--as", user, "-n", env.namespace.as_str()]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    kubectl_with_input(&env.kubeconfig, &args, stdin)
}

/// Path of a client tool installed by `make tools`, overridable through an environment variable.
pub fn tool(name: &str, env: &str) -> PathBuf {
    std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("bin").join(name))
}

/// The repository this kit belongs to.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the test kit lives in the repository")
        .to_path_buf()
}

/// The pequod binary under test: `PEQUOD_BINARY`, else the one cargo built beside the running
/// test, benchmark or demo (`target/<profile>/pequod`, which cargo builds before integration
/// tests and `make demo` builds before the demo).
pub fn pequod_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PEQUOD_BINARY") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the running executable");
    let mut dir = exe.parent().expect("the executable's folder");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("the profile folder");
    }
    let binary = dir.join("pequod");
    assert!(
        binary.exists(),
        "no pequod binary at {}: build it (cargo build) or set PEQUOD_BINARY",
        binary.display()
    );
    binary
}

/// Reasons of the events recorded about `object` in `namespace`.
pub async fn event_reasons(client: &Client, namespace: &str, object: &str) -> Vec<String> {
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), namespace);
    let list = events
        .list(&kube::api::ListParams::default().fields(&format!("involvedObject.name={object}")))
        .await
        .expect("list events");
    list.items.into_iter().filter_map(|e| e.reason).collect()
}

/// Waits until Transform `name` is Ready (its phase, and its Ready condition with reason
/// Ready); a timeout shows its phase and conditions.
pub async fn wait_transform_ready(transforms: &Api<pequod::api::Transform>, name: &str) -> pequod::api::Transform {
    wait_for(&format!("Transform {name} Ready"), Duration::from_secs(120), || async {
        let t = transforms.get(name).await.map_err(|e| e.to_string())?;
        let status = t.status.as_ref();
        let ready = status.is_some_and(|s| {
            s.phase == Some(pequod::api::TransformPhase::Ready)
                && s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.is_true() && c.reason == "Ready")
        });
        if ready {
            Ok(t)
        } else {
            Err(format!(
                "{:?} {:?}",
                status.and_then(|s| s.phase),
                status.map(|s| &s.conditions)
            ))
        }
    })
    .await
}

/// Waits until events with every one of `reasons` were recorded for `object`. Events are sent
/// after the status that goes with them, so a test that saw the status waits for them.
pub async fn wait_events(client: &Client, namespace: &str, object: &str, reasons: &[&str]) {
    wait_for(
        &format!("events {reasons:?} on {object}"),
        Duration::from_secs(60),
        || async {
            let recorded = event_reasons(client, namespace, object).await;
            if reasons.iter().all(|r| recorded.iter().any(|e| e == r)) {
                Ok(())
            } else {
                Err(format!("{recorded:?}"))
            }
        },
    )
    .await;
}

/// A node selector that no node matches until [`admit_pods`] labels one for this namespace:
/// the pods of a Deployment that carries it stay Pending, as on a cluster without room, so
/// that a test can see Pequod wait for the rollout before letting it finish.
pub fn held_pods_selector(namespace: &str) -> serde_json::Value {
    serde_json::json!({ format!("e2e.pequod.io/{namespace}"): "admit" })
}

/// Labels a simulated node so that pods held by [`held_pods_selector`] are scheduled, and
/// then run and become Ready through kwok.
pub async fn admit_pods(client: &Client, namespace: &str) {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let patch = serde_json::json!({"metadata": {"labels": held_pods_selector(namespace)}});
    nodes
        .patch("kwok-node-0", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap_or_else(|e| panic!("label node kwok-node-0 for {namespace}: {e}"));
}

/// Waits until Deployment `name` is Available through the real controllers: ready pods on
/// simulated nodes. Returns its ready replicas.
pub async fn wait_rolled_out(client: &Client, namespace: &str, name: &str) -> i32 {
    let api: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(client.clone(), namespace);
    wait_for(
        &format!("Deployment {name} rolled out"),
        Duration::from_secs(120),
        || async {
            let d = api.get(name).await.map_err(|e| e.to_string())?;
            let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let status = d.status.clone().unwrap_or_default();
            let available = status
                .conditions
                .as_ref()
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Available" && c.status == "True"));
            match status.ready_replicas {
                Some(ready) if available && ready == wanted => Ok(ready),
                _ => Err(format!("{status:?}")),
            }
        },
    )
    .await
}

/// The value of one series on the operator's /metrics (0 when absent).
pub async fn metric(env: &TestEnv, series: &str) -> f64 {
    let endpoints = operator(&env.client).await;
    let (_, text) = http_get(&endpoints.metrics, "/metrics").await.unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Sum of the series on `/metrics` at `addr` whose line starts with `prefix` (a metric name,
/// or a name and the start of its labels); 0 when none or unreachable.
pub async fn metric_sum(addr: &str, prefix: &str) -> f64 {
    let (_, text) = http_get(addr, "/metrics").await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Requests the apiserver has served so far, by `verb resource[ subresource]`, from its own
/// `apiserver_request_total`.
pub async fn apiserver_requests(client: &Client) -> std::collections::BTreeMap<String, f64> {
    let text = client
        .request_text(http::Request::get("/metrics").body(Vec::new()).expect("request"))
        .await
        .expect("apiserver /metrics");
    let mut out = std::collections::BTreeMap::new();
    for l in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let field = |k: &str| {
            l.split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        let v: f64 = l.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let key = format!("{} {} {}", field("verb"), field("resource"), field("subresource"));
        *out.entry(key.trim().to_string()).or_insert(0.0) += v;
    }
    out
}

/// Accepts any server certificate: the tests talk to a self-signed operator on loopback.
#[derive(Debug)]
struct AnyCertificate(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// GET over HTTPS with an optional bearer token: (status, body).
pub async fn https_get(addr: &str, path: &str, token: Option<&str>) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A token of a service account, from the TokenRequest API.
pub async fn service_account_token(client: &Client, namespace: &str, name: &str) -> String {
    service_account_token_for(client, namespace, name, "https://kubernetes.default.svc").await
}

/// A token of the service account `namespace/name` meant for `audience`.
pub async fn service_account_token_for(client: &Client, namespace: &str, name: &str, audience: &str) -> String {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::ServiceAccount;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request: TokenRequest = serde_json::from_value(serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": [audience], "expirationSeconds": 3600},
    }))
    .expect("token request");
    let issued: TokenRequest = accounts
        .create_subresource("token", name, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("a token for {namespace}/{name}: {e}"));
    issued.status.expect("token status").token
}

/// A TCP proxy on loopback that forwards to `target` until told to stall: then it stops
/// forwarding in both directions and keeps every connection open, as a half-open network or
/// a hung apiserver does. TLS passes through untouched.
pub struct StallingProxy {
    pub addr: std::net::SocketAddr,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl StallingProxy {
    pub async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("proxy port");
        let addr = listener.local_addr().expect("proxy address");
        let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stalled.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let flag = flag.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (from_client, to_client) = inbound.into_split();
                    let (from_server, to_server) = outbound.into_split();
                    tokio::join!(
                        pump(from_client, to_server, flag.clone()),
                        pump(from_server, to_client, flag)
                    );
                });
            }
        });
        Self { addr, stalled }
    }

    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stalled.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// The apiserver address (an IP and port) a kubeconfig names.
pub fn apiserver_address(kubeconfig: &Path) -> std::net::SocketAddr {
    std::fs::read_to_string(kubeconfig)
        .expect("read kubeconfig")
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: https://")?.parse().ok())
        .expect("an IP and port as the kubeconfig's server")
}

/// A copy of `kubeconfig` that reaches the apiserver through `proxy`.
pub fn kubeconfig_via(kubeconfig: &Path, proxy: std::net::SocketAddr) -> PathBuf {
    let text = std::fs::read_to_string(kubeconfig).expect("read kubeconfig");
    let server = apiserver_address(kubeconfig).to_string();
    let path = kubeconfig.with_extension(format!("via-{}", proxy.port()));
    std::fs::write(&path, text.replace(&server, &proxy.to_string())).expect("write kubeconfig");
    path
}

/// Applies `count` WebServices `w0`, `w1`, ... (nginx, one replica), 32 at a time: the fleet
/// of the instance and plan benchmarks.
pub async fn apply_webservices(api: &Api<DynamicObject>, api_version: &str, count: usize) {
    use futures::StreamExt;
    futures::stream::iter(0..count)
        .for_each_concurrent(32, |i| async move {
            let name = format!("w{i}");
            let obj = serde_json::json!({"apiVersion": api_version, "kind": "WebService", "metadata": {"name": name},
                                         "spec": {"image": "nginx:1.27", "replicas": 1}});
            api.patch(&name, &PatchParams::apply("bench"), &Patch::Apply(obj))
                .await
                .unwrap_or_else(|e| panic!("apply WebService {name}: {e}"));
        })
        .await;
}

/// How many of the objects `api` lists have the condition Ready=True.
pub async fn ready_count(api: &Api<DynamicObject>) -> usize {
    let list = api.list(&kube::api::ListParams::default()).await.unwrap();
    list.items
        .iter()
        .filter(|o| {
            o.data["status"]["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
        })
        .count()
}

/// The `pequod_*` metric names in `text` (an expression, a document), histogram suffixes
/// removed.
pub fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("pequod_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        if base.len() > "pequod_".len() {
            names.insert(base.to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// The certificate a TLS server at `addr` presents to a client that trusts only the PEM `ca`
/// and checks the name `server_name`, as the apiserver does with a CRD's `caBundle`: its DER,
/// or why the handshake failed.
pub async fn verified_server_certificate(addr: &str, server_name: &str, ca: &[u8]) -> Result<Vec<u8>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca) {
        roots.add(cert.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).map_err(|e| e.to_string())?;
    let tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let (_, session) = tls.get_ref();
    session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| cert.to_vec())
        .ok_or_else(|| "no certificate".to_string())
}

/// `pequod plan -o json` of a module of one file, `source`, for Transform `transform` of the
/// test's namespace, with the test's cue and a cache of its own: the plan it prints.
pub fn plan_json(env: &TestEnv, transform: &str, file: &str, source: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("temporary folder");
    std::fs::write(dir.path().join(file), source).expect("write the module");
    let out = std::process::Command::new(pequod_binary())
        .env("KUBECONFIG", &env.kubeconfig)
        .env("PEQUOD_CACHE_DIR", dir.path().join("cache"))
        .args([
            "plan",
            "--transform",
            &format!("{}/{transform}", env.namespace),
            "--module",
        ])
        .arg(dir.path())
        .args(["-o", "json", "--cue-binary"])
        .arg(tool("cue", "PEQUOD_TEST_CUE"))
        .output()
        .expect("run pequod plan");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("the plan is JSON")
}
