//! Every bound the listeners put on their peers, in one place.
//!
//! Whoever may connect to the gRPC socket or reach `metrics_listen` must not be able to make
//! another client's token expire or grow the daemon's memory without bound (README "Security
//! model"). Each bound below is a builder setting or a check named here, not a constant in the
//! module that applies it:
//!
//! - connections per listener ([`Limits::max_connections`], `daemon.max_connections`; the
//!   metrics listener [`Limits::metrics_max_connections`]): at the cap a listener stops
//!   accepting, peers wait in the kernel's backlog, and no descriptor is spent on them; on the
//!   gRPC socket one peer uid holds at most [`uid_share`] of the cap, and a connection beyond
//!   its uid's share is closed at once, so no local user can keep the others waiting;
//! - the HTTP/2 preface and SETTINGS within [`Limits::handshake_timeout`], and no connection
//!   kept without an open stream past [`Limits::idle_timeout`];
//! - streams per connection ([`Limits::max_concurrent_streams`], RFC 9113 §5.1.2), and
//!   `WatchToken` / `grpc.health.v1.Health/Watch` streams in all ([`Limits::max_watch_streams`],
//!   `RESOURCE_EXHAUSTED` beyond);
//! - a header block by its decoded size (RFC 7541 §4.1, [`Limits::max_header_list`]) in every
//!   layer that decodes one, before anything proportional to it is allocated;
//! - a request message ([`Limits::max_message`], `RESOURCE_EXHAUSTED` beyond), flow-control
//!   windows and send buffers, so what a peer may make the daemon hold per connection is small.
//!
//! Descriptors: the daemon's own work (state, outputs, provider connections) must never find the
//! descriptor table full because peers took it. [`plan_descriptors`] raises the soft
//! `RLIMIT_NOFILE` to the hard one at start and, when the connection caps plus a reserve for
//! that work do not fit, lowers the caps until they do (with a warning naming the fix).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Default of `daemon.max_connections`: connections at once on the gRPC socket.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Connections at once on the metrics listener (a scraper or two; never more than
/// `daemon.max_connections`).
pub const METRICS_MAX_CONNECTIONS: usize = 32;
/// Concurrent streams per HTTP/2 connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 16;
/// `WatchToken` and `Health/Watch` streams open at once over all connections.
pub const MAX_WATCH_STREAMS: usize = 1024;
/// Largest header list, by decoded size (RFC 7541 §4.1: name + value + 32 per field).
pub const MAX_HEADER_LIST: usize = 16 * 1024;
/// Largest request message: requests carry a client name and a duration.
pub const MAX_MESSAGE: usize = 4 * 1024;
/// How long a new connection has for the HTTP/2 preface and its SETTINGS frame.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may stay open without a stream.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Descriptors kept for the daemon's own work beyond the connection caps: a base (runtime,
/// watcher, logs, listeners) ...
pub const RESERVE_BASE: u64 = 64;
/// ... plus this many per concurrent refresh (a provider connection, a state file, an
/// output's temporary file and its directory).
pub const RESERVE_PER_REFRESH: u64 = 4;

/// The bounds of the gRPC and metrics listeners. See the module doc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections at once on the gRPC socket (`daemon.max_connections`).
    pub max_connections: usize,
    /// Connections at once on the metrics listener.
    pub metrics_max_connections: usize,
    /// Concurrent streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS); h2 refuses more
    /// with REFUSED_STREAM.
    pub max_concurrent_streams: u32,
    /// Watch streams (`WatchToken`, `Health/Watch`) at once over all connections.
    pub max_watch_streams: usize,
    /// Largest decoded header list (SETTINGS_MAX_HEADER_LIST_SIZE, and the `:authority`
    /// adaptor's bound); its encoded block is bounded by the same number.
    pub max_header_list: usize,
    /// Largest request message (gRPC length prefix).
    pub max_message: usize,
    /// Receive window per stream: a request is one small message.
    pub stream_window: u32,
    /// Receive window per connection: what a peer can make us buffer on one connection.
    pub connection_window: u32,
    /// Largest response data h2 buffers per stream.
    pub max_send_buffer: usize,
    /// Deadline for the HTTP/2 preface and the client's first SETTINGS.
    pub handshake_timeout: Duration,
    /// A connection without an open stream for this long is closed (GOAWAY).
    pub idle_timeout: Duration,
    /// After a GOAWAY for idleness, how long the peer has to finish before the connection is
    /// dropped.
    pub close_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            metrics_max_connections: METRICS_MAX_CONNECTIONS,
            max_concurrent_streams: MAX_CONCURRENT_STREAMS,
            max_watch_streams: MAX_WATCH_STREAMS,
            max_header_list: MAX_HEADER_LIST,
            max_message: MAX_MESSAGE,
            stream_window: 64 * 1024,
            connection_window: 256 * 1024,
            max_send_buffer: 64 * 1024,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            close_grace: Duration::from_secs(1),
        }
    }
}

