//! Plain HTTP/1.1 for local programs (docs/http.md): the routes of [`routes`] on
//! `daemon.http_socket` (a Unix socket, callers known by SO_PEERCRED as on the gRPC socket)
//! and on `daemon.http_listen` (loopback TCP, callers known by the kernel's socket table, see
//! [`peer`]).
//!
//! - [`routes`]: the routes, the header rules and the JSON errors.
//! - [`peer`]: the uid of a loopback TCP peer, from `/proc/self/net/tcp{,6}`.
//!
//! The socket is bound as the gRPC one is ([`crate::grpc::server::bind`]: stale file replaced,
//! mode set before anyone can connect, later modes applied through the descriptor). Each
//! listener is bounded like the gRPC socket ([`crate::limits`]): at most
//! [`Limits::max_connections`] connections (at the cap it stops accepting), the request line
//! and headers within [`Limits::max_header_list`] bytes (hyper answers 431 beyond) and within
//! [`Limits::handshake_timeout`] (a slow sender is cut off; the same timeout closes a kept-alive
//! connection that sends nothing more), one request at a time per connection, and no request
//! body read. A long poll holds its connection for at most [`routes::LONG_POLL`].
//!
//! A reload rebinds a listener whose path or address changed (the new one first, so a failure
//! leaves the old one serving), applies a new `socket_mode` to the bound socket, and a new
//! `max_connections` to both.

pub mod peer;
pub mod routes;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::config::DaemonConfig;
use crate::grpc::ServeError;
use crate::grpc::access::Caller;
use crate::grpc::server::{STOP_GRACE, bind, bound_inode, remove_if_ours, set_bound_mode};
use crate::grpc::service::TokenApi;
use crate::limits::{self, ConnGate, Limits};
use crate::store::Store;
use routes::{Routes, Transport};

/// Why an HTTP listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// `http_socket` could not be bound.
    #[error("http_socket: {0}")]
    Socket(#[from] ServeError),
    /// `http_listen` could not be bound.
    #[error("http_listen {addr}: cannot listen: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// `daemon.http_listen` checked: a socket address on loopback (`127.0.0.0/8` or `::1`), not
/// `metrics_listen`'s. Port 0 picks a free port, named in the log (pure).
pub fn check_listen(text: &str, metrics: Option<SocketAddr>) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text.parse().map_err(|_| {
        format!("http_listen \"{text}\" is not a socket address such as \"127.0.0.1:8089\"")
    })?;
    let loopback = match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => ip.is_loopback(),
    };
    if !loopback {
        return Err(format!(
            "http_listen \"{text}\" is not a loopback address: the HTTP API serves this host's \
             programs only; use 127.0.0.1:PORT or [::1]:PORT (or http_socket)"
        ));
    }
    if addr.port() != 0 && metrics == Some(addr) {
        return Err(format!(
            "http_listen \"{text}\" is also metrics_listen: give each its own port"
        ));
    }
    Ok(addr)
}

/// Where a server listens.
enum Bound {
    /// `http_socket`: its path, mode, (device, inode) and `O_PATH` descriptor.
    Socket {
        path: PathBuf,
        mode: u32,
        inode: (u64, u64),
        file: OwnedFd,
    },
    /// `http_listen`: the address asked for and the one bound (they differ for port 0).
    Tcp {
        asked: SocketAddr,
        local: SocketAddr,
    },
}

/// One running HTTP listener.
pub struct HttpServer {
    bound: Bound,
    gate: Arc<ConnGate>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    /// Binds `path` with `mode` and serves the routes over `store` within `limits`.
    pub fn start_socket(
        path: &Path,
        mode: u32,
        store: Arc<Store>,
        limits: &Limits,
    ) -> Result<HttpServer, HttpError> {
        let (listener, file) = bind(path, mode)?;
        let inode = bound_inode(&file, path)?;
        let bound = Bound::Socket {
            path: path.to_path_buf(),
            mode,
            inode,
            file,
        };
        tracing::info!(socket = %path.display(), mode = format!("{mode:04o}"), "HTTP API listening");
        Ok(HttpServer::serve(
            Listener::Unix(listener),
            bound,
            store,
            limits,
        ))
    }

