//! One task per client: get a token, keep it fresh ahead of expiry, publish it (store, state,
//! outputs), answer on-demand requests, and back off on failure (docs/operations.md). The
//! daemon runs them for as long as it runs; `once` runs the same refreshers until each has
//! settled its first attempt (see [`crate::app`]).
//!
//! The loop waits on whichever comes first: the planned refresh, a command (demand, SIGUSR1,
//! cron rotation, reconfiguration), the token's expiry (so status and logs turn EXPIRED on
//! time), a pending output retry, or cancellation. Errors never end the loop.
//!
//! Order of a successful refresh: the new state (with a rotated refresh token) is written and
//! fsync'd first; only then is the token published to the store, the outputs and `on_change`.
//! If the state cannot be written the token is held back and the save retried, so a refresh
//! token is never known only to memory while a token made with it is in use.

use std::sync::{Arc, PoisonError};
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ClientChange, ClientConfig, DaemonConfig};
use crate::oauth::{self, ErrorClass, HttpClients, Human};
use crate::outputs;
use crate::schedule::{self, Backoff, FailureKind, Trigger};
use crate::secret::Secret;
use crate::state::{StateDir, StateError, StoredState};
pub use crate::store::Reconfigure;
use crate::store::{Answer, ClientSlot, Command, Mailbox, Reason, RefreshError, Snapshot};
use crate::token::{Token, rfc3339};

/// How long an `on_change` command may run.
pub const ON_CHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// What every refresher of one daemon (or one `once` run) shares: the locked state directory,
/// the HTTP clients, the `max_concurrent_refreshes` permits and the tasks stopping waits for.
pub struct Engine {
    pub state: Arc<StateDir>,
    pub http: Arc<HttpClients>,
    /// `max_concurrent_refreshes` permits.
    pub permits: Arc<Semaphore>,
    /// The refreshers and their background work (on_change commands): stopping waits for them.
    pub tracker: TaskTracker,
    /// Token URLs whose provider asked to wait (`Retry-After`).
    pub holds: UrlHolds,
    /// Failed token requests, state saves and output writes are logged at WARN or ERROR (the
    /// daemon); `once` prints each client's failure itself, so its refreshers log them at
    /// DEBUG only.
    pub warn_on_failure: bool,
    /// The wall clock the refreshers read.
    pub clock: Clock,
    /// Where tokens come from: the token endpoint ([`oauth::acquire`]), or a test's fake.
    pub source: Arc<dyn TokenSource>,
    /// The token endpoints of clients configured with `issuer` (RFC 8414), shared by them.
    pub discovery: Arc<oauth::Discovery>,
    /// Every refresher's snapshot by client name: where a chained client finds its upstream.
    pub chains: Chains,
    /// `[fleet]`: the hosts share each client's token through etcd (docs/fleet.md).
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
    /// Clients shared by a `[fleet]` this process is not part of (`once` beside a fleet,
    /// docs/fleet.md): their stored refresh token may since have been used by the holder, so
    /// they start a fresh chain from their primary credential, or fail when they have none.
    pub outside_fleet: std::collections::BTreeSet<String>,
}

/// The wall clock of the refreshers. Tests drive them on tokio's paused clock, where wall time
/// must move with it.
#[derive(Clone, Copy, Debug)]
pub enum Clock {
    /// `SystemTime::now()`.
    System,
    /// `wall` plus how far tokio's clock has moved since `at`.
    Tokio { wall: SystemTime, at: Instant },
}

impl Clock {
    /// Wall time starting now, then moving with tokio's clock (paused or not).
    pub fn tokio() -> Clock {
        Clock::Tokio {
            wall: SystemTime::now(),
            at: Instant::now(),
        }
    }

    pub fn now(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            Clock::Tokio { wall, at } => *wall + at.elapsed(),
        }
    }

    /// The wall time `t` on tokio's clock (now, if it has passed).
    fn instant(&self, t: SystemTime) -> Instant {
        Instant::now() + t.duration_since(self.now()).unwrap_or(Duration::ZERO)
    }
}

/// Where a refresher's tokens come from.
pub trait TokenSource: Send + Sync {
    /// As [`oauth::acquire`], which it is unless overridden (a test's fake provider).
    fn acquire<'a>(
        &'a self,
        http: &'a reqwest::Client,
        client: &'a ClientConfig,
        refresh_token: Option<&'a Secret>,
        bootstrap_spent: bool,
    ) -> BoxFuture<'a, Result<oauth::Acquired, oauth::AcquireFailure>> {
        Box::pin(oauth::acquire(http, client, refresh_token, bootstrap_spent))
    }
}

/// A boxed future, as [`TokenSource::acquire`] returns.
pub use futures_util::future::BoxFuture;

/// The client's token endpoint: [`TokenSource::acquire`] as it is.
struct TokenEndpoint;

impl TokenSource for TokenEndpoint {}

impl Engine {
    /// Opens (and locks) the state directory, then removes the temporary files that writes
    /// killed midway left next to the outputs of `clients`: with the lock held and no refresher
    /// running yet, nobody else writes there (docs/operations.md#restarts). Both walk
    /// directories: they run off the async workers.
    pub async fn open(
        daemon: &DaemonConfig,
        clients: Vec<Arc<ClientConfig>>,
    ) -> Result<Engine, StateError> {
        let path = daemon.state_dir.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let state = StateDir::open(&path)?;
            Ok((
                state,
                outputs::remove_stale_temp_files(clients.iter().map(|c| &**c)),
            ))
        });
        let (state, removed) = opened.await.map_err(|e| StateError::CreateDir {
            path: daemon.state_dir.clone(),
            source: std::io::Error::other(e),
        })??;
        for (client, path) in removed {
            tracing::info!(
                client = client.as_str(),
                path = ?path,
                "removed a temporary file left by an interrupted write"
            );
        }
        let state = Arc::new(state);
        Ok(Engine {
            discovery: Arc::new(oauth::Discovery::new(Some(state.clone()))),
            state,
            http: Arc::new(HttpClients::default()),
            permits: Arc::new(Semaphore::new(daemon.max_concurrent_refreshes.max(1))),
            tracker: TaskTracker::new(),
            holds: UrlHolds::default(),
            warn_on_failure: true,
            clock: Clock::System,
            source: Arc::new(TokenEndpoint),
            chains: Chains::default(),
            fleet: None,
            outside_fleet: Default::default(),
        })
    }
}

