//! The resource graph: validation and dependency order, shared by the renderer (which
//! refuses to produce an invalid graph) and the executor (which refuses to run one).

pub mod generated;
pub mod reference;

use crate::api::names::AGGREGATE_LABEL;
use crate::error::ErrorCategory;
use std::collections::{BTreeMap, BTreeSet};

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};

use crate::api::{MAX_GRAPH_BYTES, MAX_NODES, Node};

/// Why a graph cannot be executed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("the graph has no nodes")]
    Empty,
    #[error("the graph has {count} nodes; at most {max} are allowed")]
    TooManyNodes { count: usize, max: usize },
    #[error("the graph's nodes take {bytes} bytes as JSON; at most {max} are allowed")]
    TooLarge { bytes: usize, max: usize },
    #[error("node {index} has an empty id")]
    EmptyId { index: usize },
    #[error(
        "node id {id:?} is not valid: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
    )]
    InvalidId { id: String },
    #[error("node id {id:?} is used more than once")]
    DuplicateId { id: String },
    #[error("node {node:?} depends on unknown node {dependency:?}")]
    UnknownDependency { node: String, dependency: String },
    #[error("dependency cycle: {}", cycle.join(" -> "))]
    Cycle { cycle: Vec<String> },
    #[error("node {node:?}: object {problem}")]
    MalformedObject { node: String, problem: String },
    /// A name or label the apiserver would refuse: reported before anything is written.
    #[error("node {node:?}: {problem}")]
    InvalidName { node: String, problem: String },
    #[error("node {node:?}: {why}")]
    NotAllowed { node: String, why: String },
    #[error("{place}: {why}")]
    InvalidReference { place: String, why: String },
    /// A reference, gate or output that would show a sensitive object's values; `place` names
    /// the node or output that holds it.
    #[error("{place}: {why}")]
    SensitiveReference { place: String, why: String },
    #[error("node {node:?}: readiness expression {why}")]
    InvalidExpression { node: String, why: String },
    #[error("node {node:?}: {why}")]
    InvalidGate { node: String, why: String },
}

impl ErrorCategory for GraphError {
    /// A graph is invalid until its spec changes.
    fn is_transient(&self) -> bool {
        false
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::Empty | Self::EmptyId { .. } | Self::MalformedObject { .. } | Self::InvalidGate { .. } => {
                "InvalidGraph"
            }
            Self::TooManyNodes { .. } => "TooManyNodes",
            Self::TooLarge { .. } => "GraphTooLarge",
            Self::DuplicateId { .. } => "DuplicateNodeId",
            Self::InvalidId { .. } => "InvalidNodeId",
            Self::InvalidName { .. } => "InvalidName",
            Self::UnknownDependency { .. } => "UnknownDependency",
            Self::Cycle { .. } => "DependencyCycle",
            Self::NotAllowed { .. } | Self::SensitiveReference { .. } => "NotAllowed",
            Self::InvalidReference { .. } => "InvalidReference",
            Self::InvalidExpression { .. } => "InvalidExpression",
        }
    }
}

/// A validated graph: node ids in dependency order, grouped into waves whose members only
/// depend on earlier waves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dag {
    /// Every node id, dependencies before dependants (ties keep spec order).
    pub order: Vec<String>,
    /// `waves[0]` has no dependencies; `waves[n]` depends only on waves before it.
    pub waves: Vec<Vec<String>>,
    /// Direct dependencies of each node.
    pub dependencies: BTreeMap<String, BTreeSet<String>>,
    /// Direct dependants of each node.
    pub dependants: BTreeMap<String, BTreeSet<String>>,
}

/// The node id rule of the ResourceGraph CRD (it becomes a label value), checked here so that a
/// module rendering a bad id gets a clear error instead of a graph the apiserver refuses.
fn valid_id(id: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    id.len() <= 63
        && edge(id.chars().next())
        && edge(id.chars().last())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Bytes of the nodes as compact JSON, the way the apiserver stores them.
fn json_bytes(nodes: &[Node]) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing to the counter cannot fail, nor can serializing JSON values.
    let _ = serde_json::to_writer(&mut counter, nodes);
    counter.0
}

/// Most `Read` nodes of one graph: each is a watch of its own.
pub const MAX_READ_NODES: usize = 32;

/// Checks size, ids, dependencies, cycles and object identity, and computes the execution order.
pub fn validate(nodes: &[Node]) -> Result<Dag, GraphError> {
    check_size(nodes)?;
    let reads = nodes.iter().filter(|n| n.is_read()).count();
    if reads > MAX_READ_NODES {
        return Err(GraphError::MalformedObject {
            node: "(graph)".into(),
            problem: format!("the graph has {reads} Read nodes; at most {MAX_READ_NODES} are allowed"),
        });
    }
    let mut edges = Edges::default();
    for (position, node) in nodes.iter().enumerate() {
        edges.add_node(position, node)?;
        check_node(node)?;
    }
    check_read_and_written(nodes)?;
    for node in nodes {
        for dep in &node.depends_on {
            if !edges.index.contains_key(dep.as_str()) {
                return Err(GraphError::UnknownDependency {
                    node: node.id.clone(),
                    dependency: dep.clone(),
                });
            }
            edges.add(dep, &node.id);
        }
    }
    // A reference to another node's live field makes that node a dependency.
    let kinds: BTreeMap<&str, &str> = nodes.iter().map(|n| (n.id.as_str(), n.kind())).collect();
    let read = read_ids(nodes);
    for node in nodes {
        let place = format!("node {:?}", node.id);
        check_static_identity(node, &place)?;
        for referenced in checked_references(&node.object, (&kinds, &read), &place)? {
            if referenced == node.id {
                return Err(GraphError::InvalidReference {
                    place,
                    why: "a node cannot use its own live fields".into(),
                });
            }
            edges.add(&referenced, &node.id);
        }
    }
    edges.into_dag(nodes)
}

