//! The modules conversions run with, published in the cluster: an immutable ConfigMap per
//! module digest in the operator's namespace, written by the leader before a CRD names the
//! digest. Every replica converts with exactly that module, read from there, whether or not it
//! ever fetched it, and whatever the module's source holds by then. The content is checked
//! against the digest the CRD names, so a ConfigMap changed by someone else is refused.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Api, Client, ResourceExt};

use crate::api::names::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use crate::cue::ModuleFiles;

/// Data key of the gzip-compressed JSON object of file names to contents.
const DATA_KEY: &str = "module.json.gz";
/// Label naming the Transform (`namespace.name`, hashed when long) a published module serves.
const TRANSFORM_LABEL: &str = "pequod.io/conversion-for";
/// A ConfigMap holds at most 1 MiB; the compressed module must leave room for the rest.
const MAX_PUBLISHED_BYTES: usize = 900 * 1024;
/// Most bytes a published module may expand to (the module size limit).
const MAX_EXPANDED_BYTES: u64 = 2 * crate::cue::module::MAX_MODULE_BYTES as u64;

/// Why a module cannot be published or read back.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the module compresses to {bytes} bytes; a ConfigMap holds at most {MAX_PUBLISHED_BYTES}")]
    TooLarge { bytes: usize },
    #[error("published module {name} is damaged: {message}")]
    Damaged { name: String, message: String },
    #[error("published module {name} does not have digest {digest}; it is not used")]
    WrongDigest { name: String, digest: String },
    #[error(transparent)]
    Api(#[from] kube::Error),
}

impl crate::error::ErrorCategory for PublishError {
    fn is_transient(&self) -> bool {
        matches!(self, Self::Api(_))
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "ModuleTooLarge",
            Self::Damaged { .. } | Self::WrongDigest { .. } => "ConversionModuleInvalid",
            Self::Api(_) => "APIError",
        }
    }
}

/// The ConfigMap of a module digest published for Transform `transform` (namespace, name):
/// one per Transform, so that two Transforms with the same module never share (or delete)
/// each other's.
pub fn config_map_name(transform: (&str, &str), digest: &str) -> String {
    use sha2::{Digest, Sha256};
    let owner = hex::encode(Sha256::digest(format!("{}/{}", transform.0, transform.1)));
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    format!("pequod-conversion-{}-{}", &owner[..12], &hex[..hex.len().min(40)])
}

/// The label value naming a Transform.
fn transform_label(namespace: &str, name: &str) -> String {
    crate::naming::label_value(&format!("{namespace}.{name}"))
}

/// The ConfigMap publishing `files`.
pub fn to_config_map(files: &ModuleFiles, transform: (&str, &str)) -> Result<ConfigMap, PublishError> {
    let name = config_map_name(transform, &files.digest());
    let damaged = |e: &dyn std::fmt::Display| PublishError::Damaged {
        name: name.clone(),
        message: e.to_string(),
    };
    let json = serde_json::to_vec(files.files()).map_err(|e| damaged(&e))?;
    let compressed = gzip(&json, flate2::Compression::best()).map_err(|e| damaged(&e))?;
    if compressed.len() > MAX_PUBLISHED_BYTES {
        return Err(PublishError::TooLarge {
            bytes: compressed.len(),
        });
    }
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
                (TRANSFORM_LABEL.to_string(), transform_label(transform.0, transform.1)),
            ])),
            ..Default::default()
        },
        binary_data: Some(BTreeMap::from([(DATA_KEY.to_string(), ByteString(compressed))])),
        immutable: Some(true),
        ..Default::default()
    })
}

/// `data` gzip-compressed.
pub fn gzip(data: &[u8], level: flate2::Compression) -> std::io::Result<Vec<u8>> {
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), level);
    gzip.write_all(data)?;
    gzip.finish()
}

/// `compressed` expanded, refused when it expands beyond `max` bytes (a gzip bomb stops there).
pub fn gunzip(compressed: &[u8], max: u64) -> Result<Vec<u8>, String> {
    let mut data = Vec::new();
    flate2::read::GzDecoder::new(compressed)
        .take(max + 1)
        .read_to_end(&mut data)
        .map_err(|e| e.to_string())?;
    if data.len() as u64 > max {
        return Err(format!("it expands beyond {max} bytes"));
    }
    Ok(data)
}

/// The bytes a ConfigMap holds under `key` of its `binaryData`.
pub fn binary_data<'a>(cm: &'a ConfigMap, key: &str) -> Result<&'a [u8], String> {
    cm.binary_data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.as_slice())
        .ok_or_else(|| format!("no {key}"))
}

