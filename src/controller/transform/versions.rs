//! The versions of a generated kind: the conversion webhook its CRD names, the round trip of
//! every stored instance before a CRD with new conversions is written, the rewrite of stored
//! instances into a new storage version, and the version each instance was last written in.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, Time};
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::status::TransformStop;
use super::{Context, StatusUpdate};
use crate::api::condition_types::{CRD_GENERATED, SCHEMA_COMPATIBLE};
use crate::api::names::{FINALIZER_MANAGER, INSTANCE_MANAGER, STORAGE_MIGRATION_MANAGER};
use crate::api::{
    RbacScope, StorageMigration, StorageMigrationPhase, Transform, TransformStatus, VersionStatus, reasons,
};
use crate::conversion::published;
use crate::crd::CrdError;
use crate::cue::{Module, ModuleFiles, ModuleSchema};
use crate::error::ErrorCategory;

/// How long after the storage version changed rewriting starts: every apiserver must have
/// seen the new CRD, or a rewrite could store the old version again.
const MIGRATION_SETTLE: Duration = Duration::from_secs(5);
/// Instances rewritten per reconcile; the status records the progress after each chunk.
const MIGRATION_CHUNK: usize = 100;
/// Pause between two rewrites: at most 50 writes a second.
const MIGRATION_PACE: Duration = Duration::from_millis(20);
/// When the next chunk starts.
const MIGRATION_NEXT_CHUNK: Duration = Duration::from_millis(100);
/// When a migration that could not complete passes over the instances again.
const MIGRATION_RETRY: Duration = Duration::from_secs(60);
/// Failing instances a refused round trip names.
const MAX_NAMED: usize = 10;

/// The webhook client config of `t`'s CRD: none for a kind of one version; refused when the
/// module's versions cannot be served; waiting while the webhook's CA is not known yet.
pub(super) fn conversion_config(
    ctx: &Context,
    t: &Transform,
    (module, schema): (&Module, &ModuleSchema),
    settled: &Action,
) -> Result<Option<WebhookClientConfig>, TransformStop> {
    let webhook = ctx.conversion_webhook.as_ref();
    crate::crd::check_versions(schema, &t.spec.version, webhook.is_some()).map_err(|e: CrdError| {
        TransformStop::failed(
            CRD_GENERATED,
            e.reason(),
            e.to_string(),
            reasons::CRD_GENERATION_FAILED,
            settled.clone(),
        )
    })?;
    let Some(webhook) = webhook.filter(|_| schema.versions.len() > 1) else {
        return Ok(None);
    };
    match webhook.client_config(&t.namespace().unwrap_or_default(), &t.name_any(), &module.digest) {
        Some(client_config) => Ok(Some(client_config)),
        // The webhook's certificate Secret is not read yet.
        None => Err(TransformStop::Waiting(Action::requeue(Duration::from_secs(2)))),
    }
}

/// Publishes the module, once the CRD that names it passed its checks and before it is
/// written: for every replica's conversion webhook when the module declares several versions,
/// and (`--shards`) for the replicas that render its instances. The module the CRD named until
/// now stays published until the next one serves; with `--shards`, every version served stays
/// (instances stay on them or are pinned to them).
pub(super) async fn publish_module(
    ctx: &Context,
    t: &Transform,
    old: &TransformStatus,
    (schema, files): (&ModuleSchema, &ModuleFiles),
    settled: &Action,
) -> Result<(), TransformStop> {
    let converts = schema.versions.len() > 1 && ctx.conversion_webhook.is_some();
    if !converts && !ctx.publish_modules {
        return Ok(());
    }
    let mut keep: Vec<String> = old.resolved_cue_ref.iter().map(|r| r.digest.clone()).collect();
    if ctx.publish_modules {
        keep.extend(old.served_digests.iter().cloned());
    }
    let namespace = t.namespace().unwrap_or_default();
    match published::publish(
        &ctx.client,
        &ctx.manager.namespace,
        files,
        (&namespace, &t.name_any()),
        &keep,
    )
    .await
    {
        Ok(()) => Ok(()),
        Err(published::PublishError::Api(e)) => Err(e.into()),
        Err(e) => Err(TransformStop::failed(
            CRD_GENERATED,
            e.reason(),
            format!("publishing the module: {e}"),
            reasons::CRD_GENERATION_FAILED,
            settled.clone(),
        )),
    }
}

