//! RBAC generated from a Transform's `managedResources`, so that a manager installed without
//! wildcard permissions gains exactly what each platform module needs.

use crate::api::names::{
    AGGREGATE_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE, TRANSFORM_LABEL, TRANSFORM_NAME_ANNOTATION,
    TRANSFORM_NAMESPACE_LABEL,
};
use crate::naming::{label_value, labelled_name};
use std::collections::BTreeMap;

use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::api::{ManagedResource, RbacScope};

/// Whether an RBAC object's labels say the Transform `namespace/name` made it: only then may
/// the Transform write or delete it.
pub fn made_by(labels: Option<&BTreeMap<String, String>>, namespace: &str, name: &str) -> bool {
    labels.is_some_and(|l| {
        l.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY_VALUE)
            && l.get(TRANSFORM_LABEL) == Some(&label_value(name))
            && l.get(TRANSFORM_NAMESPACE_LABEL) == Some(&label_value(namespace))
    })
}
/// Verbs the executor uses on the objects it applies.
const OBJECT_VERBS: [&str; 7] = ["get", "list", "watch", "create", "update", "patch", "delete"];

/// The service account the operator runs as (the subject of generated RoleBindings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagerIdentity {
    pub service_account: String,
    pub namespace: String,
}

impl ManagerIdentity {
    /// From the downward API variables the manager Deployment sets, with the names of
    /// config/default as fallback.
    pub fn from_env() -> Self {
        let var = |name: &str, default: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_string())
        };
        Self {
            service_account: var("SERVICE_ACCOUNT_NAME", "pequod-controller-manager"),
            namespace: var("POD_NAMESPACE", "pequod-system"),
        }
    }
}

/// Name of the ClusterRole of a Cluster-scoped Transform.
pub fn cluster_role_name(namespace: &str, name: &str) -> String {
    format!("pequod:transform:{namespace}.{name}")
}

/// Name of the Role and RoleBinding of a Namespace-scoped Transform.
pub fn role_name(name: &str) -> String {
    format!("pequod-transform-{name}")
}

/// The generated kind Pequod serves, which the manager must be able to watch and update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedKind<'a> {
    pub group: &'a str,
    pub plural: &'a str,
}

/// Rules: full object access to each managed resource, and what serving the generated kind
/// needs (its instances, their status and finalizers).
pub fn rules(managed: &[ManagedResource], served: &ServedKind<'_>) -> Vec<PolicyRule> {
    let verbs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // One rule per group: resources of the same group listed together, sorted and deduplicated.
    let mut by_group: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in managed {
        let entry = by_group.entry(m.api_group.clone().unwrap_or_default()).or_default();
        entry.extend(m.resources.iter().cloned());
    }
    let mut rules: Vec<PolicyRule> = by_group
        .into_iter()
        .map(|(group, mut resources)| {
            resources.sort();
            resources.dedup();
            PolicyRule {
                api_groups: Some(vec![group]),
                resources: Some(resources),
                verbs: verbs(&OBJECT_VERBS),
                ..Default::default()
            }
        })
        .collect();
    rules.push(PolicyRule {
        api_groups: Some(vec![served.group.to_string()]),
        resources: Some(vec![served.plural.to_string()]),
        verbs: verbs(&["get", "list", "watch", "update", "patch"]),
        ..Default::default()
    });
    rules.push(PolicyRule {
        api_groups: Some(vec![served.group.to_string()]),
        resources: Some(vec![
            format!("{}/status", served.plural),
            format!("{}/finalizers", served.plural),
        ]),
        verbs: verbs(&["get", "update", "patch"]),
        ..Default::default()
    });
    rules
}

/// The RBAC objects of one Transform.
#[derive(Debug, Clone, PartialEq)]
pub enum Generated {
    Cluster(Box<ClusterRole>),
    Namespace(Box<(Role, RoleBinding)>),
}

/// Identity of the Transform the RBAC belongs to.
#[derive(Debug, Clone)]
pub struct TransformIdentity<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    /// Owner reference for namespaced objects (cluster-scoped ones cannot have one).
    pub owner: Option<OwnerReference>,
}

/// The labels that say a Transform made an RBAC object (see [`made_by`]).
fn transform_labels(transform: &TransformIdentity<'_>) -> BTreeMap<String, String> {
    made_by_labels(transform.namespace, transform.name)
}

