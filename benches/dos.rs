//! The denial-of-service benchmark (issue 10): the release daemon with the demo's five
//! short-lived clients, first unattacked, then under each attack on its socket in turn:
//! - 2,000 idle connections (the daemon serves 256; the rest wait in the kernel's backlog);
//! - 1,000 `Health/Watch` streams (63 connections of 16);
//! - a header-bomb loop (four connections at a time, each a 16 KB block naming a 4 KB
//!   dynamic-table entry 12,000 times: ~48 MB if decoded).
//!
//! For each phase: the daemon's RSS (`VmRSS`, and `VmHWM`, which only grows), refresh health
//! (new tokens per client seen in the output files against the unattacked phase, and any
//! expired token read), and the `GetToken` latency of a legitimate caller on a connection
//! opened before the attack, plus the time a *new* connection takes to get its answer at the
//! end of the phase (it waits behind the attacker's connections at the cap). Run with
//! `cargo bench --bench dos` (20 s phases). Under `cargo test --all-targets` (no `--bench`) a
//! small run (3 s phases, 200 idle connections, 100 Watches) checks that it works and that what
//! must hold holds: every client refreshed in every phase, nothing expired, the daemon alive.
//!
//! The idle connections and the Watch streams come from a child of this binary running as
//! uid 65534 (`setpriv`), as a local attacker would: the daemon gives each peer uid only a
//! share of its connection cap, so a legitimate caller of another uid is never one of theirs.
//!
//! Environment: `TW_DOS_PHASE` (seconds per phase); `TW_DOS_ATTACK` (internal: the child's
//! `KIND:COUNT:SOCKET`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prost::Message;
use tokenwarden::grpc::pb;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

const BIN: &str = env!("CARGO_BIN_EXE_tokenwarden");
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut v = len.to_be_bytes()[1..].to_vec();
    v.extend([kind, flags]);
    v.extend(stream.to_be_bytes());
    v.extend(payload);
    v
}

/// The header-bomb connection's bytes (see the module doc).
fn bomb() -> Vec<u8> {
    let mut block = vec![0x01, 16];
    block.extend(b"%2Frun%2Ftw.sock");
    block.extend([0x40, 6]);
    block.extend(b"x-bomb");
    block.extend([0x7f, 0xa1, 0x1e]);
    block.extend(std::iter::repeat_n(b'a', 4000));
    block.extend(std::iter::repeat_n(0xbe, 12_000));
    let mut out = PREFACE.to_vec();
    out.extend(frame(4, 0, 0, &[]));
    out.extend(frame(1, 4, 1, &block));
    out
}

