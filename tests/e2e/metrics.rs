//! Every metric the README documents exists on /metrics with its documented type, and moves
//! when the thing it counts happens.

use std::collections::BTreeMap;

use kube::Api;
use kube::api::{Patch, PatchParams};
use pequod::api::ResourceGraph;
use serde_json::json;

use crate::support::{self, TEST_MANAGER, wait_for};
use crate::transforms::{WAIT, apply_transform, group, put_module, setup};

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

/// Metrics that count rare events the test cannot cause on demand; they must exist.
const PRESENT_ONLY: &[&str] = &[
    // A reconcile error needs the apiserver to fail requests: tests/e2e_rbac revokes the
    // operator's permissions and sees it move.
    "pequod_reconcile_errors_total",
    // Evictions start past 10,000 cached renders (unit-tested in the renderer).
    "pequod_cue_cache_evictions_total",
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
    let graphs: Api<ResourceGraph> = Api::namespaced(env.client.clone(), &env.namespace);
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
            .filter(|name| !PRESENT_ONLY.contains(name))
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
    for (name, kind) in &documented {
        let (found, _) = after.get(name).unwrap_or_else(|| panic!("/metrics lacks {name}"));
        assert_eq!(found, kind, "{name} is a {found}, documented as a {kind}");
    }
    env.cleanup().await;
}
