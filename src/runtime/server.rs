//! HTTP endpoints: /metrics on the metrics address, /healthz and /readyz on the probe address.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::runtime::health::{Health, Probe};
use crate::runtime::metrics::Metrics;
use crate::runtime::shutdown::Shutdown;

pub fn metrics_router(metrics: Arc<Metrics>) -> Router {
    Router::new().route("/metrics", get(serve_metrics)).with_state(metrics)
}

pub fn probes_router(health: Arc<Health>) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|State(h): State<Arc<Health>>| async move { probe(&h, Probe::Liveness) }),
        )
        .route(
            "/readyz",
            get(|State(h): State<Arc<Health>>| async move { probe(&h, Probe::Readiness) }),
        )
        .with_state(health)
}

async fn serve_metrics(State(metrics): State<Arc<Metrics>>) -> Response {
    match metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {e}\n"),
        )
            .into_response(),
    }
}

fn probe(health: &Health, probe: Probe) -> Response {
    let report = health.report(probe);
    let status = if report.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, report.body).into_response()
}

/// Binds `addr` now (so a port conflict fails start-up) and serves `router` until shutdown.
pub async fn bind(
    addr: SocketAddr,
    router: Router,
    shutdown: Shutdown,
) -> std::io::Result<impl Future<Output = std::io::Result<()>>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await
    })
}
