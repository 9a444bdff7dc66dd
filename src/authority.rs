//! What a Transform may give its instances, decided from where it lives: a pure rule.
//!
//! Whoever may create a Transform chooses what its module renders and what Pequod writes for
//! every instance. A Transform in a namespace the administrator trusts (`--trusted-transform-
//! namespaces`, by default only the operator's own) may have a ClusterRole and cluster-scoped
//! objects; one anywhere else gets the rules of a hand-written ResourceGraph: a Role in its own
//! namespace, only ordinary namespaced kinds there. No Transform may name wildcards.

use crate::api::{RbacScope, TransformSpec};
use crate::executor::plan::GUARDED_GROUPS;
use crate::executor::proof::Allowance;

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
}
