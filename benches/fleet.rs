//! The fleet benchmark (issue 15): H daemons (default 5) × M shared clients (default 1,000)
//! against the built-in provider and a three-member etcd cluster on loopback, and, in the same
//! run, H independent daemons with the same clients. Run with `cargo bench --bench fleet`
//! (Debian's `etcd-server` must be installed; without it the bench prints SKIPPED).
//!
//! Prints, for each mode: provider requests per client per token lifetime (over a window of
//! one lifetime after every daemon is ready), daemon RSS (`VmRSS`, mean over the daemons); for
//! fleet mode also etcd writes per second over the window (revision delta), the propagation
//! of a new token from the first host's output to the last (p50, p99, over the sampled
//! clients' refreshes), and the takeover after `kill -9` of one daemon: time until every
//! client it held is claimed by a live host.
//!
//! Environment: `TW_FLEET_HOSTS` (5), `TW_FLEET_CLIENTS` (1000), `TW_FLEET_LIFETIME` (token
//! lifetime in seconds, 60), `TW_FLEET_LEASE` (seconds, 5), `TW_FLEET_SAMPLED` (clients with
//! a token file on every host, for propagation, 20), `TW_FLEET_BIN` (the daemon binary; default
//! the one cargo built for this bench), `TW_FLEET_KEEP=1` (keep the work directory, with each
//! daemon's config and log, and print its path), `TW_FLEET_LOG` (the daemons' `log_level`,
//! `warn`; e.g. `warn,tokenwarden::fleet=debug`), `TW_FLEET_MODES` (`independent,fleet`: the
//! modes to run).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokenwarden::provider::{Dialect, Provider, RegisteredClient};

#[path = "../tests/it/fleet_etcd.rs"]
#[allow(dead_code)]
mod fleet_etcd;
use fleet_etcd::Etcd;

const CLIENT_ID: &str = "fleet-bench";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bin() -> String {
    std::env::var("TW_FLEET_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tokenwarden").into())
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

struct Setup {
    dir: PathBuf,
    clients: usize,
    sampled: usize,
    token_url: String,
}

/// Host `h`'s config; with `fleet`, its `[fleet]` section.
fn config(s: &Setup, h: usize, fleet: Option<(&Etcd, u64)>) -> PathBuf {
    let dir = s
        .dir
        .join(format!("{}h{h}", if fleet.is_some() { "f" } else { "i" }));
    std::fs::create_dir_all(dir.join("out")).unwrap();
    let mut t = format!(
        "[daemon]\nstate_dir = \"{}\"\nsocket = \"{}\"\nlog_level = \"{}\"\nmax_concurrent_refreshes = 64\n\n[defaults]\nrefresh_margin = \"10s\"\nmin_interval = \"2s\"\n\n",
        dir.join("state").display(),
        dir.join("tw.sock").display(),
        std::env::var("TW_FLEET_LOG").unwrap_or_else(|_| "warn".into())
    );
    if let Some((etcd, lease)) = fleet {
        let eps: Vec<String> = etcd
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        t.push_str(&format!(
            "[fleet]\netcd = [{}]\nprefix = \"/bench\"\nkey = {{ file = \"{}\" }}\nlease = \"{lease}s\"\nhost = \"h{h}\"\n\n",
            eps.join(", "),
            s.dir.join("fleet.key").display()
        ));
    }
    for i in 0..s.clients {
        t.push_str(&format!(
            "[clients.c{i:04}]\ntoken_url = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = {{ file = \"{}\" }}\nscope = [\"CATALOG_PRODUCTS_READ\"]\n",
            s.token_url,
            s.dir.join("secret").display()
        ));
        if i < s.sampled {
            t.push_str(&format!(
                "[[clients.c{i:04}.outputs]]\npath = \"{}\"\nformat = \"token\"\n",
                dir.join("out").join(format!("c{i:04}.token")).display()
            ));
        }
        t.push('\n');
    }
    let p = dir.join("tw.toml");
    std::fs::write(&p, t).unwrap();
    set_mode(&p, 0o600);
    p
}

