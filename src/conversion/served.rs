//! Which conversions the webhook serves: a path `/convert/NAMESPACE/TRANSFORM/HEX` is served
//! only while the CRD its Transform generated names exactly that path as its conversion
//! webhook's. What was read of each Transform's CRD is remembered briefly, the answers that
//! serve nothing apart from those that do, so that made-up paths neither make the operator ask
//! the apiserver on every request nor push out what real ones need. Pure: no I/O and no logs.

use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

use super::review::ServedKind;
use crate::lru::Lru;

/// What the caller is told of every path that serves nothing, whatever the reason: callers are
/// unauthenticated, and must not learn which Transforms, CRDs or digests exist.
pub const NOT_SERVED_MESSAGE: &str = "no conversion is served at this path";
/// How long what a CRD serves is reused.
const SERVED_TTL: Duration = Duration::from_secs(60);
/// How long an answer that serves nothing is reused.
const NOT_SERVED_TTL: Duration = Duration::from_secs(10);
/// Shortest time between two reads of a Transform's CRD for paths of other digests than the
/// one it named (it may have moved on to the new one since).
const RECHECK_AFTER: Duration = Duration::from_secs(2);
/// Most Transforms whose CRD serves conversions remembered.
const MAX_SERVED: usize = 256;
/// Most Transforms that serve none remembered (made-up names among them).
const MAX_NOT_SERVED: usize = 1024;

/// Why a path serves no conversion. Logged, never told to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotServed {
    TransformNotFound,
    /// The Transform has generated no CRD yet.
    NoCrd,
    CrdNotFound,
    /// The CRD converts through no webhook (one version), or names no path.
    NoWebhook,
    /// The CRD's webhook is called at another path: another module digest, or another
    /// Transform's path.
    OtherPath,
}

impl NotServed {
    /// Stable reason, for logs.
    pub fn reason(self) -> &'static str {
        match self {
            Self::TransformNotFound => "TransformNotFound",
            Self::NoCrd => "NoGeneratedCRD",
            Self::CrdNotFound => "CRDNotFound",
            Self::NoWebhook => "NoConversionWebhook",
            Self::OtherPath => "OtherConversionPath",
        }
    }

    /// Whether the Transform exists: the operator's administrators may want to know why its
    /// conversions are refused, where made-up names are noise.
    pub fn transform_exists(self) -> bool {
        self != Self::TransformNotFound
    }
}

/// What a Transform's CRD converts: the path its conversion webhook is called at, and its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrdConversion {
    pub path: String,
    pub kind: ServedKind,
}

/// What reading a Transform and its CRD found.
pub type Found = Result<CrdConversion, NotServed>;

/// The kind a CRD serves: its group, kind and every version it lists (a version no longer
/// served may still be stored).
pub fn served_kind_of(crd: &CustomResourceDefinition) -> ServedKind {
    ServedKind {
        group: crd.spec.group.clone(),
        kind: crd.spec.names.kind.clone(),
        versions: crd.spec.versions.iter().map(|v| v.name.clone()).collect(),
    }
}

/// The path at which the apiserver calls `crd`'s conversion webhook: its Service's path, or the
/// path of its URL. None unless it converts through a webhook with a path.
pub fn conversion_webhook_path(crd: &CustomResourceDefinition) -> Option<String> {
    let conversion = crd.spec.conversion.as_ref().filter(|c| c.strategy == "Webhook")?;
    let config = conversion.webhook.as_ref()?.client_config.as_ref()?;
    if let Some(service) = &config.service {
        return service.path.clone();
    }
    let after_scheme = config.url.as_deref()?.split_once("://")?.1;
    let path = &after_scheme[after_scheme.find('/')?..];
    path.split(['?', '#']).next().map(str::to_string)
}

/// What `crd` converts, if through a webhook.
pub fn crd_conversion(crd: &CustomResourceDefinition) -> Found {
    let path = conversion_webhook_path(crd).ok_or(NotServed::NoWebhook)?;
    Ok(CrdConversion {
        path,
        kind: served_kind_of(crd),
    })
}

