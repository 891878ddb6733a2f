//! The `tokenwarden` binary as a user runs it: `check`, `once` and their exit codes, files,
//! state reuse, the refresh-token chain, and logs free of secrets.

use std::time::Duration;

use serde_json::Value;

use crate::support::{DemoEnv, read, run, secret_material};

#[tokio::test(flavor = "multi_thread")]
async fn once_gets_every_dialect_then_reuses_the_stored_tokens() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let r = run(&["once", "-c", env.config_path()]).await;
    assert_eq!(r.code, 0, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{}", r.stdout);
    for (line, name) in lines.iter().zip(&env.demo.clients) {
        assert!(line.starts_with(name.as_str()), "{line}");
        assert!(line.contains(" new "), "{line}");
        assert!(line.contains(" expires 20"), "{line}");
    }

    // token: the bare token, no newline, live at the provider.
    let token = read(&env.out("transatel.token"));
    assert!(!token.is_empty() && !token.ends_with('\n'));
    assert!(env.provider.token_is_live(&token));
    let fp = &tokenwarden::secret::fingerprint(token.as_bytes());
    assert!(r.stdout.contains(&format!("token {fp}")), "{}", r.stdout);
    // json: the five fields, RFC 3339 UTC times.
    let json: Value = serde_json::from_str(&read(&env.out("transatel.json"))).unwrap();
    assert_eq!(json["access_token"], token.as_str());
    assert_eq!(json["token_type"], "Bearer");
    assert_eq!(json["scope"], "CATALOG_PRODUCTS_READ USER_READ");
    for k in ["expires_at", "issued_at"] {
        let t = json[k].as_str().unwrap();
        assert!(
            t.ends_with('Z') && humantime::parse_rfc3339(t).is_ok(),
            "{k}: {t}"
        );
    }
    // header: for curl -H @file.
    let header = read(&env.out("creads-files.header"));
    assert!(header.starts_with("Authorization: Bearer ") && header.ends_with('\n'));
    assert!(
        env.provider
            .token_is_live(header.trim_end().rsplit(' ').next().unwrap())
    );
    // env: prefixed names.
    let envfile = read(&env.out("talentsoft-app.env"));
    let names: Vec<&str> = envfile
        .lines()
        .map(|l| l.split('=').next().unwrap())
        .collect();
    assert_eq!(
        names,
        ["TS_ACCESS_TOKEN", "TS_TOKEN_TYPE", "TS_TOKEN_EXPIRES_AT"]
    );
    // Modes: 0600 files, 0700 state.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&env.out("transatel.token")), 0o600);
    assert_eq!(mode(&env.demo.state_dir), 0o700);
    let issued_before: usize = ["demo-transatel", "demo-creads", "demo-talkdesk"]
        .iter()
        .map(|c| env.provider.issued(c))
        .sum();
    let mtime = std::fs::metadata(env.out("transatel.token"))
        .unwrap()
        .modified()
        .unwrap();

    // Again: every token is reused from the state directory, no request, files untouched.
    let requests = env.provider.requests().len();
    let r = run(&["once", "-c", env.config_path()]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.matches(" reused ").count(), 5, "{}", r.stdout);
    assert_eq!(
        env.provider.requests().len(),
        requests,
        "no provider request"
    );
    let issued_after: usize = ["demo-transatel", "demo-creads", "demo-talkdesk"]
        .iter()
        .map(|c| env.provider.issued(c))
        .sum();
    assert_eq!(issued_before, issued_after);
    assert_eq!(
        std::fs::metadata(env.out("transatel.token"))
            .unwrap()
            .modified()
            .unwrap(),
        mtime
    );
    assert_eq!(read(&env.out("transatel.token")), token);

    // A deleted output is written again from the stored token.
    std::fs::remove_file(env.out("transatel.token")).unwrap();
    let r = run(&["once", "-c", env.config_path(), "transatel"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(read(&env.out("transatel.token")), token);
    assert_eq!(env.provider.requests().len(), requests);
}

#[tokio::test(flavor = "multi_thread")]
async fn once_keeps_the_refresh_token_chain_and_survives_a_dead_one() {
    // 3 s tokens are never worth reusing (refresh_margin is 5 s): every run asks the provider.
    let env = DemoEnv::start(Duration::from_secs(3)).await;
    for _ in 0..3 {
        let r = run(&["once", "-c", env.config_path(), "creads-files"]).await;
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    assert_eq!(
        env.grants_at("/creads/"),
        ["password", "refresh_token", "refresh_token"]
    );
    let state: Value =
        serde_json::from_str(&read(&env.demo.state_dir.join("creads-files.json"))).unwrap();
    assert_eq!(state["generation"], 3);
    assert!(state["refresh_token"].is_string());

    env.provider
        .revoke_refresh_tokens(tokenwarden::demo::CREADS_ID);
    let r = run(&["once", "-c", env.config_path(), "creads-files"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("stored refresh token was refused"),
        "{}",
        r.stderr
    );
    assert_eq!(
        env.grants_at("/creads/"),
        [
            "password",
            "refresh_token",
            "refresh_token",
            "refresh_token",
            "password"
        ]
    );
    let r = run(&["once", "-c", env.config_path(), "creads-files"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(env.grants_at("/creads/").last().unwrap(), "refresh_token");
}

#[tokio::test(flavor = "multi_thread")]
async fn once_reports_each_failure_on_its_own_line_and_exits_1() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    env.provider.shutdown();
    env.edit_config(|t| t.replace("[defaults]", "[defaults]\ntimeout = \"2s\""));
    let r = run(&["once", "-c", env.config_path()]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert_eq!(r.stdout, "");
    for name in &env.demo.clients {
        assert!(
            r.stderr
                .lines()
                .any(|l| l.starts_with(&format!("{name}: cannot connect to the token endpoint"))),
            "{name}: {}",
            r.stderr
        );
    }
    assert!(!env.out("transatel.token").exists());

    // Unknown client: bad usage.
    let r = run(&["once", "-c", env.config_path(), "nope"]).await;
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("no client named \"nope\""),
        "{}",
        r.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_provider_does_not_cost_the_stored_token_or_refresh_token() {
    let env = DemoEnv::start(Duration::from_secs(3)).await;
    let r = run(&["once", "-c", env.config_path(), "creads-files"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let state_before = read(&env.demo.state_dir.join("creads-files.json"));
    let header_before = read(&env.out("creads-files.header"));
    env.provider
        .set_fault(Some(tokenwarden::provider::Fault::ServerError));
    let r = run(&["once", "-c", env.config_path(), "creads-files"]).await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("creads-files: HTTP 500"), "{}", r.stderr);
    assert_eq!(
        read(&env.demo.state_dir.join("creads-files.json")),
        state_before
    );
    assert_eq!(read(&env.out("creads-files.header")), header_before);
    env.provider.set_fault(None);
    let r = run(&["once", "-c", env.config_path(), "creads-files"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(env.grants_at("/creads/").last().unwrap(), "refresh_token");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_accepts_good_configs_and_refuses_bad_ones_with_locations() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let r = run(&["check", "-c", env.config_path()]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("OK, 5 clients"), "{}", r.stdout);

    env.edit_config(|t| {
        t.replace("grant_type = \"password\"", "grant_type = \"pasword\"")
            .replace("scope = \"files\"", "scope = \"files\"\ntokn_url = \"x\"")
    });
    let r = run(&["check", "-c", env.config_path()]).await;
    assert_eq!(r.code, 2);
    let cfg = env.config_path();
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(cfg) && l.contains("did you mean \"password\"")),
        "{}",
        r.stderr
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(cfg) && l.contains("did you mean \"token_url\"")),
        "{}",
        r.stderr
    );
    // once refuses the same config the same way.
    let r = run(&["once", "-c", env.config_path()]).await;
    assert_eq!(r.code, 2);

    let r = run(&["check", "-c", "/nonexistent/tokenwarden.toml"]).await;
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("/nonexistent/tokenwarden.toml"),
        "{}",
        r.stderr
    );
    let r = run(&["frobnicate"]).await;
    assert_eq!(r.code, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn trace_logs_of_whole_runs_hold_no_secret() {
    let env = DemoEnv::start(Duration::from_secs(3)).await;
    let mut logs = String::new();
    for _ in 0..2 {
        let r = run(&["once", "-c", env.config_path(), "--log-level", "trace"]).await;
        assert_eq!(r.code, 0, "{}", r.stderr);
        logs.push_str(&r.stdout);
        logs.push_str(&r.stderr);
    }
    // A failing round too: error paths log as well.
    env.provider
        .revoke_refresh_tokens(tokenwarden::demo::CREADS_ID);
    env.provider
        .fault_next(tokenwarden::provider::Fault::HtmlError, 2);
    let r = run(&["once", "-c", env.config_path(), "--log-level", "trace"]).await;
    logs.push_str(&r.stdout);
    logs.push_str(&r.stderr);
    assert!(
        logs.contains("new token"),
        "trace logs were captured: {logs}"
    );
    assert!(logs.contains("TRACE") || logs.contains("DEBUG"), "{logs}");
    let secrets = secret_material(&env, []);
    assert!(secrets.len() > 20, "{}", secrets.len());
    for s in &secrets {
        assert!(
            !logs.contains(s.as_str()),
            "secret material in logs: {}…",
            &s[..6]
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn log_formats_journald_and_json() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    // Under journald (JOURNAL_STREAM set, log_format auto): priority prefixes, no timestamps.
    let r = crate::support::run_env(
        &["once", "-c", env.config_path(), "--log-level", "info"],
        &[("JOURNAL_STREAM", "8:12345")],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert!(!lines.is_empty());
    for l in &lines {
        assert!(
            l.starts_with("<6>")
                || l.starts_with("<4>")
                || l.starts_with("<3>")
                || l.starts_with("<7>"),
            "{l}"
        );
        assert!(
            !l.contains("2026-") || l.contains("expires_at"),
            "no timestamp prefix: {l}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>") && l.contains("new token")),
        "{}",
        r.stderr
    );

    // JSON for log shippers: one object per line.
    env.edit_config(|t| {
        t.replace(
            "log_level = \"info\"",
            "log_level = \"info\"\nlog_format = \"json\"",
        )
    });
    let r = run(&["once", "-c", env.config_path(), "--log-level", "info"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut n = 0;
    for l in r.stderr.lines() {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
        n += 1;
    }
    assert!(n >= 5, "{}", r.stderr);
}

/// `get --format k8s-exec` as kubectl runs it (docs/kubernetes.md): one
/// `client.authentication.k8s.io/v1` ExecCredential carrying the daemon's current token and its
/// expiry; `--min-valid` as with the other formats; errors on stderr and nothing on stdout.
#[tokio::test(flavor = "multi_thread")]
async fn get_k8s_exec_prints_an_exec_credential_that_expires_with_the_token() {
    use crate::support::{DaemonProc, run_env, wait_for};
    let env = DemoEnv::start(Duration::from_secs(20)).await;
    let (_daemon, _notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    let s = env.demo.socket.to_str().unwrap();
    // What kubectl puts in the environment with `interactiveMode: Never`.
    let exec_info = r#"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1","spec":{"interactive":false}}"#;
    let get = |min_valid: Option<&'static str>| {
        let mut args = vec!["get", "transatel", "-s", s, "--format", "k8s-exec"];
        args.extend(min_valid.map(|m| ["--min-valid", m]).into_iter().flatten());
        async move { run_env(&args, &[("KUBERNETES_EXEC_INFO", exec_info)]).await }
    };
    let file_token = || read(&env.out("transatel.token")).trim_end().to_string();
    let file_expiry = || {
        let v: Value = serde_json::from_str(&read(&env.out("transatel.json"))).unwrap();
        v["expires_at"].as_str().unwrap().to_string()
    };
    let credential = |stdout: &str| -> Value {
        assert_eq!(stdout.lines().count(), 1, "one JSON line: {stdout}");
        let v: Value = serde_json::from_str(stdout).unwrap();
        assert_eq!(v["kind"], "ExecCredential", "{v}");
        assert_eq!(v["apiVersion"], "client.authentication.k8s.io/v1", "{v}");
        let expiry = v["status"]["expirationTimestamp"].as_str().unwrap();
        assert!(
            expiry.ends_with('Z') && humantime::parse_rfc3339(expiry).is_ok(),
            "RFC 3339 in UTC: {expiry}"
        );
        v
    };

    let r = get(None).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    let v = credential(&r.stdout);
    let first = file_token();
    assert_eq!(v["status"]["token"], first.as_str());
    let first_expiry = file_expiry();
    assert_eq!(v["status"]["expirationTimestamp"], first_expiry.as_str());

    // --min-valid: once min_interval (2 s in the demo) has passed since the token was issued, a
    // new token with a later expiry, the one the daemon also wrote to its files.
    let issued: Value = serde_json::from_str(&read(&env.out("transatel.json"))).unwrap();
    let issued = humantime::parse_rfc3339(issued["issued_at"].as_str().unwrap()).unwrap();
    wait_for("min_interval to pass", Duration::from_secs(10), || {
        std::time::SystemTime::now() >= issued + Duration::from_millis(3100)
    })
    .await;
    let r = get(Some("19s")).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = credential(&r.stdout);
    let second = v["status"]["token"].as_str().unwrap().to_string();
    assert_ne!(second, first);
    let expiry = v["status"]["expirationTimestamp"].as_str().unwrap();
    assert!(
        expiry > first_expiry.as_str(),
        "a later expiry than {first_expiry}: {expiry}"
    );
    wait_for(
        "the token file to hold the new token",
        Duration::from_secs(10),
        || file_token() == second,
    )
    .await;
    assert_eq!(expiry, file_expiry());

    // Errors: one line on stderr, exit 1, no partial JSON on stdout.
    for r in [
        get(Some("1h")).await,
        run(&["get", "nope", "-s", s, "--format", "k8s-exec"]).await,
    ] {
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert!(r.stdout.is_empty(), "{}", r.stdout);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    }
}

/// `get` and `status` into a pipe whose reader has gone (`tokenwarden get api | head -c 0`):
/// they end quietly with 0, as SIGPIPE ends a C tool, and never panic.
#[tokio::test(flavor = "multi_thread")]
async fn get_and_status_into_a_closed_pipe_end_quietly() {
    use crate::support::DaemonProc;
    let env = DemoEnv::start(Duration::from_secs(20)).await;
    let (_daemon, _notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    let s = env.demo.socket.to_str().unwrap();
    for args in [vec!["get", "transatel", "-s", s], vec!["status", "-s", s]] {
        // The reading end is closed before the command starts: its write gets EPIPE.
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        drop(read_end);
        let out = std::process::Command::new(crate::support::bin())
            .args(&args)
            .stdout(std::process::Stdio::from(write_end))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// `check` run as another user than the daemon's warns, one line each, about every directory
/// the daemon would need to create files in and that this user could not: the state directory,
/// the gRPC socket's and the HTTP socket's.
#[tokio::test]
async fn check_warns_about_directories_the_daemon_user_could_not_write() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIPPED: check_warns_about_directories_the_daemon_user_could_not_write needs root to run check as uid 65534"
        );
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let root_only = dir.path().join("root-only");
    std::fs::create_dir(&root_only).unwrap();
    std::fs::write(dir.path().join("secret"), "s3cret").unwrap();
    let config = dir.path().join("tokenwarden.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nstate_dir = \"{r}/state\"\nsocket = \"{r}/grpc/tw.sock\"\nhttp_socket = \"{r}/http.sock\"\n\
             [clients.a]\ntoken_url = \"https://idp.example/token\"\nclient_id = \"a\"\nclient_secret = {{ file = \"secret\" }}\n",
            r = root_only.display()
        ),
    )
    .unwrap();
    let r = crate::support::run_setpriv(
        &["--reuid=65534", "--regid=65534", "--clear-groups"],
        &["check", "-c", config.to_str().unwrap()],
    )
    .await;
    let warnings: Vec<&str> = r
        .stderr
        .lines()
        .chain(r.stdout.lines())
        .filter(|l| l.contains("uid 65534"))
        .collect();
    for key in ["state_dir", "socket", "http_socket"] {
        assert_eq!(
            warnings
                .iter()
                .filter(|l| l.starts_with(&format!("warning: {key} \"{}", root_only.display())))
                .count(),
            1,
            "{key}: {warnings:#?}\n{}{}",
            r.stdout,
            r.stderr
        );
    }
}
