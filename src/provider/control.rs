//! What the tests set and read on the built-in provider (feature `test-provider`, which the
//! dev-dependency of Cargo.toml turns on for them; the shipped binary and the demo go without):
//! faults ([`Fault`]), taking it off the network and back ([`Provider::pause`],
//! [`Provider::resume`]), the requests it received ([`Provider::requests`]), a wrong clock
//! ([`Provider::set_clock_offset`]), and what it issued.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use hyper::Response;
use hyper::header::{DATE, HeaderValue};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::fault::{self, Action, Fault, FaultPlan};
use super::response::Body;
use super::{Endpoint, Provider, RecordedRequest, RefreshGrant, RegisteredClient, accept_loop};
use crate::secret::fingerprint;

/// What the tests set and read in the provider's [`super::Ledger`].
#[derive(Default)]
pub(super) struct Observed {
    pub faults: FaultPlan,
    pub requests: Vec<RecordedRequest>,
    /// Seconds added to the `Date` header of successful answers (a provider with a wrong clock).
    pub date_offset: i64,
    /// Access token → who holds it and until when.
    pub live: HashMap<String, LiveToken>,
    /// Tokens issued per client id.
    pub issued: HashMap<String, usize>,
    /// Client id → how many times a used refresh token was presented again.
    pub reuse_detected: HashMap<String, usize>,
}

pub(super) struct LiveToken {
    client_id: String,
    expires: Instant,
    /// The `x5t#S256` the token is bound to (RFC 8705 §3.1), as introspection would show it.
    cnf: Option<String>,
}

impl Observed {
    /// Notes `access_token`, just issued to `client`.
    pub fn note_issued(
        &mut self,
        access_token: &str,
        client: &RegisteredClient,
        cnf: Option<String>,
    ) {
        self.live.insert(
            access_token.to_string(),
            LiveToken {
                client_id: client.client_id.clone(),
                expires: Instant::now() + client.lifetime,
                cnf,
            },
        );
        *self.issued.entry(client.client_id.clone()).or_default() += 1;
    }

    /// Notes that `client_id` presented a used refresh token again.
    pub fn note_reuse(&mut self, client_id: &str) {
        *self
            .reuse_detected
            .entry(client_id.to_string())
            .or_default() += 1;
    }
}

/// The provider's listener, which [`Provider::pause`] takes away and [`Provider::resume`]
/// gives back.
#[derive(Default)]
pub(super) struct Listening {
    /// The current listener's accept loop; `None` while paused.
    serving: Mutex<Option<Serving>>,
    /// While paused: a socket bound to the port but not listening, so that connections are
    /// refused and no listener on port 0 (another test's) is given the port meanwhile.
    reserved: Mutex<Option<TcpSocket>>,
}

