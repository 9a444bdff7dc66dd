//! Running the `cue` command-line tool: bounded time, bounded output, bounded concurrency.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::{Semaphore, watch};

use super::CueError;
use crate::metrics::Metrics;

/// The default of `--cue-memory-limit-mb`: with the default two processes, cue and the
/// operator stay within the manager's 512 MiB container limit.
pub const DEFAULT_MEMORY_LIMIT_MIB: u64 = 160;

/// Most bytes of stdout kept from one invocation; larger output is an error.
pub const MAX_STDOUT_BYTES: usize = 16 * 1024 * 1024;
/// Most bytes of stderr kept from one invocation; the rest is dropped.
pub const MAX_STDERR_BYTES: usize = 64 * 1024;

/// Whether the cue binary could be started the last time anything ran it: `None` until it
/// has run, then `Ok` or why it could not start.
pub type Availability = Option<Result<(), String>>;

/// Handle on the cue binary shared by everything that evaluates CUE. Clones share the process
/// limit and the availability every run reports.
#[derive(Clone)]
pub struct CueCli {
    binary: PathBuf,
    timeout: Duration,
    permits: Arc<Semaphore>,
    metrics: Option<Arc<Metrics>>,
    availability: Arc<watch::Sender<Availability>>,
    /// Most bytes one process may allocate (`RLIMIT_DATA`), if bounded.
    memory_limit: Option<u64>,
}

impl CueCli {
    pub fn new(binary: impl Into<PathBuf>, timeout: Duration, max_processes: usize) -> Self {
        Self {
            binary: binary.into(),
            timeout,
            permits: Arc::new(Semaphore::new(max_processes.max(1))),
            metrics: None,
            availability: Arc::new(watch::channel(None).0),
            memory_limit: None,
        }
    }

    /// Bounds what each cue process may allocate. Go's heap counts against `RLIMIT_DATA`
    /// (unlike `RLIMIT_AS`, which Go's address-space reservations exhaust at once), and
    /// `GOMEMLIMIT` makes the collector work harder before the hard limit is reached.
    pub fn with_memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// Follows whether the binary starts, as every run finds out: a readiness check can watch
    /// this instead of starting processes of its own.
    pub fn availability(&self) -> watch::Receiver<Availability> {
        self.availability.subscribe()
    }

    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Runs `cue version`; used by /readyz to tell whether rendering can work at all.
    pub async fn version(&self) -> Result<String, CueError> {
        let out = self.run(&["version"], None).await?;
        Ok(out.lines().next().unwrap_or_default().trim().to_string())
    }

    /// Runs cue with `args` in `dir` and returns its stdout. A non-zero exit becomes
    /// [`CueError::Failed`] carrying cue's own message.
    pub async fn run(&self, args: &[&str], dir: Option<&Path>) -> Result<String, CueError> {
        let command = args.first().copied().unwrap_or("");
        let result = self.run_inner(args, dir).await;
        // Only a process that could not start says the binary is unusable; cue's own errors,
        // timeouts and oversized output are about the module or the input.
        let started = match &result {
            Err(e @ CueError::Spawn { .. }) => Some(Err(e.to_string())),
            Err(CueError::Shutdown) => None,
            _ => Some(Ok(())),
        };
        if let Some(started) = started {
            self.availability.send_if_modified(|current| {
                let changed = current.as_ref() != Some(&started);
                *current = Some(started);
                changed
            });
        }
        if let Some(metrics) = &self.metrics {
            let outcome = if result.is_ok() { "success" } else { "error" };
            metrics
                .cue_invocations_total
                .with_label_values(&[command, outcome])
                .inc();
        }
        result
    }

    async fn run_inner(&self, args: &[&str], dir: Option<&Path>) -> Result<String, CueError> {
        let _permit = self.permits.acquire().await.map_err(|_| CueError::Shutdown)?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(dir) = dir {
            cmd.current_dir(dir);
        }
        if let Some(limit) = self.memory_limit {
            limit_memory(&mut cmd, limit);
        }
        let mut child = cmd.spawn().map_err(|source| CueError::Spawn {
            binary: self.binary.display().to_string(),
            source,
        })?;
        let mut stdout = child.stdout.take().ok_or(CueError::Shutdown)?;
        let mut stderr = child.stderr.take().ok_or(CueError::Shutdown)?;

        let work = async {
            let mut out = Vec::new();
            let mut err = Vec::new();
            let read_out = read_capped(&mut stdout, &mut out, MAX_STDOUT_BYTES);
            let read_err = read_capped(&mut stderr, &mut err, MAX_STDERR_BYTES);
            let (out_res, _, status) = tokio::join!(read_out, read_err, child.wait());
            (out_res, out, err, status)
        };
        let (out_res, out, err, status) = match tokio::time::timeout(self.timeout, work).await {
            Ok(done) => done,
            Err(_) => {
                // kill_on_drop ends the process when `child` goes out of scope.
                return Err(CueError::Timeout {
                    seconds: self.timeout.as_secs(),
                });
            }
        };
        let status = status.map_err(|source| CueError::Spawn {
            binary: self.binary.display().to_string(),
            source,
        })?;
        if out_res.is_err() {
            return Err(CueError::OutputTooLarge {
                limit: MAX_STDOUT_BYTES,
            });
        }
        if !status.success() {
            return Err(self.failure(status, &err));
        }
        String::from_utf8(out).map_err(|_| CueError::Failed {
            code: None,
            message: "cue wrote invalid UTF-8".into(),
        })
    }

