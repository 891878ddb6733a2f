//! GetToken over the Unix socket against a raw Unix-socket echo of the same payload sizes
//! (issue 4 item 7). Run with `cargo bench --bench grpc_get_token`.
//!
//! Both servers run in this process on one tokio runtime; both are driven by the same kind of
//! lean caller: one connection per caller, one request at a time, for a fixed time after a
//! warm-up, alternating gRPC and echo in a few rounds so that load from elsewhere on the
//! machine falls on both alike. The gRPC side is the real server (`grpc::GrpcServer::start`)
//! over a store holding one client with a valid token; its callers speak HTTP/2 directly with
//! the `h2` crate (a tonic client would cost as much CPU as the server and hide the server's
//! cost), each driving its own connection in its own task, as the echo callers do their own
//! reads and writes. The echo
//! side reads a request of the gRPC request's size and answers with as many bytes as the gRPC
//! response carries.
//!
//! With `TW_BENCH_CEILING=1` two more sides are measured in the same rounds, to tell the h2
//! crate's own cost from tokenwarden's: a bare `h2` server answering every request with a
//! fixed gRPC answer (the most an `h2` server can do: the ceiling), and a canned answer (no
//! HTTP/2 server at all, fixed bytes written back: what the bench's `h2` callers cost alone).
//!
//! The HTTP API is measured in the same rounds (issue 14): `GET /v1/token/NAME?format=token`
//! over `http_socket` (the real server, `http::HttpServer::start_socket`, over the same store),
//! by callers writing the request and reading the answer on one kept-alive connection each,
//! against the same echo; its ratios are printed beside the gRPC path's.
//!
//! Environment: `TW_BENCH_SECS` (measured seconds per configuration and side, default 3),
//! `TW_BENCH_CALLERS` (comma-separated, default `1,16,64`), `TW_BENCH_CEILING` (see above),
//! `TW_BENCH_CLIENT=spawned` (h2 callers' connections in tasks of their own, h2's usual setup),
//! `TW_BENCH_ONLY=<side>` (one side alone — `tokenwarden`, `bare h2`, `canned h2`, `http`, `echo` —
//! for a profiler).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::FutureExt;
use prost::Message;
use tokenwarden::grpc::conn::Repoll;
use tokenwarden::grpc::writes::WriteBatch;
use tokenwarden::grpc::{GrpcServer, fast, pb};
use tokenwarden::http::HttpServer;
use tokenwarden::limits::Limits;
use tokenwarden::secret::Secret;
use tokenwarden::store::{ClientSlot, Mailbox, Snapshot, Store};
use tokenwarden::token::Token;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

const CLIENT: &str = "bench";
const URI: &str = "http://localhost/tokenwarden.v1.TokenService/GetToken";
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
            config: bench_config(),
        },
    );
    (store, (tx, mailbox))
}

