//! Versions of a platform API (`#Versions`): their names, flags and schemas, checked against
//! the rules of the module contract, in the order Kubernetes prefers them.

use std::cmp::Ordering;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

use serde::Deserialize;
use serde_json::Value;

use super::batch::{RenderError, clean_message};
use super::module::Module;
use super::{CueCli, CueError, SchemaError, crd_schema_from_openapi};

/// Most versions a module may declare.
pub const MAX_VERSIONS: usize = 8;
/// Most characters of a deprecation warning (the apiserver's own bound).
pub const MAX_DEPRECATION_WARNING: usize = 256;
/// Most `lossy` paths one version may list: each is followed through every value a round
/// trip compares.
pub const MAX_LOSSY_PATHS: usize = 64;
/// Most characters of one `lossy` path.
pub const MAX_LOSSY_PATH_CHARS: usize = 256;
/// The generated file of the `meta` package that exports each version's flags.
pub(super) const FLAGS_FILE: &str = "meta/versions.cue";
/// The generated package that re-exports each non-storage version's `#Input` for cue's
/// OpenAPI encoder (which fails on the platform package itself, and on comprehensions).
pub(super) const SCHEMAS_FILE: &str = "versions/versions.cue";
/// Prefix of the definitions of [`SCHEMAS_FILE`]: `#PequodVersion_v1alpha1`.
const SCHEMA_DEFINITION_PREFIX: &str = "PequodVersion_";

/// One version of a module's API, as its CRD serves it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiVersion {
    pub name: String,
    pub served: bool,
    pub storage: bool,
    pub deprecated: bool,
    pub deprecation_warning: Option<String>,
    /// Paths inside `spec` (`debug`, `ports.name`, `ports[0].name`) whose loss on a round
    /// trip through this version is intended.
    pub lossy: Vec<String>,
    /// The CRD schema of this version's `spec`; the storage version's is the module's `#Input`.
    pub spec: Value,
}

/// A version's flags as the module writes them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Flags {
    #[serde(default = "served_by_default")]
    served: bool,
    #[serde(default)]
    storage: bool,
    #[serde(default)]
    deprecated: bool,
    #[serde(default)]
    deprecation_warning: Option<String>,
    #[serde(default)]
    lossy: Vec<String>,
}

fn served_by_default() -> bool {
    true
}

/// Which of a version's definitions exist (`cue export` never prints definitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Defines {
    input: bool,
    to_storage: bool,
    from_storage: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct Declaration {
    flags: Flags,
    defines: Defines,
}

/// A version as declared, checked, before its schema is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Declared {
    name: String,
    flags: Flags,
}

impl Declared {
    pub(super) fn name(&self) -> &str {
        &self.name
    }

    fn is_storage(&self) -> bool {
        self.flags.storage
    }
}

fn invalid(message: String) -> RenderError {
    RenderError::InvalidModule { message }
}

/// Whether `name` is a version name the contract allows: `v1`, `v2beta1`, `v1alpha3`.
pub fn is_version_name(name: &str) -> bool {
    parse_version(name).is_some()
}

/// Stability of a version, in Kubernetes' order of preference (greater is preferred).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stability {
    Alpha,
    Beta,
    Ga,
}

/// (major, stability, minor) of a name matching `^v[1-9][0-9]*((alpha|beta)[1-9][0-9]*)?$`.
fn parse_version(name: &str) -> Option<(u64, Stability, u64)> {
    fn number(digits: &str) -> Option<u64> {
        let valid = !digits.is_empty() && !digits.starts_with('0') && digits.bytes().all(|b| b.is_ascii_digit());
        if valid { digits.parse().ok() } else { None }
    }
    let rest = name.strip_prefix('v')?;
    let digits_end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    let major = number(&rest[..digits_end])?;
    let suffix = &rest[digits_end..];
    if suffix.is_empty() {
        return Some((major, Stability::Ga, 0));
    }
    let (stability, minor) = if let Some(minor) = suffix.strip_prefix("alpha") {
        (Stability::Alpha, minor)
    } else {
        (Stability::Beta, suffix.strip_prefix("beta")?)
    };
    Some((major, stability, number(minor)?))
}

