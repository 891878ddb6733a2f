//! The current token of every client and its status, announced on a `watch` channel.
//!
//! The refresher of a client is the only writer of its [`Snapshot`]; readers (gRPC, status,
//! systemd readiness, the demo) borrow or watch it. A snapshot's state is computed against the
//! clock when it is read ([`Snapshot::state_at`]), so a token past its expiry is never reported
//! valid, and EXPIRED is reached on time even while a request hangs.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, oneshot, watch};

use crate::config::{ClientChange, ClientConfig};
use crate::token::Token;

/// A client's state (`State` in docs/grpc.md#the-service).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// No token yet; the first attempt is under way.
    Pending,
    /// A token valid now, and the last attempt (if any) succeeded.
    Valid,
    /// A token valid now, but what consumers read is behind: refreshes are failing, an output
    /// could not be written, or the state could not be saved.
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
    /// The last failed attempt's error (a token request or a state save), one line, no
    /// secrets; `None` after a success.
    pub last_error: Option<String>,
    /// Why some outputs do not hold the current token (one line naming each path); `None` once
    /// every output holds it. Retried with backoff until it clears.
    pub output_error: Option<String>,
    /// The last state save failed: the newest token is held back (and a restart would not
    /// find it) until a save succeeds. Its message is in `last_error`.
    pub save_failing: bool,
    /// Failed attempts since the last success.
    pub consecutive_failures: u32,
    /// When the last token was obtained (or reused at start).
    pub last_refresh_at: Option<SystemTime>,
    /// The token was taken from the state directory at start, not asked for (`once` says so).
    pub reused: bool,
    /// Whether at least one attempt has finished (or a stored token was reused), and a token it
    /// brought has been written to the outputs. READY=1 waits for this on every client.
    pub settled: bool,
    /// In fleet mode, the client's role on this host: `holder`, `follower` or `local`
    /// (docs/fleet.md); `None` for a client that is not shared.
    pub fleet_role: Option<&'static str>,
    /// In fleet mode, how this host stands with etcd (`up`, `unreachable`, …).
    pub fleet_etcd: Option<&'static str>,
}

