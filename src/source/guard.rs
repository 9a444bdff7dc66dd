//! Connections to module sources go only to addresses the source policy has checked.
//!
//! A name checked once and resolved again by whoever connects can answer differently the
//! second time (DNS rebinding). Here a name is resolved once, every answer is checked, and the
//! connection is made to one of those answers:
//!
//! - HTTP clients (the registry client, git over `http://` and `https://`) go through a
//!   [`Guard`], a forward proxy on loopback that lives for one fetch. It checks every host it
//!   is asked for, redirects and token endpoints included, and refuses before connecting.
//! - git over ssh and `git://` is given the checked address ([`resolve_checked`]) directly.
//!
//! The proxy reaches nothing its clients could not reach by connecting themselves, minus the
//! refused addresses, so it needs no credentials of its own.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Body;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::policy;

/// How long the system resolver may take to answer for a source's host.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one address may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a host was not connected to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unchecked {
    /// The policy refuses the host or one of its addresses.
    #[error("{0}")]
    Refused(String),
    #[error("cannot resolve {host}: {message}")]
    Unresolved { host: String, message: String },
    #[error("cannot connect to {host}: {message}")]
    Unreachable { host: String, message: String },
}

/// The addresses `name` stands for on `port`, every one of them checked. An address written
/// in any form is read without asking DNS.
pub async fn resolve_checked(name: &str, port: u16) -> Result<Vec<SocketAddr>, Unchecked> {
    if let Some(ip) = policy::parse_address(name) {
        return match policy::refuse_address(ip) {
            Some(why) => Err(Unchecked::Refused(why)),
            None => Ok(vec![SocketAddr::new(ip, port)]),
        };
    }
    let unresolved = |message: String| Unchecked::Unresolved {
        host: name.to_string(),
        message,
    };
    let answers = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, port)))
        .await
        .map_err(|_| unresolved(format!("no answer within {}s", RESOLVE_TIMEOUT.as_secs())))?
        .map_err(|e| unresolved(e.to_string()))?;
    let addresses: Vec<SocketAddr> = answers.collect();
    let ips: Vec<IpAddr> = addresses.iter().map(SocketAddr::ip).collect();
    if let Some(why) = policy::refuse_resolved_addresses(name, &ips) {
        return Err(Unchecked::Refused(why));
    }
    if addresses.is_empty() {
        return Err(unresolved("no addresses".into()));
    }
    Ok(addresses)
}

/// Why `host` (`name`, `name:port` or `[v6]:port`) may not be fetched from once resolved, or
/// None: an early refusal with a clear message before credentials are read. A host that does
/// not resolve is left to the fetch, which reports it.
pub async fn refuse_resolved(host: &str) -> Option<String> {
    let name = policy::split_host_port(host).0;
    if name.is_empty() {
        return None;
    }
    match resolve_checked(name, 0).await {
        Err(Unchecked::Refused(why)) => Some(why),
        _ => None,
    }
}

/// A connection to `name` on `port`, made only to an address that was checked: the answers
/// are tried in order.
pub async fn connect_checked(name: &str, port: u16) -> Result<TcpStream, Unchecked> {
    let mut last_error = String::from("no addresses");
    for address in resolve_checked(name, port).await? {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last_error = format!("{address}: {e}"),
            Err(_) => last_error = format!("{address}: no connection within {}s", CONNECT_TIMEOUT.as_secs()),
        }
    }
    Err(Unchecked::Unreachable {
        host: name.to_string(),
        message: last_error,
    })
}

/// What a guard turned away, for the fetch's error.
#[derive(Debug, Default)]
struct Outcomes {
    /// The first refusal: the reason the fetch failed, whatever its client then reports.
    refused: Option<String>,
    /// The last host that could not be resolved or reached.
    failed: Option<String>,
}

/// State shared by the guard's tasks.
#[derive(Debug, Default)]
struct Shared {
    outcomes: Mutex<Outcomes>,
    /// The accept loop, connections and tunnels; None once the guard is dropped, which
    /// aborts them all.
    tasks: Mutex<Option<JoinSet<()>>>,
}

