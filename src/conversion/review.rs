//! The `apiextensions.k8s.io/v1` ConversionReview: reading the apiserver's request, checking it
//! against the kind served, and building the answer. Pure: no I/O and no logs.
//!
//! Memory is the scarce resource here: anyone who reaches the webhook can send a body, and a
//! JSON value parsed into a `serde_json::Value` takes 10 to 100 times its text. So a body is read
//! in one pass into a typed envelope whose objects stay JSON text (at most [`MAX_OBJECTS`], each
//! at most [`MAX_OBJECT_BYTES`]; past either limit the rest are only counted); each object is
//! then read on its own into its top-level fields, still text; and only the specs that are
//! converted are ever parsed, after the webhook has set aside [`Request::parsed_specs_bound`].

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::cue::conversion::{Conversion, ConversionError};

/// Most bytes of a review's body (the server refuses longer ones before they are read whole).
pub const MAX_REVIEW_BYTES: usize = 32 * 1024 * 1024;
/// Most objects one review may ask to convert.
pub const MAX_OBJECTS: usize = 10_000;
/// Most bytes of one object's JSON: etcd's default request limit (`--max-request-bytes`), so
/// no object the apiserver could store is refused.
pub const MAX_OBJECT_BYTES: usize = 1536 * 1024;
/// Most bytes of a review's uid (the apiserver's are UUIDs) and desired API version (a DNS
/// subdomain and a version).
const MAX_UID_BYTES: usize = 128;
const MAX_API_VERSION_BYTES: usize = 320;
/// Deepest nesting serde_json parses (it refuses 128 levels): a deeper spec is refused unparsed.
const MAX_DEPTH: usize = 127;
/// Most failed objects a Failure message names; the others are counted.
const MAX_NAMED_FAILURES: usize = 5;
/// Most bytes of one object's error in a Failure message.
const MAX_ERROR_BYTES: usize = 512;
/// Most bytes of an object's name in messages and logs (a namespace and a name are far shorter).
const MAX_IDENTITY_BYTES: usize = 320;

const REVIEW_API_VERSION: &str = "apiextensions.k8s.io/v1";
const REVIEW_KIND: &str = "ConversionReview";

/// The kind a conversion webhook converts: its API group, kind and version names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedKind {
    pub group: String,
    pub kind: String,
    pub versions: Vec<String>,
}

impl ServedKind {
    fn describe(&self) -> String {
        format!("{}.{} ({})", self.kind, self.group, self.versions.join(", "))
    }
}

/// A body that cannot be answered with a ConversionReview at all (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    #[error("the body is {bytes} bytes; at most {MAX_REVIEW_BYTES} are read")]
    TooLarge { bytes: usize },
    #[error("the body is not a ConversionReview: {message}")]
    Malformed { message: String },
    #[error("a review of {api_version} {kind} is not an {REVIEW_API_VERSION} {REVIEW_KIND}")]
    NotAReview { api_version: String, kind: String },
    #[error("the ConversionReview has no request")]
    NoRequest,
}

impl ReviewError {
    /// Stable reason, for logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "TooLarge",
            Self::Malformed { .. } => "Malformed",
            Self::NotAReview { .. } => "NotAConversionReview",
            Self::NoRequest => "NoRequest",
        }
    }
}

/// Why a review's objects are not converted at all, found while reading them: the review is
/// answered Failure without anything parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectsError {
    #[error("the review has {count} objects; at most {MAX_OBJECTS} are converted at once")]
    TooMany { count: usize },
    #[error("objects[{index}] is {bytes} bytes of JSON; at most {MAX_OBJECT_BYTES} are converted")]
    TooLarge { index: usize, bytes: usize },
}

impl ObjectsError {
    /// Stable reason, for logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooMany { .. } => "TooManyObjects",
            Self::TooLarge { .. } => "ObjectTooLarge",
        }
    }
}

/// A review's request, as the apiserver sent it, its objects read but their specs not parsed.
#[derive(Debug)]
pub struct Request {
    pub uid: String,
    pub desired_api_version: String,
    pub objects: Vec<Object>,
    /// Set when the objects are over a limit; `objects` is then empty.
    pub refused: Option<ObjectsError>,
}

impl Request {
    /// A bound on the bytes the objects' specs take once parsed (what [`plan`] parses at most).
    pub fn parsed_specs_bound(&self) -> usize {
        self.objects
            .iter()
            .filter_map(|object| object.spec_bound)
            .fold(0, usize::saturating_add)
    }
}

/// One object of a review: its top-level fields as JSON text (the answer replaces only
/// `apiVersion` and `spec`, and passes the rest on as it came), and what checking and naming
/// it takes.
#[derive(Debug)]
pub struct Object {
    fields: BTreeMap<String, Box<RawValue>>,
    api_version: String,
    kind: String,
    namespace: Option<String>,
    name: Option<String>,
    /// [`parsed_size_bound`] of its spec, None without one (or when too deep to parse).
    spec_bound: Option<usize>,
}

