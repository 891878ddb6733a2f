//! Reading a token request strictly: the content type, the form body (RFC 6749 §3.2), the HTTP
//! Basic credentials (§2.3.1) and which client authentication methods were used (§2.3), plus the
//! OAuth error every check answers with (§5.2). All pure functions.

use std::collections::BTreeMap;

use base64::Engine as _;

use crate::secret::Secret;

/// Largest request body the provider reads.
pub const MAX_BODY: usize = 64 * 1024;

/// The `client_assertion_type` of RFC 7523 §2.2.
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A refused request: an OAuth error response (RFC 6749 §5.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reject {
    /// HTTP status: 400, 401 or 413.
    pub status: u16,
    /// The `error` code.
    pub error: &'static str,
    /// The `error_description`: says which check failed, never a secret.
    pub description: String,
    /// Whether to add `WWW-Authenticate: Basic` (the client tried HTTP Basic, RFC 6749 §5.2).
    pub basic_challenge: bool,
}

impl Reject {
    fn new(status: u16, error: &'static str, description: impl Into<String>) -> Reject {
        Reject {
            status,
            error,
            description: description.into(),
            basic_challenge: false,
        }
    }
    /// 400 `invalid_request`.
    pub fn invalid_request(d: impl Into<String>) -> Reject {
        Reject::new(400, "invalid_request", d)
    }
    /// 401 `invalid_client`.
    pub fn invalid_client(d: impl Into<String>) -> Reject {
        Reject::new(401, "invalid_client", d)
    }
    /// 400 `invalid_grant`.
    pub fn invalid_grant(d: impl Into<String>) -> Reject {
        Reject::new(400, "invalid_grant", d)
    }
    /// 400 `invalid_scope`.
    pub fn invalid_scope(d: impl Into<String>) -> Reject {
        Reject::new(400, "invalid_scope", d)
    }
    /// 400 `invalid_target` (RFC 8693 §2.2.2): an audience or resource it will not serve.
    pub fn invalid_target(d: impl Into<String>) -> Reject {
        Reject::new(400, "invalid_target", d)
    }
    /// 400 `unsupported_grant_type`.
    pub fn unsupported_grant_type(d: impl Into<String>) -> Reject {
        Reject::new(400, "unsupported_grant_type", d)
    }
    /// 413 `invalid_request`: the body is over [`MAX_BODY`].
    pub fn too_large() -> Reject {
        Reject::new(
            413,
            "invalid_request",
            format!("request body over {MAX_BODY} bytes"),
        )
    }
    /// The same error, with the Basic challenge when `tried_basic`.
    pub fn challenge(mut self, tried_basic: bool) -> Reject {
        self.basic_challenge = tried_basic && self.status == 401;
        self
    }
}

/// Checks the `Content-Type` is `application/x-www-form-urlencoded`, allowing only a `charset`
/// parameter, and only UTF-8 (RFC 6749 §4.4.2 and appendix B).
pub(crate) fn check_content_type(value: Option<&str>) -> Result<(), Reject> {
    let Some(value) = value else {
        return Err(Reject::invalid_request(
            "Content-Type must be application/x-www-form-urlencoded (none given)",
        ));
    };
    let mut parts = value.split(';');
    let media = parts.next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(Reject::invalid_request(format!(
            "Content-Type must be application/x-www-form-urlencoded, not {media:?}"
        )));
    }
    for param in parts {
        let (name, val) = param.split_once('=').unwrap_or((param, ""));
        let val = val.trim().trim_matches('"');
        if !name.trim().eq_ignore_ascii_case("charset") {
            return Err(Reject::invalid_request(format!(
                "unexpected Content-Type parameter {:?}",
                name.trim()
            )));
        }
        if !val.eq_ignore_ascii_case("utf-8") {
            return Err(Reject::invalid_request(format!(
                "unsupported charset {val:?}; use UTF-8"
            )));
        }
    }
    Ok(())
}

/// The form parameters, with empty ones dropped ("treated as if they were omitted") and repeated
/// ones refused ("MUST NOT be included more than once"), RFC 6749 §3.2.
pub(crate) fn parse_form(body: &[u8]) -> Result<BTreeMap<String, String>, Reject> {
    if std::str::from_utf8(body).is_err() {
        return Err(Reject::invalid_request("the form body is not UTF-8"));
    }
    let mut form = BTreeMap::new();
    for (k, v) in url::form_urlencoded::parse(body) {
        if v.is_empty() {
            continue;
        }
        if form.insert(k.to_string(), v.to_string()).is_some() {
            return Err(Reject::invalid_request(format!(
                "parameter {k:?} is included more than once"
            )));
        }
    }
    Ok(form)
}

