//! Conversion of instances' specs between the versions of a module's API (`#Versions`), in
//! CUE: every object on its own line of one generated file, so that cue's errors name the
//! object they belong to, and results cached like renders.

use crate::error::ErrorCategory;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use serde_json::Value;

use super::batch::{self, BATCH_FILE, FIRST_INPUT_LINE, input_hash};
use super::module::Module;
use super::renderer::{Inner, Renderer, lock};
use super::versions::{ApiVersion, MAX_LOSSY_PATH_CHARS, MAX_LOSSY_PATHS, PathSegment, parse_path};
use super::{CueError, RenderError};
use crate::canonical::canonical_json;
use crate::lru::Lru;

/// Most differences one round trip reports.
pub const MAX_DIFFERENCES: usize = 20;

/// One object's spec to convert from one version of the module's API to another.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversion {
    pub from: String,
    pub to: String,
    pub spec: Value,
}

/// Why a spec could not be converted. Messages name the field, never the object: the caller
/// adds its namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversionError {
    /// The spec does not fit a version's schema, or a conversion of the module fails on it.
    #[error("{path}: {message}")]
    Field { path: String, message: String },
    /// The module cannot convert between these versions at all.
    #[error("the module cannot convert: {message}")]
    Module { message: String },
    /// cue could not run or finish; the same conversion may succeed later.
    #[error("conversion is unavailable: {message}")]
    Unavailable { message: String },
}

impl ConversionError {
    /// The failure without cue's text or any value of the spec (`spec.port: conversion
    /// failed`): for messages others than the object's owner read.
    pub fn summary(&self) -> String {
        match self {
            Self::Field { path, .. } => format!("{path}: conversion failed"),
            Self::Module { .. } => "the module cannot convert".into(),
            Self::Unavailable { .. } => "conversion is unavailable".into(),
        }
    }
}

impl ErrorCategory for ConversionError {
    fn reason(&self) -> &'static str {
        match self {
            Self::Field { .. } => "ConversionFailed",
            Self::Module { .. } => "InvalidModule",
            Self::Unavailable { .. } => "ConversionUnavailable",
        }
    }

    /// Transient failures are never cached.
    fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

impl From<RenderError> for ConversionError {
    /// A module whose schema cannot be extracted cannot convert either.
    fn from(e: RenderError) -> Self {
        if e.is_transient() {
            Self::Unavailable { message: e.to_string() }
        } else {
            Self::Module { message: e.to_string() }
        }
    }
}

/// The versions a spec passes through, the first its own: every step goes to or from the
/// storage version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Route {
    versions: Vec<String>,
    storage: String,
}

impl Route {
    /// From `from` to `to`, through the storage version when neither is it.
    fn conversion(storage: &str, from: &str, to: &str) -> Self {
        let versions = if from == to {
            vec![from]
        } else if from == storage || to == storage {
            vec![from, to]
        } else {
            vec![from, storage, to]
        };
        Self {
            versions: versions.into_iter().map(str::to_string).collect(),
            storage: storage.to_string(),
        }
    }

    /// From the storage version to `through` and back.
    fn round_trip(storage: &str, through: &str) -> Self {
        Self {
            versions: vec![storage.to_string(), through.to_string(), storage.to_string()],
            storage: storage.to_string(),
        }
    }

    fn is_identity(&self) -> bool {
        self.versions.len() < 2
    }

    /// The key of the result of converting `spec` along the route: its hash is of the very
    /// text cue is given (see [`Route::source`]), so specs sharing a key (`80.0` and `80`)
    /// are one input to cue.
    fn cache_key(&self, digest: &str, spec: &Value) -> String {
        format!("{digest}/{}/{}", self.versions.join(">"), input_hash(spec))
    }

    fn last(&self) -> usize {
        self.versions.len() - 1
    }

    /// The field holding the spec at step `k`: the first and last are exported, so that cue
    /// reports them when incomplete (a missing required field) by their names.
    fn stage(&self, k: usize) -> String {
        match k {
            0 => "given".to_string(),
            k if k == self.last() => "converted".to_string(),
            k => format!("_via{k}"),
        }
    }

    fn schema_of(&self, version: &str) -> String {
        if version == self.storage {
            "p.#Input".to_string()
        } else {
            format!("p.#Versions.{version}.#Input")
        }
    }

    /// The CUE fields converting `spec` along the route; one line. The spec is written in its
    /// canonical text, the one [`input_hash`] hashes: the cache key is then exactly what cue
    /// read.
    fn source(&self, spec: &Value) -> String {
        let mut fields = vec![format!(
            "{}: {} & {}",
            self.stage(0),
            self.schema_of(&self.versions[0]),
            canonical_json(spec)
        )];
        for k in 1..self.versions.len() {
            let (previous, next) = (&self.versions[k - 1], &self.versions[k]);
            let step = if *next == self.storage {
                format!("p.#Versions.{previous}.#ToStorage")
            } else {
                format!("p.#Versions.{next}.#FromStorage")
            };
            fields.push(format!(
                "{}: {} & ({step} & {{in: {}}}).out",
                self.stage(k),
                self.schema_of(next),
                self.stage(k - 1)
            ));
        }
        fields.join(", ")
    }

    /// Which step a field of the generated file is, if it is one.
    fn step_of(&self, field: &str) -> Option<usize> {
        (0..self.versions.len()).find(|k| self.stage(*k) == field)
    }
}

/// The CUE source converting each spec along its route, one per line from
/// [`FIRST_INPUT_LINE`], so that errors are attributed as a render batch's are.
pub(super) fn conversion_source(module: &Module, lines: &[(&Route, &Value)]) -> String {
    let mut source = format!("package batch\n\n{}\n\nresults: {{\n", module.import_line());
    debug_assert_eq!(source.lines().count() + 1, FIRST_INPUT_LINE);
    for (i, (route, spec)) in lines.iter().enumerate() {
        // JSON is CUE; the canonical text, like serde_json's compact form, holds no newline.
        source.push_str(&format!("\t\"{i}\": {{{}}}\n", route.source(spec)));
    }
    source.push_str("}\n");
    source
}

