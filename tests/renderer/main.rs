//! The renderer against the real cue CLI (`make tools` installs it; `PEQUOD_TEST_CUE`
//! overrides). No cluster is needed.

use pequod::error::ErrorCategory;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pequod::cue::{CueCli, ModuleFiles, RenderError, Renderer, RendererConfig, render_input};
use pequod::metrics::Metrics;
use serde_json::{Value, json};

mod versions;

fn cue_binary() -> PathBuf {
    std::env::var_os("PEQUOD_TEST_CUE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bin/cue"))
}

struct Harness {
    renderer: Renderer,
    metrics: Arc<Metrics>,
    _cache: tempfile::TempDir,
}

/// A renderer under the operator's default memory limit, so that every render here fits
/// under it, or without a limit (`memory_limit_mib` 0) for tests of slow evaluations, which
/// also allocate without end.
fn harness_with(timeout: Duration, binary: PathBuf) -> Harness {
    harness_limited(timeout, binary, pequod::cue::process::DEFAULT_MEMORY_LIMIT_MIB)
}

fn harness_limited(timeout: Duration, binary: PathBuf, memory_limit_mib: u64) -> Harness {
    let cache = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new().unwrap());
    let mut cli = CueCli::new(binary, timeout, 2).with_metrics(metrics.clone());
    if memory_limit_mib > 0 {
        cli = cli.with_memory_limit(memory_limit_mib * 1024 * 1024);
    }
    let renderer = Renderer::new(cli, RendererConfig::new(cache.path()), metrics.clone());
    Harness {
        renderer,
        metrics,
        _cache: cache,
    }
}

fn harness() -> Harness {
    harness_with(Duration::from_secs(60), cue_binary())
}

impl Harness {
    fn invocations(&self, command: &str) -> u64 {
        ["success", "error"]
            .iter()
            .map(|r| {
                self.metrics
                    .cue_invocations_total
                    .with_label_values(&[command, r])
                    .get()
            })
            .sum()
    }
}

async fn webservice(h: &Harness) -> pequod::cue::Module {
    h.renderer
        .load(ModuleFiles::embedded("webservice").unwrap(), "webservice")
        .await
        .unwrap()
}

fn module(source: &str) -> ModuleFiles {
    ModuleFiles::new(BTreeMap::from([("module.cue".to_string(), source.to_string())])).unwrap()
}

fn input(name: &str, spec: Value) -> Value {
    let meta = serde_json::from_value(json!({"name": name, "namespace": "team"})).unwrap();
    render_input(&meta, &spec)
}

/// A minimal module rendering one ConfigMap per input, with `#Input` given by the caller.
fn configmap_module(input_schema: &str) -> ModuleFiles {
    module(&format!(
        r#"package test
#Input: {input_schema}
#Render: {{
	input: {{metadata: {{name: string, namespace: string, ...}}, spec: #Input}}
	output: nodes: [{{id: "cm", object: {{apiVersion: "v1", kind: "ConfigMap", metadata: name: input.metadata.name, data: value: "\(input.spec.value)"}}}}]
}}
"#
    ))
}

#[tokio::test]
async fn schema_table_cue_construct_in_crd_schema_out() {
    let h = harness();
    let source = r#"package table
import "strings"
// The input.
#Input: {
	// A port.
	port: int & >=1 & <=65535 | *80
	name: string & strings.MinRunes(1) & strings.MaxRunes(63) & =~"^[a-z]"
	ratio?: number & >0 & <=1
	mode: "fast" | "safe" | *"safe"
	env: [string]: string
	tags: [...string]
	open?: {...}
	anything?: _
	target?: int | string
	res?: #Res
	replicas?: uint
}
#Res: {cpu: string | *"100m", memory?: string}
#Render: {input: _, output: nodes: []}
"#;
    let m = h.renderer.load(module(source), "table").await.unwrap();
    let schema = h.renderer.schema(&m).await.unwrap();
    let p = &schema.spec["properties"];
    let cases: &[(&str, Value)] = &[
        (
            "port",
            json!({"type": "integer", "minimum": 1, "maximum": 65535, "default": 80, "description": "A port."}),
        ),
        (
            "name",
            json!({"type": "string", "minLength": 1, "maxLength": 63, "pattern": "^[a-z]"}),
        ),
        (
            "ratio",
            json!({"type": "number", "minimum": 0, "exclusiveMinimum": true, "maximum": 1}),
        ),
        // cue lists the default first.
        (
            "mode",
            json!({"type": "string", "enum": ["safe", "fast"], "default": "safe"}),
        ),
        (
            "env",
            json!({"type": "object", "additionalProperties": {"type": "string"}}),
        ),
        ("tags", json!({"type": "array", "items": {"type": "string"}})),
        (
            "open",
            json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        ),
        ("anything", json!({"x-kubernetes-preserve-unknown-fields": true})),
        ("target", json!({"x-kubernetes-int-or-string": true})),
        (
            "res",
            json!({"type": "object", "properties": {"cpu": {"type": "string", "default": "100m"}, "memory": {"type": "string"}}}),
        ),
        ("replicas", json!({"type": "integer", "minimum": 0})),
    ];
    for (field, want) in cases {
        assert_eq!(&p[field], want, "schema of {field}");
    }
    assert_eq!(schema.spec["required"], json!(["name"]));
    assert_eq!(schema.spec["description"], "The input.");
    assert_eq!(schema.metadata, Default::default());
    // Cached by digest: asking again runs cue no more.
    let before = h.invocations("def");
    h.renderer.schema(&m).await.unwrap();
    assert_eq!(h.invocations("def"), before);
}

