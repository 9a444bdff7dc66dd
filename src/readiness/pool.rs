//! The evaluation pool: where readiness expressions run, away from the reconcile workers.
//!
//! A CEL evaluation cannot be interrupted, so the pool bounds what an expensive one can take
//! from everything else:
//! - evaluations run on threads of their own, never on the async workers that serve
//!   reconciles, probes and shutdown;
//! - at most `slots` run at once (one core less than the machine has), and an evaluation that
//!   runs past its deadline keeps its slot until it is done, so overrunning evaluations cannot
//!   pile up beyond the slots;
//! - the deadline covers waiting for a slot too: a caller never waits longer than the deadline;
//! - a gate whose previous evaluation is still running does not start another.
//!
//! The threads are plain detached threads rather than tokio's blocking pool: the runtime
//! waits for its blocking tasks when it shuts down, which would let a runaway evaluation hold
//! up the exit after SIGTERM.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::api::reasons;
use crate::error::ErrorCategory;

/// How long an evaluation may take, waiting for a slot included.
pub const EVALUATION_DEADLINE: Duration = Duration::from_secs(1);
/// Most evaluation slots, however many cores the machine has.
const MAX_SLOTS: usize = 4;
/// Stack of an evaluation thread: the interpreter recurses over the expression.
const THREAD_STACK_BYTES: usize = 8 * 1024 * 1024;

/// Evaluations at once by default: one core less than the machine has (at least one, at most
/// [`MAX_SLOTS`]), so that a core is always left for reconciles, probes and shutdown.
pub fn default_slots() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .saturating_sub(1)
        .clamp(1, MAX_SLOTS)
}

/// Why an evaluation gave no result. The messages complete "the readiness expression of node
/// web ...".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvaluationError {
    #[error("did not start within its deadline of {deadline:?}: all {slots} evaluation slots are busy")]
    Busy { deadline: Duration, slots: usize },
    #[error("ran past its deadline of {deadline:?}")]
    Overran { deadline: Duration },
    #[error("was not evaluated again: its previous evaluation, past its deadline of {deadline:?}, is still running")]
    StillRunning { deadline: Duration },
    #[error("stopped: {0}")]
    Crashed(String),
}

impl EvaluationError {
    /// Whether the evaluation ran out of time (rather than failing).
    pub fn is_timeout(&self) -> bool {
        !matches!(self, Self::Crashed(_))
    }
}

impl ErrorCategory for EvaluationError {
    fn reason(&self) -> &'static str {
        if self.is_timeout() {
            reasons::EXPRESSION_TIMEOUT
        } else {
            reasons::READINESS_FAILED
        }
    }

    /// The evaluation may finish in time once the pool is less busy or the object smaller.
    fn is_transient(&self) -> bool {
        true
    }
}

/// A bounded set of evaluation threads with a deadline per evaluation.
pub struct EvaluationPool {
    slots: Arc<Semaphore>,
    slot_count: usize,
    deadline: Duration,
    /// Keys of the evaluations started and not finished yet (waiting for a slot included).
    running: Arc<Mutex<HashSet<String>>>,
}

impl Default for EvaluationPool {
    fn default() -> Self {
        Self::new(default_slots(), EVALUATION_DEADLINE)
    }
}

impl EvaluationPool {
    pub fn new(slots: usize, deadline: Duration) -> Self {
        let slot_count = slots.max(1);
        Self {
            slots: Arc::new(Semaphore::new(slot_count)),
            slot_count,
            deadline,
            running: Arc::default(),
        }
    }

    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Runs `job` on an evaluation thread and waits for its result until the deadline. `key`
    /// names what is evaluated (a gate on an object): while an evaluation of the same key is
    /// running, another is refused.
    pub async fn run<T: Send + 'static>(
        &self,
        key: &str,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, EvaluationError> {
        let deadline = tokio::time::Instant::now() + self.deadline;
        let Some(claim) = Claim::take(&self.running, key) else {
            return Err(EvaluationError::StillRunning {
                deadline: self.deadline,
            });
        };
        let permit = match tokio::time::timeout_at(deadline, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(closed)) => return Err(EvaluationError::Crashed(closed.to_string())),
            Err(_) => {
                return Err(EvaluationError::Busy {
                    deadline: self.deadline,
                    slots: self.slot_count,
                });
            }
        };
        let result = spawn(permit, claim, job)?;
        match tokio::time::timeout_at(deadline, result).await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(panic))) => Err(EvaluationError::Crashed(panic)),
            Ok(Err(_)) => Err(EvaluationError::Crashed("the evaluation thread ended".into())),
            Err(_) => Err(EvaluationError::Overran {
                deadline: self.deadline,
            }),
        }
    }
}