/// Parses cue's output for a batch of `count` conversions.
pub(super) fn parse_conversions(
    stdout: &str,
    count: usize,
) -> Result<Vec<Result<Value, ConversionError>>, ConversionError> {
    let module_error = |message: String| ConversionError::Module { message };
    let value: Value =
        serde_json::from_str(stdout).map_err(|e| module_error(format!("cue printed invalid JSON: {e}")))?;
    let results = value
        .get("results")
        .and_then(Value::as_object)
        .ok_or_else(|| module_error("no results in cue output".into()))?;
    Ok((0..count)
        .map(|i| {
            results
                .get(&i.to_string())
                .and_then(|r| r.get("converted"))
                .cloned()
                .ok_or_else(|| module_error(format!("cue printed no result for object {i}")))
        })
        .collect())
}

/// The error of one object from cue's (cleaned) messages about it: the earliest step's,
/// since later failures follow from it, with the field in `spec` terms.
pub(super) fn field_error(messages: &[String], route: &Route) -> ConversionError {
    let parsed: Vec<(Option<usize>, String, String)> = messages
        .iter()
        .map(|message| {
            let mut lines = message.lines();
            let header = lines.next().unwrap_or_default();
            let positions: Vec<&str> = lines.map(str::trim).filter(|l| !l.is_empty()).collect();
            let (segments, text) = split_header(header).unwrap_or((Vec::new(), header));
            let step = segments.first().and_then(|first| route.step_of(first));
            // A path of no step of the file is cue's inside a definition: it stays in the text.
            let (path, text) = match step {
                Some(_) => (spec_path(&segments[1..]), text),
                None => ("spec".to_string(), header),
            };
            let mut text = text.trim_end_matches(':').trim().to_string();
            if let Some(k) = step.filter(|k| *k > 0) {
                text.push_str(&format!(
                    " after converting {} to {}",
                    route.versions[k - 1],
                    route.versions[k]
                ));
            }
            if !positions.is_empty() {
                text.push_str(&format!(" ({})", positions.join(", ")));
            }
            (step, path, text)
        })
        .collect();
    match parsed.into_iter().min_by_key(|(step, _, _)| step.unwrap_or(usize::MAX)) {
        Some((_, path, message)) => ConversionError::Field { path, message },
        None => ConversionError::Field {
            path: "spec".into(),
            message: "cue failed without a message".into(),
        },
    }
}

/// `given.ports.0.name: conflicting values …` → (["given", "ports", "0", "name"], "conflicting
/// values …"): the path ends at the first `: ` outside quotes.
fn split_header(header: &str) -> Option<(Vec<String>, &str)> {
    let mut segments = Vec::new();
    let mut current = String::new();
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in header.char_indices() {
        if quoted {
            current.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => quoted = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                quoted = true;
                current.push(c);
            }
            '.' => segments.push(std::mem::take(&mut current)),
            ':' if header[i + 1..].starts_with(' ') || i + 1 == header.len() => {
                segments.push(current);
                return Some((segments, &header[i + 1..]));
            }
            c if c.is_whitespace() => return None,
            c => current.push(c),
        }
    }
    None
}

/// `spec` and the segments as the rest of Pequod writes paths: list items as `[2]`.
fn spec_path(segments: &[String]) -> String {
    let mut path = "spec".to_string();
    for segment in segments {
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            path.push_str(&format!("[{segment}]"));
        } else {
            path.push('.');
            path.push_str(segment);
        }
    }
    path
}

/// A version's `lossy` paths, parsed once for every comparison of a round trip.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LossyPaths(Vec<Vec<PathSegment>>);

impl LossyPaths {
    /// The paths that parse, within the bounds extraction enforces (a module breaking them
    /// was refused; one built otherwise has the excess ignored, so fewer losses are allowed).
    pub fn parse(paths: &[String]) -> Self {
        Self(
            paths
                .iter()
                .take(MAX_LOSSY_PATHS)
                .filter(|p| p.chars().count() <= MAX_LOSSY_PATH_CHARS)
                .filter_map(|p| parse_path(p))
                .collect(),
        )
    }
}

/// A comparison that would visit more than [`MAX_COMPARED_VALUES`] values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too large to compare")]
pub struct TooLargeToCompare;

/// Most values one comparison visits (an object, list or scalar at a path of either side
/// counts once): bounds the time of a round-trip check whatever the specs hold.
pub const MAX_COMPARED_VALUES: usize = 100_000;

/// Dotted paths (`spec.port`, `spec.ports[2].name`) where `back`, a spec after a round trip,
/// differs from `original`; nothing at or under a `lossy` path (paths inside spec, where
/// `ports.name` covers every item's name) counts. The first [`MAX_DIFFERENCES`], in order;
/// an error when the specs are too large to compare.
pub fn round_trip_differences(
    original: &Value,
    back: &Value,
    lossy: &LossyPaths,
) -> Result<Vec<String>, TooLargeToCompare> {
    // Every pattern starts unmatched; one covering the whole spec cannot be written.
    let active: Vec<Progress> = (0..lossy.0.len()).map(|p| (p, 0)).collect();
    let mut comparer = Comparer {
        lossy: &lossy.0,
        path: Vec::new(),
        differences: Vec::new(),
        visited: 0,
    };
    comparer.compare(Some(original), Some(back), &active)?;
    Ok(comparer.differences)
}

/// How far one lossy pattern (by index) matches the current path: its segments matched.
type Progress = (usize, usize);

struct Comparer<'a> {
    lossy: &'a [Vec<PathSegment>],
    path: Vec<PathSegment>,
    differences: Vec<String>,
    visited: usize,
}

