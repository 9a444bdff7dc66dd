//! A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager
//! with its default controllers, kube-scheduler, and kwok simulating the nodes and their pods,
//! so that a Deployment rolls out as on a cluster: the deployment and replica-set controllers
//! create pods, the scheduler binds them to a node, and kwok reports them running and Ready.
//!
//! One control plane serves the whole test binary. It is started lazily by the first test
//! that asks for it, from a thread that lives as long as the process, and stopped when the
//! process exits: by an exit hook in the normal case and, should the test process die without
//! running it, by the kernel (PR_SET_PDEATHSIG).

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// Binaries, in the order they are started and the reverse of the order they are stopped.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

pub struct ControlPlane {
    /// Kubeconfig with cluster-admin rights.
    pub kubeconfig: PathBuf,
    /// Kubeconfig the operators under test use: cluster-admin too, as the user
    /// [`OPERATOR_USER`], so that the audit log tells their requests from everyone else's.
    pub operator_kubeconfig: PathBuf,
    /// The apiserver's audit log of every write [`OPERATOR_USER`] makes (none on an external
    /// cluster).
    pub audit_log: Option<PathBuf>,
    /// True when tests run against an existing cluster (PEQUOD_TEST_KUBECONFIG).
    pub external: bool,
    processes: Mutex<Vec<Process>>,
    data_dir: Option<PathBuf>,
}

/// The user the operators under test authenticate as.
pub const OPERATOR_USER: &str = "pequod-operator";

/// Requests by [`OPERATOR_USER`] are audited (writes, reads and watches); nothing else is.
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  users: ["pequod-operator"]
  verbs: ["create", "update", "patch", "delete", "deletecollection", "get", "list", "watch"]
- level: None
"#;

/// The verbs that change something.
const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

static CONTROL_PLANE: OnceLock<ControlPlane> = OnceLock::new();
static START: Mutex<()> = Mutex::new(());

/// The control plane of this test binary, started on first use.
pub fn shared() -> &'static ControlPlane {
    if let Some(cp) = CONTROL_PLANE.get() {
        return cp;
    }
    let _guard = START.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(cp) = CONTROL_PLANE.get() {
        return cp;
    }
    let cp = match std::env::var_os("PEQUOD_TEST_KUBECONFIG") {
        Some(path) => ControlPlane {
            kubeconfig: PathBuf::from(&path),
            operator_kubeconfig: PathBuf::from(path),
            audit_log: None,
            external: true,
            processes: Mutex::new(Vec::new()),
            data_dir: None,
        },
        None => start_on_keeper_thread(),
    };
    let _ = CONTROL_PLANE.set(cp);
    CONTROL_PLANE.get().expect("control plane was just set")
}

