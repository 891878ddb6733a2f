//! `tokenwarden.v1.TokenService`: tokens and status out of the [`Store`], refreshes through
//! each client's refresher.
//!
//! Every call names a client; [`TokenApi::slot`] finds it and checks the caller may read it
//! (`PERMISSION_DENIED`; `NOT_FOUND` for a name no client has, told only to root and the
//! daemon's user). A token is only ever taken from a snapshot through
//! [`Snapshot::valid_token`], so an expired token is never served. Errors are [`ApiError`]s,
//! turned into a `tonic::Status` in one place; none carries a secret.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::Stream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::access::Caller;
use super::pb;
use crate::audit::Api;
use crate::config::ClientConfig;
use crate::oauth::Human;
use crate::refresher;
use crate::store::{ClientSlot, Reason, Snapshot, State, Store};
use crate::token::Token;

/// The request metadata with which `RefreshToken` asks for a token newer than the call
/// (`tokenwarden refresh` sends it): value `force`.
pub const FORCE_METADATA: &str = "tokenwarden-refresh";

/// The longest `min_valid_for` accepted: longer asks are mistakes (no provider issues tokens
/// living that long, and each call would force a token request).
pub const MAX_MIN_VALID: Duration = Duration::from_secs(24 * 3600);

/// Why a call failed. Messages name the client and never carry a token or a secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApiError {
    /// No client of that name (or it was removed while the call waited).
    #[error("no client named {0:?}")]
    NotFound(String),
    /// The caller's uid and groups are not allowed to read the client.
    #[error("uid {uid} may not read client {client:?} (see its allow_users / allow_groups)")]
    PermissionDenied { client: String, uid: u32 },
    /// The connection carries no peer credentials (not a Unix socket peer).
    #[error("the caller's identity is unknown (no peer credentials)")]
    UnknownCaller,
    /// No valid token now; `reason` is the last error.
    #[error("client {client:?} has no valid token: {reason}")]
    Unavailable { client: String, reason: String },
    /// A malformed request.
    #[error("{0}")]
    InvalidArgument(String),
    /// A `RefreshToken` that asked for a new token (`tokenwarden-refresh: force`) from a
    /// caller who may not force one, within the client's `min_interval`.
    #[error("client {client:?}: {held}")]
    NotRenewed {
        client: String,
        held: refresher::HeldBack,
    },
    /// The call's deadline passed while waiting for a token.
    #[error("client {0:?}: no token before the call's deadline")]
    DeadlineExceeded(String),
    /// The daemon is stopping.
    #[error("tokenwarden is stopping")]
    Stopping,
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let message = e.to_string();
        match e {
            ApiError::NotFound(_) => Status::not_found(message),
            ApiError::PermissionDenied { .. } | ApiError::UnknownCaller => {
                Status::permission_denied(message)
            }
            ApiError::Unavailable { .. } | ApiError::Stopping => Status::unavailable(message),
            ApiError::InvalidArgument(_) => Status::invalid_argument(message),
            ApiError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
            ApiError::NotRenewed { .. } => Status::failed_precondition(message),
        }
    }
}

/// The service over a store.
#[derive(Clone)]
pub struct TokenApi {
    store: Arc<Store>,
    /// The daemon's effective uid: always allowed.
    daemon_uid: u32,
    /// Cancelled when the server stops: ends waits and streams.
    stop: CancellationToken,
}

impl TokenApi {
    /// A service answering from `store`; `stop` ends every wait and stream.
    pub fn new(store: Arc<Store>, daemon_uid: u32, stop: CancellationToken) -> TokenApi {
        TokenApi {
            store,
            daemon_uid,
            stop,
        }
    }

    /// The slot of `client` if it exists and `caller` may read it.
    ///
    /// Only root and the daemon's user hear `NOT_FOUND` for a name no client has; anyone else
    /// gets the same `PERMISSION_DENIED` for it as for a client it may not read, so that
    /// client names cannot be found out by trying them.
    pub fn slot(&self, caller: &Caller, client: &str) -> Result<ClientSlot, ApiError> {
        check_name(client)?;
        let slot = match self.store.get(client) {
            Some(slot) => slot,
            None if caller.is_privileged(self.daemon_uid) => {
                return Err(ApiError::NotFound(client.to_string()));
            }
            None => return Err(self.denied(caller, client)),
        };
        if self.may_read(caller, &slot.config) {
            Ok(slot)
        } else {
            Err(self.denied(caller, client))
        }
    }

