//! Token files (docs/configuration.md#how-files-are-written): atomic writes, modes, failures,
//! `write_outputs` and `on_change`.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokenwarden::config::{ClientAuth, ClientConfig, Grant, OutputConfig, OutputFormat, Timing};
use tokenwarden::outputs::{
    CAPTURE_LIMIT, OnChangeError, OnChangeEvent, OutputError, render, run_command, run_on_change,
    write_atomic, write_outputs,
};
use tokenwarden::secret::Secret;
use tokenwarden::token::Token;

const SECRET: &str = "eyJhbGciOiJub25lIn0.c2VjcmV0LXRva2Vu.SECRETSIG";

fn token(value: &str) -> Token {
    let now = SystemTime::now();
    Token {
        access_token: Secret::new(value),
        token_type: "Bearer".into(),
        issued_at: now,
        expires_at: now + Duration::from_secs(3600),
        scope: vec!["a".into()],
    }
}

fn output(path: &Path, format: OutputFormat) -> OutputConfig {
    OutputConfig {
        path: path.to_path_buf(),
        format,
        mode: 0o640,
        owner: None,
        group: None,
        on_change: Vec::new(),
        env_prefix: String::new(),
    }
}

fn client(outputs: Vec<OutputConfig>) -> ClientConfig {
    ClientConfig {
        name: "test".into(),
        token_url: "https://auth.example/token".parse().unwrap(),
        issuer: None,
        grant: Grant::ClientCredentials,
        client_auth: ClientAuth::None,
        client_id: Some("id".into()),
        scope: Vec::new(),
        audience: None,
        resource: None,
        extra_params: Default::default(),
        extra_headers: Default::default(),
        ca_file: None,
        proxy: Default::default(),
        rotate_cron: None,
        allow_uids: Vec::new(),
        allow_gids: Vec::new(),
        outputs,
        timing: Timing::default(),
        tls_client: None,
    }
}

/// Temporary files (`.NAME.tw-XXXXXX`) anywhere under `dir`.
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains(".tw-") {
            found.push(entry.path());
        }
        if entry.file_type().unwrap().is_dir() {
            found.extend(leftovers(&entry.path()));
        }
    }
    found
}

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs `f` on a thread of its own without the capabilities that let root ignore file modes
/// and ownership (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER): root is then
/// refused as any user would be. Capabilities belong to each thread, so the rest of the test
/// binary keeps them.
fn without_file_capabilities<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const FILE_CAPS: u32 = 0b1111; // CAP_CHOWN 0, DAC_OVERRIDE 1, DAC_READ_SEARCH 2, FOWNER 3
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut header = Header {
                    version: VERSION_3,
                    pid: 0,
                };
                let mut data = [Data::default(); 2];
                // SAFETY: capget/capset with a version-3 header and two data structs, as
                // capget(2) documents; pid 0 is this thread.
                unsafe {
                    assert_eq!(
                        libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
                        0
                    );
                    data[0].effective &= !FILE_CAPS;
                    assert_eq!(
                        libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()),
                        0
                    );
                }
                f()
            })
            .join()
            .unwrap()
    })
}

/// Restores the umask when dropped, even if the test fails.
struct UmaskGuard(nix::sys::stat::Mode);

impl Drop for UmaskGuard {
    fn drop(&mut self) {
        nix::sys::stat::umask(self.0);
    }
}

// The only test that changes the process-wide umask. The others set every mode explicitly, so
// they do not care.
#[test]
fn mode_is_exactly_the_configured_one_whatever_the_umask() {
    use nix::sys::stat::{Mode, umask};
    let dir = tempfile::tempdir().unwrap();
    let _guard = UmaskGuard(umask(Mode::from_bits_truncate(0o022)));
    for (mask, mode) in [
        (0o077, 0o640),
        (0o077, 0o644),
        (0o000, 0o600),
        (0o000, 0o640),
        (0o022, 0o666),
        (0o027, 0o400),
    ] {
        umask(Mode::from_bits_truncate(mask));
        let path = dir.path().join(format!("sub{mask:o}/out-{mode:o}"));
        write_atomic(&path, b"one", mode, None, None).unwrap();
        assert_eq!(mode_of(&path), mode, "umask {mask:o}, new file");
        assert_eq!(
            mode_of(path.parent().unwrap()),
            0o755,
            "umask {mask:o}, new dir"
        );
        // Replacing an existing file with another mode gives the new mode too.
        write_atomic(&path, b"two", 0o600, None, None).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(fs::read(&path).unwrap(), b"two");
    }
    assert_eq!(leftovers(dir.path()), Vec::<PathBuf>::new());
}

