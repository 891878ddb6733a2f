//! Talking to systemd (docs/operations.md#systemd): `READY=1` once every client has a token or has
//! failed its first attempt, `STATUS=` with "N/M clients valid" (or the reload error),
//! `RELOADING=1` /
//! `READY=1` around reloads, `STOPPING=1`, and `WATCHDOG=1` at half of `WATCHDOG_USEC`.
//! Everything is a no-op without `$NOTIFY_SOCKET`.
//!
//! The daemon never waits on the notify socket: messages go to a bounded outbox that a
//! dedicated thread writes in order with non-blocking sends, retrying while the socket's receive
//! queue is full. A `STATUS=`-only message replaces one still waiting, a `WATCHDOG=1` joins one
//! still waiting; `READY=1`, `RELOADING=1` and `STOPPING=1` are kept until sent.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Messages waiting at most; past it the oldest (a status line first) is dropped.
const OUTBOX_CAP: usize = 64;
/// How long the writer waits before trying a full socket again.
const RETRY_EVERY: Duration = Duration::from_millis(20);

/// What a message is, for coalescing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Only `STATUS=`: the latest one is enough.
    Status,
    /// `WATCHDOG=1`: one waiting is enough.
    Watchdog,
    /// `READY=1`, `RELOADING=1`, `STOPPING=1`: never coalesced.
    State,
}

#[derive(Debug, Default)]
struct Queue {
    msgs: VecDeque<(Kind, String)>,
    /// The writer holds a message it has not sent yet.
    busy: bool,
}

impl Queue {
    fn push(&mut self, kind: Kind, text: String) {
        let last = self.msgs.back().map(|(k, _)| *k);
        match (kind, last) {
            (Kind::Status, Some(Kind::Status)) => {
                self.msgs.pop_back();
            }
            (Kind::Watchdog, _) if self.msgs.iter().any(|(k, _)| *k == Kind::Watchdog) => return,
            _ => {}
        }
        if self.msgs.len() >= OUTBOX_CAP {
            let drop_at = self.msgs.iter().position(|(k, _)| *k != Kind::State);
            self.msgs.remove(drop_at.unwrap_or(0));
        }
        self.msgs.push_back((kind, text));
    }
}

#[derive(Debug, Default)]
struct Outbox {
    queue: Mutex<Queue>,
    changed: Condvar,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The writer thread: sends each message in order, retrying while the socket is full.
    fn write_all(&self, path: &OsString) {
        loop {
            let (kind, text) = {
                let mut q = self.lock();
                q.busy = false;
                self.changed.notify_all();
                loop {
                    if let Some(m) = q.msgs.pop_front() {
                        q.busy = true;
                        break m;
                    }
                    q = self.changed.wait(q).unwrap_or_else(PoisonError::into_inner);
                }
            };
            loop {
                match send_now(path, &text) {
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        // A newer status line makes this one moot.
                        let q = self.lock();
                        if kind == Kind::Status && q.msgs.iter().any(|(k, _)| *k == Kind::Status) {
                            break;
                        }
                        drop(q);
                        std::thread::sleep(RETRY_EVERY);
                    }
                    Err(e) => {
                        tracing::debug!("sd_notify failed: {e}");
                        break;
                    }
                    Ok(()) => break,
                }
            }
        }
    }
}

/// One non-blocking datagram to `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace).
fn send_now(path: &OsString, text: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    match path.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            sock.connect_addr(&std::os::unix::net::SocketAddr::from_abstract_name(name)?)?
        }
        None => sock.connect(path)?,
    }
    let n = sock.send(text.as_bytes())?;
    if n != text.len() {
        return Err(std::io::Error::new(
            ErrorKind::WriteZero,
            "incomplete write",
        ));
    }
    Ok(())
}

/// Sends notifications when systemd asked for them.
#[derive(Debug, Clone)]
pub struct Notifier {
    outbox: Option<Arc<Outbox>>,
}

