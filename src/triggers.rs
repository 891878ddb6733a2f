//! What makes the daemon reload (docs/operations.md#reload): signals and changed files, turned into
//! one [`Event`] stream.
//!
//! - [`signals`]: SIGHUP → [`Event::Reload`]`(`[`ReloadReason::Signal`]`)`, SIGUSR1 →
//!   [`Event::RefreshAll`], SIGTERM/SIGINT → [`Event::Shutdown`].
//! - [`FileWatcher`]: the config, its included files and every secret file, watched through
//!   their parent directories with inotify, compared by content, debounced into one
//!   [`Event::Reload`]`(`[`ReloadReason::Changed`]`)`.
//!
//! Both send on the same channel, so the daemon has one place that reloads (as vector does).
//!
//! # How files are watched
//! A watch on a file goes silent after the first rename over it (an editor's save, `mv`, a
//! Kubernetes secret update), so the watcher watches *directories* (non-recursively) and keeps,
//! for each watched path, the exact names whose events matter ("triggers"):
//! - the file itself, in its directory;
//! - every symbolic link met while resolving the path, in the directory that holds the link.
//!   For a Kubernetes secret volume (`dir/token -> ..data/token`, `..data -> ..2026_11_23_xx`,
//!   updated by renaming `..data_tmp` over `..data`) that is `dir/token`, `dir/..data` and
//!   `dir/..2026_11_23_xx/token`, and the directories `dir` and `dir/..2026_11_23_xx`;
//! - when a component does not exist (yet), that component in its nearest existing ancestor:
//!   a parent directory missing at start is watched for from the closest directory that
//!   exists, and the watches move down as directories appear (and back up if they go away).
//!
//! Events are filtered on notify's thread with one hash-set lookup per event path, so the
//! daemon's own output files, written into the same directories, never wake the watcher.
//! Access events are dropped (reading a file raises them; RECIPE pitfall 4), except
//! close-after-write, which marks the end of an in-place rewrite.
//!
//! After each relevant event the paths it concerns are resolved again (symlink targets may
//! have moved), the set of watched directories is brought up to date (a directory that was
//! deleted and re-created at the same path is watched again), and each concerned path is
//! fingerprinted; see [`FileWatcher`] for what counts as a change.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc::{self as std_mpsc, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use tokio::sync::mpsc;

/// Something the daemon must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Read the config again and apply the difference (SIGHUP or a watched file changed).
    Reload(ReloadReason),
    /// Refresh every client's token now (SIGUSR1).
    RefreshAll,
    /// Stop: finish in-flight writes and exit (SIGTERM or SIGINT).
    Shutdown,
}

/// Why a reload was asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReloadReason {
    /// SIGHUP (`systemctl reload`).
    Signal,
    /// These watched files changed (as given to the watcher, in path order).
    Changed(Vec<PathBuf>),
}

/// Why the file watcher could not start or take new paths.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// inotify could not be set up (the per-user instance limit, `fs.inotify.max_user_instances`,
    /// is the usual cause).
    #[error("cannot start the file watcher: {0}")]
    Init(#[source] notify::Error),
    /// A directory could not be watched (permission denied, or the per-user watch limit
    /// `fs.inotify.max_user_watches` reached).
    #[error("cannot watch directory {path} (for changes of {watched}): {source}")]
    Watch {
        /// The directory.
        path: PathBuf,
        /// A file it was watched for.
        watched: PathBuf,
        #[source]
        source: notify::Error,
    },
    /// The watcher's thread could not be started.
    #[error("cannot start the file watcher's thread: {0}")]
    Thread(#[source] std::io::Error),
}

// === signals ===

/// The running signal listener of [`signals`]; dropping it stops it.
///
/// signal-hook keeps its low-level handlers installed for the life of the process: once
/// [`signals`] has run, SIGHUP, SIGUSR1, SIGTERM and SIGINT no longer have their default
/// action even after the task is gone (they are then ignored).
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

impl fmt::Debug for SignalTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignalTask").finish_non_exhaustive()
    }
}

/// The event a signal stands for.
fn signal_event(signal: i32) -> Option<Event> {
    match signal {
        SIGHUP => Some(Event::Reload(ReloadReason::Signal)),
        SIGUSR1 => Some(Event::RefreshAll),
        SIGTERM | SIGINT => Some(Event::Shutdown),
        _ => None,
    }
}

