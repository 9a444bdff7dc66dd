//! Reasons of conditions and events: part of Pequod's public surface (docs/user-guide.md and
//! docs/operations.md list them). Reasons that come from an error are given by the error's
//! category (`crate::error::ErrorCategory`); these are the others.

// Transforms.
pub const PAUSED: &str = "Paused";
pub const RESUMED: &str = "Resumed";
pub const NOT_ALLOWED: &str = "NotAllowed";
pub const RESTRICTED: &str = "Restricted";
pub const TRUSTED: &str = "Trusted";
pub const CUE_FETCH_FAILED: &str = "CueFetchFailed";
pub const FETCHED: &str = "Fetched";
pub const EXTRACTED: &str = "Extracted";
pub const CUE_RENDER_FAILED: &str = "CueRenderFailed";
pub const CRD_GENERATION_FAILED: &str = "CRDGenerationFailed";
pub const KIND_CONFLICT: &str = "KindConflict";
pub const BREAKING_CHANGE: &str = "BreakingChange";
pub const COMPATIBLE: &str = "Compatible";
pub const CRD_GENERATED: &str = "CRDGenerated";
pub const ESTABLISHED: &str = "Established";
pub const NAMES_NOT_ACCEPTED: &str = "NamesNotAccepted";
pub const CRD_NOT_ESTABLISHED: &str = "CRDNotEstablished";
pub const WAITING_FOR_ESTABLISHED: &str = "WaitingForEstablished";
pub const CONFIGURED: &str = "Configured";
pub const RBAC_CONFLICT: &str = "RBACConflict";
pub const RBAC_FAILED: &str = "RBACFailed";
pub const RBAC_MISSING: &str = "RBACMissing";
pub const WAITING_FOR_INSTANCES: &str = "WaitingForInstances";
// Versions of a generated kind.
/// The module's conversions do not give back an existing instance unchanged.
pub const LOSSY_CONVERSION: &str = "LossyConversion";
/// A version objects may still be stored in would be removed.
pub const VERSION_STILL_STORED: &str = "VersionStillStored";
/// Every instance is stored in the storage version.
pub const STORAGE_MIGRATED: &str = "StorageMigrated";
// Rollouts of a module version (condition RolledOut, and events).
pub const ROLLOUT_COMPLETE: &str = "RolloutComplete";
pub const ROLLOUT_PROGRESSING: &str = "RolloutProgressing";
pub const ROLLOUT_PAUSED: &str = "RolloutPaused";
pub const APPROVAL_REQUIRED: &str = "ApprovalRequired";
pub const HEALTH_GATE_FAILED: &str = "HealthGateFailed";
pub const INVALID_ROLLOUT: &str = "InvalidRollout";
pub const ROLLOUT_STARTED: &str = "RolloutStarted";
pub const BATCH_STARTED: &str = "BatchStarted";
/// The leader could not publish how a kind is served for the replicas (`--shards`).
pub const SERVING_NOT_PUBLISHED: &str = "ServingNotPublished";

// Instances.
pub const RENDERED: &str = "Rendered";
pub const GRAPH_RENAMED: &str = "GraphRenamed";
pub const POLICY_VIOLATION: &str = "PolicyViolation";
pub const COMPLIANT: &str = "Compliant";
pub const WARNINGS: &str = "Warnings";
pub const GRAPH_CONFLICT: &str = "GraphConflict";
pub const GRAPH_REJECTED: &str = "GraphRejected";
pub const DELETING: &str = "Deleting";
pub const GRAPH_FAILED: &str = "GraphFailed";
pub const DELETION_PROTECTED: &str = "DeletionProtected";
pub const MODULE_UNAVAILABLE: &str = "ModuleUnavailable";
/// A pin (or a recorded version) its Transform never served.
pub const VERSION_NOT_SERVED: &str = "VersionNotServed";

// ResourceGraphs.
pub const VALID: &str = "Valid";
/// Valid, in the shape of earlier releases (`spec.nodes`).
pub const DEPRECATED_SHAPE: &str = "DeprecatedShape";
pub const INVALID_GRAPH: &str = "InvalidGraph";
pub const APPLY_FAILED: &str = "ApplyFailed";
/// A `Read` node's selector matches more than one object.
pub const READ_FAILED: &str = "ReadFailed";
pub const ADOPTION_FAILED: &str = "AdoptionFailed";
pub const READINESS_TIMEOUT: &str = "ReadinessTimeout";
pub const READINESS_FAILED: &str = "ReadinessFailed";
pub const EXPRESSION_TIMEOUT: &str = "ExpressionTimeout";
pub const OBJECT_RELEASED: &str = "ObjectReleased";
pub const OBJECT_NOT_OWNED: &str = "ObjectNotOwned";
pub const ALL_NODES_READY: &str = "AllNodesReady";
pub const COMPLETED: &str = "Completed";
pub const NODE_FAILED: &str = "NodeFailed";
pub const PROGRESSING: &str = "Progressing";
pub const APPLYING: &str = "Applying";
/// Condition `Authorized`: whose rights a graph acts with.
pub const TRANSFORM_AUTHORITY: &str = "TransformAuthority";
pub const SERVICE_ACCOUNT: &str = "ServiceAccount";
/// The apiserver refused the graph's service account (condition `Authorized`, node events).
pub const FORBIDDEN: &str = "Forbidden";
/// The Transform a rendered graph was signed for no longer stands behind it.
pub const GRANT_WITHDRAWN: &str = "GrantWithdrawn";

// Every kind.
pub const READY: &str = "Ready";
