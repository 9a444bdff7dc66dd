//! Status: what this process wrote, drafts of the next status and their write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use super::error::Error;
use super::events::reconcile_event;
use super::metrics::note_status;
use crate::api::{Condition, ConditionStatus, has_condition, set_condition};

/// The current time at the apiserver's precision (seconds), so that a timestamp written and
/// read back compares equal.
pub fn now() -> Time {
    let ts = jiff::Timestamp::now();
    Time(jiff::Timestamp::from_second(ts.as_second()).unwrap_or(ts))
}

/// Per object uid: (resourceVersion a status was computed from, status written). A reconcile
/// that still sees that resourceVersion works from the written status instead of the stale
/// cached one, so it neither repeats writes nor re-announces transitions.
pub struct StatusMemory<S> {
    written: std::sync::Mutex<std::collections::HashMap<String, (String, S)>>,
}

impl<S> Default for StatusMemory<S> {
    fn default() -> Self {
        Self {
            written: std::sync::Mutex::default(),
        }
    }
}

impl<S: Clone + Default> StatusMemory<S> {
    /// The status as last known for an object seen at `resource_version` with `cached` status.
    /// A status written from an older resourceVersion is forgotten once the object is seen at a
    /// newer one: the cache has seen the write (or a later change), so the memory holds only
    /// writes the cache has not caught up with.
    pub fn last(&self, uid: &str, resource_version: Option<&String>, cached: Option<&S>) -> S {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        match written.get(uid) {
            Some((version, status)) if Some(version) == resource_version => status.clone(),
            Some((version, _)) => {
                if newer(resource_version, version) {
                    written.remove(uid);
                }
                cached.cloned().unwrap_or_default()
            }
            None => cached.cloned().unwrap_or_default(),
        }
    }

    pub fn remember(&self, uid: String, resource_version: String, status: S) {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid, (resource_version, status));
    }

    pub fn forget(&self, uid: &str) {
        self.written.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
    }
}

/// Whether resourceVersion `seen` is newer than `remembered`. resourceVersions are opaque to
/// clients; the apiserver's are etcd revisions, which grow. Anything else counts as not newer,
/// so that the memory is kept rather than lost on a stale read.
pub fn newer(seen: Option<&String>, remembered: &str) -> bool {
    match (seen.and_then(|v| v.parse::<u64>().ok()), remembered.parse::<u64>().ok()) {
        (Some(seen), Some(remembered)) => seen > remembered,
        _ => false,
    }
}

/// A status whose conditions tell whether a reconcile ended in a failure.
pub trait StatusConditions {
    fn status_conditions(&self) -> &[Condition];
}

impl StatusConditions for crate::api::ResourceGraphStatus {
    fn status_conditions(&self) -> &[Condition] {
        &self.conditions
    }
}

impl<S: Clone + Default + PartialEq + serde::Serialize + StatusConditions> StatusMemory<S> {
    /// Applies `new` as the status of `obj` (`type_meta`: its apiVersion and kind) with field
    /// manager `manager`, unless it equals `old`, and remembers it. Whether it ends in a
    /// failure is noted for the reconcile metrics, written or not.
    pub async fn write<K>(
        &self,
        api: &kube::Api<K>,
        obj: &K,
        type_meta: (&str, &str),
        manager: &str,
        old: &S,
        new: S,
    ) -> Result<(), Error>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        use kube::ResourceExt;
        note_status(new.status_conditions());
        if &new == old {
            return Ok(());
        }
        let body = serde_json::json!({"apiVersion": type_meta.0, "kind": type_meta.1, "status": new});
        api.patch_status(
            &obj.name_any(),
            &kube::api::PatchParams::apply(manager).force(),
            &kube::api::Patch::Apply(body),
        )
        .await?;
        if let (Some(uid), Some(version)) = (obj.uid(), obj.resource_version()) {
            self.remember(uid, version, new);
        }
        Ok(())
    }
}

/// A status with conditions and an observed generation.
pub trait ConditionedStatus: Clone + Default {
    fn conditions(&self) -> &[Condition];
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;
    fn set_observed_generation(&mut self, generation: Option<i64>);
}