#[test]
fn missing_parent_directories_are_created_0755() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/c/token");
    write_atomic(&path, b"x", 0o600, None, None).unwrap();
    for d in ["a", "a/b", "a/b/c"] {
        let meta = fs::metadata(dir.path().join(d)).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.mode() & 0o7777, 0o755, "{d}");
    }
    assert_eq!(fs::read(&path).unwrap(), b"x");
    assert_eq!(mode_of(&path), 0o600);
}

#[test]
fn a_reader_sees_only_complete_contents_across_500_replacements() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    let contents: Vec<Vec<u8>> = (0..7).map(|i| vec![b'a' + i as u8; 1 + i * 3001]).collect();
    write_atomic(&path, &contents[0], 0o600, None, None).unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (done, path, contents) = (Arc::clone(&done), path.clone(), contents.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !done.load(Ordering::Relaxed) {
                let got = fs::read(&path).expect("the file is always there");
                assert!(
                    contents.contains(&got),
                    "read a mix: {} bytes starting {:?}",
                    got.len(),
                    got.first()
                );
                reads += 1;
            }
            reads
        })
    };
    for i in 0..500 {
        write_atomic(&path, &contents[i % contents.len()], 0o600, None, None).unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let reads = reader.join().unwrap();
    assert!(reads > 0);
    assert_eq!(fs::read(&path).unwrap(), contents[499 % contents.len()]);
    assert_eq!(leftovers(dir.path()), Vec::<PathBuf>::new());
}

#[test]
fn a_symlink_at_the_final_path_is_replaced_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("elsewhere");
    let path = dir.path().join("token");
    fs::write(&target, "keep me").unwrap();
    std::os::unix::fs::symlink(&target, &path).unwrap();

    write_atomic(&path, b"new", 0o600, None, None).unwrap();
    let meta = fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_file(), "the link itself was replaced");
    assert_eq!(fs::read(&path).unwrap(), b"new");
    assert_eq!(fs::read(&target).unwrap(), b"keep me");
}

#[test]
fn a_parent_that_is_a_file_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("file"), "x").unwrap();
    let path = dir.path().join("file/sub/token");
    let e = write_atomic(&path, SECRET.as_bytes(), 0o600, None, None).unwrap_err();
    assert!(matches!(e, OutputError::CreateDir { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.to_lowercase().contains("not a directory"), "{msg}");
    assert_eq!(fs::read(dir.path().join("file")).unwrap(), b"x");
}

#[test]
fn a_failed_rename_leaves_the_old_content_and_no_temporary_file() {
    // Fails as root too: a file cannot be renamed over a non-empty directory.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    fs::create_dir(&path).unwrap();
    fs::write(path.join("old"), "old").unwrap();
    let e = write_atomic(&path, SECRET.as_bytes(), 0o600, None, None).unwrap_err();
    assert!(matches!(e, OutputError::Rename { .. }), "{e:?}");
    assert!(e.to_string().contains(&path.display().to_string()));
    assert!(!format!("{e} {e:?}").contains(SECRET));
    assert_eq!(fs::read(path.join("old")).unwrap(), b"old");
    assert_eq!(leftovers(dir.path()), Vec::<PathBuf>::new());
}

#[test]
fn a_read_only_directory_leaves_the_old_file_intact() {
    without_file_capabilities(a_read_only_directory_leaves_the_old_file_intact_unprivileged);
}

fn a_read_only_directory_leaves_the_old_file_intact_unprivileged() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("ro");
    fs::create_dir(&sub).unwrap();
    let path = sub.join("token");
    write_atomic(&path, b"old", 0o600, None, None).unwrap();
    fs::set_permissions(&sub, fs::Permissions::from_mode(0o555)).unwrap();
    let e = write_atomic(&path, b"new", 0o600, None, None).unwrap_err();
    fs::set_permissions(&sub, fs::Permissions::from_mode(0o755)).unwrap();
    assert!(matches!(e, OutputError::CreateTemp { .. }), "{e:?}");
    assert!(e.to_string().contains(&path.display().to_string()));
    assert!(e.to_string().contains("ermission denied"), "{e}");
    assert_eq!(fs::read(&path).unwrap(), b"old");
    assert_eq!(leftovers(dir.path()), Vec::<PathBuf>::new());
}

#[test]
fn a_chown_the_daemon_may_not_do_fails_before_the_rename() {
    without_file_capabilities(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        write_atomic(&path, b"old", 0o600, None, None).unwrap();
        // Another user than this one.
        let other = if is_root() { 65534 } else { 0 };
        let e = write_atomic(&path, b"new", 0o600, Some(other), None).unwrap_err();
        assert!(matches!(e, OutputError::Chown { .. }), "{e:?}");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(leftovers(dir.path()), Vec::<PathBuf>::new());
    });
}