#[tokio::test]
async fn embedded_webservice_schema_and_metadata() {
    let h = harness();
    let m = webservice(&h).await;
    let schema = h.renderer.schema(&m).await.unwrap();
    assert_eq!(schema.metadata.kind.as_deref(), Some("WebService"));
    assert_eq!(schema.metadata.short_names, ["ws"]);
    assert_eq!(schema.spec["required"], json!(["image"]));
    assert_eq!(schema.spec["properties"]["replicas"]["maximum"], 50);
    assert_eq!(schema.spec["properties"]["serviceType"]["default"], "ClusterIP");
}

#[tokio::test]
async fn status_schema_and_printer_columns_come_from_the_module() {
    let h = harness();
    let m = h
        .renderer
        .load(ModuleFiles::embedded("webservice").unwrap(), "webservice")
        .await
        .unwrap();
    let schema = h.renderer.schema(&m).await.unwrap();
    let status = schema.status.as_ref().expect("#Status");
    assert_eq!(status["properties"]["url"]["type"], "string");
    assert_eq!(status["properties"]["availableReplicas"]["type"], "integer");
    let columns: Vec<&str> = schema
        .metadata
        .printer_columns
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(columns, ["URL", "Available"]);
    let output = h
        .renderer
        .render(&m, input("my-app", json!({"image": "nginx:1.27"})))
        .await
        .unwrap();
    assert_eq!(output.status["readyReplicas"], "${deployment.status.readyReplicas}");
    assert_eq!(output.status["url"], "http://my-app.team.svc.cluster.local:80");
}

#[tokio::test]
async fn schema_errors_name_the_problem() {
    let h = harness();
    let cases = [
        ("package x\n#Input: {a: int\n", "InvalidModule", "expected '}'"),
        ("package x\n#Other: {a: int}\n", "InvalidModule", "#Input"),
        (
            "package x\n#Input: string\n",
            "SchemaUnsupported",
            "#Input must be a struct",
        ),
        (
            "package x\n#Input: {a: bool | {b: int}}\n",
            "SchemaUnsupported",
            "spec.a",
        ),
        (
            "package x\n#Input: {a: string & !=\"\"}\n",
            "InvalidModule",
            "unsupported op",
        ),
        (
            "package x\n#Input: {size: int & string}\n",
            "InvalidModule",
            "#Input.size: conflicting values int and string",
        ),
        (
            "package x\n#Input: {a: int}\n#Status: {url?: string, phase?: string}\n",
            "SchemaUnsupported",
            "#Status.phase is a field Pequod writes",
        ),
        (
            "package x\n#Input: {a: int}\n#Status: string\n",
            "SchemaUnsupported",
            "#Status must be a struct",
        ),
        (
            "package x\n#Input: {a: int}\n#Metadata: {kind: \"X\", printerColumns: [{name: \"URL\", type: \"url\", jsonPath: \".status.url\"}]}\n",
            "InvalidModule",
            "type \"url\" is not string",
        ),
        (
            "package x\n#Input: {a: int}\n#Metadata: {kind: \"X\", printerColumns: [{name: \"URL\", type: \"string\", jsonPath: \"status.url\"}]}\n",
            "InvalidModule",
            "must start with '.'",
        ),
    ];
    for (source, reason, text) in cases {
        let m = h.renderer.load(module(source), "bad").await.unwrap();
        let err = h.renderer.schema(&m).await.unwrap_err();
        assert_eq!(err.reason(), reason, "{source}: {err}");
        assert!(err.to_string().contains(text), "{source}: {err} should mention {text}");
    }
}

#[tokio::test]
async fn alternatives_of_structs_become_a_cel_rule() {
    let h = harness();
    let source = "package x\n#Input: {source: {image: string} | {repo: string, tag: string}}\n";
    let m = h.renderer.load(module(source), "alternatives").await.unwrap();
    let schema = h.renderer.schema(&m).await.unwrap();
    assert_eq!(
        schema.spec["properties"]["source"],
        json!({
            "type": "object",
            "properties": {"image": {"type": "string"}, "repo": {"type": "string"}, "tag": {"type": "string"}},
            "x-kubernetes-validations": [{
                "rule": "[has(self.image), has(self.repo) && has(self.tag)].exists_one(c, c)",
                "message": "set exactly one of: image; repo and tag",
            }],
        })
    );
}

