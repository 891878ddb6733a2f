//! The scale benchmark (issue 6): one daemon, N clients (default 10,000, each with its secret
//! in a file of its own and one `token` output), against a fast token endpoint that ships with
//! this benchmark. Run with `cargo bench --bench scale` (about 7 minutes with the defaults; not
//! part of the test run).
//!
//! It runs the real release binary as a child, as systemd would (`$NOTIFY_SOCKET` bound here),
//! and prints each figure beside its target:
//! - exec → `READY=1` for the first start (every client fetching its first token);
//! - RSS (`VmRSS`, `VmHWM`) a second after start-up and after the steady window; CPU (utime +
//!   stime) per second over the seconds of the window in which no token request happened;
//! - token requests per second: the busiest 10 s after the start-up burst against the steady
//!   mean (N ÷ the mean planned refresh age of the tokens fetched after the burst, read from
//!   `ListClients` at the end of the window);
//! - tokens sampled from the files and over gRPC during the window: none expired, none foreign
//!   (the endpoint remembers whom it issued each token to, and until when);
//! - reload: one client's scope changed by an atomic rename of the config, five times: time
//!   until its new token is in its file (p50, max), the token requests for other clients
//!   meanwhile, RSS after the first and the fifth;
//! - restart with the stored state of N valid tokens: exec → `READY=1`, and token requests;
//! - 5 clients: RSS after an idle period; the size of the stripped release binary.
//!
//! Environment: `TW_SCALE_CLIENTS` (default 10000), `TW_SCALE_LIFETIME` (token lifetime in
//! seconds, default 600), `TW_SCALE_WINDOW` (steady window in seconds, default 300: the first
//! refreshes after the start-up burst begin at a quarter of the lifetime), `TW_SCALE_IDLE`
//! (seconds the 5-client daemon idles before its RSS is read, default 30), `TW_SCALE_KEEP=1`
//! (keep the work directory and print its path), `TW_SCALE_LOG` (the daemon's `log_level`,
//! default `warn`; its log is `daemon.log` in the work directory), `TW_SCALE_WRAP` (a command put in front of the
//! daemon's, e.g. `valgrind --tool=massif --massif-out-file=/tmp/massif.out`, for profiling).

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const BIN: &str = env!("CARGO_BIN_EXE_tokenwarden");
/// The client whose scope the reloads change.
const RELOADED: usize = 42;
/// How many reloads are measured.
const RELOADS: usize = 5;

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a whole number, not {v:?}")),
        Err(_) => default,
    }
}

fn client_name(i: usize) -> String {
    format!("c{i:05}")
}

// ---------------------------------------------------------------------------------------------
// The token endpoint
// ---------------------------------------------------------------------------------------------

/// One token request the endpoint answered.
struct Hit {
    at: Instant,
    client: String,
}

/// What the endpoint issued: to whom, with which scope, until when.
struct Issued {
    client: String,
    scope: String,
    expires_at: SystemTime,
}

/// A minimal, fast OAuth token endpoint (RFC 6749 §4.4 client credentials with
/// `client_secret_post`): it checks the secret, issues a random token for `lifetime`, and
/// remembers every request and token.
struct Endpoint {
    lifetime: Duration,
    hits: Mutex<Vec<Hit>>,
    issued: Mutex<HashMap<String, Issued>>,
    counter: AtomicU64,
    rejected: AtomicU64,
}

