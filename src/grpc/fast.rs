//! `GetToken`'s common case answered without tonic's codec (issue 4 item 7).
//!
//! Most calls ask for a client's current token, with no `min_valid_for`, from a caller allowed
//! to read it, while a valid token is there. [`super::conn`] answers those on the connection's
//! own task: [`answer`] reads the one request message and checks the caller with the same rule
//! as the service, and the client's answer, encoded once per token ([`AnswerCache`]), is sent
//! with [`send_answer`] between the head and trailers of [`answered_parts`] — exactly the bytes
//! tonic's codec would produce. Every call [`answer`] is unsure about (a compressed or
//! oversized request, a second message, an unknown or forbidden client, no valid token yet,
//! `min_valid_for`) goes to the generated tonic service unchanged, with what was read of its
//! body replayed, so errors and waits behave as they always have.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::SystemTime;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use prost::Message;

use super::access::Caller;
use super::pb;
use super::service::{TokenApi, token_message};
use crate::token::Token;

/// The HTTP/2 path of `GetToken`.
pub const GET_TOKEN_PATH: &str = "/tokenwarden.v1.TokenService/GetToken";

/// The gRPC message prefix: a compressed flag and a 4-byte length (gRPC over HTTP/2).
pub const PREFIX: usize = 5;

/// One client's `GetToken` answer, encoded once: valid while the client's token is the same
/// `Arc` of the same generation.
struct EncodedAnswer {
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
    answers: RwLock<HashMap<String, EncodedAnswer>>,
}

impl AnswerCache {
    /// The encoded answer for `client`'s `token` of `generation`, encoding it on first use.
    pub fn answer(&self, client: &str, token: &Arc<Token>, generation: u64) -> Bytes {
        {
            let answers = self.answers.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(a) = answers.get(client)
                && a.generation == generation
                && Arc::ptr_eq(&a.token, token)
            {
                return a.bytes.clone();
            }
        }
        let bytes = encode(&token_message(client, token, generation));
        let mut answers = self.answers.write().unwrap_or_else(PoisonError::into_inner);
        let now = SystemTime::now();
        answers.retain(|_, a| a.token.is_valid_at(now));
        answers.insert(
            client.to_string(),
            EncodedAnswer {
                token: token.clone(),
                generation,
                bytes: bytes.clone(),
            },
        );
        bytes
    }

    /// How many clients have an answer encoded (tests).
    #[cfg(test)]
    pub fn cached(&self) -> usize {
        self.answers.read().map_or(0, |a| a.len())
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