/// The labels that say the Transform `namespace/name` made an object (a generated CRD or RBAC
/// object), as [`made_by`] reads them.
pub fn made_by_labels(namespace: &str, name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
        (TRANSFORM_LABEL.to_string(), label_value(name)),
        (TRANSFORM_NAMESPACE_LABEL.to_string(), label_value(namespace)),
    ])
}

/// The annotations that go with [`made_by_labels`]: the Transform's full name, only when its
/// label cannot hold it (objects of other Transforms stay as earlier releases wrote them).
pub fn made_by_annotations(name: &str) -> Option<BTreeMap<String, String>> {
    (label_value(name) != name).then(|| BTreeMap::from([(TRANSFORM_NAME_ANNOTATION.to_string(), name.to_string())]))
}

/// The Transform `(namespace, name)` an object's labels (and annotations) say made it.
pub fn maker<'a>(
    labels: &'a BTreeMap<String, String>,
    annotations: &'a BTreeMap<String, String>,
) -> Option<(&'a str, &'a str)> {
    let name = labels.get(TRANSFORM_LABEL)?;
    let namespace = labels.get(TRANSFORM_NAMESPACE_LABEL)?;
    let full = annotations.get(TRANSFORM_NAME_ANNOTATION).map(String::as_str);
    Some((namespace, labelled_name(name, full)))
}

pub fn generate(
    scope: RbacScope,
    transform: &TransformIdentity<'_>,
    rules: Vec<PolicyRule>,
    manager: &ManagerIdentity,
) -> Generated {
    let mut labels = transform_labels(transform);
    match scope {
        RbacScope::Cluster => {
            labels.insert(AGGREGATE_LABEL.to_string(), "true".to_string());
            Generated::Cluster(Box::new(ClusterRole {
                metadata: ObjectMeta {
                    name: Some(cluster_role_name(transform.namespace, transform.name)),
                    labels: Some(labels),
                    annotations: made_by_annotations(transform.name),
                    ..Default::default()
                },
                rules: Some(rules),
                aggregation_rule: None,
            }))
        }
        RbacScope::Namespace => {
            let (role, binding) = namespaced(transform, role_name(transform.name), labels, rules, manager);
            Generated::Namespace(Box::new((role, binding)))
        }
    }
}

/// A Role of `rules` in the Transform's namespace, bound to the manager.
fn namespaced(
    transform: &TransformIdentity<'_>,
    name: String,
    labels: BTreeMap<String, String>,
    rules: Vec<PolicyRule>,
    manager: &ManagerIdentity,
) -> (Role, RoleBinding) {
    let meta = ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(transform.namespace.to_string()),
        labels: Some(labels),
        annotations: made_by_annotations(transform.name),
        owner_references: transform.owner.clone().map(|o| vec![o]),
        ..Default::default()
    };
    let binding = RoleBinding {
        metadata: meta.clone(),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name,
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: manager.service_account.clone(),
            namespace: Some(manager.namespace.clone()),
            api_group: None,
        }]),
    };
    (
        Role {
            metadata: meta,
            rules: Some(rules),
        },
        binding,
    )
}

/// Who writes a Transform's RBAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RbacMode {
    /// The manager writes it (it needs `escalate` and `bind` on roles for that).
    Generate,
    /// An administrator applies what `pequod rbac` prints; the manager only checks that it
    /// holds the rules, so no Transform can make it gain a permission.
    External,
}

/// One permission the manager needs, in the terms of an access review.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Access {
    pub group: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub verb: String,
    /// `None`: in every namespace.
    pub namespace: Option<String>,
}

/// Every permission `rules` grant, where a Transform of `scope` in `namespace` needs them.
pub fn required_access(rules: &[PolicyRule], scope: RbacScope, namespace: &str) -> Vec<Access> {
    let where_ = (scope == RbacScope::Namespace).then(|| namespace.to_string());
    let mut access = Vec::new();
    for rule in rules {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                let (resource, subresource) = match resource.split_once('/') {
                    Some((r, sub)) => (r.to_string(), Some(sub.to_string())),
                    None => (resource.clone(), None),
                };
                for verb in &rule.verbs {
                    access.push(Access {
                        group: group.clone(),
                        resource: resource.clone(),
                        subresource: subresource.clone(),
                        verb: verb.clone(),
                        namespace: where_.clone(),
                    });
                }
            }
        }
    }
    access.sort();
    access.dedup();
    access
}