/// Token URLs whose provider answered with `Retry-After` (RFC 9110 §10.2.3), and until when.
///
/// The provider asked its *client* to wait, and every client of that token URL is one to it:
/// after one of them is told to wait, the others do not ask before the time either
/// (docs/operations.md#failures-and-retries: Retry-After is honoured).
#[derive(Debug, Default)]
pub struct UrlHolds(std::sync::Mutex<std::collections::HashMap<String, Instant>>);

impl UrlHolds {
    /// Records that `url` asked to wait until `until` (a later time already known stays).
    pub fn note(&self, url: &str, until: Instant) {
        let mut map = self.lock();
        let now = Instant::now();
        map.retain(|_, t| *t > now);
        let held = map.entry(url.to_owned()).or_insert(until);
        *held = (*held).max(until);
    }

    /// Until when `url` asked to wait, if that is still ahead.
    pub fn until(&self, url: &str) -> Option<Instant> {
        self.lock()
            .get(url)
            .copied()
            .filter(|t| *t > Instant::now())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Instant>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One token request of `config` at its token endpoint: the configured `token_url`, or the
/// one its `issuer`'s metadata names ([`oauth::Discovery`]). When a discovered endpoint answers
/// 404, the metadata is fetched again and, if the endpoint moved, the request is made once more
/// at the new one (a 404 means no token endpoint saw the request: nothing was spent).
async fn acquire_at_endpoint(
    engine: &Engine,
    config: &Arc<ClientConfig>,
    refresh_token: Option<&Secret>,
    spent: bool,
) -> Result<oauth::Acquired, oauth::AcquireFailure> {
    let failure = |error: oauth::OAuthError| oauth::AcquireFailure {
        error,
        forget_refresh_token: false,
        bootstrap_spent: spent,
    };
    // The issuer's route and trust are the client's own (its proxy, its ca_file).
    let http = engine.http.get(config).map_err(failure)?;
    let at = engine
        .discovery
        .resolve(config, &http)
        .await
        .map_err(failure)?;
    let http_at = engine.http.get(&at).map_err(failure)?;
    let result = engine
        .source
        .acquire(&http_at, &at, refresh_token, spent)
        .await;
    let not_found = matches!(&result, Err(f) if is_not_found(&f.error));
    if !not_found || config.issuer.is_none() {
        return result;
    }
    let Some(moved) = engine
        .discovery
        .after_not_found(config, &http, &at.token_url)
        .await
    else {
        return result;
    };
    let spent = spent || result.as_ref().is_err_and(|f| f.bootstrap_spent);
    tracing::info!(
        client = %config.name,
        token_endpoint = %moved.token_url,
        "the issuer's metadata names a new token endpoint: asking it"
    );
    let http_moved = engine.http.get(&moved).map_err(failure)?;
    engine
        .source
        .acquire(&http_moved, &moved, refresh_token, spent)
        .await
}

/// Whether the token endpoint answered 404 (it is not there any more).
fn is_not_found(error: &oauth::OAuthError) -> bool {
    matches!(
        error.inner(),
        oauth::OAuthError::Http { status: 404, .. }
            | oauth::OAuthError::Provider { status: 404, .. }
    )
}

/// The handle the daemon keeps on a running refresher.
pub struct Handle {
    pub slot: ClientSlot,
    task: AbortHandle,
}

impl Handle {
    /// Stops this client's refresher (removed or replaced by a reload) at its next await: a
    /// request in flight is abandoned and nothing more is saved or published, so a late answer
    /// cannot overwrite its successor's token, state or files. Callers waiting on it are told
    /// it stopped. (The daemon's own stop is the `shutdown` token: a request in flight then
    /// still completes and is saved.)
    pub fn stop(&self) {
        self.task.abort();
    }
}

/// Starts the refresher of `config` on the engine's tracker; it ends at its first wake-up after
/// `shutdown` (or when stopped through its [`Handle`]).
pub fn spawn(
    config: Arc<ClientConfig>,
    engine: Arc<Engine>,
    shutdown: CancellationToken,
) -> Handle {
    let (snap_tx, snap_rx) = watch::channel(Snapshot::default());
    let mailbox = Arc::new(Mailbox::default());
    engine.chains.register(&config.name, snap_rx.clone());
    let upstream = Upstream::of(&config);
    let slot = ClientSlot {
        snapshot: snap_rx,
        mailbox: mailbox.clone(),
        config: config.clone(),
    };
    let refresher = Refresher {
        config: config.clone(),
        engine: engine.clone(),
        snapshot: snap_tx,
        mailbox,
        shutdown,
        refresh_token: None,
        spent_bootstrap: None,
        backoff: Backoff::new(),
        held: None,
        next_at: None,
        next_trigger: Trigger::Startup,
        output_retry: None,
        output_backoff: Backoff::new(),
        repeated: Repeated::default(),
        output_repeated: Repeated::default(),
        expired_logged: false,
        skew_warned: false,
        upstream,
        seat: engine.fleet.as_ref().and_then(|f| f.seat(&config)),
        fleet_read: 0,
        fleet_pending: None,
    };
    let task = engine
        .tracker
        .spawn(Box::new(refresher).run())
        .abort_handle();
    Handle { slot, task }
}

struct Refresher {
    config: Arc<ClientConfig>,
    engine: Arc<Engine>,
    snapshot: watch::Sender<Snapshot>,
    mailbox: Arc<Mailbox>,
    /// The daemon (or `once`) is stopping.
    shutdown: CancellationToken,
    /// The refresh token to use next (from the state directory or the last response).
    refresh_token: Option<Secret>,
    /// SHA-256 of the configured bootstrap refresh token once presented: never again.
    spent_bootstrap: Option<String>,
    backoff: Backoff,
    /// A token obtained but not yet published because its state could not be saved.
    held: Option<Box<StoredState>>,
    next_at: Option<Instant>,
    /// What the next planned attempt is for (burst accounting).
    next_trigger: Trigger,
    /// When to retry failed output writes.
    output_retry: Option<Instant>,
    output_backoff: Backoff,
    repeated: Repeated,
    /// The same failed output writes, logged at WARN three times, then at DEBUG.
    output_repeated: Repeated,
    expired_logged: bool,
    /// The clock-skew warning was given (once per client until the skew goes away).
    skew_warned: bool,
    /// For a chained client (RFC 8693 subject from another client): the upstream it follows.
    upstream: Option<Box<Upstream>>,
    /// The client's place in the fleet (`None`: local, without `[fleet]` or `fleet = false`).
    seat: Option<crate::fleet::Seat>,
    /// The mod_revision of the shared state the next commit builds on.
    fleet_read: i64,
    /// A new state etcd did not take, built on this revision, to commit when it can.
    fleet_pending: Option<i64>,
}

#[path = "fleet/hook.rs"]
mod fleet_hook;

/// Logs a repeated identical error at WARN three times, then at DEBUG (STYLE: rust-spiffe).
#[derive(Default)]
struct Repeated {
    last: Option<String>,
    count: u32,
}

impl Repeated {
    /// Counts `lines` (one failure: a repeat of the last one, or a new one) and logs them at
    /// WARN the first three times in a row if `warn` allows, else at DEBUG; `what` names them
    /// in the notice that repeats go to DEBUG.
    fn log(&mut self, client: &str, what: &str, lines: &[String], retry_in: Duration, warn: bool) {
        let message = lines.join("; ");
        if self.last.as_ref() == Some(&message) {
            self.count += 1;
        } else {
            self.last = Some(message);
            self.count = 1;
        }
        let warn = self.count <= 3 && warn;
        for line in lines {
            if warn {
                tracing::warn!(client, retry_in = %Human(retry_in), "{line}");
            } else {
                tracing::debug!(client, retry_in = %Human(retry_in), repeats = self.count, "{line}");
            }
        }
        if warn && self.count == 3 {
            tracing::warn!(
                client,
                "the same {what} again will be logged at debug level until it changes"
            );
        }
    }

    fn clear(&mut self) -> u32 {
        let n = self.count;
        self.last = None;
        self.count = 0;
        n
    }
}

fn unit() -> f64 {
    rand::rng().random::<f64>()
}

/// What the refresher's one timer is set for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Due {
    /// The planned refresh (or retry).
    Refresh,
    /// A retry of failed output writes.
    Outputs,
    /// The token's expiry (status and logs turn EXPIRED on time).
    Expiry,
}

/// The earliest of the refresher's deadlines. Pure. On a tie the refresh wins (it also
/// rewrites the outputs and replaces the expiring token).
fn earliest(
    refresh: Option<Instant>,
    outputs: Option<Instant>,
    expiry: Option<Instant>,
) -> Option<(Instant, Due)> {
    [
        refresh.map(|t| (t, Due::Refresh)),
        outputs.map(|t| (t, Due::Outputs)),
        expiry.map(|t| (t, Due::Expiry)),
    ]
    .into_iter()
    .flatten()
    .min_by_key(|(t, _)| *t)
}

/// Sleeps until `at`; forever without one (a `select!` branch that never fires).
pub(crate) async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// SHA-256 of a `refresh_token`-grant client's configured refresh token: how the state
/// directory remembers that it was presented, without keeping it.
fn bootstrap_fingerprint(config: &ClientConfig) -> Option<String> {
    match &config.grant {
        crate::config::Grant::RefreshToken { refresh_token } => {
            Some(refresh_token.value.fingerprint_full())
        }
        _ => None,
    }
}

/// The spent bootstrap a stored state records. A state saved for this very identity (which
/// includes the bootstrap's digest) before the record existed also means the bootstrap was
/// presented: a token or a refusal came of it.
fn spent_bootstrap(stored: &StoredState, identity: &str, config: &ClientConfig) -> Option<String> {
    match (&stored.spent_bootstrap, bootstrap_fingerprint(config)) {
        (Some(spent), _) => Some(spent.clone()),
        (None, Some(b)) if stored.fingerprint == identity => Some(b),
        _ => None,
    }
}

impl Refresher {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn now(&self) -> SystemTime {
        self.engine.clock.now()
    }