fn check_size(nodes: &[Node]) -> Result<(), GraphError> {
    if nodes.is_empty() {
        return Err(GraphError::Empty);
    }
    if nodes.len() > MAX_NODES {
        return Err(GraphError::TooManyNodes {
            count: nodes.len(),
            max: MAX_NODES,
        });
    }
    let bytes = json_bytes(nodes);
    if bytes > MAX_GRAPH_BYTES {
        return Err(GraphError::TooLarge {
            bytes,
            max: MAX_GRAPH_BYTES,
        });
    }
    Ok(())
}

/// A graph does not both read and write one object: the write would make it the graph's, and
/// the read would leave it out of the inventory.
fn check_read_and_written(nodes: &[Node]) -> Result<(), GraphError> {
    // A namespace left out is the graph's, which validation does not know: it matches any.
    let group = |n: &Node| n.api_version().rsplit_once('/').map_or("", |(g, _)| g).to_string();
    let same = |a: &Node, b: &Node| {
        group(a) == group(b)
            && a.kind() == b.kind()
            && a.name() == b.name()
            && (a.namespace().is_none() || b.namespace().is_none() || a.namespace() == b.namespace())
    };
    for read in nodes.iter().filter(|n| n.is_read() && !n.name().is_empty()) {
        if let Some(writer) = nodes
            .iter()
            .filter(|n| !n.is_read())
            .find(|w| same(w, read))
            .map(|w| w.id.as_str())
        {
            return Err(GraphError::NotAllowed {
                node: read.id.clone(),
                why: format!("reads {} {}, which node {writer} writes", read.kind(), read.name()),
            });
        }
    }
    Ok(())
}

/// Most label requirements of a `Read` node's selector.
pub const MAX_SELECTOR_TERMS: usize = 16;

/// A `Read` node names an object (by `metadata.name`, or by `selector`), it does not describe
/// one: anything else in `resource` would be ignored, so it is refused.
fn check_read_node(node: &Node) -> Result<(), GraphError> {
    let bad = |problem: String| GraphError::MalformedObject {
        node: node.id.clone(),
        problem,
    };
    let obj = node
        .object
        .as_object()
        .ok_or_else(|| bad("is not a JSON object".into()))?;
    if node.api_version().is_empty() || node.kind().is_empty() {
        return Err(bad("has no apiVersion or kind".into()));
    }
    if let Some(extra) = obj
        .keys()
        .find(|k| !["apiVersion", "kind", "metadata"].contains(&k.as_str()))
    {
        return Err(bad(format!(
            "has {extra}: a Read node names an object (apiVersion, kind, metadata.name or selector, metadata.namespace), it does not describe one"
        )));
    }
    let metadata = obj.get("metadata").and_then(|m| m.as_object());
    if let Some(extra) = metadata
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
        .find(|k| !["name", "namespace"].contains(&k.as_str()))
    {
        return Err(bad(format!(
            "has metadata.{extra}: a Read node names an object, it does not describe one"
        )));
    }
    if node.object.to_string().contains("${") {
        return Err(bad(
            "references a live field: what a Read node reads is known before anything is applied".into(),
        ));
    }
    match (node.name().is_empty(), &node.selector) {
        (false, None) => {
            crate::naming::name_problem(node.api_version(), node.kind(), node.name()).map_or(Ok(()), |problem| {
                Err(GraphError::InvalidName {
                    node: node.id.clone(),
                    problem,
                })
            })
        }
        (true, Some(selector)) => check_selector(selector).map_err(bad),
        (false, Some(_)) => Err(bad(
            "has both metadata.name and a selector; a Read node reads by one".into()
        )),
        (true, None) => Err(bad("has neither metadata.name nor a selector".into())),
    }?;
    if node.apply_policy.field_manager.is_some() {
        return Err(bad("sets applyPolicy.fieldManager; a Read node is never written".into()));
    }
    Ok(())
}

