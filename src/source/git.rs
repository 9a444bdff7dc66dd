//! Git sources through the `git` command: `ls-remote` to resolve a branch or tag, then a
//! shallow fetch of one commit and `git archive` of the module's folder.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::process::Command;

use super::credentials::GitCredentials;
use super::reference::{GitReference, GitRevision, ModulePath, is_commit_sha};

/// Most bytes of git's stderr kept for a message.
const MAX_MESSAGE: usize = 2048;

static WORK: AtomicU64 = AtomicU64::new(0);

/// A git command that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GitError {
    #[error("git {operation} {url}: {message}")]
    Failed {
        operation: &'static str,
        url: String,
        message: String,
        /// The server could not be reached or failed on its side, as opposed to refusing.
        unavailable: bool,
    },
    #[error("git {operation} {url} did not finish within {seconds}s")]
    Timeout {
        operation: &'static str,
        url: String,
        seconds: u64,
    },
    #[error("{url} has no branch or tag {revision}")]
    UnknownRevision { url: String, revision: String },
    #[error("cannot run git ({binary}): {message}")]
    Spawn { binary: String, message: String },
}

/// Most bytes git may write to its output: an archive larger than any module can expand to is
/// stopped rather than held in memory.
const MAX_OUTPUT_BYTES: u64 = super::archive::MAX_EXPANDED_BYTES;

/// Waits for `child`, reading at most [`MAX_OUTPUT_BYTES`] of its output (and a little of its
/// error output); a process that writes more is killed and reported.
async fn bounded_output(mut child: tokio::process::Child) -> std::io::Result<std::process::Output> {
    use tokio::io::AsyncReadExt;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return child.wait_with_output().await;
    };
    let mut out = Vec::new();
    let mut err = Vec::new();
    let reads = async {
        let mut limited = stdout.take(MAX_OUTPUT_BYTES + 1);
        // Error output past what a message shows is drained, so that git never blocks on it.
        let errors = async {
            let mut kept = stderr.take(64 * 1024);
            kept.read_to_end(&mut err).await?;
            tokio::io::copy(&mut kept.into_inner(), &mut tokio::io::sink()).await
        };
        tokio::try_join!(limited.read_to_end(&mut out), errors)
    };
    reads.await?;
    if out.len() as u64 > MAX_OUTPUT_BYTES {
        let _ = child.kill().await;
        return Err(std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!("git wrote more than {MAX_OUTPUT_BYTES} bytes; the module's folder is too large"),
        ));
    }
    let status = child.wait().await?;
    Ok(std::process::Output {
        status,
        stdout: out,
        stderr: err,
    })
}

/// How git is run.
#[derive(Debug, Clone)]
pub struct Git {
    pub binary: PathBuf,
    /// Folder for short-lived repositories and key files; each operation cleans up after itself.
    pub work_root: PathBuf,
    pub timeout: Duration,
}

/// How git reaches a repository's host: only at addresses the source policy checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The URL git is given: the repository's, or for `git://` one naming the checked address.
    pub url: String,
    /// `-c` settings before the command, such as the guard as HTTP proxy.
    pub config: Vec<String>,
    /// ssh options, such as the checked address to connect to.
    pub ssh_options: Vec<String>,
}

impl Route {
    /// Local repositories: nothing to check.
    pub fn direct(url: &str) -> Self {
        Self {
            url: url.to_string(),
            config: Vec::new(),
            ssh_options: Vec::new(),
        }
    }

    /// `http://` and `https://` through the guard at `proxy_url`, which checks every host
    /// git is sent to, redirects included.
    pub fn through_proxy(url: &str, proxy_url: &str) -> Self {
        Self {
            config: vec![format!("http.proxy={proxy_url}")],
            ..Self::direct(url)
        }
    }

    /// ssh to the checked `address` of `host`. The host key is still looked up under the
    /// host's name (as ssh names it in known_hosts: `host`, or `[host]:port` off port 22).
    pub fn ssh_pinned(url: &str, host: &str, port: Option<u16>, address: IpAddr) -> Self {
        let host = host.to_ascii_lowercase();
        let alias = match port {
            Some(port) if port != 22 => format!("[{host}]:{port}"),
            _ => host,
        };
        Self {
            ssh_options: vec![
                format!("HostName={address}"),
                format!("HostKeyAlias={alias}"),
                // The key was checked under the alias; the address is not looked up.
                "CheckHostIP=no".to_string(),
            ],
            ..Self::direct(url)
        }
    }