impl Limits {
    /// The defaults with `max_connections` from the config; the metrics listener's cap is
    /// [`METRICS_MAX_CONNECTIONS`] or `max_connections`, whichever is lower.
    pub fn with_max_connections(max_connections: usize) -> Limits {
        Limits {
            max_connections,
            metrics_max_connections: METRICS_MAX_CONNECTIONS.min(max_connections),
            ..Limits::default()
        }
    }

    /// The h2 server settings of every gRPC connection.
    pub fn h2_builder(&self) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_header_list_size(u32::try_from(self.max_header_list).unwrap_or(u32::MAX))
            .max_send_buffer_size(self.max_send_buffer);
        b
    }
}

// === impl descriptors ===

/// The descriptor budget: what the soft `RLIMIT_NOFILE` allows and the caps that fit in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescriptorPlan {
    /// The soft limit after raising it.
    pub soft: u64,
    /// Descriptors kept for the daemon's own work.
    pub reserve: u64,
    /// The gRPC socket's cap that fits.
    pub max_connections: usize,
    /// The metrics listener's cap that fits.
    pub metrics_max_connections: usize,
    /// Set when the caps were lowered: what happened and what to do.
    pub warning: Option<String>,
}

/// Descriptors kept for the daemon's own work with `max_concurrent_refreshes` (pure).
pub fn reserve(max_concurrent_refreshes: usize) -> u64 {
    RESERVE_BASE + RESERVE_PER_REFRESH * max_concurrent_refreshes as u64
}