impl Comparer<'_> {
    /// Compares the values at the current path, which the patterns of `active` partly match
    /// (and none covers).
    fn compare(
        &mut self,
        original: Option<&Value>,
        back: Option<&Value>,
        active: &[Progress],
    ) -> Result<(), TooLargeToCompare> {
        if self.differences.len() >= MAX_DIFFERENCES {
            return Ok(());
        }
        self.visit(1)?;
        match (original, back) {
            (Some(Value::Object(a)), Some(Value::Object(b))) => {
                // Refused before the keys are gathered: there are at least as many to visit.
                self.fits(a.len().max(b.len()))?;
                let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for key in keys {
                    self.child(PathSegment::Field(key.clone()), a.get(key), b.get(key), active)?;
                }
            }
            (Some(Value::Array(a)), Some(Value::Array(b))) => {
                self.fits(a.len().max(b.len()))?;
                for i in 0..a.len().max(b.len()) {
                    self.child(PathSegment::Index(i), a.get(i), b.get(i), active)?;
                }
            }
            (Some(Value::Number(a)), Some(Value::Number(b))) if numbers_equal(a, b) => {}
            (Some(a), Some(b)) if a == b => {}
            _ => self.differences.push(display_path(&self.path)),
        }
        Ok(())
    }

    /// Compares a child of the current path unless a lossy path covers it.
    fn child(
        &mut self,
        segment: PathSegment,
        original: Option<&Value>,
        back: Option<&Value>,
        active: &[Progress],
    ) -> Result<(), TooLargeToCompare> {
        let Some(next) = advance(self.lossy, active, &segment) else {
            // Covered: counted, as its parent promised, but not compared.
            return self.visit(1);
        };
        self.path.push(segment);
        let compared = self.compare(original, back, &next);
        self.path.pop();
        compared
    }

    fn visit(&mut self, values: usize) -> Result<(), TooLargeToCompare> {
        self.visited += values;
        if self.visited > MAX_COMPARED_VALUES {
            return Err(TooLargeToCompare);
        }
        Ok(())
    }

    fn fits(&self, values: usize) -> Result<(), TooLargeToCompare> {
        if self.visited.saturating_add(values) > MAX_COMPARED_VALUES {
            return Err(TooLargeToCompare);
        }
        Ok(())
    }
}

/// The patterns of `active` still matching after the path goes on by `segment`, or `None`
/// when one of them now covers the path (names it or a parent). A field after a list skips
/// the list's index: `ports.name` covers `ports[2].name`.
fn advance(lossy: &[Vec<PathSegment>], active: &[Progress], segment: &PathSegment) -> Option<Vec<Progress>> {
    let mut next = Vec::with_capacity(active.len());
    for &(p, at) in active {
        let Some(pattern) = lossy.get(p) else { continue };
        let moved = match (pattern.get(at), segment) {
            (Some(PathSegment::Field(a)), PathSegment::Field(b)) => (a == b).then_some(at + 1),
            (Some(PathSegment::Field(_)), PathSegment::Index(_)) => Some(at),
            (Some(PathSegment::Index(a)), PathSegment::Index(b)) => (a == b).then_some(at + 1),
            (Some(PathSegment::AnyIndex), PathSegment::Index(_)) => Some(at + 1),
            _ => None,
        };
        match moved {
            Some(at) if at >= pattern.len() => return None,
            Some(at) => next.push((p, at)),
            None => {}
        }
    }
    Some(next)
}

/// 1 and 1.0 are the same number after a trip through cue.
fn numbers_equal(a: &serde_json::Number, b: &serde_json::Number) -> bool {
    match (a.as_i64(), b.as_i64(), a.as_u64(), b.as_u64()) {
        (Some(x), Some(y), _, _) => x == y,
        (_, _, Some(x), Some(y)) => x == y,
        _ => a.as_f64() == b.as_f64(),
    }
}

fn display_path(path: &[PathSegment]) -> String {
    let mut out = "spec".to_string();
    for segment in path {
        match segment {
            PathSegment::Field(name) if name.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '-') => {
                out.push('.');
                out.push_str(name);
            }
            PathSegment::Field(name) => out.push_str(&format!(".{}", Value::from(name.as_str()))),
            PathSegment::Index(i) => out.push_str(&format!("[{i}]")),
            PathSegment::AnyIndex => out.push_str("[]"),
        }
    }
    out
}

type Converted = Result<Value, ConversionError>;

impl Renderer {
    /// Converts each item's spec; one result per item, in order. The same version is the
    /// spec itself; everything else not cached goes through one cue call per `max_conversion_batch`
    /// (the renderer's) distinct conversions.
    pub async fn convert(&self, module: &Module, items: &[Conversion]) -> Vec<Converted> {
        if items.iter().all(|item| item.from == item.to) {
            return items.iter().map(|item| Ok(item.spec.clone())).collect();
        }
        // Boxed: extraction's future is large, and this one is awaited inside bigger ones.
        let routes: Vec<Result<Route, ConversionError>> = match Box::pin(self.schema(module)).await {
            Ok(schema) => items
                .iter()
                .map(|item| plan(&schema.versions, &item.from, &item.to))
                .collect(),
            Err(e) => {
                let error = ConversionError::from(e);
                items
                    .iter()
                    .map(|item| {
                        let identity = Route::conversion(&item.from, &item.from, &item.to);
                        if item.from == item.to {
                            Ok(identity)
                        } else {
                            Err(error.clone())
                        }
                    })
                    .collect()
            }
        };
        let planned: Vec<(Route, &Value)> = routes
            .iter()
            .zip(items)
            .filter_map(|(route, item)| Some((route.as_ref().ok()?.clone(), &item.spec)))
            .collect();
        let mut converted = self.run_routes(module, &planned).await.into_iter();
        routes
            .into_iter()
            .map(|route| match route {
                Ok(_) => converted.next().unwrap_or_else(|| {
                    Err(ConversionError::Module {
                        message: "no result".into(),
                    })
                }),
                Err(e) => Err(e),
            })
            .collect()
    }

