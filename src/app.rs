//! Wiring: the commands that put config, oauth, outputs and state together.
//!
//! `once` fetches (or reuses) each client's token, persists it, writes its outputs and runs
//! `on_change`, then returns one result per client. The same per-client step, [`obtain`], is
//! what the daemon's refresher runs.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Semaphore;

use crate::config::{ClientConfig, Config};
use crate::oauth::{self, HttpClients, Human, OAuthError};
use crate::outputs;
use crate::secret::Secret;
use crate::state::{StateDir, StoredState};
use crate::token::Token;

/// How long an `on_change` command may run.
pub const ON_CHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// What happened to one client in a `once` run.
#[derive(Debug)]
pub struct ClientResult {
    pub client: String,
    pub outcome: Result<Obtained, ClientFailure>,
}

/// A token in hand, and where it came from.
#[derive(Debug, Clone)]
pub struct Obtained {
    pub token: Token,
    /// `true`: reused from the state directory without asking the provider.
    pub reused: bool,
    /// The grant that produced a new token (`None` when reused).
    pub grant_type: Option<&'static str>,
    /// Generation of the token (rises by one per new token).
    pub generation: u64,
    /// Outputs that failed to write (the token itself is good and stored).
    pub output_errors: Vec<String>,
}

/// Why a client has no token.
#[derive(Debug, thiserror::Error)]
pub enum ClientFailure {
    /// The provider (or the network) refused.
    #[error("{0}")]
    Token(#[from] OAuthError),
    /// The state could not be written: the token was not published, so no refresh token can
    /// be lost.
    #[error("cannot store state: {0}")]
    State(String),
}

/// Fetches a token for `client` unless the state holds a reusable one; stores the new state
/// (refresh token first, before the token is published anywhere), then writes the outputs and
/// runs `on_change` when any output changed.
pub async fn obtain(
    client: &ClientConfig,
    state: &StateDir,
    http: &reqwest::Client,
) -> Result<Obtained, ClientFailure> {
    let fingerprint = client.identity_fingerprint();
    let stored = match state.load(&client.name) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(client = %client.name, "ignoring unreadable state: {e}");
            None
        }
    };
    let now = SystemTime::now();
    let generation = stored.as_ref().map(|s| s.generation).unwrap_or(0);
    if let Some(token) = stored
        .as_ref()
        .and_then(|s| s.reusable_token(&fingerprint, client.timing.refresh_margin, now))
    {
        let token = token.clone();
        tracing::info!(
            client = %client.name,
            token = %token.fingerprint(),
            expires_at = %crate::token::rfc3339(token.expires_at),
            "reusing stored token"
        );
        let output_errors = publish(client, &token, generation).await;
        return Ok(Obtained {
            token,
            reused: true,
            grant_type: None,
            generation,
            output_errors,
        });
    }
    let refresh: Option<Secret> = stored
        .as_ref()
        .and_then(|s| s.refresh_token_for(&fingerprint))
        .cloned();
    // A configured refresh token already presented is never presented again (see acquire).
    let bootstrap = crate::refresher::bootstrap_fingerprint(client);
    let spent_before = stored
        .as_ref()
        .and_then(|s| crate::refresher::spent_bootstrap(s, &fingerprint, client));
    let spent = bootstrap.is_some() && spent_before == bootstrap;
    let spent_bootstrap = |now_spent: bool| {
        if now_spent {
            bootstrap.clone()
        } else {
            spent_before.clone()
        }
    };
    match oauth::acquire(http, client, refresh.as_ref(), spent).await {
        Ok(acquired) => {
            if let Some(e) = &acquired.refresh_token_refused {
                tracing::warn!(client = %client.name, "stored refresh token refused, used the {} grant instead: {e}", acquired.grant_type);
            }
            let token = acquired.issued.token;
            let new_state = StoredState {
                fingerprint,
                token: Some(token.clone()),
                refresh_token: acquired.refresh_token,
                generation: generation + 1,
                spent_bootstrap: spent_bootstrap(acquired.bootstrap_spent),
            };
            state
                .save(&client.name, &new_state)
                .map_err(|e| ClientFailure::State(e.to_string()))?;
            tracing::info!(
                client = %client.name,
                token = %token.fingerprint(),
                grant = acquired.grant_type,
                expires_at = %crate::token::rfc3339(token.expires_at),
                "new token"
            );
            let output_errors = publish(client, &token, generation + 1).await;
            Ok(Obtained {
                token,
                reused: false,
                grant_type: Some(acquired.grant_type),
                generation: generation + 1,
                output_errors,
            })
        }
        Err(failure) => {
            let forget = failure.forget_refresh_token
                && stored.as_ref().is_some_and(|s| s.refresh_token.is_some());
            let newly_spent = failure.bootstrap_spent && !spent;
            if forget || newly_spent {
                let mut s = stored.unwrap_or(StoredState {
                    fingerprint,
                    token: None,
                    refresh_token: None,
                    generation,
                    spent_bootstrap: None,
                });
                if forget {
                    s.refresh_token = None;
                }
                s.spent_bootstrap = spent_bootstrap(failure.bootstrap_spent);
                if let Err(e) = state.save(&client.name, &s) {
                    tracing::warn!(client = %client.name, "cannot forget the dead refresh token: {e}");
                }
            }
            Err(ClientFailure::Token(failure.error))
        }
    }
}