    /// `git://` to the checked `address`: the protocol has no host verification to keep,
    /// so the URL names the address. None for a URL that is not `git://host[:port]/path`.
    pub fn daemon_pinned(url: &str, port: Option<u16>, address: IpAddr) -> Option<Self> {
        let rest = url.strip_prefix("git://")?;
        let path = &rest[rest.find('/')?..];
        let host = match address {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        let url = match port {
            Some(port) => format!("git://{host}:{port}{path}"),
            None => format!("git://{host}{path}"),
        };
        Some(Self::direct(&url))
    }
}

/// A folder removed when dropped.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Git {
    /// The commit a branch, tag or the default branch points at now.
    pub async fn resolve(
        &self,
        reference: &GitReference,
        route: &Route,
        auth: &GitCredentials,
    ) -> Result<String, GitError> {
        let name = match &reference.revision {
            GitRevision::Commit(sha) => return Ok(sha.clone()),
            GitRevision::Head => "HEAD".to_string(),
            GitRevision::Named(name) => name.clone(),
        };
        let work = self.work_dir()?;
        let out = self
            .run(
                "ls-remote",
                (reference, route),
                auth,
                &work,
                &["ls-remote", "--", &route.url, &name],
            )
            .await?;
        pick_ref(&String::from_utf8_lossy(&out), &name).ok_or_else(|| GitError::UnknownRevision {
            url: reference.display_url(),
            revision: name,
        })
    }

    /// Fetches `revision` (a commit SHA, or a branch or tag name) with depth 1 and returns the
    /// commit it is and a tar of `path` at that commit.
    // Long only as its git commands are laid out: one sequence, clearer whole.
    pub async fn fetch(
        &self,
        reference: &GitReference,
        route: &Route,
        revision: &str,
        path: &ModulePath,
        auth: &GitCredentials,
    ) -> Result<(String, Vec<u8>), GitError> {
        let reference = (reference, route);
        let work = self.work_dir()?;
        let repo = work.0.join("repo");
        let repo_arg = repo.to_string_lossy().into_owned();
        self.run(
            "init",
            reference,
            auth,
            &work,
            &["init", "--quiet", "--bare", &repo_arg],
        )
        .await?;
        let git_dir = format!("--git-dir={repo_arg}");
        self.run(
            "fetch",
            reference,
            auth,
            &work,
            &[
                &git_dir,
                "fetch",
                "--quiet",
                "--depth=1",
                "--no-tags",
                "--",
                &route.url,
                revision,
            ],
        )
        .await?;
        let sha = self
            .run(
                "rev-parse",
                reference,
                auth,
                &work,
                &[&git_dir, "rev-parse", "FETCH_HEAD^{commit}"],
            )
            .await?;
        let sha = String::from_utf8_lossy(&sha).trim().to_string();
        let mut archive = vec![&git_dir as &str, "archive", "--format=tar", sha.as_str()];
        // A missing folder gets the whole commit, so that the error can list the folders
        // that hold .cue files.
        let folder = format!("{sha}:{}", path.as_str());
        if !path.as_str().is_empty()
            && self
                .run(
                    "rev-parse",
                    reference,
                    auth,
                    &work,
                    &[&git_dir, "rev-parse", "--verify", "--quiet", &folder],
                )
                .await
                .is_ok()
        {
            archive.extend(["--", path.as_str()]);
        }
        let tar = self.run("archive", reference, auth, &work, &archive).await?;
        Ok((sha, tar))
    }

