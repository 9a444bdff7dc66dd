//! CRDs of platform kinds, built from a module's schema and a Transform's settings.

pub mod compat;
pub mod reserved;

use crate::error::ErrorCategory;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceColumnDefinition, CustomResourceConversion, CustomResourceDefinition, CustomResourceDefinitionNames,
    CustomResourceDefinitionSpec, CustomResourceDefinitionVersion, CustomResourceSubresourceStatus,
    CustomResourceSubresources, CustomResourceValidation, JSONSchemaProps, WebhookClientConfig, WebhookConversion,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::json;

use crate::api::instance_status_schema;
use crate::cue::{ApiVersion, ModuleSchema};

/// Names of a generated kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindNames {
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub short_names: Vec<String>,
}

/// A kind that cannot be generated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrdError {
    #[error("kind {0:?} is not a valid Kubernetes kind (want an upper-case letter, then letters and digits)")]
    InvalidKind(String),
    #[error("plural {0:?} is not a valid resource name (want lower-case letters and digits, at most 63)")]
    InvalidPlural(String),
    #[error("short name {0:?} is not valid (want lower-case letters and digits)")]
    InvalidShortName(String),
    #[error("API group {0:?} belongs to Kubernetes or Pequod; choose a group of your own")]
    ReservedGroup(String),
    #[error("kind {0} would collide with the built-in kind {1}")]
    BuiltinKind(String, String),
    #[error("short name {0:?} is already used by the built-in kind {1}")]
    ShortNameTaken(String, String),
    #[error("spec.version {version:?} is not one of the versions the module declares in #Versions ({declared})")]
    VersionNotDeclared { version: String, declared: String },
    #[error(
        "the module declares {0} versions, which the apiserver converts through Pequod's conversion webhook, \
         but the webhook is disabled (--webhook-bind-address=0)"
    )]
    NoConversionWebhook(usize),
}

impl ErrorCategory for CrdError {
    /// A kind's names are wrong until the Transform changes.
    fn is_transient(&self) -> bool {
        false
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::InvalidKind(_) | Self::InvalidPlural(_) | Self::InvalidShortName(_) => "InvalidKindNames",
            Self::ReservedGroup(_) | Self::BuiltinKind(..) | Self::ShortNameTaken(..) => "ReservedName",
            Self::VersionNotDeclared { .. } | Self::NoConversionWebhook(_) => "InvalidVersions",
        }
    }
}

/// `web-service` → `WebService`: words split at `-`, `_` and `.`, each capitalized.
pub fn kind_from_name(name: &str) -> String {
    name.split(['-', '_', '.'])
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut chars = w.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// English plural of a kind, lower-cased: `WebService` → `webservices`, `Policy` → `policies`.
pub fn plural_of(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    if lower.ends_with('y')
        && !lower.ends_with("ay")
        && !lower.ends_with("ey")
        && !lower.ends_with("oy")
        && !lower.ends_with("uy")
    {
        format!("{}ies", &lower[..lower.len() - 1])
    } else if ["s", "x", "z", "ch", "sh"].iter().any(|e| lower.ends_with(e)) {
        format!("{lower}es")
    } else {
        format!("{lower}s")
    }
}

/// The kind's names: `#Metadata` first, else derived from the Transform's name; short names
/// from both.
pub fn kind_names(
    transform_name: &str,
    schema: &ModuleSchema,
    extra_short_names: &[String],
) -> Result<KindNames, CrdError> {
    let kind = schema
        .metadata
        .kind
        .clone()
        .unwrap_or_else(|| kind_from_name(transform_name));
    let valid_kind = kind.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && kind.chars().all(|c| c.is_ascii_alphanumeric())
        && kind.len() <= 63;
    if !valid_kind {
        return Err(CrdError::InvalidKind(kind));
    }
    let plural = schema.metadata.plural.clone().unwrap_or_else(|| plural_of(&kind));
    let valid_name = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    };
    if !valid_name(&plural) {
        return Err(CrdError::InvalidPlural(plural));
    }
    let mut short_names: Vec<String> = Vec::new();
    for s in schema.metadata.short_names.iter().chain(extra_short_names) {
        if !valid_name(s) {
            return Err(CrdError::InvalidShortName(s.clone()));
        }
        if !short_names.contains(s) {
            short_names.push(s.clone());
        }
    }
    Ok(KindNames {
        singular: kind.to_ascii_lowercase(),
        kind,
        plural,
        short_names,
    })
}