/// Delivers SIGHUP → `Reload(Signal)`, SIGUSR1 → `RefreshAll`, SIGTERM/SIGINT → `Shutdown` on
/// `tx`. The handlers are installed when this returns; call it inside a tokio runtime. The
/// task ends when the returned handle is dropped or `tx`'s receiver is gone. Signals that
/// arrive close together may be merged into one event (signal semantics).
pub fn signals(tx: mpsc::Sender<Event>) -> std::io::Result<SignalTask> {
    let mut stream = signal_hook_tokio::Signals::new([SIGHUP, SIGUSR1, SIGTERM, SIGINT])?;
    let handle = stream.handle();
    let task = tokio::spawn(async move {
        while let Some(signal) = stream.next().await {
            let Some(event) = signal_event(signal) else {
                continue;
            };
            tracing::debug!(signal, ?event, "signal received");
            // SIGHUP and SIGUSR1 are logged by what they start; a stop names its signal here.
            if matches!(event, Event::Shutdown) {
                let name = if signal == SIGINT {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                tracing::info!("{name} received: stopping");
            }
            if tx.send(event).await.is_err() {
                break;
            }
        }
    });
    Ok(SignalTask { handle, task })
}

// === FileWatcher ===

/// Files larger than this are compared by metadata only (dev, inode, size, mtime).
pub const HASH_LIMIT: u64 = 1024 * 1024;

/// The longest a change waits for its burst of events to end: a file rewritten without pause
/// still reloads this long after its first change (or after `debounce`, if that is longer).
pub const MAX_DEBOUNCE_WAIT: Duration = Duration::from_secs(3);

/// The quiet time after a burst that ended with a file renamed into place (an editor's save,
/// configuration management, a Kubernetes `..data` swap): that replacement is whole, and
/// waiting the full debounce would only delay the reload (issue 6: a reload applied within
/// 100 ms of the rename). Renames closer together than this still make one reload. Writes in
/// place wait for the full debounce: they often come in a series (`>` then `>>`).
pub const QUICK_SETTLE: Duration = Duration::from_millis(5);

/// Whether `event` puts a whole file in place: a rename onto a watched name. Pure.
fn replaces_a_file(event: &notify::Event) -> bool {
    matches!(
        event.kind,
        EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
    )
}

/// Symbolic links followed while resolving one path, as the kernel's `ELOOP` limit.
const MAX_SYMLINKS: usize = 40;

/// Watches files (the config, its included files, every secret file) and sends one
/// `Reload(Changed(paths))` on `tx` after each burst of changes.
///
/// **What counts as a change.** Each watched path is fingerprinted following symlinks:
/// device, inode, size, mtime, and the SHA-256 of the content when the file is under
/// [`HASH_LIMIT`] and readable. When both the old and the new fingerprint carry a content
/// hash, the path changed iff the content did: a `touch`, or an editor saving the same text
/// under a new inode, does not reload; a same-size rewrite does. Otherwise the metadata is
/// compared. A path that disappears is not reported; when it comes back it is reported as
/// changed, whatever its content (the daemon may have noticed its absence meanwhile). A path
/// that is missing when watched and appears later is a change likewise.
///
/// **Debounce.** Changed paths are collected until no relevant event has arrived for
/// `debounce` ([`QUICK_SETTLE`] when the last event renamed a file into place), or at most [`MAX_DEBOUNCE_WAIT`] after the first change, then sent
/// as one event.
///
/// **Missing directories.** A path whose parent directory does not exist is watched from its
/// nearest existing ancestor (see the module docs); starting never fails for that.
///
/// The watcher runs on its own thread; dropping the `FileWatcher` stops it.
pub struct FileWatcher {
    shared: Arc<WatcherCore>,
    control: std_mpsc::Sender<Msg>,
}

impl fmt::Debug for FileWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileWatcher").finish_non_exhaustive()
    }
}

/// What the watcher's thread receives.
enum Msg {
    /// A relevant (pre-filtered) notify event, or a notify error (which forces a rescan).
    Notify(notify::Result<notify::Event>),
    Stop,
}

/// The names whose events matter, read by notify's thread for every event.
#[derive(Default)]
struct Filter {
    /// Hashes of the trigger names' full paths ([`path_key`]): a hash that matches by chance
    /// only wakes the watcher's thread, which looks at the paths themselves.
    triggers: HashSet<u64>,
    /// The watched directories (events about the directory itself: deleted, moved).
    dirs: HashSet<PathBuf>,
    /// The include globs: a file appearing that matches one is a change.
    globs: Vec<glob::Pattern>,
}

