//! Finalizers, added and removed guarded by the resourceVersion.

use super::error::Error;

/// `obj` with `finalizer` on it: as it is, or as returned by adding the finalizer.
pub async fn finalized<'a, K>(api: &kube::Api<K>, obj: &'a K, finalizer: &str) -> Result<std::borrow::Cow<'a, K>, Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    use kube::ResourceExt;
    if obj.finalizers().iter().any(|f| f == finalizer) {
        Ok(std::borrow::Cow::Borrowed(obj))
    } else {
        add_finalizer(api, obj, finalizer).await.map(std::borrow::Cow::Owned)
    }
}

/// Finalizer patches are Pequod's, named so in the object's `managedFields`.
fn finalizer_params() -> kube::api::PatchParams {
    kube::api::PatchParams {
        field_manager: Some(crate::api::names::FINALIZER_MANAGER.to_string()),
        ..Default::default()
    }
}

/// Adds `finalizer` to `obj`. The resourceVersion makes the patch fail rather than race
/// another writer of the list.
pub async fn add_finalizer<K>(api: &kube::Api<K>, obj: &K, finalizer: &str) -> Result<K, Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    use kube::ResourceExt;
    let finalizers: Vec<String> = obj
        .finalizers()
        .iter()
        .cloned()
        .chain([finalizer.to_string()])
        .collect();
    let patch = serde_json::json!({"metadata": {"finalizers": finalizers, "resourceVersion": obj.resource_version()}});
    Ok(api
        .patch(&obj.name_any(), &finalizer_params(), &kube::api::Patch::Merge(patch))
        .await?)
}

/// Removes `finalizer` from `obj`, guarded by its resourceVersion like [`add_finalizer`].
pub async fn remove_finalizer<K>(api: &kube::Api<K>, obj: &K, finalizer: &str) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    use kube::ResourceExt;
    let finalizers: Vec<String> = obj.finalizers().iter().filter(|f| *f != finalizer).cloned().collect();
    let patch = serde_json::json!({"metadata": {"finalizers": finalizers, "resourceVersion": obj.resource_version()}});
    match api
        .patch(&obj.name_any(), &finalizer_params(), &kube::api::Patch::Merge(patch))
        .await
    {
        Ok(_) => Ok(()),
        // Already gone: the finalizer was the last thing holding it.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
