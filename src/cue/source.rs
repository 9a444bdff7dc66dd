//! Resolving a Transform's `cueRef` to module files: embedded, inline and ConfigMap sources.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};

use super::{ModuleError, ModuleFiles};
use crate::api::{CueRef, CueRefType};

/// Label a ConfigMap must carry to be used as a module.
pub const CUE_MODULE_LABEL: &str = "pequod.io/cue-module";

/// Why a module could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("ConfigMap {namespace}/{name} not found")]
    ConfigMapNotFound { namespace: String, name: String },
    #[error("ConfigMap {namespace}/{name} is not labelled {CUE_MODULE_LABEL}=\"true\"")]
    ConfigMapNotLabelled { namespace: String, name: String },
    #[error("ConfigMap {namespace}/{name}: {source}")]
    ConfigMapContent {
        namespace: String,
        name: String,
        #[source]
        source: ModuleError,
    },
    #[error("reading ConfigMap {namespace}/{name}: {source}")]
    Kube {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0}")]
    Module(#[from] ModuleError),
    #[error("cueRef.type {0} is not supported by this version of Pequod")]
    Unsupported(&'static str),
}

impl SourceError {
    /// Stable reason string for conditions, events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unsupported(_) => "UnsupportedSource",
            _ => "CueFetchFailed",
        }
    }
}

/// A fetched module and the label it goes by in metrics and messages.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub files: ModuleFiles,
    pub platform: String,
}

/// Fetches the module `cue_ref` points at; ConfigMaps are read in `namespace` (the Transform's).
pub async fn fetch(
    client: &Client,
    cue_ref: &CueRef,
    namespace: &str,
    transform_name: &str,
) -> Result<Fetched, SourceError> {
    match cue_ref.type_ {
        CueRefType::Embedded => Ok(Fetched {
            files: ModuleFiles::embedded(&cue_ref.ref_)?,
            platform: cue_ref.ref_.clone(),
        }),
        CueRefType::Inline => Ok(Fetched {
            files: ModuleFiles::inline(&cue_ref.ref_)?,
            platform: transform_name.to_string(),
        }),
        CueRefType::Configmap => {
            let name = cue_ref.ref_.clone();
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
            let cm = api
                .get_opt(&name)
                .await
                .map_err(|source| SourceError::Kube {
                    namespace: namespace.into(),
                    name: name.clone(),
                    source,
                })?
                .ok_or_else(|| SourceError::ConfigMapNotFound {
                    namespace: namespace.into(),
                    name: name.clone(),
                })?;
            let labelled = cm
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(CUE_MODULE_LABEL))
                .is_some_and(|v| v == "true");
            if !labelled {
                return Err(SourceError::ConfigMapNotLabelled {
                    namespace: namespace.into(),
                    name,
                });
            }
            let files = ModuleFiles::from_config_map_data(&cm.data.unwrap_or_default()).map_err(|source| {
                SourceError::ConfigMapContent {
                    namespace: namespace.into(),
                    name: name.clone(),
                    source,
                }
            })?;
            Ok(Fetched { files, platform: name })
        }
        CueRefType::Git => Err(SourceError::Unsupported("git")),
        CueRefType::Oci => Err(SourceError::Unsupported("oci")),
    }
}
