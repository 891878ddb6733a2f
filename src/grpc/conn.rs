//! One HTTP/2 connection on the socket, served with the `h2` crate directly.
//!
//! A general server (hyper under tonic's transport) spawns a task for every request, routes
//! it through a stack of tower layers and hands each response frame back to the connection's
//! task. For `GetToken` — a few bytes in, one cached answer out — that machinery costs far
//! more than the answer. So the connection's own task answers `GetToken`'s common case
//! inline, as soon as the request's headers and body are in (they arrive together): no task,
//! no wake-up, and the response's three frames leave in one write ([`super::fast`]). Every
//! other call gets a task of its own running the tonic services ([`tonic::service::Routes`]:
//! the token service, health, reflection), with the request body and the response streamed
//! through `h2` with flow control, as hyper would.
//!
//! Every bound on what a peer can make the connection hold comes from [`Limits`]: the h2
//! settings (streams per connection, decoded header list, windows, send buffer), the deadline
//! for the client's preface and SETTINGS (the connection is dropped), the idle close (GOAWAY
//! when no stream has been open for [`Limits::idle_timeout`], dropped if the peer has not
//! finished [`Limits::close_grace`] later), the Watch streams in all (`RESOURCE_EXHAUSTED`
//! beyond [`Limits::max_watch_streams`]) and the request message size (`RESOURCE_EXHAUSTED`,
//! as gRPC core answers, checked on the message's length prefix before tonic buffers it). On
//! stop the connection sends GOAWAY and ends once its calls have.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;

use super::access::Caller;
use super::authority::FixAuthority;
use super::fast::{self, AnswerCache, GET_TOKEN_PATH};
use super::service::TokenApi;
use super::writes::WriteBatch;
use crate::limits::Limits;

/// The HTTP/2 paths of the streams counted against [`Limits::max_watch_streams`].
pub const WATCH_PATHS: [&str; 2] = [
    "/tokenwarden.v1.TokenService/WatchToken",
    "/grpc.health.v1.Health/Watch",
];

/// The `method` label of a call to `path`: one of the served methods, else `unknown` (a
/// caller's text never becomes a label).
fn method_label(path: &str) -> &'static str {
    const METHODS: [&str; 8] = [
        "/tokenwarden.v1.TokenService/GetToken",
        "/tokenwarden.v1.TokenService/WatchToken",
        "/tokenwarden.v1.TokenService/RefreshToken",
        "/tokenwarden.v1.TokenService/ListClients",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ];
    METHODS
        .iter()
        .find(|m| **m == path)
        .and_then(|m| m.rsplit_once('.').map(|(_, tail)| tail))
        .unwrap_or("unknown")
}

/// Counts a call to `method` that ended with the `grpc-status` in `headers` (headers of a
/// trailers-only answer, or trailers).
fn count_status(method: &'static str, headers: &http::HeaderMap) {
    if let Some(status) = headers.get("grpc-status") {
        crate::metrics::grpc_request(method, tonic::Code::from_bytes(status.as_bytes()));
    }
}

/// What every connection serves.
pub struct Services {
    /// The tonic services: tokens, health, reflection.
    pub routes: tonic::service::Routes,
    /// For `GetToken` answered inline.
    pub api: TokenApi,
    /// Encoded answers shared by every connection.
    pub answers: Arc<AnswerCache>,
    /// The bounds of every connection.
    pub limits: Limits,
    /// Places for Watch streams, shared by every connection.
    pub watches: Arc<Semaphore>,
}

/// Serves one accepted connection (through the `:authority` adaptor) until the peer closes
/// it, `stop` (GOAWAY, then the calls in flight end), or a deadline of [`Limits`]. `caller` is
/// the peer as the kernel recorded it when it connected ([`Caller::of_stream`]); `None` gets
/// `PERMISSION_DENIED` on every call that names a client.
pub async fn serve<IO>(
    io: IO,
    caller: Option<Arc<Caller>>,
    services: Arc<Services>,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // A token of the connection's own: the loop below polls it on every turn, and polling
    // a token locks its node; the server's token is shared by every connection.
    let stop = stop.child_token();
    let io = FixAuthority::new(io);
    let handshaken = io.handshaken();
    NoSelfWake::new(serve_inner(io, handshaken, caller, services, stop)).await
}

/// What the connection's one timer is waiting for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// The client's preface and SETTINGS.
    Handshake,
    /// A stream, while none is open.
    Idle,
    /// The peer finishing after our GOAWAY.
    Closing,
}

