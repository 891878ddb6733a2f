//! The operator's commands as a new user meets them: finding the daemon from a broken config,
//! `refresh` that never silently does nothing, `init`, `demo`'s checks, `status` for a user
//! who may read nothing, signals in the log, shell completion of client names.

use std::time::Duration;

use crate::support::{DaemonProc, DemoEnv, read, run, run_env};

/// A syntax error in the config (a reload the daemon rightly refused) does not hide the
/// daemon: `status -c` still finds the socket, and says the config has errors.
#[tokio::test(flavor = "multi_thread")]
async fn status_finds_the_daemon_through_a_broken_config() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let (mut daemon, _notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    // An unterminated string after the [daemon] table, as a hurried edit leaves it.
    env.edit_config(|t| format!("{t}\n[clients.new]\ntoken_url = \"https://x\n"));
    daemon
        .wait_log("reload refused", Duration::from_secs(10))
        .await;

    let r = run(&["status", "-c", env.config_path()]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.lines().count(), 6, "{}", r.stdout);
    assert!(
        r.stderr.contains("has errors") && r.stderr.contains("tokenwarden check -c"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    // get and refresh too, through $TOKENWARDEN_CONFIG.
    let r = run_env(
        &["get", "transatel"],
        &[("TOKENWARDEN_CONFIG", env.config_path())],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(env.provider.token_is_live(r.stdout.trim_end()));
    // A good config says nothing more.
    env.edit_config(|t| t.replace("\n[clients.new]\ntoken_url = \"https://x\n", ""));
    let r = run(&["status", "-c", env.config_path()]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    daemon.stop().await;
}

/// `-s`, then `$TOKENWARDEN_SOCKET`, then the config's `daemon.socket`: the environment
/// wins over the config, both ways round.
#[tokio::test(flavor = "multi_thread")]
async fn the_environment_names_the_socket_before_the_config() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let (mut daemon, _notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    let real = env.demo.socket.to_str().unwrap();
    let elsewhere = env.demo.dir.join("elsewhere.sock");
    let elsewhere = elsewhere.to_str().unwrap();

    // The config names the real socket, the environment another: the environment's is used.
    let r = run_env(
        &["status", "-c", env.config_path()],
        &[("TOKENWARDEN_SOCKET", elsewhere)],
    )
    .await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.stderr.contains("not running") && r.stderr.contains(elsewhere),
        "{}",
        r.stderr
    );
    // The config names another, the environment the real one. (A copy: the running daemon
    // would follow an edit of its own config.)
    let other = env.demo.dir.join("other.toml");
    std::fs::write(&other, read(&env.demo.config).replace(real, elsewhere)).unwrap();
    let other = other.to_str().unwrap();
    let r = run(&["status", "-c", other]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stderr.contains(elsewhere), "{}", r.stderr);
    let r = run_env(&["status", "-c", other], &[("TOKENWARDEN_SOCKET", real)]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    // -s wins over both.
    let r = run_env(
        &["status", "-c", other, "-s", real],
        &[("TOKENWARDEN_SOCKET", elsewhere)],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    daemon.stop().await;
}
