//! Remote module fetches: a cold fetch against a cached one, tags against digests, git against
//! OCI, and what a registry that never answers costs before and after its circuit opens.
//! Measured side by side in one run against a real registry and real git repositories.
//! `make bench-sources` runs it.

use pequod::error::ErrorCategory;
use pequod_testkit as support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use pequod::api::{CueRef, CueRefType};
use pequod::metrics::Metrics;
use pequod::source::credentials::RegistryCredentials;
use pequod::source::{Fetcher, FetcherConfig};
use support::remote::{GitRepo, Registry};

const ROUNDS: usize = 15;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{} µs", d.as_micros())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    }
}

fn cue_ref(type_: CueRefType, reference: &str, path: Option<&str>) -> CueRef {
    CueRef {
        type_,
        ref_: reference.to_string(),
        path: path.map(str::to_string),
        pull_secret_ref: None,
    }
}

fn fetcher(client: &kube::Client, cache: &std::path::Path, insecure: &[&str], timeout: Duration) -> Fetcher {
    let mut config = FetcherConfig::new(cache);
    config.insecure_registries = insecure.iter().map(|s| s.to_string()).collect();
    config.timeout = timeout;
    // The benchmark's git repository is a local folder.
    config.allow_local = true;
    Fetcher::new(client.clone(), config, Arc::new(Metrics::new().unwrap()))
}

/// Median time of `ROUNDS` fetches of `reference`, each by a fetcher from `make`.
async fn measure(make: &dyn Fn() -> Fetcher, reference: &CueRef) -> Duration {
    let mut times = Vec::new();
    for _ in 0..ROUNDS {
        let fetcher = make();
        let started = Instant::now();
        fetcher.fetch(reference, "bench", "bench").await.expect("fetch");
        times.push(started.elapsed());
    }
    median(times)
}

#[tokio::main]
async fn main() {
    // Registry and git fetches never use the apiserver; the client is never called.
    let client = kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
    let registry = Registry::start();
    let module = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/cue/platform/webservice/schema.cue"
    ))
    .unwrap_or_else(|_| support::modules::NOTE_MODULE.to_string());
    let digest = support::remote::publish(
        &registry.addr,
        "platforms/web",
        "v1",
        &module,
        &RegistryCredentials::Anonymous,
    )
    .await;
    let git_base = tempfile::tempdir().unwrap();
    let repo = GitRepo::new_in(git_base.path());
    let commit = repo.commit(&[("platforms/web/module.cue", &module)], "module");
    for i in 0..50 {
        repo.commit(&[(&format!("other/file-{i}.txt"), &"x".repeat(10_000))], "history");
    }
    let insecure = [registry.addr.as_str()];
    let timeout = Duration::from_secs(2);

    let oci_tag = cue_ref(CueRefType::Oci, &format!("{}/platforms/web:v1", registry.addr), None);
    let oci_digest = cue_ref(
        CueRefType::Oci,
        &format!("{}/platforms/web@{digest}", registry.addr),
        None,
    );
    let git_branch = cue_ref(
        CueRefType::Git,
        &format!("{}?ref=main", repo.file_url()),
        Some("platforms/web"),
    );
    let git_commit = cue_ref(
        CueRefType::Git,
        &format!("{}?ref={commit}", repo.file_url()),
        Some("platforms/web"),
    );

    let cold = || {
        let dir = tempfile::tempdir().unwrap().keep();
        fetcher(&client, &dir, &insecure, timeout)
    };
    let warm_dir = tempfile::tempdir().unwrap();
    let warm_fetcher = fetcher(&client, warm_dir.path(), &insecure, timeout);
    for r in [&oci_tag, &oci_digest, &git_branch, &git_commit] {
        warm_fetcher.fetch(r, "bench", "bench").await.expect("warm-up fetch");
    }
    let warm = || fetcher(&client, warm_dir.path(), &insecure, timeout);

    let rows = [
        (
            "OCI tag, cold cache (resolve, pull, verify, unpack)",
            measure(&cold, &oci_tag).await,
        ),
        ("OCI tag, cached (one manifest HEAD)", measure(&warm, &oci_tag).await),
        ("OCI digest, cached (no request)", measure(&warm, &oci_digest).await),
        (
            "git branch, cold cache (ls-remote, fetch --depth 1, archive)",
            measure(&cold, &git_branch).await,
        ),
        ("git branch, cached (one ls-remote)", measure(&warm, &git_branch).await),
        ("git commit, cached (no command)", measure(&warm, &git_commit).await),
    ];

    // A registry that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let dead = cue_ref(CueRefType::Oci, &format!("{silent_addr}/platforms/web:v1"), None);
    let dead_fetcher = fetcher(
        &client,
        tempfile::tempdir().unwrap().path(),
        &[silent_addr.as_str()],
        timeout,
    );
    let mut attempts = Vec::new();
    for _ in 0..6 {
        let started = Instant::now();
        let err = dead_fetcher.fetch(&dead, "bench", "bench").await.unwrap_err();
        attempts.push((started.elapsed(), err.reason()));
    }

    println!("| Fetch | Median of {ROUNDS} |");
    println!("| --- | --- |");
    for (what, time) in rows {
        println!("| {what} | {} |", ms(time));
    }
    println!();
    println!("A registry that never answers (--fetch-timeout=2):");
    println!();
    println!("| Attempt | Time | Reason |");
    println!("| --- | --- | --- |");
    for (i, (time, reason)) in attempts.iter().enumerate() {
        println!("| {} | {} | {reason} |", i + 1, ms(*time));
    }
    drop(silent);
}
