//! `ResourceGraph`: a rendered graph of Kubernetes objects with dependencies and readiness gates.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Condition, any_value_schema, embedded_object_schema};

/// Most nodes one ResourceGraph may hold. A graph and its status are one etcd object, which
/// etcd refuses above 1.5 MiB (`--max-request-bytes`). Measured (`make bench-graph`), a node's
/// status takes about 690 bytes (its state and inventory entry, 490, and their managed fields,
/// 200): with the spec bounded by [`MAX_GRAPH_BYTES`], 1,000 nodes keep the object near 1.2 MB
/// at most (docs/resourcegraphs.md#how-large-a-graph-may-be).
pub const MAX_NODES: usize = 1000;
/// Most bytes the nodes of one graph may take, as JSON: the renderer's limit on one input's
/// output too, so that rendered and hand-written graphs are bound alike.
pub const MAX_GRAPH_BYTES: usize = 512 * 1024;
/// Most entries of `status.inventory`: the current nodes and as many objects still being pruned.
pub const MAX_INVENTORY: usize = 2 * MAX_NODES;
/// Default time a readiness gate may take before the node fails.
pub const DEFAULT_READY_TIMEOUT_SECONDS: i64 = 300;

/// A graph of Kubernetes objects that Pequod applies in dependency order.
///
/// On the wire the spec is [`ResourceGraphFields`]: the documented `graph.nodes` (`id`,
/// `resource`, `dependencies`), or the shape of earlier releases (`nodes` with `object` and
/// `dependsOn`), which is still read (see [`ResourceGraphSpec::legacy_shape`]). In the code it
/// is always `graph.nodes`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(from = "ResourceGraphFields", into = "ResourceGraphFields")]
#[kube(
    group = "platform.platform.example.com",
    version = "v1alpha1",
    kind = "ResourceGraph",
    namespaced,
    status = "ResourceGraphStatus",
    shortname = "rg",
    category = "pequod",
    doc = "ResourceGraph is a graph of Kubernetes objects applied in dependency order with readiness gates.",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.readyNodes"}"#,
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".spec.sourceRef.name"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct ResourceGraphSpec {
    pub source_ref: Option<SourceRef>,
    pub service_account_name: Option<String>,
    pub metadata: Option<GraphMetadata>,
    pub graph: Graph,
    pub violations: Vec<Violation>,
    pub render_hash: Option<String>,
    pub rendered_at: Option<Time>,
    pub outputs: BTreeMap<String, serde_json::Value>,
    /// The graph was written in the shape of earlier releases (`spec.nodes`), which is read
    /// until the API's next version and said so in the graph's `Valid` condition.
    pub legacy_shape: bool,
}

/// The nodes of a graph.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct Graph {
    /// The objects to apply (at most 1,000, and 512 KiB as JSON).
    #[schemars(length(min = 1, max = MAX_NODES))]
    pub nodes: Vec<Node>,
}

/// A ResourceGraph's spec as written.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.graph) != has(self.nodes)",
    "message": "set spec.graph.nodes (spec.nodes is the shape of earlier releases, read but not both)",
}]))]
pub struct ResourceGraphFields {
    /// The object this graph was rendered from; empty for hand-written graphs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ref: Option<SourceRef>,
    /// The service account, in the graph's namespace, whose rights every read and write of a
    /// graph without a trusted Transform's authority is made with (impersonated). Empty: the
    /// operator's default (`--default-service-account`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub service_account_name: Option<String>,
    /// Name and version of the rendered graph.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<GraphMetadata>,
    /// The objects to apply, with their dependencies and readiness gates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph: Option<Graph>,
    /// Deprecated: the nodes in the shape of earlier releases (`object`, `dependsOn`). Read
    /// until the API's next version; write `graph.nodes` instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_NODES))]
    pub nodes: Vec<LegacyNode>,
    /// Policy findings reported when the graph was rendered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 200))]
    pub violations: Vec<Violation>,
    /// Hash over the module digest and the input this graph was rendered from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub render_hash: Option<String>,
    /// When the graph was rendered; changes only when renderHash does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rendered_at: Option<Time>,
    /// Values to project into `status.outputs`: any JSON, whose strings may reference live
    /// fields of the nodes (`${node.path.to.field}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "super::any_value_map_schema")]
    pub outputs: BTreeMap<String, serde_json::Value>,
}

