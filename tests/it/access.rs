//! `check` warns when the user running it could not run the daemon with the config (a state
//! directory or socket directory it cannot create or write), and `run` says why it stops once.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::support::run_setpriv;

const NOBODY: [&str; 3] = ["--reuid=65534", "--regid=65534", "--clear-groups"];

/// A config readable by uid 65534 (0644 in a root-owned 0755 directory), with a 0644 secret.
fn config_in(dir: &Path, state_dir: &Path, socket: &Path) -> String {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "s3cret-value").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    let path = dir.join("tw.toml");
    std::fs::write(
        &path,
        format!(
            "[daemon]\nsocket = {:?}\nstate_dir = {:?}\n\n[clients.x]\n\
             token_url = \"https://auth.example.com/oauth/token\"\nclient_id = \"id\"\n\
             client_secret = {{ file = {:?} }}\n\n[[clients.x.outputs]]\npath = {:?}\n",
            socket.to_str().unwrap(),
            state_dir.to_str().unwrap(),
            secret.to_str().unwrap(),
            out.join("x.token").to_str().unwrap(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path.to_str().unwrap().to_owned()
}

/// uid 65534 checks a config whose state_dir and socket directory would have to be created in
/// a root-owned 0700 directory it cannot write: two warnings naming each path, exit 0.
#[tokio::test(flavor = "multi_thread")]
async fn check_warns_when_this_user_could_not_run_it() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIPPED: check_warns_when_this_user_could_not_run_it needs root to act as uid 65534"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let locked = tmp.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = locked.join("state");
    let socket = locked.join("run").join("tw.sock");
    let config = config_in(tmp.path(), &state, &socket);

    let r = run_setpriv(&NOBODY, &["check", "-c", &config]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let warnings: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("warning:") && !l.contains("client_secret"))
        .collect();
    assert_eq!(warnings.len(), 2, "{}", r.stderr);
    let state_s = state.to_str().unwrap();
    assert!(
        warnings[0].contains(&format!("state_dir \"{state_s}\""))
            && warnings[0].contains("cannot create it")
            && warnings[0].contains("uid 65534"),
        "{}",
        r.stderr
    );
    assert!(
        warnings[1].contains(socket.to_str().unwrap()) && warnings[1].contains("cannot create it"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("s3cret-value"), "{}", r.stderr);

    // An existing state_dir this user may not write: one warning, naming it.
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&state, Some(65534), None).unwrap();
    std::fs::create_dir(locked.join("run")).unwrap();
    std::os::unix::fs::chown(locked.join("run"), Some(65534), None).unwrap();
    let r = run_setpriv(&NOBODY, &["check", "-c", &config]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("state_dir"), "{}", r.stderr);
    assert!(!r.stderr.contains("socket"), "{}", r.stderr);

    // Root running the same check can do all of it: no such warning.
    let r = crate::support::run(&["check", "-c", &config]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("cannot create"), "{}", r.stderr);
}

/// `run` as uid 65534 with a state_dir it cannot create: the reason once on stderr, exit 1
/// (a runtime failure, docs/cli.md#config-exit-codes-and-errors).
#[tokio::test(flavor = "multi_thread")]
async fn run_says_why_it_stops_once() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: run_says_why_it_stops_once needs root to act as uid 65534");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let locked = tmp.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = locked.join("state");
    let config = config_in(tmp.path(), &state, &tmp.path().join("out").join("tw.sock"));
    std::os::unix::fs::chown(tmp.path().join("out"), Some(65534), None).unwrap();

    let r = run_setpriv(&NOBODY, &["run", "-c", &config]).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    let why: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains("cannot create state directory"))
        .collect();
    assert_eq!(why.len(), 1, "{}", r.stderr);
    assert!(why[0].contains(state.to_str().unwrap()), "{}", r.stderr);
}
