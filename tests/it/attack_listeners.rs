//! Local denial of service against the listeners, by an unprivileged user (uid 65534 through
//! `setpriv`), against the real binary: a header-block bomb, thousands of idle connections, a
//! Watch-stream flood and a slowloris that never finishes the preface. For each: every client's
//! token keeps being refreshed during the attack, a legitimate caller's `get` answers once it
//! stops, the daemon's peak RSS stays under a bound, and nothing secret reaches the logs.
//!
//! The daemon runs under `prlimit --nofile=512:512`, so the attacks that once exhausted its
//! descriptors are cheap here; the attacker is Python's standard library speaking raw HTTP/2.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::support::*;

/// The attacker: `MODE TARGET N`, prints `ready K` once its connections are made, then holds
/// them (re-opening what the daemon closes, for the connection attacks) until stdin closes.
const ATTACKER: &str = r#"
import os, select, socket, struct, sys, time
mode, target, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload
def hint(v, bits, first=0):
    m = (1 << bits) - 1
    if v < m:
        return bytes([first | v])
    out = [first | m]; v -= m
    while v >= 128:
        out.append((v & 127) | 128); v >>= 7
    out.append(v)
    return bytes(out)
def hstr(s):
    return hint(len(s), 7) + s
def lit(name, value):
    return b"\x00" + hstr(name) + hstr(value)
def request(path, authority=b"localhost"):
    return (lit(b":method", b"POST") + lit(b":scheme", b"http") + lit(b":path", path) +
            lit(b":authority", authority) + lit(b"content-type", b"application/grpc") + lit(b"te", b"trailers"))
def connect():
    if target.startswith("tcp:"):
        host, port = target[4:].rsplit(":", 1)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM); addr = (host, int(port))
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); addr = target
    s.settimeout(0.5)
    try:
        s.connect(addr)
    except OSError:
        s.close(); return None
    return s
def bomb():
    # A 4000-byte dynamic-table entry named ~12000 times: 16 KB on the wire, ~48 MB decoded.
    block = lit(b":authority", b"%2Frun%2Ftw.sock") + b"\x40" + hstr(b"x-bomb") + hstr(b"a" * 4000)
    block += b"\xbe" * 12000
    out = PREFACE + frame(4, 0, 0, b"")
    chunks = [block[i:i + 16384] for i in range(0, len(block), 16384)]
    for i, c in enumerate(chunks):
        out += frame(1 if i == 0 else 9, 4 if i == len(chunks) - 1 else 0, 1, c)
    return out
def opener():
    s = connect()
    if s is None:
        return None
    try:
        if mode == "slowloris":
            s.sendall(PREFACE[:10])
        elif mode == "watch":
            out = PREFACE + frame(4, 0, 0, b"") + frame(4, 1, 0, b"")
            # Health/Watch: anyone may open it, and it stays open (a WatchToken for a client
            # the attacker may not read ends at once, its place free again).
            for i in range(16):
                sid = 2 * i + 1
                out += frame(1, 4, sid, request(b"/grpc.health.v1.Health/Watch")) + frame(0, 1, sid, b"\x00" * 5)
            s.sendall(out)
    except OSError:
        s.close(); return None
    s.setblocking(False)
    return s
if mode == "bomb":
    rounds = 0
    print("ready 0", flush=True)
    while True:
        if select.select([sys.stdin], [], [], 0)[0] and not os.read(0, 1):
            break
        batch = [connect() for _ in range(n)]
        for s in batch:
            if s is None: continue
            try:
                s.sendall(bomb())
                s.settimeout(5)
                while s.recv(65536): pass
            except OSError:
                pass
            s.close()
        rounds += 1
    print("rounds", rounds, flush=True)
    sys.exit(0)
poller = select.poll()
poller.register(0, select.POLLIN)
socks = {}
def add(s):
    socks[s.fileno()] = s
    poller.register(s.fileno(), select.POLLIN)
for _ in range(n):
    s = opener()
    if s is not None:
        add(s)
print("ready", len(socks), flush=True)
reopened = 0
while True:
    for fd, ev in poller.poll(500):
        if fd == 0:
            if not os.read(0, 1):
                print("reopened", reopened, flush=True)
                sys.exit(0)
            continue
        s = socks.get(fd)
        if s is None: continue
        try:
            data = s.recv(65536)
        except OSError:
            data = b""
        if not data:
            poller.unregister(fd); del socks[fd]; s.close()
            t = opener()
            if t is not None:
                add(t); reopened += 1
"#;

/// A running attacker process.
struct Attacker {
    child: tokio::process::Child,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Attacker {
    /// Starts the attacker as uid/gid 65534 and waits for its `ready` line.
    async fn start(mode: &str, target: &str, n: usize) -> Attacker {
        Attacker::start_as(65534, mode, target, n).await
    }

    /// [`Attacker::start`] as `uid` (and the same gid).
    async fn start_as(uid: u32, mode: &str, target: &str, n: usize) -> Attacker {
        let mut child = tokio::process::Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "--",
                "/usr/bin/python3",
                "-c",
                ATTACKER,
                mode,
                target,
                &n.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(120), stdout.next_line())
            .await
            .expect("the attacker never got ready")
            .unwrap()
            .unwrap_or_default();
        eprintln!("attacker {mode} x{n} (uid {uid}): {line}");
        assert!(line.starts_with("ready"), "{line}");
        Attacker { child, stdout }
    }

