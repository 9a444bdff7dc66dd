//! Label values and object names the apiserver accepts: pure functions.
//!
//! Pequod writes names it does not choose (a graph's name, an instance's, a node id) into
//! labels, whose values are at most 63 characters. [`label_value`] makes any such value valid:
//! a value that already is one is kept exactly, so that objects labelled by earlier releases
//! keep matching; any other becomes a readable prefix and a hash of the whole. Everything that
//! writes or compares those labels goes through it.
//!
//! The rules for object names are those the apiserver applies, checked before any write so
//! that a module rendering a name it cannot take gets a clear error instead of a refusal at
//! apply time.

use sha2::{Digest, Sha256};

/// Longest label value, and longest DNS label.
pub const MAX_LABEL_VALUE: usize = 63;
/// Longest DNS subdomain, the limit of most object names.
pub const MAX_SUBDOMAIN: usize = 253;
/// Hex digits of the hash that stands for a value's shortened part.
const HASH_DIGITS: usize = 16;

/// `value` as a valid label value: unchanged when it is one, else the first characters of
/// its label-safe form and a hash of the whole, at most 63 characters. Deterministic, so
/// writers and readers agree.
pub fn label_value(value: &str) -> String {
    if is_label_value(value) {
        return value.to_string();
    }
    shortened(value, MAX_LABEL_VALUE, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
    })
}

/// The name a label written by [`label_value`] stands for: `full` (the name kept beside it, in
/// an annotation) when the label is that name's value, else the label itself. A `full` the
/// label does not stand for is not believed.
pub fn labelled_name<'a>(label: &'a str, full: Option<&'a str>) -> &'a str {
    full.filter(|full| label_value(full) == label).unwrap_or(label)
}

/// `name` as a DNS subdomain of at most `max` characters: unchanged when it fits, else cut
/// and suffixed with a hash of the whole. `name` is made of subdomain characters already.
pub fn shortened_name(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_string();
    }
    shortened(name, max, |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.')
    })
}

/// The first characters of `value` (those `allowed` rejects replaced by `-`), trimmed to
/// start and end alphanumeric, then `-` and the hash of the whole `value`; the hash alone when
/// nothing readable is left. At most `max` characters.
fn shortened(value: &str, max: usize, allowed: impl Fn(char) -> bool) -> String {
    let hash = hex::encode(Sha256::digest(value.as_bytes()));
    let hash = &hash[..HASH_DIGITS];
    let keep = max.saturating_sub(HASH_DIGITS + 1);
    let prefix: String = value
        .chars()
        .take(keep)
        .map(|c| if allowed(c) { c } else { '-' })
        .collect();
    let prefix = prefix.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if prefix.is_empty() {
        hash.to_string()
    } else {
        format!("{prefix}-{hash}")
    }
}

/// Whether `value` is a valid label value: empty, or at most 63 letters, digits, `-`, `_`
/// or `.`, starting and ending with a letter or digit.
pub fn is_label_value(value: &str) -> bool {
    value.is_empty() || is_qualified_part(value)
}

/// Whether `key` is a valid label key: a name part like a label value (not empty), with an
/// optional DNS subdomain prefix and `/`.
pub fn is_label_key(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => is_dns1123_subdomain(prefix) && is_qualified_part(name),
        None => is_qualified_part(key),
    }
}