impl Filter {
    fn matches(&self, path: &Path) -> bool {
        self.triggers.contains(&path_key(path))
            || self.dirs.contains(path)
            || self.globs.iter().any(|g| g.matches_path(path))
    }
}

/// The filter's key of `path` (SipHash with fixed keys).
fn path_key(path: &Path) -> u64 {
    use std::hash::BuildHasher;
    std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
        .hash_one(path)
}

/// One include glob.
struct GlobEntry {
    /// The absolute pattern.
    text: PathBuf,
    pattern: glob::Pattern,
    /// The directory watched for new names: the pattern's longest prefix without wildcards
    /// (a new file under a new subdirectory of it is seen at the next reload).
    dir: PathBuf,
    /// The files it matched when last looked at.
    seen: BTreeSet<PathBuf>,
}

impl GlobEntry {
    fn new(text: PathBuf) -> Option<GlobEntry> {
        let pattern = glob::Pattern::new(&text.to_string_lossy()).ok()?;
        let mut dir = PathBuf::new();
        for c in text.parent()?.components() {
            if c.as_os_str().to_string_lossy().contains(['*', '?', '[']) {
                break;
            }
            dir.push(c);
        }
        // `seen` is filled once the directory is watched ([`FileWatcher::set_globs`]).
        Some(GlobEntry {
            text,
            pattern,
            dir,
            seen: BTreeSet::new(),
        })
    }

    /// The regular files matching now.
    fn matches(&self) -> BTreeSet<PathBuf> {
        match glob::glob(&self.text.to_string_lossy()) {
            Ok(paths) => paths.flatten().filter(|p| p.is_file()).collect(),
            Err(_) => BTreeSet::new(),
        }
    }

    /// The files that match now and did not before (remembered).
    fn appeared(&mut self) -> Vec<PathBuf> {
        let now = self.matches();
        let new = now.difference(&self.seen).cloned().collect();
        self.seen = now;
        new
    }
}

/// One watched path.
struct Entry {
    /// As given by the caller: what a change is reported as.
    path: PathBuf,
    /// Lexically absolute, when `path` is not (symlinks are followed by `resolve`); one copy
    /// less of each of 10,000 secret paths.
    absolute: Option<PathBuf>,
    resolution: Resolution,
    /// The last fingerprint seen; `None` while the path is missing.
    last: Option<Fingerprint>,
    /// Removed or renamed away since the last fingerprint: reported when it comes back.
    gone: bool,
    /// What the path held before the first change of the current burst (`Some(None)`: it was
    /// missing), to drop a burst that ends where it began (a file truncated then rewritten with
    /// the same content, seen half-way).
    baseline: Option<Option<Fingerprint>>,
    /// It came back after being gone during the current burst: reported whatever its content.
    came_back: bool,
}

/// Behind a mutex shared by the caller of `set_paths` and the watcher thread.
struct Watches {
    watcher: notify::RecommendedWatcher,
    /// In path order.
    entries: Vec<Entry>,
    /// Watched directories with the (dev, inode) they had when the watch was added.
    watched: HashMap<PathBuf, (u64, u64)>,
    /// The include globs.
    globs: Vec<GlobEntry>,
}

struct WatcherCore {
    filter: Arc<RwLock<Filter>>,
    state: Mutex<Watches>,
}

impl FileWatcher {
    /// Starts watching `paths`, sending `Reload(Changed(..))` on `tx` once no event has come
    /// for `debounce` (250 ms is a good value). Needs no tokio runtime: the watcher runs on a
    /// thread of its own.
    pub fn start(
        paths: Vec<PathBuf>,
        debounce: Duration,
        tx: mpsc::Sender<Event>,
    ) -> Result<FileWatcher, ReloadError> {
        let filter = Arc::new(RwLock::new(Filter::default()));
        let (control, rx) = std_mpsc::channel::<Msg>();
        let handler = {
            let filter = Arc::clone(&filter);
            let control = control.clone();
            move |res: notify::Result<notify::Event>| {
                let relevant = match &res {
                    Ok(event) => is_relevant(&filter, event),
                    Err(_) => true,
                };
                if relevant {
                    // The thread is gone only when the watcher is being dropped.
                    let _ = control.send(Msg::Notify(res));
                }
            }
        };
        let watcher = notify::recommended_watcher(handler).map_err(ReloadError::Init)?;
        let shared = Arc::new(WatcherCore {
            filter,
            state: Mutex::new(Watches {
                watcher,
                entries: Vec::new(),
                watched: HashMap::new(),
                globs: Vec::new(),
            }),
        });
        shared.set_paths(paths)?;
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("tokenwarden-watch".into())
            .spawn(move || run(&thread_shared, &rx, debounce, &tx))
            .map_err(ReloadError::Thread)?;
        Ok(FileWatcher { shared, control })
    }