/// The bench client's config: anyone may read it.
fn bench_config() -> Arc<tokenwarden::config::ClientConfig> {
    let text = format!(
        "[clients.{CLIENT}]\ntoken_url = \"https://idp.example/token\"\nclient_id = \"{CLIENT}\"\nclient_secret = \"s\"\n"
    );
    let config = tokenwarden::config::load_str(&text, Path::new("/nonexistent/tokenwarden.toml"))
        .expect("the bench's config loads");
    config.clients[CLIENT].clone()
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
///
/// By default the caller's task drives its h2 connection itself, as the echo caller does its
/// own reads and writes; `TW_BENCH_CLIENT=spawned` gives the connection a task of its own
/// (h2's usual setup: two more task hops per call, on the client's side).
struct GrpcCaller {
    send: h2::client::SendRequest<Bytes>,
    /// The connection, when this caller's task drives it.
    conn: Option<h2::client::Connection<UnixStream, Bytes>>,
    /// Drives the connection as the server's connection task does (an h2 connection polled
    /// in the task that uses it wakes that task whenever a request or answer is queued).
    inline: Repoll,
    uri: http::Uri,
    body: Bytes,
}

impl GrpcCaller {
    async fn connect(path: &Path, body: Bytes, spawned: bool) -> GrpcCaller {
        let io = UnixStream::connect(path).await.unwrap();
        let (send, conn) = h2::client::handshake(io).await.unwrap();
        let conn = if spawned {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            None
        } else {
            Some(conn)
        };
        GrpcCaller {
            send,
            conn,
            inline: Repoll::new(),
            uri: http::Uri::from_static(URI),
            body,
        }
    }

    async fn get_token(&mut self) {
        let req = request(self.uri.clone());
        let call = get_token(self.send.clone(), req, self.body.clone());
        let mut call = std::pin::pin!(call);
        let Some(conn) = self.conn.as_mut() else {
            call.await;
            return;
        };
        let mut both = std::future::poll_fn(|cx| {
            // The connection first: it writes what the call queued, and reads what the call
            // waits for.
            if let Poll::Ready(r) = conn.poll_unpin(cx) {
                panic!("h2 connection ended: {r:?}");
            }
            call.as_mut().poll(cx)
        });
        let inline = &self.inline;
        std::future::poll_fn(|cx| inline.poll(cx, Pin::new(&mut both))).await;
    }
}

/// A GetToken request's head.
fn request(uri: http::Uri) -> http::Request<()> {
    let mut req = http::Request::new(());
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = uri;
    let h = req.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    h.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    req
}

/// One GetToken call; the response's length-prefixed message.
async fn get_token(
    send: h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
    body: Bytes,
) -> usize {
    let mut send = send.ready().await.unwrap();
    let (resp, mut stream) = send.send_request(req, false).unwrap();
    stream.send_data(body, true).unwrap();
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
    got
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

/// An HTTP/1.1 caller on one kept-alive connection: writes the request, reads the head and
/// `Content-Length` bytes of body.
struct HttpCaller {
    io: UnixStream,
    request: Bytes,
    buf: BytesMut,
}

impl HttpCaller {
    async fn get(&mut self) {
        self.io.write_all(&self.request).await.unwrap();
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).unwrap();
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap();
                if self.buf.len() >= end + 4 + len {
                    self.buf.advance(end + 4 + len);
                    return;
                }
            }
            let n = self.io.read_buf(&mut self.buf).await.unwrap();
            assert!(n > 0, "the HTTP server closed the connection");
        }
    }
}

impl Caller for HttpCaller {
    fn call(&mut self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.get())
    }
}

/// The HTTP request of the bench.
fn http_request() -> Bytes {
    Bytes::from(format!(
        "GET /v1/token/{CLIENT}?format=token HTTP/1.1\r\nHost: localhost\r\n\r\n"
    ))
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

/// The ceiling: a bare `h2` server, no tokenwarden code, no `:authority` adaptor. Each
/// connection's task reads every request's body (releasing its flow-control capacity) and
/// answers at once with `answer` (the same bytes tokenwarden sends) and `grpc-status: 0`,
/// with the same settings as tokenwarden's server and its wakes served in-task.
///
/// With `batched`, the connection goes through tokenwarden's write adaptor
/// ([`tokenwarden::grpc::writes::WriteBatch`]) and the answer is handed over in the same pieces
/// as tokenwarden's ([`tokenwarden::grpc::fast::send_answer`]): the ceiling of tokenwarden's
/// serving path, h2 plus its write path and nothing else.
fn bare_h2_server(path: &Path, answer: Bytes, batched: bool) {
    let listener = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        loop {
            let (io, _) = listener.accept().await.unwrap();
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut builder = h2::server::Builder::new();
                builder
                    .initial_window_size(1024 * 1024)
                    .initial_connection_window_size(1024 * 1024)
                    .max_concurrent_streams(200)
                    .max_header_list_size(16 * 1024);
                let handshake = if batched {
                    builder.handshake::<_, Bytes>(Io::Batched(WriteBatch::new(io)))
                } else {
                    builder.handshake::<_, Bytes>(Io::Plain(io))
                };
                let Ok(mut conn) = handshake.await else {
                    return;
                };
                let mut serve = std::future::poll_fn(|cx| {
                    loop {
                        match conn.poll_accept(cx) {
                            Poll::Ready(Some(Ok((req, respond)))) => {
                                let mut body = req.into_body();
                                let mut pending = false;
                                while !body.is_end_stream() {
                                    match body.data().now_or_never() {
                                        Some(Some(Ok(d))) => {
                                            let _ = body.flow_control().release_capacity(d.len());
                                        }
                                        Some(_) => break,
                                        None => {
                                            pending = true;
                                            break;
                                        }
                                    }
                                }
                                if !pending {
                                    bare_answer(respond, answer.clone(), batched);
                                    continue;
                                }
                                // The body is on its way: wait for it before answering, as
                                // tokenwarden does (rare; in a task).
                                let answer = answer.clone();
                                tokio::spawn(async move {
                                    while let Some(Ok(d)) = body.data().await {
                                        let _ = body.flow_control().release_capacity(d.len());
                                    }
                                    bare_answer(respond, answer, batched);
                                });
                            }
                            Poll::Ready(_) => return Poll::Ready(()),
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                });
                let inline = Repoll::new();
                std::future::poll_fn(|cx| inline.poll(cx, Pin::new(&mut serve))).await;
            });
        }
    });
}

