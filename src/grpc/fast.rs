//! `GetToken`'s common case answered without tonic's codec (issue 4 item 7).
//!
//! Most calls ask for a client's current token, with no `min_valid_for`, from a caller allowed
//! to read it, while a valid token is there. [`TokenRoutes`] answers those itself: it reads the
//! one request message, checks the caller with the same rule as the service, and sends the
//! client's answer encoded once per token ([`AnswerCache`]) followed by `grpc-status: 0`,
//! exactly the bytes tonic's codec would produce. Every other call, and every call the fast
//! path is unsure about (a compressed or oversized request, a second message, an unknown or
//! forbidden client, no valid token yet, `min_valid_for`), goes to the generated tonic service
//! unchanged, with the request body replayed, so errors and waits behave as they always have.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use http_body::{Body as HttpBody, Frame};
use prost::Message;
use tonic::body::Body;
use tonic::codegen::BoxFuture;
use tonic::server::NamedService;

use super::access::Caller;
use super::pb;
use super::pb::token_service_server::TokenServiceServer;
use super::server::MAX_REQUEST_SIZE;
use super::service::{TokenApi, token_message};
use crate::token::Token;

/// The HTTP/2 path of `GetToken`.
pub const GET_TOKEN_PATH: &str = "/tokenwarden.v1.TokenService/GetToken";

/// The gRPC message prefix: a compressed flag and a 4-byte length (gRPC over HTTP/2).
const PREFIX: usize = 5;
/// The largest request body the fast path reads: one message of the largest size accepted.
pub const MAX_BODY: usize = MAX_REQUEST_SIZE + PREFIX;

/// One client's encoded answer, valid while the client's token is the same `Arc`.
struct Answer {
    token: Arc<Token>,
    generation: u64,
    /// The length-prefixed `Token` message, as sent in the response's DATA frame.
    bytes: Bytes,
}

/// Encoded `GetToken` answers, one per client, rebuilt when the client's token changes.
///
/// Holds each answer's token (so the pointer comparison cannot be fooled by a reused
/// allocation) and drops answers whose token has expired whenever it inserts one.
#[derive(Default)]
pub struct AnswerCache {
    answers: RwLock<HashMap<String, Answer>>,
}

impl AnswerCache {
    /// The encoded answer for `client`'s `token` of `generation`, encoding it on first use.
    pub fn answer(&self, client: &str, token: &Arc<Token>, generation: u64) -> Bytes {
        {
            let answers = match self.answers.read() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if let Some(a) = answers.get(client)
                && a.generation == generation
                && Arc::ptr_eq(&a.token, token)
            {
                return a.bytes.clone();
            }
        }
        let bytes = encode(&token_message(client, token, generation));
        let mut answers = match self.answers.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let now = SystemTime::now();
        answers.retain(|_, a| a.token.is_valid_at(now));
        answers.insert(
            client.to_string(),
            Answer {
                token: token.clone(),
                generation,
                bytes: bytes.clone(),
            },
        );
        bytes
    }
}

/// A message with its gRPC prefix (uncompressed).
pub fn encode(msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut b = BytesMut::with_capacity(PREFIX + len);
    b.put_u8(0);
    b.put_u32(len as u32);
    msg.encode_raw(&mut b);
    b.freeze()
}