/// Why a `Read` node's selector cannot be used, if it cannot: it must select something (an
/// empty selector matches every object), within [`MAX_SELECTOR_TERMS`].
fn check_selector(selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector) -> Result<(), String> {
    let terms = selector.match_labels.as_ref().map_or(0, |m| m.len())
        + selector.match_expressions.as_ref().map_or(0, |e| e.len());
    let positive = selector.match_labels.as_ref().is_some_and(|m| !m.is_empty())
        || selector.match_expressions.iter().flatten().any(|e| e.operator == "In");
    if terms == 0 || !positive {
        return Err(
            "has a selector without a label it requires (matchLabels, or an In expression), which would match nearly every object"
                .into(),
        );
    }
    if terms > MAX_SELECTOR_TERMS {
        return Err(format!(
            "has a selector of {terms} terms; at most {MAX_SELECTOR_TERMS} are allowed"
        ));
    }
    kube::core::Selector::try_from(selector.clone())
        .map(|_| ())
        .map_err(|e| format!("has an invalid selector: {e}"))
}

/// One node on its own: its object, the Secret values it asks Pequod to generate, its gates.
fn check_node(node: &Node) -> Result<(), GraphError> {
    if node.is_read() {
        check_read_node(node)?;
        check_sensitive_gates(node)?;
        return check_gates(node);
    }
    if node.selector.is_some() {
        return Err(GraphError::MalformedObject {
            node: node.id.clone(),
            problem: "has a selector, which only a Read node may have".into(),
        });
    }
    check_object(node)?;
    generated::check(
        node.api_version(),
        node.kind(),
        node.apply_policy.mode == crate::api::ApplyMode::Create,
        &node.object,
    )
    .map_err(|problem| GraphError::MalformedObject {
        node: node.id.clone(),
        problem,
    })?;
    check_sensitive_gates(node)?;
    check_gates(node)
}

/// Its readiness expressions compile, and its cloud gates name a cloud controller's kind.
fn check_gates(node: &Node) -> Result<(), GraphError> {
    for gate in node
        .ready_when
        .iter()
        .filter(|g| g.type_ == crate::api::ReadyGateType::Expression)
    {
        crate::readiness::check_expression(gate.expression.as_deref().unwrap_or_default()).map_err(|why| {
            GraphError::InvalidExpression {
                node: node.id.clone(),
                why: why.to_string(),
            }
        })?;
    }
    if node
        .ready_when
        .iter()
        .any(|g| g.type_ == crate::api::ReadyGateType::CloudResourceReady)
    {
        crate::readiness::cloud::check_gate_target(node.api_version()).map_err(|why| GraphError::InvalidGate {
            node: node.id.clone(),
            why,
        })?;
    }
    Ok(())
}

/// An object's identity is known before anything is applied: what it is, where, and its name
/// never come from live values.
fn check_static_identity(node: &Node, place: &str) -> Result<(), GraphError> {
    for pointer in ["/apiVersion", "/kind", "/metadata/name", "/metadata/namespace"] {
        if node
            .object
            .pointer(pointer)
            .and_then(|v| v.as_str())
            .is_some_and(|v| v.contains("${"))
        {
            return Err(GraphError::InvalidReference {
                place: place.to_string(),
                why: format!("{} cannot reference a live field", &pointer[1..].replace('/', ".")),
            });
        }
    }
    Ok(())
}

/// The dependencies between nodes, as validation finds them.
#[derive(Default)]
struct Edges<'a> {
    graph: DiGraph<&'a str, ()>,
    index: BTreeMap<&'a str, NodeIndex>,
    dependencies: BTreeMap<String, BTreeSet<String>>,
    dependants: BTreeMap<String, BTreeSet<String>>,
}

impl<'a> Edges<'a> {
    /// Adds the node at `position` in the graph, once its id is valid and its own.
    fn add_node(&mut self, position: usize, node: &'a Node) -> Result<(), GraphError> {
        if node.id.is_empty() {
            return Err(GraphError::EmptyId { index: position });
        }
        if !valid_id(&node.id) {
            return Err(GraphError::InvalidId { id: node.id.clone() });
        }
        if self.index.insert(&node.id, self.graph.add_node(&node.id)).is_some() {
            return Err(GraphError::DuplicateId { id: node.id.clone() });
        }
        self.dependencies.entry(node.id.clone()).or_default();
        self.dependants.entry(node.id.clone()).or_default();
        Ok(())
    }

    /// `node` waits for `on`; both are known nodes.
    fn add(&mut self, on: &str, node: &str) {
        self.graph.update_edge(self.index[on], self.index[node], ());
        self.dependencies
            .entry(node.to_string())
            .or_default()
            .insert(on.to_string());
        self.dependants
            .entry(on.to_string())
            .or_default()
            .insert(node.to_string());
    }

    /// The execution order, unless the dependencies form a cycle: waves by longest path from a
    /// root; within a wave, spec order.
    fn into_dag(self, nodes: &[Node]) -> Result<Dag, GraphError> {
        let sorted = toposort(&self.graph, None).map_err(|_| GraphError::Cycle {
            cycle: find_cycle(&self.graph),
        })?;
        let mut depth: BTreeMap<&str, usize> = BTreeMap::new();
        for idx in &sorted {
            let id = self.graph[*idx];
            let d = self.dependencies[id]
                .iter()
                .map(|dep| depth[dep.as_str()] + 1)
                .max()
                .unwrap_or(0);
            depth.insert(id, d);
        }
        let mut waves: Vec<Vec<String>> = vec![Vec::new(); depth.values().max().map_or(0, |m| m + 1)];
        for node in nodes {
            waves[depth[node.id.as_str()]].push(node.id.clone());
        }
        let order = waves.iter().flatten().cloned().collect();
        Ok(Dag {
            order,
            waves,
            dependencies: self.dependencies,
            dependants: self.dependants,
        })
    }
}

