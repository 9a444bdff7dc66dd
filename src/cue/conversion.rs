//! PLACEHOLDER, replaced at merge by the real conversion (converting instances' specs between
//! a module's versions through cue). Only the signature the conversion webhook codes against is
//! declared here; every conversion reports that it is unavailable.

use serde_json::Value;

use super::{Module, Renderer};

/// One object's spec to convert from API version `from` to `to` (version names, e.g. `v1beta1`).
#[derive(Debug)]
pub struct Conversion {
    pub from: String,
    pub to: String,
    pub spec: Value,
}

/// Why one spec could not be converted. Messages name the field, never the object: the caller
/// adds the object's namespace and name.
#[derive(Debug, thiserror::Error)]
pub enum ConversionError {
    #[error("{path}: {message}")]
    Field { path: String, message: String },
    #[error("{message}")]
    Module { message: String },
    #[error("{message}")]
    Unavailable { message: String },
}

impl Renderer {
    /// Converts each item's spec, one result per item, in order.
    pub async fn convert(&self, _module: &Module, items: &[Conversion]) -> Vec<Result<Value, ConversionError>> {
        items
            .iter()
            .map(|_| {
                Err(ConversionError::Unavailable {
                    message: "conversion between versions is not available in this build".into(),
                })
            })
            .collect()
    }
}
