//! Custom resource types served by Pequod (`platform.platform.example.com/v1alpha1`).

pub mod condition_types;
mod conditions;
mod instance;
pub mod names;
pub mod reasons;
mod resourcegraph;
mod transform;

pub use conditions::{Condition, ConditionStatus, has_condition, set_condition};
pub use instance::{
    InstancePhase, InstanceStatus, MAX_NODE_SUMMARIES, MAX_STATUS_VIOLATIONS, NodeSummary, RESERVED_STATUS_FIELDS,
    instance_status_schema,
};
pub use resourcegraph::*;
pub use transform::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;

/// API group of every kind Pequod itself defines.
pub const GROUP: &str = "platform.platform.example.com";
/// API version of every kind Pequod itself defines.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` string of Pequod's own kinds.
pub const API_VERSION: &str = "platform.platform.example.com/v1alpha1";

/// An object of a namespaced kind, by namespace and name (`namespace/name`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The CRDs the operator needs installed, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![ResourceGraph::crd(), Transform::crd()];
    for crd in &mut crds {
        for version in &mut crd.spec.versions {
            if let Some(schema) = version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) {
                strip_null_enum_values(schema);
            }
        }
    }
    crds
}

/// Optional enums come out of schemars as `enum: [..., null]`; `nullable: true` already says
/// that, and kubectl's client-side validation refuses a null enum value.
fn strip_null_enum_values(schema: &mut JSONSchemaProps) {
    if let Some(values) = schema.enum_.as_mut() {
        values.retain(|v| !v.0.is_null());
    }
    let children = schema
        .properties
        .iter_mut()
        .flat_map(|p| p.values_mut())
        .chain(schema.items.iter_mut().filter_map(|i| match i {
            JSONSchemaPropsOrArray::Schema(s) => Some(s.as_mut()),
            JSONSchemaPropsOrArray::Schemas(_) => None,
        }))
        .chain(schema.additional_properties.iter_mut().filter_map(|a| match a {
            JSONSchemaPropsOrBool::Schema(s) => Some(s.as_mut()),
            JSONSchemaPropsOrBool::Bool(_) => None,
        }));
    for child in children {
        strip_null_enum_values(child);
    }
}

/// Each CRD as YAML, keyed by the file name it is committed under in `config/crd/bases`
/// (`<group>_<plural>.yaml`).
pub fn crds_yaml() -> Result<Vec<(String, String)>, serde_yaml::Error> {
    crds()
        .into_iter()
        .map(|crd| {
            let file = format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural);
            serde_yaml::to_string(&crd).map(|yaml| (file, yaml))
        })
        .collect()
}

/// [`strip_null_enum_values`] for a schema held as JSON.
pub(crate) fn strip_null_enum_values_json(schema: &mut serde_json::Value) {
    match schema {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::Array(values)) = map.get_mut("enum") {
                values.retain(|v| !v.is_null());
            }
            for (key, child) in map.iter_mut() {
                if key != "enum" && key != "default" {
                    strip_null_enum_values_json(child);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_null_enum_values_json),
        _ => {}
    }
}

/// Schema of an arbitrary embedded Kubernetes object: apiVersion, kind and metadata are
/// validated by the apiserver, every other field is kept as written.
pub(crate) fn embedded_object_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-embedded-resource": true,
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Schema of a map from names to values of any JSON type.
pub(crate) fn any_value_map_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": 32,
        "additionalProperties": {"x-kubernetes-preserve-unknown-fields": true},
    })
}

/// Schema of a value of any JSON type.
pub(crate) fn any_value_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `make manifests` must be re-run whenever the API types change.
    #[test]
    fn committed_crds_match_the_code() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/crd/bases");
        for (file, yaml) in crds_yaml().unwrap() {
            let committed = std::fs::read_to_string(dir.join(&file))
                .unwrap_or_else(|e| panic!("config/crd/bases/{file}: {e}; run `make manifests`"));
            assert!(
                committed == yaml,
                "config/crd/bases/{file} is stale; run `make manifests`"
            );
        }
    }

    #[test]
    fn crds_have_the_documented_names() {
        let crds = crds();
        let names: Vec<_> = crds.iter().map(|c| c.metadata.name.clone().unwrap()).collect();
        assert_eq!(
            names,
            [
                "resourcegraphs.platform.platform.example.com",
                "transforms.platform.platform.example.com"
            ]
        );
        for crd in &crds {
            assert_eq!(crd.spec.scope, "Namespaced");
            let version = &crd.spec.versions[0];
            assert_eq!(version.name, VERSION);
            assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
        }
        let yaml: String = crds_yaml().unwrap().into_iter().map(|(_, y)| y).collect();
        assert!(!yaml.contains("- null"), "no enum may list null");
        // Apiservers before 1.22 read an empty-string default as null and refuse the CRD.
        assert!(!yaml.contains("default: ''"), "no empty-string defaults");
        let short: Vec<_> = crds.iter().map(|c| c.spec.names.short_names.clone().unwrap()).collect();
        assert_eq!(short, [vec!["rg".to_string()], vec!["tf".to_string()]]);
    }
}
