//! What the controllers' caches hold: what their decisions read, and no more. Every object is
//! trimmed as it arrives from its watch, before it is stored.
//!
//! | Cache | Holds |
//! |---|---|
//! | Transforms | whole, without `managedFields` |
//! | a generated kind's instances | whole, without `managedFields`, their body as its JSON text (with `--shards`, those of the shards held) |
//! | a generated kind's instances, for its rollout on a sharded leader | name, labels, the pin annotation, `status.moduleDigest` and `status.phase` |
//! | ResourceGraphs (the graph controller's, also read by the instance controllers) | whole, without `managedFields`; each node's object as its JSON text |
//! | objects graphs applied, one per kind (see [`super::watches`]) | objects labelled by Pequod whose graph exists, their body (all but `apiVersion`, `kind` and `metadata`) as its JSON text; of `managedFields` only each entry's manager and operation, and the field set of `Apply` entries as one JSON text |
//!
//! No decision reads the field sets of instances, graphs or Transforms (the counts of
//! `status.versions` come from a list of their own). The executor reads applied objects'
//! managers (who else writes the object) and the field set its own manager applied (fields a
//! node no longer declares); `Update` entries' field sets and every entry's time are never read.
//!
//! **Bodies as text.** A `serde_json` tree costs a B-tree node of about 640 bytes for every
//! JSON object in it, however small: a three-key ConfigMap took more than a KiB, a node's
//! object several. What is read only when a pass works on one object (an applied object's
//! body, a graph's node objects, an applied field set) is therefore held as its JSON text and
//! parsed by the pass that reads it ([`unpacked_object`], [`unpacked_graph`]): a few
//! microseconds a pass, against about 10 KiB held per instance.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1;
use kube::Resource;
use kube::api::DynamicObject;
use serde_json::Value;

use crate::api::ResourceGraph;

/// Drops `metadata.managedFields`: for objects whose field ownership no decision reads.
pub fn without_managed_fields<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

/// Keeps of an instance what a rollout reads of every instance of its kind ([`super::rollout_driver::member`]):
/// the leader of replicas sharing the instances holds all of them, and nothing else of them.
pub fn rollout_projection(obj: &mut DynamicObject) {
    let meta = &mut obj.metadata;
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.annotations = meta.annotations.take().and_then(|annotations| {
        let kept: std::collections::BTreeMap<String, String> = annotations
            .into_iter()
            .filter(|(k, _)| k == crate::api::names::PIN_ANNOTATION)
            .collect();
        (!kept.is_empty()).then_some(kept)
    });
    let status = obj.data.get("status");
    let field = |name: &str| status.and_then(|s| s.get(name)).cloned();
    let mut kept = serde_json::Map::new();
    for name in ["moduleDigest", "phase"] {
        if let Some(value) = field(name) {
            kept.insert(name.to_string(), value);
        }
    }
    obj.data = serde_json::json!({ "status": kept });
}

/// Keeps of an applied object's `managedFields` what the executor reads: each entry's manager
/// and operation, and the field sets of `Apply` entries.
pub fn trim_applied(obj: &mut DynamicObject) {
    for entry in obj.metadata.managed_fields.iter_mut().flatten() {
        entry.time = None;
        entry.fields_type = None;
        entry.fields_v1 = match entry.operation.as_deref() {
            Some("Apply") => entry
                .fields_v1
                .take()
                .map(|fields| FieldsV1(serde_json::Value::String(fields.0.to_string()))),
            _ => None,
        };
    }
}

/// Holds a graph's node objects as their JSON text (see the module's notes); read through
/// [`unpacked_graph`].
pub fn packed_graph(graph: &mut ResourceGraph) {
    without_managed_fields(graph);
    for node in &mut graph.spec.graph.nodes {
        pack(&mut node.object);
    }
}

/// The graph as it was before [`packed_graph`]; a graph that was not packed is returned as it is.
pub fn unpacked_graph(graph: &ResourceGraph) -> ResourceGraph {
    let mut graph = graph.clone();
    for node in &mut graph.spec.graph.nodes {
        unpack(&mut node.object);
    }
    graph
}

