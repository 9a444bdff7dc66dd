//! Retries: the per-object backoff and the error policy of every controller.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::error::Error;
use super::lifecycle::Workers;
use crate::error::ErrorCategory;

/// Retry delay after a node or module failure that may pass by itself.
pub const RETRY: std::time::Duration = std::time::Duration::from_secs(15);

/// First and longest delay of a reconcile's retries after transient errors.
const BACKOFF_MIN: std::time::Duration = std::time::Duration::from_secs(1);
const BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(300);

/// The delay before the next try after `failures` consecutive transient errors of one
/// object: 1 s, doubling, at most 5 minutes.
pub fn backoff_delay(failures: u32) -> std::time::Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
    BACKOFF_MIN.saturating_mul(factor).min(BACKOFF_MAX)
}

/// What failed in a row for one object.
#[derive(Default)]
struct Failures {
    /// Reconciles that ended in a transient error, for [`backoff_delay`].
    reconciles: u32,
    /// Fetches of the object's module, and the generation they were of: a reconcile that
    /// serves a cached module after a failed fetch succeeds, and a new spec starts over.
    fetches: Option<(Option<i64>, u32)>,
}

/// Consecutive failures per object.
#[derive(Default)]
pub struct Backoff(std::sync::Mutex<std::collections::HashMap<String, Failures>>);

impl Backoff {
    /// Changes `key`'s failures; an object with none left is forgotten.
    fn update<T>(&self, key: String, change: impl FnOnce(&mut Failures) -> T) -> T {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let failures = all.entry(key.clone()).or_default();
        let result = change(failures);
        if failures.reconciles == 0 && failures.fetches.is_none() {
            all.remove(&key);
        }
        result
    }

    /// Counts a failed reconcile of `key` and returns how long to wait.
    fn failed(&self, key: &str) -> std::time::Duration {
        self.update(key.to_string(), |f| {
            f.reconciles = f.reconciles.saturating_add(1);
            backoff_delay(f.reconciles)
        })
    }

    /// Forgets `key`'s failed reconciles after one that succeeded (or will not be retried).
    fn reset(&self, key: &str) {
        self.update(key.to_string(), |f| f.reconciles = 0);
    }

    /// Counts a failed fetch of the module of the object of `meta` and returns how many failed
    /// in a row for its current generation.
    pub fn fetch_failed(&self, meta: &ObjectMeta) -> u32 {
        self.update(backoff_key(meta), |f| {
            let (generation, count) = f.fetches.get_or_insert((meta.generation, 0));
            if *generation != meta.generation {
                (*generation, *count) = (meta.generation, 0);
            }
            *count = count.saturating_add(1);
            *count
        })
    }

    /// Forgets the failed fetches of the object of `meta`.
    pub fn fetch_succeeded(&self, meta: &ObjectMeta) {
        self.update(backoff_key(meta), |f| f.fetches = None);
    }

    /// Forgets everything about the object of `meta` (it is gone).
    pub fn forget(&self, meta: &ObjectMeta) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&backoff_key(meta));
    }
}

/// A controller context that keeps its objects' [`Backoff`] and its [`Workers`].
pub trait Retries {
    fn backoff(&self) -> &Backoff;
    fn workers(&self) -> &Workers;
}

/// A controller context that tells failed reconciles of its objects as events.
pub trait Reported: Retries {
    /// The kind of objects the controller reconciles.
    type Object: kube::Resource;
    fn recorder(&self) -> &kube::runtime::events::Recorder;
    /// The type information of [`Self::Object`], for the events' object reference.
    fn dyntype(&self) -> <Self::Object as kube::Resource>::DynamicType;
}

/// Implements [`Retries`] for a controller context with fields `backoff` and `workers`, and with
/// `reports OBJECT`, [`Reported`] too for one with a `recorder` whose objects need no type
/// information (the Transform and graph controllers).
macro_rules! controller_context {
    ($context:ty) => {
        impl $crate::controller::harness::Retries for $context {
            fn backoff(&self) -> &$crate::controller::harness::Backoff {
                &self.backoff
            }
            fn workers(&self) -> &$crate::controller::harness::Workers {
                &self.workers
            }
        }
    };
    ($context:ty, reports $object:ty) => {
        $crate::controller::harness::backoff::controller_context!($context);
        impl $crate::controller::harness::backoff::Reported for $context {
            type Object = $object;
            fn recorder(&self) -> &kube::runtime::events::Recorder {
                &self.recorder
            }
            fn dyntype(&self) {}
        }
    };
}
pub(crate) use controller_context;

