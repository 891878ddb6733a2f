//! What `check` tells about a config in one run: every problem at once, and whether the user
//! running it could run the daemon with it; and `run` saying why it stops, once.

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

/// `check` reports every problem in one run: a stray key in one client, the missing secret
/// file of another, a stray `[daemon]` key, and the same two in an included file, each on
/// its own line, exit 2 (docs/cli.md#check).
#[tokio::test(flavor = "multi_thread")]
async fn check_reports_stray_keys_and_missing_secrets_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let secret = d.join("secret");
    std::fs::write(&secret, "s3cret-value").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let missing = d.join("missing");
    let missing_inc = d.join("missing-inc");
    let inc = d.join("inc.toml");
    std::fs::write(
        &inc,
        format!(
            "[clients.z]\ntoken_url = \"https://auth.example.com/t\"\nclient_id = \"z\"\n\
             client_secret = {{ file = {:?} }}\nshade = 2\n",
            missing_inc.to_str().unwrap()
        ),
    )
    .unwrap();
    let config = d.join("tw.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nstate_dir = {:?}\ninclude = [{:?}]\nbogus = 3\n\n\
             [clients.x]\ntoken_url = \"https://auth.example.com/t\"\nclient_id = \"x\"\n\
             client_secret = {{ file = {:?} }}\ncolour = \"blue\"\n\n\
             [clients.y]\ntoken_url = \"https://auth.example.com/t\"\nclient_id = \"y\"\n\
             client_secret = {{ file = {:?} }}\n",
            d.join("state").to_str().unwrap(),
            inc.to_str().unwrap(),
            secret.to_str().unwrap(),
            missing.to_str().unwrap(),
        ),
    )
    .unwrap();
    for f in [&config, &inc] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let r = crate::support::run(&["check", "-c", config.to_str().unwrap()]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    let has = |needle: &str| r.stderr.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(has("unknown key \"bogus\" in [daemon]"), 1, "{}", r.stderr);
    assert_eq!(
        has("unknown key \"colour\" in [clients.x]"),
        1,
        "{}",
        r.stderr
    );
    assert_eq!(
        has(&format!("cannot read secret file {}:", missing.display())),
        1,
        "{}",
        r.stderr
    );
    assert_eq!(
        has("unknown key \"shade\" in [clients.z]"),
        1,
        "{}",
        r.stderr
    );
    assert_eq!(
        has(&format!(
            "cannot read secret file {}:",
            missing_inc.display()
        )),
        1,
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.lines().count(), 5, "{}", r.stderr);
    assert!(!r.stderr.contains("s3cret-value"), "{}", r.stderr);
}
