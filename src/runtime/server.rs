//! HTTP endpoints: /metrics on the metrics address, /healthz and /readyz on the probe address.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::runtime::health::{Health, Probe};
use crate::runtime::shutdown::Shutdown;

/// A listen address in the form Go operators use: `:8443` means every interface, IPv6 and
/// IPv4; `0` disables the listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindAddress {
    Disabled,
    /// `:PORT`: every interface of both address families (see [`listen`]).
    AllInterfaces(u16),
    /// `host:port` as given.
    Exact(SocketAddr),
}

impl FromStr for BindAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "0" {
            return Ok(Self::Disabled);
        }
        let invalid =
            |e: &dyn std::fmt::Display| format!("invalid bind address {s:?} (want host:port, :port or 0): {e}");
        match s.strip_prefix(':') {
            Some(port) => port.parse::<u16>().map(Self::AllInterfaces).map_err(|e| invalid(&e)),
            None => s.parse::<SocketAddr>().map(Self::Exact).map_err(|e| invalid(&e)),
        }
    }
}

impl std::fmt::Display for BindAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Disabled => f.write_str("0"),
            Self::AllInterfaces(port) => write!(f, ":{port}"),
            Self::Exact(addr) => write!(f, "{addr}"),
        }
    }
}

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

/// Opens the listener of `addr` now (so that a port conflict fails start-up); None when it is
/// disabled. `:PORT` listens on `[::]:PORT` with `IPV6_V6ONLY` off, so that IPv6 and IPv4
/// clients (as IPv4-mapped addresses) reach it; where the host has no IPv6, on `0.0.0.0:PORT`.
pub fn listen(addr: BindAddress) -> std::io::Result<Option<TcpListener>> {
    match addr {
        BindAddress::Disabled => Ok(None),
        BindAddress::Exact(addr) => listener(addr, None).map(Some),
        BindAddress::AllInterfaces(port) => {
            match listener(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), Some(false)) {
                Err(e) if ipv6_unavailable(&e) => {
                    tracing::info!(port, error = %e, "IPv6 is unavailable; listening on IPv4 only");
                    listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), None).map(Some)
                }
                other => other.map(Some),
            }
        }
    }
}

/// Most connections the kernel queues before they are accepted (as std's listener).
const BACKLOG: i32 = 1024;

fn listener(addr: SocketAddr, only_v6: Option<bool>) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(only_v6) = only_v6 {
        socket.set_only_v6(only_v6)?;
    }
    // As std's listener: a restarted process may bind while old connections linger.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// The host cannot listen on IPv6 at all (no IPv6 in the kernel, or disabled), as opposed to
/// a port in use or a permission refused, which must fail start-up.
fn ipv6_unavailable(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

/// Serves `router` on `listener` until shutdown.
pub async fn serve(listener: TcpListener, router: Router, shutdown: Shutdown) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr) -> std::io::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response)
    }

    fn has_ipv6() -> bool {
        std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
    }

    #[tokio::test]
    async fn a_port_alone_serves_ipv6_and_ipv4() {
        let listener = listen(BindAddress::AllInterfaces(0)).unwrap().unwrap();
        let port = listener.local_addr().unwrap().port();
        let shutdown = Shutdown::new();
        let health = Arc::new(Health::new());
        tokio::spawn(serve(listener, probes_router(health), shutdown.clone()));
        let v4 = get(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await.unwrap();
        assert!(v4.starts_with("HTTP/1.0 200"), "{v4}");
        if has_ipv6() {
            let v6 = get(SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await.unwrap();
            assert!(v6.starts_with("HTTP/1.0 200"), "{v6}");
        }
        shutdown.trigger();
    }

    #[tokio::test]
    async fn an_exact_address_serves_only_there_and_a_taken_port_fails() {
        let listener = listen(BindAddress::Exact("127.0.0.1:0".parse().unwrap()))
            .unwrap()
            .unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(listen(BindAddress::Exact(addr)).is_err(), "the port is taken");
        assert!(
            listen(BindAddress::AllInterfaces(addr.port())).is_err(),
            "taken on IPv4: no silent fallback"
        );
        assert!(listen(BindAddress::Disabled).unwrap().is_none());
        if has_ipv6() {
            let v6 = tokio::net::TcpStream::connect(SocketAddr::from((Ipv6Addr::LOCALHOST, addr.port()))).await;
            assert!(v6.is_err(), "127.0.0.1 does not serve IPv6");
        }
    }
}
