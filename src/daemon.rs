//! `tokenwarden run`: the long-running daemon (docs/operations.md).
//!
//! It opens (and locks) the state directory, removes the temporary files that writes killed
//! midway left next to the outputs, starts one refresher per client under a root cancellation
//! token, and then waits on one channel for what can happen to it: a reload
//! (config or secret file changed, SIGHUP), SIGUSR1 (refresh every client), SIGTERM/SIGINT
//! (stop). systemd hears READY=1 once every client has a token or has failed its first attempt,
//! STATUS= lines, RELOADING=1/READY=1 around reloads, STOPPING=1 and watchdog pings.
//!
//! A reload validates the whole new config first; a bad one leaves the running one in place.
//! Then one `match` over [`config::diff`]: unchanged clients keep running untouched; a new
//! identity stops the client's refresher and starts a new one; other changes are handed to the
//! running refresher (a new token at once for new credentials, the current token written to new
//! outputs, settings applied); removed clients stop (their files are left), added ones start;
//! `[daemon]` keys are applied as [`config::DaemonChanges`] lists them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

use crate::config::{self, ClientChange, ClientConfig, Config};
use crate::grpc::GrpcServer;
use crate::logging::LogHandle;
use crate::refresher::{self, Engine, Reconfigure};
use crate::store::{Command, Posted, Reason, Store};
use crate::systemd::Notifier;
use crate::triggers::{self, Event, FileWatcher, ReloadReason};