fn start(config: &Path) -> Child {
    let log = std::fs::File::create(config.with_extension("log")).unwrap();
    Command::new(bin())
        .args(["run", "-c"])
        .arg(config)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Waits until every client of the daemon at `config` holds a valid token.
fn wait_ready(config: &Path, clients: usize) {
    let socket = config.with_file_name("tw.sock");
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last_said = Instant::now();
    loop {
        let out = Command::new(bin())
            .args(["status", "--json", "-s"])
            .arg(&socket)
            .output()
            .unwrap();
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            let valid = v
                .as_array()
                .map_or(0, |a| a.iter().filter(|c| c["state"] == "VALID").count());
            if valid == clients {
                return;
            }
            if last_said.elapsed() >= Duration::from_secs(10) {
                println!("  {}: {valid} of {clients} valid", config.display());
                last_said = Instant::now();
            }
        }
        assert!(Instant::now() < deadline, "{} not ready", config.display());
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn stop(children: &mut [Child]) {
    for c in children.iter() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
}

fn revision(etcd: &Etcd) -> i64 {
    let out = etcd.ctl(&["get", "/nothing", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["header"]["revision"].as_i64().unwrap_or(0)
}

/// Claims by holder.
fn claims(etcd: &Etcd) -> BTreeMap<String, usize> {
    let out = etcd.ctl(&["get", "--prefix", "/bench/clients/", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let b64 = |s: &serde_json::Value| {
        base64::engine::general_purpose::STANDARD
            .decode(s.as_str().unwrap_or(""))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let mut by = BTreeMap::new();
    for kv in v["kvs"].as_array().into_iter().flatten() {
        if b64(&kv["key"]).ends_with("/claim") {
            *by.entry(b64(&kv["value"])).or_default() += 1;
        }
    }
    by
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it.
    if !std::env::args().any(|a| a == "--bench") {
        println!("fleet: run it with `cargo bench --bench fleet`");
        return;
    }
    let hosts = env_num("TW_FLEET_HOSTS", 5) as usize;
    let clients = env_num("TW_FLEET_CLIENTS", 1000) as usize;
    let lifetime = Duration::from_secs(env_num("TW_FLEET_LIFETIME", 60));
    let lease = env_num("TW_FLEET_LEASE", 5);
    let sampled = (env_num("TW_FLEET_SAMPLED", 20) as usize).min(clients);
    let Some(etcd) = Etcd::start("fleet bench") else {
        return;
    };
    let provider = Provider::start().await.unwrap();
    let secret = uuid::Uuid::new_v4().simple().to_string();
    provider.register(RegisteredClient::transatel(CLIENT_ID, &secret).with_lifetime(lifetime));
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().to_path_buf();
    std::fs::write(dir.join("secret"), &secret).unwrap();
    set_mode(&dir.join("secret"), 0o600);
    let key: [u8; 32] = rand::random();
    std::fs::write(
        dir.join("fleet.key"),
        base64::engine::general_purpose::STANDARD.encode(key),
    )
    .unwrap();
    set_mode(&dir.join("fleet.key"), 0o600);
    let s = Setup {
        dir: dir.clone(),
        clients,
        sampled,
        token_url: provider.token_url(Dialect::Transatel),
    };
    println!(
        "fleet bench: {hosts} daemons x {clients} clients, token lifetime {lifetime:?}, lease {lease}s, binary {}",
        bin()
    );

    let modes = std::env::var("TW_FLEET_MODES").unwrap_or_else(|_| "independent,fleet".into());
    for fleet in [false, true] {
        let mode = if fleet { "fleet" } else { "independent" };
        if !modes.split(',').any(|m| m.trim() == mode) {
            continue;
        }
        let configs: Vec<PathBuf> = (0..hosts)
            .map(|h| config(&s, h, fleet.then_some((&etcd, lease))))
            .collect();
        let t0 = Instant::now();
        let mut children: Vec<Child> = configs.iter().map(|c| start(c)).collect();
        for c in &configs {
            wait_ready(c, clients);
            println!("  {}: ready at {:.1?}", c.display(), t0.elapsed());
        }
        println!("{mode}: all {hosts} daemons ready in {:.1?}", t0.elapsed());
        let issued0 = provider.issued(CLIENT_ID);
        let rev0 = revision(&etcd);
        // The window: one lifetime; propagation sampled on the clients with files.
        let outs: Vec<PathBuf> = configs.iter().map(|c| c.with_file_name("out")).collect();
        let read = |h: usize, i: usize| {
            std::fs::read_to_string(outs[h].join(format!("c{i:04}.token"))).unwrap_or_default()
        };
        let mut last: Vec<String> = (0..sampled).map(|i| read(0, i)).collect();
        let mut first_seen: Vec<Option<Instant>> = vec![None; sampled];
        let mut propagation = Vec::new();
        let start_w = Instant::now();
        while start_w.elapsed() < lifetime {
            if fleet {
                for i in 0..sampled {
                    let now: Vec<String> = (0..hosts).map(|h| read(h, i)).collect();
                    if first_seen[i].is_none() && now.iter().any(|t| !t.is_empty() && *t != last[i])
                    {
                        first_seen[i] = Some(Instant::now());
                    }
                    if let Some(t) = first_seen[i]
                        && now.iter().all(|x| *x == now[0] && *x != last[i])
                    {
                        propagation.push(t.elapsed());
                        last[i] = now[0].clone();
                        first_seen[i] = None;
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let window = start_w.elapsed();
        let issued = provider.issued(CLIENT_ID) - issued0;
        let per_client_lifetime =
            issued as f64 / clients as f64 / (window.as_secs_f64() / lifetime.as_secs_f64());
        let rss: Vec<u64> = children.iter().map(|c| rss_kib(c.id())).collect();
        let rss_mean = rss.iter().sum::<u64>() as f64 / rss.len() as f64 / 1024.0;
        println!(
            "{mode}: provider requests per client per lifetime: {per_client_lifetime:.2} ({issued} in {window:.0?}); RSS mean {rss_mean:.1} MiB (min {:.1}, max {:.1})",
            *rss.iter().min().unwrap_or(&0) as f64 / 1024.0,
            *rss.iter().max().unwrap_or(&0) as f64 / 1024.0
        );
        if fleet {
            let writes = revision(&etcd) - rev0;
            println!(
                "fleet: etcd writes {writes} in {window:.0?} = {:.1}/s; propagation first host -> all {hosts}: p50 {:?}, p99 {:?} ({} refreshes sampled)",
                writes as f64 / window.as_secs_f64(),
                pct(&mut propagation, 0.5),
                pct(&mut propagation, 0.99),
                propagation.len()
            );
            // Takeover: kill -9 of host 0.
            let before = claims(&etcd);
            let held = before.get("h0").copied().unwrap_or(0);
            let killed = Instant::now();
            let _ = children[0].kill();
            let _ = children[0].wait();
            let deadline = Instant::now() + Duration::from_secs(lease * 4 + 30);
            loop {
                let c = claims(&etcd);
                if !c.contains_key("h0") && c.values().sum::<usize>() == clients {
                    println!(
                        "fleet: takeover of h0's {held} clients after kill -9: {:.2?} (lease {lease}s)",
                        killed.elapsed()
                    );
                    break;
                }
                if Instant::now() > deadline {
                    println!(
                        "fleet: takeover incomplete after {:?}: {c:?}",
                        killed.elapsed()
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stop(&mut children[1..]);
        } else {
            stop(&mut children);
        }
    }
    println!(
        "provider: refresh-token reuse detected {} times",
        provider.reuse_detected(CLIENT_ID)
    );
    if std::env::var("TW_FLEET_KEEP").is_ok_and(|v| v == "1") {
        println!("kept: {}", work.keep().display());
    }
}