/// Drops an instance's `managedFields` and holds its body as its JSON text; read through
/// [`unpacked_object`] or [`body_fields`].
pub fn packed_instance(obj: &mut DynamicObject) {
    without_managed_fields(obj);
    pack(&mut obj.data);
}

/// The fields `T` declares of an object's body, held as text or not; `T::default()` when they
/// do not read as `T`.
pub fn body_fields<T: serde::de::DeserializeOwned + Default>(obj: &DynamicObject) -> T {
    match &obj.data {
        Value::String(text) => serde_json::from_str(text).unwrap_or_default(),
        body => T::deserialize(body).unwrap_or_default(),
    }
}

/// Trims an applied object ([`trim_applied`]) and holds its body as its JSON text; read
/// through [`unpacked_object`].
pub fn packed_applied(obj: &mut DynamicObject) {
    trim_applied(obj);
    pack(&mut obj.data);
}

/// The object as it was before [`packed_applied`] (its `managedFields` trimmed); an object
/// that was not packed is returned as it is.
pub fn unpacked_object(obj: &DynamicObject) -> DynamicObject {
    let mut obj = obj.clone();
    unpack(&mut obj.data);
    obj
}

/// A JSON object as its text. Only objects are packed: a graph's node object and a
/// Kubernetes object's body always are one, so a string found where one belongs is packed.
fn pack(value: &mut Value) {
    if value.is_object() {
        *value = Value::String(value.to_string());
    }
}