impl Snapshot {
    /// The state at `now`.
    pub fn state_at(&self, now: SystemTime) -> State {
        match &self.token {
            Some(t) if t.is_valid_at(now) => {
                if self.consecutive_failures > 0 || self.degraded() {
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

    /// Whether what consumers read lags behind the daemon: an output not written, or state
    /// not saved.
    pub fn degraded(&self) -> bool {
        self.output_error.is_some() || self.save_failing
    }

    /// Everything that is wrong now, one line: the last failed attempt, then the outputs that
    /// could not be written. `None` when all is well. This is the status's "last error".
    pub fn problems(&self) -> Option<String> {
        match (&self.last_error, &self.output_error) {
            (Some(e), Some(o)) => Some(format!("{e}; {o}")),
            (Some(e), None) => Some(e.clone()),
            (None, Some(o)) => Some(o.clone()),
            (None, None) => None,
        }
    }

    /// Why this client is not ready at `now` (the `/readyz` check): no token valid for at least
    /// `margin`, an output not written, or state not saved. `None`: ready.
    pub fn not_ready_reason(&self, now: SystemTime, margin: Duration) -> Option<&'static str> {
        if self.valid_token(now).is_none() {
            Some("no valid token")
        } else if !self.valid_for(now, margin) {
            Some("token expires within refresh_margin")
        } else if self.save_failing {
            Some("state not saved")
        } else if self.output_error.is_some() {
            Some("output not written")
        } else {
            None
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
    /// gRPC `RefreshToken`, `tokenwarden refresh`: within `min_interval` of the last token,
    /// answered with that token.
    Demand,
    /// `tokenwarden refresh` by root or the daemon's user (who may send SIGUSR1 anyway): a new
    /// token even within `min_interval`.
    Forced,
    /// gRPC `GetToken` with `min_valid_for`, `get --min-valid`.
    MinValid(Duration),
    /// SIGUSR1: every client.
    RefreshAll,
    /// `rotate_cron`.
    Rotation,
}

/// A refresher's answer to a [`Command`]: the token, or why there is none.
pub type Answer = Result<Arc<Token>, RefreshError>;

/// Why a refresher answered a demand without a token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RefreshError {
    /// The token request failed; the message is the client's `last_error` (status shows it).
    #[error("{0}")]
    Failed(String),
    /// A new token was had but its state could not be saved: it is held back until a save
    /// succeeds, so its refresh token is never known to memory alone.
    #[error("the new token is held back: its state could not be saved")]
    NotSaved,
    /// The refresher stopped (the client was removed or replaced by a reload, or the daemon
    /// is stopping) before it answered.
    #[error("the client was removed or replaced by a reload")]
    Stopped,
}

/// A message to a client's refresher.
#[derive(Debug)]
pub enum Command {
    /// Get a new token (or, for `MinValid`, one valid long enough), then answer with it.
    Refresh {
        reason: Reason,
        reply: Option<oneshot::Sender<Answer>>,
    },
}

/// A change of a running client's config (from a reload), as [`crate::config::diff`] judged
/// it. Never [`ClientChange::Replace`]: a new identity gets a new refresher.
#[derive(Debug)]
pub struct Reconfigure {
    pub config: Arc<ClientConfig>,
    pub change: ClientChange,
}

impl Reconfigure {
    /// One change that does what `self` then `newer` would: the newer config, and the stronger
    /// action (a new token also writes every output).
    fn then(self, newer: Reconfigure) -> Reconfigure {
        Reconfigure {
            config: newer.config,
            change: self.change.max(newer.change),
        }
    }
}

/// What [`Mailbox::post`] did with a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Posted {
    /// Queued: the refresher will act on it.
    Queued,
    /// Dropped: it wants no answer and a command already queued will make the same request.
    AlreadyQueued,
}

/// The refresher has stopped (its client was removed, or the daemon is stopping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Closed;

/// A refresher's mailbox: demands from gRPC, signals and cron, and config changes from reloads,
/// behind one wake-up.
///
/// It costs a few dozen bytes while empty (a client with nothing to say costs nothing more),
/// where a pair of bounded channels cost about 2 KiB per client. It needs no bound: a command
/// that wants no answer is dropped when another is already queued (they would make the same
/// request), the ones that want an answer come from callers each waiting on one, and
/// reconfigurations merge into one.
#[derive(Debug, Default)]
pub struct Mailbox {
    queue: Mutex<Queue>,
    wake: Notify,
}

#[derive(Debug, Default)]
struct Queue {
    commands: VecDeque<Command>,
    reconfigure: Option<Reconfigure>,
    closed: bool,
}

impl Mailbox {
    /// Queues a command for the refresher.
    pub fn post(&self, command: Command) -> Result<Posted, Closed> {
        let mut q = self.lock();
        if q.closed {
            return Err(Closed);
        }
        let Command::Refresh { reply, .. } = &command;
        if reply.is_none() && !q.commands.is_empty() {
            return Ok(Posted::AlreadyQueued);
        }
        q.commands.push_back(command);
        drop(q);
        self.wake.notify_one();
        Ok(Posted::Queued)
    }

    /// Hands the refresher a new config, merged with one not yet applied.
    pub fn reconfigure(&self, change: Reconfigure) -> Result<(), Closed> {
        let mut q = self.lock();
        if q.closed {
            return Err(Closed);
        }
        q.reconfigure = Some(match q.reconfigure.take() {
            Some(older) => older.then(change),
            None => change,
        });
        drop(q);
        self.wake.notify_one();
        Ok(())
    }

    /// Waits until something is in the mailbox (the refresher's side).
    pub async fn wait(&self) {
        loop {
            {
                let q = self.lock();
                if q.reconfigure.is_some() || !q.commands.is_empty() {
                    return;
                }
            }
            // A post between the check and here leaves a permit: this returns at once.
            self.wake.notified().await;
        }
    }

    /// The pending config change, if any (the refresher's side).
    pub fn take_reconfigure(&self) -> Option<Reconfigure> {
        self.lock().reconfigure.take()
    }

    /// The oldest command, if any (the refresher's side).
    pub fn next_command(&self) -> Option<Command> {
        self.lock().commands.pop_front()
    }

    /// Refuses everything from now on and drops what is queued: waiting callers see their
    /// reply channel close. The refresher calls it when it stops.
    pub fn close(&self) {
        let mut q = self.lock();
        q.closed = true;
        q.commands.clear();
        q.reconfigure = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The handle on one client: its snapshot and its refresher's mailbox.
#[derive(Clone, Debug)]
pub struct ClientSlot {
    pub snapshot: watch::Receiver<Snapshot>,
    pub mailbox: Arc<Mailbox>,
    /// The client's config (the refresher's own): who may read it over gRPC
    /// (`allow_uids`, `allow_gids`), how long `/readyz` wants its token valid
    /// (`timing.refresh_margin`).
    pub config: Arc<ClientConfig>,
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

    /// How many clients hold a valid token whose outputs or state lag behind (see
    /// [`Snapshot::degraded`]).
    pub fn degraded(&self, now: SystemTime) -> usize {
        self.read()
            .values()
            .filter(|s| {
                let snap = s.snapshot.borrow();
                snap.degraded() && snap.valid_token(now).is_some()
            })
            .count()
    }

    /// Whether every client has a token or has finished its first attempt.
    pub fn all_settled(&self) -> bool {
        self.read().values().all(|s| s.snapshot.borrow().settled)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, ClientSlot>> {
        self.clients.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, ClientSlot>> {
        self.clients.write().unwrap_or_else(PoisonError::into_inner)
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

    /// A client `a` asking for `scope`, read from a config like any other.
    fn client(scope: &str) -> Arc<ClientConfig> {
        let text = format!(
            "[clients.a]\ntoken_url = \"https://idp.example/token\"\nclient_id = \"a\"\n\
             client_secret = \"s\"\nscope = \"{scope}\"\n"
        );
        let config = crate::config::load_str(&text, std::path::Path::new("/etc/t.toml")).unwrap();
        config.clients["a"].clone()
    }

    #[allow(clippy::type_complexity)]
    fn refresh(reason: Reason, reply: bool) -> (Command, Option<oneshot::Receiver<Answer>>) {
        let (tx, rx) = oneshot::channel();
        let cmd = Command::Refresh {
            reason,
            reply: reply.then_some(tx),
        };
        (cmd, reply.then_some(rx))
    }

    #[test]
    fn mailbox_coalesces_answerless_commands_and_keeps_callers() {
        let mb = Mailbox::default();
        let (c, _) = refresh(Reason::RefreshAll, false);
        assert_eq!(mb.post(c), Ok(Posted::Queued));
        // SIGUSR1 twice, cron on top: one request is enough.
        let (c, _) = refresh(Reason::RefreshAll, false);
        assert_eq!(mb.post(c), Ok(Posted::AlreadyQueued));
        let (c, _) = refresh(Reason::Rotation, false);
        assert_eq!(mb.post(c), Ok(Posted::AlreadyQueued));
        // A caller waiting for an answer is always queued.
        let (c, _rx) = refresh(Reason::Demand, true);
        assert_eq!(mb.post(c), Ok(Posted::Queued));
        assert!(matches!(
            mb.next_command(),
            Some(Command::Refresh {
                reason: Reason::RefreshAll,
                reply: None
            })
        ));
        assert!(matches!(
            mb.next_command(),
            Some(Command::Refresh {
                reason: Reason::Demand,
                reply: Some(_)
            })
        ));
        assert!(mb.next_command().is_none());
        // Empty again: an answerless command is queued once more.
        let (c, _) = refresh(Reason::Rotation, false);
        assert_eq!(mb.post(c), Ok(Posted::Queued));
    }

    #[test]
    fn mailbox_merges_reconfigurations() {
        let mb = Mailbox::default();
        let first = client("one");
        let second = client("two");
        let change = |config: &Arc<ClientConfig>, change| Reconfigure {
            config: config.clone(),
            change,
        };
        mb.reconfigure(change(&first, ClientChange::Renew)).unwrap();
        mb.reconfigure(change(&second, ClientChange::Outputs))
            .unwrap();
        let merged = mb.take_reconfigure().unwrap();
        assert!(
            Arc::ptr_eq(&merged.config, &second),
            "the newer config wins"
        );
        assert_eq!(
            merged.change,
            ClientChange::Renew,
            "the stronger action is kept"
        );
        assert!(mb.take_reconfigure().is_none());
    }

    #[tokio::test]
    async fn mailbox_close_answers_waiting_callers_and_refuses_more() {
        let mb = Mailbox::default();
        let (c, rx) = refresh(Reason::Demand, true);
        mb.post(c).unwrap();
        mb.close();
        assert!(
            rx.unwrap().await.is_err(),
            "the waiting caller sees the reply close"
        );
        let (c, _) = refresh(Reason::Demand, true);
        assert_eq!(mb.post(c), Err(Closed));
        assert_eq!(
            mb.reconfigure(Reconfigure {
                config: client("one"),
                change: ClientChange::Settings,
            }),
            Err(Closed)
        );
    }

    #[tokio::test]
    async fn mailbox_wait_wakes_on_a_post_made_before_or_during_the_wait() {
        let mb = Arc::new(Mailbox::default());
        // Posted before anyone waits: the wait returns at once.
        let (c, _) = refresh(Reason::Demand, false);
        mb.post(c).unwrap();
        tokio::time::timeout(Duration::from_secs(1), mb.wait())
            .await
            .unwrap();
        assert!(mb.next_command().is_some());
        // Posted while waiting.
        let waiter = tokio::spawn({
            let mb = mb.clone();
            async move { mb.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let (c, _) = refresh(Reason::Demand, false);
        mb.post(c).unwrap();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
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

    #[test]
    fn a_failing_output_or_state_save_is_stale_and_not_ready() {
        let margin = Duration::from_secs(10);
        let failing_output = |s: Snapshot| Snapshot {
            output_error: Some("cannot write /o/t: not a directory".into()),
            ..s
        };
        let failing_save = |s: Snapshot| Snapshot {
            save_failing: true,
            last_error: Some("cannot save state: no space".into()),
            consecutive_failures: 1,
            ..s
        };
        // (snapshot, now, state, not ready because)
        let cases = [
            (snap(Some(100), 0), 50, State::Valid, None),
            (
                snap(Some(100), 0),
                95,
                State::Valid,
                Some("token expires within refresh_margin"),
            ),
            (
                failing_output(snap(Some(100), 0)),
                50,
                State::Stale,
                Some("output not written"),
            ),
            (
                failing_save(snap(Some(100), 0)),
                50,
                State::Stale,
                Some("state not saved"),
            ),
            // A refresh failing with a token still good for long enough is not "not ready".
            (snap(Some(100), 2), 50, State::Stale, None),
            (
                failing_output(snap(Some(100), 0)),
                100,
                State::Expired,
                Some("no valid token"),
            ),
            (
                failing_save(snap(None, 0)),
                50,
                State::Failed,
                Some("no valid token"),
            ),
        ];
        for (s, now, state, reason) in cases {
            assert_eq!(s.state_at(at(now)), state, "{s:?} at {now}");
            assert_eq!(
                s.not_ready_reason(at(now), margin),
                reason,
                "{s:?} at {now}"
            );
        }
        assert_eq!(snap(Some(100), 0).problems(), None);
        let both = Snapshot {
            last_error: Some("invalid_client".into()),
            ..failing_output(snap(Some(100), 1))
        };
        assert_eq!(
            both.problems().as_deref(),
            Some("invalid_client; cannot write /o/t: not a directory")
        );
        assert_eq!(
            failing_output(snap(Some(100), 0)).problems().as_deref(),
            Some("cannot write /o/t: not a directory")
        );
    }
}