    fn work_dir(&self) -> Result<WorkDir, GitError> {
        let dir = self.work_root.join(format!(
            "git-{}-{}",
            std::process::id(),
            WORK.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| GitError::Spawn {
            binary: self.binary.display().to_string(),
            message: format!("creating {}: {e}", dir.display()),
        })?;
        Ok(WorkDir(dir))
    }

    async fn run(
        &self,
        operation: &'static str,
        (reference, route): (&GitReference, &Route),
        auth: &GitCredentials,
        work: &WorkDir,
        args: &[&str],
    ) -> Result<Vec<u8>, GitError> {
        let mut command = self.isolated_command(route, work, args);
        configure_auth(&mut command, auth, &route.ssh_options, &work.0).map_err(|e| GitError::Spawn {
            binary: self.binary.display().to_string(),
            message: format!("writing credentials: {e}"),
        })?;
        let child = command.spawn().map_err(|e| GitError::Spawn {
            binary: self.binary.display().to_string(),
            message: e.to_string(),
        })?;
        let output = tokio::time::timeout(self.timeout, bounded_output(child))
            .await
            .map_err(|_| GitError::Timeout {
                operation,
                url: reference.display_url(),
                seconds: self.timeout.as_secs(),
            })?
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::FileTooLarge => GitError::Failed {
                    operation,
                    url: reference.display_url(),
                    message: e.to_string(),
                    unavailable: false,
                },
                _ => GitError::Spawn {
                    binary: self.binary.display().to_string(),
                    message: e.to_string(),
                },
            })?;
        if output.status.success() {
            return Ok(output.stdout);
        }
        let message = failure_message(&output, reference, route);
        Err(GitError::Failed {
            operation,
            url: reference.display_url(),
            unavailable: is_unavailable(&message),
            message,
        })
    }

    /// git with `args` in `work`, with the route's settings and nothing of the user's or the
    /// system's: no configuration, prompts or credential helpers.
    fn isolated_command(&self, route: &Route, work: &WorkDir, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        for setting in &route.config {
            command.args(["-c", setting]);
        }
        command
            .args(args)
            .current_dir(&work.0)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &work.0)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "/bin/false")
            .env("SSH_ASKPASS", "/bin/false")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }
}

/// What git said on failure, with the URL as shown to users (no credentials) and bounded.
fn failure_message(output: &std::process::Output, reference: &GitReference, route: &Route) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut message = stderr
        .replace(&reference.url, &reference.display_url())
        .replace(&route.url, &reference.display_url())
        .trim()
        .to_string();
    if message.len() > MAX_MESSAGE {
        let cut = (0..=MAX_MESSAGE)
            .rev()
            .find(|i| message.is_char_boundary(*i))
            .unwrap_or(0);
        message.truncate(cut);
    }
    if message.is_empty() {
        message = format!("exited with {}", output.status);
    }
    message
}

/// Passes credentials through the environment, never the command line (visible in `ps`),
/// and gives ssh the route's options. ssh reads no configuration file and never prompts.
fn configure_auth(
    command: &mut Command,
    auth: &GitCredentials,
    route_options: &[String],
    work: &Path,
) -> std::io::Result<()> {
    let mut ssh = String::from("ssh -F /dev/null -o BatchMode=yes");
    for option in route_options {
        ssh.push_str(" -o ");
        ssh.push_str(&shell_quote(option));
    }
    match auth {
        GitCredentials::Anonymous => {}
        GitCredentials::Basic { username, password } => {
            let header = format!(
                "Authorization: Basic {}",
                STANDARD.encode(format!("{username}:{password}"))
            );
            command
                .env("GIT_CONFIG_COUNT", "1")
                .env("GIT_CONFIG_KEY_0", "http.extraHeader")
                .env("GIT_CONFIG_VALUE_0", header);
        }
        GitCredentials::Ssh {
            private_key,
            known_hosts,
        } => {
            use std::os::unix::fs::OpenOptionsExt;
            let key = work.join("id");
            let hosts = work.join("known_hosts");
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&key)?;
            std::io::Write::write_all(&mut file, private_key.as_bytes())?;
            std::fs::write(&hosts, known_hosts)?;
            ssh.push_str(&format!(
                " -i {} -o IdentitiesOnly=yes -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes",
                shell_quote(&key.display().to_string()),
                shell_quote(&hosts.display().to_string())
            ));
        }
    }
    // git runs the command through the shell.
    command.env("GIT_SSH_COMMAND", ssh);
    Ok(())
}

/// `value` as one shell word: host names come from a Transform's URL.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "'\\''"))
}

