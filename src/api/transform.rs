//! `Transform`: a platform engineer's definition of a platform API backed by a CUE module.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Condition;

/// Default API group of generated CRDs.
pub const DEFAULT_GENERATED_GROUP: &str = "pequod.io";
/// Default API version of generated CRDs.
pub const DEFAULT_GENERATED_VERSION: &str = "v1alpha1";

/// Turns a CUE platform module into a new Kubernetes API (a generated CRD) and serves it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "platform.platform.example.com",
    version = "v1alpha1",
    kind = "Transform",
    namespaced,
    status = "TransformStatus",
    shortname = "tf",
    category = "pequod",
    doc = "Transform turns a CUE platform module into a generated CRD and serves its instances.",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Kind","type":"string","jsonPath":".status.generatedCRD.kind"}"#,
    printcolumn = r#"{"name":"Rollout","type":"string","jsonPath":".status.rollout.phase"}"#,
    printcolumn = r#"{"name":"Updated","type":"string","jsonPath":".status.rollout.progress"}"#,
    printcolumn = r#"{"name":"CRD","type":"string","priority":1,"jsonPath":".status.generatedCRD.name"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TransformSpec {
    /// Where the CUE platform module comes from.
    pub cue_ref: CueRef,
    /// API group of the generated CRD.
    #[serde(default = "default_group")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+$")
    )]
    pub group: String,
    /// API version of the generated CRD.
    #[serde(default = "default_version")]
    #[schemars(regex(pattern = r"^v[1-9][0-9]*((alpha|beta)[1-9][0-9]*)?$"))]
    pub version: String,
    /// Short names of the generated kind, added to those the module declares.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10), inner(regex(pattern = r"^[a-z][a-z0-9]{0,62}$")))]
    pub short_names: Vec<String>,
    /// Categories of the generated kind (`kubectl get <category>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10), inner(regex(pattern = r"^[a-z][a-z0-9]{0,62}$")))]
    pub categories: Vec<String>,
    /// Kinds the module's resources are made of; RBAC for them is generated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub managed_resources: Vec<ManagedResource>,
    /// Whether generated RBAC is a ClusterRole (Cluster) or a Role in the Transform's namespace (Namespace).
    #[serde(default)]
    pub rbac_scope: RbacScope,
    /// Whether instances may create cluster-scoped objects (for example a Namespace or a
    /// ClusterRole). Off by default: a developer must not reach outside their namespace
    /// through a module.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_cluster_scoped_resources: bool,
    /// Namespaces besides each instance's own whose objects the module's `Read` nodes may
    /// read (a platform ConfigMap, say). Reads of a Transform outside the trusted namespaces
    /// are made as its graphs' service account, whatever this says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 32),
        inner(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))
    )]
    pub read_namespaces: Vec<String>,
    /// How a new module version reaches the instances (by default all at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutPolicy>,
    /// The platform's settings for this cluster, which the module reads as `#Settings`: the
    /// platform team's choices, never the developers'. Keys are dotted paths into `#Settings`
    /// (`provider`, `gcp.location`), values strings or integers. A change is a new module
    /// version and reaches instances through a rollout.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "settings_schema")]
    pub settings: Settings,
}

/// A Transform's settings: dotted paths into the module's `#Settings`, and their values.
pub type Settings = BTreeMap<String, IntOrString>;

/// Most settings of one Transform.
pub const MAX_SETTINGS: usize = 64;

/// Flat and typed, so that no setting nests: what the apiserver stores, every client can
/// decode (a JSON value nested past a client's recursion limit would stop its lists of
/// Transforms).
fn settings_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": MAX_SETTINGS,
        "additionalProperties": {"x-kubernetes-int-or-string": true, "maxLength": 512},
        "x-kubernetes-validations": [{
            "rule": "self.all(k, size(k) <= 128 && k.matches('^[A-Za-z_][A-Za-z0-9_]*([.][A-Za-z_][A-Za-z0-9_]*){0,7}$'))",
            "message": "settings are dotted paths of at most 8 identifiers (provider, gcp.location), each key at most 128 characters",
        }],
    })
}

