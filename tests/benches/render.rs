//! Render benchmark: one input against a batch of 100, and a resync of unchanged inputs,
//! measured side by side in one run. `make bench-render` runs it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pequod::cue::{CueCli, ModuleFiles, Renderer, RendererConfig, render_input};
use pequod::metrics::Metrics;
use serde_json::{Value, json};

const ROUNDS: usize = 3;
const BATCH: usize = 100;

fn input(round: usize, i: usize) -> Value {
    let meta = serde_json::from_value(json!({"name": format!("app-{round}-{i}"), "namespace": "bench"})).unwrap();
    render_input(
        &meta,
        &json!({"image": "nginx:1.27", "port": 8080, "replicas": 1 + i % 5}),
    )
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let cue = std::env::var_os("PEQUOD_TEST_CUE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bin/cue"));
    let cache = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new().unwrap());
    // Under the operator's default memory limit, as in production.
    let cli = CueCli::new(&cue, Duration::from_secs(120), 2)
        .with_memory_limit(pequod::cue::process::DEFAULT_MEMORY_LIMIT_MIB * 1024 * 1024)
        .with_metrics(metrics.clone());
    let renderer = Renderer::new(cli, RendererConfig::new(cache.path()), metrics.clone());
    let invocations = || -> u64 {
        ["success", "error"]
            .iter()
            .map(|r| metrics.cue_invocations_total.with_label_values(&["export", r]).get())
            .sum()
    };

    // What any cue call costs before it evaluates anything: starting the process.
    let bare = CueCli::new(&cue, Duration::from_secs(20), 1);
    let mut starts = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        bare.version().await.unwrap();
        starts.push(started.elapsed());
    }
    let start_cost = median(starts);

    let module = renderer
        .load(ModuleFiles::embedded("webservice").unwrap(), "webservice")
        .await
        .unwrap();
    let started = Instant::now();
    renderer.schema(&module).await.unwrap();
    let schema_cold = started.elapsed();
    let started = Instant::now();
    renderer.schema(&module).await.unwrap();
    let schema_cached = started.elapsed();

    let mut one = Vec::new();
    let mut hundred = Vec::new();
    let mut hundred_calls = Vec::new();
    for round in 0..ROUNDS {
        let started = Instant::now();
        renderer.render(&module, input(round, 1_000_000)).await.unwrap();
        one.push(started.elapsed());

        let before = invocations();
        let started = Instant::now();
        let all = futures::future::join_all((0..BATCH).map(|i| renderer.render(&module, input(round, i)))).await;
        hundred.push(started.elapsed());
        hundred_calls.push(invocations() - before);
        assert!(all.iter().all(Result::is_ok));
    }

    let before = invocations();
    let started = Instant::now();
    for i in 0..BATCH {
        renderer.render(&module, input(0, i)).await.unwrap();
    }
    let resync = started.elapsed();
    let resync_calls = invocations() - before;

    let (one, hundred) = (median(one), median(hundred));
    println!("render benchmark (cue {}, {ROUNDS} rounds, medians)", cue.display());
    println!("  one cue call (cue version)    {:>10.3?}", start_cost);
    println!("  schema extraction, first      {:>10.3?}", schema_cold);
    println!("  schema extraction, cached     {:>10.3?}", schema_cached);
    println!("  1 instance                    {:>10.3?}", one);
    println!(
        "  {BATCH} instances at once         {:>10.3?}  cue calls per round: {hundred_calls:?}",
        hundred
    );
    println!(
        "  ratio {BATCH} / 1                  {:>10.2}x  (target <= 3x)",
        hundred.as_secs_f64() / one.as_secs_f64()
    );
    println!(
        "  resync of {BATCH} unchanged       {:>10.3?}  cue calls: {resync_calls}",
        resync
    );
}