/// A short account of missing permissions: one entry per resource, with its verbs.
pub fn describe_missing(missing: &[Access]) -> String {
    let mut by_resource: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for a in missing {
        let mut resource = a.resource.clone();
        if let Some(sub) = &a.subresource {
            resource = format!("{resource}/{sub}");
        }
        if !a.group.is_empty() {
            resource = format!("{resource}.{}", a.group);
        }
        let place = match &a.namespace {
            Some(ns) => format!(" in namespace {ns}"),
            None => " in every namespace".to_string(),
        };
        by_resource.entry(resource + &place).or_default().push(&a.verb);
    }
    by_resource
        .into_iter()
        .map(|(resource, verbs)| format!("{} {resource}", verbs.join(",")))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Name of the Role and RoleBinding that let the manager read a Transform's pull Secret.
pub fn pull_secret_role_name(name: &str) -> String {
    format!("pequod-transform-{name}-pull-secret")
}

/// `get` on the one pull Secret of a Transform, in its namespace, for the manager: what a
/// restricted manager needs to fetch a private module, and nothing more.
pub fn pull_secret_access(
    transform: &TransformIdentity<'_>,
    secret: &str,
    manager: &ManagerIdentity,
) -> (Role, RoleBinding) {
    let rules = vec![PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(vec!["secrets".into()]),
        resource_names: Some(vec![secret.to_string()]),
        verbs: vec!["get".into()],
        ..Default::default()
    }];
    let name = pull_secret_role_name(transform.name);
    namespaced(transform, name, transform_labels(transform), rules, manager)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn managed() -> Vec<ManagedResource> {
        vec![
            ManagedResource {
                api_group: Some("apps".into()),
                resources: vec!["deployments".into()],
            },
            ManagedResource {
                api_group: None,
                resources: vec!["services".into(), "configmaps".into()],
            },
            ManagedResource {
                api_group: Some(String::new()),
                resources: vec!["services".into()],
            },
        ]
    }

    fn manager() -> ManagerIdentity {
        ManagerIdentity {
            service_account: "sa".into(),
            namespace: "pequod-system".into(),
        }
    }

    const SERVED: ServedKind<'static> = ServedKind {
        group: "apps.example.com",
        plural: "webservices",
    };

    #[test]
    fn rules_group_resources_and_cover_the_served_kind() {
        let rules = rules(&managed(), &SERVED);
        assert_eq!(rules.len(), 4);
        assert_eq!(rules[0].api_groups, Some(vec![String::new()]));
        assert_eq!(
            rules[0].resources,
            Some(vec!["configmaps".to_string(), "services".to_string()])
        );
        assert_eq!(rules[1].api_groups, Some(vec!["apps".to_string()]));
        assert!(rules[1].verbs.contains(&"delete".to_string()));
        assert_eq!(rules[2].resources, Some(vec!["webservices".to_string()]));
        assert!(!rules[2].verbs.contains(&"delete".to_string()));
        assert_eq!(
            rules[3].resources,
            Some(vec![
                "webservices/status".to_string(),
                "webservices/finalizers".to_string()
            ])
        );
    }

    #[test]
    fn cluster_scope_is_an_aggregated_cluster_role() {
        let t = TransformIdentity {
            name: "webservice",
            namespace: "platform",
            owner: None,
        };
        let manager = manager();
        let Generated::Cluster(role) = generate(RbacScope::Cluster, &t, rules(&[], &SERVED), &manager) else {
            panic!("want a ClusterRole");
        };
        assert_eq!(
            role.metadata.name.as_deref(),
            Some("pequod:transform:platform.webservice")
        );
        assert_eq!(role.metadata.labels.as_ref().unwrap()[AGGREGATE_LABEL], "true");
    }

    #[test]
    fn a_transform_with_a_name_too_long_for_a_label_still_knows_its_objects() {
        for length in [63, 64, 253] {
            let name = "t".repeat(length);
            let t = TransformIdentity {
                name: &name,
                namespace: "platform",
                owner: None,
            };
            let Generated::Namespace(generated) = generate(RbacScope::Namespace, &t, Vec::new(), &manager()) else {
                panic!("want a Role");
            };
            let meta = &generated.0.metadata;
            let labels = meta.labels.clone().unwrap_or_default();
            assert!(labels.values().all(|v| crate::naming::is_label_value(v)), "{labels:?}");
            assert!(made_by(Some(&labels), "platform", &name), "{length}");
            assert!(!made_by(Some(&labels), "platform", &format!("{name}x")));
            let annotations = meta.annotations.clone().unwrap_or_default();
            assert_eq!(annotations.is_empty(), length <= 63, "{length}");
            assert_eq!(maker(&labels, &annotations), Some(("platform", name.as_str())));
        }
    }

    #[test]
    fn only_objects_labelled_for_the_transform_are_its_own() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let ours = labels(&[
            (MANAGED_BY_LABEL, MANAGED_BY_VALUE),
            (TRANSFORM_LABEL, "web"),
            (TRANSFORM_NAMESPACE_LABEL, "platform"),
        ]);
        assert!(made_by(Some(&ours), "platform", "web"));
        assert!(!made_by(Some(&ours), "other", "web"), "same name, another namespace");
        assert!(!made_by(Some(&ours), "platform", "api"));
        assert!(!made_by(Some(&labels(&[("app", "x")])), "platform", "web"));
        assert!(!made_by(None, "platform", "web"));
    }

    #[test]
    fn namespace_scope_binds_a_role_to_the_manager() {
        let t = TransformIdentity {
            name: "webservice",
            namespace: "platform",
            owner: None,
        };
        let manager = manager();
        let Generated::Namespace(generated) = generate(RbacScope::Namespace, &t, rules(&[], &SERVED), &manager) else {
            panic!("want a Role");
        };
        let (role, binding) = *generated;
        assert_eq!(role.metadata.namespace.as_deref(), Some("platform"));
        assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
        let subject = &binding.subjects.unwrap()[0];
        assert_eq!(
            (subject.name.as_str(), subject.namespace.as_deref()),
            ("sa", Some("pequod-system"))
        );
    }

    #[test]
    fn required_access_lists_each_verb_where_the_scope_needs_it() {
        let managed = vec![ManagedResource {
            api_group: Some("apps".into()),
            resources: vec!["deployments".into()],
        }];
        let rules = rules(&managed, &SERVED);
        let cluster = required_access(&rules, RbacScope::Cluster, "platform");
        assert_eq!(cluster.len(), 7 + 5 + 2 * 3);
        assert!(cluster.iter().all(|a| a.namespace.is_none()));
        let status_update = Access {
            group: "apps.example.com".into(),
            resource: "webservices".into(),
            subresource: Some("status".into()),
            verb: "update".into(),
            namespace: None,
        };
        assert!(cluster.contains(&status_update));
        let namespaced = required_access(&rules, RbacScope::Namespace, "platform");
        assert!(namespaced.iter().all(|a| a.namespace.as_deref() == Some("platform")));
        assert!(
            !namespaced
                .iter()
                .chain(&cluster)
                .any(|a| a.verb == "escalate" || a.verb == "bind")
        );
    }

    #[test]
    fn missing_access_is_told_per_resource() {
        let access = |group: &str, resource: &str, verb: &str, namespace: Option<&str>| Access {
            group: group.into(),
            resource: resource.into(),
            subresource: None,
            verb: verb.into(),
            namespace: namespace.map(String::from),
        };
        let missing = [
            access("", "configmaps", "create", None),
            access("", "configmaps", "delete", None),
            access("apps", "deployments", "get", Some("team-a")),
        ];
        assert_eq!(
            describe_missing(&missing),
            "create,delete configmaps in every namespace; get deployments.apps in namespace team-a"
        );
    }

    #[test]
    fn the_pull_secret_role_reads_one_secret_in_the_transform_namespace() {
        let t = TransformIdentity {
            name: "web",
            namespace: "platform",
            owner: None,
        };
        let manager = manager();
        let (role, binding) = pull_secret_access(&t, "registry", &manager);
        let rule = &role.rules.unwrap()[0];
        assert_eq!(rule.resource_names, Some(vec!["registry".to_string()]));
        assert_eq!(rule.verbs, vec!["get".to_string()]);
        assert_eq!(role.metadata.namespace.as_deref(), Some("platform"));
        assert_eq!(binding.role_ref.name, "pequod-transform-web-pull-secret");
        assert!(made_by(role.metadata.labels.as_ref(), "platform", "web"));
    }
}
