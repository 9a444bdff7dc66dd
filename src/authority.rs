//! What a Transform may give its instances, decided from where it lives: a pure rule.
//!
//! Whoever may create a Transform chooses what its module renders and what Pequod writes for
//! every instance. A Transform in a namespace the administrator trusts (`--trusted-transform-
//! namespaces`, by default only the operator's own) may have a ClusterRole and cluster-scoped
//! objects; one anywhere else gets the rules of a hand-written ResourceGraph: a Role in its own
//! namespace, only ordinary namespaced kinds there. No Transform may name wildcards.

use crate::api::{RbacScope, Transform, TransformSpec};
use crate::apply::ServiceAccount;
use crate::executor::proof::{Allowance, Grant, Origin};
use crate::executor::write::GUARDED_GROUPS;
use kube::ResourceExt;

/// The namespaces whose Transforms are trusted; `*` trusts every namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedNamespaces(Vec<String>);

impl TrustedNamespaces {
    pub fn new(namespaces: Vec<String>) -> Self {
        Self(namespaces.into_iter().filter(|n| !n.is_empty()).collect())
    }

    pub fn trusts(&self, namespace: &str) -> bool {
        self.0.iter().any(|n| n == "*" || n == namespace)
    }

    fn describe(&self) -> String {
        if self.0.is_empty() {
            "none".into()
        } else {
            self.0.join(", ")
        }
    }
}

/// What the instances of a Transform in `namespace` may reach, or why the Transform may not
/// be served at all.
pub fn allowance(spec: &TransformSpec, namespace: &str, trusted: &TrustedNamespaces) -> Result<Allowance, String> {
    for managed in &spec.managed_resources {
        let group = managed.api_group.as_deref().unwrap_or_default();
        if group.contains('*') || managed.resources.iter().any(|r| r.contains('*')) {
            return Err(format!(
                "managedResources may not use wildcards (apiGroup {group:?}, resources {:?}): name each resource",
                managed.resources
            ));
        }
    }
    if trusted.trusts(namespace) {
        return Ok(if spec.allow_cluster_scoped_resources {
            Allowance::Cluster
        } else {
            Allowance::Namespace
        });
    }
    let untrusted = format!(
        "namespace {namespace} is not trusted for Transforms (trusted: {})",
        trusted.describe()
    );
    if spec.rbac_scope == RbacScope::Cluster {
        return Err(format!(
            "{untrusted}: its Transforms get a Role in their own namespace; set rbacScope: Namespace"
        ));
    }
    if spec.allow_cluster_scoped_resources {
        return Err(format!("{untrusted}: allowClusterScopedResources is not allowed"));
    }
    if let Some(guarded) = spec
        .managed_resources
        .iter()
        .filter_map(|m| m.api_group.as_deref())
        .find(|g| GUARDED_GROUPS.contains(g))
    {
        return Err(format!(
            "{untrusted}: managedResources may not include API group {guarded} (RBAC, admission, CRDs, APIServices)"
        ));
    }
    Ok(Allowance::Restricted)
}

/// Whose rights a graph's reads and writes are made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// The operator's own: a graph rendered from a trusted Transform, signed with its grant.
    Operator,
    /// A service account in the graph's namespace, impersonated: every other graph.
    ServiceAccount(ServiceAccount),
}

/// Which service account graphs act as when they name none, and whether they may name another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphAccounts {
    pub default: String,
    /// Graphs may not name an account other than the default.
    pub locked: bool,
}

impl Default for GraphAccounts {
    fn default() -> Self {
        Self {
            default: "default".into(),
            locked: false,
        }
    }
}

/// Whom a graph of `origin` in `namespace` acts as, given the account it names. Only a graph
/// rendered from a trusted Transform acts with the operator's rights, within its allowance;
/// a hand-written graph and one of a Transform outside the trusted namespaces act as a service
/// account of their namespace, so that the apiserver authorizes exactly what that account may
/// do.
pub fn graph_actor(
    origin: Origin,
    requested: Option<&str>,
    namespace: &str,
    accounts: &GraphAccounts,
) -> Result<Actor, String> {
    if matches!(origin, Origin::Rendered(Allowance::Namespace | Allowance::Cluster)) {
        return Ok(Actor::Operator);
    }
    let name = match requested.filter(|r| !r.is_empty()) {
        Some(name) if accounts.locked && name != accounts.default => {
            return Err(format!(
                "spec.serviceAccountName {name:?} is not allowed: the operator runs with --lock-service-account, so \
                 graphs act as service account {:?} of their namespace",
                accounts.default
            ));
        }
        Some(name) => name,
        None => &accounts.default,
    };
    Ok(Actor::ServiceAccount(ServiceAccount {
        namespace: namespace.to_string(),
        name: name.to_string(),
    }))
}

