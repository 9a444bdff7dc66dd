//! Rendering, the pure parts: the batch file that evaluates many inputs in one cue call,
//! attribution of cue's errors to the inputs that caused them, and parsing of the output.

use crate::error::ErrorCategory;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::module::Module;
use crate::api::{GraphMetadata, Node, Violation};
use crate::canonical::canonical_json;
use crate::graph::{self, GraphError};

/// Most bytes the rendered output of one input may take (the apiserver stores a
/// ResourceGraph in one etcd object): the bound on a graph's nodes.
pub const MAX_OUTPUT_BYTES: usize = crate::api::MAX_GRAPH_BYTES;
/// Name of the generated batch file.
pub const BATCH_FILE: &str = "batch.cue";

/// Why rendering failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("cue is unavailable: {message}")]
    CueUnavailable { message: String },
    #[error("cue did not finish within {seconds}s (an evaluation that never ends?)")]
    Timeout { seconds: u64 },
    #[error("the evaluation needs more memory than cue may use ({limit_mib} MiB)")]
    MemoryLimit { limit_mib: u64 },
    #[error("{message}")]
    Evaluation { message: String },
    #[error("invalid module: {message}")]
    InvalidModule { message: String },
    /// The Transform's settings do not fit the module's `#Settings`, or leave it incomplete.
    #[error("invalid settings: {message}")]
    InvalidSettings { message: String },
    #[error("invalid render output: {message}")]
    InvalidOutput { message: String },
    #[error("invalid graph: {0}")]
    InvalidGraph(#[from] GraphError),
    #[error("rendered output is {bytes} bytes; at most {limit} are allowed")]
    OutputTooLarge { bytes: usize, limit: usize },
    #[error("schema: {0}")]
    Schema(#[from] super::SchemaError),
}

impl ErrorCategory for RenderError {
    fn reason(&self) -> &'static str {
        match self {
            Self::CueUnavailable { .. } => "CueBinaryUnavailable",
            Self::Timeout { .. } => "CueTimeout",
            Self::MemoryLimit { .. } => "CueMemoryLimit",
            Self::Evaluation { .. } => "CueRenderFailed",
            Self::InvalidModule { .. } => "InvalidModule",
            Self::InvalidSettings { .. } => "InvalidSettings",
            Self::InvalidOutput { .. } => "InvalidRenderOutput",
            Self::InvalidGraph(e) => e.reason(),
            Self::OutputTooLarge { .. } => "RenderOutputTooLarge",
            Self::Schema(_) => "SchemaUnsupported",
        }
    }

    /// Whether the same render could succeed later; such results are never cached.
    fn is_transient(&self) -> bool {
        matches!(self, Self::CueUnavailable { .. } | Self::Timeout { .. })
    }
}

impl From<super::CueError> for RenderError {
    fn from(e: super::CueError) -> Self {
        use super::CueError as C;
        match e {
            C::Spawn { .. } | C::Shutdown => Self::CueUnavailable { message: e.to_string() },
            C::Timeout { seconds } => Self::Timeout { seconds },
            C::OutputTooLarge { limit } => Self::OutputTooLarge { bytes: limit, limit },
            C::MemoryLimit { limit_mib } => Self::MemoryLimit { limit_mib },
            C::Failed { message, .. } => Self::Evaluation {
                message: clean_message(&message),
            },
        }
    }
}

impl From<super::ModuleError> for RenderError {
    fn from(e: super::ModuleError) -> Self {
        match e {
            super::ModuleError::InvalidSettings { .. } => Self::InvalidSettings { message: e.to_string() },
            e => Self::InvalidModule { message: e.to_string() },
        }
    }
}

/// What a module rendered for one input. It is read back from its JSON text where renders
/// are cached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenderOutput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<GraphMetadata>,
    pub nodes: Vec<Node>,
    pub violations: Vec<Violation>,
    /// `#Render.output.status`: what the instance's status shows, whose strings may reference
    /// live fields of the nodes (see [`crate::graph::reference`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub status: BTreeMap<String, Value>,
}

/// Annotations never passed to modules: they repeat the spec and would change the input hash.
const DROPPED_ANNOTATIONS: &[&str] = &["kubectl.kubernetes.io/last-applied-configuration"];