    /// Whether `caller` may read the client configured as `config`.
    fn may_read(&self, caller: &Caller, config: &ClientConfig) -> bool {
        caller.may_read(self.daemon_uid, &config.allow_uids, &config.allow_gids)
    }

    /// `PERMISSION_DENIED` for `caller` on `client`, logged; the same whether or not a client
    /// has that name.
    fn denied(&self, caller: &Caller, client: &str) -> ApiError {
        tracing::info!(client, uid = caller.uid, pid = caller.pid, "caller denied");
        ApiError::PermissionDenied {
            client: client.to_string(),
            uid: caller.uid,
        }
    }

    /// The client's token valid now and its generation, if the name is well formed, the
    /// client exists and `caller` may read it: `GetToken`'s common case, checked without
    /// copying the slot. `None` for anything else (the full path then says why).
    pub fn readable_token(&self, caller: &Caller, client: &str) -> Option<(Arc<Token>, u64)> {
        check_name(client).ok()?;
        self.store
            .with_slot(client, |slot| {
                if !self.may_read(caller, &slot.config) {
                    return None;
                }
                let snap = slot.snapshot.borrow();
                snap.valid_token(SystemTime::now())
                    .map(|t| (t.clone(), snap.generation))
            })
            .flatten()
    }

    /// Waits for the client's first token (while PENDING) until `deadline`; then the valid
    /// token or UNAVAILABLE.
    pub async fn current(
        &self,
        client: &str,
        slot: &ClientSlot,
        deadline: Option<Instant>,
    ) -> Result<(Arc<Token>, u64), ApiError> {
        let mut rx = slot.snapshot.clone();
        loop {
            {
                let snap = rx.borrow_and_update();
                let now = SystemTime::now();
                if let Some(t) = snap.valid_token(now) {
                    return Ok((t.clone(), snap.generation));
                }
                if snap.state_at(now) != State::Pending {
                    return Err(unavailable(client, &snap, now));
                }
            }
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Err(ApiError::NotFound(client.to_string()));
                    }
                }
                _ = refresher::sleep_opt(deadline) => {
                    return Err(ApiError::DeadlineExceeded(client.to_string()));
                }
                _ = self.stop.cancelled() => return Err(ApiError::Stopping),
            }
        }
    }

    /// The rule for `RefreshToken` and `min_interval`: an application's demand within
    /// `min_interval` of the last token gets that token (one provider request answers a burst
    /// of 401s); a forced demand from root or the daemon's user (who may send SIGUSR1 anyway)
    /// always gets a new one; a forced demand from anyone else within `min_interval` is refused
    /// with when it becomes possible.
    pub fn refresh_reason(
        &self,
        caller: &Caller,
        client: &str,
        slot: &ClientSlot,
        force: bool,
    ) -> Result<Reason, ApiError> {
        if !force {
            return Ok(Reason::Demand);
        }
        if caller.is_privileged(self.daemon_uid) {
            return Ok(Reason::Forced);
        }
        let held = refresher::held_back(
            &slot.snapshot.borrow(),
            slot.config.timing.min_interval,
            SystemTime::now(),
        );
        match held {
            Some(held) => Err(ApiError::NotRenewed {
                client: client.to_string(),
                held,
            }),
            None => Ok(Reason::Demand),
        }
    }

    /// Asks the refresher and returns the newest valid token afterwards.
    pub async fn refresh(
        &self,
        client: &str,
        slot: &ClientSlot,
        reason: Reason,
        deadline: Option<Instant>,
    ) -> Result<(Arc<Token>, u64), ApiError> {
        let answer = tokio::select! {
            a = refresher::request(slot, reason) => a,
            _ = refresher::sleep_opt(deadline) => {
                return Err(ApiError::DeadlineExceeded(client.to_string()));
            }
            _ = self.stop.cancelled() => return Err(ApiError::Stopping),
        };
        let now = SystemTime::now();
        match answer {
            Ok(token) => {
                let snap = slot.snapshot.borrow();
                // The refresher publishes before it answers: the snapshot holds this token or
                // a newer one.
                match snap.valid_token(now) {
                    Some(t) => Ok((t.clone(), snap.generation)),
                    None if token.is_valid_at(now) => Ok((token, snap.generation)),
                    None => Err(unavailable(client, &snap, now)),
                }
            }
            Err(reason) => {
                if slot.snapshot.has_changed().is_err() || self.store.get(client).is_none() {
                    return Err(ApiError::NotFound(client.to_string()));
                }
                Err(ApiError::Unavailable {
                    client: client.to_string(),
                    reason: reason.to_string(),
                })
            }
        }
    }
}

