//! Reading token endpoint answers: leniently in form, strictly in substance
//! (docs/oauth.md#responses).
//!
//! A success (RFC 6749 §5.1) must carry a non-empty `access_token`; `token_type` may be any
//! case or absent; `expires_in` may be an integer, a float or a numeric string, and when it is
//! absent the `exp` claim of a JWT access token, or `default_lifetime`, gives the lifetime.
//! An error (RFC 6749 §5.2) is shown with its `error`, `error_description` and `error_uri`.
//! Everything here is pure: the caller passes the status, a few headers and the body.
//!
//! Nothing from a success body is ever shown: a 2xx that is not a usable token response is
//! reported by its status, content type, length and what is wrong (a JSON error by position and
//! kind), since it may hold the very token it failed to deliver. Text from an error body is
//! shown only masked (see [`Redactor`]), then cut to length.

use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};

use super::error::{OAuthError, printable};
use crate::secret::{Redactor, Secret};
use crate::token::Token;

/// The largest body accepted from a token endpoint.
pub const MAX_BODY: usize = 1024 * 1024;

/// The longest lifetime believed; longer values are refused as nonsense (100 years).
const MAX_LIFETIME_SECS: f64 = 100.0 * 365.0 * 86400.0;

/// What the parser needs to know about the response besides its body.
#[derive(Debug, Clone, Default)]
pub struct ResponseMeta {
    pub status: u16,
    /// `Content-Type` without parameters, lower-cased.
    pub content_type: Option<String>,
    /// `Retry-After`, already parsed.
    pub retry_after: Option<Duration>,
    /// `Date`, already parsed.
    pub date: Option<SystemTime>,
}

/// What the request asked for, to fill in what the response leaves out.
#[derive(Debug, Clone)]
pub struct RequestContext<'a> {
    /// The scope that was requested (RFC 6749 §5.1: absent `scope` means this one).
    pub requested_scope: &'a [String],
    /// Lifetime when neither `expires_in` nor a JWT `exp` gives one.
    pub default_lifetime: Duration,
    /// Local time the request was sent: the token's `issued_at`.
    pub sent_at: SystemTime,
    /// Masks every secret of the client and every value the request carried.
    pub redactor: &'a Redactor,
}

/// A token and what came with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Issued {
    pub token: Token,
    /// A new refresh token (RFC 6749 §6), if the provider issued one.
    pub refresh_token: Option<Secret>,
    /// The provider's `Date` header, for the clock-skew check.
    pub server_date: Option<SystemTime>,
}

/// Turns a response into a token or an error.
pub fn parse_token_response(
    meta: &ResponseMeta,
    body: &[u8],
    ctx: &RequestContext<'_>,
) -> Result<Issued, OAuthError> {
    let status = meta.status;
    if body.len() > MAX_BODY {
        return Err(OAuthError::TooLarge {
            status,
            limit: MAX_BODY,
        });
    }
    let object = decode_object(meta, body);
    if !(200..300).contains(&status) {
        return Err(error_response(meta, body, object.as_ref().ok(), ctx));
    }
    let malformed = |reason: String| OAuthError::Malformed {
        status,
        content_type: meta.content_type.as_deref().map(|c| printable(c, 60)),
        length: body.len(),
        reason,
    };
    let object = object.map_err(malformed)?;
    // Some providers answer 200 with an error object.
    if object.get("access_token").is_none() && object.get("error").is_some_and(Value::is_string) {
        return Err(error_response(meta, body, Some(&object), ctx));
    }
    let mut issued = success(&object, ctx).map_err(malformed)?;
    issued.server_date = meta.date;
    Ok(issued)
}

/// How far the provider's clock (its `Date` header) is from ours, when more than
/// [`MAX_CLOCK_SKEW`]: `Some((seconds, ahead))`. Assertions carry our `iat`/`exp`, so a large
/// skew gets them refused; expiry never depends on it (it counts from our send time).
pub fn clock_skew(server_date: Option<SystemTime>, now: SystemTime) -> Option<(u64, bool)> {
    let date = server_date?;
    match date.duration_since(now) {
        Ok(ahead) if ahead > MAX_CLOCK_SKEW => Some((ahead.as_secs(), true)),
        Ok(_) => None,
        Err(e) if e.duration() > MAX_CLOCK_SKEW => Some((e.duration().as_secs(), false)),
        Err(_) => None,
    }
}