/// Identifies an object in a [`Backoff`].
fn backoff_key(meta: &ObjectMeta) -> String {
    meta.uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default()
        )
    })
}

/// The error policy of every controller: a Warning event with the error's reason, then
/// [`retry`].
pub fn error_policy<K, C>(
    obj: std::sync::Arc<K>,
    error: &Error,
    ctx: std::sync::Arc<C>,
) -> kube::runtime::controller::Action
where
    K: kube::Resource,
    C: Reported<Object = K>,
{
    let event = super::events::reconcile_event(
        kube::runtime::events::EventType::Warning,
        error.reason(),
        error.to_string(),
    );
    super::events::publish(ctx.recorder(), obj.object_ref(&ctx.dyntype()), event);
    retry(ctx.backoff(), obj.meta(), error)
}

/// A transient error tries the object again after an exponential backoff of its own; a
/// permanent one waits for the object to change.
fn retry(backoff: &Backoff, meta: &ObjectMeta, error: &Error) -> kube::runtime::controller::Action {
    let key = backoff_key(meta);
    if error.is_transient() {
        let delay = backoff.failed(&key);
        tracing::warn!(error = %error, reason = error.reason(), retry_in = ?delay, "reconcile failed");
        kube::runtime::controller::Action::requeue(delay)
    } else {
        backoff.reset(&key);
        tracing::warn!(error = %error, reason = error.reason(), "reconcile failed; waiting for a change");
        kube::runtime::controller::Action::await_change()
    }
}

/// Forgets an object's failures once a reconcile of it succeeded.
pub fn succeeded<C: Retries>(ctx: &C, meta: &ObjectMeta) {
    ctx.backoff().reset(&backoff_key(meta));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_errors_back_off_per_object_and_permanent_ones_wait_for_a_change() {
        use std::time::Duration;
        assert_eq!(
            [1, 2, 3, 9, 10, 40].map(backoff_delay),
            [1, 2, 4, 256, 300, 300].map(Duration::from_secs)
        );
        let backoff = Backoff::default();
        let object = |uid: &str| ObjectMeta {
            uid: Some(uid.into()),
            ..Default::default()
        };
        let transient = Error::CueUnavailable(crate::cue::RenderError::CueUnavailable {
            message: "cue is not there".into(),
        });
        let policy = |uid: &str, e: &Error| format!("{:?}", retry(&backoff, &object(uid), e));
        let after = |secs: u64| {
            format!(
                "{:?}",
                kube::runtime::controller::Action::requeue(Duration::from_secs(secs))
            )
        };
        assert_eq!(policy("a", &transient), after(1));
        assert_eq!(policy("a", &transient), after(2));
        assert_eq!(policy("b", &transient), after(1), "each object backs off on its own");
        backoff.reset(&backoff_key(&object("a")));
        assert_eq!(policy("a", &transient), after(1), "a success starts over");
        assert_eq!(
            policy("a", &Error::MissingField("metadata.uid")),
            format!("{:?}", kube::runtime::controller::Action::await_change())
        );
    }

    #[test]
    fn failed_fetches_count_per_generation_apart_from_failed_reconciles() {
        let backoff = Backoff::default();
        let meta = |generation: i64| ObjectMeta {
            uid: Some("t".into()),
            generation: Some(generation),
            ..Default::default()
        };
        assert_eq!(backoff.fetch_failed(&meta(1)), 1);
        assert_eq!(backoff.fetch_failed(&meta(1)), 2);
        backoff.reset(&backoff_key(&meta(1)));
        assert_eq!(
            backoff.fetch_failed(&meta(1)),
            3,
            "a reconcile that served a cached module succeeded; the fetch still failed"
        );
        assert_eq!(backoff.fetch_failed(&meta(2)), 1, "a new spec starts over");
        backoff.fetch_succeeded(&meta(2));
        assert_eq!(backoff.fetch_failed(&meta(2)), 1);
        backoff.forget(&meta(2));
        assert!(backoff.0.lock().unwrap().is_empty());
    }
}