/// Implements [`ConditionedStatus`] for status types with `conditions` and `observed_generation`.
macro_rules! conditioned_status {
    ($($status:ty),*) => {$(
        impl ConditionedStatus for $status {
            fn conditions(&self) -> &[Condition] {
                &self.conditions
            }
            fn conditions_mut(&mut self) -> &mut Vec<Condition> {
                &mut self.conditions
            }
            fn set_observed_generation(&mut self, generation: Option<i64>) {
                self.observed_generation = generation;
            }
        }

        impl StatusConditions for $status {
            fn status_conditions(&self) -> &[Condition] {
                &self.conditions
            }
        }
    )*};
}

conditioned_status!(crate::api::TransformStatus, crate::api::InstanceStatus);

/// A status under construction: the last known one (`old`, for transition checks) and the
/// next one, with the time and generation its conditions are stamped with.
pub struct StatusDraft<S> {
    pub old: S,
    pub new: S,
    pub time: Time,
    generation: Option<i64>,
    /// Events decided with the status, published when it is written.
    pub events: Vec<kube::runtime::events::Event>,
}

impl<S: ConditionedStatus> StatusDraft<S> {
    /// Starts from what `memory` last wrote for the object, else its `cached` status.
    pub fn start(memory: &StatusMemory<S>, meta: &ObjectMeta, cached: Option<&S>) -> Self {
        let uid = meta.uid.clone().unwrap_or_default();
        let old = memory.last(&uid, meta.resource_version.as_ref(), cached);
        let mut new = old.clone();
        new.set_observed_generation(meta.generation);
        Self {
            old,
            new,
            time: now(),
            generation: meta.generation,
            events: Vec::new(),
        }
    }

    /// Sets condition `type_` and, on its transition (it had another status or reason),
    /// records the event `(event_type, event_reason)` with `message`.
    pub fn condition_with_event(
        &mut self,
        type_: &str,
        ok: bool,
        reason: &str,
        message: impl Into<String>,
        (event_type, event_reason): (kube::runtime::events::EventType, &str),
    ) {
        let message = message.into();
        let status = if ok {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        };
        if !self.was(type_, status, reason) {
            self.event(event_type, event_reason, &message);
        }
        self.condition(type_, ok, reason, message);
    }

    /// A draft over `status` as a reconcile of `generation` starts it, for tests of status
    /// transitions.
    #[cfg(test)]
    pub fn for_test(status: &S, generation: i64) -> Self {
        let meta = ObjectMeta {
            uid: Some("uid".into()),
            generation: Some(generation),
            ..Default::default()
        };
        Self::start(&StatusMemory::default(), &meta, Some(status))
    }

    /// The reasons of the events recorded so far.
    #[cfg(test)]
    pub fn event_reasons(&self) -> Vec<String> {
        self.events.iter().map(|e| e.reason.clone()).collect()
    }

    /// Records an event, published with the status.
    pub fn event(&mut self, type_: kube::runtime::events::EventType, reason: &str, note: &str) {
        self.events.push(reconcile_event(type_, reason, note));
    }

    pub fn condition(&mut self, type_: &str, ok: bool, reason: &str, message: impl Into<String>) {
        set_condition(
            self.new.conditions_mut(),
            Condition::new(type_, ok, reason, message),
            &self.time,
            self.generation,
        );
    }

    /// `pequod.io/paused` holds the object: condition `Paused`, with an event on transition.
    pub fn paused(&mut self, message: impl Into<String>) {
        self.condition_with_event(
            crate::api::condition_types::PAUSED,
            true,
            crate::api::reasons::PAUSED,
            message,
            (kube::runtime::events::EventType::Normal, crate::api::reasons::PAUSED),
        );
    }

    /// An object reconciled again after a pause says so (`Paused=False`, `Resumed`).
    pub fn resumed(&mut self, message: &str) {
        let paused = crate::api::condition_types::PAUSED;
        if self.old.conditions().iter().any(|c| c.type_ == paused) {
            self.condition(paused, false, crate::api::reasons::RESUMED, message);
        }
    }

    /// Whether the previous status had condition `type_` with `status` and `reason`.
    pub fn was(&self, type_: &str, status: ConditionStatus, reason: &str) -> bool {
        has_condition(self.old.conditions(), type_, status, Some(reason))
    }
}

