//! Every well-known name Pequod writes into the cluster: labels, annotations, finalizers, field
//! managers, Secrets and Services. They are part of Pequod's public surface (docs/operations.md lists
//! them); changing one is a breaking change.

// Labels.

/// Set on everything Pequod creates, with [`MANAGED_BY_VALUE`].
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "pequod";
/// The Transform a generated CRD, its RBAC and its instances' graphs belong to.
pub const TRANSFORM_LABEL: &str = "pequod.io/transform";
pub const TRANSFORM_NAMESPACE_LABEL: &str = "pequod.io/transform-namespace";
/// A ConfigMap usable as a module.
pub const CUE_MODULE_LABEL: &str = "pequod.io/cue-module";
/// Aggregates a generated ClusterRole into the manager's ClusterRole (`config/restricted`).
pub const AGGREGATE_LABEL: &str = "pequod.io/aggregate-to-manager";
/// The instance a graph was rendered from: its name, kind and API group (as a label value).
pub const INSTANCE_LABEL: &str = "pequod.io/instance";
pub const INSTANCE_KIND_LABEL: &str = "pequod.io/instance-kind";
pub const INSTANCE_GROUP_LABEL: &str = "pequod.io/instance-group";
/// The ResourceGraph an object belongs to, and that graph's namespace (objects may live
/// elsewhere).
pub const GRAPH_LABEL: &str = "pequod.io/resourcegraph";
pub const GRAPH_NAMESPACE_LABEL: &str = "pequod.io/resourcegraph-namespace";
/// The node an object was applied for.
pub const NODE_LABEL: &str = "pequod.io/node";

// Annotations.

/// On a generated CRD or RBAC object of a Transform whose name does not fit a label value:
/// the Transform's full name (its [`TRANSFORM_LABEL`] holds a shortened form).
pub const TRANSFORM_NAME_ANNOTATION: &str = "pequod.io/transform-name";
/// On every object Pequod writes: the uid of the graph that wrote it.
pub const GRAPH_UID_ANNOTATION: &str = "pequod.io/resourcegraph-uid";
/// On an object of a graph whose name does not fit a label value: the graph's full name (its
/// [`GRAPH_LABEL`] holds a shortened form, see `naming::label_value`).
pub const GRAPH_NAME_ANNOTATION: &str = "pequod.io/resourcegraph-name";
/// On an object: `Orphan` leaves it running when its node or graph goes away.
pub const DELETION_POLICY_ANNOTATION: &str = "pequod.io/deletion-policy";
/// On an adopted object: the field managers it had before.
pub const ADOPTED_FROM_ANNOTATION: &str = "pequod.io/adopted-from";
/// On a rendered graph: its proof,
/// `v2:<allowance>:<transform uid>:<module digest>:<hex HMAC-SHA256>`.
pub const PROOF_ANNOTATION: &str = "pequod.io/graph-proof";
/// On a rendered graph: the graph it takes over (`<uid>/<name>`, same namespace), an
/// instance's graph of an earlier release's naming. Signed with the rest.
pub const PREDECESSOR_ANNOTATION: &str = "pequod.io/predecessor";
/// On a pull Secret holding a token or a password: the hosts (comma-separated, `host` or
/// `host:port`) it may be sent to.
pub const CREDENTIAL_HOSTS_ANNOTATION: &str = "pequod.io/credential-hosts";
/// On a Secret node of mode Create: keys (comma-separated) that Pequod fills with random
/// values as it creates the Secret, so that they appear in no render, graph or status.
pub const GENERATE_SECRET_KEYS_ANNOTATION: &str = "pequod.io/generate-secret-keys";
/// On a Transform: `"true"` stops reconciling it.
pub const PAUSED_ANNOTATION: &str = "pequod.io/paused";
/// On an instance: any new value (a timestamp, by convention) renders it afresh and applies
/// its graph now; the value handled last is `status.lastHandledReconcileAt`. Copied onto the
/// instance's graph, where it starts a pass.
pub const RECONCILE_REQUEST_ANNOTATION: &str = "pequod.io/reconcile-requested-at";
/// On an instance: keeps it on the module version (content digest) named, from the cache.
pub const PIN_ANNOTATION: &str = "pequod.io/pinned-module-digest";
/// On a Transform: approves the deletions and replacements of protected kinds that the module
/// version named (content digest) would make.
pub const APPROVAL_ANNOTATION: &str = "pequod.io/approve-destructive-change";
/// On an instance: `"true"` keeps it, and its objects, from being deleted.
pub const DELETION_PROTECTION_ANNOTATION: &str = "pequod.io/deletion-protection";

// Finalizers.

pub const TRANSFORM_FINALIZER: &str = "pequod.io/transform-finalizer";
pub const INSTANCE_FINALIZER: &str = "pequod.io/instance-finalizer";
/// Holds a graph until its objects are torn down in reverse order.
pub const GRAPH_FINALIZER: &str = "pequod.io/resourcegraph-finalizer";

// Field managers (a graph's objects are applied as `pequod-<graph uid>`, see
// `executor::write::field_manager`).

/// Generated CRDs and RBAC.
pub const GENERATED_MANAGER: &str = "pequod";
/// The one manager every graph's objects shared before each graph had its own; Pequod
/// migrates objects off it.
pub const LEGACY_FIELD_MANAGER: &str = "pequod";
pub const TRANSFORM_STATUS_MANAGER: &str = "pequod-transform";
/// Instance status and the ResourceGraphs Pequod renders.
pub const INSTANCE_MANAGER: &str = "pequod-instance";
pub const GRAPH_STATUS_MANAGER: &str = "pequod-resourcegraph";
/// The rollout's part of a Transform's status (`status.rollout`, `RolledOut`).
pub const ROLLOUT_STATUS_MANAGER: &str = "pequod-rollout";
/// Field manager of the finalizers Pequod adds and removes.
pub const FINALIZER_MANAGER: &str = "pequod-finalizer";
/// Field manager of the rewrites that move stored instances into a new storage version.
pub const STORAGE_MIGRATION_MANAGER: &str = "pequod-storage-migration";

// Secrets.

/// The graph-signing key, in the operator's namespace.
pub const SIGNING_KEY_SECRET: &str = "pequod-graph-signing-key";
/// The conversion webhook's CA and serving certificate, in the operator's namespace.
pub const WEBHOOK_TLS_SECRET: &str = "pequod-webhook-tls";

// Services.

/// The conversion webhook's Service in the operator's namespace (`--webhook-service`).
pub const WEBHOOK_SERVICE: &str = "pequod-webhook-service";
