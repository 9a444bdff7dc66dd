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

fn yaml(path: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(root(path)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

/// config/default installs the conversion webhook's Service under the name the operator's
/// `--webhook-service` defaults to, sending 443 to the manager's port `webhook` (the default
/// `--webhook-bind-address`), and the manager may keep its certificate's Secret.
#[test]
fn the_webhook_service_port_and_secret_access_are_the_operator_s_defaults() {
    use clap::CommandFactory;
    let default = &yaml("config/default/kustomization.yaml")[0];
    let prefix = default["namePrefix"].as_str().unwrap_or("");
    assert!(
        default["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "webhook_service.yaml")
    );
    let command = pequod::cli::Cli::command();
    let flag_default = |name: &str| {
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(name))
            .unwrap_or_else(|| panic!("no flag --{name}"));
        arg.get_default_values()[0].to_string_lossy().into_owned()
    };

    let service = &yaml("config/default/webhook_service.yaml")[0];
    let name = format!("{prefix}{}", service["metadata"]["name"].as_str().unwrap());
    assert_eq!(name, flag_default("webhook-service"));
    assert_eq!(name, pequod::api::names::WEBHOOK_SERVICE);
    let port = &service["spec"]["ports"][0];
    assert_eq!(port["port"], pequod::conversion::endpoint::SERVICE_PORT);
    assert_eq!(port["targetPort"], "webhook");

    let manager = yaml("config/manager/manager.yaml");
    let deployment = manager.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &deployment["spec"]["template"];
    for (label, value) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(
            &pod["metadata"]["labels"][label], value,
            "the Service selects the manager"
        );
    }
    let container = &pod["spec"]["containers"][0];
    let webhook = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "webhook")
        .expect("the manager's port webhook");
    assert_eq!(
        format!(":{}", webhook["containerPort"]),
        flag_default("webhook-bind-address")
    );

    let role = &yaml("config/rbac/leader_election_role.yaml")[0];
    let rules = role["rules"].as_array().unwrap();
    let grants = |verb: &str, name: Option<&str>| {
        rules.iter().any(|r| {
            r["resources"] == serde_json::json!(["secrets"])
                && r["verbs"].as_array().unwrap().iter().any(|v| v == verb)
                && match name {
                    Some(name) => r["resourceNames"]
                        .as_array()
                        .is_some_and(|n| n.iter().any(|n| n == name)),
                    None => r["resourceNames"].is_null(),
                }
        })
    };
    let secret = pequod::api::names::WEBHOOK_TLS_SECRET;
    assert!(grants("get", Some(secret)) && grants("update", Some(secret)));
    assert!(grants("create", None), "create cannot be limited to a name");
}