/// The skew beyond which tokenwarden warns.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Reads the body as a JSON object, or as a form-encoded one (GitHub-style providers answer
/// `application/x-www-form-urlencoded` unless asked otherwise). The error says what is wrong
/// without quoting the body.
fn decode_object(meta: &ResponseMeta, body: &[u8]) -> Result<Map<String, Value>, String> {
    let json = serde_json::from_slice::<Value>(body);
    if let Ok(Value::Object(map)) = json {
        return Ok(map);
    }
    if meta.content_type.as_deref() == Some("application/x-www-form-urlencoded") {
        let pairs: Vec<(String, String)> = url::form_urlencoded::parse(body).into_owned().collect();
        if !pairs.is_empty() {
            return Ok(pairs
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect());
        }
    }
    Err(if body.is_empty() {
        "empty body".to_string()
    } else if std::str::from_utf8(body).is_err() {
        "body is not UTF-8 text".to_string()
    } else {
        match json {
            Ok(v) => format!("body is a JSON {}, not a JSON object", json_type(&v)),
            Err(e) => format!("body is not a JSON object ({})", json_error(&e)),
        }
    })
}

/// A JSON parse error by kind and position only: serde_json's own message can quote the input
/// (and the input may be a token).
pub fn json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let kind = match e.classify() {
        Category::Io => "read error",
        Category::Syntax => "syntax error",
        Category::Data => "unexpected value",
        Category::Eof => "truncated",
    };
    format!("{kind} at line {} column {}", e.line(), e.column())
}

/// Provider text as it may be shown: masked, made printable, masked again (a secret split by
/// control characters is whole once they are gone), then cut to `max` characters.
fn shown(text: &str, max: usize, ctx: &RequestContext<'_>) -> String {
    let masked = ctx.redactor.mask(text);
    let flat = printable(&masked, usize::MAX);
    let masked = ctx.redactor.mask(&flat);
    printable(&masked, max)
}

fn error_response(
    meta: &ResponseMeta,
    body: &[u8],
    object: Option<&Map<String, Value>>,
    ctx: &RequestContext<'_>,
) -> OAuthError {
    let status = meta.status;
    if let Some(error) = object.and_then(|o| o.get("error")).and_then(Value::as_str) {
        let field = |k: &str| {
            object
                .and_then(|o| o.get(k))
                .and_then(Value::as_str)
                .map(|s| shown(s, 300, ctx))
                .filter(|s| !s.is_empty())
        };
        return OAuthError::Provider {
            status,
            error: shown(error, 64, ctx),
            description: field("error_description"),
            uri: field("error_uri"),
            retry_after: meta.retry_after,
        };
    }
    if (300..400).contains(&status) {
        return OAuthError::Redirect {
            status,
            location: None,
        };
    }
    OAuthError::Http {
        status,
        snippet: shown(&String::from_utf8_lossy(body), 200, ctx),
        retry_after: meta.retry_after,
    }
}

/// The token in a success body, or what is wrong with it, never quoting a value of the body.
fn success(object: &Map<String, Value>, ctx: &RequestContext<'_>) -> Result<Issued, String> {
    let access_token = match object.get("access_token") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) => return Err("access_token is empty".into()),
        Some(Value::Null) | None => {
            return Err("no access_token in the response".into());
        }
        Some(other) => return Err(not_a("access_token", "string", other)),
    };
    if access_token
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("access_token contains whitespace or control characters".into());
    }
    let token_type = match object.get("token_type") {
        None | Some(Value::Null) => "Bearer".to_string(),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("bearer") => "Bearer".to_string(),
        Some(Value::String(s)) if !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic()) => {
            s.clone()
        }
        Some(other) => {
            return Err(format!(
                "token_type (a {} of {} characters) is not a token type",
                json_type(other),
                other.to_string().chars().count()
            ));
        }
    };
    let jwt_exp = jwt_expiry(&access_token);
    let lifetime = match object.get("expires_in") {
        None | Some(Value::Null) => match jwt_exp {
            Some(exp) => match exp.duration_since(ctx.sent_at) {
                Ok(d) if !d.is_zero() => d,
                _ => {
                    return Err(
                        "no expires_in, and the access token's exp claim is already past".into(),
                    );
                }
            },
            None => ctx.default_lifetime,
        },
        Some(v) => parse_expires_in(v)?,
    };
    let mut expires_at = ctx.sent_at + lifetime;
    // A JWT that says it expires sooner than expires_in is believed: never serve it past exp.
    if let Some(exp) = jwt_exp
        && exp < expires_at
    {
        if exp <= ctx.sent_at {
            return Err("the access token's exp claim is already past".into());
        }
        expires_at = exp;
    }
    let scope = match object.get("scope") {
        None | Some(Value::Null) => ctx.requested_scope.to_vec(),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
        Some(Value::Array(items)) => {
            let mut v = Vec::new();
            for item in items {
                match item.as_str() {
                    Some(s) => v.push(s.to_string()),
                    None => return Err("scope array holds a non-string".into()),
                }
            }
            v
        }
        Some(other) => return Err(not_a("scope", "string", other)),
    };
    let refresh_token = match object.get("refresh_token") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(Secret::new(s.clone())),
        Some(other) => return Err(not_a("refresh_token", "string", other)),
    };
    Ok(Issued {
        token: Token {
            access_token: Secret::new(access_token),
            token_type,
            issued_at: ctx.sent_at,
            expires_at,
            scope,
        },
        refresh_token,
        server_date: None,
    })
}