    // The work each wake-up does is boxed: a refresher waiting for its next deadline (almost
    // all of them, almost all the time) then holds only this loop's small state, not room for
    // a whole token request (issue 6: memory per client). `self` is boxed too: an async fn
    // keeps its by-value arguments twice (the argument and the body's binding), a Box twice is
    // 16 bytes, a Refresher twice is ~600.
    async fn run(mut self: Box<Self>) {
        Box::pin(self.start()).await;
        loop {
            let expiry = self.expiry();
            let due = earliest(self.next_at, self.output_retry, expiry);
            let mailbox = self.mailbox.clone();
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                _ = mailbox.wait() => Box::pin(self.read_mail()).await,
                side = side_event(self.upstream.as_deref_mut(), &mut self.seat, &self.engine.chains) => {
                    match side {
                        Side::Upstream => Box::pin(self.upstream_moved()).await,
                        Side::Fleet => Box::pin(self.fleet_view()).await,
                    }
                }
                _ = sleep_opt(due.map(|(at, _)| at)) => match due.map(|(_, what)| what) {
                    Some(Due::Refresh) => {
                        let trigger = self.next_trigger;
                        let _ = Box::pin(self.attempt(trigger)).await;
                    }
                    Some(Due::Outputs) => Box::pin(self.retry_outputs()).await,
                    Some(Due::Expiry) => self.expired(),
                    None => {}
                },
            }
        }
        tracing::debug!(client = self.name(), "refresher stopped");
    }

    /// A config change first (a demand is then served with the new config), then one command.
    async fn read_mail(&mut self) {
        if let Some(re) = self.mailbox.take_reconfigure() {
            self.apply(re).await;
        } else if let Some(cmd) = self.mailbox.next_command() {
            self.command(cmd).await;
        }
    }

