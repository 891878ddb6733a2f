//! `tokenwarden run` as a real child process against the built-in provider: tokens kept fresh
//! with short lifetimes while a reader samples every output, systemd notifications, SIGTERM,
//! restarts that reuse stored tokens, and the state directory lock.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::support::{DaemonProc, DemoEnv, read, token_in};

/// The client id each output belongs to.
fn owners() -> HashMap<&'static str, &'static str> {
    use tokenwarden::demo::*;
    HashMap::from([
        ("transatel.token", TRANSATEL_ID),
        ("transatel.json", TRANSATEL_ID),
        ("creads-files.header", CREADS_ID),
        ("talentsoft-app.env", TALENTSOFT_APP_ID),
        ("talentsoft-user.json", TALENTSOFT_USER_ID),
        ("talkdesk.token", TALKDESK_ID),
    ])
}

#[tokio::test(flavor = "multi_thread")]
async fn short_lived_tokens_stay_fresh_and_readers_never_see_a_bad_file() {
    let lifetime = Duration::from_secs(4);
    let env = DemoEnv::start(lifetime).await;
    let (mut daemon, notify, ready) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    assert!(ready.contains("STATUS=5/5 clients valid"), "{ready}");

    let owners = owners();
    let run_for = Duration::from_secs(16);
    let start = Instant::now();
    let mut samples = 0;
    let mut seen: HashMap<&str, std::collections::HashSet<String>> = HashMap::new();
    while start.elapsed() < run_for {
        for (name, owner) in &owners {
            let text = read(&env.out(name));
            let token = token_in(name, &text)
                .unwrap_or_else(|| panic!("{name}: partial or malformed file: {text:?}"));
            assert_eq!(
                env.provider.token_owner(&token).as_deref(),
                Some(*owner),
                "{name}: a foreign token"
            );
            assert!(
                env.provider.token_is_live(&token),
                "{name}: an expired token is served"
            );
            seen.entry(name).or_default().insert(token);
            samples += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(samples > 1000, "{samples}");
    // Refreshed between 2 s and 3 s after issue: about 16 s / 2.5 s ≈ 6 tokens each.
    for (name, tokens) in &seen {
        assert!(
            tokens.len() >= 4,
            "{name}: only {} tokens in 16 s",
            tokens.len()
        );
    }
    for id in [
        tokenwarden::demo::TRANSATEL_ID,
        tokenwarden::demo::TALKDESK_ID,
    ] {
        let n = env.provider.issued(id);
        assert!(
            (5..=10).contains(&n),
            "{id}: {n} tokens issued in ~16 s of 4 s tokens"
        );
    }
    // Creads rotates refresh tokens: the password grant was used once.
    let grants = env.grants_at("/creads/");
    assert_eq!(
        grants.iter().filter(|g| *g == "password").count(),
        1,
        "{grants:?}"
    );

    let t = Instant::now();
    daemon.stop().await;
    assert!(t.elapsed() < Duration::from_secs(5));
    notify.wait_for("STOPPING=1", Duration::from_secs(1)).await;
    let logs = daemon.logs();
    assert!(logs.contains("new token"), "{logs}");
    for name in owners.keys() {
        let token = token_in(name, &read(&env.out(name))).unwrap();
        assert!(!logs.contains(&token), "a token in the logs");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_reuses_stored_tokens_without_asking_the_provider() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let (mut daemon, _notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    let files = crate::support::output_files(&env, owners().into_keys());
    daemon.signal(Signal::SIGINT);
    assert!(daemon.wait_exit(Duration::from_secs(6)).await.success());
    let requests = env.provider.requests().len();

    let t = Instant::now();
    let (mut daemon, _notify, ready) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    crate::support::assert_restart_reused(&env, &ready, requests, &files);
    assert!(
        daemon.logs().contains("reusing the stored token"),
        "{}",
        daemon.logs()
    );

    // A second daemon on the same state directory refuses to start.
    let mut second = DaemonProc::start(&env.demo.config, &[]);
    let status = second.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(1));
    assert!(
        second.logs().contains("another tokenwarden"),
        "{}",
        second.logs()
    );

    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_config_at_start_exits_2_with_its_location() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    env.edit_config(|t| t.replace("[defaults]", "[defaults]\nrefresh_at = 3.0"));
    let mut daemon = DaemonProc::start(&env.demo.config, &[]);
    let status = daemon.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(2));
    let logs = daemon.logs();
    assert!(
        logs.contains(&format!("{}:", env.demo.config.display())),
        "{logs}"
    );
    assert!(logs.contains("refresh_at"), "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_clock_far_off_is_warned_about_once_and_does_not_stretch_expiry() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    env.provider.set_clock_offset(3600);
    let (mut daemon, _notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    daemon
        .wait_log("s ahead of ours", Duration::from_secs(5))
        .await;
    // Every client again: still one warning per client.
    daemon.signal(Signal::SIGUSR1);
    // Every client's second token logged (its skew warning, if any, comes before it).
    crate::support::wait_for("second tokens", Duration::from_secs(10), || {
        daemon.logs().matches("new token").count() >= 10
    })
    .await;
    let logs = daemon.logs();
    let warnings = logs.matches("clock is").count();
    assert_eq!(warnings, 5, "one per client:\n{logs}");
    // Expiry counts from our clock: an hour of skew does not add an hour.
    let json: Value = serde_json::from_str(&read(&env.out("talentsoft-user.json"))).unwrap();
    let expires = humantime::parse_rfc3339(json["expires_at"].as_str().unwrap()).unwrap();
    let left = expires.duration_since(SystemTime::now()).unwrap();
    assert!(left <= Duration::from_secs(600), "{left:?}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn max_concurrent_refreshes_bounds_requests_in_flight() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    // Every request hangs until the client's 1 s timeout: with one permit they queue.
    env.provider
        .set_fault(Some(tokenwarden::provider::Fault::Hang));
    env.edit_config(|t| {
        t.replace("[daemon]", "[daemon]\nmax_concurrent_refreshes = 1")
            .replace("[defaults]", "[defaults]\ntimeout = \"1s\"")
    });
    let mut daemon = DaemonProc::start(&env.demo.config, &[]);
    crate::support::wait_for("three requests", Duration::from_secs(15), || {
        env.provider.requests().len() >= 3
    })
    .await;
    let times: Vec<_> = env
        .provider
        .requests()
        .iter()
        .map(|r| r.received_at)
        .collect();
    for pair in times.windows(2).take(2) {
        let gap = pair[1].duration_since(pair[0]);
        assert!(
            gap >= Duration::from_millis(900),
            "requests overlapped: {gap:?} apart"
        );
    }
    daemon.stop().await;
}

/// A `Retry-After` answer to one client holds every client of that token URL: the other one
/// does not ask before the time (its demand is answered at once, without a request), clients of
/// other token URLs are not held, and both held clients get new tokens once it has passed.
#[tokio::test(flavor = "multi_thread")]
async fn retry_after_holds_every_client_of_the_token_url() {
    use tokenwarden::provider::{Dialect, Fault};
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    // A demand right after start would otherwise be answered with the fresh token.
    env.edit_config(|c| c.replace(r#"min_interval = "2s""#, r#"min_interval = "0s""#));
    let (mut daemon, _notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    let socket = env.demo.socket.to_str().unwrap().to_string();
    let talentsoft = env.provider.token_url(Dialect::TalentsoftApp);
    let path = talentsoft.rsplit_once("//").unwrap().1;
    let path = &path[path.find('/').unwrap()..];
    let at_url = |since: Instant| -> Vec<Instant> {
        env.provider
            .requests()
            .iter()
            .filter(|r| r.path == path && r.received_at >= since)
            .map(|r| r.received_at)
            .collect()
    };

    let hold = Duration::from_secs(3);
    env.provider.fault_next(
        Fault::TooManyRequests {
            retry_after: hold.as_secs(),
        },
        1,
    );
    let asked = Instant::now();
    let r = crate::support::run(&["refresh", "talentsoft-app", "-s", &socket]).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("429"), "{}", r.stderr);
    assert_eq!(at_url(asked).len(), 1);

    // The other client of that URL is held: answered at once, no request.
    let r = crate::support::run(&["refresh", "talentsoft-user", "-s", &socket]).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("Retry-After"), "{}", r.stderr);
    assert_eq!(at_url(asked).len(), 1, "a held client asked the provider");
    // Another token URL is not held.
    let r = crate::support::run(&["refresh", "transatel", "-s", &socket]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);

    // Both held clients come back on their own once the time has passed, not before.
    crate::support::wait_for(
        "both talentsoft clients asking again",
        hold + Duration::from_secs(10),
        || at_url(asked).len() >= 3,
    )
    .await;
    let times = at_url(asked);
    for t in &times[1..] {
        assert!(
            *t >= asked + hold,
            "a request {:?} after the 429, inside the {hold:?} Retry-After",
            *t - asked
        );
    }
    crate::support::wait_for(
        "both talentsoft outputs valid again",
        Duration::from_secs(10),
        || {
            let status = std::process::Command::new(crate::support::bin())
                .args(["status", "--json", "-s", &socket])
                .output()
                .unwrap();
            let v: Value = serde_json::from_slice(&status.stdout).unwrap_or(Value::Null);
            v.as_array().is_some_and(|a| {
                a.iter()
                    .filter(|c| c["client"].as_str().unwrap_or("").starts_with("talentsoft"))
                    .all(|c| c["state"] == "VALID" && c["consecutive_failures"] == 0)
            })
        },
    )
    .await;
    daemon.stop().await;
}
