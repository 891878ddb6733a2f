//! What makes the daemon act (SPEC §8): signals and changed files, as one stream of [`Event`]s.
//!
//! - [`signals`]: SIGHUP → reload, SIGUSR1 → refresh every client, SIGTERM/SIGINT → stop.
//! - [`FileWatcher`]: the config, its included files and every secret file, watched through
//!   their parent directories (inotify, non-recursive), so editors' rename-saves, `mv` over a
//!   file and Kubernetes-style symlink swaps (`dir/token -> ..data/token`, `..data` renamed
//!   over) are all seen. Any event in a watched directory (but `Access`, and names that cannot
//!   matter) makes it compare the watched files' contents with the last ones it saw; after a
//!   quiet `debounce` (at most [`MAX_DEBOUNCE`] after the first event, so a file rewritten
//!   forever still reloads), the changed paths go out as one `Reload`. So a `touch`, a rewrite
//!   with the same content, or an output file written into the same directory never reloads.
//!   A watched file whose directory does not exist yet is covered by watching the nearest
//!   existing ancestor; the watch moves down as directories appear.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The longest a reload waits after the first event of a burst.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(2);

/// Files larger than this are compared by size, inode and mtime instead of content.
const HASH_LIMIT: u64 = 1024 * 1024;

/// Something the daemon must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Reload the config.
    Reload(ReloadReason),
    /// SIGUSR1: a new token for every client now.
    RefreshAll,
    /// SIGTERM or SIGINT: stop.
    Shutdown,
}

/// Why a reload happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadReason {
    /// SIGHUP (`systemctl reload`).
    Signal,
    /// These watched files changed.
    Changed(Vec<PathBuf>),
}

/// Why watching could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// inotify could not be set up (out of watches or instances).
    #[error("cannot watch files: {0}")]
    Watch(#[from] notify::Error),
}

/// Keeps the signal handler task alive; dropping it stops delivering signals as events.
pub struct SignalTask {
    handle: signal_hook_tokio::Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SignalTask {
    fn drop(&mut self) {
        self.handle.close();
        self.task.abort();
    }
}

/// Delivers SIGHUP, SIGUSR1, SIGTERM and SIGINT as events on `tx`.
pub fn signals(tx: mpsc::Sender<Event>) -> std::io::Result<SignalTask> {
    let signals = signal_hook_tokio::Signals::new([SIGHUP, SIGUSR1, SIGTERM, SIGINT])?;
    let handle = signals.handle();
    let task = tokio::spawn(async move {
        let mut signals = signals;
        while let Some(sig) = signals.next().await {
            let event = match sig {
                SIGHUP => Event::Reload(ReloadReason::Signal),
                SIGUSR1 => Event::RefreshAll,
                _ => Event::Shutdown,
            };
            if tx.send(event).await.is_err() {
                break;
            }
        }
    });
    Ok(SignalTask { handle, task })
}

/// What is remembered of a watched file, to tell a real change from a touch.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Absent,
    Content([u8; 32]),
    Large { size: u64, ino: u64, mtime: i64 },
}

fn look(path: &Path) -> Seen {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Seen::Absent;
    };
    if meta.len() > HASH_LIMIT || !meta.is_file() {
        return Seen::Large {
            size: meta.len(),
            ino: meta.ino(),
            mtime: meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
        };
    }
    match std::fs::read(path) {
        Ok(bytes) => {
            let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes);
            let mut out = [0u8; 32];
            out.copy_from_slice(d.as_ref());
            Seen::Content(out)
        }
        Err(_) => Seen::Absent,
    }
}

/// The directory to watch for `path`: its parent, or the nearest ancestor that exists.
fn watch_dir(path: &Path) -> Option<PathBuf> {
    let mut dir = path.parent()?;
    loop {
        if dir.is_dir() {
            return Some(dir.to_path_buf());
        }
        dir = dir.parent()?;
    }
}

struct Inner {
    watcher: RecommendedWatcher,
    /// Watched path → what it held last.
    seen: BTreeMap<PathBuf, Seen>,
    /// Directories with an inotify watch.
    dirs: BTreeSet<PathBuf>,
    /// File names worth a look when an event names them (watched names, and the parents'
    /// names for directories that do not exist yet).
    names: BTreeSet<std::ffi::OsString>,
}