#[tokio::test]
async fn webservice_renders_the_readme_example_and_enforces_policy() {
    let h = harness();
    let m = webservice(&h).await;
    let ok = input("my-app", json!({"image": "nginx:latest", "port": 80, "replicas": 3}));
    let bad = input(
        "untrusted",
        json!({"image": "registry.example.net/app:1", "replicas": 12}),
    );
    let (ok, bad) = tokio::join!(h.renderer.render(&m, ok), h.renderer.render(&m, bad));
    let ok = ok.unwrap();
    assert!(ok.violations.is_empty(), "{:?}", ok.violations);
    let ids: Vec<&str> = ok.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids, ["deployment", "service"]);
    assert_eq!(ok.nodes[0].object["spec"]["replicas"], 3);
    assert_eq!(ok.nodes[0].object["metadata"]["namespace"], "team");
    assert_eq!(ok.nodes[1].depends_on, ["deployment"]);
    let bad = bad.unwrap();
    let found: Vec<(String, &str)> = bad
        .violations
        .iter()
        .map(|v| (v.path.clone(), v.severity.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            ("spec.image".to_string(), "Error"),
            ("spec.replicas".to_string(), "Warning")
        ]
    );
    // Violations are counted when an instance shows them, not when a render finds them (a
    // rollout plan renders too).
    assert_eq!(h.metrics.policy_violations_total.with_label_values(&["Error"]).get(), 0);
    assert_eq!(
        h.metrics.policy_violations_total.with_label_values(&["Warning"]).get(),
        0
    );
}

#[tokio::test]
async fn batching_and_caching_minimise_cue_calls() {
    let h = harness();
    let m = webservice(&h).await;
    let inputs: Vec<Value> = (0..20)
        .map(|i| input(&format!("app-{i}"), json!({"image": "nginx:1.27", "replicas": i % 5})))
        .collect();
    let renders = inputs.iter().map(|i| h.renderer.render(&m, i.clone()));
    let results = futures::future::join_all(renders).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(
        h.invocations("export"),
        1,
        "20 renders pending together share one cue call"
    );
    for (i, r) in results.iter().enumerate() {
        assert_eq!(
            r.as_ref().unwrap().nodes[0].object["metadata"]["name"],
            format!("app-{i}")
        );
    }
    // Unchanged inputs: zero cue calls, all cache hits.
    let hits_before = h.metrics.cue_cache_hits_total.get();
    for i in &inputs {
        h.renderer.render(&m, i.clone()).await.unwrap();
    }
    assert_eq!(h.invocations("export"), 1);
    assert_eq!(h.metrics.cue_cache_hits_total.get() - hits_before, 20);
    assert_eq!(h.metrics.cue_cache_entries.get(), 20);
    assert!(h.metrics.cue_cache_size_bytes.get() > 0);
}

#[tokio::test]
async fn a_failing_input_does_not_fail_its_batch() {
    let h = harness();
    let m = webservice(&h).await;
    let good = input("good", json!({"image": "nginx"}));
    let out_of_bounds = input("too-many", json!({"image": "nginx", "replicas": 500}));
    let unknown_field = input("extra", json!({"image": "nginx", "colour": "blue"}));
    let missing = input("missing", json!({}));
    let (a, b, c, d) = tokio::join!(
        h.renderer.render(&m, good),
        h.renderer.render(&m, out_of_bounds),
        h.renderer.render(&m, unknown_field),
        h.renderer.render(&m, missing)
    );
    assert!(a.is_ok(), "{a:?}");
    let b = b.unwrap_err();
    assert_eq!(b.reason(), "CueRenderFailed");
    assert!(
        b.to_string().contains("replicas") && b.to_string().contains("500"),
        "{b}"
    );
    assert!(
        b.to_string().contains("schema.cue:"),
        "names the module file and line: {b}"
    );
    assert!(
        !b.to_string().contains("batch.cue"),
        "no generated file in messages: {b}"
    );
    assert!(c.unwrap_err().to_string().contains("spec.colour"));
    let d = d.unwrap_err();
    assert!(
        d.to_string().contains("incomplete") || d.to_string().contains("image"),
        "{d}"
    );
    assert!(
        h.invocations("export") <= 4,
        "errors are attributed, not bisected: {}",
        h.invocations("export")
    );
    // Failures are cached as well: asking again runs no cue.
    let calls = h.invocations("export");
    assert!(
        h.renderer
            .render(&m, input("too-many", json!({"image": "nginx", "replicas": 500})))
            .await
            .is_err()
    );
    assert_eq!(h.invocations("export"), calls);
}

