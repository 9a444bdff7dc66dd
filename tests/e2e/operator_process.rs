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
    assert_eq!(answered(200), 0, "a made-up token was let in: {flooded:?}");
    // A hundred connections at once on a loaded machine may lose one to its own timeout; every
    // one answered is refused.
    assert!(reviewed + throttled >= 95, "{flooded:?}");
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

/// `make install && make run` on a fresh cluster: only the CRDs exist, not the operator's
/// namespace, where it keeps its graph-signing key. The operator makes the namespace and
/// becomes Ready; one it cannot make is named on /readyz, with what to do.
#[tokio::test]
async fn a_missing_operator_namespace_is_created_or_named_on_readyz() {
    use k8s_openapi::api::core::v1::{Namespace, Secret};
    let env = support::env("operator-namespace").await;
    support::install_crds(&env.client).await;
    let namespaces: kube::Api<Namespace> = kube::Api::all(env.client.clone());
    let own = format!("{}-system", env.namespace);
    assert!(namespaces.get_opt(&own).await.unwrap().is_none());
    let cue = support::tool("cue", "PEQUOD_TEST_CUE");
    let launch = support::Launch {
        env: vec![("POD_NAMESPACE".into(), own.clone())],
        ..Default::default()
    };
    let op =
        support::OperatorProcess::start_with(&env.kubeconfig, &cue, &["--trusted-transform-namespaces=*"], &launch);
    let body = support::wait_for("readyz to pass", Duration::from_secs(60), || async {
        match readyz(&op).await {
            Ok((200, body)) => Ok(body),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(body.contains("[+] graph-signing-key ok"), "{body}");
    let made = namespaces.get(&own).await.unwrap();
    assert_eq!(
        made.metadata
            .labels
            .unwrap_or_default()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("pequod")
    );
    let secrets: kube::Api<Secret> = kube::Api::namespaced(env.client.clone(), &own);
    assert!(secrets.get_opt("pequod-graph-signing-key").await.unwrap().is_some());
    let log = std::fs::read_to_string(&op.log).unwrap();
    assert!(log.contains("created the operator's namespace"), "{log}");
    drop(op);
    namespaces.delete(&own, &Default::default()).await.unwrap();

    // A namespace the operator cannot create (here a name the apiserver refuses, as a typo in
    // POD_NAMESPACE gives): the process keeps running, unready, and says what is missing.
    let invalid = "Not_A_Namespace";
    let launch = support::Launch {
        env: vec![("POD_NAMESPACE".into(), invalid.into())],
        ..Default::default()
    };
    let mut op =
        support::OperatorProcess::start_with(&env.kubeconfig, &cue, &["--trusted-transform-namespaces=*"], &launch);
    let body = support::wait_for(
        "readyz to name the missing namespace",
        Duration::from_secs(60),
        || async {
            match readyz(&op).await {
                Ok((503, body)) if body.contains("[-] graph-signing-key failed: namespace") => Ok(body),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert!(body.contains(invalid), "{body}");
    assert!(op.try_wait().unwrap().is_none(), "the process waits instead of exiting");
    env.cleanup().await;
}

/// The default `:PORT` listens on IPv6 and IPv4.
#[tokio::test]
async fn a_port_alone_serves_ipv6_and_ipv4() {
    let env = support::env("operator-dual-stack").await;
    support::install_crds(&env.client).await;
    let launch = support::Launch {
        all_interfaces: true,
        ..Default::default()
    };
    let op = support::OperatorProcess::start_with(
        &env.kubeconfig,
        &support::tool("cue", "PEQUOD_TEST_CUE"),
        &["--trusted-transform-namespaces=*"],
        &launch,
    );
    let port = op.probes.rsplit_once(':').unwrap().1.to_string();
    let ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    for host in ["127.0.0.1", "[::1]"] {
        if host == "[::1]" && !ipv6 {
            continue;
        }
        let addr = format!("{host}:{port}");
        let (status, _) = support::wait_for(&format!("/healthz on {addr}"), Duration::from_secs(30), || async {
            support::http_get(&addr, "/healthz").await
        })
        .await;
        assert_eq!(status, 200, "{addr}");
        let metrics = format!("{host}:{}", op.metrics.rsplit_once(':').unwrap().1);
        let (status, body) = support::http_get(&metrics, "/metrics").await.unwrap();
        assert_eq!(status, 200, "{metrics}");
        assert!(body.contains("pequod_reconcile_total"), "{metrics}");
    }
    env.cleanup().await;
}