    /// Ends the attack (closes its stdin) and waits for it to exit.
    async fn stop(mut self) -> String {
        drop(self.child.stdin.take());
        let mut last = String::new();
        while let Ok(Ok(Some(l))) =
            tokio::time::timeout(Duration::from_secs(30), self.stdout.next_line()).await
        {
            last = l;
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        last
    }
}

/// A daemon on the demo's five clients with short-lived tokens, its socket open to everyone
/// (socket_mode 0666: the attacker must get in), its descriptors limited to 512.
async fn daemon(lifetime: Duration) -> (DemoEnv, DaemonProc, NotifySocket) {
    let env = DemoEnv::start(lifetime).await;
    env.edit_config(|t| {
        t.replace(
            "log_level = \"info\"",
            "log_level = \"info\"\nsocket_mode = \"0666\"\nmetrics_listen = \"127.0.0.1:0\"",
        )
    });
    // The attacker must reach the socket inside the test's private temp dir.
    set_mode(env.dir.path(), 0o711);
    set_mode(&env.demo.dir, 0o711);
    let (daemon, notify, _) =
        DaemonProc::start_ready_wrapped(&["prlimit", "--nofile=512:512"], &env.demo.config, &[])
            .await;
    (env, daemon, notify)
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// VmRSS and VmHWM of `pid`, in KiB.
fn rss(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Every output file's distinct contents seen while `during` runs, sampled every 100 ms for
/// `window`.
async fn watch_outputs(env: &DemoEnv, window: Duration) -> BTreeMap<String, BTreeSet<String>> {
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let end = Instant::now() + window;
    while Instant::now() < end {
        for e in std::fs::read_dir(&env.demo.out_dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            seen.entry(name).or_default().insert(read(&p));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

/// The daemon's metrics address, from its log line.
fn metrics_addr(d: &DaemonProc) -> String {
    let logs = d.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("metrics and health endpoints listening"))
        .unwrap_or_else(|| panic!("no metrics line in:\n{logs}"));
    let at = line.find("127.0.0.1:").unwrap();
    line[at..]
        .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
        .next()
        .unwrap()
        .to_string()
}

/// What each attack must leave true: every client refreshed during it (at least two new
/// tokens each in `window`), a legitimate `get` for every client answering after it, the
/// peak RSS under `bound_mib` above the start, nothing secret in the logs. The attack comes
/// from `uids` users, 65534 downwards (each holds at most its share of the connection cap);
/// a Watch flood must leave no Watch stream for root while it lasts.
async fn under_attack(mode: &str, target_metrics: bool, n: usize, bound_mib: u64) {
    under_attack_from(1, mode, target_metrics, n, bound_mib).await
}

async fn under_attack_from(uids: u32, mode: &str, target_metrics: bool, n: usize, bound_mib: u64) {
    let lifetime = Duration::from_secs(4);
    let (env, mut daemon, _notify) = daemon(lifetime).await;
    let socket = env.demo.socket.to_str().unwrap().to_string();
    let target = if target_metrics {
        format!("tcp:{}", metrics_addr(&daemon))
    } else {
        socket.clone()
    };
    let (rss0, _) = rss(daemon.pid());
    let mut attackers = Vec::new();
    for uid in (65535 - uids..65535).rev() {
        attackers.push(Attacker::start_as(uid, mode, &target, n).await);
    }
    let window = Duration::from_secs(12);
    let seen = watch_outputs(&env, window).await;
    let (rss1, hwm) = rss(daemon.pid());
    if mode == "watch" {
        // Every place for a Watch stream is taken: root's is refused, not served.
        let mut c = tokenwarden::client::connect(&env.demo.socket)
            .await
            .unwrap();
        let r = c
            .watch_token(tokenwarden::grpc::pb::WatchTokenRequest {
                client: env.demo.clients[0].clone(),
            })
            .await;
        assert_eq!(
            r.as_ref().err().map(|e| e.code()),
            Some(tonic::Code::ResourceExhausted),
            "a Watch stream beyond the cap was served: {:?}",
            r.err()
        );
    }
    if target_metrics {
        // While the attackers hold what they may (8 of the 32 places each), a scrape by
        // another uid is answered (1.4 s in a debug build; without the per-uid share it waits
        // minutes behind the attackers' connections), and the connections refused are counted.
        let within = Duration::from_secs(20);
        let t0 = Instant::now();
        let url = format!("http://{}/metrics", metrics_addr(&daemon));
        let http = reqwest::Client::builder().timeout(within).build().unwrap();
        let text = loop {
            if let Ok(r) = http.get(&url).send().await
                && let Ok(text) = r.text().await
            {
                break text;
            }
            assert!(
                t0.elapsed() < within,
                "root's scrape not answered for {within:?} under attack"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        eprintln!("root's scrape answered in {:?} under attack", t0.elapsed());
        assert!(
            text.contains(
                "tokenwarden_connections_refused_total{listener=\"metrics\",reason=\"uid_share\"}"
            ),
            "no metrics connection refused for its uid's share:\n{text}"
        );
    }
    let mut last = String::new();
    for a in attackers {
        last = a.stop().await;
    }
    eprintln!(
        "{mode} x{n}: RSS {} MiB before, {} MiB at the end, peak {} MiB ({last})",
        rss0 / 1024,
        rss1 / 1024,
        hwm / 1024
    );
    assert_eq!(seen.len(), 6, "outputs: {:?}", seen.keys());
    for (name, tokens) in &seen {
        assert!(
            tokens.len() >= 3,
            "{name}: {} distinct contents in {window:?} under attack ({mode}); logs:\n{}",
            tokens.len(),
            daemon.logs()
        );
    }
    // A legitimate caller, once the attack ends (connections it left in the backlog are
    // served or time out first).
    for client in &env.demo.clients {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = run(&["get", client, "-s", &socket]).await;
            if r.code == 0 && !r.stdout.trim().is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "get {client} after the attack: {} {}",
                r.code,
                r.stderr
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(
        hwm.saturating_sub(rss0) < bound_mib * 1024,
        "{mode}: peak RSS {} MiB, {} MiB at start (bound +{bound_mib} MiB)",
        hwm / 1024,
        rss0 / 1024
    );
    let logs = daemon.logs();
    for bad in [
        "cannot save state",
        "Too many open files",
        "holding the new token back",
    ] {
        assert!(!logs.contains(bad), "{mode}: {bad:?} in logs:\n{logs}");
    }
    for s in secret_material(&env, []) {
        assert!(!logs.contains(&s), "{mode}: a secret in the logs");
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_bomb_is_refused_before_it_expands() {
    // 4 connections at a time, each a 16 KB block that would decode to ~48 MB.
    under_attack("bomb", false, 4, 48).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_starve_nothing() {
    under_attack("idle", false, 2000, 64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_to_the_metrics_port_starve_nothing() {
    // More connections than the daemon has descriptors (512): without the metrics listener's
    // cap of 32 they would take them all; without its per-uid share (8), every place, so
    // that a scraper of another uid would wait.
    under_attack("idle", true, 600, 32).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_stream_flood_is_capped() {
    // Two uids, 300 connections x 16 Health/Watch streams each. Each uid holds 64 connections
    // (its share of 256): 2048 Watches asked for, the daemon serves 1024, the rest (and
    // root's) get RESOURCE_EXHAUSTED.
    under_attack_from(2, "watch", false, 300, 96).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_is_dropped_after_the_handshake_deadline() {
    under_attack("slowloris", false, 400, 64).await;
    // And one connection that sends half a preface is closed within the 10 s deadline.
    let (env, mut daemon, _notify) = daemon(Duration::from_secs(60)).await;
    let mut s = tokio::net::UnixStream::connect(&env.demo.socket)
        .await
        .unwrap();
    s.write_all(b"PRI * HTTP").await.unwrap();
    let t0 = Instant::now();
    let mut buf = vec![0u8; 4096];
    loop {
        use tokio::io::AsyncReadExt;
        match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("still open after 20 s"),
        }
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(13),
        "{took:?}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_uid_holding_thousands_of_connections_cannot_keep_root_waiting() {
    // uid 65534 opens 3000 idle connections and re-opens each one the daemon closes. It may
    // hold 64 (a quarter of max_connections); the rest are closed as soon as they are
    // accepted, so root's connection never waits behind them in the backlog.
    let (env, mut daemon, _notify) = daemon(Duration::from_secs(600)).await;
    let socket = env.demo.socket.to_str().unwrap().to_string();
    let attacker = Attacker::start("idle", &socket, 3000).await;
    let client = &env.demo.clients[0];
    let within = Duration::from_secs(5);
    let t0 = Instant::now();
    loop {
        let left = within.saturating_sub(t0.elapsed());
        let r = tokio::time::timeout(left, run(&["get", client, "-s", &socket]))
            .await
            .unwrap_or_else(|_| {
                panic!("root's get still waiting after {within:?} while uid 65534 attacks")
            });
        if r.code == 0 && !r.stdout.trim().is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < within,
            "root's get failed for {within:?}: {} {}",
            r.code,
            r.stderr
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = t0.elapsed();
    let metrics = reqwest::get(format!("http://{}/metrics", metrics_addr(&daemon)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let last = attacker.stop().await;
    eprintln!("root's get answered in {took:?} under 3000 idle connections of uid 65534 ({last})");
    assert!(
        metrics.contains(
            "tokenwarden_connections_refused_total{listener=\"grpc\",reason=\"uid_share\"}"
        ),
        "no connection refused for its uid's share:\n{metrics}"
    );
    daemon.stop().await;
}