/// Starts `job` on a thread of its own, which holds the slot and the claim until the job is
/// done, however long that is.
fn spawn<T: Send + 'static>(
    permit: OwnedSemaphorePermit,
    claim: Claim,
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<oneshot::Receiver<Result<T, String>>, EvaluationError> {
    let (send, receive) = oneshot::channel();
    std::thread::Builder::new()
        .name("pequod-evaluation".into())
        .stack_size(THREAD_STACK_BYTES)
        .spawn(move || {
            let held = (permit, claim);
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).map_err(|panic| {
                panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "the evaluation panicked".into())
            });
            drop(held);
            // The caller is gone once the deadline passed; the result is not needed then.
            let _ = send.send(outcome);
        })
        .map_err(|e| EvaluationError::Crashed(format!("cannot start an evaluation thread: {e}")))?;
    Ok(receive)
}

/// A key in the running set, removed when dropped.
struct Claim {
    running: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl Claim {
    fn take(running: &Arc<Mutex<HashSet<String>>>, key: &str) -> Option<Self> {
        let fresh = running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string());
        fresh.then(|| Self {
            running: running.clone(),
            key: key.to_string(),
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    /// Keeps a core busy for `duration`, as an expensive evaluation does.
    fn spin(duration: Duration) -> u64 {
        let started = Instant::now();
        let mut turns = 0u64;
        while started.elapsed() < duration {
            turns = std::hint::black_box(turns.wrapping_add(1));
        }
        turns
    }

    const DEADLINE: Duration = Duration::from_millis(200);
    const EXPENSIVE: Duration = Duration::from_millis(1500);

    // One runtime thread: were evaluations run on it, the ticker and the cheap evaluation
    // would stall behind the expensive ones.
    #[tokio::test(flavor = "current_thread")]
    async fn overrunning_evaluations_time_out_while_a_cheap_one_and_the_runtime_go_on() {
        let pool = EvaluationPool::new(3, DEADLINE);
        let ticks = Arc::new(AtomicUsize::new(0));
        let ticker = tokio::spawn({
            let ticks = ticks.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    ticks.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let started = Instant::now();
        let (first, second, cheap) = tokio::join!(
            pool.run("expensive-1", || spin(EXPENSIVE)),
            pool.run("expensive-2", || spin(EXPENSIVE)),
            async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                pool.run("cheap", || 1 + 1).await
            },
        );
        let waited = started.elapsed();
        assert_eq!(cheap, Ok(2), "the cheap evaluation finishes within its deadline");
        for overran in [first, second] {
            let error = overran.unwrap_err();
            assert_eq!(error, EvaluationError::Overran { deadline: DEADLINE });
            assert_eq!(error.reason(), "ExpressionTimeout");
        }
        assert!(waited < EXPENSIVE / 2, "callers wait for the deadline only: {waited:?}");
        assert!(
            ticks.load(Ordering::Relaxed) >= 5,
            "the runtime kept running: {} ticks",
            ticks.load(Ordering::Relaxed)
        );

        // The overrunning ones still run: the same gates do not start again, and they hold
        // their slots, so at most one more evaluation runs beside them.
        let again = pool.run("expensive-1", || 0).await.unwrap_err();
        assert_eq!(again, EvaluationError::StillRunning { deadline: DEADLINE });
        assert_eq!(again.reason(), "ExpressionTimeout");
        let (third, fourth) = tokio::join!(pool.run("expensive-3", || spin(EXPENSIVE)), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            pool.run("cheap", || 1).await
        },);
        assert!(matches!(third, Err(EvaluationError::Overran { .. })), "{third:?}");
        assert_eq!(
            fourth,
            Err(EvaluationError::Busy {
                deadline: DEADLINE,
                slots: 3
            }),
            "every slot is held by an overrunning evaluation"
        );

        // Once they are done, the gates are evaluated again.
        tokio::time::sleep(EXPENSIVE + Duration::from_millis(300)).await;
        assert_eq!(pool.run("expensive-1", || 7).await, Ok(7));
        ticker.abort();
    }

    #[tokio::test]
    async fn a_panicking_evaluation_is_a_failure_not_a_timeout() {
        // A deadline far above the time a panic takes, even on a loaded machine.
        let pool = EvaluationPool::new(1, Duration::from_secs(10));
        let error = pool
            .run("p", || -> u8 { panic!("todo: Support Int") })
            .await
            .unwrap_err();
        assert_eq!(error, EvaluationError::Crashed("todo: Support Int".into()));
        assert_eq!(error.reason(), "ReadinessFailed");
        assert_eq!(pool.run("p", || 3).await, Ok(3), "the slot and the key are free again");
    }

    #[test]
    fn a_core_is_left_for_everything_else() {
        let slots = default_slots();
        assert!((1..=MAX_SLOTS).contains(&slots), "{slots}");
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert!(slots < cores || cores == 1, "{slots} slots on {cores} cores");
    }
}
