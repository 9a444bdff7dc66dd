//! Prometheus metrics. Every metric the README documents is defined here, once, with its
//! documented name, type and labels; the code that does the work records into it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus::core::Collector;
use prometheus::proto::MetricType;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// All of Pequod's metrics and the registry that serves them.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub reconcile_total: IntCounterVec,
    pub reconcile_duration_seconds: HistogramVec,
    pub reconcile_errors_total: IntCounterVec,
    pub dag_nodes_total: IntGaugeVec,
    pub dag_execution_duration_seconds: HistogramVec,
    pub dag_node_execution_duration_seconds: HistogramVec,
    pub apply_total: IntCounterVec,
    pub apply_duration_seconds: HistogramVec,
    pub resources_managed: IntGaugeVec,
    pub adoption_total: IntCounterVec,
    pub adoption_duration_seconds: Histogram,
    pub cue_cache_hits_total: IntCounter,
    pub cue_cache_misses_total: IntCounter,
    pub cue_cache_evictions_total: IntCounter,
    pub cue_cache_entries: IntGauge,
    /// Shards of ResourceGraphs this replica holds (with `--shards` above 1).
    pub shards_held: IntGauge,
    pub cue_cache_size_bytes: IntGauge,
    pub cue_fetch_duration_seconds: HistogramVec,
    pub cue_fetch_total: IntCounterVec,
    pub cue_render_duration_seconds: HistogramVec,
    pub cue_render_errors_total: IntCounterVec,
    pub cue_invocations_total: IntCounterVec,
    /// One cue call converting instances' specs between versions of a module's API.
    pub conversion_duration_seconds: HistogramVec,
    pub policy_violations_total: IntCounterVec,
    /// Instances of each Transform's rollout by state: updated, pending, failed, pinned.
    pub rollout_instances: IntGaugeVec,
    /// 1 for the phase each Transform's rollout is in, 0 for the others.
    pub rollout_phase: IntGaugeVec,
    pub rollout_batches_total: IntCounterVec,
    /// Instances a storage migration rewrote into their kind's storage version.
    pub storage_migration_objects_total: IntCounterVec,
    /// Instances a storage migration has still to rewrite.
    pub storage_migration_remaining: IntGaugeVec,
    /// Reconciles due that wait for a free worker, per controller.
    pub reconcile_queue_depth: IntGaugeVec,
    /// How long the longest-waiting of them has waited, per controller (set at each scrape).
    pub reconcile_queue_oldest_wait_seconds: GaugeVec,
    /// Conversion reviews answered, by result: success, failure or invalid.
    pub conversion_requests_total: IntCounterVec,
    /// Objects converted in reviews answered Success.
    pub conversion_objects_total: IntCounter,
    waiting: Arc<Waiting>,
    /// Every metric above, as registered, for [`Metrics::describe`].
    registered: Arc<Vec<Box<dyn Collector>>>,
}

/// One of Pequod's metrics as registered: what the README's tables promise of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Description {
    pub name: String,
    /// `Counter`, `Gauge` or `Histogram`, as the README writes them.
    pub kind: &'static str,
    /// Label names in the order they were declared.
    pub labels: Vec<String>,
}

/// The registry, and a handle on every metric registered with it, so that each can be
/// described before it has a sample (a labelled family is exported only once it has one).
struct Registrar {
    registry: Registry,
    registered: Mutex<Vec<Box<dyn Collector>>>,
}

impl Registrar {
    fn register<C: Collector + Clone + 'static>(&self, metric: &C) -> Result<(), prometheus::Error> {
        self.registry.register(Box::new(metric.clone()))?;
        self.registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(metric.clone()));
        Ok(())
    }
}

/// Bounds of reconcile, render, fetch and graph-execution histograms, 5 ms to 20 minutes. Every
/// threshold the operations guide and `config/prometheus/rules.yaml` alert on (30 s, 60 s,
/// 5 min) is a bound, with buckets above it, so that `histogram_quantile` can pass it exactly.
pub const SLOW_BUCKETS: [f64; 17] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
];

/// Bounds of single API requests (applies, adoptions), 1 ms to 1 minute; the apply alert's
/// 10 s is a bound.
pub const FAST_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

fn slow_buckets() -> Vec<f64> {
    SLOW_BUCKETS.to_vec()
}

fn fast_buckets() -> Vec<f64> {
    FAST_BUCKETS.to_vec()
}

