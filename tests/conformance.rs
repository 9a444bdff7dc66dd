//! Keeps docs/conformance.md true where code can tell, without a cluster.
//!
//! `tests/spec/` holds the product's public documentation (the binding surface Pequod is built
//! to). Every metric, flag, environment variable, event reason, make target, kustomize name,
//! probe and example object it promises is checked here against the code; docs/conformance.md
//! maps each promise to where it is implemented and tested, or to a documented deviation, and
//! every file and test it names must exist.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use serde_json::Value;

const SPEC_README: &str = "tests/spec/pequod-readme.md";
const SPEC_OPERATIONS: &str = "tests/spec/pequod-operations.md";
const TABLE: &str = "docs/conformance.md";

fn root(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

fn spec() -> String {
    read(SPEC_README) + "\n" + &read(SPEC_OPERATIONS)
}

/// The text between backticks in `s`, in order.
fn quoted(s: &str) -> Vec<&str> {
    s.split('`').skip(1).step_by(2).collect()
}

/// The cells of a Markdown table row.
fn cells(line: &str) -> Vec<&str> {
    let line = line.trim().trim_start_matches('|').trim_end_matches('|');
    line.split('|').map(str::trim).collect()
}

/// Each table of `doc` as (header cells, rows of cells).
fn tables(doc: &str) -> Vec<(Vec<String>, Vec<Vec<String>>)> {
    let mut out = Vec::new();
    let lines: Vec<&str> = doc.lines().collect();
    let mut i = 0;
    while i + 1 < lines.len() {
        let is_rule = |l: &str| l.trim_start().starts_with("|-") || l.trim_start().starts_with("| -");
        if lines[i].trim_start().starts_with('|') && is_rule(lines[i + 1]) {
            let header = cells(lines[i]).into_iter().map(str::to_string).collect();
            let mut rows = Vec::new();
            i += 2;
            while i < lines.len() && lines[i].trim_start().starts_with('|') {
                rows.push(cells(lines[i]).into_iter().map(str::to_string).collect());
                i += 1;
            }
            out.push((header, rows));
        } else {
            i += 1;
        }
    }
    out
}

/// The fenced code blocks of `doc` with their language.
fn code_blocks(doc: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in doc.lines() {
        let trimmed = line.trim_start();
        if let Some(lang) = trimmed.strip_prefix("```") {
            match current.take() {
                Some(block) => out.push(block),
                None => current = Some((lang.trim().to_string(), String::new())),
            }
        } else if let Some((_, text)) = current.as_mut() {
            // Blocks nested in list items are indented; YAML needs its own indentation only.
            text.push_str(line);
            text.push('\n');
        }
    }
    out
}

fn dedent(text: &str) -> String {
    let indent = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    text.lines()
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One metric row of the spec: name, the labels its selector matches, type, and the
/// labels column when the table has one.
struct SpecMetric {
    name: String,
    selector_labels: Vec<String>,
    kind: String,
    labels: Option<Vec<String>>,
}

fn spec_metrics() -> Vec<SpecMetric> {
    let mut out = Vec::new();
    for (header, rows) in tables(&spec()) {
        if header.first().map(String::as_str) != Some("Metric") {
            continue;
        }
        let column = |name: &str| header.iter().position(|h| h == name);
        let (type_col, labels_col) = (
            column("Type").expect("a metric table has a Type column"),
            column("Labels"),
        );
        for row in rows {
            let cell = quoted(&row[0])[0];
            let (name, selector) = cell.split_once('{').unwrap_or((cell, ""));
            let selector_labels = selector
                .trim_end_matches('}')
                .split(',')
                .filter_map(|m| m.split_once('=').map(|(k, _)| k.trim().to_string()))
                .collect();
            let labels = labels_col.map(|c| {
                row[c]
                    .split(',')
                    .map(str::trim)
                    .filter(|l| *l != "-" && !l.is_empty())
                    .map(str::to_string)
                    .collect()
            });
            out.push(SpecMetric {
                name: name.to_string(),
                selector_labels,
                kind: row[type_col].clone(),
                labels,
            });
        }
    }
    out
}

#[test]
fn spec_metrics_are_registered_with_their_type_and_labels() {
    let metrics = pequod::metrics::Metrics::new().unwrap();
    let registered: BTreeMap<String, _> = metrics.describe().into_iter().map(|d| (d.name.clone(), d)).collect();
    let rows = spec_metrics();
    assert!(rows.len() >= 30, "only {} metric rows found in the spec", rows.len());
    let mut problems = Vec::new();
    for row in &rows {
        let Some(d) = registered.get(&row.name) else {
            problems.push(format!("{}: not registered in src/metrics.rs", row.name));
            continue;
        };
        if d.kind != row.kind {
            problems.push(format!(
                "{}: the spec says {}, registered as {}",
                row.name, row.kind, d.kind
            ));
        }
        if let Some(labels) = row.labels.as_ref().filter(|l| **l != d.labels) {
            problems.push(format!(
                "{}: the spec's labels are {labels:?}, registered {:?}",
                row.name, d.labels
            ));
        }
        for label in &row.selector_labels {
            if !d.labels.contains(label) {
                problems.push(format!(
                    "{}: the spec selects on label {label}, which it lacks",
                    row.name
                ));
            }
        }
    }
    // Alerts, dashboards and runbook steps name metrics too.
    for name in pequod_testkit::metric_names(&spec()) {
        if !registered.contains_key(&name) {
            problems.push(format!("{name}: named in the spec, not registered"));
        }
    }
    assert!(problems.is_empty(), "metrics of the spec:\n{}", problems.join("\n"));
}

/// The operator's arguments by long name.
fn cli_args() -> BTreeMap<String, clap::Arg> {
    pequod::cli::Cli::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(|l| (format!("--{l}"), a.clone())))
        .collect()
}

fn default_of(arg: &clap::Arg) -> Vec<String> {
    arg.get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect()
}

#[test]
fn spec_flags_and_environment_variables_exist_with_their_defaults() {
    let args = cli_args();
    let doc = read(SPEC_OPERATIONS);
    let mut problems = Vec::new();
    let mut flags = 0;
    let mut vars = 0;
    for (header, rows) in tables(&doc) {
        match header.first().map(String::as_str) {
            Some("Argument") => {
                for row in rows {
                    flags += 1;
                    let flag = quoted(&row[0])[0];
                    let want = quoted(&row[1])[0];
                    match args.get(flag) {
                        None => problems.push(format!("{flag}: no such flag in src/cli.rs")),
                        Some(arg) if default_of(arg) != [want] => problems.push(format!(
                            "{flag}: the spec's default is {want}, src/cli.rs has {:?}",
                            default_of(arg)
                        )),
                        Some(_) => {}
                    }
                }
            }
            Some("Variable") => {
                for row in rows {
                    vars += 1;
                    let var = quoted(&row[0])[0];
                    let want = row[1]
                        .split_once("(default: ")
                        .map(|(_, d)| d.trim_end_matches(')').trim_matches('`').to_string());
                    let arg = args
                        .values()
                        .find(|a| a.get_env().is_some_and(|e| e.to_str() == Some(var)));
                    match (arg, want) {
                        (None, _) => problems.push(format!("{var}: no flag in src/cli.rs reads it")),
                        (Some(arg), Some(want)) if default_of(arg) != [want.clone()] => problems.push(format!(
                            "{var}: the spec's default is {want}, src/cli.rs has {:?}",
                            default_of(arg)
                        )),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    assert!(
        flags >= 5 && vars >= 3,
        "found {flags} flags and {vars} variables in the spec"
    );
    // Flags the spec passes in Deployment patches and the support steps must parse.
    for word in spec().split(|c: char| c.is_whitespace() || c == '`') {
        let Some((flag, _)) = word.split_once('=') else {
            continue;
        };
        if flag.starts_with("--")
            && args.contains_key(flag)
            && let Err(e) = pequod::cli::Cli::try_parse_from(["pequod", word])
        {
            problems.push(format!("{word}: refused by the operator: {e}"));
        }
    }
    assert!(problems.is_empty(), "flags of the spec:\n{}", problems.join("\n"));
}

/// The values of `pub const NAME: &str = "Value";` in a source file.
fn string_constants(path: &str) -> BTreeSet<String> {
    read(path)
        .lines()
        .filter(|l| l.trim_start().starts_with("pub const ") && l.contains(": &str = \""))
        .filter_map(|l| l.split('"').nth(1).map(str::to_string))
        .collect()
}

#[test]
fn spec_event_reasons_are_reasons_pequod_records() {
    let reasons = string_constants("src/api/reasons.rs");
    let mut listed = 0;
    let mut problems = Vec::new();
    for (header, rows) in tables(&read(SPEC_OPERATIONS)) {
        if header.first().map(String::as_str) != Some("Event") {
            continue;
        }
        for row in rows {
            listed += 1;
            let reason = quoted(&row[0])[0];
            if !reasons.contains(reason) {
                problems.push(format!("{reason}: not a reason in src/api/reasons.rs"));
            }
        }
    }
    assert!(listed >= 6, "only {listed} event reasons found in the spec");
    // The reasons a failed write reports come from the same list.
    use pequod::apply::ApplyError;
    use pequod::error::ErrorCategory;
    for e in [
        ApplyError::AdoptionFailed { message: String::new() },
        ApplyError::Invalid { message: String::new() },
    ] {
        if !reasons.contains(e.reason()) {
            problems.push(format!("{}: reported for {e:?}, not in src/api/reasons.rs", e.reason()));
        }
    }
    assert!(
        problems.is_empty(),
        "event reasons of the spec:\n{}",
        problems.join("\n")
    );
}

/// The targets the Makefile defines.
fn make_targets() -> BTreeSet<String> {
    read("Makefile")
        .lines()
        .filter(|l| !l.starts_with(['\t', '#', '.', ' ']))
        .filter_map(|l| l.split_once(':').map(|(t, _)| t.trim().to_string()))
        .filter(|t| !t.is_empty() && !t.contains([' ', '$', '=']))
        .collect()
}

/// The targets of every `make ...` command in `doc`, in code blocks and inline.
fn make_commands(doc: &str) -> BTreeSet<String> {
    let mut targets = BTreeSet::new();
    let mut add = |command: &str| {
        let command = command.split('#').next().unwrap_or("");
        for word in command.split_whitespace().skip(1) {
            if !word.contains('=') {
                targets.insert(word.to_string());
            }
        }
    };
    for (_, text) in code_blocks(doc) {
        for line in text.lines().map(str::trim) {
            if line.starts_with("make ") {
                add(line);
            }
        }
    }
    for q in quoted(doc) {
        if q.starts_with("make ") {
            add(q);
        }
    }
    targets
}

#[test]
fn spec_make_targets_exist() {
    let defined = make_targets();
    let named = make_commands(&spec());
    for target in [
        "install",
        "run",
        "manifests",
        "generate",
        "deploy",
        "build",
        "test",
        "lint",
    ] {
        assert!(
            named.contains(target),
            "the spec's make {target} was not found by the parser"
        );
    }
    let missing: Vec<_> = named.difference(&defined).collect();
    assert!(
        missing.is_empty(),
        "make targets the spec names but the Makefile lacks: {missing:?}"
    );
}

fn yaml(path: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(&read(path))
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

#[test]
fn spec_installation_names_ports_and_probes_are_the_manifests() {
    let default = &yaml("config/default/kustomization.yaml")[0];
    assert_eq!(
        default["namespace"], "pequod-system",
        "config/default installs into pequod-system"
    );
    let prefix = default["namePrefix"].as_str().unwrap_or("");
    for base in [
        "config/crd",
        "config/default",
        "config/manager",
        "config/rbac",
        "config/samples",
    ] {
        assert!(
            root(base).join("kustomization.yaml").is_file(),
            "{base}/kustomization.yaml is missing (the spec's kustomize layout)"
        );
    }
    let manager = yaml("config/manager/manager.yaml");
    let deployment = manager
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("config/manager has a Deployment");
    let name = format!("{prefix}{}", deployment["metadata"]["name"].as_str().unwrap());
    assert_eq!(name, "pequod-controller-manager", "the Deployment's installed name");
    let pod = &deployment["spec"]["template"];
    assert_eq!(
        pod["metadata"]["labels"]["control-plane"], "controller-manager",
        "the spec's `-l control-plane=controller-manager` selects the pods"
    );
    let container = &pod["spec"]["containers"][0];
    assert_eq!(
        container["name"], "manager",
        "the spec's patches name the container manager"
    );
    let ports: BTreeSet<u64> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["containerPort"].as_u64())
        .collect();
    assert_eq!(
        ports,
        BTreeSet::from([8081, 8443, 9443]),
        "ports :8443 (metrics), :8081 (probes) and :9443 (the conversion webhook, beyond the spec)"
    );
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(args.contains(&"--metrics-bind-address=:8443"));
    assert!(args.contains(&"--health-probe-bind-address=:8081"));

    // The spec's probe block is the Deployment's.
    let block = code_blocks(&read(SPEC_OPERATIONS))
        .into_iter()
        .find(|(lang, text)| lang == "yaml" && text.contains("livenessProbe:"))
        .expect("the spec's probe configuration");
    let probes: Value = serde_yaml::from_str(&dedent(&block.1)).unwrap();
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(container[probe], probes[probe], "{probe} differs from the spec's");
    }

    // The alert `up{job="pequod-controller-manager"}` needs that job name.
    let service = &yaml("config/default/metrics_service.yaml")[0];
    let monitor = &yaml("config/prometheus/monitor.yaml")[0];
    let job_label = monitor["spec"]["jobLabel"].as_str().unwrap();
    assert_eq!(service["metadata"]["labels"][job_label], "pequod-controller-manager");
    assert_eq!(service["spec"]["ports"][0]["port"], 8443);
}

/// Every field of `example` is in `schema` (an OpenAPI v3 schema as JSON).
fn unknown_fields(example: &Value, schema: &Value, path: &str, out: &mut Vec<String>) {
    if schema["x-kubernetes-preserve-unknown-fields"] == true {
        return;
    }
    match example {
        Value::Object(fields) => {
            for (key, value) in fields {
                let here = format!("{path}.{key}");
                match schema["properties"]
                    .get(key)
                    .or_else(|| schema.get("additionalProperties"))
                {
                    Some(s) if s.is_object() => unknown_fields(value, s, &here, out),
                    _ => out.push(here),
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                unknown_fields(item, &schema["items"], &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn spec_examples_of_pequod_s_kinds_fit_the_crds() {
    let crds: BTreeMap<String, Value> = pequod::api::crds()
        .into_iter()
        .map(|c| (c.spec.names.kind.clone(), serde_json::to_value(&c).unwrap()))
        .collect();
    let mut seen = BTreeSet::new();
    for (lang, text) in code_blocks(&read(SPEC_README)) {
        if lang != "yaml" || !text.contains(pequod::api::API_VERSION) {
            continue;
        }
        let example: Value = serde_yaml::from_str(&dedent(&text)).unwrap();
        let kind = example["kind"].as_str().unwrap().to_string();
        let crd = crds
            .get(&kind)
            .unwrap_or_else(|| panic!("the spec's {kind} is not a kind of {}", pequod::api::API_VERSION));
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut unknown = Vec::new();
        unknown_fields(&example["spec"], &schema["properties"]["spec"], "spec", &mut unknown);
        assert!(
            unknown.is_empty(),
            "fields of the spec's {kind} not in its CRD: {unknown:?}"
        );
        match kind.as_str() {
            "Transform" => {
                serde_json::from_value::<pequod::api::Transform>(example).unwrap();
            }
            "ResourceGraph" => {
                let graph: pequod::api::ResourceGraph = serde_json::from_value(example).unwrap();
                let node = &graph.spec.graph.nodes[0];
                assert_eq!(node.id, "deployment-my-app");
                assert!(node.depends_on.is_empty());
                assert_eq!(graph.spec.source_ref.unwrap().kind, "WebService");
            }
            other => panic!("no check for {other}"),
        }
        seen.insert(kind);
    }
    assert_eq!(seen, BTreeSet::from(["ResourceGraph".into(), "Transform".into()]));

    // The spec's WebService is the sample (which tests/renderer renders through the module).
    let sample = &yaml("config/samples/webservice_instance.yaml")[0];
    let example = code_blocks(&read(SPEC_README))
        .into_iter()
        .find(|(_, t)| t.contains("kind: WebService") && !t.contains("ResourceGraph"))
        .map(|(_, t)| serde_yaml::from_str::<Value>(&t).unwrap())
        .expect("the spec's WebService");
    assert_eq!(
        sample, &example,
        "config/samples/webservice_instance.yaml is the spec's WebService"
    );
    for module in ["webservice", "database"] {
        assert!(
            root("cue/platform").join(module).is_dir(),
            "the embedded module {module} (kind of the spec's examples) is missing"
        );
    }
}

/// Every test function in `path` (a `#[test]` or `#[tokio::test]` and the `fn` after it).
fn tests_in(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut names = BTreeSet::new();
    let mut armed = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with("#[test]") || line.starts_with("#[tokio::test") {
            armed = true;
        } else if armed && let Some((_, rest)) = line.split_once("fn ") {
            names.insert(rest.split(['(', '<']).next().unwrap().trim().to_string());
            armed = false;
        }
    }
    names
}

/// A cell's file references (`path`, `path:line`, `path#anchor`, `path::test`).
fn file_refs(cell: &str) -> Vec<(String, Option<String>)> {
    quoted(cell)
        .into_iter()
        .filter(|q| !q.contains(' ') && (q.contains('/') || q.ends_with(".rs") || *q == "Makefile"))
        .filter(|q| {
            !q.starts_with("--")
                && !q.starts_with(['/', ':'])
                && !q.contains("://")
                && !q.contains(['?', '<', '{', '=', '*'])
        })
        .filter(|q| {
            let file = q.split("::").next().unwrap();
            Path::new(file.split([':', '#']).next().unwrap()).extension().is_some() || file == "Makefile"
        })
        .map(|q| match q.split_once("::") {
            Some((file, test)) => (file.to_string(), Some(test.to_string())),
            None => (q.split([':', '#']).next().unwrap().to_string(), None),
        })
        .collect()
}

#[test]
fn conformance_table_names_files_and_tests_that_exist() {
    let doc = read(TABLE);
    let mut rows = 0;
    let mut problems = Vec::new();
    for (header, table_rows) in tables(&doc) {
        if header.first().map(String::as_str) != Some("Promise") {
            continue;
        }
        let tested = header
            .iter()
            .position(|h| h == "Tested by")
            .expect("a Tested by column");
        for row in table_rows {
            rows += 1;
            for (i, cell) in row.iter().enumerate() {
                for (file, test) in file_refs(cell) {
                    let path = root(&file);
                    if !path.exists() {
                        problems.push(format!("{}: {file} does not exist", row[0]));
                    } else if let Some(test) = test {
                        if !tests_in(&path).contains(&test) {
                            problems.push(format!("{}: {file} has no test {test}", row[0]));
                        }
                    } else if i == tested && file.ends_with(".rs") {
                        problems.push(format!("{}: name the test in {file} as {file}::<test>", row[0]));
                    }
                }
            }
            let tests_named = row.get(tested).map(|c| c.contains("::")).unwrap_or(false);
            let deviation = row.iter().any(|c| c.contains("deviation") || c.contains("not tested"));
            if !tests_named && !deviation {
                problems.push(format!("{}: neither a test nor a stated deviation", row[0]));
            }
        }
    }
    assert!(rows >= 40, "only {rows} rows in {TABLE}");
    assert!(problems.is_empty(), "{TABLE}:\n{}", problems.join("\n"));
}

#[test]
fn conformance_table_covers_every_promise_the_spec_lists() {
    let doc = read(TABLE);
    let mut missing = Vec::new();
    let mut want: BTreeSet<String> = spec_metrics().into_iter().map(|m| m.name).collect();
    want.extend(pequod_testkit::metric_names(&spec()));
    for (header, rows) in tables(&read(SPEC_OPERATIONS)) {
        if matches!(
            header.first().map(String::as_str),
            Some("Argument" | "Variable" | "Event")
        ) {
            want.extend(rows.iter().map(|r| quoted(&r[0])[0].to_string()));
        }
    }
    want.extend(make_commands(&spec()).into_iter().map(|t| format!("make {t}")));
    want.extend(
        [
            "pequod-system",
            "pequod-controller-manager",
            ":8443",
            ":8081",
            "/healthz",
            "/readyz",
            "spec.sourceRef",
            "spec.graph.nodes",
            "WebService",
            "Database",
            "PequodReconcileErrors",
            "PequodApplyFailures",
            "PequodSlowReconcile",
            "PequodCacheMissRate",
            "PequodControllerDown",
        ]
        .map(String::from),
    );
    for item in &want {
        if !doc.contains(&format!("`{item}`")) && !doc.contains(&format!("`{item}{{")) {
            missing.push(item.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "promises of the spec {TABLE} does not list (in backticks): {missing:?}"
    );
}

#[test]
fn the_table_s_parsers_find_what_they_look_for() {
    assert_eq!(quoted("a `b` c `d`"), ["b", "d"]);
    assert_eq!(cells("| `x` | y |"), ["`x`", "y"]);
    assert_eq!(
        file_refs("`src/cli.rs::go_style_flags_parse`, `config/manager/manager.yaml`, `--flag`"),
        [
            ("src/cli.rs".to_string(), Some("go_style_flags_parse".to_string())),
            ("config/manager/manager.yaml".to_string(), None)
        ]
    );
    assert!(tests_in(&root("tests/conformance.rs")).contains("the_table_s_parsers_find_what_they_look_for"));
    assert!(make_targets().contains("manifests"));
    assert_eq!(
        make_commands("```bash\nmake manifests generate  # x\nmake deploy IMG=a\n```\nand `make run`"),
        BTreeSet::from(["deploy".into(), "generate".into(), "manifests".into(), "run".into()])
    );
}
