//! A local user attacking the daemon's files: symlinks and directories they can write on the
//! way to an output, the temporary file's mode, the state directory and its files, the config
//! and its includes. The attacker is uid 65534 (a child under `setpriv`), or a directory
//! chowned to it; tests that need root to play both sides print "SKIPPED: …" without it.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokenwarden::outputs::{OutputError, write_atomic};

use crate::support::{DaemonProc, DemoEnv, read, run, token_in, wait_for};

const NOBODY: u32 = 65534;
const SECRET: &str = "attack-SECRET-token-9d1c";

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|r| r.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

// === Outputs: symlinks and directories others can write ===

#[test]
fn a_symlink_for_a_parent_directory_is_refused_and_nothing_is_written_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    fs::create_dir(&victim).unwrap();
    let link = dir.path().join("out");
    std::os::unix::fs::symlink(&victim, &link).unwrap();

    let path = link.join("sub/token");
    let e = write_atomic(&path, SECRET.as_bytes(), 0o600, None, None).unwrap_err();
    assert!(matches!(e, OutputError::UnsafeDir { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(
        msg.contains("symbolic link") && msg.contains(&link.display().to_string()),
        "{msg}"
    );
    assert!(!msg.contains(SECRET));
    assert_eq!(
        entries(&victim),
        Vec::<PathBuf>::new(),
        "written through the link"
    );
}

#[test]
fn a_directory_another_user_owns_on_the_way_is_refused() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to give a directory to uid {NOBODY}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("theirs");
    fs::create_dir(&theirs).unwrap();
    chown(&theirs, NOBODY);
    let open = dir.path().join("open");
    fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    for path in [
        theirs.join("token"),
        theirs.join("a/token"),
        open.join("a/token"),
    ] {
        let e = write_atomic(&path, SECRET.as_bytes(), 0o600, None, None).unwrap_err();
        assert!(
            matches!(e, OutputError::UnsafeDir { .. }),
            "{path:?}: {e:?}"
        );
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(
            msg.contains("can be written by users other than root"),
            "{msg}"
        );
    }
    assert_eq!(entries(&theirs), Vec::<PathBuf>::new());
    assert_eq!(entries(&open), Vec::<PathBuf>::new());

    // A sticky, root-owned directory (like /tmp) may be crossed into a directory we own.
    chmod(&open, 0o1777);
    let ok = open.join("mine/token");
    write_atomic(&ok, b"x", 0o600, None, None).unwrap();
    assert_eq!(fs::read(&ok).unwrap(), b"x");
}

/// The attacker owns a directory on the way and swaps the output's parent between a real
/// directory and a link to a victim directory as fast as it can, while the daemon writes.
/// Nothing may ever land in the victim directory.
#[test]
fn racing_a_symlink_swap_during_writes_never_writes_outside() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to give a directory to uid {NOBODY}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    fs::create_dir(&shared).unwrap();
    chown(&shared, NOBODY);
    let victim = dir.path().join("victim");
    fs::create_dir(&victim).unwrap();
    let sub = shared.join("sub");
    fs::create_dir(&sub).unwrap();
    let path = sub.join("token");

    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, shared, victim) = (stop.clone(), shared.clone(), victim.clone());
        std::thread::spawn(move || {
            let (real, link) = (shared.join("real"), shared.join("link"));
            fs::create_dir(&real).unwrap();
            std::os::unix::fs::symlink(&victim, &link).unwrap();
            let sub = shared.join("sub");
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // sub is a directory, then a link to the victim, then a directory again.
                let _ = fs::rename(&sub, &real);
                let _ = fs::rename(&link, &sub);
                let _ = fs::rename(&sub, &link);
                let _ = fs::rename(&real, &sub);
                n += 1;
            }
            n
        })
    };
    let mut refused = 0;
    for _ in 0..2000 {
        match write_atomic(&path, SECRET.as_bytes(), 0o600, None, None) {
            Ok(()) => {}
            Err(e) => {
                assert!(!e.to_string().contains(SECRET));
                refused += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert_eq!(entries(&victim), Vec::<PathBuf>::new(), "written outside");
    assert_eq!(
        refused, 2000,
        "a write went through a directory uid {NOBODY} owns"
    );
    eprintln!("2000 writes refused during {swaps} swaps");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_and_the_daemon_refuse_an_output_under_a_symlink() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let out = env.demo.out_dir.clone();
    let victim = env.dir.path().join("victim");
    fs::create_dir_all(&victim).unwrap();
    let _ = fs::remove_dir_all(&out);
    std::os::unix::fs::symlink(&victim, &out).unwrap();

    let r = run(&["check", "-c", env.config_path()]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("transatel.token"))
        .unwrap_or_else(|| panic!("no error naming the output: {}", r.stderr));
    assert!(
        line.contains("symbolic link") && line.contains(&out.display().to_string()),
        "{line}"
    );

    let r = run(&["once", "-c", env.config_path()]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(entries(&victim), Vec::<PathBuf>::new());
}

/// The output directory is swapped for a link after the daemon started (after `check`):
/// the write is refused with a clear error and nothing lands in the link's target.
#[tokio::test(flavor = "multi_thread")]
async fn a_symlink_swapped_in_while_running_is_refused_at_write_time() {
    let env = DemoEnv::start(Duration::from_secs(4)).await;
    let out = env.demo.out_dir.clone();
    let mut daemon = DaemonProc::start(&env.demo.config, &[]);
    let first = env.out("transatel.token");
    wait_for("the first token", Duration::from_secs(20), || {
        token_in("transatel.token", &read(&first)).is_some()
    })
    .await;
    let victim = env.dir.path().join("victim");
    fs::create_dir_all(&victim).unwrap();
    fs::rename(&out, env.dir.path().join("out.old")).unwrap();
    std::os::unix::fs::symlink(&victim, &out).unwrap();
    daemon
        .wait_log("refusing to write", Duration::from_secs(20))
        .await;
    let logs = daemon.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("refusing to write"))
        .unwrap_or_default();
    assert!(
        line.contains("symbolic link") && line.contains(&out.display().to_string()),
        "{line}"
    );
    assert_eq!(
        entries(&victim),
        Vec::<PathBuf>::new(),
        "written through the link"
    );
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(10)).await.success());
}

