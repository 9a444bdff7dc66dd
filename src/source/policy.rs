//! Where a Transform may fetch its module from: a pure rule, checked before any connection.
//!
//! A Transform's author names the URL, so without a rule a module fetch is a way to read the
//! operator's own files (`file://`), to reach the cloud's metadata endpoint (link-local
//! addresses), or to send a pull Secret over plain text. Local repositories need
//! `--allow-local-sources`; plain-text git (`http://`, `git://`), like plain-HTTP registries,
//! needs the host listed in `--insecure-registries`; refused addresses (see
//! [`refuse_address`]) are never fetched from, in whatever form they are written and whether
//! written as addresses or resolved from names. The rule is pure: resolving names and
//! connecting only to checked addresses is `source/guard.rs`'s.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What the administrator allows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourcePolicy {
    /// `file://` repositories and local paths.
    pub allow_local: bool,
    /// Hosts (`host` or `host:port`) reached without TLS.
    pub insecure_hosts: Vec<String>,
}

/// How git reaches a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GitTransport {
    Https,
    Http,
    Ssh,
    /// The git daemon protocol (`git://`), plain TCP.
    Daemon,
    Local,
}

/// The host git connects to for a repository URL: the name or address without brackets,
/// the port when the URL names one, and the host as written (`host` or `host:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitEndpoint {
    pub transport: GitTransport,
    pub host: String,
    pub port: Option<u16>,
    pub authority: String,
}

/// The endpoint of a git URL in any form git reads: `scheme://[user@]host[:port]/path`,
/// with `[v6]` literals, and scp-like `[user@]host:path`, `user@[v6]:path` and
/// `[user@host:port]:path`.
pub fn git_endpoint(url: &str) -> Option<GitEndpoint> {
    if url.starts_with("file://") || url.starts_with('/') {
        return Some(GitEndpoint {
            transport: GitTransport::Local,
            host: String::new(),
            port: None,
            authority: String::new(),
        });
    }
    let schemes = [
        ("https://", GitTransport::Https),
        ("http://", GitTransport::Http),
        ("ssh://", GitTransport::Ssh),
        ("git://", GitTransport::Daemon),
    ];
    for (scheme, transport) in schemes {
        if let Some(rest) = url.strip_prefix(scheme) {
            let authority = rest.split('/').next().unwrap_or_default();
            let host_port = authority.rsplit('@').next().unwrap_or_default();
            let (host, port) = split_host_port(host_port);
            return Some(GitEndpoint {
                transport,
                host: host.to_string(),
                port,
                authority: host_port.to_string(),
            });
        }
    }
    scp_endpoint(url)
}

/// scp-like syntax: the host ends at the first `:` outside brackets.
fn scp_endpoint(url: &str) -> Option<GitEndpoint> {
    let mut depth = 0usize;
    let end = url.char_indices().find_map(|(i, c)| {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ':' if depth == 0 => return Some(i),
            _ => {}
        }
        None
    })?;
    let head = &url[..end];
    // `user@[v6]` or `user@host`; the user never holds a bracket.
    let without_user = match head.find('[') {
        Some(bracket) => &head[bracket..],
        None => head.rsplit('@').next().unwrap_or_default(),
    };
    let (host, port) = match without_user.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        // `[user@host:port]` or `[v6]`.
        Some(inner) => {
            let inner = inner.rsplit('@').next().unwrap_or_default();
            if parse_ipv6(inner).is_some() {
                (inner, None)
            } else {
                match inner.rsplit_once(':') {
                    Some((name, port)) if !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()) => {
                        (name, port.parse().ok())
                    }
                    _ => (inner, None),
                }
            }
        }
        None => (without_user, None),
    };
    let authority = match port {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    Some(GitEndpoint {
        transport: GitTransport::Ssh,
        host: host.to_string(),
        port,
        authority,
    })
}

impl SourcePolicy {
    /// Why a git repository URL may not be fetched, or None.
    pub fn refuse_git(&self, url: &str) -> Option<String> {
        let Some(endpoint) = git_endpoint(url) else {
            return Some(format!("{url} names no host git can reach"));
        };
        match endpoint.transport {
            GitTransport::Local => (!self.allow_local).then(|| {
                "local repositories (file://) are not fetched unless the operator runs with --allow-local-sources"
                    .to_string()
            }),
            GitTransport::Http | GitTransport::Daemon => {
                if let Some(why) = refuse_host_name(&endpoint.host) {
                    return Some(why);
                }
                let scheme = if endpoint.transport == GitTransport::Http {
                    "http://"
                } else {
                    "git://"
                };
                (!self.insecure(&endpoint.authority)).then(|| {
                    format!(
                        "{scheme} has no TLS: {} is reached that way only when listed in --insecure-registries; use https:// or ssh://",
                        endpoint.authority
                    )
                })
            }
            GitTransport::Https | GitTransport::Ssh => refuse_host_name(&endpoint.host),
        }
    }

