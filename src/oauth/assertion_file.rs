//! Ready-made tokens: a client assertion (RFC 7521 §4.2, RFC 7523 §2.2), a grant assertion
//! (RFC 7523 §2.1) or an RFC 8693 subject or actor token that something else writes (a
//! Kubernetes projected service-account token, an Azure workload identity token, a SPIFFE
//! JWT-SVID). They are read again before every request, never kept: Kubernetes swaps them
//! through a `..data` symlink, and the daemon's file watcher (see `triggers`) reloads when they
//! change.
//!
//! A JWT is checked for its shape (RFC 7519 §7.2: three base64url parts, JSON header and
//! claims) and its `exp`: one past its `exp` is an error naming where it was read, and is never
//! sent. Nothing here ever shows a token's content; only its expiry.

use std::io::Read as _;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde_json::Value;

use super::error::OAuthError;
use crate::secret::{Secret, SecretSource};
use crate::token::{rfc3339, unix_seconds};

/// Largest ready-made token read (a Kubernetes token is about 1 KiB; a SPIFFE JWT-SVID a few).
pub const MAX_TOKEN_BYTES: u64 = 64 * 1024;

/// What `check` and the error messages may say about a JWT: when it expires, nothing else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JwtInfo {
    /// The `exp` claim, in Unix seconds.
    pub exp: Option<u64>,
}

impl JwtInfo {
    /// `exp` as a time.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.exp
            .map(|e| SystemTime::UNIX_EPOCH + Duration::from_secs(e))
    }

    /// The error when the JWT has expired at `now` (`key` read from `source`), else `None`.
    pub fn expired_message(
        &self,
        key: &str,
        source: &SecretSource,
        now: SystemTime,
    ) -> Option<String> {
        let exp = self.exp?;
        (exp <= unix_seconds(now)).then(|| {
            let at = self.expires_at().map(rfc3339).unwrap_or_default();
            format!(
                "{key}: the JWT in {source} expired at {at}: whatever writes it has stopped (not sent; it is read again before the next request)"
            )
        })
    }

    /// One line for `check`: where the JWT is and when it expires.
    pub fn describe(&self, key: &str, source: &SecretSource, now: SystemTime) -> String {
        match self.expires_at() {
            None => format!("{key}: {source} holds a JWT without exp"),
            Some(at) => {
                let when = match at.duration_since(now) {
                    Ok(d) => format!("in {}", super::Human(Duration::from_secs(d.as_secs()))),
                    Err(_) => "already past".to_string(),
                };
                format!(
                    "{key}: {source} holds a JWT that expires at {} ({when})",
                    rfc3339(at)
                )
            }
        }
    }
}

/// Checks that `token` is a JWT in the JWS compact form (RFC 7519 §7.2, RFC 7515 §7.1): three
/// non-empty base64url parts, a JSON object as header (with `alg`) and as claims. The error
/// says what is wrong, never quoting the token.
pub fn inspect(token: &Secret) -> Result<JwtInfo, String> {
    let text = token.expose().trim();
    let parts: Vec<&str> = text.split('.').collect();
    if parts.len() != 3 {
        return Err(format!(
            "does not hold a JWT: {} dot-separated parts, a JWT has three",
            parts.len()
        ));
    }
    let decode = |part: &str, what: &str| -> Result<Value, String> {
        if part.is_empty() {
            return Err(format!("does not hold a JWT: its {what} is empty"));
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part.trim_end_matches('='))
            .map_err(|_| format!("does not hold a JWT: its {what} is not base64url"))?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(v @ Value::Object(_)) => Ok(v),
            _ => Err(format!(
                "does not hold a JWT: its {what} is not a JSON object"
            )),
        }
    };
    let header = decode(parts[0], "header")?;
    let claims = decode(parts[1], "claims")?;
    if parts[2].is_empty() {
        return Err("holds an unsigned JWT (no signature part)".into());
    }
    if !header.get("alg").is_some_and(Value::is_string) {
        return Err("does not hold a JWT: its header has no alg".into());
    }
    let exp = match claims.get("exp") {
        None => None,
        Some(v) => Some(
            v.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f as u64)
                .ok_or("holds a JWT whose exp is not a NumericDate")?,
        ),
    };
    Ok(JwtInfo { exp })
}

/// Reads a ready-made token for `key` now. A `jwt` one must be a JWT whose `exp` (if any) is
/// still ahead. Files are read with a bound ([`MAX_TOKEN_BYTES`]).
pub fn read(
    source: &SecretSource,
    key: &str,
    jwt: bool,
    now: SystemTime,
) -> Result<Secret, OAuthError> {
    let value = match source.path() {
        Some(path) => read_bounded(&path)
            .map_err(|e| OAuthError::Assertion(format!("{key}: cannot read {source}: {e}")))?,
        None => source
            .load()
            .map_err(|e| OAuthError::Assertion(format!("{key}: {e}")))?,
    };
    if value.is_empty() {
        return Err(OAuthError::Assertion(format!("{key}: {source} is empty")));
    }
    if jwt {
        let info =
            inspect(&value).map_err(|e| OAuthError::Assertion(format!("{key}: {source} {e}")))?;
        if let Some(m) = info.expired_message(key, source, now) {
            return Err(OAuthError::Assertion(m));
        }
    }
    Ok(value)
}