impl Endpoint {
    fn answer(&self, body: &[u8]) -> (u16, String) {
        let mut grant = None;
        let mut client = None;
        let mut secret = None;
        let mut scope = String::new();
        for (k, v) in url::form_urlencoded::parse(body) {
            match &*k {
                "grant_type" => grant = Some(v.into_owned()),
                "client_id" => client = Some(v.into_owned()),
                "client_secret" => secret = Some(v.into_owned()),
                "scope" => scope = v.into_owned(),
                _ => {}
            }
        }
        let (Some(grant), Some(client), Some(secret)) = (grant, client, secret) else {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return (400, r#"{"error":"invalid_request"}"#.into());
        };
        if grant != "client_credentials" {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return (400, r#"{"error":"unsupported_grant_type"}"#.into());
        }
        if secret != format!("secret-{client}") {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return (401, r#"{"error":"invalid_client"}"#.into());
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let token = format!("{client}.{n}.{:016x}", rand::random::<u64>());
        self.issued.lock().unwrap().insert(
            token.clone(),
            Issued {
                client: client.clone(),
                scope: scope.clone(),
                expires_at: SystemTime::now() + self.lifetime,
            },
        );
        self.hits.lock().unwrap().push(Hit {
            at: Instant::now(),
            client,
        });
        let body = serde_json::json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.lifetime.as_secs(),
            "scope": scope,
        });
        (200, body.to_string())
    }

    fn hits_since(&self, since: Instant) -> Vec<(Instant, String)> {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.at >= since)
            .map(|h| (h.at, h.client.clone()))
            .collect()
    }

    fn hit_count(&self) -> usize {
        self.hits.lock().unwrap().len()
    }

    /// `None` when the token is fine for `client` now; otherwise what is wrong with it.
    fn judge(&self, client: &str, token: &str) -> Option<&'static str> {
        let issued = self.issued.lock().unwrap();
        match issued.get(token) {
            None => Some("never issued"),
            Some(i) if i.client != client => Some("foreign"),
            Some(i) if i.expires_at <= SystemTime::now() => Some("expired"),
            Some(_) => None,
        }
    }

    fn scope_of(&self, token: &str) -> Option<String> {
        self.issued
            .lock()
            .unwrap()
            .get(token)
            .map(|i| i.scope.clone())
    }
}

async fn serve(endpoint: Arc<Endpoint>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let endpoint = endpoint.clone();
                    async move {
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let (status, text) = endpoint.answer(&body);
                        let response = Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .header("cache-control", "no-store")
                            .body(Full::new(Bytes::from(text)))
                            .unwrap();
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

// ---------------------------------------------------------------------------------------------
// The daemon under test
// ---------------------------------------------------------------------------------------------

struct Setup {
    dir: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    port: u16,
    clients: usize,
}

impl Setup {
    fn output(&self, i: usize) -> PathBuf {
        self.dir
            .join("out")
            .join(format!("{}.token", client_name(i)))
    }

    /// The file holding client `i`'s secret: one file per client, as a deployment that keeps
    /// secrets out of the config has them.
    fn secret_file(&self, i: usize) -> PathBuf {
        self.dir.join("secrets").join(client_name(i))
    }

    /// Writes every client's secret file (0600, in a 0700 directory).
    fn write_secrets(&self) {
        let dir = self.dir.join("secrets");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        for i in 0..self.clients {
            let path = self.secret_file(i);
            std::fs::write(&path, format!("secret-{}\n", client_name(i))).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }

    fn config_text(&self, reload_scope: Option<&str>) -> String {
        let mut s = String::with_capacity(self.clients * 330);
        let _ = write!(
            s,
            "[daemon]\nsocket = {:?}\nstate_dir = {:?}\nlog_level = {:?}\nlog_format = \"text\"\n\n",
            self.socket,
            self.dir.join("state"),
            std::env::var("TW_SCALE_LOG").unwrap_or_else(|_| "warn".into())
        );
        for i in 0..self.clients {
            let name = client_name(i);
            let scope = match reload_scope {
                Some(s) if i == RELOADED => s,
                _ => "read",
            };
            let _ = write!(
                s,
                "[clients.{name}]\ntoken_url = \"http://127.0.0.1:{port}/token\"\n\
                 client_auth = \"client_secret_post\"\nclient_id = \"{name}\"\n\
                 client_secret = {{ file = {secret:?} }}\nscope = \"{scope}\"\n\
                 outputs = [{{ path = {out:?}, format = \"token\" }}]\n\n",
                port = self.port,
                secret = self.secret_file(i),
                out = self.output(i),
            );
        }
        s
    }

    /// Writes the config by an atomic rename; returns when the rename began.
    fn write_config(&self, reload_scope: Option<&str>) -> Instant {
        let tmp = self.dir.join(".config.tmp");
        std::fs::write(&tmp, self.config_text(reload_scope)).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
        let rename = Instant::now();
        std::fs::rename(&tmp, &self.config).unwrap();
        rename
    }
}

/// A `$NOTIFY_SOCKET` of our own.
struct Notify {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Notify {
    fn bind(dir: &Path, name: &str) -> Notify {
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Notify { socket, path }
    }

    /// Reads and drops what the daemon sends from now on, as systemd would: a queue left
    /// full (`net.unix.max_dgram_qlen`, 10 datagrams by default; a reload sends two) blocks the
    /// daemon's next notification, and the daemon with it.
    fn drain(&self) {
        let socket = self.socket.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match socket.recv(&mut buf) {
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => return,
                }
            }
        });
    }

    /// Waits until a datagram carries `READY=1`; returns when it arrived.
    fn wait_ready(&self, child: &mut Child, limit: Duration) -> Instant {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        loop {
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let at = Instant::now();
                    if String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .any(|l| l == "READY=1")
                    {
                        self.drain();
                        return at;
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("notify socket: {e}"),
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the daemon exited before READY=1: {status}");
            }
            assert!(Instant::now() < deadline, "no READY=1 within {limit:?}");
        }
    }
}

fn start(setup: &Setup, notify: &Notify) -> (Child, Instant) {
    let exec = Instant::now();
    // `TW_SCALE_WRAP="valgrind --tool=massif"`, say: a profiler in front of the daemon.
    let wrap = std::env::var("TW_SCALE_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace().chain([BIN]);
    let program = words.next().unwrap_or(BIN);
    let child = Command::new(program)
        .args(words)
        .args(["run", "-c"])
        .arg(&setup.config)
        .env("NOTIFY_SOCKET", &notify.path)
        .env_remove("WATCHDOG_USEC")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(setup.dir.join("daemon.log"))
                .unwrap(),
        ))
        .spawn()
        .unwrap();
    (child, exec)
}