/// Whether git's message says the server was unreachable or failing (git has no error codes).
fn is_unavailable(message: &str) -> bool {
    const SIGNS: [&str; 12] = [
        "could not resolve host",
        "connection refused",
        "connection timed out",
        "operation timed out",
        "failed to connect",
        "couldn't connect",
        "unable to connect",
        "connection reset",
        "the remote end hung up unexpectedly",
        "early eof",
        "returned error: 5",
        "no route to host",
    ];
    let message = message.to_ascii_lowercase();
    SIGNS.iter().any(|sign| message.contains(sign))
}

/// The commit of `name` in `git ls-remote` output: a peeled tag first, then a tag, a
/// branch, or an exact ref name (`HEAD`).
pub fn pick_ref(ls_remote: &str, name: &str) -> Option<String> {
    let refs: Vec<(&str, &str)> = ls_remote
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(sha, _)| is_commit_sha(sha))
        .collect();
    let wanted = [
        format!("refs/tags/{name}^{{}}"),
        format!("refs/tags/{name}"),
        format!("refs/heads/{name}"),
        name.to_string(),
    ];
    wanted
        .iter()
        .find_map(|w| refs.iter().find(|(_, r)| r == w).map(|(sha, _)| sha.to_string()))
}

#[cfg(test)]
mod tests {