impl Shared {
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tasks) = tasks.as_mut() {
            while tasks.try_join_next().is_some() {}
            tasks.spawn(task);
        }
    }

    fn record(&self, error: &Unchecked) {
        let mut outcomes = self.outcomes.lock().unwrap_or_else(PoisonError::into_inner);
        match error {
            Unchecked::Refused(why) => {
                outcomes.refused.get_or_insert_with(|| why.clone());
            }
            other => outcomes.failed = Some(other.to_string()),
        }
    }
}

/// A forward proxy on loopback that connects only to checked addresses (`CONNECT` for
/// TLS, absolute-form requests for plain HTTP), for the duration of one fetch.
#[derive(Debug)]
pub struct Guard {
    address: SocketAddr,
    shared: Arc<Shared>,
}

impl Guard {
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared {
            tasks: Mutex::new(Some(JoinSet::new())),
            ..Shared::default()
        });
        let accepting = shared.clone();
        shared.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of file descriptors, say: wait rather than spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let serving = accepting.clone();
                accepting.spawn(serve(stream, serving));
            }
        });
        Ok(Self { address, shared })
    }

    /// The proxy URL to give a client.
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Why a connection was refused during the fetch, if one was.
    pub fn refusal(&self) -> Option<String> {
        self.outcomes().refused.clone()
    }

    /// Which host could not be resolved or reached, if one could not: clients report only
    /// that the proxy answered with an error.
    pub fn failure(&self) -> Option<String> {
        self.outcomes().failed.clone()
    }

    fn outcomes(&self) -> std::sync::MutexGuard<'_, Outcomes> {
        self.shared.outcomes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let tasks = self.shared.tasks.lock().unwrap_or_else(PoisonError::into_inner).take();
        drop(tasks);
    }
}

async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let service = hyper::service::service_fn(move |request| forward(request, shared.clone()));
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
}

/// The host and port a proxy request is for.
fn destination(request: &Request<Incoming>) -> Option<(String, u16)> {
    let uri = request.uri();
    let authority = uri.authority()?;
    let default_port = if request.method() == Method::CONNECT {
        443
    } else if uri.scheme_str() == Some("http") {
        80
    } else {
        return None;
    };
    let host = authority.host();
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    Some((host.to_string(), authority.port_u16().unwrap_or(default_port)))
}

fn answer(status: StatusCode, message: String) -> Response<Body> {
    let mut response = Response::new(Body::from(message));
    *response.status_mut() = status;
    response
}

async fn forward(request: Request<Incoming>, shared: Arc<Shared>) -> Result<Response<Body>, Infallible> {
    let Some((host, port)) = destination(&request) else {
        return Ok(answer(
            StatusCode::BAD_REQUEST,
            "only CONNECT and absolute http:// requests are forwarded".into(),
        ));
    };
    let upstream = match connect_checked(&host, port).await {
        Ok(stream) => stream,
        Err(error) => {
            shared.record(&error);
            let status = match error {
                Unchecked::Refused(_) => StatusCode::FORBIDDEN,
                _ => StatusCode::BAD_GATEWAY,
            };
            return Ok(answer(status, error.to_string()));
        }
    };
    if request.method() == Method::CONNECT {
        let upgrade = hyper::upgrade::on(request);
        shared.spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut client = TokioIo::new(upgraded);
                let mut upstream = upstream;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
        });
        return Ok(Response::new(Body::empty()));
    }
    Ok(relay(request, upstream, &host, port, &shared).await)
}