impl Listening {
    fn serving(&self) -> MutexGuard<'_, Option<Serving>> {
        self.serving.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reserved(&self) -> MutexGuard<'_, Option<TcpSocket>> {
        self.reserved.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A listener being served: cancelling `cancel` (a child of the provider's) closes it and its
/// connections; `task` ends once the listening socket is closed.
struct Serving {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Serving {
    fn spawn(listener: TcpListener, endpoint: Arc<Endpoint>) -> Serving {
        let cancel = endpoint.cancel.child_token();
        let task = tokio::spawn(accept_loop(listener, endpoint, cancel.clone()));
        Serving { cancel, task }
    }
}

/// Serves `listener` until the provider shuts down or is paused.
pub(super) fn serve(endpoint: &Arc<Endpoint>, listener: TcpListener) {
    *endpoint.listening.serving() = Some(Serving::spawn(listener, endpoint.clone()));
}

// === impl Provider ===

impl Provider {
    /// Makes the `Date` header of token answers run `seconds` ahead (negative: behind) of the
    /// real clock, as a provider with a wrong clock would.
    pub fn set_clock_offset(&self, seconds: i64) {
        self.ledger().observed.date_offset = seconds;
    }

    /// Changes the lifetime of the tokens a client gets from now on.
    pub fn set_lifetime(&self, client_id: &str, lifetime: Duration) {
        if let Some(c) = self.ledger().clients.get_mut(client_id) {
            c.lifetime = lifetime;
        }
    }

    /// Changes a client's reuse grace for rotated refresh tokens (`None`: strict) from now on;
    /// see [`RegisteredClient::refresh_reuse_grace`].
    pub fn set_refresh_reuse_grace(&self, client_id: &str, grace: Option<Duration>) {
        if let Some(c) = self.ledger().clients.get_mut(client_id) {
            c.refresh_reuse_grace = grace;
        }
    }

    /// Sets (or, with `None`, clears) a fault for every request until changed.
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.ledger().observed.faults.standing = fault;
    }

    /// Applies `fault` to the next `n` requests only, before any standing fault.
    pub fn fault_next(&self, fault: Fault, n: usize) {
        let mut st = self.ledger();
        st.observed
            .faults
            .queued
            .extend(std::iter::repeat_n(fault, n));
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.ledger().observed.requests.clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.ledger().observed.requests.clear();
    }

    /// How many access tokens a client was issued.
    pub fn issued(&self, client_id: &str) -> usize {
        self.ledger()
            .observed
            .issued
            .get(client_id)
            .copied()
            .unwrap_or(0)
    }

    /// Whether `access_token` was issued by this provider and has not expired.
    pub fn token_is_live(&self, access_token: &str) -> bool {
        self.ledger()
            .observed
            .live
            .get(access_token)
            .is_some_and(|t| Instant::now() < t.expires)
    }

    /// The client an access token was issued to, if it was issued here.
    pub fn token_owner(&self, access_token: &str) -> Option<String> {
        self.ledger()
            .observed
            .live
            .get(access_token)
            .map(|t| t.client_id.clone())
    }

    /// The `cnf` `x5t#S256` an access token issued here is bound to (RFC 8705 §3.1): the
    /// thumbprint of the certificate presented with the request that got it.
    pub fn token_cnf(&self, access_token: &str) -> Option<String> {
        self.ledger()
            .observed
            .live
            .get(access_token)
            .and_then(|t| t.cnf.clone())
    }

    /// Forgets every refresh token of a client: its next refresh grant gets `invalid_grant`.
    pub fn revoke_refresh_tokens(&self, client_id: &str) {
        self.ledger()
            .refresh
            .retain(|_, g| g.client_id != client_id);
    }

    /// A new refresh token for a client granting `scope`, as if issued with an earlier token
    /// (what an operator copies into a `refresh_token`-grant client's secret).
    pub fn mint_refresh_token(&self, client_id: &str, scope: &[&str]) -> String {
        let rt = format!(
            "twr_{}_minted_{}",
            fingerprint(client_id.as_bytes()),
            uuid::Uuid::new_v4().simple()
        );
        self.ledger().refresh.insert(
            rt.clone(),
            RefreshGrant {
                client_id: client_id.into(),
                scope: scope.iter().map(|s| s.to_string()).collect(),
                rotated_at: None,
            },
        );
        rt
    }

    /// How many times a client presented a refresh token it had used up already (each time
    /// every refresh token of the client was revoked).
    pub fn reuse_detected(&self, client_id: &str) -> usize {
        self.ledger()
            .observed
            .reuse_detected
            .get(client_id)
            .copied()
            .unwrap_or(0)
    }

    /// How many unused refresh tokens a client holds (rotated ones still in their reuse grace
    /// are not counted).
    pub fn live_refresh_tokens(&self, client_id: &str) -> usize {
        self.ledger()
            .refresh
            .values()
            .filter(|g| g.client_id == client_id && g.rotated_at.is_none())
            .count()
    }

    /// Takes the provider off the network, as a host going down does: when this returns, the
    /// listening socket is closed (connections are refused) and open connections are being
    /// closed, hanging answers included. Nothing is forgotten; [`Provider::resume`] brings it
    /// back on the same address.
    pub async fn pause(&self) {
        let serving = self.endpoint().listening.serving().take();
        if let Some(s) = serving {
            s.cancel.cancel();
            // The accept loop drops the listener as it ends.
            let _ = s.task.await;
            let reserved = reserve(self.endpoint().addr);
            if let Err(e) = &reserved {
                debug!(addr = %self.endpoint().addr, "provider: cannot hold the port while paused: {e}");
            }
            *self.endpoint().listening.reserved() = reserved.ok();
            debug!(addr = %self.endpoint().addr, "provider: paused");
        }
    }

    /// Listens again on the same address after [`Provider::pause`] (no-op when not paused).
    /// Fails if the port was taken meanwhile, or after [`Provider::shutdown`].
    pub async fn resume(&self) -> std::io::Result<()> {
        let endpoint = &self.inner.endpoint;
        if endpoint.cancel.is_cancelled() {
            return Err(std::io::Error::other("the provider was shut down"));
        }
        if endpoint.listening.serving().is_some() {
            return Ok(());
        }
        // Let go of the port just before listening on it again.
        drop(endpoint.listening.reserved().take());
        let listener = TcpListener::bind(endpoint.addr).await?;
        let mut slot = endpoint.listening.serving();
        // A concurrent resume may have won; then this listener is simply dropped.
        if slot.is_none() {
            *slot = Some(Serving::spawn(listener, endpoint.clone()));
            debug!(addr = %endpoint.addr, "provider: resumed");
        }
        Ok(())
    }
}

// === serving ===

/// A TCP socket bound to `addr` (with `SO_REUSEADDR`, as listeners are, so connections of the
/// closed listener in TIME_WAIT do not stand in the way) and not listening: a connection to it
/// is refused, and Linux does not hand the port to anyone binding port 0 (its first pass over
/// the ephemeral range skips ports with any socket bound, whatever `SO_REUSEADDR` says). An
/// explicit bind to the port with `SO_REUSEADDR` is still possible: this guards against other
/// tests' listeners on port 0, not against someone choosing the port.
fn reserve(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// Records `recorded` and applies the fault in force, if any: then `Some` holds the answer that
/// replaces the token endpoint's.
pub(super) async fn intercept(
    endpoint: &Endpoint,
    recorded: &RecordedRequest,
) -> Option<Result<Response<Body>, std::io::Error>> {
    let fault = {
        let mut st = endpoint.lock();
        let mut kept = recorded.clone();
        kept.received_at = Instant::now();
        st.observed.requests.push(kept);
        st.observed.faults.take()
    }?;
    debug!(path = %recorded.path, fault = fault_name(&fault), "provider: applying fault");
    let fault = match fault {
        Fault::Echo { status, html, pad } => fault::echo(status, html, pad, recorded),
        other => other,
    };
    Some(match fault::action(&fault) {
        Action::Respond(r) => Ok(r),
        Action::Hang => {
            endpoint.cancel.cancelled().await;
            Err(std::io::Error::other("provider shut down"))
        }
        Action::Drop => Err(std::io::Error::other("connection dropped on purpose")),
    })
}

/// `r` with its `Date` header moved by the clock offset ([`Provider::set_clock_offset`]).
pub(super) fn shift_date(endpoint: &Endpoint, mut r: Response<Body>) -> Response<Body> {
    let offset = endpoint.lock().observed.date_offset;
    if offset != 0 {
        let now = SystemTime::now();
        let at = if offset > 0 {
            now + Duration::from_secs(offset.unsigned_abs())
        } else {
            now - Duration::from_secs(offset.unsigned_abs())
        };
        // An IMF-fixdate (RFC 9110 §5.6.7).
        if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(at)) {
            r.headers_mut().insert(DATE, v);
        }
    }
    r
}

fn fault_name(f: &Fault) -> &'static str {
    match f {
        Fault::ServerError => "server_error",
        Fault::TooManyRequests { .. } => "too_many_requests",
        Fault::InvalidJson => "invalid_json",
        Fault::HtmlError => "html_error",
        Fault::Hang => "hang",
        Fault::DropConnection => "drop_connection",
        Fault::TruncatedBody => "truncated_body",
        Fault::Custom { .. } => "custom",
        Fault::Echo { .. } => "echo",
    }
}
