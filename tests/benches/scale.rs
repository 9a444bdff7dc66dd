//! Scale benchmark against the local control plane: N instances of a module of three
//! ConfigMaps in a chain (a, then b, then c, each with an `Exists` gate), for each N in
//! `PEQUOD_SCALE_SIZES` (default 1000,5000,10000), side by side with the same 3N server-side
//! applies sent directly (4 in flight). Each size gets a fresh operator with default flags, and
//! for each it reports:
//! - time until every instance is Ready, and its ratio to the direct applies;
//! - the operator's writes and other requests, from the apiserver's audit log, per instance;
//! - operator CPU, resident memory after converging and its peak, the apiserver's CPU;
//! - cue processes started;
//! - a minute at rest, a resync (every graph touched) and a cold restart: writes and cue;
//! - the floor: the writes Pequod made for each instance, copied from a converged one and sent
//!   directly with the operator stopped (the instance's creation, its finalizer and status, the
//!   graph and its status, the three ConfigMaps), 4 instances in flight: what converging costs
//!   the apiserver at the least, whatever the operator does;
//! - teardown: every instance deleted until its ConfigMaps are gone.
//!
//! `make bench-scale` runs it; `PEQUOD_SCALE_SIZES=1000 make bench-scale` runs one size,
//! `PEQUOD_SCALE_FLAGS="--max-concurrent-reconciles=16"` adds operator flags, and
//! `PEQUOD_SCALE_QUICK=1` skips the minute at rest, the resync and the restart.
//! `PEQUOD_SCALE_REPLICAS=3` instead runs the first size on that many replicas sharing the
//! instances and graphs (`--shards`, two per replica; 1: one replica electing itself leader): time to all
//! Ready, writes, each replica's CPU and RSS, and how long the others take to hold the shards
//! of one killed. Run each replica count in a process of its own.

use pequod_testkit as support;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use pequod::api::Transform;
use serde_json::json;
use support::OperatorProcess;
use support::control_plane::{audit_mark, requests_since, writes_since};
use support::modules::{CHAIN_MODULE, put_module};
use support::transforms::{apply_transform, delete_transform};

const AT_REST: Duration = Duration::from_secs(60);
const DIRECT_IN_FLIGHT: usize = 4;
const CREATE_IN_FLIGHT: usize = 32;
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(3600);

fn sizes() -> Vec<usize> {
    std::env::var("PEQUOD_SCALE_SIZES")
        .unwrap_or_else(|_| "1000,5000,10000".into())
        .split(',')
        .map(|n| {
            n.trim()
                .parse()
                .expect("PEQUOD_SCALE_SIZES: numbers separated by commas")
        })
        .collect()
}

/// The operator with default flags, and those of `PEQUOD_SCALE_FLAGS` (separated by spaces).
fn start(env: &support::TestEnv) -> OperatorProcess {
    let extra = std::env::var("PEQUOD_SCALE_FLAGS").unwrap_or_default();
    let mut flags = vec!["--zap-log-level=warn", "--trusted-transform-namespaces=*"];
    flags.extend(extra.split_whitespace());
    OperatorProcess::start(
        &env.operator_kubeconfig,
        &support::tool("cue", "PEQUOD_TEST_CUE"),
        &flags,
    )
}

fn total(counts: &BTreeMap<String, u64>) -> u64 {
    counts.values().sum()
}

/// CPU seconds kube-apiserver has used so far.
fn apiserver_cpu_seconds() -> f64 {
    support::cpu_seconds_by_process()
        .get("kube-apiserver")
        .copied()
        .unwrap_or(0.0)
}

/// Which instances are Ready, kept by a watch: polling lists of 10,000 objects would load the
/// apiserver the benchmark measures.
#[derive(Clone, Default)]
struct Readiness(Arc<Mutex<HashMap<String, bool>>>);

