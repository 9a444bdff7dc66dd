//! Every metric the README documents exists on /metrics with its documented type, and moves
//! when the thing it counts happens.

use std::collections::BTreeMap;

use kube::Api;
use kube::api::{Patch, PatchParams};
use pequod::api::ResourceGraph;
use serde_json::json;

use crate::support::modules::put_module;
use crate::support::transforms::{WAIT, apply_transform, group, setup};
use crate::support::{self, TEST_MANAGER, wait_for};

/// (name, type) of each row of the README's metric tables.
fn documented() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    readme
        .lines()
        .filter(|l| l.starts_with("| `pequod_"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_string(), cells[2].to_ascii_lowercase())
        })
        .collect()
}

/// A scrape: per metric family, its type and its series (`_count` for histograms) by labels.
type Scrape = BTreeMap<String, (String, BTreeMap<String, f64>)>;

fn scrape(text: &str) -> Scrape {
    let mut out: Scrape = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                out.insert(name.to_string(), (kind.to_string(), BTreeMap::new()));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or((line, ""));
        let value: f64 = value.parse().unwrap_or(0.0);
        let name = series.split('{').next().unwrap_or_default();
        let labels = series.strip_prefix(name).unwrap_or_default().to_string();
        let family = name
            .strip_suffix("_count")
            .filter(|f| out.get(*f).is_some_and(|(k, _)| k == "histogram"));
        if let Some((kind, samples)) = out.get_mut(family.unwrap_or(name))
            && (family.is_some() || kind != "histogram")
        {
            samples.insert(labels, value);
        }
    }
    out
}

/// Whether a family moved between two scrapes: a series grew (or appeared), or for a gauge,
/// a series is above zero. Series of other tests' deleted graphs may vanish meanwhile.
fn moved(name: &str, before: &Scrape, after: &Scrape) -> bool {
    let Some((kind, now)) = after.get(name) else {
        return false;
    };
    let old = before.get(name).map(|(_, s)| s.clone()).unwrap_or_default();
    now.iter()
        .any(|(labels, v)| *v > old.get(labels).copied().unwrap_or(0.0) || (kind == "gauge" && *v > 0.0))
}

async fn metrics_now(env: &support::TestEnv) -> Scrape {
    let endpoints = support::operator(&env.client).await;
    let (_, text) = support::http_get(&endpoints.metrics, "/metrics").await.unwrap();
    scrape(&text)
}

/// A module with a Warning policy and an evaluation error on request.
const MODULE: &str = r#"package probe

#Metadata: kind: "Probe"

#Input: {
	text: string
}

#Render: {
	input: {metadata: {name: string, namespace: string, ...}, spec: #Input}
	output: {
		nodes: [{
			id: "config"
			object: {apiVersion: "v1", kind: "ConfigMap", metadata: name: "probe-\(input.metadata.name)", data: text: input.spec.text & !="fail"}
			readyWhen: [{type: "Exists"}]
		}]
		violations: [ if input.spec.text == "warn" {path: "spec.text", message: "warned", severity: "Warning"}]
	}
}
"#;

/// Labelled metrics with no series until something this test does not do happens: batches
/// start only in staged rollouts, which tests/e2e/rollouts.rs makes; conversions only for
/// kinds with several versions (tests/renderer/versions.rs times them).
const MADE_ELSEWHERE: &[&str] = &[
    "pequod_rollout_batches_total",
    // A kind of several versions: api_versions::a_kind_moves_from_v1alpha1_to_v1beta1… sees
    // conversions and a storage migration move these.
    "pequod_conversion_duration_seconds",
    "pequod_conversion_requests_total",
    "pequod_conversion_objects_total",
    "pequod_storage_migration_objects_total",
    "pequod_storage_migration_remaining",
];