impl JsonSchema for ResourceGraphSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ResourceGraphSpec".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        ResourceGraphFields::json_schema(generator)
    }
}

impl From<ResourceGraphFields> for ResourceGraphSpec {
    fn from(f: ResourceGraphFields) -> Self {
        let legacy_shape = f.graph.is_none() && !f.nodes.is_empty();
        let graph = f.graph.unwrap_or_else(|| Graph {
            nodes: f.nodes.into_iter().map(Node::from).collect(),
        });
        Self {
            source_ref: f.source_ref,
            service_account_name: f.service_account_name,
            metadata: f.metadata,
            graph,
            violations: f.violations,
            render_hash: f.render_hash,
            rendered_at: f.rendered_at,
            outputs: f.outputs,
            legacy_shape,
        }
    }
}

/// Written back always in the documented shape.
impl From<ResourceGraphSpec> for ResourceGraphFields {
    fn from(s: ResourceGraphSpec) -> Self {
        Self {
            source_ref: s.source_ref,
            service_account_name: s.service_account_name,
            metadata: s.metadata,
            graph: Some(s.graph),
            nodes: Vec::new(),
            violations: s.violations,
            render_hash: s.render_hash,
            rendered_at: s.rendered_at,
            outputs: s.outputs,
        }
    }
}

/// Reference to the object a graph was rendered from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceRef {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// Descriptive metadata of a rendered graph.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GraphMetadata {
    pub name: String,
    #[serde(default = "default_graph_version")]
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_ref: Option<String>,
}

fn default_graph_version() -> String {
    "v1alpha1".to_string()
}

/// One object of the graph (`id`, `resource`, `dependencies`, and Pequod's `applyPolicy` and
/// `readyWhen`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    /// Unique id within the graph; also the value of the `pequod.io/node` label.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
    )]
    pub id: String,
    /// The Kubernetes object to apply. Modules' `#Render` output names it `object`, as did
    /// graphs of earlier releases.
    #[serde(rename = "resource", alias = "object")]
    #[schemars(schema_with = "embedded_object_schema")]
    pub object: serde_json::Value,
    /// How the object is applied.
    #[serde(default)]
    pub apply_policy: ApplyPolicy,
    /// Ids of nodes that must be Ready before this one is applied.
    #[serde(
        default,
        rename = "dependencies",
        alias = "dependsOn",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(length(max = MAX_NODES))]
    pub depends_on: Vec<String>,
    /// Gates that must all pass before the node is Ready. Without gates a node is Ready once applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub ready_when: Vec<ReadyGate>,
    /// `Read` nodes only: the labels of the one object to read, instead of its name in
    /// `resource.metadata.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
}

/// A node in the shape of earlier releases (`object`, `dependsOn`), still read.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LegacyNode {
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
    )]
    pub id: String,
    #[schemars(schema_with = "embedded_object_schema")]
    pub object: serde_json::Value,
    #[serde(default)]
    pub apply_policy: ApplyPolicy,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_NODES))]
    pub depends_on: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub ready_when: Vec<ReadyGate>,
}

impl From<LegacyNode> for Node {
    fn from(n: LegacyNode) -> Self {
        Self {
            id: n.id,
            object: n.object,
            apply_policy: n.apply_policy,
            depends_on: n.depends_on,
            ready_when: n.ready_when,
            selector: None,
        }
    }
}

impl Node {
    /// The object's `apiVersion` (empty when missing; validation refuses such graphs).
    pub fn api_version(&self) -> &str {
        self.object
            .get("apiVersion")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
    }

    /// The object's `kind` (empty when missing).
    pub fn kind(&self) -> &str {
        self.object
            .get("kind")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
    }

    /// Whether Pequod only reads the node's object: never creates, updates, adopts, prunes or
    /// deletes it.
    pub fn is_read(&self) -> bool {
        self.apply_policy.mode == ApplyMode::Read
    }

    /// The object's `metadata.namespace`, when it names one (else it is the graph's).
    pub fn namespace(&self) -> Option<&str> {
        self.object
            .pointer("/metadata/namespace")
            .and_then(serde_json::Value::as_str)
            .filter(|ns| !ns.is_empty())
    }

    /// A `Read` node's selector as the apiserver takes it (validation refuses any other).
    pub fn read_selector(&self) -> Option<String> {
        let selector = kube::core::Selector::try_from(self.selector.clone()?).ok()?;
        Some(selector.to_string())
    }

