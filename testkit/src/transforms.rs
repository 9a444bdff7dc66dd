//! Transforms in a test's namespace: apply, read their conditions, wait for them, delete.
//!
//! CRDs are cluster-scoped, so every test generates its kinds in an API group of its own
//! ([`group`]).

use std::time::Duration;

use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use pequod::api::{Condition, Transform};
use serde_json::{Value, json};

use crate::{TEST_MANAGER, TestEnv, wait_for};

/// Generous: on a loaded 2-core machine cue calls queue behind each other.
pub const WAIT: Duration = Duration::from_secs(120);

/// A fresh namespace for `test`, the shared operator, and the Transforms of the namespace.
pub async fn setup(test: &str) -> (TestEnv, Api<Transform>) {
    let env = crate::env(test).await;
    crate::operator(&env.client).await;
    let transforms = Api::namespaced(env.client.clone(), &env.namespace);
    (env, transforms)
}

/// An API group of the test's own.
pub fn group(env: &TestEnv) -> String {
    format!("{}.test.example.com", env.namespace)
}

/// Server-side applies Transform `name` with `spec`.
pub async fn apply_transform(transforms: &Api<Transform>, name: &str, spec: Value) {
    let t = json!({
        "apiVersion": "platform.platform.example.com/v1alpha1",
        "kind": "Transform",
        "metadata": {"name": name},
        "spec": spec,
    });
    transforms
        .patch(name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(t))
        .await
        .unwrap_or_else(|e| panic!("apply Transform {name}: {e}"));
}

/// Deletes Transform `name` and waits until it is gone (its finalizer included).
pub async fn delete_transform(transforms: &Api<Transform>, name: &str) {
    transforms.delete(name, &DeleteParams::default()).await.unwrap();
    wait_for(&format!("Transform {name} to be gone"), WAIT, || async {
        match transforms.get_opt(name).await {
            Ok(None) => Ok(()),
            other => Err(format!("{:?}", other.map(|t| t.map(|t| t.status)))),
        }
    })
    .await;
}

/// The Transform's condition `type_`, if it has one.
pub fn condition<'a>(t: &'a Transform, type_: &str) -> Option<&'a Condition> {
    t.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

/// Waits until the Transform's condition `type_` has `status` and `reason`; returns it.
pub async fn wait_condition(
    transforms: &Api<Transform>,
    name: &str,
    type_: &str,
    status: bool,
    reason: &str,
) -> Transform {
    let want = if status { "True" } else { "False" };
    wait_for(&format!("Transform {name} {type_}={want} ({reason})"), WAIT, || async {
        let t = transforms.get(name).await.map_err(|e| e.to_string())?;
        match condition(&t, type_) {
            Some(c) if c.is_true() == status && c.reason == reason => Ok(t),
            other => Err(format!(
                "{other:?}; phase {:?}",
                t.status.as_ref().and_then(|s| s.phase)
            )),
        }
    })
    .await
}

/// Waits until the Transform's condition `type_` is False with `reason`; returns the
/// Transform and the condition's message.
pub async fn failed(transforms: &Api<Transform>, name: &str, type_: &str, reason: &str) -> (Transform, String) {
    let t = wait_condition(transforms, name, type_, false, reason).await;
    let message = condition(&t, type_).map(|c| c.message.clone()).unwrap_or_default();
    (t, message)
}