async fn serve_inner<IO>(
    io: FixAuthority<IO>,
    handshaken: Arc<AtomicBool>,
    caller: Option<Arc<Caller>>,
    services: Arc<Services>,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &services.limits;
    let timer = tokio::time::sleep(limits.handshake_timeout);
    tokio::pin!(timer);
    let handshake = limits
        .h2_builder()
        .handshake::<_, Bytes>(WriteBatch::new(io));
    let mut conn = tokio::select! {
        c = handshake => match c {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("gRPC connection: HTTP/2 handshake failed: {e}");
                return;
            }
        },
        _ = stop.cancelled() => return,
        _ = &mut timer => {
            tracing::debug!(
                "gRPC connection closed: no HTTP/2 preface within {:?}",
                limits.handshake_timeout
            );
            return;
        }
    };
    let mut waiting_for = Timer::Handshake;
    // When the last stream ended (or the connection began): the idle deadline counts from it.
    let mut last_active = Instant::now();
    // Calls in tasks of their own, and `GetToken`s whose body is still on its way: those
    // are polled by this task, woken by the very read that brings their body in.
    let mut calls = JoinSet::new();
    let mut waiting: FuturesUnordered<Waiting> = FuturesUnordered::new();
    let mut stopping = false;
    // One waiter for the whole connection: registering a new one on every turn of the loop
    // would cost two more locks per request. Polling it still locks `stop`'s node, which is
    // why `stop` is the connection's own child token, not the server's shared one.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped, if !stopping => {
                stopping = true;
                conn.graceful_shutdown();
            }
            Some(_) = calls.join_next(), if !calls.is_empty() => {
                last_active = Instant::now();
            }
            Some(call) = waiting.next(), if !waiting.is_empty() => {
                if let Some(call) = call {
                    calls.spawn(call);
                }
            }
            _ = &mut timer => match waiting_for {
                Timer::Handshake if !handshaken.load(Ordering::Acquire) => {
                    tracing::debug!(
                        "gRPC connection closed: no HTTP/2 SETTINGS within {:?}",
                        limits.handshake_timeout
                    );
                    return;
                }
                Timer::Handshake | Timer::Idle => {
                    let open = !calls.is_empty() || !waiting.is_empty();
                    let due = last_active + limits.idle_timeout;
                    if open || due > Instant::now() {
                        waiting_for = Timer::Idle;
                        timer.as_mut().reset(due.max(Instant::now() + limits.idle_timeout / 8));
                    } else {
                        tracing::debug!(
                            "gRPC connection closed: no stream for {:?}",
                            limits.idle_timeout
                        );
                        conn.graceful_shutdown();
                        stopping = true;
                        waiting_for = Timer::Closing;
                        timer.as_mut().reset(Instant::now() + limits.close_grace);
                    }
                }
                Timer::Closing => return,
            },
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    last_active = Instant::now();
                    match services.route(request, respond, &caller) {
                        Route::Done => {}
                        Route::Wait(w) => waiting.push(w),
                        Route::Spawn(call) => {
                            calls.spawn(call);
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!("gRPC connection ended: {e}");
                    break;
                }
                None => break,
            },
        }
    }
}

/// A call handed over to a task of its own.
type Call = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
/// A `GetToken` waiting for its body, in the connection's task; then maybe a [`Call`].
type Waiting = Pin<Box<dyn Future<Output = Option<Call>> + Send + 'static>>;

/// What became of a new request.
enum Route {
    /// Answered.
    Done,
    /// A `GetToken` whose body has not all arrived.
    Wait(Waiting),
    /// Anything else.
    Spawn(Call),
}