impl Inner {
    /// Re-computes the directories to watch for the current set of paths.
    fn sync_dirs(&mut self) {
        let wanted: BTreeSet<PathBuf> = self.seen.keys().filter_map(|p| watch_dir(p)).collect();
        for gone in self.dirs.difference(&wanted).cloned().collect::<Vec<_>>() {
            let _ = self.watcher.unwatch(&gone);
            self.dirs.remove(&gone);
        }
        for dir in wanted {
            if !self.dirs.contains(&dir) {
                match self.watcher.watch(&dir, RecursiveMode::NonRecursive) {
                    Ok(()) => {
                        self.dirs.insert(dir);
                    }
                    Err(e) => tracing::warn!("cannot watch {}: {e}", dir.display()),
                }
            }
        }
        self.names = self
            .seen
            .keys()
            .flat_map(|p| {
                p.ancestors()
                    .filter_map(|a| a.file_name().map(|n| n.to_os_string()))
                    .collect::<Vec<_>>()
            })
            .collect();
    }

    /// Whether an event on `path` could concern a watched file.
    fn relevant(&self, path: &Path) -> bool {
        match path.file_name() {
            Some(name) => {
                self.names.contains(name)
                    || name.to_string_lossy().starts_with("..")
                    || self.dirs.contains(path)
            }
            None => true,
        }
    }

    /// Compares every watched path with what it held; returns the changed ones.
    fn changed(&mut self) -> Vec<PathBuf> {
        let mut changed = Vec::new();
        for (path, seen) in self.seen.iter_mut() {
            let now = look(path);
            if now != *seen {
                *seen = now;
                changed.push(path.clone());
            }
        }
        changed
    }
}

/// Watches files for changes; see the module docs.
pub struct FileWatcher {
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FileWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(inner: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    match inner.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl FileWatcher {
    /// Starts watching `paths`; changes arrive on `tx` as `Event::Reload(Changed(..))`.
    pub fn start(
        paths: Vec<PathBuf>,
        debounce: Duration,
        tx: mpsc::Sender<Event>,
    ) -> Result<FileWatcher, ReloadError> {
        let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<Vec<PathBuf>>();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            match res {
                Ok(ev) if matches!(ev.kind, EventKind::Access(_)) => {}
                Ok(ev) => {
                    let _ = raw_tx.send(ev.paths);
                }
                // An overflowed queue: look at everything.
                Err(_) => {
                    let _ = raw_tx.send(Vec::new());
                }
            }
        })?;
        let mut inner = Inner {
            watcher,
            seen: paths
                .into_iter()
                .map(|p| {
                    let s = look(&p);
                    (p, s)
                })
                .collect(),
            dirs: BTreeSet::new(),
            names: BTreeSet::new(),
        };
        inner.sync_dirs();
        let inner = Arc::new(Mutex::new(inner));
        let shared = inner.clone();
        let task = tokio::spawn(async move {
            while let Some(paths) = raw_rx.recv().await {
                if !paths.is_empty() && !paths.iter().any(|p| lock(&shared).relevant(p)) {
                    continue;
                }
                // Debounce: wait for quiet, but no longer than MAX_DEBOUNCE in all.
                let first = Instant::now();
                loop {
                    let left = MAX_DEBOUNCE.saturating_sub(first.elapsed());
                    if left.is_zero() {
                        break;
                    }
                    match tokio::time::timeout(debounce.min(left), raw_rx.recv()).await {
                        Ok(Some(_)) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                let changed = {
                    let mut g = lock(&shared);
                    g.sync_dirs();
                    g.changed()
                };
                if !changed.is_empty()
                    && tx
                        .send(Event::Reload(ReloadReason::Changed(changed)))
                        .await
                        .is_err()
                {
                    return;
                }
            }
        });
        Ok(FileWatcher { inner, task })
    }

    /// Replaces the watched set (after a reload); paths still watched keep what was seen.
    pub fn set_paths(&self, paths: Vec<PathBuf>) -> Result<(), ReloadError> {
        let mut g = lock(&self.inner);
        let mut seen = BTreeMap::new();
        for p in paths {
            let s = g.seen.remove(&p).unwrap_or_else(|| look(&p));
            seen.insert(p, s);
        }
        g.seen = seen;
        g.sync_dirs();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_tell_content_not_timestamps() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        assert_eq!(look(&p), Seen::Absent);
        std::fs::write(&p, "a").unwrap();
        let a = look(&p);
        std::fs::write(&p, "a").unwrap();
        assert_eq!(look(&p), a);
        std::fs::write(&p, "b").unwrap();
        assert_ne!(look(&p), a);
    }

    #[test]
    fn watch_dir_climbs_to_an_existing_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("x/y/z.toml");
        assert_eq!(watch_dir(&deep).unwrap(), dir.path());
        assert_eq!(watch_dir(&dir.path().join("f")).unwrap(), dir.path());
    }
}
