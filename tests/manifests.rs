//! The monitoring manifests: every alert and dashboard query is valid PromQL and names only
//! metrics the operator exports (as documented in the README).

use std::collections::BTreeSet;

fn root(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Metric names of the README's tables.
fn documented() -> BTreeSet<String> {
    std::fs::read_to_string(root("README.md"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("| `pequod_"))
        .filter_map(|l| l.split('`').nth(1).map(str::to_string))
        .collect()
}

fn check(source: &str, expr: &str, known: &BTreeSet<String>) {
    if let Err(e) = promql_parser::parser::parse(expr) {
        panic!("{source}: invalid PromQL {expr:?}: {e}");
    }
    for name in pequod_testkit::metric_names(expr) {
        assert!(known.contains(&name), "{source}: {name} is not an exported metric");
    }
}

#[test]
fn alert_rules_are_valid_promql_over_exported_metrics() {
    let known = documented();
    let text = std::fs::read_to_string(root("config/prometheus/rules.yaml")).unwrap();
    let rules: serde_json::Value = serde_yaml::from_str(&text).unwrap();
    let mut count = 0;
    for group in rules["spec"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let alert = rule["alert"].as_str().unwrap();
            check(alert, rule["expr"].as_str().unwrap(), &known);
            assert!(rule["labels"]["severity"].is_string(), "{alert} has no severity");
            assert!(rule["annotations"]["summary"].is_string(), "{alert} has no summary");
            count += 1;
        }
    }
    assert!(count >= 5, "only {count} alerts");
}

#[test]
fn dashboard_queries_are_valid_promql_over_exported_metrics() {
    let known = documented();
    let text = std::fs::read_to_string(root("config/prometheus/dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 5);
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            check(
                panel["title"].as_str().unwrap(),
                target["expr"].as_str().unwrap(),
                &known,
            );
        }
    }
}

#[test]
fn metric_names_are_found_in_expressions() {
    assert_eq!(
        pequod_testkit::metric_names(
            "rate(pequod_reconcile_duration_seconds_bucket[5m]) / pequod_cue_cache_hits_total"
        ),
        BTreeSet::from([
            "pequod_cue_cache_hits_total".to_string(),
            "pequod_reconcile_duration_seconds".to_string()
        ])
    );
}