/// Kubernetes' version priority: GA before beta before alpha, then the higher major, then the
/// higher minor; names of no such form after all of them, alphabetically. `Less` means `a`
/// comes first.
pub fn version_priority_order(a: &str, b: &str) -> Ordering {
    match (parse_version(a), parse_version(b)) {
        (Some((a_major, a_stability, a_minor)), Some((b_major, b_stability, b_minor))) => b_stability
            .cmp(&a_stability)
            .then(b_major.cmp(&a_major))
            .then(b_minor.cmp(&a_minor)),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

/// One step of a path inside a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PathSegment {
    Field(String),
    Index(usize),
    /// `[]` or `[*]`: every item of a list.
    AnyIndex,
}

/// Parses a dotted path inside a spec (`ports[0].name`, `ports[].name`, `labels.app`).
pub(crate) fn parse_path(path: &str) -> Option<Vec<PathSegment>> {
    let mut segments = Vec::new();
    for part in path.split('.') {
        let (field, mut indexes) = match part.find('[') {
            Some(open) => (&part[..open], &part[open..]),
            None => (part, ""),
        };
        if field.is_empty() || field.contains(']') {
            return None;
        }
        segments.push(PathSegment::Field(field.to_string()));
        while !indexes.is_empty() {
            let close = indexes.find(']')?;
            let index = &indexes[1..close];
            segments.push(match index {
                "" | "*" => PathSegment::AnyIndex,
                digits => PathSegment::Index(digits.parse().ok()?),
            });
            indexes = &indexes[close + 1..];
            if !indexes.is_empty() && !indexes.starts_with('[') {
                return None;
            }
        }
    }
    Some(segments)
}

/// The versions `#Versions` declares, from `cue export ./meta` (see [`flags_source`]), checked
/// against every rule of the contract and in priority order.
pub(super) fn declared_versions(meta: &Value) -> Result<Vec<Declared>, RenderError> {
    let declarations = meta
        .get("versions")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("#Versions must be a struct of versions".into()))?;
    if declarations.is_empty() {
        return Err(invalid("#Versions declares no version".into()));
    }
    if declarations.len() > MAX_VERSIONS {
        return Err(invalid(format!(
            "#Versions declares {} versions; at most {MAX_VERSIONS} are allowed",
            declarations.len()
        )));
    }
    let mut declared = Vec::with_capacity(declarations.len());
    for (name, declaration) in declarations {
        declared.push(declared_version(name, declaration)?);
    }
    declared.sort_by(|a, b| version_priority_order(&a.name, &b.name));
    let storage: Vec<&str> = declared.iter().filter(|v| v.is_storage()).map(|v| v.name()).collect();
    match storage.as_slice() {
        [_] => Ok(declared),
        [] => Err(invalid(
            "#Versions: no version is the storage version; mark exactly one with storage: true".into(),
        )),
        several => Err(invalid(format!(
            "#Versions: {} are each marked storage: true; exactly one version may be the storage version",
            several.join(", ")
        ))),
    }
}

/// One version's declaration, checked on its own.
fn declared_version(name: &str, declaration: &Value) -> Result<Declared, RenderError> {
    let at = format!("#Versions.{name}");
    if !is_version_name(name) {
        return Err(invalid(format!(
            "{at}: a version name must match ^v[1-9][0-9]*((alpha|beta)[1-9][0-9]*)?$ (v1, v2beta1, v1alpha3)"
        )));
    }
    let Declaration { flags, defines } =
        serde_json::from_value(declaration.clone()).map_err(|e| invalid(format!("{at}: {e}")))?;
    let present: Vec<&str> = [
        (defines.input, "#Input"),
        (defines.to_storage, "#ToStorage"),
        (defines.from_storage, "#FromStorage"),
    ]
    .into_iter()
    .filter_map(|(defined, definition)| defined.then_some(definition))
    .collect();
    if flags.storage {
        if !flags.served {
            return Err(invalid(format!("{at}: the storage version must be served")));
        }
        if !present.is_empty() {
            return Err(invalid(format!(
                "{at}: the storage version's schema is the module's #Input and needs no conversion; remove its {}",
                present.join(", ")
            )));
        }
    } else if present.len() < 3 {
        let missing: Vec<&str> = ["#Input", "#ToStorage", "#FromStorage"]
            .into_iter()
            .filter(|d| !present.contains(d))
            .collect();
        return Err(invalid(format!(
            "{at}: defines no {}; every version but the storage version needs #Input, #ToStorage and #FromStorage",
            missing.join(", ")
        )));
    }
    check_deprecation(&at, &flags)?;
    check_lossy(&at, &flags.lossy)?;
    Ok(Declared {
        name: name.to_string(),
        flags,
    })
}