/// The one uncompressed message of a whole request body, if that is what `body` holds.
pub fn single_message(body: &[u8]) -> Option<&[u8]> {
    if body.len() < PREFIX || body[0] != 0 {
        return None;
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    (body.len() - PREFIX == len).then(|| &body[PREFIX..])
}

/// `tokenwarden.v1.TokenService` with the fast `GetToken` in front of the generated service.
#[derive(Clone)]
pub struct TokenRoutes {
    api: TokenApi,
    answers: Arc<AnswerCache>,
    inner: TokenServiceServer<TokenApi>,
}

impl NamedService for TokenRoutes {
    const NAME: &'static str = <TokenServiceServer<TokenApi> as NamedService>::NAME;
}

impl TokenRoutes {
    /// The routes over `api`, sharing `answers`; `inner` is the generated service over the
    /// same `api`.
    pub fn new(
        api: TokenApi,
        answers: Arc<AnswerCache>,
        inner: TokenServiceServer<TokenApi>,
    ) -> TokenRoutes {
        TokenRoutes {
            api,
            answers,
            inner,
        }
    }

    /// Answers a `GetToken` call: fast when it can, else through the generated service.
    async fn get_token<B>(mut self, req: http::Request<B>) -> http::Response<Body>
    where
        B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<tonic::codegen::StdError>,
    {
        let identity = req
            .headers()
            .get("grpc-encoding")
            .is_none_or(|v| v == "identity");
        let caller = req.extensions().get::<Arc<Caller>>().cloned();
        let (parts, mut body) = req.into_parts();
        let read = read_message(&mut body).await;
        let (chunks, whole) = match read {
            Ok(r) => r,
            Err(status) => return status.into_http(),
        };
        if identity
            && let (Some(caller), Some(whole)) = (caller, whole.as_ref())
            && let Some(answer) = answer(&self.api, &self.answers, &caller, whole)
        {
            return answered(answer);
        }
        let req = http::Request::from_parts(parts, Body::new(Replay::new(chunks, body)));
        match tower::Service::call(&mut self.inner, req).await {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }
}

/// The encoded answer to a `GetToken` request `body` (the whole request body) when the call
/// needs nothing but the client's current token; `None` sends the call the full way.
pub fn answer(
    api: &TokenApi,
    answers: &AnswerCache,
    caller: &Caller,
    body: &[u8],
) -> Option<Bytes> {
    let request = pb::GetTokenRequest::decode(single_message(body)?).ok()?;
    if request
        .min_valid_for
        .is_some_and(|d| d.seconds != 0 || d.nanos != 0)
    {
        return None;
    }
    let (token, generation) = api.readable_token(caller, &request.client)?;
    tracing::debug!(client = request.client, uid = caller.uid, token = %token.fingerprint(), "GetToken");
    crate::audit::read(
        &request.client,
        crate::audit::Api::Grpc,
        caller,
        &token,
        generation,
    );
    Some(answers.answer(&request.client, &token, generation))
}

/// Largest piece of an answer given to h2 in one DATA frame: below the size from which h2
/// keeps a payload aside instead of copying it into its write buffer (1 KiB on a
/// [`super::writes::WriteBatch`] connection), so that the answer's frames leave in one write.
pub const DATA_PIECE: usize = 1023;

/// Queues `answer` (a length-prefixed message) on `send` in pieces of at most [`DATA_PIECE`]
/// bytes (slices of the same buffer, no copy), not ending the stream.
pub fn send_answer(send: &mut h2::SendStream<Bytes>, answer: Bytes) -> Result<(), h2::Error> {
    let mut rest = answer;
    while rest.len() > DATA_PIECE {
        send.send_data(rest.split_to(DATA_PIECE), false)?;
    }
    send.send_data(rest, false)
}

/// The head and trailers of a successful unary answer, as tonic sends them:
/// `content-type: application/grpc`, then `grpc-status: 0`.
pub fn answered_parts() -> (http::Response<()>, HeaderMap) {
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let mut head = http::Response::new(());
    head.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    (head, trailers)
}

/// A successful unary answer: the encoded message, then `grpc-status: 0`.
fn answered(message: Bytes) -> http::Response<Body> {
    let (head, trailers) = answered_parts();
    head.map(|()| {
        Body::new(Answered {
            message: Some(message),
            trailers: Some(trailers),
        })
    })
}

/// The chunks of a body as one `Bytes` (no copy for one chunk).
pub fn concat(chunks: &VecDeque<Bytes>, total: usize) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks[0].clone(),
        _ => {
            let mut b = BytesMut::with_capacity(total);
            for c in chunks {
                b.put_slice(c);
            }
            b.freeze()
        }
    }
}

/// Reads a request body until its end or until it is clearly not one small message.
///
/// Returns the chunks read, and the whole body when it ended within [`MAX_REQUEST_SIZE`] plus
/// the prefix. A body error becomes the status tonic would give it.
async fn read_message<B>(body: &mut B) -> Result<(VecDeque<Bytes>, Option<Bytes>), tonic::Status>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<tonic::codegen::StdError>,
{
    let mut chunks = VecDeque::new();
    let mut total = 0usize;
    loop {
        if body.is_end_stream() {
            break;
        }
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await;
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| tonic::Status::from_error(e.into()))?;
        match frame.into_data() {
            Ok(data) => {
                total += data.len();
                chunks.push_back(data);
                if total > MAX_BODY {
                    return Ok((chunks, None));
                }
            }
            // Request trailers: unusual; let the generated service see them.
            Err(_) => return Ok((chunks, None)),
        }
    }
    let whole = concat(&chunks, total);
    Ok((chunks, Some(whole)))
}

impl<B> tower::Service<http::Request<B>> for TokenRoutes
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() == GET_TOKEN_PATH {
            let this = self.clone();
            Box::pin(async move { Ok(this.get_token(req).await) })
        } else {
            self.inner.call(req)
        }
    }
}

/// The body of a fast answer: one DATA frame, then the trailers.
struct Answered {
    message: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl HttpBody for Answered {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(m) = this.message.take() {
            return Poll::Ready(Some(Ok(Frame::data(m))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.message.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.message.as_ref().map_or(0, |m| m.len() as u64))
    }
}

/// A request body whose first chunks were already read: those, then the rest.
pub struct Replay<B> {
    chunks: VecDeque<Bytes>,
    rest: Option<B>,
}

impl<B> Replay<B> {
    /// `chunks`, then what is left of `rest`.
    pub fn new(chunks: VecDeque<Bytes>, rest: B) -> Replay<B> {
        Replay {
            chunks,
            rest: Some(rest),
        }
    }
}

impl<B> HttpBody for Replay<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if let Some(c) = this.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        match this.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.iter().all(|c| !c.has_remaining())
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_message_table() {
        let cases: &[(&[u8], Option<&[u8]>)] = &[
            (&[0, 0, 0, 0, 2, 10, 0], Some(&[10, 0])),
            (&[0, 0, 0, 0, 0], Some(&[])),
            (&[1, 0, 0, 0, 2, 10, 0], None), // compressed
            (&[0, 0, 0, 0, 3, 10, 0], None), // short
            (&[0, 0, 0, 0, 1, 10, 0], None), // a second message follows
            (&[0, 0, 0], None),              // no prefix
            (&[], None),                     // no message at all
        ];
        for (body, want) in cases {
            assert_eq!(single_message(body), *want, "{body:?}");
        }
    }

    #[test]
    fn encode_matches_the_prefix_rule() {
        let msg = pb::GetTokenRequest {
            client: "transatel".into(),
            min_valid_for: None,
        };
        let b = encode(&msg);
        assert_eq!(
            pb::GetTokenRequest::decode(single_message(&b).unwrap()).unwrap(),
            msg
        );
    }
}
