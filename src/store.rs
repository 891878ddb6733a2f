//! The current token of every client and its status, announced on a `watch` channel.
//!
//! The refresher of a client is the only writer of its [`Snapshot`]; readers (gRPC, status,
//! systemd readiness, the demo) borrow or watch it. A snapshot's state is computed against the
//! clock when it is read ([`Snapshot::state_at`]), so a token past its expiry is never reported
//! valid, and EXPIRED is reached on time even while a request hangs.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};

use crate::token::Token;

/// A client's state (SPEC §7 `State`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// No token yet; the first attempt is under way.
    Pending,
    /// A token valid now, and the last attempt (if any) succeeded.
    Valid,
    /// A token valid now, but refreshes are failing.
    Stale,
    /// The last token has expired and no new one could be had.
    Expired,
    /// No token at all and the last attempt failed.
    Failed,
}

impl State {
    /// Upper-case name as in the proto and the status table.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "PENDING",
            State::Valid => "VALID",
            State::Stale => "STALE",
            State::Expired => "EXPIRED",
            State::Failed => "FAILED",
        }
    }
}

/// What is known about one client at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The newest token (possibly expired: check with [`Snapshot::valid_token`]).
    pub token: Option<Arc<Token>>,
    /// Rises by one with each new token.
    pub generation: u64,
    /// When the next request is planned.
    pub next_refresh_at: Option<SystemTime>,
    /// The last error, one line, no secrets; `None` after a success.
    pub last_error: Option<String>,
    /// Failed attempts since the last success.
    pub consecutive_failures: u32,
    /// When the last token was obtained (or reused at start).
    pub last_refresh_at: Option<SystemTime>,
    /// Whether at least one attempt has finished (or a stored token was reused), and a token it
    /// brought has been written to the outputs. READY=1 waits for this on every client.
    pub settled: bool,
}

impl Snapshot {
    /// The state at `now`.
    pub fn state_at(&self, now: SystemTime) -> State {
        match &self.token {
            Some(t) if t.is_valid_at(now) => {
                if self.consecutive_failures > 0 {
                    State::Stale
                } else {
                    State::Valid
                }
            }
            Some(_) => State::Expired,
            None if self.consecutive_failures > 0 => State::Failed,
            None => State::Pending,
        }
    }

    /// The token if it is valid at `now`.
    pub fn valid_token(&self, now: SystemTime) -> Option<&Arc<Token>> {
        self.token.as_ref().filter(|t| t.is_valid_at(now))
    }

    /// Whether the token stays valid for at least `d` after `now`.
    pub fn valid_for(&self, now: SystemTime, d: Duration) -> bool {
        self.token
            .as_ref()
            .is_some_and(|t| t.remaining(now).is_some_and(|left| left >= d) && t.is_valid_at(now))
    }
}

/// Why a refresh is asked for outside the schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// gRPC `RefreshToken`, `tokenwarden refresh`.
    Demand,
    /// gRPC `GetToken` with `min_valid_for`, `get --min-valid`.
    MinValid(Duration),
    /// SIGUSR1: every client.
    RefreshAll,
    /// `rotate_cron`.
    Rotation,
}

/// A message to a client's refresher.
#[derive(Debug)]
pub enum Command {
    /// Get a new token (or, for `MinValid`, one valid long enough), then answer with it.
    Refresh {
        reason: Reason,
        reply: Option<oneshot::Sender<Result<Arc<Token>, String>>>,
    },
}

/// The handle on one client: its snapshot and its refresher's mailbox.
#[derive(Clone, Debug)]
pub struct ClientSlot {
    pub snapshot: watch::Receiver<Snapshot>,
    pub commands: mpsc::Sender<Command>,
    /// Who may read it over gRPC.
    pub allow_uids: Arc<Vec<u32>>,
    pub allow_gids: Arc<Vec<u32>>,
    /// `refresh_margin`: `/readyz` wants a token valid at least this long.
    pub ready_margin: Duration,
}

/// Every client's slot, by name.
#[derive(Debug, Default)]
pub struct Store {
    clients: RwLock<BTreeMap<String, ClientSlot>>,
}

impl Store {
    /// Adds or replaces a client.
    pub fn insert(&self, name: &str, slot: ClientSlot) {
        self.write().insert(name.to_string(), slot);
    }

    /// Removes a client: its watchers see the channel close once the refresher ends.
    pub fn remove(&self, name: &str) -> Option<ClientSlot> {
        self.write().remove(name)
    }

    /// One client's slot.
    pub fn get(&self, name: &str) -> Option<ClientSlot> {
        self.read().get(name).cloned()
    }

    /// Runs `f` on one client's slot under the read lock, without copying the slot (the
    /// serving path's lookup).
    pub fn with_slot<R>(&self, name: &str, f: impl FnOnce(&ClientSlot) -> R) -> Option<R> {
        self.read().get(name).map(f)
    }

    /// Every client's name and snapshot, in name order.
    pub fn snapshots(&self) -> Vec<(String, Snapshot)> {
        self.read()
            .iter()
            .map(|(k, v)| (k.clone(), v.snapshot.borrow().clone()))
            .collect()
    }

    /// Every slot, in name order.
    pub fn slots(&self) -> Vec<(String, ClientSlot)> {
        self.read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Client names.
    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// (valid now, total): for `STATUS=` and readiness.
    pub fn counts(&self, now: SystemTime) -> (usize, usize) {
        let map = self.read();
        let valid = map
            .values()
            .filter(|s| s.snapshot.borrow().valid_token(now).is_some())
            .count();
        (valid, map.len())
    }

    /// Whether every client has a token or has finished its first attempt.
    pub fn all_settled(&self) -> bool {
        self.read().values().all(|s| s.snapshot.borrow().settled)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, ClientSlot>> {
        match self.clients.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, ClientSlot>> {
        match self.clients.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn snap(token_until: Option<u64>, failures: u32) -> Snapshot {
        Snapshot {
            token: token_until.map(|e| {
                Arc::new(Token {
                    access_token: Secret::new("t"),
                    token_type: "Bearer".into(),
                    issued_at: at(0),
                    expires_at: at(e),
                    scope: vec![],
                })
            }),
            consecutive_failures: failures,
            ..Snapshot::default()
        }
    }

    #[test]
    fn state_table() {
        let cases = [
            (None, 0, 50, State::Pending),
            (None, 2, 50, State::Failed),
            (Some(100), 0, 50, State::Valid),
            (Some(100), 1, 50, State::Stale),
            (Some(100), 0, 100, State::Expired),
            (Some(100), 3, 150, State::Expired),
        ];
        for (until, failures, now, want) in cases {
            assert_eq!(
                snap(until, failures).state_at(at(now)),
                want,
                "{until:?} {failures} {now}"
            );
        }
        assert!(snap(Some(100), 0).valid_for(at(50), Duration::from_secs(50)));
        assert!(!snap(Some(100), 0).valid_for(at(50), Duration::from_secs(51)));
        assert!(snap(Some(100), 0).valid_token(at(100)).is_none());
    }
}