// === The temporary file's mode ===

/// A member of the daemon's group polls the output directory for temporary files and opens
/// every one it sees. The output is mode 0640 for another group: before the chown, the
/// temporary file must not be readable by the daemon's group.
#[test]
fn a_member_of_the_daemons_group_never_opens_a_temporary_file() {
    const WRITES: usize = 1500;
    if !is_root() {
        eprintln!("SKIPPED: needs root to run the poller as uid {NOBODY} in group 0");
        return;
    }
    let python = Path::new("/usr/bin/python3");
    if !python.exists() {
        eprintln!("SKIPPED: /usr/bin/python3 is needed for the polling attacker");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755);
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    let done = dir.path().join("done");
    let poller = r#"
import os, sys, time
d, done = sys.argv[1], sys.argv[2]
opened = polls = 0
deadline = time.time() + 120
while not os.path.exists(done) and time.time() < deadline:
    polls += 1
    for n in os.listdir(d):
        if ".tw-" in n:
            try:
                fd = os.open(os.path.join(d, n), os.O_RDONLY | os.O_NONBLOCK)
                os.close(fd)
                opened += 1
            except OSError:
                pass
print(opened, polls)
"#;
    let child = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--groups=0",
            "--",
            "/usr/bin/python3",
            "-c",
            poller,
        ])
        .arg(&out)
        .arg(&done)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The poller is up once it has listed the directory a few times; give it a head start
    // by writing until it has had time to start (its count covers every write).
    let path = out.join("app.token");
    for _ in 0..WRITES {
        write_atomic(&path, SECRET.as_bytes(), 0o640, None, Some(4242)).unwrap();
    }
    fs::write(&done, "").unwrap();
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let mut it = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
    let (opened, polls) = (it.next().unwrap(), it.next().unwrap());
    eprintln!("{WRITES} writes, {polls} polls, {opened} temporary files opened");
    assert!(polls > 10, "the poller hardly ran: {polls} polls");
    assert_eq!(opened, 0, "the daemon's group read a temporary file");
    let meta = fs::metadata(&path).unwrap();
    assert_eq!((meta.mode() & 0o7777, meta.gid()), (0o640, 4242));
}

