//! Names a generated kind must not take: built-in Kubernetes kinds, their resource and short
//! names (`kubectl get deploy` must keep meaning Deployments), and built-in API groups.

use super::{CrdError, KindNames};

/// Built-in kinds with their plural and short names, as served by a Kubernetes apiserver.
const BUILTIN: &[(&str, &str, &[&str])] = &[
    ("Binding", "bindings", &[]),
    ("ComponentStatus", "componentstatuses", &["cs"]),
    ("ConfigMap", "configmaps", &["cm"]),
    ("Endpoints", "endpoints", &["ep"]),
    ("Event", "events", &["ev"]),
    ("LimitRange", "limitranges", &["limits"]),
    ("Namespace", "namespaces", &["ns"]),
    ("Node", "nodes", &["no"]),
    ("PersistentVolumeClaim", "persistentvolumeclaims", &["pvc"]),
    ("PersistentVolume", "persistentvolumes", &["pv"]),
    ("Pod", "pods", &["po"]),
    ("PodTemplate", "podtemplates", &[]),
    ("ReplicationController", "replicationcontrollers", &["rc"]),
    ("ResourceQuota", "resourcequotas", &["quota"]),
    ("Secret", "secrets", &[]),
    ("ServiceAccount", "serviceaccounts", &["sa"]),
    ("Service", "services", &["svc"]),
    ("MutatingWebhookConfiguration", "mutatingwebhookconfigurations", &[]),
    ("ValidatingWebhookConfiguration", "validatingwebhookconfigurations", &[]),
    (
        "CustomResourceDefinition",
        "customresourcedefinitions",
        &["crd", "crds"],
    ),
    ("APIService", "apiservices", &[]),
    ("ControllerRevision", "controllerrevisions", &[]),
    ("DaemonSet", "daemonsets", &["ds"]),
    ("Deployment", "deployments", &["deploy"]),
    ("ReplicaSet", "replicasets", &["rs"]),
    ("StatefulSet", "statefulsets", &["sts"]),
    ("TokenReview", "tokenreviews", &[]),
    ("LocalSubjectAccessReview", "localsubjectaccessreviews", &[]),
    ("SelfSubjectAccessReview", "selfsubjectaccessreviews", &[]),
    ("SelfSubjectRulesReview", "selfsubjectrulesreviews", &[]),
    ("SubjectAccessReview", "subjectaccessreviews", &[]),
    ("HorizontalPodAutoscaler", "horizontalpodautoscalers", &["hpa"]),
    ("CronJob", "cronjobs", &["cj"]),
    ("Job", "jobs", &[]),
    ("CertificateSigningRequest", "certificatesigningrequests", &["csr"]),
    ("Lease", "leases", &[]),
    ("EndpointSlice", "endpointslices", &[]),
    ("FlowSchema", "flowschemas", &[]),
    ("PriorityLevelConfiguration", "prioritylevelconfigurations", &[]),
    ("IngressClass", "ingressclasses", &[]),
    ("Ingress", "ingresses", &["ing"]),
    ("NetworkPolicy", "networkpolicies", &["netpol"]),
    ("RuntimeClass", "runtimeclasses", &[]),
    ("PodDisruptionBudget", "poddisruptionbudgets", &["pdb"]),
    ("PodSecurityPolicy", "podsecuritypolicies", &["psp"]),
    ("ClusterRoleBinding", "clusterrolebindings", &[]),
    ("ClusterRole", "clusterroles", &[]),
    ("RoleBinding", "rolebindings", &[]),
    ("Role", "roles", &[]),
    ("PriorityClass", "priorityclasses", &["pc"]),
    ("CSIDriver", "csidrivers", &[]),
    ("CSINode", "csinodes", &[]),
    ("CSIStorageCapacity", "csistoragecapacities", &[]),
    ("StorageClass", "storageclasses", &["sc"]),
    ("VolumeAttachment", "volumeattachments", &[]),
];

/// Groups owned by Kubernetes or by Pequod itself.
fn is_reserved_group(group: &str) -> bool {
    const BUILTIN_GROUPS: &[&str] = &[
        "apps",
        "batch",
        "autoscaling",
        "policy",
        "extensions",
        "platform.platform.example.com",
    ];
    BUILTIN_GROUPS.contains(&group) || group == "k8s.io" || group.ends_with(".k8s.io")
}

/// Refuses names that would shadow or be shadowed by built-in resources.
pub fn check(group: &str, names: &KindNames) -> Result<(), CrdError> {
    if is_reserved_group(group) {
        return Err(CrdError::ReservedGroup(group.to_string()));
    }
    for (kind, plural, short_names) in BUILTIN {
        if names.kind == *kind || names.plural == *plural || names.singular == kind.to_ascii_lowercase() {
            return Err(CrdError::BuiltinKind(names.kind.clone(), (*kind).to_string()));
        }
        if let Some(taken) = names
            .short_names
            .iter()
            .find(|s| short_names.contains(&s.as_str()) || *s == plural)
        {
            return Err(CrdError::ShortNameTaken(taken.clone(), (*kind).to_string()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(kind: &str, plural: &str, short: &[&str]) -> KindNames {
        KindNames {
            kind: kind.into(),
            plural: plural.into(),
            singular: kind.to_ascii_lowercase(),
            short_names: short.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn platform_kinds_pass() {
        assert_eq!(check("pequod.io", &names("WebService", "webservices", &["ws"])), Ok(()));
        assert_eq!(check("apps.example.com", &names("Worker", "workers", &[])), Ok(()));
    }

    #[test]
    fn builtin_kinds_and_names_are_refused() {
        assert_eq!(
            check("pequod.io", &names("Deployment", "deployments", &[])),
            Err(CrdError::BuiltinKind("Deployment".into(), "Deployment".into()))
        );
        assert_eq!(
            check("pequod.io", &names("MyPods", "pods", &[])),
            Err(CrdError::BuiltinKind("MyPods".into(), "Pod".into()))
        );
        assert_eq!(
            check("pequod.io", &names("WebService", "webservices", &["svc"])),
            Err(CrdError::ShortNameTaken("svc".into(), "Service".into()))
        );
    }

    #[test]
    fn builtin_groups_are_refused() {
        for group in ["apps", "networking.k8s.io", "platform.platform.example.com"] {
            assert_eq!(
                check(group, &names("WebService", "webservices", &[])),
                Err(CrdError::ReservedGroup(group.into()))
            );
        }
    }
}