impl Services {
    /// Answers `GetToken`'s common case now if its body is here, or sets it to wait for it;
    /// sends anything else to a task.
    fn route(
        self: &Arc<Self>,
        request: http::Request<h2::RecvStream>,
        respond: h2::server::SendResponse<Bytes>,
        caller: &Option<Arc<Caller>>,
    ) -> Route {
        let (parts, mut body) = request.into_parts();
        if WATCH_PATHS.contains(&parts.uri.path()) {
            return match self.watches.clone().try_acquire_owned() {
                Ok(permit) => {
                    let call = self.full(parts, caller, VecDeque::new(), body, respond);
                    Route::Spawn(Box::pin(async move {
                        call.await;
                        drop(permit);
                    }))
                }
                Err(_) => {
                    crate::metrics::grpc_request(
                        method_label(parts.uri.path()),
                        tonic::Code::ResourceExhausted,
                    );
                    refuse(
                        respond,
                        tonic::Code::ResourceExhausted,
                        &format!(
                            "{} watch streams open, the most the daemon serves; retry later",
                            self.limits.max_watch_streams
                        ),
                    );
                    Route::Done
                }
            };
        }
        let get_token = parts.uri.path() == GET_TOKEN_PATH
            && parts
                .headers
                .get("grpc-encoding")
                .is_none_or(|v| v == "identity");
        let (true, Some(peer)) = (get_token, caller) else {
            return Route::Spawn(self.full(parts, caller, VecDeque::new(), body, respond));
        };
        let mut chunks = VecDeque::new();
        let max = self.limits.max_message + fast::PREFIX;
        // What has arrived: usually all of it, with the headers.
        let respond = match read_body(&mut body, &mut chunks, max).now_or_never() {
            Some(Some(whole)) => match self.answer(peer, &whole, respond) {
                Ok(()) => return Route::Done,
                Err(respond) => respond,
            },
            Some(None) => respond,
            None => {
                let this = self.clone();
                let peer = peer.clone();
                return Route::Wait(Box::pin(async move {
                    let respond = match read_body(&mut body, &mut chunks, max).await {
                        Some(whole) => match this.answer(&peer, &whole, respond) {
                            Ok(()) => return None,
                            Err(respond) => respond,
                        },
                        None => respond,
                    };
                    Some(this.full(parts, &Some(peer), chunks, body, respond))
                }));
            }
        };
        Route::Spawn(self.full(parts, caller, chunks, body, respond))
    }

    /// Answers a `GetToken` whose whole body is `whole` if it is the common case; else gives
    /// `respond` back for the full path.
    fn answer(
        &self,
        caller: &Caller,
        whole: &[u8],
        mut respond: h2::server::SendResponse<Bytes>,
    ) -> Result<(), h2::server::SendResponse<Bytes>> {
        let Some(answer) = fast::answer(&self.api, &self.answers, caller, whole) else {
            return Err(respond);
        };
        let (head, trailers) = fast::answered_parts();
        crate::metrics::grpc_request("TokenService/GetToken", tonic::Code::Ok);
        // Errors mean the caller has gone: nothing to tell.
        if let Ok(mut send) = respond.send_response(head, false)
            && fast::send_answer(&mut send, answer).is_ok()
        {
            let _ = send.send_trailers(trailers);
        }
        Ok(())
    }

    /// The call through the tonic services, its body replayed from what was read.
    fn full(
        &self,
        mut parts: http::request::Parts,
        caller: &Option<Arc<Caller>>,
        chunks: VecDeque<Bytes>,
        body: h2::RecvStream,
        respond: h2::server::SendResponse<Bytes>,
    ) -> Call {
        if let Some(caller) = caller {
            parts.extensions.insert(caller.clone());
        }
        let body = RecvBody {
            read: chunks,
            inner: body,
            data_done: false,
        };
        let limit = MessageLimit::new(body, self.limits.max_message);
        let tripped = limit.tripped.clone();
        let method = method_label(parts.uri.path());
        Box::pin(call(
            method,
            self.routes.clone(),
            http::Request::from_parts(parts, Body::new(limit)),
            respond,
            tripped,
        ))
    }
}

/// Answers a call with a gRPC status and no message (a trailers-only response).
fn refuse(mut respond: h2::server::SendResponse<Bytes>, code: tonic::Code, message: &str) {
    let status = tonic::Status::new(code, message);
    let mut head = http::Response::new(());
    head.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    if status.add_header(head.headers_mut()).is_err() {
        head.headers_mut()
            .insert("grpc-status", http::HeaderValue::from(code as i32));
    }
    // An error means the caller has gone: nothing to tell.
    let _ = respond.send_response(head, true);
}

/// A request body whose gRPC messages (RFC-less but fixed framing: a compressed flag and a
/// 4-byte big-endian length before each message) are checked against a size limit as their
/// length prefix arrives: a longer message ends the body with `RESOURCE_EXHAUSTED` (what gRPC
/// core answers) before tonic buffers any of it.
pub struct MessageLimit<B> {
    inner: B,
    max: usize,
    /// The length prefix being read, and how many of its bytes are in.
    prefix: [u8; 5],
    have: usize,
    /// Bytes of the current message still to pass.
    skip: usize,
    failed: bool,
    /// Set when a message was refused: whatever the service then answers, the call ends with
    /// `RESOURCE_EXHAUSTED` (a streaming service may end its stream quietly instead).
    tripped: Arc<AtomicBool>,
}