/// The names of `metadata`; its other fields are skipped unparsed.
#[derive(Default, Deserialize)]
struct MetadataNames {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

impl Object {
    /// `raw` read on its own. Anything but a JSON object has no fields, and so is of no kind.
    fn read(raw: &RawValue) -> Self {
        let fields: BTreeMap<String, Box<RawValue>> = serde_json::from_str(raw.get()).unwrap_or_default();
        let text = |key: &str| {
            fields
                .get(key)
                .and_then(|value| serde_json::from_str::<String>(value.get()).ok())
                .unwrap_or_default()
        };
        let (api_version, kind) = (text("apiVersion"), text("kind"));
        let names: MetadataNames = fields
            .get("metadata")
            .and_then(|metadata| serde_json::from_str(metadata.get()).ok())
            .unwrap_or_default();
        let spec_bound = Self::spec_of(&fields).and_then(|spec| parsed_size_bound(spec.get()));
        Self {
            fields,
            api_version,
            kind,
            namespace: names.namespace,
            name: names.name,
            spec_bound,
        }
    }

    /// The spec, unless absent or null.
    fn spec_of(fields: &BTreeMap<String, Box<RawValue>>) -> Option<&RawValue> {
        fields
            .get("spec")
            .map(|spec| &**spec)
            .filter(|spec| spec.get() != "null")
    }

    /// How the object is named in messages and logs: `namespace/name`, `name` when
    /// cluster-scoped, else its place (`index`) in the review.
    pub fn identity(&self, index: usize) -> String {
        let identity = match (self.namespace.as_deref(), self.name.as_deref()) {
            (Some(namespace), Some(name)) if !namespace.is_empty() => format!("{namespace}/{name}"),
            (_, Some(name)) => name.to_string(),
            _ => format!("objects[{index}]"),
        };
        truncate(&identity, MAX_IDENTITY_BYTES)
    }
}

/// A bound on the bytes `json` (valid JSON) takes once parsed into a [`Value`], or None when it
/// nests deeper than serde_json parses. It follows how serde_json builds the tree: 32 bytes per
/// value, held in its parent's slot; an array's slots as `Vec` grows them (at least 4, then
/// doubling); a map's B-tree nodes (at most 744 bytes each with the allocator's share, one per
/// map of up to 11 entries, else one more per 5 entries, the fewest a split node keeps);
/// string bytes, at most the text's; and 16 bytes of allocator overhead per allocation. A
/// 1 MiB list of `{"":0}` takes about 100 MiB, of `0` 16 MiB; Kubernetes specs 10 to 20 times
/// their text.
pub fn parsed_size_bound(json: &str) -> Option<usize> {
    let mut bound = PARSED_VALUE + json.len();
    let mut open: Vec<OpenContainer> = Vec::new();
    let (mut in_string, mut escaped) = (false, false);
    for &byte in json.as_bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        if !matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | b',' | b':' | b']' | b'}')
            && let Some(parent) = open.last_mut()
        {
            parent.empty = false;
        }
        match byte {
            b'"' => {
                in_string = true;
                bound += ALLOCATION_OVERHEAD;
            }
            b'[' | b'{' => {
                if open.len() >= MAX_DEPTH {
                    return None;
                }
                open.push(OpenContainer {
                    bracket: byte,
                    separators: 0,
                    empty: true,
                });
            }
            b',' | b':' => {
                if let Some(current) = open.last_mut()
                    && (byte == b',') == (current.bracket == b'[')
                {
                    current.separators += 1;
                }
            }
            b']' | b'}' => bound += open.pop().map_or(0, |closed| closed.parsed_bytes()),
            _ => {}
        }
    }
    Some(bound)
}

/// Bytes of a parsed value, held in its parent's slot.
const PARSED_VALUE: usize = std::mem::size_of::<Value>();
/// The allocator's share of each allocation.
const ALLOCATION_OVERHEAD: usize = 16;
/// Bytes of a map's B-tree node (an internal one, the larger), with the allocator's share.
const MAP_NODE: usize = 728 + ALLOCATION_OVERHEAD;
/// Entries a B-tree node holds, and the fewest a node keeps once split.
const MAP_NODE_ENTRIES: usize = 11;
const SPLIT_NODE_ENTRIES: usize = 5;

/// An array or map being scanned: its bracket, and the commas (array) or colons (map) seen in
/// it.
struct OpenContainer {
    bracket: u8,
    separators: usize,
    empty: bool,
}