/// The kind converted at `path`, given what its Transform's CRD converts: only exactly the
/// path the CRD names is served.
pub fn decide(found: &Found, path: &str) -> Result<ServedKind, NotServed> {
    match found {
        Ok(conversion) if conversion.path == path => Ok(conversion.kind.clone()),
        Ok(_) => Err(NotServed::OtherPath),
        Err(why) => Err(*why),
    }
}

/// What is known of a path without asking the apiserver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    Decided(Result<ServedKind, NotServed>),
    /// Nothing recent enough: the Transform and its CRD are to be read.
    Unknown,
}

/// What was last read of each Transform's CRD, by `namespace/name`.
#[derive(Debug, Default)]
pub struct ServedPaths {
    served: Lru<(Instant, CrdConversion)>,
    not_served: Lru<(Instant, NotServed)>,
}

impl ServedPaths {
    /// What is known at `now` of `path`, a path of the Transform `key`.
    pub fn known(&mut self, key: &str, path: &str, now: Instant) -> Known {
        if let Some((at, conversion)) = self.served.get(key) {
            let age = now.saturating_duration_since(*at);
            if age < SERVED_TTL && (conversion.path == path || age < RECHECK_AFTER) {
                return Known::Decided(decide(&Ok(conversion.clone()), path));
            }
            if age >= SERVED_TTL {
                self.served.remove(key);
            }
            return Known::Unknown;
        }
        match self.not_served.get(key) {
            Some((at, why)) if now.saturating_duration_since(*at) < NOT_SERVED_TTL => Known::Decided(Err(*why)),
            _ => Known::Unknown,
        }
    }

    /// Keeps what was read of the Transform `key` at `now`.
    pub fn record(&mut self, key: &str, found: &Found, now: Instant) {
        match found {
            Ok(conversion) => {
                self.not_served.remove(key);
                make_room(&mut self.served, MAX_SERVED);
                self.served.insert(key.to_string(), (now, conversion.clone()), 1);
            }
            Err(why) => {
                self.served.remove(key);
                make_room(&mut self.not_served, MAX_NOT_SERVED);
                self.not_served.insert(key.to_string(), (now, *why), 1);
            }
        }
    }
}