impl<B> MessageLimit<B> {
    /// `inner` with messages over `max` bytes refused.
    pub fn new(inner: B, max: usize) -> MessageLimit<B> {
        MessageLimit {
            inner,
            max,
            prefix: [0; 5],
            have: 0,
            skip: 0,
            failed: false,
            tripped: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Follows the framing through `data`; the length of the first message over the limit.
    fn scan(&mut self, mut data: &[u8]) -> Result<(), u64> {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.have).min(data.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                self.have = 0;
                let [_compressed, length @ ..] = self.prefix;
                let len = u32::from_be_bytes(length);
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                if len > self.max {
                    return Err(len as u64);
                }
                self.skip = len;
            }
        }
        Ok(())
    }
}

impl<B> HttpBody for MessageLimit<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref()
                    && let Err(len) = this.scan(data)
                {
                    this.failed = true;
                    this.tripped.store(true, Ordering::Release);
                    let status = tonic::Status::resource_exhausted(format!(
                        "request message of {len} bytes is over the limit of {} bytes",
                        this.max
                    ));
                    return Poll::Ready(Some(Err(Box::new(status))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }
}

/// A boxed error, as tonic's body takes it.
type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Reads the rest of `body` into `chunks` (what was read before included), releasing its
/// flow-control capacity: the whole body, or `None` when it is over `max` bytes or fails (the
/// full path will say). Polled once with no waker first: whatever has arrived is kept in
/// `chunks` for the next call.
async fn read_body(
    body: &mut h2::RecvStream,
    chunks: &mut VecDeque<Bytes>,
    max: usize,
) -> Option<Bytes> {
    let mut total: usize = chunks.iter().map(Bytes::len).sum();
    while !body.is_end_stream() {
        match body.data().await {
            Some(Ok(data)) => {
                let _ = body.flow_control().release_capacity(data.len());
                total += data.len();
                chunks.push_back(data);
                if total > max {
                    return None;
                }
            }
            None => break,
            Some(Err(_)) => return None,
        }
    }
    Some(fast::concat(chunks, total))
}

/// Runs a call through the tonic services and streams its response back.
async fn call(
    method: &'static str,
    mut routes: tonic::service::Routes,
    request: http::Request<Body>,
    mut respond: h2::server::SendResponse<Bytes>,
    tripped: Arc<AtomicBool>,
) {
    let response = tokio::select! {
        r = tower::Service::call(&mut routes, request) => match r {
            Ok(r) => r,
            Err(never) => match never {},
        },
        // The caller reset the stream: drop the call.
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => return,
    };
    let (mut parts, mut body) = response.into_parts();
    let end = body.is_end_stream();
    if end {
        over_limit_status(&mut parts.headers, &tripped);
        count_status(method, &parts.headers);
    }
    let Ok(mut send) = respond.send_response(http::Response::from_parts(parts, ()), end) else {
        return;
    };
    if end {
        return;
    }
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = std::future::poll_fn(|cx| send.poll_reset(cx)) => return,
        };
        match frame {
            None => {
                if tripped.load(Ordering::Acquire) {
                    let mut trailers = http::HeaderMap::new();
                    over_limit_status(&mut trailers, &tripped);
                    count_status(method, &trailers);
                    let _ = send.send_trailers(trailers);
                } else {
                    let _ = send.send_data(Bytes::new(), true);
                }
                return;
            }
            Some(Err(e)) => {
                tracing::debug!("gRPC response failed: {e}");
                send.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    // Backpressure: wait for window before queueing more.
                    send.reserve_capacity(data.len());
                    while send.capacity() == 0 && !data.is_empty() {
                        match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                            Some(Ok(_)) => {}
                            _ => return,
                        }
                    }
                    let end = body.is_end_stream();
                    if send.send_data(data, end).is_err() || end {
                        return;
                    }
                }
                Err(frame) => {
                    if let Ok(mut trailers) = frame.into_trailers() {
                        over_limit_status(&mut trailers, &tripped);
                        count_status(method, &trailers);
                        let _ = send.send_trailers(trailers);
                    }
                    return;
                }
            },
        }
    }
}

/// When a request message was refused for its size (`tripped`), makes the call's status
/// `RESOURCE_EXHAUSTED` whatever the service answered.
fn over_limit_status(headers: &mut http::HeaderMap, tripped: &AtomicBool) {
    if !tripped.load(Ordering::Acquire)
        || headers
            .get("grpc-status")
            .is_some_and(|v| v.as_bytes() == b"8")
    {
        return;
    }
    headers.insert(
        "grpc-status",
        http::HeaderValue::from(tonic::Code::ResourceExhausted as i32),
    );
    headers.insert(
        "grpc-message",
        http::HeaderValue::from_static("request%20message%20over%20the%20size%20limit"),
    );
}