fn unpack(value: &mut Value) {
    if let Value::String(text) = value
        && let Ok(object @ Value::Object(_)) = serde_json::from_str::<Value>(text)
    {
        *value = object;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;
    use serde_json::json;

    fn object() -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "x", "namespace": "team", "managedFields": [
                {"manager": "pequod-uid", "operation": "Apply", "time": "2026-01-01T00:00:00Z",
                 "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {"f:a": {}}}},
                {"manager": "kubectl-edit", "operation": "Update", "time": "2026-01-01T00:00:00Z",
                 "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {"f:b": {}}}}
            ]},
            "data": {"a": "1", "b": "2"}
        }))
        .unwrap()
    }

    #[test]
    fn applied_objects_keep_managers_operations_and_applied_field_sets() {
        let mut obj = object();
        trim_applied(&mut obj);
        let trimmed = serde_json::to_value(&obj).unwrap();
        assert_eq!(
            trimmed["metadata"]["managedFields"],
            json!([
                {"manager": "pequod-uid", "operation": "Apply", "fieldsV1": r#"{"f:data":{"f:a":{}}}"#},
                {"manager": "kubectl-edit", "operation": "Update"}
            ])
        );
        assert_eq!(trimmed["data"], json!({"a": "1", "b": "2"}), "the body is kept whole");
        // What the executor decides from is unchanged by the trimming.
        let (before, after) = (serde_json::to_value(object()).unwrap(), trimmed);
        assert_eq!(
            crate::executor::object::stale_field(&before, &json!({"data": {}}), "pequod-uid"),
            crate::executor::object::stale_field(&after, &json!({"data": {}}), "pequod-uid")
        );
        assert_eq!(
            crate::executor::object::stale_field(&after, &json!({"data": {}}), "pequod-uid").as_deref(),
            Some("data.a")
        );
        assert_eq!(
            crate::executor::object::other_managers(&object(), "pequod-uid"),
            crate::executor::object::other_managers(&obj, "pequod-uid")
        );
    }

    #[test]
    fn owned_objects_lose_their_field_ownership() {
        let mut obj = object();
        without_managed_fields(&mut obj);
        assert!(obj.metadata.managed_fields.is_none());
        assert_eq!(obj.data["data"]["a"], "1");
    }

    #[test]
    fn a_rollout_keeps_of_an_instance_what_it_reads() {
        let mut obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "apps.example.com/v1", "kind": "WebService",
            "metadata": {"name": "a", "namespace": "team", "labels": {"tier": "gold"},
                "annotations": {"pequod.io/pinned-module-digest": "sha256:aa", "big": "x"}},
            "spec": {"image": "nginx"},
            "status": {"moduleDigest": "sha256:bb", "phase": "Ready", "conditions": []}
        }))
        .unwrap();
        let before = crate::controller::rollout_driver::member(&obj);
        rollout_projection(&mut obj);
        let after = crate::controller::rollout_driver::member(&obj);
        assert_eq!(format!("{before:?}"), format!("{after:?}"));
        assert_eq!(
            obj.data,
            serde_json::json!({"status": {"moduleDigest": "sha256:bb", "phase": "Ready"}})
        );
        assert_eq!(obj.annotations().len(), 1);
    }

    #[test]
    fn applied_bodies_are_held_as_text_and_read_back_whole() {
        let mut obj = object();
        packed_applied(&mut obj);
        assert!(obj.data.is_string(), "the body is held as its text");
        let mut trimmed = object();
        trim_applied(&mut trimmed);
        let read = unpacked_object(&obj);
        assert_eq!(read.data, json!({"data": {"a": "1", "b": "2"}}));
        assert_eq!(
            serde_json::to_value(&read).unwrap(),
            serde_json::to_value(&trimmed).unwrap()
        );
        // An object that was never packed reads as it is.
        assert_eq!(unpacked_object(&object()).data, object().data);
    }

    #[test]
    fn graphs_hold_node_objects_as_text_and_read_back_as_written() {
        let graph: ResourceGraph = serde_json::from_value(json!({
            "apiVersion": "platform.platform.example.com/v1alpha1", "kind": "ResourceGraph",
            "metadata": {"name": "g", "namespace": "team", "managedFields": [{"manager": "m"}]},
            "spec": {"graph": {"nodes": [
                {"id": "a", "resource": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "v"}}},
                {"id": "b", "resource": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}}, "dependencies": ["a"]}
            ]}}
        }))
        .unwrap();
        let mut packed = graph.clone();
        packed_graph(&mut packed);
        assert!(packed.spec.graph.nodes.iter().all(|n| n.object.is_string()));
        assert!(packed.metadata.managed_fields.is_none());
        let read = unpacked_graph(&packed);
        let mut expected = graph.clone();
        without_managed_fields(&mut expected);
        assert_eq!(read.spec, expected.spec, "what a pass reads, and signs, is unchanged");
        assert_eq!(read.spec.graph.nodes[0].name(), "a");
    }

    #[test]
    fn instances_are_held_as_text_and_a_rollout_reads_its_fields_from_it() {
        let instance = || -> DynamicObject {
            serde_json::from_value(json!({
                "apiVersion": "apps.example.com/v1", "kind": "WebService",
                "metadata": {"name": "a", "namespace": "team", "managedFields": [{"manager": "m"}],
                    "annotations": {"pequod.io/pinned-module-digest": "sha256:aa"}},
                "spec": {"image": "nginx"},
                "status": {"moduleDigest": "sha256:bb", "phase": "Ready", "conditions": [{"type": "Ready"}]}
            }))
            .unwrap()
        };
        let mut packed = instance();
        packed_instance(&mut packed);
        assert!(packed.data.is_string() && packed.metadata.managed_fields.is_none());
        let member = crate::controller::rollout_driver::member;
        assert_eq!(format!("{:?}", member(&packed)), format!("{:?}", member(&instance())));
        assert_eq!(unpacked_object(&packed).data, instance().data);
        #[derive(serde::Deserialize, Default, PartialEq, Debug)]
        struct Spec {
            spec: Value,
        }
        assert_eq!(body_fields::<Spec>(&packed), body_fields::<Spec>(&instance()));
        assert_eq!(body_fields::<Spec>(&packed).spec, json!({"image": "nginx"}));
    }
}
