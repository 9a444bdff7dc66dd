//! The pequod binary in run mode: probes, metrics and shutdown as documented.

use std::time::Duration;

use crate::support::{self, OperatorProcess};

/// Starts a second operator. It reconciles beside the shared one, so it must reach the same
/// registries; otherwise the two would write different status for remote-module Transforms.
fn start_operator_with(kubeconfig: &std::path::Path, cue: &std::path::Path, flags: &[&str]) -> OperatorProcess {
    let registries = support::remote::shared_registries();
    let insecure = format!(
        "--insecure-registries={},{},{}",
        registries.open, registries.private, registries.token
    );
    let mut all = vec![insecure.as_str()];
    all.extend_from_slice(flags);
    OperatorProcess::start(kubeconfig, cue, &all)
}

fn start_operator(kubeconfig: &std::path::Path, cue: &std::path::Path) -> OperatorProcess {
    start_operator_with(
        kubeconfig,
        cue,
        &["--zap-log-level=debug", "--trusted-transform-namespaces=*"],
    )
}

async fn readyz(op: &OperatorProcess) -> Result<(u16, String), String> {
    support::http_get(&op.probes, "/readyz").await
}

#[tokio::test]
async fn readyz_reports_a_broken_cue_binary_and_passes_when_everything_works() {
    let env = support::env("operator-probes").await;
    support::install_crds(&env.client).await;

    let broken = start_operator(&env.kubeconfig, std::path::Path::new("/nonexistent/cue"));
    let body = support::wait_for(
        "readyz to show synced caches and a broken cue",
        Duration::from_secs(30),
        || async {
            match readyz(&broken).await {
                Ok((503, body))
                    if body.contains("[+] resourcegraph-controller ok") && body.contains("[-] cue failed") =>
                {
                    Ok(body)
                }
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert!(
        body.contains("/nonexistent/cue"),
        "readyz must say which binary failed: {body}"
    );
    assert!(body.contains("[+] transform-controller ok"), "{body}");
    let (status, body) = support::http_get(&broken.probes, "/healthz").await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("[+] resourcegraph-controller ok"), "{body}");
    assert!(body.contains("[+] transform-controller ok"), "{body}");
    drop(broken);

    // A binary that starts but fails even `cue version` is reported with its message.
    let dir = tempfile::tempdir().unwrap();
    let failing_cue = dir.path().join("cue");
    std::fs::write(
        &failing_cue,
        "#!/bin/sh\necho 'cue: corrupt installation' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&failing_cue, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let failing = start_operator(&env.kubeconfig, &failing_cue);
    support::wait_for("readyz to show the failing cue", Duration::from_secs(30), || async {
        match readyz(&failing).await {
            Ok((503, body)) if body.contains("[-] cue failed") && body.contains("corrupt installation") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    drop(failing);

    let cue = support::tool("cue", "PEQUOD_TEST_CUE");
    let working = start_operator(&env.kubeconfig, &cue);
    support::wait_for("readyz to pass", Duration::from_secs(60), || async {
        match readyz(&working).await {
            Ok((200, body)) => Ok(body),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    env.cleanup().await;
}

#[tokio::test]
async fn metrics_are_served_and_sigterm_stops_the_process() {
    let env = support::env("operator-metrics").await;
    support::install_crds(&env.client).await;
    let mut op = start_operator(&env.kubeconfig, &support::tool("cue", "PEQUOD_TEST_CUE"));

    let text = support::wait_for("/metrics to answer", Duration::from_secs(30), || async {
        match support::http_get(&op.metrics, "/metrics").await {
            Ok((200, body)) => Ok(body),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    for name in [
        "pequod_cue_cache_hits_total",
        "pequod_cue_cache_entries",
        "process_resident_memory_bytes",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}");
    }

    // SAFETY: signalling the child we started.
    unsafe {
        libc::kill(op.pid() as libc::pid_t, libc::SIGTERM);
    }
    let status = support::wait_for("pequod to exit after SIGTERM", Duration::from_secs(15), || {
        let status = op.try_wait();
        async move {
            match status {
                Ok(Some(status)) => Ok(status),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert!(status.success(), "pequod exited with {status}");
    env.cleanup().await;
}

#[tokio::test]
async fn secure_metrics_require_a_token_allowed_to_get_metrics() {
    let env = support::env("operator-secure-metrics").await;
    if env.external {
        return;
    }
    support::install_crds(&env.client).await;
    let reader_role = format!("{}-metrics-reader", env.namespace);
    let yaml = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: scraper\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: nobody\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: {reader_role}\nrules:\n- nonResourceURLs: [\"/metrics\"]\n  verbs: [\"get\"]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: {reader_role}\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: {reader_role}\n\
         subjects:\n- kind: ServiceAccount\n  name: scraper\n  namespace: {}\n",
        env.namespace
    );
    support::apply_yaml(&env.client, &env.namespace, &yaml).await;
    let scraper = support::service_account_token(&env.client, &env.namespace, "scraper").await;
    let nobody = support::service_account_token(&env.client, &env.namespace, "nobody").await;

    let cue = support::tool("cue", "PEQUOD_TEST_CUE");
    let op = start_operator_with(&env.kubeconfig, &cue, &["--metrics-secure"]);
    let (status, body) = support::wait_for("secure /metrics to answer", Duration::from_secs(30), || async {
        support::https_get(&op.metrics, "/metrics", Some(&scraper)).await
    })
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("pequod_reconcile_total"), "{body}");

    let (status, body) = support::https_get(&op.metrics, "/metrics", Some(&nobody))
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("nobody"), "{body}");
    let (status, _) = support::https_get(&op.metrics, "/metrics", None).await.unwrap();
    assert_eq!(status, 401);
    let (status, _) = support::https_get(&op.metrics, "/metrics", Some("not-a-token"))
        .await
        .unwrap();
    assert_eq!(status, 401);
    // A flood of made-up tokens from one client is held to that client's review budget
    // (answered 429 beyond it, nothing asked of the apiserver), while the scraper's token,
    // known already, keeps being answered without a review. On loopback every client has the
    // same address: that another client keeps its own budget is the unit tests' to show.
    let started = std::time::Instant::now();
    let flood = futures::future::join_all((0..100).map(|i| {
        let addr = op.metrics.clone();
        async move { support::https_get(&addr, "/metrics", Some(&format!("made-up-{i}"))).await }
    }));
    let scrapes = async {
        let mut statuses = Vec::new();
        for _ in 0..5 {
            statuses.push(
                support::https_get(&op.metrics, "/metrics", Some(&scraper))
                    .await
                    .map(|(s, _)| s),
            );
        }
        statuses
    };
    let (flooded, scraped) = tokio::join!(flood, scrapes);
    let seconds = started.elapsed().as_secs();
    assert!(
        scraped.iter().all(|s| *s == Ok(200)),
        "the scraper during the flood: {scraped:?}"
    );
    let answered = |code: u16| flooded.iter().filter(|r| matches!(r, Ok((c, _)) if *c == code)).count();
    let (reviewed, throttled) = (answered(401), answered(429));
    assert_eq!(reviewed + throttled, 100, "{flooded:?}");
    // At most 5 reviews a second for one client (counting the second the flood started in).
    assert!(
        (reviewed as u64) <= 5 * (seconds + 2),
        "{reviewed} made-up tokens reviewed in {seconds}s"
    );
    // The budget refills: a new token of another account is reviewed, not throttled.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = support::service_account_token(&env.client, &env.namespace, "nobody").await;
    let (status, body) = support::https_get(&op.metrics, "/metrics", Some(&fresh)).await.unwrap();
    assert_eq!(status, 403, "{body}");
    // Plain HTTP is not served on the secure port.
    assert!(!matches!(
        support::http_get(&op.metrics, "/metrics").await,
        Ok((200, _))
    ));
    // A client that connects and says nothing is let go once the handshake time is up.
    let mut silent = tokio::net::TcpStream::connect(&op.metrics).await.unwrap();
    let started = std::time::Instant::now();
    let mut buffer = [0u8; 16];
    let closed = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::AsyncReadExt::read(&mut silent, &mut buffer),
    )
    .await
    .expect("the operator closes a silent connection");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert!(started.elapsed() >= Duration::from_secs(5), "{:?}", started.elapsed());
    drop(op);

    // With an audience, only tokens meant for it are accepted.
    let op = start_operator_with(
        &env.kubeconfig,
        &cue,
        &["--metrics-secure", "--metrics-token-audiences=pequod-metrics"],
    );
    let meant = support::service_account_token_for(&env.client, &env.namespace, "scraper", "pequod-metrics").await;
    let (status, body) = support::wait_for("secure /metrics to answer", Duration::from_secs(30), || async {
        support::https_get(&op.metrics, "/metrics", Some(&meant)).await
    })
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = support::https_get(&op.metrics, "/metrics", Some(&scraper))
        .await
        .unwrap();
    assert_eq!(status, 401, "a token for the apiserver is refused: {body}");
    assert!(body.contains("pequod-metrics"), "{body}");
    env.cleanup().await;
}