#[test]
fn one_failing_output_does_not_stop_the_others() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("file"), "x").unwrap();
    let bad = dir.path().join("file/token");
    let good_token = dir.path().join("out/token");
    let good_header = dir.path().join("out/header");
    let c = client(vec![
        output(&good_token, OutputFormat::Token),
        output(&bad, OutputFormat::Json),
        output(&good_header, OutputFormat::Header),
    ]);
    let reports = write_outputs(&c, &token(SECRET));
    assert_eq!(reports.len(), 3);
    assert_eq!(reports[0].path, good_token);
    assert!(matches!(reports[0].result, Ok(true)));
    assert!(reports[1].result.is_err());
    assert!(matches!(reports[2].result, Ok(true)));
    assert_eq!(fs::read(&good_token).unwrap(), SECRET.as_bytes());
    assert_eq!(
        fs::read(&good_header).unwrap(),
        format!("Authorization: Bearer {SECRET}\n").as_bytes()
    );
    assert_eq!(mode_of(&good_token), 0o640);
    let shown = format!("{:?}", reports);
    assert!(!shown.contains(SECRET), "{shown}");
    assert!(shown.contains(&bad.display().to_string()));
}

#[test]
fn a_broken_token_is_refused_and_the_old_file_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    let c = client(vec![output(&path, OutputFormat::Env)]);
    assert!(matches!(
        write_outputs(&c, &token("good"))[0].result,
        Ok(true)
    ));
    let reports = write_outputs(&c, &token("bad\nEVIL=1"));
    assert!(matches!(
        reports[0].result,
        Err(OutputError::UnsafeToken { .. })
    ));
    assert!(
        fs::read_to_string(&path)
            .unwrap()
            .starts_with("ACCESS_TOKEN=good\n")
    );
}

#[test]
fn unchanged_content_is_not_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token.json");
    let out = output(&path, OutputFormat::Json);
    let c = client(vec![out.clone()]);
    let t = token(SECRET);
    assert!(matches!(write_outputs(&c, &t)[0].result, Ok(true)));

    // Push the mtime into the past, so a rewrite would show.
    let past = SystemTime::now() - Duration::from_secs(86_400);
    fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(past)
        .unwrap();
    let before = fs::metadata(&path).unwrap();

    assert!(matches!(write_outputs(&c, &t)[0].result, Ok(false)));
    let after = fs::metadata(&path).unwrap();
    assert_eq!(after.modified().unwrap(), past);
    assert_eq!(after.ino(), before.ino());
    assert_eq!(fs::read(&path).unwrap(), *render(&out, &t).unwrap());

    // A different mode, or different content, is rewritten.
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(write_outputs(&c, &t)[0].result, Ok(true)));
    assert_eq!(mode_of(&path), 0o640);
    let other = Token {
        access_token: Secret::new("other"),
        ..t.clone()
    };
    assert!(matches!(write_outputs(&c, &other)[0].result, Ok(true)));
    assert!(matches!(write_outputs(&c, &other)[0].result, Ok(false)));
    assert_eq!(leftovers(dir.path()), Vec::<PathBuf>::new());
}

#[test]
fn a_symlink_holding_the_same_content_is_still_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    let path = dir.path().join("token");
    let out = output(&path, OutputFormat::Token);
    fs::write(&target, SECRET).unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink(&target, &path).unwrap();
    let reports = write_outputs(&client(vec![out]), &token(SECRET));
    assert!(matches!(reports[0].result, Ok(true)));
    assert!(fs::symlink_metadata(&path).unwrap().file_type().is_file());
}

// === on_change ===

/// The event every `on_change` here is told about.
const EVENT: OnChangeEvent<'static> = OnChangeEvent {
    client: "api",
    generation: 1,
    expires_at: std::time::SystemTime::UNIX_EPOCH,
};

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

