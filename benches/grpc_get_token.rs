//! GetToken over the Unix socket against a raw Unix-socket echo of the same payload sizes
//! (issue 4 item 7). Run with `cargo bench --bench grpc_get_token`.
//!
//! Both servers run in this process on one tokio runtime; both are driven by the same kind of
//! lean caller: one connection per caller, one request at a time, for a fixed time after a
//! warm-up, alternating gRPC and echo in a few rounds so that load from elsewhere on the
//! machine falls on both alike. The gRPC side is the real server (`grpc::GrpcServer::start`) over a store holding
//! one client with a valid token; its callers speak HTTP/2 directly with the `h2` crate (a
//! tonic client would cost as much CPU as the server and hide the server's cost). The echo
//! side reads a request of the gRPC request's size and answers with as many bytes as the gRPC
//! response carries.
//!
//! Environment: `TW_BENCH_SECS` (measured seconds per configuration and side, default 3),
//! `TW_BENCH_CALLERS` (comma-separated, default `1,16,64`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tokenwarden::grpc::{GrpcServer, pb};
use tokenwarden::secret::Secret;
use tokenwarden::store::{ClientSlot, Mailbox, Snapshot, Store};
use tokenwarden::token::Token;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

const CLIENT: &str = "bench";
const PATH: &str = "/tokenwarden.v1.TokenService/GetToken";
const WARM_UP: Duration = Duration::from_millis(300);
/// Each configuration alternates gRPC and echo this many times, so a burst of load from
/// elsewhere on the machine hits both sides alike.
const ROUNDS: u32 = 3;

/// Targets of issue 4: (callers, least throughput ratio, largest p99 ratio).
fn target(callers: usize) -> (f64, Option<f64>) {
    if callers <= 1 {
        (0.85, None)
    } else {
        (0.40, Some(3.0))
    }
}

/// What one configuration measured.
struct Run {
    requests: usize,
    elapsed: Duration,
    /// Sorted latencies.
    latencies: Vec<Duration>,
}

impl Run {
    fn merge(runs: Vec<Run>) -> Run {
        let mut latencies: Vec<Duration> = Vec::new();
        let mut elapsed = Duration::ZERO;
        for r in runs {
            latencies.extend(r.latencies);
            elapsed += r.elapsed;
        }
        latencies.sort_unstable();
        Run {
            requests: latencies.len(),
            elapsed,
            latencies,
        }
    }

    fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[i - 1]
    }
}

/// A gRPC length-prefixed message (gRPC over HTTP/2: compressed flag, 4-byte length).
fn grpc_frame(msg: &impl Message) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(0);
    b.put_u32(msg.encoded_len() as u32);
    msg.encode(&mut b).unwrap();
    b.freeze()
}

fn store_with_token() -> (Arc<Store>, impl Sized) {
    let now = SystemTime::now();
    // A JWT-sized access token.
    let value: String = "eyJhbGciOiJFUzI1NiJ9."
        .chars()
        .chain(std::iter::repeat_n('x', 780))
        .collect();
    let token = Token {
        access_token: Secret::new(value),
        token_type: "Bearer".into(),
        issued_at: now,
        expires_at: now + Duration::from_secs(3600),
        scope: vec!["api.read".into(), "api.write".into()],
    };
    let (tx, rx) = watch::channel(Snapshot {
        token: Some(Arc::new(token)),
        generation: 1,
        last_refresh_at: Some(now),
        settled: true,
        ..Snapshot::default()
    });
    let mailbox = Arc::new(Mailbox::default());
    let store = Arc::new(Store::default());
    store.insert(
        CLIENT,
        ClientSlot {
            snapshot: rx,
            mailbox: mailbox.clone(),
            allow_uids: Arc::new(vec![]),
            allow_gids: Arc::new(vec![]),
            ready_margin: Duration::from_secs(60),
        },
    );
    (store, (tx, mailbox))
}

/// Drives `callers` loops of `call` for the warm-up then `secs`, each on its own connection
/// made by `connect`.
async fn drive<C, Fut>(callers: usize, secs: Duration, connect: C) -> Run
where
    C: Fn() -> Fut,
    Fut: std::future::Future<Output = Box<dyn Caller>>,
{
    let measuring = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let mut caller = connect().await;
        let measuring = measuring.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                caller.call().await;
                if measuring.load(Ordering::Relaxed) {
                    lat.push(t.elapsed());
                }
            }
            lat
        }));
    }
    tokio::time::sleep(WARM_UP).await;
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(secs).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed();
    done.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    latencies.sort_unstable();
    Run {
        requests: latencies.len(),
        elapsed,
        latencies,
    }
}

/// One caller on its own connection.
trait Caller: Send {
    fn call(&mut self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>;
}

/// A GetToken caller on one HTTP/2 connection.
struct GrpcCaller {
    send: h2::client::SendRequest<Bytes>,
    body: Bytes,
}

impl GrpcCaller {
    async fn connect(path: &Path, body: Bytes) -> GrpcCaller {
        let io = UnixStream::connect(path).await.unwrap();
        let (send, conn) = h2::client::handshake(io).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        GrpcCaller { send, body }
    }

    async fn get_token(&mut self) {
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("http://localhost{PATH}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let send = self.send.clone();
        let mut send = send.ready().await.unwrap();
        let (resp, mut stream) = send.send_request(req, false).unwrap();
        stream.send_data(self.body.clone(), true).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut got = 0;
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            got += chunk.len();
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        assert!(got > 5, "empty GetToken response");
        let trailers = body.trailers().await.unwrap().expect("no trailers");
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"0"[..]),
            "GetToken failed: {trailers:?}"
        );
    }
}

