//! The conversion webhook of generated kinds with several versions: the apiserver sends it
//! ConversionReviews, and it converts each object's spec with the Transform's module.
//!
//! - [`review`]: the review itself (pure);
//! - [`served`]: which paths serve a conversion: exactly the one a Transform's CRD names (pure);
//! - [`webhook`]: the HTTPS server and the module lookup, on every replica;
//! - [`certificate`]: its serving certificate, in a Secret, renewed without restarts;
//! - [`endpoint`]: where the apiserver reaches it, for generated CRDs' `clientConfig`.

pub mod certificate;
pub mod endpoint;
pub mod published;
pub mod review;
pub mod served;
pub mod webhook;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::WebhookClientConfig;
use tokio::sync::watch;

pub use endpoint::{WebhookEndpoint, WebhookUrl, conversion_path};

/// What the Transform controller needs to point a generated CRD at the webhook: where it is,
/// and the CA bundle (PEM) that trusts its certificate, None until the Secret is first read.
#[derive(Debug, Clone)]
pub struct ConversionWebhook {
    pub endpoint: WebhookEndpoint,
    pub ca_bundle: watch::Receiver<Option<String>>,
}

impl ConversionWebhook {
    /// The `clientConfig` converting the instances of `transform` (in `namespace`) with its
    /// module `digest`; None while the CA bundle is not known yet.
    pub fn client_config(&self, namespace: &str, transform: &str, digest: &str) -> Option<WebhookClientConfig> {
        let bundle = self.ca_bundle.borrow().clone()?;
        Some(
            self.endpoint
                .client_config(&conversion_path(namespace, transform, digest), &bundle),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_config_waits_for_the_ca_bundle() {
        let (sender, receiver) = watch::channel(None);
        let webhook = ConversionWebhook {
            endpoint: WebhookEndpoint::Url("https://127.0.0.1:9443".into()),
            ca_bundle: receiver,
        };
        let digest = format!("sha256:{}", "a".repeat(64));
        assert!(webhook.client_config("ns", "web", &digest).is_none());
        sender.send_replace(Some("PEM".into()));
        let config = webhook.client_config("ns", "web", &digest).unwrap();
        assert_eq!(
            config.url.unwrap(),
            format!("https://127.0.0.1:9443/convert/ns/web/{}", "a".repeat(64))
        );
        assert_eq!(config.ca_bundle.unwrap().0, b"PEM");
    }
}