#[tokio::test]
async fn on_change_runs_each_distinct_command_once_and_captures_output() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let script = format!(
        "echo hi >> '{}'; echo out; echo err >&2; exit 3",
        log.display()
    );
    let mut a = output(&dir.path().join("a"), OutputFormat::Token);
    let mut b = output(&dir.path().join("b"), OutputFormat::Json);
    let mut c = output(&dir.path().join("c"), OutputFormat::Env);
    let d = output(&dir.path().join("d"), OutputFormat::Header);
    a.on_change = sh(&script);
    b.on_change = sh(&script);
    c.on_change = sh("echo second");
    let reports = run_on_change(&client(vec![a, b, c, d]), &EVENT, Duration::from_secs(30)).await;

    assert_eq!(reports.len(), 2);
    assert_eq!(reports[0].argv, sh(&script));
    let first = reports[0].result.as_ref().unwrap();
    assert_eq!(first.status.code(), Some(3));
    assert_eq!(first.stdout, "out\n");
    assert_eq!(first.stderr, "err\n");
    assert_eq!(fs::read_to_string(&log).unwrap(), "hi\n");
    let second = reports[1].result.as_ref().unwrap();
    assert!(second.status.success());
    assert_eq!(second.stdout, "second\n");
}

#[tokio::test]
async fn on_change_output_is_capped_and_drained() {
    let out = run_command(
        &sh("head -c 1000000 /dev/zero; echo done >&2"),
        &EVENT,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), CAPTURE_LIMIT);
    assert_eq!(out.stderr, "done\n");
}

/// A process that left the command's group (setsid) keeps its stdout open: the command still
/// ends by its timeout, with what it printed, instead of waiting for that process.
#[tokio::test]
async fn output_held_open_outside_the_group_ends_at_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let left = dir.path().join("left");
    // The command waits until the other process is out of its group, then ends.
    let script = format!(
        "setsid sh -c 'touch \"$0\"; exec sleep 20' '{0}' </dev/null & \
         while [ ! -e '{0}' ]; do sleep 0.01; done; echo hi",
        left.display()
    );
    let started = Instant::now();
    let out = run_command(&sh(&script), &EVENT, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, "hi\n");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// Whether `pid` is gone (or a zombie nobody reaped yet: it no longer runs).