impl TokenApi {
    /// `current` (a token and its generation) if it stays valid for `min_valid`, else a new
    /// one asked of the refresher; INVALID_ARGUMENT when the client's tokens never live that
    /// long.
    pub async fn valid_for(
        &self,
        client: &str,
        slot: &ClientSlot,
        current: (Arc<Token>, u64),
        min_valid: Option<Duration>,
        deadline: Option<Instant>,
    ) -> Result<(Arc<Token>, u64), ApiError> {
        let (token, _) = &current;
        let Some(d) = min_valid else {
            return Ok(current);
        };
        if token
            .remaining(SystemTime::now())
            .is_some_and(|left| left >= d)
        {
            return Ok(current);
        }
        if token.lifetime() < d {
            return Err(ApiError::InvalidArgument(format!(
                "min_valid_for {} is longer than the {} lifetime of client {client:?}'s tokens",
                Human(d),
                Human(token.lifetime())
            )));
        }
        self.refresh(client, slot, Reason::MinValid(d), deadline)
            .await
    }

    /// The status of every client `caller` may read, in name order (`ListClients`).
    pub fn readable_statuses(&self, caller: &Caller) -> Vec<pb::ClientStatus> {
        let now = SystemTime::now();
        self.store
            .slots()
            .into_iter()
            .filter(|(_, s)| self.may_read(caller, &s.config))
            .map(|(name, s)| {
                let mut m = status_message(&name, &s.snapshot.borrow(), now);
                m.subject_client = s.config.grant.upstream().unwrap_or_default().to_string();
                m
            })
            .collect()
    }

    /// After the refresher of `client` ended (`rx`, its channel, closed): the client was
    /// removed, or replaced by a reload (a changed identity starts a new refresher under the
    /// same name; who may read it may have changed too). The new slot, `rx` following it.
    pub fn reattach(
        &self,
        caller: &Caller,
        client: &str,
        rx: &mut watch::Receiver<Snapshot>,
    ) -> Result<ClientSlot, ApiError> {
        let slot = self.slot(caller, client)?;
        if slot.snapshot.same_channel(rx) || slot.snapshot.has_changed().is_err() {
            return Err(ApiError::NotFound(client.to_string()));
        }
        *rx = slot.snapshot.clone();
        rx.mark_changed();
        Ok(slot)
    }

    /// Ends waits and streams when cancelled (the server stopping).
    pub fn stopping(&self) -> &CancellationToken {
        &self.stop
    }
}

fn unavailable(client: &str, snap: &Snapshot, now: SystemTime) -> ApiError {
    let reason = match (&snap.last_error, &snap.token) {
        (Some(e), _) => e.clone(),
        (None, Some(t)) => format!(
            "the last token expired at {}; a new one is being fetched",
            crate::token::rfc3339(t.expires_at)
        ),
        (None, None) => "no token yet".to_string(),
    };
    let _ = now;
    ApiError::Unavailable {
        client: client.to_string(),
        reason,
    }
}

/// Client names as the config allows them ([`crate::config::is_client_name`]).
fn check_name(client: &str) -> Result<(), ApiError> {
    if client.is_empty() {
        return Err(ApiError::InvalidArgument(
            "the request names no client".into(),
        ));
    }
    if crate::config::is_client_name(client) {
        Ok(())
    } else {
        Err(ApiError::InvalidArgument(
            "not a client name: names are 1 to 64 of A-Z a-z 0-9 _ . -".into(),
        ))
    }
}

/// `min_valid_for` as a duration: `None` when absent or zero; INVALID_ARGUMENT when negative,
/// malformed or longer than [`MAX_MIN_VALID`].
pub fn min_valid_for(d: Option<&prost_types::Duration>) -> Result<Option<Duration>, ApiError> {
    let Some(d) = d else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(ApiError::InvalidArgument(
            "min_valid_for must be a non-negative duration".into(),
        ));
    }
    let d = Duration::new(d.seconds as u64, d.nanos as u32);
    if d > MAX_MIN_VALID {
        return Err(ApiError::InvalidArgument(format!(
            "min_valid_for {} is longer than the {} allowed",
            Human(d),
            Human(MAX_MIN_VALID)
        )));
    }
    Ok(Some(d).filter(|d| !d.is_zero()))
}

