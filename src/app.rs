//! `tokenwarden once`: the daemon's own refreshers ([`crate::refresher`]), run until each
//! client's first attempt has settled (a stored token reused or a new one got, its state saved
//! and its outputs written; or a failure), then stopped. What `once` does to a client is what
//! `run` does at start.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::refresher::{self, Engine};
use crate::state::StateError;
use crate::store::Snapshot;

/// Why `once` could not run at all (a client's own failure is in its [`Snapshot`]).
#[derive(Debug, thiserror::Error)]
pub enum OnceError {
    /// A client named on the command line is not in the config: a usage error.
    #[error("no client named {name:?} in {config} (clients: {known})")]
    UnknownClient {
        name: String,
        config: String,
        known: String,
    },
    /// The state directory could not be opened, or a daemon holds its lock.
    #[error(transparent)]
    State(#[from] StateError),
}

/// `tokenwarden once`: every named client (all when `only` is empty), concurrently up to
/// `max_concurrent_refreshes`; each client's snapshot once it has settled, in name order.
pub async fn once(config: &Config, only: &[String]) -> Result<Vec<(String, Snapshot)>, OnceError> {
    if let Some(name) = only.iter().find(|n| !config.clients.contains_key(*n)) {
        let known: Vec<&str> = config.clients.keys().map(String::as_str).collect();
        return Err(OnceError::UnknownClient {
            name: name.clone(),
            config: config.path.display().to_string(),
            known: if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            },
        });
    }
    let clients = config.clients.values().cloned().collect();
    let mut engine = Engine::open(&config.daemon, clients).await?;
    engine.warn_on_failure = false;
    if config.fleet.is_some() {
        // `once` is not a host of the fleet (docs/fleet.md#setting-it-up).
        engine.outside_fleet = (config.clients.keys())
            .filter(|n| !config.fleet_local.contains(*n))
            .cloned()
            .collect();
    }
    let engine = Arc::new(engine);
    let stop = CancellationToken::new();
    // A chained client needs its upstream's token (RFC 8693 subject): those run too.
    let mut wanted: Vec<&str> = only.iter().map(String::as_str).collect();
    let mut i = 0;
    while let Some(name) = wanted.get(i).copied() {
        if let Some(up) = config.clients.get(name).and_then(|c| c.grant.upstream())
            && !wanted.contains(&up)
        {
            wanted.push(up);
        }
        i += 1;
    }
    let handles: Vec<refresher::Handle> = config
        .clients
        .values()
        .filter(|c| only.is_empty() || wanted.contains(&c.name.as_str()))
        .map(|c| refresher::spawn(c.clone(), engine.clone(), stop.child_token()))
        .collect();
    let mut results = Vec::with_capacity(handles.len());
    for h in handles {
        let mut snapshot = h.slot.snapshot.clone();
        // Only a stopped refresher drops its sender, and none is stopped before this.
        let settled = snapshot.wait_for(|s| s.settled).await.map(|s| s.clone());
        let settled = settled.unwrap_or_else(|_| snapshot.borrow().clone());
        results.push((h.slot.config.name.clone(), settled));
    }
    // The refreshers stop at their next wake-up; `on_change` commands run to their end.
    stop.cancel();
    engine.tracker.close();
    engine.tracker.wait().await;
    Ok(results)
}
