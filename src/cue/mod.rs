//! CUE: running the cue CLI, loading platform modules, extracting schemas and rendering.

mod cli;

pub use cli::{CueCli, MAX_STDERR_BYTES, MAX_STDOUT_BYTES};

/// Errors from evaluating CUE.
#[derive(Debug, thiserror::Error)]
pub enum CueError {
    #[error("cannot run cue binary {binary}: {source}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cue did not finish within {seconds}s")]
    Timeout { seconds: u64 },
    #[error("cue output exceeds {limit} bytes")]
    OutputTooLarge { limit: usize },
    #[error("{message}")]
    Failed { code: Option<i32>, message: String },
    #[error("the cue runner is shutting down")]
    Shutdown,
}

impl CueError {
    /// Stable reason string for conditions, events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Spawn { .. } => "CueBinaryUnavailable",
            Self::Timeout { .. } => "CueTimeout",
            Self::OutputTooLarge { .. } => "CueOutputTooLarge",
            Self::Failed { .. } => "CueEvaluationFailed",
            Self::Shutdown => "ShuttingDown",
        }
    }
}