/// The kind `crd` serves, in `version`.
fn instance_resource(crd: &CustomResourceDefinition, version: &str) -> ApiResource {
    ApiResource {
        group: crd.spec.group.clone(),
        version: version.to_string(),
        api_version: format!("{}/{version}", crd.spec.group),
        kind: crd.spec.names.kind.clone(),
        plural: crd.spec.names.plural.clone(),
    }
}

/// The API of `t`'s instances in `version` of `crd`, where the manager may list them.
pub(super) fn instances_api(
    ctx: &Context,
    t: &Transform,
    crd: &CustomResourceDefinition,
    version: &str,
) -> Api<DynamicObject> {
    let resource = instance_resource(crd, version);
    match t.spec.rbac_scope {
        RbacScope::Namespace => Api::namespaced_with(ctx.client.clone(), &t.namespace().unwrap_or_default(), &resource),
        RbacScope::Cluster => Api::all_with(ctx.client.clone(), &resource),
    }
}

/// Instances of the kind `crd` serves, in its storage version, where the manager may list
/// them; none when the kind is not served (any more).
pub(super) async fn count_instances(
    ctx: &Context,
    t: &Transform,
    crd: &CustomResourceDefinition,
) -> Result<usize, kube::Error> {
    let Some(storage) = live_storage_version(crd) else {
        return Ok(0);
    };
    match instances_api(ctx, t, crd, &storage)
        .list_metadata(&ListParams::default())
        .await
    {
        Ok(list) => Ok(list.items.len()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(0),
        Err(e) => Err(e),
    }
}

/// The version the live CRD stores new objects in.
fn live_storage_version(crd: &CustomResourceDefinition) -> Option<String> {
    crd.spec.versions.iter().find(|v| v.storage).map(|v| v.name.clone())
}

/// Refuses a CRD that drops a version objects may still be stored in, with the count of
/// instances not yet rewritten into the storage version.
pub(super) async fn refuse_removing_stored(
    ctx: &Context,
    t: &Transform,
    old: &TransformStatus,
    live: &CustomResourceDefinition,
    desired: &CustomResourceDefinition,
    settled: &Action,
) -> Result<(), TransformStop> {
    let removed = crate::crd::compat::removed_stored_versions(live, desired);
    if removed.is_empty() {
        return Ok(());
    }
    let total = count_instances(ctx, t, live).await? as i64;
    // Mid-pass, the instances not reached yet (and those that failed) may be stored in an
    // earlier version; otherwise any of them may be.
    let remaining = match &old.storage_migration {
        Some(m) if m.phase == StorageMigrationPhase::Migrating && m.last.is_some() => {
            (m.remaining + m.failed.len() as i64).min(total)
        }
        _ => total,
    };
    let message = format!(
        "version(s) {} would be removed, but the CRD's status.storedVersions says objects may be stored in them \
         ({remaining} instance(s) not yet rewritten into the storage version); keep them until \
         status.storageMigration is Complete, or, to rename a version or change it incompatibly, add a new \
         version with a conversion to the module's #Versions (docs/versions.md)",
        removed.join(", ")
    );
    Err(TransformStop::failed(
        SCHEMA_COMPATIBLE,
        reasons::VERSION_STILL_STORED,
        message,
        reasons::VERSION_STILL_STORED,
        settled.clone(),
    ))
}

/// Before a CRD whose conversions change is written: every existing instance, converted from
/// the version it is stored in to each served version and back, must come back the same
/// (fields the module marks `lossy` aside). A failure names the instances and fields.
pub(super) async fn check_round_trips(
    ctx: &Context,
    t: &Transform,
    live: &CustomResourceDefinition,
    module: &Module,
    schema: &ModuleSchema,
    settled: &Action,
) -> Result<(), TransformStop> {
    if schema.versions.len() < 2 {
        return Ok(());
    }
    let Some(stored) = live_storage_version(live).filter(|v| schema.versions.iter().any(|d| d.name == *v)) else {
        return Ok(());
    };
    let instances = match instances_api(ctx, t, live, &stored).list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(kube::Error::Api(s)) if s.code == 404 => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let specs: Vec<serde_json::Value> = instances
        .iter()
        .map(|i| i.data.get("spec").cloned().unwrap_or(serde_json::Value::Null))
        .collect();
    let failures = ctx
        .renderer
        .round_trips(module, &schema.versions, &stored, &specs)
        .await;
    let failing: Vec<String> = instances
        .iter()
        .zip(&failures)
        .filter(|(_, f)| !f.is_empty())
        .map(|(i, f)| {
            format!(
                "{}/{}: {}",
                i.namespace().unwrap_or_default(),
                i.name_any(),
                f.join("; ")
            )
        })
        .collect();
    if failing.is_empty() {
        return Ok(());
    }
    let message = format!(
        "the module's conversions do not round-trip {} of {} instance(s) stored in {stored}; the CRD and the served \
         module stay as they were. Fix #ToStorage/#FromStorage, or list the fields whose loss is intended in the \
         version's `lossy`: {}{}",
        failing.len(),
        instances.len(),
        failing.iter().take(MAX_NAMED).cloned().collect::<Vec<_>>().join(" | "),
        if failing.len() > MAX_NAMED { " | …" } else { "" }
    );
    Err(TransformStop::failed(
        SCHEMA_COMPATIBLE,
        reasons::LOSSY_CONVERSION,
        message,
        reasons::LOSSY_CONVERSION,
        settled.clone(),
    ))
}

/// What a storage migration does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum MigrationStep {
    /// Every object is stored in the storage version; the status keeps what it says.
    Done(Option<StorageMigration>),
    /// The storage version changed: record the start and wait for `Duration`.
    Settle(StorageMigration, Duration),
    /// Rewrite the instances after `last` (all when `None`).
    Rewrite(StorageMigration),
}

