//! Credentials for remote sources, read from the Secret a Transform's `pullSecretRef` names.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::ByteString;
use serde::Deserialize;

use crate::api::names::CREDENTIAL_HOSTS_ANNOTATION;

/// Credentials for a registry.
#[derive(Clone, PartialEq, Eq)]
pub enum RegistryCredentials {
    Anonymous,
    Basic { username: String, password: String },
}

/// Credentials for a git remote.
#[derive(Clone, PartialEq, Eq)]
pub enum GitCredentials {
    Anonymous,
    /// HTTP basic authentication; a token goes in `password`.
    Basic {
        username: String,
        password: String,
    },
    /// An SSH private key and the known_hosts lines the server must match.
    Ssh {
        private_key: String,
        known_hosts: String,
    },
}

// Credentials never reach logs or messages through Debug.
impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
        }
    }
}

impl std::fmt::Debug for GitCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Self::Ssh { .. } => f.write_str("Ssh(<redacted>)"),
        }
    }
}

/// Username sent with a bare `token` (accepted by GitHub; GitLab and Gitea take any name).
pub const TOKEN_USERNAME: &str = "x-access-token";

/// Why a Secret gives no usable credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("Secret {secret}: {message}")]
    Invalid { secret: String, message: String },
}

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> Option<String> {
    data.get(key)
        .map(|v| String::from_utf8_lossy(&v.0).trim_end_matches(['\n', '\r']).to_string())
        .filter(|v| !v.is_empty())
}