/// A version's `lossy` paths: few and short, since a round trip's comparison follows each of
/// them (the paths themselves are not quoted back when too long).
fn check_lossy(at: &str, lossy: &[String]) -> Result<(), RenderError> {
    if lossy.len() > MAX_LOSSY_PATHS {
        return Err(invalid(format!(
            "{at}: lossy lists {} paths; at most {MAX_LOSSY_PATHS} are allowed",
            lossy.len()
        )));
    }
    for (i, path) in lossy.iter().enumerate() {
        let chars = path.chars().count();
        if chars > MAX_LOSSY_PATH_CHARS {
            return Err(invalid(format!(
                "{at}: lossy path {i} is {chars} characters; at most {MAX_LOSSY_PATH_CHARS} are allowed"
            )));
        }
        if parse_path(path).is_none() {
            return Err(invalid(format!(
                "{at}: lossy path {path:?} is not a dotted path inside spec (debug, ports[].name)"
            )));
        }
    }
    Ok(())
}

fn check_deprecation(at: &str, flags: &Flags) -> Result<(), RenderError> {
    let Some(warning) = &flags.deprecation_warning else {
        return Ok(());
    };
    if !flags.deprecated {
        return Err(invalid(format!(
            "{at}: deprecationWarning is only for a version marked deprecated: true"
        )));
    }
    if warning.chars().count() > MAX_DEPRECATION_WARNING || warning.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{at}: deprecationWarning must be at most {MAX_DEPRECATION_WARNING} characters on one line"
        )));
    }
    Ok(())
}

/// The `meta` package's file exporting, per version, its flags and which definitions it has.
pub(super) fn flags_source(module: &Module) -> String {
    format!(
        "package meta\n\n{}\n\nversions: {{for name, v in p.#Versions {{(name): {{\n\tflags: v\n\tdefines: {{\n\t\tinput:       v.#Input != _|_\n\t\ttoStorage:   v.#ToStorage != _|_\n\t\tfromStorage: v.#FromStorage != _|_\n\t}}\n}}}}}}\n",
        module.import_line()
    )
}

/// The package whose OpenAPI holds each non-storage version's `#Input`. Names are checked
/// version names: nothing else reaches the source.
pub(super) fn schemas_source(module: &Module, declared: &[Declared]) -> String {
    let mut source = format!("package versions\n\n{}\n\n", module.import_line());
    for version in declared.iter().filter(|v| !v.is_storage()) {
        source.push_str(&format!(
            "#{SCHEMA_DEFINITION_PREFIX}{0}: p.#Versions.{0}.#Input\n",
            version.name
        ));
    }
    source
}

/// The versions with their schemas: the storage version's is `storage_spec`, every other
/// one's comes from the OpenAPI of [`schemas_source`]. Each lossy path must name a field of
/// the version's spec or of the storage version's.
pub(super) fn api_versions(
    declared: Vec<Declared>,
    openapi: &Value,
    storage_spec: &Value,
) -> Result<Vec<ApiVersion>, RenderError> {
    let mut versions = Vec::with_capacity(declared.len());
    for Declared { name, flags } in declared {
        let spec = if flags.storage {
            storage_spec.clone()
        } else {
            version_schema(openapi, &name)?
        };
        if let Some(path) = flags
            .lossy
            .iter()
            .find(|path| !names_a_field(&spec, path) && !names_a_field(storage_spec, path))
        {
            return Err(invalid(format!(
                "#Versions.{name}: lossy path {path:?} names no field of {name}'s spec nor of the storage version's (paths are inside spec)"
            )));
        }
        versions.push(ApiVersion {
            name,
            served: flags.served,
            storage: flags.storage,
            deprecated: flags.deprecated,
            deprecation_warning: flags.deprecation_warning,
            lossy: flags.lossy,
            spec,
        });
    }
    Ok(versions)
}

/// One version's `#Input` as a CRD schema; errors name the version.
fn version_schema(openapi: &Value, name: &str) -> Result<Value, RenderError> {
    let definition = format!("{SCHEMA_DEFINITION_PREFIX}{name}");
    crd_schema_from_openapi(openapi, &definition).map_err(|e| {
        let message = e
            .message
            .replace(&format!("#{definition}"), &format!("#Versions.{name}.#Input"));
        RenderError::Schema(SchemaError {
            path: e.path,
            message: format!("{message} (version {name})"),
        })
    })
}

/// Whether the first field of `path` is one `schema` (a CRD schema of a spec) can hold.
fn names_a_field(schema: &Value, path: &str) -> bool {
    let Some(Some(PathSegment::Field(first))) = parse_path(path).map(|p| p.into_iter().next()) else {
        return false;
    };
    schema
        .pointer(&format!("/properties/{}", first.replace('~', "~0").replace('/', "~1")))
        .is_some()
        || schema.get("additionalProperties").is_some()
        || schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
}