/// An `h2` request body as an `http_body::Body`, releasing flow-control capacity as it is
/// read: first the chunks the fast path read already, then the rest.
pub struct RecvBody {
    read: VecDeque<Bytes>,
    inner: h2::RecvStream,
    data_done: bool,
}

impl HttpBody for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if let Some(data) = this.read.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if !this.data_done {
            match std::task::ready!(this.inner.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.inner.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match std::task::ready!(this.inner.poll_trailers(cx)) {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.inner.is_end_stream()
    }
}

/// Polls a future again at once, instead of rescheduling its task, when it wakes itself
/// while being polled.
///
/// Answering inline means queueing the response on `h2` from the connection's own task, and
/// `h2` then wakes the connection's task to write it. A task woken while it runs is sent to
/// the back of the run queue and an idle worker is unparked to take it (a futex call and
/// often a move to another core) — for a wake whose only purpose is the write this poll is
/// about to do anyway. This wrapper catches such wakes and polls again (a few times at most,
/// so a future that yields on purpose still yields); wakes from elsewhere go to the task.
struct NoSelfWake<F> {
    inner: Pin<Box<F>>,
    repoll: Repoll,
}

impl<F: Future> NoSelfWake<F> {
    fn new(inner: F) -> NoSelfWake<F> {
        NoSelfWake {
            inner: Box::pin(inner),
            repoll: Repoll::new(),
        }
    }
}

impl<F: Future> Future for NoSelfWake<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        this.repoll.poll(cx, this.inner.as_mut())
    }
}

/// Most polls in a row before a self-wake goes to the scheduler after all.
const MAX_REPOLLS: usize = 4;

/// The waker behind [`NoSelfWake`]: polls a future with a waker of its own that notes a wake
/// during the poll (and polls again) and passes any other wake to the task. Public for the
/// GetToken benchmark's h2 callers and bare h2 server, which drive their connections the same
/// way.
pub struct Repoll {
    wake: Arc<SelfWake>,
    waker: std::task::Waker,
}

#[derive(Default)]
struct SelfWake {
    task: futures_util::task::AtomicWaker,
    polling: std::sync::atomic::AtomicBool,
    woken: std::sync::atomic::AtomicBool,
}

impl std::task::Wake for SelfWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        use std::sync::atomic::Ordering::SeqCst;
        self.woken.store(true, SeqCst);
        if !self.polling.load(SeqCst) {
            self.task.wake();
        }
    }
}

impl Default for Repoll {
    fn default() -> Self {
        Repoll::new()
    }
}

impl Repoll {
    /// A waker not yet tied to a task (the first [`Repoll::poll`] ties it).
    pub fn new() -> Repoll {
        let wake = Arc::new(SelfWake::default());
        Repoll {
            waker: std::task::Waker::from(wake.clone()),
            wake,
        }
    }

