//! Misbehaviour on demand: the provider outages and broken responses tokenwarden must survive.
//!
//! A fault replaces the provider's answer to a request (the request is still recorded). It can
//! hold for every request until cleared ([`crate::provider::Provider::set_fault`]) or for the
//! next few only ([`crate::provider::Provider::fault_next`]), which take precedence.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::Either;
use hyper::Response;
use hyper::body::{Bytes, Frame, SizeHint};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};

use super::response::{Body, raw};

/// A way for the provider to misbehave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 500 with a plain-text body, no JSON.
    ServerError,
    /// 429 with `Retry-After: retry_after` (seconds) and a JSON error body.
    TooManyRequests {
        /// The `Retry-After` value, in seconds.
        retry_after: u64,
    },
    /// 200 with `Content-Type: application/json` and a body that is not JSON.
    InvalidJson,
    /// 502 with an HTML error page, as a proxy in front of a provider sends.
    HtmlError,
    /// Never answer (until the provider shuts down). Other connections are served as usual.
    Hang,
    /// Close the connection without a response.
    DropConnection,
    /// 200 with a `Content-Length` larger than the body sent, then close the connection.
    TruncatedBody,
    /// A provider that quotes what it was sent: an error whose text holds every form value,
    /// the `Authorization` header, its base64 part, and the decoded `id:secret` and secret.
    Echo {
        /// The HTTP status (an invalid one becomes 500).
        status: u16,
        /// An HTML page instead of an OAuth error object (RFC 6749 §5.2).
        html: bool,
        /// Characters of filler before the first quoted value (to put it across a length cut).
        pad: usize,
    },
    /// Any raw response, for malformed-response tests.
    Custom {
        /// The HTTP status (an invalid one becomes 500).
        status: u16,
        /// The `Content-Type` header (an invalid value is left out).
        content_type: String,
        /// The body, sent as is.
        body: Vec<u8>,
    },
}

/// The faults in force: a queue for the next requests, then a standing one.
#[derive(Debug, Default)]
pub(crate) struct FaultPlan {
    /// Applies to every request while no queued fault is left.
    pub standing: Option<Fault>,
    /// Applies to the next requests, one each, first in first out.
    pub queued: VecDeque<Fault>,
}

impl FaultPlan {
    /// The fault for the request arriving now, if any.
    pub fn take(&mut self) -> Option<Fault> {
        self.queued.pop_front().or_else(|| self.standing.clone())
    }
}

/// What the connection does about a fault.
pub(crate) enum Action {
    /// Send this response.
    Respond(Response<Body>),
    /// Never answer.
    Hang,
    /// Close without answering.
    Drop,
}

/// The action for `fault`.
pub(crate) fn action(fault: &Fault) -> Action {
    match fault {
        Fault::ServerError => Action::Respond(raw(
            500,
            "text/plain; charset=utf-8",
            b"Internal Server Error".to_vec(),
        )),
        Fault::TooManyRequests { retry_after } => {
            let mut r = raw(
                429,
                "application/json",
                br#"{"error":"temporarily_unavailable","error_description":"rate limit exceeded"}"#
                    .to_vec(),
            );
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(*retry_after));
            Action::Respond(r)
        }
        Fault::InvalidJson => Action::Respond(raw(
            200,
            "application/json",
            b"{\"access_token\": \"tw_broken\", \"token_type\": ".to_vec(),
        )),
        Fault::HtmlError => Action::Respond(raw(
            502,
            "text/html; charset=utf-8",
            HTML_ERROR_PAGE.as_bytes().to_vec(),
        )),
        Fault::Hang => Action::Hang,
        Fault::DropConnection => Action::Drop,
        Fault::TruncatedBody => {
            let part =
                b"{\"access_token\":\"tw_truncated\",\"token_type\":\"Bearer\",\"exp".to_vec();
            let declared = part.len() + 64;
            let mut r = Response::new(Either::Right(Truncated {
                data: Some(Bytes::from(part)),
                fail: true,
                yielded: false,
            }));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(declared));
            Action::Respond(r)
        }
        Fault::Custom {
            status,
            content_type,
            body,
        } => Action::Respond(raw(*status, content_type, body.clone())),
        // Resolved against the request by `echo` before it gets here.
        Fault::Echo { .. } => Action::Respond(raw(500, "text/plain", Vec::new())),
    }
}

