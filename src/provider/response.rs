//! The provider's answers: bodies, and the headers RFC 6749 asks of token responses.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue, PRAGMA, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};
use serde_json::{Value, json};

use super::REALM;
use super::request::Reject;

/// A response body: whole.
#[cfg(not(feature = "test-provider"))]
pub(crate) type Body = Full<Bytes>;

/// A response body: whole, or cut short on purpose ([`super::fault::Truncated`]).
#[cfg(feature = "test-provider")]
pub(crate) type Body = http_body_util::Either<Full<Bytes>, super::fault::Truncated>;

/// A whole body holding `data`.
pub(crate) fn full(data: Vec<u8>) -> Body {
    let whole = Full::new(Bytes::from(data));
    #[cfg(feature = "test-provider")]
    let whole = http_body_util::Either::Left(whole);
    whole
}

/// A response with `status`, `content_type` and `body` as given.
pub(crate) fn raw(status: u16, content_type: &str, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(CONTENT_TYPE, v);
    }
    r
}

/// A JSON response with the no-cache headers of RFC 6749 §5.1.
pub(crate) fn json_response(status: u16, value: &Value) -> Response<Body> {
    let mut r = raw(status, "application/json", value.to_string().into_bytes());
    let h = r.headers_mut();
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

/// An OAuth error response (RFC 6749 §5.2).
pub(crate) fn error_response(reject: &Reject) -> Response<Body> {
    let body = json!({"error": reject.error, "error_description": reject.description});
    let mut r = json_response(reject.status, &body);
    if reject.basic_challenge
        && let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{REALM}\""))
    {
        r.headers_mut().insert(WWW_AUTHENTICATE, v);
    }
    r
}
