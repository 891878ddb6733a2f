//! The operator's commands as a new user meets them: finding the daemon from a broken config,
//! `refresh` that never silently does nothing, `init`, `demo`'s checks, `status` for a user
//! who may read nothing, signals in the log, shell completion of client names.

use std::time::Duration;

use crate::support::{DaemonProc, DemoEnv, read, run, run_env, run_setpriv};

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

/// Runs `tokenwarden ARGS` as uid/gid 65534 (nobody), without supplementary groups.
async fn as_nobody(args: &[&str]) -> crate::support::Run {
    run_setpriv(&["--reuid=65534", "--regid=65534", "--clear-groups"], args).await
}

/// A demo whose socket uid 65534 may reach (directory traversable, socket 0666), with
/// `min_interval` long enough that every refresh below falls inside it.
async fn open_env(min_interval: &str) -> DemoEnv {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    env.open_socket_to_everyone();
    env.edit_config(|t| {
        t.replace(
            r#"min_interval = "2s""#,
            &format!("min_interval = {min_interval:?}"),
        )
    });
    env
}

fn generation(get_json: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(get_json).unwrap();
    v["generation"].as_u64().unwrap()
}

/// `tokenwarden refresh` never prints the old token as if it were new. Root (who may send
/// SIGUSR1 anyway) gets a new token at once, inside `min_interval`, like SIGUSR1; another
/// allowed user inside `min_interval` is told "not renewed … next possible in …" and exit 1,
/// and the provider is not asked.
#[tokio::test(flavor = "multi_thread")]
async fn refresh_renews_or_says_why_not() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: refresh_renews_or_says_why_not needs root to act as uid 65534");
        return;
    }
    let env = open_env("60s").await;
    env.edit_config(|t| {
        t.replace(
            "[clients.transatel]\n",
            "[clients.transatel]\nallow_users = [65534]\n",
        )
    });
    let (mut daemon, _notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    let s = env.demo.socket.to_str().unwrap();
    let id = tokenwarden::demo::TRANSATEL_ID;
    let g0 = generation(
        &run(&["get", "transatel", "-s", s, "--format", "json"])
            .await
            .stdout,
    );
    let issued = env.provider.issued(id);

    // Root, twice inside min_interval: two new tokens.
    for n in 1..=2 {
        let r = run(&["refresh", "transatel", "-s", s]).await;
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(
            r.stdout.contains(&format!("generation {}", g0 + n)),
            "refresh {n}: {}",
            r.stdout
        );
        assert_eq!(env.provider.issued(id), issued + n as usize);
    }

    // Another user, inside min_interval: why not, and when; no request.
    let r = as_nobody(&["refresh", "transatel", "-s", s]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    let err = r.stderr.trim_end();
    assert!(
        err.contains("not renewed: last token")
            && err.contains("min_interval 1m")
            && err.contains("next possible in"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(env.provider.issued(id), issued + 2);
    // The token it has is still served to it.
    let r = as_nobody(&["get", "transatel", "-s", s, "--format", "json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(generation(&r.stdout), g0 + 2);
    daemon.stop().await;
}

/// Outside `min_interval`, any allowed user's `refresh` gets a new token.
#[tokio::test(flavor = "multi_thread")]
async fn refresh_by_another_user_renews_outside_min_interval() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: needs root to act as uid 65534");
        return;
    }
    let env = open_env("1s").await;
    env.edit_config(|t| {
        t.replace(
            "[clients.transatel]\n",
            "[clients.transatel]\nallow_users = [65534]\n",
        )
    });
    let (mut daemon, _notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    let s = env.demo.socket.to_str().unwrap();
    let g0 = generation(
        &run(&["get", "transatel", "-s", s, "--format", "json"])
            .await
            .stdout,
    );
    // Retried until the second has passed: each early answer must say when.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = as_nobody(&["refresh", "transatel", "-s", s]).await;
        if r.code == 0 {
            assert!(
                r.stdout.contains(&format!("generation {}", g0 + 1)),
                "{}",
                r.stdout
            );
            break;
        }
        assert!(r.stderr.contains("next possible in"), "{}", r.stderr);
        assert!(std::time::Instant::now() < deadline, "{}", r.stderr);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    daemon.stop().await;
}

/// `tokenwarden init` for every style: a 0600 file never overwritten; with its placeholders
/// still in, `check` refuses it; once filled in (the built-in provider's token URL, the secret
/// files it names), `check` accepts it and `once` gets a token the provider honours.
#[tokio::test(flavor = "multi_thread")]
async fn init_writes_a_config_that_works_once_filled_in_for_every_style() {
    use std::os::unix::fs::PermissionsExt;
    use tokenwarden::keys::{self, SigningAlg};
    use tokenwarden::provider::{Dialect, Provider, RegisteredClient};

    const ID: &str = "my-client-id";
    const PLACEHOLDER_URL: &str = "https://auth.example.com/oauth/token";
    for style in [
        "client-credentials",
        "password",
        "jwt-bearer",
        "private-key-jwt",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let file = d.join("tw.toml");
        let f = file.to_str().unwrap();
        let r = run(&["init", "--style", style, "api", "--output", f]).await;
        assert_eq!(r.code, 0, "{style}: {}", r.stderr);
        assert!(r.stderr.contains("CHANGE"), "{}", r.stderr);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600, "{style}");
        let text = read(&file);
        // The same on stdout.
        let printed = run(&["init", "--style", style, "api"]).await;
        assert_eq!(printed.code, 0);
        assert_eq!(
            printed.stdout,
            text.replace(f, "/etc/tokenwarden/tokenwarden.toml"),
            "{style}"
        );
        // Never overwritten.
        let r = run(&["init", "--style", style, "other", "-o", f]).await;
        assert_eq!(r.code, 1, "{style}");
        assert!(r.stderr.contains("refusing to overwrite"), "{}", r.stderr);
        assert_eq!(read(&file), text);

        // Moved under the temp dir; placeholders still in: refused.
        let moved = text
            .replace("/etc/tokenwarden", d.join("etc").to_str().unwrap())
            .replace("/var/lib/tokenwarden", d.join("state").to_str().unwrap())
            .replace("/run/tokenwarden", d.join("run").to_str().unwrap());
        std::fs::write(&file, &moved).unwrap();
        let r = run(&["check", "-c", f]).await;
        assert_eq!(
            r.code, 2,
            "{style}: placeholders passed check: {}",
            r.stdout
        );

        // Filled in.
        let provider = Provider::start().await.unwrap();
        let secrets = d.join("etc/secrets");
        std::fs::create_dir_all(&secrets).unwrap();
        std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o700)).unwrap();
        let put = |name: &str, value: &str| {
            let p = secrets.join(name);
            std::fs::write(&p, value).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        let secret = uuid::Uuid::new_v4().simple().to_string();
        let (url, filled) = match style {
            "client-credentials" => {
                provider.register(RegisteredClient::transatel(ID, &secret));
                put("api", &format!("{secret}\n"));
                (provider.token_url(Dialect::Transatel), moved.clone())
            }
            "password" => {
                provider.register(RegisteredClient::creads(
                    ID,
                    &secret,
                    "user@example.com",
                    "hunter2-but-longer",
                ));
                put("api", &secret);
                put("api-password", "hunter2-but-longer\n");
                (provider.token_url(Dialect::Creads), moved.clone())
            }
            "jwt-bearer" => {
                let audience = "https://api.example.test";
                provider.register(RegisteredClient::talentsoft_user(ID, &secret, audience));
                put("api", &secret);
                // This provider also wants the user's email and name.
                let claims =
                    format!(r#"aud = "{audience}", email = "jean@example.com", name = "Jean" }}"#);
                let filled = moved.replace(r#"aud = "https://auth.example.com/" }"#, &claims);
                assert_ne!(filled, moved);
                (provider.token_url(Dialect::TalentsoftUser), filled)
            }
            _ => {
                let (private, public) = keys::generate_es256().unwrap();
                provider.register(RegisteredClient::talkdesk(
                    ID,
                    &public,
                    Some("my-key-id"),
                    SigningAlg::ES256,
                ));
                put("api.pem", &private);
                (provider.token_url(Dialect::Talkdesk), moved.clone())
            }
        };
        assert!(filled.contains(PLACEHOLDER_URL), "{style}");
        std::fs::write(&file, filled.replace(PLACEHOLDER_URL, &url)).unwrap();
        let r = run(&["check", "-c", f]).await;
        assert_eq!(r.code, 0, "{style}: {}{}", r.stdout, r.stderr);
        let r = run(&["once", "-c", f]).await;
        assert_eq!(r.code, 0, "{style}: {}{}", r.stdout, r.stderr);
        let token = read(&d.join("run/api.token"));
        assert!(provider.token_is_live(&token), "{style}: {token:?}");
        assert_eq!(provider.token_owner(&token).as_deref(), Some(ID));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn init_refuses_a_bad_name_or_style() {
    let r = run(&["init", "a/b"]).await;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("not a client name"), "{}", r.stderr);
    assert!(r.stdout.is_empty());
    let r = run(&["init", "--style", "saml"]).await;
    assert_eq!(r.code, 2);
}

/// `demo --lifetime`: a bare number gets the hint to add its unit; a lifetime too short for
/// the demo's timing (0s made every client fail) is refused before anything starts.
#[tokio::test(flavor = "multi_thread")]
async fn demo_refuses_lifetimes_it_cannot_keep() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("demo");
    let d = d.to_str().unwrap();
    let r = run(&["demo", "--dir", d, "--lifetime", "20"]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("write 20s"), "{}", r.stderr);
    for short in ["0s", "1s", "500ms"] {
        let r = run(&["demo", "--dir", d, "--lifetime", short]).await;
        assert_eq!(r.code, 2, "{short}: {}", r.stderr);
        assert!(r.stderr.contains("5s to 24h"), "{}", r.stderr);
    }
    assert!(!std::path::Path::new(d).exists(), "the demo started anyway");
    let r = run(&["get", "x", "-s", "/nonexistent", "--min-valid", "5"]).await;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("write 5s"), "{}", r.stderr);
}

/// `status` by a user who may read nothing says so, rather than printing an empty table;
/// `--json` stays an empty array for scripts.
#[tokio::test(flavor = "multi_thread")]
async fn status_says_when_nothing_is_visible() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: status_says_when_nothing_is_visible needs root to act as uid 65534");
        return;
    }
    let env = open_env("2s").await;
    let (mut daemon, _notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    let s = env.demo.socket.to_str().unwrap();
    let r = as_nobody(&["status", "-s", s]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.starts_with("no client visible to uid 65534"),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains("CLIENT"), "{}", r.stdout);
    let r = as_nobody(&["status", "-s", s, "--json"]).await;
    assert_eq!(r.stdout.trim(), "[]");
    // Root sees the table.
    let r = run(&["status", "-s", s]).await;
    assert!(r.stdout.starts_with("CLIENT"), "{}", r.stdout);
    daemon.stop().await;
}

/// SIGHUP and SIGTERM/SIGINT are logged at info, naming the signal.
#[tokio::test(flavor = "multi_thread")]
async fn reload_and_stop_signals_are_logged_at_info() {
    use nix::sys::signal::Signal;
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    for (sig, line) in [
        (Signal::SIGTERM, "SIGTERM received: stopping"),
        (Signal::SIGINT, "SIGINT received: stopping"),
    ] {
        let (mut daemon, _notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;
        daemon.signal(Signal::SIGHUP);
        daemon
            .wait_log("SIGHUP: reloading", Duration::from_secs(5))
            .await;
        daemon.signal(sig);
        let status = daemon.wait_exit(Duration::from_secs(5)).await;
        assert!(status.success(), "{status:?}");
        let logs = daemon.logs();
        let at_info = logs
            .lines()
            .any(|l| l.contains(" INFO ") && l.contains(line));
        assert!(at_info, "{line}:\n{logs}");
    }
}

/// Client names complete after get/refresh/once: from the running daemon, else from the
/// config (even a broken one), through the hidden command the scripts call and through the
/// bash script itself.
#[tokio::test(flavor = "multi_thread")]
async fn shell_completion_offers_client_names() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let c = env.config_path();
    let names = |out: &str| -> Vec<String> { out.lines().map(String::from).collect() };
    let want = env.demo.clients.clone();

    // The daemon down: from the config, broken or not.
    let r = run(&["__complete-clients", "tokenwarden", "get", "-c", c, ""]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(names(&r.stdout), want);
    env.edit_config(|t| format!("{t}\nbroken = \"\n"));
    let r = run_env(
        &["__complete-clients", "tokenwarden", "refresh", ""],
        &[("TOKENWARDEN_CONFIG", c)],
    )
    .await;
    assert_eq!(names(&r.stdout), want, "{}", r.stderr);
    env.edit_config(|t| t.replace("\nbroken = \"\n", ""));

    // The daemon up: from it (the config named here does not exist).
    let (mut daemon, _notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    let s = env.demo.socket.to_str().unwrap();
    let r = run(&[
        "__complete-clients",
        "tokenwarden",
        "get",
        "-s",
        s,
        "-c",
        "/nonexistent",
        "",
    ])
    .await;
    assert_eq!(names(&r.stdout), want, "{}", r.stderr);

    // The bash script, as bash runs it on TAB.
    let assets = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(crate::support::bin())
        .arg("generate-assets")
        .arg(assets.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = assets.path().join("tokenwarden.bash");
    let bin_dir = std::path::Path::new(crate::support::bin())
        .parent()
        .unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    let complete = |line: &str| {
        let words: Vec<&str> = line.split(' ').collect();
        let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        let program = format!(
            "source '{}'; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; \
             _tokenwarden_with_clients tokenwarden; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display(),
            quoted.join(" "),
            words.len() - 1,
        );
        let out = std::process::Command::new("bash")
            .args(["-c", &program])
            .env("PATH", &path)
            .env_remove("TOKENWARDEN_CONFIG")
            .env_remove("TOKENWARDEN_SOCKET")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(names(&complete(&format!("tokenwarden get -s {s} "))), want);
    assert_eq!(
        names(&complete(&format!("tokenwarden refresh -s {s} talent"))),
        ["talentsoft-app", "talentsoft-user"]
    );
    daemon.stop().await;
    // Down again: the config named on the command line.
    assert_eq!(
        names(&complete(&format!("tokenwarden once -c {c} tr"))),
        ["transatel"]
    );
    // Not after a flag that takes a value, nor for other commands' arguments.
    assert!(!complete(&format!("tokenwarden get -c {c} -s ")).contains("transatel"));
    // zsh and fish: the scripts call the same command (not run here: no zsh or fish needed).
    let zsh = read(&assets.path().join("_tokenwarden"));
    assert!(zsh.contains(":_tokenwarden_clients'") && zsh.contains("__complete-clients"));
    let defined = zsh.find("_tokenwarden_clients() {").unwrap();
    let called = zsh
        .find("if [ \"$funcstack[1]\" = \"_tokenwarden\" ]")
        .unwrap();
    assert!(
        defined < called,
        "the helper must exist when the autoloaded file first runs"
    );
    let fish = read(&assets.path().join("tokenwarden.fish"));
    assert!(fish.contains("__complete-clients"), "{fish}");
    // fish answers `complete -C LINE` without a terminal: driven for real where it exists.
    let fish_run = std::process::Command::new("fish")
        .arg("-c")
        .arg(format!(
            "source '{}'; complete -C'tokenwarden refresh -c {c} talent'",
            assets.path().join("tokenwarden.fish").display()
        ))
        .env("PATH", &path)
        .output();
    match fish_run {
        Ok(out) => assert_eq!(
            names(&String::from_utf8_lossy(&out.stdout)),
            ["talentsoft-app", "talentsoft-user"],
            "{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => eprintln!("SKIPPED: fish completion not driven: cannot run fish: {e}"),
    }
    eprintln!("SKIPPED: zsh completion is checked as text only (it needs a terminal to drive)");
}
