//! OCI sources through oci-client: the registry's token flow (anonymous or with
//! credentials) or basic auth, manifest digests, and verified blobs.

use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::archive::ArchiveFormat;
use super::credentials::RegistryCredentials;

/// Layer media types of CUE's module artifact (`cue mod publish`).
pub const CUE_MODULE_ZIP: &str = "application/zip";
pub const CUE_MODULE_FILE: &str = "application/vnd.cue.modulefile.v1";
/// Artifact and config type of CUE's module artifact.
pub const CUE_MODULE_ARTIFACT: &str = "application/vnd.cue.module.v1+json";
/// Artifact type of modules `pequod publish` pushes: one tar+gzip layer of `.cue` files.
pub const PEQUOD_MODULE_ARTIFACT: &str = "application/vnd.pequod.module.v1";
/// Config of artifacts without one (OCI image spec 1.1).
pub const EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";
/// Layer media types of a plain tarball of `.cue` files.
pub const TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// Most bytes the layers of one module artifact may declare, and most layers.
pub const MAX_PULL_BYTES: u64 = 16 * 1024 * 1024;
const MAX_LAYERS: usize = 8;

const ACCEPTED: [&str; 5] = [CUE_MODULE_ZIP, CUE_MODULE_FILE, TAR_GZIP, TAR, "application/tar+gzip"];

/// A registry request that failed, with the registry's own message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OciError {
    #[error("{operation} {reference}: {message}")]
    Registry {
        operation: &'static str,
        reference: String,
        message: String,
        /// The registry could not be reached or failed on its side (5xx, 429), as opposed to
        /// answering no (401, 404): only the former opens the host's circuit.
        unavailable: bool,
    },
    #[error("{operation} {reference} did not finish within {seconds}s")]
    Timeout {
        operation: &'static str,
        reference: String,
        seconds: u64,
    },
    #[error("{reference} is not a module: {message}")]
    NotAModule { reference: String, message: String },
}

/// How registries are reached.
#[derive(Debug, Clone)]
pub struct Registries {
    /// Registries (host or host:port) reached over plain HTTP.
    pub insecure: Vec<String>,
    pub timeout: Duration,
    /// The proxy every request goes through, such as a fetch's guard; None connects directly.
    pub proxy: Option<String>,
}

impl Registries {
    // One client per request: oci-client keeps the first credentials it sees per registry,
    // and two Transforms may use one registry with different Secrets.
    fn client(&self) -> Client {
        // reqwest is built without a TLS provider of its own; it uses the process default.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Client::new(ClientConfig {
            protocol: if self.insecure.is_empty() {
                ClientProtocol::Https
            } else {
                ClientProtocol::HttpsExcept(self.insecure.clone())
            },
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(self.timeout),
            // Both schemes: a registry may send the client on to another host (its token
            // endpoint, a redirect to blob storage), and that host is checked too.
            http_proxy: self.proxy.clone(),
            https_proxy: self.proxy.clone(),
            ..ClientConfig::default()
        })
    }

    /// The manifest digest a tag points at now (a HEAD request where the registry allows it).
    pub async fn resolve(&self, reference: &Reference, auth: &RegistryCredentials) -> Result<String, OciError> {
        let client = self.client();
        let auth = registry_auth(auth);
        let request = client.fetch_manifest_digest(reference, &auth);
        self.bounded("resolving", reference, request).await
    }

    /// Pulls the artifact `reference` (pinned to a digest) names and returns its manifest
    /// digest and the one layer holding the module, every blob's digest verified.
    pub async fn pull(
        &self,
        reference: &Reference,
        auth: &RegistryCredentials,
    ) -> Result<(String, ArchiveFormat, Vec<u8>), OciError> {
        let client = self.client();
        let auth = registry_auth(auth);
        let not_a_module = |message: String| OciError::NotAModule {
            reference: reference.whole(),
            message,
        };
        // Layers are pulled into memory: their declared sizes are checked first.
        let manifest = client.pull_image_manifest(reference, &auth);
        let (manifest, _) = self.bounded("reading the manifest of", reference, manifest).await?;
        let declared: i64 = manifest.layers.iter().map(|l| l.size.max(0)).sum();
        if manifest.layers.len() > MAX_LAYERS || declared as u64 > MAX_PULL_BYTES {
            return Err(not_a_module(format!(
                "{} layer(s) of {declared} bytes; a module artifact has at most {MAX_LAYERS} layers of {MAX_PULL_BYTES} bytes in all",
                manifest.layers.len()
            )));
        }
        let request = client.pull(reference, &auth, ACCEPTED.to_vec());
        let image = self.bounded("pulling", reference, request).await?;
        let digest = image
            .digest
            .clone()
            .ok_or_else(|| not_a_module("the registry gave no manifest digest".into()))?;
        let mut archives = image.layers.into_iter().filter_map(|layer| {
            let format = match layer.media_type.as_str() {
                CUE_MODULE_ZIP => ArchiveFormat::Zip,
                TAR_GZIP | "application/tar+gzip" => ArchiveFormat::TarGzip,
                TAR => ArchiveFormat::Tar,
                _ => return None,
            };
            Some((format, layer.data.to_vec()))
        });
        let (format, bytes) = archives
            .next()
            .ok_or_else(|| not_a_module("no zip or tar layer".into()))?;
        if archives.next().is_some() {
            return Err(not_a_module(
                "more than one zip or tar layer; a module artifact has exactly one".into(),
            ));
        }
        Ok((digest, format, bytes))
    }

    /// Pushes `files` as one tar+gzip layer under `reference` and returns the manifest digest.
    pub async fn publish(
        &self,
        reference: &Reference,
        files: &crate::cue::ModuleFiles,
        auth: &RegistryCredentials,
    ) -> Result<String, OciError> {
        let layer = oci_client::client::ImageLayer::new(tar_gzip(files), TAR_GZIP.to_string(), None);
        let config = oci_client::client::Config::new(b"{}".to_vec(), EMPTY_CONFIG.to_string(), None);
        let mut manifest = oci_client::manifest::OciImageManifest::build(std::slice::from_ref(&layer), &config, None);
        manifest.artifact_type = Some(PEQUOD_MODULE_ARTIFACT.to_string());
        let client = self.client();
        let auth = registry_auth(auth);
        let layers = [layer];
        let request = client.push(reference, &layers, config, &auth, Some(manifest));
        self.bounded("pushing", reference, request).await?;
        // The registry computed the digest of what it stored; ask rather than recompute.
        let resolved = client.fetch_manifest_digest(reference, &auth);
        self.bounded("resolving", reference, resolved).await
    }

    async fn bounded<T>(
        &self,
        operation: &'static str,
        reference: &Reference,
        request: impl Future<Output = oci_client::errors::Result<T>>,
    ) -> Result<T, OciError> {
        // The per-read timeout does not bound a registry that trickles bytes; this does.
        let total = self.timeout.saturating_mul(2);
        match tokio::time::timeout(total, request).await {
            Err(_) => Err(OciError::Timeout {
                operation,
                reference: reference.whole(),
                seconds: total.as_secs(),
            }),
            Ok(result) => result.map_err(|e| match e {
                oci_client::errors::OciDistributionError::IncompatibleLayerMediaTypeError(media_type) => {
                    OciError::NotAModule {
                        reference: reference.whole(),
                        message: format!("layer media type {media_type} is neither a zip nor a tar"),
                    }
                }
                e => OciError::Registry {
                    operation,
                    reference: reference.whole(),
                    unavailable: unavailable(&e),
                    message: error_message(&e),
                },
            }),
        }
    }
}

