//! Telling a graph Pequod rendered from a hand-written or edited one.
//!
//! Everything on a ResourceGraph can be written by whoever may write ResourceGraphs: names,
//! labels, owner references, `sourceRef`, managed fields. What they cannot make is an HMAC with
//! a key only the operator reads. When the instance controller writes a graph it signs the
//! graph's namespace, name, allowances and spec ([`crate::api::names::PROOF_ANNOTATION`]); the executor grants a
//! graph its Transform's allowances only when that proof verifies, and treats every other graph
//! as hand-written.

use crate::canonical::canonical_json;
use ring::hmac;

use crate::api::ResourceGraphSpec;

const VERSION: &str = "v2";

/// What a rendered graph may reach: its Transform's allowances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowance {
    /// A Transform outside the trusted namespaces: the rules of a hand-written graph.
    Restricted,
    /// A trusted Transform: its namespace, any kind its module renders.
    Namespace,
    /// A trusted Transform with `allowClusterScopedResources`: cluster-scoped objects too.
    Cluster,
}

impl Allowance {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Restricted => "restricted",
            Self::Namespace => "namespace",
            Self::Cluster => "cluster",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        [Self::Restricted, Self::Namespace, Self::Cluster]
            .into_iter()
            .find(|a| a.as_str() == value)
    }
}

/// What a rendered graph was signed with: the allowance, and the Transform and module version
/// that granted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub allowance: Allowance,
    /// The uid of the Transform whose instance the graph was rendered from.
    pub transform_uid: String,
    /// The module version (content digest) the graph was rendered with.
    pub module_digest: String,
}

impl Grant {
    pub fn origin(grant: Option<&Self>) -> Origin {
        grant.map_or(Origin::HandWritten, |g| Origin::Rendered(g.allowance))
    }
}

/// Where a graph comes from, which decides what it may reach beyond the rules every graph
/// follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Written by someone other than Pequod, or edited since: confined to its namespace, and no
    /// RBAC, admission, CRD or APIService objects.
    HandWritten,
    /// Rendered by Pequod from an instance.
    Rendered(Allowance),
}

/// The operator's signing key. Its bytes never leave this type.
#[derive(Clone)]
pub struct GraphKey(hmac::Key);

impl GraphKey {
    /// Fewest bytes a key must have.
    pub const MIN_BYTES: usize = 32;

    pub fn new(bytes: &[u8]) -> Option<Self> {
        (bytes.len() >= Self::MIN_BYTES).then(|| Self(hmac::Key::new(hmac::HMAC_SHA256, bytes)))
    }

    /// The proof of a rendered graph with `grant`, taking over from `predecessor` (the value
    /// of [`crate::api::names::PREDECESSOR_ANNOTATION`]) if any:
    /// `v2:<allowance>:<transform uid>:<module digest>:<hex HMAC-SHA256>`.
    pub fn sign(
        &self,
        namespace: &str,
        name: &str,
        spec: &ResourceGraphSpec,
        grant: &Grant,
        predecessor: Option<&str>,
    ) -> String {
        let signed = signed_part(grant);
        let tag = hmac::sign(&self.0, &message(namespace, name, &signed, predecessor, spec));
        format!("{signed}:{}", hex::encode(tag.as_ref()))
    }

    /// The grant of a graph carrying `proof` and `predecessor` (the values of
    /// [`crate::api::names::PROOF_ANNOTATION`] and [`crate::api::names::PREDECESSOR_ANNOTATION`]),
    /// or None for a graph Pequod did not render as it is (hand-written, edited, copied, or
    /// signed by an earlier release, whose proofs named no Transform).
    pub fn verify(
        &self,
        namespace: &str,
        name: &str,
        spec: &ResourceGraphSpec,
        proof: Option<&str>,
        predecessor: Option<&str>,
    ) -> Option<Grant> {
        let (signed, tag) = proof?.rsplit_once(':')?;
        let mut parts = signed.splitn(4, ':');
        let (Some(VERSION), Some(allowance), Some(transform_uid), Some(module_digest)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let grant = Grant {
            allowance: Allowance::parse(allowance)?,
            transform_uid: transform_uid.to_string(),
            module_digest: module_digest.to_string(),
        };
        let tag = hex::decode(tag).ok()?;
        hmac::verify(&self.0, &message(namespace, name, signed, predecessor, spec), &tag).ok()?;
        Some(grant)
    }
}

impl GraphKey {
    /// The proof of the module versions a Transform has served: the list sits in its status,
    /// which whoever may write `transforms/status` could change.
    pub fn sign_served(&self, transform_uid: &str, digests: &[String]) -> String {
        hex::encode(hmac::sign(&self.0, &served_message(transform_uid, digests)).as_ref())
    }

    /// Whether `proof` is this key's proof of `digests` for the Transform `transform_uid`.
    pub fn verify_served(&self, transform_uid: &str, digests: &[String], proof: Option<&str>) -> bool {
        let Some(tag) = proof.and_then(|p| hex::decode(p).ok()) else {
            return false;
        };
        hmac::verify(&self.0, &served_message(transform_uid, digests), &tag).is_ok()
    }
}

impl GraphKey {
    /// The proof of a published description of how a kind is served (see
    /// `controller::serving`), bound to the ConfigMap's name: every replica renders with what it
    /// says, so nobody without the key may write one.
    pub fn sign_serving(&self, name: &str, payload: &[u8]) -> String {
        hex::encode(hmac::sign(&self.0, &serving_message(name, payload)).as_ref())
    }