    /// Whether each spec, stored in `stored_version`, survives conversion: to the storage
    /// version, from there to every served version and back (differences outside that
    /// version's lossy paths fail), and back to `stored_version` (outside its lossy paths).
    /// Per spec, its failures as messages naming the step, the field and the kind of failure
    /// only (`through v1alpha1: spec.debug differs`, `to v1beta1: spec.port: conversion
    /// failed`), never cue's text or a value: they reach a Transform's status and events,
    /// read by others than the instances' owners. At most 10 per spec, each at most 256
    /// bytes. Two cue calls for the whole set when each step has at most `max_conversion_batch` distinct
    /// conversions: every first step, then every second; the comparisons run on a blocking
    /// thread.
    pub async fn round_trips(
        &self,
        module: &Module,
        versions: &[ApiVersion],
        stored_version: &str,
        specs: &[Value],
    ) -> Vec<Vec<String>> {
        let Some(storage) = versions.iter().find(|v| v.storage).map(|v| v.name.as_str()) else {
            return vec![Vec::new(); specs.len()];
        };
        let Some(stored_at) = versions.iter().position(|v| v.name == stored_version) else {
            let known: Vec<&str> = versions.iter().map(|v| v.name.as_str()).collect();
            let message = format!(
                "stored as {stored_version}, which is not one of the module's versions ({})",
                known.join(", ")
            );
            return vec![vec![crate::naming::truncated(message, MAX_ROUND_TRIP_MESSAGE_BYTES)]; specs.len()];
        };
        let to_storage = Route::conversion(storage, stored_version, storage);
        let first: Vec<(Route, &Value)> = specs.iter().map(|spec| (to_storage.clone(), spec)).collect();
        let in_storage = self.run_routes(module, &first).await;

        // Each version's lossy paths, parsed once for every comparison against them.
        let lossy: Vec<LossyPaths> = versions.iter().map(|v| LossyPaths::parse(&v.lossy)).collect();
        // The second steps, each with the spec it must give back and the paths it may lose.
        let mut second: Vec<(Route, &Value)> = Vec::new();
        let mut checks: Vec<Check> = Vec::new();
        for (i, converted) in in_storage.iter().enumerate() {
            let Ok(spec) = converted else { continue };
            for (v, version) in versions.iter().enumerate().filter(|(_, v)| v.served && !v.storage) {
                second.push((Route::round_trip(storage, &version.name), spec));
                checks.push(Check {
                    spec: i,
                    step: format!("through {}", version.name),
                    against: Against::InStorage,
                    lossy: v,
                });
            }
            if stored_version != storage {
                second.push((Route::conversion(storage, storage, stored_version), spec));
                checks.push(Check {
                    spec: i,
                    step: format!("back to {stored_version}"),
                    against: Against::Stored,
                    lossy: stored_at,
                });
            }
        }
        let back = self.run_routes(module, &second).await;

        let set = RoundTripSet {
            storage: storage.to_string(),
            // Only the checks back to another version compare with the spec as stored.
            stored: if stored_version == storage {
                Vec::new()
            } else {
                specs.to_vec()
            },
            in_storage,
            checks,
            back,
            lossy,
        };
        // Comparing may take a while on large specs: off the async runtime.
        match tokio::task::spawn_blocking(move || set.failures()).await {
            Ok(failures) => failures,
            Err(e) => {
                tracing::warn!(error = %e, "round-trip comparison did not finish");
                vec![vec!["the round trip could not be compared".to_string()]; specs.len()]
            }
        }
    }

    /// Converts each spec along its route: identities at once, cached results from the
    /// cache, every other distinct one in one cue call per `max_conversion_batch` of them.
    async fn run_routes(&self, module: &Module, items: &[(Route, &Value)]) -> Vec<Converted> {
        let mut results: Vec<Option<Converted>> = vec![None; items.len()];
        // Distinct conversions by cache key, with the items waiting for each.
        let mut waiting: BTreeMap<String, (usize, Vec<usize>)> = BTreeMap::new();
        for (i, (route, spec)) in items.iter().enumerate() {
            if route.is_identity() {
                results[i] = Some(Ok((*spec).clone()));
                continue;
            }
            let key = route.cache_key(&module.digest, spec);
            if let Some(hit) = lock(&self.inner.conversions).get(&key) {
                results[i] = Some(hit);
                continue;
            }
            waiting.entry(key).or_insert_with(|| (i, Vec::new())).1.push(i);
        }
        if !waiting.is_empty() {
            let lines: Vec<(&Route, &Value)> = waiting
                .values()
                .map(|(first, _)| (&items[*first].0, items[*first].1))
                .collect();
            // At most max_conversion_batch objects a cue call: one review of thousands of
            // objects makes several calls of bounded size, one after the other.
            let mut converted = Vec::with_capacity(lines.len());
            for chunk in lines.chunks(self.inner.config.max_conversion_batch.max(1)) {
                converted.extend(convert_batch(&self.inner, module, chunk).await);
            }
            for ((key, (_, indexes)), result) in waiting.into_iter().zip(converted) {
                if result.as_ref().err().is_none_or(|e| !e.is_transient()) {
                    let size = match &result {
                        Ok(value) => value.to_string().len(),
                        Err(e) => e.to_string().len(),
                    };
                    lock(&self.inner.conversions).insert(key, result.clone(), size);
                }
                for i in indexes {
                    results[i] = Some(result.clone());
                }
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(ConversionError::Module {
                        message: "no result".into(),
                    })
                })
            })
            .collect()
    }
}

/// What a round trip's result is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Against {
    /// The spec converted to the storage version (a trip through another version and back).
    InStorage,
    /// The spec as stored (after the trip back to the version it is stored in).
    Stored,
}

/// One second step of a round trip and what its result must equal.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Check {
    /// The spec's index.
    spec: usize,
    /// `through v1alpha1`, `back to v1alpha1`.
    step: String,
    against: Against,
    /// The index of the version whose lossy paths apply.
    lossy: usize,
}

/// Everything a round-trip check found in cue, owned so it can be compared on a blocking
/// thread.
#[derive(Debug, Clone, PartialEq)]
struct RoundTripSet {
    storage: String,
    /// The specs as stored; empty when they are stored in the storage version.
    stored: Vec<Value>,
    /// Each spec converted to the storage version.
    in_storage: Vec<Converted>,
    checks: Vec<Check>,
    /// Each check's result.
    back: Vec<Converted>,
    /// The lossy paths of each version, by index.
    lossy: Vec<LossyPaths>,
}

impl RoundTripSet {
    /// Per spec, its failures as messages (`through v1alpha1: spec.debug differs`): see
    /// [`bounded_messages`].
    fn failures(&self) -> Vec<Vec<String>> {
        let storage = &self.storage;
        let mut failures: Vec<Vec<String>> = self
            .in_storage
            .iter()
            .map(|converted| match converted {
                Err(e) => vec![format!("to {storage}: {}", e.summary())],
                Ok(_) => Vec::new(),
            })
            .collect();
        let none = LossyPaths::default();
        for (check, result) in self.checks.iter().zip(&self.back) {
            let expected = match check.against {
                Against::InStorage => self.in_storage.get(check.spec).and_then(|r| r.as_ref().ok()),
                Against::Stored => self.stored.get(check.spec),
            };
            let (Some(expected), Some(failed)) = (expected, failures.get_mut(check.spec)) else {
                continue;
            };
            let step = &check.step;
            let lossy = self.lossy.get(check.lossy).unwrap_or(&none);
            match result
                .as_ref()
                .map(|back| round_trip_differences(expected, back, lossy))
            {
                Err(e) => failed.push(format!("{step}: {}", e.summary())),
                Ok(Err(too_large)) => failed.push(format!("{step}: spec {too_large}")),
                Ok(Ok(paths)) => failed.extend(paths.into_iter().map(|path| format!("{step}: {path} differs"))),
            }
        }
        failures.into_iter().map(bounded_messages).collect()
    }
}