/// `expires_in` as integer, float or numeric string → a positive lifetime.
pub fn parse_expires_in(v: &Value) -> Result<Duration, String> {
    let secs: f64 = match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| "expires_in is not a number".to_string())?,
        Value::String(s) => s
            .trim()
            .parse::<f64>()
            .map_err(|_| "expires_in is a string that is not a number".to_string())?,
        other => return Err(not_a("expires_in", "number", other)),
    };
    if !secs.is_finite() || secs > MAX_LIFETIME_SECS {
        return Err("expires_in is out of range".into());
    }
    if secs < 1.0 {
        return Err("expires_in must be positive".to_string());
    }
    // Whole seconds, rounded down: never believe a token lives longer than it does.
    Ok(Duration::from_secs(secs.floor() as u64))
}

/// The `exp` claim of a JWT, read without verifying it (we are not its audience; we only use it
/// as a lifetime hint, RFC 7519 §4.1.4). `None` when the token is not a JWT or has no usable `exp`.
pub fn jwt_expiry(token: &str) -> Option<SystemTime> {
    use base64::Engine as _;
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_f64()?;
    if !exp.is_finite() || exp <= 0.0 || exp > 32_503_680_000.0 {
        return None;
    }
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(exp.floor() as u64))
}

/// Parses `Retry-After`: delta-seconds or an HTTP-date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(86_400)));
    }
    let when = httpdate(value)?;
    Some(
        when.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(86_400)),
    )
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form servers send.
pub fn httpdate(value: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(&imf_to_rfc3339(value)?).ok()
}

fn imf_to_rfc3339(value: &str) -> Option<String> {
    let mut it = value.split_whitespace();
    let _day = it.next()?;
    let dd: u32 = it.next()?.parse().ok()?;
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = it.next()?;
    let mon = MONTHS.iter().position(|m| *m == month)? + 1;
    let year: u32 = it.next()?.parse().ok()?;
    let time = it.next()?;
    if it.next()? != "GMT" || time.len() != 8 {
        return None;
    }
    Some(format!("{year:04}-{mon:02}-{dd:02}T{time}Z"))
}