/// The call's deadline from its `grpc-timeout` header (gRPC over HTTP/2: up to 8 digits and a
/// unit, `H` `M` `S` `m` `u` `n`); `None` when absent or malformed.
pub fn grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// When to give up waiting: a little before the caller's deadline, so the caller hears
/// DEADLINE_EXCEEDED with our message rather than its own timer's.
fn deadline_of<T>(req: &Request<T>) -> Option<Instant> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    grpc_timeout(v).map(|d| Instant::now() + d - (d / 10).min(Duration::from_millis(100)))
}

fn caller_of<T>(req: &Request<T>) -> Result<Arc<Caller>, ApiError> {
    req.extensions()
        .get::<Arc<Caller>>()
        .cloned()
        .ok_or(ApiError::UnknownCaller)
}

/// The wire form of a token.
pub fn token_message(client: &str, token: &Token, generation: u64) -> pb::Token {
    pb::Token {
        client: client.to_string(),
        access_token: token.access_token.expose().to_string(),
        token_type: token.token_type.clone(),
        expires_at: Some(token.expires_at.into()),
        issued_at: Some(token.issued_at.into()),
        scopes: token.scope.clone(),
        generation,
    }
}

/// The wire form of a client's status at `now`.
pub fn status_message(client: &str, snap: &Snapshot, now: SystemTime) -> pb::ClientStatus {
    let state = match snap.state_at(now) {
        State::Pending => pb::State::Pending,
        State::Valid => pb::State::Valid,
        State::Stale => pb::State::Stale,
        State::Expired => pb::State::Expired,
        State::Failed => pb::State::Failed,
    };
    pb::ClientStatus {
        client: client.to_string(),
        state: state as i32,
        expires_at: snap.token.as_ref().map(|t| t.expires_at.into()),
        next_refresh_at: snap.next_refresh_at.map(Into::into),
        last_error: snap.problems().unwrap_or_default(),
        consecutive_failures: snap.consecutive_failures,
        last_refresh_at: snap.last_refresh_at.map(Into::into),
        subject_client: String::new(),
        fleet_role: snap.fleet_role.unwrap_or_default().to_string(),
        fleet_etcd: snap.fleet_etcd.unwrap_or_default().to_string(),
    }
}

/// The stream of `WatchToken`.
pub type TokenStream = Pin<Box<dyn Stream<Item = Result<pb::Token, Status>> + Send + 'static>>;

/// What a watch stream carries from one item to the next.
struct Watch {
    api: TokenApi,
    caller: Arc<Caller>,
    client: String,
    rx: watch::Receiver<Snapshot>,
    /// The generation last sent.
    sent: Option<u64>,
    done: bool,
}

impl Watch {
    /// The next token to send, or the status that ends the stream.
    async fn next(&mut self) -> Result<pb::Token, ApiError> {
        loop {
            {
                let snap = self.rx.borrow_and_update();
                if let Some(t) = snap.valid_token(SystemTime::now())
                    && self.sent != Some(snap.generation)
                {
                    self.sent = Some(snap.generation);
                    crate::audit::read(&self.client, Api::Grpc, &self.caller, t, snap.generation);
                    return Ok(token_message(&self.client, t, snap.generation));
                }
            }
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        self.api.reattach(&self.caller, &self.client, &mut self.rx)?;
                        continue;
                    }
                }
                _ = self.api.stop.cancelled() => return Err(ApiError::Stopping),
            }
            // A reload may have changed who may read it.
            self.api.slot(&self.caller, &self.client)?;
        }
    }
}

#[tonic::async_trait]
impl pb::token_service_server::TokenService for TokenApi {
    async fn get_token(
        &self,
        request: Request<pb::GetTokenRequest>,
    ) -> Result<Response<pb::Token>, Status> {
        let caller = caller_of(&request)?;
        let deadline = deadline_of(&request);
        let req = request.into_inner();
        let min_valid = min_valid_for(req.min_valid_for.as_ref())?;
        let client = req.client;
        let slot = self.slot(&caller, &client)?;
        let current = self.current(&client, &slot, deadline).await?;
        let (token, generation) = self
            .valid_for(&client, &slot, current, min_valid, deadline)
            .await?;
        tracing::debug!(client, uid = caller.uid, token = %token.fingerprint(), "GetToken");
        crate::audit::read(&client, Api::Grpc, &caller, &token, generation);
        Ok(Response::new(token_message(&client, &token, generation)))
    }

    type WatchTokenStream = TokenStream;

