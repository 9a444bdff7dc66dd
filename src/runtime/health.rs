//! Health state behind /healthz and /readyz.
//!
//! Components register named checks; a probe passes only when every check of its kind
//! passes, and a failing probe's body names each failing check and why.

use std::collections::BTreeMap;
use std::sync::RwLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Probe {
    Liveness,
    Readiness,
}

/// State of one check: passing, or failing with a reason.
type CheckState = Result<(), String>;

#[derive(Debug, Default)]
pub struct Health {
    checks: RwLock<BTreeMap<(Probe, &'static str), CheckState>>,
}

/// Outcome of a probe: whether it passed and a plain-text body for the HTTP response.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    pub ok: bool,
    pub body: String,
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a check that fails with `reason` until it is first reported.
    pub fn register(&self, probe: Probe, name: &'static str, reason: &str) {
        self.set(probe, name, Err(reason.to_string()));
    }

    pub fn set(&self, probe: Probe, name: &'static str, state: CheckState) {
        if let Ok(mut checks) = self.checks.write() {
            checks.insert((probe, name), state);
        }
    }

    pub fn report(&self, probe: Probe) -> Report {
        let Ok(checks) = self.checks.read() else {
            return Report {
                ok: false,
                body: "health state is poisoned\n".to_string(),
            };
        };
        let mut ok = true;
        let mut body = String::new();
        for ((p, name), state) in checks.iter() {
            if *p != probe {
                continue;
            }
            match state {
                Ok(()) => body.push_str(&format!("[+] {name} ok\n")),
                Err(reason) => {
                    ok = false;
                    body.push_str(&format!("[-] {name} failed: {reason}\n"));
                }
            }
        }
        body.push_str(if ok { "ok\n" } else { "not ok\n" });
        Report { ok, body }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_fails_until_every_check_passes_and_says_why() {
        let health = Health::new();
        health.register(Probe::Readiness, "cue", "not checked yet");
        health.register(Probe::Readiness, "caches", "not synced");
        let report = health.report(Probe::Readiness);
        assert!(!report.ok);
        assert!(report.body.contains("cue failed: not checked yet"));

        health.set(Probe::Readiness, "cue", Ok(()));
        assert!(!health.report(Probe::Readiness).ok);
        health.set(Probe::Readiness, "caches", Ok(()));
        assert!(health.report(Probe::Readiness).ok);

        health.set(Probe::Readiness, "cue", Err("exec: no such file".into()));
        let report = health.report(Probe::Readiness);
        assert!(!report.ok);
        assert!(report.body.contains("exec: no such file"));
    }

    #[test]
    fn probes_are_independent() {
        let health = Health::new();
        health.register(Probe::Readiness, "caches", "not synced");
        assert!(health.report(Probe::Liveness).ok);
        assert!(!health.report(Probe::Readiness).ok);
    }
}
