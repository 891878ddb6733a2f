//! The HTTP API (docs/http.md) against a real `tokenwarden run` with both `http_socket` and
//! `http_listen`: every route and error, the access rule as root and as uid 65534 on both
//! listeners, the header rules, the long poll woken by a rotation, the bounds under a
//! connection flood and a slow sender, the audit log, the Python client of the docs, and the
//! config errors of the new keys.
//!
//! Requests are raw HTTP/1.1 on std sockets, or curl (run as uid 65534 through setpriv) where
//! another user must call; without curl those parts print SKIPPED.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::{DaemonProc, DemoEnv, NotifySocket, read, run, secret_material};

const NOBODY: [&str; 3] = ["--reuid=65534", "--regid=65534", "--clear-groups"];

/// A daemon serving the demo's clients with both HTTP listeners.
struct Http {
    env: DemoEnv,
    daemon: DaemonProc,
    _notify: NotifySocket,
    socket: PathBuf,
    tcp: SocketAddr,
}

/// Starts the demo daemon with `http_socket`, `http_listen = "127.0.0.1:0"` and the extra
/// `[daemon]` lines `extra`; uid 65534 may reach both sockets and read `transatel`.
async fn start(lifetime: Duration, extra: &str) -> Http {
    start_wrapped(&[], lifetime, extra).await
}

/// [`start`] through `WRAPPER...` (see [`DaemonProc::start_wrapped`]).
async fn start_wrapped(wrapper: &[&str], lifetime: Duration, extra: &str) -> Http {
    let env = DemoEnv::start(lifetime).await;
    env.open_socket_to_everyone();
    // A client whose provider is not listening: no token, 503.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let broken_url = format!("http://{}/token", closed.local_addr().unwrap());
    drop(closed);
    env.edit_config(|t| {
        format!(
            "{t}\n[clients.broken]\ntoken_url = \"{broken_url}\"\nclient_id = \"x\"\n\
             client_secret = \"s\"\ntimeout = \"2s\"\n"
        )
    });
    let socket = env.demo.socket.with_file_name("http.sock");
    env.edit_config(|t| {
        t.replacen(
            "[daemon]\n",
            &format!(
                "[daemon]\nhttp_socket = {:?}\nhttp_listen = \"127.0.0.1:0\"\n{extra}",
                socket.to_str().unwrap()
            ),
            1,
        )
        .replacen(
            "[clients.transatel]\n",
            "[clients.transatel]\nallow_users = [65534]\n",
            1,
        )
    });
    let (daemon, notify, _) = DaemonProc::start_ready_wrapped(wrapper, &env.demo.config, &[]).await;
    let tcp = logged_address(&daemon, "HTTP API listening address=").await;
    Http {
        env,
        daemon,
        _notify: notify,
        socket,
        tcp,
    }
}

/// The address in the log line containing `prefix` (an address bound on port 0).
async fn logged_address(daemon: &DaemonProc, prefix: &str) -> SocketAddr {
    daemon.wait_log(prefix, Duration::from_secs(10)).await;
    let logs = daemon.logs();
    let at = logs.find(prefix).unwrap() + prefix.len();
    let end = logs[at..]
        .find(|c: char| c.is_whitespace())
        .map_or(logs.len(), |e| at + e);
    logs[at..end].trim_matches('"').parse().unwrap()
}

/// One answer: status, head (lower-cased), body.
#[derive(Debug)]
struct Resp {
    status: u16,
    head: String,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.eq_ignore_ascii_case(name)).then(|| v.trim())
        })
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    /// A JSON error with this status and code, and `Cache-Control: no-store`.
    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.json()["error"], code, "{self:?}");
        assert!(self.json()["message"].as_str().is_some(), "{self:?}");
        assert_eq!(self.header("cache-control"), Some("no-store"), "{self:?}");
    }
}

/// Sends `request` (a whole HTTP/1.1 request) and reads the answer until the server closes.
fn exchange(mut s: impl Read + Write, request: &str) -> Resp {
    // The server may answer and close before it has read all of a request it refuses (431):
    // a failed write is fine, what it answered is read all the same.
    let _ = s.write_all(request.as_bytes());
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!(
                    "no answer in time; so far: {:?}",
                    String::from_utf8_lossy(&raw)
                )
            }
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    Resp {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

fn unix(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    s
}

fn tcp(addr: SocketAddr) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    s
}

/// `METHOD TARGET` with `Connection: close`, `Host: localhost` and `headers`.
fn req(method: &str, target: &str, headers: &[&str]) -> String {
    let mut r = format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r
}

/// GET over the Unix socket.
fn get_unix(path: &Path, target: &str) -> Resp {
    exchange(unix(path), &req("GET", target, &[]))
}