/// Metrics that count rare events the test cannot cause on demand; they must exist.
const PRESENT_ONLY: &[&str] = &[
    // A reconcile error needs the apiserver to fail requests: tests/e2e_rbac revokes the
    // operator's permissions and sees it move.
    "pequod_reconcile_errors_total",
    // Evictions start past 10,000 cached renders (unit-tested in the renderer).
    "pequod_cue_cache_evictions_total",
    // Reconciles wait for a worker only when more are due than --max-concurrent-reconciles
    // (unit-tested in the controllers' shared code).
    "pequod_reconcile_queue_depth",
    "pequod_reconcile_queue_oldest_wait_seconds",
    // Shards are held only with --shards above 1: tests/e2e_restart/shards.rs sees it at 2 on
    // each of three replicas.
    "pequod_shards_held",
];

#[tokio::test]
async fn every_documented_metric_exists_with_its_type_and_moves() {
    let (env, transforms) = setup("metrics").await;
    let documented = documented();
    assert!(documented.len() >= 20, "README metric tables not found: {documented:?}");
    let before = metrics_now(&env).await;

    put_module(&env.client, &env.namespace, "probe-module", MODULE).await;
    apply_transform(
        &transforms,
        "probe",
        json!({"cueRef": {"type": "configmap", "ref": "probe-module"}, "group": group(&env)}),
    )
    .await;
    support::wait_transform_ready(&transforms, "probe").await;
    let api_version = format!("{}/v1alpha1", group(&env));
    for (name, text) in [("plain", "hello"), ("warned", "warn"), ("broken", "fail")] {
        support::apply_yaml(
            &env.client,
            &env.namespace,
            &format!("apiVersion: {api_version}\nkind: Probe\nmetadata:\n  name: {name}\nspec:\n  text: {text}\n"),
        )
        .await;
    }
    // Adoption: a graph taking over an existing ConfigMap.
    support::apply_yaml(
        &env.client,
        &env.namespace,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: adoptee\ndata:\n  a: b\n",
    )
    .await;
    // A module fetch that fails: its ConfigMap does not exist.
    apply_transform(
        &transforms,
        "nomodule",
        json!({"cueRef": {"type": "configmap", "ref": "no-such-module"}, "group": format!("none.{}", group(&env))}),
    )
    .await;
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
    // An apply the apiserver refuses: a ConfigMap key may not hold a space.
    let refused = json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph", "metadata": {"name": "refused"},
        "spec": {"nodes": [{"id": "cm", "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "refused"}, "data": {"not a key": "x"}}}]}});
    graphs
        .patch(
            "refused",
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(refused),
        )
        .await
        .unwrap();
    let adopt = json!({"apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph", "metadata": {"name": "adopter"},
        "spec": {"nodes": [{"id": "cm", "applyPolicy": {"mode": "Adopt"}, "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "adoptee"}, "data": {"a": "c"}}}]}});
    graphs
        .patch(
            "adopter",
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(adopt),
        )
        .await
        .unwrap();

    let after = wait_for("every documented metric to move", WAIT, || async {
        let now = metrics_now(&env).await;
        let still: Vec<&str> = documented
            .iter()
            .map(|(name, _)| name.as_str())
            .filter(|name| !PRESENT_ONLY.contains(name) && !MADE_ELSEWHERE.contains(name))
            .filter(|name| !moved(name, &before, &now))
            .collect();
        if still.is_empty() {
            Ok(now)
        } else {
            let probes = support::dynamic_api(&env.client, &api_version, "Probe", &env.namespace).await;
            let statuses: Vec<_> = probes
                .list(&Default::default())
                .await
                .map(|l| l.items.into_iter().map(|o| o.data["status"].clone()).collect())
                .unwrap_or_default();
            let graphs: Vec<_> = graphs
                .list(&Default::default())
                .await
                .map(|l| {
                    l.items
                        .into_iter()
                        .map(|g| (g.metadata.name, g.status.map(|s| s.phase)))
                        .collect()
                })
                .unwrap_or_default();
            Err(format!(
                "not moved yet: {still:?}; probes: {statuses:?}; graphs: {graphs:?}"
            ))
        }
    })
    .await;
    // Log lines of a reconcile carry its controller, object and reconcile id at the top level.
    let log = std::fs::read_to_string(&support::operator(&env.client).await.log).unwrap();
    let line = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["controller"] == "transform" && l["name"] == "probe" && l["namespace"] == env.namespace.as_str())
        .expect("a log line of the probe Transform's reconcile");
    assert!(line["reconcile_id"].is_string(), "{line}");
    for (name, kind) in documented
        .iter()
        .filter(|(name, _)| !MADE_ELSEWHERE.contains(&name.as_str()))
    {
        let (found, _) = after.get(name).unwrap_or_else(|| panic!("/metrics lacks {name}"));
        assert_eq!(found, kind, "{name} is a {found}, documented as a {kind}");
    }

    // Reconciles that end in a failed fetch, render or apply are errors, with their reason.
    let endpoints = support::operator(&env.client).await;
    for (controller, error_type) in [
        ("transform", "CueFetchFailed"),
        ("instance", "CueRenderFailed"),
        ("resourcegraph", "NodeFailed"),
    ] {
        let series =
            format!("pequod_reconcile_errors_total{{controller=\"{controller}\",error_type=\"{error_type}\"}}");
        wait_for(&format!("{series} to count"), WAIT, || async {
            match support::metric_sum(&endpoints.metrics, &series).await {
                v if v > 0.0 => Ok(()),
                v => Err(format!("{v}")),
            }
        })
        .await;
    }

    // Every alert of config/prometheus/rules.yaml can fire against what the operator exports.
    let text = wait_for("every alert's series to exist", WAIT, || async {
        let (_, text) = support::http_get(&endpoints.metrics, "/metrics").await?;
        let problems: Vec<String> = alert_rules()
            .iter()
            .flat_map(|(alert, expr)| alert_problems(alert, expr, &text))
            .collect();
        if problems.is_empty() {
            Ok(text)
        } else {
            Err(problems.join("; "))
        }
    })
    .await;
    assert!(
        text.contains("pequod_reconcile_queue_depth{controller=\"instance\"}"),
        "queue depth per controller"
    );
    env.cleanup().await;
}

/// (alert, expression) of each rule of config/prometheus/rules.yaml.
fn alert_rules() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/prometheus/rules.yaml")).unwrap();
    let rules: serde_json::Value = serde_yaml::from_str(&text).unwrap();
    rules["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .map(|r| {
            (
                r["alert"].as_str().unwrap().to_string(),
                r["expr"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A selector's metric, the labels it needs, and the values its equality matchers ask for.
type Selector = (String, Vec<String>, Vec<(String, String)>);

/// What an alert expression needs of /metrics.
#[derive(Default, Debug)]
struct Needs {
    /// Per selector: the metric, the labels it must carry (matched or grouped by), and the
    /// values its equality matchers ask for.
    selectors: Vec<Selector>,
    /// `histogram_quantile(..., m_bucket) > threshold`: (m, threshold).
    quantile_thresholds: Vec<(String, f64)>,
}

fn collect(expr: &promql_parser::parser::Expr, grouped_by: &[String], needs: &mut Needs) {
    use promql_parser::parser::{Expr, LabelModifier};
    match expr {
        Expr::Aggregate(a) => {
            let mut labels = grouped_by.to_vec();
            if let Some(LabelModifier::Include(by)) = &a.modifier {
                labels.extend(by.labels.iter().filter(|l| *l != "le").cloned());
            }
            collect(&a.expr, &labels, needs);
        }
        Expr::Binary(b) => {
            if b.op.is_comparison_operator()
                && let (Some(metric), Expr::NumberLiteral(n)) = (quantile_metric(&b.lhs), &*b.rhs)
            {
                needs.quantile_thresholds.push((metric, n.val));
            }
            collect(&b.lhs, grouped_by, needs);
            collect(&b.rhs, grouped_by, needs);
        }
        Expr::Paren(p) => collect(&p.expr, grouped_by, needs),
        Expr::Unary(u) => collect(&u.expr, grouped_by, needs),
        Expr::Subquery(s) => collect(&s.expr, grouped_by, needs),
        Expr::Call(c) => c.args.args.iter().for_each(|a| collect(a, grouped_by, needs)),
        Expr::MatrixSelector(m) => collect(&Expr::VectorSelector(m.vs.clone()), grouped_by, needs),
        Expr::VectorSelector(v) => {
            let equal: Vec<(String, String)> = v
                .matchers
                .matchers
                .iter()
                .filter(|m| matches!(m.op, promql_parser::label::MatchOp::Equal))
                .map(|m| (m.name.clone(), m.value.clone()))
                .collect();
            let mut labels = grouped_by.to_vec();
            labels.extend(equal.iter().map(|(l, _)| l.clone()));
            needs
                .selectors
                .push((v.name.clone().unwrap_or_default(), labels, equal));
        }
        _ => {}
    }
}

/// The histogram `histogram_quantile` reads in `expr`, if that is what `expr` is.
fn quantile_metric(expr: &promql_parser::parser::Expr) -> Option<String> {
    use promql_parser::parser::Expr;
    match expr {
        Expr::Paren(p) => quantile_metric(&p.expr),
        Expr::Call(c) if c.func.name == "histogram_quantile" => {
            let mut needs = Needs::default();
            collect(c.args.args.get(1)?, &[], &mut needs);
            needs
                .selectors
                .first()
                .map(|(m, _, _)| m.trim_end_matches("_bucket").to_string())
        }
        _ => None,
    }
}

/// The series lines of `metric` in an exposition: their labels as pairs.
fn series<'a>(text: &'a str, metric: &str) -> Vec<Vec<(&'a str, &'a str)>> {
    text.lines()
        .filter_map(|l| l.strip_prefix(metric))
        .filter_map(|rest| match rest.strip_prefix('{') {
            Some(r) => r.split_once('}').map(|(labels, _)| labels),
            // A series without labels.
            None => rest.starts_with(' ').then_some(""),
        })
        .map(|labels| {
            labels
                .split("\",")
                .filter_map(|pair| pair.split_once("=\""))
                .map(|(k, v)| (k, v.trim_end_matches('"')))
                .collect()
        })
        .collect()
}

/// Why `expr` could not fire against the exposition `text` (empty when it can).
fn alert_problems(alert: &str, expr: &str, text: &str) -> Vec<String> {
    let parsed = promql_parser::parser::parse(expr).unwrap_or_else(|e| panic!("{alert}: {e}"));
    let mut needs = Needs::default();
    collect(&parsed, &[], &mut needs);
    let mut problems = Vec::new();
    for (metric, labels, equal) in &needs.selectors {
        // `up` is Prometheus's own series about the scrape.
        if metric == "up" {
            continue;
        }
        let found = series(text, metric).into_iter().any(|s| {
            labels.iter().all(|l| s.iter().any(|(k, _)| k == l))
                && equal.iter().all(|(l, v)| s.iter().any(|(k, w)| k == l && w == v))
        });
        if !found {
            problems.push(format!(
                "{alert}: no series {metric} with labels {labels:?} and {equal:?}"
            ));
        }
    }
    for (metric, threshold) in &needs.quantile_thresholds {
        let bounds: Vec<f64> = series(text, &format!("{metric}_bucket"))
            .iter()
            .flat_map(|s| {
                s.iter()
                    .filter(|(k, _)| *k == "le")
                    .filter_map(|(_, v)| v.parse::<f64>().ok())
            })
            .filter(|b| b.is_finite())
            .collect();
        if !bounds.contains(threshold) || !bounds.iter().any(|b| b > threshold) {
            problems.push(format!(
                "{alert}: {metric} has no bucket bound at {threshold} with one above it: {bounds:?}"
            ));
        }
    }
    if needs.selectors.is_empty() {
        problems.push(format!("{alert}: no selector found in {expr}"));
    }
    problems
}
