//! CUE: running the cue CLI, loading platform modules, extracting schemas and rendering.

pub mod batch;
pub mod conversion;
mod embedded;
pub mod module;
pub mod process;
mod renderer;
pub mod schema;
pub mod versions;

pub use batch::{RenderError, RenderOutput, input_hash, render_input};
pub use conversion::{Conversion, ConversionError, LossyPaths, TooLargeToCompare, round_trip_differences};
pub use module::{Module, ModuleError, ModuleFiles, ModuleStore, is_digest};
pub use process::{CueCli, MAX_STDERR_BYTES, MAX_STDOUT_BYTES};
pub use renderer::{ModuleMetadata, ModuleSchema, PrinterColumn, RenderResult, Renderer, RendererConfig};
pub use schema::{SchemaError, crd_schema_from_openapi};
pub use versions::{ApiVersion, version_priority_order};

/// Names of the modules compiled into the binary.
pub fn embedded_modules() -> impl Iterator<Item = &'static str> {
    embedded::names()
}

/// Errors from running cue.
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
    #[error("cue ran out of memory: its limit is {limit_mib} MiB (--cue-memory-limit-mb)")]
    MemoryLimit { limit_mib: u64 },
    #[error("{message}")]
    Failed { code: Option<i32>, message: String },
    #[error("the cue runner is shutting down")]
    Shutdown,
}