    /// Replaces the watched set after a reload (new includes, new secret files). Paths still
    /// watched keep their fingerprints (a change not yet reported stays pending); new ones are
    /// fingerprinted now, so a change made between the daemon reading them and this call is
    /// not seen.
    pub fn set_paths(&self, paths: Vec<PathBuf>) -> Result<(), ReloadError> {
        self.shared.set_paths(paths)
    }

    /// Replaces the include globs: a regular file that starts matching one (dropped into
    /// `conf.d`, say) is reported as changed, as an edited file is.
    pub fn set_globs(&self, globs: Vec<PathBuf>) -> Result<(), ReloadError> {
        let mut state = self.shared.lock();
        state.globs = globs.into_iter().filter_map(GlobEntry::new).collect();
        let result = state.sync_watches().map(drop);
        // Matches taken after the watches are in place: a file created in between is seen.
        for g in &mut state.globs {
            g.seen = g.matches();
        }
        self.shared.update_filter(&state);
        result
    }

    /// The directories watched right now (for tests and diagnostics).
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        let state = self.shared.lock();
        let mut v: Vec<PathBuf> = state.watched.keys().cloned().collect();
        v.sort();
        v
    }
}

impl Drop for FileWatcher {
    fn drop(&mut self) {
        // The thread drops the last reference to the notify watcher when it sees this.
        let _ = self.control.send(Msg::Stop);
    }
}

/// Whether a notify event may concern a watched path: one hash lookup per path, on notify's
/// thread. Access events are what our own reads (and everyone else's) cause; close-after-write
/// is kept because it ends an in-place rewrite.
fn is_relevant(filter: &RwLock<Filter>, event: &notify::Event) -> bool {
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return false,
        _ => {}
    }
    if event.need_rescan() {
        return true;
    }
    let filter = filter.read().unwrap_or_else(PoisonError::into_inner);
    event.paths.iter().any(|p| filter.matches(p))
}

