//! A real Kubernetes control plane on loopback: etcd, kube-apiserver and a
//! kube-controller-manager running only the garbage-collector and namespace controllers.
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
    /// True when tests run against an existing cluster (PEQUOD_TEST_KUBECONFIG).
    pub external: bool,
    processes: Mutex<Vec<Process>>,
    data_dir: Option<PathBuf>,
}

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
            kubeconfig: PathBuf::from(path),
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

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The folder with kube-apiserver, etcd and kube-controller-manager (hack/control-plane.sh
/// honours KUBEBUILDER_ASSETS, reuses its cache, or builds).
fn binaries() -> PathBuf {
    let out = Command::new(repo_root().join("hack/control-plane.sh"))
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
    fs::write(
        dir.join("tokens.csv"),
        format!("{token},admin,admin-uid,\"system:masters\"\n"),
    )
    .expect("write tokens");

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
            format!("--secure-port={api_port}"),
            "--insecure-port=0".into(),
            format!("--cert-dir={}", d("certs")),
            format!("--token-auth-file={}", d("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            format!("--service-account-key-file={}", d("sa.pub")),
            format!("--service-account-signing-key-file={}", d("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--allow-privileged=true".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
        ],
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
    fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: https://127.0.0.1:{api_port}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: local\n  context:\n    cluster: local\n    user: admin\n    namespace: default\ncurrent-context: local\n",
            ca.display()
        ),
    )
    .expect("write kubeconfig");

    let kcm = bin.join("kube-controller-manager");
    if kcm.exists() {
        processes.push(spawn(
            "kube-controller-manager",
            &kcm,
            &[
                format!("--kubeconfig={}", kubeconfig.display()),
                "--controllers=garbagecollector,namespace,clusterrole-aggregation".into(),
                "--leader-elect=false".into(),
                "--port=0".into(),
                "--secure-port=0".into(),
                "--use-service-account-credentials=false".into(),
            ],
            &dir,
            &[],
        ));
    }

    let cp = ControlPlane {
        kubeconfig,
        external: false,
        processes: Mutex::new(processes),
        data_dir: Some(dir),
    };
    register_exit_hook();
    cp.wait_ready(Duration::from_secs(90));
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

    fn wait_ready(&self, timeout: Duration) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let kubeconfig = self.kubeconfig.clone();
        let started = Instant::now();
        rt.block_on(async {
            let mut last = String::new();
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
                            (Ok(_), Ok(Some(_))) => return,
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