/// A reproducible tar+gzip of a module's files: fixed mode and time, sorted names.
pub fn tar_gzip(files: &crate::cue::ModuleFiles) -> Vec<u8> {
    let gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut builder = tar::Builder::new(gzip);
    builder.mode(tar::HeaderMode::Deterministic);
    for (name, content) in files.files() {
        let mut header = tar::Header::new_ustar();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        // Writing to memory cannot fail; the names were validated by ModuleFiles.
        let _ = builder.append_data(&mut header, name, content.as_bytes());
    }
    builder.into_inner().and_then(|gzip| gzip.finish()).unwrap_or_default()
}

fn unavailable(error: &oci_client::errors::OciDistributionError) -> bool {
    use oci_client::errors::OciDistributionError as E;
    match error {
        E::RequestError(_) | E::IoError(_) => true,
        E::ServerError { code, .. } => *code >= 500 || *code == 429,
        // A 429 with an error body (Docker Hub's rate limit) arrives as an envelope.
        E::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .any(|e| e.code == oci_client::errors::OciErrorCode::Toomanyrequests),
        _ => false,
    }
}

fn registry_auth(auth: &RegistryCredentials) -> RegistryAuth {
    match auth {
        RegistryCredentials::Anonymous => RegistryAuth::Anonymous,
        RegistryCredentials::Basic { username, password } => RegistryAuth::Basic(username.clone(), password.clone()),
    }
}

/// The error and its causes on one line: reqwest hides "connection refused" in its sources.
fn error_message(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::cue::ModuleFiles;
    use crate::source::archive::{self, ArchiveFormat};
    use crate::source::reference::ModulePath;

    #[test]
    fn unreachable_failing_and_rate_limiting_registries_are_unavailable() {
        use oci_client::errors::{OciDistributionError as E, OciEnvelope, OciError, OciErrorCode};
        let envelope = |code| E::RegistryError {
            envelope: OciEnvelope {
                errors: vec![OciError {
                    code,
                    message: String::new(),
                    detail: serde_json::Value::Null,
                }],
            },
            url: "u".into(),
        };
        let server = |code| E::ServerError {
            code,
            url: "u".into(),
            message: String::new(),
        };
        assert!(unavailable(&envelope(OciErrorCode::Toomanyrequests)));
        assert!(!unavailable(&envelope(OciErrorCode::ManifestUnknown)));
        assert!(unavailable(&server(503)) && unavailable(&server(429)));
        assert!(!unavailable(&server(404)));
        assert!(!unavailable(&E::UnauthorizedError { url: "u".into() }));
    }

    #[test]
    fn published_tarballs_are_reproducible_and_read_back() {
        let files = ModuleFiles::new(BTreeMap::from([
            ("a.cue".to_string(), "package m\n".to_string()),
            ("b.cue".to_string(), "package m\n#Input: {}\n".to_string()),
        ]))
        .unwrap();
        let bytes = tar_gzip(&files);
        assert_eq!(bytes, tar_gzip(&files));
        let root = ModulePath::parse(None).unwrap();
        assert_eq!(
            archive::module_files(ArchiveFormat::TarGzip, &bytes, &root, "t").unwrap(),
            files
        );
    }
}
