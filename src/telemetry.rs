//! Logging set-up: JSON lines by default, a human-readable console format on request.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::cli::{LogEncoder, LogLevel};

/// Installs the global tracing subscriber. `RUST_LOG`, when set, overrides the level for
/// finer per-module filtering.
pub fn init(level: LogLevel, encoder: LogEncoder) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // Dependencies stay at warn so that info means "what Pequod did".
        EnvFilter::new(format!("warn,pequod={}", level.as_str()))
    });
    let registry = tracing_subscriber::registry().with(filter);
    match encoder {
        LogEncoder::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .init(),
        LogEncoder::Console => registry.with(fmt::layer().with_target(false)).init(),
    }
}