/// GET over TCP with `Tokenwarden: 1`.
fn get_tcp(addr: SocketAddr, target: &str) -> Resp {
    exchange(tcp(addr), &req("GET", target, &["Tokenwarden: 1"]))
}

/// curl as uid 65534 (or as root with `as_nobody` false): (status, body); `None` when curl
/// or setpriv is missing (the caller prints SKIPPED).
async fn curl(as_nobody: bool, args: &[&str]) -> Option<(u16, String)> {
    let mut cmd = if as_nobody {
        let mut c = tokio::process::Command::new("setpriv");
        c.args(NOBODY).arg("--").arg("curl");
        c
    } else {
        tokio::process::Command::new("curl")
    };
    cmd.args(["-sS", "--max-time", "70", "-w", "\n%{http_code}"])
        .args(args)
        .kill_on_drop(true);
    let out = cmd.output().await.ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    let code = code.trim().parse().ok()?;
    if code == 0 {
        panic!(
            "curl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Some((code, body.to_string()))
}

/// `tokenwarden get transatel` over the gRPC socket, which must succeed.
async fn grpc_get(h: &Http) {
    let r = run(&[
        "get",
        "transatel",
        "-s",
        h.env.demo.socket.to_str().unwrap(),
    ])
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// The daemon's `/metrics` text (its `metrics_listen` address read from its log).
async fn scrape_metrics(daemon: &DaemonProc) -> String {
    let metrics = logged_address(daemon, "metrics and health endpoints listening address=").await;
    exchange(
        std::net::TcpStream::connect(metrics).unwrap(),
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .body
}

fn have_curl_and_root(test: &str) -> bool {
    let curl = std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !curl {
        eprintln!("SKIPPED: {test}: curl is not installed");
        return false;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: {test}: needs root to act as uid 65534");
        return false;
    }
    true
}

/// Every route and error over the Unix socket as root, and the same answers over TCP.
#[tokio::test(flavor = "multi_thread")]
async fn every_route_and_error_over_both_listeners() {
    let mut h = start(Duration::from_secs(30), "").await;
    let s = &h.socket;
    let file_token = read(&h.env.out("transatel.token"));

    let r = get_unix(s, "/v1/token/transatel");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let v = r.json();
    assert_eq!(v["client"], "transatel");
    assert_eq!(v["access_token"], file_token.as_str());
    assert_eq!(v["token_type"], "Bearer");
    assert!(v["expires_at"].as_str().unwrap().ends_with('Z'));
    let generation = v["generation"].as_u64().unwrap();
    assert!(generation >= 1);

    let r = get_unix(s, "/v1/token/transatel?format=token");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, format!("{file_token}\n").as_str())
    );
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let r = get_unix(s, "/v1/token/transatel?format=header");
    assert_eq!(r.body, format!("Authorization: Bearer {file_token}\n"));

    // min_valid longer than what is left: a new token first; longer than a lifetime: 400.
    // (Once the token is over a second old, less than 29 s of its 30 are left.)
    let issued: std::time::SystemTime =
        humantime::parse_rfc3339(v["issued_at"].as_str().unwrap()).unwrap();
    let old_enough = issued + Duration::from_millis(1500);
    crate::support::wait_for("the token to age", Duration::from_secs(5), || {
        std::time::SystemTime::now() > old_enough
    })
    .await;
    let r = get_unix(s, "/v1/token/transatel?min_valid=29s");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.json()["generation"].as_u64().unwrap() > generation,
        "{r:?}"
    );
    get_unix(s, "/v1/token/transatel?min_valid=1h").assert_error(400, "bad_request");
    get_unix(s, "/v1/token/transatel?min_valid=soon").assert_error(400, "bad_request");
    get_unix(s, "/v1/token/transatel?fromat=token").assert_error(400, "bad_request");
    get_unix(s, "/v1/token/no%2Fsuch").assert_error(400, "bad_request");
    // Root hears that a name does not exist.
    get_unix(s, "/v1/token/nosuch").assert_error(404, "not_found");
    get_unix(s, "/v2/other").assert_error(404, "not_found");
    // Methods.
    let r = exchange(unix(s), &req("POST", "/v1/token/transatel", &[]));
    r.assert_error(405, "method_not_allowed");
    assert_eq!(r.header("allow"), Some("GET"));
    exchange(unix(s), &req("GET", "/v1/token/transatel/refresh", &[]))
        .assert_error(405, "method_not_allowed");

    // A refresh: a new token (forced by root); a demand right after it gets that token.
    let before = get_unix(s, "/v1/token/transatel").json()["generation"]
        .as_u64()
        .unwrap();
    let r = exchange(
        unix(s),
        &req(
            "POST",
            "/v1/token/transatel/refresh?force=true",
            &["Content-Length: 0"],
        ),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let after = r.json()["generation"].as_u64().unwrap();
    assert_eq!(after, before + 1, "{r:?}");
    let r = exchange(
        unix(s),
        &req(
            "POST",
            "/v1/token/transatel/refresh",
            &["Content-Length: 0"],
        ),
    );
    assert_eq!(r.json()["generation"].as_u64().unwrap(), after, "{r:?}");

    // Clients and health.
    let r = get_unix(s, "/v1/clients");
    assert_eq!(r.status, 200);
    let list = r.json();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 6, "{list}");
    for c in list.as_array().unwrap() {
        let want = if c["client"] == "broken" {
            "FAILED"
        } else {
            "VALID"
        };
        assert_eq!(c["state"], want, "{list}");
    }
    assert!(!r.body.contains(&file_token));
    let r = get_unix(s, "/healthz");
    assert_eq!((r.status, r.json()["status"].clone()), (200, "ok".into()));

    // The same over TCP.
    let r = get_tcp(h.tcp, "/v1/token/transatel?format=token");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    get_tcp(h.tcp, "/v1/token/nosuch").assert_error(404, "not_found");
    assert_eq!(
        get_tcp(h.tcp, "/v1/clients")
            .json()
            .as_array()
            .unwrap()
            .len(),
        6
    );

    // A client whose provider is down: 503 with the last error.
    let r = get_unix(s, "/v1/token/broken");
    r.assert_error(503, "unavailable");
    assert!(
        r.json()["message"].as_str().unwrap().contains("broken"),
        "{r:?}"
    );

    // No token of anyone's in the logs.
    let secrets = secret_material(&h.env, [file_token]);
    h.daemon.stop().await;
    let logs = h.daemon.logs();
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "a secret in the logs");
    }
    assert!(!h.socket.exists(), "the HTTP socket is left behind");
}