/// Fits the listeners' caps into `soft` descriptors, `in_use` of which are open already, and
/// `reserve` of which are kept for the daemon's own work (pure). When they do not fit, both
/// caps are lowered in proportion (at least one connection each) and a warning says so.
pub fn fit(
    soft: u64,
    in_use: u64,
    reserve: u64,
    max_connections: usize,
    metrics_max_connections: usize,
) -> DescriptorPlan {
    let want = max_connections as u64 + metrics_max_connections as u64;
    let room = soft.saturating_sub(in_use).saturating_sub(reserve);
    if want <= room {
        return DescriptorPlan {
            soft,
            reserve,
            max_connections,
            metrics_max_connections,
            warning: None,
        };
    }
    let scale = |n: usize| -> usize {
        let scaled = (n as u64).saturating_mul(room) / want.max(1);
        usize::try_from(scaled).unwrap_or(usize::MAX).max(1)
    };
    let grpc = scale(max_connections);
    let metrics = scale(metrics_max_connections);
    DescriptorPlan {
        soft,
        reserve,
        max_connections: grpc,
        metrics_max_connections: metrics,
        warning: Some(format!(
            "the descriptor limit (RLIMIT_NOFILE {soft}, {in_use} open) leaves no room for \
             {max_connections} socket and {metrics_max_connections} metrics connections plus \
             {reserve} descriptors for state, outputs and provider connections; serving at \
             most {grpc} and {metrics}: raise LimitNOFILE= (the unit sets 8192) or lower \
             daemon.max_connections"
        )),
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (what systemd's `LimitNOFILE=` or the
/// caller allows), counts the descriptors open now and fits `limits`' caps (see [`fit`]).
pub fn plan_descriptors(limits: &Limits, max_concurrent_refreshes: usize) -> DescriptorPlan {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let soft = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        // Unknown: assume the common default.
        Err(_) => 1024,
    };
    let in_use = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(16);
    fit(
        soft,
        in_use,
        reserve(max_concurrent_refreshes),
        limits.max_connections,
        limits.metrics_max_connections,
    )
}

/// The daemon's limits for `config`: `daemon.max_connections` fitted into the descriptor
/// budget (the metrics listener's cap counted only when `metrics_listen` is set), with a
/// warning logged when the caps had to be lowered.
pub fn for_daemon(config: &crate::config::DaemonConfig) -> Limits {
    let mut limits = Limits::with_max_connections(config.max_connections);
    let metrics = config.metrics_listen.is_some();
    // The HTTP listeners (http_socket, http_listen) each take max_connections too.
    let listeners =
        1 + usize::from(config.http_socket.is_some()) + usize::from(config.http_listen.is_some());
    let counted = Limits {
        max_connections: limits.max_connections.saturating_mul(listeners),
        metrics_max_connections: if metrics {
            limits.metrics_max_connections
        } else {
            0
        },
        ..limits.clone()
    };
    let plan = plan_descriptors(&counted, config.max_concurrent_refreshes);
    if let Some(w) = &plan.warning {
        tracing::warn!("{w}");
    }
    limits.max_connections = (plan.max_connections / listeners).max(1);
    if metrics {
        limits.metrics_max_connections = plan.metrics_max_connections;
    }
    tracing::debug!(
        nofile = plan.soft,
        reserve = plan.reserve,
        max_connections = limits.max_connections,
        metrics_max_connections = limits.metrics_max_connections,
        "connection caps"
    );
    limits
}

// === impl ConnGate ===

/// The most connections one peer uid may hold on a listener capped at `max`: a quarter of
/// the cap, at least 8, never more than the cap (pure). With the default cap of 256, 64: a
/// local user opening connections by the thousand holds 64 and the other 192 stay free for
/// everyone else.
pub fn uid_share(max: usize) -> usize {
    (max / 4).max(8).min(max)
}

/// Counts one listener's open connections against its cap, and on the gRPC socket each peer
/// uid's against its [`uid_share`]. The accept loop waits in [`ConnGate::admit`] before it
/// accepts, so at the cap nothing is accepted (and no descriptor taken) until a connection
/// closes; once it knows the peer it charges the connection to its uid
/// ([`ConnPermit::charge`]) and closes it at once when the uid already holds its share.
#[derive(Debug)]
pub struct ConnGate {
    max: AtomicUsize,
    open: AtomicUsize,
    /// Signalled when a connection closes or the cap is raised. One waiter (the accept
    /// loop); `notify_one` keeps the signal when nobody waits yet, so none is lost.
    freed: Notify,
    /// Open connections per peer uid (`None`: a peer without credentials); a uid leaves the
    /// map with its last connection, so the map is never larger than the connections open.
    by_uid: Mutex<HashMap<Option<u32>, usize>>,
}

/// One admitted connection; dropping it frees its place (and its uid's).
#[derive(Debug)]
pub struct ConnPermit {
    gate: Arc<ConnGate>,
    /// The uid this connection is charged to, once [`ConnPermit::charge`]d.
    uid: Option<Option<u32>>,
}

impl ConnGate {
    /// A gate admitting `max` connections at once.
    pub fn new(max: usize) -> Arc<ConnGate> {
        Arc::new(ConnGate {
            max: AtomicUsize::new(max),
            open: AtomicUsize::new(0),
            freed: Notify::new(),
            by_uid: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more connection now, if there is one.
    pub fn try_admit(self: &Arc<Self>) -> Option<ConnPermit> {
        let max = self.max.load(Ordering::Acquire);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnPermit {
                gate: self.clone(),
                uid: None,
            })
    }

    /// Waits for a place for one more connection.
    pub async fn admit(self: &Arc<Self>) -> ConnPermit {
        loop {
            if let Some(p) = self.try_admit() {
                return p;
            }
            self.freed.notified().await;
        }
    }

    /// Changes the cap (a reload); connections over a lowered cap stay until they close.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
        self.freed.notify_one();
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
    }

    /// Connections open now.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Open connections charged to `uid`.
    pub fn open_by(&self, uid: Option<u32>) -> usize {
        let by_uid = self.by_uid.lock().unwrap_or_else(PoisonError::into_inner);
        by_uid.get(&uid).copied().unwrap_or(0)
    }
}

impl ConnPermit {
    /// Charges this connection to the peer `uid` (`None`: no credentials). `None` back, and
    /// the place freed, when that uid already holds its [`uid_share`] of the cap.
    pub fn charge(mut self, uid: Option<u32>) -> Option<ConnPermit> {
        let share = uid_share(self.gate.max());
        {
            let mut by_uid = self
                .gate
                .by_uid
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let held = by_uid.get(&uid).copied().unwrap_or(0);
            if held >= share {
                return None;
            }
            by_uid.insert(uid, held + 1);
        }
        self.uid = Some(uid);
        Some(self)
    }
}

impl ConnPermit {
    /// [`ConnPermit::charge`], and a connection over its uid's share logged (debug, on the
    /// listener named `what`) and counted under `label` in
    /// `tokenwarden_connections_refused_total`.
    pub fn charge_or_refuse(
        self,
        uid: Option<u32>,
        what: &str,
        label: &'static str,
    ) -> Option<Self> {
        let share = uid_share(self.gate.max());
        let charged = self.charge(uid);
        if charged.is_none() {
            tracing::debug!(
                uid,
                "{what}: connection closed: this uid holds {share} connections, its most \
                 (a quarter of daemon.max_connections, at least 8)"
            );
            crate::metrics::connection_refused(label, "uid_share");
        }
        charged
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        if let Some(uid) = self.uid {
            let mut by_uid = self
                .gate
                .by_uid
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(held) = by_uid.get_mut(&uid) {
                *held = held.saturating_sub(1);
                if *held == 0 {
                    by_uid.remove(&uid);
                }
            }
        }
        self.gate.open.fetch_sub(1, Ordering::AcqRel);
        self.gate.freed.notify_one();
    }
}

/// Waits for a place on `gate`, saying once (per time the cap is reached) that the listener
/// named `what` is full and stops accepting.
async fn admit_logged(gate: &Arc<ConnGate>, what: &str) -> ConnPermit {
    if let Some(p) = gate.try_admit() {
        return p;
    }
    tracing::warn!(
        "{what}: {} connections open, the most allowed (daemon.max_connections); not \
         accepting more until one closes",
        gate.max()
    );
    gate.admit().await
}

/// A listener [`accept_loop`] takes connections from.
pub trait Accept: Send {
    /// An accepted connection.
    type Conn: Send;
    /// The next connection.
    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Conn>> + Send;
}

impl Accept for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<Self::Conn> {
        tokio::net::UnixListener::accept(self)
            .await
            .map(|(stream, _)| stream)
    }
}

impl Accept for tokio::net::TcpListener {
    type Conn = (tokio::net::TcpStream, std::net::SocketAddr);
    async fn accept(&self) -> std::io::Result<Self::Conn> {
        tokio::net::TcpListener::accept(self).await
    }
}

/// Every listener's accept loop (gRPC socket, HTTP listeners, metrics): accepts with `accept`
/// until `stop`, one connection at a time and each only once `gate` has a place for it (at the
/// cap nothing is accepted, so no descriptor is taken, until a connection closes), and runs
/// `serve` for it in a task holding its place. At `stop` the listener is
/// closed first, then the open connections are waited for (`stop` ends them too). Dropping the
/// future drops every connection with it.
pub async fn accept_loop<L: Accept, Fut>(
    what: &'static str,
    gate: Arc<ConnGate>,
    stop: CancellationToken,
    listener: L,
    mut serve: impl FnMut(L::Conn, ConnPermit) -> Fut,
) where
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    let mut permit = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            p = admit_logged(&gate, what), if permit.is_none() => permit = Some(p),
            accepted = listener.accept(), if permit.is_some() => match accepted {
                Ok(conn) => {
                    if let Some(p) = permit.take() {
                        connections.spawn(serve(conn, p));
                    }
                }
                Err(e) => {
                    // EMFILE and the like: wait a little instead of spinning.
                    tracing::warn!("{what}: cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_fit_the_descriptor_limit() {
        // (soft, in use, reserve, grpc, metrics) -> (grpc, metrics, warned)
        let cases = [
            (8192, 20, 192, 256, 32, (256, 32, false)),
            (1024, 20, 192, 256, 32, (256, 32, false)),
            (512, 20, 192, 256, 32, (256, 32, false)),
            (400, 20, 192, 256, 32, (167, 20, true)),
            (100, 20, 192, 256, 32, (1, 1, true)),
            (1_048_576, 20, 192, 100_000, 32, (100_000, 32, false)),
        ];
        for (soft, in_use, reserve, grpc, metrics, (g, m, warned)) in cases {
            let p = fit(soft, in_use, reserve, grpc, metrics);
            assert_eq!(
                (
                    p.max_connections,
                    p.metrics_max_connections,
                    p.warning.is_some()
                ),
                (g, m, warned),
                "{soft} {in_use} {reserve} {grpc} {metrics}"
            );
            if warned {
                let w = p.warning.unwrap();
                assert!(
                    w.contains("LimitNOFILE") && w.contains("max_connections"),
                    "{w}"
                );
            } else {
                assert!(g as u64 + m as u64 + reserve + in_use <= soft);
            }
        }
    }

    #[test]
    fn reserve_grows_with_refreshes() {
        assert_eq!(reserve(32), 64 + 128);
        assert_eq!(reserve(1), 68);
    }

    #[test]
    fn metrics_cap_never_exceeds_max_connections() {
        assert_eq!(
            Limits::with_max_connections(256).metrics_max_connections,
            32
        );
        assert_eq!(Limits::with_max_connections(8).metrics_max_connections, 8);
    }

    #[test]
    fn a_uid_share_is_a_quarter_of_the_cap_at_least_eight() {
        for (max, share) in [
            (1, 1),
            (8, 8),
            (20, 8),
            (35, 8),
            (40, 10),
            (256, 64),
            (1000, 250),
        ] {
            assert_eq!(uid_share(max), share, "{max}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_uid_holds_its_share_and_others_still_get_in() {
        let gate = ConnGate::new(40); // share 10
        let nobody = Some(65534);
        let mut held: Vec<_> = (0..10)
            .map(|_| gate.try_admit().unwrap().charge(nobody).unwrap())
            .collect();
        // Over its share: refused at once, and the place it took is free again.
        for _ in 0..100 {
            assert!(gate.try_admit().unwrap().charge(nobody).is_none());
        }
        assert_eq!((gate.open(), gate.open_by(nobody)), (10, 10));
        // Another uid, and a peer without credentials, get in without waiting.
        let hour = Duration::from_secs(3600);
        let root = tokio::time::timeout(hour, gate.admit()).await.unwrap();
        let root = root.charge(Some(0)).unwrap();
        let anon = gate.try_admit().unwrap().charge(None).unwrap();
        assert_eq!(gate.open(), 12);
        // One of the uid's closes: it may open one more, not two.
        drop(held.pop());
        held.push(gate.try_admit().unwrap().charge(nobody).unwrap());
        assert!(gate.try_admit().unwrap().charge(nobody).is_none());
        // The global cap still makes the accept loop wait (not refuse).
        let others: Vec<_> = (1..=28)
            .map(|uid| gate.try_admit().unwrap().charge(Some(uid)).unwrap())
            .collect();
        assert_eq!(gate.open(), 40);
        assert!(tokio::time::timeout(hour, gate.admit()).await.is_err());
        drop((held, root, anon, others));
        assert_eq!(gate.open(), 0);
        assert!(gate.by_uid.lock().unwrap().is_empty(), "uids left behind");
    }

    #[tokio::test]
    async fn the_gate_admits_up_to_its_cap_and_wakes_on_close() {
        let gate = ConnGate::new(2);
        let a = gate.try_admit().unwrap();
        let _b = gate.try_admit().unwrap();
        assert!(gate.try_admit().is_none());
        assert_eq!(gate.open(), 2);
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.admit().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        let c = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(gate.open(), 2);
        drop(c);
        // A lowered cap: the open ones stay, no new one until under it.
        gate.set_max(1);
        assert!(gate.try_admit().is_none());
        gate.set_max(3);
        let _d = gate.try_admit().unwrap();
    }
}