/// Most round-trip failure messages of one spec, before `and N more`.
pub const MAX_ROUND_TRIP_MESSAGES: usize = 10;
/// Most bytes of one round-trip failure message.
pub const MAX_ROUND_TRIP_MESSAGE_BYTES: usize = 256;

/// One spec's round-trip messages, bounded: they go into a Transform's status condition and
/// events, with those of many instances, so each is cut to [`MAX_ROUND_TRIP_MESSAGE_BYTES`]
/// and the first [`MAX_ROUND_TRIP_MESSAGES`] are followed by `and N more`.
fn bounded_messages(messages: Vec<String>) -> Vec<String> {
    let more = messages.len().saturating_sub(MAX_ROUND_TRIP_MESSAGES);
    let mut bounded: Vec<String> = messages
        .into_iter()
        .take(MAX_ROUND_TRIP_MESSAGES)
        .map(|m| crate::naming::truncated(m, MAX_ROUND_TRIP_MESSAGE_BYTES))
        .collect();
    if more > 0 {
        bounded.push(format!("and {more} more"));
    }
    bounded
}

/// The route of one conversion, or why the module cannot take it.
fn plan(versions: &[ApiVersion], from: &str, to: &str) -> Result<Route, ConversionError> {
    let Some(storage) = versions.iter().find(|v| v.storage) else {
        return Err(ConversionError::Module {
            message: format!("the module declares no #Versions, so it has no version {from} or {to}"),
        });
    };
    for name in [from, to] {
        if !versions.iter().any(|v| v.name == name) {
            let known: Vec<&str> = versions.iter().map(|v| v.name.as_str()).collect();
            return Err(ConversionError::Module {
                message: format!("no version {name} (the module's versions: {})", known.join(", ")),
            });
        }
    }
    Ok(Route::conversion(&storage.name, from, to))
}

/// Converts `lines` in as few cue calls as possible: one for all; when cue fails, the objects
/// its errors point at get those errors and the rest run again; a failure that points at no
/// object, a timeout or an oversized output halves the batch (as rendering does).
async fn convert_batch(inner: &Inner, module: &Module, lines: &[(&Route, &Value)]) -> Vec<Converted> {
    let mut results: Vec<Option<Converted>> = vec![None; lines.len()];
    let mut pending: Vec<usize> = (0..lines.len()).collect();
    while !pending.is_empty() {
        let batch: Vec<(&Route, &Value)> = pending.iter().map(|i| lines[*i]).collect();
        // Boxed: reading cue's output takes buffers a caller's stack need not hold.
        match Box::pin(timed_cue_call(inner, module, &batch)).await {
            Ok(Ok(outputs)) => {
                for (k, output) in outputs.into_iter().enumerate() {
                    results[pending[k]] = Some(output);
                }
                pending.clear();
            }
            Ok(Err(e)) => fail_all(&mut pending, &mut results, &e),
            Err(CueError::Failed { message, .. }) => {
                let (per_line, _) = batch::attribute_errors(&message, pending.len());
                if per_line.is_empty() && pending.len() > 1 {
                    split(inner, module, lines, &mut pending, &mut results).await;
                } else if per_line.is_empty() {
                    fail_all(
                        &mut pending,
                        &mut results,
                        &alone(CueError::Failed { code: None, message }),
                    );
                } else {
                    let failed: Vec<usize> = per_line.keys().map(|k| pending[*k]).collect();
                    for (k, messages) in per_line {
                        results[pending[k]] = Some(Err(field_error(&messages, batch[k].0)));
                    }
                    pending.retain(|i| !failed.contains(i));
                }
            }
            Err(CueError::OutputTooLarge { .. } | CueError::Timeout { .. } | CueError::MemoryLimit { .. })
                if pending.len() > 1 =>
            {
                split(inner, module, lines, &mut pending, &mut results).await;
            }
            Err(other) => fail_all(&mut pending, &mut results, &alone(other)),
        }
    }
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(ConversionError::Module {
                    message: "no result".into(),
                })
            })
        })
        .collect()
}

/// What a cue failure other than an evaluation error means for one object on its own.
fn alone(e: CueError) -> ConversionError {
    match e {
        CueError::MemoryLimit { limit_mib } => ConversionError::Field {
            path: "spec".into(),
            message: format!("the conversion needs more memory than cue may use ({limit_mib} MiB)"),
        },
        CueError::OutputTooLarge { limit } => ConversionError::Field {
            path: "spec".into(),
            message: format!("the converted spec exceeds {limit} bytes"),
        },
        CueError::Failed { message, .. } => ConversionError::Field {
            path: "spec".into(),
            message: batch::clean_message(&message)
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("; "),
        },
        other @ (CueError::Spawn { .. } | CueError::Shutdown | CueError::Timeout { .. }) => {
            ConversionError::Unavailable {
                message: other.to_string(),
            }
        }
    }
}

fn fail_all(pending: &mut Vec<usize>, results: &mut [Option<Converted>], error: &ConversionError) {
    for i in pending.drain(..) {
        results[i] = Some(Err(error.clone()));
    }
}

/// Converts the two halves of `pending` on their own and records their results.
async fn split(
    inner: &Inner,
    module: &Module,
    lines: &[(&Route, &Value)],
    pending: &mut Vec<usize>,
    results: &mut [Option<Converted>],
) {
    let second = pending.split_off(pending.len() / 2);
    let first_lines: Vec<(&Route, &Value)> = pending.iter().map(|i| lines[*i]).collect();
    let second_lines: Vec<(&Route, &Value)> = second.iter().map(|i| lines[*i]).collect();
    let first_results = Box::pin(convert_batch(inner, module, &first_lines)).await;
    let second_results = Box::pin(convert_batch(inner, module, &second_lines)).await;
    for (i, r) in pending
        .iter()
        .zip(first_results)
        .chain(second.iter().zip(second_results))
    {
        results[*i] = Some(r);
    }
    pending.clear();
}

