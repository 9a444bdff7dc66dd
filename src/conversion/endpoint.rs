//! Where the apiserver reaches the conversion webhook: the Service in the operator's namespace,
//! or a URL (`--webhook-url`) when the operator runs outside the cluster. Pure.

use std::net::IpAddr;
use std::str::FromStr;

use k8s_openapi::ByteString;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{ServiceReference, WebhookClientConfig};

/// The port the webhook's Service listens on.
pub const SERVICE_PORT: i32 = 443;

/// The path of the conversions of `transform`'s module `digest` (`sha256:<hex>`): what the
/// webhook's route expects.
pub fn conversion_path(namespace: &str, transform: &str, digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    format!("/convert/{namespace}/{transform}/{hex}")
}

/// How the apiserver reaches the webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookEndpoint {
    /// The Service `name` in `namespace`, on port 443.
    Service { namespace: String, name: String },
    /// `https://host[:port]`, without a trailing slash.
    Url(String),
}

impl WebhookEndpoint {
    /// The `clientConfig` of a CRD's conversion webhook: this endpoint with `path` (see
    /// [`conversion_path`]), trusting the CAs of `ca_bundle_pem`.
    pub fn client_config(&self, path: &str, ca_bundle_pem: &str) -> WebhookClientConfig {
        let ca_bundle = (!ca_bundle_pem.is_empty()).then(|| ByteString(ca_bundle_pem.as_bytes().to_vec()));
        match self {
            Self::Service { namespace, name } => WebhookClientConfig {
                ca_bundle,
                service: Some(ServiceReference {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    path: Some(path.to_string()),
                    port: Some(SERVICE_PORT),
                }),
                url: None,
            },
            Self::Url(base) => WebhookClientConfig {
                ca_bundle,
                service: None,
                url: Some(format!("{base}{path}")),
            },
        }
    }
}

/// A name a certificate is valid for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SubjectName {
    Dns(String),
    Ip(IpAddr),
}

impl std::fmt::Display for SubjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dns(name) => f.write_str(name),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// `--webhook-url`: `https://HOST[:PORT]`, the address the apiserver calls the webhook at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    /// The URL without a trailing slash; conversion paths are appended to it.
    pub base: String,
    pub host: SubjectName,
}

impl FromStr for WebhookUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |why: &str| format!("invalid webhook URL {s:?} (want https://HOST[:PORT]): {why}");
        let rest = s
            .strip_prefix("https://")
            .ok_or_else(|| invalid("the scheme must be https"))?;
        if rest.contains(['?', '#', '@']) {
            return Err(invalid("no user, query or fragment"));
        }
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if !path.is_empty() && path != "/" {
            return Err(invalid("no path: the webhook serves /convert/... at the root"));
        }
        let (host, port) = split_host_port(authority).map_err(|why| invalid(&why))?;
        if let Some(port) = port {
            port.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| invalid("the port must be 1 to 65535"))?;
        }
        let host = subject_name(host).map_err(|why| invalid(&why))?;
        Ok(Self {
            base: format!("https://{authority}"),
            host,
        })
    }
}

/// `host` and `port` of `host[:port]` or `[ipv6][:port]`.
fn split_host_port(authority: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, rest) = bracketed.split_once(']').ok_or_else(|| "an unclosed '['".to_string())?;
        return match rest {
            "" => Ok((host, None)),
            _ => rest
                .strip_prefix(':')
                .map(|port| (host, Some(port)))
                .ok_or_else(|| "text after ']'".to_string()),
        };
    }
    Ok(match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    })
}

/// An IP address, or a DNS name (lower-case labels of letters, digits and `-`).
fn subject_name(host: &str) -> Result<SubjectName, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SubjectName::Ip(ip));
    }
    if crate::naming::is_dns_name(host) {
        Ok(SubjectName::Dns(host.to_string()))
    } else {
        Err(format!("{host:?} is neither an IP address nor a lower-case DNS name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_names_the_transform_and_the_digest_s_hex() {
        assert_eq!(
            conversion_path("platform", "web", &format!("sha256:{}", "ab".repeat(32))),
            format!("/convert/platform/web/{}", "ab".repeat(32))
        );
    }

    #[test]
    fn a_service_endpoint_names_the_service_on_443_with_the_path() {
        let endpoint = WebhookEndpoint::Service {
            namespace: "pequod-system".into(),
            name: "pequod-webhook-service".into(),
        };
        let config = endpoint.client_config("/convert/a/b/c", "-----BEGIN CERTIFICATE-----\n");
        let service = config.service.unwrap();
        assert_eq!(
            (service.namespace.as_str(), service.name.as_str()),
            ("pequod-system", "pequod-webhook-service")
        );
        assert_eq!(service.port, Some(443));
        assert_eq!(service.path.as_deref(), Some("/convert/a/b/c"));
        assert_eq!(config.url, None);
        assert_eq!(config.ca_bundle.unwrap().0, b"-----BEGIN CERTIFICATE-----\n");
    }

    #[test]
    fn a_url_endpoint_appends_the_path_and_the_bundle_is_base64_in_json() {
        let endpoint = WebhookEndpoint::Url("https://127.0.0.1:9443".into());
        let config = endpoint.client_config("/convert/a/b/c", "PEM");
        assert_eq!(config.url.as_deref(), Some("https://127.0.0.1:9443/convert/a/b/c"));
        assert!(config.service.is_none());
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["caBundle"], "UEVN", "base64 of the PEM");
        assert!(endpoint.client_config("/p", "").ca_bundle.is_none());
    }

    #[test]
    fn webhook_urls_are_https_host_and_port_only() {
        let parse = |s: &str| s.parse::<WebhookUrl>();
        let url = parse("https://127.0.0.1:9443").unwrap();
        assert_eq!(url.base, "https://127.0.0.1:9443");
        assert_eq!(url.host, SubjectName::Ip("127.0.0.1".parse().unwrap()));
        let url = parse("https://pequod.example.com/").unwrap();
        assert_eq!(url.base, "https://pequod.example.com");
        assert_eq!(url.host, SubjectName::Dns("pequod.example.com".into()));
        let url = parse("https://[::1]:9443").unwrap();
        assert_eq!(url.host, SubjectName::Ip("::1".parse().unwrap()));
        assert_eq!(url.base, "https://[::1]:9443");
        for bad in [
            "http://localhost:9443",
            "localhost:9443",
            "https://",
            "https://localhost:0",
            "https://localhost:99999",
            "https://localhost/convert",
            "https://user@localhost",
            "https://localhost?x=1",
            "https://Local_Host",
            "https://[::1",
            "https://[::1]x",
        ] {
            assert!(parse(bad).is_err(), "{bad} must be refused");
        }
    }
}