    #[tokio::test]
    async fn output_past_the_bound_is_stopped_not_held() {
        let spawn = |script: &str| {
            tokio::process::Command::new("sh")
                .args(["-c", script])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap()
        };
        let over = format!("head -c {} /dev/zero", MAX_OUTPUT_BYTES + 1);
        let error = bounded_output(spawn(&over)).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::FileTooLarge);
        let within = bounded_output(spawn("printf module; printf warning >&2"))
            .await
            .unwrap();
        assert_eq!(
            (within.stdout.as_slice(), within.stderr.as_slice()),
            (&b"module"[..], &b"warning"[..])
        );
    }

    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";
    const C: &str = "3333333333333333333333333333333333333333";

    /// A listener standing in for a server, and the first bytes each connection sends.
    async fn witness() -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    // What arrives until the client waits for an answer.
                    let mut seen = Vec::new();
                    let mut chunk = vec![0; 1024];
                    let mut wait = Duration::from_secs(10);
                    while let Ok(Ok(read @ 1..)) = tokio::time::timeout(wait, stream.read(&mut chunk)).await {
                        seen.extend_from_slice(&chunk[..read]);
                        wait = Duration::from_millis(500);
                    }
                    let _ = tx.send(String::from_utf8_lossy(&seen).into_owned());
                });
            }
        });
        (port, rx)
    }

    async fn first_connection(seen: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
        let first = tokio::time::timeout(Duration::from_secs(30), seen.recv()).await;
        first.ok().flatten().expect("a connection to the witness")
    }

    fn git_in(dir: &tempfile::TempDir) -> Git {
        Git {
            binary: PathBuf::from("git"),
            work_root: dir.path().to_path_buf(),
            timeout: Duration::from_secs(20),
        }
    }

    #[tokio::test]
    async fn pinned_routes_connect_to_the_checked_address_without_resolving_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let git = git_in(&dir);
        let loopback = IpAddr::from([127, 0, 0, 1]);

        // The name does not resolve: a connection can only come from the pinned address.
        let (port, mut seen) = witness().await;
        let url = format!("git://pinned.invalid:{port}/platforms");
        let reference = GitReference::parse(&url).unwrap();
        let route = Route::daemon_pinned(&url, Some(port), loopback).unwrap();
        assert_eq!(route.url, format!("git://127.0.0.1:{port}/platforms"));
        let error = git
            .resolve(&reference, &route, &GitCredentials::Anonymous)
            .await
            .unwrap_err();
        assert!(
            !error.to_string().contains("127.0.0.1"),
            "messages name the URL as written: {error}"
        );
        let request = first_connection(&mut seen).await;
        assert!(request.contains("git-upload-pack /platforms"), "{request:?}");

        let (port, mut seen) = witness().await;
        let url = format!("ssh://git@pinned.invalid:{port}/platforms");
        let reference = GitReference::parse(&url).unwrap();
        let route = Route::ssh_pinned(&url, "pinned.invalid", Some(port), loopback);
        assert!(
            route
                .ssh_options
                .contains(&format!("HostKeyAlias=[pinned.invalid]:{port}"))
        );
        git.resolve(&reference, &route, &GitCredentials::Anonymous)
            .await
            .unwrap_err();
        let banner = first_connection(&mut seen).await;
        assert!(
            banner.starts_with("SSH-2.0-"),
            "ssh spoke to the pinned address: {banner:?}"
        );
    }

    #[tokio::test]
    async fn http_routes_go_through_the_guard_and_refusals_never_connect() {
        let dir = tempfile::tempdir().unwrap();
        let git = git_in(&dir);
        let guard = crate::source::guard::Guard::start().await.unwrap();

        let (port, mut seen) = witness().await;
        let url = format!("http://127.0.0.1:{port}/platforms");
        let reference = GitReference::parse(&url).unwrap();
        let route = Route::through_proxy(&url, &guard.proxy_url());
        git.resolve(&reference, &route, &GitCredentials::Anonymous)
            .await
            .unwrap_err();
        let request = first_connection(&mut seen).await;
        assert!(request.starts_with("GET /platforms/info/refs"), "{request:?}");
        assert_eq!(guard.refusal(), None);

        // As a redirect or a second answer would send git there.
        let url = "https://[::ffff:169.254.169.254]/platforms";
        let reference = GitReference::parse(url).unwrap();
        let route = Route::through_proxy(url, &guard.proxy_url());
        git.resolve(&reference, &route, &GitCredentials::Anonymous)
            .await
            .unwrap_err();
        assert!(guard.refusal().unwrap().contains("169.254.169.254"));
    }

    #[test]
    fn ssh_host_key_aliases_name_the_host_as_known_hosts_does() {
        let address = IpAddr::from([192, 0, 2, 1]);
        let default_port = Route::ssh_pinned("git@Git.Example.com:r", "Git.Example.com", None, address);
        assert!(
            default_port
                .ssh_options
                .contains(&"HostKeyAlias=git.example.com".to_string())
        );
        assert!(default_port.ssh_options.contains(&"HostName=192.0.2.1".to_string()));
        let port_22 = Route::ssh_pinned("ssh://h:22/r", "h", Some(22), address);
        assert!(port_22.ssh_options.contains(&"HostKeyAlias=h".to_string()));
        let v6 = Route::daemon_pinned("git://h/r", None, "2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!(v6.url, "git://[2001:db8::1]/r");
        assert_eq!(shell_quote("a'b"), "'a'\\''b'");
    }

    #[test]
    fn unreachable_servers_are_told_from_refusals() {
        assert!(is_unavailable(
            "fatal: unable to access 'https://git.example.com/r/': Could not resolve host: git.example.com"
        ));
        assert!(is_unavailable(
            "fatal: unable to connect to 127.0.0.1:\n127.0.0.1[0: 127.0.0.1]: errno=Connection refused"
        ));
        assert!(is_unavailable(
            "error: RPC failed; HTTP 503 curl 22 The requested URL returned error: 503"
        ));
        assert!(!is_unavailable(
            "remote: Repository not found.\nfatal: repository 'https://git.example.com/r/' not found"
        ));
        assert!(!is_unavailable(
            "fatal: Authentication failed for 'https://git.example.com/r/'"
        ));
    }

    #[test]
    fn picks_peeled_tags_then_tags_then_branches() {
        let out =
            format!("{A}\tHEAD\n{A}\trefs/heads/main\n{B}\trefs/tags/v1\n{C}\trefs/tags/v1^{{}}\n{B}\trefs/heads/v2\n");
        assert_eq!(pick_ref(&out, "v1").as_deref(), Some(C));
        assert_eq!(pick_ref(&out, "v2").as_deref(), Some(B));
        assert_eq!(pick_ref(&out, "main").as_deref(), Some(A));
        assert_eq!(pick_ref(&out, "HEAD").as_deref(), Some(A));
        assert_eq!(pick_ref(&out, "v3"), None);
        assert_eq!(pick_ref("garbage\tline\n", "line"), None);
    }
}