/// The watcher thread: apply events, debounce, send.
fn run(
    shared: &WatcherCore,
    rx: &std_mpsc::Receiver<Msg>,
    debounce: Duration,
    tx: &mpsc::Sender<Event>,
) {
    let max_wait = MAX_DEBOUNCE_WAIT.max(debounce);
    let mut pending: BTreeSet<PathBuf> = BTreeSet::new();
    let mut first_change = Instant::now();
    let mut last_event = Instant::now();
    let mut replaced = false;
    loop {
        let msg = if pending.is_empty() {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            let quiet = if replaced {
                QUICK_SETTLE.min(debounce)
            } else {
                debounce
            };
            let deadline = (last_event + quiet).min(first_change + max_wait);
            rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        };
        match msg {
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(Msg::Notify(event)) => {
                let mut batch = vec![event];
                while let Ok(more) = rx.try_recv() {
                    match more {
                        Msg::Notify(event) => batch.push(event),
                        Msg::Stop => return,
                    }
                }
                let changed = shared.on_events(&batch);
                replaced = match batch.last() {
                    Some(Ok(event)) => replaces_a_file(event),
                    _ => false,
                };
                let now = Instant::now();
                last_event = now;
                if !changed.is_empty() {
                    if pending.is_empty() {
                        first_change = now;
                    }
                    pending.extend(changed);
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                let paths = shared.settle(std::mem::take(&mut pending));
                if paths.is_empty() {
                    continue;
                }
                tracing::debug!(?paths, "watched files changed");
                if tx
                    .blocking_send(Event::Reload(ReloadReason::Changed(paths)))
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

// === impl WatcherCore ===

impl WatcherCore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Watches> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_paths(&self, mut paths: Vec<PathBuf>) -> Result<(), ReloadError> {
        paths.sort();
        paths.dedup();
        let mut state = self.lock();
        // The common reload (10,000 secret files, one scope changed): nothing to redo.
        if state.entries.iter().map(|e| &e.path).eq(paths.iter()) {
            return Ok(());
        }
        let mut old: HashMap<PathBuf, Entry> = state
            .entries
            .drain(..)
            .map(|e| (e.path.clone(), e))
            .collect();
        let mut fresh = Vec::new();
        for path in paths {
            if let Some(entry) = old.remove(&path) {
                state.entries.push(entry);
            } else {
                let absolute = (!path.is_absolute())
                    .then(|| std::path::absolute(&path).unwrap_or_else(|_| path.clone()));
                fresh.push(state.entries.len());
                state.entries.push(Entry {
                    resolution: resolve(absolute.as_deref().unwrap_or(&path)),
                    path,
                    absolute,
                    last: None,
                    gone: false,
                    baseline: None,
                    came_back: false,
                });
            }
        }
        // Watch, let the new watches' events through the filter, then fingerprint: a change
        // after the fingerprint is seen by an event.
        let result = state.refresh(&fresh).map(drop);
        self.update_filter(&state);
        for i in fresh {
            if let Some(entry) = state.entries.get_mut(i) {
                entry.last = fingerprint(entry.absolute());
            }
        }
        result
    }

    /// Applies a batch of relevant events; returns the watched paths that changed.
    fn on_events(&self, batch: &[notify::Result<notify::Event>]) -> Vec<PathBuf> {
        let mut state = self.lock();
        let rescan = batch.iter().any(|r| match r {
            Ok(event) => event.need_rescan(),
            Err(_) => true,
        });
        let mut affected: BTreeSet<usize> = BTreeSet::new();
        if rescan {
            affected.extend(0..state.entries.len());
        }
        for event in batch.iter().flatten() {
            let removal = matches!(
                event.kind,
                EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From))
            );
            for path in &event.paths {
                for (i, entry) in state.entries.iter_mut().enumerate() {
                    if entry.resolution.concerns(path) {
                        affected.insert(i);
                        if removal && entry.resolution.file() == Some(path.as_path()) {
                            entry.gone = true;
                        }
                    }
                }
            }
        }
        let mut appeared = Vec::new();
        let touches_glob = |g: &GlobEntry| {
            rescan
                || batch
                    .iter()
                    .flatten()
                    .any(|e| e.paths.iter().any(|p| g.pattern.matches_path(p)))
        };
        for g in state.globs.iter_mut() {
            if touches_glob(g) {
                appeared.extend(g.appeared());
            }
        }
        let affected: Vec<usize> = affected.into_iter().collect();
        // Rebuilding the filter copies every trigger (10,000 secret files): only on a change.
        let moved = state.refresh(&affected).unwrap_or_else(|err| {
            tracing::warn!("{err}; changes of that file may be missed until the next reload");
            true
        });
        // Before the fingerprints: events of a directory watched just now are dropped by the
        // filter until it knows the directory, so a file written there between a fingerprint
        // taken first and the filter's update would be missed (a `mkdir -p` then a write).
        if moved {
            self.update_filter(&state);
        }
        let mut changed = Vec::new();
        for i in affected {
            let Some(entry) = state.entries.get_mut(i) else {
                continue;
            };
            if entry.observe(fingerprint(entry.absolute())) {
                changed.push(entry.path.clone());
            }
        }
        for p in appeared {
            if !state.entries.iter().any(|e| e.absolute() == p) {
                changed.push(p);
            }
        }
        changed
    }

    /// Of the paths changed in a burst, those whose content at its end differs from before it
    /// (or that came back); forgets the burst.
    fn settle(&self, pending: BTreeSet<PathBuf>) -> Vec<PathBuf> {
        let mut state = self.lock();
        let mut out = Vec::new();
        for entry in state.entries.iter_mut() {
            let baseline = entry.baseline.take();
            let came_back = std::mem::take(&mut entry.came_back);
            if !pending.contains(&entry.path) {
                continue;
            }
            let same = match (&baseline, &entry.last) {
                (Some(Some(before)), Some(now)) => before.same_as(now),
                _ => false,
            };
            if came_back || !same {
                out.push(entry.path.clone());
            }
        }
        // New files matching an include glob (not watched entries yet).
        for p in pending {
            if !state.entries.iter().any(|e| e.path == p) {
                out.push(p);
            }
        }
        out.sort();
        out
    }

    fn update_filter(&self, state: &Watches) {
        let mut filter = Filter::default();
        for entry in &state.entries {
            filter
                .triggers
                .extend(entry.resolution.triggers.iter().map(|t| path_key(t)));
        }
        filter.dirs.extend(state.watched.keys().cloned());
        filter.globs = state.globs.iter().map(|g| g.pattern.clone()).collect();
        *self.filter.write().unwrap_or_else(PoisonError::into_inner) = filter;
    }
}

// === impl Watches ===

impl Watches {
    /// Resolves the `affected` entries again and brings the watched directories up to date.
    ///
    /// Watch, then look again: whatever happened in a directory before its watch was added
    /// (a `mkdir -p` racing ahead, a symlink swapped) sent no event to us, so the entries that
    /// use a newly watched directory are resolved once more, until nothing new is watched. A
    /// directory that vanished before it could be watched sends us back to its parent.
    /// Returns whether anything the filter holds changed (a resolution, a watched directory).
    fn refresh(&mut self, affected: &[usize]) -> Result<bool, ReloadError> {
        let mut todo: Vec<usize> = affected.to_vec();
        let mut changed = false;
        for _ in 0..MAX_SYMLINKS {
            for &i in &todo {
                if let Some(entry) = self.entries.get_mut(i) {
                    let now = resolve(entry.absolute());
                    changed |= now != entry.resolution;
                    entry.resolution = now;
                }
            }
            let moved = self.sync_watches()?;
            if moved.is_empty() {
                return Ok(changed);
            }
            changed = true;
            todo = (0..self.entries.len())
                .filter(|&i| {
                    moved
                        .iter()
                        .any(|d| self.entries[i].resolution.dirs.contains(d))
                })
                .collect();
        }
        Ok(changed)
    }

    /// Watches every directory some entry needs and unwatches the others. Returns the
    /// directories newly watched and those that no longer exist; fails on the first other
    /// error (after trying all).
    fn sync_watches(&mut self) -> Result<Vec<PathBuf>, ReloadError> {
        let mut desired: HashMap<&Path, &Path> = HashMap::new();
        for entry in &self.entries {
            for dir in &entry.resolution.dirs {
                desired.entry(dir.as_path()).or_insert(entry.path.as_path());
            }
        }
        for g in &self.globs {
            if g.dir.is_dir() {
                desired.entry(g.dir.as_path()).or_insert(g.text.as_path());
            }
        }
        let stale: Vec<PathBuf> = self
            .watched
            .keys()
            .filter(|d| !desired.contains_key(d.as_path()))
            .cloned()
            .collect();
        for dir in stale {
            // notify has already dropped the watch of a deleted directory: ignore errors.
            let _ = self.watcher.unwatch(&dir);
            self.watched.remove(&dir);
        }
        // Newly watched or vanished: either way, look again.
        let mut moved = Vec::new();
        let mut first_err = None;
        for (dir, watched_for) in desired {
            let Some(id) = dir_id(dir) else {
                moved.push(dir.to_path_buf());
                continue;
            };
            match self.watched.get(dir) {
                Some(old) if *old == id => continue,
                // Deleted and re-created under the same name: the old watch is dead.
                Some(_) => {
                    let _ = self.watcher.unwatch(dir);
                    self.watched.remove(dir);
                }
                None => {}
            }
            match self.watcher.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.watched.insert(dir.to_path_buf(), id);
                    moved.push(dir.to_path_buf());
                }
                Err(e) if matches!(e.kind, notify::ErrorKind::PathNotFound) => {
                    moved.push(dir.to_path_buf());
                }
                Err(source) => {
                    first_err.get_or_insert(ReloadError::Watch {
                        path: dir.to_path_buf(),
                        watched: watched_for.to_path_buf(),
                        source,
                    });
                }
            }
        }
        match first_err {
            Some(err) => Err(err),
            None => Ok(moved),
        }
    }
}

