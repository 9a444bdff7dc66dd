//! Converts the OpenAPI that `cue def --out openapi` produces for `#Input` into a structural
//! CRD schema, or refuses with an error naming the field it cannot express.

use serde_json::{Map, Value, json};

/// A CUE construct the CRD schema cannot express.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SchemaError {
    /// Dotted path of the field inside `spec`, or `spec` itself.
    pub path: String,
    pub message: String,
}

impl SchemaError {
    pub(crate) fn new(path: &str, message: impl Into<String>) -> Self {
        Self {
            path: path.to_string(),
            message: message.into(),
        }
    }
}

/// Keywords copied as they are.
const PASSTHROUGH: &[&str] = &[
    "type",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "nullable",
    "title",
];

/// Converts `components.schemas.<name>` of an OpenAPI document into a CRD schema.
pub fn crd_schema_from_openapi(openapi: &Value, name: &str) -> Result<Value, SchemaError> {
    // #Input becomes the spec; #Status, the module's part of the status.
    let field = if name == "Status" { "status" } else { "spec" };
    let components = openapi
        .pointer("/components/schemas")
        .and_then(Value::as_object)
        .ok_or_else(|| SchemaError::new(field, "cue produced no OpenAPI components"))?;
    let root = components
        .get(name)
        .ok_or_else(|| SchemaError::new(field, format!("the module defines no #{name}")))?;
    let mut stack = vec![name.to_string()];
    let schema = convert(root, components, field, &mut stack)?;
    if schema.get("type").and_then(Value::as_str) != Some("object") {
        return Err(SchemaError::new(
            field,
            format!("#{name} must be a struct, got {}", describe(&schema)),
        ));
    }
    Ok(schema)
}

fn describe(schema: &Value) -> String {
    match schema.get("type").and_then(Value::as_str) {
        Some(t) => format!("type {t}"),
        None => "a value of any type".to_string(),
    }
}

fn convert(
    schema: &Value,
    components: &Map<String, Value>,
    path: &str,
    stack: &mut Vec<String>,
) -> Result<Value, SchemaError> {
    let obj = schema
        .as_object()
        .ok_or_else(|| SchemaError::new(path, "schema is not an object"))?;
    if let Some(reference) = obj.get("$ref").and_then(Value::as_str) {
        return inline_reference(obj, reference, components, path, stack);
    }
    for keyword in ["oneOf", "anyOf"] {
        if let Some(branches) = obj.get(keyword).and_then(Value::as_array) {
            return alternatives(obj, keyword, branches, components, path, stack);
        }
    }
    if let Some(all) = obj.get("allOf").and_then(Value::as_array) {
        return match all.as_slice() {
            [single] => convert(single, components, path, stack),
            _ => Err(SchemaError::new(
                path,
                "a conjunction of several schemas cannot be expressed in a CRD schema",
            )),
        };
    }

    let mut out = plain_keywords(obj, path)?;
    match obj.get("type").and_then(Value::as_str) {
        None => {
            // `_`: any value.
            out.insert("x-kubernetes-preserve-unknown-fields".into(), Value::Bool(true));
        }
        Some("object") => object(obj, &mut out, components, path, stack)?,
        Some("array") => {
            let items = match obj.get("items") {
                Some(items) => convert(items, components, &format!("{path}[]"), stack)?,
                None => json!({"x-kubernetes-preserve-unknown-fields": true}),
            };
            out.insert("items".into(), items);
        }
        Some(_) => {}
    }
    Ok(Value::Object(out))
}

