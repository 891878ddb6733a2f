//! Who read which token: `tokenwarden_token_reads_total{client,api}` for every token handed to
//! a caller, and with `daemon.audit = true` an info line for the first read of a client by
//! each (uid, executable) in every [`WINDOW`] (docs/operations.md#auditing-reads).
//!
//! Every read path calls [`read`] once, after the access check and before the token leaves:
//! gRPC `GetToken` (both its fast and its full path, and so `tokenwarden get`), `WatchToken`
//! (each token sent), `RefreshToken`, and the HTTP routes. The line names the client, the
//! API, the uid, the pid and the executable, the token's generation and fingerprint; never the
//! token.
//!
//! The executable is the link `/proc/PID/exe` of the peer's pid as the kernel recorded it at
//! connect time (`SO_PEERCRED`), read only when auditing is on. It is for the log, not for a
//! decision: a process may have exec'd since, and under `ProtectProc=invisible` or for a TCP
//! peer (whose pid the kernel does not tell) it is "unknown". Which (client, uid, executable)
//! was logged when is kept in a table bounded by [`MAX_ENTRIES`]: when it is full of entries
//! younger than [`WINDOW`], the oldest is forgotten (its next read is logged again: more lines,
//! never fewer).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::grpc::access::Caller;
use crate::token::Token;

/// A (client, uid, executable) is logged at most once in this long.
pub const WINDOW: Duration = Duration::from_secs(10 * 60);
/// The most (client, uid, executable) triples remembered at once.
pub const MAX_ENTRIES: usize = 10_000;

/// The API a token was read over (the `api` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// The gRPC socket (`tokenwarden get` included).
    Grpc,
    /// The HTTP listeners (`http_socket`, `http_listen`).
    Http,
}

impl Api {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Grpc => "grpc",
            Api::Http => "http",
        }
    }
}

/// Which (client, uid, executable) was last logged when.
#[derive(Debug, Default)]
struct Seen {
    last: HashMap<(Arc<str>, u32, Option<PathBuf>), Instant>,
}

impl Seen {
    /// Whether a read of `client` by (`uid`, `exe`) at `now` is the first in its window; if
    /// so, remembers it (pure apart from the table; the table stays within `cap`).
    fn first(
        &mut self,
        client: &str,
        uid: u32,
        exe: Option<PathBuf>,
        now: Instant,
        cap: usize,
    ) -> bool {
        let key = (Arc::<str>::from(client), uid, exe);
        if let Some(at) = self.last.get(&key)
            && now.saturating_duration_since(*at) < WINDOW
        {
            return false;
        }
        if self.last.len() >= cap && !self.last.contains_key(&key) {
            self.last
                .retain(|_, at| now.saturating_duration_since(*at) < WINDOW);
            if self.last.len() >= cap
                && let Some(oldest) = self
                    .last
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(k, _)| k.clone())
            {
                self.last.remove(&oldest);
            }
        }
        self.last.insert(key, now);
        true
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static SEEN: Mutex<Option<Seen>> = Mutex::new(None);

/// Turns the audit log on or off (`daemon.audit`, at start and on reload). Turning it off
/// forgets who was seen.
pub fn set_enabled(on: bool) {
    let was = ENABLED.swap(on, Ordering::AcqRel);
    if was && !on {
        *lock() = None;
    }
}

/// Whether the audit log is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

fn lock() -> std::sync::MutexGuard<'static, Option<Seen>> {
    SEEN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The executable of `pid` as `/proc` shows it now; `None` when it cannot be read.
fn exe_of(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// One token of `client` (`generation`) handed to `reader` over `api`: counted, and logged at
/// info when auditing is on and this is the first read by that (uid, executable) in
/// [`WINDOW`].
pub fn read(client: &str, api: Api, reader: &Caller, token: &Token, generation: u64) {
    metrics::counter!("tokenwarden_token_reads_total", "client" => client.to_string(), "api" => api.as_str()).increment(1);
    if !enabled() {
        return;
    }
    let exe = reader.pid.and_then(exe_of);
    let first = lock().get_or_insert_with(Seen::default).first(
        client,
        reader.uid,
        exe.clone(),
        Instant::now(),
        MAX_ENTRIES,
    );
    if !first {
        return;
    }
    let exe = exe
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "unknown".into());
    tracing::info!(
        client,
        api = api.as_str(),
        uid = reader.uid,
        pid = reader.pid,
        exe = exe.as_str(),
        generation,
        token = %token.fingerprint(),
        "token read"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_read_per_window_and_reader() {
        let t0 = Instant::now();
        let exe = || Some(PathBuf::from("/usr/bin/curl"));
        let mut s = Seen::default();
        // (client, uid, exe, seconds after t0) -> logged
        let cases: &[(&str, u32, Option<PathBuf>, u64, bool)] = &[
            ("api", 1000, exe(), 0, true),
            ("api", 1000, exe(), 1, false),
            ("api", 1001, exe(), 2, true),
            ("api", 1000, None, 3, true),
            ("other", 1000, exe(), 4, true),
            ("api", 1000, exe(), 599, false),
            ("api", 1000, exe(), 600, true),
            ("api", 1000, exe(), 601, false),
        ];
        for (client, uid, exe, at, want) in cases {
            let got = s.first(
                client,
                *uid,
                exe.clone(),
                t0 + Duration::from_secs(*at),
                100,
            );
            assert_eq!(got, *want, "{client} {uid} {exe:?} +{at}s");
        }
    }

    #[test]
    fn the_table_stays_bounded_and_forgets_the_oldest() {
        let t0 = Instant::now();
        let mut s = Seen::default();
        for uid in 0..10u32 {
            assert!(s.first("api", uid, None, t0 + Duration::from_secs(uid.into()), 4));
            assert!(s.last.len() <= 4);
        }
        // uid 9 is remembered; uid 0 was forgotten and is logged again.
        assert!(!s.first("api", 9, None, t0 + Duration::from_secs(20), 4));
        assert!(s.first("api", 0, None, t0 + Duration::from_secs(21), 4));
        assert!(s.last.len() <= 4);
    }
}