// === The state directory ===

#[tokio::test(flavor = "multi_thread")]
async fn a_state_dir_others_can_write_or_own_is_refused() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to give the state directory to uid {NOBODY}");
        return;
    }
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let state = env.dir.path().join("state");
    fs::create_dir_all(&state).unwrap();
    for (what, owner, mode) in [("foreign-owned", NOBODY, 0o700), ("0777", 0, 0o777)] {
        chown(&state, owner);
        chmod(&state, mode);
        let r = run(&["check", "-c", env.config_path()]).await;
        if owner == 0 {
            assert_eq!(r.code, 2, "{what}: {}", r.stderr);
            assert!(
                r.stderr.contains("state_dir") && r.stderr.contains("0777"),
                "{what}: {}",
                r.stderr
            );
        }
        // (root checking a state_dir another user owns checks it as that user would run it:
        // the daemon's user is not known to `check`; the daemon itself refuses it below.)

        let mut daemon = DaemonProc::start(&env.demo.config, &[]);
        let status = daemon.wait_exit(Duration::from_secs(20)).await;
        assert!(!status.success(), "{what}: started");
        let logs = daemon.logs();
        assert!(
            logs.contains(&state.display().to_string())
                && logs.contains(&format!("owned by uid {owner} with mode {mode:04o}")),
            "{what}: {logs}"
        );
        assert!(
            !env.out("transatel.token").exists(),
            "{what}: wrote outputs"
        );
        assert_eq!(
            fs::metadata(&state).unwrap().mode() & 0o7777,
            mode,
            "{what}: changed"
        );
    }
}

