//! Schema evolution: which changes to a generated kind's schema existing instances survive.
//!
//! An instance stored under the old schema must still be valid under the new one, and a client
//! that wrote against the old schema must still be able to write. Widening (a new optional
//! field, a looser bound, a new enum value) passes; narrowing is refused and listed.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use std::collections::BTreeSet;
use std::fmt;

use serde_json::{Map, Value};

/// One change that would break existing instances or clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakingChange {
    /// Where in the instance, for example `spec.resources.cpu`.
    pub path: String,
    pub change: String,
}

impl fmt::Display for BreakingChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.change)
    }
}

/// Breaking changes from `old` to `new`, two structural schemas of the same object (the
/// instance's `spec`); `root` names it in paths. Empty means the change is safe.
pub fn breaking_changes(old: &Value, new: &Value, root: &str) -> Vec<BreakingChange> {
    let mut changes = Vec::new();
    compare(root, old, new, &mut changes);
    changes
}

fn compare(path: &str, old: &Value, new: &Value, out: &mut Vec<BreakingChange>) {
    let mut push = |change: String| {
        out.push(BreakingChange {
            path: path.to_string(),
            change,
        })
    };
    let (old_type, new_type) = (type_of(old), type_of(new));
    if old_type != new_type {
        // A field that accepted anything now accepts less, unless the new one still does.
        if new_type != "any" {
            push(format!("type changed from {old_type} to {new_type}"));
        }
        return;
    }
    if preserves_unknown(old) && !preserves_unknown(new) {
        push("unknown fields are no longer preserved".into());
    }
    compare_enums(old, new, &mut push);
    compare_bounds(old, new, &mut push);
    compare_rules(old, new, &mut push);
    compare_fields(path, old, new, out);
    compare_entries(path, old, new, out);
}

/// An enum may gain values, not lose them, and may not appear.
fn compare_enums(old: &Value, new: &Value, push: &mut impl FnMut(String)) {
    match (
        old.get("enum").and_then(Value::as_array),
        new.get("enum").and_then(Value::as_array),
    ) {
        (Some(old_enum), Some(new_enum)) => {
            let removed: Vec<String> = old_enum
                .iter()
                .filter(|v| !new_enum.contains(v))
                .map(Value::to_string)
                .collect();
            if !removed.is_empty() {
                push(format!("enum values removed: {}", removed.join(", ")));
            }
        }
        (None, Some(new_enum)) => {
            let values: Vec<String> = new_enum.iter().map(Value::to_string).collect();
            push(format!("now restricted to {}", values.join(", ")));
        }
        _ => {}
    }
}

/// A new or changed pattern, format or validation rule may refuse what was accepted.
fn compare_rules(old: &Value, new: &Value, push: &mut impl FnMut(String)) {
    match (str_field(old, "pattern"), str_field(new, "pattern")) {
        (Some(o), Some(n)) if o != n => push(format!("pattern changed from {o:?} to {n:?}")),
        (None, Some(n)) => push(format!("pattern {n:?} added")),
        _ => {}
    }
    match (str_field(old, "format"), str_field(new, "format")) {
        (o, Some(n)) if o != Some(n) => push(format!("format {n:?} added")),
        _ => {}
    }
    let rules = |schema: &Value| -> Vec<Value> {
        schema
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| v.get("rule").cloned())
            .collect()
    };
    let old_rules = rules(old);
    for rule in rules(new).into_iter().filter(|r| !old_rules.contains(r)) {
        push(format!("validation rule {rule} added"));
    }
}

fn properties(schema: &Value) -> Option<&Map<String, Value>> {
    schema.get("properties").and_then(Value::as_object)
}

/// Each field compared with its old self; removed fields and new required ones break.
fn compare_fields(path: &str, old: &Value, new: &Value, out: &mut Vec<BreakingChange>) {
    let empty = Map::new();
    let old_props = properties(old).unwrap_or(&empty);
    let new_props = properties(new).unwrap_or(&empty);
    for (name, old_prop) in old_props {
        let child = format!("{path}.{name}");
        match new_props.get(name) {
            Some(new_prop) => compare(&child, old_prop, new_prop, out),
            None if !preserves_unknown(new) => out.push(BreakingChange {
                path: child,
                change: "field removed".into(),
            }),
            None => {}
        }
    }
    let old_required = required(old);
    for name in required(new).difference(&old_required) {
        let has_default = new_props.get(*name).is_some_and(|p| p.get("default").is_some());
        if !has_default {
            out.push(BreakingChange {
                path: format!("{path}.{name}"),
                change: if old_props.contains_key(*name) {
                    "now required and has no default".into()
                } else {
                    "new required field without a default".into()
                },
            });
        }
    }
}

