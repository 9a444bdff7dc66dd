//! Failures that stop the operator from starting or keep it from running.

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: super::server::BindAddress,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to Kubernetes (set KUBECONFIG or run in a cluster): {0}")]
    Kubeconfig(#[source] kube::Error),
    #[error("{0}")]
    InvalidFlags(&'static str),
    #[error("secure metrics: {0}")]
    Tls(#[from] super::secure::TlsError),
    #[error("conversion webhook: {0}")]
    Webhook(String),
    #[error("HTTP server failed: {0}")]
    Server(#[source] std::io::Error),
}