/// What a planted state file would make the daemon publish.
fn plant(env: &DemoEnv, client: &str, token: &str) -> Vec<u8> {
    use tokenwarden::secret::Secret;
    use tokenwarden::state::{StateDir, StoredState};
    let config = env.config();
    let fingerprint = config.clients[client].identity_fingerprint();
    let scratch = tempfile::tempdir().unwrap();
    let dir = StateDir::open(&scratch.path().join("s")).unwrap();
    let now = std::time::SystemTime::now();
    dir.save(
        client,
        &StoredState {
            fingerprint,
            token: Some(tokenwarden::token::Token {
                access_token: Secret::new(token),
                token_type: "Bearer".into(),
                issued_at: now,
                expires_at: now + Duration::from_secs(3600),
                scope: Vec::new(),
            }),
            bound_to: None,
            next_refresh_at: None,
            refresh_token: None,
            generation: 41,
            spent_bootstrap: None,
        },
    )
    .unwrap();
    fs::read(scratch.path().join(format!("s/{client}.json"))).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn planted_state_files_are_refused_without_hanging() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to plant a file owned by uid {NOBODY}");
        return;
    }
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let state = env.dir.path().join("state");
    fs::create_dir_all(&state).unwrap();
    chmod(&state, 0o700);
    // transatel: a file owned by another user with the attacker's token in it.
    let planted = state.join("transatel.json");
    fs::write(&planted, plant(&env, "transatel", "ATTACKER-transatel")).unwrap();
    chown(&planted, NOBODY);
    // talkdesk: a symlink to a file with the attacker's token.
    let elsewhere = env.dir.path().join("elsewhere.json");
    fs::write(&elsewhere, plant(&env, "talkdesk", "ATTACKER-talkdesk")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, state.join("talkdesk.json")).unwrap();
    // creads-files: a FIFO, which a blocking open would wait on forever.
    nix::unistd::mkfifo(
        &state.join("creads-files.json"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();

    let mut daemon = DaemonProc::start(&env.demo.config, &[]);
    for name in ["transatel.token", "talkdesk.token", "creads-files.header"] {
        let path = env.out(name);
        wait_for(name, Duration::from_secs(20), || {
            token_in(name, &read(&path)).is_some()
        })
        .await;
        assert!(
            !read(&path).contains("ATTACKER"),
            "{name}: published the planted token"
        );
    }
    let logs = daemon.logs();
    for (client, why) in [
        ("transatel", "owned by uid 65534"),
        ("talkdesk", "symbolic link"),
        ("creads-files", "not a regular file"),
    ] {
        assert!(
            logs.lines().any(|l| l.contains("ignoring the stored state")
                && l.contains(client)
                && l.contains(why)),
            "{client}: {logs}"
        );
    }
    let started = std::time::Instant::now();
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{}", daemon.logs());
    let took = started.elapsed();
    eprintln!("stopped {took:?} after SIGTERM");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

// === Who may change what the daemon does ===

/// A client like the demo's transatel (same provider and credentials) named `name`, writing
/// `out`, and touching `marker` from its `on_change` when given.
fn extra_client(env: &DemoEnv, name: &str, out: &Path, marker: Option<&Path>) -> String {
    let text = read(&env.demo.config);
    let start = text.find("[clients.transatel]\n").unwrap() + "[clients.transatel]\n".len();
    let body: String = text[start..]
        .lines()
        .take_while(|l| !l.starts_with("scope"))
        .map(|l| format!("{l}\n"))
        .collect();
    let on_change = marker
        .map(|m| {
            format!(
                "on_change = [\"/bin/sh\", \"-c\", \"touch {}\"]\n",
                m.display()
            )
        })
        .unwrap_or_default();
    format!("[clients.{name}]\n{body}[[clients.{name}.outputs]]\npath = {out:?}\n{on_change}")
}

/// Adds `include = ["conf.d/*.toml"]` to the demo config and makes `conf.d` (root, 0755).
fn with_conf_d(env: &DemoEnv) -> PathBuf {
    env.edit_config(|t| t.replacen("[daemon]\n", "[daemon]\ninclude = [\"conf.d/*.toml\"]\n", 1));
    let conf_d = env.demo.config.parent().unwrap().join("conf.d");
    fs::create_dir_all(&conf_d).unwrap();
    chmod(&conf_d, 0o755);
    conf_d
}

#[tokio::test(flavor = "multi_thread")]
async fn an_include_others_can_write_is_a_config_error_and_its_on_change_never_runs() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to give an included file to uid {NOBODY}");
        return;
    }
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let conf_d = with_conf_d(&env);
    let marker = env.dir.path().join("on_change-ran");
    let evil = conf_d.join("evil.toml");
    let text = extra_client(&env, "evil", &env.out("evil.token"), Some(&marker));

    // (what, the include's owner and mode, conf.d's mode, words in the error)
    let cases: [(&str, u32, u32, u32, &str); 3] = [
        (
            "owned by another user",
            NOBODY,
            0o644,
            0o755,
            "owner uid 65534",
        ),
        ("group-writable", 0, 0o664, 0o755, "mode 0664"),
        ("in a group-writable conf.d", 0, 0o644, 0o775, "mode 0775"),
    ];
    for (what, owner, mode, dir_mode, words) in cases {
        fs::write(&evil, &text).unwrap();
        chown(&evil, owner);
        chmod(&evil, mode);
        chmod(&conf_d, dir_mode);
        let r = run(&["check", "-c", env.config_path()]).await;
        assert_eq!(r.code, 2, "{what}: {}", r.stderr);
        let line = r
            .stderr
            .lines()
            .find(|l| l.contains("evil.toml"))
            .unwrap_or_else(|| panic!("{what}: no error naming the file: {}", r.stderr));
        assert!(
            line.contains(words) && line.contains("run commands as the daemon"),
            "{what}: {line}"
        );
        let r = run(&["once", "-c", env.config_path()]).await;
        assert_eq!(r.code, 2, "{what}: {}", r.stderr);
        assert!(!marker.exists(), "{what}: its on_change ran");
    }
    // As root's own file in a root-owned conf.d, it is taken (and its on_change runs).
    chown(&evil, 0);
    chmod(&evil, 0o644);
    chmod(&conf_d, 0o755);
    let r = run(&["once", "-c", env.config_path()]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(marker.exists(), "a trusted include's on_change did not run");
}

#[tokio::test(flavor = "multi_thread")]
async fn secret_files_readable_by_others_warn_and_writable_by_others_are_refused() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let secret = env.demo.dir.join("secrets").join("transatel");
    chmod(&secret, 0o644);
    let r = run(&["check", "-c", env.config_path()]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let warning = r
        .stderr
        .lines()
        .find(|l| l.contains(&secret.display().to_string()))
        .unwrap_or_else(|| panic!("no warning naming the secret file: {}", r.stderr));
    assert!(
        warning.contains("can be read by any user") && warning.contains("0644"),
        "{warning}"
    );
    assert!(
        !warning.contains(env.secret("transatel").trim()),
        "{warning}"
    );

    chmod(&secret, 0o666);
    let r = run(&["check", "-c", env.config_path()]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains(&secret.display().to_string()) && r.stderr.contains("mode 0666"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains(env.secret("transatel").trim()));
}

/// A file dropped into an included directory while the daemon runs is read without SIGHUP:
/// its client starts. One dropped by another user is refused (the reload is), and its
/// `on_change` never runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_include_file_is_picked_up_without_sighup() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let conf_d = with_conf_d(&env);
    let mut daemon = DaemonProc::start(&env.demo.config, &[]);
    let first = env.out("transatel.token");
    wait_for("the first token", Duration::from_secs(20), || {
        token_in("transatel.token", &read(&first)).is_some()
    })
    .await;

    if is_root() {
        let marker = env.dir.path().join("evil-ran");
        let evil = conf_d.join("evil.toml");
        // Written elsewhere and moved in whole, owned by the attacker.
        let staging = env.dir.path().join("evil.staging");
        fs::write(
            &staging,
            extra_client(&env, "evil", &env.out("evil.token"), Some(&marker)),
        )
        .unwrap();
        chown(&staging, NOBODY);
        fs::rename(&staging, &evil).unwrap();
        daemon
            .wait_log("reload refused", Duration::from_secs(20))
            .await;
        let logs = daemon.logs();
        assert!(
            logs.lines()
                .any(|l| l.contains("reload refused") && l.contains("evil.toml")),
            "{logs}"
        );
        assert!(!marker.exists() && !env.out("evil.token").exists());
        fs::remove_file(&evil).unwrap();
    } else {
        eprintln!("SKIPPED (part): needs root to drop a file owned by uid {NOBODY}");
    }

    let extra = env.out("extra.token");
    let staging = env.dir.path().join("extra.staging");
    fs::write(&staging, extra_client(&env, "extra", &extra, None)).unwrap();
    chmod(&staging, 0o600);
    fs::rename(&staging, conf_d.join("extra.toml")).unwrap();
    wait_for("the new client's token", Duration::from_secs(20), || {
        token_in("extra.token", &read(&extra)).is_some()
    })
    .await;
    assert!(!daemon.logs().contains("SIGHUP"));
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(10)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_socket_under_a_symlinked_directory_is_refused() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let real = env.dir.path().join("run-real");
    fs::create_dir_all(&real).unwrap();
    let link = env.dir.path().join("run");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let socket = link.join("tw.sock");
    env.edit_config(|t| {
        let start = t.find("socket = ").unwrap();
        let end = start + t[start..].find('\n').unwrap();
        format!("{}socket = {:?}{}", &t[..start], socket, &t[end..])
    });
    let r = run(&["check", "-c", env.config_path()]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("socket") && r.stderr.contains("symbolic link"),
        "{}",
        r.stderr
    );
    // At bind time too (the link swapped in after the check).
    let e = tokenwarden::grpc::server::bind(&socket, 0o600).unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert_eq!(entries(&real), Vec::<PathBuf>::new());
}