/// Sends a plain-HTTP request on to `upstream` in origin form and returns its answer.
async fn relay(
    request: Request<Incoming>,
    upstream: TcpStream,
    host: &str,
    port: u16,
    shared: &Shared,
) -> Response<Body> {
    let failed = |message: String| answer(StatusCode::BAD_GATEWAY, format!("{host}:{port}: {message}"));
    let (mut sender, connection) = match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
        Ok(handshake) => handshake,
        Err(e) => return failed(e.to_string()),
    };
    shared.spawn(async move {
        let _ = connection.await;
    });
    let (mut parts, body) = request.into_parts();
    let origin_form = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = match origin_form.parse() {
        Ok(uri) => uri,
        Err(e) => return failed(e.to_string()),
    };
    // Meant for the proxy, not the server.
    parts.headers.remove("proxy-connection");
    parts.headers.remove(hyper::header::PROXY_AUTHORIZATION);
    match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(response) => response.map(Body::new),
        Err(e) => failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn names_are_refused_by_what_they_resolve_to() {
        // Forms of 169.254.169.254, read without asking DNS.
        for host in [
            "2852039166",
            "0xa9fea9fe",
            "0251.0376.0251.0376:443",
            "[::ffff:a9fe:a9fe]:443",
        ] {
            let why = refuse_resolved(host).await;
            assert!(
                why.as_deref().is_some_and(|w| w.contains("169.254.169.254")),
                "{host}: {why:?}"
            );
        }
        assert_eq!(refuse_resolved("localhost:5000").await, None);
        assert_eq!(refuse_resolved("does-not-resolve.invalid").await, None);
        assert_eq!(refuse_resolved("10.0.0.5").await, None);
    }

    /// A request through the guard, and what came back.
    async fn through(guard: &Guard, request: &str) -> String {
        let mut client = TcpStream::connect(guard.address).await.unwrap();
        client.write_all(request.as_bytes()).await.unwrap();
        let mut answer = vec![0; 4096];
        let read = client.read(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer[..read]).into_owned()
    }

    #[tokio::test]
    async fn refused_hosts_are_never_connected_to() {
        let guard = Guard::start().await.unwrap();
        for (request, refused) in [
            (
                "CONNECT 169.254.169.254:443 HTTP/1.1\r\nHost: 169.254.169.254:443\r\n\r\n",
                "169.254.169.254",
            ),
            (
                "CONNECT [::ffff:169.254.169.254]:443 HTTP/1.1\r\nHost: x\r\n\r\n",
                "169.254.169.254",
            ),
            (
                "GET http://2852039166/latest HTTP/1.1\r\nHost: 2852039166\r\n\r\n",
                "169.254.169.254",
            ),
            ("GET http://[fe80::1]:80/ HTTP/1.1\r\nHost: x\r\n\r\n", "fe80::1"),
        ] {
            let answer = through(&guard, request).await;
            assert!(answer.starts_with("HTTP/1.1 403"), "{request}: {answer}");
            assert!(answer.contains(refused), "{answer}");
        }
        assert!(guard.refusal().unwrap().contains("169.254.169.254"));
    }

    #[tokio::test]
    async fn checked_hosts_are_tunnelled_and_relayed() {
        let server = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = server.accept().await.unwrap();
                let mut request = vec![0; 4096];
                let read = stream.read(&mut request).await.unwrap();
                let first_line = String::from_utf8_lossy(&request[..read])
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let body = format!("saw {first_line}");
                let response = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                stream.write_all(response.as_bytes()).await.unwrap();
            }
        });
        let guard = Guard::start().await.unwrap();
        let relayed = through(
            &guard,
            &format!("GET http://localhost:{port}/v2/?x=1 HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n"),
        )
        .await;
        assert!(relayed.starts_with("HTTP/1.1 200"), "{relayed}");
        assert!(relayed.ends_with("saw GET /v2/?x=1 HTTP/1.1"), "{relayed}");

        let mut client = TcpStream::connect(guard.address).await.unwrap();
        let connect = format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
        client.write_all(connect.as_bytes()).await.unwrap();
        let mut answer = vec![0; 4096];
        let read = client.read(&mut answer).await.unwrap();
        assert!(
            answer[..read].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer[..read])
        );
        client.write_all(b"GET /tunnelled HTTP/1.1\r\n\r\n").await.unwrap();
        let read = client.read(&mut answer).await.unwrap();
        assert!(String::from_utf8_lossy(&answer[..read]).ends_with("saw GET /tunnelled HTTP/1.1"));
        assert_eq!(guard.refusal(), None);

        let unreachable = through(&guard, "CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(unreachable.starts_with("HTTP/1.1 502"), "{unreachable}");
        assert!(guard.failure().unwrap().contains("127.0.0.1:1"));
    }
}
