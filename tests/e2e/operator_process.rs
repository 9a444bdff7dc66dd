//! The pequod binary in run mode: probes, metrics and shutdown as documented.

use std::time::Duration;

use crate::support::{self, OperatorProcess};

fn start_operator(kubeconfig: &std::path::Path, cue: &std::path::Path) -> OperatorProcess {
    OperatorProcess::start(kubeconfig, cue, &["--zap-log-level=debug"])
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