/// The bare server's answer: `answer`, then `grpc-status: 0`.
fn bare_answer(mut respond: h2::server::SendResponse<Bytes>, answer: Bytes, batched: bool) {
    let mut head = http::Response::new(());
    head.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    let mut trailers = http::HeaderMap::with_capacity(1);
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let Ok(mut send) = respond.send_response(head, false) else {
        return;
    };
    let sent = if batched {
        fast::send_answer(&mut send, answer)
    } else {
        send.send_data(answer, false)
    };
    if sent.is_ok() {
        let _ = send.send_trailers(trailers);
    }
}

/// A bare server's connection, with or without tokenwarden's write adaptor.
enum Io {
    Plain(UnixStream),
    Batched(WriteBatch<UnixStream>),
}

impl tokio::io::AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Batched(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Batched(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Batched(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Batched(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Batched(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Batched(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

const FRAME_DATA: u8 = 0x0;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_WINDOW_UPDATE: u8 = 0x8;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;

fn frame(out: &mut BytesMut, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    out.put_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.put_u32(stream);
    out.put_slice(payload);
}

/// A canned HTTP/2 answer for measuring the bench's h2 callers alone: not an HTTP/2 server
/// but a fixed byte sequence written back for each request, whose frame headers get the
/// request's stream id. Header blocks use HPACK literals without indexing (RFC 7541 §6.2.2),
/// so no dynamic table state is involved; the caller's SETTINGS are acknowledged, its
/// WINDOW_UPDATEs ignored (the caller keeps its own receive windows open as it reads), and
/// the connection's receive window is opened to the largest size at the start. Only the h2
/// crate's client runs on this side: caller vs. canned is the client's own cost.
fn canned_h2_server(path: &Path, answer: Bytes) {
    // :status 200 (static index 8); content-type (static name index 31) literal.
    let mut head = vec![0x88, 0x0f, 0x10, 16];
    head.extend_from_slice(b"application/grpc");
    let mut trailers = vec![0x00, 11];
    trailers.extend_from_slice(b"grpc-status");
    trailers.extend_from_slice(&[1, b'0']);
    let mut template = BytesMut::new();
    frame(&mut template, FRAME_HEADERS, FLAG_END_HEADERS, 0, &head);
    let data_at = template.len();
    frame(&mut template, FRAME_DATA, 0, 0, &answer);
    let trailers_at = template.len();
    frame(
        &mut template,
        FRAME_HEADERS,
        FLAG_END_HEADERS | FLAG_END_STREAM,
        0,
        &trailers,
    );
    let template = template.freeze();
    let listener = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        loop {
            let (mut io, _) = listener.accept().await.unwrap();
            let template = template.clone();
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                if io.read_exact(&mut preface).await.is_err() {
                    return;
                }
                let mut out = BytesMut::new();
                frame(&mut out, FRAME_SETTINGS, 0, 0, &[]);
                // The caller's requests get the largest connection window once for all
                // (RFC 9113 §6.9.1); each stream's own 64 KiB is far more than one request.
                let more = (1u32 << 31) - 1 - 65_535;
                frame(&mut out, FRAME_WINDOW_UPDATE, 0, 0, &more.to_be_bytes());
                let mut buf = BytesMut::with_capacity(64 * 1024);
                loop {
                    while buf.len() >= 9 {
                        let len = (usize::from(buf[0]) << 16)
                            | (usize::from(buf[1]) << 8)
                            | usize::from(buf[2]);
                        if buf.len() < 9 + len {
                            break;
                        }
                        let (kind, flags) = (buf[3], buf[4]);
                        let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]);
                        buf.advance(9 + len);
                        if kind == FRAME_SETTINGS && flags & FLAG_ACK == 0 {
                            frame(&mut out, FRAME_SETTINGS, FLAG_ACK, 0, &[]);
                        }
                        // The request's end: its DATA frame with END_STREAM.
                        if kind == FRAME_DATA && flags & FLAG_END_STREAM != 0 {
                            let at = out.len();
                            out.put_slice(&template);
                            for f in [0, data_at, trailers_at] {
                                out[at + f + 5..at + f + 9].copy_from_slice(&stream.to_be_bytes());
                            }
                        }
                    }
                    if !out.is_empty() {
                        if io.write_all(&out).await.is_err() {
                            return;
                        }
                        out.clear();
                    }
                    match io.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            });
        }
    });
}

/// One GetToken answer, as the server sends it (the length-prefixed message).
async fn one_answer(path: &Path, body: Bytes) -> Bytes {
    let c = GrpcCaller::connect(path, body, true).await;
    let mut send = c.send.clone().ready().await.unwrap();
    let (resp, mut stream) = send.send_request(request(c.uri.clone()), false).unwrap();
    stream.send_data(c.body.clone(), true).unwrap();
    let mut body = resp.await.unwrap().into_body();
    let mut bytes = BytesMut::new();
    while let Some(chunk) = body.data().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    let token = pb::Token::decode(&bytes[5..]).unwrap();
    assert_eq!(token.client, CLIENT);
    assert_eq!(token.generation, 1);
    bytes.freeze()
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// What a caller talks to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// tokenwarden's server.
    Tokenwarden,
    /// The bare h2 server, as h2 is commonly served.
    Bare,
    /// The bare h2 server with tokenwarden's write path (the ceiling).
    BareBatched,
    /// The canned answer (the h2 callers' own cost).
    Canned,
    /// tokenwarden's HTTP API on its Unix socket.
    Http,
    /// The raw echo.
    Echo,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Tokenwarden => "tokenwarden",
            Side::Bare => "bare h2",
            Side::BareBatched => "bare h2 batched",
            Side::Canned => "canned h2",
            Side::Http => "http",
            Side::Echo => "echo",
        }
    }
}