/// The next step of moving stored objects into `storage`, from the CRD's `storedVersions` and
/// the progress the status records.
pub(super) fn next_migration_step(
    stored_versions: &[String],
    storage: &str,
    previous: Option<&StorageMigration>,
    now: jiff::Timestamp,
) -> MigrationStep {
    if stored_versions.iter().all(|v| v == storage) {
        return MigrationStep::Done(previous.filter(|m| m.to == storage).map(|m| StorageMigration {
            phase: StorageMigrationPhase::Complete,
            remaining: 0,
            ..m.clone()
        }));
    }
    let current = previous.filter(|m| m.to == storage && m.phase == StorageMigrationPhase::Migrating);
    let Some(current) = current else {
        let started = StorageMigration {
            to: storage.to_string(),
            phase: StorageMigrationPhase::Migrating,
            started: Some(Time(now)),
            ..Default::default()
        };
        return MigrationStep::Settle(started, MIGRATION_SETTLE);
    };
    let since = current.started.as_ref().map_or(MIGRATION_SETTLE, |s| {
        Duration::try_from(now.duration_since(s.0)).unwrap_or_default()
    });
    match MIGRATION_SETTLE.checked_sub(since) {
        Some(left) if !left.is_zero() => MigrationStep::Settle(current.clone(), left),
        _ => MigrationStep::Rewrite(current.clone()),
    }
}

/// `namespace/name`, the order instances are migrated in.
fn instance_key(object: &impl ResourceExt) -> String {
    format!("{}/{}", object.namespace().unwrap_or_default(), object.name_any())
}

