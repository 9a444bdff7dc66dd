//! Errors of the operator process as a whole (start-up and wiring), and the one vocabulary
//! every error of a reconcile speaks.

/// What every error a reconcile can meet tells about itself. The reason feeds conditions,
/// events and `pequod_reconcile_errors_total{error_type}`; transience decides whether the
/// object is tried again with backoff or waits for a change.
pub trait ErrorCategory {
    /// Stable reason (a CamelCase word).
    fn reason(&self) -> &'static str;
    /// Whether retrying without any change could succeed.
    fn is_transient(&self) -> bool;
}

/// Failures that stop the operator from starting or keep it from running.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: crate::cli::BindAddress,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to Kubernetes (set KUBECONFIG or run in a cluster): {0}")]
    Kubeconfig(#[source] kube::Error),
    #[error("{0}")]
    InvalidFlags(&'static str),
    #[error("secure metrics: {0}")]
    Tls(#[from] crate::runtime::secure::TlsError),
    #[error("HTTP server failed: {0}")]
    Server(#[source] std::io::Error),
}