/// A cue message about the generated `meta` package, in the module's terms:
/// `versions.v1.flags.served: …` reads `#Versions.v1.served: …`, without positions in the
/// generated file.
pub(super) fn readable(message: &str) -> String {
    message
        .lines()
        .filter(|line| !line.contains(FLAGS_FILE))
        .map(|line| match line.strip_prefix("versions.") {
            Some(rest) => format!("#Versions.{}", rest.replacen(".flags.", ".", 1)),
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs cue's OpenAPI encoder over the generated schemas package, after writing it.
pub(super) async fn versions_openapi(
    cli: &CueCli,
    module: &Module,
    declared: &[Declared],
) -> Result<Value, RenderError> {
    if declared.iter().all(Declared::is_storage) {
        // Nothing to encode, and cue refuses a package whose import goes unused.
        return Ok(Value::Null);
    }
    write_generated(&module.dir, SCHEMAS_FILE, &schemas_source(module, declared)).await?;
    let text = match cli
        .run(&["def", "./versions", "--out", "openapi"], Some(&module.dir))
        .await
    {
        Ok(text) => text,
        // As for #Input: the encoder may name no field where plain `def` does.
        Err(CueError::Failed { message, .. }) => {
            let diagnosis = cli.run(&["def", "./versions"], Some(&module.dir)).await;
            let message = match diagnosis {
                Err(CueError::Failed { message, .. }) => message,
                _ => message,
            };
            return Err(invalid(
                clean_message(&message).replace(&format!("#{SCHEMA_DEFINITION_PREFIX}"), "#Versions."),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    serde_json::from_str(&text).map_err(|e| RenderError::InvalidOutput {
        message: format!("cue printed invalid OpenAPI: {e}"),
    })
}

static GENERATED: AtomicU64 = AtomicU64::new(0);

/// Writes a generated file of a module's folder unless it already holds `content`: folders
/// written before versions existed get it too. Replaced atomically (readers may be running).
pub(super) async fn write_generated(dir: &Path, relative: &str, content: &str) -> Result<(), RenderError> {
    let path = dir.join(relative);
    if tokio::fs::read_to_string(&path).await.is_ok_and(|c| c == content) {
        return Ok(());
    }
    let io = |e: std::io::Error| invalid(format!("writing {}: {e}", path.display()));
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(io)?;
    }
    // Not a .cue name: cue must never load a half-written file.
    let staging = path.with_extension(format!(
        "tmp-{}-{}",
        std::process::id(),
        GENERATED.fetch_add(1, AtomicOrdering::Relaxed)
    ));
    tokio::fs::write(&staging, content).await.map_err(io)?;
    tokio::fs::rename(&staging, &path).await.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn version_names_follow_the_contract() {
        for good in ["v1", "v12", "v1alpha1", "v2beta3", "v10beta10"] {
            assert!(is_version_name(good), "{good}");
        }
        for bad in [
            "",
            "v",
            "v0",
            "v01",
            "V1",
            "1",
            "v1alpha",
            "v1beta0",
            "v1gamma1",
            "v1-beta1",
            "v1.0",
            "v1alpha1x",
        ] {
            assert!(!is_version_name(bad), "{bad}");
        }
    }

    #[test]
    fn priority_is_ga_then_beta_then_alpha_higher_numbers_first() {
        let mut names = vec![
            "v11alpha2",
            "foo10",
            "v2",
            "v10beta3",
            "v1",
            "foo1",
            "v3beta1",
            "v12alpha1",
            "v11beta2",
            "v10",
        ];
        names.sort_by(|a, b| version_priority_order(a, b));
        // The example of the Kubernetes documentation on version priority.
        assert_eq!(
            names,
            [
                "v10",
                "v2",
                "v1",
                "v11beta2",
                "v10beta3",
                "v3beta1",
                "v12alpha1",
                "v11alpha2",
                "foo1",
                "foo10"
            ]
        );
        assert_eq!(version_priority_order("v1beta2", "v1beta10"), Ordering::Greater);
        assert_eq!(version_priority_order("v1", "v1"), Ordering::Equal);
    }

    #[test]
    fn paths_parse_with_fields_and_indexes() {
        use PathSegment::*;
        assert_eq!(
            parse_path("ports[2].name"),
            Some(vec![Field("ports".into()), Index(2), Field("name".into())])
        );
        assert_eq!(
            parse_path("a[][*].b"),
            Some(vec![Field("a".into()), AnyIndex, AnyIndex, Field("b".into())])
        );
        for bad in ["", "a..b", ".a", "a[", "a[x]", "a]b", "a[0]b", "[0]"] {
            assert_eq!(parse_path(bad), None, "{bad}");
        }
    }

    fn declaration(flags: Value, defines: [bool; 3]) -> Value {
        json!({"flags": flags, "defines": {"input": defines[0], "toStorage": defines[1], "fromStorage": defines[2]}})
    }

    fn two_versions() -> Value {
        json!({"versions": {
            "v1alpha1": declaration(json!({"deprecated": true, "deprecationWarning": "use v1beta1", "lossy": ["debug"]}), [true; 3]),
            "v1beta1": declaration(json!({"storage": true}), [false; 3]),
        }})
    }

    #[test]
    fn declarations_are_read_with_defaults_and_ordered() {
        let declared = declared_versions(&two_versions()).unwrap();
        assert_eq!(
            declared.iter().map(Declared::name).collect::<Vec<_>>(),
            ["v1beta1", "v1alpha1"]
        );
        assert!(declared[0].flags.served && declared[0].flags.storage);
        assert_eq!(
            declared[1].flags,
            Flags {
                served: true,
                storage: false,
                deprecated: true,
                deprecation_warning: Some("use v1beta1".into()),
                lossy: vec!["debug".into()],
            }
        );
    }

    fn refusal(meta: Value) -> String {
        match declared_versions(&meta) {
            Err(RenderError::InvalidModule { message }) => message,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn every_rule_is_enforced_with_a_message_naming_the_version() {
        let storage = || declaration(json!({"storage": true}), [false; 3]);
        let other = |flags: Value| declaration(flags, [true; 3]);
        let cases = [
            (json!({"versions": {}}), "#Versions declares no version"),
            (
                json!({"versions": {"v1": storage(), "v1.0": other(json!({}))}}),
                "#Versions.v1.0: a version name must match",
            ),
            (
                json!({"versions": {"v1": storage(), "v0": other(json!({}))}}),
                "#Versions.v0: a version name",
            ),
            (
                json!({"versions": {"v1": other(json!({})), "v2": other(json!({}))}}),
                "no version is the storage version",
            ),
            (
                json!({"versions": {"v1": storage(), "v2": storage()}}),
                "v2, v1 are each marked storage: true",
            ),
            (
                json!({"versions": {"v1": declaration(json!({"storage": true, "served": false}), [false; 3])}}),
                "#Versions.v1: the storage version must be served",
            ),
            (
                json!({"versions": {"v1": declaration(json!({"storage": true}), [true, false, true])}}),
                "#Versions.v1: the storage version's schema is the module's #Input and needs no conversion; remove its #Input, #FromStorage",
            ),
            (
                json!({"versions": {"v1": storage(), "v1beta1": declaration(json!({}), [true, false, false])}}),
                "#Versions.v1beta1: defines no #ToStorage, #FromStorage",
            ),
            (
                json!({"versions": {"v1": storage(), "v1beta1": other(json!({"stroage": true}))}}),
                "#Versions.v1beta1: unknown field `stroage`",
            ),
            (
                json!({"versions": {"v1": storage(), "v1beta1": other(json!({"served": "yes"}))}}),
                "#Versions.v1beta1: invalid type",
            ),
            (
                json!({"versions": {"v1": storage(), "v1beta1": other(json!({"deprecationWarning": "old"}))}}),
                "#Versions.v1beta1: deprecationWarning is only for a version marked deprecated: true",
            ),
            (
                json!({"versions": {"v1": storage(), "v1beta1": other(json!({"deprecated": true, "deprecationWarning": "a\nb"}))}}),
                "#Versions.v1beta1: deprecationWarning must be at most 256 characters on one line",
            ),
            (
                json!({"versions": {"v1": storage(), "v1beta1": other(json!({"lossy": ["a..b"]}))}}),
                "#Versions.v1beta1: lossy path \"a..b\" is not a dotted path",
            ),
            (json!({"versions": 3}), "#Versions must be a struct of versions"),
            (
                json!({"versions": {"v1": storage(), "v1beta1": other(json!({"lossy": vec!["a"; 65]}))}}),
                "#Versions.v1beta1: lossy lists 65 paths; at most 64 are allowed",
            ),
            (
                json!({"versions": {"v1": storage(), "v1beta1": other(json!({"lossy": ["a", "b".repeat(257)]}))}}),
                "#Versions.v1beta1: lossy path 1 is 257 characters; at most 256 are allowed",
            ),
        ];
        for (meta, want) in cases {
            let message = refusal(meta);
            assert!(message.contains(want), "{message:?} should contain {want:?}");
        }
        let nine: serde_json::Map<String, Value> = (1..=9)
            .map(|i| (format!("v{i}"), declaration(json!({"storage": i == 1}), [i != 1; 3])))
            .collect();
        assert_eq!(
            refusal(json!({"versions": nine})),
            "#Versions declares 9 versions; at most 8 are allowed"
        );
    }

    #[test]
    fn lossy_paths_up_to_the_limits_are_allowed() {
        let longest = format!("a{}", ".b".repeat((MAX_LOSSY_PATH_CHARS - 1) / 2));
        assert_eq!(longest.chars().count(), MAX_LOSSY_PATH_CHARS - 1);
        let mut lossy = vec![format!("{longest}c")];
        lossy.resize(MAX_LOSSY_PATHS, "debug".to_string());
        assert_eq!(lossy[0].chars().count(), MAX_LOSSY_PATH_CHARS);
        let meta = json!({"versions": {
            "v1": declaration(json!({"storage": true}), [false; 3]),
            "v1beta1": declaration(json!({"lossy": lossy}), [true; 3]),
        }});
        let declared = declared_versions(&meta).unwrap();
        assert_eq!(declared[1].flags.lossy.len(), MAX_LOSSY_PATHS);
    }

    fn openapi() -> Value {
        json!({"components": {"schemas": {
            "PequodVersion_v1alpha1": {"$ref": "#/components/schemas/Versions.v1alpha1.Input"},
            "Versions.v1alpha1.Input": {"type": "object", "required": ["port"], "properties": {"port": {"type": "string"}}},
        }}})
    }

    #[test]
    fn versions_get_their_schemas_and_lossy_paths_must_name_fields() {
        let storage_spec =
            json!({"type": "object", "properties": {"listenPort": {"type": "integer"}, "debug": {"type": "boolean"}}});
        let declared = declared_versions(&two_versions()).unwrap();
        let versions = api_versions(declared.clone(), &openapi(), &storage_spec).unwrap();
        assert_eq!(versions[0].spec, storage_spec);
        assert_eq!(
            versions[1].spec,
            json!({"type": "object", "required": ["port"], "properties": {"port": {"type": "string"}}})
        );
        assert_eq!(versions[1].deprecation_warning.as_deref(), Some("use v1beta1"));

        let mut typo = declared;
        typo[1].flags.lossy = vec!["spec.debug".into()];
        let err = api_versions(typo, &openapi(), &storage_spec).unwrap_err();
        assert!(
            err.to_string()
                .contains("#Versions.v1alpha1: lossy path \"spec.debug\" names no field"),
            "{err}"
        );
    }

    #[test]
    fn generated_sources_and_messages_speak_of_versions() {
        let module = Module {
            digest: "sha256:x".into(),
            package: "web".into(),
            platform: "web".into(),
            dir: "/tmp/x".into(),
            has_metadata: false,
            has_status: false,
            has_versions: true,
            has_settings: false,
        };
        let declared = declared_versions(&two_versions()).unwrap();
        assert_eq!(
            schemas_source(&module, &declared),
            "package versions\n\nimport p \"pequod.local/module/platform:web\"\n\n#PequodVersion_v1alpha1: p.#Versions.v1alpha1.#Input\n"
        );
        assert!(flags_source(&module).contains("versions: {for name, v in p.#Versions {(name): {"));
        assert_eq!(
            readable("versions.v1.flags.served: incomplete value bool:\n    ./meta/versions.cue:6:9\n    m.cue:3:4"),
            "#Versions.v1.served: incomplete value bool:\n    m.cue:3:4"
        );
    }

    #[tokio::test]
    async fn generated_files_are_written_once_and_replaced_when_they_differ() {
        let dir = tempfile::tempdir().unwrap();
        write_generated(dir.path(), SCHEMAS_FILE, "a").await.unwrap();
        let path = dir.path().join(SCHEMAS_FILE);
        let written = std::fs::metadata(&path).unwrap().modified().unwrap();
        write_generated(dir.path(), SCHEMAS_FILE, "a").await.unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), written);
        write_generated(dir.path(), SCHEMAS_FILE, "b").await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "b");
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }
}