impl Caller for GrpcCaller {
    fn call(&mut self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.get_token())
    }
}

/// An echo caller: writes the request, reads the whole response.
struct EchoCaller {
    io: UnixStream,
    request: Bytes,
    response: Vec<u8>,
}

impl Caller for EchoCaller {
    fn call(&mut self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            self.io.write_all(&self.request).await.unwrap();
            self.io.read_exact(&mut self.response).await.unwrap();
        })
    }
}

/// A request/response echo server: reads `request` bytes, answers `response` bytes.
fn echo_server(path: &Path, request: usize, response: Bytes) {
    let listener = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        loop {
            let (mut io, _) = listener.accept().await.unwrap();
            let response = response.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; request];
                while io.read_exact(&mut buf).await.is_ok() {
                    if io.write_all(&response).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// One GetToken answer's size, as the server sends it (the length-prefixed message).
async fn response_size(path: &Path, body: Bytes) -> usize {
    let c = GrpcCaller::connect(path, body).await;
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut send = c.send.clone().ready().await.unwrap();
    let (resp, mut stream) = send.send_request(req, false).unwrap();
    stream.send_data(c.body.clone(), true).unwrap();
    let mut body = resp.await.unwrap().into_body();
    let mut bytes = BytesMut::new();
    while let Some(chunk) = body.data().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    let token = pb::Token::decode(&bytes[5..]).unwrap();
    assert_eq!(token.client, CLIENT);
    assert_eq!(token.generation, 1);
    bytes.len()
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it:
    // don't spend the test run's time and CPU on a benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        println!("grpc_get_token: run it with `cargo bench --bench grpc_get_token`");
        return;
    }
    let secs = Duration::from_secs_f64(
        std::env::var("TW_BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3.0),
    );
    let callers: Vec<usize> = std::env::var("TW_BENCH_CALLERS")
        .ok()
        .map(|s| s.split(',').filter_map(|c| c.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 16, 64]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let grpc_path: PathBuf = dir.path().join("tw.sock");
        let echo_path: PathBuf = dir.path().join("echo.sock");
        let (store, _keep) = store_with_token();
        let server = GrpcServer::start(&grpc_path, 0o600, store).await.unwrap();
        let request = grpc_frame(&pb::GetTokenRequest {
            client: CLIENT.into(),
            min_valid_for: None,
        });
        let response_len = response_size(&grpc_path, request.clone()).await;
        echo_server(&echo_path, request.len(), Bytes::from(vec![7u8; response_len]));

        println!(
            "GetToken over the Unix socket vs a raw Unix-socket echo ({} B request, {} B response); \
             per configuration {ROUNDS} rounds of {:.1} s gRPC then {:.1} s echo, each after a \
             {:.1} s warm-up; {} worker threads",
            request.len(),
            response_len,
            (secs / ROUNDS).as_secs_f64(),
            (secs / ROUNDS).as_secs_f64(),
            WARM_UP.as_secs_f64(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
        );
        println!(
            "{:>7} | {:>10} {:>8} {:>8} | {:>10} {:>8} {:>8} | {:>8} {:>8} | target",
            "callers",
            "grpc req/s",
            "p50 ms",
            "p99 ms",
            "echo req/s",
            "p50 ms",
            "p99 ms",
            "thr %",
            "p99 ×",
        );
        let mut all_met = true;
        for &n in &callers {
            let (mut grpc, mut echo) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                let (path, body) = (grpc_path.clone(), request.clone());
                grpc.push(
                    drive(n, secs / ROUNDS, move || {
                        let (path, body) = (path.clone(), body.clone());
                        async move {
                            Box::new(GrpcCaller::connect(&path, body).await) as Box<dyn Caller>
                        }
                    })
                    .await,
                );
                let (path, req) = (echo_path.clone(), request.clone());
                echo.push(
                    drive(n, secs / ROUNDS, move || {
                        let (path, request) = (path.clone(), req.clone());
                        async move {
                            Box::new(EchoCaller {
                                io: UnixStream::connect(&path).await.unwrap(),
                                request,
                                response: vec![0; response_len],
                            }) as Box<dyn Caller>
                        }
                    })
                    .await,
                );
            }
            let (grpc, echo) = (Run::merge(grpc), Run::merge(echo));
            let thr = grpc.throughput() / echo.throughput();
            let p99 = grpc.percentile(0.99).as_secs_f64() / echo.percentile(0.99).as_secs_f64();
            let (want_thr, want_p99) = target(n);
            let met = thr >= want_thr && want_p99.is_none_or(|w| p99 <= w);
            all_met &= met;
            println!(
                "{:>7} | {:>10.0} {:>8} {:>8} | {:>10.0} {:>8} {:>8} | {:>7.1}% {:>7.2}× | {} {}",
                n,
                grpc.throughput(),
                ms(grpc.percentile(0.5)),
                ms(grpc.percentile(0.99)),
                echo.throughput(),
                ms(echo.percentile(0.5)),
                ms(echo.percentile(0.99)),
                thr * 100.0,
                p99,
                match want_p99 {
                    Some(w) => format!("≥ {:.0}%, p99 ≤ {w:.0}×", want_thr * 100.0),
                    None => format!("≥ {:.0}%", want_thr * 100.0),
                },
                if met { "met" } else { "MISSED" },
            );
        }
        println!(
            "{}",
            if all_met {
                "all targets met"
            } else {
                "some targets missed"
            }
        );
        server.stop().await;
    });
}