impl Notifier {
    /// Enabled when `$NOTIFY_SOCKET` is set (and its writer thread could start).
    pub fn from_env() -> Notifier {
        let outbox = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let outbox = Arc::new(Outbox::default());
            let writer = outbox.clone();
            match std::thread::Builder::new()
                .name("sd-notify".into())
                .spawn(move || writer.write_all(&path))
            {
                Ok(_) => Some(outbox),
                Err(e) => {
                    tracing::warn!("no systemd notifications: cannot start their thread: {e}");
                    None
                }
            }
        });
        Notifier { outbox }
    }

    /// Whether notifications go anywhere.
    pub fn enabled(&self) -> bool {
        self.outbox.is_some()
    }

    fn send(&self, kind: Kind, states: &[NotifyState<'_>]) {
        let Some(outbox) = &self.outbox else {
            return;
        };
        let text: String = states.iter().map(|s| format!("{s}\n")).collect();
        outbox.lock().push(kind, text);
        outbox.changed.notify_all();
    }

    /// Waits up to `limit` for every message so far to be sent (before exiting: `STOPPING=1`).
    /// Blocks the calling thread.
    pub fn flush(&self, limit: Duration) {
        let Some(outbox) = &self.outbox else {
            return;
        };
        let deadline = Instant::now() + limit;
        let mut q = outbox.lock();
        while !q.msgs.is_empty() || q.busy {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::debug!("systemd notifications not sent: the notify socket is full");
                return;
            }
            (q, _) = outbox
                .changed
                .wait_timeout(q, left)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.send(
            Kind::State,
            &[NotifyState::Ready, NotifyState::Status(status)],
        );
    }

    /// `STATUS=…`.
    pub fn status(&self, status: &str) {
        self.send(Kind::Status, &[NotifyState::Status(status)]);
    }

    /// `RELOADING=1` with `MONOTONIC_USEC` (as `Type=notify-reload` wants it too).
    pub fn reloading(&self) {
        let status = NotifyState::Status("reloading");
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(Kind::State, &[NotifyState::Reloading, now, status]),
            Err(_) => self.send(Kind::State, &[NotifyState::Reloading, status]),
        }
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.send(
            Kind::State,
            &[NotifyState::Stopping, NotifyState::Status("stopping")],
        );
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) {
        self.send(Kind::Watchdog, &[NotifyState::Watchdog]);
    }

    /// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, when it is set for us.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        if !self.enabled() {
            return None;
        }
        sd_notify::watchdog_enabled()
            .filter(|d| !d.is_zero())
            .map(|d| d / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(q: &Queue) -> Vec<&str> {
        q.msgs.iter().map(|(_, t)| t.as_str()).collect()
    }

    #[test]
    fn status_lines_coalesce_to_the_latest_and_states_keep_their_order() {
        let mut q = Queue::default();
        q.push(Kind::State, "READY=1\n".into());
        q.push(Kind::Status, "STATUS=a\n".into());
        q.push(Kind::Status, "STATUS=b\n".into());
        q.push(Kind::Watchdog, "WATCHDOG=1\n".into());
        q.push(Kind::Watchdog, "WATCHDOG=1\n".into());
        q.push(Kind::State, "RELOADING=1\n".into());
        q.push(Kind::Status, "STATUS=c\n".into());
        q.push(Kind::State, "STOPPING=1\n".into());
        assert_eq!(
            texts(&q),
            [
                "READY=1\n",
                "STATUS=b\n",
                "WATCHDOG=1\n",
                "RELOADING=1\n",
                "STATUS=c\n",
                "STOPPING=1\n"
            ]
        );
    }

    #[test]
    fn a_full_outbox_drops_status_lines_before_states() {
        let mut q = Queue::default();
        q.push(Kind::Status, "STATUS=old\n".into());
        for i in 0..OUTBOX_CAP {
            q.push(Kind::State, format!("READY={i}\n"));
        }
        assert_eq!(q.msgs.len(), OUTBOX_CAP);
        assert!(q.msgs.iter().all(|(k, _)| *k == Kind::State));
        assert_eq!(texts(&q).first(), Some(&"READY=0\n"));
    }

    #[test]
    fn a_full_socket_delays_messages_without_blocking_and_keeps_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let reader = UnixDatagram::bind(&path).unwrap();
        // Fill the reader's queue.
        let filler = UnixDatagram::unbound().unwrap();
        filler.set_nonblocking(true).unwrap();
        while filler.send_to(b"x", &path).is_ok() {}
        let outbox = Arc::new(Outbox::default());
        let writer = outbox.clone();
        let p = OsString::from(path.as_os_str());
        std::thread::spawn(move || writer.write_all(&p));
        let n = Notifier {
            outbox: Some(outbox),
        };
        let began = Instant::now();
        n.ready("1/1 clients valid");
        n.status("a");
        n.status("b");
        n.stopping();
        assert!(began.elapsed() < Duration::from_millis(100));
        // Nothing can be sent yet: flush gives up at its limit.
        n.flush(Duration::from_millis(100));
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        reader
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        while got.len() < 3 {
            let len = reader.recv(&mut buf).unwrap();
            if &buf[..len] != b"x" {
                got.push(String::from_utf8_lossy(&buf[..len]).into_owned());
            }
        }
        assert_eq!(
            got,
            [
                "READY=1\nSTATUS=1/1 clients valid\n",
                "STATUS=b\n",
                "STOPPING=1\nSTATUS=stopping\n"
            ]
        );
        n.flush(Duration::from_secs(5));
    }
}