    /// Why a registry may not be fetched from, or None.
    pub fn refuse_registry(&self, registry: &str) -> Option<String> {
        refuse_host_name(split_host_port(registry).0)
    }

    fn insecure(&self, host: &str) -> bool {
        let name = split_host_port(host).0;
        self.insecure_hosts.iter().any(|h| h == host || h == name)
    }
}

/// `host` (`name`, `name:port`, `[v6]` or `[v6]:port`) as its name without brackets and its
/// port, if any.
pub fn split_host_port(host: &str) -> (&str, Option<u16>) {
    if let Some(rest) = host.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').unwrap_or((rest, ""));
        return (inside, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match host.rsplit_once(':') {
        // One colon only: a bare IPv6 literal has several.
        Some((name, port)) if !name.contains(':') && port.chars().all(|c| c.is_ascii_digit()) => {
            (name, port.parse().ok())
        }
        _ => (host, None),
    }
}

/// The address a host name is, in any form a URL parser or the system resolver reads as an
/// address rather than a name: IPv6 (with or without a zone), dotted IPv4, and the numeric
/// forms `inet_aton` accepts (`2852039166`, `0xa9fea9fe`, `0251.0376.0251.0376`, `169.254.43518`).
pub fn parse_address(name: &str) -> Option<IpAddr> {
    if let Some(v6) = parse_ipv6(name) {
        return Some(IpAddr::V6(v6));
    }
    parse_ipv4_leniently(name.strip_suffix('.').unwrap_or(name)).map(IpAddr::V4)
}

/// An IPv6 literal; a zone (`fe80::1%eth0`, `%25eth0` in URLs) does not change the address.
fn parse_ipv6(name: &str) -> Option<Ipv6Addr> {
    name.split('%').next().unwrap_or_default().parse().ok()
}

/// IPv4 as `inet_aton` and URL parsers read it: one to four parts, each decimal, octal
/// (leading `0`) or hex (`0x`), the last filling the remaining bytes.
fn parse_ipv4_leniently(name: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let numbers: Vec<u64> = parts.iter().map(|p| parse_ipv4_part(p)).collect::<Option<_>>()?;
    let (last, leading) = numbers.split_last()?;
    if leading.iter().any(|n| *n > 0xff) || *last >= 1u64 << (8 * (4 - leading.len())) {
        return None;
    }
    let value = leading
        .iter()
        .enumerate()
        .fold(*last, |value, (i, byte)| value | (byte << (24 - 8 * i)));
    u32::try_from(value).ok().map(Ipv4Addr::from)
}

fn parse_ipv4_part(part: &str) -> Option<u64> {
    let (digits, radix) = if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
        (hex, 16)
    } else if part.len() > 1 && part.starts_with('0') {
        (&part[1..], 8)
    } else {
        (part, 10)
    };
    if part.is_empty() || digits.len() > 12 || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    // `0x` alone is zero, as inet_aton reads it.
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(digits, radix).ok()
}

/// Metadata endpoints outside the link-local range, by cloud.
const METADATA_ADDRESSES: [(IpAddr, &str); 3] = [
    // AWS's instance metadata over IPv6 (Nitro instances).
    (IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)), "AWS"),
    // Alibaba Cloud's instance metadata.
    (IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)), "Alibaba Cloud"),
    // Azure's WireServer, which hands out the VM's configuration.
    (IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)), "Azure"),
];