/// List items and map values compared with their old selves; a map may not stop taking
/// arbitrary keys.
fn compare_entries(path: &str, old: &Value, new: &Value, out: &mut Vec<BreakingChange>) {
    if let (Some(o), Some(n)) = (old.get("items"), new.get("items")) {
        compare(&format!("{path}[*]"), o, n, out);
    }
    let no_new_fields = properties(new).is_none_or(Map::is_empty);
    match (old.get("additionalProperties"), new.get("additionalProperties")) {
        (Some(o), Some(n)) if o.is_object() && n.is_object() => compare(&format!("{path}[*]"), o, n, out),
        (Some(o), None) if (o.is_object() || o == &Value::Bool(true)) && no_new_fields && !preserves_unknown(new) => {
            out.push(BreakingChange {
                path: path.to_string(),
                change: "arbitrary keys no longer allowed".into(),
            });
        }
        _ => {}
    }
}

/// Checks that lower bounds did not rise and upper bounds did not fall (or appear).
fn compare_bounds(old: &Value, new: &Value, push: &mut impl FnMut(String)) {
    const LOWER: [&str; 4] = ["minimum", "minLength", "minItems", "minProperties"];
    const UPPER: [&str; 4] = ["maximum", "maxLength", "maxItems", "maxProperties"];
    for key in LOWER {
        match (num(old, key), num(new, key)) {
            (Some(o), Some(n)) if n > o => push(format!("{key} raised from {o} to {n}")),
            (None, Some(n)) if n > 0.0 || key == "minimum" => push(format!("{key} {n} added")),
            _ => {}
        }
    }
    for key in UPPER {
        match (num(old, key), num(new, key)) {
            (Some(o), Some(n)) if n < o => push(format!("{key} lowered from {o} to {n}")),
            (None, Some(n)) => push(format!("{key} {n} added")),
            _ => {}
        }
    }
    for (key, bound) in [("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")] {
        let (o, n) = (flag(old, key), flag(new, key));
        if n && !o && num(new, bound).is_some() && num(old, bound) == num(new, bound) {
            push(format!("{bound} became exclusive"));
        }
    }
}

fn type_of(schema: &Value) -> &str {
    if flag(schema, "x-kubernetes-int-or-string") {
        return "int-or-string";
    }
    match str_field(schema, "type") {
        Some("integer") => "integer",
        Some(t) => t,
        None => "any",
    }
}

fn preserves_unknown(schema: &Value) -> bool {
    flag(schema, "x-kubernetes-preserve-unknown-fields")
}

fn required(schema: &Value) -> BTreeSet<&str> {
    schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn str_field<'a>(schema: &'a Value, key: &str) -> Option<&'a str> {
    schema.get(key).and_then(Value::as_str)
}

fn num(schema: &Value, key: &str) -> Option<f64> {
    schema.get(key).and_then(Value::as_f64)
}

fn flag(schema: &Value, key: &str) -> bool {
    schema.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// The `spec` schema of each version of a CRD.
fn version_specs(crd: &CustomResourceDefinition) -> Vec<(String, Value)> {
    crd.spec
        .versions
        .iter()
        .map(|v| {
            let schema = v.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref());
            let spec = serde_json::to_value(schema)
                .ok()
                .and_then(|s| s.pointer("/properties/spec").cloned())
                .unwrap_or(Value::Null);
            (v.name.clone(), spec)
        })
        .collect()
}

/// Breaking changes from the live CRD to the desired one, version by version: a version's
/// schema must keep accepting what it accepted (instances are written and read in it). A
/// version that disappears is [`removed_stored_versions`]' concern.
pub fn crd_breaking_changes(live: &CustomResourceDefinition, desired: &CustomResourceDefinition) -> Vec<String> {
    let desired_specs = version_specs(desired);
    let several = desired_specs.len() > 1;
    let mut changes: Vec<String> = Vec::new();
    for (version, old_spec) in version_specs(live) {
        let Some((_, new_spec)) = desired_specs.iter().find(|(name, _)| *name == version) else {
            continue;
        };
        changes.extend(breaking_changes(&old_spec, new_spec, "spec").iter().map(|c| {
            if several {
                format!("{version}: {c}")
            } else {
                c.to_string()
            }
        }));
    }
    changes
}