/// The response of [`Fault::Echo`] to `request`, as a [`Fault::Custom`].
pub(crate) fn echo(status: u16, html: bool, pad: usize, request: &super::RecordedRequest) -> Fault {
    use base64::Engine as _;
    let mut quoted: Vec<String> = request.form.iter().map(|(_, v)| v.clone()).collect();
    if let Some(auth) = request.header("authorization") {
        quoted.push(auth.to_string());
        if let Some(b64) = auth.strip_prefix("Basic ") {
            quoted.push(b64.to_string());
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap_or_default();
            let raw = String::from_utf8_lossy(&raw).into_owned();
            if let Some((_, secret)) = raw.split_once(':') {
                quoted.push(secret.to_string());
            }
            quoted.push(raw);
        }
    }
    let text = format!(
        "{}client secret {} is wrong",
        "x".repeat(pad),
        quoted.join(" and ")
    );
    if html {
        let page = format!("<html><body><p>{text}</p></body></html>");
        Fault::Custom {
            status,
            content_type: "text/html".into(),
            body: page.into_bytes(),
        }
    } else {
        let body = serde_json::json!({"error": "invalid_client", "error_description": text});
        Fault::Custom {
            status,
            content_type: "application/json".into(),
            body: body.to_string().into_bytes(),
        }
    }
}

/// The HTML page of [`Fault::HtmlError`].
pub const HTML_ERROR_PAGE: &str = "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n\
<body><h1>502 Bad Gateway</h1><p>The upstream server is not answering.</p><hr><address>nginx</address></body></html>\n";

/// The body of [`Fault::TruncatedBody`]: its data, then an error that closes the connection
/// before `Content-Length` bytes were sent.
#[derive(Debug)]
pub(crate) struct Truncated {
    data: Option<Bytes>,
    /// The error is still to come.
    fail: bool,
    /// Whether the body has already said "not yet" once before failing.
    yielded: bool,
}

impl hyper::body::Body for Truncated {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        if self.fail && !self.yielded {
            // Let the connection flush the head and the first part before the error aborts it.
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if self.fail {
            self.fail = false;
            return Poll::Ready(Some(Err(std::io::Error::other(
                "body truncated on purpose",
            ))));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && !self.fail
    }

    /// Unknown: the `Content-Length` header is set apart, larger than the data.
    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_faults_come_first_then_the_standing_one() {
        let mut plan = FaultPlan::default();
        assert_eq!(plan.take(), None);
        plan.standing = Some(Fault::ServerError);
        plan.queued.push_back(Fault::Hang);
        plan.queued.push_back(Fault::HtmlError);
        assert_eq!(plan.take(), Some(Fault::Hang));
        assert_eq!(plan.take(), Some(Fault::HtmlError));
        assert_eq!(plan.take(), Some(Fault::ServerError));
        assert_eq!(plan.take(), Some(Fault::ServerError));
        plan.standing = None;
        assert_eq!(plan.take(), None);
    }

    #[test]
    fn responses_of_each_fault() {
        let status = |f: Fault| match action(&f) {
            Action::Respond(r) => Some(r.status().as_u16()),
            _ => None,
        };
        assert_eq!(status(Fault::ServerError), Some(500));
        assert_eq!(status(Fault::TooManyRequests { retry_after: 7 }), Some(429));
        assert_eq!(status(Fault::InvalidJson), Some(200));
        assert_eq!(status(Fault::HtmlError), Some(502));
        assert_eq!(status(Fault::TruncatedBody), Some(200));
        assert_eq!(status(Fault::Hang), None);
        assert_eq!(status(Fault::DropConnection), None);
        let custom = Fault::Custom {
            status: 1000,
            content_type: "bad\nvalue".into(),
            body: vec![],
        };
        match action(&custom) {
            Action::Respond(r) => {
                assert_eq!(r.status(), 500);
                assert!(r.headers().get(CONTENT_TYPE).is_none());
            }
            _ => panic!("custom faults respond"),
        }
    }
}