/// The IPv4 address an IPv6 address carries and is delivered to: IPv4-mapped
/// (`::ffff:a.b.c.d`), IPv4-translated (`::ffff:0:a.b.c.d`), IPv4-compatible (`::a.b.c.d`,
/// but not `::` and `::1`), NAT64's well-known prefix (`64:ff9b::a.b.c.d`) and 6to4
/// (`2002:aabb:ccdd::`).
fn embedded_ipv4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    let high_zero = |n: usize| s[..n].iter().all(|x| *x == 0);
    if high_zero(5) && s[5] == 0xffff {
        return Some(low);
    }
    if high_zero(4) && s[4] == 0xffff && s[5] == 0 {
        return Some(low);
    }
    if high_zero(6) && !(v6.is_unspecified() || v6.is_loopback()) {
        return Some(low);
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6].iter().all(|x| *x == 0) {
        return Some(low);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

/// Why an address may never be fetched from, or None. Refused: link-local addresses
/// (169.254.0.0/16, fe80::/10; the cloud metadata endpoint lives there), unspecified and
/// "this network" addresses (0.0.0.0/8, `::`; connecting to them reaches the host itself),
/// the metadata endpoints outside link-local ([`METADATA_ADDRESSES`]), and every IPv6 form
/// that carries a refused IPv4 address. Loopback and private ranges are allowed: registries
/// and git servers live there.
pub fn refuse_address(ip: IpAddr) -> Option<String> {
    if let Some((_, cloud)) = METADATA_ADDRESSES.iter().find(|(address, _)| *address == ip) {
        return Some(format!(
            "{ip} is {cloud}'s metadata endpoint, which modules are never fetched from"
        ));
    }
    let refused = match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.octets()[0] == 0,
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80 || v6.is_unspecified(),
    };
    if refused {
        return Some(format!(
            "{ip} is a link-local or unspecified address, which modules are never fetched from"
        ));
    }
    let IpAddr::V6(v6) = ip else { return None };
    let v4 = embedded_ipv4(v6)?;
    refuse_address(IpAddr::V4(v4)).map(|why| format!("{ip} carries {v4}: {why}"))
}

/// Why a host name may not be fetched from, when it is written as an address in any form.
pub fn refuse_host_name(name: &str) -> Option<String> {
    parse_address(name).and_then(refuse_address)
}