impl OpenContainer {
    /// What it allocates parsed, besides what its elements do: an array's slots, a map's nodes.
    fn parsed_bytes(&self) -> usize {
        match (self.bracket, self.empty) {
            (_, true) => 0,
            (b'[', false) => (self.separators + 1).max(4).next_power_of_two() * PARSED_VALUE + ALLOCATION_OVERHEAD,
            (_, false) if self.separators <= MAP_NODE_ENTRIES => MAP_NODE,
            (_, false) => (1 + self.separators.div_ceil(SPLIT_NODE_ENTRIES)) * MAP_NODE,
        }
    }
}

/// A review's objects as sent, each kept as its JSON text until a limit is passed; after that
/// they are only counted, which allocates nothing.
#[derive(Default)]
struct RawObjects {
    kept: Vec<Box<RawValue>>,
    count: usize,
    refused: Option<ObjectsError>,
}

impl<'de> Deserialize<'de> for RawObjects {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(RawObjectsVisitor)
    }
}

struct RawObjectsVisitor;

impl<'de> Visitor<'de> for RawObjectsVisitor {
    type Value = RawObjects;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawObjects, A::Error> {
        let mut objects = RawObjects::default();
        loop {
            if objects.refused.is_some() || objects.count >= MAX_OBJECTS {
                match seq.next_element::<IgnoredAny>()? {
                    Some(_) => objects.count += 1,
                    None => break,
                }
                continue;
            }
            // Borrowed from the body: an object over the limit is never copied.
            let Some(raw) = seq.next_element::<&'de RawValue>()? else {
                break;
            };
            let bytes = raw.get().len();
            if bytes > MAX_OBJECT_BYTES {
                objects.refused = Some(ObjectsError::TooLarge {
                    index: objects.count,
                    bytes,
                });
                objects.kept = Vec::new();
            } else {
                objects.kept.push(raw.to_owned());
            }
            objects.count += 1;
        }
        if objects.count > MAX_OBJECTS {
            objects.refused = Some(ObjectsError::TooMany { count: objects.count });
            objects.kept = Vec::new();
        }
        Ok(objects)
    }
}

/// The review as the body holds it, read in one pass.
#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    request: Option<EnvelopeRequest>,
}

/// The request's fields, optional here so that a body of another kind is told apart first.
#[derive(Deserialize)]
struct EnvelopeRequest {
    #[serde(default)]
    uid: Option<String>,
    #[serde(rename = "desiredAPIVersion", default)]
    desired_api_version: Option<String>,
    #[serde(default)]
    objects: RawObjects,
}

/// The request of a review body; its objects are each read on their own, their specs left
/// unparsed.
pub fn parse(body: &[u8]) -> Result<Request, ReviewError> {
    if body.len() > MAX_REVIEW_BYTES {
        return Err(ReviewError::TooLarge { bytes: body.len() });
    }
    let malformed = |message: String| ReviewError::Malformed { message };
    let review: Envelope = serde_json::from_slice(body).map_err(|e| malformed(e.to_string()))?;
    if review.api_version != REVIEW_API_VERSION || review.kind != REVIEW_KIND {
        return Err(ReviewError::NotAReview {
            api_version: truncate(&review.api_version, MAX_API_VERSION_BYTES),
            kind: truncate(&review.kind, MAX_API_VERSION_BYTES),
        });
    }
    let request = review.request.ok_or(ReviewError::NoRequest)?;
    let uid = request
        .uid
        .ok_or_else(|| malformed("request: missing field `uid`".into()))?;
    let desired_api_version = request
        .desired_api_version
        .ok_or_else(|| malformed("request: missing field `desiredAPIVersion`".into()))?;
    if uid.len() > MAX_UID_BYTES || desired_api_version.len() > MAX_API_VERSION_BYTES {
        return Err(malformed(format!(
            "request: the uid has at most {MAX_UID_BYTES} bytes, desiredAPIVersion at most {MAX_API_VERSION_BYTES}"
        )));
    }
    // Each object is read, and its text freed, before the next.
    let objects = request.objects.kept.into_iter().map(|raw| Object::read(&raw)).collect();
    Ok(Request {
        uid,
        desired_api_version,
        objects,
        refused: request.objects.refused,
    })
}

/// What converting a review's objects takes.
#[derive(Debug)]
pub struct Plan {
    /// The specs to convert, in the order of their objects.
    pub conversions: Vec<Conversion>,
    /// Per object: the index of its conversion, or None when it keeps its spec (it is at the
    /// desired version already, or has none).
    sources: Vec<Option<usize>>,
}