/// Children get SIGTERM when the thread that spawned them ends, so they are spawned from a
/// thread that never ends.
fn start_on_keeper_thread() -> ControlPlane {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("control-plane".into())
        .spawn(move || {
            let result = std::panic::catch_unwind(start);
            let _ = tx.send(result);
            loop {
                std::thread::park();
            }
        })
        .expect("spawn control-plane thread");
    match rx.recv().expect("control-plane thread") {
        Ok(cp) => cp,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Simulated nodes: enough for every pod the tests and benchmarks start.
const NODES: usize = 2;
const PODS_PER_NODE: usize = 1000;

/// The folder with etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok
/// (hack/control-plane.sh honours KUBEBUILDER_ASSETS, reuses its cache, or builds).
fn binaries() -> PathBuf {
    let out = Command::new(super::repo_root().join("hack/control-plane.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run hack/control-plane.sh");
    assert!(
        out.status.success(),
        "hack/control-plane.sh failed: no control-plane binaries (see its message above)"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn spawn(name: &'static str, program: &Path, args: &[String], dir: &Path, env: &[(String, PathBuf)]) -> Process {
    let log = dir.join(format!("{name}.log"));
    let file = fs::File::create(&log).expect("create log file");
    let mut cmd = Command::new(program);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log fd"))
        .stderr(file);
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to signal the child when
    // the spawning thread exits.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
    Process { name, child, log }
}

fn log_tail(path: &Path, bytes: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(bytes)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    s
}

fn openssl(args: &[&str], dir: &Path) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(Stdio::null())
        .status()
        .expect("run openssl");
    assert!(status.success(), "openssl {args:?} failed");
}

fn start() -> ControlPlane {
    let bin = binaries();
    let dir = std::env::temp_dir().join(format!("pequod-cp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("certs")).expect("create data dir");

    openssl(&["genrsa", "-out", "sa.key", "2048"], &dir);
    openssl(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"], &dir);
    let token = format!("pequod-admin-{}", std::process::id());
    let operator_token = format!("pequod-operator-{}", std::process::id());
    fs::write(
        dir.join("tokens.csv"),
        format!(
            "{token},admin,admin-uid,\"system:masters\"\n{operator_token},{OPERATOR_USER},operator-uid,\"system:masters\"\n"
        ),
    )
    .expect("write tokens");
    fs::write(dir.join("audit-policy.yaml"), AUDIT_POLICY).expect("write audit policy");

    // PEQUOD_TEST_EMULATED_VERSION=1.34 runs the compatibility subset: the apiserver, the
    // controller manager and the scheduler serve the APIs and behaviour of that older release
    // (Kubernetes' compatibility versions), with the same binaries.
    let emulated: Vec<String> = std::env::var("PEQUOD_TEST_EMULATED_VERSION")
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| vec![format!("--emulated-version=kube={v}")])
        .unwrap_or_default();
    let etcd_port = free_port();
    let peer_port = free_port();
    let api_port = free_port();
    let d = |p: &str| dir.join(p).display().to_string();

    let etcd = spawn(
        "etcd",
        &bin.join("etcd"),
        &[
            format!("--data-dir={}", d("etcd")),
            format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-cluster=default=http://127.0.0.1:{peer_port}"),
            "--unsafe-no-fsync=true".into(),
        ],
        &dir,
        &[],
    );
    let apiserver = spawn(
        "kube-apiserver",
        &bin.join("kube-apiserver"),
        &[
            format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            // The `kubernetes` Service's endpoints may not be a loopback address; nothing here
            // reaches the apiserver through that Service.
            "--endpoint-reconciler-type=none".into(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", d("certs")),
            format!("--token-auth-file={}", d("tokens.csv")),
            format!("--audit-policy-file={}", d("audit-policy.yaml")),
            format!("--audit-log-path={}", d("audit.log")),
            "--audit-log-format=json".into(),
            // Never rotated: benchmarks count from a mark in this one file.
            "--audit-log-maxsize=1000000".into(),
            "--authorization-mode=RBAC".into(),
            format!("--service-account-key-file={}", d("sa.pub")),
            format!("--service-account-signing-key-file={}", d("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--allow-privileged=true".into(),
        ]
        .into_iter()
        .chain(emulated.clone())
        .collect::<Vec<_>>(),
        &dir,
        &[],
    );
    let mut processes = vec![etcd, apiserver];

    let kubeconfig = dir.join("kubeconfig");
    let wait_started = Instant::now();
    let ca = dir.join("certs/apiserver.crt");
    while !ca.exists() {
        check_alive(&mut processes);
        assert!(
            wait_started.elapsed() < Duration::from_secs(60),
            "apiserver wrote no serving certificate"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let kubeconfig_for = |user: &str, token: &str| {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: https://127.0.0.1:{api_port}\n    certificate-authority: {}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: local\n  context:\n    cluster: local\n    user: {user}\n    namespace: default\ncurrent-context: local\n",
            ca.display()
        )
    };
    fs::write(&kubeconfig, kubeconfig_for("admin", &token)).expect("write kubeconfig");
    let operator_kubeconfig = dir.join("operator.kubeconfig");
    fs::write(&operator_kubeconfig, kubeconfig_for(OPERATOR_USER, &operator_token)).expect("write kubeconfig");

    // Flags of the controller manager and the scheduler: one instance each, no serving port,
    // client rate limits above the defaults (20/s), so that rolling out hundreds of
    // Deployments at once in a benchmark measures Pequod, not this throttle.
    let controller_flags: Vec<String> = [
        "--kube-api-qps=200",
        "--kube-api-burst=400",
        "--leader-elect=false",
        "--secure-port=0",
    ]
    .into_iter()
    .map(String::from)
    .chain(emulated.clone())
    .collect();
    // Without these three (a KUBEBUILDER_ASSETS folder may lack them) the control plane has
    // no pods: tests that need a rollout then fail with a timeout.
    let kcm = bin.join("kube-controller-manager");
    if kcm.exists() {
        processes.push(spawn(
            "kube-controller-manager",
            &kcm,
            &[
                format!("--kubeconfig={}", kubeconfig.display()),
                // Every default controller but the publisher of the apiserver's serving CA: the
                // apiserver here serves a self-signed certificate, which is no CA.
                "--controllers=*,-kube-apiserver-serving-clustertrustbundle-publisher-controller".into(),
                "--use-service-account-credentials=false".into(),
                format!("--service-account-private-key-file={}", d("sa.key")),
                format!("--root-ca-file={}", ca.display()),
            ]
            .into_iter()
            .chain(controller_flags.clone())
            .collect::<Vec<_>>(),
            &dir,
            &[],
        ));
    }
    let scheduler = bin.join("kube-scheduler");
    if scheduler.exists() {
        processes.push(spawn(
            "kube-scheduler",
            &scheduler,
            &[
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--authentication-kubeconfig={}", kubeconfig.display()),
                format!("--authorization-kubeconfig={}", kubeconfig.display()),
            ]
            .into_iter()
            .chain(controller_flags.clone())
            .collect::<Vec<_>>(),
            &dir,
            &[],
        ));
    }
    let kwok = bin.join("kwok");
    if kwok.exists() {
        processes.push(spawn(
            "kwok",
            &kwok,
            &[
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--config={}", bin.join("kwok-stages.yaml").display()),
                "--manage-all-nodes=true".into(),
                "--node-lease-duration-seconds=40".into(),
                "--cidr=10.244.0.0/16".into(),
            ],
            &dir,
            &[],
        ));
    }
    let simulated_nodes = if kwok.exists() { NODES } else { 0 };

    let cp = ControlPlane {
        kubeconfig,
        operator_kubeconfig,
        audit_log: Some(dir.join("audit.log")),
        external: false,
        processes: Mutex::new(processes),
        data_dir: Some(dir),
    };
    register_exit_hook();
    cp.wait_ready(Duration::from_secs(90), simulated_nodes);
    cp
}

extern "C" fn stop_at_exit() {
    if let Some(cp) = CONTROL_PLANE.get() {
        cp.stop();
    }
}

fn register_exit_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a plain extern "C" function; it runs once, at process exit.
    ONCE.call_once(|| unsafe {
        libc::atexit(stop_at_exit);
    });
}

/// Panics with the log tail of any process that has exited.
fn check_alive(processes: &mut [Process]) {
    for p in processes.iter_mut() {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!(
                "{} exited ({status}); last log lines:\n{}",
                p.name,
                log_tail(&p.log, 4000)
            );
        }
    }
}

impl ControlPlane {
    /// Starts a helper process (the operator, say) that is stopped with the control plane,
    /// before it. Returns the path of its log.
    pub fn spawn_process(&self, name: &'static str, program: &Path, args: &[String], env: &[(&str, &Path)]) -> PathBuf {
        let dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("pequod-test-{}", std::process::id())));
        let _ = fs::create_dir_all(&dir);
        let (tx, rx) = mpsc::channel();
        let (program, args) = (program.to_path_buf(), args.to_vec());
        let env: Vec<(String, PathBuf)> = env.iter().map(|(k, v)| (k.to_string(), v.to_path_buf())).collect();
        // Spawned from the keeper-style thread so PR_SET_PDEATHSIG follows the process, not a test thread.
        std::thread::spawn(move || {
            let _ = tx.send(spawn(name, &program, &args, &dir, &env));
            loop {
                std::thread::park();
            }
        });
        let process = rx.recv().expect("helper process");
        let log = process.log.clone();
        if self.external {
            register_exit_hook();
        }
        self.processes.lock().unwrap_or_else(|e| e.into_inner()).push(process);
        log
    }

    /// Panics with a log tail when a control-plane process has crashed; called by helpers
    /// whose wait ran out, so that a dead apiserver is reported as such.
    pub fn assert_alive(&self) {
        if let Ok(mut processes) = self.processes.lock() {
            check_alive(&mut processes);
        }
    }

    /// Waits for /readyz and the `default` namespace, then registers `nodes` simulated nodes
    /// and waits until kwok reports them Ready.
    fn wait_ready(&self, timeout: Duration, nodes: usize) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let kubeconfig = self.kubeconfig.clone();
        let started = Instant::now();
        rt.block_on(async {
            let mut last = String::new();
            let mut registered = false;
            loop {
                self.assert_alive();
                assert!(
                    started.elapsed() < timeout,
                    "control plane not ready after {timeout:?}: {last}"
                );
                match super::client_for(&kubeconfig).await {
                    Ok(client) => {
                        let ready = client
                            .request_text(http::Request::get("/readyz").body(Vec::new()).expect("request"))
                            .await;
                        // /readyz answers before the bootstrap controller has created `default`.
                        let default_ns = kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
                            .get_opt("default")
                            .await;
                        match (ready, default_ns) {
                            (Ok(_), Ok(Some(_))) if !registered => {
                                register_nodes(&client, nodes).await;
                                registered = true;
                            }
                            (Ok(_), Ok(Some(_))) => match ready_nodes(&client).await {
                                Ok(n) if n >= nodes => return,
                                Ok(n) => last = format!("{n} of {nodes} simulated nodes Ready"),
                                Err(e) => last = e,
                            },
                            (r, n) => {
                                last = format!("readyz: {:?}, default namespace: {:?}", r.err(), n.map(|n| n.is_some()))
                            }
                        }
                    }
                    Err(e) => last = e,
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    /// SIGTERM to every process in reverse start order, a bounded wait, then SIGKILL.
    fn stop(&self) {
        let Ok(mut processes) = self.processes.lock() else {
            return;
        };
        while let Some(mut p) = processes.pop() {
            let pid = p.child.id() as libc::pid_t;
            // SAFETY: signalling a child process we spawned and have not yet reaped.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = p.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Ok(None) = p.child.try_wait() {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
        if let Some(dir) = &self.data_dir
            && std::env::var_os("PEQUOD_TEST_KEEP_DATA").is_none()
        {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Nodes that kwok manages (it manages every node of this cluster): no kubelet runs, kwok
/// reports them Ready and plays the kubelet for the pods bound to them.
async fn register_nodes(client: &kube::Client, count: usize) {
    use k8s_openapi::api::core::v1::Node;
    let nodes: kube::Api<Node> = kube::Api::all(client.clone());
    for i in 0..count {
        let name = format!("kwok-node-{i}");
        let node: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {"type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"},
            },
            "status": {
                "allocatable": {"cpu": "64", "memory": "256Gi", "pods": PODS_PER_NODE.to_string()},
                "capacity": {"cpu": "64", "memory": "256Gi", "pods": PODS_PER_NODE.to_string()},
            },
        }))
        .expect("node object");
        match nodes.create(&kube::api::PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("register node {name}: {e}"),
        }
    }
}

async fn ready_nodes(client: &kube::Client) -> Result<usize, String> {
    use k8s_openapi::api::core::v1::Node;
    let list = kube::Api::<Node>::all(client.clone())
        .list(&Default::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(list
        .items
        .iter()
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count())
}

/// Where the audit log stands now: [`writes_since`] counts what comes after.
pub fn audit_mark() -> u64 {
    shared()
        .audit_log
        .as_ref()
        .and_then(|log| fs::metadata(log).ok())
        .map_or(0, |m| m.len())
}

/// The writes the operators under test made since `mark`, counted by the apiserver's audit
/// log, by `verb resource[/subresource]` (for example `patch resourcegraphs/status`).
pub fn writes_since(mark: u64) -> std::collections::BTreeMap<String, u64> {
    only_writes(requests_since(mark))
}

/// [`writes_since`], of objects in `namespace` only: what one test's objects cost while other
/// tests share the operator.
pub fn writes_in(mark: u64, namespace: &str) -> std::collections::BTreeMap<String, u64> {
    only_writes(requests_matching(mark, Some(namespace)))
}

fn only_writes(mut counts: std::collections::BTreeMap<String, u64>) -> std::collections::BTreeMap<String, u64> {
    counts.retain(|key, _| WRITE_VERBS.iter().any(|verb| key.split(' ').next() == Some(*verb)));
    counts
}

/// [`requests_since`], of objects in `namespace` only.
pub fn requests_in(mark: u64, namespace: &str) -> std::collections::BTreeMap<String, u64> {
    requests_matching(mark, Some(namespace))
}

/// Every request the operators under test made since `mark` (writes, gets, lists and
/// watches started), counted by the apiserver's audit log, by `verb resource[/subresource]`.
pub fn requests_since(mark: u64) -> std::collections::BTreeMap<String, u64> {
    requests_matching(mark, None)
}

/// The audit log's events after `mark` (none without an audit log).
fn audit_events(mark: u64) -> Vec<serde_json::Value> {
    let Some(log) = shared().audit_log.as_ref() else {
        return Vec::new();
    };
    let Ok(mut file) = fs::File::open(log) else {
        return Vec::new();
    };
    let _ = file.seek(SeekFrom::Start(mark));
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    text.lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// One write, as the apiserver's audit log records it.
#[derive(Debug, Clone)]
pub struct AuditedWrite {
    /// When the apiserver received it (RFC 3339, so that the text sorts by time).
    pub received: String,
    /// `resource[/subresource] name`.
    pub object: String,
    /// The writer's `User-Agent`: Pequod names the replica in it.
    pub agent: String,
}

/// The writes the operators under test made to objects in `namespace` since `mark`, in the
/// order the apiserver received them.
pub fn write_log_in(mark: u64, namespace: &str) -> Vec<AuditedWrite> {
    let mut writes = Vec::new();
    for event in audit_events(mark) {
        let verb = event["verb"].as_str().unwrap_or("");
        let object = &event["objectRef"];
        if event["stage"] != "ResponseComplete"
            || !WRITE_VERBS.contains(&verb)
            || object["namespace"].as_str() != Some(namespace)
        {
            continue;
        }
        let resource = match object["subresource"].as_str() {
            Some(sub) => format!("{}/{sub}", object["resource"].as_str().unwrap_or("")),
            None => object["resource"].as_str().unwrap_or("").to_string(),
        };
        writes.push(AuditedWrite {
            received: event["requestReceivedTimestamp"].as_str().unwrap_or("").to_string(),
            object: format!("{resource} {}", object["name"].as_str().unwrap_or("")),
            agent: event["userAgent"].as_str().unwrap_or("").to_string(),
        });
    }
    writes.sort_by(|a, b| a.received.cmp(&b.received));
    writes
}

fn requests_matching(mark: u64, namespace: Option<&str>) -> std::collections::BTreeMap<String, u64> {
    let mut counts = std::collections::BTreeMap::new();
    for event in audit_events(mark) {
        // A watch is counted when it starts; everything else once, when answered.
        let counted_stage = if event["verb"] == "watch" {
            "ResponseStarted"
        } else {
            "ResponseComplete"
        };
        if event["stage"] != counted_stage {
            continue;
        }
        let object = &event["objectRef"];
        if namespace.is_some_and(|ns| object["namespace"].as_str() != Some(ns)) {
            continue;
        }
        let resource = match object["subresource"].as_str() {
            Some(sub) => format!("{}/{sub}", object["resource"].as_str().unwrap_or("")),
            None => object["resource"].as_str().unwrap_or("").to_string(),
        };
        *counts
            .entry(format!("{} {resource}", event["verb"].as_str().unwrap_or("")))
            .or_insert(0) += 1;
    }
    counts
}
