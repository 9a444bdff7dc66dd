//! Secret values that Pequod generates as it creates a Secret: the keys named in the
//! annotation `pequod.io/generate-secret-keys` of a Secret node of mode Create. The graph holds
//! no value, only the keys; the value is made once, from the system's random number
//! generator, and lives only in the Secret (Create never writes the Secret again).

use crate::api::names::GENERATE_SECRET_KEYS_ANNOTATION;
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::Value;

/// Most keys one Secret may have generated.
const MAX_KEYS: usize = 16;
/// Random bytes per value: 192 bits, written as 48 hexadecimal digits (safe in URLs, shells
/// and connection strings).
const VALUE_BYTES: usize = 24;

/// The keys an annotation value names, or why it is not valid: comma-separated Secret keys
/// (letters, digits, `-`, `_`, `.`; at most 253 characters), each once, at most 16.
pub fn keys(annotation: &str) -> Result<Vec<&str>, String> {
    let keys: Vec<&str> = annotation.split(',').map(str::trim).collect();
    if keys.len() > MAX_KEYS {
        return Err(format!(
            "names {} keys; at most {MAX_KEYS} may be generated",
            keys.len()
        ));
    }
    for (i, key) in keys.iter().enumerate() {
        let valid = !key.is_empty()
            && key.len() <= 253
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid {
            return Err(format!(
                "{key:?} is not a Secret key (letters, digits, '-', '_' or '.', at most 253)"
            ));
        }
        if keys[..i].contains(key) {
            return Err(format!("names {key:?} twice"));
        }
    }
    Ok(keys)
}

/// Why a Secret node may not carry the annotation, if it may not: only a v1 Secret of mode
/// Create, with valid keys.
pub fn check(api_version: &str, kind: &str, create: bool, object: &Value) -> Result<(), String> {
    let Some(annotation) = annotation(object) else {
        return Ok(());
    };
    if (api_version, kind) != ("v1", "Secret") {
        return Err(format!(
            "has the annotation {GENERATE_SECRET_KEYS_ANNOTATION}, which only a v1 Secret may carry"
        ));
    }
    if !create {
        return Err(format!(
            "has the annotation {GENERATE_SECRET_KEYS_ANNOTATION}, which needs applyPolicy mode Create: \
             values are generated once, when the Secret is created"
        ));
    }
    let annotation = annotation
        .as_str()
        .ok_or_else(|| format!("annotation {GENERATE_SECRET_KEYS_ANNOTATION} is not a string"))?;
    keys(annotation)
        .map(|_| ())
        .map_err(|why| format!("annotation {GENERATE_SECRET_KEYS_ANNOTATION} {why}"))
}

fn annotation(object: &Value) -> Option<&Value> {
    object
        .pointer("/metadata/annotations")?
        .get(GENERATE_SECRET_KEYS_ANNOTATION)
}

/// `desired` with a fresh random value under `stringData` for each key the annotation names
/// that neither `data` nor `stringData` sets; None when there is nothing to generate.
pub fn fill(desired: &Value) -> Result<Option<Value>, String> {
    let Some(annotation) = annotation(desired).and_then(Value::as_str) else {
        return Ok(None);
    };
    let keys = keys(annotation)?;
    let given = |key: &str| ["data", "stringData"].iter().any(|f| desired[f].get(key).is_some());
    let missing: Vec<&str> = keys.into_iter().filter(|k| !given(k)).collect();
    if missing.is_empty() {
        return Ok(None);
    }
    let mut filled = desired.clone();
    let Some(object) = filled.as_object_mut() else {
        return Err("the object is not a JSON object".into());
    };
    let string_data = object
        .entry("stringData")
        .or_insert_with(|| Value::Object(Default::default()));
    let Some(string_data) = string_data.as_object_mut() else {
        return Err("stringData is not an object".into());
    };
    let random = SystemRandom::new();
    for key in missing {
        let mut bytes = [0u8; VALUE_BYTES];
        random
            .fill(&mut bytes)
            .map_err(|_| "the system's random number generator failed".to_string())?;
        string_data.insert(key.to_string(), Value::String(hex::encode(bytes)));
    }
    Ok(Some(filled))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn secret(annotation: &str, extra: Value) -> Value {
        let mut s = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "db", "annotations": {GENERATE_SECRET_KEYS_ANNOTATION: annotation}},
        });
        if let (Some(s), Some(extra)) = (s.as_object_mut(), extra.as_object()) {
            s.extend(extra.clone());
        }
        s
    }

    #[test]
    fn named_keys_absent_from_the_object_get_fresh_random_values() {
        let desired = secret(
            "password, root-password,username",
            json!({"stringData": {"username": "app"}}),
        );
        let first = fill(&desired).unwrap().unwrap();
        let second = fill(&desired).unwrap().unwrap();
        let data = &first["stringData"];
        assert_eq!(data["username"], "app", "given keys stay as given");
        for key in ["password", "root-password"] {
            let value = data[key].as_str().unwrap();
            assert_eq!(value.len(), 2 * VALUE_BYTES);
            assert!(value.chars().all(|c| c.is_ascii_hexdigit()), "{value}");
            assert_ne!(second["stringData"][key], data[key], "every creation draws anew");
        }
        assert_ne!(data["password"], data["root-password"]);
        // The graph's object itself is left alone.
        assert!(desired["stringData"].get("password").is_none());
    }

    #[test]
    fn nothing_to_generate() {
        let plain = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"}});
        assert_eq!(fill(&plain).unwrap(), None);
        let given = secret("password", json!({"data": {"password": "cGFzcw=="}}));
        assert_eq!(fill(&given).unwrap(), None);
    }

    #[test]
    fn only_create_secrets_with_valid_keys_may_ask() {
        let ok = secret("password,tls.key", json!({}));
        assert_eq!(check("v1", "Secret", true, &ok), Ok(()));
        assert!(
            check("v1", "Secret", false, &ok)
                .unwrap_err()
                .contains("needs applyPolicy mode Create")
        );
        assert!(
            check("v1", "ConfigMap", true, &ok)
                .unwrap_err()
                .contains("only a v1 Secret")
        );
        for bad in ["", "a,,b", "pass word", "a/b", "a,a"] {
            let err = check("v1", "Secret", true, &secret(bad, json!({}))).unwrap_err();
            assert!(
                err.starts_with("annotation pequod.io/generate-secret-keys"),
                "{bad:?}: {err}"
            );
        }
        let many = (0..17).map(|i| format!("k{i}")).collect::<Vec<_>>().join(",");
        assert!(check("v1", "Secret", true, &secret(&many, json!({}))).is_err());
        let plain = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
        assert_eq!(check("v1", "ConfigMap", false, &plain), Ok(()));
    }
}