/// The conversions `request` asks for, or a Failure message: its objects are over a limit,
/// the desired version is not one of `kind`'s, or an object is not of `kind`. Only the specs
/// converted are parsed, each on its own.
pub fn plan(request: &Request, kind: &ServedKind) -> Result<Plan, String> {
    if let Some(refused) = &request.refused {
        return Err(refused.to_string());
    }
    let desired = version_of(&request.desired_api_version, kind).ok_or_else(|| {
        format!(
            "desiredAPIVersion {} is not a version of {}",
            request.desired_api_version,
            kind.describe()
        )
    })?;
    let mut failures = Failures::default();
    let mut plan = Plan {
        conversions: Vec::new(),
        sources: Vec::with_capacity(request.objects.len()),
    };
    for (index, object) in request.objects.iter().enumerate() {
        let Some(from) = version_of(&object.api_version, kind).filter(|_| object.kind == kind.kind) else {
            let found = format!("{} {}", object.api_version, object.kind);
            failures.add(object.identity(index), &format!("{found} is not {}", kind.describe()));
            continue;
        };
        match Object::spec_of(&object.fields) {
            Some(spec) if from != desired => {
                let parsed = match object.spec_bound {
                    Some(_) => serde_json::from_str(spec.get()).map_err(|e| format!("spec: {e}")),
                    None => Err(format!("spec: nested deeper than {MAX_DEPTH} levels")),
                };
                match parsed {
                    Ok(spec) => {
                        plan.sources.push(Some(plan.conversions.len()));
                        plan.conversions.push(Conversion {
                            from: from.to_string(),
                            to: desired.to_string(),
                            spec,
                        });
                    }
                    Err(message) => failures.add(object.identity(index), &message),
                }
            }
            _ => plan.sources.push(None),
        }
    }
    match failures.message() {
        Some(message) => Err(message),
        None => Ok(plan),
    }
}

/// The version of `api_version` (`group/version`) when it is one of `kind`'s.
fn version_of<'a>(api_version: &'a str, kind: &ServedKind) -> Option<&'a str> {
    let (group, version) = api_version.rsplit_once('/')?;
    (group == kind.group && kind.versions.iter().any(|v| v == version)).then_some(version)
}

/// The objects that failed, the first few with their error.
#[derive(Debug, Default)]
struct Failures {
    named: Vec<(String, String)>,
    others: usize,
}

impl Failures {
    fn add(&mut self, object: String, error: &str) {
        if self.named.len() < MAX_NAMED_FAILURES {
            self.named.push((object, truncate(error, MAX_ERROR_BYTES)));
        } else {
            self.others += 1;
        }
    }

    fn names(&self) -> Vec<String> {
        self.named.iter().map(|(object, _)| object.clone()).collect()
    }

    /// `ns/a: error; ns/b: error; and 3 more objects`, or None when nothing failed.
    fn message(&self) -> Option<String> {
        if self.named.is_empty() {
            return None;
        }
        let mut parts: Vec<String> = self
            .named
            .iter()
            .map(|(object, error)| format!("{object}: {error}"))
            .collect();
        if self.others > 0 {
            parts.push(format!("and {} more objects", self.others));
        }
        Some(parts.join("; "))
    }
}

/// `text` cut to at most `max` bytes, on a character boundary, marked when cut.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// How a review ended, for metrics and logs (which name objects, never their contents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success {
        objects: usize,
    },
    /// The objects named in the message, if the failure was theirs.
    Failure {
        objects: Vec<String>,
    },
}

/// The ConversionReview sent back.
#[derive(Debug, Serialize)]
pub struct ReviewResponse {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    kind: &'static str,
    response: ResponseBody,
}

#[derive(Debug, Serialize)]
struct ResponseBody {
    uid: String,
    #[serde(rename = "convertedObjects")]
    converted_objects: Vec<BTreeMap<String, Box<RawValue>>>,
    result: ResultStatus,
}

