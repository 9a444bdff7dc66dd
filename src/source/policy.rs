//! Where a Transform may fetch its module from: a pure rule, checked before any connection.
//!
//! A Transform's author names the URL, so without a rule a module fetch is a way to read the
//! operator's own files (`file://`), to reach the cloud's metadata endpoint (link-local
//! addresses), or to send a pull Secret over plain text. Local repositories need
//! `--allow-local-sources`; plain-text git (`http://`, `git://`), like plain-HTTP registries,
//! needs the host in `--insecure-registries`; link-local addresses are never fetched from,
//! whether written as addresses or resolved from names.

use std::net::IpAddr;

/// What the administrator allows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourcePolicy {
    /// `file://` repositories and local paths.
    pub allow_local: bool,
    /// Hosts (`host` or `host:port`) reached without TLS.
    pub insecure_hosts: Vec<String>,
}

impl SourcePolicy {
    /// Why a git repository URL may not be fetched, or None.
    pub fn refuse_git(&self, url: &str) -> Option<String> {
        if url.starts_with("file://") || url.starts_with('/') {
            return (!self.allow_local).then(|| {
                "local repositories (file://) are not fetched unless the operator runs with --allow-local-sources"
                    .to_string()
            });
        }
        for scheme in ["http://", "git://"] {
            if let Some(rest) = url.strip_prefix(scheme) {
                let authority = rest.split('/').next().unwrap_or_default();
                let host = authority.rsplit('@').next().unwrap_or_default();
                if let Some(why) = refuse_host(host) {
                    return Some(why);
                }
                return (!self.insecure(host)).then(|| {
                    format!(
                        "{scheme} has no TLS: {host} is reached that way only when listed in --insecure-registries; use https:// or ssh://"
                    )
                });
            }
        }
        let authority = ["https://", "ssh://"]
            .iter()
            .find_map(|s| url.strip_prefix(s))
            .map(|rest| rest.split('/').next().unwrap_or_default())
            .or_else(|| url.split_once(':').map(|(user_host, _)| user_host))
            .unwrap_or_default();
        refuse_host(authority.rsplit('@').next().unwrap_or_default())
    }

    /// Why a registry may not be fetched from, or None.
    pub fn refuse_registry(&self, registry: &str) -> Option<String> {
        refuse_host(registry)
    }

    fn insecure(&self, host: &str) -> bool {
        let name = host_name(host);
        self.insecure_hosts.iter().any(|h| h == host || h == name)
    }
}

/// `host` without its port (IPv6 literals keep their brackets off).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Why an address may never be fetched from: link-local addresses (the cloud metadata
/// endpoint lives there) and unspecified ones.
pub fn refuse_address(ip: IpAddr) -> Option<String> {
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_unspecified(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80 || v6.is_unspecified(),
    };
    link_local.then(|| format!("{ip} is a link-local or unspecified address, which modules are never fetched from"))
}

/// How long the system resolver may take to answer for a source's host.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a host may not be fetched from once resolved: a name (or a numeric form the parser
/// above does not read, such as `2852039166` or `0xa9fea9fe`) that the system resolver turns
/// into a refused address. A host that does not resolve is left to the fetch, which reports
/// it. The fetch resolves again, so a name whose answer changes in between is not caught.
pub async fn refuse_resolved(host: &str) -> Option<String> {
    let name = host_name(host);
    if name.is_empty() || name.parse::<IpAddr>().is_ok() {
        return None;
    }
    let addresses = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, 0)))
        .await
        .ok()?
        .ok()?;
    addresses
        .map(|a| a.ip())
        .find_map(|ip| refuse_address(ip).map(|why| format!("{name} resolves to {why}")))
}

fn refuse_host(host: &str) -> Option<String> {
    host_name(host).parse::<IpAddr>().ok().and_then(refuse_address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_plain_text_and_link_local_sources_need_the_administrator() {
        let strict = SourcePolicy::default();
        let open = SourcePolicy {
            allow_local: true,
            insecure_hosts: vec!["git.internal:9418".into(), "10.0.0.5".into()],
        };
        #[rustfmt::skip]
        let cases = [
            ("https", "https://github.com/acme/platforms", true, true),
            ("ssh", "ssh://git@github.com/acme/platforms", true, true),
            ("scp-like", "git@github.com:acme/platforms", true, true),
            ("file", "file:///srv/git/platforms", false, true),
            ("git daemon", "git://git.internal:9418/platforms", false, true),
            ("plain http, listed without its port", "http://10.0.0.5:8080/platforms", false, true),
            ("plain http, not listed", "http://evil.example.com/platforms", false, false),
            ("metadata endpoint over https", "https://169.254.169.254/latest", false, false),
            ("metadata endpoint over http, even if listed", "http://169.254.169.254/latest", false, false),
            ("IPv6 link-local", "https://[fe80::1]/repo", false, false),
        ];
        for (case, url, strictly, openly) in cases {
            assert_eq!(strict.refuse_git(url).is_none(), strictly, "{case} (default)");
            assert_eq!(open.refuse_git(url).is_none(), openly, "{case} (allowed)");
        }
        assert!(strict.refuse_registry("169.254.169.254:80").is_some());
        assert!(strict.refuse_registry("registry.example.com:5000").is_none());
        assert!(
            strict
                .refuse_git("file:///etc")
                .unwrap()
                .contains("--allow-local-sources")
        );
    }

    #[tokio::test]
    async fn names_are_refused_by_what_they_resolve_to() {
        // Forms of 169.254.169.254 that the system resolver reads without asking DNS.
        for host in ["2852039166", "0xa9fea9fe", "0251.0376.0251.0376:443"] {
            let why = refuse_resolved(host).await;
            assert!(
                why.as_deref().is_some_and(|w| w.contains("169.254.169.254")),
                "{host}: {why:?}"
            );
        }
        assert_eq!(refuse_resolved("localhost:5000").await, None);
        assert_eq!(refuse_resolved("does-not-resolve.invalid").await, None);
        assert_eq!(refuse_resolved("10.0.0.5").await, None, "literals are the parser's");
    }
}
