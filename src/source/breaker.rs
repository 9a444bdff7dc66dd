//! Per-host circuit breaker for remote module sources, and the retry delay of a failing fetch.
//!
//! A registry or git server that keeps failing is not asked again until a cool-down passes,
//! so fetches for other hosts never queue behind its timeouts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Consecutive failures that open a host's circuit.
pub const FAILURE_THRESHOLD: u32 = 3;
/// First cool-down; it doubles each time the circuit opens again, up to [`MAX_OPEN`].
pub const FIRST_OPEN: Duration = Duration::from_secs(30);
pub const MAX_OPEN: Duration = Duration::from_secs(300);

/// First retry delay of a Transform whose fetch failed; doubles per failure up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_secs(5);
pub const MAX_RETRY: Duration = Duration::from_secs(300);

/// Delay before the next fetch after `failures` consecutive failures (at least 1).
pub fn retry_delay(failures: u32) -> Duration {
    doubled(FIRST_RETRY, failures.saturating_sub(1), MAX_RETRY)
}

fn doubled(first: Duration, times: u32, max: Duration) -> Duration {
    first.saturating_mul(2u32.saturating_pow(times.min(16))).min(max)
}

/// Why a host is not being asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub host: String,
    pub failures: u32,
    pub retry_in: Duration,
    pub last_error: String,
}

#[derive(Debug, Default)]
struct HostState {
    failures: u32,
    opened: u32,
    open_until: Option<Instant>,
    last_error: String,
}

/// Circuit state of every host seen.
#[derive(Debug, Default)]
pub struct Breakers {
    hosts: Mutex<HashMap<String, HostState>>,
}

impl Breakers {
    /// `Err` while `host`'s circuit is open. After the cool-down one attempt goes through
    /// (half-open); its result closes or re-opens the circuit.
    pub fn check(&self, host: &str, now: Instant) -> Result<(), Open> {
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        match hosts.get(host) {
            Some(state) if state.open_until.is_some_and(|until| until > now) => Err(Open {
                host: host.to_string(),
                failures: state.failures,
                retry_in: state.open_until.map(|u| u - now).unwrap_or_default(),
                last_error: state.last_error.clone(),
            }),
            _ => Ok(()),
        }
    }

    pub fn success(&self, host: &str) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        hosts.remove(host);
    }

    pub fn failure(&self, host: &str, error: &str, now: Instant) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let state = hosts.entry(host.to_string()).or_default();
        state.failures += 1;
        state.last_error = error.to_string();
        if state.failures >= FAILURE_THRESHOLD {
            state.open_until = Some(now + doubled(FIRST_OPEN, state.opened, MAX_OPEN));
            state.opened += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_repeated_failures_and_closes_on_success() {
        let breakers = Breakers::default();
        let t0 = Instant::now();
        for _ in 0..FAILURE_THRESHOLD - 1 {
            breakers.failure("registry.example.com", "connection refused", t0);
            assert!(breakers.check("registry.example.com", t0).is_ok());
        }
        breakers.failure("registry.example.com", "connection refused", t0);
        let open = breakers.check("registry.example.com", t0).unwrap_err();
        assert_eq!(open.failures, FAILURE_THRESHOLD);
        assert_eq!(open.retry_in, FIRST_OPEN);
        assert_eq!(open.last_error, "connection refused");
        // Other hosts are unaffected.
        assert!(breakers.check("git.example.com", t0).is_ok());

        // Half-open after the cool-down; another failure re-opens it for twice as long.
        let t1 = t0 + FIRST_OPEN;
        assert!(breakers.check("registry.example.com", t1).is_ok());
        breakers.failure("registry.example.com", "timeout", t1);
        assert_eq!(
            breakers.check("registry.example.com", t1).unwrap_err().retry_in,
            FIRST_OPEN * 2
        );

        breakers.success("registry.example.com");
        assert!(breakers.check("registry.example.com", t1).is_ok());
    }

    #[test]
    fn cool_down_and_retry_delay_are_capped() {
        let breakers = Breakers::default();
        let now = Instant::now();
        for _ in 0..40 {
            breakers.failure("h", "e", now);
        }
        assert_eq!(breakers.check("h", now).unwrap_err().retry_in, MAX_OPEN);
        assert_eq!(retry_delay(1), FIRST_RETRY);
        assert_eq!(retry_delay(2), FIRST_RETRY * 2);
        assert_eq!(retry_delay(100), MAX_RETRY);
        assert_eq!(retry_delay(0), FIRST_RETRY);
    }
}