/// Versions the desired CRD drops while the apiserver may still hold objects stored in them
/// (the live CRD's `status.storedVersions`): removing them would make those objects unreadable.
pub fn removed_stored_versions(live: &CustomResourceDefinition, desired: &CustomResourceDefinition) -> Vec<String> {
    let stored = live
        .status
        .as_ref()
        .and_then(|s| s.stored_versions.clone())
        .unwrap_or_default();
    let kept = |name: &str| desired.spec.versions.iter().any(|v| v.name == name);
    let mut removed: Vec<String> = stored.into_iter().filter(|v| !kept(v)).collect();
    // A CRD without a status yet stores in its storage version.
    if removed.is_empty() && live.status.as_ref().and_then(|s| s.stored_versions.as_ref()).is_none() {
        removed = live
            .spec
            .versions
            .iter()
            .filter(|v| v.storage && !kept(&v.name))
            .map(|v| v.name.clone())
            .collect();
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "type": "object",
            "required": ["image"],
            "properties": {
                "image": {"type": "string", "minLength": 1, "maxLength": 512},
                "replicas": {"type": "integer", "minimum": 0, "maximum": 50, "default": 1},
                "serviceType": {"type": "string", "enum": ["ClusterIP", "NodePort"], "default": "ClusterIP"},
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "ports": {"type": "array", "items": {"type": "object", "properties": {"port": {"type": "integer"}}}},
            },
        })
    }

    fn changed(edit: impl FnOnce(&mut Value)) -> Vec<String> {
        let mut new = base();
        edit(&mut new);
        breaking_changes(&base(), &new, "spec")
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn identical_schemas_are_compatible() {
        assert!(changed(|_| {}).is_empty());
    }

    #[test]
    fn additive_changes_are_compatible() {
        let widened = changed(|s| {
            s["properties"]["timeout"] = json!({"type": "integer"});
            s["properties"]["tier"] = json!({"type": "string", "default": "web"});
            s["required"] = json!(["image", "tier"]);
            s["properties"]["replicas"]["maximum"] = json!(100);
            s["properties"]["replicas"]["minimum"] = json!(-1);
            s["properties"]["image"]["minLength"] = json!(0);
            s["properties"]["serviceType"]["enum"] = json!(["ClusterIP", "NodePort", "LoadBalancer"]);
            s["properties"]["image"]["description"] = json!("The image.");
        });
        assert!(widened.is_empty(), "{widened:?}");
    }

    #[test]
    fn removed_field_is_breaking() {
        assert_eq!(
            changed(|s| {
                s["properties"].as_object_mut().unwrap().remove("replicas");
            }),
            ["spec.replicas: field removed"]
        );
    }

    #[test]
    fn type_change_is_breaking() {
        assert_eq!(
            changed(|s| s["properties"]["replicas"] = json!({"type": "string"})),
            ["spec.replicas: type changed from integer to string"]
        );
        assert_eq!(
            changed(|s| s["properties"]["ports"]["items"]["properties"]["port"] = json!({"type": "string"})),
            ["spec.ports[*].port: type changed from integer to string"]
        );
    }

    #[test]
    fn new_required_field_without_default_is_breaking() {
        assert_eq!(
            changed(|s| {
                s["properties"]["team"] = json!({"type": "string"});
                s["required"] = json!(["image", "team"]);
            }),
            ["spec.team: new required field without a default"]
        );
        assert_eq!(
            changed(|s| s["required"] = json!(["image", "env"])),
            ["spec.env: now required and has no default"]
        );
    }

    #[test]
    fn an_added_validation_rule_is_breaking_a_removed_one_is_not() {
        let rule = json!([{"rule": "[has(self.a), has(self.b)].exists_one(c, c)", "message": "m"}]);
        assert_eq!(
            changed(|s| s["x-kubernetes-validations"] = rule.clone()),
            ["spec: validation rule \"[has(self.a), has(self.b)].exists_one(c, c)\" added"]
        );
        let mut old = base();
        old["x-kubernetes-validations"] = rule;
        assert!(breaking_changes(&old, &base(), "spec").is_empty());
    }

    #[test]
    fn narrowed_enum_is_breaking() {
        assert_eq!(
            changed(|s| s["properties"]["serviceType"]["enum"] = json!(["ClusterIP"])),
            ["spec.serviceType: enum values removed: \"NodePort\""]
        );
        assert_eq!(
            changed(|s| s["properties"]["image"]["enum"] = json!(["nginx"])),
            ["spec.image: now restricted to \"nginx\""]
        );
    }

    #[test]
    fn tightened_bounds_are_breaking() {
        assert_eq!(
            changed(|s| {
                s["properties"]["replicas"]["maximum"] = json!(10);
                s["properties"]["replicas"]["minimum"] = json!(1);
                s["properties"]["image"]["maxLength"] = json!(128);
            }),
            [
                "spec.image: maxLength lowered from 512 to 128",
                "spec.replicas: minimum raised from 0 to 1",
                "spec.replicas: maximum lowered from 50 to 10",
            ]
        );
        assert_eq!(
            changed(|s| s["properties"]["ports"]["maxItems"] = json!(3)),
            ["spec.ports: maxItems 3 added"]
        );
        assert_eq!(
            changed(|s| s["properties"]["image"]["pattern"] = json!("^ghcr")),
            ["spec.image: pattern \"^ghcr\" added"]
        );
    }

    #[test]
    fn map_values_are_compared() {
        assert_eq!(
            changed(|s| s["properties"]["env"]["additionalProperties"] = json!({"type": "integer"})),
            ["spec.env[*]: type changed from string to integer"]
        );
    }

    #[test]
    fn every_change_is_listed() {
        let all = changed(|s| {
            s["properties"].as_object_mut().unwrap().remove("env");
            s["properties"]["serviceType"]["enum"] = json!(["ClusterIP"]);
            s["properties"]["replicas"]["maximum"] = json!(5);
        });
        assert_eq!(all.len(), 3, "{all:?}");
    }
}