/// The definition `reference` names, converted in place: a CRD schema has no references.
fn inline_reference(
    obj: &Map<String, Value>,
    reference: &str,
    components: &Map<String, Value>,
    path: &str,
    stack: &mut Vec<String>,
) -> Result<Value, SchemaError> {
    let name = reference
        .strip_prefix("#/components/schemas/")
        .ok_or_else(|| SchemaError::new(path, format!("unsupported reference {reference}")))?;
    if stack.iter().any(|s| s == name) {
        return Err(SchemaError::new(
            path,
            format!("recursive definition #{name} cannot be expressed in a CRD schema"),
        ));
    }
    let target = components
        .get(name)
        .ok_or_else(|| SchemaError::new(path, format!("reference to unknown definition #{name}")))?;
    stack.push(name.to_string());
    let mut inlined = convert(target, components, path, stack)?;
    stack.pop();
    // Keywords beside $ref (a description, say) apply on top of the definition.
    if let Some(out) = inlined.as_object_mut() {
        for (k, v) in obj {
            if k != "$ref" && PASSTHROUGH.contains(&k.as_str()) {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(inlined)
}

/// `oneOf`/`anyOf`: alternative structs become one struct with a validation rule, anything
/// else a disjunction of values.
fn alternatives(
    obj: &Map<String, Value>,
    keyword: &str,
    branches: &[Value],
    components: &Map<String, Value>,
    path: &str,
    stack: &mut Vec<String>,
) -> Result<Value, SchemaError> {
    let Some(merged) = struct_alternatives(obj, keyword, branches, path)? else {
        return disjunction(obj, branches, path);
    };
    let mut out = convert(&merged.schema, components, path, stack)?;
    if let Some(out) = out.as_object_mut() {
        out.insert("x-kubernetes-validations".into(), json!([merged.rule]));
    }
    Ok(out)
}

/// The keywords of `obj` a CRD schema keeps as they are (or as Kubernetes spells them);
/// properties and items are converted by the caller.
fn plain_keywords(obj: &Map<String, Value>, path: &str) -> Result<Map<String, Value>, SchemaError> {
    let mut out = Map::new();
    for (key, value) in obj {
        match key.as_str() {
            "properties" | "additionalProperties" | "items" | "required" => {}
            "format" => {
                // CUE bytes are base64 in JSON: Kubernetes calls that format "byte".
                let format = if value == "binary" {
                    json!("byte")
                } else {
                    value.clone()
                };
                out.insert(key.clone(), format);
            }
            "uniqueItems" => {
                if value == &Value::Bool(true) {
                    return Err(SchemaError::new(
                        path,
                        "unique list items (list.UniqueItems) cannot be expressed in a CRD schema",
                    ));
                }
            }
            k if PASSTHROUGH.contains(&k) => {
                out.insert(key.clone(), value.clone());
            }
            other => {
                return Err(SchemaError::new(
                    path,
                    format!("OpenAPI keyword {other:?} cannot be expressed in a CRD schema"),
                ));
            }
        }
    }
    Ok(out)
}

fn object(
    obj: &Map<String, Value>,
    out: &mut Map<String, Value>,
    components: &Map<String, Value>,
    path: &str,
    stack: &mut Vec<String>,
) -> Result<(), SchemaError> {
    let mut properties = Map::new();
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, prop) in props {
            properties.insert(
                name.clone(),
                convert(prop, components, &format!("{path}.{name}"), stack)?,
            );
        }
    }
    let additional = match obj.get("additionalProperties") {
        Some(Value::Object(schema)) => Some(convert(
            &Value::Object(schema.clone()),
            components,
            &format!("{path}.*"),
            stack,
        )?),
        _ => None,
    };
    if properties.is_empty() && additional.is_none() {
        // An open struct (`{...}`): keep whatever the user writes.
        out.insert("x-kubernetes-preserve-unknown-fields".into(), Value::Bool(true));
        return Ok(());
    }
    if !properties.is_empty() && additional.is_some() {
        return Err(SchemaError::new(
            path,
            "a struct with both fixed fields and a pattern constraint cannot be expressed in a CRD schema",
        ));
    }
    // CUE lists every regular field as required; the apiserver must only insist on those a
    // user has to write: no default, and not satisfied by an empty struct or list.
    let required: Vec<Value> = obj
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter(|name| properties.get(*name).is_some_and(must_be_written))
        .map(|name| Value::String(name.to_string()))
        .collect();
    if !properties.is_empty() {
        out.insert("properties".into(), Value::Object(properties));
    }
    if let Some(additional) = additional {
        out.insert("additionalProperties".into(), additional);
    }
    if !required.is_empty() {
        out.insert("required".into(), Value::Array(required));
    }
    Ok(())
}

/// Whether a required field needs a value from the user: false for fields with a default and
/// for structs and lists that CUE completes to empty values by itself.
fn must_be_written(schema: &Value) -> bool {
    if schema.get("default").is_some() {
        return false;
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => schema.get("required").is_some(),
        Some("array") => schema.get("minItems").and_then(Value::as_u64).unwrap_or(0) > 0,
        _ => true,
    }
}

/// A disjunction of structs, merged into one struct whose fields are all optional, plus the
/// CEL rule that keeps the alternatives apart.
struct Alternatives {
    schema: Value,
    rule: Value,
}

/// `{a: int} | {b: string}`: CUE's encoder writes a `oneOf` (or `anyOf`) whose branches list
/// each alternative's fields. A structural CRD schema cannot hold fields inside `oneOf`, so the
/// fields move up to the struct and the choice becomes a CEL rule the apiserver checks: the
/// fields each alternative requires are present for exactly one alternative (`oneOf`) or for
/// at least one (`anyOf`). `None` when the branches are not plain structs.
fn struct_alternatives(
    obj: &Map<String, Value>,
    keyword: &str,
    branches: &[Value],
    path: &str,
) -> Result<Option<Alternatives>, SchemaError> {
    let is_struct_branch = |b: &Value| {
        b.as_object().is_some_and(|o| {
            o.keys()
                .all(|k| matches!(k.as_str(), "required" | "properties" | "type"))
                && o.get("type").is_none_or(|t| t == "object")
        })
    };
    if obj.get("type").and_then(Value::as_str) != Some("object") || !branches.iter().all(is_struct_branch) {
        return Ok(None);
    }
    let mut properties = obj
        .get("properties")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut conditions = Vec::new();
    let mut names = Vec::new();
    for branch in branches {
        merge_branch_fields(&mut properties, branch, path)?;
        let (condition, name) = branch_selector(branch, path)?;
        conditions.push(condition);
        names.push(name);
    }
    let (quantifier, wording) = if keyword == "oneOf" {
        ("exists_one", "exactly one")
    } else {
        ("exists", "at least one")
    };
    let rule = format!("[{}].{quantifier}(c, c)", conditions.join(", "));
    let message = format!("set {wording} of: {}", names.join("; "));
    let mut schema = obj.clone();
    schema.remove(keyword);
    schema.insert("properties".into(), Value::Object(properties));
    Ok(Some(Alternatives {
        schema: Value::Object(schema),
        rule: json!({"rule": rule, "message": message}),
    }))
}

/// Field names CEL reaches as `self.name` (others would need escaping the rule does not do).
fn is_cel_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Adds the fields of one alternative to the struct's; a field both have must have one schema.
fn merge_branch_fields(properties: &mut Map<String, Value>, branch: &Value, path: &str) -> Result<(), SchemaError> {
    for (name, schema) in branch
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        match properties.get(name) {
            Some(existing) if existing != schema => {
                return Err(SchemaError::new(
                    &format!("{path}.{name}"),
                    "the field has different schemas in the alternatives of a disjunction",
                ));
            }
            _ => {
                properties.insert(name.clone(), schema.clone());
            }
        }
    }
    Ok(())
}