/// "`key` is a (JSON type of `v`), not a `expected`": the value's type, never the value.
fn not_a(key: &str, expected: &str, v: &Value) -> String {
    format!("{key} is a {}, not a {expected}", json_type(v))
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T0: u64 = 1_795_456_800;

    fn ctx() -> RequestContext<'static> {
        let mut redactor = Redactor::new();
        redactor.add("s3cret-value");
        RequestContext {
            requested_scope: &[],
            default_lifetime: Duration::from_secs(3600),
            sent_at: SystemTime::UNIX_EPOCH + Duration::from_secs(T0),
            redactor: Box::leak(Box::new(redactor)),
        }
    }

    fn meta(status: u16, ct: &str) -> ResponseMeta {
        ResponseMeta {
            status,
            content_type: Some(ct.into()),
            retry_after: None,
            date: None,
        }
    }

    /// The answer `body` with `status` and `content_type`, parsed.
    fn answer(status: u16, content_type: &str, body: &[u8]) -> Result<Issued, OAuthError> {
        parse_token_response(&meta(status, content_type), body, &ctx())
    }

    fn ok(body: &str) -> Result<Issued, OAuthError> {
        answer(200, "application/json", body.as_bytes())
    }

    fn jwt(claims: Value) -> String {
        use base64::Engine as _;
        let e = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.sig",
            e(&json!({"alg":"HS256","typ":"JWT"})),
            e(&claims)
        )
    }

    fn lifetime(r: &Result<Issued, OAuthError>) -> u64 {
        r.as_ref().unwrap().token.lifetime().as_secs()
    }

    #[test]
    fn lenient_forms_of_a_good_response() {
        let r = ok(r#"{"access_token":"abc","token_type":"bearer","expires_in":"3600"}"#);
        assert_eq!(lifetime(&r), 3600);
        assert_eq!(r.as_ref().unwrap().token.token_type, "Bearer");
        assert_eq!(
            lifetime(&ok(r#"{"access_token":"abc","expires_in":59.9}"#)),
            59
        );
        assert_eq!(
            lifetime(&ok(r#"{"access_token":"abc","expires_in":" 120 "}"#)),
            120
        );
        let r = ok(r#"{"access_token":"abc","expires_in":10,"token_type":"DPoP"}"#).unwrap();
        assert_eq!(r.token.token_type, "DPoP");
        // Absent expires_in, opaque token: default lifetime.
        assert_eq!(lifetime(&ok(r#"{"access_token":"abc"}"#)), 3600);
        // Absent expires_in, JWT: its exp.
        let t = jwt(json!({"exp": T0 + 600}));
        assert_eq!(lifetime(&ok(&format!(r#"{{"access_token":"{t}"}}"#))), 600);
        // JWT exp sooner than expires_in wins.
        assert_eq!(
            lifetime(&ok(&format!(
                r#"{{"access_token":"{t}","expires_in":3600}}"#
            ))),
            600
        );
        // Extra fields (id_token, sid) ignored; scope from response, refresh token kept.
        let r = ok(r#"{"access_token":"abc","expires_in":60,"scope":"a  b","refresh_token":"r1","id_token":"x","sid":"y"}"#).unwrap();
        assert_eq!(r.token.scope, vec!["a", "b"]);
        assert_eq!(r.refresh_token.unwrap().expose(), "r1");
        // Scope as an array.
        assert_eq!(
            ok(r#"{"access_token":"abc","scope":["x","y"]}"#)
                .unwrap()
                .token
                .scope,
            vec!["x", "y"]
        );
        // JSON served with a wrong content type is still read.
        let r = answer(200, "text/plain", br#"{"access_token":"abc"}"#);
        assert!(r.is_ok());
        // Form-encoded answers (GitHub style).
        let r = answer(
            200,
            "application/x-www-form-urlencoded",
            b"access_token=abc&token_type=bearer&expires_in=30",
        )
        .unwrap();
        assert_eq!(r.token.lifetime().as_secs(), 30);
    }

    #[test]
    fn requested_scope_fills_in() {
        let scope = vec!["files".to_string()];
        let c = RequestContext {
            requested_scope: &scope,
            ..ctx()
        };
        let r = parse_token_response(
            &meta(200, "application/json"),
            br#"{"access_token":"a"}"#,
            &c,
        )
        .unwrap();
        assert_eq!(r.token.scope, scope);
    }

    #[test]
    fn malformed_successes() {
        let cases = [
            ("{}", "no access_token"),
            (r#"{"access_token":null}"#, "no access_token"),
            (r#"{"access_token":""}"#, "empty"),
            (r#"{"access_token":42}"#, "number, not a string"),
            (r#"{"access_token":["a"]}"#, "array, not a string"),
            (r#"{"access_token":"a b"}"#, "whitespace"),
            (r#"{"access_token":"a\nb"}"#, "whitespace"),
            (
                r#"{"access_token":"a","expires_in":-5}"#,
                "must be positive",
            ),
            (r#"{"access_token":"a","expires_in":0}"#, "must be positive"),
            (r#"{"access_token":"a","expires_in":1e300}"#, "out of range"),
            (
                r#"{"access_token":"a","expires_in":"soon"}"#,
                "not a number",
            ),
            (r#"{"access_token":"a","expires_in":true}"#, "boolean"),
            (r#"{"access_token":"a","expires_in":{}}"#, "object"),
            (r#"{"access_token":"a","token_type":5}"#, "not a token type"),
            (
                r#"{"access_token":"a","token_type":""}"#,
                "not a token type",
            ),
            (r#"{"access_token":"a","scope":7}"#, "scope is a number"),
            (r#"{"access_token":"a","scope":[1]}"#, "non-string"),
            (
                r#"{"access_token":"a","refresh_token":5}"#,
                "refresh_token is a number",
            ),
            ("[1,2]", "not a JSON object"),
            ("null", "not a JSON object"),
            (r#"{"access_token":"abc""#, "not a JSON object"),
            (
                "<html><body>Hello</body></html>",
                "(HTTP 200, application/json, 31 bytes): body is not a JSON object (syntax error at line 1 column 1)",
            ),
            ("", "empty body"),
        ];
        for (body, want) in cases {
            let err = ok(body).unwrap_err();
            assert!(
                matches!(err, OAuthError::Malformed { status: 200, .. }),
                "{body}: {err:?}"
            );
            assert!(err.to_string().contains(want), "{body}: {err}");
        }
        let expired = jwt(json!({"exp": T0 - 10}));
        let err = ok(&format!(r#"{{"access_token":"{expired}"}}"#)).unwrap_err();
        assert!(err.to_string().contains("already past"), "{err}");
        let err = answer(200, "application/json", &[0xff, 0xfe]).unwrap_err();
        assert!(err.to_string().contains("not UTF-8"), "{err}");
    }

    #[test]
    fn values_echoed_in_malformed_answers_are_scrubbed() {
        // Found by the token_response fuzz target: a provider echoing a sent secret inside
        // `expires_in` must not get it into the error message.
        let err = ok(r#"{"access_token":"a","expires_in":"s3cret-value"}"#).unwrap_err();
        assert!(err.to_string().contains("not a number"), "{err}");
        assert!(!err.to_string().contains("s3cret-value"), "{err}");
    }

    #[test]
    fn odd_success_bodies_never_show_their_content() {
        let at = "AT-tok-0123456789";
        let rt = "RT-tok-9876543210";
        let cases: Vec<(&str, String, &str)> = vec![
            (
                "text/plain",
                format!("access_token={at}&refresh_token={rt}&expires_in=60"),
                "syntax error at line 1 column 1",
            ),
            (
                "application/json",
                format!(r#"{{"access_token":"{at}","refresh_token":"{rt}"}} trailing"#),
                "syntax error at line 1 column",
            ),
            (
                "application/json",
                format!(r#"{{"access_token":"{at}","refresh_token":"{rt}","expires_in":1e400}}"#),
                "syntax error at line 1 column",
            ),
            (
                "application/json",
                format!(
                    r#"{{"access_token":"{at}","refresh_token":"{rt}","expires_in":123456789012345678901234567890}}"#
                ),
                "expires_in is out of range",
            ),
            (
                "application/json",
                format!(r#"{{"access_token":"{at}","expires_in":"{rt}"}}"#),
                "expires_in is a string that is not a number",
            ),
            (
                "application/json",
                format!(r#"{{"access_token":"{at}","token_type":["{rt}"]}}"#),
                "token_type (a array of",
            ),
            (
                "application/json",
                format!(r#"{{"access_token":{{"value":"{at}"}},"refresh_token":"{rt}"}}"#),
                "access_token is a object",
            ),
            (
                "application/json",
                format!(r#"{{"access_token":"{at}","refresh_token":{{"v":"{rt}"}}}}"#),
                "refresh_token is a object",
            ),
            (
                "text/html",
                format!("<html><p>access_token {at}</p><p>{rt}</p></html>"),
                "(HTTP 200, text/html,",
            ),
            (
                "application/json",
                format!(r#"["{at}","{rt}"]"#),
                "body is a JSON array, not a JSON object",
            ),
        ];
        for (ct, body, want) in cases {
            let err = answer(200, ct, body.as_bytes()).unwrap_err();
            let m = err.to_string();
            assert!(matches!(err, OAuthError::Malformed { .. }), "{body}: {m}");
            assert!(m.contains(want), "{body}: {m}");
            assert!(m.contains(&format!("{} bytes", body.len())), "{m}");
            assert!(!m.contains("tok-"), "{body}: {m}");
        }
    }

    #[test]
    fn provider_text_is_masked_before_it_is_cut() {
        let jwt = jwt(json!({"sub": "someone"}));
        let cases = [
            // A sent secret straddling the 300-character cut.
            format!("{}s3cret-value and more", "x".repeat(295)),
            format!("assertion {jwt} is expired"),
            "refresh_token=opaque-refresh-1 is revoked".to_string(),
            // Split by a control character, whole once it is dropped.
            "bad s3cret\u{7}-value".to_string(),
        ];
        for description in cases {
            let body = json!({"error": "invalid_grant", "error_description": description});
            let err = answer(400, "application/json", body.to_string().as_bytes()).unwrap_err();
            let m = err.to_string();
            for leak in ["s3cr", "opaque-refresh-1", &jwt[..20]] {
                assert!(!m.contains(leak), "{leak} in {m}");
            }
        }
        // The same in an HTML error page.
        let page = format!("<html>{}s3cret-value</html>", "y".repeat(190));
        let err = answer(502, "text/html", page.as_bytes()).unwrap_err();
        assert!(!err.to_string().contains("s3cr"), "{err}");
    }

    #[test]
    fn oversized_bodies_are_refused() {
        let big = vec![b' '; MAX_BODY + 1];
        let err = answer(200, "application/json", &big).unwrap_err();
        assert!(matches!(err, OAuthError::TooLarge { .. }));
    }

    #[test]
    fn error_responses() {
        let m = ResponseMeta {
            status: 400,
            content_type: Some("application/json".into()),
            retry_after: Some(Duration::from_secs(3)),
            date: None,
        };
        let err = parse_token_response(
            &m,
            br#"{"error":"invalid_grant","error_description":"refresh token s3cret-value\nis revoked","error_uri":"https://x/e"}"#,
            &ctx(),
        )
        .unwrap_err();
        match &err {
            OAuthError::Provider {
                error,
                description,
                uri,
                retry_after,
                status,
            } => {
                assert_eq!(error, "invalid_grant");
                assert_eq!(
                    description.as_deref(),
                    Some("refresh token [redacted] is revoked")
                );
                assert_eq!(uri.as_deref(), Some("https://x/e"));
                assert_eq!(*retry_after, Some(Duration::from_secs(3)));
                assert_eq!(*status, 400);
            }
            other => panic!("{other:?}"),
        }
        // HTML error page.
        let err = answer(
            502,
            "text/html",
            b"<html>\n<head><title>502 Bad Gateway</title></head></html>",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "HTTP 502 from the token endpoint: <html> <head><title>502 Bad Gateway</title></head></html>"
        );
        // Error object with status 200.
        let err = ok(r#"{"error":"invalid_client"}"#).unwrap_err();
        assert_eq!(err.oauth_code(), Some("invalid_client"));
        // Snippets stop at 200 characters.
        let long = "x".repeat(1000);
        let err = answer(500, "text/plain", long.as_bytes()).unwrap_err();
        assert!(err.to_string().len() < 260);
        // 3xx
        let err = answer(302, "text/html", b"").unwrap_err();
        assert!(matches!(err, OAuthError::Redirect { status: 302, .. }));
    }

    #[test]
    fn clock_skew_beyond_a_minute() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(T0);
        let s = |d: i64| {
            Some(if d >= 0 {
                now + Duration::from_secs(d as u64)
            } else {
                now - Duration::from_secs((-d) as u64)
            })
        };
        assert_eq!(clock_skew(None, now), None);
        assert_eq!(clock_skew(s(59), now), None);
        assert_eq!(clock_skew(s(-60), now), None);
        assert_eq!(clock_skew(s(61), now), Some((61, true)));
        assert_eq!(clock_skew(s(-3600), now), Some((3600, false)));
        // The Date header travels into the issued token's record.
        let m = ResponseMeta {
            date: s(5),
            ..meta(200, "application/json")
        };
        let r = parse_token_response(&m, br#"{"access_token":"a"}"#, &ctx()).unwrap();
        assert_eq!(r.server_date, s(5));
    }

    #[test]
    fn jwt_expiry_cases() {
        assert_eq!(jwt_expiry("opaque"), None);
        assert_eq!(jwt_expiry("a.b"), None);
        assert_eq!(jwt_expiry("a.b.c.d"), None);
        assert_eq!(jwt_expiry("a.!!!.c"), None);
        assert_eq!(jwt_expiry(&jwt(json!({"sub": "x"}))), None);
        assert_eq!(jwt_expiry(&jwt(json!({"exp": "soon"}))), None);
        assert_eq!(jwt_expiry(&jwt(json!({"exp": -1}))), None);
        assert_eq!(jwt_expiry(&jwt(json!({"exp": 1e300}))), None);
        assert_eq!(
            jwt_expiry(&jwt(json!({"exp": 100}))),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(100))
        );
    }

    #[test]
    fn retry_after_forms() {
        let now = httpdate("Mon, 23 Nov 2026 18:00:00 GMT").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Mon, 23 Nov 2026 18:01:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Mon, 23 Nov 2026 17:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(
            parse_retry_after("99999999", now),
            Some(Duration::from_secs(86_400))
        );
    }
}