/// One cue call, timed: the outer error is cue's, the inner one a problem with its output
/// as a whole.
async fn timed_cue_call(
    inner: &Inner,
    module: &Module,
    lines: &[(&Route, &Value)],
) -> Result<Result<Vec<Converted>, ConversionError>, CueError> {
    let started = Instant::now();
    let outcome = run_cue_call(inner, module, lines).await;
    let took = started.elapsed();
    inner
        .metrics
        .conversion_duration_seconds
        .with_label_values(&[&module.platform])
        .observe(took.as_secs_f64());
    tracing::debug!(
        platform = %module.platform,
        objects = lines.len(),
        duration_ms = took.as_millis() as u64,
        ok = matches!(outcome, Ok(Ok(_))),
        "conversion finished"
    );
    outcome
}

async fn run_cue_call(
    inner: &Inner,
    module: &Module,
    lines: &[(&Route, &Value)],
) -> Result<Result<Vec<Converted>, ConversionError>, CueError> {
    let io = |message: String| ConversionError::Unavailable { message };
    let dir = match inner.store.scratch_dir(module) {
        Ok(dir) => dir,
        Err(e) => return Ok(Err(io(e.to_string()))),
    };
    if let Err(e) = tokio::fs::write(dir.join(BATCH_FILE), conversion_source(module, lines)).await {
        let _ = tokio::fs::remove_dir_all(&dir).await;
        return Ok(Err(io(format!("writing the conversion file: {e}"))));
    }
    let relative = format!("./{}", dir.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
    let outcome = inner
        .cli
        .run(&["export", &relative, "--out", "json"], Some(&module.dir))
        .await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    Ok(parse_conversions(&outcome?, lines.len()))
}

/// Least-recently-used conversion results, bounded by entries and by bytes (the most recent
/// result always stays).
pub(super) struct ConversionCache {
    capacity: usize,
    max_bytes: u64,
    lru: Lru<Converted>,
}

impl ConversionCache {
    pub(super) fn new(capacity: usize, max_bytes: u64) -> Self {
        Self {
            capacity: capacity.max(1),
            max_bytes,
            lru: Lru::default(),
        }
    }

    fn get(&mut self, key: &str) -> Option<Converted> {
        self.lru.get(key).cloned()
    }

    fn insert(&mut self, key: String, result: Converted, size: usize) {
        self.lru.insert(key, result, size as u64);
        while (self.lru.len() > self.capacity || (self.lru.bytes() > self.max_bytes && self.lru.len() > 1))
            && self.lru.pop_oldest().is_some()
        {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn module() -> Module {
        Module {
            digest: "sha256:x".into(),
            package: "web".into(),
            platform: "web".into(),
            dir: "/tmp/x".into(),
            has_metadata: false,
            has_status: false,
            has_versions: true,
            has_settings: false,
        }
    }

    #[test]
    fn routes_go_through_the_storage_version() {
        let versions = |r: Route| r.versions;
        assert_eq!(versions(Route::conversion("v1", "v1", "v1")), ["v1"]);
        assert_eq!(versions(Route::conversion("v1", "v1alpha1", "v1")), ["v1alpha1", "v1"]);
        assert_eq!(versions(Route::conversion("v1", "v1", "v1alpha1")), ["v1", "v1alpha1"]);
        assert_eq!(
            versions(Route::conversion("v1", "v1alpha1", "v1beta1")),
            ["v1alpha1", "v1", "v1beta1"]
        );
        assert_eq!(versions(Route::round_trip("v1", "v1alpha1")), ["v1", "v1alpha1", "v1"]);
    }

    #[test]
    fn each_conversion_is_one_line_of_the_generated_file() {
        let there = Route::conversion("v1beta1", "v1alpha1", "v1beta1");
        let across = Route::conversion("v1beta1", "v1alpha1", "v1alpha2");
        let (a, b) = (json!({"port": "80"}), json!({"port": "81"}));
        let source = conversion_source(&module(), &[(&there, &a), (&across, &b)]);
        let lines: Vec<&str> = source.lines().collect();
        assert_eq!(lines[2], "import p \"pequod.local/module/platform:web\"");
        assert_eq!(
            lines[FIRST_INPUT_LINE - 1],
            "\t\"0\": {given: p.#Versions.v1alpha1.#Input & {\"port\":\"80\"}, converted: p.#Input & (p.#Versions.v1alpha1.#ToStorage & {in: given}).out}"
        );
        assert_eq!(
            lines[FIRST_INPUT_LINE],
            "\t\"1\": {given: p.#Versions.v1alpha1.#Input & {\"port\":\"81\"}, _via1: p.#Input & (p.#Versions.v1alpha1.#ToStorage & {in: given}).out, converted: p.#Versions.v1alpha2.#Input & (p.#Versions.v1alpha2.#FromStorage & {in: _via1}).out}"
        );
        assert_eq!(lines.len(), FIRST_INPUT_LINE + 2);
    }

    #[test]
    fn cue_is_given_the_text_the_cache_key_hashes() {
        // 80.0 and 80 share a key, so cue must read the same text for both: otherwise one
        // spec's result (an int field refusing 80.0) would be cached under the other's key.
        let route = Route::conversion("v1beta1", "v1alpha1", "v1beta1");
        let (float, int) = (json!({"p": 80.0, "b": [1.0, 0.5]}), json!({"b": [1, 0.5], "p": 80}));
        assert_eq!(route.cache_key("d", &float), route.cache_key("d", &int));
        assert_eq!(route.source(&float), route.source(&int));
        assert_eq!(
            conversion_source(&module(), &[(&route, &float)]),
            conversion_source(&module(), &[(&route, &int)])
        );
        assert!(
            route.source(&float).contains(r#"& {"b":[1,0.5],"p":80}"#),
            "{}",
            route.source(&float)
        );
        assert_ne!(route.cache_key("d", &json!({"p": 80.5})), route.cache_key("d", &int));
    }

    #[test]
    fn errors_name_the_field_of_the_earliest_step() {
        let route = Route::conversion("v1beta1", "v1alpha1", "v1");
        let error = field_error(
            &[
                "_via1.listenPort: error in call to strconv.Atoi: non-concrete value string:\n    m.cue:15:63".into(),
                "given.ports.2.name: incomplete value string:\n    m.cue:14:33".into(),
            ],
            &route,
        );
        assert_eq!(
            error,
            ConversionError::Field {
                path: "spec.ports[2].name".into(),
                message: "incomplete value string (m.cue:14:33)".into()
            }
        );
        assert_eq!(
            error.to_string(),
            "spec.ports[2].name: incomplete value string (m.cue:14:33)"
        );
        let later = field_error(
            &["converted.port: invalid value 70000 (out of bound <65536):\n    m.cue:5:48".into()],
            &route,
        );
        assert_eq!(
            later.to_string(),
            "spec.port: invalid value 70000 (out of bound <65536) after converting v1beta1 to v1 (m.cue:5:48)"
        );
        let inside = field_error(&["in.port: conflicting values 8080 and string".into()], &route);
        assert_eq!(inside.to_string(), "spec: in.port: conflicting values 8080 and string");
        let quoted = field_error(&["given.labels.\"a.b: c\": field not allowed".into()], &route);
        assert_eq!(quoted.to_string(), "spec.labels.\"a.b: c\": field not allowed");
        assert_eq!(quoted.reason(), "ConversionFailed");
        assert!(!quoted.is_transient());
    }

    #[test]
    fn output_maps_back_to_objects() {
        let stdout = json!({"results": {"0": {"given": {"port": "1"}, "converted": {"listenPort": 1}}}}).to_string();
        let results = parse_conversions(&stdout, 2).unwrap();
        assert_eq!(results[0], Ok(json!({"listenPort": 1})));
        assert!(
            results[1]
                .as_ref()
                .unwrap_err()
                .to_string()
                .contains("no result for object 1")
        );
        assert!(parse_conversions("{", 1).is_err());
    }

    #[test]
    fn differences_are_dotted_paths_outside_lossy_ones() {
        let original = json!({"image": "nginx", "port": 80, "debug": true, "ports": [{"name": "a", "n": 1}, {"name": "b", "n": 2}], "weird.key": 1});
        let back = json!({"image": "nginx", "port": 80.0, "ports": [{"name": "x", "n": 1}, {"name": "y", "n": 3}, {"name": "z"}], "weird.key": 2});
        let none = LossyPaths::default();
        let lossy = |paths: &[&str]| LossyPaths::parse(&paths.iter().map(|p| p.to_string()).collect::<Vec<_>>());
        assert_eq!(
            round_trip_differences(&original, &back, &none).unwrap(),
            [
                "spec.debug",
                "spec.ports[0].name",
                "spec.ports[1].n",
                "spec.ports[1].name",
                "spec.ports[2]",
                "spec.\"weird.key\""
            ]
        );
        assert_eq!(
            round_trip_differences(
                &original,
                &back,
                &lossy(&["debug", "ports.name", "ports[2]", "weird.key"])
            )
            .unwrap(),
            ["spec.ports[1].n", "spec.\"weird.key\""]
        );
        assert_eq!(
            round_trip_differences(&original, &back, &lossy(&["ports", "debug", "weird"])).unwrap(),
            ["spec.\"weird.key\""]
        );
        assert_eq!(round_trip_differences(&json!(1), &json!("1"), &none).unwrap(), ["spec"]);
        assert!(round_trip_differences(&original, &original, &none).unwrap().is_empty());
        // Indexes: a field skips any number of them, an index matches one.
        let (a, b) = (
            json!({"m": [[{"x": 1, "y": 1}], [{"x": 1}]]}),
            json!({"m": [[{"x": 2, "y": 2}], [{"x": 2}]]}),
        );
        assert_eq!(
            round_trip_differences(&a, &b, &lossy(&["m.x"])).unwrap(),
            ["spec.m[0][0].y"]
        );
        assert_eq!(
            round_trip_differences(&a, &b, &lossy(&["m[1][*]", "m[][0].y"])).unwrap(),
            ["spec.m[0][0].x"]
        );
        assert_eq!(
            round_trip_differences(&a, &b, &lossy(&["m[0].x", "m.y", "x"])).unwrap(),
            ["spec.m[1][0].x"]
        );
    }

    #[test]
    fn comparisons_stop_at_a_bound_on_the_values_they_visit() {
        // The root, the list and its n items: 2 + n values.
        let list = |n: usize| json!({"l": vec![json!(1); n]});
        let fits = list(MAX_COMPARED_VALUES - 2);
        let none = LossyPaths::default();
        assert_eq!(round_trip_differences(&fits, &fits, &none), Ok(Vec::new()));
        let over = list(MAX_COMPARED_VALUES - 1);
        assert_eq!(round_trip_differences(&over, &over, &none), Err(TooLargeToCompare));
        // The bound is known before a large list or object is walked, on either side; a value
        // missing on one side is one difference, not walked.
        assert_eq!(round_trip_differences(&list(0), &over, &none), Err(TooLargeToCompare));
        assert_eq!(
            round_trip_differences(&json!({}), &over, &none),
            Ok(vec!["spec.l".into()])
        );
        let wide: serde_json::Map<String, Value> =
            (0..MAX_COMPARED_VALUES).map(|i| (i.to_string(), json!(i))).collect();
        assert_eq!(
            round_trip_differences(&Value::Object(wide), &json!({}), &none),
            Err(TooLargeToCompare)
        );
        // A lossy value is not walked.
        let lossy = LossyPaths::parse(&["l".into()]);
        assert_eq!(round_trip_differences(&over, &list(3), &lossy), Ok(Vec::new()));
        assert_eq!(TooLargeToCompare.to_string(), "too large to compare");
    }

    #[test]
    fn lossy_paths_are_bounded_when_parsed() {
        let many: Vec<String> = (0..MAX_LOSSY_PATHS + 10).map(|i| format!("f{i}")).collect();
        assert_eq!(LossyPaths::parse(&many).0.len(), MAX_LOSSY_PATHS);
        let long = [
            "a".repeat(MAX_LOSSY_PATH_CHARS + 1),
            "a".repeat(MAX_LOSSY_PATH_CHARS),
            "a..b".into(),
        ];
        assert_eq!(LossyPaths::parse(&long).0.len(), 1);
    }

    #[test]
    fn the_most_lossy_paths_over_a_large_list_are_compared_once_per_value() {
        // Every item is visited once, with each path followed along, not re-parsed and matched
        // from the root at every value.
        let paths: Vec<String> = (0..MAX_LOSSY_PATHS).map(|i| format!("items.f{i}")).collect();
        let lossy = LossyPaths::parse(&paths);
        let items = |v: i64| json!({"items": (0..10_000).map(|i| json!({"f0": v, "n": i})).collect::<Vec<_>>()});
        assert_eq!(round_trip_differences(&items(1), &items(2), &lossy), Ok(Vec::new()));
    }

    #[test]
    fn differences_are_bounded() {
        let original: serde_json::Map<String, Value> = (0..50).map(|i| (format!("f{i:02}"), json!(i))).collect();
        let differences = round_trip_differences(&Value::Object(original), &json!({}), &LossyPaths::default()).unwrap();
        assert_eq!(differences.len(), MAX_DIFFERENCES);
        assert_eq!(differences[0], "spec.f00");
    }

    fn round_trip_set(
        stored: Vec<Value>,
        in_storage: Vec<Converted>,
        checks: Vec<(usize, &str, Against)>,
        back: Vec<Converted>,
    ) -> RoundTripSet {
        RoundTripSet {
            storage: "v1beta1".into(),
            stored,
            in_storage,
            checks: checks
                .into_iter()
                .map(|(spec, step, against)| Check {
                    spec,
                    step: step.into(),
                    against,
                    lossy: 0,
                })
                .collect(),
            back,
            lossy: vec![LossyPaths::parse(&["debug".into()])],
        }
    }

    #[test]
    fn round_trip_messages_name_the_step_and_field_never_cue_s_text_or_values() {
        let cue_text = |path: &str| ConversionError::Field {
            path: path.into(),
            message: "error in call to strconv.Atoi: parsing \"secret-abc\": invalid syntax".into(),
        };
        let set = round_trip_set(
            vec![
                json!({"port": "secret-abc"}),
                json!({"port": "81"}),
                json!({"port": "82", "x": 1}),
            ],
            vec![
                Err(cue_text("spec.port")),
                Ok(json!({"listenPort": 81, "debug": true})),
                Ok(json!({"listenPort": 82})),
            ],
            vec![
                (1, "through v1alpha1", Against::InStorage),
                (1, "back to v1alpha1", Against::Stored),
                (2, "through v1alpha1", Against::InStorage),
                (2, "back to v1alpha1", Against::Stored),
            ],
            vec![
                Ok(json!({"listenPort": 81})),
                Err(cue_text("spec.listenPort")),
                Err(ConversionError::Module {
                    message: "cue printed invalid JSON: secret-abc".into(),
                }),
                Ok(json!({"port": "82"})),
            ],
        );
        assert_eq!(
            set.failures(),
            [
                vec!["to v1beta1: spec.port: conversion failed".to_string()],
                vec!["back to v1alpha1: spec.listenPort: conversion failed".to_string()],
                vec![
                    "through v1alpha1: the module cannot convert".to_string(),
                    "back to v1alpha1: spec.x differs".to_string()
                ],
            ]
        );
        let unavailable = ConversionError::Unavailable {
            message: "cue: secret-abc".into(),
        };
        assert_eq!(unavailable.summary(), "conversion is unavailable");
    }

    #[test]
    fn round_trip_messages_are_bounded_in_number_and_size() {
        let many: serde_json::Map<String, Value> = (0..15).map(|i| (format!("f{i:02}"), json!(i))).collect();
        let long_key = "k".repeat(400);
        let set = round_trip_set(
            Vec::new(),
            vec![Ok(Value::Object(many)), Ok(json!({long_key.clone(): "é".repeat(10)}))],
            vec![
                (0, "through v1alpha1", Against::InStorage),
                (1, "through v1alpha1", Against::InStorage),
            ],
            vec![Ok(json!({})), Ok(json!({}))],
        );
        let failures = set.failures();
        assert_eq!(failures[0].len(), MAX_ROUND_TRIP_MESSAGES + 1);
        assert_eq!(failures[0][0], "through v1alpha1: spec.f00 differs");
        assert_eq!(failures[0][MAX_ROUND_TRIP_MESSAGES], "and 5 more");
        let [long] = &failures[1][..] else {
            panic!("{:?}", failures[1])
        };
        assert_eq!(long.len(), MAX_ROUND_TRIP_MESSAGE_BYTES);
        assert!(
            long.starts_with("through v1alpha1: spec.kkk") && long.ends_with("k…"),
            "{long}"
        );
        // Cut on a character boundary.
        assert_eq!(crate::naming::truncated("aé".repeat(200), 10), "aéaéa…");
        assert_eq!(crate::naming::truncated("aé".repeat(200), 8), "aéa…");
        assert_eq!(crate::naming::truncated("short".into(), 10), "short");
        // A comparison that would take too long is a failure of its own.
        let big = json!({"l": vec![json!(0); MAX_COMPARED_VALUES]});
        let set = round_trip_set(
            Vec::new(),
            vec![Ok(big.clone())],
            vec![(0, "through v1alpha1", Against::InStorage)],
            vec![Ok(big)],
        );
        assert_eq!(set.failures(), [["through v1alpha1: spec too large to compare"]]);
    }

    #[test]
    fn module_failures_are_transient_only_when_cue_could_not_run() {
        let unavailable = ConversionError::from(RenderError::CueUnavailable { message: "gone".into() });
        assert!(unavailable.is_transient());
        assert_eq!(unavailable.reason(), "ConversionUnavailable");
        let invalid = ConversionError::from(RenderError::InvalidModule { message: "bad".into() });
        assert_eq!(invalid.reason(), "InvalidModule");
        assert!(!invalid.is_transient());
        assert!(alone(CueError::Timeout { seconds: 5 }).is_transient());
        assert_eq!(
            alone(CueError::MemoryLimit { limit_mib: 160 }).reason(),
            "ConversionFailed"
        );
    }

    #[test]
    fn the_cache_keeps_the_newest_within_its_bounds() {
        let mut cache = ConversionCache::new(2, 100);
        cache.insert("a".into(), Ok(json!(1)), 10);
        cache.insert("b".into(), Ok(json!(2)), 10);
        assert!(cache.get("a").is_some());
        cache.insert("c".into(), Ok(json!(3)), 10);
        assert!(cache.get("b").is_none() && cache.get("a").is_some());
        cache.insert("big".into(), Ok(json!(4)), 500);
        assert_eq!(cache.get("big"), Some(Ok(json!(4))));
        assert!(cache.get("a").is_none() && cache.get("c").is_none());
    }
}