#[tokio::test]
async fn bad_modules_and_outputs_get_clear_errors() {
    let h = harness();
    let spec = json!({"value": "v"});
    let cases: Vec<(ModuleFiles, &str, &str)> = vec![
        (
            module("package t\n#Input: {value: string}\n#Render: {input: _, output: nodes: [\n"),
            "CueRenderFailed",
            "expected",
        ),
        (
            module("package t\n#Input: {value: string}\n"),
            "CueRenderFailed",
            "no #Render",
        ),
        (
            module("package t\n#Input: {value: string}\n#Render: {input: _, output: {violations: []}}\n"),
            "InvalidRenderOutput",
            "no nodes",
        ),
        (
            module(
                "package t\n#Input: _\n#Render: {input: _, output: nodes: [{id: \"a\", object: {apiVersion: \"v1\", kind: \"ConfigMap\", metadata: name: \"a\"}}, {id: \"a\", object: {apiVersion: \"v1\", kind: \"ConfigMap\", metadata: name: \"b\"}}]}\n",
            ),
            "DuplicateNodeId",
            "\"a\" is used more than once",
        ),
        (
            module(
                "package t\n#Input: _\n#Render: {input: _, output: nodes: [{id: \"a\", dependsOn: [\"ghost\"], object: {apiVersion: \"v1\", kind: \"ConfigMap\", metadata: name: \"a\"}}]}\n",
            ),
            "UnknownDependency",
            "unknown node \"ghost\"",
        ),
        (
            module(
                "package t\n#Input: _\n_o: {apiVersion: \"v1\", kind: \"ConfigMap\", metadata: name: \"x\"}\n#Render: {input: _, output: nodes: [{id: \"a\", dependsOn: [\"b\"], object: _o}, {id: \"b\", dependsOn: [\"a\"], object: _o}]}\n",
            ),
            "DependencyCycle",
            "a -> b -> a",
        ),
        (
            module(
                "package t\n#Input: _\n#Render: {input: _, output: nodes: [{id: \"a\", object: {kind: \"ConfigMap\", metadata: name: \"x\"}}]}\n",
            ),
            "InvalidGraph",
            "has no apiVersion",
        ),
        (
            module(
                "package t\n#Input: {value: string, count: int}\n#Render: {input: {metadata: _, spec: #Input}, output: nodes: [{id: \"a\", object: {apiVersion: \"v1\", kind: \"ConfigMap\", metadata: name: \"x\", data: n: \"\\(input.spec.count)\"}}]}\n",
            ),
            "CueRenderFailed",
            "non-concrete value int",
        ),
        (
            module(
                "package t\nimport \"strings\"\n#Input: _\n#Render: {input: _, output: nodes: [{id: \"a\", object: {apiVersion: \"v1\", kind: \"ConfigMap\", metadata: name: \"x\", data: big: strings.Repeat(\"x\", 600000)}}]}\n",
            ),
            "RenderOutputTooLarge",
            "at most",
        ),
    ];
    for (files, reason, text) in cases {
        let m = h.renderer.load(files, "bad").await.unwrap();
        let err = h.renderer.render(&m, input("x", spec.clone())).await.unwrap_err();
        assert_eq!(err.reason(), reason, "{err}");
        assert!(err.to_string().contains(text), "{err} should mention {text}");
    }
}

#[tokio::test]
async fn endless_evaluation_times_out_and_is_retried_later() {
    let h = harness_limited(Duration::from_secs(4), cue_binary(), 0);
    let endless = module(
        "package t\nimport \"list\"\n#Input: _\n#Render: {input: _, output: nodes: [ for i in list.Range(0, 100000000, 1) {id: \"n\\(i)\", object: {apiVersion: \"v1\", kind: \"ConfigMap\", metadata: name: \"n\\(i)\"}}]}\n",
    );
    let m = h.renderer.load(endless, "endless").await.unwrap();
    let err = h.renderer.render(&m, input("x", json!({}))).await.unwrap_err();
    assert!(matches!(err, RenderError::Timeout { seconds: 4 }), "{err}");
    assert!(err.is_transient());
    // Timeouts are not cached: the next render runs cue again.
    let before = h.invocations("export");
    let _ = h.renderer.render(&m, input("x", json!({}))).await;
    assert_eq!(h.invocations("export"), before + 1);
}

#[tokio::test]
async fn a_slow_input_times_out_alone_and_its_batch_mates_render() {
    let h = harness_limited(Duration::from_secs(4), cue_binary(), 0);
    let by_input = module(
        "package t\nimport \"list\"\n#Input: n: int\n#Render: {input: _, output: nodes: [ for i in list.Range(0, input.spec.n, 1) {id: \"n\\(i)\", object: {apiVersion: \"v1\", kind: \"ConfigMap\", metadata: name: \"n\\(i)\"}}]}\n",
    );
    let m = h.renderer.load(by_input, "by-input").await.unwrap();
    // Rendered at the same moment, so in one batch.
    let (slow, fast) = tokio::join!(
        h.renderer.render(&m, input("slow", json!({"n": 100_000_000}))),
        h.renderer.render(&m, input("fast", json!({"n": 1}))),
    );
    assert!(matches!(slow, Err(RenderError::Timeout { .. })), "{slow:?}");
    assert_eq!(fast.expect("the fast input renders").nodes.len(), 1);
}