impl Readiness {
    fn watch(api: Api<DynamicObject>) -> Self {
        let readiness = Self::default();
        let seen = readiness.0.clone();
        tokio::spawn(
            watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .for_each(move |obj| {
                    if let Ok(obj) = obj {
                        let ready = obj.data["status"]["conditions"]
                            .as_array()
                            .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
                        let name = obj.metadata.name.unwrap_or_default();
                        seen.lock().unwrap().insert(name, ready);
                    }
                    futures::future::ready(())
                }),
        );
        readiness
    }

    fn ready(&self) -> usize {
        self.0.lock().unwrap().values().filter(|r| **r).count()
    }

    async fn wait_all(&self, count: usize, started: Instant) {
        loop {
            let ready = self.ready();
            if ready >= count {
                return;
            }
            assert!(
                started.elapsed() < CONVERGE_TIMEOUT,
                "only {ready} of {count} instances Ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// 3N ConfigMaps server-side applied directly, [`DIRECT_IN_FLIGHT`] at a time.
async fn direct_applies(n: usize) -> Duration {
    let env = support::env(&format!("scale-direct-{n}")).await;
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    let started = Instant::now();
    futures::stream::iter(0..n * 3)
        .for_each_concurrent(DIRECT_IN_FLIGHT, |i| {
            let cms = cms.clone();
            async move {
                let name = format!("d{}-{}", i / 3, ["a", "b", "c"][i % 3]);
                let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"value": "x"}});
                cms.patch(&name, &PatchParams::apply("bench").force(), &Patch::Apply(cm))
                    .await
                    .unwrap();
            }
        })
        .await;
    let took = started.elapsed();
    env.cleanup().await;
    took
}

struct Run {
    n: usize,
    direct: Duration,
    converged: Duration,
    writes: BTreeMap<String, u64>,
    requests: BTreeMap<String, u64>,
    operator_cpu: f64,
    apiserver_cpu: f64,
    rss: f64,
    peak_rss: f64,
    cue: f64,
    rest_writes: u64,
    rest_cue: f64,
    resync_writes: BTreeMap<String, u64>,
    resync_cue: f64,
    restart: Duration,
    restart_writes: BTreeMap<String, u64>,
    restart_cue: f64,
    restart_rss: f64,
    /// The writes Pequod made, sent directly (see [`floor_writes`]).
    floor: Duration,
    /// None for the last size, whose teardown is not waited for.
    teardown: Option<Duration>,
}

async fn cue_processes(operator: &OperatorProcess) -> f64 {
    support::metric_sum(&operator.metrics, "pequod_cue_invocations_total").await
}

async fn reconciles(operator: &OperatorProcess, controller: &str) -> f64 {
    support::metric_sum(
        &operator.metrics,
        &format!("pequod_reconcile_total{{controller=\"{controller}\""),
    )
    .await
}

/// The writes Pequod made for instance `c0`, copied: its ConfigMaps, its graph and the status
/// of both (metadata the apiserver sets and owner references left out).
struct Converged {
    instance_status: serde_json::Value,
    graph: serde_json::Value,
    configmaps: Vec<serde_json::Value>,
}

impl Converged {
    async fn read(env: &support::TestEnv, instances: &Api<DynamicObject>) -> Self {
        let instance = instances.get("c0").await.unwrap();
        let graph_name = instance.data["status"]["resourceGraph"].as_str().unwrap().to_string();
        let graphs = support::graph_api(&env.client, &env.namespace).await;
        let cms: Api<DynamicObject> = support::dynamic_api(&env.client, "v1", "ConfigMap", &env.namespace).await;
        let mut configmaps = Vec::new();
        for suffix in ["a", "b", "c"] {
            configmaps.push(portable(&cms.get(&format!("c0-{suffix}")).await.unwrap()));
        }
        Self {
            instance_status: instance.data["status"].clone(),
            graph: portable(&graphs.get(&graph_name).await.unwrap()),
            configmaps,
        }
    }
}

/// The object as it could be applied elsewhere: name, labels, annotations and body.
fn portable(obj: &DynamicObject) -> serde_json::Value {
    let mut value = serde_json::to_value(obj).unwrap();
    let meta = &obj.metadata;
    value["metadata"] = json!({"labels": meta.labels, "annotations": meta.annotations});
    value
}

/// Sends the writes of `n` converged instances directly (see [`Converged`]), with no operator
/// running, [`DIRECT_IN_FLIGHT`] instances at a time; each instance's writes in Pequod's order.
/// The namespace is deleted after, and waited for when `wait_gone`.
async fn floor_writes(n: usize, api_version: &str, converged: &Converged, wait_gone: bool) -> Duration {
    let env = support::env(&format!("scale-floor-{n}")).await;
    let instances = support::dynamic_api(&env.client, api_version, "Chain", &env.namespace).await;
    let graphs = support::graph_api(&env.client, &env.namespace).await;
    let cms: Api<DynamicObject> = support::dynamic_api(&env.client, "v1", "ConfigMap", &env.namespace).await;
    let apply = PatchParams::apply("bench-floor").force();
    let named = |template: &serde_json::Value, name: &str| {
        let mut object = template.clone();
        object["metadata"]["name"] = json!(name);
        object
    };
    let started = Instant::now();
    futures::stream::iter(0..n)
        .for_each_concurrent(DIRECT_IN_FLIGHT, |i| {
            let (instances, graphs, cms, apply) = (instances.clone(), graphs.clone(), cms.clone(), apply.clone());
            async move {
                let name = format!("f{i}");
                let instance = json!({"apiVersion": api_version, "kind": "Chain", "metadata": {"name": name},
                                      "spec": {"value": format!("v{i}")}});
                instances.patch(&name, &apply, &Patch::Apply(instance)).await.unwrap();
                // The finalizer's write; a label, so that the namespace goes without an operator.
                let label = json!({"metadata": {"labels": {"bench.pequod.io/floor": "yes"}}});
                instances
                    .patch(&name, &PatchParams::default(), &Patch::Merge(label))
                    .await
                    .unwrap();
                let graph = named(&converged.graph, &name);
                graphs.patch(&name, &apply, &Patch::Apply(&graph)).await.unwrap();
                let status =
                    json!({"apiVersion": graph["apiVersion"], "kind": graph["kind"], "status": graph["status"]});
                graphs.patch_status(&name, &apply, &Patch::Apply(status)).await.unwrap();
                for (cm, suffix) in converged.configmaps.iter().zip(["a", "b", "c"]) {
                    let cm_name = format!("{name}-{suffix}");
                    cms.patch(&cm_name, &apply, &Patch::Apply(named(cm, &cm_name)))
                        .await
                        .unwrap();
                }
                let status = json!({"apiVersion": api_version, "kind": "Chain", "status": converged.instance_status});
                instances
                    .patch_status(&name, &apply, &Patch::Apply(status))
                    .await
                    .unwrap();
            }
        })
        .await;
    let took = started.elapsed();
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(env.client.clone());
    let namespace = env.namespace.clone();
    env.cleanup().await;
    if !wait_gone {
        return took;
    }
    // Gone before an operator starts again, so that none reconciles what is left of it.
    support::wait_for("the floor's namespace gone", CONVERGE_TIMEOUT, || async {
        match namespaces.get_opt(&namespace).await.unwrap() {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        }
    })
    .await;
    took
}

/// Waits until `operator` has reconciled every one of `n` instances and graphs.
async fn wait_reconciled(operator: &OperatorProcess, n: usize, what: &str) {
    support::wait_for(what, CONVERGE_TIMEOUT, || async {
        let (i, g) = (
            reconciles(operator, "instance").await,
            reconciles(operator, "resourcegraph").await,
        );
        if i >= n as f64 && g >= n as f64 {
            Ok(())
        } else {
            Err(format!("{i} instances, {g} graphs"))
        }
    })
    .await;
}

/// Serves the kind `Chain` of `group` from the chain module (put beforehand): the Transforms'
/// API, the kind's apiVersion and its instances' API.
async fn serve_chain(env: &support::TestEnv, group: &str) -> (Api<Transform>, String, Api<DynamicObject>) {
    let transforms: Api<Transform> = Api::namespaced(env.client.clone(), &env.namespace);
    apply_transform(
        &transforms,
        "chain",
        json!({"cueRef": {"type": "configmap", "ref": "chain-module"}, "group": group,
               "managedResources": [{"resources": ["configmaps"]}]}),
    )
    .await;
    support::wait_transform_ready(&transforms, "chain").await;
    let api_version = format!("{group}/v1alpha1");
    let instances = support::dynamic_api(&env.client, &api_version, "Chain", &env.namespace).await;
    (transforms, api_version, instances)
}

/// Creates instances `c0` to `c<n-1>`, `CREATE_IN_FLIGHT` at a time.
async fn create_instances(instances: &Api<DynamicObject>, api_version: &str, n: usize) {
    futures::stream::iter(0..n)
        .for_each_concurrent(CREATE_IN_FLIGHT, |i| async move {
            let spec = json!({"value": format!("v{i}")});
            support::instances::apply_instance(instances, api_version, "Chain", &format!("c{i}"), spec).await;
        })
        .await;
}

/// Measures `n` instances; the teardown is measured (and waited for) unless `last`: the
/// control plane goes with the benchmark.
async fn run(n: usize, last: bool) -> Run {
    let direct = direct_applies(n).await;

    let env = support::env(&format!("scale-{n}")).await;
    let group = format!("{}.bench.example.com", env.namespace);
    put_module(&env.client, &env.namespace, "chain-module", CHAIN_MODULE).await;
    let mut operator = start(&env);
    let (transforms, api_version, instances) = serve_chain(&env, &group).await;
    let readiness = Readiness::watch(instances.clone());

    let mark = audit_mark();
    let (cue_before, cpu_before, apiserver_before) = (
        cue_processes(&operator).await,
        operator.cpu_seconds(),
        apiserver_cpu_seconds(),
    );
    let started = Instant::now();
    create_instances(&instances, &api_version, n).await;
    readiness.wait_all(n, started).await;
    let converged = started.elapsed();
    // Status writes that trail the last Ready are part of converging.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (writes, requests) = (writes_since(mark), requests_since(mark));
    let operator_cpu = operator.cpu_seconds() - cpu_before;
    let apiserver_cpu = apiserver_cpu_seconds() - apiserver_before;
    let cue = cue_processes(&operator).await - cue_before;
    let (rss, peak_rss) = (operator.rss_mib(), operator.peak_rss_mib());

    let quick = std::env::var_os("PEQUOD_SCALE_QUICK").is_some();
    let mark = audit_mark();
    let cue_before = cue_processes(&operator).await;
    tokio::time::sleep(if quick { Duration::ZERO } else { AT_REST }).await;
    let rest_writes = total(&writes_since(mark));
    let rest_cue = cue_processes(&operator).await - cue_before;

    // Resync: touching each graph brings it and its instance through a reconcile. The touches
    // are the benchmark's writes, not the operator's.
    let graphs = support::graph_api(&env.client, &env.namespace).await;
    let graph_names: Vec<String> = graphs
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|g| g.metadata.name)
        .collect();
    let (reconciled_before, cue_before) = (reconciles(&operator, "instance").await, cue_processes(&operator).await);
    let mark = audit_mark();
    futures::stream::iter(if quick { Vec::new() } else { graph_names })
        .for_each_concurrent(CREATE_IN_FLIGHT, |name| {
            let graphs = graphs.clone();
            async move {
                let patch = json!({"metadata": {"labels": {"bench.pequod.io/touched": "yes"}}});
                graphs
                    .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .unwrap();
            }
        })
        .await;
    support::wait_for("every instance reconciled again", CONVERGE_TIMEOUT, || async {
        let done = reconciles(&operator, "instance").await - reconciled_before;
        if quick || done >= n as f64 {
            Ok(())
        } else {
            Err(format!("{done}"))
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let resync_writes = writes_since(mark);
    let resync_cue = cue_processes(&operator).await - cue_before;

    // Cold restart: nothing changed, so nothing is written.
    let mark = audit_mark();
    let started = Instant::now();
    if !quick {
        operator.kill();
        operator = start(&env);
    }
    wait_reconciled(&operator, n, "every instance reconciled after the restart").await;
    let restart = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let restart_writes = writes_since(mark);
    let restart_cue = cue_processes(&operator).await;
    let restart_rss = operator.rss_mib();

    let converged_writes = Converged::read(&env, &instances).await;
    operator.kill();
    // The last size's operator is not started again, so its floor's namespace need not be gone.
    let floor = floor_writes(n, &api_version, &converged_writes, !last).await;

    let mut measured = Run {
        n,
        direct,
        converged,
        writes,
        requests,
        operator_cpu,
        apiserver_cpu,
        rss,
        peak_rss,
        cue,
        rest_writes,
        rest_cue,
        resync_writes,
        resync_cue,
        restart,
        restart_writes,
        restart_cue,
        restart_rss,
        floor,
        teardown: None,
    };
    if last {
        return measured;
    }
    let operator = start(&env);
    wait_reconciled(&operator, n, "every instance reconciled after the floor").await;
    let started = Instant::now();
    futures::stream::iter(0..n)
        .for_each_concurrent(CREATE_IN_FLIGHT, |i| {
            let instances = instances.clone();
            async move {
                match instances.delete(&format!("c{i}"), &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => panic!("delete instance c{i}: {e}"),
                }
            }
        })
        .await;
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.namespace);
    support::wait_for("every instance and its ConfigMaps gone", CONVERGE_TIMEOUT, || async {
        let left = instances
            .list_metadata(&ListParams::default().limit(1))
            .await
            .unwrap()
            .items
            .len()
            + cms
                .list_metadata(
                    &ListParams::default()
                        .labels("app.kubernetes.io/managed-by=pequod")
                        .limit(1),
                )
                .await
                .unwrap()
                .items
                .len();
        if left == 0 {
            Ok(())
        } else {
            Err("objects left".to_string())
        }
    })
    .await;
    let teardown = started.elapsed();
    delete_transform(&transforms, "chain").await;
    drop(operator);
    env.cleanup().await;

    measured.teardown = Some(teardown);
    measured
}

fn report(r: &Run) {
    let n = r.n as f64;
    let reads = total(&r.requests) - total(&r.writes);
    println!("{} instances ({} ConfigMaps):", r.n, r.n * 3);
    println!(
        "  direct applies ({DIRECT_IN_FLIGHT} in flight)       {:>8.1} s",
        r.direct.as_secs_f64()
    );
    println!(
        "  all Ready                           {:>8.1} s   ({:.1}x the direct applies)",
        r.converged.as_secs_f64(),
        r.converged.as_secs_f64() / r.direct.as_secs_f64()
    );
    println!(
        "  floor: its writes sent directly     {:>8.1} s   (all Ready is {:.1}x the floor; the floor is {:.1}x the direct applies)",
        r.floor.as_secs_f64(),
        r.converged.as_secs_f64() / r.floor.as_secs_f64(),
        r.floor.as_secs_f64() / r.direct.as_secs_f64()
    );
    println!(
        "  operator writes                     {:>8}     ({:.2} per instance) {:?}",
        total(&r.writes),
        total(&r.writes) as f64 / n,
        r.writes
    );
    println!(
        "  operator reads and watches          {:>8}     ({:.2} per instance) {:?}",
        reads,
        reads as f64 / n,
        r.requests
            .iter()
            .filter(|(k, _)| !r.writes.contains_key(*k))
            .collect::<BTreeMap<_, _>>()
    );
    println!(
        "  operator CPU                        {:>8.1} s   ({:.2} ms per instance)",
        r.operator_cpu,
        r.operator_cpu * 1000.0 / n
    );
    println!("  kube-apiserver CPU                  {:>8.1} s", r.apiserver_cpu);
    println!(
        "  operator RSS after / peak           {:>8.1} / {:.1} MiB",
        r.rss, r.peak_rss
    );
    println!("  cue processes                       {:>8}", r.cue);
    println!(
        "  {} s at rest: writes, cue           {:>8} , {}",
        AT_REST.as_secs(),
        r.rest_writes,
        r.rest_cue
    );
    println!(
        "  resync: writes, cue                 {:>8} , {}   {:?}",
        total(&r.resync_writes),
        r.resync_cue,
        r.resync_writes
    );
    println!(
        "  cold restart: every object reconciled {:>6.1} s, writes {}, cue {}, RSS {:.1} MiB {:?}",
        r.restart.as_secs_f64(),
        total(&r.restart_writes),
        r.restart_cue,
        r.restart_rss,
        r.restart_writes
    );
    if let Some(teardown) = r.teardown {
        println!(
            "  teardown: all deleted               {:>8.1} s",
            teardown.as_secs_f64()
        );
    }
}

/// Replicas sharing the instances and graphs in `SHARDS_PER_REPLICA` shards each (`PEQUOD_SCALE_REPLICAS`).
const SHARDS_PER_REPLICA: usize = 2;

/// What `replicas` operators sharing instances and graphs did for `n` instances.
struct Shared {
    replicas: usize,
    converged: Duration,
    writes: BTreeMap<String, u64>,
    /// CPU seconds and RSS (MiB) of each replica, the leader first.
    per_replica: Vec<(f64, f64)>,
    /// From killing one replica that does not lead until its shards are held by the others.
    failover: Duration,
}

/// `n` instances on `replicas` operators, the first one leading.
async fn run_shared(n: usize, replicas: usize) -> Shared {
    let env = support::env(&format!("scale-shared-{n}")).await;
    let group = format!("{}.bench.example.com", env.namespace);
    put_module(&env.client, &env.namespace, "chain-module", CHAIN_MODULE).await;
    let shards = if replicas == 1 {
        1
    } else {
        replicas * SHARDS_PER_REPLICA
    };
    let flags = [
        "--zap-log-level=warn".to_string(),
        "--trusted-transform-namespaces=*".to_string(),
        "--leader-elect".to_string(),
        format!("--leader-election-namespace={}", env.namespace),
        format!("--shards={shards}"),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let cue = support::tool("cue", "PEQUOD_TEST_CUE");
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(env.client.clone(), &env.namespace);
    let holders = || async {
        let mut holders = BTreeMap::new();
        for shard in 0..shards {
            let lease = leases
                .get_opt(&format!("pequod-leader-shard-{shard}"))
                .await
                .ok()
                .flatten();
            if let Some(h) = lease.and_then(|l| l.spec?.holder_identity).filter(|h| !h.is_empty()) {
                *holders.entry(h).or_insert(0usize) += 1;
            }
        }
        holders
    };
    let mut operators = vec![OperatorProcess::start(&env.operator_kubeconfig, &cue, &flags)];
    support::wait_for("the first replica to lead", CONVERGE_TIMEOUT, || async {
        match leases.get_opt("pequod-leader").await {
            Ok(Some(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    for _ in 1..replicas {
        operators.push(OperatorProcess::start(&env.operator_kubeconfig, &cue, &flags));
    }
    support::wait_for("every replica to hold its shards", CONVERGE_TIMEOUT, || async {
        let h = holders().await;
        if replicas == 1 || (h.len() == replicas && h.values().all(|c| *c == SHARDS_PER_REPLICA)) {
            Ok(())
        } else {
            Err(format!("{h:?}"))
        }
    })
    .await;
    let (_, api_version, instances) = serve_chain(&env, &group).await;
    let readiness = Readiness::watch(instances.clone());

    let mark = audit_mark();
    let cpu_before: Vec<f64> = operators.iter().map(OperatorProcess::cpu_seconds).collect();
    let started = Instant::now();
    create_instances(&instances, &api_version, n).await;
    readiness.wait_all(n, started).await;
    let converged = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let writes = support::control_plane::writes_in(mark, &env.namespace);
    let per_replica = operators
        .iter()
        .zip(cpu_before)
        .map(|(o, before)| (o.cpu_seconds() - before, o.rss_mib()))
        .collect();

    let killed = Instant::now();
    if replicas > 1
        && let Some(last) = operators.pop()
    {
        last.kill();
    }
    support::wait_for("the others to hold every shard", CONVERGE_TIMEOUT, || async {
        if replicas == 1 {
            return Ok(());
        }
        let h = holders().await;
        if h.len() == replicas - 1 && h.values().sum::<usize>() == shards {
            Ok(())
        } else {
            Err(format!("{h:?}"))
        }
    })
    .await;
    let failover = killed.elapsed();
    drop(operators);
    env.cleanup().await;
    Shared {
        replicas,
        converged,
        writes,
        per_replica,
        failover,
    }
}

fn report_shared(n: usize, r: &Shared) {
    let shards = if r.replicas == 1 {
        1
    } else {
        r.replicas * SHARDS_PER_REPLICA
    };
    println!("{n} instances on {} replica(s), {shards} shard(s):", r.replicas);
    println!(
        "  all Ready                           {:>8.1} s",
        r.converged.as_secs_f64()
    );
    println!(
        "  operator writes                     {:>8}     ({:.2} per instance)",
        total(&r.writes),
        total(&r.writes) as f64 / n as f64
    );
    for (i, (cpu, rss)) in r.per_replica.iter().enumerate() {
        let role = if i == 0 { "leader" } else { "replica" };
        println!("  {role} {i}: CPU {cpu:>6.1} s, RSS {rss:>6.1} MiB");
    }
    if r.replicas > 1 {
        println!(
            "  a replica killed: its shards held by the others after {:.1} s",
            r.failover.as_secs_f64()
        );
    }
}

#[tokio::main]
async fn main() {
    let admin = support::env("scale-crds").await;
    support::install_crds(&admin.client).await;
    if let Ok(replicas) = std::env::var("PEQUOD_SCALE_REPLICAS") {
        // One size: a run's instances outlive it, and would be torn down during the next.
        let replicas = replicas
            .trim()
            .parse::<usize>()
            .expect("PEQUOD_SCALE_REPLICAS: a count");
        let n = sizes()[0];
        report_shared(n, &run_shared(n, replicas.max(1)).await);
        return;
    }
    println!(
        "operator flags: defaults {}",
        std::env::var("PEQUOD_SCALE_FLAGS").unwrap_or_default()
    );
    let mut runs = Vec::new();
    let sizes = sizes();
    for (i, n) in sizes.iter().enumerate() {
        let r = run(*n, i + 1 == sizes.len()).await;
        report(&r);
        runs.push(r);
    }
    if let Some(first) = runs.first() {
        println!("growth against {} instances:", first.n);
        for r in &runs[1..] {
            let per = |v: f64, base: f64| v / base;
            println!(
                "  {:>6}: {:.1}x the instances, {:.2}x the time, {:.2}x the operator CPU, RSS +{:.1} MiB ({:.1} KiB per added instance)",
                r.n,
                r.n as f64 / first.n as f64,
                per(r.converged.as_secs_f64(), first.converged.as_secs_f64()),
                per(r.operator_cpu, first.operator_cpu),
                r.rss - first.rss,
                (r.rss - first.rss) * 1024.0 / (r.n - first.n) as f64
            );
        }
    }
}
