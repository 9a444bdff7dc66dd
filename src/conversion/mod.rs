//! Conversion between the versions of a platform kind (placeholder until the webhook lands).

pub mod published;

use k8s_openapi::ByteString;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{ServiceReference, WebhookClientConfig};

/// Where the apiserver reaches the conversion webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookEndpoint {
    Service { namespace: String, name: String },
    Url(String),
}

impl WebhookEndpoint {
    pub fn client_config(&self, path: &str, ca_bundle_pem: &str) -> WebhookClientConfig {
        let ca_bundle = Some(ByteString(ca_bundle_pem.as_bytes().to_vec()));
        match self {
            Self::Service { namespace, name } => WebhookClientConfig {
                service: Some(ServiceReference {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    path: Some(path.to_string()),
                    port: Some(443),
                }),
                ca_bundle,
                url: None,
            },
            Self::Url(base) => WebhookClientConfig {
                url: Some(format!("{}{path}", base.trim_end_matches('/'))),
                ca_bundle,
                service: None,
            },
        }
    }
}