    /// Whether `proof` is this key's proof of `payload` published as `name`.
    pub fn verify_serving(&self, name: &str, payload: &[u8], proof: Option<&str>) -> bool {
        let Some(tag) = proof.and_then(|p| hex::decode(p).ok()) else {
            return false;
        };
        hmac::verify(&self.0, &serving_message(name, payload), &tag).is_ok()
    }
}

fn serving_message(name: &str, payload: &[u8]) -> Vec<u8> {
    let mut message = format!("pequod-serving\n{name}\n").into_bytes();
    message.extend_from_slice(payload);
    message
}

fn served_message(transform_uid: &str, digests: &[String]) -> Vec<u8> {
    format!("pequod-served-digests\n{transform_uid}\n{}", digests.join("\n")).into_bytes()
}

impl std::fmt::Debug for GraphKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GraphKey(redacted)")
    }
}

/// The clear part of a proof: what the executor checks against the Transform.
fn signed_part(grant: &Grant) -> String {
    format!(
        "{VERSION}:{}:{}:{}",
        grant.allowance.as_str(),
        grant.transform_uid,
        grant.module_digest
    )
}

fn message(namespace: &str, name: &str, signed: &str, predecessor: Option<&str>, spec: &ResourceGraphSpec) -> Vec<u8> {
    let predecessor = predecessor.unwrap_or_default();
    let mut out = format!("pequod-graph-proof\n{namespace}\n{name}\n{signed}\n{predecessor}\n");
    out.push_str(&canonical_json(&serde_json::to_value(spec).unwrap_or_default()));
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn key(byte: u8) -> GraphKey {
        GraphKey::new(&[byte; 32]).unwrap()
    }

    fn spec(object: Value) -> ResourceGraphSpec {
        serde_json::from_value(json!({"nodes": [{"id": "config", "object": object}]})).unwrap()
    }

    fn grant(allowance: Allowance) -> Grant {
        Grant {
            allowance,
            transform_uid: "uid-1".into(),
            module_digest: format!("sha256:{}", "a".repeat(64)),
        }
    }

    #[test]
    fn only_the_signed_graph_under_the_same_key_verifies() {
        let k = key(1);
        let signed = spec(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}}));
        let proof = k.sign("team", "web", &signed, &grant(Allowance::Cluster), None);
        let verify = |k: &GraphKey, ns: &str, name: &str, s: &ResourceGraphSpec, p: Option<&str>| {
            Grant::origin(k.verify(ns, name, s, p, None).as_ref())
        };
        assert_eq!(
            k.verify("team", "web", &signed, Some(&proof), None),
            Some(grant(Allowance::Cluster))
        );
        let edited = spec(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}}));
        let widened = proof.replacen(":cluster:", ":namespace:", 1);
        let other_transform = proof.replacen(":uid-1:", ":uid-2:", 1);
        let other_module = proof.replacen(":sha256:a", ":sha256:b", 1);
        let v1 = format!("v1:cluster:{}", proof.rsplit_once(':').unwrap().1);
        let cases = [
            ("no proof", verify(&k, "team", "web", &signed, None)),
            ("edited spec", verify(&k, "team", "web", &edited, Some(&proof))),
            (
                "copied to another namespace",
                verify(&k, "other", "web", &signed, Some(&proof)),
            ),
            (
                "copied to another name",
                verify(&k, "team", "api", &signed, Some(&proof)),
            ),
            ("another key", verify(&key(2), "team", "web", &signed, Some(&proof))),
            ("allowance changed", verify(&k, "team", "web", &signed, Some(&widened))),
            (
                "another Transform",
                verify(&k, "team", "web", &signed, Some(&other_transform)),
            ),
            (
                "another module version",
                verify(&k, "team", "web", &signed, Some(&other_module)),
            ),
            (
                "an earlier release's proof",
                verify(&k, "team", "web", &signed, Some(&v1)),
            ),
            ("garbage", verify(&k, "team", "web", &signed, Some("v2:cluster:u:d:zz"))),
            (
                "unknown version",
                verify(&k, "team", "web", &signed, Some("v0:cluster:u:d:00")),
            ),
        ];
        for (case, origin) in cases {
            assert_eq!(origin, Origin::HandWritten, "{case}");
        }
    }

    #[test]
    fn the_apiserver_s_rewriting_of_keys_and_numbers_keeps_the_proof() {
        let k = key(1);
        let written =
            spec(json!({"kind": "Deployment", "spec": {"replicas": 2.0, "ratio": 0.5}, "apiVersion": "apps/v1"}));
        let read_back =
            spec(json!({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"ratio": 0.5, "replicas": 2}}));
        let proof = k.sign(
            "team",
            "web",
            &written,
            &grant(Allowance::Restricted),
            Some("uid-old/web-old"),
        );
        assert_eq!(
            k.verify("team", "web", &read_back, Some(&proof), Some("uid-old/web-old")),
            Some(grant(Allowance::Restricted))
        );
    }

    #[test]
    fn a_served_list_verifies_only_as_signed_for_its_transform() {
        let k = key(1);
        let list = vec!["sha256:a".to_string(), "sha256:b".to_string()];
        let proof = k.sign_served("uid-1", &list);
        assert!(k.verify_served("uid-1", &list, Some(&proof)));
        let mut added = list.clone();
        added.push("sha256:other".into());
        assert!(
            !k.verify_served("uid-1", &added, Some(&proof)),
            "a digest added by hand"
        );
        assert!(!k.verify_served("uid-2", &list, Some(&proof)), "another Transform");
        assert!(!k.verify_served("uid-1", &list, None), "no proof");
        assert!(!key(2).verify_served("uid-1", &list, Some(&proof)), "another key");
    }

    #[test]
    fn short_keys_are_refused_and_keys_are_never_printed() {
        assert!(GraphKey::new(&[0; 16]).is_none());
        assert_eq!(format!("{:?}", key(7)), "GraphKey(redacted)");
    }
}