/// Where one controller writes the status of its objects, and as whom.
pub struct StatusWriter<'a, K, S> {
    pub api: kube::Api<K>,
    /// The objects' apiVersion and kind.
    pub type_meta: (&'a str, &'a str),
    pub manager: &'static str,
    pub memory: &'a StatusMemory<S>,
    pub recorder: &'a kube::runtime::events::Recorder,
    /// The part of a status this manager writes: others write the rest with field managers of
    /// their own, so it must not claim their fields.
    pub owned: fn(&S) -> S,
}

impl<K, S> StatusWriter<'_, K, S>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: Clone + Default + PartialEq + serde::Serialize + StatusConditions,
{
    /// Writes this manager's part of `new` as the status of `obj` unless it equals that part
    /// of `old` (see [`StatusMemory::write`]).
    pub async fn write(&self, obj: &K, old: &S, new: &S) -> Result<(), Error> {
        let owned = self.owned;
        self.memory
            .write(&self.api, obj, self.type_meta, self.manager, &owned(old), owned(new))
            .await
    }
}

/// The whole status: for a manager that writes every field.
pub fn whole<S: Clone>(status: &S) -> S {
    status.clone()
}

/// An object's status under construction ([`StatusDraft`]) and its writer: written once, with
/// the events decided alongside it.
pub struct StatusUpdate<'a, K: kube::Resource, S> {
    obj: &'a K,
    reference: k8s_openapi::api::core::v1::ObjectReference,
    writer: StatusWriter<'a, K, S>,
    draft: StatusDraft<S>,
}

impl<K: kube::Resource, S> std::ops::Deref for StatusUpdate<'_, K, S> {
    type Target = StatusDraft<S>;
    fn deref(&self) -> &Self::Target {
        &self.draft
    }
}

impl<K: kube::Resource, S> std::ops::DerefMut for StatusUpdate<'_, K, S> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.draft
    }
}

impl<'a, K, S> StatusUpdate<'a, K, S>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: ConditionedStatus + PartialEq + serde::Serialize + StatusConditions,
{
    /// Starts from what the writer's memory last wrote for `obj`, else its `cached` status;
    /// `reference` is the object the events are about.
    pub fn start(
        obj: &'a K,
        reference: k8s_openapi::api::core::v1::ObjectReference,
        writer: StatusWriter<'a, K, S>,
        cached: Option<&S>,
    ) -> Self {
        let draft = StatusDraft::start(writer.memory, obj.meta(), cached);
        Self {
            obj,
            reference,
            writer,
            draft,
        }
    }

    /// Writes `status` at once, before the reconcile ends, and takes it as the last known one.
    pub async fn checkpoint(&mut self, status: S) -> Result<(), Error> {
        self.writer.write(self.obj, &self.draft.old, &status).await?;
        self.draft.old = status;
        Ok(())
    }

    /// Writes the status, then publishes the events decided with it.
    pub async fn write(self) -> Result<(), Error> {
        let StatusDraft { old, new, events, .. } = self.draft;
        self.writer.write(self.obj, &old, &new).await?;
        for event in events {
            super::events::publish(self.writer.recorder, self.reference.clone(), event);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_answers_at_the_version_it_was_written_from_and_forgets_once_a_newer_one_is_seen() {
        let memory: StatusMemory<String> = StatusMemory::default();
        memory.remember("uid".into(), "10".into(), "written".into());
        let cached = "cached".to_string();
        let at = |v: &str| memory.last("uid", Some(&v.to_string()), Some(&cached));
        assert_eq!(at("10"), "written");
        assert_eq!(at("9"), "cached", "a stale read uses the cache");
        assert_eq!(at("10"), "written", "and does not forget");
        assert_eq!(at("11"), "cached");
        assert!(
            memory.written.lock().unwrap().is_empty(),
            "seen at a newer version: forgotten"
        );
        memory.remember("uid".into(), "opaque".into(), "written".into());
        assert_eq!(at("12"), "cached");
        assert_eq!(
            memory.last("uid", Some(&"opaque".to_string()), None),
            "written",
            "kept when versions do not compare"
        );
    }
}
