//! Status Pequod writes to instances of generated kinds (for example a `WebService`).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Condition, NodePhase, Violation};

/// Most node summaries kept in an instance's status.
pub const MAX_NODE_SUMMARIES: usize = 100;
/// Most violations kept in an instance's status.
pub const MAX_STATUS_VIOLATIONS: usize = 50;

/// The status fields Pequod writes on instances; a module's `#Status` may use none of them.
pub const RESERVED_STATUS_FIELDS: &[&str] = &[
    "phase",
    "conditions",
    "observedGeneration",
    "resourceGraph",
    "moduleDigest",
    "nodes",
    "violations",
    "lastHandledReconcileAt",
    "pinnedModuleDigest",
    "pendingChange",
];

/// Observed state of a platform instance.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<InstancePhase>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Name of the ResourceGraph rendered from this instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_graph: Option<String>,
    /// Digest of the module the instance was last rendered with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_digest: Option<String>,
    /// One line per rendered object.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub nodes: Vec<NodeSummary>,
    /// Policy findings of the last render.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub violations: Vec<Violation>,
    /// The module version the annotation `pequod.io/pinned-module-digest` keeps the instance on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_module_digest: Option<String>,
    /// What a module rollout under way will change here when it reaches the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_change: Option<String>,
    /// The last value of the annotation `pequod.io/reconcile-requested-at` that was handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_reconcile_at: Option<String>,
    /// The module's own status fields (its `#Status`), projected from live objects by the
    /// instance's graph (`status.outputs`). Their schema is the module's, added to the CRD.
    #[serde(flatten)]
    #[schemars(skip)]
    pub outputs: std::collections::BTreeMap<String, serde_json::Value>,
}

/// Lifecycle phase of an instance.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum InstancePhase {
    Pending,
    Rendering,
    Applying,
    Ready,
    Failed,
    Deleting,
}

/// Compact state of one rendered object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSummary {
    pub id: String,
    pub kind: String,
    pub name: String,
    pub phase: NodePhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Carries [`InstanceStatus`] through kube's CRD derive, which turns it into a structural
/// schema; only the status part of its CRD is used.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "pequod.internal",
    version = "v1",
    kind = "InstanceSchemaCarrier",
    status = "InstanceStatus"
)]
pub struct InstanceSchemaCarrierSpec {}

/// Structural schema of the status subresource of every generated kind.
pub fn instance_status_schema() -> serde_json::Value {
    use kube::CustomResourceExt;
    let crd = InstanceSchemaCarrier::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.clone());
    let mut value = serde_json::to_value(schema).unwrap_or_default();
    let mut status = value
        .pointer_mut("/properties/status")
        .map(serde_json::Value::take)
        .unwrap_or_default();
    super::strip_null_enum_values_json(&mut status);
    status
}