    /// Reuses a stored token when it is still good for this identity (no provider request);
    /// otherwise asks for one now.
    async fn start(&mut self) {
        self.fleet_first_view().await;
        let fingerprint = self.config.identity_fingerprint();
        // Off the async workers: file I/O may stall (a slow disk), and must never hold up
        // the runtime (signals, other clients).
        let (state, name) = (self.engine.state.clone(), self.config.name.clone());
        let stored = match tokio::task::spawn_blocking(move || state.load(&name)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(client = self.name(), "ignoring the stored state: {e}");
                None
            }
            Err(e) => {
                tracing::warn!(client = self.name(), "state reader failed: {e}");
                None
            }
        };
        let now = self.now();
        if let Some(s) = &stored {
            self.refresh_token = s.refresh_token_for(&fingerprint).cloned();
            self.spent_bootstrap = spent_bootstrap(s, &fingerprint, &self.config);
            let binding = self.config.token_binding();
            if let Some(t) = s.reusable_token(
                &fingerprint,
                binding,
                self.config.timing.refresh_margin,
                now,
            ) {
                let token = Arc::new(t.clone());
                tracing::info!(
                    client = self.name(),
                    token = %token.fingerprint(),
                    expires_at = %rfc3339(token.expires_at),
                    "reusing the stored token"
                );
                self.publish_snapshot(token.clone(), s.generation, true);
                self.plan(schedule::resume_at(
                    &self.config.timing,
                    &token,
                    s.next_refresh_at,
                    now,
                    unit(),
                ));
                self.write_outputs(&token, false).await;
                self.settle();
                return;
            }
            // Keep the generation counting on from the stored one.
            self.snapshot
                .send_modify(|snap| snap.generation = s.generation);
        }
        if self.engine.outside_fleet.contains(&self.config.name) {
            // Presenting a refresh token the fleet's holder has used since would look like a
            // replay to a provider that detects reuse (RFC 9700 §4.14.2).
            self.refresh_token = None;
            if !self.config.grant.is_primary() {
                let message = "this client is shared by the fleet and its only credential is a refresh token the fleet's holder may have used since: ask the fleet's running daemon (tokenwarden get), or set fleet = false".to_string();
                let _ =
                    self.failed_and_log(ErrorClass::Permanent { retry_after: None }, message, true);
                return;
            }
        }
        if self.upstream.is_some() {
            // A chained client asks once its upstream has a token (`upstream_moved`).
            return;
        }
        self.next_at = Some(Instant::now());
        self.next_trigger = Trigger::Startup;
    }

    async fn command(&mut self, cmd: Command) {
        let Command::Refresh { reason, reply } = cmd;
        let now = self.now();
        let current = self.snapshot.borrow().clone();
        let satisfied = match reason {
            Reason::MinValid(d) => current.valid_for(now, d),
            // At most one provider request per client per min_interval: a caller right after
            // a fresh token gets that token.
            Reason::Demand => held_back(&current, self.config.timing.min_interval, now).is_some(),
            // The operator's requests: SIGUSR1, a forced `tokenwarden refresh`, and cron.
            Reason::RefreshAll | Reason::Rotation | Reason::Forced => false,
        };
        if satisfied && let Some(t) = current.token {
            if let Some(r) = reply {
                let _ = r.send(Ok(t));
            }
            return;
        }
        let trigger = match reason {
            Reason::Demand | Reason::Forced | Reason::MinValid(_) => Trigger::Demand,
            Reason::RefreshAll => Trigger::RefreshAll,
            Reason::Rotation => Trigger::Rotation,
        };
        let answer = self.attempt(trigger).await;
        // This demand and those that queued up meanwhile share this attempt's outcome
        // (docs/operations.md#concurrency).
        let queued = std::iter::from_fn(|| self.mailbox.next_command());
        let replies = queued.map(|Command::Refresh { reply, .. }| reply);
        for r in std::iter::once(reply).chain(replies).flatten() {
            let _ = r.send(answer.clone());
        }
    }

    /// A reload changed this client (never its identity: that is a new refresher).
    async fn apply(&mut self, re: Reconfigure) {
        let timing_changed = re.config.timing != self.config.timing;
        self.config = re.config;
        let token = self.snapshot.borrow().token.clone();
        match re.change {
            ClientChange::Renew | ClientChange::Replace => {
                // New credentials (a rotated password or key, perhaps after a leak) must be
                // used: a refresh token got with the old ones would sidestep them.
                if self.config.grant.is_primary() {
                    self.refresh_token = None;
                }
                self.backoff.reset();
                let _ = self.attempt(Trigger::Reload).await;
                return;
            }
            ClientChange::Outputs => {
                if let Some(t) = token.as_ref().filter(|t| t.is_valid_at(self.now())) {
                    self.write_outputs(t, true).await;
                }
            }
            ClientChange::Settings => {}
        }
        // Only new timing moves the planned refresh (the reload's log line says which).
        if let Some(token) = token
            && timing_changed
            && self.snapshot.borrow().consecutive_failures == 0
        {
            self.plan(self.next_refresh_at(&token, Trigger::Schedule));
        }
    }

    /// One token request (with fallback from a dead refresh token), then publication.
    async fn attempt(&mut self, trigger: Trigger) -> Answer {
        self.next_at = None;
        // A token obtained earlier whose state could not be saved: save it now, no request.
        // While the save keeps failing, no request either: another token would only be held
        // back too (and a rotated refresh token would move on without reaching the disk).
        if let Some(held) = self.held.take() {
            if let Some(answer) = Box::pin(self.commit(*held, trigger)).await {
                return answer;
            }
            if self.held.is_some() {
                return Err(RefreshError::NotSaved);
            }
        }
        if let Some(until) = self.engine.holds.until(self.config.token_url.as_str()) {
            return self.hold(until);
        }
        // The permit is waited for before the request's state is allocated: 10,000 clients
        // starting at once queue here holding a few bytes each (issue 6: memory per client).
        let permit = self.engine.permits.clone().acquire_owned().await;
        // Told to wait while this one waited for its permit.
        if let Some(until) = self.engine.holds.until(self.config.token_url.as_str()) {
            return self.hold(until);
        }
        if let Some(answer) = Box::pin(self.fleet_gate(trigger)).await {
            return answer;
        }
        let answer = Box::pin(self.request(permit, trigger)).await;
        self.fleet_idle();
        answer
    }

    /// Another client of this token URL was told to wait (`Retry-After`): no request before
    /// `until`. For this client it is a failed attempt like a 429 of its own (its status says
    /// so, and the next attempt is planned by the same backoff, never before `until`).
    fn hold(&mut self, until: Instant) -> Answer {
        let wait = until.saturating_duration_since(Instant::now());
        self.failed_and_log(
            ErrorClass::Retryable {
                retry_after: Some(wait),
            },
            "the provider of this token URL asked to wait (Retry-After): no request before then"
                .to_string(),
            false,
        )
    }

    /// The token request itself, then publication, under a `max_concurrent_refreshes` permit.
    ///
    /// The permit is held until the state is saved and the outputs are written, not only while
    /// the request is in flight: otherwise 10,000 clients starting at once each hold a finished
    /// request's state while their fsync'd writes queue for the blocking threads, and the heap
    /// they leave behind stays resident (issue 6: ~15 MiB at 10,000 clients).
    async fn request(
        &mut self,
        permit: Result<OwnedSemaphorePermit, AcquireError>,
        trigger: Trigger,
    ) -> Answer {
        let _permit = permit;
        let config = self.config.clone();
        let started = std::time::Instant::now();
        let bootstrap = bootstrap_fingerprint(&config);
        let spent = bootstrap.is_some() && self.spent_bootstrap == bootstrap;
        let (engine, refresh_token) = (self.engine.clone(), self.refresh_token.clone());
        let acquire = acquire_at_endpoint(&engine, &config, refresh_token.as_ref(), spent);
        let mut acquire: BoxFuture<'_, _> = match self.upstream_token() {
            Some(subject) => Box::pin(oauth::exchange::with_upstream_token(subject, acquire)),
            None => Box::pin(acquire),
        };
        // The token may expire while the request hangs: say so on time all the same.
        let result = loop {
            let expiry = self.expiry();
            tokio::select! {
                r = &mut acquire => break r,
                _ = sleep_opt(expiry), if expiry.is_some() => self.expired(),
            }
        };
        let now_spent = match &result {
            Ok(a) => a.bootstrap_spent,
            Err(f) => f.bootstrap_spent,
        };
        if now_spent && !spent {
            self.spent_bootstrap = bootstrap;
        }
        crate::metrics::refresh_attempt(self.name(), result.is_ok(), started.elapsed());
        match result {
            Ok(acquired) => {
                if let Some(e) = &acquired.refresh_token_refused {
                    tracing::warn!(
                        client = self.name(),
                        "the stored refresh token was refused; got a token with the {} grant instead: {e}",
                        acquired.grant_type
                    );
                }
                let skew = oauth::clock_skew(acquired.issued.server_date, SystemTime::now());
                if let Some((secs, ahead)) = skew
                    && !self.skew_warned
                {
                    tracing::warn!(
                        client = self.name(),
                        "the provider's clock is {secs}s {} ours: signed assertions may be refused; check NTP",
                        if ahead { "ahead of" } else { "behind" }
                    );
                }
                self.skew_warned = skew.is_some();
                let generation = self.snapshot.borrow().generation + 1;
                let token = Some(acquired.issued.token);
                let new_state = self.stored_state(token, acquired.refresh_token, generation);
                self.fleet_commit(&new_state).await;
                match self.commit(new_state, trigger).await {
                    Some(answer) => answer,
                    None => Err(RefreshError::NotSaved),
                }
            }
            Err(failure) => {
                let forgot = failure.forget_refresh_token && self.refresh_token.take().is_some();
                if forgot {
                    tracing::warn!(
                        client = self.name(),
                        "forgetting the refresh token the provider refused"
                    );
                }
                if forgot || (now_spent && !spent) {
                    self.save_without_refresh_token().await;
                }
                let class = failure.error.class();
                if let Some(wait) = class.retry_after() {
                    self.engine
                        .holds
                        .note(self.config.token_url.as_str(), Instant::now() + wait);
                }
                self.failed_and_log(class, failure.error.to_string(), true)
            }
        }
    }

    /// Saves `state` durably, then publishes its token. `None` when the save failed (the
    /// state is held for the next attempt).
    async fn commit(&mut self, mut state: StoredState, trigger: Trigger) -> Option<Answer> {
        let token = state.token.clone()?;
        if !token.is_valid_at(self.now()) {
            // Held too long: useless now, but keep its refresh token.
            self.refresh_token = state.refresh_token.clone();
            return None;
        }
        // The plan is saved with the token: a restart keeps it (docs/operations.md#restarts).
        let failures = self.backoff.failures();
        let trigger = if failures > 0 {
            Trigger::Retry
        } else {
            trigger
        };
        let at = self.next_refresh_at(&token, trigger);
        state.next_refresh_at = Some(at);
        let error = self.save(state.clone()).await.err();
        self.refresh_token = state.refresh_token.clone();
        if let Some(e) = error {
            // Said once at ERROR; the retries (with backoff) at DEBUG, until a save succeeds.
            if self.engine.warn_on_failure && !self.snapshot.borrow().save_failing {
                tracing::error!(
                    client = self.name(),
                    "{e}; holding the new token back until a save succeeds"
                );
            }
            self.held = Some(Box::new(state));
            // What a restart would find, and what consumers read, is behind: status shows it
            // and /readyz fails until a save succeeds.
            self.snapshot.send_modify(|s| s.save_failing = true);
            let _ = self.failed_and_log(
                ErrorClass::Retryable { retry_after: None },
                e.to_string(),
                false,
            );
            return None;
        }
        let token = Arc::new(token);
        let recovered = self.repeated.clear();
        self.backoff.reset();
        tracing::info!(
            client = self.name(),
            token = %token.fingerprint(),
            generation = state.generation,
            expires_at = %rfc3339(token.expires_at),
            lifetime = %Human(token.lifetime()),
            "new token"
        );
        if failures > 0 {
            tracing::info!(
                client = self.name(),
                failures,
                repeats = recovered,
                "recovered"
            );
        }
        self.publish_snapshot(token.clone(), state.generation, false);
        self.plan(at);
        self.write_outputs(&token, true).await;
        self.settle();
        Some(Ok(token))
    }

    fn publish_snapshot(&mut self, token: Arc<Token>, generation: u64, reused: bool) {
        self.expired_logged = false;
        let now = self.now();
        self.snapshot.send_modify(|s| {
            s.token = Some(token);
            s.generation = generation;
            s.last_error = None;
            s.consecutive_failures = 0;
            s.save_failing = false;
            s.last_refresh_at = Some(now);
            s.reused = reused;
        });
    }

    /// Marks the first attempt as finished. Called after the outputs are written, not when the
    /// token is published: READY=1 waits for every client to settle, and a unit ordered after
    /// tokenwarden must find the token files in place (docs/operations.md#systemd).
    fn settle(&mut self) {
        self.snapshot
            .send_if_modified(|s| !std::mem::replace(&mut s.settled, true));
    }

    /// When to refresh `token`, got because of `trigger` (schedule::next_refresh_at). For a
    /// chained client see [`chained_refresh_at`].
    fn next_refresh_at(&self, token: &Token, trigger: Trigger) -> SystemTime {
        let at = schedule::next_refresh_at(
            &self.config.timing,
            token.issued_at,
            token.expires_at,
            self.now(),
            unit(),
            schedule::is_burst(trigger),
        );
        let Some(up) = &self.upstream else {
            return at;
        };
        let upstream_next = up
            .snapshot
            .as_ref()
            .and_then(|rx| rx.borrow().next_refresh_at);
        let margin = self.config.timing.refresh_margin;
        chained_refresh_at(
            at,
            token.expires_at,
            margin,
            upstream_next,
            up.subject_expires_at,
        )
    }

    fn plan(&mut self, at: SystemTime) {
        self.next_at = Some(self.engine.clock.instant(at));
        self.next_trigger = Trigger::Schedule;
        self.snapshot.send_modify(|s| s.next_refresh_at = Some(at));
        tracing::debug!(client = self.name(), next_refresh_at = %rfc3339(at), "next refresh planned");
    }

    /// A failed attempt: the next one is planned by the backoff, and the snapshot shows the
    /// failure. `log`: through the WARN-three-times logger, else at DEBUG only (a hold: the
    /// client told to wait logs the provider's answer itself, and a message that alternated
    /// with it would defeat the repeat logger).
    fn failed_and_log(&mut self, class: ErrorClass, message: String, log: bool) -> Answer {
        let kind = match class {
            ErrorClass::Retryable { .. } => FailureKind::Retryable,
            ErrorClass::Permanent { .. } => FailureKind::Permanent,
            ErrorClass::InvalidGrant => FailureKind::InvalidGrant,
        };
        let delay = self
            .backoff
            .next_delay(&self.config.timing, kind, class.retry_after(), unit());
        let failures = self.backoff.failures();
        let name = self.config.name.clone();
        if log && self.engine.warn_on_failure {
            let line = [format!("token request failed: {message}")];
            self.repeated.log(&name, "error", &line, delay, true);
        } else {
            tracing::debug!(client = %name, retry_in = %Human(delay), "{message}");
        }
        let at = self.now() + delay;
        self.next_at = Some(Instant::now() + delay);
        self.next_trigger = Trigger::Retry;
        let msg = message.clone();
        self.snapshot.send_modify(|s| {
            s.last_error = Some(msg);
            s.consecutive_failures = failures;
            s.next_refresh_at = Some(at);
            s.settled = true;
        });
        Err(RefreshError::Failed(message))
    }

    /// What the state directory keeps of `token` and `refresh_token` at `generation`, with this
    /// client's identity, binding and spent bootstrap, and no plan yet.
    fn stored_state(
        &self,
        token: Option<Token>,
        refresh_token: Option<Secret>,
        generation: u64,
    ) -> StoredState {
        StoredState {
            fingerprint: self.config.identity_fingerprint(),
            token,
            bound_to: self.config.token_binding().map(String::from),
            next_refresh_at: None,
            refresh_token,
            generation,
            spent_bootstrap: self.spent_bootstrap.clone(),
        }
    }

    async fn save_without_refresh_token(&self) {
        let snap = self.snapshot.borrow().clone();
        let state = self.stored_state(snap.token.as_deref().cloned(), None, snap.generation);
        if let Err(e) = self.save(state).await {
            tracing::warn!(client = self.name(), "{e}");
        }
    }

    /// Saves `state` off the async workers (file I/O may stall), awaited: a later save must not
    /// be overtaken by this one.
    async fn save(&self, state: StoredState) -> Result<(), String> {
        let (store, name) = (self.engine.state.clone(), self.config.name.clone());
        match tokio::task::spawn_blocking(move || store.save(&name, &state)).await {
            Ok(saved) => saved.map_err(|e| e.to_string()),
            Err(e) => Err(format!("state writer failed: {e}")),
        }
    }

    /// When the current token expires, until its expiry has been announced.
    fn expiry(&self) -> Option<Instant> {
        let snap = self.snapshot.borrow();
        let token = snap.token.as_ref().filter(|_| !self.expired_logged)?;
        Some(self.engine.clock.instant(token.expires_at))
    }

    fn expired(&mut self) {
        self.expired_logged = true;
        tracing::error!(
            client = self.name(),
            "the token has expired and no new one could be had; it is no longer served as valid"
        );
        // Wake watchers so status readers see EXPIRED now.
        self.snapshot.send_modify(|_| {});
    }

    /// Writes the token to every output (only those whose content differs), then runs
    /// `on_change` in the background when any changed. Failed outputs are retried with
    /// backoff, and shown in the snapshot (status, `ListClients`, `/readyz`) until every output
    /// holds the token.
    async fn write_outputs(&mut self, token: &Arc<Token>, run_on_change: bool) {
        if self.config.outputs.is_empty() {
            self.outputs_written();
            return;
        }
        let config = self.config.clone();
        let t = token.clone();
        let mut changed = false;
        let mut errors = Vec::new();
        match tokio::task::spawn_blocking(move || outputs::write_outputs(&config, &t)).await {
            Ok(reports) => {
                for r in reports {
                    crate::metrics::output_write(self.name(), r.result.is_ok());
                    match r.result {
                        Ok(c) => changed |= c,
                        Err(e) => errors.push(e.to_string()),
                    }
                }
            }
            Err(e) => errors.push(format!("output writer failed: {e}")),
        }
        if errors.is_empty() {
            self.outputs_written();
        } else {
            let delay = self
                .output_backoff
                .next_delay(&self.config.timing, FailureKind::Retryable, None, unit())
                .max(Duration::from_millis(100));
            self.output_retry = Some(Instant::now() + delay);
            let (client, warn) = (&self.config.name, self.engine.warn_on_failure);
            self.output_repeated
                .log(client, "output error", &errors, delay, warn);
            let message = errors.join("; ");
            self.snapshot
                .send_if_modified(|s| s.output_error.replace(message.clone()) != Some(message));
        }
        if changed && run_on_change {
            let config = self.config.clone();
            let generation = self.snapshot.borrow().generation;
            let expires_at = token.expires_at;
            self.engine.tracker.spawn(async move {
                let event = outputs::OnChangeEvent {
                    client: &config.name,
                    generation,
                    expires_at,
                };
                for r in outputs::run_on_change(&config, &event, ON_CHANGE_TIMEOUT).await {
                    log_on_change(&config.name, &r);
                }
            });
        }
    }

    /// Every output holds the current token: no retry, and a recovery is logged and shown.
    fn outputs_written(&mut self) {
        self.output_retry = None;
        let failures = self.output_backoff.failures();
        self.output_backoff.reset();
        self.output_repeated.clear();
        let was_failing = self
            .snapshot
            .send_if_modified(|s| s.output_error.take().is_some());
        if was_failing {
            tracing::info!(
                client = self.name(),
                failures,
                "every output holds the current token again"
            );
        }
    }

    async fn retry_outputs(&mut self) {
        self.output_retry = None;
        let token = self.snapshot.borrow().token.clone();
        if let Some(t) = token.filter(|t| t.is_valid_at(self.now())) {
            self.write_outputs(&t, true).await;
        }
    }
}