fn is_qualified_part(value: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    value.len() <= MAX_LABEL_VALUE
        && edge(value.chars().next())
        && edge(value.chars().last())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A DNS-1123 label: at most 63 lower-case letters, digits or `-`, starting and ending with
/// a letter or digit.
pub fn is_dns1123_label(value: &str) -> bool {
    value.len() <= MAX_LABEL_VALUE && is_dns_part(value)
}

/// A DNS-1035 label: a DNS-1123 label starting with a letter.
pub fn is_dns1035_label(value: &str) -> bool {
    is_dns1123_label(value) && value.starts_with(|c: char| c.is_ascii_lowercase())
}

/// A DNS-1123 subdomain as Kubernetes checks it: at most 253 characters, parts of lower-case
/// letters, digits or `-` joined by `.`, each starting and ending with a letter or digit (the
/// parts themselves are not limited to 63).
pub fn is_dns1123_subdomain(value: &str) -> bool {
    value.len() <= MAX_SUBDOMAIN && value.split('.').all(is_dns_part)
}

/// A DNS name as hosts and service accounts use it: a DNS-1123 subdomain whose parts are
/// DNS-1123 labels (at most 63 characters each).
pub fn is_dns_name(value: &str) -> bool {
    value.len() <= MAX_SUBDOMAIN && value.split('.').all(is_dns1123_label)
}

fn is_dns_part(value: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    edge(value.chars().next())
        && edge(value.chars().last())
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Built-in API groups whose objects' names are DNS-1123 subdomains (some kinds stricter).
const SUBDOMAIN_GROUPS: &[&str] = &[
    "",
    "apps",
    "batch",
    "autoscaling",
    "policy",
    "networking.k8s.io",
    "storage.k8s.io",
    "scheduling.k8s.io",
    "coordination.k8s.io",
    "discovery.k8s.io",
    "node.k8s.io",
    "admissionregistration.k8s.io",
    "apiextensions.k8s.io",
];

/// Why the apiserver would refuse `name` for an object of `kind` in `api_version`'s group, or
/// None. Services take DNS-1035 labels, Namespaces DNS-1123 labels, CronJobs subdomains of at
/// most 52 characters (their Jobs add a suffix), the other kinds of the built-in groups that
/// use them DNS-1123 subdomains. Any other group (RBAC, custom resources, aggregated APIs) is
/// held to the loosest rule any apiserver applies, a path segment, so that nothing the
/// apiserver would take is refused.
pub fn name_problem(api_version: &str, kind: &str, name: &str) -> Option<String> {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    let (valid, rule) = match (group, kind) {
        ("", "Service") => (
            is_dns1035_label(name),
            "a DNS-1035 label: at most 63 lower-case letters, digits or '-', starting with a letter and ending with a letter or digit",
        ),
        ("", "Namespace") => (
            is_dns1123_label(name),
            "a DNS-1123 label: at most 63 lower-case letters, digits or '-', starting and ending with a letter or digit",
        ),
        ("batch", "CronJob") => (
            name.len() <= 52 && is_dns1123_subdomain(name),
            "a DNS-1123 subdomain of at most 52 characters",
        ),
        (group, _) if SUBDOMAIN_GROUPS.contains(&group) => (
            is_dns1123_subdomain(name),
            "a DNS-1123 subdomain: at most 253 lower-case letters, digits, '-' or '.', each part starting and ending with a letter or digit",
        ),
        _ => (
            name != "." && name != ".." && !name.contains(['/', '%']),
            "a path segment: not '.' or '..', without '/' or '%'",
        ),
    };
    (!valid).then(|| {
        format!(
            "{kind} name {:?} ({} characters) is not valid: it must be {rule}",
            shown(name),
            name.len()
        )
    })
}

/// Why the apiserver would refuse the label `key: value`, or None.
pub fn label_problem(key: &str, value: &str) -> Option<String> {
    if !is_label_key(key) {
        return Some(format!(
            "label key {:?} is not valid: an optional DNS subdomain and '/', then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
            shown(key)
        ));
    }
    (!is_label_value(value)).then(|| {
        format!(
            "label {key} value {:?} ({} characters) is not valid: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
            shown(value),
            value.len()
        )
    })
}

/// At most 80 characters of a value, for a message.
fn shown(value: &str) -> String {
    const SHOWN: usize = 80;
    if value.chars().count() <= SHOWN {
        value.to_string()
    } else {
        value.chars().take(SHOWN - 1).chain(['…']).collect()
    }
}

/// `text` in at most `max` bytes, cut on a character boundary and ending in `…` when cut.
pub fn truncated(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    const ELLIPSIS: &str = "…";
    let mut end = max.saturating_sub(ELLIPSIS.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(ELLIPSIS);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_that_fit_are_kept_exactly() {
        let (at_62, at_63) = ("a".repeat(62), "a".repeat(63));
        for value in [
            "",
            "a",
            "web",
            "apps.example.com",
            "my_app-1.2",
            at_62.as_str(),
            at_63.as_str(),
        ] {
            assert_eq!(label_value(value), value);
        }
    }

    #[test]
    fn label_values_too_long_become_a_prefix_and_a_hash() {
        let long = "a".repeat(64);
        let value = label_value(&long);
        assert_eq!(value.len(), 63);
        assert!(is_label_value(&value), "{value}");
        assert!(value.starts_with(&"a".repeat(46)), "readable prefix: {value}");
        assert_eq!(value, label_value(&long), "deterministic");
        assert_ne!(value, label_value(&"a".repeat(65)), "distinct values stay distinct");
        let subdomain = format!("{}.example.com", "x".repeat(240));
        assert_eq!(subdomain.len(), 252);
        assert!(is_label_value(&label_value(&subdomain)));
        assert_eq!(label_value(&"b".repeat(253)).len(), 63);
    }

    #[test]
    fn shortened_values_keep_the_form_earlier_releases_wrote() {
        // A long API group was labelled this way before: its graphs must keep matching.
        let group = format!("{}.a.example.com", "x".repeat(60));
        let hash = hex::encode(Sha256::digest(group.as_bytes()));
        assert_eq!(label_value(&group), format!("{}-{}", &group[..46], &hash[..16]));
    }

    #[test]
    fn invalid_label_values_of_any_length_become_valid() {
        let dash_at_63 = format!("{}-", "a".repeat(62));
        for value in ["-a", "a-", "a b", "ä", "---", "a/b", dash_at_63.as_str()] {
            let label = label_value(value);
            assert!(is_label_value(&label), "{value:?} -> {label:?}");
            assert_ne!(label, value);
        }
        assert_eq!(label_value("---").len(), 16, "only the hash is left");
    }

    #[test]
    fn a_shortened_label_stands_for_the_full_name_kept_beside_it() {
        let long = "t".repeat(100);
        assert_eq!(labelled_name(&label_value(&long), Some(&long)), long);
        assert_eq!(labelled_name("web", Some(&long)), "web", "not the label's name");
        assert_eq!(labelled_name("web", None), "web");
    }

    #[test]
    fn names_are_shortened_to_the_limit_given() {
        assert_eq!(shortened_name("web", 253), "web");
        let exact = "a".repeat(253);
        assert_eq!(shortened_name(&exact, 253), exact);
        let long = format!("webservice.example.com-{}", "a".repeat(240));
        let name = shortened_name(&long, 253);
        assert_eq!(name.len(), 253);
        assert!(is_dns1123_subdomain(&name), "{name}");
        assert_ne!(name, shortened_name(&format!("{long}b"), 253));
        // A cut that ends at a dot still gives a valid subdomain.
        let dotted = format!("{}.{}", "a".repeat(235), "b".repeat(30));
        assert!(is_dns1123_subdomain(&shortened_name(&dotted, 253)));
    }

    #[test]
    fn dns_rules_at_their_limits() {
        assert!(is_dns1123_label(&"a".repeat(63)));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(!is_dns1123_label("A"));
        assert!(!is_dns1123_label("a.b"));
        assert!(is_dns1035_label("a1"));
        assert!(!is_dns1035_label("1a"));
        assert!(is_dns1123_subdomain(&format!("{}.{}", "a".repeat(63), "b".repeat(189))));
        assert!(!is_dns1123_subdomain(&format!(
            "{}.{}",
            "a".repeat(63),
            "b".repeat(190)
        )));
        assert!(
            is_dns1123_subdomain(&format!("{}.b", "a".repeat(100))),
            "parts are not limited to 63"
        );
        assert!(!is_dns1123_subdomain(".a") && !is_dns1123_subdomain("a-.b"));
        assert!(!is_dns1123_subdomain("a..b"));
        assert!(is_label_key("app.kubernetes.io/name"));
        assert!(!is_label_key("app.kubernetes.io/"));
        assert!(!is_label_key(&"k".repeat(64)));
    }

    #[test]
    fn names_follow_their_kind_s_rule() {
        let at = |n: usize| "a".repeat(n);
        assert_eq!(name_problem("v1", "Service", &at(63)), None);
        let problem = name_problem("v1", "Service", &at(64)).unwrap();
        assert!(
            problem.contains("64 characters") && problem.contains("DNS-1035"),
            "{problem}"
        );
        assert!(name_problem("v1", "Service", "1web").is_some());
        assert!(name_problem("v1", "Service", "web.app").is_some());
        assert_eq!(name_problem("apps/v1", "Deployment", &at(253)), None);
        assert!(name_problem("apps/v1", "Deployment", &at(254)).is_some());
        assert_eq!(name_problem("apps/v1", "Deployment", "web.app"), None);
        assert!(name_problem("v1", "Namespace", &at(64)).is_some());
        assert_eq!(name_problem("batch/v1", "CronJob", &at(52)), None);
        assert!(name_problem("batch/v1", "CronJob", &at(53)).is_some());
        assert_eq!(
            name_problem("rbac.authorization.k8s.io/v1", "ClusterRole", "system:x"),
            None
        );
        assert!(name_problem("rbac.authorization.k8s.io/v1", "Role", "a/b").is_some());
        assert_eq!(
            name_problem("example.com/v1", "Widget", "Upper"),
            None,
            "another group: the loosest rule"
        );
        assert!(name_problem("example.com/v1", "Widget", "a/b").is_some());
    }

    #[test]
    fn labels_are_checked_like_the_apiserver_does() {
        assert_eq!(label_problem("app.kubernetes.io/instance", &"a".repeat(63)), None);
        let problem = label_problem("app.kubernetes.io/instance", &"a".repeat(64)).unwrap();
        assert!(problem.contains("64 characters"), "{problem}");
        assert_eq!(label_problem("team", ""), None);
        assert!(label_problem("bad key", "x").is_some());
    }
}