/// The module a ConfigMap publishes, if its content has `digest`.
pub fn from_config_map(cm: &ConfigMap, digest: &str) -> Result<ModuleFiles, PublishError> {
    let name = cm.name_any();
    let damaged = |message: String| PublishError::Damaged {
        name: name.clone(),
        message,
    };
    let compressed = binary_data(cm, DATA_KEY).map_err(&damaged)?;
    let json = gunzip(compressed, MAX_EXPANDED_BYTES).map_err(damaged)?;
    let files: BTreeMap<String, String> = serde_json::from_slice(&json).map_err(|e| damaged(e.to_string()))?;
    let files = ModuleFiles::new(files).map_err(|e| damaged(e.to_string()))?;
    if files.digest() != digest {
        return Err(PublishError::WrongDigest {
            name,
            digest: digest.to_string(),
        });
    }
    Ok(files)
}

/// Publishes `files` for Transform `transform` (namespace, name) unless already published,
/// and removes what was published for it before except `keep` (the digests its CRD may still
/// name while the new one is written).
pub async fn publish(
    client: &Client,
    namespace: &str,
    files: &ModuleFiles,
    transform: (&str, &str),
    keep: &[String],
) -> Result<(), PublishError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = to_config_map(files, transform)?;
    let name = cm.name_any();
    let existing = api.get_opt(&name).await?;
    let label = transform_label(transform.0, transform.1);
    let holds = |cm: &ConfigMap| {
        cm.labels().get(TRANSFORM_LABEL) == Some(&label) && from_config_map(cm, &files.digest()).is_ok()
    };
    // One that does not hold this module for this Transform (made by someone else) is
    // replaced: the name is Pequod's, in its own namespace.
    if existing.as_ref().is_some_and(|e| !holds(e)) {
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    if !existing.as_ref().is_some_and(holds) {
        match api.create(&PostParams::default(), &cm).await {
            Ok(_) => {}
            // Content-addressed: whoever made it first made the same.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let kept: Vec<String> = keep
        .iter()
        .map(|d| config_map_name(transform, d))
        .chain([name])
        .collect();
    Ok(unpublish(client, namespace, transform, &kept).await?)
}

/// Deletes the modules published for `transform` but those named `kept`.
pub async fn unpublish(
    client: &Client,
    namespace: &str,
    transform: (&str, &str),
    kept: &[String],
) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let selector = format!(
        "{MANAGED_BY_LABEL}={MANAGED_BY_VALUE},{TRANSFORM_LABEL}={}",
        transform_label(transform.0, transform.1)
    );
    for old in api.list_metadata(&ListParams::default().labels(&selector)).await? {
        let name = old.name_any();
        if !kept.contains(&name) {
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// The module of `digest` published for `transform` (namespace, name), if there is one.
pub async fn read(
    client: &Client,
    namespace: &str,
    digest: &str,
    transform: (&str, &str),
) -> Result<Option<ModuleFiles>, PublishError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let published = api
        .get_opt(&config_map_name(transform, digest))
        .await?
        .filter(|cm| cm.labels().get(TRANSFORM_LABEL) == Some(&transform_label(transform.0, transform.1)));
    match published {
        Some(cm) => from_config_map(&cm, digest).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> ModuleFiles {
        ModuleFiles::inline("package web\n#Input: {port: string}\n").unwrap()
    }

    #[test]
    fn a_published_module_reads_back_only_under_its_digest() {
        let files = files();
        let cm = to_config_map(&files, ("platform", "web")).unwrap();
        assert_eq!(cm.immutable, Some(true));
        assert_eq!(cm.name_any(), config_map_name(("platform", "web"), &files.digest()));
        assert_eq!(from_config_map(&cm, &files.digest()).unwrap(), files);
        let other = ModuleFiles::inline("package web\n#Input: {port: int}\n").unwrap();
        assert!(matches!(
            from_config_map(&cm, &other.digest()),
            Err(PublishError::WrongDigest { .. })
        ));
    }

    #[test]
    fn a_damaged_or_oversized_publication_is_refused() {
        let files = files();
        let mut cm = to_config_map(&files, ("platform", "web")).unwrap();
        cm.binary_data = Some(BTreeMap::from([(
            DATA_KEY.to_string(),
            ByteString(b"not gzip".to_vec()),
        )]));
        assert!(matches!(
            from_config_map(&cm, &files.digest()),
            Err(PublishError::Damaged { .. })
        ));
        // A gzip bomb stops at the limit.
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gzip.write_all(&vec![b' '; (MAX_EXPANDED_BYTES + 10) as usize]).unwrap();
        cm.binary_data = Some(BTreeMap::from([(
            DATA_KEY.to_string(),
            ByteString(gzip.finish().unwrap()),
        )]));
        assert!(matches!(
            from_config_map(&cm, &files.digest()),
            Err(PublishError::Damaged { message, .. }) if message.contains("expands beyond")
        ));
    }

    #[test]
    fn names_come_from_the_transform_and_the_digest() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let web = config_map_name(("platform", "web"), &digest);
        assert!(
            web.starts_with("pequod-conversion-") && web.ends_with(&"ab".repeat(20)),
            "{web}"
        );
        assert!(web.len() <= 253);
        assert_ne!(web, config_map_name(("team-b", "web"), &digest), "one per Transform");
        assert_ne!(web, config_map_name(("platform", "web2"), &digest));
    }
}