/// Where each side listens and what it is sent.
struct Setup {
    dir: PathBuf,
    request: Bytes,
    response_len: usize,
    spawned_client: bool,
}

impl Setup {
    fn path(&self, side: Side) -> PathBuf {
        self.dir.join(match side {
            Side::Tokenwarden => "tw.sock",
            Side::Bare => "bare.sock",
            Side::BareBatched => "batched.sock",
            Side::Canned => "canned.sock",
            Side::Http => "http.sock",
            Side::Echo => "echo.sock",
        })
    }

    async fn run(&self, side: Side, callers: usize, secs: Duration) -> Run {
        let path = self.path(side);
        let request = self.request.clone();
        let (response_len, spawned) = (self.response_len, self.spawned_client);
        drive(callers, secs, move || {
            let (path, request) = (path.clone(), request.clone());
            async move {
                if side == Side::Http {
                    Box::new(HttpCaller {
                        io: UnixStream::connect(&path).await.unwrap(),
                        request: http_request(),
                        buf: BytesMut::with_capacity(4096),
                    }) as Box<dyn Caller>
                } else if side == Side::Echo {
                    Box::new(EchoCaller {
                        io: UnixStream::connect(&path).await.unwrap(),
                        request,
                        response: vec![0; response_len],
                    }) as Box<dyn Caller>
                } else {
                    Box::new(GrpcCaller::connect(&path, request, spawned).await) as Box<dyn Caller>
                }
            }
        })
        .await
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
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
    let ceiling = env_flag("TW_BENCH_CEILING");
    let spawned_client = std::env::var("TW_BENCH_CLIENT").is_ok_and(|v| v == "spawned");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let (store, _keep) = store_with_token();
        let request = grpc_frame(&pb::GetTokenRequest {
            client: CLIENT.into(),
            min_valid_for: None,
        });
        let mut setup = Setup {
            dir: dir.path().to_path_buf(),
            request: request.clone(),
            response_len: 0,
            spawned_client,
        };
        let http = HttpServer::start_socket(
            &setup.path(Side::Http),
            0o600,
            store.clone(),
            &Limits::default(),
        )
        .unwrap();
        let server = GrpcServer::start(&setup.path(Side::Tokenwarden), 0o600, store)
            .await
            .unwrap();
        let answer = one_answer(&setup.path(Side::Tokenwarden), request.clone()).await;
        setup.response_len = answer.len();
        echo_server(
            &setup.path(Side::Echo),
            request.len(),
            Bytes::from(vec![7u8; answer.len()]),
        );
        let mut sides = vec![Side::Tokenwarden];
        if ceiling {
            bare_h2_server(&setup.path(Side::Bare), answer.clone(), false);
            bare_h2_server(&setup.path(Side::BareBatched), answer.clone(), true);
            canned_h2_server(&setup.path(Side::Canned), answer.clone());
            // Both answer what tokenwarden answers.
            assert_eq!(one_answer(&setup.path(Side::Bare), request.clone()).await, answer);
            assert_eq!(
                one_answer(&setup.path(Side::BareBatched), request.clone()).await,
                answer
            );
            assert_eq!(one_answer(&setup.path(Side::Canned), request.clone()).await, answer);
            sides.extend([Side::Bare, Side::BareBatched, Side::Canned]);
        }
        sides.push(Side::Http);
        sides.push(Side::Echo);
        if let Ok(only) = std::env::var("TW_BENCH_ONLY") {
            // For a profiler: that side alone (the ratios then compare it with itself).
            sides.retain(|s| s.name() == only);
            assert!(!sides.is_empty(), "TW_BENCH_ONLY: no side named {only:?}");
        }

        let round = secs / ROUNDS;
        println!(
            "GetToken over the Unix socket vs a raw Unix-socket echo ({} B request, {} B response); \
             per configuration {ROUNDS} rounds of {:.1} s on each of {}, each after a {:.1} s \
             warm-up; {} worker threads; h2 callers drive their connection {}",
            request.len(),
            answer.len(),
            round.as_secs_f64(),
            sides.iter().map(|s| s.name()).collect::<Vec<_>>().join(", "),
            WARM_UP.as_secs_f64(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            if spawned_client { "in a task of its own" } else { "in their own task" },
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
        let mut ceilings = Vec::new();
        let mut https = Vec::new();
        for &n in &callers {
            let mut runs: Vec<Vec<Run>> = sides.iter().map(|_| Vec::new()).collect();
            for _ in 0..ROUNDS {
                for (i, &side) in sides.iter().enumerate() {
                    runs[i].push(setup.run(side, n, round).await);
                }
            }
            let runs: Vec<Run> = runs.into_iter().map(Run::merge).collect();
            let (grpc, echo) = (&runs[0], &runs[runs.len() - 1]);
            if let Some(i) = sides.iter().position(|&s| s == Side::Http) {
                let http = &runs[i];
                https.push((
                    n,
                    http.throughput(),
                    http.percentile(0.5),
                    http.percentile(0.99),
                    http.throughput() / echo.throughput(),
                    http.percentile(0.99).as_secs_f64() / echo.percentile(0.99).as_secs_f64(),
                    grpc.throughput() / echo.throughput(),
                    grpc.percentile(0.99).as_secs_f64() / echo.percentile(0.99).as_secs_f64(),
                ));
            }
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
            ceilings.push((n, runs));
        }
        println!(
            "{}",
            if all_met {
                "all targets met"
            } else {
                "some targets missed"
            }
        );
        if !https.is_empty() {
            println!();
            println!(
                "HTTP: GET /v1/token/{CLIENT}?format=token over the Unix socket vs the same echo \
                 (goal: at least the gRPC path's ratios)"
            );
            println!(
                "{:>7} | {:>10} {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8} | goal",
                "callers", "http req/s", "p50 ms", "p99 ms", "thr %", "p99 ×", "grpc thr", "grpc p99",
            );
            for (n, thr_abs, p50, p99, thr, p99r, gthr, gp99) in https {
                let met = thr >= gthr && p99r <= gp99;
                println!(
                    "{n:>7} | {thr_abs:>10.0} {:>8} {:>8} | {:>7.1}% {:>7.2}× | {:>7.1}% {:>7.2}× | {}",
                    ms(p50),
                    ms(p99),
                    thr * 100.0,
                    p99r,
                    gthr * 100.0,
                    gp99,
                    if met { "met" } else { "below the gRPC path" },
                );
            }
        }
        if ceiling {
            println!();
            println!(
                "Ceiling (TW_BENCH_CEILING): req/s, p50 µs, and throughput as % of the echo's"
            );
            print!("{:>7}", "callers");
            for s in &sides {
                print!(" | {:>22}", s.name());
            }
            println!(" | tokenwarden/ceiling");
            for (n, runs) in &ceilings {
                let echo = runs[runs.len() - 1].throughput();
                print!("{n:>7}");
                for r in runs {
                    print!(
                        " | {:>7.0} {:>6.1} {:>6.1}%",
                        r.throughput(),
                        r.percentile(0.5).as_secs_f64() * 1e6,
                        r.throughput() / echo * 100.0
                    );
                }
                // The ceiling: the bare h2 server with tokenwarden's write path.
                let bare = runs.get(2).map_or(f64::NAN, Run::throughput);
                println!(" | {:>18.1}%", runs[0].throughput() / bare * 100.0);
            }
        }
        http.stop().await;
        server.stop().await;
    });
}