/// The nodes `value` (held by `holder`, a node id or an output) references, each checked: it
/// exists, and the reference reads no more of a sensitive node than its identity.
/// Ids of the graph's `Read` nodes.
fn read_ids(nodes: &[Node]) -> BTreeSet<&str> {
    nodes.iter().filter(|n| n.is_read()).map(|n| n.id.as_str()).collect()
}

/// Fields of a read object that change with every write of it: a value taken from one would
/// make each write of the object wake the graphs that read it, and two graphs reading each
/// other's objects would write each other forever.
const CHANGING_WITH_EVERY_WRITE: &[&str] = &[
    "metadata.resourceVersion",
    "metadata.generation",
    "metadata.managedFields",
];

fn checked_references(
    value: &serde_json::Value,
    (kinds, read): (&BTreeMap<&str, &str>, &BTreeSet<&str>),
    place: &str,
) -> Result<BTreeSet<String>, GraphError> {
    let invalid = |why: String| GraphError::InvalidReference {
        place: place.to_string(),
        why,
    };
    let mut referenced = BTreeSet::new();
    for r in reference::references_in(value).map_err(invalid)? {
        let Some(kind) = kinds.get(r.node.as_str()) else {
            return Err(invalid(format!("{r} names no node of the graph")));
        };
        let path = r.path.join(".");
        if read.contains(r.node.as_str())
            && CHANGING_WITH_EVERY_WRITE
                .iter()
                .any(|f| path == *f || path.starts_with(&format!("{f}.")))
        {
            return Err(invalid(format!(
                "{r} reads a field of a Read node that changes with every write of its object (resourceVersion, generation, managedFields)"
            )));
        }
        if r.reads_beyond_identity(kind) {
            return Err(GraphError::SensitiveReference {
                place: place.to_string(),
                why: format!(
                    "{r} reads more of {kind} node {:?} than its identity ({}), which may carry its values",
                    r.node,
                    reference::IDENTITY_FIELDS.join(", ")
                ),
            });
        }
        referenced.insert(r.node);
    }
    Ok(referenced)
}

/// A gate's outcome tells what it compared: on a sensitive node, only an `Exists` gate, or a
/// `FieldMatch` on an identity field, says nothing of its values.
fn check_sensitive_gates(node: &Node) -> Result<(), GraphError> {
    use crate::api::ReadyGateType;
    if !reference::is_sensitive(node.kind()) {
        return Ok(());
    }
    let telling = node.ready_when.iter().find(|g| match g.type_ {
        ReadyGateType::Exists => false,
        ReadyGateType::FieldMatch => !reference::IDENTITY_FIELDS.contains(&g.path.as_deref().unwrap_or_default()),
        _ => true,
    });
    match telling {
        None => Ok(()),
        Some(gate) => Err(GraphError::SensitiveReference {
            place: format!("node {:?}", node.id),
            why: format!(
                "a {:?} gate on a {} would tell its values; only Exists, or FieldMatch on {}, may gate it",
                gate.type_,
                node.kind(),
                reference::IDENTITY_FIELDS.join(", ")
            ),
        }),
    }
}

/// Most outputs a graph may project into its status.
pub const MAX_OUTPUTS: usize = 32;

/// Checks a graph's outputs: their number, and their references like those of nodes.
pub fn validate_outputs(outputs: &BTreeMap<String, serde_json::Value>, nodes: &[Node]) -> Result<(), GraphError> {
    if outputs.len() > MAX_OUTPUTS {
        return Err(GraphError::InvalidReference {
            place: "outputs".into(),
            why: format!("{} outputs; at most {MAX_OUTPUTS} are allowed", outputs.len()),
        });
    }
    let kinds: BTreeMap<&str, &str> = nodes.iter().map(|n| (n.id.as_str(), n.kind())).collect();
    let read = read_ids(nodes);
    for (name, value) in outputs {
        checked_references(value, (&kinds, &read), &format!("output {name:?}"))?;
    }
    Ok(())
}

/// Names one cycle of a graph known to have one, as `a -> b -> a`.
fn find_cycle(graph: &DiGraph<&str, ()>) -> Vec<String> {
    for scc in tarjan_scc(graph) {
        let self_loop = scc.len() == 1 && graph.find_edge(scc[0], scc[0]).is_some();
        if scc.len() < 2 && !self_loop {
            continue;
        }
        let members: BTreeSet<NodeIndex> = scc.iter().copied().collect();
        // Walk inside the component from its lowest-named member until a node repeats.
        let start = *scc.iter().min_by_key(|i| graph[**i]).unwrap_or(&scc[0]);
        let mut path = vec![start];
        let mut current = start;
        loop {
            let next = graph
                .neighbors(current)
                .filter(|n| members.contains(n))
                .min_by_key(|n| graph[*n])
                .unwrap_or(start);
            if let Some(pos) = path.iter().position(|p| *p == next) {
                let mut cycle: Vec<String> = path[pos..].iter().map(|i| graph[*i].to_string()).collect();
                cycle.push(graph[next].to_string());
                return cycle;
            }
            path.push(next);
            current = next;
        }
    }
    Vec::new()
}