/// Moves stored instances into the storage version a chunk at a time, then tells the apiserver
/// (`status.storedVersions`) that only the storage version holds objects. Returns when to come
/// back while it is not done. Records each instance's last-written version in the status.
pub(super) async fn migrate_storage(
    ctx: &Context,
    t: &Transform,
    update: &mut StatusUpdate<'_>,
    crd: &CustomResourceDefinition,
    schema: &ModuleSchema,
    storage: &str,
) -> Result<Option<Duration>, TransformStop> {
    if schema.versions.is_empty() {
        update.new.versions.clear();
        return Ok(None);
    }
    let api = instances_api(ctx, t, crd, storage);
    let mut instances = api.list_metadata(&ListParams::default()).await?.items;
    instances.sort_by_key(instance_key);
    update.new.versions = version_statuses(schema, &instances, &crd.spec.group);

    let stored_versions = crd
        .status
        .as_ref()
        .and_then(|s| s.stored_versions.clone())
        .unwrap_or_default();
    let previous = update.old.storage_migration.clone();
    let mut progress = match next_migration_step(&stored_versions, storage, previous.as_ref(), jiff::Timestamp::now()) {
        MigrationStep::Done(kept) => {
            update.new.storage_migration = kept;
            return Ok(None);
        }
        MigrationStep::Settle(started, wait) => {
            update.new.storage_migration = Some(started);
            return Ok(Some(wait));
        }
        MigrationStep::Rewrite(progress) => progress,
    };
    if progress.last.is_none() {
        // A pass over every instance starts: what failed before is tried again.
        progress.failed.clear();
        progress.message = None;
    }
    // One list in the storage version (one conversion review for what is stored in another)
    // rather than a read per instance; each is written back as listed.
    let mut listed = api.list(&ListParams::default()).await?.items;
    listed.sort_by_key(instance_key);
    let pending: Vec<&DynamicObject> = listed
        .iter()
        .filter(|i| progress.last.as_ref().is_none_or(|last| instance_key(*i) > *last))
        .collect();
    let labels = [t.namespace().unwrap_or_default(), t.name_any()];
    for instance in pending.iter().take(MIGRATION_CHUNK) {
        match rewrite(ctx, crd, storage, instance).await {
            Ok(()) => {
                progress.migrated += 1;
                ctx.metrics
                    .storage_migration_objects_total
                    .with_label_values(&labels)
                    .inc();
            }
            // One instance the apiserver cannot convert or store does not hold up the others;
            // only the code is kept (its message may quote the instance's values).
            Err(kube::Error::Api(e)) => {
                if progress.failed.len() < MAX_NAMED {
                    progress
                        .failed
                        .push(format!("{}: {} {}", instance_key(*instance), e.code, e.reason));
                }
            }
            Err(e) => return Err(e.into()),
        }
        progress.last = Some(instance_key(*instance));
        tokio::time::sleep(MIGRATION_PACE).await;
    }
    progress.remaining = pending.len().saturating_sub(MIGRATION_CHUNK) as i64;
    ctx.metrics
        .storage_migration_remaining
        .with_label_values(&labels)
        .set(progress.remaining);
    if progress.remaining > 0 {
        // The reconcile's status write records the progress: a restart resumes after `last`.
        update.new.storage_migration = Some(progress);
        return Ok(Some(MIGRATION_NEXT_CHUNK));
    }
    let blocker = if progress.failed.is_empty() {
        instances_elsewhere(ctx, t, crd, storage).await?
    } else {
        Some(format!(
            "{} instance(s) could not be rewritten (the first named in `failed`); every instance is tried again",
            progress.failed.len()
        ))
    };
    if let Some(message) = blocker {
        // The next pass starts over; storedVersions keeps the old versions meanwhile.
        progress.last = None;
        progress.message = Some(message);
        update.new.storage_migration = Some(progress);
        return Ok(Some(MIGRATION_RETRY));
    }
    let crds: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
    crds.patch_status(
        &crd.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"storedVersions": [storage]}})),
    )
    .await?;
    progress.phase = StorageMigrationPhase::Complete;
    progress.message = None;
    let message = format!(
        "{} instance(s) rewritten into {storage}; the CRD stores only {storage}",
        progress.migrated
    );
    update.event(EventType::Normal, reasons::STORAGE_MIGRATED, &message);
    update.new.storage_migration = Some(progress);
    Ok(None)
}