/// The value a module receives as `#Render.input`.
pub fn render_input(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, spec: &Value) -> Value {
    let mut metadata = serde_json::Map::new();
    metadata.insert("name".into(), Value::from(meta.name.clone().unwrap_or_default()));
    metadata.insert(
        "namespace".into(),
        Value::from(meta.namespace.clone().unwrap_or_else(|| "default".into())),
    );
    if let Some(labels) = meta.labels.as_ref().filter(|l| !l.is_empty()) {
        metadata.insert("labels".into(), serde_json::json!(labels));
    }
    if let Some(annotations) = &meta.annotations {
        let kept: BTreeMap<&String, &String> = annotations
            .iter()
            .filter(|(k, _)| !DROPPED_ANNOTATIONS.contains(&k.as_str()))
            .collect();
        if !kept.is_empty() {
            metadata.insert("annotations".into(), serde_json::json!(kept));
        }
    }
    if let Some(uid) = &meta.uid {
        metadata.insert("uid".into(), Value::from(uid.clone()));
    }
    serde_json::json!({"metadata": metadata, "spec": spec})
}

/// `sha256:<hex>` of a JSON value in its canonical text, so equal inputs hash equally.
pub fn input_hash(value: &Value) -> String {
    use sha2::{Digest, Sha256};
    let text = canonical_json(value);
    format!("sha256:{}", hex::encode(Sha256::digest(text.as_bytes())))
}

/// Line of the batch file holding the first input; input `i` is on line `FIRST_INPUT_LINE + i`.
pub(super) const FIRST_INPUT_LINE: usize = 6;

/// The CUE source that renders `inputs` in one evaluation, one input per line, so that a
/// cue error's position names the input it came from.
pub fn batch_source(module: &Module, inputs: &[&Value]) -> String {
    let mut src = format!("package batch\n\n{}\n\nresults: {{\n", module.import_line());
    debug_assert_eq!(src.lines().count() + 1, FIRST_INPUT_LINE);
    for (i, input) in inputs.iter().enumerate() {
        // The spec is checked against #Input on its own first, so that cue names the offending
        // field (`_spec.colour: field not allowed`) before any use of it inside #Render (a
        // policy, say) reports the same failure without the field's name.
        let spec = input.get("spec").cloned().unwrap_or(Value::Null);
        let mut rest = (*input).clone();
        if let Some(obj) = rest.as_object_mut() {
            obj.remove("spec");
        }
        // JSON is CUE, and the canonical text holds no newline. Canonical, as the render's
        // cache key hashes it: inputs of one key (`80.0`, `80`) are the same text to cue.
        let (spec, rest) = (canonical_json(&spec), canonical_json(&rest));
        src.push_str(&format!(
            "\t\"{i}\": {{_spec: p.#Input & {spec}, (p.#Render & {{input: {rest} & {{spec: _spec}}}}).output}}\n"
        ));
    }
    src.push_str("}\n");
    src
}

/// Splits cue's stderr into error blocks: a header line and its indented position lines.
fn error_blocks(stderr: &str) -> Vec<Vec<&str>> {
    let mut blocks: Vec<Vec<&str>> = Vec::new();
    for line in stderr.lines() {
        if line.trim().is_empty() {
            continue;
        }
        match blocks.last_mut() {
            Some(block) if line.starts_with(char::is_whitespace) => block.push(line),
            _ => blocks.push(vec![line]),
        }
    }
    blocks
}

/// Which inputs of a batch of `count` each error block belongs to.
/// Returns (per-input messages, whether any block belonged to no input).
pub fn attribute_errors(stderr: &str, count: usize) -> (BTreeMap<usize, Vec<String>>, bool) {
    let mut per_input: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut unattributed = false;
    for block in error_blocks(stderr) {
        let mut inputs = BTreeSet::new();
        if let Some(i) = results_index(block[0]) {
            inputs.insert(i);
        }
        for line in &block {
            for i in batch_lines(line) {
                if let Some(i) = i.checked_sub(FIRST_INPUT_LINE) {
                    inputs.insert(i);
                }
            }
        }
        inputs.retain(|i| *i < count);
        if inputs.is_empty() {
            unattributed = true;
        }
        let message = clean_message(&block.join("\n"));
        for i in inputs {
            per_input.entry(i).or_default().push(message.clone());
        }
    }
    (per_input, unattributed)
}