/// How CEL tells that one alternative is chosen (its required fields are present), and its
/// name in the rule's message.
fn branch_selector(branch: &Value, path: &str) -> Result<(String, String), SchemaError> {
    let required: Vec<&str> = branch
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for name in &required {
        if !is_cel_identifier(name) {
            return Err(SchemaError::new(
                &format!("{path}.{name}"),
                "a field that selects an alternative of a disjunction needs a name CEL can address",
            ));
        }
    }
    let condition = match required.as_slice() {
        [] => "true".to_string(),
        fields => fields
            .iter()
            .map(|f| format!("has(self.{f})"))
            .collect::<Vec<_>>()
            .join(" && "),
    };
    let name = if required.is_empty() {
        "{}".to_string()
    } else {
        required.join(" and ")
    };
    Ok((condition, name))
}

fn disjunction(obj: &Map<String, Value>, branches: &[Value], path: &str) -> Result<Value, SchemaError> {
    let mut types: Vec<&str> = branches
        .iter()
        .map(|b| b.get("type").and_then(Value::as_str).unwrap_or("any"))
        .collect();
    types.sort_unstable();
    let plain = branches.iter().all(|b| b.as_object().is_some_and(|o| o.len() == 1));
    if types == ["integer", "string"] && plain {
        let mut out = Map::new();
        out.insert("x-kubernetes-int-or-string".into(), Value::Bool(true));
        for key in ["description", "default"] {
            if let Some(v) = obj.get(key) {
                out.insert(key.into(), v.clone());
            }
        }
        return Ok(Value::Object(out));
    }
    Err(SchemaError::new(
        path,
        format!(
            "a disjunction of {} cannot be expressed in a CRD schema; use one type (an enum of values is fine) or int | string",
            types.join(" | ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(input: Value) -> Value {
        json!({"components": {"schemas": {"Input": input}}})
    }

    fn convert_field(field: Value) -> Result<Value, SchemaError> {
        crd_schema_from_openapi(&doc(json!({"type": "object", "properties": {"v": field}})), "Input")
            .map(|s| s["properties"]["v"].clone())
    }

    #[test]
    fn scalars_bounds_enums_defaults_and_descriptions_are_kept() {
        let cases = [
            (
                json!({"type": "integer", "minimum": 1, "maximum": 65535, "default": 80, "description": "Port."}),
                json!({"type": "integer", "minimum": 1, "maximum": 65535, "default": 80, "description": "Port."}),
            ),
            (
                json!({"type": "number", "minimum": 0.5, "exclusiveMinimum": true}),
                json!({"type": "number", "minimum": 0.5, "exclusiveMinimum": true}),
            ),
            (
                json!({"type": "string", "minLength": 1, "maxLength": 10, "pattern": "^[a-z]"}),
                json!({"type": "string", "minLength": 1, "maxLength": 10, "pattern": "^[a-z]"}),
            ),
            (
                json!({"type": "string", "enum": ["a", "b"], "default": "a"}),
                json!({"type": "string", "enum": ["a", "b"], "default": "a"}),
            ),
            (
                json!({"type": "integer", "format": "int32"}),
                json!({"type": "integer", "format": "int32"}),
            ),
            (
                json!({"type": "string", "format": "binary"}),
                json!({"type": "string", "format": "byte"}),
            ),
            (
                json!({"type": "string", "nullable": true}),
                json!({"type": "string", "nullable": true}),
            ),
            (
                json!({"type": "boolean", "default": false}),
                json!({"type": "boolean", "default": false}),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(convert_field(input.clone()).unwrap(), want, "for {input}");
        }
    }

    #[test]
    fn open_values_preserve_unknown_fields() {
        assert_eq!(
            convert_field(json!({})).unwrap(),
            json!({"x-kubernetes-preserve-unknown-fields": true})
        );
        assert_eq!(
            convert_field(json!({"type": "object"})).unwrap(),
            json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
        );
        assert_eq!(
            convert_field(json!({"type": "array", "items": {}})).unwrap(),
            json!({"type": "array", "items": {"x-kubernetes-preserve-unknown-fields": true}})
        );
    }

    #[test]
    fn maps_and_lists_keep_their_element_schema() {
        assert_eq!(
            convert_field(json!({"type": "object", "additionalProperties": {"type": "string"}})).unwrap(),
            json!({"type": "object", "additionalProperties": {"type": "string"}})
        );
        assert_eq!(
            convert_field(json!({"type": "array", "items": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}})).unwrap(),
            json!({"type": "array", "items": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}})
        );
    }

    #[test]
    fn only_fields_a_user_must_write_are_required() {
        let schema = crd_schema_from_openapi(
            &doc(json!({
                "type": "object",
                "required": ["image", "port", "env", "tags", "nested", "atLeastOne"],
                "properties": {
                    "image": {"type": "string"},
                    "port": {"type": "integer", "default": 80},
                    "env": {"type": "object", "additionalProperties": {"type": "string"}},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "nested": {"type": "object", "required": ["x"], "properties": {"x": {"type": "integer"}}},
                    "atLeastOne": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                }
            })),
            "Input",
        )
        .unwrap();
        assert_eq!(schema["required"], json!(["image", "nested", "atLeastOne"]));
    }

    #[test]
    fn references_are_inlined_and_recursion_refused() {
        let openapi = json!({"components": {"schemas": {
            "Input": {"type": "object", "properties": {"res": {"$ref": "#/components/schemas/Res", "description": "Resources."}}},
            "Res": {"type": "object", "required": ["cpu"], "properties": {"cpu": {"type": "string", "default": "100m"}}},
        }}});
        let schema = crd_schema_from_openapi(&openapi, "Input").unwrap();
        assert_eq!(
            schema["properties"]["res"],
            json!({"type": "object", "description": "Resources.", "properties": {"cpu": {"type": "string", "default": "100m"}}})
        );

        let recursive = json!({"components": {"schemas": {
            "Input": {"type": "object", "properties": {"tree": {"$ref": "#/components/schemas/Rec"}}},
            "Rec": {"type": "object", "properties": {"next": {"$ref": "#/components/schemas/Rec"}}},
        }}});
        let err = crd_schema_from_openapi(&recursive, "Input").unwrap_err();
        assert_eq!(err.path, "spec.tree.next");
        assert!(err.message.contains("recursive definition #Rec"), "{err}");
    }

    #[test]
    fn int_or_string_is_supported_other_disjunctions_are_named_errors() {
        assert_eq!(
            convert_field(json!({"oneOf": [{"type": "integer"}, {"type": "string"}]})).unwrap(),
            json!({"x-kubernetes-int-or-string": true})
        );
        let err = convert_field(json!({"oneOf": [{"type": "object"}, {"type": "string"}]})).unwrap_err();
        assert_eq!(err.path, "spec.v");
        assert!(err.message.contains("disjunction"), "{err}");
        let err = convert_field(json!({"oneOf": [{"type": "boolean"}, {"type": "string"}]})).unwrap_err();
        assert!(err.message.contains("boolean | string"), "{err}");
    }

    #[test]
    fn struct_alternatives_become_optional_fields_and_a_cel_rule() {
        let either = json!({"type": "object", "properties": {"name": {"type": "string"}}, "oneOf": [
            {"required": ["image"], "properties": {"image": {"type": "string"}}},
            {"required": ["repo", "tag"], "properties": {"repo": {"type": "string"}, "tag": {"type": "string"}}},
        ]});
        assert_eq!(
            convert_field(either).unwrap(),
            json!({
                "type": "object",
                "properties": {"name": {"type": "string"}, "image": {"type": "string"}, "repo": {"type": "string"}, "tag": {"type": "string"}},
                "x-kubernetes-validations": [{
                    "rule": "[has(self.image), has(self.repo) && has(self.tag)].exists_one(c, c)",
                    "message": "set exactly one of: image; repo and tag",
                }],
            })
        );
        let any =
            convert_field(json!({"type": "object", "anyOf": [{"required": ["a"]}, {"required": ["b"]}]})).unwrap();
        assert_eq!(
            any["x-kubernetes-validations"][0]["rule"],
            "[has(self.a), has(self.b)].exists(c, c)"
        );
        let clash = convert_field(json!({"type": "object", "oneOf": [
            {"required": ["a"], "properties": {"a": {"type": "string"}}},
            {"required": ["a"], "properties": {"a": {"type": "integer"}}},
        ]}))
        .unwrap_err();
        assert_eq!(clash.path, "spec.v.a");
        let unnamed = convert_field(json!({"type": "object", "oneOf": [{"required": ["a-b"]}, {"required": ["c"]}]}));
        assert!(unnamed.unwrap_err().message.contains("CEL"));
    }

    #[test]
    fn unsupported_keywords_and_non_struct_inputs_are_refused() {
        let err =
            convert_field(json!({"type": "array", "uniqueItems": true, "items": {"type": "string"}})).unwrap_err();
        assert!(err.message.contains("UniqueItems"), "{err}");
        let err = convert_field(json!({"not": {"type": "string"}})).unwrap_err();
        assert!(err.message.contains("\"not\""), "{err}");
        let err = crd_schema_from_openapi(&doc(json!({"type": "string"})), "Input").unwrap_err();
        assert_eq!(err.to_string(), "spec: #Input must be a struct, got type string");
        let err = crd_schema_from_openapi(&json!({"components": {"schemas": {}}}), "Input").unwrap_err();
        assert_eq!(err.message, "the module defines no #Input");
    }
}
