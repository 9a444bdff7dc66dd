//! The `apiextensions.k8s.io/v1` ConversionReview: reading the apiserver's request, checking it
//! against the kind served, and building the answer. Pure: no I/O and no logs.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::cue::conversion::{Conversion, ConversionError};

/// Most bytes of a review's body (the server refuses longer ones before they are read whole).
pub const MAX_REVIEW_BYTES: usize = 32 * 1024 * 1024;
/// Most objects one review may ask to convert.
pub const MAX_OBJECTS: usize = 10_000;
/// Most failed objects a Failure message names; the others are counted.
const MAX_NAMED_FAILURES: usize = 5;
/// Most bytes of one object's error in a Failure message.
const MAX_ERROR_BYTES: usize = 512;

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

/// A review's request, as the apiserver sent it.
#[derive(Debug, Deserialize)]
pub struct Request {
    pub uid: String,
    #[serde(rename = "desiredAPIVersion")]
    pub desired_api_version: String,
    #[serde(default)]
    pub objects: Vec<Value>,
}

#[derive(Deserialize)]
struct Review {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    /// Read once the envelope is known to be a ConversionReview's.
    request: Option<Value>,
}

/// The request of a review body.
pub fn parse(body: &[u8]) -> Result<Request, ReviewError> {
    if body.len() > MAX_REVIEW_BYTES {
        return Err(ReviewError::TooLarge { bytes: body.len() });
    }
    let review: Review = serde_json::from_slice(body).map_err(|e| ReviewError::Malformed { message: e.to_string() })?;
    if review.api_version != REVIEW_API_VERSION || review.kind != REVIEW_KIND {
        return Err(ReviewError::NotAReview {
            api_version: review.api_version,
            kind: review.kind,
        });
    }
    let request = review.request.ok_or(ReviewError::NoRequest)?;
    serde_json::from_value(request).map_err(|e| ReviewError::Malformed {
        message: format!("request: {e}"),
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

/// The conversions `request` asks for, or a Failure message: the desired version is not one
/// of `kind`'s, there are too many objects, or an object is not of `kind`.
pub fn plan(request: &Request, kind: &ServedKind) -> Result<Plan, String> {
    if request.objects.len() > MAX_OBJECTS {
        return Err(format!(
            "the review has {} objects; at most {MAX_OBJECTS} are converted at once",
            request.objects.len()
        ));
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
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let Some(from) = version_of(api_version, kind).filter(|_| object["kind"] == kind.kind.as_str()) else {
            let found = format!("{api_version} {}", object["kind"].as_str().unwrap_or_default());
            failures.add(identity(object, index), &format!("{found} is not {}", kind.describe()));
            continue;
        };
        let spec = object.get("spec").filter(|s| !s.is_null());
        match spec {
            Some(spec) if from != desired => {
                plan.sources.push(Some(plan.conversions.len()));
                plan.conversions.push(Conversion {
                    from: from.to_string(),
                    to: desired.to_string(),
                    spec: spec.clone(),
                });
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

/// How an object is named in messages and logs: `namespace/name`, `name` when cluster-scoped,
/// else its place in the review.
pub fn identity(object: &Value, index: usize) -> String {
    let metadata = &object["metadata"];
    match (metadata["namespace"].as_str(), metadata["name"].as_str()) {
        (Some(namespace), Some(name)) if !namespace.is_empty() => format!("{namespace}/{name}"),
        (_, Some(name)) => name.to_string(),
        _ => format!("objects[{index}]"),
    }
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

/// A review to send back and how it ended.
#[derive(Debug)]
pub struct Answer {
    pub review: Value,
    pub outcome: Outcome,
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
        if let Some(Err(error)) = source.map(|i| &converted[i]) {
            failures.add(identity(&request.objects[index], index), &error.to_string());
        }
    }
    if let Some(message) = failures.message() {
        return failure(&request.uid, &message, failures.names());
    }
    let mut specs: Vec<Option<Value>> = converted.into_iter().map(Result::ok).collect();
    let objects: Vec<Value> = request
        .objects
        .into_iter()
        .zip(&plan.sources)
        .map(|(mut object, source)| {
            object["apiVersion"] = Value::String(request.desired_api_version.clone());
            if let Some(spec) = source.and_then(|i| specs[i].take()) {
                object["spec"] = spec;
            }
            object
        })
        .collect();
    let count = objects.len();
    Answer {
        review: review(json!({
            "uid": request.uid,
            "convertedObjects": objects,
            "result": {"status": "Success"},
        })),
        outcome: Outcome::Success { objects: count },
    }
}

/// A Failure answer to the review `uid` with `message`; `objects` names the objects it is about.
pub fn failure(uid: &str, message: &str, objects: Vec<String>) -> Answer {
    Answer {
        review: review(json!({
            "uid": uid,
            "convertedObjects": [],
            "result": {"status": "Failure", "message": message},
        })),
        outcome: Outcome::Failure { objects },
    }
}

fn review(response: Value) -> Value {
    json!({"apiVersion": REVIEW_API_VERSION, "kind": REVIEW_KIND, "response": response})
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn request(desired: &str, objects: Vec<Value>) -> Request {
        parse(&body(desired, objects)).unwrap()
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

        assert!(matches!(parse(b"{not json"), Err(ReviewError::Malformed { .. })));
        let admission = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}"#;
        assert!(matches!(parse(admission), Err(ReviewError::NotAReview { .. })));
        let empty = br#"{"apiVersion":"apiextensions.k8s.io/v1","kind":"ConversionReview"}"#;
        assert_eq!(parse(empty).unwrap_err(), ReviewError::NoRequest);
        let no_uid = br#"{"apiVersion":"apiextensions.k8s.io/v1","kind":"ConversionReview","request":{}}"#;
        assert!(matches!(parse(no_uid), Err(ReviewError::Malformed { .. })));
        let huge = vec![b' '; MAX_REVIEW_BYTES + 1];
        assert_eq!(
            parse(&huge).unwrap_err(),
            ReviewError::TooLarge {
                bytes: MAX_REVIEW_BYTES + 1
            }
        );
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
            vec![object("v1alpha1", "a", json!({})), stranger, unknown_version],
        );
        assert_eq!(
            plan(&mixed, &kind()).unwrap_err(),
            "team/b: pequod.io/v1alpha1 Database is not WebService.pequod.io (v1beta1, v1alpha1); \
             other/c: pequod.io/v1 WebService is not WebService.pequod.io (v1beta1, v1alpha1)"
        );
    }

    #[test]
    fn too_many_objects_fail_the_review() {
        let many = Request {
            uid: "u".into(),
            desired_api_version: "pequod.io/v1beta1".into(),
            objects: vec![Value::Null; MAX_OBJECTS + 1],
        };
        assert!(plan(&many, &kind()).unwrap_err().contains("at most 10000"));
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
        let response = &answer.review["response"];
        assert_eq!(answer.review["apiVersion"], "apiextensions.k8s.io/v1");
        assert_eq!(answer.review["kind"], "ConversionReview");
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
        let response = &answer.review["response"];
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
        let message = answer.review["response"]["result"]["message"].as_str().unwrap();
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
        assert_eq!(answer.review["response"]["result"]["status"], "Failure");
    }

    #[test]
    fn objects_are_named_by_namespace_and_name_or_place() {
        assert_eq!(identity(&object("v1", "a", json!({})), 0), "team/a");
        assert_eq!(identity(&json!({"metadata": {"name": "global"}}), 3), "global");
        assert_eq!(identity(&json!({}), 3), "objects[3]");
    }
}
