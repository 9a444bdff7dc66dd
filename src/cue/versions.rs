//! The versions a module declares in `#Versions` (placeholder until extraction lands).

use serde_json::Value;

/// One version of a platform kind, as the module declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiVersion {
    pub name: String,
    pub served: bool,
    pub storage: bool,
    pub deprecated: bool,
    pub deprecation_warning: Option<String>,
    /// Field paths whose loss on a round trip through this version is intended.
    pub lossy: Vec<String>,
    /// The CRD schema of this version's `spec`.
    pub spec: Value,
}