impl Drop for Refresher {
    fn drop(&mut self) {
        // Callers waiting on a reply see it close; later ones are refused.
        self.mailbox.close();
        // Its certificate HTTP client (and the key in it) goes with it: dropped here, once the
        // task can no longer ask for it again (a stop aborts the task only at its next await).
        if self.config.tls_client.is_some() {
            self.engine.http.forget(&self.config.name);
        }
    }
}

/// Why a refresh demand made now gets the current token instead of a new one: the token is
/// younger than `min_interval` (and valid, and not followed by failures).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldBack {
    /// How old the current token is.
    pub age: Duration,
    /// The client's `min_interval`.
    pub min_interval: Duration,
}

impl std::fmt::Display for HeldBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Rounded up to whole seconds: a retry after the time it names must succeed.
        let wait = self.min_interval.saturating_sub(self.age);
        let wait = Duration::from_secs(wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
        write!(
            f,
            "not renewed: last token {} old, min_interval {}; next possible in {}",
            Human(self.age),
            Human(self.min_interval),
            Human(wait),
        )
    }
}

// === chained clients (RFC 8693: `subject_token = { client = "NAME" }`) ===

/// Every refresher's snapshot channel by client name, announced on a `watch` channel so that a
/// chained client started before its upstream (or after a reload replaced the upstream) finds
/// it when it appears.
pub struct Chains(watch::Sender<Registry>);