/// Every `(name, value)` pair of a body declared a form (by `content_type`) as sent, for the
/// request log; none for another body.
#[cfg(feature = "test-provider")]
pub(crate) fn form_pairs(
    content_type: Option<&hyper::header::HeaderValue>,
    body: &[u8],
) -> Vec<(String, String)> {
    let is_form = content_type
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| check_content_type(Some(v)).is_ok());
    if !is_form {
        return Vec::new();
    }
    url::form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Decodes one `application/x-www-form-urlencoded` value: `+` is a space, `%XX` a byte.
fn form_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The client id and secret of an `Authorization: Basic` value, each form-urlencoded before
/// base64 as RFC 6749 §2.3.1 requires. `None` when the header is not Basic at all.
pub(crate) fn parse_basic(header: &str) -> Option<Result<(String, Secret), Reject>> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let malformed = || Reject::invalid_client("malformed HTTP Basic credentials").challenge(true);
    let decoded = match base64::engine::general_purpose::STANDARD.decode(rest.trim()) {
        Ok(d) => zeroize::Zeroizing::new(d),
        Err(_) => return Some(Err(malformed())),
    };
    let Ok(text) = std::str::from_utf8(&decoded) else {
        return Some(Err(malformed()));
    };
    let Some((id, secret)) = text.split_once(':') else {
        return Some(Err(malformed()));
    };
    match (form_decode(id), form_decode(secret)) {
        (Some(id), Some(secret)) if !id.is_empty() => Some(Ok((id, Secret::new(secret)))),
        _ => Some(Err(malformed())),
    }
}

/// The client authentication a request used (RFC 6749 §2.3; RFC 7523 §2.2).
#[derive(Debug, PartialEq)]
pub(crate) enum Presented {
    /// `Authorization: Basic` (client_secret_basic).
    Basic { client_id: String, secret: Secret },
    /// `client_id` and `client_secret` in the body (client_secret_post).
    Post { client_id: String, secret: Secret },
    /// `client_assertion` of [`CLIENT_ASSERTION_TYPE`] (client_secret_jwt or private_key_jwt).
    Assertion {
        client_id: Option<String>,
        assertion: Secret,
    },
    /// No authentication: a public client, or the jwt-bearer grant whose assertion names it.
    None { client_id: Option<String> },
}

impl Presented {
    /// Whether the client tried HTTP Basic (so a 401 carries the Basic challenge).
    pub fn tried_basic(&self) -> bool {
        matches!(self, Presented::Basic { .. })
    }
}

/// Which client authentication the request used. More than one method is refused
/// (RFC 6749 §2.3: "MUST NOT use more than one authentication method in each request").
pub(crate) fn presented(
    authorization: Option<&str>,
    form: &BTreeMap<String, String>,
) -> Result<Presented, Reject> {
    let basic = match authorization.map(parse_basic) {
        None => None,
        Some(None) => {
            return Err(Reject::invalid_request(
                "the Authorization header of a token request must use the Basic scheme",
            ));
        }
        Some(Some(r)) => Some(r?),
    };
    let form_id = form.get("client_id").cloned();
    let secret = form.get("client_secret");
    let assertion = form.get("client_assertion");
    let methods = [
        basic.is_some().then_some("HTTP Basic"),
        secret.is_some().then_some("client_secret in the body"),
        assertion.is_some().then_some("client_assertion"),
    ];
    let used: Vec<&str> = methods.into_iter().flatten().collect();
    if used.len() > 1 {
        return Err(Reject::invalid_request(format!(
            "more than one client authentication method used: {}",
            used.join(" and ")
        )));
    }
    if assertion.is_none() && form.contains_key("client_assertion_type") {
        return Err(Reject::invalid_request(
            "client_assertion_type given without client_assertion",
        ));
    }
    if let Some((client_id, secret)) = basic {
        if form_id.as_ref().is_some_and(|f| *f != client_id) {
            return Err(Reject::invalid_request(
                "client_id in the body differs from the HTTP Basic client",
            ));
        }
        return Ok(Presented::Basic { client_id, secret });
    }
    if let Some(secret) = secret {
        let Some(client_id) = form_id else {
            return Err(Reject::invalid_request(
                "client_secret given without client_id",
            ));
        };
        return Ok(Presented::Post {
            client_id,
            secret: Secret::new(secret.as_str()),
        });
    }
    if let Some(assertion) = assertion {
        if form.get("client_assertion_type").map(String::as_str) != Some(CLIENT_ASSERTION_TYPE) {
            return Err(Reject::invalid_client(format!(
                "client_assertion_type must be {CLIENT_ASSERTION_TYPE}"
            )));
        }
        return Ok(Presented::Assertion {
            client_id: form_id,
            assertion: Secret::new(assertion.as_str()),
        });
    }
    Ok(Presented::None { client_id: form_id })
}