fn dir_id(dir: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

// === impl Entry ===

impl Entry {
    fn absolute(&self) -> &Path {
        self.absolute.as_deref().unwrap_or(&self.path)
    }

    /// Records the path's current fingerprint; returns whether that is a change to report.
    fn observe(&mut self, now: Option<Fingerprint>) -> bool {
        let Some(now) = now else {
            self.gone = true;
            self.last = None;
            return false;
        };
        let changed = match &self.last {
            None => true,
            Some(last) => self.gone || !last.same_as(&now),
        };
        if changed {
            if self.gone || self.last.is_none() {
                self.came_back = true;
            }
            if self.baseline.is_none() {
                self.baseline = Some(self.last.clone());
            }
        }
        self.gone = false;
        self.last = Some(now);
        changed
    }
}

// === resolution ===

/// What a watched path depends on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Resolution {
    /// Full paths whose events matter: every symlink on the way, and the file itself (or the
    /// first missing component).
    triggers: Vec<PathBuf>,
    /// The directories holding them: what is watched.
    dirs: Vec<PathBuf>,
    /// The path resolves to a file that exists: the last trigger.
    exists: bool,
}

impl Resolution {
    fn add(&mut self, dir: &Path, path: PathBuf) {
        if !self.dirs.iter().any(|d| d == dir) {
            self.dirs.push(dir.to_path_buf());
        }
        self.triggers.push(path);
    }