/// How long shutdown waits for in-flight requests and writes.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(4500);
/// How long the exit waits for systemd to take `STOPPING=1` when its notify socket is full.
const NOTIFY_FLUSH: Duration = Duration::from_millis(500);
/// How often the status (`STATUS=`, READY=1) is looked at before READY=1, and after.
const STATUS_UNTIL_READY: Duration = Duration::from_millis(50);
const STATUS_WHEN_READY: Duration = Duration::from_secs(1);
/// Quiet time after the last file event before a reload.
pub const RELOAD_DEBOUNCE: Duration = Duration::from_millis(200);

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state directory could not be opened or is locked by another daemon.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// The signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    /// The metrics recorder could not be installed.
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
    /// `metrics_listen` could not be bound.
    #[error("cannot listen on metrics_listen {0}: {1}")]
    MetricsListen(std::net::SocketAddr, #[source] std::io::Error),
    /// An HTTP API listener (`http_socket`, `http_listen`) could not be set up.
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    /// The gRPC socket could not be bound.
    #[error("gRPC API: {0}")]
    Grpc(#[from] crate::grpc::ServeError),
    /// `[fleet]` could not be set up (docs/fleet.md).
    #[error("fleet: {0}")]
    Fleet(String),
}

/// A running daemon.
pub struct Daemon {
    config: Arc<Config>,
    engine: Arc<Engine>,
    store: Arc<Store>,
    handles: BTreeMap<String, refresher::Handle>,
    root: CancellationToken,
    notifier: Notifier,
    log: Option<LogHandle>,
    events: mpsc::Receiver<Event>,
    events_tx: mpsc::Sender<Event>,
    watcher: Option<FileWatcher>,
    _signals: Option<triggers::SignalTask>,
    cron: Option<JobScheduler>,
    cron_jobs: HashMap<String, uuid::Uuid>,
    /// The gRPC API, when `daemon.socket` is set.
    grpc: Option<GrpcServer>,
    /// The HTTP API on `daemon.http_socket` and `daemon.http_listen` (docs/http.md).
    http: crate::http::HttpApi,
    permits_total: usize,
    ready_sent: bool,
    last_status: String,
    reload_error: Option<String>,
    /// The metrics endpoint's address and its stop switch.
    metrics: Option<(std::net::SocketAddr, CancellationToken)>,
    /// The listeners' bounds, caps fitted into the descriptor limit.
    limits: crate::limits::Limits,
}

impl Daemon {
    /// Opens the state directory, installs signal handlers and the file watcher, and starts
    /// every client.
    pub async fn start(config: Config, log: Option<LogHandle>) -> Result<Daemon, DaemonError> {
        let clients = config.clients.values().cloned().collect();
        let mut engine = Engine::open(&config.daemon, clients).await?;
        if let Some(fleet) = &config.fleet {
            let started = crate::fleet::Fleet::start(fleet, &config.fleet_local, &engine.tracker);
            engine.fleet = Some(started.map_err(DaemonError::Fleet)?);
        }
        let engine = Arc::new(engine);
        let (events_tx, events) = mpsc::channel(64);
        let signals = triggers::signals(events_tx.clone()).map_err(DaemonError::Signals)?;
        let watcher =
            match FileWatcher::start(config.watched_files(), RELOAD_DEBOUNCE, events_tx.clone()) {
                Ok(w) => {
                    if let Err(e) = w.set_globs(config.include_globs()) {
                        tracing::warn!("new included files are not watched (SIGHUP reloads): {e}");
                    }
                    Some(w)
                }
                Err(e) => {
                    tracing::warn!("config files are not watched (SIGHUP still reloads): {e}");
                    None
                }
            };
        let permits_total = config.daemon.max_concurrent_refreshes.max(1);
        let limits = crate::limits::for_daemon(&config.daemon);
        let mut daemon = Daemon {
            config: Arc::new(config),
            engine,
            store: Arc::new(Store::default()),
            handles: BTreeMap::new(),
            root: CancellationToken::new(),
            notifier: Notifier::from_env(),
            log,
            events,
            events_tx,
            watcher,
            _signals: Some(signals),
            cron: None,
            cron_jobs: HashMap::new(),
            grpc: None,
            http: Default::default(),
            permits_total,
            ready_sent: false,
            last_status: String::new(),
            reload_error: None,
            metrics: None,
            limits,
        };
        if let Some(addr) = daemon.config.daemon.metrics_listen {
            daemon.start_metrics(addr).await?;
        }
        let clients: Vec<Arc<ClientConfig>> = daemon.config.clients.values().cloned().collect();
        for c in clients {
            daemon.add_client(c).await;
        }
        if let Some(path) = daemon.config.daemon.socket.clone() {
            let (mode, store, limits) = (
                daemon.config.daemon.socket_mode,
                daemon.store(),
                daemon.limits.clone(),
            );
            let grpc = GrpcServer::start_limited(&path, mode, store, limits).await;
            daemon.grpc = Some(grpc.inspect_err(|_| daemon.root.cancel())?);
        }
        crate::audit::set_enabled(daemon.config.daemon.audit);
        let http =
            crate::http::HttpApi::start(&daemon.config.daemon, daemon.store(), &daemon.limits);
        daemon.http = http.await.inspect_err(|_| daemon.root.cancel())?;
        tracing::info!(
            clients = daemon.handles.len(),
            state_dir = ?daemon.config.daemon.state_dir,
            "tokenwarden {} started",
            env!("CARGO_PKG_VERSION")
        );
        Ok(daemon)
    }

    /// The store, for readers (gRPC, the demo's printer).
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// A sender into the daemon's event loop (tests and the demo stop it this way).
    pub fn events(&self) -> mpsc::Sender<Event> {
        self.events_tx.clone()
    }

    /// Runs until SIGTERM/SIGINT (or an `Event::Shutdown`), then stops within the grace time.
    pub async fn run(mut self) -> Result<(), DaemonError> {
        // Until READY=1 the status is checked often, so that READY follows the last client's
        // first token closely; then once a second: it walks every client (10,000 on a big
        // host), which 20 times a second would cost a few percent of a core on an idle daemon.
        let mut tick = tokio::time::interval(STATUS_UNTIL_READY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticking_fast = true;
        let mut watchdog = self.notifier.watchdog_interval().map(|d| {
            let mut i = tokio::time::interval(d);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        loop {
            tokio::select! {
                ev = self.events.recv() => match ev {
                    Some(Event::Shutdown) | None => break,
                    Some(Event::Reload(reason)) => self.reload(reason).await,
                    Some(Event::RefreshAll) => self.refresh_all(),
                },
                _ = tick.tick() => {
                    self.update_status();
                    if ticking_fast && self.ready_sent {
                        ticking_fast = false;
                        tick = tokio::time::interval_at(
                            tokio::time::Instant::now() + STATUS_WHEN_READY,
                            STATUS_WHEN_READY,
                        );
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                }
                _ = async {
                    match watchdog.as_mut() {
                        Some(i) => { i.tick().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => self.notifier.watchdog(),
            }
        }
        self.shutdown().await;
        Ok(())
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on `addr`.
    async fn start_metrics(&mut self, addr: std::net::SocketAddr) -> Result<(), DaemonError> {
        let prom = crate::metrics::install()?;
        let cancel = self.root.child_token();
        crate::metrics::serve(addr, prom, self.store.clone(), cancel.clone(), &self.limits)
            .await
            .map_err(|e| DaemonError::MetricsListen(addr, e))?;
        self.metrics = Some((addr, cancel));
        Ok(())
    }

    async fn shutdown(mut self) {
        tracing::info!("stopping");
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        self.notifier.stopping();
        // Health turns NOT_SERVING first; waiting calls and watch streams end.
        if let Some(grpc) = self.grpc.take() {
            grpc.stop().await;
        }
        self.http.stop().await;
        self.root.cancel();
        if let Some(fleet) = &self.engine.fleet {
            fleet.stop();
        }
        if let Some(mut cron) = self.cron.take() {
            let _ = cron.shutdown().await;
        }
        self.engine.tracker.close();
        if tokio::time::timeout_at(deadline, self.engine.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some requests or commands did not finish in time; stopping anyway");
        }
        // STOPPING=1 (and what came before it) reach systemd unless its socket stays full.
        let notifier = self.notifier.clone();
        let _ = tokio::task::spawn_blocking(move || notifier.flush(NOTIFY_FLUSH)).await;
        tracing::info!("stopped");
    }

    fn status_line(&self) -> String {
        let now = SystemTime::now();
        let (valid, total) = self.store.counts(now);
        let mut s = format!("{valid}/{total} clients valid");
        let behind = self.store.degraded(now);
        if behind > 0 {
            s.push_str(&format!(
                "; {behind} with outputs not written or state not saved (see tokenwarden status)"
            ));
        }
        if let Some(e) = &self.reload_error {
            s.push_str(&format!(
                "; reload failed, running the previous config: {e}"
            ));
        }
        s
    }

    fn update_status(&mut self) {
        if !self.ready_sent {
            if self.store.all_settled() {
                self.ready_sent = true;
                let status = self.status_line();
                tracing::info!("ready: {status}");
                self.notifier.ready(&status);
                self.last_status = status;
                // What the start-up freed (state files read, first requests' buffers) goes
                // back to the kernel, as after a reload (at 10,000 clients 2.5 MiB after the first
                // start, 3.4 MiB after a restart).
                tokio::task::spawn_blocking(crate::sys::trim_heap);
            }
            return;
        }
        let status = self.status_line();
        if status != self.last_status {
            self.notifier.status(&status);
            self.last_status = status;
        }
    }

    fn refresh_all(&self) {
        tracing::info!("SIGUSR1: refreshing every client");
        for (name, slot) in self.store.slots() {
            let posted = slot.mailbox.post(Command::Refresh {
                reason: Reason::RefreshAll,
                reply: None,
            });
            if posted != Ok(Posted::Queued) {
                tracing::debug!(client = name.as_str(), "refresh already queued");
            }
        }
    }

    async fn add_client(&mut self, config: Arc<ClientConfig>) {
        let name = config.name.clone();
        let handle = refresher::spawn(config.clone(), self.engine.clone(), self.root.clone());
        self.store.insert(&name, handle.slot.clone());
        self.handles.insert(name.clone(), handle);
        self.set_cron(&config).await;
    }

    /// Stops a client's refresher and forgets it (its files are left in place).
    async fn remove_client(&mut self, name: &str) {
        if let Some(h) = self.handles.remove(name) {
            h.stop();
        }
        self.store.remove(name);
        self.clear_cron(name).await;
    }

    async fn set_cron(&mut self, config: &ClientConfig) {
        self.clear_cron(&config.name).await;
        let Some(expr) = config.rotate_cron.clone() else {
            return;
        };
        let Some(slot) = self.store.get(&config.name) else {
            return;
        };
        if self.cron.is_none() {
            match JobScheduler::new().await {
                Ok(s) => {
                    if let Err(e) = s.start().await {
                        tracing::error!("cannot start the rotate_cron scheduler: {e}");
                        return;
                    }
                    self.cron = Some(s);
                }
                Err(e) => {
                    tracing::error!("cannot start the rotate_cron scheduler: {e}");
                    return;
                }
            }
        }
        let Some(cron) = &self.cron else { return };
        let mailbox = slot.mailbox.clone();
        let name = config.name.clone();
        let job = Job::new_async(expr.as_str(), move |_, _| {
            let mailbox = mailbox.clone();
            let name = name.clone();
            Box::pin(async move {
                tracing::info!(client = name.as_str(), "rotate_cron: forcing a new token");
                let _ = mailbox.post(Command::Refresh {
                    reason: Reason::Rotation,
                    reply: None,
                });
            })
        });
        match job {
            Ok(job) => match cron.add(job).await {
                Ok(id) => {
                    self.cron_jobs.insert(config.name.clone(), id);
                }
                Err(e) => {
                    tracing::error!(
                        client = config.name.as_str(),
                        "cannot schedule rotate_cron: {e}"
                    )
                }
            },
            Err(e) => {
                tracing::error!(
                    client = config.name.as_str(),
                    "cannot schedule rotate_cron {expr:?}: {e}"
                )
            }
        }
    }

    async fn clear_cron(&mut self, name: &str) {
        if let (Some(id), Some(cron)) = (self.cron_jobs.remove(name), &self.cron)
            && let Err(e) = cron.remove(&id).await
        {
            tracing::warn!(client = name, "cannot remove the rotate_cron job: {e}");
        }
    }

    async fn reload(&mut self, reason: ReloadReason) {
        match &reason {
            ReloadReason::Signal => {
                tracing::info!("SIGHUP: reloading {}", self.config.path.display())
            }
            ReloadReason::Changed(paths) => {
                let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                tracing::info!("files changed ({}): reloading", names.join(", "));
            }
        }
        self.notifier.reloading();
        let began = std::time::Instant::now();
        // A change the watcher saw: clients whose tables and secret files did not change are
        // taken as they are, the running config's own (a load-time saving at 10,000 clients:
        // the diff still decides, and finds them equal at once). SIGHUP builds everything again
        // (and re-reads every secret).
        let loaded = match &reason {
            ReloadReason::Changed(paths) => config::load_reusing(
                &self.config.path,
                Some(config::Reuse {
                    previous: &self.config,
                    changed: paths,
                }),
            ),
            ReloadReason::Signal => config::load(&self.config.path),
        };
        let load_took = began.elapsed();
        let mut new = match loaded {
            Ok(c) => c,
            Err(errors) => {
                crate::metrics::reload(false);
                for e in &errors.errors {
                    tracing::error!("reload refused: {e}");
                }
                let first = errors
                    .errors
                    .first()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                let more = errors.errors.len().saturating_sub(1);
                self.reload_error = Some(if more > 0 {
                    format!("{first} (and {more} more)")
                } else {
                    first
                });
                let status = self.status_line();
                self.notifier.ready(&status);
                self.last_status = status;
                tokio::task::spawn_blocking(crate::sys::trim_heap);
                return;
            }
        };
        for w in &new.warnings {
            tracing::warn!("{w}");
        }
        self.reload_error = None;
        crate::metrics::reload(true);
        let diff = config::diff(&self.config, &new);
        // One copy of each client's config: an unchanged client keeps the one its refresher
        // already holds, and the new parse of it is dropped.
        let mut replaced = Vec::with_capacity(diff.unchanged.len());
        for name in &diff.unchanged {
            if let (Some(old), Some(new)) =
                (self.config.clients.get(name), new.clients.get_mut(name))
                && !Arc::ptr_eq(old, new)
            {
                replaced.push(std::mem::replace(new, old.clone()));
            }
        }
        // One line per client saying what changed and what happens now, then one summary line;
        // every field a quoted string except the summary's counts.
        for name in &diff.removed {
            self.remove_client(name).await;
            tracing::info!(
                client = name.as_str(),
                action = "stopped; its files are left in place",
                "client removed"
            );
        }
        for (name, change) in &diff.changed {
            let (Some(old), Some(c)) = (self.config.clients.get(name), new.clients.get(name))
            else {
                continue;
            };
            tracing::info!(
                client = name.as_str(),
                changed = config::describe(&config::changed_keys(old, c)).as_str(),
                action = reload_action(*change, old.timing != c.timing),
                "client changed"
            );
            match change {
                // Nothing of the old identity's token, refresh token or state may leak in.
                ClientChange::Replace => {
                    self.remove_client(name).await;
                    self.add_client(c.clone()).await;
                }
                ClientChange::Renew | ClientChange::Outputs | ClientChange::Settings => {
                    if let Some(h) = self.handles.get_mut(name) {
                        h.slot.config = c.clone();
                        self.store.insert(name, h.slot.clone());
                        let _ = h.slot.mailbox.reconfigure(Reconfigure {
                            config: c.clone(),
                            change: *change,
                        });
                    }
                    self.set_cron(c).await;
                }
            }
        }
        if let ReloadReason::Changed(paths) = &reason {
            self.retry_on_new_ready_tokens(&diff.unchanged, &new, paths);
        }
        for name in &diff.added {
            if let Some(c) = new.clients.get(name) {
                tracing::info!(
                    client = name.as_str(),
                    action =
                        "started: a stored token still good is reused, else one is requested now",
                    "client added"
                );
                self.add_client(c.clone()).await;
            }
        }
        self.apply_daemon_changes(diff.daemon, &new).await;
        // The watched set follows the clients and the files read; the globs, `include`.
        let clients_moved =
            !(diff.added.is_empty() && diff.removed.is_empty() && diff.changed.is_empty())
                || new.files != self.config.files;
        if let Some(w) = &self.watcher {
            let paths = clients_moved.then(|| w.set_paths(new.watched_files()));
            let globs = diff
                .daemon
                .include
                .then(|| w.set_globs(new.include_globs()));
            if let Some(Err(e)) = paths.into_iter().chain(globs).find(Result::is_err) {
                tracing::warn!("cannot watch the new set of files: {e}");
            }
        }
        tracing::info!(
            added = diff.added.len(),
            removed = diff.removed.len(),
            changed = diff.changed.len(),
            unchanged = diff.unchanged.len(),
            load_ms = load_took.as_millis() as u64,
            took_ms = began.elapsed().as_millis() as u64,
            "reloaded"
        );
        // Freeing the old config and the duplicate parses walks every client (~10 ms at
        // 10,000), and so does giving the freed buffers back to the kernel (~30 ms; else RSS
        // stays at the reload's peak, and even a reload the parse cache served leaves ~4 MiB
        // more resident each time at 10,000 clients): not on the way to the new tokens.
        let old = std::mem::replace(&mut self.config, Arc::new(new));
        tokio::task::spawn_blocking(move || {
            drop((old, replaced));
            crate::sys::trim_heap();
        });
        let status = self.status_line();
        self.notifier.ready(&status);
        self.last_status = status;
    }

    /// A client failing on a ready-made token file (an expired projected token: its writer had
    /// stopped) asks again as soon as that file changes, not at its next backoff retry.
    fn retry_on_new_ready_tokens(
        &self,
        unchanged: &[String],
        new: &Config,
        changed: &[std::path::PathBuf],
    ) {
        for name in unchanged {
            let (Some(c), Some(slot)) = (new.clients.get(name), self.store.get(name)) else {
                continue;
            };
            let failing = slot.snapshot.borrow().consecutive_failures > 0;
            if failing && c.ready_token_paths().iter().any(|p| changed.contains(p)) {
                tracing::info!(
                    client = name.as_str(),
                    "its token file changed: asking again now"
                );
                let _ = slot.mailbox.post(Command::Refresh {
                    reason: Reason::Demand,
                    reply: None,
                });
            }
        }
    }

    /// Applies what changed in `[daemon]`, key by key as the diff found them.
    async fn apply_daemon_changes(&mut self, changes: config::DaemonChanges, new: &Config) {
        let d = &new.daemon;
        if changes.logging {
            if let Some(log) = &self.log
                && d.log_level != self.config.daemon.log_level
            {
                match log.set_level(&d.log_level) {
                    Ok(()) => tracing::info!("log level is now {}", d.log_level),
                    Err(e) => tracing::warn!("{e}"),
                }
            }
            if d.log_format != self.config.daemon.log_format {
                tracing::warn!("log_format changes take effect at the next start");
            }
        }
        if changes.state_dir {
            tracing::warn!(
                "state_dir changes take effect at the next start (still using {})",
                self.config.daemon.state_dir.display()
            );
        }
        if changes.max_concurrent_refreshes {
            let want = d.max_concurrent_refreshes.max(1);
            if want > self.permits_total {
                self.engine.permits.add_permits(want - self.permits_total);
                self.permits_total = want;
            } else {
                let gone = self
                    .engine
                    .permits
                    .forget_permits(self.permits_total - want);
                self.permits_total -= gone;
            }
        }
        if changes.max_connections || changes.metrics_listen || changes.http {
            self.limits = crate::limits::for_daemon(d);
            if let Some(server) = &self.grpc {
                server.set_max_connections(self.limits.max_connections);
            }
        }
        if changes.metrics_listen {
            if let Some((_, cancel)) = self.metrics.take() {
                cancel.cancel();
            }
            if let Some(addr) = d.metrics_listen
                && let Err(e) = self.start_metrics(addr).await
            {
                tracing::error!("{e}");
            }
        }
        if changes.socket || changes.socket_mode {
            self.apply_socket(new).await;
        }
        // The HTTP socket takes `socket_mode` too, and its listeners count in the caps.
        if changes.http || changes.socket_mode || changes.max_connections || changes.metrics_listen
        {
            crate::audit::set_enabled(d.audit);
            self.http.apply(d, self.store.clone(), &self.limits).await;
        }
    }

    /// Rebinds the gRPC socket when its path changed (the new one is bound before the old one
    /// stops, so a failure leaves the old one serving), or changes its mode in place.
    async fn apply_socket(&mut self, new: &Config) {
        let mode = new.daemon.socket_mode;
        let want = new.daemon.socket.clone();
        if let (Some(server), Some(path)) = (self.grpc.as_mut(), want.as_ref())
            && server.path() == path.as_path()
        {
            if server.mode() != mode {
                match server.set_mode(mode) {
                    Ok(()) => {
                        tracing::info!(socket = ?path, "socket mode is now {mode:04o}")
                    }
                    Err(e) => tracing::error!("{e}"),
                }
            }
            return;
        }
        let new_server = match &want {
            Some(path) => {
                match GrpcServer::start_limited(path, mode, self.store.clone(), self.limits.clone())
                    .await
                {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::error!(
                            "gRPC API not moved, still serving the old socket (if any): {e}"
                        );
                        return;
                    }
                }
            }
            None => None,
        };
        if let Some(old) = self.grpc.take() {
            old.stop().await;
        }
        self.grpc = new_server;
    }
}

/// What a reload does to a changed client, for its log line (pure).
fn reload_action(change: ClientChange, timing_changed: bool) -> &'static str {
    match (change, timing_changed) {
        (ClientChange::Replace | ClientChange::Renew, _) => "new token requested now",
        (ClientChange::Outputs, false) => {
            "current token written to the outputs; schedule kept, no new token"
        }
        (ClientChange::Outputs, true) => {
            "current token written to the outputs; next refresh planned again, no new token"
        }
        (ClientChange::Settings, false) => "applied; schedule kept, no new token",
        (ClientChange::Settings, true) => "applied; next refresh planned again, no new token",
    }
}

/// Runs the daemon with `config` until it is told to stop.
pub async fn run(config: Config, log: Option<LogHandle>) -> Result<(), DaemonError> {
    Daemon::start(config, log).await?.run().await
}