/// The scope tokens of a `scope` value (RFC 6749 §3.3: separated by spaces).
pub(crate) fn scope_tokens(value: Option<&str>) -> Vec<String> {
    value
        .map(|v| {
            v.split(' ')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn basic(id: &str, secret: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
        )
    }

    #[test]
    fn content_types() {
        let table: [(Option<&str>, bool); 9] = [
            (Some("application/x-www-form-urlencoded"), true),
            (Some("Application/X-WWW-Form-Urlencoded"), true),
            (
                Some("application/x-www-form-urlencoded; charset=UTF-8"),
                true,
            ),
            (
                Some("application/x-www-form-urlencoded;charset=\"utf-8\""),
                true,
            ),
            (
                Some("application/x-www-form-urlencoded; charset=latin1"),
                false,
            ),
            (Some("application/x-www-form-urlencoded; boundary=x"), false),
            (Some("application/json"), false),
            (Some("multipart/form-data"), false),
            (None, false),
        ];
        for (ct, ok) in table {
            assert_eq!(check_content_type(ct).is_ok(), ok, "{ct:?}");
        }
    }

    #[test]
    fn forms_drop_empty_values_and_refuse_repeats() {
        let f = parse_form(b"grant_type=client_credentials&scope=&a=b+c%2B").unwrap();
        assert_eq!(f.get("grant_type").unwrap(), "client_credentials");
        assert_eq!(f.get("a").unwrap(), "b c+");
        assert!(!f.contains_key("scope"));
        let e = parse_form(b"scope=a&scope=b").unwrap_err();
        assert_eq!(e.error, "invalid_request");
        assert!(parse_form(&[0xff, b'=', b'1']).is_err());
    }

    #[test]
    fn basic_credentials_are_form_decoded_after_base64() {
        // RFC 6749 §2.3.1: id "a b:c" and secret "p%s+" are form-encoded before base64.
        let h = basic("a+b%3Ac", "p%25s%2B");
        let (id, secret) = parse_basic(&h).unwrap().unwrap();
        assert_eq!(id, "a b:c");
        assert_eq!(secret.expose(), "p%s+");
        assert!(parse_basic("Bearer abc").is_none());
        for bad in [
            "Basic !!!",
            "Basic Zm9v",
            "Basic OnNlY3JldA==",
            "Basic YTpiJQ==",
        ] {
            let e = parse_basic(bad).unwrap().unwrap_err();
            assert_eq!(e.error, "invalid_client", "{bad}");
            assert!(e.basic_challenge);
        }
    }

    #[test]
    fn exactly_one_authentication_method() {
        let h = basic("c", "s");
        let ok = |a: Option<&str>, f: &[(&str, &str)]| presented(a, &form(f));
        assert!(matches!(
            ok(Some(&h), &[]).unwrap(),
            Presented::Basic { ref client_id, .. } if client_id == "c"
        ));
        assert!(matches!(
            ok(None, &[("client_id", "c"), ("client_secret", "s")]).unwrap(),
            Presented::Post { .. }
        ));
        let jwt_type = ("client_assertion_type", CLIENT_ASSERTION_TYPE);
        assert!(matches!(
            ok(None, &[("client_assertion", "x.y.z"), jwt_type]).unwrap(),
            Presented::Assertion { .. }
        ));
        let e = ok(None, &[("client_assertion", "x.y.z")]).unwrap_err();
        assert_eq!((e.status, e.error), (401, "invalid_client"));
        assert_eq!(
            ok(None, &[("client_id", "c")]).unwrap(),
            Presented::None {
                client_id: Some("c".into())
            }
        );
        type Case<'a> = (Option<&'a str>, &'a [(&'a str, &'a str)]);
        let refused: [Case; 6] = [
            (Some(&h), &[("client_secret", "s")]),
            (Some(&h), &[("client_assertion", "x")]),
            (None, &[("client_secret", "s"), ("client_assertion", "x")]),
            (Some(&h), &[("client_id", "other")]),
            (None, &[("client_secret", "s")]),
            (Some("Bearer t"), &[]),
        ];
        for (a, f) in refused {
            let e = ok(a, f).unwrap_err();
            assert_eq!((e.status, e.error), (400, "invalid_request"), "{a:?} {f:?}");
        }
    }

    #[test]
    fn scope_is_space_separated() {
        assert_eq!(scope_tokens(Some("a  b c")), vec!["a", "b", "c"]);
        assert!(scope_tokens(None).is_empty());
    }
}