/// The refreshers by name, and how many were added since stopped ones were last forgotten.
#[derive(Default)]
struct Registry {
    by_name: std::collections::HashMap<String, watch::Receiver<Snapshot>>,
    added: usize,
}

impl Default for Chains {
    fn default() -> Self {
        Chains(watch::channel(Registry::default()).0)
    }
}

impl Chains {
    fn register(&self, name: &str, snapshot: watch::Receiver<Snapshot>) {
        self.0.send_modify(|r| {
            // Forget the refreshers that have stopped (removed clients: their last token must
            // not stay in memory through this map), once as many were added as are kept, so
            // that 10,000 clients starting cost O(n), not O(n²).
            r.added += 1;
            if r.added > r.by_name.len() {
                r.by_name.retain(|_, rx| rx.has_changed().is_ok());
                r.added = 0;
            }
            r.by_name.insert(name.to_owned(), snapshot);
        });
    }

    /// The snapshot of `name`'s running refresher, once there is one.
    async fn find(&self, name: &str) -> watch::Receiver<Snapshot> {
        let mut registry = self.0.subscribe();
        loop {
            let found = registry
                .borrow_and_update()
                .by_name
                .get(name)
                .filter(|rx| rx.has_changed().is_ok())
                .cloned();
            if let Some(rx) = found {
                return rx;
            }
            if registry.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// The upstream a chained client follows.
struct Upstream {
    name: String,
    /// Its refresher's snapshot; `None` until found (again, after a reload replaced it).
    snapshot: Option<watch::Receiver<Snapshot>>,
    /// The upstream generation the last request exchanged.
    used: Option<u64>,
    /// When that subject token expires: the refresh is planned no later.
    subject_expires_at: Option<SystemTime>,
}

impl Upstream {
    fn of(config: &ClientConfig) -> Option<Box<Upstream>> {
        config.grant.upstream().map(|name| {
            Box::new(Upstream {
                name: name.to_owned(),
                snapshot: None,
                used: None,
                subject_expires_at: None,
            })
        })
    }
}

/// A chained client's refresh time (pure), from its own schedule `at`: the upstream's next
/// rotation renews this token anyway, so when that comes before the token needs renewing
/// (`refresh_margin` ahead of its expiry), only that fallback is planned (one request per
/// rotation, not two); and never after the subject token expires.
fn chained_refresh_at(
    at: SystemTime,
    expires_at: SystemTime,
    margin: Duration,
    upstream_next: Option<SystemTime>,
    subject_expires_at: Option<SystemTime>,
) -> SystemTime {
    let fallback = expires_at.checked_sub(margin).unwrap_or(at).max(at);
    let at = match upstream_next {
        Some(next) if next < fallback => fallback,
        _ => at,
    };
    match subject_expires_at {
        Some(subject) => at.min(subject),
        None => at,
    }
}

/// What woke a refresher besides its own deadlines and mail.
enum Side {
    /// A chained client's upstream has a new token (or a new refresher).
    Upstream,
    /// A shared client's fleet view changed.
    Fleet,
}

/// Resolves when a chained client's upstream or a shared client's fleet view changes. Boxed,
/// and for a client with neither (most of them) a zero-sized future that never resolves (no
/// allocation): a waiting refresher then holds a pointer here, not room for both waits
/// (issue 6: memory per client).
fn side_event<'a>(
    upstream: Option<&'a mut Upstream>,
    seat: &'a mut Option<crate::fleet::Seat>,
    chains: &'a Chains,
) -> std::pin::Pin<Box<dyn Future<Output = Side> + Send + 'a>> {
    if upstream.is_none() && seat.is_none() {
        return Box::pin(std::future::pending());
    }
    Box::pin(async move {
        tokio::select! {
            biased;
            _ = upstream_changed(upstream, chains) => Side::Upstream,
            _ = fleet_hook::changed(seat) => Side::Fleet,
        }
    })
}

/// Resolves when the upstream's snapshot changes (or first appears); never without one.
async fn upstream_changed(up: Option<&mut Upstream>, chains: &Chains) {
    let Some(up) = up else {
        return std::future::pending().await;
    };
    loop {
        match &mut up.snapshot {
            Some(rx) => match rx.changed().await {
                Ok(()) => return,
                // Its refresher stopped (a reload replaced or removed it): find the new one.
                Err(_) => up.snapshot = None,
            },
            None => {
                let mut rx = chains.find(&up.name).await;
                rx.mark_changed();
                up.snapshot = Some(rx);
            }
        }
    }
}

impl Refresher {
    /// The upstream's snapshot moved: a new token there means a new one here (the subject
    /// changed); an upstream that settled without a token makes this client's first attempt
    /// fail with that reason rather than wait unseen.
    async fn upstream_moved(&mut self) {
        let now = self.now();
        let Some(up) = self.upstream.as_deref_mut() else {
            return;
        };
        let Some((generation, valid, settled, reused)) = up.snapshot.as_ref().map(|rx| {
            let s = rx.borrow();
            (
                s.generation,
                s.valid_token(now).is_some(),
                s.settled,
                s.reused,
            )
        }) else {
            return;
        };
        let mine = self.snapshot.borrow().clone();
        if valid && up.used.is_none() && reused && mine.reused {
            // Both taken from the state directory at start: this token came of that one.
            up.used = Some(generation);
            return;
        }
        let fresh = valid && up.used != Some(generation);
        if fresh || (settled && !valid && !mine.settled) {
            let trigger = if mine.token.is_none() {
                Trigger::Startup
            } else {
                Trigger::Reload
            };
            let _ = self.attempt(trigger).await;
        }
    }

