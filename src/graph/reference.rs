//! References to the live fields of a graph's nodes: `${node.path.to.field}` inside a string.
//!
//! They let a node use a value of an earlier node (a Service's `clusterIP` in a ConfigMap) and
//! let a module project live fields into its instances' status, without a cue call: the
//! executor resolves them from the objects it already watches. A string that is exactly one
//! reference becomes the referenced value itself (a number stays a number); any other string
//! has each reference replaced by its value's text. Path segments are field names, or array
//! indexes written as numbers (`${service.status.loadBalancer.ingress.0.ip}`).

use serde_json::Value;

/// Most references in one node's object, or in a graph's outputs.
pub const MAX_REFERENCES: usize = 64;
/// Most segments of one reference's path.
const MAX_PATH: usize = 16;

/// A reference to a field of a node's live object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Reference {
    pub node: String,
    pub path: Vec<String>,
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "${{{}.{}}}", self.node, self.path.join("."))
    }
}

/// The fields of a sensitive object that may flow out of it: what it is and which one. Any
/// other field may carry its value (`data`, and also annotations such as
/// `kubectl.kubernetes.io/last-applied-configuration`, or managed fields).
pub const IDENTITY_FIELDS: [&str; 5] = [
    "apiVersion",
    "kind",
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
];

/// Kinds an administrator marks as sensitive besides Secrets (`--sensitive-kinds`), set once
/// at start-up.
static SENSITIVE_KINDS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// Marks `kinds` as sensitive for the life of the process; only the first call counts.
pub fn mark_sensitive(kinds: Vec<String>) {
    let _ = SENSITIVE_KINDS.set(kinds.into_iter().filter(|k| !k.is_empty()).collect());
}

/// Whether objects of `kind` hold values nobody may read through Pequod: only their identity
/// fields may be referenced, gated on, output or projected. Secrets always; any other kind an
/// administrator marked.
pub fn is_sensitive(kind: &str) -> bool {
    kind == "Secret"
        || SENSITIVE_KINDS
            .get()
            .is_some_and(|kinds| kinds.iter().any(|k| k == kind))
}

impl Reference {
    /// Whether the reference reads more of a sensitive node than its identity.
    pub fn reads_beyond_identity(&self, kind_of_node: &str) -> bool {
        is_sensitive(kind_of_node) && !IDENTITY_FIELDS.contains(&self.path.join(".").as_str())
    }
}

/// A referenced field that the live object does not have (yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("waiting for {reference}: node {} has no such field yet", reference.node)]
pub struct Missing {
    pub reference: Reference,
}

/// The references in `text`, or why one is malformed.
pub fn parse(text: &str) -> Result<Vec<Reference>, String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("{text:?}: a reference opened with ${{ is not closed"))?;
        found.push(parse_one(&after[..end]).map_err(|why| format!("{text:?}: {why}"))?);
        rest = &after[end + 1..];
    }
    Ok(found)
}

fn parse_one(inner: &str) -> Result<Reference, String> {
    let mut segments = inner.split('.').map(str::trim);
    let node = segments.next().unwrap_or_default().to_string();
    let path: Vec<String> = segments.map(String::from).collect();
    if node.is_empty() || path.is_empty() || path.iter().any(String::is_empty) {
        return Err(format!(
            "${{{inner}}} is not a reference: write ${{node.path.to.field}}"
        ));
    }
    if path.len() > MAX_PATH {
        return Err(format!("${{{inner}}} has more than {MAX_PATH} path segments"));
    }
    Ok(Reference { node, path })
}

/// Every reference in the strings of `value`.
pub fn references_in(value: &Value) -> Result<Vec<Reference>, String> {
    let mut found = Vec::new();
    walk(value, &mut |s| {
        found.extend(parse(s)?);
        Ok(())
    })?;
    if found.len() > MAX_REFERENCES {
        return Err(format!(
            "{} references; at most {MAX_REFERENCES} are allowed",
            found.len()
        ));
    }
    Ok(found)
}

fn walk(value: &Value, visit: &mut impl FnMut(&str) -> Result<(), String>) -> Result<(), String> {
    match value {
        Value::String(s) => visit(s),
        Value::Array(items) => items.iter().try_for_each(|v| walk(v, visit)),
        Value::Object(map) => map.values().try_for_each(|v| walk(v, visit)),
        _ => Ok(()),
    }
}

/// The field `path` of `object`.
pub fn field<'a>(object: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(object, |current, segment| match current {
            Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => current.get(segment),
        })
        .filter(|v| !v.is_null())
}

/// `value` with every reference replaced by the field of the live object `live` gives for its
/// node; the first field that is missing stops it.
pub fn resolve<'a>(value: &Value, live: &impl Fn(&str) -> Option<&'a Value>) -> Result<Value, Missing> {
    match value {
        Value::String(s) if s.contains("${") => resolve_text(s, live),
        Value::Array(items) => items
            .iter()
            .map(|v| resolve(v, live))
            .collect::<Result<_, _>>()
            .map(Value::Array),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| resolve(v, live).map(|v| (k.clone(), v)))
            .collect::<Result<_, _>>()
            .map(Value::Object),
        other => Ok(other.clone()),
    }
}