/// uid 65534 may read `transatel` (allow_users) and nothing else, on both listeners: a client
/// it may not read and a name no client has get the same 403, `/v1/clients` shows only
/// `transatel`, and a forced refresh within `min_interval` is a 429 with `Retry-After`.
#[tokio::test(flavor = "multi_thread")]
async fn the_access_rule_as_root_and_as_an_unprivileged_user_on_both_listeners() {
    let test = "the_access_rule_as_root_and_as_an_unprivileged_user_on_both_listeners";
    if !have_curl_and_root(test) {
        return;
    }
    let mut h = start(Duration::from_secs(30), "").await;
    let sock = h.socket.to_str().unwrap().to_string();
    let base = format!("http://{}", h.tcp);
    let file_token = read(&h.env.out("transatel.token"));
    // (over the socket?, path) -> curl args
    let args = |unix: bool, path: &str| -> Vec<String> {
        if unix {
            vec![
                "--unix-socket".into(),
                sock.clone(),
                format!("http://localhost{path}"),
            ]
        } else {
            vec![
                "-H".into(),
                "Tokenwarden: 1".into(),
                format!("{base}{path}"),
            ]
        }
    };
    for unix in [true, false] {
        let call = |path: &str| {
            let a = args(unix, path);
            async move {
                let a: Vec<&str> = a.iter().map(String::as_str).collect();
                curl(true, &a).await.unwrap()
            }
        };
        let (code, body) = call("/v1/token/transatel?format=token").await;
        assert_eq!(
            (code, body.trim()),
            (200, file_token.as_str()),
            "unix={unix}"
        );
        let (code, denied) = call("/v1/token/creads-files").await;
        assert_eq!(code, 403, "unix={unix}: {denied}");
        let (code, unknown) = call("/v1/token/nosuch").await;
        assert_eq!(code, 403, "unix={unix}: {unknown}");
        // Both say the same thing but the name: nothing tells whether a client exists.
        assert_eq!(
            denied.replace("creads-files", "X"),
            unknown.replace("nosuch", "X"),
            "unix={unix}"
        );
        assert!(denied.contains("uid 65534"), "{denied}");
        let (code, list) = call("/v1/clients").await;
        assert_eq!(code, 200);
        let list: serde_json::Value = serde_json::from_str(&list).unwrap();
        let names: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["client"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["transatel"], "unix={unix}");
    }
    // Root over curl too: every client, and 404 for a name no client has.
    let a = args(false, "/v1/token/nosuch");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    assert_eq!(curl(false, &a).await.unwrap().0, 404);

    // A forced refresh by uid 65534 right after a new token: 429 with Retry-After.
    let r = exchange(
        unix(&h.socket),
        &req(
            "POST",
            "/v1/token/transatel/refresh?force=true",
            &["Content-Length: 0"],
        ),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let out = tokio::process::Command::new("setpriv")
        .args(NOBODY)
        .args([
            "--",
            "curl",
            "-sS",
            "-i",
            "-X",
            "POST",
            "--unix-socket",
            &sock,
            "http://localhost/v1/token/transatel/refresh?force=true",
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(text.starts_with("http/1.1 429"), "{text}");
    assert!(text.contains("retry-after: "), "{text}");
    assert!(text.contains("\"too_many_requests\""), "{text}");
    h.daemon.stop().await;
}

/// Over TCP, a request without `Tokenwarden: 1`, with a foreign `Host` (DNS rebinding), or
/// carrying `Origin` / `X-Forwarded-For` / `Forwarded` is refused with 403; the last three
/// are refused on the Unix socket too. None of them gets a token.
#[tokio::test(flavor = "multi_thread")]
async fn header_and_origin_rules() {
    let mut h = start(Duration::from_secs(30), "").await;
    let path = "/v1/token/transatel?format=token";
    let token = read(&h.env.out("transatel.token"));
    let tcp_cases: &[(&[&str], &str)] = &[
        (&[], "Tokenwarden: 1"),
        (&["Tokenwarden: yes"], "Tokenwarden: 1"),
        (&["Tokenwarden: 1", "Origin: http://evil.example"], "Origin"),
        (&["Tokenwarden: 1", "Origin: null"], "origin"),
        (
            &["Tokenwarden: 1", "X-Forwarded-For: 10.1.2.3"],
            "x-forwarded-for",
        ),
        (&["Tokenwarden: 1", "Forwarded: for=10.1.2.3"], "forwarded"),
    ];
    for (headers, why) in tcp_cases {
        let r = exchange(tcp(h.tcp), &req("GET", path, headers));
        r.assert_error(403, "forbidden");
        assert!(r.body.to_lowercase().contains(&why.to_lowercase()), "{r:?}");
        assert!(!r.body.contains(&token));
    }
    // DNS rebinding: a page on evil.example resolved to 127.0.0.1.
    let rebound = format!(
        "GET {path} HTTP/1.1\r\nHost: evil.example:{}\r\nTokenwarden: 1\r\nConnection: close\r\n\r\n",
        h.tcp.port()
    );
    let r = exchange(tcp(h.tcp), &rebound);
    r.assert_error(403, "forbidden");
    assert!(r.body.contains("Host"), "{r:?}");
    // The same with what a local program sends: served.
    let r = exchange(tcp(h.tcp), &req("GET", path, &["Tokenwarden: 1"]));
    assert_eq!((r.status, r.body.trim()), (200, token.as_str()), "{r:?}");

    for headers in [
        "Origin: http://evil.example",
        "X-Forwarded-For: 10.1.2.3",
        "Forwarded: for=10.1.2.3",
    ] {
        let r = exchange(unix(&h.socket), &req("GET", path, &[headers]));
        r.assert_error(403, "forbidden");
        assert!(!r.body.contains(&token));
    }
    // The socket needs no Tokenwarden header and takes any Host.
    let r = exchange(
        unix(&h.socket),
        "GET /v1/token/transatel?format=token HTTP/1.1\r\nHost: %2Frun%2Fhttp.sock\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{r:?}");
    h.daemon.stop().await;
}

/// `after_generation` waits for the next token and is answered as soon as a rotation
/// (SIGUSR1) brings one, on both listeners at once; an `after_generation` already passed is
/// answered at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_poll_is_woken_by_a_rotation() {
    let mut h = start(Duration::from_secs(60), "").await;
    let now = get_unix(&h.socket, "/v1/token/transatel").json()["generation"]
        .as_u64()
        .unwrap();
    let target = format!("/v1/token/transatel?after_generation={now}&format=json");
    let (s, t) = (h.socket.clone(), h.tcp);
    let (target2, target3) = (target.clone(), target.clone());
    let polls = [
        tokio::task::spawn_blocking(move || get_unix(&s, &target2)),
        tokio::task::spawn_blocking(move || get_tcp(t, &target3)),
    ];
    // The polls wait: nothing newer comes without a rotation (tokens live 60 s).
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        polls.iter().all(|p| !p.is_finished()),
        "a long poll was answered without a newer token"
    );
    h.daemon.signal(nix::sys::signal::Signal::SIGUSR1);
    let began = Instant::now();
    for p in polls {
        let r = tokio::time::timeout(Duration::from_secs(30), p)
            .await
            .expect("the long poll was not woken by the rotation")
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["generation"].as_u64().unwrap(), now + 1, "{r:?}");
        let current = get_unix(&h.socket, "/v1/token/transatel").json();
        assert_eq!(r.json()["access_token"], current["access_token"]);
    }
    assert!(began.elapsed() < Duration::from_secs(20));
    // A generation already passed: at once.
    let began = Instant::now();
    let r = get_unix(
        &h.socket,
        &format!("/v1/token/transatel?after_generation={now}"),
    );
    assert_eq!(r.json()["generation"].as_u64().unwrap(), now + 1);
    assert!(began.elapsed() < Duration::from_secs(5));
    // SIGTERM during a long poll: the poll is answered 503 and the daemon stops in time.
    let s = h.socket.clone();
    let target = format!("/v1/token/transatel?after_generation={}", now + 1);
    let poll = tokio::task::spawn_blocking(move || get_unix(&s, &target));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!poll.is_finished());
    h.daemon.stop().await;
    let r = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .unwrap()
        .unwrap();
    r.assert_error(503, "unavailable");
    assert!(r.body.contains("stopping"), "{r:?}");
}