/// Stops `child` and starts the daemon again on the same config and state: the new child, its
/// notify socket (kept open while it runs), when it was started, when it said READY=1, and the
/// endpoint's request count before the start.
fn restart(
    mut child: Child,
    setup: &Setup,
    endpoint: &Endpoint,
    notify_name: &str,
) -> (Child, Notify, Instant, Instant, usize) {
    stop(&mut child, &setup.dir);
    let before = endpoint.hit_count();
    let notify = Notify::bind(&setup.dir, notify_name);
    let (mut child, exec) = start(setup, &notify);
    let ready = notify.wait_ready(&mut child, Duration::from_secs(120));
    (child, notify, exec, ready, before)
}

/// Stops `child` with SIGTERM. One that is still running after 60 s has its threads' stacks
/// written to `stuck-PID.txt` in `dir` (when gdb is there), is killed, and the run goes on with
/// a line saying so: a hung stop is a finding to report, not a reason to lose the other
/// figures.
fn stop(child: &mut Child, dir: &Path) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let stacks = dir.join(format!("stuck-{pid}.txt"));
    let _ = Command::new("gdb")
        .args([
            "-p",
            &pid.to_string(),
            "-batch",
            "-ex",
            "thread apply all bt",
        ])
        .stdout(std::fs::File::create(&stacks).unwrap())
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "  NOT MET: the daemon did not stop within 60 s of SIGTERM (killed; stacks in {})",
        stacks.display()
    );
}