/// Makes room for one entry: the least recently used go.
fn make_room<V>(entries: &mut Lru<V>, max: usize) {
    while entries.len() >= max && entries.pop_oldest().is_some() {}
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

    fn crd(conversion: serde_json::Value) -> CustomResourceDefinition {
        serde_json::from_value(json!({
            "metadata": {"name": "webservices.pequod.io"},
            "spec": {
                "group": "pequod.io",
                "names": {"kind": "WebService", "plural": "webservices"},
                "scope": "Namespaced",
                "versions": [
                    {"name": "v1beta1", "served": true, "storage": true},
                    {"name": "v1alpha1", "served": false, "storage": false},
                ],
                "conversion": conversion,
            },
        }))
        .unwrap()
    }

    fn service_path(path: &str) -> serde_json::Value {
        json!({"strategy": "Webhook", "webhook": {"conversionReviewVersions": ["v1"], "clientConfig": {
            "service": {"namespace": "pequod-system", "name": "pequod-webhook-service", "path": path, "port": 443},
        }}})
    }

    fn url(url: &str) -> serde_json::Value {
        json!({"strategy": "Webhook", "webhook": {"conversionReviewVersions": ["v1"], "clientConfig": {"url": url}}})
    }

    #[test]
    fn the_kind_lists_every_version_of_the_crd() {
        assert_eq!(served_kind_of(&crd(json!({"strategy": "None"}))), kind());
    }

    #[test]
    fn the_webhook_path_is_the_service_s_or_the_url_s() {
        let path = "/convert/team/web/abc";
        assert_eq!(conversion_webhook_path(&crd(service_path(path))).as_deref(), Some(path));
        let local = crd(url("https://127.0.0.1:9443/convert/team/web/abc"));
        assert_eq!(conversion_webhook_path(&local).as_deref(), Some(path));
        assert_eq!(conversion_webhook_path(&crd(url("https://127.0.0.1:9443"))), None);
        assert_eq!(conversion_webhook_path(&crd(json!({"strategy": "None"}))), None);
        let no_path = json!({"strategy": "Webhook", "webhook": {"conversionReviewVersions": ["v1"], "clientConfig": {
            "service": {"namespace": "pequod-system", "name": "pequod-webhook-service"},
        }}});
        assert_eq!(crd_conversion(&crd(no_path)), Err(NotServed::NoWebhook));
    }

    #[test]
    fn only_exactly_the_path_the_crd_names_is_served() {
        let found = crd_conversion(&crd(service_path("/convert/team/web/abc")));
        assert_eq!(decide(&found, "/convert/team/web/abc"), Ok(kind()));
        for other in [
            "/convert/team/web/abd",
            "/convert/team/web/abc/",
            "/convert/team/other/abc",
            "/convert/other/web/abc",
            "/convert/team/web/ab",
        ] {
            assert_eq!(decide(&found, other), Err(NotServed::OtherPath), "{other}");
        }
        assert_eq!(
            decide(&Err(NotServed::NoCrd), "/convert/team/web/abc"),
            Err(NotServed::NoCrd)
        );
    }

    #[test]
    fn answers_are_reused_the_negative_ones_briefly() {
        let start = Instant::now();
        let mut paths = ServedPaths::default();
        let path = "/convert/team/web/abc";
        assert_eq!(paths.known("team/web", path, start), Known::Unknown);
        let found = Ok(CrdConversion {
            path: path.into(),
            kind: kind(),
        });
        paths.record("team/web", &found, start);
        assert_eq!(paths.known("team/web", path, start), Known::Decided(Ok(kind())));
        let later = start + SERVED_TTL - Duration::from_secs(1);
        assert_eq!(paths.known("team/web", path, later), Known::Decided(Ok(kind())));
        assert_eq!(paths.known("team/web", path, start + SERVED_TTL), Known::Unknown);

        paths.record("team/gone", &Err(NotServed::TransformNotFound), start);
        let refused = Known::Decided(Err(NotServed::TransformNotFound));
        assert_eq!(paths.known("team/gone", "/convert/team/gone/1", start), refused);
        assert_eq!(
            paths.known("team/gone", "/convert/team/gone/2", start + Duration::from_secs(9)),
            refused,
            "any digest of that Transform"
        );
        assert_eq!(
            paths.known("team/gone", "/convert/team/gone/2", start + NOT_SERVED_TTL),
            Known::Unknown
        );
    }

    #[test]
    fn another_digest_reads_the_crd_again_at_most_every_few_seconds() {
        let start = Instant::now();
        let mut paths = ServedPaths::default();
        let found = Ok(CrdConversion {
            path: "/convert/team/web/old".into(),
            kind: kind(),
        });
        paths.record("team/web", &found, start);
        let new = "/convert/team/web/new";
        assert_eq!(
            paths.known("team/web", new, start + Duration::from_secs(1)),
            Known::Decided(Err(NotServed::OtherPath))
        );
        assert_eq!(paths.known("team/web", new, start + RECHECK_AFTER), Known::Unknown);
    }

    #[test]
    fn made_up_names_push_out_only_answers_that_serve_nothing() {
        let start = Instant::now();
        let mut paths = ServedPaths::default();
        let path = "/convert/team/web/abc";
        let found = Ok(CrdConversion {
            path: path.into(),
            kind: kind(),
        });
        paths.record("team/web", &found, start);
        for i in 0..MAX_NOT_SERVED + 10 {
            paths.record(&format!("team/made-up-{i}"), &Err(NotServed::TransformNotFound), start);
        }
        assert_eq!(paths.not_served.len(), MAX_NOT_SERVED);
        assert_eq!(paths.known("team/web", path, start), Known::Decided(Ok(kind())));
    }
}