/// How a new module version reaches the instances. Under every strategy a change that
/// deletes or replaces objects of a protected kind waits for approval.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutPolicy {
    /// `Immediate` (every instance at once) or `Staged` (in batches, each waiting for the
    /// previous one to be Ready).
    #[serde(default)]
    pub strategy: RolloutStrategy,
    /// Staged: instances per batch, a count (`2`) or a percentage of the instances (`"25%"`).
    /// Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<IntOrString>,
    /// Staged: instances matching this selector go first, one batch or more of their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_selector: Option<LabelSelector>,
    /// Staged: how long a batch's instances have to be Ready. Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub health_timeout_seconds: Option<i64>,
    /// Staged: how many updated instances may fail (not Ready in time) before the rollout
    /// stops. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub failure_budget: Option<i32>,
    /// No further instance is moved to the new module while true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Kinds whose deletion or replacement waits for the approval annotation. Default
    /// PersistentVolumeClaim, StatefulSet, Namespace and Secret; `[]` protects none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 63)))]
    pub protected_kinds: Option<Vec<String>>,
}

/// How a new module version reaches the instances.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RolloutStrategy {
    #[default]
    Immediate,
    Staged,
}

/// Kinds protected from deletion and replacement by a module change unless approved.
pub const DEFAULT_PROTECTED_KINDS: &[&str] = &["PersistentVolumeClaim", "StatefulSet", "Namespace", "Secret"];

fn default_group() -> String {
    DEFAULT_GENERATED_GROUP.to_string()
}

fn default_version() -> String {
    DEFAULT_GENERATED_VERSION.to_string()
}

/// Reference to a CUE platform module.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CueRef {
    /// Kind of source: embedded, inline, configmap, git or oci.
    #[serde(rename = "type")]
    pub type_: CueRefType,
    /// embedded: module name; inline: CUE source; configmap: ConfigMap name;
    /// git: repository URL with `?ref=`; oci: `registry/repository:tag` or `@sha256:` digest.
    #[serde(rename = "ref")]
    #[schemars(length(min = 1, max = 262144))]
    pub ref_: String,
    /// Folder inside the source that holds the module (git and oci).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Secret in the Transform's namespace with credentials for git or oci sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_secret_ref: Option<SecretReference>,
}

/// Kind of CUE module source.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CueRefType {
    Embedded,
    Inline,
    Configmap,
    Git,
    Oci,
}

impl CueRefType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Inline => "inline",
            Self::Configmap => "configmap",
            Self::Git => "git",
            Self::Oci => "oci",
        }
    }
}

/// Name of a Secret in the referring object's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretReference {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A set of resources of one API group the module's objects are made of.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedResource {
    /// API group; empty or absent for the core group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_group: Option<String>,
    /// Resource names (plural), for example `deployments`.
    #[schemars(length(min = 1, max = 64))]
    pub resources: Vec<String>,
}

/// Scope of the RBAC generated from `managedResources`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RbacScope {
    #[default]
    Cluster,
    Namespace,
}

/// Most module versions a Transform's status remembers as served.
pub const MAX_SERVED_DIGESTS: usize = 20;

/// `served` with `digest` added as the most recent, the oldest dropped beyond
/// [`MAX_SERVED_DIGESTS`].
pub fn with_served(served: &[String], digest: &str) -> Vec<String> {
    let mut out: Vec<String> = served.iter().filter(|d| *d != digest).cloned().collect();
    out.push(digest.to_string());
    let excess = out.len().saturating_sub(MAX_SERVED_DIGESTS);
    out.drain(..excess);
    out
}

/// Observed state of a Transform.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransformStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<TransformPhase>,
    /// The CRD generated from the module.
    #[serde(default, rename = "generatedCRD", skip_serializing_if = "Option::is_none")]
    pub generated_crd: Option<GeneratedCrd>,
    /// The RBAC generated from managedResources.
    #[serde(default, rename = "generatedRBAC", skip_serializing_if = "Option::is_none")]
    pub generated_rbac: Option<GeneratedRbac>,
    /// The module content last loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_cue_ref: Option<ResolvedCueRef>,
    /// How the module last loaded reaches the instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// The module versions (content digests) this Transform has served, oldest first, at most
    /// [`MAX_SERVED_DIGESTS`]: the only versions its instances may be pinned to or its graphs
    /// signed with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub served_digests: Vec<String>,
    /// Pequod's proof of `servedDigests` (an HMAC with its graph-signing key): a list changed
    /// by anyone else is not believed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub served_digests_proof: Option<String>,
    /// The versions the generated kind serves, when the module declares `#Versions`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub versions: Vec<VersionStatus>,
    /// The rewrite of stored instances into the storage version after it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_migration: Option<StorageMigration>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One version of the generated kind.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VersionStatus {
    pub name: String,
    pub served: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub storage: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deprecated: bool,
    /// Instances whose spec was last written (created, updated or applied) in this version.
    pub instances_last_written: i64,
}