#[derive(Debug, Serialize)]
struct ResultStatus {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

/// A review to send back and how it ended.
#[derive(Debug)]
pub struct Answer {
    pub review: ReviewResponse,
    pub outcome: Outcome,
    /// About the bytes of the review encoded, so that its buffer is allocated once.
    pub encoded_bytes: usize,
}

/// The answer to `request` once `plan`'s conversions gave `converted` (one result each, in
/// order): every object at the desired version with its spec converted, metadata and status
/// untouched; or, when any conversion failed, Failure naming the first objects that did.
pub fn answer(request: Request, plan: &Plan, converted: Vec<Result<Value, ConversionError>>) -> Answer {
    if converted.len() != plan.conversions.len() {
        let message = format!(
            "the conversion gave {} results for {} specs",
            converted.len(),
            plan.conversions.len()
        );
        return failure(&request.uid, &message, Vec::new());
    }
    let mut failures = Failures::default();
    for (index, source) in plan.sources.iter().enumerate() {
        if let (Some(Err(error)), Some(object)) = (source.map(|i| &converted[i]), request.objects.get(index)) {
            failures.add(object.identity(index), &error.to_string());
        }
    }
    if let Some(message) = failures.message() {
        return failure(&request.uid, &message, failures.names());
    }
    match converted_objects(request.objects, &request.desired_api_version, &plan.sources, converted) {
        Ok(objects) => {
            let count = objects.len();
            let encoded_bytes = 256
                + objects
                    .iter()
                    .flat_map(|fields| fields.iter())
                    .map(|(key, value)| key.len() + value.get().len() + 4)
                    .sum::<usize>();
            Answer {
                review: review(request.uid, objects, None),
                outcome: Outcome::Success { objects: count },
                encoded_bytes,
            }
        }
        Err(e) => failure(
            &request.uid,
            &format!("encoding the converted objects: {e}"),
            Vec::new(),
        ),
    }
}

/// `objects` at `desired`, each with its converted spec if it has one (`sources`).
fn converted_objects(
    objects: Vec<Object>,
    desired: &str,
    sources: &[Option<usize>],
    converted: Vec<Result<Value, ConversionError>>,
) -> Result<Vec<BTreeMap<String, Box<RawValue>>>, serde_json::Error> {
    let mut specs: Vec<Option<Value>> = converted.into_iter().map(Result::ok).collect();
    let api_version = serde_json::value::to_raw_value(desired)?;
    objects
        .into_iter()
        .zip(sources)
        .map(|(object, source)| {
            let mut fields = object.fields;
            fields.insert("apiVersion".to_string(), api_version.clone());
            if let Some(spec) = source.and_then(|i| specs.get_mut(i)).and_then(Option::take) {
                fields.insert("spec".to_string(), serde_json::value::to_raw_value(&spec)?);
            }
            Ok(fields)
        })
        .collect()
}

/// A Failure answer to the review `uid` with `message`; `objects` names the objects it is about.
pub fn failure(uid: &str, message: &str, objects: Vec<String>) -> Answer {
    Answer {
        review: review(uid.to_string(), Vec::new(), Some(message.to_string())),
        outcome: Outcome::Failure { objects },
        encoded_bytes: 256 + uid.len() + message.len(),
    }
}

fn review(
    uid: String,
    converted_objects: Vec<BTreeMap<String, Box<RawValue>>>,
    failure: Option<String>,
) -> ReviewResponse {
    let status = if failure.is_some() { "Failure" } else { "Success" };
    ReviewResponse {
        api_version: REVIEW_API_VERSION,
        kind: REVIEW_KIND,
        response: ResponseBody {
            uid,
            converted_objects,
            result: ResultStatus {
                status,
                message: failure,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kind() -> ServedKind {
        ServedKind {
            group: "pequod.io".into(),
            kind: "WebService".into(),
            versions: vec!["v1beta1".into(), "v1alpha1".into()],
        }
    }

    fn object(version: &str, name: &str, spec: Value) -> Value {
        json!({
            "apiVersion": format!("pequod.io/{version}"),
            "kind": "WebService",
            "metadata": {"name": name, "namespace": "team", "labels": {"a": "b"}, "resourceVersion": "7"},
            "spec": spec,
            "status": {"phase": "Ready"},
        })
    }

    fn body(desired: &str, objects: Vec<Value>) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "ConversionReview",
            "request": {"uid": "u-1", "desiredAPIVersion": desired, "objects": objects},
        }))
        .unwrap()
    }

    /// A review body whose `objects` list is `objects`, as JSON text.
    fn body_with_objects_text(objects: &str) -> Vec<u8> {
        format!(
            r#"{{"apiVersion":"apiextensions.k8s.io/v1","kind":"ConversionReview","request":{{"uid":"u-1","desiredAPIVersion":"pequod.io/v1beta1","objects":{objects}}}}}"#
        )
        .into_bytes()
    }

    fn request(desired: &str, objects: Vec<Value>) -> Request {
        parse(&body(desired, objects)).unwrap()
    }

    fn encoded(answer: &Answer) -> Value {
        serde_json::to_value(&answer.review).unwrap()
    }