    /// The object's `metadata.name` (empty when missing; validation refuses such graphs).
    pub fn name(&self) -> &str {
        self.object
            .pointer("/metadata/name")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
    }
}

/// How a node's object is written.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplyPolicy {
    #[serde(default)]
    pub mode: ApplyMode,
    #[serde(default)]
    pub conflict_policy: ConflictPolicy,
    /// Server-side apply field manager; one of the graph's own (`pequod-<graph uid>`) when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub field_manager: Option<String>,
}

/// Apply: server-side apply on every reconcile. Create: create when absent, never update.
/// Adopt: take ownership of an existing object with a forced apply. Read: an object someone
/// else manages, named by `resource` (or found by `selector`): read and watched for its
/// fields, never written, adopted, pruned or deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum ApplyMode {
    #[default]
    Apply,
    Create,
    Adopt,
    Read,
}

/// What to do when another field manager owns a field: Error stops, Force takes it over.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ConflictPolicy {
    #[default]
    Error,
    Force,
}

/// A condition on the applied object that must hold before the node is Ready.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadyGate {
    #[serde(rename = "type")]
    pub type_: ReadyGateType,
    /// ConditionMatch: the condition type to look for in `status.conditions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition_type: Option<String>,
    /// ConditionMatch: the status it must have (default `True`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition_status: Option<String>,
    /// FieldMatch: dotted path into the object, for example `status.phase`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// FieldMatch: the value the field must equal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value_schema")]
    pub value: Option<serde_json::Value>,
    /// Expression: a CEL expression over the live object, `self`, that is true when it is
    /// ready, for example `self.status.readyReplicas >= self.spec.replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub expression: Option<String>,
    /// Seconds the gate may take after the object is applied (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout: Option<i64>,
}

/// Kinds of readiness gate.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum ReadyGateType {
    Exists,
    ConditionMatch,
    DeploymentAvailable,
    StatefulSetReady,
    JobComplete,
    FieldMatch,
    Expression,
    /// Ready when the resource's cloud controller says it is in sync (ACK's
    /// `ACK.ResourceSynced`, Config Connector's and ASO's `Ready`); failed at once when the
    /// controller reports an error it will not retry.
    CloudResourceReady,
}

/// A policy finding.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct Violation {
    pub path: String,
    pub message: String,
    pub severity: Severity,
}

/// Error blocks applying; Warning and Info are reported only.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
pub enum Severity {
    Error,
    Warning,
    Info,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "Error",
            Self::Warning => "Warning",
            Self::Info => "Info",
        }
    }
}

/// Observed state of a ResourceGraph.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceGraphStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<GraphPhase>,
    /// Ready nodes out of all nodes, for example `2/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_nodes: Option<String>,
    /// State of each node by id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_states: BTreeMap<String, NodeState>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    /// Objects this graph has applied: what pruning and deletion work from, so that they
    /// survive operator restarts and spec changes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_INVENTORY))]
    pub inventory: Vec<InventoryEntry>,
    /// `spec.outputs` with their references resolved; an output whose field is not set yet is
    /// absent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "super::any_value_map_schema")]
    pub outputs: BTreeMap<String, serde_json::Value>,
}

/// An object a graph applied.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InventoryEntry {
    pub node_id: String,
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    /// Dependency wave of the node when it was applied; deletion goes from the highest down.
    pub wave: u32,
    /// The object's uid when this graph wrote it: teardown deletes only that very object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// Overall phase of a graph.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum GraphPhase {
    Pending,
    Executing,
    Completed,
    Failed,
}

/// State of one node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    pub phase: NodePhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<Time>,
    /// Whether the object existed and was adopted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted: Option<bool>,
    /// Field managers of the object before it was adopted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_managers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_ref: Option<ResourceRef>,
    /// `Read` nodes: the resourceVersion of the object as last read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_resource_version: Option<String>,
}

impl NodeState {
    /// A node in `phase` with nothing recorded yet.
    pub fn new(phase: NodePhase) -> Self {
        Self {
            phase,
            message: None,
            last_error: None,
            last_transition_time: None,
            applied_at: None,
            ready_at: None,
            adopted: None,
            previous_managers: Vec::new(),
            resource_ref: None,
            observed_resource_version: None,
        }
    }
}

/// Lifecycle phase of a node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum NodePhase {
    Pending,
    Applying,
    WaitingReady,
    Ready,
    Error,
    Adopted,
}

/// Identity of an applied object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRef {
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}