    /// The file the path resolves to, when it exists.
    fn file(&self) -> Option<&Path> {
        self.triggers
            .last()
            .filter(|_| self.exists)
            .map(PathBuf::as_path)
    }

    fn concerns(&self, path: &Path) -> bool {
        self.triggers.iter().any(|t| t == path) || self.dirs.iter().any(|d| d == path)
    }
}

/// Resolves `absolute` component by component, following symbolic links, and records what to
/// watch (see the module docs). Never fails: a missing component ends the walk.
fn resolve(absolute: &Path) -> Resolution {
    let mut res = Resolution::default();
    let mut pending: VecDeque<OsString> = components(absolute).into();
    let mut cur = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&name);
        match std::fs::symlink_metadata(&next) {
            Ok(meta) if meta.file_type().is_symlink() => {
                res.add(&cur, next.clone());
                links += 1;
                let Ok(target) = std::fs::read_link(&next) else {
                    break;
                };
                if links > MAX_SYMLINKS {
                    break;
                }
                if target.is_absolute() {
                    cur = PathBuf::from("/");
                }
                for c in components(&target).into_iter().rev() {
                    pending.push_front(c);
                }
            }
            Ok(_) if pending.is_empty() => {
                res.add(&cur, next);
                res.exists = true;
                break;
            }
            Ok(_) => cur = next,
            Err(_) => {
                // Missing: watch for it from the nearest existing ancestor.
                res.add(&cur, next);
                break;
            }
        }
    }
    res
}

fn components(path: &Path) -> Vec<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

// === fingerprints ===

/// What is compared to notice a change (see [`FileWatcher`]).
#[derive(Clone, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    /// Hex SHA-256 of the content, for readable regular files under [`HASH_LIMIT`].
    sha256: Option<String>,
}

// Hand-written: the hash of a secret file's content stays out of logs.
impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fingerprint")
            .field("dev", &self.dev)
            .field("ino", &self.ino)
            .field("size", &self.size)
            .field("mtime", &self.mtime)
            .finish_non_exhaustive()
    }
}

impl Fingerprint {
    fn same_as(&self, other: &Fingerprint) -> bool {
        match (&self.sha256, &other.sha256) {
            (Some(a), Some(b)) => a == b,
            _ => {
                (self.dev, self.ino, self.size, self.mtime)
                    == (other.dev, other.ino, other.size, other.mtime)
            }
        }
    }
}

/// The fingerprint of `path` (following symlinks), `None` when it does not exist.
fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let meta = std::fs::metadata(path).ok()?;
    // Only regular files are read: opening a FIFO would block.
    let sha256 = if meta.is_file() && meta.len() < HASH_LIMIT {
        hash_small(path)
    } else {
        None
    };
    Some(Fingerprint {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.len(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
        sha256,
    })
}