/// A stream whose reads can be given a timeout.
trait Timed: Read + Write {
    fn read_timeout(&self, d: Duration);
}

impl Timed for UnixStream {
    fn read_timeout(&self, d: Duration) {
        self.set_read_timeout(Some(d)).unwrap();
    }
}

impl Timed for std::net::TcpStream {
    fn read_timeout(&self, d: Duration) {
        self.set_read_timeout(Some(d)).unwrap();
    }
}

/// With `max_connections = 4`: four connections from `connect`, each served one request and
/// kept alive, fill the listener `what`; a fifth's request gets no answer while they stay
/// (the daemon logs that the listener is full), and is answered once one closes.
async fn fifth_waits_for_a_place<S: Timed>(
    connect: impl Fn() -> S,
    headers: &[&str],
    daemon: &DaemonProc,
    what: &str,
) {
    let target = "/v1/token/transatel?format=token";
    let mut extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    extra.push_str("\r\n");
    let mut idle: Vec<S> = (0..4).map(|_| connect()).collect();
    for s in idle.iter_mut() {
        s.write_all(format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n{extra}").as_bytes())
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{what}: {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    let mut fifth = connect();
    fifth
        .write_all(req("GET", target, headers).as_bytes())
        .unwrap();
    fifth.read_timeout(Duration::from_millis(1500));
    let mut buf = [0u8; 64];
    let waited = fifth.read(&mut buf);
    assert!(
        matches!(&waited, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "{what}: a fifth connection was served at the cap: {waited:?}"
    );
    daemon
        .wait_log(
            &format!("{what}: 4 connections open"),
            Duration::from_secs(5),
        )
        .await;
    // One closes: the fifth is served.
    drop(idle.pop());
    fifth.read_timeout(Duration::from_secs(30));
    let mut rest = Vec::new();
    fifth.read_to_end(&mut rest).unwrap();
    assert!(
        rest.starts_with(b"HTTP/1.1 200"),
        "{what}: {}",
        String::from_utf8_lossy(&rest)
    );
}

/// The bounds: with `max_connections = 4`, a flood of idle connections on each HTTP listener
/// holds 4 places each, a fifth gets no answer until one closes, and the gRPC socket and the
/// token files carry on; a header block over 16 KiB gets 431; a sender that never finishes
/// its headers is cut off after the 10 s header timeout.
#[tokio::test(flavor = "multi_thread")]
async fn limits_under_a_connection_flood_and_slow_senders() {
    let mut h = start(Duration::from_secs(30), "max_connections = 4\n").await;
    let path = "/v1/token/transatel?format=token";
    // On each listener: four kept-alive connections, then a fifth that must wait; the
    // daemon says so, and the gRPC socket carries on meanwhile.
    fifth_waits_for_a_place(|| unix(&h.socket), &[], &h.daemon, "HTTP socket").await;
    grpc_get(&h).await;
    fifth_waits_for_a_place(
        || tcp(h.tcp),
        &["Tokenwarden: 1"],
        &h.daemon,
        "HTTP listener",
    )
    .await;

    // A request announcing a 1 GB body it never sends: answered without it (no body is
    // read), and the connection is closed rather than kept waiting for the body.
    let mut s = unix(&h.socket);
    s.write_all(
        b"POST /v1/token/transatel/refresh HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000000\r\n\r\n",
    )
    .unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");

    // A header block over 16 KiB: 431, nothing served.
    let big = format!("X-Big: {}", "a".repeat(20 * 1024));
    let r = exchange(unix(&h.socket), &req("GET", path, &[&big]));
    assert_eq!(r.status, 431, "{r:?}");

    // A sender that never finishes its headers, on each listener: cut off within the header
    // timeout (10 s) plus slack, with no answer.
    let began = Instant::now();
    let mut slow_unix = unix(&h.socket);
    let mut slow_tcp = tcp(h.tcp);
    for s in [&mut slow_unix as &mut dyn Write, &mut slow_tcp] {
        s.write_all(b"GET /v1/token/transatel HTTP/1.1\r\nHost: localhost\r\nX-Slow: a")
            .unwrap();
    }
    let mut got = Vec::new();
    let n = slow_unix.read_to_end(&mut got).unwrap_or(0);
    let m = slow_tcp.read_to_end(&mut got).unwrap_or(0);
    let took = began.elapsed();
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(20),
        "cut off after {took:?}"
    );
    assert!(!String::from_utf8_lossy(&got).contains("200 OK"), "{n} {m}");
    h.daemon.stop().await;
}

/// One uid holds at most its share of `max_connections` on an HTTP listener (a quarter, at
/// least 8: 10 of 40), as on the gRPC socket: the connection beyond it is closed at once,
/// unanswered and counted, while a place freed by that uid is usable again.
#[tokio::test(flavor = "multi_thread")]
async fn one_uid_holds_at_most_its_share_of_an_http_listener() {
    let h = start(
        Duration::from_secs(60),
        "max_connections = 40\nmetrics_listen = \"127.0.0.1:0\"\n",
    )
    .await;
    let path = "/v1/token/transatel?format=token";
    // Ten kept-alive connections of this uid, each answered once (so each is accepted).
    let mut held: Vec<UnixStream> = (0..10)
        .map(|_| {
            let mut s = unix(&h.socket);
            let keep = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
            s.write_all(keep.as_bytes()).unwrap();
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf).unwrap();
            assert!(
                buf[..n].starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&buf[..n])
            );
            s
        })
        .collect();
    // The eleventh: closed at once, nothing answered.
    let mut extra = unix(&h.socket);
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = extra.write_all(req("GET", path, &[]).as_bytes());
    // (Closed with the request unread: end of file, or a reset.)
    let mut got = Vec::new();
    match extra.read_to_end(&mut got) {
        Ok(n) => assert_eq!(n, 0, "{}", String::from_utf8_lossy(&got)),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    // One of the ten closed: its place is this uid's again.
    drop(held.pop());
    crate::support::wait_for("the freed place", Duration::from_secs(5), || {
        let mut s = unix(&h.socket);
        let mut got = Vec::new();
        let _ = s.write_all(req("GET", path, &[]).as_bytes());
        let _ = s.read_to_end(&mut got);
        got.starts_with(b"HTTP/1.1 200")
    })
    .await;
    let text = scrape_metrics(&h.daemon).await;
    assert!(
        text.lines().any(|l| l.starts_with(
            "tokenwarden_connections_refused_total{listener=\"http_socket\",reason=\"uid_share\"}"
        )),
        "{text}"
    );
    drop(held);
    let mut h = h;
    h.daemon.stop().await;
}

/// `audit = true`: the first read of a client by each (uid, executable) is logged once per
/// window, over gRPC and HTTP, with the uid, the executable (unknown over TCP) and the
/// token's fingerprint, never the token; `tokenwarden_token_reads_total` counts every read.
#[tokio::test(flavor = "multi_thread")]
async fn reads_are_audited_once_per_reader() {
    let test = "reads_are_audited_once_per_reader";
    let mut h = start(
        Duration::from_secs(60),
        "audit = true\nmetrics_listen = \"127.0.0.1:0\"\n",
    )
    .await;
    let token = read(&h.env.out("transatel.token"));
    for _ in 0..3 {
        assert_eq!(get_unix(&h.socket, "/v1/token/transatel").status, 200);
        assert_eq!(get_tcp(h.tcp, "/v1/token/transatel").status, 200);
    }
    for _ in 0..2 {
        grpc_get(&h).await;
    }
    // RefreshToken (tokenwarden refresh) is a read too: counted, and not logged again for
    // the same (uid, executable).
    let r = run(&[
        "refresh",
        "transatel",
        "-s",
        h.env.demo.socket.to_str().unwrap(),
    ])
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    // A WatchToken stream's first message (the current token) is a read too.
    let mut grpc = tokenwarden::client::connect(&h.env.demo.socket)
        .await
        .unwrap();
    let mut watch = grpc
        .watch_token(tokenwarden::grpc::pb::WatchTokenRequest {
            client: "transatel".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert!(!first.access_token.is_empty());
    drop(watch);
    let reads = |logs: &str| -> Vec<String> {
        logs.lines()
            .filter(|l| l.contains("token read") && l.contains("client=\"transatel\""))
            .map(str::to_string)
            .collect()
    };
    h.daemon
        .wait_log("api=\"grpc\"", Duration::from_secs(5))
        .await;
    let lines = reads(&h.daemon.logs());
    // This test process over the socket (its WatchToken later is the same reader), over TCP
    // (exe unknown), and the CLI over gRPC.
    let me = std::fs::read_link("/proc/self/exe").unwrap();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    let uid = nix::unistd::geteuid().as_raw();
    assert!(
        lines.iter().any(|l| l.contains("api=\"http\"")
            && l.contains(&format!("exe=\"{}\"", me.display()))
            && l.contains(&format!("uid={uid}"))),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("api=\"http\"") && l.contains("exe=\"unknown\"")),
        "{lines:#?}"
    );
    let cli = std::fs::canonicalize(crate::support::bin()).unwrap();
    assert!(
        lines.iter().any(
            |l| l.contains("api=\"grpc\"") && l.contains(&format!("exe=\"{}\"", cli.display()))
        ),
        "{lines:#?}"
    );
    let fingerprint = tokenwarden::secret::fingerprint(token.as_bytes());
    assert!(
        lines
            .iter()
            .all(|l| l.contains(&fingerprint) && !l.contains(&token))
    );

    // Another uid through curl: its own line.
    if have_curl_and_root(test) {
        let (code, _) = curl(
            true,
            &[
                "--unix-socket",
                h.socket.to_str().unwrap(),
                "http://localhost/v1/token/transatel",
            ],
        )
        .await
        .unwrap();
        assert_eq!(code, 200);
        h.daemon.wait_log("uid=65534", Duration::from_secs(5)).await;
        let lines = reads(&h.daemon.logs());
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(lines[3].contains("curl"), "{lines:#?}");
    }

    // Every read counted, by API.
    let text = scrape_metrics(&h.daemon).await;
    let count = |api: &str| -> f64 {
        text.lines()
            .find(|l| {
                l.starts_with("tokenwarden_token_reads_total")
                    && l.contains("client=\"transatel\"")
                    && l.contains(&format!("api=\"{api}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(count("http") >= 6.0, "{text}");
    // Two `get`s, one `refresh`, one WatchToken.
    assert_eq!(count("grpc"), 4.0, "{text}");
    h.daemon.stop().await;
}

/// The stdlib Python client of docs/http.md (the file itself, quoted whole in the docs) gets a
/// token and then waits for the next one over the socket.
#[tokio::test(flavor = "multi_thread")]
async fn the_python_client_of_the_docs_works() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tests/python/http_client.py");
    let docs = read(&root.join("docs/http.md"));
    assert!(
        docs.contains(&format!("```python\n{}```", read(&script))),
        "docs/http.md must quote tests/python/http_client.py whole"
    );
    let python = std::env::var("TOKENWARDEN_PYTHON").unwrap_or_else(|_| "python3".into());
    if std::process::Command::new(&python)
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: the_python_client_of_the_docs_works: no {python}");
        return;
    }
    let mut h = start(Duration::from_secs(4), "").await;
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(&python)
            .arg(&script)
            .arg("transatel")
            .arg(&h.socket)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generations: Vec<u64> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("generation "))
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(generations.len(), 2, "{stdout}");
    assert!(generations[1] > generations[0], "{stdout}");
    h.daemon.stop().await;
}

/// `check` refuses a non-loopback `http_listen`, a relative `http_socket`, an `http_socket`
/// that is the gRPC socket and an `http_listen` that is `metrics_listen`, each at its line.
#[tokio::test(flavor = "multi_thread")]
async fn config_errors_of_the_http_keys() {
    let env = DemoEnv::start(Duration::from_secs(30)).await;
    let sock = env.demo.socket.to_str().unwrap().to_string();
    let cases = [
        ("http_listen = \"0.0.0.0:8089\"\n", "not a loopback address"),
        ("http_listen = \"[::]:8089\"\n", "not a loopback address"),
        (
            "http_listen = \"10.0.0.1:8089\"\n",
            "not a loopback address",
        ),
        ("http_listen = \"localhost\"\n", "not a socket address"),
        ("http_socket = \"http.sock\"\n", "must be an absolute path"),
        (
            &format!("http_socket = {sock:?}\n") as &str,
            "is also daemon.socket",
        ),
        (
            "http_listen = \"127.0.0.1:9464\"\nmetrics_listen = \"127.0.0.1:9464\"\n",
            "also metrics_listen",
        ),
        ("audit = \"yes\"\n", "audit"),
    ];
    let original = std::fs::read_to_string(&env.demo.config).unwrap();
    for (lines, want) in cases {
        std::fs::write(
            &env.demo.config,
            original.replacen("[daemon]\n", &format!("[daemon]\n{lines}"), 1),
        )
        .unwrap();
        let r = run(&["check", "-c", env.config_path()]).await;
        assert_eq!(r.code, 2, "{lines}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{lines}: {}", r.stderr);
        assert!(
            r.stderr.contains("tokenwarden.toml:"),
            "{lines}: no file and line: {}",
            r.stderr
        );
    }
    // Good ones.
    std::fs::write(
        &env.demo.config,
        original.replacen(
            "[daemon]\n",
            "[daemon]\nhttp_listen = \"[::1]:8089\"\naudit = true\n",
            1,
        ),
    )
    .unwrap();
    let r = run(&["check", "-c", env.config_path()]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// A reload moves `http_socket` (the new one serves, the old file goes), applies a new
/// `socket_mode` to the bound HTTP socket, and stops `http_listen` when it is removed.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_moves_the_listeners_and_applies_the_mode() {
    use std::os::unix::fs::PermissionsExt;
    let mut h = start(Duration::from_secs(60), "").await;
    let moved = h.socket.with_file_name("http2.sock");
    let old_tcp = h.tcp;
    h.env.edit_config(|t| {
        t.replace(
            &format!("http_socket = {:?}\n", h.socket.to_str().unwrap()),
            &format!("http_socket = {:?}\n", moved.to_str().unwrap()),
        )
        .replace("http_listen = \"127.0.0.1:0\"\n", "")
    });
    let old = h.socket.clone();
    crate::support::wait_for("the HTTP socket to move", Duration::from_secs(10), || {
        moved.exists() && !old.exists()
    })
    .await;
    assert_eq!(get_unix(&moved, "/healthz").status, 200);
    crate::support::wait_for("http_listen to stop", Duration::from_secs(10), || {
        std::net::TcpStream::connect(old_tcp).is_err()
    })
    .await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&moved), 0o666);
    h.env
        .edit_config(|t| t.replace("socket_mode = \"0666\"", "socket_mode = \"0640\""));
    crate::support::wait_for("the new mode", Duration::from_secs(10), || {
        mode(&moved) == 0o640
    })
    .await;
    assert_eq!(get_unix(&moved, "/healthz").status, 200);
    h.daemon.stop().await;
    assert!(!moved.exists());
}

/// The shipped unit sets `ProcSubset=pid` and `ProtectProc=invisible`, which hide
/// `/proc/net`: the daemon under such a /proc still finds its TCP callers (it reads
/// `/proc/self/net`), and still refuses what it must.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_callers_are_found_under_the_units_proc_subset() {
    let probe = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("mount -t proc -o subset=pid,hidepid=invisible proc /proc && ! test -e /proc/net/tcp")
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "SKIPPED: tcp_callers_are_found_under_the_units_proc_subset: cannot mount a \
             private /proc with subset=pid (needs root, unshare and Linux 5.8)"
        );
        return;
    }
    let mut h = start_wrapped(
        &[
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t proc -o subset=pid,hidepid=invisible proc /proc && exec \"$@\"",
            "sh",
        ],
        Duration::from_secs(60),
        "",
    )
    .await;
    let r = get_tcp(h.tcp, "/v1/token/transatel?format=token");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body.trim(), read(&h.env.out("transatel.token")));
    get_tcp(h.tcp, "/v1/token/nosuch").assert_error(404, "not_found");
    h.daemon.stop().await;
}

/// `run` with `metrics_listen` or `http_listen` on an address another process holds: one line
/// naming the key and the address, exit 1 (a runtime failure,
/// docs/cli.md#config-exit-codes-and-errors).
#[tokio::test(flavor = "multi_thread")]
async fn a_taken_listen_address_stops_run_with_one_line_and_exit_1() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    for (key, says) in [
        (
            "metrics_listen",
            format!("cannot listen on metrics_listen {addr}: "),
        ),
        (
            "http_listen",
            format!("http_listen {addr}: cannot listen: "),
        ),
    ] {
        let env = DemoEnv::start(Duration::from_secs(3600)).await;
        env.edit_config(|t| {
            t.replacen("[daemon]\n", &format!("[daemon]\n{key} = \"{addr}\"\n"), 1)
        });
        let mut daemon = DaemonProc::start(&env.demo.config, &[]);
        let status = daemon.wait_exit(Duration::from_secs(20)).await;
        let logs = daemon.logs();
        assert_eq!(status.code(), Some(1), "{key}: {logs}");
        let lines: Vec<&str> = logs.lines().filter(|l| l.contains(&says)).collect();
        assert_eq!(lines.len(), 1, "{key}: {logs}");
    }
}