/// Why a name may not be fetched from given what it resolved to: any refused address among
/// its answers refuses it, since the connection may go to any of them.
pub fn refuse_resolved_addresses(name: &str, addresses: &[IpAddr]) -> Option<String> {
    addresses
        .iter()
        .find_map(|ip| refuse_address(*ip).map(|why| format!("{name} resolves to {why}")))
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
            ("IPv6 link-local with a zone", "https://[fe80::1%25eth0]/repo", false, false),
            ("IPv4-mapped metadata endpoint", "https://[::ffff:169.254.169.254]/repo", false, false),
            ("metadata endpoint by number", "https://2852039166/repo", false, false),
            ("metadata endpoint in hex over ssh", "ssh://git@0xA9.0xFE.0xA9.0xFE/repo", false, false),
            ("scp-like IPv6 link-local", "git@[fe80::1]:repo", false, false),
            ("scp-like mapped metadata endpoint", "git@[::ffff:a9fe:a9fe]:repo", false, false),
            ("scp-like with a port", "[git@169.254.169.254:22]:repo", false, false),
            ("scp-like loopback", "git@[::1]:repo", true, true),
            ("loopback with a port", "https://127.0.0.1:8443/repo", true, true),
        ];
        for (case, url, strictly, openly) in cases {
            assert_eq!(strict.refuse_git(url).is_none(), strictly, "{case} (default)");
            assert_eq!(open.refuse_git(url).is_none(), openly, "{case} (allowed)");
        }
        assert!(strict.refuse_registry("169.254.169.254:80").is_some());
        assert!(strict.refuse_registry("[::ffff:169.254.169.254]:443").is_some());
        assert!(strict.refuse_registry("0xa9fea9fe:443").is_some());
        assert!(strict.refuse_registry("registry.example.com:5000").is_none());
        assert!(strict.refuse_registry("[::1]:5000").is_none());
        assert!(
            strict
                .refuse_git("file:///etc")
                .unwrap()
                .contains("--allow-local-sources")
        );
    }

    #[test]
    fn every_form_of_a_refused_address_is_refused() {
        #[rustfmt::skip]
        let cases = [
            // (host as written, refused)
            ("169.254.169.254", true),
            ("169.254.169.254.", true),
            ("169.254.0.1", true),
            ("0.0.0.0", true),
            ("0", true),
            ("0.1.2.3", true),
            ("2852039166", true),
            ("0xa9fea9fe", true),
            ("0XA9FEA9FE", true),
            ("0xA9.0xFE.0xA9.0xFE", true),
            ("0251.0376.0251.0376", true),
            ("169.254.43518", true),
            ("169.16689662", true),
            ("0xa9.254.0251.254", true),
            ("fe80::1", true),
            ("febf:ffff::1", true),
            ("fe80::1%eth0", true),
            ("fe80::1%25eth0", true),
            ("::", true),
            ("::ffff:169.254.169.254", true),
            ("::ffff:a9fe:a9fe", true),
            ("::FFFF:A9FE:A9FE", true),
            ("::ffff:0.0.0.0", true),
            ("::ffff:0:169.254.169.254", true),
            ("::169.254.169.254", true),
            ("::a9fe:a9fe", true),
            ("64:ff9b::169.254.169.254", true),
            ("64:ff9b::a9fe:a9fe", true),
            ("2002:a9fe:a9fe::1", true),
            ("fd00:ec2::254", true),
            ("100.100.100.200", true),
            ("168.63.129.16", true),
            ("::ffff:100.100.100.200", true),
            // Allowed: loopback, private, public, and names.
            ("127.0.0.1", false),
            ("2130706433", false),
            ("0x7f.1", false),
            ("::1", false),
            ("::ffff:127.0.0.1", false),
            ("::ffff:10.0.0.5", false),
            ("64:ff9b::8.8.8.8", false),
            ("2002:0808:0808::1", false),
            ("10.0.0.5", false),
            ("192.168.1.1", false),
            ("fd00::1", false),
            ("fec0::1", false),
            ("fe7f::1", false),
            ("2001:db8::1", false),
            ("169.255.0.1", false),
            ("registry.example.com", false),
            ("metadata.google.internal", false),
            ("localhost", false),
            ("08", false),
            ("1.2.3.4.5", false),
            ("256.1.1.1", false),
            ("+1", false),
        ];
        for (host, refused) in cases {
            assert_eq!(
                refuse_host_name(host).is_some(),
                refused,
                "{host}: {:?}",
                refuse_host_name(host)
            );
        }
        let why = refuse_host_name("::ffff:169.254.169.254").unwrap();
        assert!(why.contains("carries 169.254.169.254"), "{why}");
    }

    #[test]
    fn numeric_forms_read_as_the_system_resolver_reads_them() {
        let metadata = Some(IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)));
        for form in [
            "2852039166",
            "0xa9fea9fe",
            "0251.0376.0251.0376",
            "169.254.43518",
            "169.16689662",
        ] {
            assert_eq!(parse_address(form), metadata, "{form}");
        }
        assert_eq!(parse_address("10.1"), Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
        assert_eq!(parse_address("1.2.3.256"), None);
        assert_eq!(parse_address("4294967296"), None);
        assert_eq!(parse_address("registry"), None);
        assert_eq!(parse_address("09.1.1.1"), None, "9 is no octal digit");
    }

    #[test]
    fn git_endpoints_in_every_url_form() {
        #[rustfmt::skip]
        let cases = [
            ("https://user:pw@git.example.com:8443/r", GitTransport::Https, "git.example.com", Some(8443)),
            ("http://[::1]:8080/r", GitTransport::Http, "::1", Some(8080)),
            ("ssh://git@[fe80::1]/r", GitTransport::Ssh, "fe80::1", None),
            ("ssh://git@host:2222/r", GitTransport::Ssh, "host", Some(2222)),
            ("git://127.0.0.1:9418/r", GitTransport::Daemon, "127.0.0.1", Some(9418)),
            ("git@github.com:acme/r", GitTransport::Ssh, "github.com", None),
            ("git@[::1]:acme/r", GitTransport::Ssh, "::1", None),
            ("[git@host:2222]:acme/r", GitTransport::Ssh, "host", Some(2222)),
            ("file:///srv/r", GitTransport::Local, "", None),
        ];
        for (url, transport, host, port) in cases {
            let endpoint = git_endpoint(url).unwrap();
            assert_eq!(
                (endpoint.transport, endpoint.host.as_str(), endpoint.port),
                (transport, host, port),
                "{url}"
            );
        }
        assert_eq!(split_host_port("::1"), ("::1", None));
        assert_eq!(split_host_port("[::1]:5000"), ("::1", Some(5000)));
        assert_eq!(split_host_port("registry:5000"), ("registry", Some(5000)));
    }

    #[test]
    fn a_name_is_refused_when_any_answer_is() {
        let public = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
        let metadata = IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254));
        assert_eq!(refuse_resolved_addresses("registry", &[public]), None);
        let why = refuse_resolved_addresses("registry", &[public, metadata]).unwrap();
        assert!(why.starts_with("registry resolves to 169.254.169.254"), "{why}");
    }
}
