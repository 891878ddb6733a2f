//! GetToken over the Unix socket against a raw Unix-socket echo of the same payload sizes,
//! measured in the same run (issue 4 item 7). Run: `cargo bench --bench grpc_get_token`.
//!
//! The gRPC side is the real server (`GrpcServer::start`) over a store holding one valid token;
//! callers are lean HTTP/2 clients written on the `h2` crate (one connection each), since a
//! tonic client costs as much CPU as the server and would hide the server's cost. The echo
//! server reads a request of the gRPC request's size and writes a response of the gRPC
//! response's size. Figures are printed as ratios against the echo.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use prost::Message;
use tokenwarden::grpc::{GrpcServer, pb};
use tokenwarden::secret::Secret;
use tokenwarden::store::{ClientSlot, Snapshot, Store};
use tokenwarden::token::Token;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const WARMUP: Duration = Duration::from_millis(500);
const RUN: Duration = Duration::from_secs(3);

struct Figures {
    throughput: f64,
    p50: Duration,
    p99: Duration,
}

fn figures(mut lat: Vec<Duration>, elapsed: Duration) -> Figures {
    lat.sort();
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or_default()
    };
    Figures {
        throughput: lat.len() as f64 / elapsed.as_secs_f64(),
        p50: pick(0.50),
        p99: pick(0.99),
    }
}

fn grpc_frame(msg: &impl Message) -> Bytes {
    let body = msg.encode_to_vec();
    let mut v = Vec::with_capacity(5 + body.len());
    v.push(0);
    v.extend_from_slice(&(body.len() as u32).to_be_bytes());
    v.extend_from_slice(&body);
    Bytes::from(v)
}

/// One GetToken over an h2 connection; returns the response body size.
async fn get_token(send: &mut h2::client::SendRequest<Bytes>, body: &Bytes) -> usize {
    let req = http::Request::builder()
        .method("POST")
        .uri("http://localhost/tokenwarden.v1.TokenService/GetToken")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut stream) = send.send_request(req, false).unwrap();
    stream.send_data(body.clone(), true).unwrap();
    let resp = resp.await.unwrap();
    let mut recv = resp.into_body();
    let mut n = 0;
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.unwrap();
        n += chunk.len();
        let _ = recv.flow_control().release_capacity(chunk.len());
    }
    let trailers = recv.trailers().await.unwrap().unwrap_or_default();
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..]),
        "{trailers:?}"
    );
    n
}

async fn h2_conn(path: &std::path::Path) -> h2::client::SendRequest<Bytes> {
    let io = UnixStream::connect(path).await.unwrap();
    let (send, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.ready().await.unwrap()
}

async fn run_grpc(path: &std::path::Path, callers: usize, body: &Bytes) -> Figures {
    let mut tasks = Vec::new();
    let start = Instant::now() + WARMUP;
    let end = start + RUN;
    for _ in 0..callers {
        let mut send = h2_conn(path).await;
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                get_token(&mut send, &body).await;
                if t >= start {
                    lat.push(t.elapsed());
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    figures(all, RUN)
}

async fn run_echo(path: &std::path::Path, callers: usize, req: usize, resp: usize) -> Figures {
    let mut tasks = Vec::new();
    let start = Instant::now() + WARMUP;
    let end = start + RUN;
    for _ in 0..callers {
        let mut s = UnixStream::connect(path).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let out = vec![7u8; req];
            let mut buf = vec![0u8; resp];
            let mut lat = Vec::new();
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                s.write_all(&out).await.unwrap();
                s.read_exact(&mut buf).await.unwrap();
                if t >= start {
                    lat.push(t.elapsed());
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    figures(all, RUN)
}

fn echo_server(path: &std::path::Path, req: usize, resp: usize) {
    let listener = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; req];
                let out = vec![9u8; resp];
                while s.read_exact(&mut buf).await.is_ok() {
                    if s.write_all(&out).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

fn store_with_token() -> Arc<Store> {
    let now = SystemTime::now();
    let token = Token {
        access_token: Secret::new(format!("bench.{}", "x".repeat(600))),
        token_type: "Bearer".into(),
        issued_at: now,
        expires_at: now + Duration::from_secs(3600),
        scope: vec!["read".into(), "write".into()],
    };
    let snapshot = Snapshot {
        token: Some(Arc::new(token)),
        generation: 1,
        next_refresh_at: Some(now + Duration::from_secs(2700)),
        last_refresh_at: Some(now),
        settled: true,
        ..Snapshot::default()
    };
    let (_snap_tx, snap_rx) = tokio::sync::watch::channel(snapshot);
    std::mem::forget(_snap_tx);
    let (cmd_tx, cmd_rx) = tokio::sync::mpsc::channel(1);
    std::mem::forget(cmd_rx);
    let store = Arc::new(Store::default());
    store.insert(
        "bench",
        ClientSlot {
            snapshot: snap_rx,
            commands: cmd_tx,
            allow_uids: Arc::new(vec![]),
            allow_gids: Arc::new(vec![]),
            ready_margin: Duration::from_secs(30),
        },
    );
    store
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it:
    // don't spend 20 s of the test run (and its CPU) on a benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        println!("grpc_get_token: run it with `cargo bench --bench grpc_get_token`");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("tw.sock");
        let server = GrpcServer::start(&sock, 0o600, store_with_token()).await.unwrap();
        let body = grpc_frame(&pb::GetTokenRequest {
            client: "bench".into(),
            min_valid_for: None,
        });
        // Sizes for the echo: the request frame and the response message.
        let mut probe = h2_conn(&sock).await;
        let resp_len = get_token(&mut probe, &body).await;
        let req_len = body.len();
        let echo = dir.path().join("echo.sock");
        echo_server(&echo, req_len, resp_len);
        println!("GetToken over a Unix socket vs. a raw echo ({req_len} B request, {resp_len} B response), {}s per run", RUN.as_secs());
        println!(
            "{:>7} | {:>11} {:>9} {:>9} | {:>11} {:>9} {:>9} | {:>10} {:>9} | targets",
            "callers", "grpc req/s", "p50", "p99", "echo req/s", "p50", "p99", "throughput", "p99"
        );
        for callers in [1, 16, 64] {
            let g = run_grpc(&sock, callers, &body).await;
            let e = run_echo(&echo, callers, req_len, resp_len).await;
            let tput = g.throughput / e.throughput;
            let p99 = g.p99.as_secs_f64() / e.p99.as_secs_f64().max(1e-9);
            let target = if callers == 1 { "≥ 85%" } else { "≥ 40%, p99 ≤ 3×" };
            println!(
                "{callers:>7} | {:>11.0} {:>9.0?} {:>9.0?} | {:>11.0} {:>9.0?} {:>9.0?} | {:>9.0}% {:>8.1}× | {target}",
                g.throughput, g.p50, g.p99, e.throughput, e.p50, e.p99, tput * 100.0, p99
            );
        }
        server.stop().await;
    });
}