/// Why the CRD may still hold objects the migration did not see: a Transform serving one
/// namespace rewrites only that namespace's instances, so the kind's instances elsewhere (its
/// CRD is cluster-wide) must be none, and the manager must be able to tell.
async fn instances_elsewhere(
    ctx: &Context,
    t: &Transform,
    crd: &CustomResourceDefinition,
    storage: &str,
) -> Result<Option<String>, kube::Error> {
    if t.spec.rbac_scope == RbacScope::Cluster {
        return Ok(None);
    }
    let namespace = t.namespace().unwrap_or_default();
    let everywhere: Api<DynamicObject> = Api::all_with(ctx.client.clone(), &instance_resource(crd, storage));
    match everywhere.list_metadata(&ListParams::default()).await {
        Ok(list) => {
            let elsewhere = list
                .items
                .iter()
                .filter(|i| i.namespace().as_deref() != Some(namespace.as_str()))
                .count();
            Ok((elsewhere > 0).then(|| {
                format!(
                    "{elsewhere} instance(s) outside namespace {namespace}, which this Transform serves, may be stored \
                     in an earlier version; storedVersions keeps it until they are gone or rewritten"
                )
            }))
        }
        Err(kube::Error::Api(e)) if e.code == 403 => Ok(Some(format!(
            "the manager may not list the kind outside namespace {namespace}, so it cannot tell that no instance \
             elsewhere is stored in an earlier version; storedVersions keeps them (an administrator may set it)"
        ))),
        Err(e) => Err(e),
    }
}

/// Writes `instance` (as listed in the storage version) back unchanged, which stores it in
/// that version. Someone else writing or deleting it meanwhile did the same (409, 404).
async fn rewrite(
    ctx: &Context,
    crd: &CustomResourceDefinition,
    storage: &str,
    instance: &DynamicObject,
) -> Result<(), kube::Error> {
    let namespace = instance.namespace().unwrap_or_default();
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &namespace, &instance_resource(crd, storage));
    let params = PostParams {
        field_manager: Some(STORAGE_MIGRATION_MANAGER.to_string()),
        ..Default::default()
    };
    match api.replace(&instance.name_any(), &params, instance).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Each version's status, with the instances whose spec was last written in it.
fn version_statuses(
    schema: &ModuleSchema,
    instances: &[PartialObjectMeta<DynamicObject>],
    group: &str,
) -> Vec<VersionStatus> {
    let mut written: BTreeMap<String, i64> = BTreeMap::new();
    for instance in instances {
        let fields = instance.metadata.managed_fields.as_deref().unwrap_or_default();
        if let Some(version) = last_written_version(fields, group) {
            *written.entry(version).or_default() += 1;
        }
    }
    schema
        .versions
        .iter()
        .map(|v| VersionStatus {
            name: v.name.clone(),
            served: v.served,
            storage: v.storage,
            deprecated: v.deprecated,
            instances_last_written: written.get(&v.name).copied().unwrap_or(0),
        })
        .collect()
}

/// The field managers Pequod writes instances with.
const PEQUOD_INSTANCE_WRITERS: &[&str] = &[INSTANCE_MANAGER, FINALIZER_MANAGER, STORAGE_MIGRATION_MANAGER];