    #[test]
    fn a_review_is_parsed_and_anything_else_refused() {
        let parsed = request(
            "pequod.io/v1beta1",
            vec![object("v1alpha1", "a", json!({"port": "80"}))],
        );
        assert_eq!(parsed.uid, "u-1");
        assert_eq!(parsed.desired_api_version, "pequod.io/v1beta1");
        assert_eq!(parsed.objects.len(), 1);
        assert_eq!(parsed.refused, None);

        assert!(matches!(parse(b"{not json"), Err(ReviewError::Malformed { .. })));
        let admission = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}"#;
        assert!(matches!(parse(admission), Err(ReviewError::NotAReview { .. })));
        let empty = br#"{"apiVersion":"apiextensions.k8s.io/v1","kind":"ConversionReview"}"#;
        assert_eq!(parse(empty).unwrap_err(), ReviewError::NoRequest);
        let no_uid = br#"{"apiVersion":"apiextensions.k8s.io/v1","kind":"ConversionReview","request":{}}"#;
        assert!(matches!(parse(no_uid), Err(ReviewError::Malformed { .. })));
        let long_uid = format!(
            r#"{{"apiVersion":"apiextensions.k8s.io/v1","kind":"ConversionReview","request":{{"uid":"{}","desiredAPIVersion":"v1"}}}}"#,
            "u".repeat(MAX_UID_BYTES + 1)
        );
        assert!(matches!(parse(long_uid.as_bytes()), Err(ReviewError::Malformed { .. })));
        let huge = vec![b' '; MAX_REVIEW_BYTES + 1];
        assert_eq!(
            parse(&huge).unwrap_err(),
            ReviewError::TooLarge {
                bytes: MAX_REVIEW_BYTES + 1
            }
        );
    }

    #[test]
    fn too_many_objects_are_counted_not_kept_and_fail_the_review() {
        let zeros = format!("[{}]", vec!["0"; MAX_OBJECTS + 1].join(","));
        let request = parse(&body_with_objects_text(&zeros)).unwrap();
        assert_eq!(request.refused, Some(ObjectsError::TooMany { count: MAX_OBJECTS + 1 }));
        assert!(request.objects.is_empty(), "nothing is kept past the limit");
        assert_eq!(request.parsed_specs_bound(), 0);
        assert!(plan(&request, &kind()).unwrap_err().contains("at most 10000"));

        let at_the_limit = format!("[{}]", vec!["0"; MAX_OBJECTS].join(","));
        let request = parse(&body_with_objects_text(&at_the_limit)).unwrap();
        assert_eq!((request.refused, request.objects.len()), (None, MAX_OBJECTS));
    }

    #[test]
    fn an_object_over_the_size_limit_fails_the_review_before_anything_is_parsed() {
        let small = object("v1alpha1", "a", json!({"port": "80"})).to_string();
        let large = object("v1alpha1", "b", json!({"port": "x".repeat(MAX_OBJECT_BYTES)})).to_string();
        let request = parse(&body_with_objects_text(&format!("[{small},{large},{small}]"))).unwrap();
        assert_eq!(
            request.refused,
            Some(ObjectsError::TooLarge {
                index: 1,
                bytes: large.len()
            })
        );
        assert!(request.objects.is_empty(), "no object is kept once one is refused");
        assert_eq!(
            plan(&request, &kind()).unwrap_err(),
            format!(
                "objects[1] is {} bytes of JSON; at most {MAX_OBJECT_BYTES} are converted",
                large.len()
            )
        );
    }

    #[test]
    fn only_the_specs_converted_are_parsed_and_everything_else_passes_as_sent() {
        // serde_json parses nothing nested deeper than 128 levels: a status that deep would
        // fail the whole object if it were parsed.
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let status = format!(r#"{{"deep": {deep},  "b": 1, "a": 2}}"#);
        let object_text = |name: &str, spec: &str| {
            format!(
                r#"{{"apiVersion":"pequod.io/v1alpha1","kind":"WebService","metadata":{{"name":"{name}","namespace":"team"}},"spec":{spec},"status":{status}}}"#
            )
        };
        let objects = format!(
            "[{},{}]",
            object_text("a", r#"{"port":"80"}"#),
            object_text("b", "null")
        );
        let request = parse(&body_with_objects_text(&objects)).unwrap();
        let plan = plan(&request, &kind()).unwrap();
        assert_eq!(plan.conversions.len(), 1, "b has no spec to parse");
        assert_eq!(plan.conversions[0].spec, json!({"port": "80"}));
        let answer = answer(request, &plan, vec![Ok(json!({"listenPort": 80}))]);
        let text = serde_json::to_string(&answer.review).unwrap();
        assert_eq!(
            text.matches(&format!(r#""status":{status}"#)).count(),
            2,
            "the status is passed on byte for byte: {text}"
        );
        let review: Value = serde_json::from_str(&text.replace(&deep, "0")).unwrap();
        let converted = &review["response"]["convertedObjects"];
        assert_eq!(converted[0]["spec"], json!({"listenPort": 80}));
        assert_eq!(converted[0]["apiVersion"], "pequod.io/v1beta1");
        assert_eq!(converted[1]["spec"], Value::Null);
        assert!(
            answer.encoded_bytes >= text.len(),
            "{} < {}",
            answer.encoded_bytes,
            text.len()
        );

        // A spec nested too deep to parse fails its object, unparsed.
        let objects = format!("[{}]", object_text("c", &deep));
        let request = parse(&body_with_objects_text(&objects)).unwrap();
        assert_eq!(
            super::plan(&request, &kind()).unwrap_err(),
            "team/c: spec: nested deeper than 127 levels"
        );
    }

    #[test]
    fn the_parsed_size_bound_follows_how_serde_json_builds_values() {
        // A value, its string's allocation and bytes.
        assert_eq!(parsed_size_bound(r#""ab""#), Some(32 + 4 + 16));
        // Empty containers allocate nothing; a list of one holds 4 slots.
        assert_eq!(parsed_size_bound("[]"), Some(32 + 2));
        assert_eq!(parsed_size_bound("[0]"), Some(32 + 3 + 4 * 32 + 16));
        assert_eq!(parsed_size_bound("[0,0,0,0,0]"), Some(32 + 11 + 8 * 32 + 16));
        // A map of up to 11 entries is one node; commas in strings are no separators.
        assert_eq!(parsed_size_bound(r#"{",":0}"#), Some(32 + 7 + 16 + 744));
        // What the webhook must expect of 1 MiB of text.
        let list = |item: &str| format!("[{}]", vec![item; (1 << 20) / (item.len() + 1)].join(","));
        let ratio = |json: &str| parsed_size_bound(json).unwrap() / json.len();
        assert!(ratio(&list(r#"{"":0}"#)) >= 100, "serde_json takes 98 bytes per byte");
        assert!(ratio(&list("0")) >= 16, "serde_json takes 16 bytes per byte");
        assert!(ratio(&list("[0]")) >= 40, "serde_json takes 40 bytes per byte");
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(serde_json::from_str::<Value>(&nested(MAX_DEPTH)).is_ok());
        assert!(serde_json::from_str::<Value>(&nested(MAX_DEPTH + 1)).is_err());
        assert!(parsed_size_bound(&nested(MAX_DEPTH)).is_some());
        assert_eq!(parsed_size_bound(&nested(MAX_DEPTH + 1)), None);
    }

    #[test]
    fn the_specs_bound_counts_every_spec() {
        let request = request(
            "pequod.io/v1beta1",
            vec![
                object("v1alpha1", "a", json!({"port": "80"})),
                object("v1alpha1", "b", Value::Null),
                object("v1beta1", "c", json!([1])),
            ],
        );
        let expected = parsed_size_bound(r#"{"port":"80"}"#).unwrap() + parsed_size_bound("[1]").unwrap();
        assert_eq!(request.parsed_specs_bound(), expected);
    }

    #[test]
    fn only_objects_at_another_version_with_a_spec_are_converted() {
        let request = request(
            "pequod.io/v1beta1",
            vec![
                object("v1alpha1", "a", json!({"port": "80"})),
                object("v1beta1", "b", json!({"listenPort": 81})),
                json!({"apiVersion": "pequod.io/v1alpha1", "kind": "WebService", "metadata": {"name": "c"}}),
                object("v1alpha1", "d", json!({"port": "82"})),
            ],
        );
        let plan = plan(&request, &kind()).unwrap();
        let converted: Vec<(&str, &str, &Value)> = plan
            .conversions
            .iter()
            .map(|c| (c.from.as_str(), c.to.as_str(), &c.spec))
            .collect();
        assert_eq!(
            converted,
            [
                ("v1alpha1", "v1beta1", &json!({"port": "80"})),
                ("v1alpha1", "v1beta1", &json!({"port": "82"}))
            ]
        );
        assert_eq!(plan.sources, [Some(0), None, None, Some(1)]);
    }

    #[test]
    fn the_desired_version_and_every_object_must_be_of_the_kind() {
        let wrong_version = request("pequod.io/v2", vec![object("v1alpha1", "a", json!({}))]);
        let message = plan(&wrong_version, &kind()).unwrap_err();
        assert_eq!(
            message,
            "desiredAPIVersion pequod.io/v2 is not a version of WebService.pequod.io (v1beta1, v1alpha1)"
        );
        let wrong_group = request("other.io/v1beta1", vec![]);
        assert!(plan(&wrong_group, &kind()).is_err());

        let mut stranger = object("v1alpha1", "b", json!({}));
        stranger["kind"] = json!("Database");
        let mut unknown_version = object("v1", "c", json!({}));
        unknown_version["metadata"]["namespace"] = json!("other");
        let mixed = request(
            "pequod.io/v1beta1",
            vec![object("v1alpha1", "a", json!({})), stranger, unknown_version, json!(0)],
        );
        assert_eq!(
            plan(&mixed, &kind()).unwrap_err(),
            "team/b: pequod.io/v1alpha1 Database is not WebService.pequod.io (v1beta1, v1alpha1); \
             other/c: pequod.io/v1 WebService is not WebService.pequod.io (v1beta1, v1alpha1); \
             objects[3]:   is not WebService.pequod.io (v1beta1, v1alpha1)"
        );
    }

    #[test]
    fn success_sets_the_desired_version_and_spec_and_keeps_the_rest() {
        let original = object("v1alpha1", "a", json!({"port": "80"}));
        let request = request(
            "pequod.io/v1beta1",
            vec![original.clone(), object("v1beta1", "b", json!({"listenPort": 81}))],
        );
        let plan = plan(&request, &kind()).unwrap();
        let answer = answer(request, &plan, vec![Ok(json!({"listenPort": 80}))]);
        assert_eq!(answer.outcome, Outcome::Success { objects: 2 });
        let review = encoded(&answer);
        let response = &review["response"];
        assert_eq!(review["apiVersion"], "apiextensions.k8s.io/v1");
        assert_eq!(review["kind"], "ConversionReview");
        assert_eq!(response["uid"], "u-1");
        assert_eq!(response["result"], json!({"status": "Success"}));
        let converted = response["convertedObjects"].as_array().unwrap();
        assert_eq!(converted.len(), 2);
        assert_eq!(converted[0]["apiVersion"], "pequod.io/v1beta1");
        assert_eq!(converted[0]["spec"], json!({"listenPort": 80}));
        assert_eq!(converted[0]["metadata"], original["metadata"], "metadata untouched");
        assert_eq!(converted[0]["status"], original["status"], "status untouched");
        assert_eq!(converted[0]["kind"], "WebService");
        assert_eq!(converted[1]["apiVersion"], "pequod.io/v1beta1");
        assert_eq!(
            converted[1]["spec"],
            json!({"listenPort": 81}),
            "already there: unchanged"
        );
    }

    #[test]
    fn any_failed_conversion_fails_the_review_naming_the_first_objects() {
        let objects: Vec<Value> = (0..8)
            .map(|i| object("v1alpha1", &format!("o{i}"), json!({"port": "x"})))
            .collect();
        let request = request("pequod.io/v1beta1", objects);
        let plan = plan(&request, &kind()).unwrap();
        let results: Vec<Result<Value, ConversionError>> = (0..8)
            .map(|i| {
                if i == 0 {
                    Ok(json!({}))
                } else {
                    Err(ConversionError::Field {
                        path: "spec.port".into(),
                        message: "not an integer".into(),
                    })
                }
            })
            .collect();
        let answer = answer(request, &plan, results);
        let review = encoded(&answer);
        let response = &review["response"];
        assert_eq!(response["uid"], "u-1");
        assert_eq!(response["result"]["status"], "Failure");
        assert_eq!(response["convertedObjects"], json!([]));
        assert_eq!(
            response["result"]["message"],
            "team/o1: spec.port: not an integer; team/o2: spec.port: not an integer; \
             team/o3: spec.port: not an integer; team/o4: spec.port: not an integer; \
             team/o5: spec.port: not an integer; and 2 more objects"
        );
        assert_eq!(
            answer.outcome,
            Outcome::Failure {
                objects: (1..=5).map(|i| format!("team/o{i}")).collect()
            }
        );
    }

    #[test]
    fn failure_messages_are_bounded() {
        let request = request("pequod.io/v1beta1", vec![object("v1alpha1", "a", json!({}))]);
        let plan = plan(&request, &kind()).unwrap();
        let long = ConversionError::Module {
            message: "é".repeat(2000),
        };
        let answer = answer(request, &plan, vec![Err(long)]);
        let review = encoded(&answer);
        let message = review["response"]["result"]["message"].as_str().unwrap();
        assert!(
            message.len() <= "team/a: ".len() + MAX_ERROR_BYTES + 3,
            "{}",
            message.len()
        );
        assert!(message.ends_with("..."));
    }

    #[test]
    fn a_converter_that_answers_for_other_specs_fails_the_review() {
        let request = request("pequod.io/v1beta1", vec![object("v1alpha1", "a", json!({}))]);
        let plan = plan(&request, &kind()).unwrap();
        let answer = answer(request, &plan, Vec::new());
        assert_eq!(encoded(&answer)["response"]["result"]["status"], "Failure");
    }

    #[test]
    fn objects_are_named_by_namespace_and_name_or_place() {
        let read = |object: Value| Object::read(&serde_json::value::to_raw_value(&object).unwrap());
        assert_eq!(read(object("v1", "a", json!({}))).identity(0), "team/a");
        assert_eq!(read(json!({"metadata": {"name": "global"}})).identity(3), "global");
        assert_eq!(read(json!({})).identity(3), "objects[3]");
        assert_eq!(read(json!([1])).identity(4), "objects[4]");
        let long = read(json!({"metadata": {"name": "n".repeat(1000)}})).identity(0);
        assert_eq!(long.len(), MAX_IDENTITY_BYTES + 3);
    }
}