    /// Listens on `addr` (loopback) and serves the routes over `store` within `limits`.
    pub async fn start_tcp(
        addr: SocketAddr,
        store: Arc<Store>,
        limits: &Limits,
    ) -> Result<HttpServer, HttpError> {
        let fail = |source| HttpError::Listen { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(fail)?;
        let local = listener.local_addr().map_err(fail)?;
        tracing::info!(address = %local, "HTTP API listening");
        if let Err(e) = std::fs::File::open(peer::TABLES[0]) {
            tracing::error!(
                "http_listen {local}: cannot read {} ({e}): every caller over TCP will be \
                 refused; use http_socket, or give the daemon its network namespace's /proc",
                peer::TABLES[0]
            );
        }
        let bound = Bound::Tcp { asked: addr, local };
        Ok(HttpServer::serve(
            Listener::Tcp(listener),
            bound,
            store,
            limits,
        ))
    }

    fn serve(listener: Listener, bound: Bound, store: Arc<Store>, limits: &Limits) -> HttpServer {
        let stop = CancellationToken::new();
        let api = TokenApi::new(store, nix::unistd::geteuid().as_raw(), stop.clone());
        let gate = ConnGate::new(limits.max_connections);
        let task = tokio::spawn(accept_loop(
            listener,
            Routes::new(api),
            limits.clone(),
            gate.clone(),
            stop.clone(),
        ));
        HttpServer {
            bound,
            gate,
            stop,
            task,
        }
    }

    /// Changes the connection cap; connections over a lowered cap stay until they close.
    pub fn set_max_connections(&self, max: usize) {
        self.gate.set_max(max);
    }

    /// Ends long polls and waits (answered 503), lets requests in flight finish (up to
    /// [`STOP_GRACE`]), then removes the socket file if it is still ours.
    pub async fn stop(mut self) {
        self.stop.cancel();
        // Each connection gets STOP_GRACE after the cancel; a little more for them all.
        if tokio::time::timeout(STOP_GRACE + Duration::from_millis(500), &mut self.task)
            .await
            .is_err()
        {
            tracing::warn!("HTTP requests still open after {STOP_GRACE:?}; closing them");
            self.task.abort();
        }
        match &self.bound {
            Bound::Socket { path, inode, .. } => {
                remove_if_ours(path, *inode);
                tracing::info!(socket = %path.display(), "HTTP API stopped");
            }
            Bound::Tcp { local, .. } => tracing::info!(address = %local, "HTTP API stopped"),
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The daemon's HTTP listeners: none, one or both of `http_socket` and `http_listen`.
#[derive(Default)]
pub struct HttpApi {
    socket: Option<HttpServer>,
    tcp: Option<HttpServer>,
}

impl HttpApi {
    /// Starts the listeners `daemon` names.
    pub async fn start(
        daemon: &DaemonConfig,
        store: Arc<Store>,
        limits: &Limits,
    ) -> Result<HttpApi, HttpError> {
        let mut api = HttpApi::default();
        if let Some(path) = &daemon.http_socket {
            api.socket = Some(HttpServer::start_socket(
                path,
                daemon.socket_mode,
                store.clone(),
                limits,
            )?);
        }
        if let Some(addr) = daemon.http_listen {
            api.tcp = Some(HttpServer::start_tcp(addr, store, limits).await?);
        }
        Ok(api)
    }

    /// A reload: rebinds what moved (the new listener first; on failure the old one keeps
    /// serving and the error is logged), stops what was removed, applies `socket_mode` and
    /// the connection cap to what stays.
    pub async fn apply(&mut self, daemon: &DaemonConfig, store: Arc<Store>, limits: &Limits) {
        let mode = daemon.socket_mode;
        let same_socket = match (&mut self.socket, &daemon.http_socket) {
            (Some(server), Some(want)) => match &mut server.bound {
                Bound::Socket {
                    path,
                    mode: have,
                    file,
                    ..
                } if path == want => {
                    if *have != mode {
                        match set_bound_mode(file, path, mode) {
                            Ok(()) => {
                                *have = mode;
                                tracing::info!(socket = ?path, "HTTP socket mode is now {mode:04o}");
                            }
                            Err(e) => tracing::error!("http_socket: {e}"),
                        }
                    }
                    true
                }
                _ => false,
            },
            (None, None) => true,
            _ => false,
        };
        if !same_socket {
            let new = daemon
                .http_socket
                .as_ref()
                .map(|path| HttpServer::start_socket(path, mode, store.clone(), limits));
            replace(&mut self.socket, new, "HTTP socket").await;
        }
        let asked = |s: &HttpServer| match s.bound {
            Bound::Tcp { asked, .. } => Some(asked),
            Bound::Socket { .. } => None,
        };
        if self.tcp.as_ref().and_then(asked) != daemon.http_listen {
            let new = match daemon.http_listen {
                Some(addr) => Some(HttpServer::start_tcp(addr, store, limits).await),
                None => None,
            };
            replace(&mut self.tcp, new, "HTTP listener").await;
        }
        self.set_max_connections(limits);
    }

    fn set_max_connections(&self, limits: &Limits) {
        for s in [&self.socket, &self.tcp].into_iter().flatten() {
            s.set_max_connections(limits.max_connections);
        }
    }

    /// Stops both listeners, at the same time (each within its grace).
    pub async fn stop(&mut self) {
        let stop = |s: Option<HttpServer>| async move {
            if let Some(s) = s {
                s.stop().await;
            }
        };
        tokio::join!(stop(self.socket.take()), stop(self.tcp.take()));
    }
}

/// Puts the `new` server (none, or one just started) in `slot` and stops the one it replaces;
/// when `new` failed, logs why and keeps the old one serving.
async fn replace(
    slot: &mut Option<HttpServer>,
    new: Option<Result<HttpServer, HttpError>>,
    what: &str,
) {
    match new.transpose() {
        Ok(new) => {
            if let Some(old) = std::mem::replace(slot, new) {
                old.stop().await;
            }
        }
        Err(e) => {
            tracing::error!("{what} not moved, still serving the old one (if any): {e}");
        }
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// An accepted connection with who is calling, as far as known now.
enum Accepted {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream, SocketAddr),
}

impl limits::Accept for Listener {
    type Conn = Accepted;
    async fn accept(&self) -> std::io::Result<Accepted> {
        match self {
            Listener::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
            Listener::Tcp(l) => l.accept().await.map(|(s, peer)| Accepted::Tcp(s, peer)),
        }
    }
}

impl Listener {
    /// The `listener` label of this listener's metrics.
    fn label(&self) -> &'static str {
        match self {
            Listener::Unix(_) => "http_socket",
            Listener::Tcp(_) => "http_listen",
        }
    }

    fn what(&self) -> &'static str {
        match self {
            Listener::Unix(_) => "HTTP socket",
            Listener::Tcp(_) => "HTTP listener",
        }
    }
}

/// Accepts connections until `stop`, then waits for them to end ([`limits::accept_loop`]).
/// Each is charged to its peer uid: the kernel's record of the peer (socket) or its row in the
/// socket table (TCP).
async fn accept_loop(
    listener: Listener,
    routes: Routes,
    limits: Limits,
    gate: Arc<ConnGate>,
    stop: CancellationToken,
) {
    let what = listener.what();
    let label = listener.label();
    let serve = |conn, permit: limits::ConnPermit| {
        let routes = routes.clone();
        let limits = limits.clone();
        let stop = stop.clone();
        async move {
            let caller = match &conn {
                Accepted::Unix(stream) => Caller::of_stream(stream).map(Arc::new),
                Accepted::Tcp(stream, peer) => tcp_caller(stream, *peer).await,
            };
            let uid = caller.as_ref().map(|c| c.uid);
            let Some(held) = permit.charge_or_refuse(uid, what, label) else {
                return;
            };
            match conn {
                Accepted::Unix(stream) => {
                    serve_connection(stream, Transport::Unix, caller, routes, &limits, stop).await;
                }
                Accepted::Tcp(stream, _) => {
                    serve_connection(stream, Transport::Tcp, caller, routes, &limits, stop).await;
                }
            }
            drop(held);
        }
    };
    limits::accept_loop(what, gate, stop.clone(), listener, serve).await;
}

/// The caller of a TCP connection, from the kernel's socket table, looked up at once (the
/// peer's row is there while the connection is); `None` when it is not found.
async fn tcp_caller(stream: &tokio::net::TcpStream, peer: SocketAddr) -> Option<Arc<Caller>> {
    let local = stream.local_addr().ok()?;
    let found = tokio::task::spawn_blocking(move || peer::caller_of(peer, local)).await;
    match found {
        Ok(Ok(caller)) => Some(Arc::new(caller)),
        Ok(Err(e)) => {
            tracing::info!(peer = %peer, "HTTP caller refused: {e}");
            None
        }
        Err(e) => {
            tracing::warn!("HTTP caller lookup failed: {e}");
            None
        }
    }
}

/// Serves HTTP/1.1 on one connection within `limits` until the peer closes, the header
/// timeout or a protocol error ends it, or `stop` (then requests in flight get
/// [`STOP_GRACE`]).
async fn serve_connection<IO>(
    io: IO,
    transport: Transport,
    caller: Option<Arc<Caller>>,
    routes: Routes,
    limits: &Limits,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let routes = routes.clone();
        let caller = caller.clone();
        async move { Ok::<_, Infallible>(routes.answer(transport, caller.as_ref(), &req).await) }
    });
    let conn = builder(limits).serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!("HTTP connection: {e}");
            }
        }
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(STOP_GRACE, conn).await;
        }
    }
}

/// hyper's settings for every HTTP connection: the header block bounded in size and time.
fn builder(limits: &Limits) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    // hyper's smallest read buffer is 8 KiB.
    let buf = limits.max_header_list.max(8192);
    b.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout)
        .max_header_size(limits.max_header_list)
        .max_buf_size(buf)
        .keep_alive(true);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_must_be_loopback() {
        let metrics: Option<SocketAddr> = "127.0.0.1:9464".parse().ok();
        for good in [
            "127.0.0.1:8089",
            "127.0.0.2:80",
            "[::1]:8089",
            "127.0.0.1:0",
        ] {
            assert!(check_listen(good, metrics).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("0.0.0.0:8089", "not a loopback"),
            ("192.168.1.5:8089", "not a loopback"),
            ("[::]:8089", "not a loopback"),
            ("[::ffff:127.0.0.1]:8089", "not a loopback"),
            ("localhost:8089", "not a socket address"),
            ("127.0.0.1", "not a socket address"),
            ("127.0.0.1:9464", "also metrics_listen"),
        ] {
            let e = check_listen(bad, metrics).unwrap_err();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }
}