fn gone(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn a_command_over_its_timeout_is_killed_with_its_children() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let script = format!("sleep 300 & echo $$ $! > '{}'; wait", pids.display());
    let started = Instant::now();
    let e = run_command(&sh(&script), &EVENT, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(matches!(e, OnChangeError::Timeout { .. }), "{e:?}");
    assert!(e.to_string().contains("/bin/sh"), "{e}");
    let text = fs::read_to_string(&pids).unwrap();
    for pid in text.split_whitespace() {
        let pid: i32 = pid.parse().unwrap();
        wait_until(&format!("process {pid} to die"), || gone(pid));
    }
}

#[tokio::test]
async fn a_missing_program_is_a_clear_error() {
    let argv = vec!["/nonexistent/tokenwarden-hook".to_string(), "x".into()];
    let e = run_command(&argv, &EVENT, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(e, OnChangeError::Spawn { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("/nonexistent/tokenwarden-hook"), "{msg}");
    assert!(msg.contains("No such file"), "{msg}");
    assert!(matches!(
        run_command(&[], &EVENT, Duration::from_secs(5)).await,
        Err(OnChangeError::Empty)
    ));
}

#[tokio::test]
async fn a_background_child_holding_the_output_does_not_hold_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    // The command exits at once but leaves a process holding stdout open: it is killed when
    // the command exits, and the report says so.
    let script = format!("sleep 300 & echo $! > '{}'; echo bye", pid_file.display());
    let started = Instant::now();
    let out = run_command(&sh(&script), &EVENT, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "held until the timeout"
    );
    assert!(out.status.success());
    assert_eq!(out.stdout, "bye\n");
    assert!(out.left_running);
    let pid: i32 = fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_until("the background child to be killed", || gone(pid));
}

#[test]
fn owner_and_group_are_applied_before_the_rename() {
    let (uid, gid) = if is_root() {
        (65534, 65534)
    } else {
        (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    write_atomic(&path, b"x", 0o640, Some(uid), Some(gid)).unwrap();
    let meta = fs::metadata(&path).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (uid, gid));
    assert_eq!(meta.mode() & 0o7777, 0o640);

    // write_outputs sees the right owner as current, and a wrong one as a reason to rewrite.
    let mut out = output(&path, OutputFormat::Token);
    out.owner = Some(uid);
    out.group = Some(gid);
    let t = token("x");
    assert!(matches!(
        write_outputs(&client(vec![out.clone()]), &t)[0].result,
        Ok(false)
    ));
    if is_root() {
        out.owner = Some(0);
        assert!(matches!(
            write_outputs(&client(vec![out]), &t)[0].result,
            Ok(true)
        ));
        assert_eq!(fs::metadata(&path).unwrap().uid(), 0);
    }
}

// === CAP_CHOWN ===

/// The warning `check` gives for an output whose owner this process cannot apply.
const NO_CAP_CHOWN: &str = "lacks CAP_CHOWN";

/// `setpriv` arguments that drop CAP_CHOWN: from the bounding set, so a root child does not
/// get it back at exec, and from the inheritable set.
const WITHOUT_CHOWN: [&str; 2] = ["--inh-caps=-chown", "--bounding-set=-chown"];

#[tokio::test(flavor = "multi_thread")]
async fn check_warns_exactly_when_an_owner_needs_a_cap_chown_the_process_lacks() {
    use crate::support::run_setpriv;
    if !is_root() {
        eprintln!("SKIPPED: needs root to run children with other ids and capabilities");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let config = |owner: u32| {
        let path = dir.path().join(format!("owner-{owner}.toml"));
        fs::write(
            &path,
            format!(
                "[clients.a]\ntoken_url = \"https://auth.example/token\"\nclient_id = \"c\"\n\
                 client_secret = \"s\"\n[[clients.a.outputs]]\npath = \"/run/tw/a.token\"\n\
                 owner = {owner}\n"
            ),
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        path.to_str().unwrap().to_string()
    };
    let (to_root, to_nobody) = (config(0), config(65534));
    let nobody = ["--reuid=65534", "--regid=65534", "--clear-groups"];
    let nobody_with_chown = [
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=+chown",
        "--ambient-caps=+chown",
    ];
    // (who runs check, setpriv arguments, config, warned)
    let cases: [(&str, &[&str], &str, bool); 6] = [
        ("root", &[], &to_nobody, false),
        ("root without CAP_CHOWN", &WITHOUT_CHOWN, &to_nobody, true),
        (
            "root without CAP_CHOWN, owner root",
            &WITHOUT_CHOWN,
            &to_root,
            false,
        ),
        ("nobody", &nobody, &to_root, true),
        ("nobody, owner itself", &nobody, &to_nobody, false),
        (
            "nobody with ambient CAP_CHOWN",
            &nobody_with_chown,
            &to_root,
            false,
        ),
    ];
    for (who, setpriv, config, warned) in cases {
        let r = run_setpriv(setpriv, &["check", "-c", config]).await;
        assert_eq!(r.code, 0, "{who}: {}", r.stderr);
        let all = format!("{}{}", r.stdout, r.stderr);
        assert_eq!(all.contains(NO_CAP_CHOWN), warned, "{who}: {all}");
        if warned {
            assert!(
                all.contains("/run/tw/a.token"),
                "{who}: names the output: {all}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_cap_chown_an_owned_output_fails_clearly_and_nothing_else_does() {
    use crate::support::{DemoEnv, read, run, run_setpriv, token_in};
    if !is_root() {
        eprintln!("SKIPPED: needs root to drop CAP_CHOWN from a child");
        return;
    }
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    // The first transatel output (transatel.token) goes to nobody.
    env.edit_config(|t| {
        t.replacen(
            "[[clients.transatel.outputs]]\n",
            "[[clients.transatel.outputs]]\nowner = 65534\n",
            1,
        )
    });
    let owned = env.out("transatel.token");

    let r = run_setpriv(&WITHOUT_CHOWN, &["once", "-c", env.config_path()]).await;
    assert_eq!(r.code, 1, "a write failed: exit 1; {}", r.stderr);
    // Warned at load, then the write refused with what to do, on one line naming the file.
    assert!(r.stderr.contains(NO_CAP_CHOWN), "{}", r.stderr);
    let failure: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains("cannot give it owner 65534"))
        .collect();
    assert!(!failure.is_empty(), "{}", r.stderr);
    for l in &failure {
        assert!(
            l.contains(&owned.display().to_string()) && l.contains("CAP_CHOWN"),
            "{l}"
        );
    }
    // The owned output is not written (no file rather than a file owned by the wrong user),
    // no temporary file is left, and every other output has its token.
    assert!(!owned.exists(), "written without its owner");
    assert_eq!(leftovers(&env.demo.out_dir), Vec::<PathBuf>::new());
    for name in [
        "transatel.json",
        "creads-files.header",
        "talentsoft-app.env",
        "talentsoft-user.json",
        "talkdesk.token",
    ] {
        let text = read(&env.out(name));
        assert!(token_in(name, &text).is_some(), "{name}: {text:?}");
    }

    // With CAP_CHOWN, the same config writes it with its owner.
    let r = run(&["once", "-c", env.config_path()]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains(NO_CAP_CHOWN), "{}", r.stderr);
    let meta = fs::metadata(&owned).unwrap();
    assert_eq!(meta.uid(), 65534);
    assert!(token_in("transatel.token", &read(&owned)).is_some());
}