/// The file's text, one trailing newline trimmed, refused past [`MAX_TOKEN_BYTES`].
fn read_bounded(path: &std::path::Path) -> Result<Secret, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = zeroize::Zeroizing::new(Vec::new());
    file.take(MAX_TOKEN_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_TOKEN_BYTES {
        return Err(format!("larger than {MAX_TOKEN_BYTES} bytes"));
    }
    crate::secret::file_text(&bytes).ok_or_else(|| "not UTF-8 text".to_string())
}

/// For `check`: one line per ready-made JWT a client reads (where, and when it expires), or
/// what is wrong with it. Never its content.
pub fn describe(config: &crate::config::Config, now: SystemTime) -> Vec<String> {
    use crate::config::{ClientAuth, Grant, Subject};
    let mut lines = Vec::new();
    for (name, c) in &config.clients {
        let mut jwts: Vec<(&str, &SecretSource)> = Vec::new();
        if let ClientAuth::ClientAssertion { source } = &c.client_auth {
            jwts.push(("client_assertion", source));
        }
        match &c.grant {
            Grant::AssertionFile { source } => jwts.push(("assertion", source)),
            Grant::TokenExchange(x) => {
                if let Subject::Source(source) = &x.subject
                    && x.subject_token_type == crate::config::TOKEN_TYPE_JWT
                {
                    jwts.push(("subject_token", source));
                }
            }
            _ => {}
        }
        for (key, source) in jwts {
            let line = match source.load() {
                Err(e) => format!("{key}: {e}"),
                Ok(value) => match inspect(&value) {
                    Ok(info) => info.describe(key, source, now),
                    Err(e) => format!("{key}: {source} {e}"),
                },
            };
            lines.push(format!("client {name}: {line}"));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(v: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
    }

    fn jwt(claims: &str) -> Secret {
        Secret::new(format!(
            "{}.{}.c2ln",
            b64(r#"{"alg":"RS256","typ":"JWT"}"#),
            b64(claims)
        ))
    }

    #[test]
    fn jwt_shapes() {
        let cases: &[(Secret, Result<Option<u64>, &str>)] = &[
            (jwt(r#"{"exp":2000000000}"#), Ok(Some(2000000000))),
            (jwt(r#"{"sub":"x"}"#), Ok(None)),
            (jwt(r#"{"exp":"soon"}"#), Err("NumericDate")),
            (Secret::new("abc"), Err("1 dot-separated parts")),
            (Secret::new("a.b.c.d"), Err("4 dot-separated parts")),
            (
                Secret::new(format!("{}..sig", b64("{}"))),
                Err("claims is empty"),
            ),
            (
                Secret::new(format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64("{}"))),
                Err("unsigned"),
            ),
            (
                Secret::new(format!("{}.{}.s", b64("[]"), b64("{}"))),
                Err("header is not a JSON object"),
            ),
            (
                Secret::new(format!("{}.{}.s", b64("{}"), b64("{}"))),
                Err("no alg"),
            ),
            (Secret::new("%%%.e30.s"), Err("not base64url")),
        ];
        for (token, want) in cases {
            match (inspect(token), want) {
                (Ok(info), Ok(exp)) => assert_eq!(info.exp, *exp),
                (Err(e), Err(w)) => assert!(e.contains(w), "{e} vs {w}"),
                (got, want) => panic!("{got:?} vs {want:?}"),
            }
        }
    }

    #[test]
    fn expired_ones_are_refused_naming_the_file_never_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let expired = jwt(r#"{"exp":1000}"#);
        std::fs::write(&path, format!("{}\n", expired.expose())).unwrap();
        let source = SecretSource::File(path.clone());
        let e = read(&source, "client_assertion", true, SystemTime::now()).unwrap_err();
        let m = e.to_string();
        assert!(m.contains(&path.display().to_string()), "{m}");
        assert!(m.contains("whatever writes it has stopped"), "{m}");
        assert!(!m.contains(expired.expose()), "{m}");
        let good = jwt(r#"{"exp":4000000000}"#);
        std::fs::write(&path, good.expose()).unwrap();
        let got = read(&source, "client_assertion", true, SystemTime::now()).unwrap();
        assert_eq!(got.expose(), good.expose());
        // Not a JWT, and too big: refused with the file named.
        std::fs::write(&path, "opaque").unwrap();
        assert!(read(&source, "assertion", true, SystemTime::now()).is_err());
        assert!(read(&source, "subject_token", false, SystemTime::now()).is_ok());
        std::fs::write(&path, vec![b'a'; MAX_TOKEN_BYTES as usize + 1]).unwrap();
        let m = read(&source, "assertion", false, SystemTime::now())
            .unwrap_err()
            .to_string();
        assert!(m.contains("larger than"), "{m}");
    }
}