/// Reconciles waiting for a worker: when each started waiting, per controller.
#[derive(Default)]
struct Waiting {
    next: std::sync::atomic::AtomicU64,
    since: Mutex<HashMap<&'static str, BTreeMap<u64, Instant>>>,
}

/// One reconcile's place in its controller's queue: counted in
/// `pequod_reconcile_queue_depth` from [`Metrics::queued`] until dropped.
pub struct QueuedReconcile {
    waiting: Arc<Waiting>,
    depth: IntGauge,
    controller: &'static str,
    ticket: u64,
}

impl Drop for QueuedReconcile {
    fn drop(&mut self) {
        self.depth.dec();
        let mut since = self.waiting.since.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tickets) = since.get_mut(self.controller) {
            tickets.remove(&self.ticket);
        }
    }
}

impl Metrics {
    /// Builds and registers every metric. Fails only on a programming error (a duplicate or
    /// malformed metric), so it is called once at start-up.
    // Long, but one flat table of every metric's name, help and labels: clearer whole.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registrar = Registrar {
            registry: Registry::new(),
            registered: Mutex::default(),
        };
        let r = &registrar;
        let metrics = Self {
            reconcile_total: counter_vec(
                r,
                "pequod_reconcile_total",
                "Total reconciliations",
                &["controller", "result"],
            )?,
            reconcile_duration_seconds: histogram_vec(
                r,
                "pequod_reconcile_duration_seconds",
                "Reconciliation duration",
                &["controller"],
                slow_buckets(),
            )?,
            reconcile_errors_total: counter_vec(
                r,
                "pequod_reconcile_errors_total",
                "Reconciliation errors",
                &["controller", "error_type"],
            )?,
            dag_nodes_total: gauge_vec(r, "pequod_dag_nodes_total", "Nodes in current DAG", &["resourcegraph"])?,
            dag_execution_duration_seconds: histogram_vec(
                r,
                "pequod_dag_execution_duration_seconds",
                "DAG execution duration",
                &["resourcegraph", "result"],
                slow_buckets(),
            )?,
            dag_node_execution_duration_seconds: histogram_vec(
                r,
                "pequod_dag_node_execution_duration_seconds",
                "Per-node execution duration",
                &["node_id", "result"],
                slow_buckets(),
            )?,
            apply_total: counter_vec(r, "pequod_apply_total", "Apply operations", &["result", "mode", "gvk"])?,
            apply_duration_seconds: histogram_vec(
                r,
                "pequod_apply_duration_seconds",
                "Apply duration",
                &["mode", "gvk"],
                fast_buckets(),
            )?,
            resources_managed: gauge_vec(
                r,
                "pequod_resources_managed",
                "Managed resource count",
                &["gvk", "namespace"],
            )?,
            adoption_total: counter_vec(r, "pequod_adoption_total", "Adoption operations", &["result"])?,
            adoption_duration_seconds: {
                let h = Histogram::with_opts(
                    HistogramOpts::new("pequod_adoption_duration_seconds", "Adoption duration").buckets(fast_buckets()),
                )?;
                r.register(&h)?;
                h
            },
            cue_cache_hits_total: counter(r, "pequod_cue_cache_hits_total", "Cache hits")?,
            cue_cache_misses_total: counter(r, "pequod_cue_cache_misses_total", "Cache misses")?,
            cue_cache_evictions_total: counter(r, "pequod_cue_cache_evictions_total", "Cache evictions")?,
            cue_cache_entries: gauge(r, "pequod_cue_cache_entries", "Current cache entries")?,
            shards_held: gauge(r, "pequod_shards_held", "Shards of ResourceGraphs this replica holds")?,
            cue_cache_size_bytes: gauge(r, "pequod_cue_cache_size_bytes", "Cache size in bytes")?,
            cue_fetch_duration_seconds: histogram_vec(
                r,
                "pequod_cue_fetch_duration_seconds",
                "Module fetch duration",
                &["source"],
                slow_buckets(),
            )?,
            cue_fetch_total: counter_vec(
                r,
                "pequod_cue_fetch_total",
                "Module fetch operations",
                &["source", "result"],
            )?,
            cue_render_duration_seconds: histogram_vec(
                r,
                "pequod_cue_render_duration_seconds",
                "CUE render duration",
                &["platform"],
                slow_buckets(),
            )?,
            cue_render_errors_total: counter_vec(
                r,
                "pequod_cue_render_errors_total",
                "Render errors",
                &["platform", "error_type"],
            )?,
            cue_invocations_total: counter_vec(
                r,
                "pequod_cue_invocations_total",
                "Invocations of the cue binary",
                &["command", "result"],
            )?,
            conversion_duration_seconds: histogram_vec(
                r,
                "pequod_conversion_duration_seconds",
                "CUE conversion duration",
                &["platform"],
                slow_buckets(),
            )?,
            policy_violations_total: counter_vec(
                r,
                "pequod_policy_violations_total",
                "Policy violations",
                &["severity"],
            )?,
            rollout_instances: gauge_vec(
                r,
                "pequod_rollout_instances",
                "Instances of a Transform's module rollout, by state",
                &["namespace", "transform", "state"],
            )?,
            rollout_phase: gauge_vec(
                r,
                "pequod_rollout_phase",
                "Phase of a Transform's module rollout (1 for the current phase)",
                &["namespace", "transform", "phase"],
            )?,
            rollout_batches_total: counter_vec(
                r,
                "pequod_rollout_batches_total",
                "Batches of instances a staged rollout started",
                &["namespace", "transform"],
            )?,
            storage_migration_objects_total: counter_vec(
                r,
                "pequod_storage_migration_objects_total",
                "Instances a storage migration rewrote into their kind's storage version",
                &["namespace", "transform"],
            )?,
            storage_migration_remaining: gauge_vec(
                r,
                "pequod_storage_migration_remaining",
                "Instances a storage migration has still to rewrite",
                &["namespace", "transform"],
            )?,
            conversion_requests_total: counter_vec(
                r,
                "pequod_conversion_requests_total",
                "Conversion reviews answered by the conversion webhook",
                &["result"],
            )?,
            conversion_objects_total: counter(
                r,
                "pequod_conversion_objects_total",
                "Objects converted by the conversion webhook",
            )?,
            reconcile_queue_depth: gauge_vec(
                r,
                "pequod_reconcile_queue_depth",
                "Reconciles due that wait for a free worker",
                &["controller"],
            )?,
            reconcile_queue_oldest_wait_seconds: {
                let g = GaugeVec::new(
                    Opts::new(
                        "pequod_reconcile_queue_oldest_wait_seconds",
                        "How long the longest-waiting reconcile has waited for a worker",
                    ),
                    &["controller"],
                )?;
                r.register(&g)?;
                g
            },
            waiting: Arc::default(),
            registry: registrar.registry.clone(),
            registered: Arc::new(std::mem::take(
                &mut *registrar.registered.lock().unwrap_or_else(|p| p.into_inner()),
            )),
        };
        #[cfg(target_os = "linux")]
        metrics
            .registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(metrics)
    }

    /// Counts a reconcile of `controller` as waiting for a worker until the returned guard
    /// is dropped.
    pub fn queued(&self, controller: &'static str) -> QueuedReconcile {
        let depth = self.reconcile_queue_depth.with_label_values(&[controller]);
        depth.inc();
        let ticket = self.waiting.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.waiting
            .since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(controller)
            .or_default()
            .insert(ticket, Instant::now());
        QueuedReconcile {
            waiting: self.waiting.clone(),
            depth,
            controller,
            ticket,
        }
    }

    /// Sets the oldest-wait gauges from the waiting reconciles: an age grows between events,
    /// so it is read when scraped.
    fn refresh_queue_ages(&self) {
        let since = self.waiting.since.lock().unwrap_or_else(|p| p.into_inner());
        for (controller, tickets) in since.iter() {
            // Tickets grow with time, so the first is the oldest still waiting.
            let age = tickets.values().next().map_or(0.0, |t| t.elapsed().as_secs_f64());
            self.reconcile_queue_oldest_wait_seconds
                .with_label_values(&[controller])
                .set(age);
        }
    }

    /// Every metric of Pequod's own (not the process metrics) with its type and label names,
    /// whether or not it has a sample yet.
    pub fn describe(&self) -> Vec<Description> {
        let mut described = Vec::new();
        for collector in self.registered.iter() {
            for (desc, family) in collector.desc().into_iter().zip(collector.collect()) {
                let kind = match family.get_field_type() {
                    MetricType::COUNTER => "Counter",
                    MetricType::GAUGE => "Gauge",
                    MetricType::HISTOGRAM => "Histogram",
                    MetricType::SUMMARY => "Summary",
                    MetricType::UNTYPED => "Untyped",
                };
                described.push(Description {
                    name: desc.fq_name.clone(),
                    kind,
                    labels: desc.variable_labels.clone(),
                });
            }
        }
        described
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn encode(&self) -> Result<String, prometheus::Error> {
        self.refresh_queue_ages();
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

fn counter(r: &Registrar, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    let m = IntCounter::new(name, help)?;
    r.register(&m)?;
    Ok(m)
}

fn gauge(r: &Registrar, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    let m = IntGauge::new(name, help)?;
    r.register(&m)?;
    Ok(m)
}

fn counter_vec(r: &Registrar, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
    let m = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(&m)?;
    Ok(m)
}

fn gauge_vec(r: &Registrar, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec, prometheus::Error> {
    let m = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(&m)?;
    Ok(m)
}

fn histogram_vec(
    r: &Registrar,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> Result<HistogramVec, prometheus::Error> {
    let m = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    r.register(&m)?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric of the README's tables, with its labels.
    const DOCUMENTED: &[(&str, &[&str])] = &[
        ("pequod_reconcile_total", &["controller", "result"]),
        ("pequod_reconcile_duration_seconds", &["controller"]),
        ("pequod_reconcile_errors_total", &["controller", "error_type"]),
        ("pequod_dag_nodes_total", &["resourcegraph"]),
        ("pequod_dag_execution_duration_seconds", &["resourcegraph", "result"]),
        ("pequod_dag_node_execution_duration_seconds", &["node_id", "result"]),
        ("pequod_apply_total", &["result", "mode", "gvk"]),
        ("pequod_apply_duration_seconds", &["mode", "gvk"]),
        ("pequod_resources_managed", &["gvk", "namespace"]),
        ("pequod_adoption_total", &["result"]),
        ("pequod_adoption_duration_seconds", &[]),
        ("pequod_cue_cache_hits_total", &[]),
        ("pequod_cue_cache_misses_total", &[]),
        ("pequod_cue_cache_evictions_total", &[]),
        ("pequod_cue_cache_entries", &[]),
        ("pequod_cue_cache_size_bytes", &[]),
        ("pequod_cue_fetch_duration_seconds", &["source"]),
        ("pequod_cue_fetch_total", &["source", "result"]),
        ("pequod_cue_render_duration_seconds", &["platform"]),
        ("pequod_cue_render_errors_total", &["platform", "error_type"]),
        ("pequod_cue_invocations_total", &["command", "result"]),
        ("pequod_conversion_duration_seconds", &["platform"]),
        ("pequod_policy_violations_total", &["severity"]),
        ("pequod_rollout_instances", &["namespace", "transform", "state"]),
        ("pequod_rollout_phase", &["namespace", "transform", "phase"]),
        ("pequod_rollout_batches_total", &["namespace", "transform"]),
        ("pequod_storage_migration_objects_total", &["namespace", "transform"]),
        ("pequod_storage_migration_remaining", &["namespace", "transform"]),
        ("pequod_reconcile_queue_depth", &["controller"]),
        ("pequod_reconcile_queue_oldest_wait_seconds", &["controller"]),
        ("pequod_conversion_requests_total", &["result"]),
        ("pequod_conversion_objects_total", &[]),
        ("pequod_shards_held", &[]),
    ];

    #[test]
    fn every_documented_metric_is_registered_with_its_labels() {
        let m = Metrics::new().unwrap();
        // Touch each labelled family once so that it is exported.
        m.reconcile_total.with_label_values(&["a", "b"]).inc();
        m.reconcile_duration_seconds.with_label_values(&["a"]).observe(0.1);
        m.reconcile_errors_total.with_label_values(&["a", "b"]).inc();
        m.dag_nodes_total.with_label_values(&["a"]).set(1);
        m.dag_execution_duration_seconds
            .with_label_values(&["a", "b"])
            .observe(0.1);
        m.dag_node_execution_duration_seconds
            .with_label_values(&["a", "b"])
            .observe(0.1);
        m.apply_total.with_label_values(&["a", "b", "c"]).inc();
        m.apply_duration_seconds.with_label_values(&["a", "b"]).observe(0.1);
        m.resources_managed.with_label_values(&["a", "b"]).set(1);
        m.adoption_total.with_label_values(&["a"]).inc();
        m.cue_fetch_duration_seconds.with_label_values(&["a"]).observe(0.1);
        m.cue_fetch_total.with_label_values(&["a", "b"]).inc();
        m.cue_render_duration_seconds.with_label_values(&["a"]).observe(0.1);
        m.cue_render_errors_total.with_label_values(&["a", "b"]).inc();
        m.cue_invocations_total.with_label_values(&["a", "b"]).inc();
        m.conversion_duration_seconds.with_label_values(&["a"]).observe(0.1);
        m.policy_violations_total.with_label_values(&["a"]).inc();
        m.rollout_instances.with_label_values(&["a", "b", "c"]).set(1);
        m.rollout_phase.with_label_values(&["a", "b", "c"]).set(1);
        m.rollout_batches_total.with_label_values(&["a", "b"]).inc();
        m.storage_migration_objects_total.with_label_values(&["a", "b"]).inc();
        m.storage_migration_remaining.with_label_values(&["a", "b"]).set(1);
        m.conversion_requests_total.with_label_values(&["a"]).inc();
        let queued = m.queued("a");
        m.refresh_queue_ages();

        let families = m.registry.gather();
        for (name, labels) in DOCUMENTED {
            let family = families
                .iter()
                .find(|f| f.name() == *name)
                .unwrap_or_else(|| panic!("metric {name} is not registered"));
            let metric = &family.get_metric()[0];
            let got: Vec<&str> = metric.get_label().iter().map(|l| l.name()).collect();
            let mut want: Vec<&str> = labels.to_vec();
            want.sort_unstable();
            let mut got_sorted = got.clone();
            got_sorted.sort_unstable();
            assert_eq!(got_sorted, want, "labels of {name}");
        }
        // What `describe` says, before any sample, is what the registry exports once there is one.
        let described = Metrics::new().unwrap().describe();
        let exported: Vec<_> = families.iter().filter(|f| f.name().starts_with("pequod_")).collect();
        assert_eq!(described.len(), exported.len(), "describe() lists every metric once");
        for family in exported {
            let d = described
                .iter()
                .find(|d| d.name == family.name())
                .unwrap_or_else(|| panic!("describe() misses {}", family.name()));
            let kind = match family.get_field_type() {
                MetricType::COUNTER => "Counter",
                MetricType::GAUGE => "Gauge",
                MetricType::HISTOGRAM => "Histogram",
                _ => "other",
            };
            assert_eq!(d.kind, kind, "type of {}", d.name);
            let mut labels: Vec<&str> = family.get_metric()[0].get_label().iter().map(|l| l.name()).collect();
            labels.sort_unstable();
            let mut want: Vec<&str> = d.labels.iter().map(String::as_str).collect();
            want.sort_unstable();
            assert_eq!(labels, want, "labels of {}", d.name);
        }
        let text = m.encode().unwrap();
        assert!(text.contains("# TYPE pequod_reconcile_total counter"));
        assert!(text.contains("# TYPE pequod_reconcile_duration_seconds histogram"));
        assert!(text.contains("# TYPE pequod_dag_nodes_total gauge"));
        assert!(
            text.contains("process_resident_memory_bytes"),
            "process metrics are exported"
        );
        drop(queued);
    }

    #[test]
    fn queue_depth_and_oldest_wait_follow_the_waiting_reconciles() {
        let m = Metrics::new().unwrap();
        let depth = || m.reconcile_queue_depth.with_label_values(&["transform"]).get();
        let oldest = |m: &Metrics| {
            m.refresh_queue_ages();
            m.reconcile_queue_oldest_wait_seconds
                .with_label_values(&["transform"])
                .get()
        };
        let first = m.queued("transform");
        std::thread::sleep(std::time::Duration::from_millis(20));
        let second = m.queued("transform");
        assert_eq!(depth(), 2);
        assert!(oldest(&m) >= 0.02, "the first one's wait counts");
        drop(first);
        assert_eq!(depth(), 1);
        assert!(oldest(&m) < 0.02, "now the second one is the oldest");
        drop(second);
        assert_eq!(depth(), 0);
        assert_eq!(oldest(&m), 0.0);
    }

    #[test]
    fn every_alert_threshold_is_a_bucket_bound_with_buckets_above_it() {
        // Thresholds of the operations guide and config/prometheus/rules.yaml.
        for (threshold, buckets) in [
            (30.0, &SLOW_BUCKETS[..]),
            (60.0, &SLOW_BUCKETS[..]),
            (300.0, &SLOW_BUCKETS[..]),
            (10.0, &FAST_BUCKETS[..]),
        ] {
            assert!(buckets.contains(&threshold), "{threshold} is not a bound");
            assert!(buckets.iter().any(|b| *b > threshold), "nothing above {threshold}");
        }
        assert!(SLOW_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert!(FAST_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