#[tokio::test]
async fn a_hungry_input_fails_alone_under_the_memory_limit_and_its_batch_mates_render() {
    let h = harness();
    let hungry_module = module(
        "package t\nimport (\"list\", \"strings\")\n#Input: n: int\n#Render: {input: _, _big: [ for i in list.Range(0, input.spec.n, 1) {strings.Repeat(\"x\", 1000000) + \"\\(i)\"}], output: nodes: [{id: \"cm\", object: {apiVersion: \"v1\", kind: \"ConfigMap\", metadata: name: \"n\", data: count: \"\\(div(len(strings.Join(_big, \"\")), 1000000))\"}}]}\n",
    );
    let m = h.renderer.load(hungry_module, "hungry").await.unwrap();
    // Rendered at the same moment, so in one batch: 400 strings of 1 MB against 160 MiB.
    let (hungry, modest, small) = tokio::join!(
        h.renderer.render(&m, input("hungry", json!({"n": 400}))),
        h.renderer.render(&m, input("modest", json!({"n": 2}))),
        h.renderer.render(&m, input("small", json!({"n": 1}))),
    );
    let error = hungry.unwrap_err();
    assert_eq!(error.reason(), "CueMemoryLimit", "{error}");
    assert!(error.to_string().contains("160 MiB"), "{error}");
    for (name, rendered, count) in [("modest", modest, "2"), ("small", small, "1")] {
        let rendered = rendered.unwrap_or_else(|e| panic!("{name} renders: {e}"));
        assert_eq!(rendered.nodes[0].object["data"]["count"], count, "{name}");
    }
}

#[tokio::test]
async fn missing_cue_binary_is_reported_and_not_cached() {
    let h = harness_with(Duration::from_secs(5), PathBuf::from("/nonexistent/cue"));
    let m = h.renderer.load(configmap_module("{value: string}"), "t").await.unwrap();
    let err = h
        .renderer
        .render(&m, input("x", json!({"value": "v"})))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "CueBinaryUnavailable");
    assert!(err.to_string().contains("/nonexistent/cue"));
    let err = h.renderer.schema(&m).await.unwrap_err();
    assert_eq!(err.reason(), "CueBinaryUnavailable");
}

/// Runs the pequod binary with the test cue and a cache folder of its own.
fn pequod(args: &[&str]) -> std::process::Output {
    let cache = tempfile::tempdir().unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_pequod"))
        .args(args)
        .arg("--cue-binary")
        .arg(cue_binary())
        .env("PEQUOD_CACHE_DIR", cache.path())
        .output()
        .unwrap()
}

fn example(path: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("cue/platform")
        .join(path)
        .display()
        .to_string()
}