/// The number of threads of `pid`.
fn threads(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// (VmRSS, VmHWM) in KiB.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ") ".
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

struct Report {
    rows: Vec<(String, String, String, Option<bool>)>,
}

impl Report {
    fn row(&mut self, what: &str, measured: String, target: &str, met: Option<bool>) {
        println!(
            "  {what}: {measured}{}",
            match met {
                Some(true) => "  (met)",
                Some(false) => "  (MISSED)",
                None => "",
            }
        );
        self.rows
            .push((what.to_string(), measured, target.to_string(), met));
    }

    fn print(&self) {
        let w0 = self.rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let w1 = self.rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
        let w2 = self.rows.iter().map(|r| r.2.len()).max().unwrap_or(0);
        println!();
        println!(
            "{:w0$} | {:w1$} | {:w2$} | result",
            "figure", "measured", "target"
        );
        println!("{}", "-".repeat(w0 + w1 + w2 + 16));
        for (what, measured, target, met) in &self.rows {
            let result = match met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "",
            };
            println!("{what:w0$} | {measured:w1$} | {target:w2$} | {result}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

/// Counts how many of `hits` fall in each 10 s bucket from `from` to `to`.
fn ten_second_buckets(hits: &[(Instant, String)], from: Instant, to: Instant) -> Vec<usize> {
    let mut buckets = vec![0usize; (to - from).as_secs() as usize / 10 + 1];
    for (at, _) in hits {
        if *at >= from && *at < to {
            buckets[(*at - from).as_secs() as usize / 10] += 1;
        }
    }
    buckets
}

/// What one pass of the steady loop saw.
#[derive(Default)]
struct Samples {
    /// (when, pid, utime + stime) each second.
    cpu: Vec<(Instant, u32, u64)>,
    files: usize,
    grpc: usize,
    bad: Vec<String>,
}

/// Samples CPU every second and tokens (100 files, 20 over gRPC) every 5 s until `until`.
fn steady(
    runtime: &tokio::runtime::Runtime,
    setup: &Setup,
    endpoint: &Endpoint,
    pid: u32,
    until: Instant,
    pick: &mut impl FnMut() -> usize,
    samples: &mut Samples,
) {
    let mut grpc = runtime
        .block_on(tokenwarden::client::connect(&setup.socket))
        .unwrap();
    let start = Instant::now();
    samples.cpu.push((start, pid, cpu_ticks(pid)));
    let mut second = 0u64;
    while Instant::now() < until {
        second += 1;
        let wake = (start + Duration::from_secs(second)).min(until);
        std::thread::sleep(wake.saturating_duration_since(Instant::now()));
        samples.cpu.push((Instant::now(), pid, cpu_ticks(pid)));
        if !second.is_multiple_of(5) {
            continue;
        }
        for _ in 0..100 {
            let i = pick();
            let name = client_name(i);
            let token = std::fs::read_to_string(setup.output(i)).unwrap();
            samples.files += 1;
            if let Some(why) = endpoint.judge(&name, &token) {
                samples.bad.push(format!("file of {name}: {why}"));
            }
        }
        for _ in 0..20 {
            let name = client_name(pick());
            let answer = runtime.block_on(grpc.get_token(tokenwarden::grpc::pb::GetTokenRequest {
                client: name.clone(),
                min_valid_for: None,
            }));
            samples.grpc += 1;
            match answer {
                Ok(t) => {
                    let t = t.into_inner();
                    if t.client != name {
                        samples
                            .bad
                            .push(format!("gRPC for {name}: answered for {}", t.client));
                    } else if let Some(why) = endpoint.judge(&name, &t.access_token) {
                        samples.bad.push(format!("gRPC for {name}: {why}"));
                    }
                }
                Err(status) => samples.bad.push(format!("gRPC for {name}: {status}")),
            }
        }
    }
}

fn main() {
    // `cargo bench` passes --bench. `cargo test --all-targets` runs this binary without it: then
    // a small run checks that the benchmark still works and that what must hold at any size
    // holds (no expired or foreign token, a reload applied with no other request, a restart
    // with none); the size targets are printed, not enforced.
    let full = std::env::args().any(|a| a == "--bench");
    let (d_clients, d_lifetime, d_window, d_idle) = if full {
        (10_000, 600, 300, 30)
    } else {
        (60, 120, 8, 1)
    };
    let clients = env_num("TW_SCALE_CLIENTS", d_clients) as usize;
    let lifetime = Duration::from_secs(env_num("TW_SCALE_LIFETIME", d_lifetime));
    let window = Duration::from_secs(env_num("TW_SCALE_WINDOW", d_window));
    let idle = Duration::from_secs(env_num("TW_SCALE_IDLE", d_idle));
    let keep = std::env::var("TW_SCALE_KEEP").is_ok_and(|v| v == "1");
    assert!(
        clients > RELOADED,
        "TW_SCALE_CLIENTS must be above {RELOADED}"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let endpoint = Arc::new(Endpoint {
        lifetime,
        hits: Mutex::new(Vec::new()),
        issued: Mutex::new(HashMap::new()),
        counter: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
    });
    let port = runtime.block_on(serve(endpoint.clone()));
    let tmp = tempfile::Builder::new()
        .prefix("tw-scale-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("out")).unwrap();
    let setup = Setup {
        config: dir.join("tokenwarden.toml"),
        socket: dir.join("run").join("tokenwarden.sock"),
        dir: dir.clone(),
        port,
        clients,
    };
    setup.write_secrets();
    setup.write_config(None);
    let tps = ticks_per_second();
    let mut report = Report { rows: Vec::new() };
    println!(
        "tokenwarden scale benchmark{}: {clients} clients, {}s tokens, {}s steady window, binary {BIN}",
        if full {
            ""
        } else {
            " (small run: `cargo bench --bench scale` for the real one)"
        },
        lifetime.as_secs(),
        window.as_secs()
    );
    let mut rng_state = 0x9e37_79b9_7f4a_7c15u64;
    let mut pick = move || {
        // xorshift: a sample of clients that changes every round.
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        (rng_state % clients as u64) as usize
    };
    let mut samples = Samples::default();

    // --- First start: every client fetches its first token. ----------------------------------
    let notify = Notify::bind(&dir, "notify.sock");
    let (mut child, exec) = start(&setup, &notify);
    let ready = notify.wait_ready(&mut child, Duration::from_secs(600));
    let start_requests = endpoint.hit_count();
    report.row(
        "first start: exec → READY=1",
        format!(
            "{:.2} s ({start_requests} token requests)",
            (ready - exec).as_secs_f64()
        ),
        "(no target)",
        None,
    );
    // A second after READY=1, as after each reload: what the start-up freed has been given
    // back by then.
    std::thread::sleep(Duration::from_secs(1));
    let (rss, hwm) = memory(child.id());
    report.row(
        "RSS after start-up (VmRSS / VmHWM)",
        format!(
            "{} / {} ({} threads)",
            mib(rss),
            mib(hwm),
            threads(child.id())
        ),
        "≤ 64 MiB",
        Some(rss <= 64 * 1024),
    );

    // --- A quiet stretch (no refresh is due before a quarter of the lifetime after a burst),
    // then the reload and a restart while nothing else asks the provider. ---------------------
    let window_end = ready + window;
    let quiet_end = (ready + window / 10).min(window_end);
    steady(
        &runtime,
        &setup,
        &endpoint,
        child.id(),
        quiet_end,
        &mut pick,
        &mut samples,
    );

    // Reloads: each changes one client's scope by an atomic rename of the config, and waits
    // for that client's new token in its file.
    let reloaded = client_name(RELOADED);
    let out = setup.output(RELOADED);
    let first_rename = Instant::now();
    let mut reload_ms = Vec::new();
    let mut rss_after = Vec::new();
    let cpu_before = cpu_ticks(child.id());
    for round in 1..=RELOADS {
        let scope = format!("read r{round}");
        let rename = setup.write_config(Some(&scope));
        let deadline = rename + Duration::from_secs(30);
        let applied = loop {
            if let Ok(token) = std::fs::read_to_string(&out)
                && endpoint.scope_of(&token).as_deref() == Some(scope.as_str())
            {
                break Some(Instant::now());
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_micros(500));
        };
        let Some(at) = applied else {
            break;
        };
        reload_ms.push((at - rename).as_secs_f64() * 1000.0);
        // A quiet second: for the other clients to show any request the reload caused, and
        // for the daemon to finish the reload (freeing the old config) before RSS is read.
        std::thread::sleep(Duration::from_secs(1));
        rss_after.push(memory(child.id()));
    }
    // The daemon's CPU over the reloads and the quiet seconds after them (nothing else is due):
    // what a reload costs whatever else the machine runs.
    let reload_cpu_ms =
        (cpu_ticks(child.id()) - cpu_before) as f64 / tps * 1000.0 / reload_ms.len().max(1) as f64;
    let others = endpoint
        .hits_since(first_rename)
        .iter()
        .filter(|(_, c)| *c != reloaded)
        .count();
    let applied = (reload_ms.len() == RELOADS).then_some(());
    let mut sorted = reload_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let worst = sorted.last().copied();
    report.row(
        &format!("reload: rename → new token in the file ({RELOADS} reloads)"),
        match worst {
            Some(max) if applied.is_some() => format!(
                "p50 {:.0} ms, max {max:.0} ms ({})",
                sorted[sorted.len() / 2],
                reload_ms
                    .iter()
                    .map(|ms| format!("{ms:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => format!("reload {} not applied within 30 s", reload_ms.len() + 1),
        },
        "≤ 100 ms",
        Some(applied.is_some() && worst.is_some_and(|ms| ms <= 100.0)),
    );
    report.row(
        "reload: daemon CPU per reload (utime + stime)",
        format!("{reload_cpu_ms:.0} ms"),
        "(no target)",
        None,
    );
    report.row(
        "reload: token requests for the other clients",
        format!("{others}"),
        "0",
        Some(others == 0),
    );
    if let (Some(&(rss1, _)), Some(&(rss5, hwm5))) = (rss_after.first(), rss_after.last()) {
        report.row(
            &format!("RSS after 1 / {} reloads (VmRSS; VmHWM)", rss_after.len()),
            format!("{} / {} ({})", mib(rss1), mib(rss5), mib(hwm5)),
            "≤ 64 MiB",
            Some(rss1 <= 64 * 1024 && rss5 <= 64 * 1024),
        );
    }

    let (child, _notify2, exec, ready2, before) = restart(child, &setup, &endpoint, "notify2.sock");
    std::thread::sleep(Duration::from_secs(1));
    let restart_requests = endpoint.hit_count() - before;
    let secs = (ready2 - exec).as_secs_f64();
    report.row(
        "restart: exec → READY=1",
        format!("{:.0} ms", secs * 1000.0),
        "≤ 1 s",
        Some(secs <= 1.0),
    );
    report.row(
        "restart: token requests (by READY=1 + 1 s)",
        format!("{restart_requests}"),
        "0",
        Some(restart_requests == 0),
    );
    let (rss3, _) = memory(child.id());
    report.row(
        "RSS after the restart",
        mib(rss3),
        "≤ 64 MiB",
        Some(rss3 <= 64 * 1024),
    );

    // --- The rest of the steady window, on the restarted daemon. ------------------------------
    steady(
        &runtime,
        &setup,
        &endpoint,
        child.id(),
        window_end,
        &mut pick,
        &mut samples,
    );
    let pid = child.id();
    let (rss2, hwm2) = memory(pid);
    report.row(
        "RSS after the steady window (VmRSS / VmHWM)",
        format!("{} / {}", mib(rss2), mib(hwm2)),
        "≤ 64 MiB",
        Some(rss2 <= 64 * 1024 && hwm2 <= 64 * 1024),
    );

    // Idle CPU: the seconds in which no token request happened (nor in the second before,
    // so that the writes of a refresh that straddles the edge do not count as idle), and no
    // reload or restart.
    let window_hits = endpoint.hits_since(ready);
    let busy = |from: Instant, to: Instant| {
        window_hits
            .iter()
            .any(|(at, _)| *at >= from - Duration::from_secs(1) && *at < to)
            || (from < ready2 + Duration::from_secs(2) && to > first_rename)
    };
    let mut idle_ticks = 0u64;
    let mut idle_secs = 0.0f64;
    for pair in samples.cpu.windows(2) {
        let ((t0, p0, c0), (t1, p1, c1)) = (pair[0], pair[1]);
        if p0 == p1 && !busy(t0, t1) {
            idle_ticks += c1 - c0;
            idle_secs += (t1 - t0).as_secs_f64();
        }
    }
    let idle_cpu = (idle_secs > 0.0).then(|| idle_ticks as f64 / tps / idle_secs * 100.0);
    report.row(
        "idle CPU (seconds without a token request)",
        match idle_cpu {
            Some(p) => format!("{p:.2}% of a core over {idle_secs:.0} s"),
            None => "no such second in the window".into(),
        },
        "≤ 1%",
        idle_cpu.map(|p| p <= 1.0),
    );

    // Burst: the busiest 10 s after start-up against the steady mean, N ÷ the mean age at which
    // the daemon plans to refresh the tokens it got in the window (the ones on the regular
    // schedule, no longer the start-up spread).
    let statuses = runtime
        .block_on(tokenwarden::client::list(&setup.socket))
        .unwrap();
    let to_system = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .map(|t| UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32))
    };
    // A token's issue time is its expiry less the lifetime the endpoint gives every token.
    let burst_end = SystemTime::now() - ready.elapsed() + Duration::from_secs(5);
    let ages: Vec<f64> = statuses
        .iter()
        .filter_map(|s| {
            let issued = to_system(&s.expires_at)?.checked_sub(lifetime)?;
            let next = to_system(&s.next_refresh_at)?;
            (issued > burst_end)
                .then(|| next.duration_since(issued).ok())
                .flatten()
                .map(|d| d.as_secs_f64())
        })
        .collect();
    let buckets = ten_second_buckets(&window_hits, ready, Instant::now());
    let busiest = buckets.iter().copied().max().unwrap_or(0) as f64 / 10.0;
    let mut steady_rate = None;
    if ages.is_empty() {
        report.row(
            "busiest 10 s of token requests vs steady mean",
            format!(
                "{busiest:.1}/s; no refresh in the window to plan from (window shorter than lifetime/4?)"
            ),
            "≤ 2×",
            None,
        );
    } else {
        let mean_age = ages.iter().sum::<f64>() / ages.len() as f64;
        let steady = clients as f64 / mean_age;
        steady_rate = Some(steady);
        let ratio = busiest / steady;
        report.row(
            "busiest 10 s of token requests vs steady mean",
            format!(
                "{busiest:.1}/s vs {steady:.1}/s (N ÷ mean planned age {mean_age:.0} s, from {} refreshed clients) = {ratio:.2}×; {} requests in the window",
                ages.len(),
                window_hits.len()
            ),
            "≤ 2×",
            Some(ratio <= 2.0),
        );
    }
    let bad_count = samples.bad.len();
    samples.bad.truncate(20);
    report.row(
        "tokens sampled (files / gRPC): expired or foreign",
        format!(
            "{bad_count} of {} / {}{}",
            samples.files,
            samples.grpc,
            if samples.bad.is_empty() {
                String::new()
            } else {
                format!(": {}", samples.bad.join("; "))
            }
        ),
        "0",
        Some(bad_count == 0),
    );

    // --- A restart late in the tokens' lives: no burst. Refreshes fall due all the time by
    // now, so the rate from exec to 10 s after READY=1 is compared with the steady mean. --------
    let (mut child, _notify4, exec, ready4, before) =
        restart(child, &setup, &endpoint, "notify4.sock");
    let by_ready = endpoint.hit_count() - before;
    std::thread::sleep(Duration::from_secs(10));
    let total = endpoint.hit_count() - before;
    let rate = total as f64 / exec.elapsed().as_secs_f64();
    let age = (ready4 - ready).as_secs_f64() / lifetime.as_secs_f64();
    report.row(
        &format!("restart at {age:.2} of the lifetime: token requests, exec → READY=1 + 10 s"),
        format!(
            "{total} ({by_ready} before READY=1, in {:.0} ms) = {rate:.1}/s{}",
            (ready4 - exec).as_secs_f64() * 1000.0,
            match steady_rate {
                Some(r) => format!(" = {:.2}× the steady mean", rate / r),
                None => String::new(),
            },
        ),
        "≤ 2× the steady mean",
        steady_rate.map(|r| rate <= 2.0 * r),
    );
    stop(&mut child, &setup.dir);

    // --- Five clients, idle. -----------------------------------------------------------------
    let small_dir = dir.join("small");
    std::fs::create_dir_all(small_dir.join("out")).unwrap();
    let small = Setup {
        config: small_dir.join("tokenwarden.toml"),
        socket: small_dir.join("run").join("tokenwarden.sock"),
        dir: small_dir.clone(),
        port,
        clients: 5,
    };
    small.write_secrets();
    small.write_config(None);
    let notify3 = Notify::bind(&small_dir, "notify.sock");
    let (mut child, _) = start(&small, &notify3);
    notify3.wait_ready(&mut child, Duration::from_secs(60));
    std::thread::sleep(idle);
    let (rss5, _) = memory(child.id());
    report.row(
        &format!("5 clients: RSS after {} s idle", idle.as_secs()),
        mib(rss5),
        "≤ 12 MiB",
        Some(rss5 <= 12 * 1024),
    );
    stop(&mut child, &small.dir);

    // --- The stripped binary. ----------------------------------------------------------------
    let stripped = dir.join("tokenwarden.stripped");
    let strip = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(BIN)
        .status();
    match strip {
        Ok(s) if s.success() => {
            let size = std::fs::metadata(&stripped).unwrap().len();
            report.row(
                "stripped release binary",
                format!("{size} bytes = {:.2} MiB", size as f64 / 1024.0 / 1024.0),
                "≤ 15 MiB",
                Some(size <= 15 * 1024 * 1024),
            );
        }
        _ => report.row(
            "stripped release binary",
            "`strip` (binutils) not available".into(),
            "≤ 15 MiB",
            None,
        ),
    }

    let rejected = endpoint.rejected.load(Ordering::Relaxed);
    if rejected > 0 {
        println!("note: the endpoint rejected {rejected} requests");
    }
    report.print();
    if keep {
        let kept = tmp.keep();
        println!("work directory kept: {}", kept.display());
    }
    if !full {
        // What must hold at any size.
        assert_eq!(rejected, 0, "the endpoint rejected requests");
        assert_eq!(bad_count, 0, "expired or foreign tokens were served");
        assert!(applied.is_some(), "the reload was not applied");
        assert_eq!(others, 0, "the reload made requests for other clients");
        assert_eq!(restart_requests, 0, "the restart made token requests");
        assert_eq!(
            by_ready, 0,
            "the early restart made token requests before READY"
        );
    }
}
