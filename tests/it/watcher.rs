//! The reload triggers with real inotify and real files: every way a file gets replaced, what
//! must not reload (touch, same content, the daemon's own files), debouncing, and the signals
//! SIGHUP and SIGUSR1 raised in this process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokenwarden::triggers::{Event, FileWatcher, ReloadReason, signals};
use tokio::sync::mpsc;
use tokio::time::timeout;

const DEBOUNCE: Duration = Duration::from_millis(150);
/// How long a positive case may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(10);
/// The bounded quiet period of the "nothing happens" cases.
const QUIET: Duration = Duration::from_secs(1);

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    rx: mpsc::Receiver<Event>,
    watcher: FileWatcher,
}

fn setup(files: &[(&str, &str)], watch: &[&str]) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    for (name, content) in files {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    let (tx, rx) = mpsc::channel(16);
    let paths = watch.iter().map(|n| dir.join(n)).collect();
    let watcher = FileWatcher::start(paths, DEBOUNCE, tx).unwrap();
    Fixture {
        _tmp: tmp,
        dir,
        rx,
        watcher,
    }
}

impl Fixture {
    fn p(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The next event's changed paths, within the deadline.
    async fn changed(&mut self) -> Vec<PathBuf> {
        match timeout(DEADLINE, self.rx.recv()).await {
            Ok(Some(Event::Reload(ReloadReason::Changed(paths)))) => paths,
            other => panic!("expected a Reload(Changed), got {other:?}"),
        }
    }

    /// Asserts that nothing comes for the quiet period.
    async fn quiet(&mut self) {
        if let Ok(ev) = timeout(QUIET, self.rx.recv()).await {
            panic!("expected no event, got {ev:?}");
        }
    }
}

fn write_via_rename(path: &Path, content: &str) {
    let tmp = path.with_file_name(format!(
        ".{}.swp",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn editor_style_save_reloads() {
    let mut f = setup(&[("c.toml", "a = 1\n")], &["c.toml"]);
    write_via_rename(&f.p("c.toml"), "a = 2\n");
    assert_eq!(f.changed().await, vec![f.p("c.toml")]);
    // The watch survives the rename: a second save is seen too.
    write_via_rename(&f.p("c.toml"), "a = 3\n");
    assert_eq!(f.changed().await, vec![f.p("c.toml")]);
    f.quiet().await;
}

#[tokio::test]
async fn in_place_same_size_rewrite_reloads() {
    let mut f = setup(&[("secret", "aaaa")], &["secret"]);
    std::fs::write(f.p("secret"), "bbbb").unwrap();
    assert_eq!(f.changed().await, vec![f.p("secret")]);
    f.quiet().await;
}

#[tokio::test]
async fn same_content_or_touch_does_not_reload() {
    let mut f = setup(&[("c.toml", "a = 1\n")], &["c.toml"]);
    // Same content rewritten in place, saved over with a rename, and a touch.
    std::fs::write(f.p("c.toml"), "a = 1\n").unwrap();
    write_via_rename(&f.p("c.toml"), "a = 1\n");
    let file = std::fs::File::options()
        .write(true)
        .open(f.p("c.toml"))
        .unwrap();
    file.set_modified(std::time::SystemTime::now() + Duration::from_secs(60))
        .unwrap();
    drop(file);
    f.quiet().await;
}

#[tokio::test]
async fn delete_then_recreate_reloads_when_it_comes_back() {
    let mut f = setup(&[("s", "one")], &["s"]);
    std::fs::remove_file(f.p("s")).unwrap();
    f.quiet().await;
    std::fs::write(f.p("s"), "two").unwrap();
    assert_eq!(f.changed().await, vec![f.p("s")]);
}

#[tokio::test]
async fn delete_then_recreate_same_content_reloads() {
    let mut f = setup(&[("s", "one")], &["s"]);
    std::fs::remove_file(f.p("s")).unwrap();
    std::fs::write(f.p("s"), "one").unwrap();
    assert_eq!(f.changed().await, vec![f.p("s")]);
}

/// A Kubernetes secret volume: `token -> ..data/token`, `..data -> ..TIMESTAMP`, updated by
/// writing a new timestamped directory, pointing `..data_tmp` at it and renaming that over
/// `..data`, then deleting the old directory.
#[tokio::test]
async fn kubernetes_data_symlink_swap_reloads() {
    let tmp = tempfile::tempdir().unwrap();
    let d = std::fs::canonicalize(tmp.path()).unwrap();
    std::fs::create_dir(d.join("..2026_11_23_01")).unwrap();
    std::fs::write(d.join("..2026_11_23_01/token"), "first").unwrap();
    std::os::unix::fs::symlink("..2026_11_23_01", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/token", d.join("token")).unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let _w = FileWatcher::start(vec![d.join("token")], DEBOUNCE, tx).unwrap();

    for (i, value) in ["second", "third"].iter().enumerate() {
        let old = format!("..2026_11_23_0{}", i + 1);
        let new = format!("..2026_11_23_0{}", i + 2);
        std::fs::create_dir(d.join(&new)).unwrap();
        std::fs::write(d.join(&new).join("token"), value).unwrap();
        std::os::unix::fs::symlink(&new, d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        std::fs::remove_dir_all(d.join(&old)).unwrap();
        match timeout(DEADLINE, rx.recv()).await {
            Ok(Some(Event::Reload(ReloadReason::Changed(p)))) => {
                assert_eq!(p, vec![d.join("token")])
            }
            other => panic!("swap {i}: expected a reload, got {other:?}"),
        }
        assert_eq!(std::fs::read_to_string(d.join("token")).unwrap(), *value);
    }
    if let Ok(ev) = timeout(QUIET, rx.recv()).await {
        panic!("expected no event, got {ev:?}");
    }
}

#[tokio::test]
async fn burst_of_writes_is_one_reload() {
    let mut f = setup(&[("c.toml", "v = 0\n")], &["c.toml"]);
    for i in 1..=20 {
        std::fs::write(f.p("c.toml"), format!("v = {i}\n")).unwrap();
    }
    assert_eq!(f.changed().await, vec![f.p("c.toml")]);
    f.quiet().await;
}

#[tokio::test]
async fn changes_to_two_files_come_as_one_reload() {
    let mut f = setup(
        &[("c.toml", "a"), ("conf.d/x.toml", "b")],
        &["c.toml", "conf.d/x.toml"],
    );
    std::fs::write(f.p("c.toml"), "a2").unwrap();
    std::fs::write(f.p("conf.d/x.toml"), "b2").unwrap();
    assert_eq!(f.changed().await, vec![f.p("c.toml"), f.p("conf.d/x.toml")]);
}

#[tokio::test]
async fn unwatched_files_in_the_same_directory_do_nothing() {
    let mut f = setup(&[("c.toml", "a")], &["c.toml"]);
    // What the daemon does next to its config: write outputs atomically, many times.
    for i in 0..10 {
        write_via_rename(&f.p("app.token"), &format!("token {i}"));
        std::fs::write(f.p("app.json"), format!("{{\"n\":{i}}}")).unwrap();
    }
    std::fs::remove_file(f.p("app.json")).unwrap();
    f.quiet().await;
}

#[tokio::test]
async fn set_paths_adds_a_new_file_and_drops_an_old_one() {
    let mut f = setup(&[("c.toml", "a"), ("secrets/new", "1")], &["c.toml"]);
    f.watcher
        .set_paths(vec![f.p("c.toml"), f.p("secrets/new")])
        .unwrap();
    std::fs::write(f.p("secrets/new"), "2").unwrap();
    assert_eq!(f.changed().await, vec![f.p("secrets/new")]);
    assert!(f.watcher.watched_dirs().contains(&f.p("secrets")));

    // Dropped from the set: its changes and its directory's watch are gone.
    f.watcher.set_paths(vec![f.p("c.toml")]).unwrap();
    assert_eq!(f.watcher.watched_dirs(), vec![f.dir.clone()]);
    std::fs::write(f.p("secrets/new"), "3").unwrap();
    f.quiet().await;
    // The one still watched kept its fingerprint: rewriting its content is no change.
    std::fs::write(f.p("c.toml"), "a").unwrap();
    f.quiet().await;
    std::fs::write(f.p("c.toml"), "b").unwrap();
    assert_eq!(f.changed().await, vec![f.p("c.toml")]);
}

#[tokio::test]
async fn parent_directory_created_later() {
    let mut f = setup(&[], &["later/deeper/secret"]);
    // Watched from the nearest existing ancestor.
    assert_eq!(f.watcher.watched_dirs(), vec![f.dir.clone()]);
    std::fs::create_dir_all(f.p("later/deeper")).unwrap();
    std::fs::write(f.p("later/deeper/secret"), "s1").unwrap();
    assert_eq!(f.changed().await, vec![f.p("later/deeper/secret")]);
    assert_eq!(f.watcher.watched_dirs(), vec![f.p("later/deeper")]);
    std::fs::write(f.p("later/deeper/secret"), "s2").unwrap();
    assert_eq!(f.changed().await, vec![f.p("later/deeper/secret")]);

    // The directory removed and made again: watched again.
    std::fs::remove_dir_all(f.p("later")).unwrap();
    f.quiet().await;
    std::fs::create_dir_all(f.p("later/deeper")).unwrap();
    std::fs::write(f.p("later/deeper/secret"), "s2").unwrap();
    assert_eq!(f.changed().await, vec![f.p("later/deeper/secret")]);
}

#[tokio::test]
async fn a_file_rewritten_forever_still_reloads() {
    let mut f = setup(&[("c.toml", "0")], &["c.toml"]);
    let path = f.p("c.toml");
    let writer = std::thread::spawn(move || {
        // Faster than the debounce, for longer than MAX_DEBOUNCE_WAIT.
        let end = std::time::Instant::now() + tokenwarden::triggers::MAX_DEBOUNCE_WAIT * 2;
        let mut i = 0u64;
        while std::time::Instant::now() < end {
            i += 1;
            std::fs::write(&path, i.to_string()).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let got = timeout(
        tokenwarden::triggers::MAX_DEBOUNCE_WAIT + DEADLINE,
        f.rx.recv(),
    )
    .await;
    assert!(
        matches!(got, Ok(Some(Event::Reload(ReloadReason::Changed(_))))),
        "{got:?}"
    );
    writer.join().unwrap();
}

#[tokio::test]
async fn dropping_the_watcher_stops_it() {
    let f = setup(&[("c.toml", "a")], &["c.toml"]);
    let Fixture {
        _tmp,
        dir,
        mut rx,
        watcher,
    } = f;
    drop(watcher);
    std::fs::write(dir.join("c.toml"), "b").unwrap();
    // The sender is dropped with the thread: the channel closes, nothing is sent.
    match timeout(DEADLINE, rx.recv()).await {
        Ok(None) => {}
        other => panic!("expected the channel to close, got {other:?}"),
    }
}

/// SIGHUP and SIGUSR1 raised in this process once the handlers are installed. SIGTERM and
/// SIGINT are not raised here (the daemon's tests send them to a child process). signal-hook
/// keeps its handlers for the life of the process, so a SIGHUP raised by another test later
/// would be ignored rather than kill the test binary; this is the only test that raises one.
#[tokio::test]
async fn sighup_and_sigusr1_become_events() {
    use nix::sys::signal::{Signal, raise};
    let (tx, mut rx) = mpsc::channel(16);
    let task = signals(tx).unwrap();
    raise(Signal::SIGHUP).unwrap();
    assert_eq!(
        timeout(DEADLINE, rx.recv()).await.unwrap(),
        Some(Event::Reload(ReloadReason::Signal))
    );
    raise(Signal::SIGUSR1).unwrap();
    assert_eq!(
        timeout(DEADLINE, rx.recv()).await.unwrap(),
        Some(Event::RefreshAll)
    );
    drop(task);
    // Closed: the channel ends.
    assert_eq!(timeout(DEADLINE, rx.recv()).await.unwrap(), None);
}

/// A file renamed into place is reported after the short settle, not after the full debounce;
/// a write in place (closed or not) waits for the debounce, since such writes come in series.
#[tokio::test]
async fn a_rename_into_place_reloads_without_waiting_for_the_debounce() {
    let long = Duration::from_secs(4);
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let config = dir.join("c.toml");
    std::fs::write(&config, "a = 1\n").unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let _watcher = FileWatcher::start(vec![config.clone()], long, tx).unwrap();

    // Renamed into place: well before the 4 s debounce.
    let renamed = std::time::Instant::now();
    write_via_rename(&config, "a = 2\n");
    let got = timeout(long / 2, rx.recv()).await;
    assert!(
        matches!(got, Ok(Some(Event::Reload(ReloadReason::Changed(_))))),
        "a rename into place must not wait for the debounce: {got:?} after {:?}",
        renamed.elapsed()
    );

    // Written in place and closed: not before the debounce…
    let written = std::time::Instant::now();
    std::fs::write(&config, "a = 3\n").unwrap();
    if let Ok(ev) = timeout(QUIET, rx.recv()).await {
        panic!("a write in place must wait for the debounce, got {ev:?}");
    }
    // …but after it.
    let got = timeout(long + DEADLINE, rx.recv()).await;
    assert!(
        matches!(got, Ok(Some(Event::Reload(ReloadReason::Changed(_))))),
        "{got:?}"
    );
    assert!(written.elapsed() >= long, "{:?}", written.elapsed());
}
