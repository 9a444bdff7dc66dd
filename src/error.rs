//! The one vocabulary every error of a reconcile speaks. (The operator's start-up errors are
//! `runtime::startup`.)

/// What every error a reconcile can meet tells about itself. The reason feeds conditions,
/// events and `pequod_reconcile_errors_total{error_type}`; transience decides whether the
/// object is tried again with backoff or waits for a change.
pub trait ErrorCategory {
    /// Stable reason (a CamelCase word).
    fn reason(&self) -> &'static str;
    /// Whether retrying without any change could succeed.
    fn is_transient(&self) -> bool;
}
