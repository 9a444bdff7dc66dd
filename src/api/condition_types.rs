//! The condition types Pequod sets: part of its public surface (docs/user-guide.md lists them
//! with their reasons).

/// Every kind: whether it does what it is for.
pub const READY: &str = "Ready";

// ResourceGraph.
pub const VALID: &str = "Valid";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

// Instances of generated kinds.
pub const RENDERED: &str = "Rendered";
pub const POLICY_COMPLIANT: &str = "PolicyCompliant";

// ResourceGraph and Transform.
/// Whose rights a graph acts with (ResourceGraph); whether a Transform may be served.
pub const AUTHORIZED: &str = "Authorized";

// Transform.
pub const CUE_FETCHED: &str = "CueFetched";
pub const SCHEMA_EXTRACTED: &str = "SchemaExtracted";
pub const SCHEMA_COMPATIBLE: &str = "SchemaCompatible";
pub const CRD_GENERATED: &str = "CRDGenerated";
pub const RBAC_CONFIGURED: &str = "RBACConfigured";
pub const PAUSED: &str = "Paused";
/// Whether every instance is on the module version last loaded.
pub const ROLLED_OUT: &str = "RolledOut";