/// The version an instance's spec was last written in by its authors: the apiVersion of the
/// newest write that owns spec fields, by anyone but Pequod.
pub(super) fn last_written_version(fields: &[ManagedFieldsEntry], group: &str) -> Option<String> {
    fields
        .iter()
        .filter(|f| f.subresource.as_deref().unwrap_or_default().is_empty())
        .filter(|f| {
            f.fields_v1
                .as_ref()
                .is_some_and(|owned| owned.0.get("f:spec").is_some())
        })
        .filter(|f| !PEQUOD_INSTANCE_WRITERS.contains(&f.manager.as_deref().unwrap_or_default()))
        .max_by_key(|f| f.time.as_ref().map(|t| t.0))
        .and_then(|f| f.api_version.as_deref())
        .and_then(|v| v.strip_prefix(group)?.strip_prefix('/'))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_migration_starts_settles_rewrites_and_completes() {
        let now = ts("2026-12-07T10:00:00Z");
        let stored = vec!["v1alpha1".to_string(), "v1beta1".to_string()];
        let MigrationStep::Settle(started, wait) = next_migration_step(&stored, "v1beta1", None, now) else {
            panic!("a new storage version settles first");
        };
        assert_eq!((started.to.as_str(), wait), ("v1beta1", MIGRATION_SETTLE));
        let later = ts("2026-12-07T10:00:02Z");
        assert!(matches!(
            next_migration_step(&stored, "v1beta1", Some(&started), later),
            MigrationStep::Settle(_, left) if left == Duration::from_secs(3)
        ));
        let resumed = StorageMigration {
            last: Some("team-a/web".into()),
            migrated: 40,
            ..started.clone()
        };
        assert_eq!(
            next_migration_step(&stored, "v1beta1", Some(&resumed), ts("2026-12-07T10:01:00Z")),
            MigrationStep::Rewrite(resumed.clone()),
            "a restart resumes after the last instance rewritten"
        );
        let MigrationStep::Done(Some(done)) =
            next_migration_step(&["v1beta1".to_string()], "v1beta1", Some(&resumed), now)
        else {
            panic!("storedVersions naming only the storage version is done");
        };
        assert_eq!((done.phase, done.migrated), (StorageMigrationPhase::Complete, 40));
        assert_eq!(
            next_migration_step(&["v1".to_string()], "v1", None, now),
            MigrationStep::Done(None)
        );
    }

    #[test]
    fn a_storage_version_changed_again_starts_over() {
        let now = ts("2026-12-07T10:00:00Z");
        let old = StorageMigration {
            to: "v1beta1".into(),
            phase: StorageMigrationPhase::Complete,
            migrated: 9,
            ..Default::default()
        };
        let stored = vec!["v1beta1".to_string(), "v1".to_string()];
        let MigrationStep::Settle(started, _) = next_migration_step(&stored, "v1", Some(&old), now) else {
            panic!("a new target starts a new migration");
        };
        assert_eq!((started.to.as_str(), started.migrated), ("v1", 0));
    }

    fn entry(manager: &str, api_version: &str, time: &str, subresource: Option<&str>) -> ManagedFieldsEntry {
        let owned = if subresource.is_some() {
            serde_json::json!({"f:status": {}})
        } else {
            serde_json::json!({"f:spec": {"f:port": {}}})
        };
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            api_version: Some(api_version.into()),
            time: Some(Time(ts(time))),
            subresource: subresource.map(str::to_string),
            operation: Some("Update".into()),
            fields_v1: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1(owned)),
            ..Default::default()
        }
    }

    #[test]
    fn the_last_write_by_an_author_names_the_version() {
        let fields = vec![
            entry(
                "kubectl-client-side-apply",
                "apps.example.com/v1alpha1",
                "2026-12-01T00:00:00Z",
                None,
            ),
            entry("kubectl-edit", "apps.example.com/v1beta1", "2026-12-02T00:00:00Z", None),
            entry(
                INSTANCE_MANAGER,
                "apps.example.com/v1beta1",
                "2026-12-05T00:00:00Z",
                Some("status"),
            ),
            entry(
                STORAGE_MIGRATION_MANAGER,
                "apps.example.com/v1",
                "2026-12-06T00:00:00Z",
                None,
            ),
        ];
        // A write that owns no spec field (a finalizer or label added) names no version.
        let mut metadata_only = entry("kubectl-label", "apps.example.com/v1", "2026-12-07T00:00:00Z", None);
        metadata_only.fields_v1 = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1(
            serde_json::json!({"f:metadata": {"f:labels": {}}}),
        ));
        let fields: Vec<ManagedFieldsEntry> = fields.into_iter().chain([metadata_only]).collect();
        assert_eq!(
            last_written_version(&fields, "apps.example.com").as_deref(),
            Some("v1beta1")
        );
        assert_eq!(
            last_written_version(&fields[..1], "apps.example.com").as_deref(),
            Some("v1alpha1")
        );
        assert_eq!(last_written_version(&fields[2..], "apps.example.com"), None);
        assert_eq!(last_written_version(&fields[..1], "other.example.com"), None);
    }
}