/// Writes every output of the client and runs `on_change` if any changed. Returns one line per
/// failed output (each already logged).
pub async fn publish(client: &ClientConfig, token: &Token, generation: u64) -> Vec<String> {
    let reports = {
        let client = client.clone();
        let token = token.clone();
        match tokio::task::spawn_blocking(move || outputs::write_outputs(&client, &token)).await {
            Ok(r) => r,
            Err(e) => return vec![format!("output writer failed: {e}")],
        }
    };
    let mut errors = Vec::new();
    let mut changed = false;
    for report in reports {
        match report.result {
            Ok(true) => {
                changed = true;
                tracing::debug!(client = %client.name, path = %report.path.display(), "output written");
            }
            Ok(false) => {
                tracing::debug!(client = %client.name, path = %report.path.display(), "output already current");
            }
            Err(e) => {
                tracing::warn!(client = %client.name, "{e}");
                errors.push(e.to_string());
            }
        }
    }
    if changed {
        let event = outputs::OnChangeEvent {
            client: &client.name,
            generation,
            expires_at: token.expires_at,
        };
        for r in outputs::run_on_change(client, &event, ON_CHANGE_TIMEOUT).await {
            log_on_change(&client.name, &r);
        }
    }
    errors
}

pub fn log_on_change(client: &str, r: &outputs::OnChangeReport) {
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

/// `tokenwarden once`: every named client (all when `only` is empty), concurrently up to
/// `max_concurrent_refreshes`.
pub async fn once(config: &Config, only: &[String]) -> Result<Vec<ClientResult>, String> {
    for name in only {
        if !config.clients.contains_key(name) {
            let known: Vec<&str> = config.clients.keys().map(String::as_str).collect();
            return Err(format!(
                "no client named {name:?} in {} (clients: {})",
                config.path.display(),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ));
        }
    }
    let state = Arc::new(StateDir::open(&config.daemon.state_dir).map_err(|e| e.to_string())?);
    // With the lock held nobody else writes these outputs: temp files left by a killed writer
    // can go (as the daemon does at start).
    for (client, path) in outputs::remove_stale_temp_files(config.clients.values().map(|c| &**c)) {
        tracing::info!(client = %client, path = %path.display(), "removed a stale temporary file");
    }
    let http = Arc::new(HttpClients::default());
    let permits = Arc::new(Semaphore::new(
        config.daemon.max_concurrent_refreshes.max(1),
    ));
    let mut tasks = Vec::new();
    for (name, client) in &config.clients {
        if !only.is_empty() && !only.contains(name) {
            continue;
        }
        let client = client.clone();
        let state = state.clone();
        let http = http.clone();
        let permits = permits.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            let outcome = match http.get(&client) {
                Ok(h) => obtain(&client, &state, &h).await,
                Err(e) => Err(ClientFailure::Token(e)),
            };
            ClientResult {
                client: client.name.clone(),
                outcome,
            }
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        match t.await {
            Ok(r) => results.push(r),
            Err(e) => return Err(format!("a client task failed: {e}")),
        }
    }
    Ok(results)
}
