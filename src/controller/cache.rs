//! What the controllers' caches hold: what their decisions read, and no more. Every object is
//! trimmed as it arrives from its watch, before it is stored.
//!
//! | Cache | Holds |
//! |---|---|
//! | Transforms | whole, without `managedFields` |
//! | a generated kind's instances | whole, without `managedFields` (with `--shards`, those of the shards held) |
//! | a generated kind's instances, for its rollout on a sharded leader | name, labels, the pin annotation, `status.moduleDigest` and `status.phase` |
//! | ResourceGraphs (the graph controller's, also read by the instance controllers) | whole, without `managedFields` |
//! | objects graphs applied, one per kind (see [`super::watches`]) | objects labelled by Pequod whose graph exists; of `managedFields` only each entry's manager and operation, and the field set of `Apply` entries as one JSON text |
//!
//! No decision reads the field sets of instances, graphs or Transforms (the counts of
//! `status.versions` come from a list of their own). The executor reads applied objects'
//! managers (who else writes the object) and the field set its own manager applied (fields a
//! node no longer declares); `Update` entries' field sets and every entry's time are never read.
//! An applied field set is kept as its JSON text, read only when a pass considers skipping an
//! apply: as a tree of small JSON maps it took several KiB per object, more than the object.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1;
use kube::Resource;
use kube::api::DynamicObject;

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
}
