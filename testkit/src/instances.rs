//! Instances of the kinds a Transform serves: apply them, read their conditions, wait for them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::transforms::WAIT;
use crate::{TEST_MANAGER, wait_for};

/// Server-side applies instance `name` of `kind` with `spec`.
pub async fn apply_instance(api: &Api<DynamicObject>, api_version: &str, kind: &str, name: &str, spec: Value) {
    let obj = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name}, "spec": spec});
    api.patch(name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(obj))
        .await
        .unwrap_or_else(|e| panic!("apply {kind} {name}: {e}"));
}

/// The instance's condition `type_` as (status, reason, message), if it has one.
pub fn instance_condition(obj: &DynamicObject, type_: &str) -> Option<(String, String, String)> {
    obj.data
        .pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
                c["message"].as_str().unwrap_or_default().to_string(),
            )
        })
}

/// Waits until the instance's condition `type_` is `status` with `reason`; returns the instance.
pub async fn wait_instance(
    api: &Api<DynamicObject>,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> DynamicObject {
    wait_for(&format!("{name} {type_}={status} ({reason})"), WAIT, || async {
        let obj = api.get(name).await.map_err(|e| e.to_string())?;
        match instance_condition(&obj, type_) {
            Some((s, r, _)) if s == status && r == reason => Ok(obj),
            other => Err(format!("{other:?}; status {:?}", obj.data.get("status"))),
        }
    })
    .await
}

/// The data of ConfigMap `name`, if it exists.
pub async fn config_data(client: &Client, namespace: &str, name: &str) -> Option<BTreeMap<String, String>> {
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|cm| cm.data)
}