    /// The upstream's current token for this request (noting which one it is), if valid.
    fn upstream_token(&mut self) -> Option<Secret> {
        let now = self.now();
        let up = self.upstream.as_deref_mut()?;
        let snap = up.snapshot.as_ref()?.borrow().clone();
        let token = snap.valid_token(now)?;
        up.used = Some(snap.generation);
        up.subject_expires_at = Some(token.expires_at);
        Some(token.access_token.clone())
    }
}

/// The one rule for a refresh demand that `min_interval` holds back (gRPC `RefreshToken`,
/// `tokenwarden refresh` by a user who may not force it): `Some` when the current token is
/// valid, no failure followed it and it is younger than `min_interval` at `now`.
pub fn held_back(snap: &Snapshot, min_interval: Duration, now: SystemTime) -> Option<HeldBack> {
    if snap.valid_token(now).is_none() || snap.consecutive_failures > 0 {
        return None;
    }
    let age = now
        .duration_since(snap.last_refresh_at?)
        .unwrap_or(Duration::ZERO);
    (age < min_interval).then_some(HeldBack { age, min_interval })
}

/// Asks a refresher for a token and waits for the answer.
pub async fn request(slot: &ClientSlot, reason: Reason) -> Answer {
    let (tx, rx) = oneshot::channel();
    slot.mailbox
        .post(Command::Refresh {
            reason,
            reply: Some(tx),
        })
        .map_err(|_| RefreshError::Stopped)?;
    rx.await.map_err(|_| RefreshError::Stopped)?
}

/// Logs what an `on_change` command did (its output is the command's own, never a secret).
fn log_on_change(client: &str, r: &outputs::OnChangeReport) {
    let program = r.argv.first().map(String::as_str).unwrap_or("");
    match &r.result {
        Ok(out) => {
            if out.left_running {
                tracing::warn!(
                    client,
                    program,
                    "on_change left processes running when it exited; they were killed (start \
                     long-running work through systemd instead)"
                );
            }
            let stdout = out.stdout.trim();
            let stderr = out.stderr.trim();
            if out.status.success() {
                tracing::info!(
                    client,
                    program,
                    stdout,
                    stderr,
                    "on_change ran in {}",
                    Human(out.elapsed)
                );
            } else {
                tracing::warn!(
                    client,
                    program,
                    stdout,
                    stderr,
                    "on_change failed ({})",
                    out.status
                );
            }
        }
        Err(e) => tracing::warn!(client, "on_change: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_back_within_min_interval_only() {
        let t0 = SystemTime::now();
        let token = Arc::new(Token {
            access_token: crate::secret::Secret::new("t"),
            token_type: "Bearer".into(),
            issued_at: t0,
            expires_at: t0 + Duration::from_secs(600),
            scope: Vec::new(),
        });
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // (failures, a token?, now) → what a demand is told, if it is held back
        let cases = [
            (
                (0, true, at(2_300)),
                Some("last token 2s old, min_interval 10s; next possible in 8s"),
            ),
            (
                (0, true, at(9_999)),
                Some("last token 9s old, min_interval 10s; next possible in 1s"),
            ),
            ((0, true, at(10_000)), None),
            ((1, true, at(1)), None),       // failing
            ((0, false, at(1)), None),      // no token
            ((0, true, at(700_000)), None), // expired
        ];
        for ((failures, has_token, now), want) in cases {
            let snap = Snapshot {
                token: has_token.then(|| token.clone()),
                consecutive_failures: failures,
                last_refresh_at: Some(t0),
                ..Snapshot::default()
            };
            let got = held_back(&snap, Duration::from_secs(10), now).map(|h| h.to_string());
            let want = want.map(|w| format!("not renewed: {w}"));
            assert_eq!(got, want, "{failures} {has_token} {now:?}");
        }
    }

    #[test]
    fn url_holds_keep_the_latest_time_and_end() {
        let holds = UrlHolds::default();
        let now = Instant::now();
        assert_eq!(holds.until("https://a/token"), None);
        holds.note("https://a/token", now + Duration::from_secs(60));
        holds.note("https://a/token", now + Duration::from_secs(30));
        assert_eq!(
            holds.until("https://a/token"),
            Some(now + Duration::from_secs(60)),
            "a shorter wait does not shorten a longer one"
        );
        assert_eq!(holds.until("https://b/token"), None, "per token URL");
        holds.note("https://b/token", now);
        assert_eq!(
            holds.until("https://b/token"),
            None,
            "a time passed holds nothing"
        );
    }

    #[test]
    fn a_chained_client_plans_a_fallback_when_its_upstream_rotates_first() {
        let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let margin = Duration::from_secs(30);
        // (own schedule, expiry, upstream's next rotation, subject's expiry) → planned
        let cases = [
            // No upstream plan known: the own schedule.
            ((2700, 3600, None, None), 2700),
            // The upstream rotates first: only the fallback, margin before expiry.
            ((2700, 3600, Some(2600), None), 3570),
            ((2700, 3600, Some(3000), None), 3570),
            // The upstream rotates after this token needs renewing: the own schedule.
            ((2700, 3600, Some(3590), None), 2700),
            // Never after the subject expires.
            ((2700, 3600, Some(2600), Some(3000)), 3000),
            ((2700, 3600, None, Some(2000)), 2000),
            // A token shorter than the margin: the fallback is never before the schedule.
            ((10, 20, Some(5), None), 10),
        ];
        for ((at, exp, up, subject), want) in cases {
            let got = chained_refresh_at(t(at), t(exp), margin, up.map(t), subject.map(t));
            assert_eq!(got, t(want), "{at} {exp} {up:?} {subject:?}");
        }
    }

    #[test]
    fn the_earliest_deadline_wins_and_a_refresh_wins_ties() {
        let t0 = Instant::now();
        let at = |s: u64| Some(t0 + Duration::from_secs(s));
        let cases = [
            (None, None, None, None),
            (at(5), None, None, Some((5, Due::Refresh))),
            (at(5), at(3), None, Some((3, Due::Outputs))),
            (at(5), at(3), at(1), Some((1, Due::Expiry))),
            (None, at(3), at(4), Some((3, Due::Outputs))),
            (at(2), at(2), at(2), Some((2, Due::Refresh))),
            (at(9), None, at(9), Some((9, Due::Refresh))),
        ];
        for (refresh, outputs, expiry, want) in cases {
            let want = want.map(|(s, d)| (t0 + Duration::from_secs(s), d));
            assert_eq!(
                earliest(refresh, outputs, expiry),
                want,
                "{refresh:?} {outputs:?} {expiry:?}"
            );
        }
    }
}
