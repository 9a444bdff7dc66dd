//! Leader election through a `coordination.k8s.io` Lease, so that one replica reconciles and
//! the others stand by.
//!
//! As in client-go, a lease is taken over when its record has not changed for a whole lease
//! duration as observed by this process's own clock, so clocks of different nodes need not agree.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};

use crate::runtime::shutdown::Shutdown;

/// Timing of the election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a lease holds without renewal before others may take it.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives up leading.
    pub renew_deadline: Duration,
    /// Pause between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl Timing {
    /// The holder must give up before others may take over, and retry several times first.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.renew_deadline >= self.lease_duration {
            return Err("--leader-elect-renew-deadline must be shorter than --leader-elect-lease-duration");
        }
        if self.retry_period >= self.renew_deadline {
            return Err("--leader-elect-retry-period must be shorter than --leader-elect-renew-deadline");
        }
        Ok(())
    }
}

/// What to do with the lease as last read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No lease exists: create it.
    Create,
    /// Held by this process: renew it.
    Renew,
    /// Free or expired: take it.
    Take,
    /// Held by another, live process.
    Wait,
}

/// The lease record as this process last saw it, and when it last changed.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    record: Option<(Option<String>, Option<String>)>,
    changed_at: Option<Instant>,
}

/// Who holds a lease, as this process judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Nobody: the lease names no holder.
    Nobody,
    /// Its holder, whose record changed within the lease's duration.
    Live(String),
    /// Its holder has not renewed it for a whole lease duration, as this process observed.
    Expired,
}

/// Judges a lease's holder from its spec. Updates `observed`.
pub fn judge(spec: &LeaseSpec, observed: &mut Observed, now: Instant, timing: &Timing) -> Holder {
    let Some(holder) = spec.holder_identity.clone().filter(|h| !h.is_empty()) else {
        return Holder::Nobody;
    };
    let record = Some((Some(holder.clone()), spec.renew_time.as_ref().map(|t| t.0.to_string())));
    if observed.record != record {
        observed.record = record;
        observed.changed_at = Some(now);
        return Holder::Live(holder);
    }
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
        .unwrap_or(timing.lease_duration);
    match observed.changed_at {
        Some(at) if now.duration_since(at) >= duration => Holder::Expired,
        _ => Holder::Live(holder),
    }
}

/// Decides from the lease's spec (None: no lease). Updates `observed`.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, observed: &mut Observed, now: Instant, timing: &Timing) -> Decision {
    let Some(spec) = spec else {
        return Decision::Create;
    };
    if spec.holder_identity.as_deref() == Some(me) {
        return Decision::Renew;
    }
    match judge(spec, observed, now, timing) {
        Holder::Nobody | Holder::Expired => Decision::Take,
        Holder::Live(_) => Decision::Wait,
    }
}

/// Takes part in the election of one Lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    observed: Observed,
}

impl Elector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: Timing) -> Self {
        Self {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            timing,
            observed: Observed::default(),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until this process holds the lease. False when shutdown came first.
    pub async fn acquire(&mut self, shutdown: &Shutdown) -> bool {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, lease = %self.name, "leader election: reading the lease failed"),
            }
            tokio::select! {
                _ = shutdown.wait() => return false,
                _ = tokio::time::sleep(self.timing.retry_period) => {}
            }
        }
    }

    /// Renews the lease until it cannot be renewed for a whole renew deadline (returns
    /// false: leadership lost) or shutdown comes (releases the lease, returns true).
    pub async fn hold(&mut self, shutdown: &Shutdown) -> bool {
        let mut renewed = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.wait() => {
                    self.release().await;
                    return true;
                }
                _ = tokio::time::sleep(self.timing.retry_period) => {}
            }
            // Each attempt is time-boxed by what is left of the renew deadline: a request that
            // hangs (a half-open connection, an apiserver that stopped answering) must not keep
            // this process reconciling after a standby may have taken the lease.
            let left = self.timing.renew_deadline.saturating_sub(renewed.elapsed());
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => renewed = Instant::now(),
                Ok(Ok(false)) => return false,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, lease = %self.name, "leader election: renewing the lease failed")
                }
                Err(_) => tracing::warn!(lease = %self.name, "leader election: renewing the lease timed out"),
            }
            if renewed.elapsed() >= self.timing.renew_deadline {
                return false;
            }
        }
    }

    /// One attempt; true when this process holds the lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let lease = self.api.get_opt(&self.name).await?;
        let now = MicroTime(jiff::Timestamp::now());
        let duration = i32::try_from(self.timing.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let decision = decide(
            lease.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            &mut self.observed,
            Instant::now(),
            &self.timing,
        );
        let result = match (decision, lease) {
            (Decision::Wait, _) => return Ok(false),
            (Decision::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(duration),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await.map(|_| ())
            }
            (decision, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(Default::default);
                if decision == Decision::Take {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(now.clone());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(duration);
                spec.renew_time = Some(now);
                // The resourceVersion makes a concurrent writer lose instead of both leading.
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
            (Decision::Renew | Decision::Take, None) => return Ok(false),
        };
        match result {
            Ok(()) => {
                if decision != Decision::Renew {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became the leader");
                }
                Ok(true)
            }
            // Another process wrote first.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Lets others take over at once instead of waiting for the lease to expire.
    async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => tracing::info!(lease = %self.name, "released the leader lease"),
            Err(e) => tracing::warn!(error = %e, lease = %self.name, "releasing the leader lease failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMING: Timing = Timing {
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
    };

    fn held_by(holder: &str, renew: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(jiff::Timestamp::from_second(renew).unwrap())),
            ..Default::default()
        }
    }

    #[test]
    fn absent_free_and_own_leases() {
        let mut o = Observed::default();
        let now = Instant::now();
        assert_eq!(decide(None, "a", &mut o, now, &TIMING), Decision::Create);
        assert_eq!(
            decide(Some(&held_by("a", 1)), "a", &mut o, now, &TIMING),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&LeaseSpec::default()), "a", &mut o, now, &TIMING),
            Decision::Take
        );
        assert_eq!(decide(Some(&held_by("", 1)), "a", &mut o, now, &TIMING), Decision::Take);
    }

    #[test]
    fn another_holder_is_waited_for_until_its_record_stops_changing_for_a_lease_duration() {
        let mut o = Observed::default();
        let start = Instant::now();
        assert_eq!(
            decide(Some(&held_by("b", 1)), "a", &mut o, start, &TIMING),
            Decision::Wait
        );
        let later = start + Duration::from_secs(14);
        assert_eq!(
            decide(Some(&held_by("b", 1)), "a", &mut o, later, &TIMING),
            Decision::Wait
        );
        // The holder renewed: the clock starts again.
        assert_eq!(
            decide(Some(&held_by("b", 2)), "a", &mut o, later, &TIMING),
            Decision::Wait
        );
        let expired = later + Duration::from_secs(15);
        assert_eq!(
            decide(Some(&held_by("b", 2)), "a", &mut o, expired, &TIMING),
            Decision::Take
        );
    }

    #[test]
    fn timing_must_let_the_holder_give_up_first() {
        assert_eq!(TIMING.validate(), Ok(()));
        let bad = Timing {
            renew_deadline: Duration::from_secs(15),
            ..TIMING
        };
        assert!(bad.validate().is_err());
        let bad = Timing {
            retry_period: Duration::from_secs(10),
            ..TIMING
        };
        assert!(bad.validate().is_err());
    }
}