    /// Polls `f` for the task of `cx`, again at once (up to [`MAX_REPOLLS`] times) while it
    /// wakes itself during the poll.
    pub fn poll<F: Future + ?Sized>(
        &self,
        cx: &mut Context<'_>,
        mut f: Pin<&mut F>,
    ) -> Poll<F::Output> {
        use std::sync::atomic::Ordering::SeqCst;
        self.wake.task.register(cx.waker());
        self.wake.polling.store(true, SeqCst);
        let mut inner_cx = Context::from_waker(&self.waker);
        for _ in 0..MAX_REPOLLS {
            self.wake.woken.store(false, SeqCst);
            if let Poll::Ready(out) = f.as_mut().poll(&mut inner_cx) {
                self.wake.polling.store(false, SeqCst);
                return Poll::Ready(out);
            }
            if !self.wake.woken.load(SeqCst) {
                break;
            }
        }
        self.wake.polling.store(false, SeqCst);
        // A wake that came while polling and was not served by a repoll.
        if self.wake.woken.swap(false, SeqCst) {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::grpc::authority::PREFACE;
    use crate::grpc::server::build_services;
    use crate::store::Store;

    /// The client's end of a connection served over an in-memory pipe, the task serving it,
    /// its stop token, health reporter and services.
    type Pipe = (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<()>,
        CancellationToken,
        tonic_health::server::HealthReporter,
        Arc<Services>,
    );

    /// One connection served over an in-memory pipe, over an empty store, without credentials.
    async fn serve_pipe(limits: Limits) -> Pipe {
        serve_store(Arc::new(Store::default()), None, limits).await
    }

    /// [`serve_pipe`] over `store`, the peer being `caller`.
    async fn serve_store(store: Arc<Store>, caller: Option<Caller>, limits: Limits) -> Pipe {
        let stop = CancellationToken::new();
        let (services, health) = build_services(store, stop.clone(), limits).await.unwrap();
        let (client, server) = tokio::io::duplex(256 * 1024);
        let serving = serve(server, caller.map(Arc::new), services.clone(), stop.clone());
        (client, tokio::spawn(serving), stop, health, services)
    }

    /// A store whose one client, `c`, holds a token valid for an hour (the second value keeps
    /// its channel open).
    fn store_with_token() -> (Arc<Store>, impl Sized) {
        use crate::store::{ClientSlot, Mailbox, Snapshot};
        let now = std::time::SystemTime::now();
        let token = crate::token::Token {
            access_token: crate::secret::Secret::new("at-1".to_string()),
            token_type: "Bearer".into(),
            issued_at: now,
            expires_at: now + Duration::from_secs(3600),
            scope: vec!["read".into()],
        };
        let (tx, rx) = tokio::sync::watch::channel(Snapshot {
            token: Some(Arc::new(token)),
            generation: 7,
            last_refresh_at: Some(now),
            settled: true,
            ..Snapshot::default()
        });
        let text = "[clients.c]\ntoken_url = \"https://idp.example/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n";
        let config = crate::config::load_str(text, std::path::Path::new("/nonexistent.toml"));
        let store = Arc::new(Store::default());
        store.insert(
            "c",
            ClientSlot {
                snapshot: rx,
                mailbox: Arc::new(Mailbox::default()),
                config: config.unwrap().clients["c"].clone(),
            },
        );
        (store, tx)
    }

    /// A `GetToken` request message for `client`, `min_valid_for` seconds.
    fn get_token_request(client: &str, min_valid_for: i64) -> Vec<u8> {
        use prost::Message;
        let request = crate::grpc::pb::GetTokenRequest {
            client: client.into(),
            min_valid_for: (min_valid_for > 0).then_some(prost_types::Duration {
                seconds: min_valid_for,
                nanos: 0,
            }),
        };
        request.encode_to_vec()
    }

    /// A call's grpc-status (from a trailers-only answer's headers, else its trailers) and its
    /// whole response body.
    async fn answer_of(resp: h2::client::ResponseFuture) -> (String, Vec<u8>) {
        let resp = resp.await.unwrap();
        if let Some(s) = resp.headers().get("grpc-status") {
            return (s.to_str().unwrap().to_string(), Vec::new());
        }
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while let Some(d) = body.data().await {
            got.extend_from_slice(&d.unwrap());
        }
        let trailers = body.trailers().await.unwrap().unwrap();
        (trailers["grpc-status"].to_str().unwrap().to_string(), got)
    }

    #[tokio::test]
    async fn get_token_inline_sends_the_bytes_tonic_sends() {
        let (store, _keep) = store_with_token();
        let root = Caller::with_groups(0, 0, vec![]);
        let (client, _task, _stop, _h, services) =
            serve_store(store, Some(root), Limits::default()).await;
        let mut send = h2_client(client).await;
        assert_eq!(services.answers.cached(), 0);
        // The common case, answered inline from the encoded answer (now in the cache).
        let (resp, _b) =
            start_call(&mut send, GET_TOKEN_PATH, &get_token_request("c", 0), true).await;
        let (status, inline) = answer_of(resp).await;
        assert_eq!(status, "0");
        assert_eq!(services.answers.cached(), 1, "not answered inline");
        let token = services
            .api
            .readable_token(&Caller::with_groups(0, 0, vec![]), "c");
        let (token, generation) = token.unwrap();
        assert_eq!(inline, services.answers.answer("c", &token, generation));
        // min_valid_for sends it through tonic; the token is valid long enough: same answer.
        let (resp, _b) =
            start_call(&mut send, GET_TOKEN_PATH, &get_token_request("c", 60), true).await;
        let (status, full) = answer_of(resp).await;
        assert_eq!(status, "0");
        assert!(inline.len() > 5 && inline == full, "{inline:?} != {full:?}");
        // A body that arrives after the headers, in two pieces: answered once it is whole.
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("http://localhost{GET_TOKEN_PATH}"))
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let mut ready = send.clone().ready().await.unwrap();
        let (resp, mut body) = ready.send_request(req, false).unwrap();
        let msg = get_token_request("c", 0);
        let mut whole = vec![0u8];
        whole.extend((msg.len() as u32).to_be_bytes());
        whole.extend(msg);
        let whole = Bytes::from(whole);
        body.send_data(whole.slice(..3), false).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        body.send_data(whole.slice(3..), true).unwrap();
        assert_eq!(answer_of(resp).await, ("0".to_string(), inline.clone()));
    }

    #[tokio::test]
    async fn get_token_calls_the_inline_path_declines_get_the_services_answer() {
        let (store, _keep) = store_with_token();
        let nobody = Caller::with_groups(65534, 65534, vec![]);
        let cases: [(Option<Caller>, &str, &str); 4] = [
            (None, "c", "7"),         // no credentials: PERMISSION_DENIED
            (Some(nobody), "c", "7"), // not allowed to read it
            (Some(Caller::with_groups(0, 0, vec![])), "nope", "5"), // root: NOT_FOUND
            (Some(Caller::with_groups(0, 0, vec![])), "c", "0"),
        ];
        for (caller, client, want) in cases {
            let (io, _task, _stop, _h, _) =
                serve_store(store.clone(), caller.clone(), Limits::default()).await;
            let mut send = h2_client(io).await;
            let (resp, _b) = start_call(
                &mut send,
                GET_TOKEN_PATH,
                &get_token_request(client, 0),
                true,
            )
            .await;
            assert_eq!(answer_of(resp).await.0, want, "{caller:?} {client}");
        }
    }

    #[test]
    fn no_self_wake_repolls_self_wakes_and_passes_the_rest_on() {
        use std::sync::Mutex;
        use std::sync::atomic::AtomicUsize;
        use std::sync::atomic::Ordering::SeqCst;
        #[derive(Default)]
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, SeqCst);
            }
        }
        let task = Arc::new(Count::default());
        let waker = std::task::Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        // Woken by itself three times while polled: done in one poll, the task never woken.
        let mut n = 0;
        let mut f = NoSelfWake::new(std::future::poll_fn(move |cx| {
            if n < 3 {
                n += 1;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(n)
        }));
        assert_eq!(Pin::new(&mut f).poll(&mut cx), Poll::Ready(3));
        assert_eq!(task.0.load(SeqCst), 0);
        // Waking itself for ever: it still yields, after MAX_REPOLLS polls, the task woken.
        let polls = Arc::new(AtomicUsize::new(0));
        let p = polls.clone();
        let mut f = NoSelfWake::new(std::future::poll_fn(move |cx| {
            p.fetch_add(1, SeqCst);
            cx.waker().wake_by_ref();
            Poll::<()>::Pending
        }));
        assert!(Pin::new(&mut f).poll(&mut cx).is_pending());
        assert_eq!((polls.load(SeqCst), task.0.load(SeqCst)), (MAX_REPOLLS, 1));
        // A wake from elsewhere, after the poll, goes to the task.
        let stash: Arc<Mutex<Option<std::task::Waker>>> = Arc::default();
        let s = stash.clone();
        let mut f = NoSelfWake::new(std::future::poll_fn(move |cx| {
            *s.lock().unwrap() = Some(cx.waker().clone());
            Poll::<()>::Pending
        }));
        assert!(Pin::new(&mut f).poll(&mut cx).is_pending());
        assert_eq!(task.0.load(SeqCst), 1);
        stash.lock().unwrap().take().unwrap().wake();
        assert_eq!(task.0.load(SeqCst), 2);
    }

    async fn h2_client(io: tokio::io::DuplexStream) -> h2::client::SendRequest<Bytes> {
        let (send, conn) = h2::client::handshake(io).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        send
    }

    /// Starts a gRPC call to `path` with one message `msg` (prefixed here), ending the request
    /// when `end` (a unary or server-streaming call starts only then).
    async fn start_call(
        send: &mut h2::client::SendRequest<Bytes>,
        path: &str,
        msg: &[u8],
        end: bool,
    ) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("http://localhost{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let mut ready = send.clone().ready().await.unwrap();
        let (resp, mut body) = ready.send_request(req, false).unwrap();
        let mut framed = vec![0u8];
        framed.extend((msg.len() as u32).to_be_bytes());
        framed.extend(msg);
        body.send_data(Bytes::from(framed), end).unwrap();
        *send = ready;
        (resp, body)
    }

    /// How long the connection `task` takes from now to end.
    async fn time_to_close(task: tokio::task::JoinHandle<()>) -> Duration {
        let t0 = Instant::now();
        tokio::time::timeout(Duration::from_secs(3600), task)
            .await
            .expect("never closed")
            .unwrap();
        t0.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_without_preface_or_settings_is_dropped_at_the_deadline() {
        let limits = Limits::default();
        for sent in [&b""[..], PREFACE, &PREFACE[..10]] {
            let (mut client, task, _stop, _h, _) = serve_pipe(limits.clone()).await;
            client.write_all(sent).await.unwrap();
            let took = time_to_close(task).await;
            assert!(
                took >= limits.handshake_timeout
                    && took < limits.handshake_timeout + Duration::from_secs(1),
                "{took:?} after {} bytes",
                sent.len()
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_streams_is_closed_after_the_idle_time() {
        let limits = Limits::default();
        // The preface and SETTINGS, then silence (not even the ack of our GOAWAY's ping).
        let (mut client, task, _stop, _h, _) = serve_pipe(limits.clone()).await;
        client.write_all(PREFACE).await.unwrap();
        client
            .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        let took = time_to_close(task).await;
        let closes = limits.idle_timeout + limits.close_grace;
        assert!(
            took >= limits.idle_timeout && took <= closes + Duration::from_secs(1),
            "{took:?}"
        );
        // An open Watch keeps a connection; once it ends, the idle time runs again.
        let (client, task, _stop, _h, _) = serve_pipe(limits.clone()).await;
        let mut send = h2_client(client).await;
        let (resp, mut body) =
            start_call(&mut send, "/grpc.health.v1.Health/Watch", &[], true).await;
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        tokio::time::sleep(limits.idle_timeout * 3).await;
        assert!(!task.is_finished(), "closed with a stream open");
        body.send_reset(h2::Reason::CANCEL);
        drop(resp);
        let took = time_to_close(task).await;
        assert!(
            took >= limits.idle_timeout - Duration::from_secs(1)
                && took <= closes + Duration::from_secs(1),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn watch_streams_are_capped_in_all_and_places_come_back() {
        let limits = Limits {
            max_watch_streams: 2,
            ..Limits::default()
        };
        let (client, _task, _stop, _h, _) = serve_pipe(limits).await;
        let mut send = h2_client(client).await;
        let mut open = Vec::new();
        for _ in 0..2 {
            let (resp, body) =
                start_call(&mut send, "/grpc.health.v1.Health/Watch", &[], true).await;
            let resp = resp.await.unwrap();
            assert_eq!(resp.status(), 200);
            assert!(resp.headers().get("grpc-status").is_none());
            open.push((resp, body));
        }
        let (resp, _b) = start_call(&mut send, "/grpc.health.v1.Health/Watch", &[], true).await;
        assert_eq!(answer_of(resp).await.0, "8", "a third Watch is refused");
        let (resp, _b) = start_call(
            &mut send,
            "/tokenwarden.v1.TokenService/WatchToken",
            &[],
            true,
        )
        .await;
        assert_eq!(answer_of(resp).await.0, "8", "WatchToken counts too");
        // One ends: its place comes back.
        let (resp, mut body) = open.pop().unwrap();
        body.send_reset(h2::Reason::CANCEL);
        drop(resp);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (resp, b) = start_call(&mut send, "/grpc.health.v1.Health/Watch", &[], true).await;
            let resp = resp.await.unwrap();
            if resp.headers().get("grpc-status").is_none() {
                drop(b);
                break;
            }
            assert!(Instant::now() < deadline, "the place never came back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn an_oversized_message_gets_resource_exhausted() {
        let (client, _task, _stop, _h, _) = serve_pipe(Limits::default()).await;
        let mut send = h2_client(client).await;
        let big = vec![0x0a; crate::limits::MAX_MESSAGE + 1];
        for path in [
            GET_TOKEN_PATH,
            "/tokenwarden.v1.TokenService/ListClients",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            let (resp, _b) = start_call(&mut send, path, &big, true).await;
            assert_eq!(answer_of(resp).await.0, "8", "{path}");
        }
        // At the limit: not refused for its size.
        let (resp, _b) =
            start_call(&mut send, "/grpc.health.v1.Health/Check", &[0x0a; 10], true).await;
        assert_ne!(answer_of(resp).await.0, "8");
        // The server's SETTINGS allowed 16 streams.
        assert_eq!(send.current_max_send_streams(), 16);
    }

    #[test]
    fn the_message_limit_follows_the_framing_across_chunks() {
        let mut m = MessageLimit::new((), 10);
        let mut stream = Vec::new();
        for len in [0u32, 10, 3] {
            stream.push(0);
            stream.extend(len.to_be_bytes());
            stream.extend(vec![7; len as usize]);
        }
        for step in [1, 2, 5, 7, stream.len()] {
            m = MessageLimit::new((), 10);
            for c in stream.chunks(step) {
                assert_eq!(m.scan(c), Ok(()), "step {step}");
            }
        }
        let mut over = vec![0u8];
        over.extend(11u32.to_be_bytes());
        assert_eq!(m.scan(&over[..3]), Ok(()));
        assert_eq!(m.scan(&over[3..]), Err(11));
    }
}