/// What a Transform contributes to its CRD.
#[derive(Debug, Clone)]
pub struct CrdParams<'a> {
    pub group: &'a str,
    /// The Transform's `spec.version`: the one version of a module without `#Versions`.
    pub version: &'a str,
    pub categories: &'a [String],
    pub transform_name: &'a str,
    pub transform_namespace: &'a str,
    /// Where the apiserver sends conversion reviews; a kind of several versions needs it.
    pub conversion: Option<WebhookClientConfig>,
}

/// The versions of a kind: those the module declares, or the Transform's one version.
pub fn kind_versions(schema: &ModuleSchema, default_version: &str) -> Vec<ApiVersion> {
    if !schema.versions.is_empty() {
        return schema.versions.clone();
    }
    vec![ApiVersion {
        name: default_version.to_string(),
        served: true,
        storage: true,
        deprecated: false,
        deprecation_warning: None,
        lossy: Vec::new(),
        spec: schema.spec.clone(),
    }]
}

/// The version instances are stored and rendered in.
pub fn storage_version(schema: &ModuleSchema, default_version: &str) -> String {
    schema
        .versions
        .iter()
        .find(|v| v.storage)
        .map_or_else(|| default_version.to_string(), |v| v.name.clone())
}

/// Refuses versions a Transform cannot serve: its `spec.version` must be one the module
/// declares (it names the kind in the Transform's status and tools), and several versions need
/// the conversion webhook.
pub fn check_versions(schema: &ModuleSchema, transform_version: &str, webhook: bool) -> Result<(), CrdError> {
    if schema.versions.is_empty() {
        return Ok(());
    }
    if !schema.versions.iter().any(|v| v.name == transform_version) {
        return Err(CrdError::VersionNotDeclared {
            version: transform_version.to_string(),
            declared: schema
                .versions
                .iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    if schema.versions.len() > 1 && !webhook {
        return Err(CrdError::NoConversionWebhook(schema.versions.len()));
    }
    Ok(())
}

/// Pequod's status fields, and the module's own (`#Status`, whose names were checked not to
/// collide with Pequod's).
fn status_schema(module_status: Option<&serde_json::Value>) -> serde_json::Value {
    let mut status = instance_status_schema();
    let own = module_status
        .and_then(|s| s.get("properties"))
        .and_then(serde_json::Value::as_object);
    if let (Some(own), Some(properties)) = (own, status.get_mut("properties").and_then(|p| p.as_object_mut())) {
        for (name, schema) in own {
            properties.entry(name.clone()).or_insert_with(|| schema.clone());
        }
    }
    status
}

/// The CRD of a platform kind: namespaced, a version per module version (each with its own
/// `spec` schema and the same status, columns and status subresource), converted by Pequod's
/// webhook when there are several.
pub fn build_crd(names: &KindNames, schema: &ModuleSchema, params: &CrdParams<'_>) -> CustomResourceDefinition {
    let labels = crate::rbac::made_by_labels(params.transform_namespace, params.transform_name);
    let versions = kind_versions(schema, params.version);
    let conversion = match (versions.len() > 1, &params.conversion) {
        (true, Some(client_config)) => CustomResourceConversion {
            strategy: "Webhook".to_string(),
            webhook: Some(WebhookConversion {
                client_config: Some(client_config.clone()),
                conversion_review_versions: vec!["v1".to_string()],
            }),
        },
        // One version converts nothing (several without a webhook are refused before).
        _ => CustomResourceConversion {
            strategy: "None".to_string(),
            webhook: None,
        },
    };
    CustomResourceDefinition {
        metadata: ObjectMeta {
            name: Some(format!("{}.{}", names.plural, params.group)),
            labels: Some(labels),
            annotations: crate::rbac::made_by_annotations(params.transform_name),
            ..Default::default()
        },
        spec: CustomResourceDefinitionSpec {
            group: params.group.to_string(),
            names: CustomResourceDefinitionNames {
                kind: names.kind.clone(),
                list_kind: Some(format!("{}List", names.kind)),
                plural: names.plural.clone(),
                singular: Some(names.singular.clone()),
                short_names: (!names.short_names.is_empty()).then(|| names.short_names.clone()),
                categories: (!params.categories.is_empty()).then(|| params.categories.to_vec()),
            },
            scope: "Namespaced".to_string(),
            versions: versions
                .iter()
                .map(|version| CustomResourceDefinitionVersion {
                    name: version.name.clone(),
                    served: version.served,
                    storage: version.storage,
                    deprecated: version.deprecated.then_some(true),
                    deprecation_warning: version.deprecation_warning.clone().filter(|_| version.deprecated),
                    schema: Some(CustomResourceValidation {
                        open_api_v3_schema: Some(root_schema(schema, &version.spec)),
                    }),
                    subresources: Some(CustomResourceSubresources {
                        status: Some(CustomResourceSubresourceStatus(json!({}))),
                        scale: None,
                    }),
                    additional_printer_columns: Some(printer_columns(schema)),
                    ..Default::default()
                })
                .collect(),
            conversion: Some(conversion),
            ..Default::default()
        },
        status: None,
    }
}

/// An instance's schema in one version: that version's input as `spec`, and the status Pequod
/// writes (the same in every version).
fn root_schema(schema: &ModuleSchema, spec: &serde_json::Value) -> JSONSchemaProps {
    let mut spec = spec.clone();
    if let (Some(description), Some(obj)) = (&schema.metadata.description, spec.as_object_mut()) {
        obj.entry("description").or_insert_with(|| json!(description));
    }
    let mut root = json!({
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status_schema(schema.status.as_ref()),
        },
    });
    if let Some(description) = &schema.metadata.description {
        root["description"] = json!(description);
    }
    serde_json::from_value(root).unwrap_or_default()
}

/// Ready and Phase, the module's own columns, then the graph (wide output) and the age.
fn printer_columns(schema: &ModuleSchema) -> Vec<CustomResourceColumnDefinition> {
    let column = |name: &str, type_: &str, path: &str, priority: Option<i32>| CustomResourceColumnDefinition {
        name: name.to_string(),
        type_: type_.to_string(),
        json_path: path.to_string(),
        priority,
        ..Default::default()
    };
    vec![
        column(
            "Ready",
            "string",
            ".status.conditions[?(@.type==\"Ready\")].status",
            None,
        ),
        column("Phase", "string", ".status.phase", None),
    ]
    .into_iter()
    .chain(
        schema
            .metadata
            .printer_columns
            .iter()
            .map(|c| CustomResourceColumnDefinition {
                description: c.description.clone(),
                ..column(&c.name, &c.type_, &c.json_path, c.priority)
            }),
    )
    .chain([
        column("Graph", "string", ".status.resourceGraph", Some(1)),
        column("Age", "date", ".metadata.creationTimestamp", None),
    ])
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cue::ModuleMetadata;

    fn schema(metadata: ModuleMetadata) -> ModuleSchema {
        ModuleSchema {
            metadata,
            spec: json!({"type": "object", "required": ["image"], "properties": {"image": {"type": "string"}}}),
            status: None,
            versions: Vec::new(),
        }
    }

    #[test]
    fn the_module_s_status_and_columns_join_pequod_s() {
        use crate::cue::PrinterColumn;
        let mut with_status = schema(ModuleMetadata {
            kind: Some("WebService".into()),
            printer_columns: vec![PrinterColumn {
                name: "URL".into(),
                type_: "string".into(),
                json_path: ".status.url".into(),
                description: None,
                priority: None,
            }],
            ..Default::default()
        });
        with_status.status = Some(
            json!({"type": "object", "properties": {"url": {"type": "string"}, "readyReplicas": {"type": "integer"}}}),
        );
        let names = kind_names("webservice", &with_status, &[]).unwrap();
        let params = CrdParams {
            group: "apps.example.com",
            version: "v1alpha1",
            categories: &[],
            transform_name: "webservice",
            transform_namespace: "platform",
            conversion: None,
        };
        let crd = build_crd(&names, &with_status, &params);
        let version = &crd.spec.versions[0];
        let root = serde_json::to_value(version.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap();
        let status = &root["properties"]["status"]["properties"];
        assert_eq!(status["url"]["type"], "string");
        assert_eq!(status["readyReplicas"]["type"], "integer");
        assert!(
            status["phase"].is_object() && status["conditions"].is_object(),
            "Pequod's fields stay"
        );
        let columns: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Ready", "Phase", "URL", "Graph", "Age"]);
    }

    #[test]
    fn kind_and_plural_derivation() {
        assert_eq!(kind_from_name("web-service"), "WebService");
        assert_eq!(kind_from_name("message_queue.v2"), "MessageQueueV2");
        assert_eq!(kind_from_name("webservice"), "Webservice");
        assert_eq!(plural_of("WebService"), "webservices");
        assert_eq!(plural_of("Policy"), "policies");
        assert_eq!(plural_of("Gateway"), "gateways");
        assert_eq!(plural_of("Ingress"), "ingresses");
        assert_eq!(plural_of("Box"), "boxes");
    }

    #[test]
    fn module_metadata_wins_and_short_names_merge() {
        let names = kind_names(
            "web",
            &schema(ModuleMetadata {
                kind: Some("WebService".into()),
                short_names: vec!["ws".into()],
                ..Default::default()
            }),
            &["ws".into(), "web".into()],
        )
        .unwrap();
        assert_eq!(
            names,
            KindNames {
                kind: "WebService".into(),
                plural: "webservices".into(),
                singular: "webservice".into(),
                short_names: vec!["ws".into(), "web".into()]
            }
        );
        let derived = kind_names("my-db", &schema(ModuleMetadata::default()), &[]).unwrap();
        assert_eq!((derived.kind.as_str(), derived.plural.as_str()), ("MyDb", "mydbs"));
    }

    #[test]
    fn invalid_names_are_refused() {
        let bad_kind = schema(ModuleMetadata {
            kind: Some("web service".into()),
            ..Default::default()
        });
        assert_eq!(
            kind_names("x", &bad_kind, &[]),
            Err(CrdError::InvalidKind("web service".into()))
        );
        let bad_plural = schema(ModuleMetadata {
            plural: Some("Web-Services".into()),
            ..Default::default()
        });
        assert!(matches!(
            kind_names("x", &bad_plural, &[]),
            Err(CrdError::InvalidPlural(_))
        ));
        assert!(matches!(
            kind_names("x", &schema(ModuleMetadata::default()), &["No".into()]),
            Err(CrdError::InvalidShortName(_))
        ));
    }

    #[test]
    fn crd_has_names_schema_status_and_columns() {
        let s = schema(ModuleMetadata {
            kind: Some("WebService".into()),
            description: Some("A web service.".into()),
            ..Default::default()
        });
        let names = kind_names("webservice", &s, &[]).unwrap();
        let categories = vec!["platform".to_string()];
        let crd = build_crd(
            &names,
            &s,
            &CrdParams {
                group: "apps.example.com",
                version: "v1alpha1",
                categories: &categories,
                transform_name: "webservice",
                transform_namespace: "default",
                conversion: None,
            },
        );
        assert_eq!(crd.metadata.name.as_deref(), Some("webservices.apps.example.com"));
        assert_eq!(
            crd.metadata.labels.as_ref().unwrap()[crate::api::names::MANAGED_BY_LABEL],
            "pequod"
        );
        let version = &crd.spec.versions[0];
        let root = serde_json::to_value(version.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap();
        assert_eq!(root["properties"]["spec"]["required"], json!(["image"]));
        assert_eq!(root["properties"]["spec"]["description"], "A web service.");
        assert_eq!(
            root["properties"]["status"]["properties"]["phase"]["enum"][0],
            "Pending"
        );
        assert!(!root.to_string().contains("null]"), "no null enum values");
        let columns: Vec<_> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Ready", "Phase", "Graph", "Age"]);
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        assert_eq!(crd.spec.names.categories, Some(categories));
    }

    fn two_versions() -> ModuleSchema {
        let mut s = schema(ModuleMetadata {
            kind: Some("WebService".into()),
            ..Default::default()
        });
        let version = |name: &str, storage: bool, spec: serde_json::Value| ApiVersion {
            name: name.into(),
            served: true,
            storage,
            deprecated: !storage,
            deprecation_warning: (!storage).then(|| format!("{name} is deprecated; use v1beta1")),
            lossy: Vec::new(),
            spec,
        };
        s.versions = vec![
            version("v1beta1", true, s.spec.clone()),
            version(
                "v1alpha1",
                false,
                json!({"type": "object", "properties": {"port": {"type": "string"}}}),
            ),
        ];
        s
    }

    #[test]
    fn each_module_version_is_a_crd_version_converted_by_the_webhook() {
        let s = two_versions();
        let names = kind_names("webservice", &s, &[]).unwrap();
        let hook = WebhookClientConfig {
            url: Some("https://127.0.0.1:9443/convert/platform/webservice/abc".into()),
            ..Default::default()
        };
        let crd = build_crd(
            &names,
            &s,
            &CrdParams {
                group: "apps.example.com",
                version: "v1beta1",
                categories: &[],
                transform_name: "webservice",
                transform_namespace: "platform",
                conversion: Some(hook.clone()),
            },
        );
        let versions: Vec<(&str, bool, bool, Option<bool>)> = crd
            .spec
            .versions
            .iter()
            .map(|v| (v.name.as_str(), v.served, v.storage, v.deprecated))
            .collect();
        assert_eq!(
            versions,
            [("v1beta1", true, true, None), ("v1alpha1", true, false, Some(true))]
        );
        assert_eq!(
            crd.spec.versions[1].deprecation_warning.as_deref(),
            Some("v1alpha1 is deprecated; use v1beta1")
        );
        let spec_of = |i: usize| {
            serde_json::to_value(
                crd.spec.versions[i]
                    .schema
                    .as_ref()
                    .unwrap()
                    .open_api_v3_schema
                    .as_ref()
                    .unwrap(),
            )
            .unwrap()["properties"]["spec"]
                .clone()
        };
        assert_eq!(spec_of(0)["required"], json!(["image"]));
        assert_eq!(spec_of(1)["properties"]["port"]["type"], "string");
        let conversion = crd.spec.conversion.as_ref().unwrap();
        assert_eq!(conversion.strategy, "Webhook");
        let webhook = conversion.webhook.as_ref().unwrap();
        assert_eq!(webhook.client_config.as_ref(), Some(&hook));
        assert_eq!(webhook.conversion_review_versions, ["v1"]);
        assert_eq!(storage_version(&s, "v1alpha1"), "v1beta1");
    }

    #[test]
    fn one_version_converts_nothing_and_the_transform_names_a_declared_version() {
        let single = schema(ModuleMetadata::default());
        assert_eq!(kind_versions(&single, "v1").len(), 1);
        assert_eq!(storage_version(&single, "v1"), "v1");
        assert_eq!(check_versions(&single, "v9", false), Ok(()));
        let s = two_versions();
        assert_eq!(check_versions(&s, "v1alpha1", true), Ok(()));
        assert!(matches!(
            check_versions(&s, "v1", true),
            Err(CrdError::VersionNotDeclared { .. })
        ));
        assert_eq!(
            check_versions(&s, "v1beta1", false),
            Err(CrdError::NoConversionWebhook(2))
        );
        let names = kind_names("x", &single, &[]).unwrap();
        let crd = build_crd(
            &names,
            &single,
            &CrdParams {
                group: "apps.example.com",
                version: "v1",
                categories: &[],
                transform_name: "x",
                transform_namespace: "platform",
                conversion: None,
            },
        );
        assert_eq!(crd.spec.conversion.as_ref().map(|c| c.strategy.as_str()), Some("None"));
    }
}