/// Registry credentials for `registry` (host and port) from a Secret's data: a
/// `.dockerconfigjson` (type `kubernetes.io/dockerconfigjson`) or `username` and `password`.
pub fn registry(
    secret: &str,
    data: &BTreeMap<String, ByteString>,
    registry: &str,
) -> Result<RegistryCredentials, CredentialsError> {
    let invalid = |message: String| CredentialsError::Invalid {
        secret: secret.to_string(),
        message,
    };
    if let Some(config) = data.get(".dockerconfigjson") {
        let config: DockerConfig = serde_json::from_slice(&config.0)
            .map_err(|e| invalid(format!(".dockerconfigjson is not valid JSON: {e}")))?;
        let entry = config
            .auths
            .iter()
            .find(|(server, _)| same_registry(server, registry))
            .map(|(_, entry)| entry)
            .ok_or_else(|| {
                invalid(format!(
                    ".dockerconfigjson has no entry for {registry} (entries: {})",
                    config.auths.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })?;
        return match (&entry.username, &entry.password, &entry.auth) {
            (Some(username), Some(password), _) => Ok(RegistryCredentials::Basic {
                username: username.clone(),
                password: password.clone(),
            }),
            (_, _, Some(auth)) => {
                let decoded = STANDARD
                    .decode(auth.trim())
                    .ok()
                    .and_then(|d| String::from_utf8(d).ok())
                    .ok_or_else(|| invalid(format!("the auth of {registry} is not base64 of username:password")))?;
                let (username, password) = decoded
                    .split_once(':')
                    .ok_or_else(|| invalid(format!("the auth of {registry} is not base64 of username:password")))?;
                Ok(RegistryCredentials::Basic {
                    username: username.to_string(),
                    password: password.to_string(),
                })
            }
            _ => Err(invalid(format!(
                "the entry for {registry} has neither auth nor username and password"
            ))),
        };
    }
    match (text(data, "username"), text(data, "password")) {
        (Some(username), Some(password)) => Ok(RegistryCredentials::Basic { username, password }),
        _ => Err(invalid(
            "expected .dockerconfigjson (type kubernetes.io/dockerconfigjson) or username and password".to_string(),
        )),
    }
}

/// Git credentials from a Secret's data: `ssh-privatekey` with `known_hosts`, `username`
/// and `password`, or `token` (with an optional `username`).
pub fn git(secret: &str, data: &BTreeMap<String, ByteString>) -> Result<GitCredentials, CredentialsError> {
    let invalid = |message: &str| CredentialsError::Invalid {
        secret: secret.to_string(),
        message: message.to_string(),
    };
    if let Some(private_key) = text(data, "ssh-privatekey") {
        let known_hosts = text(data, "known_hosts").ok_or_else(|| {
            invalid("ssh-privatekey needs known_hosts, the server's host key lines (ssh-keyscan <host>)")
        })?;
        // ssh refuses a key file without a final newline.
        return Ok(GitCredentials::Ssh {
            private_key: format!("{private_key}\n"),
            known_hosts: format!("{known_hosts}\n"),
        });
    }
    if let Some(token) = text(data, "token") {
        return Ok(GitCredentials::Basic {
            username: text(data, "username").unwrap_or_else(|| TOKEN_USERNAME.to_string()),
            password: token,
        });
    }
    match (text(data, "username"), text(data, "password")) {
        (Some(username), Some(password)) => Ok(GitCredentials::Basic { username, password }),
        _ => Err(invalid(
            "expected ssh-privatekey and known_hosts, token, or username and password",
        )),
    }
}

/// Whether a token or password of Secret `secret` may go to `host`: only when the Secret's
/// owner listed the host in its [`CREDENTIAL_HOSTS_ANNOTATION`]. Whoever writes a Transform
/// chooses the host, and may not read the Secret; without this rule they could have it sent to
/// a server of their own. (`.dockerconfigjson` entries and SSH `known_hosts` name their hosts
/// already.)
pub fn bound_to_host(secret: &str, annotations: &BTreeMap<String, String>, host: &str) -> Result<(), CredentialsError> {
    let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
    let allowed = annotations
        .get(CREDENTIAL_HOSTS_ANNOTATION)
        .map(|v| v.split(',').map(str::trim).any(|h| h == host || h == name))
        .unwrap_or(false);
    if allowed {
        Ok(())
    } else {
        Err(CredentialsError::Invalid {
            secret: secret.to_string(),
            message: format!(
                "its token or password may not be sent to {host}: the Secret's owner lists the hosts it is for in the annotation {CREDENTIAL_HOSTS_ANNOTATION}"
            ),
        })
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    username: Option<String>,
    password: Option<String>,
    auth: Option<String>,
}

/// Whether a `.dockerconfigjson` server key (`https://host/v1/`, `host:port`) is `registry`.
fn same_registry(server: &str, registry: &str) -> bool {
    let host = server
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    let normalize = |h: &str| match h {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".to_string(),
        h => h.to_string(),
    };
    normalize(&host) == normalize(&registry.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_token_goes_only_to_the_hosts_its_secret_names() {
        let annotated = |hosts: &str| BTreeMap::from([(CREDENTIAL_HOSTS_ANNOTATION.to_string(), hosts.to_string())]);
        assert!(bound_to_host("ns/s", &annotated("git.example.com"), "git.example.com").is_ok());
        assert!(
            bound_to_host(
                "ns/s",
                &annotated("registry.example.com, git.example.com"),
                "git.example.com:443"
            )
            .is_ok()
        );
        assert!(bound_to_host("ns/s", &annotated("git.example.com:8443"), "git.example.com:8443").is_ok());
        let refused = bound_to_host("ns/s", &annotated("git.example.com"), "evil.example.com").unwrap_err();
        assert!(refused.to_string().contains("evil.example.com"), "{refused}");
        assert!(bound_to_host("ns/s", &BTreeMap::new(), "git.example.com").is_err());
    }

    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect()
    }

    fn basic(username: &str, password: &str) -> RegistryCredentials {
        RegistryCredentials::Basic {
            username: username.into(),
            password: password.into(),
        }
    }

    #[test]
    fn docker_config_entries_match_the_registry_host() {
        let auth = STANDARD.encode("robot:s3cr:et");
        let config = format!(
            r#"{{"auths":{{"https://registry.example.com/v1/":{{"auth":"{auth}"}},"localhost:5000":{{"username":"u","password":"p"}},"https://index.docker.io/v1/":{{"auth":"{auth}"}}}}}}"#
        );
        let d = data(&[(".dockerconfigjson", &config)]);
        assert_eq!(
            registry("s", &d, "registry.example.com").unwrap(),
            basic("robot", "s3cr:et")
        );
        assert_eq!(registry("s", &d, "localhost:5000").unwrap(), basic("u", "p"));
        assert_eq!(registry("s", &d, "docker.io").unwrap(), basic("robot", "s3cr:et"));
        let err = registry("s", &d, "other.example.com").unwrap_err().to_string();
        assert!(err.contains("no entry for other.example.com"), "{err}");
        assert!(registry("s", &data(&[(".dockerconfigjson", "{")]), "x").is_err());
    }

    #[test]
    fn username_and_password_keys() {
        let d = data(&[("username", "u\n"), ("password", "p")]);
        assert_eq!(registry("s", &d, "any").unwrap(), basic("u", "p"));
        let err = registry("s", &data(&[("username", "u")]), "any")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("Secret s:"), "{err}");
    }

    #[test]
    fn git_secrets() {
        assert_eq!(
            git("s", &data(&[("token", "t0k")])).unwrap(),
            GitCredentials::Basic {
                username: TOKEN_USERNAME.into(),
                password: "t0k".into()
            }
        );
        assert_eq!(
            git("s", &data(&[("username", "ci"), ("password", "pw")])).unwrap(),
            GitCredentials::Basic {
                username: "ci".into(),
                password: "pw".into()
            }
        );
        assert!(matches!(
            git(
                "s",
                &data(&[("ssh-privatekey", "KEY"), ("known_hosts", "host ssh-ed25519 AAA")])
            )
            .unwrap(),
            GitCredentials::Ssh { .. }
        ));
        let err = git("s", &data(&[("ssh-privatekey", "KEY")])).unwrap_err().to_string();
        assert!(err.contains("known_hosts"), "{err}");
        assert!(git("s", &data(&[])).is_err());
        let shown = format!("{:?}", git("s", &data(&[("token", "t0k")])).unwrap());
        assert!(!shown.contains("t0k"), "{shown}");
    }
}
