//! Fleet mode (docs/fleet.md) against a real etcd cluster: three members on loopback started
//! here (Debian's `etcd-server`; without it each test prints SKIPPED), several daemons as
//! child processes sharing the built-in provider, which detects refresh-token reuse.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokenwarden::demo::{CREADS_ID, TALENTSOFT_APP_ID, TRANSATEL_ID};

use crate::support::{DaemonProc, DemoEnv, read, token_in, wait_for};

#[path = "fleet_etcd.rs"]
mod fleet_etcd;
pub use fleet_etcd::{Etcd, free_port};

/// A fleet key (32 random bytes, base64).
fn fleet_key() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// One host of the fleet: the demo's config with its own state directory, socket and outputs,
/// and a `[fleet]` section.
pub struct Host {
    pub name: String,
    pub config: PathBuf,
    pub out: PathBuf,
}

pub fn host(env: &DemoEnv, etcd: &Etcd, name: &str, prefix: &str, key: &str, lease: u32) -> Host {
    let dir = env.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out");
    let text = std::fs::read_to_string(&env.demo.config)
        .unwrap()
        .replace(
            &env.demo.state_dir.display().to_string(),
            &dir.join("state").display().to_string(),
        )
        .replace(
            &env.demo.socket.display().to_string(),
            &dir.join("tokenwarden.sock").display().to_string(),
        )
        .replace(
            &env.demo.out_dir.display().to_string(),
            &out.display().to_string(),
        );
    let key_file = dir.join("fleet.key");
    std::fs::write(&key_file, key).unwrap();
    set_mode(&key_file, 0o600);
    let endpoints: Vec<String> = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let fleet = format!(
        "\n[fleet]\netcd = [{}]\nprefix = \"{prefix}\"\nkey = {{ file = \"{}\" }}\nlease = \"{lease}s\"\nhost = \"{name}\"\n",
        endpoints.join(", "),
        key_file.display()
    );
    // [fleet] goes before the first [clients.*] table.
    let at = text.find("\n[clients.").unwrap();
    let text = format!("{}{fleet}{}", &text[..at], &text[at..]);
    let config = dir.join("tokenwarden.toml");
    std::fs::write(&config, text).unwrap();
    set_mode(&config, 0o600);
    Host {
        name: name.to_string(),
        config,
        out,
    }
}