fn hash_small(path: &Path) -> Option<String> {
    let file = std::fs::File::open(path).ok()?;
    let mut buf = zeroize::Zeroizing::new(Vec::new());
    file.take(HASH_LIMIT + 1).read_to_end(&mut buf).ok()?;
    if buf.len() as u64 > HASH_LIMIT {
        return None;
    }
    Some(crate::secret::sha256_hex(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_map_to_events() {
        assert_eq!(
            signal_event(SIGHUP),
            Some(Event::Reload(ReloadReason::Signal))
        );
        assert_eq!(signal_event(SIGUSR1), Some(Event::RefreshAll));
        assert_eq!(signal_event(SIGTERM), Some(Event::Shutdown));
        assert_eq!(signal_event(SIGINT), Some(Event::Shutdown));
        assert_eq!(signal_event(signal_hook::consts::signal::SIGUSR2), None);
    }

    #[test]
    fn resolve_follows_kubernetes_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let d = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(d.join("..2026_11_23_a")).unwrap();
        std::fs::write(d.join("..2026_11_23_a/token"), "x").unwrap();
        std::os::unix::fs::symlink("..2026_11_23_a", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/token", d.join("token")).unwrap();
        let r = resolve(&d.join("token"));
        assert_eq!(
            r.triggers,
            vec![
                d.join("token"),
                d.join("..data"),
                d.join("..2026_11_23_a/token")
            ]
        );
        assert_eq!(r.dirs, vec![d.clone(), d.join("..2026_11_23_a")]);
        assert_eq!(r.file(), Some(d.join("..2026_11_23_a/token").as_path()));
    }

    #[test]
    fn resolve_missing_watches_nearest_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let d = std::fs::canonicalize(dir.path()).unwrap();
        let r = resolve(&d.join("a/b/c.toml"));
        assert_eq!(r.triggers, vec![d.join("a")]);
        assert_eq!(r.dirs, vec![d.clone()]);
        assert_eq!(r.file(), None);
    }

    #[test]
    fn resolve_relative_symlink_with_parent_dir() {
        let dir = tempfile::tempdir().unwrap();
        let d = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(d.join("real")).unwrap();
        std::fs::create_dir_all(d.join("links")).unwrap();
        std::fs::write(d.join("real/s"), "x").unwrap();
        std::os::unix::fs::symlink("../real/s", d.join("links/s")).unwrap();
        let r = resolve(&d.join("links/s"));
        assert_eq!(r.triggers, vec![d.join("links/s"), d.join("real/s")]);
        assert_eq!(r.file(), Some(d.join("real/s").as_path()));
    }

    #[test]
    fn resolve_symlink_loop_ends() {
        let dir = tempfile::tempdir().unwrap();
        let d = std::fs::canonicalize(dir.path()).unwrap();
        std::os::unix::fs::symlink("b", d.join("a")).unwrap();
        std::os::unix::fs::symlink("a", d.join("b")).unwrap();
        let r = resolve(&d.join("a"));
        assert_eq!(r.file(), None);
        assert!(r.triggers.len() > MAX_SYMLINKS);
    }

    fn fp(ino: u64, mtime: i64, sha: Option<&str>) -> Fingerprint {
        Fingerprint {
            dev: 1,
            ino,
            size: 3,
            mtime: (mtime, 0),
            sha256: sha.map(String::from),
        }
    }

    #[test]
    fn fingerprint_comparison() {
        // (old, new, same?)
        let cases = [
            (fp(1, 1, Some("a")), fp(1, 2, Some("a")), true), // touch
            (fp(1, 1, Some("a")), fp(2, 1, Some("a")), true), // same text, new inode
            (fp(1, 1, Some("a")), fp(1, 1, Some("b")), false), // same-size rewrite
            (fp(1, 1, None), fp(1, 1, None), true),           // big file, untouched
            (fp(1, 1, None), fp(1, 2, None), false),          // big file, touched
            (fp(1, 1, Some("a")), fp(1, 1, None), true),      // became unreadable, same stat
            (fp(1, 1, Some("a")), fp(2, 1, None), false),     // became big/unreadable, new inode
        ];
        for (i, (old, new, same)) in cases.iter().enumerate() {
            assert_eq!(old.same_as(new), *same, "case {i}");
        }
    }

    #[test]
    fn observe_reports_comebacks() {
        let mut e = Entry {
            path: "/x".into(),
            absolute: None,
            resolution: Resolution::default(),
            last: Some(fp(1, 1, Some("a"))),
            gone: false,
            baseline: None,
            came_back: false,
        };
        assert!(!e.observe(Some(fp(1, 2, Some("a")))));
        assert!(!e.observe(None)); // deleted: not reported
        assert!(e.observe(Some(fp(3, 2, Some("a"))))); // back, same content: reported
        assert!(!e.observe(Some(fp(3, 2, Some("a")))));
        e.gone = true; // a Remove event was seen in between
        assert!(e.observe(Some(fp(4, 2, Some("a")))));
    }
}