/// VmRSS and VmHWM in MiB.
fn rss(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// An h2 connection for `GetToken` calls.
async fn h2_conn(socket: &Path) -> h2::client::SendRequest<Bytes> {
    let io = UnixStream::connect(socket).await.unwrap();
    let (send, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

fn grpc_request(path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

fn framed(msg: &[u8]) -> Bytes {
    let mut v = vec![0u8];
    v.extend((msg.len() as u32).to_be_bytes());
    v.extend(msg);
    Bytes::from(v)
}

/// One `GetToken`: the token, or `None` on any failure.
async fn get_token(send: &mut h2::client::SendRequest<Bytes>, client: &str) -> Option<pb::Token> {
    let mut ready = send.clone().ready().await.ok()?;
    let (resp, mut body) = ready
        .send_request(grpc_request("/tokenwarden.v1.TokenService/GetToken"), false)
        .ok()?;
    let req = pb::GetTokenRequest {
        client: client.into(),
        min_valid_for: None,
    };
    body.send_data(framed(&req.encode_to_vec()), true).ok()?;
    let mut recv = resp.await.ok()?.into_body();
    let mut data = Vec::new();
    while let Some(d) = recv.data().await {
        let d = d.ok()?;
        let _ = recv.flow_control().release_capacity(d.len());
        data.extend_from_slice(&d);
    }
    let trailers = recv.trailers().await.ok()??;
    if trailers.get("grpc-status")?.as_bytes() != b"0" || data.len() < 5 {
        return None;
    }
    pb::Token::decode(&data[5..]).ok()
}

fn expired(t: &pb::Token) -> bool {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    t.expires_at.as_ref().is_none_or(|e| e.seconds <= now)
}

/// What one phase measured.
struct Phase {
    name: &'static str,
    rss: f64,
    hwm: f64,
    /// Fewest new tokens of any client seen in its outputs.
    min_new: usize,
    expired: usize,
    failed_calls: usize,
    p50_ms: f64,
    p99_ms: f64,
    new_conn_ms: f64,
}

/// Runs a phase of `length` while `attack` holds: samples outputs and `GetToken`.
async fn measure(
    name: &'static str,
    pid: u32,
    out_dir: &Path,
    socket: &Path,
    legit: &mut h2::client::SendRequest<Bytes>,
    clients: &[String],
    length: Duration,
) -> Phase {
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut lat = Vec::new();
    let (mut expired_n, mut failed) = (0, 0);
    let end = Instant::now() + length;
    let mut i = 0;
    while Instant::now() < end {
        for e in std::fs::read_dir(out_dir).into_iter().flatten().flatten() {
            let p = e.path();
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            if !n.starts_with('.') {
                seen.entry(n)
                    .or_default()
                    .insert(std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
        let t0 = Instant::now();
        match tokio::time::timeout(
            Duration::from_secs(5),
            get_token(legit, &clients[i % clients.len()]),
        )
        .await
        {
            Ok(Some(t)) => {
                lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                expired_n += usize::from(expired(&t));
            }
            _ => failed += 1,
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A caller connecting now.
    let t0 = Instant::now();
    let new_conn_ms = match tokio::time::timeout(Duration::from_secs(60), async {
        let mut c = h2_conn(socket).await;
        get_token(&mut c, &clients[0]).await
    })
    .await
    {
        Ok(Some(_)) => t0.elapsed().as_secs_f64() * 1000.0,
        _ => f64::INFINITY,
    };
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let (rss, hwm) = rss(pid);
    Phase {
        name,
        rss,
        hwm,
        min_new: seen
            .values()
            .map(|s| s.len().saturating_sub(1))
            .min()
            .unwrap_or(0),
        expired: expired_n,
        failed_calls: failed,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        new_conn_ms,
    }
}

/// The attacker's side (`TW_DOS_ATTACK=KIND:COUNT:SOCKET`, as uid 65534): opens `COUNT` idle
/// connections, or `COUNT` `Health/Watch` streams 16 to a connection, prints `ready N` and
/// holds them until stdin closes.
fn attack(spec: &str) {
    let mut it = spec.splitn(3, ':');
    let (kind, n, socket) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    let n: usize = n.parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (mut idle, mut watches) = (Vec::new(), Vec::new());
        if kind == "idle" {
            for _ in 0..n {
                let connect = UnixStream::connect(socket);
                match tokio::time::timeout(Duration::from_millis(200), connect).await {
                    Ok(Ok(s)) => idle.push(s),
                    _ => break,
                }
            }
        } else {
            for _ in 0..n.div_ceil(16) {
                let mut c = h2_conn(Path::new(socket)).await;
                for _ in 0..16 {
                    let Ok(mut ready) = c.clone().ready().await else {
                        break;
                    };
                    if let Ok((resp, mut body)) =
                        ready.send_request(grpc_request("/grpc.health.v1.Health/Watch"), false)
                    {
                        let _ = body.send_data(framed(&[]), true);
                        watches.push((resp, body));
                    }
                    c = ready;
                }
            }
        }
        println!("ready {}", idle.len() + watches.len());
        let held = || std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        let _ = tokio::task::spawn_blocking(held).await;
    });
}

/// Starts [`attack`] in a child running as uid 65534; returns once it holds what it opened.
fn attacker(kind: &str, n: usize, socket: &Path) -> Child {
    let mut child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(std::env::current_exe().unwrap())
        .env("TW_DOS_ATTACK", format!("{kind}:{n}:{}", socket.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(
        line.starts_with("ready"),
        "the {kind} attacker failed: {line:?}"
    );
    child
}

/// Ends an [`attacker`]: closes its stdin and waits for it.
fn stop_attacker(mut child: Child) {
    drop(child.stdin.take());
    let _ = child.wait();
}

fn main() {
    if let Ok(spec) = std::env::var("TW_DOS_ATTACK") {
        return attack(&spec);
    }
    if !nix::unistd::geteuid().is_root() {
        println!(
            "SKIPPED: the DoS benchmark runs its attacker as uid 65534 (setpriv): run it as root"
        );
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let phase_s = std::env::var("TW_DOS_PHASE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 20 } else { 3 });
    let length = Duration::from_secs(phase_s);
    let (idle_n, watch_n): (usize, usize) = if full { (2000, 1000) } else { (200, 100) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tmp = tempfile::tempdir().unwrap();
        let provider = tokenwarden::provider::Provider::start().await.unwrap();
        let demo = tokenwarden::demo::setup(tmp.path(), &provider, Duration::from_secs(4)).unwrap();
        // The attacker (uid 65534) must reach the socket.
        let config = std::fs::read_to_string(&demo.config).unwrap();
        let config = config.replacen("[daemon]\n", "[daemon]\nsocket_mode = \"0666\"\n", 1);
        std::fs::write(&demo.config, config).unwrap();
        use std::os::unix::fs::PermissionsExt;
        for dir in [tmp.path(), demo.socket.parent().unwrap()] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        }
        let mut daemon: Child = Command::new(BIN)
            .args(["run", "-c"])
            .arg(&demo.config)
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = daemon.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&demo.socket).await.is_err() {
            assert!(Instant::now() < deadline, "the daemon never listened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "tokenwarden DoS benchmark{}: 5 clients, 4 s tokens, {phase_s} s phases, binary {BIN}",
            if full { "" } else { " (small run: `cargo bench --bench dos` for the real one)" }
        );
        // Every output written: every client has its first token.
        let outputs = |d: &Path| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
        while outputs(&demo.out_dir) < 6 {
            assert!(Instant::now() < deadline, "the daemon never wrote every output");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut legit = h2_conn(&demo.socket).await;
        let clients = demo.clients.clone();
        let mut phases = Vec::new();
        macro_rules! m {
            ($name:expr) => {
                measure(
                    $name,
                    pid,
                    &demo.out_dir,
                    &demo.socket,
                    &mut legit,
                    &clients,
                    length,
                )
            };
        }
        phases.push(m!("unattacked").await);

        let idle = attacker("idle", idle_n, &demo.socket);
        phases.push(m!("idle connections").await);
        stop_attacker(idle);

        let watches = attacker("watch", watch_n, &demo.socket);
        phases.push(m!("Watch streams").await);
        stop_attacker(watches);

        let socket = demo.socket.clone();
        let stop = tokio_util::sync::CancellationToken::new();
        let s2 = stop.clone();
        let bomber = tokio::spawn(async move {
            let bytes = bomb();
            let mut rounds = 0u64;
            while !s2.is_cancelled() {
                let mut set = tokio::task::JoinSet::new();
                for _ in 0..4 {
                    let (socket, bytes) = (socket.clone(), bytes.clone());
                    set.spawn(async move {
                        if let Ok(mut s) = UnixStream::connect(&socket).await {
                            let _ = s.write_all(&bytes).await;
                            let mut sink = tokio::io::sink();
                            let _ = tokio::time::timeout(
                                Duration::from_secs(5),
                                tokio::io::copy(&mut s, &mut sink),
                            )
                            .await;
                        }
                    });
                }
                while set.join_next().await.is_some() {}
                rounds += 1;
            }
            rounds
        });
        phases.push(m!("header bombs").await);
        stop.cancel();
        let rounds = bomber.await.unwrap_or(0);

        let base = &phases[0];
        println!(
            "{:<18} {:>8} {:>8} {:>11} {:>8} {:>7} {:>11} {:>11} {:>13}",
            "phase", "RSS MiB", "HWM MiB", "new tokens", "expired", "failed", "p50 ms", "p99 ms", "new conn ms"
        );
        for p in &phases {
            println!(
                "{:<18} {:>8.1} {:>8.1} {:>5} ({:.2}) {:>8} {:>7} {:>5.2} ({:.1}x) {:>5.2} ({:.1}x) {:>13.1}",
                p.name,
                p.rss,
                p.hwm,
                p.min_new,
                p.min_new as f64 / base.min_new.max(1) as f64,
                p.expired,
                p.failed_calls,
                p.p50_ms,
                p.p50_ms / base.p50_ms,
                p.p99_ms,
                p.p99_ms / base.p99_ms,
                p.new_conn_ms,
            );
        }
        println!("header-bomb connections: {}", rounds * 4);
        // What must hold at any size.
        for p in &phases {
            assert!(p.min_new >= 1, "{}: a client was not refreshed", p.name);
            assert_eq!(p.expired, 0, "{}: an expired token was served", p.name);
        }
        assert!(daemon.try_wait().unwrap().is_none(), "the daemon died");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = daemon.wait();
    });
}
