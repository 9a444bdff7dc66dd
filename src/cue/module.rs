//! Platform modules: their files, content digest, and the folder cue evaluates them in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::embedded;

/// Import path of the generated CUE module that wraps a platform package.
pub const MODULE_PATH: &str = "pequod.local/module";
/// The CUE language version modules are evaluated as: the version of the cue CLI Pequod pins
/// (hack/tools/cue/go.mod, checked by a test). cue refuses a module that declares none.
pub const CUE_LANGUAGE_VERSION: &str = "v0.17.1";
/// Most bytes all files of one module may hold together.
pub const MAX_MODULE_BYTES: usize = 1024 * 1024;
/// The file Pequod adds to a module with its Transform's `spec.settings`, as `#Settings`.
pub const SETTINGS_FILE: &str = "pequod_settings.cue";
/// Most identifiers in one setting's dotted path.
pub const MAX_SETTING_DEPTH: usize = 8;

/// A module that cannot be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModuleError {
    #[error("no embedded module named {name:?} (available: {available})")]
    UnknownEmbedded { name: String, available: String },
    #[error("the module has no .cue files")]
    NoFiles,
    #[error("invalid file name {name:?}: a module is a flat set of .cue files")]
    InvalidFileName { name: String },
    #[error("the module is {bytes} bytes; at most {limit} are allowed")]
    TooLarge { bytes: usize, limit: usize },
    #[error("files declare different packages: {packages}")]
    MixedPackages { packages: String },
    #[error("reading module: {message}")]
    Io { message: String },
    #[error("spec.settings: {why}")]
    InvalidSettings { why: String },
}

/// The `.cue` files of a module, by file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFiles {
    files: BTreeMap<String, String>,
}

impl ModuleFiles {
    pub fn new(files: BTreeMap<String, String>) -> Result<Self, ModuleError> {
        if files.is_empty() {
            return Err(ModuleError::NoFiles);
        }
        for name in files.keys() {
            let valid = name.ends_with(".cue")
                && name.len() > 4
                && !name.starts_with('.')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !valid {
                return Err(ModuleError::InvalidFileName { name: name.clone() });
            }
        }
        let bytes: usize = files.values().map(String::len).sum();
        if bytes > MAX_MODULE_BYTES {
            return Err(ModuleError::TooLarge {
                bytes,
                limit: MAX_MODULE_BYTES,
            });
        }
        Ok(Self { files })
    }

    /// A module written inline, as one file.
    pub fn inline(source: &str) -> Result<Self, ModuleError> {
        Self::new(BTreeMap::from([("module.cue".to_string(), source.to_string())]))
    }

    pub fn embedded(name: &str) -> Result<Self, ModuleError> {
        let files = embedded::files(name).ok_or_else(|| ModuleError::UnknownEmbedded {
            name: name.to_string(),
            available: embedded::names().collect::<Vec<_>>().join(", "),
        })?;
        Self::new(files.map(|(f, c)| (f.to_string(), c.to_string())).collect())
    }