    async fn watch_token(
        &self,
        request: Request<pb::WatchTokenRequest>,
    ) -> Result<Response<TokenStream>, Status> {
        let caller = caller_of(&request)?;
        let client = request.into_inner().client;
        let slot = self.slot(&caller, &client)?;
        tracing::debug!(client, uid = caller.uid, "WatchToken started");
        let mut rx = slot.snapshot;
        rx.mark_changed();
        let watch = Watch {
            api: self.clone(),
            caller,
            client,
            rx,
            sent: None,
            done: false,
        };
        let stream = futures_util::stream::unfold(watch, |mut w| async move {
            if w.done {
                return None;
            }
            match w.next().await {
                Ok(t) => Some((Ok(t), w)),
                Err(e) => {
                    w.done = true;
                    tracing::debug!(client = %w.client, "WatchToken ended: {e}");
                    Some((Err(Status::from(e)), w))
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn refresh_token(
        &self,
        request: Request<pb::RefreshTokenRequest>,
    ) -> Result<Response<pb::Token>, Status> {
        let caller = caller_of(&request)?;
        let deadline = deadline_of(&request);
        let force = request
            .metadata()
            .get(FORCE_METADATA)
            .is_some_and(|v| v.as_bytes() == b"force");
        let client = request.into_inner().client;
        let slot = self.slot(&caller, &client)?;
        let reason = self.refresh_reason(&caller, &client, &slot, force)?;
        let (token, generation) = self.refresh(&client, &slot, reason, deadline).await?;
        tracing::debug!(client, uid = caller.uid, token = %token.fingerprint(), "RefreshToken");
        crate::audit::read(&client, Api::Grpc, &caller, &token, generation);
        Ok(Response::new(token_message(&client, &token, generation)))
    }

    async fn list_clients(
        &self,
        request: Request<pb::ListClientsRequest>,
    ) -> Result<Response<pb::ListClientsResponse>, Status> {
        let caller = caller_of(&request)?;
        let clients = self.readable_statuses(&caller);
        Ok(Response::new(pb::ListClientsResponse { clients }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_table() {
        let cases = [
            ("1S", Some(Duration::from_secs(1))),
            ("250m", Some(Duration::from_millis(250))),
            ("2M", Some(Duration::from_secs(120))),
            ("1H", Some(Duration::from_secs(3600))),
            ("99999999u", Some(Duration::from_micros(99_999_999))),
            ("5n", Some(Duration::from_nanos(5))),
            ("123456789S", None),
            ("S", None),
            ("", None),
            ("1x", None),
            ("-1S", None),
            ("1.5S", None),
        ];
        for (v, want) in cases {
            assert_eq!(grpc_timeout(v), want, "{v:?}");
        }
    }

    #[test]
    fn min_valid_for_table() {
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(min_valid_for(None), Ok(None));
        assert_eq!(min_valid_for(Some(&d(0, 0))), Ok(None));
        assert_eq!(
            min_valid_for(Some(&d(30, 5))),
            Ok(Some(Duration::new(30, 5)))
        );
        assert_eq!(min_valid_for(Some(&d(86_400, 0))), Ok(Some(MAX_MIN_VALID)));
        for bad in [d(-1, 0), d(0, -5), d(86_401, 0), d(1, 1_000_000_000)] {
            assert!(
                matches!(min_valid_for(Some(&bad)), Err(ApiError::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("transatel").is_ok());
        assert!(check_name("a.b_c-9").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
    }

    #[test]
    fn statuses_map_to_codes() {
        let code = |e: ApiError| Status::from(e).code();
        assert_eq!(code(ApiError::NotFound("x".into())), tonic::Code::NotFound);
        assert_eq!(
            code(ApiError::PermissionDenied {
                client: "x".into(),
                uid: 5
            }),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            code(ApiError::Unavailable {
                client: "x".into(),
                reason: "r".into()
            }),
            tonic::Code::Unavailable
        );
        assert_eq!(
            code(ApiError::InvalidArgument("x".into())),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(ApiError::DeadlineExceeded("x".into())),
            tonic::Code::DeadlineExceeded
        );
        let held = refresher::HeldBack {
            age: Duration::from_secs(2),
            min_interval: Duration::from_secs(10),
        };
        let s = Status::from(ApiError::NotRenewed {
            client: "api".into(),
            held,
        });
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            s.message(),
            "client \"api\": not renewed: last token 2s old, min_interval 10s; next possible in 8s"
        );
    }
}