/// `results."3".nodes...` → 3.
fn results_index(header: &str) -> Option<usize> {
    let rest = header.strip_prefix("results.")?;
    let rest = rest.strip_prefix('"')?;
    rest.split('"').next()?.parse().ok()
}

/// Line numbers of `batch.cue:LINE:COL` positions in one line of cue output.
fn batch_lines(line: &str) -> impl Iterator<Item = usize> + '_ {
    line.match_indices(BATCH_FILE).filter_map(move |(pos, _)| {
        let rest = line[pos + BATCH_FILE.len()..].strip_prefix(':')?;
        rest.split(':').next()?.parse().ok()
    })
}

/// Makes a cue message read in terms of the module: positions in the generated batch file
/// are dropped, `results."N".` prefixes removed, and folders stripped from module paths.
pub fn clean_message(message: &str) -> String {
    let mut out = Vec::new();
    for line in message.lines() {
        if line.trim().is_empty() || line.contains(BATCH_FILE) || line.contains("/schema/schema.cue") {
            continue;
        }
        let mut line = line.replace("./platform/", "");
        if let Some((_, tail)) = line.strip_prefix("results.\"").and_then(|rest| rest.split_once("\".")) {
            line = tail.to_string();
        }
        if let Some(tail) = line.strip_prefix("_spec") {
            line = format!("spec{tail}");
        }
        let line = line
            .replace("undefined field: #", "undefined field #")
            .replace(
                "undefined field #Render",
                "the module defines no #Render (undefined field #Render)",
            )
            .replace(
                "undefined field #Input",
                "the module defines no #Input (undefined field #Input)",
            );
        out.push(line);
    }
    let joined = out.join("\n");
    if joined.is_empty() {
        message.trim().to_string()
    } else {
        joined
    }
}

/// Parses cue's JSON output of a batch of `count` inputs.
pub fn parse_batch(stdout: &str, count: usize) -> Result<Vec<Result<RenderOutput, RenderError>>, RenderError> {
    let value: Value = serde_json::from_str(stdout).map_err(|e| RenderError::InvalidOutput {
        message: format!("cue printed invalid JSON: {e}"),
    })?;
    let results = value
        .get("results")
        .and_then(Value::as_object)
        .ok_or_else(|| RenderError::InvalidOutput {
            message: "no results in cue output".into(),
        })?;
    Ok((0..count)
        .map(|i| match results.get(&i.to_string()) {
            Some(output) => parse_output(output),
            None => Err(RenderError::InvalidOutput {
                message: format!("cue printed no result for input {i}"),
            }),
        })
        .collect())
}

/// Turns one `#Render.output` into a validated graph.
pub fn parse_output(output: &Value) -> Result<RenderOutput, RenderError> {
    let bytes = output.to_string().len();
    if bytes > MAX_OUTPUT_BYTES {
        return Err(RenderError::OutputTooLarge {
            bytes,
            limit: MAX_OUTPUT_BYTES,
        });
    }
    let obj = output.as_object().ok_or_else(|| RenderError::InvalidOutput {
        message: "#Render.output is not a struct".into(),
    })?;
    let nodes = parse_nodes(obj)?;
    let violations = parse_violations(obj)?;
    let metadata = match obj.get("metadata") {
        None | Some(Value::Null) => None,
        Some(m) => Some(
            serde_json::from_value(m.clone()).map_err(|e| RenderError::InvalidOutput {
                message: format!("metadata: {e}"),
            })?,
        ),
    };
    let status = parse_status(obj)?;
    graph::validate(&nodes)?;
    graph::validate_outputs(&status, &nodes)?;
    Ok(RenderOutput {
        metadata,
        nodes,
        violations,
        status,
    })
}

fn parse_nodes(obj: &serde_json::Map<String, Value>) -> Result<Vec<Node>, RenderError> {
    let nodes_value = obj.get("nodes").ok_or_else(|| RenderError::InvalidOutput {
        message: "#Render.output has no nodes".into(),
    })?;
    let list = nodes_value.as_array().ok_or_else(|| RenderError::InvalidOutput {
        message: "#Render.output.nodes is not a list".into(),
    })?;
    let mut nodes = Vec::with_capacity(list.len());
    for (i, node) in list.iter().enumerate() {
        let id = node.get("id").and_then(Value::as_str).unwrap_or("?");
        let parsed: Node = serde_json::from_value(node.clone()).map_err(|e| RenderError::InvalidOutput {
            message: format!("node {i} (id {id:?}): {e}"),
        })?;
        nodes.push(parsed);
    }
    Ok(nodes)
}