/// Adds `rt-only`, a Creads client whose only credential is a rotating refresh token (minted
/// here and returned), with a `rt-only.token` output when `output`.
fn add_rt_only(env: &DemoEnv, output: bool) -> String {
    let rt = env.provider.mint_refresh_token(CREADS_ID, &["files"]);
    let rt_file = env.demo.dir.join("secrets").join("rt-only");
    std::fs::write(&rt_file, &rt).unwrap();
    set_mode(&rt_file, 0o600);
    let creads_url = env
        .provider
        .token_url(tokenwarden::provider::Dialect::Creads);
    let creads_secret = env.demo.dir.join("secrets").join("creads");
    let outputs = if output {
        format!(
            "[[clients.rt-only.outputs]]\npath = \"{}\"\nformat = \"token\"\n",
            env.demo.out_dir.join("rt-only.token").display()
        )
    } else {
        String::new()
    };
    env.edit_config(|t| {
        format!(
            "{t}\n[clients.rt-only]\ntoken_url = \"{creads_url}\"\ngrant_type = \"refresh_token\"\nclient_id = \"{CREADS_ID}\"\nclient_secret = {{ file = \"{}\" }}\nrefresh_token = {{ file = \"{}\" }}\n{outputs}",
            creads_secret.display(),
            rt_file.display(),
        )
    });
    rt
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The token in a host's output `file`, when complete.
fn token_of(h: &Host, file: &str) -> Option<String> {
    let text = std::fs::read_to_string(h.out.join(file)).ok()?;
    token_in(file, &text)
}

/// The demo outputs checked on every host (one per grant kind that matters here).
const FILES: [&str; 3] = [
    "transatel.token",
    "creads-files.header",
    "talentsoft-app.env",
];

/// Whether every host holds the same token in each of [`FILES`].
fn converged(hosts: &[&Host]) -> bool {
    FILES.iter().all(|f| {
        let first = token_of(hosts[0], f);
        first.is_some() && hosts.iter().all(|h| token_of(h, f) == first)
    })
}

/// Checks every live host's outputs now: each token was issued by the provider and is not
/// expired (a host never serves an expired token).
fn assert_live(env: &DemoEnv, hosts: &[&Host]) {
    for h in hosts {
        for f in FILES {
            if let Some(t) = token_of(h, f) {
                let t = t.trim_start_matches("Authorization: Bearer ").to_string();
                let t = t.strip_prefix("TS_ACCESS_TOKEN=").unwrap_or(&t).to_string();
                assert!(
                    env.provider.token_is_live(&t) || env.provider.token_owner(&t).is_none(),
                    "{} serves an expired token in {f}",
                    h.name
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_hosts_share_one_token_per_client_and_survive_kill_9_of_a_holder() {
    let Some(etcd) = Etcd::start("fleet sharing") else {
        return;
    };
    let lifetime = Duration::from_secs(20);
    let env = DemoEnv::start(lifetime).await;
    let key = fleet_key();
    let hosts: Vec<Host> = (0..3)
        .map(|i| host(&env, &etcd, &format!("h{i}"), "/tw/share", &key, 3))
        .collect();
    let mut procs = Vec::new();
    for h in &hosts {
        procs.push(Some(DaemonProc::start_ready(&h.config, &[]).await));
    }
    let all: Vec<&Host> = hosts.iter().collect();
    wait_for(
        "all hosts on one token per client",
        Duration::from_secs(20),
        || converged(&all),
    )
    .await;
    // Holders are spread over the hosts, and every client has exactly one.
    let claim_count = || {
        etcd.keys("/tw/share/clients/")
            .iter()
            .filter(|k| k.ends_with("/claim"))
            .count()
    };
    wait_for("one claim per client", Duration::from_secs(5), || {
        claim_count() == 5
    })
    .await;
    let claims = etcd.keys("/tw/share/clients/");
    // status: each client is held by exactly one host and followed by the others, etcd up.
    let mut holders = std::collections::BTreeMap::<String, usize>::new();
    for h in &hosts {
        let socket = h.config.parent().unwrap().join("tokenwarden.sock");
        let r = crate::support::run(&["status", "--json", "-s", socket.to_str().unwrap()]).await;
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        for c in v.as_array().unwrap() {
            assert_eq!(c["fleet_etcd"], "up", "{c}");
            let role = c["fleet_role"].as_str().unwrap();
            assert!(role == "holder" || role == "follower", "{c}");
            if role == "holder" {
                *holders
                    .entry(c["client"].as_str().unwrap().to_string())
                    .or_default() += 1;
            }
        }
    }
    assert_eq!(holders.len(), 5, "{holders:?}");
    assert!(holders.values().all(|n| *n == 1), "{holders:?}");
    let issued_at_start: Vec<usize> = [TRANSATEL_ID, CREADS_ID, TALENTSOFT_APP_ID]
        .iter()
        .map(|c| env.provider.issued(c))
        .collect();

    // Two lifetimes: about two refreshes per client fleet-wide, not six. Propagation: from
    // the first host showing a new token to the last one.
    let started = Instant::now();
    let mut propagation = Vec::new();
    let mut last = token_of(&hosts[0], "transatel.token");
    let mut first_seen: Option<Instant> = None;
    while started.elapsed() < 2 * lifetime {
        assert_live(&env, &all);
        let now: Vec<Option<String>> = hosts
            .iter()
            .map(|h| token_of(h, "transatel.token"))
            .collect();
        if first_seen.is_none() && now.iter().any(|t| t.is_some() && *t != last) {
            first_seen = Some(Instant::now());
        }
        if let Some(t0) = first_seen
            && now
                .iter()
                .all(|t| t.is_some() && *t == now[0] && *t != last)
        {
            propagation.push(t0.elapsed());
            last = now[0].clone();
            first_seen = None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for (c, before) in [TRANSATEL_ID, CREADS_ID, TALENTSOFT_APP_ID]
        .iter()
        .zip(issued_at_start)
    {
        let n = env.provider.issued(c) - before;
        eprintln!("{c}: {n} tokens issued in two lifetimes across three hosts");
        if n > 3 {
            for (p, _, _) in procs.iter().flatten() {
                eprintln!("----\n{}", p.logs());
            }
        }
        assert!(
            (1..=3).contains(&n),
            "{c}: {n} tokens in two lifetimes across three hosts (expected about 2)"
        );
    }
    propagation.sort();
    eprintln!("propagation of a new token to every host: {propagation:?}");

    // kill -9 the holder of creads-files: another host takes it within the lease, and the
    // refresh-token chain goes on without a refresh token presented twice.
    let creads_holder = claims
        .iter()
        .find(|k| k.contains("/creads-files.") && k.ends_with("/claim"))
        .map(|k| {
            let out = etcd.ctl(&["get", "--print-value-only", k]);
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
        .unwrap();
    let dead = hosts.iter().position(|h| h.name == creads_holder).unwrap();
    let killed_at = Instant::now();
    if let Some((p, _, _)) = procs[dead].as_mut() {
        p.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = p.wait_exit(Duration::from_secs(5)).await;
    }
    let live: Vec<&Host> = hosts
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != dead)
        .map(|(_, h)| h)
        .collect();
    let key_of = |etcd: &Etcd| {
        etcd.keys("/tw/share/clients/")
            .into_iter()
            .find(|k| k.contains("/creads-files.") && k.ends_with("/claim"))
    };
    let mut new_holder = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(k) = key_of(&etcd) {
            let out = etcd.ctl(&["get", "--print-value-only", &k]);
            let h = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !h.is_empty() && h != creads_holder {
                new_holder = h;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let takeover = killed_at.elapsed();
    eprintln!(
        "creads-files: taken over by {new_holder} {takeover:?} after kill -9 of {creads_holder}"
    );
    assert!(!new_holder.is_empty(), "nobody took creads-files over");
    // Within the lease (3 s), plus half a second for this test's own polling through etcdctl.
    assert!(
        takeover < Duration::from_millis(3_500),
        "takeover took {takeover:?}"
    );
    let before = token_of(live[0], "creads-files.header");
    wait_for(
        "a new creads token on every live host",
        lifetime + Duration::from_secs(10),
        || {
            assert_live(&env, &live);
            let t = token_of(live[0], "creads-files.header");
            t != before && converged(&live)
        },
    )
    .await;
    assert_eq!(
        env.provider.reuse_detected(CREADS_ID),
        0,
        "a refresh token was presented twice"
    );
    for (p, _, _) in procs.iter_mut().flatten() {
        if p.child.id().is_some() {
            p.signal(nix::sys::signal::Signal::SIGTERM);
        }
    }
    let _ = read;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_rides_out_etcd_members_stopping_and_reconverges() {
    let Some(mut etcd) = Etcd::start("etcd failures") else {
        return;
    };
    let lifetime = Duration::from_secs(16);
    let env = DemoEnv::start(lifetime).await;
    add_rt_only(&env, true);
    let key = fleet_key();
    let hosts: Vec<Host> = (0..2)
        .map(|i| host(&env, &etcd, &format!("h{i}"), "/tw/outage", &key, 3))
        .collect();
    let mut procs = Vec::new();
    for h in &hosts {
        procs.push(DaemonProc::start_ready(&h.config, &[]).await);
    }
    let all: Vec<&Host> = hosts.iter().collect();
    wait_for("one token per client", Duration::from_secs(20), || {
        converged(&all)
    })
    .await;

    // One member lost (the first endpoint, which every host tried first): the others keep
    // the quorum, the hosts move to them and stay one fleet.
    etcd.stop_member(0);
    let before = token_of(&hosts[0], "transatel.token");
    wait_for(
        "a new shared token with a member down",
        lifetime + Duration::from_secs(10),
        || {
            assert_live(&env, &all);
            token_of(&hosts[0], "transatel.token") != before && converged(&all)
        },
    )
    .await;
    let issued = env.provider.issued(TRANSATEL_ID);

    // No quorum: etcd is unusable. Tokens stay served, and are refreshed locally at their
    // margin (the creads chain starts afresh from its password on each host: the shared
    // refresh token is never used by two hosts).
    etcd.stop_member(1);
    for (p, _, _) in &procs {
        p.wait_log("etcd unreachable", Duration::from_secs(15))
            .await;
    }
    let outage = Instant::now();
    while outage.elapsed() < lifetime + Duration::from_secs(4) {
        assert_live(&env, &all);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for h in &all {
        for f in FILES {
            assert!(token_of(h, f).is_some(), "{} lost {f}", h.name);
        }
    }
    assert!(
        env.provider.issued(TRANSATEL_ID) >= issued + 2,
        "each host refreshes locally during the outage"
    );
    for (p, _, _) in &procs {
        assert!(
            p.logs().contains("refreshing this fleet client locally"),
            "{}",
            p.logs()
        );
        // The refresh-token-only client waits for etcd rather than fork its chain.
        assert!(
            p.logs().contains(
                "only credential is a refresh token shared by the fleet: waiting for etcd"
            ),
            "{}",
            p.logs()
        );
    }

    // etcd back: the hosts converge on one token per client again. The deadline (lifetime +
    // 20 s = 36 s) against the worst case: the members elect a leader and the hosts reconnect
    // (a few seconds; a host retries every 0.5 s), a host whose lease expired meanwhile
    // registers again and lets the host list settle (at most lease + lease/3 = 4 s), then each
    // holder publishes at the latest at its next refresh, less than one lifetime (16 s) away
    // since its token was refreshed during the outage: about 25 s. So the deadline stands; what
    // could stall re-convergence were a late watch event undoing a host's own claim or release
    // (`Inner::set_claim`) and a holder presenting the shared refresh token without etcd
    // confirming its claim (`Seat::read_state`). Should it fail again, the logs say why.
    etcd.restart_member(0);
    etcd.restart_member(1);
    let deadline = Instant::now() + lifetime + Duration::from_secs(20);
    loop {
        assert_live(&env, &all);
        let rt0 = token_of(&hosts[0], "rt-only.token");
        let rt_live = rt0.as_ref().is_some_and(|t| env.provider.token_is_live(t));
        if converged(&all) && rt_live && token_of(&hosts[1], "rt-only.token") == rt0 {
            break;
        }
        if Instant::now() > deadline {
            for (p, _, _) in &procs {
                eprintln!("----\n{}", p.logs());
            }
            panic!(
                "timed out waiting for re-convergence after the outage (refresh-token reuse seen by the provider: {})",
                env.provider.reuse_detected(CREADS_ID)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        env.provider.reuse_detected(CREADS_ID),
        0,
        "a refresh token was presented twice"
    );
    for (p, _, _) in &mut procs {
        p.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_host_with_a_wrong_key_says_so_and_writes_nothing() {
    let Some(etcd) = Etcd::start("wrong fleet key") else {
        return;
    };
    let env = DemoEnv::start(Duration::from_secs(60)).await;
    let good = host(&env, &etcd, "good", "/tw/key", &fleet_key(), 3);
    let (mut a, _na, _) = DaemonProc::start_ready(&good.config, &[]).await;
    wait_for("the good host's claims", Duration::from_secs(10), || {
        etcd.keys("/tw/key/clients/")
            .iter()
            .filter(|k| k.ends_with("/claim"))
            .count()
            == 5
    })
    .await;
    let keys_before = etcd.keys("/tw/");
    let rev_before = revision(&etcd);

    let bad_key = fleet_key();
    let bad = host(&env, &etcd, "bad", "/tw/key", &bad_key, 3);
    let (mut b, _nb, _) = DaemonProc::start_ready(&bad.config, &[]).await;
    b.wait_log(
        "does not open with this host's fleet key",
        Duration::from_secs(10),
    )
    .await;
    // Nothing written: the same keys, and etcd's revision has not moved for the bad host
    // (the good host writes nothing either while its tokens are fresh).
    assert_eq!(etcd.keys("/tw/"), keys_before);
    assert_eq!(revision(&etcd), rev_before);
    // One clear line, naming no secret; the bad host still serves its clients (locally).
    assert!(!b.logs().contains(&bad_key));
    assert!(
        b.logs().lines().filter(|l| l.contains("fleet key")).count() <= 2,
        "{}",
        b.logs()
    );
    assert!(token_of(&bad, "transatel.token").is_some());
    b.stop().await;
    a.stop().await;
}

/// `[fleet]` over `https://` with `ca_file`, and a client certificate (`cert`, `cert_key`)
/// when etcd requires one: the host joins and claims; without the certificate etcd refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_talks_to_etcd_over_mutual_tls() {
    let (ca, cert, key) = crate::support::test_ca();
    let Some(etcd) = Etcd::start_tls("fleet over mTLS", &ca, &cert, &key) else {
        return;
    };
    let env = DemoEnv::start(Duration::from_secs(60)).await;
    let fleet_key = fleet_key();
    let with_tls = |name: &str, client_cert: bool| {
        let h = host(&env, &etcd, name, &format!("/tw/{name}"), &fleet_key, 3);
        let dir = h.config.parent().unwrap().to_path_buf();
        for (file, pem) in [("ca.pem", &ca), ("cert.pem", &cert), ("key.pem", &key)] {
            std::fs::write(dir.join(file), pem).unwrap();
            set_mode(&dir.join(file), 0o600);
        }
        let mut extra = format!("ca_file = \"{}\"\n", dir.join("ca.pem").display());
        if client_cert {
            extra.push_str(&format!(
                "cert = \"{}\"\ncert_key = {{ file = \"{}\" }}\n",
                dir.join("cert.pem").display(),
                dir.join("key.pem").display()
            ));
        }
        let text = std::fs::read_to_string(&h.config).unwrap().replacen(
            "lease = \"3s\"\n",
            &format!("lease = \"3s\"\n{extra}"),
            1,
        );
        std::fs::write(&h.config, text).unwrap();
        h
    };
    let good = with_tls("mtls", true);
    let (mut a, _na, _) = DaemonProc::start_ready(&good.config, &[]).await;
    wait_for("claims made over mTLS", Duration::from_secs(20), || {
        etcd.keys("/tw/mtls/clients/")
            .iter()
            .filter(|k| k.ends_with("/claim"))
            .count()
            == 5
    })
    .await;
    assert!(!a.logs().contains("etcd unreachable"), "{}", a.logs());
    a.stop().await;

    // etcd asks for a client certificate: a host without one is refused and stays local.
    let bare = with_tls("nocert", false);
    let (mut b, _nb, _) = DaemonProc::start_ready(&bare.config, &[]).await;
    b.wait_log("etcd unreachable", Duration::from_secs(15))
        .await;
    assert!(etcd.keys("/tw/nocert/").is_empty());
    assert!(!b.logs().contains(&key), "{}", b.logs());
    b.stop().await;
}

/// etcd's current revision.
fn revision(etcd: &Etcd) -> i64 {
    let out = etcd.ctl(&["get", "/nothing-here", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["header"]["revision"].as_i64().unwrap()
}

#[tokio::test]
async fn fleet_config_is_checked_without_connecting() {
    let env = DemoEnv::start(Duration::from_secs(60)).await;
    // A port nobody listens on: `check` must not care (reachability is a runtime matter).
    let closed = free_port();
    let key = fleet_key();
    let dir = env.dir.path();
    std::fs::write(dir.join("fleet.key"), &key).unwrap();
    set_mode(&dir.join("fleet.key"), 0o600);
    let with_fleet = |fleet: &str, client_extra: &str| {
        let text = std::fs::read_to_string(&env.demo.config).unwrap();
        let at = text.find("\n[clients.").unwrap();
        let text = format!("{}\n[fleet]\n{fleet}\n{}", &text[..at], &text[at..]).replacen(
            "[clients.transatel]\n",
            &format!("[clients.transatel]\n{client_extra}"),
            1,
        );
        let p = dir.join("fleet.toml");
        std::fs::write(&p, text).unwrap();
        set_mode(&p, 0o600);
        p.display().to_string()
    };
    let good = with_fleet(
        &format!(
            "etcd = [\"http://127.0.0.1:{closed}\"]\nprefix = \"/tw/check\"\nkey = {{ file = \"fleet.key\" }}\nlease = \"5s\"\nhost = \"h1\""
        ),
        "fleet = false\n",
    );
    let r = crate::support::run(&["check", "-c", &good]).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);

    let short_key = base64::engine::general_purpose::STANDARD.encode([7u8; 16]);
    std::fs::write(dir.join("short.key"), &short_key).unwrap();
    set_mode(&dir.join("short.key"), 0o600);
    let bad = with_fleet(
        "etcd = [\"https://127.0.0.1:1/x\", \"ftp://h:1\", \"https://127.0.0.1:2379\"]\nprefix = \"tw/\"\nkey = { file = \"short.key\" }\nlease = \"1s\"\nhost = \"a b\"\nuser = \"tw\"",
        "fleet = \"no\"\n",
    );
    let r = crate::support::run(&["check", "-c", &bad]).await;
    let out = format!("{}{}", r.stdout, r.stderr);
    assert_ne!(r.code, 0, "{out}");
    for needle in [
        "etcd endpoint \"https://127.0.0.1:1/x\" must be http:// or https://",
        "etcd endpoint \"ftp://h:1\"",
        "prefix \"tw/\" of [fleet]",
        "16 bytes once decoded, not 32",
        "lease of [fleet] must be whole seconds",
        "host \"a b\" of [fleet]",
        "user and password go together",
        "https:// endpoints need ca_file",
        "fleet",
    ] {
        assert!(out.contains(needle), "no {needle:?} in:\n{out}");
    }
    assert!(!out.contains(&short_key), "the key is shown:\n{out}");
    assert!(
        out.contains("invalid type"),
        "fleet = \"no\" not refused:\n{out}"
    );
}

/// `once` is not a host of the fleet: a shared client that needs a token starts a fresh chain
/// from its primary credential (the stored refresh token may have been used by the holder
/// since), one whose only credential is a refresh token fails and asks nothing, and etcd is
/// never contacted.
#[tokio::test]
async fn once_beside_a_fleet_never_presents_a_shared_refresh_token() {
    // Tokens shorter than refresh_margin: a stored one is never reused, every `once` asks.
    let env = DemoEnv::start(Duration::from_secs(4)).await;
    let rt = add_rt_only(&env, false);
    let config = env.demo.config.display().to_string();
    // Without [fleet]: both clients store a refresh token.
    let r = crate::support::run(&["once", "-c", &config, "creads-files", "rt-only"]).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let asked = env.provider.requests().len();

    // The same host joins a fleet, and `once` runs again. Its etcd port is held by a listener
    // that answers nothing: `once` must not even connect to it.
    let etcd_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    etcd_port.set_nonblocking(true).unwrap();
    let closed = etcd_port.local_addr().unwrap().port();
    let key_file = env.dir.path().join("fleet.key");
    std::fs::write(&key_file, fleet_key()).unwrap();
    set_mode(&key_file, 0o600);
    env.edit_config(|t| {
        let at = t.find("\n[clients.").unwrap();
        format!(
            "{}\n[fleet]\netcd = [\"http://127.0.0.1:{closed}\"]\nprefix = \"/tw/once\"\nkey = {{ file = \"{}\" }}\nhost = \"h1\"\n{}",
            &t[..at],
            key_file.display(),
            &t[at..]
        )
    });
    let r = crate::support::run(&["once", "-c", &config, "creads-files", "rt-only"]).await;
    let out = format!("{}{}", r.stdout, r.stderr);
    assert_eq!(r.code, 1, "{out}");
    assert!(
        out.contains(
            "rt-only: this client is shared by the fleet and its only credential is a refresh token"
        ),
        "{out}"
    );
    assert!(out.contains("creads-files  new"), "{out}");
    let since = &env.provider.requests()[asked..];
    let grants: Vec<&str> = since
        .iter()
        .filter_map(|q| q.form.iter().find(|(k, _)| k == "grant_type"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(grants, ["password"], "{since:?}");
    assert_eq!(env.provider.reuse_detected(CREADS_ID), 0);
    assert!(!out.contains(&rt), "a refresh token is shown:\n{out}");
    match etcd_port.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("once connected to the fleet's etcd: {other:?}"),
    }

    // fleet = false: the client is this host's own again, and continues its chain.
    env.edit_config(|t| t.replace("[clients.rt-only]\n", "[clients.rt-only]\nfleet = false\n"));
    let r = crate::support::run(&["once", "-c", &config, "rt-only"]).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(env.provider.reuse_detected(CREADS_ID), 0);
}