    /// Why cue failed, from its exit status and what it wrote to stderr.
    fn failure(&self, status: std::process::ExitStatus, stderr: &[u8]) -> CueError {
        let message = String::from_utf8_lossy(stderr).trim().to_string();
        if let Some(limit) = self.memory_limit
            && ran_out_of_memory(&message)
        {
            return CueError::MemoryLimit {
                limit_mib: limit / (1024 * 1024),
            };
        }
        CueError::Failed {
            code: status.code(),
            message: if message.is_empty() {
                "cue exited without a message".to_string()
            } else {
                without_stacks(message)
            },
        }
    }
}

/// Sets the child's data-segment limit and a Go soft limit below it.
fn limit_memory(cmd: &mut Command, bytes: u64) {
    cmd.env("GOMEMLIMIT", format!("{}MiB", bytes * 4 / 5 / (1024 * 1024)));
    let limit = libc::rlimit {
        rlim_cur: bytes as libc::rlim_t,
        rlim_max: bytes as libc::rlim_t,
    };
    // SAFETY: the closure runs in the forked child before exec and calls only setrlimit,
    // which is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_DATA, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// Whether a failed cue's message is the Go runtime giving up for lack of memory.
fn ran_out_of_memory(message: &str) -> bool {
    let first = message.lines().next().unwrap_or_default();
    (first.starts_with("fatal error:") || first.starts_with("runtime:"))
        && (first.contains("out of memory") || first.contains("cannot allocate memory"))
}

/// A crash of the Go runtime (a fatal error, a panic or a signal) prints every goroutine's
/// stack: only its first line says anything to a module's author.
fn without_stacks(message: String) -> String {
    let crashed = ["fatal error:", "panic:", "SIGSEGV", "SIGBUS", "runtime:"]
        .iter()
        .any(|p| message.starts_with(p));
    match message.lines().next() {
        Some(first) if crashed => format!("cue crashed: {first}"),
        _ => message,
    }
}

/// Reads everything from `r`; keeps at most `limit` bytes. Returns Err(()) when output was
/// cut, after draining the rest so the child is not blocked on a full pipe.
async fn read_capped<R: tokio::io::AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, limit: usize) -> Result<(), ()> {
    let mut chunk = [0u8; 16 * 1024];
    let mut cut = false;
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = limit.saturating_sub(buf.len());
                if n > room {
                    cut = true;
                }
                buf.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
    if cut { Err(()) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("fake-cue");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[tokio::test]
    async fn missing_binary_is_a_spawn_error_naming_it() {
        let cli = CueCli::new("/nonexistent/cue", Duration::from_secs(5), 1);
        let err = cli.version().await.unwrap_err();
        assert!(matches!(err, CueError::Spawn { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/cue"));
    }

    #[tokio::test]
    async fn every_run_reports_whether_the_binary_starts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cue");
        let cli = CueCli::new(&path, Duration::from_secs(5), 1);
        let availability = cli.clone().availability();
        assert_eq!(*availability.borrow(), None);
        let _ = cli.run(&["export"], None).await;
        assert!(matches!(&*availability.borrow(), Some(Err(m)) if m.contains("cue")));
        // A failing evaluation still shows the binary runs.
        std::fs::rename(script(dir.path(), "echo 'a: conflict' >&2; exit 1"), &path).unwrap();
        // A process another test forks while the script is still open for writing makes exec
        // fail with "text file busy" for a moment.
        for _ in 0..20 {
            let _ = cli.run(&["export"], None).await;
            if *availability.borrow() == Some(Ok(())) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(*availability.borrow(), Some(Ok(())));
    }

    #[tokio::test]
    async fn hanging_process_is_killed_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let cli = CueCli::new(script(dir.path(), "sleep 30"), Duration::from_millis(300), 1);
        let started = std::time::Instant::now();
        let err = cli.run(&["export"], None).await.unwrap_err();
        assert!(matches!(err, CueError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn failure_carries_stderr_and_huge_output_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cli = CueCli::new(
            script(dir.path(), "echo 'a: conflicting values' >&2; exit 1"),
            Duration::from_secs(5),
            1,
        );
        match cli.run(&["export"], None).await.unwrap_err() {
            CueError::Failed { code, message } => {
                assert_eq!(code, Some(1));
                assert_eq!(message, "a: conflicting values");
            }
            other => panic!("unexpected {other:?}"),
        }
        let big = CueCli::new(
            script(dir.path(), &format!("head -c {} /dev/zero", MAX_STDOUT_BYTES + 10)),
            Duration::from_secs(20),
            1,
        );
        assert!(matches!(
            big.run(&["export"], None).await.unwrap_err(),
            CueError::OutputTooLarge { .. }
        ));
    }

    #[test]
    fn the_go_runtime_s_memory_failures_are_told_from_other_errors() {
        for crash in [
            "fatal error: runtime: out of memory\n\nruntime stack:\nruntime.throw(...)",
            "fatal error: out of memory allocating heap arena metadata",
            "fatal error: runtime: cannot allocate memory",
            "runtime: out of memory: cannot allocate 4194304-byte block (0 in use)\nfatal error: out of memory",
        ] {
            assert!(ran_out_of_memory(crash), "{crash}");
        }
        assert!(!ran_out_of_memory("x: conflicting values \"out of memory\" and 1"));
        assert!(!ran_out_of_memory("SIGSEGV: segmentation violation"));
    }

    #[test]
    fn crashes_keep_their_first_line_only() {
        let crash = "SIGSEGV: segmentation violation\nPC=0x43747d m=0\ngoroutine 0 [idle]:".to_string();
        assert_eq!(without_stacks(crash), "cue crashed: SIGSEGV: segmentation violation");
        let evaluation = "x: conflicting values 1 and 2:\n    ./a.cue:1:4".to_string();
        assert_eq!(without_stacks(evaluation.clone()), evaluation);
    }
}