#[test]
fn pequod_render_reproduces_the_readme_example() {
    let out = pequod(&[
        "render",
        "--module",
        "webservice",
        "--input",
        &example("webservice/examples/my-app.yaml"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let graph: Value = serde_yaml::from_slice(&out.stdout).unwrap();
    assert_eq!(graph["kind"], "ResourceGraph");
    assert_eq!(graph["metadata"]["name"], "webservice.apps.mycompany.com-my-app");
    let deployment = &graph["spec"]["graph"]["nodes"][0]["resource"];
    assert_eq!(deployment["kind"], "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:latest"
    );
    assert_eq!(graph["spec"]["graph"]["nodes"][1]["resource"]["kind"], "Service");
    assert_eq!(
        graph["spec"]["graph"]["nodes"][1]["resource"]["spec"]["ports"][0]["port"],
        80
    );

    let refused = pequod(&[
        "render",
        "--module",
        "webservice",
        "--input",
        &example("webservice/examples/disallowed-registry.yaml"),
    ]);
    assert_eq!(refused.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Error: spec.image"));

    let missing = pequod(&["render", "--module", "nope", "--input", "/nonexistent.yaml"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("neither a folder nor an embedded module"));
}

#[test]
fn pequod_schema_prints_the_generated_crd() {
    let out = pequod(&["schema", "--module", "worker", "--group", "apps.example.com"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let crd: Value = serde_yaml::from_slice(&out.stdout).unwrap();
    assert_eq!(crd["metadata"]["name"], "workers.apps.example.com");
    assert_eq!(crd["spec"]["names"]["kind"], "Worker");
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["properties"]["startupTimeout"]["minimum"].as_f64(), Some(30.0));
}

#[tokio::test]
async fn embedded_database_renders_a_statefulset_without_its_password() {
    let h = harness();
    let m = h
        .renderer
        .load(ModuleFiles::embedded("database").unwrap(), "database")
        .await
        .unwrap();
    let schema = h.renderer.schema(&m).await.unwrap();
    assert_eq!(schema.metadata.kind.as_deref(), Some("Database"));
    assert_eq!(schema.metadata.short_names, ["db"]);
    assert_eq!(schema.spec.get("required"), None, "every field has a default");
    let props = &schema.spec["properties"];
    assert_eq!(props["engine"]["enum"], json!(["postgres", "mysql"]));
    assert_eq!(props["engine"]["default"], "postgres");
    assert_eq!(props["replicas"]["maximum"], 5);
    assert_eq!(props["storage"]["default"], "1Gi");
    assert!(props["storage"]["pattern"].is_string());
    let status = schema.status.as_ref().expect("#Status");
    assert_eq!(status["properties"]["port"]["type"], "integer");
    assert_eq!(status["properties"]["secretName"]["type"], "string");
    let columns: Vec<&str> = schema
        .metadata
        .printer_columns
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(columns, ["Engine", "Endpoint", "Replicas", "Secret"]);

    let postgres = input("orders", json!({"storage": "5Gi", "storageClassName": "fast"}));
    let mysql = input(
        "shop",
        json!({"engine": "mysql", "replicas": 2, "retainVolumes": false}),
    );
    let long = input(&"a".repeat(53), json!({}));
    let (postgres, mysql, long) = tokio::join!(
        h.renderer.render(&m, postgres),
        h.renderer.render(&m, mysql),
        h.renderer.render(&m, long)
    );
    let postgres = postgres.unwrap();
    assert!(postgres.violations.is_empty(), "{:?}", postgres.violations);
    let ids: Vec<&str> = postgres.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids, ["credentials", "service", "statefulset"]);

    // The Secret: created once, its password generated by Pequod, so in no render.
    let secret = &postgres.nodes[0];
    assert_eq!(secret.apply_policy.mode, pequod::api::ApplyMode::Create);
    assert_eq!(
        secret.object["metadata"]["annotations"]["pequod.io/generate-secret-keys"],
        "password"
    );
    assert_eq!(secret.object["stringData"], json!({"username": "app"}));
    assert_eq!(secret.object.get("data"), None);

    let service = &postgres.nodes[1].object;
    assert_eq!(service["spec"]["clusterIP"], "None");
    assert_eq!(service["spec"]["ports"][0]["port"], 5432);

    let sts = &postgres.nodes[2];
    assert_eq!(sts.depends_on, ["service"]);
    assert_eq!(sts.ready_when[0].type_, pequod::api::ReadyGateType::StatefulSetReady);
    let spec = &sts.object["spec"];
    assert_eq!(spec["serviceName"], "orders");
    assert_eq!(spec["replicas"], 1);
    assert_eq!(spec["persistentVolumeClaimRetentionPolicy"]["whenDeleted"], "Retain");
    let claim = &spec["volumeClaimTemplates"][0]["spec"];
    assert_eq!(claim["resources"]["requests"]["storage"], "5Gi");
    assert_eq!(claim["storageClassName"], "fast");
    let container = &spec["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "docker.io/library/postgres:16");
    assert_eq!(container["volumeMounts"][0]["mountPath"], "/var/lib/postgresql/data");
    let env: BTreeMap<&str, &Value> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e))
        .collect();
    // The StatefulSet names the Secret, through a reference to its name only.
    assert_eq!(
        env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"],
        json!({"name": "${credentials.metadata.name}", "key": "password"})
    );
    assert_eq!(env["POSTGRES_DB"]["value"], "app");
    assert_eq!(postgres.status["port"], "${service.spec.ports.0.port}");
    assert_eq!(postgres.status["secretName"], "${credentials.metadata.name}");
    assert_eq!(
        postgres.status["endpoint"],
        "orders-0.${service.metadata.name}.team.svc.cluster.local:${service.spec.ports.0.port}"
    );

    let mysql = mysql.unwrap();
    assert_eq!(
        mysql.nodes[0].object["metadata"]["annotations"]["pequod.io/generate-secret-keys"],
        "password,root-password"
    );
    let spec = &mysql.nodes[2].object["spec"];
    assert_eq!(
        spec["template"]["spec"]["containers"][0]["image"],
        "docker.io/library/mysql:8.4"
    );
    assert_eq!(spec["persistentVolumeClaimRetentionPolicy"]["whenDeleted"], "Delete");
    assert_eq!(mysql.nodes[1].object["spec"]["ports"][0]["port"], 3306);
    let found: Vec<(&str, &str)> = mysql
        .violations
        .iter()
        .map(|v| (v.path.as_str(), v.severity.as_str()))
        .collect();
    assert_eq!(found, [("spec.replicas", "Warning")]);

    let long = long.unwrap();
    assert_eq!(long.violations[0].path, "metadata.name");
    assert_eq!(long.violations[0].severity.as_str(), "Error");
}

#[tokio::test]
async fn database_inputs_outside_the_schema_are_refused() {
    let h = harness();
    let m = h
        .renderer
        .load(ModuleFiles::embedded("database").unwrap(), "database")
        .await
        .unwrap();
    for spec in [
        json!({"engine": "oracle"}),
        json!({"storage": "lots"}),
        json!({"replicas": 6}),
        json!({"version": "latest"}),
        json!({"database": "Drop Table"}),
    ] {
        let err = h.renderer.render(&m, input("db", spec.clone())).await.unwrap_err();
        assert_eq!(err.reason(), "CueRenderFailed", "{spec}: {err}");
    }
}

#[test]
fn pequod_render_shows_the_database_example() {
    let out = pequod(&[
        "render",
        "--module",
        "database",
        "--input",
        &example("database/examples/orders-db.yaml"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let graph: Value = serde_yaml::from_slice(&out.stdout).unwrap();
    assert_eq!(graph["metadata"]["name"], "database.apps.mycompany.com-orders-db");
    let kinds: Vec<&str> = graph["spec"]["graph"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["resource"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["Secret", "Service", "StatefulSet"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("password:"), "no password in the graph:\n{text}");
}

/// The embedded webapp module with a platform's settings, as a Transform would load it.
async fn webapp(h: &Harness, settings: Value) -> Result<pequod::cue::Module, pequod::cue::RenderError> {
    let settings: pequod::api::Settings = serde_json::from_value(settings).unwrap();
    let files = ModuleFiles::embedded("webapp").unwrap().with_settings(&settings)?;
    let module = h.renderer.load(files, "webapp").await?;
    h.renderer.schema(&module).await?;
    Ok(module)
}

#[tokio::test]
async fn the_same_webapp_renders_each_clouds_bucket_by_the_platforms_setting() {
    let h = harness();
    let instance = input("photos", json!({"image": "nginx:1.27", "bucket": {}}));
    let mut schemas = Vec::new();
    let mut rendered = BTreeMap::new();
    for (provider, settings) in [
        ("aws", json!({"aws.region": "eu-west-1"})),
        ("gcp", json!({"provider": "gcp", "gcp.location": "EU"})),
        ("azure", json!({"provider": "azure", "azure.blobService": "team-blob"})),
    ] {
        let module = webapp(&h, settings).await.unwrap();
        schemas.push(h.renderer.schema(&module).await.unwrap().spec.clone());
        let out = h.renderer.render(&module, instance.clone()).await.unwrap();
        assert!(out.violations.is_empty(), "{provider}: {:?}", out.violations);
        let ids: Vec<&str> = out.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["bucket", "deployment", "service"], "{provider}");
        assert_eq!(
            out.nodes[1].depends_on,
            ["bucket"],
            "{provider}: the Deployment waits for its bucket"
        );
        let gates: Vec<_> = out.nodes[0].ready_when.iter().map(|g| g.type_).collect();
        assert_eq!(gates, [pequod::api::ReadyGateType::CloudResourceReady], "{provider}");
        let env = &out.nodes[1].object["spec"]["template"]["spec"]["containers"][0]["env"];
        assert_eq!(env[0]["name"], "BUCKET_NAME");
        rendered.insert(
            provider,
            (
                out.nodes[0].object.clone(),
                env[0]["value"].clone(),
                env[1]["value"].clone(),
            ),
        );
    }
    assert!(
        schemas.windows(2).all(|w| w[0] == w[1]),
        "the WebApp's schema is the same on every cloud"
    );

    let (aws, name, id) = &rendered["aws"];
    assert_eq!(aws["apiVersion"], "s3.services.k8s.aws/v1alpha1");
    assert_eq!(aws["kind"], "Bucket");
    assert_eq!(aws["spec"]["name"], "team-photos");
    assert_eq!(
        aws["metadata"]["annotations"]["services.k8s.aws/deletion-policy"],
        "retain"
    );
    assert_eq!(aws["metadata"]["annotations"]["services.k8s.aws/region"], "eu-west-1");
    assert_eq!(
        (name.as_str(), id.as_str()),
        (
            Some("${bucket.spec.name}"),
            Some("${bucket.status.ackResourceMetadata.arn}")
        )
    );

    let (gcp, name, id) = &rendered["gcp"];
    assert_eq!(gcp["apiVersion"], "storage.cnrm.cloud.google.com/v1beta1");
    assert_eq!(gcp["kind"], "StorageBucket");
    assert_eq!(gcp["spec"], json!({"resourceID": "team-photos", "location": "EU"}));
    assert_eq!(
        gcp["metadata"]["annotations"]["cnrm.cloud.google.com/deletion-policy"],
        "abandon"
    );
    assert_eq!(
        (name.as_str(), id.as_str()),
        (Some("${bucket.spec.resourceID}"), Some("${bucket.status.selfLink}"))
    );

    let (azure, name, id) = &rendered["azure"];
    assert_eq!(azure["apiVersion"], "storage.azure.com/v1api20230101");
    assert_eq!(azure["kind"], "StorageAccountsBlobServicesContainer");
    assert_eq!(
        azure["spec"],
        json!({"azureName": "team-photos", "owner": {"name": "team-blob"}})
    );
    assert_eq!(
        azure["metadata"]["annotations"]["serviceoperator.azure.com/reconcile-policy"],
        "detach-on-delete"
    );
    assert_eq!(
        (name.as_str(), id.as_str()),
        (Some("${bucket.spec.azureName}"), Some("${bucket.status.id}"))
    );
}

#[tokio::test]
async fn webapp_deletion_policy_and_adoption_use_each_controllers_annotations() {
    let h = harness();
    let delete = input(
        "photos",
        json!({"image": "nginx:1.27", "bucket": {"deletionPolicy": "Delete", "name": "old-photos", "adopt": true}}),
    );
    let annotations = |out: &pequod::cue::RenderOutput| out.nodes[0].object["metadata"]["annotations"].clone();
    let aws = webapp(&h, json!({})).await.unwrap();
    let out = h.renderer.render(&aws, delete.clone()).await.unwrap();
    assert_eq!(
        annotations(&out),
        json!({
            "services.k8s.aws/deletion-policy": "delete",
            "services.k8s.aws/adoption-policy": "adopt",
            "services.k8s.aws/adoption-fields": "{\"name\":\"team-old-photos\"}",
        })
    );
    let gcp = webapp(&h, json!({"provider": "gcp"})).await.unwrap();
    let out = h.renderer.render(&gcp, delete.clone()).await.unwrap();
    assert_eq!(
        annotations(&out),
        json!({"cnrm.cloud.google.com/deletion-policy": "delete"})
    );
    let azure = webapp(&h, json!({"provider": "azure", "azure.blobService": "b"}))
        .await
        .unwrap();
    let out = h.renderer.render(&azure, delete).await.unwrap();
    assert_eq!(
        annotations(&out),
        json!({"serviceoperator.azure.com/reconcile-policy": "manage"})
    );

    // A bucket's name is always its namespace's: no team names, adopts or deletes another's.
    let other = input(
        "photos",
        json!({"image": "nginx:1.27", "bucket": {"name": "acme-prod-team-b-photos", "adopt": true}}),
    );
    let out = h.renderer.render(&aws, other).await.unwrap();
    assert_eq!(out.nodes[0].object["spec"]["name"], "team-acme-prod-team-b-photos");
    let prefixed = webapp(&h, json!({"bucketPrefix": "acme-prod-"})).await.unwrap();
    let out = h
        .renderer
        .render(
            &prefixed,
            input("photos", json!({"image": "nginx:1.27", "bucket": {"name": "x1"}})),
        )
        .await
        .unwrap();
    assert_eq!(out.nodes[0].object["spec"]["name"], "acme-prod-team-x1");
    let uncut = "a".repeat(60);
    let long = input(&uncut, json!({"image": "nginx:1.27", "bucket": {}}));
    let out = h.renderer.render(&aws, long).await.unwrap();
    let errors: Vec<&str> = out
        .violations
        .iter()
        .filter(|v| v.severity == pequod::api::Severity::Error)
        .map(|v| v.path.as_str())
        .collect();
    assert_eq!(errors, ["spec.bucket.name"]);
    // Nor can a name leave the namespace's by its pattern.
    let escape = input("photos", json!({"image": "nginx:1.27", "bucket": {"name": "../other"}}));
    assert!(h.renderer.render(&aws, escape).await.is_err());
}

#[tokio::test]
async fn settings_outside_the_modules_settings_are_refused_before_any_render() {
    let h = harness();
    let refused = |settings: Value| {
        let h = &h;
        async move { webapp(h, settings).await.unwrap_err() }
    };
    let unknown = refused(json!({"provider": "gcp", "zone": "x"})).await;
    let nested_unknown = refused(json!({"provider": "gcp", "gcp.zone": "x"})).await;
    assert!(
        nested_unknown.to_string().contains("zone: field not allowed"),
        "{nested_unknown}"
    );
    assert_eq!(unknown.reason(), "InvalidSettings");
    assert!(unknown.to_string().contains("zone: field not allowed"), "{unknown}");
    let wrong = refused(json!({"provider": "ibm"})).await;
    assert_eq!(wrong.reason(), "InvalidSettings");
    assert!(wrong.to_string().contains("\"ibm\""), "{wrong}");
    let incomplete = refused(json!({"provider": "azure"})).await;
    assert!(incomplete.to_string().contains("blobService"), "{incomplete}");

    // A module that declares no #Settings takes none.
    let err = ModuleFiles::embedded("webservice")
        .unwrap()
        .with_settings(&serde_json::from_value(json!({"provider": "gcp"})).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("declares no #Settings"), "{err}");
}

#[test]
fn pequod_render_takes_the_platforms_settings() {
    let dir = tempfile::tempdir().unwrap();
    let settings = dir.path().join("settings.yaml");
    std::fs::write(&settings, "provider: gcp\nbucketPrefix: acme-\n").unwrap();
    let out = pequod(&[
        "render",
        "--module",
        "webapp",
        "--input",
        &example("webapp/examples/photos.yaml"),
        "--settings",
        &settings.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let graph: Value = serde_yaml::from_slice(&out.stdout).unwrap();
    let bucket = &graph["spec"]["graph"]["nodes"][0]["resource"];
    assert_eq!(bucket["kind"], "StorageBucket");
    assert_eq!(bucket["spec"]["resourceID"], "acme-default-photos");
}