/// Why the Transform a graph was signed for no longer stands behind it, or None when it does:
/// it exists (the same uid), its namespace and spec still give the signed allowance, and it
/// has served the module version the graph was rendered with (`served`: its list of served
/// versions, once its proof is checked).
pub fn withdrawn(
    grant: &Grant,
    transform: Option<&Transform>,
    served: &[String],
    trusted: &TrustedNamespaces,
) -> Option<String> {
    let Some(t) = transform.filter(|t| t.uid().as_deref() == Some(grant.transform_uid.as_str())) else {
        return Some(format!(
            "the Transform this graph was rendered for (uid {}) no longer exists",
            grant.transform_uid
        ));
    };
    let name = format!("{}/{}", t.namespace().unwrap_or_default(), t.name_any());
    match allowance(&t.spec, &t.namespace().unwrap_or_default(), trusted) {
        Ok(now) if now == grant.allowance => {}
        Ok(now) => {
            return Some(format!(
                "Transform {name} now grants {} instead of the {} this graph was signed with",
                now.as_str(),
                grant.allowance.as_str()
            ));
        }
        Err(why) => return Some(format!("Transform {name} is no longer allowed: {why}")),
    }
    (!served.contains(&grant.module_digest)).then(|| {
        format!(
            "Transform {name} has not served module version {}, which this graph was rendered with",
            grant.module_digest
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(extra: serde_json::Value) -> TransformSpec {
        let mut base = json!({"cueRef": {"type": "embedded", "ref": "webservice"}});
        base.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn where_a_transform_lives_decides_what_its_instances_reach() {
        let trusted = TrustedNamespaces::new(vec!["pequod-system".into(), "platform".into()]);
        let deployments = json!([{"apiGroup": "apps", "resources": ["deployments"]}]);
        #[rustfmt::skip]
        let cases = [
            ("trusted, defaults", "platform", json!({}), Ok(Allowance::Namespace)),
            ("trusted, cluster-scoped", "platform", json!({"allowClusterScopedResources": true}), Ok(Allowance::Cluster)),
            ("trusted, RBAC kinds", "platform", json!({"managedResources": [{"apiGroup": "rbac.authorization.k8s.io", "resources": ["roles"]}]}), Ok(Allowance::Namespace)),
            ("trusted, a wildcard", "platform", json!({"managedResources": [{"apiGroup": "*", "resources": ["deployments"]}]}), Err("wildcards")),
            ("trusted, a wildcard resource", "platform", json!({"managedResources": [{"apiGroup": "apps", "resources": ["*"]}]}), Err("wildcards")),
            ("untrusted, defaults (a ClusterRole)", "team-a", json!({}), Err("set rbacScope: Namespace")),
            ("untrusted, a Role", "team-a", json!({"rbacScope": "Namespace", "managedResources": deployments}), Ok(Allowance::Restricted)),
            ("untrusted, cluster-scoped", "team-a", json!({"rbacScope": "Namespace", "allowClusterScopedResources": true}), Err("allowClusterScopedResources")),
            ("untrusted, RBAC kinds", "team-a", json!({"rbacScope": "Namespace", "managedResources": [{"apiGroup": "rbac.authorization.k8s.io", "resources": ["rolebindings"]}]}), Err("rbac.authorization.k8s.io")),
            ("untrusted, webhooks", "team-a", json!({"rbacScope": "Namespace", "managedResources": [{"apiGroup": "admissionregistration.k8s.io", "resources": ["validatingwebhookconfigurations"]}]}), Err("admissionregistration.k8s.io")),
        ];
        for (case, namespace, extra, want) in cases {
            let got = allowance(&spec(extra), namespace, &trusted);
            match (got, want) {
                (Ok(a), Ok(w)) => assert_eq!(a, w, "{case}"),
                (Err(message), Err(fragment)) => assert!(message.contains(fragment), "{case}: {message}"),
                (got, want) => panic!("{case}: got {got:?}, want {want:?}"),
            }
        }
        let everyone = TrustedNamespaces::new(vec!["*".into()]);
        assert_eq!(
            allowance(&spec(json!({})), "team-a", &everyone),
            Ok(Allowance::Namespace)
        );
    }

    #[test]
    fn only_graphs_of_trusted_transforms_act_with_the_operator_s_rights() {
        let open = GraphAccounts::default();
        let locked = GraphAccounts {
            default: "pequod-graphs".into(),
            locked: true,
        };
        let account = |name: &str| {
            Ok(Actor::ServiceAccount(ServiceAccount {
                namespace: "team".into(),
                name: name.into(),
            }))
        };
        #[rustfmt::skip]
        let cases = [
            ("trusted, namespace", Origin::Rendered(Allowance::Namespace), None, &open, Ok(Actor::Operator)),
            ("trusted, cluster, naming an account", Origin::Rendered(Allowance::Cluster), Some("x"), &open, Ok(Actor::Operator)),
            ("untrusted Transform", Origin::Rendered(Allowance::Restricted), None, &open, account("default")),
            ("hand-written", Origin::HandWritten, None, &open, account("default")),
            ("hand-written, named", Origin::HandWritten, Some("deployer"), &open, account("deployer")),
            ("hand-written, empty name", Origin::HandWritten, Some(""), &open, account("default")),
            ("locked, default", Origin::HandWritten, None, &locked, account("pequod-graphs")),
            ("locked, naming the default", Origin::HandWritten, Some("pequod-graphs"), &locked, account("pequod-graphs")),
        ];
        for (case, origin, requested, accounts, want) in cases {
            assert_eq!(graph_actor(origin, requested, "team", accounts), want, "{case}");
        }
        let refused = graph_actor(Origin::HandWritten, Some("admin"), "team", &locked).unwrap_err();
        assert!(refused.contains("--lock-service-account"), "{refused}");
    }

    #[test]
    fn a_grant_holds_only_while_its_transform_stands_behind_it() {
        let trusted = TrustedNamespaces::new(vec!["platform".into()]);
        let digest = format!("sha256:{}", "a".repeat(64));
        let transform = |namespace: &str, extra: serde_json::Value| {
            let t: Transform = serde_json::from_value(json!({
                "apiVersion": "platform.platform.example.com/v1alpha1", "kind": "Transform",
                "metadata": {"name": "web", "namespace": namespace, "uid": "uid-1"},
                "spec": spec(extra),
            }))
            .unwrap();
            t
        };
        let served = vec![digest.clone()];
        let grant = |allowance| Grant {
            allowance,
            transform_uid: "uid-1".into(),
            module_digest: digest.clone(),
        };
        let cluster = json!({"allowClusterScopedResources": true});
        let standing = transform("platform", cluster.clone());
        assert_eq!(
            withdrawn(&grant(Allowance::Cluster), Some(&standing), &served, &trusted),
            None
        );
        let other_module = vec!["sha256:other".to_string()];
        let mut other_uid = standing.clone();
        other_uid.metadata.uid = Some("uid-2".into());
        #[rustfmt::skip]
        let cases = [
            ("deleted", None, &served, "no longer exists"),
            ("re-created under the same name", Some(&other_uid), &served, "no longer exists"),
            ("allowance withdrawn", Some(&transform("platform", json!({}))), &served, "now grants namespace"),
            ("moved out of trust", Some(&transform("team", cluster.clone())), &served, "no longer allowed"),
            ("another module", Some(&standing), &other_module, "has not served"),
        ];
        for (case, t, served, fragment) in cases {
            let why = withdrawn(&grant(Allowance::Cluster), t, served, &trusted).unwrap_or_default();
            assert!(why.contains(fragment), "{case}: {why:?}");
        }
    }

    #[test]
    fn trusting_every_namespace_still_names_the_allowance() {
        let everyone = TrustedNamespaces::new(vec!["*".into()]);
        assert_eq!(
            allowance(&spec(json!({})), "team-a", &everyone),
            Ok(Allowance::Namespace)
        );
    }
}
