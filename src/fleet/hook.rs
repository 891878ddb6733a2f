//! The refresher's side of fleet mode (docs/fleet.md), kept apart from the refresher's own
//! code: what a shared client does as holder, follower or local, a follower publishing what
//! the holder committed exactly as if it had fetched it, and a holder's commit to etcd before
//! anything is published. A child module of `refresher`, so it works on the refresher's state.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::time::Instant;

use super::{Answer, Refresher, Trigger};
use crate::fleet::{Record, Role, Seat, View};
use crate::schedule;
use crate::state::StoredState;
use crate::store::RefreshError;
use crate::token::{Token, rfc3339};

/// Resolves when the seat's view changes; never without a seat.
pub(super) async fn changed(seat: &mut Option<Seat>) {
    match seat {
        Some(s) => {
            if s.view.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

impl Refresher {
    /// At start, waits (at most `lease`) for the fleet's first answer: a host must not ask the
    /// provider before it knows whether another host holds the client.
    pub(super) async fn fleet_first_view(&mut self) {
        let Some(seat) = &self.seat else {
            return;
        };
        let (mut health, lease) = (seat.health_watch(), seat.lease());
        let _ = tokio::time::timeout(
            lease,
            health.wait_for(|h| *h != crate::fleet::Health::Connecting),
        )
        .await;
    }

    /// The seat's view changed: show the role, publish a newer shared token, push a state
    /// that could not be committed, and plan the next wake-up for the role.
    pub(super) async fn fleet_view(&mut self) {
        let Some(seat) = &mut self.seat else {
            return;
        };
        let view = seat.view.borrow_and_update().clone();
        let role = view.role.as_str();
        let role_changed = self.snapshot.send_if_modified(|s| {
            let etcd_changed = s.fleet_etcd.replace(view.etcd) != Some(view.etcd);
            s.fleet_role.replace(role) != Some(role) || etcd_changed
        });
        let mut adopted = false;
        if let Some(rec) = view.record.clone()
            && self.is_newer(&rec)
        {
            self.adopt(&rec).await;
            adopted = true;
        }
        if view.role == Role::Holder {
            self.push_pending(&view).await;
        }
        if role_changed || adopted {
            self.fleet_plan(&view);
        }
    }

    /// Whether the shared `rec` is a token this host should publish instead of its own.
    fn is_newer(&self, rec: &Record) -> bool {
        let now = self.now();
        if !rec.token.is_valid_at(now) {
            return false;
        }
        match &self.snapshot.borrow().token {
            None => true,
            Some(cur) => {
                cur.access_token.expose() != rec.token.access_token.expose()
                    && (rec.token.expires_at >= cur.expires_at || !cur.is_valid_at(now))
            }
        }
    }

    /// Publishes the holder's token as this host's own: state directory, store, outputs,
    /// `on_change` (the same steps as a token this host fetched).
    async fn adopt(&mut self, rec: &Record) {
        if let Some(b) = super::bootstrap_fingerprint(&self.config) {
            // The shared chain has started: the configured bootstrap was spent by its holder.
            self.spent_bootstrap = Some(b);
        }
        let state = StoredState {
            fingerprint: self.config.identity_fingerprint(),
            token: Some(rec.token.clone()),
            next_refresh_at: rec.next_refresh_at,
            refresh_token: rec.refresh_token.clone(),
            generation: rec.generation,
            spent_bootstrap: self.spent_bootstrap.clone(),
            // Every host presents the same certificate for a shared client (docs/fleet.md).
            bound_to: self.config.token_binding().map(String::from),
        };
        let (store, name) = (self.engine.state.clone(), self.config.name.clone());
        match tokio::task::spawn_blocking(move || store.save(&name, &state)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(client = self.name(), "cannot save state: {e}"),
            Err(e) => tracing::warn!(client = self.name(), "state writer failed: {e}"),
        }
        self.refresh_token = rec.refresh_token.clone();
        self.backoff.reset();
        self.repeated.clear();
        let token = Arc::new(rec.token.clone());
        tracing::info!(
            client = self.name(),
            token = %token.fingerprint(),
            generation = rec.generation,
            holder = rec.host.as_str(),
            expires_at = %rfc3339(token.expires_at),
            "new token from the fleet"
        );
        self.publish_snapshot(token.clone(), rec.generation, false);
        self.write_outputs(&token, true).await;
        self.settle();
    }

    /// The next wake-up for the client's role.
    fn fleet_plan(&mut self, view: &View) {
        let token = self.snapshot.borrow().token.clone();
        let now = self.now();
        match (view.role, token) {
            // A follower never asks the provider: it waits for the holder's commits.
            (Role::Follower, token) => {
                self.next_at = None;
                if token.is_none_or(|t| !t.is_valid_at(now)) {
                    let holder = view.holder.as_deref().unwrap_or("another host");
                    self.snapshot.send_modify(|s| {
                        s.last_error = Some(format!(
                            "waiting for {holder}, which holds this client in the fleet, to publish a token"
                        ));
                        s.settled = true;
                    });
                }
            }
            (Role::Holder, Some(t)) => {
                let planned = view
                    .record
                    .as_ref()
                    .filter(|r| r.token.access_token.expose() == t.access_token.expose())
                    .and_then(|r| r.next_refresh_at);
                let at = schedule::resume_at(&self.config.timing, &t, planned, now, super::unit());
                self.plan(at);
            }
            // Local: the token is refreshed here only once it reaches its margin.
            (Role::Local, Some(t)) => self.plan(local_at(&self.config.timing, &t, now)),
            (_, None) => {
                self.next_at = Some(Instant::now());
                self.next_trigger = Trigger::Startup;
            }
        }
    }

    /// Before a token request: `Some` when the fleet says not to ask the provider (the answer
    /// to give instead), `None` to go ahead (then as holder, or locally with etcd unreachable).
    pub(super) async fn fleet_gate(&mut self, trigger: Trigger) -> Option<Answer> {
        let seat = self.seat.as_ref()?;
        let mut unread = false;
        if seat.view.borrow().role == Role::Holder
            && let Err(e) = seat.read_state().await
        {
            tracing::debug!(client = self.name(), "fleet: state not read: {e}");
            unread = true;
        }
        let mut view = self.seat.as_ref()?.view.borrow().clone();
        if unread && view.role == Role::Holder {
            // etcd did not confirm that this host still holds the client: it may have been
            // cut off for longer than `lease`, and another host may be refreshing from the
            // shared refresh token. Not presented here: this attempt is a local one.
            view.role = Role::Local;
        }
        let now = self.now();
        let current = self.snapshot.borrow().valid_token(now).cloned();
        match view.role {
            Role::Follower => {
                self.fleet_plan(&view);
                Some(match current {
                    Some(t) => Ok(t),
                    None => Err(RefreshError::Failed(format!(
                        "this client is held by {} in the fleet; no token from it yet",
                        view.holder.as_deref().unwrap_or("another host")
                    ))),
                })
            }
            Role::Holder => {
                if let Some(rec) = view.record.clone() {
                    if self.is_newer(&rec) {
                        self.adopt(&rec).await;
                    }
                    // The shared token is this host's and not due yet: a start, a retry or a
                    // planned wake-up asks nothing (a holder that just took the client over
                    // refreshes at the planned time, not at once).
                    let scheduled = matches!(
                        trigger,
                        Trigger::Startup | Trigger::Schedule | Trigger::Retry | Trigger::Reload
                    );
                    let current = self.snapshot.borrow().token.clone();
                    let same = current.as_ref().is_some_and(|t| {
                        t.access_token.expose() == rec.token.access_token.expose()
                            && t.is_valid_at(now)
                    });
                    let due = rec.next_refresh_at.is_none_or(|at| at <= now);
                    if scheduled && same && !due {
                        self.fleet_plan(&view);
                        return current.map(Ok);
                    }
                    // The chain continues from what is in etcd, never from an older copy.
                    self.refresh_token = rec.refresh_token.clone();
                    if let Some(b) = super::bootstrap_fingerprint(&self.config) {
                        self.spent_bootstrap = Some(b);
                    }
                }
                if let Some(seat) = &self.seat
                    && !seat.try_busy()
                {
                    // The claim is being handed to another host (one joined): that host asks.
                    // Looked at again shortly in case the hand-over does not happen.
                    self.plan(now + std::time::Duration::from_secs(1));
                    let current = self.snapshot.borrow().valid_token(now).cloned();
                    return Some(current.map(Ok).unwrap_or_else(|| {
                        Err(RefreshError::Failed(
                            "this client is being handed to another host of the fleet".into(),
                        ))
                    }));
                }
                self.fleet_read = view.revision;
                None
            }
            Role::Local => {
                let timing = &self.config.timing;
                let early = current.filter(|t| {
                    let margin = schedule::effective_margin(timing, t.lifetime());
                    t.remaining(now).is_some_and(|left| left > margin)
                });
                if let Some(t) = early
                    && !matches!(trigger, Trigger::Demand)
                {
                    self.plan(local_at(&self.config.timing, &t, now));
                    return Some(Ok(t));
                }
                None
            }
        }
        .or_else(|| self.local_fallback(&view))
    }

    /// etcd is unreachable and the token needs refreshing: refresh here, except a client whose
    /// only credential is a rotating refresh token, which waits for etcd (two hosts using one
    /// refresh token would fork its chain).
    fn local_fallback(&mut self, view: &View) -> Option<Answer> {
        if view.role != Role::Local {
            return None;
        }
        if !self.config.grant.is_primary() {
            return Some(self.failed_and_log(
                crate::oauth::ErrorClass::Retryable { retry_after: None },
                "etcd is unreachable and this client's only credential is a refresh token shared by the fleet: waiting for etcd".to_string(),
                true,
            ));
        }
        // A fresh chain: the shared refresh token may be in use by the holder.
        self.refresh_token = None;
        self.fleet_read = view.revision;
        tracing::info!(
            client = self.name(),
            "etcd is unreachable: refreshing this fleet client locally"
        );
        crate::metrics::fleet_local_refresh(self.name());
        None
    }

    /// After the provider answered: a holder commits the new state to etcd before anything is
    /// published. If that fails (or etcd is unreachable), the state is kept in the state
    /// directory as usual, published here, and pushed to etcd later if nobody wrote since.
    pub(super) async fn fleet_commit(&mut self, state: &StoredState) {
        let Some(seat) = &self.seat else {
            return;
        };
        let Some(token) = state.token.clone() else {
            return;
        };
        let role = seat.view.borrow().role;
        let record = Record {
            next_refresh_at: Some(self.next_refresh_at(&token, Trigger::Schedule)),
            token,
            refresh_token: state.refresh_token.clone(),
            generation: state.generation,
            host: seat.host().to_string(),
        };
        let result = match role {
            Role::Holder => seat.commit(self.fleet_read, &record).await,
            _ => Err(crate::fleet::CommitError::Unreachable(
                "etcd is unreachable".into(),
            )),
        };
        seat.idle();
        match result {
            Ok(rev) => {
                self.fleet_read = rev;
                self.fleet_pending = None;
            }
            Err(e) => {
                if role == Role::Holder {
                    tracing::warn!(
                        client = self.name(),
                        "the new token could not be committed to etcd ({e}); it is kept in the state directory and committed once etcd allows"
                    );
                }
                crate::metrics::fleet_uncommitted(self.name(), "kept");
                self.fleet_pending = Some(self.fleet_read);
            }
        }
    }

    /// A token request ended (or never started): the holder's claim may move again.
    pub(super) fn fleet_idle(&self) {
        if let Some(seat) = &self.seat {
            seat.idle();
        }
    }

    /// Commits a state kept locally when etcd would not take it, if nobody wrote since.
    async fn push_pending(&mut self, view: &View) {
        let Some(read) = self.fleet_pending else {
            return;
        };
        if view.revision != read {
            self.fleet_pending = None;
            crate::metrics::fleet_uncommitted(self.name(), "superseded");
            tracing::info!(
                client = self.name(),
                "another host's newer state replaced the one kept here"
            );
            return;
        }
        let snap = self.snapshot.borrow().clone();
        let Some(token) = snap.token.filter(|t| t.is_valid_at(self.now())) else {
            return;
        };
        let Some(seat) = &self.seat else {
            return;
        };
        let record = Record {
            next_refresh_at: snap.next_refresh_at,
            token: Token::clone(&token),
            refresh_token: self.refresh_token.clone(),
            generation: snap.generation,
            host: seat.host().to_string(),
        };
        if let Ok(rev) = seat.commit(read, &record).await {
            self.fleet_read = rev;
            self.fleet_pending = None;
            crate::metrics::fleet_uncommitted(self.name(), "committed");
            tracing::info!(
                client = self.name(),
                "the state kept here is committed to etcd"
            );
        }
    }
}

/// When a client whose etcd is unreachable refreshes locally: at its margin before expiry.
fn local_at(timing: &crate::config::Timing, t: &Token, now: SystemTime) -> SystemTime {
    let margin = schedule::effective_margin(timing, t.lifetime());
    t.expires_at.checked_sub(margin).unwrap_or(now).max(now)
}