fn parse_violations(obj: &serde_json::Map<String, Value>) -> Result<Vec<Violation>, RenderError> {
    match obj.get("violations") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v) => {
            let list = v.as_array().ok_or_else(|| RenderError::InvalidOutput {
                message: "#Render.output.violations is not a list".into(),
            })?;
            list.iter()
                .enumerate()
                .map(|(i, v)| {
                    serde_json::from_value(v.clone()).map_err(|e| RenderError::InvalidOutput {
                        message: format!("violation {i}: {e}"),
                    })
                })
                .collect()
        }
    }
}

/// The module's own status fields, none of them one Pequod writes.
fn parse_status(obj: &serde_json::Map<String, Value>) -> Result<BTreeMap<String, Value>, RenderError> {
    let status: BTreeMap<String, Value> = match obj.get("status") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| RenderError::InvalidOutput {
            message: format!("#Render.output.status is not a struct: {e}"),
        })?,
    };
    if let Some(reserved) = status
        .keys()
        .find(|k| crate::api::RESERVED_STATUS_FIELDS.contains(&k.as_str()))
    {
        return Err(RenderError::InvalidOutput {
            message: format!("#Render.output.status.{reserved} is a field Pequod writes; choose another name"),
        });
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn module() -> Module {
        Module {
            digest: "sha256:x".into(),
            package: "webservice".into(),
            platform: "webservice".into(),
            dir: "/tmp/x".into(),
            has_metadata: false,
            has_status: false,
            has_versions: false,
            has_settings: false,
        }
    }

    #[test]
    fn input_has_the_documented_shape_and_a_stable_hash() {
        let meta: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta = serde_json::from_value(json!({
            "name": "my-app", "namespace": "team", "uid": "u-1",
            "labels": {"a": "b"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "note": "x"},
        }))
        .unwrap();
        let input = render_input(&meta, &json!({"image": "nginx"}));
        assert_eq!(
            input,
            json!({"metadata": {"name": "my-app", "namespace": "team", "uid": "u-1", "labels": {"a": "b"}, "annotations": {"note": "x"}}, "spec": {"image": "nginx"}})
        );
        let reordered: Value = serde_json::from_str(r#"{"spec": {"image": "nginx"}, "metadata": {"uid": "u-1", "namespace": "team", "name": "my-app", "annotations": {"note": "x"}, "labels": {"a": "b"}}}"#).unwrap();
        assert_eq!(input_hash(&input), input_hash(&reordered));
        assert_ne!(
            input_hash(&input),
            input_hash(&json!({"metadata": {}, "spec": {"image": "nginx:1"}}))
        );
    }

    #[test]
    fn batch_puts_each_input_on_its_own_known_line() {
        let a = json!({"metadata": {"name": "a"}, "spec": {"text": "multi\nline"}});
        let b = json!({"metadata": {"name": "b"}, "spec": {}});
        let src = batch_source(&module(), &[&a, &b]);
        let lines: Vec<&str> = src.lines().collect();
        assert_eq!(
            lines[FIRST_INPUT_LINE - 1],
            "\t\"0\": {_spec: p.#Input & {\"text\":\"multi\\nline\"}, (p.#Render & {input: {\"metadata\":{\"name\":\"a\"}} & {spec: _spec}}).output}"
        );
        assert!(
            lines[FIRST_INPUT_LINE]
                .starts_with("\t\"1\": {_spec: p.#Input & {}, (p.#Render & {input: {\"metadata\":{\"name\":\"b\"}}")
        );
        assert!(lines[2].contains("import p \"pequod.local/module/platform:webservice\""));
    }

    #[test]
    fn inputs_of_one_hash_are_one_text_to_cue() {
        let float = json!({"metadata": {"name": "a", "uid": "u"}, "spec": {"port": 80.0}});
        let int = json!({"spec": {"port": 80}, "metadata": {"uid": "u", "name": "a"}});
        assert_eq!(input_hash(&float), input_hash(&int));
        assert_eq!(batch_source(&module(), &[&float]), batch_source(&module(), &[&int]));
        assert!(batch_source(&module(), &[&float]).contains("p.#Input & {\"port\":80}"));
    }

    #[test]
    fn errors_are_attributed_by_position_and_by_path() {
        let stderr = "input.spec.replicas: invalid value 30 (out of bound <=20):\n    ./platform/schema.cue:5:24\n    ./batch-1/batch.cue:6:114\ninput.spec: field extra not allowed:\n    ./batch-1/batch.cue:8:8\n    ./platform/schema.cue:3:9\nresults.\"1\".nodes.0.object.spec.port: incomplete value int";
        let (per_input, unattributed) = attribute_errors(stderr, 3);
        assert!(!unattributed);
        assert_eq!(per_input.keys().copied().collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(
            per_input[&0],
            ["input.spec.replicas: invalid value 30 (out of bound <=20):\n    schema.cue:5:24"]
        );
        assert_eq!(per_input[&1], ["nodes.0.object.spec.port: incomplete value int"]);
        assert_eq!(
            per_input[&2],
            ["input.spec: field extra not allowed:\n    schema.cue:3:9"]
        );
    }

    #[test]
    fn module_wide_errors_belong_to_no_input() {
        let stderr =
            "import failed: expected '}', found 'EOF':\n    ./batch-1/batch.cue:3:8\n    ./platform/a.cue:2:17";
        let (per_input, unattributed) = attribute_errors(stderr, 2);
        assert!(per_input.is_empty());
        assert!(unattributed);
        assert_eq!(
            clean_message(stderr),
            "import failed: expected '}', found 'EOF':\n    a.cue:2:17"
        );
        assert_eq!(
            clean_message("undefined field #Render:\n    ./b/batch.cue:6:10"),
            "the module defines no #Render (undefined field #Render):"
        );
    }

    fn node(id: &str) -> Value {
        json!({"id": id, "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": id}}})
    }

    #[test]
    fn output_is_parsed_and_validated() {
        let out = parse_output(&json!({
            "metadata": {"name": "x", "version": "v1alpha1"},
            "nodes": [node("a"), {"id": "b", "dependsOn": ["a"], "object": {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b"}}, "readyWhen": [{"type": "Exists"}]}],
            "violations": [{"path": "spec.x", "message": "m", "severity": "Warning"}],
        }))
        .unwrap();
        assert_eq!(out.nodes.len(), 2);
        assert_eq!(out.nodes[1].depends_on, ["a"]);
        assert_eq!(out.violations[0].severity, crate::api::Severity::Warning);
        assert_eq!(out.metadata.unwrap().name, "x");
    }

    #[test]
    fn bad_outputs_name_the_node_and_field() {
        let cases = [
            (json!({"violations": []}), "#Render.output has no nodes"),
            (json!({"nodes": {}}), "#Render.output.nodes is not a list"),
            (
                json!({"nodes": [node("a"), {"id": "b", "object": {}, "readyWhen": [{"type": "Sometimes"}]}]}),
                "node 1 (id \"b\"): unknown variant `Sometimes`",
            ),
            (
                json!({"nodes": [node("a")], "violations": [{"path": "x", "message": "y", "severity": "Fatal"}]}),
                "violation 0: unknown variant `Fatal`",
            ),
        ];
        for (output, want) in cases {
            let err = parse_output(&output).unwrap_err();
            assert!(err.to_string().contains(want), "{err} should contain {want}");
            assert_eq!(err.reason(), "InvalidRenderOutput");
        }
        let err = parse_output(&json!({"nodes": [node("a"), node("a")]})).unwrap_err();
        assert_eq!(err.reason(), "DuplicateNodeId");
        let big = json!({"nodes": [{"id": "a", "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"x": "y".repeat(MAX_OUTPUT_BYTES)}}}]});
        assert_eq!(parse_output(&big).unwrap_err().reason(), "RenderOutputTooLarge");
    }

    #[test]
    fn batch_output_maps_back_to_inputs() {
        let stdout = json!({"results": {"0": {"nodes": [node("a")]}, "1": {"nodes": []}}}).to_string();
        let results = parse_batch(&stdout, 3).unwrap();
        assert!(results[0].is_ok());
        assert_eq!(results[1].as_ref().unwrap_err().reason(), "InvalidGraph");
        assert!(
            results[2]
                .as_ref()
                .unwrap_err()
                .to_string()
                .contains("no result for input 2")
        );
    }
}