fn check_object(node: &Node) -> Result<(), GraphError> {
    let bad = |problem: &str| GraphError::MalformedObject {
        node: node.id.clone(),
        problem: problem.to_string(),
    };
    let obj = node.object.as_object().ok_or_else(|| bad("is not a JSON object"))?;
    let non_empty = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).is_some_and(|s| !s.is_empty());
    if !non_empty(obj.get("apiVersion")) {
        return Err(bad("has no apiVersion"));
    }
    if !non_empty(obj.get("kind")) {
        return Err(bad("has no kind"));
    }
    let metadata = obj
        .get("metadata")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("has no metadata"))?;
    if !non_empty(metadata.get("name")) {
        return Err(bad("has no metadata.name"));
    }
    let invalid = |problem: String| GraphError::InvalidName {
        node: node.id.clone(),
        problem,
    };
    // A value with a reference is known only when applied (a name never is one: that is
    // refused below); values that are not strings are the schema's to refuse.
    let known = |value: &str| !value.contains("${");
    if let Some(problem) = Some(node.name())
        .filter(|name| known(name))
        .and_then(|name| crate::naming::name_problem(node.api_version(), node.kind(), name))
    {
        return Err(invalid(problem));
    }
    let labels = metadata.get("labels").and_then(|l| l.as_object());
    if let Some(problem) = labels.into_iter().flatten().find_map(|(key, value)| {
        let value = value.as_str().unwrap_or_default();
        known(value).then(|| crate::naming::label_problem(key, value)).flatten()
    }) {
        return Err(invalid(problem));
    }
    // An aggregation label adds the object's rules to a ClusterRole that aggregates them,
    // the manager's own among them: no graph may grant permissions that way.
    if let Some(label) = labels
        .into_iter()
        .flat_map(|l| l.keys())
        .find(|k| k.starts_with("rbac.authorization.k8s.io/aggregate-to-") || *k == AGGREGATE_LABEL)
    {
        return Err(GraphError::NotAllowed {
            node: node.id.clone(),
            why: format!(
                "the label {label} would aggregate the object's rules into another role; Pequod never writes it"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(id: &str, deps: &[&str]) -> Node {
        serde_json::from_value(json!({
            "id": id,
            "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": id.to_ascii_lowercase().replace('_', "-")}},
            "dependsOn": deps,
        }))
        .unwrap()
    }

    #[test]
    fn ids_follow_the_crd_rule() {
        for bad in ["my node", "-a", "a-", "x".repeat(64).as_str(), "ä"] {
            assert_eq!(
                validate(&[node(bad, &[])]),
                Err(GraphError::InvalidId { id: bad.to_string() }),
                "{bad:?}"
            );
        }
        for good in ["a", "web-1", "cm_2.x", "A9"] {
            assert!(validate(&[node(good, &[])]).is_ok(), "{good:?}");
        }
        assert_eq!(GraphError::InvalidId { id: "x y".into() }.reason(), "InvalidNodeId");
    }

    #[test]
    fn diamond_has_three_waves_with_both_middles_together() {
        let dag = validate(&[
            node("top", &[]),
            node("left", &["top"]),
            node("right", &["top"]),
            node("bottom", &["left", "right"]),
        ])
        .unwrap();
        assert_eq!(dag.waves, vec![vec!["top"], vec!["left", "right"], vec!["bottom"]]);
        assert_eq!(dag.order, ["top", "left", "right", "bottom"]);
        assert_eq!(
            dag.dependants["top"],
            BTreeSet::from(["left".to_string(), "right".to_string()])
        );
    }

    #[test]
    fn waves_use_the_longest_path_and_keep_spec_order() {
        // c depends on a directly and, through b, indirectly: it must wait for b.
        let dag = validate(&[
            node("c", &["a", "b"]),
            node("b", &["a"]),
            node("a", &[]),
            node("z", &[]),
        ])
        .unwrap();
        assert_eq!(dag.waves, vec![vec!["a", "z"], vec!["b"], vec!["c"]]);
    }

    #[test]
    fn cycle_is_named() {
        let err = validate(&[node("a", &["c"]), node("b", &["a"]), node("c", &["b"]), node("d", &[])]).unwrap_err();
        assert_eq!(
            err,
            GraphError::Cycle {
                cycle: vec!["a".into(), "b".into(), "c".into(), "a".into()]
            }
        );
        assert_eq!(err.to_string(), "dependency cycle: a -> b -> c -> a");
        assert_eq!(err.reason(), "DependencyCycle");
        let self_loop = validate(&[node("a", &["a"])]).unwrap_err();
        assert_eq!(self_loop.to_string(), "dependency cycle: a -> a");
    }

    #[test]
    fn ids_and_dependencies_are_checked() {
        assert_eq!(validate(&[]).unwrap_err(), GraphError::Empty);
        assert_eq!(
            validate(&[node("a", &[]), node("a", &[])]).unwrap_err(),
            GraphError::DuplicateId { id: "a".into() }
        );
        assert_eq!(
            validate(&[node("a", &["ghost"])]).unwrap_err(),
            GraphError::UnknownDependency {
                node: "a".into(),
                dependency: "ghost".into()
            }
        );
        let many: Vec<Node> = (0..=MAX_NODES).map(|i| node(&format!("n{i}"), &[])).collect();
        let refused = validate(&many).unwrap_err();
        assert!(matches!(refused, GraphError::TooManyNodes { count: 1001, max: 1000 }));
        assert_eq!(refused.reason(), "TooManyNodes");
    }

    #[test]
    fn graphs_are_bounded_by_nodes_and_bytes() {
        // The most nodes, each depending on the one before: valid, in as many waves.
        let chain: Vec<Node> = (0..MAX_NODES)
            .map(|i| match i {
                0 => node("n0", &[]),
                _ => node(&format!("n{i}"), &[&format!("n{}", i - 1)]),
            })
            .collect();
        let dag = validate(&chain).unwrap();
        assert_eq!(dag.waves.len(), MAX_NODES);
        assert_eq!(json_bytes(&chain), serde_json::to_vec(&chain).unwrap().len());

        // Fewer nodes whose objects are large: refused by their bytes.
        let big: Vec<Node> = (0..300)
            .map(|i| {
                let mut n = node(&format!("n{i}"), &[]);
                n.object["data"] = json!({"x": "y".repeat(2048)});
                n
            })
            .collect();
        let refused = validate(&big).unwrap_err();
        assert!(
            matches!(refused, GraphError::TooLarge { bytes, max: MAX_GRAPH_BYTES } if bytes > MAX_GRAPH_BYTES),
            "{refused}"
        );
        assert_eq!(refused.reason(), "GraphTooLarge");
    }

    #[test]
    fn aggregation_labels_are_not_allowed() {
        for label in [
            "rbac.authorization.k8s.io/aggregate-to-admin",
            "pequod.io/aggregate-to-manager",
        ] {
            let role: Node = serde_json::from_value(json!({"id": "role", "object": {
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": {"name": "r", "labels": {label: "true"}}}}))
            .unwrap();
            let err = validate(&[role]).unwrap_err();
            assert_eq!(err.reason(), "NotAllowed", "{label}");
            assert!(err.to_string().contains(label), "{err}");
        }
        let plain: Node = serde_json::from_value(json!({"id": "role", "object": {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "r", "labels": {"app": "x"}}}}))
        .unwrap();
        assert!(validate(&[plain]).is_ok());
    }

    #[test]
    fn names_and_labels_the_apiserver_would_refuse_are_reported_before_any_write() {
        let object = |kind: &str, name: &str, labels: serde_json::Value| -> Node {
            serde_json::from_value(json!({"id": "n", "object": {
                "apiVersion": "v1", "kind": kind, "metadata": {"name": name, "labels": labels}}}))
            .unwrap()
        };
        let service = |length: usize| object("Service", &format!("s{}", "a".repeat(length - 1)), json!({}));
        assert!(validate(&[service(63)]).is_ok());
        let err = validate(&[service(64)]).unwrap_err();
        assert_eq!(err.reason(), "InvalidName");
        assert!(
            err.to_string().contains("Service name") && err.to_string().contains("64 characters"),
            "{err}"
        );
        assert!(validate(&[object("ConfigMap", &"c".repeat(253), json!({}))]).is_ok());
        assert_eq!(
            validate(&[object("ConfigMap", &"c".repeat(254), json!({}))])
                .unwrap_err()
                .reason(),
            "InvalidName"
        );
        let label = |value: &str| object("ConfigMap", "c", json!({"app.kubernetes.io/instance": value}));
        assert!(validate(&[label(&"v".repeat(63))]).is_ok());
        let err = validate(&[label(&"v".repeat(64))]).unwrap_err();
        assert_eq!(err.reason(), "InvalidName");
        assert!(err.to_string().contains("app.kubernetes.io/instance"), "{err}");
    }

    #[test]
    fn objects_need_api_version_kind_and_name() {
        for (object, problem) in [
            (json!("text"), "is not a JSON object"),
            (
                json!({"kind": "ConfigMap", "metadata": {"name": "x"}}),
                "has no apiVersion",
            ),
            (json!({"apiVersion": "v1", "metadata": {"name": "x"}}), "has no kind"),
            (json!({"apiVersion": "v1", "kind": "ConfigMap"}), "has no metadata"),
            (
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": ""}}),
                "has no metadata.name",
            ),
        ] {
            let mut n = node("x", &[]);
            n.object = object;
            assert_eq!(
                validate(&[n]).unwrap_err(),
                GraphError::MalformedObject {
                    node: "x".into(),
                    problem: problem.into()
                }
            );
        }
    }

    fn object_node(id: &str, kind: &str, object_extra: serde_json::Value) -> Node {
        let mut object = json!({"apiVersion": "v1", "kind": kind, "metadata": {"name": id}});
        if let (Some(o), Some(extra)) = (object.as_object_mut(), object_extra.as_object()) {
            o.extend(extra.clone());
        }
        serde_json::from_value(json!({"id": id, "object": object})).unwrap()
    }

    #[test]
    fn generated_secret_values_need_a_secret_of_mode_create() {
        let annotated =
            json!({"metadata": {"name": "creds", "annotations": {"pequod.io/generate-secret-keys": "password"}}});
        let mut created = object_node("creds", "Secret", annotated.clone());
        created.apply_policy.mode = crate::api::ApplyMode::Create;
        assert!(validate(std::slice::from_ref(&created)).is_ok());
        let applied = object_node("creds", "Secret", annotated.clone());
        let err = validate(&[applied]).unwrap_err().to_string();
        assert!(err.starts_with("node \"creds\": object has the annotation"), "{err}");
        assert!(err.contains("mode Create"), "{err}");
        let mut config = object_node("creds", "ConfigMap", annotated);
        config.apply_policy.mode = crate::api::ApplyMode::Create;
        assert!(
            validate(&[config])
                .unwrap_err()
                .to_string()
                .contains("only a v1 Secret")
        );
    }

    #[test]
    fn a_reference_makes_its_node_a_dependency_and_must_be_sound() {
        let service = object_node("service", "Service", json!({}));
        let config = object_node(
            "config",
            "ConfigMap",
            json!({"data": {"ip": "${service.spec.clusterIP}"}}),
        );
        let dag = validate(&[config.clone(), service.clone()]).unwrap();
        assert_eq!(dag.waves, vec![vec!["service".to_string()], vec!["config".to_string()]]);
        assert!(dag.dependencies["config"].contains("service"));

        let unknown = object_node("config", "ConfigMap", json!({"data": {"ip": "${nowhere.spec.x}"}}));
        assert_eq!(validate(&[unknown]).unwrap_err().reason(), "InvalidReference");
        let mut named = object_node("config", "ConfigMap", json!({}));
        named.object["metadata"]["name"] = json!("${service.metadata.name}");
        assert_eq!(
            validate(&[named, service.clone()]).unwrap_err().reason(),
            "InvalidReference"
        );
        let own = object_node(
            "config",
            "ConfigMap",
            json!({"data": {"me": "${config.metadata.name}"}}),
        );
        assert_eq!(validate(&[own]).unwrap_err().reason(), "InvalidReference");
        let malformed = object_node("config", "ConfigMap", json!({"data": {"x": "${service}"}}));
        assert_eq!(
            validate(&[malformed, service.clone()]).unwrap_err().reason(),
            "InvalidReference"
        );

        let secret = object_node("creds", "Secret", json!({}));
        for leaking in ["${creds.data.password}", "${creds.metadata.annotations}"] {
            let leak = object_node("config", "ConfigMap", json!({"data": {"p": leaking}}));
            let refused = validate(&[secret.clone(), leak]).unwrap_err();
            assert_eq!(refused.reason(), "NotAllowed", "{leaking}");
            assert!(
                refused.to_string().starts_with("node \"config\": "),
                "the node holding the reference is named first: {refused}"
            );
        }
        let gated = |gate: serde_json::Value| {
            let mut node = object_node("creds", "Secret", json!({}));
            node.ready_when = vec![serde_json::from_value(gate).unwrap()];
            validate(&[node])
        };
        for telling in [
            json!({"type": "FieldMatch", "path": "data.password", "value": "x"}),
            json!({"type": "FieldMatch", "path": "metadata.annotations", "value": "x"}),
            json!({"type": "ConditionMatch", "conditionType": "Ready"}),
            json!({"type": "Expression", "expression": "self.data.password == 'eA=='"}),
        ] {
            let refused = gated(telling.clone()).unwrap_err();
            assert_eq!(refused.reason(), "NotAllowed", "{telling}");
        }
        assert!(gated(json!({"type": "Exists"})).is_ok());
        assert!(gated(json!({"type": "FieldMatch", "path": "metadata.name", "value": "creds"})).is_ok());
        let by_name = object_node("config", "ConfigMap", json!({"data": {"p": "${creds.metadata.name}"}}));
        assert!(validate(&[secret.clone(), by_name]).is_ok());

        let cycle_a = object_node("a", "ConfigMap", json!({"data": {"x": "${b.data.x}"}}));
        let cycle_b = object_node("b", "ConfigMap", json!({"data": {"x": "${a.data.x}"}}));
        assert_eq!(validate(&[cycle_a, cycle_b]).unwrap_err().reason(), "DependencyCycle");
    }

    #[test]
    fn outputs_are_bounded_and_checked_like_nodes() {
        let nodes = [
            object_node("service", "Service", json!({})),
            object_node("creds", "Secret", json!({})),
        ];
        let outputs = |pairs: &[(&str, serde_json::Value)]| -> BTreeMap<String, serde_json::Value> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
        };
        assert!(
            validate_outputs(
                &outputs(&[("ip", json!("${service.spec.clusterIP}")), ("static", json!(1))]),
                &nodes
            )
            .is_ok()
        );
        assert!(validate_outputs(&outputs(&[("x", json!("${nowhere.a}"))]), &nodes).is_err());
        assert_eq!(
            validate_outputs(&outputs(&[("p", json!("${creds.stringData.p}"))]), &nodes)
                .unwrap_err()
                .reason(),
            "NotAllowed"
        );
        let many: Vec<(String, serde_json::Value)> = (0..=MAX_OUTPUTS).map(|i| (format!("o{i}"), json!(i))).collect();
        assert!(validate_outputs(&many.into_iter().collect(), &nodes).is_err());
    }

    #[test]
    fn readiness_expressions_must_be_valid_cel() {
        let with_gate = |expression: &str| -> Node {
            serde_json::from_value(
                json!({"id": "d", "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "d"}},
                "readyWhen": [{"type": "Expression", "expression": expression}]}),
            )
            .unwrap()
        };
        assert!(validate(&[with_gate("has(self.data) && self.data.ready == 'yes'")]).is_ok());
        let err = validate(&[with_gate("self.data.ready ==")]).unwrap_err();
        assert_eq!(err.reason(), "InvalidExpression");
        assert!(err.to_string().contains("not valid CEL"), "{err}");
        assert_eq!(validate(&[with_gate("")]).unwrap_err().reason(), "InvalidExpression");
    }

    #[test]
    fn cloud_resource_gates_only_gate_cloud_controllers_resources() {
        let with_gate = |api_version: &str| -> Node {
            serde_json::from_value(json!({"id": "bucket", "object": {"apiVersion": api_version, "kind": "Bucket", "metadata": {"name": "b"}},
                "readyWhen": [{"type": "CloudResourceReady"}]}))
            .unwrap()
        };
        for cloud in [
            "s3.services.k8s.aws/v1alpha1",
            "storage.cnrm.cloud.google.com/v1beta1",
            "storage.azure.com/v1api20230101",
        ] {
            assert!(validate(&[with_gate(cloud)]).is_ok(), "{cloud}");
        }
        let err = validate(&[with_gate("apps/v1")]).unwrap_err();
        assert_eq!(err.reason(), "InvalidGraph");
        assert!(err.to_string().contains("not apps/v1"), "{err}");
    }

    #[test]
    fn read_nodes_name_one_object_and_describe_nothing() {
        let read = |resource: serde_json::Value, extra: serde_json::Value| -> Node {
            let mut node = json!({"id": "endpoint", "resource": resource, "applyPolicy": {"mode": "Read"}});
            node.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            serde_json::from_value(node).unwrap()
        };
        let cm = |metadata: serde_json::Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata});
        let by_name = read(cm(json!({"name": "db", "namespace": "platform"})), json!({}));
        assert!(validate(std::slice::from_ref(&by_name)).is_ok());
        let by_labels = read(
            cm(json!({"namespace": "platform"})),
            json!({"selector": {"matchLabels": {"app": "db"}}}),
        );
        assert!(validate(&[by_labels]).is_ok());
        for (node, why) in [
            (
                read(
                    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "db"}, "data": {"a": "b"}}),
                    json!({}),
                ),
                "does not describe one",
            ),
            (
                read(cm(json!({"name": "db", "labels": {"a": "b"}})), json!({})),
                "metadata.labels",
            ),
            (read(cm(json!({})), json!({})), "neither metadata.name nor a selector"),
            (
                read(
                    cm(json!({"name": "db"})),
                    json!({"selector": {"matchLabels": {"a": "b"}}}),
                ),
                "both",
            ),
            (
                read(cm(json!({})), json!({"selector": {}})),
                "without a label it requires",
            ),
            (
                read(
                    cm(json!({})),
                    json!({"selector": {"matchExpressions": [{"key": "x", "operator": "DoesNotExist"}]}}),
                ),
                "without a label it requires",
            ),
            (
                read(cm(json!({"name": "${other.metadata.name}"})), json!({})),
                "live field",
            ),
        ] {
            let err = validate(&[node]).unwrap_err();
            assert!(err.to_string().contains(why), "{why}: {err}");
        }
        // A graph does not both write and read one object, and only Read nodes select.
        let written: Node =
            serde_json::from_value(json!({"id": "db", "resource": cm(json!({"name": "db", "namespace": "platform"}))}))
                .unwrap();
        let err = validate(&[written.clone(), by_name.clone()]).unwrap_err();
        assert!(err.to_string().contains("which node db writes"), "{err}");
        let unnamespaced: Node =
            serde_json::from_value(json!({"id": "db", "resource": cm(json!({"name": "db"}))})).unwrap();
        assert!(
            validate(&[unnamespaced, by_name.clone()]).is_err(),
            "a namespace left out is the graph's, which may be the read one's"
        );
        // A value that changes with every write of the read object is refused.
        let echo: Node = serde_json::from_value(
            json!({"id": "echo", "resource": {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "echo"}, "data": {"v": "${endpoint.metadata.resourceVersion}"}}}),
        )
        .unwrap();
        let err = validate(&[by_name, echo]).unwrap_err();
        assert!(err.to_string().contains("changes with every write"), "{err}");
        let mut selecting = written;
        selecting.selector = Some(serde_json::from_value(json!({"matchLabels": {"a": "b"}})).unwrap());
        assert!(
            validate(&[selecting])
                .unwrap_err()
                .to_string()
                .contains("only a Read node")
        );
    }
}