    /// The top-level `.cue` files of a folder.
    pub fn from_dir(dir: &Path) -> Result<Self, ModuleError> {
        let io = |e: std::io::Error| ModuleError::Io {
            message: format!("{}: {e}", dir.display()),
        };
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.extension().is_some_and(|e| e == "cue") && path.is_file() {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                files.insert(name, std::fs::read_to_string(&path).map_err(io)?);
            }
        }
        Self::new(files)
    }

    /// The `.cue` entries of a ConfigMap's data.
    pub fn from_config_map_data(data: &BTreeMap<String, String>) -> Result<Self, ModuleError> {
        Self::new(
            data.iter()
                .filter(|(k, _)| k.ends_with(".cue"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }

    /// The module with a platform's settings (a Transform's `spec.settings`) as one more file,
    /// [`SETTINGS_FILE`], which gives the module's `#Settings` those values. Being a file of
    /// the module, settings are part of its digest: a change of settings is a new module
    /// version, and reaches instances through a rollout like any other. No settings: the
    /// module as it is.
    pub fn with_settings(mut self, settings: &crate::api::Settings) -> Result<Self, ModuleError> {
        let invalid = |why: String| ModuleError::InvalidSettings { why };
        if self.files.contains_key(SETTINGS_FILE) {
            return Err(invalid(format!(
                "the module has its own {SETTINGS_FILE}, the name of the file Pequod writes settings to"
            )));
        }
        if settings.is_empty() {
            return Ok(self);
        }
        if !self.defines("#Settings") {
            return Err(invalid("the module declares no #Settings to receive them".into()));
        }
        let value = settings_tree(settings).map_err(invalid)?;
        // JSON is CUE: its strings' escapes leave `\\(` a backslash, never an interpolation.
        let json = serde_json::to_string_pretty(&value).map_err(|e| invalid(e.to_string()))?;
        let package = self.package()?;
        let source =
            format!("package {package}\n\n// The Transform's spec.settings, written by Pequod.\n#Settings: {json}\n");
        self.files.insert(SETTINGS_FILE.to_string(), source);
        Self::new(self.files)
    }

    /// `sha256:<hex>` over file names and contents; changes exactly when the content does.
    pub fn digest(&self) -> String {
        let mut hasher = Sha256::new();
        for (name, content) in &self.files {
            hasher.update((name.len() as u64).to_be_bytes());
            hasher.update(name.as_bytes());
            hasher.update((content.len() as u64).to_be_bytes());
            hasher.update(content.as_bytes());
        }
        format!("sha256:{}", hex::encode(hasher.finalize()))
    }

    /// The package the files declare; files without a package clause join it, and a module
    /// without any clause is package `platform`.
    pub fn package(&self) -> Result<String, ModuleError> {
        let mut packages: Vec<String> = self.files.values().filter_map(|c| package_clause(c)).collect();
        packages.sort();
        packages.dedup();
        match packages.as_slice() {
            [] => Ok("platform".to_string()),
            [one] => Ok(one.clone()),
            many => Err(ModuleError::MixedPackages {
                packages: many.join(", "),
            }),
        }
    }

    /// Whether any file defines `name` (for example `#Metadata`) at the top level.
    pub fn defines(&self, name: &str) -> bool {
        self.files.values().any(|c| source_defines(c, name))
    }

    pub fn files(&self) -> &BTreeMap<String, String> {
        &self.files
    }
}

/// Settings as the value of `#Settings`: each dotted path a nested field (`gcp.location: EU`
/// is `{gcp: {location: "EU"}}`), or why they cannot be.
pub fn settings_tree(settings: &crate::api::Settings) -> Result<serde_json::Value, String> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    if settings.len() > crate::api::MAX_SETTINGS {
        return Err(format!(
            "{} settings; at most {} are allowed",
            settings.len(),
            crate::api::MAX_SETTINGS
        ));
    }
    let mut tree = serde_json::Map::new();
    for (path, value) in settings {
        let names: Vec<&str> = path.split('.').collect();
        let identifier = |n: &&str| {
            n.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        if names.len() > MAX_SETTING_DEPTH || path.len() > 128 || !names.iter().all(identifier) {
            return Err(format!(
                "{path:?} is not a dotted path of at most {MAX_SETTING_DEPTH} identifiers and 128 characters"
            ));
        }
        let value = match value {
            IntOrString::Int(i) => serde_json::Value::from(*i),
            IntOrString::String(s) => serde_json::Value::from(s.clone()),
        };
        let (last, parents) = names.split_last().ok_or_else(|| "an empty setting".to_string())?;
        let mut level = &mut tree;
        for (depth, name) in parents.iter().enumerate() {
            let entry = level
                .entry(name.to_string())
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
            level = entry
                .as_object_mut()
                .ok_or_else(|| format!("{path:?}: {} is set to a value itself", names[..=depth].join(".")))?;
        }
        if level.contains_key(*last) {
            return Err(format!("{path:?} is also the beginning of other settings"));
        }
        level.insert(last.to_string(), value);
    }
    Ok(serde_json::Value::Object(tree))
}

/// Whether a file's source defines `name` at the top level.
fn source_defines(source: &str, name: &str) -> bool {
    source.lines().any(|l| {
        let l = l.trim_start();
        l.strip_prefix(name)
            .is_some_and(|rest| rest.trim_start().starts_with(':'))
            && !l.starts_with("//")
    })
}

/// Whether a `.cue` file of `dir` defines `name` (as [`ModuleFiles::defines`] tells).
fn dir_defines(dir: &Path, name: &str) -> bool {
    std::fs::read_dir(dir).into_iter().flatten().flatten().any(|entry| {
        let path = entry.path();
        path.extension().is_some_and(|e| e == "cue")
            && std::fs::read_to_string(&path).is_ok_and(|source| source_defines(&source, name))
    })
}

/// The name in a file's `package` clause, if it has one.
fn package_clause(source: &str) -> Option<String> {
    for line in source.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with("//") || line.starts_with('@') {
            continue;
        }
        let rest = line.strip_prefix("package")?;
        if !rest.starts_with(char::is_whitespace) {
            return None;
        }
        let name: String = rest
            .trim()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        return (!name.is_empty()).then_some(name);
    }
    None
}

/// Whether `value` is a content digest as [`ModuleFiles::digest`] makes them.
pub fn is_digest(value: &str) -> bool {
    value
        .strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// A module written to disk, ready for cue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub digest: String,
    pub package: String,
    /// Label for metrics and messages: the embedded name, ConfigMap name or Transform name.
    pub platform: String,
    pub dir: PathBuf,
    pub has_metadata: bool,
    /// Whether the module defines `#Status`, the schema of its instances' own status fields.
    pub has_status: bool,
    /// Whether the module defines `#Versions`, the versions of its API.
    pub has_versions: bool,
    /// Whether the module defines `#Settings`, the platform's settings (see
    /// [`ModuleFiles::with_settings`]).
    pub has_settings: bool,
}

impl Module {
    /// Import statement that brings the platform package in as `p`.
    pub fn import_line(&self) -> String {
        format!("import p \"{MODULE_PATH}/platform:{}\"", self.package)
    }
}

/// Where modules are written: `<root>/modules/<digest>/`, once per digest.
#[derive(Debug, Clone)]
pub struct ModuleStore {
    root: PathBuf,
}

/// The folder cue evaluates: the module file, the platform's files (each with its package
/// clause), and the `schema` and `meta` packages that re-export what cue's encoders read.
fn write_module_tree(staging: &Path, files: &ModuleFiles, module: &Module) -> std::io::Result<()> {
    std::fs::create_dir_all(staging.join("cue.mod"))?;
    std::fs::create_dir_all(staging.join("platform"))?;
    std::fs::create_dir_all(staging.join("schema"))?;
    std::fs::write(
        staging.join("cue.mod/module.cue"),
        format!("module: \"{MODULE_PATH}\"\nlanguage: version: \"{CUE_LANGUAGE_VERSION}\"\n"),
    )?;
    if module.has_settings {
        std::fs::create_dir_all(staging.join("declared"))?;
        std::fs::create_dir_all(staging.join("settingscheck"))?;
    }
    for (name, content) in files.files() {
        let content = match package_clause(content) {
            Some(_) => content.clone(),
            None => format!("package {}\n\n{content}", module.package),
        };
        // The module as its author wrote it, without the Transform's settings: its
        // #Settings alone is closed to fields the module does not declare.
        if module.has_settings && name != SETTINGS_FILE {
            std::fs::write(staging.join("declared").join(name), &content)?;
        }
        std::fs::write(staging.join("platform").join(name), content)?;
    }
    // cue's OpenAPI encoder fails on packages holding #Render; a package that only
    // re-exports #Input is encodable.
    std::fs::write(
        staging.join("schema/schema.cue"),
        format!(
            "package schema\n\n{}\n\n#Input: p.#Input\n{}",
            module.import_line(),
            if module.has_status { "#Status: p.#Status\n" } else { "" }
        ),
    )?;
    // Exported when the schema is extracted: settings that do not fit #Settings, or that
    // leave it incomplete, stop the module there, before any instance renders with it.
    if module.has_settings {
        // Folders side by side: cue joins a package's files from parent folders of the same
        // package, which a module of any package name must not meet.
        let declared = format!("import d \"{MODULE_PATH}/declared:{}\"", module.package);
        std::fs::write(
            staging.join("settingscheck/settingscheck.cue"),
            format!(
                "package settingscheck\n\n{}\n{declared}\n\nsettings: d.#Settings & p.#Settings\n",
                module.import_line()
            ),
        )?;
    }
    if module.has_metadata {
        std::fs::create_dir_all(staging.join("meta"))?;
        std::fs::write(
            staging.join("meta/meta.cue"),
            format!("package meta\n\n{}\n\nmetadata: p.#Metadata\n", module.import_line()),
        )?;
    }
    Ok(())
}

static SCRATCH: AtomicU64 = AtomicU64::new(0);

impl ModuleStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Writes `files` (unless this digest is already on disk) and returns the module.
    pub fn materialize(&self, files: &ModuleFiles, platform: &str) -> Result<Module, ModuleError> {
        let digest = files.digest();
        let package = files.package()?;
        let has_metadata = files.defines("#Metadata");
        let has_status = files.defines("#Status");
        let has_versions = files.defines("#Versions");
        let has_settings = files.defines("#Settings");
        let dir = self.dir_of(&digest);
        let module = Module {
            digest,
            package,
            platform: platform.to_string(),
            dir: dir.clone(),
            has_metadata,
            has_status,
            has_versions,
            has_settings,
        };
        if dir.join(".complete").exists() {
            return Ok(module);
        }
        let io = |e: std::io::Error| ModuleError::Io {
            message: format!("writing {}: {e}", dir.display()),
        };
        let staging = self.root.join("modules").join(format!(
            ".staging-{}-{}",
            std::process::id(),
            SCRATCH.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&staging);
        write_module_tree(&staging, files, &module).map_err(io)?;
        std::fs::write(staging.join(".complete"), &module.digest).map_err(io)?;
        match std::fs::rename(&staging, &dir) {
            Ok(()) => Ok(module),
            // Another writer finished first; its content is the same by construction.
            Err(_) if dir.join(".complete").exists() => {
                let _ = std::fs::remove_dir_all(&staging);
                Ok(module)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                Err(io(e))
            }
        }
    }

    /// The folder of a digest. The language version is part of its name: a cache written for
    /// another version is not reused.
    fn dir_of(&self, digest: &str) -> PathBuf {
        self.root
            .join("modules")
            .join(format!("{}-cue{CUE_LANGUAGE_VERSION}", digest.replace(':', "-")))
    }

    /// A module written before (by this process or an earlier one), by its digest: what
    /// rollbacks, pins and instances staying on an earlier version render with.
    pub fn find(&self, digest: &str, platform: &str) -> Option<Module> {
        // A digest from an annotation is a user's input: it names a folder only when it is one.
        if !is_digest(digest) {
            return None;
        }
        let dir = self.dir_of(digest);
        if std::fs::read_to_string(dir.join(".complete")).ok()? != digest {
            return None;
        }
        let schema = std::fs::read_to_string(dir.join("schema/schema.cue")).ok()?;
        let import = format!("\"{MODULE_PATH}/platform:");
        let start = schema.find(&import)? + import.len();
        let package = schema[start..].split('"').next()?.to_string();
        // The platform's own files tell: the generated packages for versions are written
        // when the schema is extracted, which may not have happened yet.
        let has_versions = dir_defines(&dir.join("platform"), "#Versions");
        Some(Module {
            digest: digest.to_string(),
            package,
            platform: platform.to_string(),
            // The meta package also holds the versions' flags, with or without #Metadata.
            has_metadata: dir.join("meta/meta.cue").is_file(),
            has_status: schema.contains("#Status:"),
            has_versions,
            has_settings: dir.join("settingscheck/settingscheck.cue").is_file(),
            dir,
        })
    }

    /// A fresh scratch folder inside `module`'s folder, for one batch file.
    pub fn scratch_dir(&self, module: &Module) -> Result<PathBuf, ModuleError> {
        let dir = module.dir.join(format!(
            "batch-{}-{}",
            std::process::id(),
            SCRATCH.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| ModuleError::Io {
            message: format!("{}: {e}", dir.display()),
        })?;
        Ok(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_materialized_module_is_found_again_by_its_digest() {
        let root = std::env::temp_dir().join(format!("pequod-find-{}", std::process::id()));
        let store = ModuleStore::new(&root);
        let files = ModuleFiles::new(BTreeMap::from([(
            "m.cue".to_string(),
            "package web\n#Input: {}\n#Status: {url?: string}\n#Metadata: {}\n#Render: {}\n#Versions: {v1: storage: true}\n"
                .to_string(),
        )]))
        .unwrap();
        let written = store.materialize(&files, "web").unwrap();
        assert!(written.has_versions);
        let found = ModuleStore::new(&root).find(&written.digest, "web").unwrap();
        assert_eq!(found, written);
        assert_eq!(store.find("sha256:0000", "web"), None);
        assert_eq!(store.find("../../etc", "web"), None, "only digests name folders");
        assert!(is_digest(&written.digest));
        let _ = std::fs::remove_dir_all(&root);
    }

    fn files(pairs: &[(&str, &str)]) -> ModuleFiles {
        ModuleFiles::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()).unwrap()
    }

    fn settings(pairs: &[(&str, serde_json::Value)]) -> crate::api::Settings {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::from_value(v.clone()).unwrap()))
            .collect()
    }

    #[test]
    fn settings_are_a_file_of_the_module_and_so_of_its_digest() {
        let module =
            ModuleFiles::inline("package web\n#Settings: {provider: *\"aws\" | \"gcp\"}\n#Input: {}\n").unwrap();
        let none = module.clone().with_settings(&settings(&[])).unwrap();
        assert_eq!(none.digest(), module.digest(), "no settings leave the module as it is");
        let gcp = module
            .clone()
            .with_settings(&settings(&[("provider", json!("gcp"))]))
            .unwrap();
        let azure = module
            .clone()
            .with_settings(&settings(&[("provider", json!("azure"))]))
            .unwrap();
        assert_ne!(gcp.digest(), module.digest());
        assert_ne!(gcp.digest(), azure.digest());
        let file = &gcp.files()[SETTINGS_FILE];
        assert!(file.starts_with("package web\n"), "{file}");
        assert!(file.contains("#Settings: {\n  \"provider\": \"gcp\"\n}"), "{file}");

        // A string is a string: an interpolation in a value stays text.
        let sneaky = module
            .clone()
            .with_settings(&settings(&[("provider", json!("\\(#Input)"))]))
            .unwrap();
        assert!(sneaky.files()[SETTINGS_FILE].contains(r#""\\(#Input)""#));

        let undeclared = ModuleFiles::inline("package web\n#Input: {}\n").unwrap();
        let err = undeclared
            .with_settings(&settings(&[("provider", json!("gcp"))]))
            .unwrap_err();
        assert!(err.to_string().contains("declares no #Settings"), "{err}");
        let own = ModuleFiles::new(BTreeMap::from([
            ("a.cue".to_string(), "package web\n#Settings: {}\n".to_string()),
            (SETTINGS_FILE.to_string(), "package web\n".to_string()),
        ]))
        .unwrap();
        assert!(
            own.with_settings(&settings(&[]))
                .unwrap_err()
                .to_string()
                .contains("its own")
        );
    }

    #[test]
    fn dotted_settings_become_nested_fields_and_clashes_are_refused() {
        let tree = settings_tree(&settings(&[
            ("provider", json!("gcp")),
            ("gcp.location", json!("EU")),
            ("gcp.replicas", json!(3)),
        ]))
        .unwrap();
        assert_eq!(
            tree,
            json!({"provider": "gcp", "gcp": {"location": "EU", "replicas": 3}})
        );
        for (pairs, why) in [
            (
                vec![("gcp", json!("x")), ("gcp.location", json!("EU"))],
                "set to a value itself",
            ),
            (vec![("a..b", json!("x"))], "dotted path"),
            (vec![("9lives", json!("x"))], "dotted path"),
            (vec![("a\"}\n#Render: {", json!("x"))], "dotted path"),
            (vec![("a.b.c.d.e.f.g.h.i", json!("x"))], "dotted path"),
        ] {
            let err = settings_tree(&settings(&pairs)).unwrap_err();
            assert!(err.contains(why), "{pairs:?}: {err}");
        }
        let many: Vec<(String, serde_json::Value)> = (0..=crate::api::MAX_SETTINGS)
            .map(|i| (format!("s{i}"), json!(i)))
            .collect();
        let many: Vec<(&str, serde_json::Value)> = many.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        assert!(settings_tree(&settings(&many)).unwrap_err().contains("at most"));
    }

    #[test]
    fn digest_changes_exactly_when_content_does() {
        let a = files(&[("a.cue", "package x\na: 1\n"), ("b.cue", "package x\n")]);
        let same = files(&[("b.cue", "package x\n"), ("a.cue", "package x\na: 1\n")]);
        let edited = files(&[("a.cue", "package x\na: 2\n"), ("b.cue", "package x\n")]);
        let renamed = files(&[("c.cue", "package x\na: 1\n"), ("b.cue", "package x\n")]);
        assert_eq!(a.digest(), same.digest());
        assert_ne!(a.digest(), edited.digest());
        assert_ne!(a.digest(), renamed.digest());
        assert!(a.digest().starts_with("sha256:") && a.digest().len() == 7 + 64);
    }

    #[test]
    fn package_clause_is_found_after_comments() {
        assert_eq!(
            files(&[("a.cue", "// doc\n\npackage web_service\n")])
                .package()
                .unwrap(),
            "web_service"
        );
        assert_eq!(files(&[("a.cue", "a: 1\n")]).package().unwrap(), "platform");
        assert!(matches!(
            files(&[("a.cue", "package a\n"), ("b.cue", "package b\n")]).package(),
            Err(ModuleError::MixedPackages { .. })
        ));
    }

    #[test]
    fn bad_module_contents_are_refused() {
        assert_eq!(ModuleFiles::new(BTreeMap::new()), Err(ModuleError::NoFiles));
        assert!(matches!(
            ModuleFiles::new(BTreeMap::from([("../x.cue".into(), String::new())])),
            Err(ModuleError::InvalidFileName { .. })
        ));
        assert!(matches!(
            ModuleFiles::new(BTreeMap::from([("a.cue".into(), "x".repeat(MAX_MODULE_BYTES + 1))])),
            Err(ModuleError::TooLarge { .. })
        ));
        assert!(matches!(
            ModuleFiles::embedded("nope"),
            Err(ModuleError::UnknownEmbedded { .. })
        ));
        let data = BTreeMap::from([
            ("a.cue".to_string(), "package a".to_string()),
            ("README".to_string(), "x".into()),
        ]);
        assert_eq!(ModuleFiles::from_config_map_data(&data).unwrap().files().len(), 1);
    }

    #[test]
    fn materialize_writes_once_and_wraps_the_package() {
        let root = tempfile::tempdir().unwrap();
        let store = ModuleStore::new(root.path());
        let module_files = files(&[("a.cue", "#Input: {x: int}\n#Metadata: {kind: \"X\"}\n")]);
        let module = store.materialize(&module_files, "test").unwrap();
        assert!(module.has_metadata);
        assert_eq!(module.package, "platform");
        let written = std::fs::read_to_string(module.dir.join("platform/a.cue")).unwrap();
        assert!(written.starts_with("package platform\n"));
        let schema = std::fs::read_to_string(module.dir.join("schema/schema.cue")).unwrap();
        assert!(schema.contains("import p \"pequod.local/module/platform:platform\""));
        // A second materialization reuses the folder.
        std::fs::write(module.dir.join("marker"), "").unwrap();
        assert_eq!(store.materialize(&module_files, "test").unwrap(), module);
        assert!(module.dir.join("marker").exists());
    }

    #[test]
    fn embedded_modules_load() {
        for name in embedded::names() {
            let files = ModuleFiles::embedded(name).unwrap();
            assert_eq!(files.package().unwrap(), name);
            assert!(files.defines("#Input") && files.defines("#Render") && files.defines("#Metadata"));
        }
    }
}