/// Where the rewrite of stored instances into the storage version stands. It continues after
/// `last` when the operator restarts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageMigration {
    /// The storage version instances are rewritten into.
    pub to: String,
    pub phase: StorageMigrationPhase,
    /// Instances rewritten so far.
    pub migrated: i64,
    /// Instances left to rewrite when last counted.
    pub remaining: i64,
    /// `namespace/name` of the last instance rewritten, in the order the apiserver lists them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<String>,
    /// When the storage version was first seen changed; rewriting starts a few seconds later,
    /// once every apiserver writes the new version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<Time>,
    /// Instances the last pass could not rewrite (`namespace/name: why`, the first 10); the
    /// migration passes over every instance again until none is left.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub failed: Vec<String>,
    /// What keeps the migration from completing, when something does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Phase of a storage migration.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum StorageMigrationPhase {
    #[default]
    Migrating,
    /// Every instance is stored in the storage version and the CRD's `status.storedVersions`
    /// says so: other versions may be removed.
    Complete,
}

/// Lifecycle phase of a Transform.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TransformPhase {
    Pending,
    Fetching,
    Generating,
    Ready,
    Failed,
}

/// Identity of a generated CRD.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GeneratedCrd {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub plural: String,
}

/// Names of the generated RBAC objects.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GeneratedRbac {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_role_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_binding_name: Option<String>,
    pub rule_count: i32,
}

/// The module content a Transform was last reconciled with.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedCueRef {
    /// What the reference resolved to: the manifest digest (oci), the commit SHA (git), or
    /// the content digest (`sha256:...`) of the files (embedded, inline, configmap).
    pub digest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetched_at: Option<Time>,
}

/// Where the instances are on their way to a module version.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RolloutPhase>,
    /// The module version (content digest) instances are moving to.
    pub target_digest: String,
    /// The module version every instance had when this rollout began; new instances get it
    /// until the rollout is complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_digest: Option<String>,
    /// `updated/total`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    #[serde(default)]
    pub total: i32,
    /// Instances on the target version.
    #[serde(default)]
    pub updated: i32,
    /// Instances not on it yet.
    #[serde(default)]
    pub pending: i32,
    /// Updated instances that are not Ready in time, or failed.
    #[serde(default)]
    pub failed: i32,
    /// Instances pinned to a version of their own; the rollout leaves them alone.
    #[serde(default)]
    pub pinned: i32,
    /// Number of the batch in progress (Staged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_started_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What the target version does to the instances, as planned when the rollout began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanSummary>,
}

/// Phase of a rollout.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RolloutPhase {
    Progressing,
    Paused,
    Blocked,
    Complete,
}

/// Most instances and destructive changes named in a plan summary.
pub const MAX_PLAN_LINES: usize = 10;

/// A bounded summary of a fleet plan: counts per change, and the first instances affected.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanSummary {
    /// The module version planned.
    pub digest: String,
    /// Instances planned, and those with any change.
    pub instances: i32,
    pub affected: i32,
    pub created: i32,
    pub updated: i32,
    pub deleted: i32,
    pub replaced: i32,
    /// New objects whose name another owner holds: the graph would refuse to write them.
    #[serde(default)]
    pub refused: i32,
    /// Instances whose render would break a policy (Error severity).
    pub violations: i32,
    /// Instances that would fail to render.
    pub render_failures: i32,
    /// What loading the version did to the kind's CRD: `unchanged`, or `changed, none breaking`
    /// (a breaking change stops the Transform before any instance is planned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// Deletions and replacements of protected kinds, which wait for approval.
    #[serde(default)]
    pub destructive: i32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub destructive_changes: Vec<String>,
    /// One line for each of the first instances affected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub lines: Vec<String>,
}
