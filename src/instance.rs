//! Platform instances, the pure parts: names, labels and the ResourceGraph rendered from an
//! instance.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use sha2::{Digest, Sha256};

use crate::api::{ResourceGraph, ResourceGraphSpec, SourceRef};
use crate::crd::{MANAGED_BY_LABEL, MANAGED_BY_VALUE, TRANSFORM_LABEL};
use crate::cue::RenderOutput;

pub const INSTANCE_LABEL: &str = "pequod.io/instance";
pub const INSTANCE_KIND_LABEL: &str = "pequod.io/instance-kind";

/// Identity of an instance of a generated kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRef {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub namespace: String,
    pub uid: Option<String>,
}

/// Name of an instance's ResourceGraph: `<kind>-<name>` in lower case, so that instances of
/// different kinds with the same name never share a graph. Names that would exceed the
/// apiserver's limit are shortened with a hash suffix.
pub fn graph_name(kind: &str, name: &str) -> String {
    const MAX: usize = 253;
    let full = format!("{}-{}", kind.to_ascii_lowercase(), name);
    if full.len() <= MAX {
        return full;
    }
    let hash = hex::encode(Sha256::digest(full.as_bytes()));
    format!("{}-{}", full[..MAX - 17].trim_end_matches(['-', '.']), &hash[..16])
}

/// Hash over everything a render depends on: the module's content and the input.
pub fn render_hash(module_digest: &str, input_hash: &str) -> String {
    let digest = Sha256::digest(format!("{module_digest}\n{input_hash}").as_bytes());
    format!("sha256:{}", hex::encode(digest))
}

/// The ResourceGraph an instance renders to, owned by the instance when its uid is known.
pub fn resource_graph(
    instance: &InstanceRef,
    transform: &str,
    render_hash: &str,
    output: &RenderOutput,
    rendered_at: Time,
) -> ResourceGraph {
    let labels = BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
        (TRANSFORM_LABEL.to_string(), transform.to_string()),
        (INSTANCE_LABEL.to_string(), instance.name.clone()),
        (INSTANCE_KIND_LABEL.to_string(), instance.kind.clone()),
    ]);
    let owner = instance.uid.as_ref().map(|uid| OwnerReference {
        api_version: instance.api_version.clone(),
        kind: instance.kind.clone(),
        name: instance.name.clone(),
        uid: uid.clone(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    });
    ResourceGraph {
        metadata: ObjectMeta {
            name: Some(graph_name(&instance.kind, &instance.name)),
            namespace: Some(instance.namespace.clone()),
            labels: Some(labels),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        spec: ResourceGraphSpec {
            source_ref: Some(SourceRef {
                api_version: instance.api_version.clone(),
                kind: instance.kind.clone(),
                name: instance.name.clone(),
                namespace: Some(instance.namespace.clone()),
                uid: instance.uid.clone(),
            }),
            metadata: output.metadata.clone(),
            nodes: output.nodes.clone(),
            violations: output.violations.clone(),
            render_hash: Some(render_hash.to_string()),
            rendered_at: Some(rendered_at),
        },
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_names_separate_kinds_and_stay_within_limits() {
        assert_eq!(graph_name("WebService", "my-app"), "webservice-my-app");
        assert_ne!(graph_name("WebService", "x"), graph_name("Worker", "x"));
        let long = graph_name("WebService", &"a".repeat(300));
        assert_eq!(long.len(), 253);
        assert_ne!(long, graph_name("WebService", &"a".repeat(299)));
    }

    #[test]
    fn graph_is_labelled_owned_and_hashed() {
        let instance = InstanceRef {
            api_version: "apps.example.com/v1alpha1".into(),
            kind: "WebService".into(),
            name: "my-app".into(),
            namespace: "team".into(),
            uid: Some("uid-1".into()),
        };
        let output = RenderOutput {
            metadata: None,
            nodes: Vec::new(),
            violations: Vec::new(),
        };
        let hash = render_hash("sha256:m", "sha256:i");
        assert_ne!(hash, render_hash("sha256:m2", "sha256:i"));
        let now = Time(jiff::Timestamp::UNIX_EPOCH);
        let rg = resource_graph(&instance, "webservice", &hash, &output, now);
        let labels = rg.metadata.labels.unwrap();
        assert_eq!(labels[INSTANCE_LABEL], "my-app");
        assert_eq!(labels[INSTANCE_KIND_LABEL], "WebService");
        assert_eq!(labels[TRANSFORM_LABEL], "webservice");
        let owner = &rg.metadata.owner_references.unwrap()[0];
        assert_eq!((owner.uid.as_str(), owner.controller), ("uid-1", Some(true)));
        assert_eq!(rg.spec.render_hash.as_deref(), Some(hash.as_str()));
        assert_eq!(rg.metadata.namespace.as_deref(), Some("team"));
    }
}