fn resolve_text<'a>(text: &str, live: &impl Fn(&str) -> Option<&'a Value>) -> Result<Value, Missing> {
    // Malformed references were refused when the graph was validated; left as written here.
    let Ok(references) = parse(text) else {
        return Ok(Value::String(text.to_string()));
    };
    let lookup = |reference: &Reference| {
        live(&reference.node)
            .and_then(|object| field(object, &reference.path))
            .ok_or_else(|| Missing {
                reference: reference.clone(),
            })
    };
    if let [only] = references.as_slice()
        && text.trim() == only.to_string()
    {
        return lookup(only).cloned();
    }
    let mut out = String::new();
    let mut rest = text;
    for reference in &references {
        let start = rest.find("${").unwrap_or(rest.len());
        out.push_str(&rest[..start]);
        let value = lookup(reference)?;
        match value {
            Value::String(s) => out.push_str(s),
            other => out.push_str(&other.to_string()),
        }
        let end = rest[start..].find('}').map_or(rest.len(), |e| start + e + 1);
        rest = &rest[end..];
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reference(node: &str, path: &[&str]) -> Reference {
        Reference {
            node: node.into(),
            path: path.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn references_are_parsed_from_strings_anywhere_in_an_object() {
        let object = json!({"data": {"ip": "${service.spec.clusterIP}", "url": "http://${service.spec.clusterIP}:${service.spec.ports.0.port}"},
                            "n": 3, "plain": "no reference"});
        let mut found = references_in(&object).unwrap();
        found.sort();
        assert_eq!(
            found,
            [
                reference("service", &["spec", "clusterIP"]),
                reference("service", &["spec", "clusterIP"]),
                reference("service", &["spec", "ports", "0", "port"]),
            ]
        );
        for bad in [
            "${service}",
            "${.spec}",
            "${a..b}",
            "${unclosed.x",
            "${a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r}",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let many = json!({"d": "${a.b}".repeat(MAX_REFERENCES + 1)});
        assert!(references_in(&many).is_err());
    }

    #[test]
    fn a_whole_reference_keeps_its_type_and_others_become_text() {
        let service = json!({"spec": {"clusterIP": "10.0.0.7", "ports": [{"port": 8080}]}});
        let deployment = json!({"status": {"readyReplicas": 2, "conditions": [{"type": "Available"}]}});
        let live = |node: &str| match node {
            "service" => Some(&service),
            "deployment" => Some(&deployment),
            _ => None,
        };
        let template = json!({
            "replicas": "${deployment.status.readyReplicas}",
            "url": "http://${service.spec.clusterIP}:${service.spec.ports.0.port}/",
            "first": " ${deployment.status.conditions.0.type} ",
            "list": ["${service.spec.clusterIP}", 1],
            "untouched": "$HOME and {braces}",
        });
        assert_eq!(
            resolve(&template, &live).unwrap(),
            json!({"replicas": 2, "url": "http://10.0.0.7:8080/", "first": "Available",
                   "list": ["10.0.0.7", 1], "untouched": "$HOME and {braces}"})
        );
        let missing = resolve(&json!("${deployment.status.availableReplicas}"), &live).unwrap_err();
        assert_eq!(
            missing.reference,
            reference("deployment", &["status", "availableReplicas"])
        );
        assert_eq!(
            missing.to_string(),
            "waiting for ${deployment.status.availableReplicas}: node deployment has no such field yet"
        );
        assert!(
            resolve(&json!("${nowhere.x}"), &live).is_err(),
            "a node without a live object"
        );
        assert!(
            resolve(&json!("${service.spec.ports.9.port}"), &live).is_err(),
            "past the array"
        );
    }

    #[test]
    fn kinds_an_administrator_marks_are_as_sensitive_as_secrets() {
        assert!(!reference("creds", &["spec", "token"]).reads_beyond_identity("VaultToken"));
        mark_sensitive(vec!["VaultToken".into(), String::new()]);
        assert!(reference("creds", &["spec", "token"]).reads_beyond_identity("VaultToken"));
        assert!(!reference("creds", &["metadata", "name"]).reads_beyond_identity("VaultToken"));
        assert!(is_sensitive("Secret"), "Secrets stay sensitive");
        assert!(!is_sensitive(""), "an empty name marks nothing");
    }

    #[test]
    fn only_the_identity_of_a_secret_may_be_referenced() {
        for path in [
            &["data", "password"][..],
            &["stringData"],
            &["data"],
            &["metadata"],
            &["metadata", "annotations"],
            &[
                "metadata",
                "annotations",
                "kubectl.kubernetes.io/last-applied-configuration",
            ],
            &["metadata", "managedFields"],
            &["metadata", "labels"],
            &["type"],
        ] {
            assert!(reference("creds", path).reads_beyond_identity("Secret"), "{path:?}");
        }
        for path in [
            &["metadata", "name"][..],
            &["metadata", "namespace"],
            &["metadata", "uid"],
            &["kind"],
        ] {
            assert!(!reference("creds", path).reads_beyond_identity("Secret"), "{path:?}");
        }
        assert!(!reference("config", &["data", "x"]).reads_beyond_identity("ConfigMap"));
    }
}
