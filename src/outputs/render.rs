//! Rendering a token in each output format (docs/configuration.md#output-formats). Pure.

use zeroize::Zeroizing;

use super::OutputError;
use crate::config::{OutputConfig, OutputFormat};
use crate::token::{Token, rfc3339};

/// The bytes of `token` in `out`'s format (docs/configuration.md#output-formats). Pure.
///
/// - `token`: the access token, no trailing newline.
/// - `json`: one line `{"access_token":…,"token_type":…,"expires_at":…,"issued_at":…,"scope":…}`
///   and a newline; times RFC 3339 UTC, scope one space-separated string.
/// - `env`: `ACCESS_TOKEN=`, `TOKEN_TYPE=`, `TOKEN_EXPIRES_AT=` lines (each name prefixed with
///   `env_prefix`), values quoted for systemd's `EnvironmentFile=` parser when they need it.
/// - `header`: `Authorization: TYPE TOKEN` and a newline (`Bearer` spelled so for any case).
///
/// A token or token type holding a control character is refused rather than written into a
/// broken file.
pub fn render(out: &OutputConfig, token: &Token) -> Result<Zeroizing<Vec<u8>>, OutputError> {
    let access = token.access_token.expose();
    let token_type = if token.token_type.eq_ignore_ascii_case("bearer") {
        "Bearer"
    } else {
        token.token_type.as_str()
    };
    for (field, value) in [("access token", access), ("token type", token_type)] {
        if value.chars().any(char::is_control) {
            return Err(OutputError::UnsafeToken {
                path: out.path.clone(),
                field,
            });
        }
    }
    let prefix = &out.env_prefix;
    if out.format == OutputFormat::Env
        && !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(OutputError::BadEnvPrefix {
            path: out.path.clone(),
            prefix: prefix.clone(),
        });
    }

    // Room for everything even fully escaped, so the buffer never reallocates and leaves an
    // un-zeroed copy of the token behind.
    let scope_len: usize = token.scope.iter().map(|s| s.len() + 1).sum();
    let capacity = 256 + prefix.len() * 3 + 2 * access.len() + 6 * (token_type.len() + scope_len);
    let mut buf = Zeroizing::new(Vec::with_capacity(capacity));
    match out.format {
        OutputFormat::Token => buf.extend_from_slice(access.as_bytes()),
        OutputFormat::Json => {
            let (expires, issued, scope) = (
                rfc3339(token.expires_at),
                rfc3339(token.issued_at),
                token.scope_string(),
            );
            let fields = [
                ("access_token", access),
                ("token_type", token_type),
                ("expires_at", expires.as_str()),
                ("issued_at", issued.as_str()),
                ("scope", scope.as_str()),
            ];
            buf.push(b'{');
            for (i, (name, value)) in fields.into_iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                json_string(&mut buf, name);
                buf.push(b':');
                json_string(&mut buf, value);
            }
            buf.extend_from_slice(b"}\n");
        }
        OutputFormat::Env => {
            let expires = rfc3339(token.expires_at);
            for (name, value) in [
                ("ACCESS_TOKEN", access),
                ("TOKEN_TYPE", token_type),
                ("TOKEN_EXPIRES_AT", expires.as_str()),
            ] {
                buf.extend_from_slice(prefix.as_bytes());
                buf.extend_from_slice(name.as_bytes());
                buf.push(b'=');
                env_value(&mut buf, value);
                buf.push(b'\n');
            }
        }
        OutputFormat::Header => {
            buf.extend_from_slice(b"Authorization: ");
            buf.extend_from_slice(token_type.as_bytes());
            buf.push(b' ');
            buf.extend_from_slice(access.as_bytes());
            buf.push(b'\n');
        }
    }
    Ok(buf)
}

/// Appends `s` as a JSON string (RFC 8259 §7).
fn json_string(buf: &mut Vec<u8>, s: &str) {
    buf.push(b'"');
    for c in s.chars() {
        match c {
            '"' => buf.extend_from_slice(b"\\\""),
            '\\' => buf.extend_from_slice(b"\\\\"),
            c if (c as u32) < 0x20 => {
                buf.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes())
            }
            c => {
                let mut utf8 = [0u8; 4];
                buf.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            }
        }
    }
    buf.push(b'"');
}

/// Appends `value` as systemd's `EnvironmentFile=` parser reads it back unchanged: bare when it
/// is made only of characters that parser never treats specially (what JWTs, base64 and
/// RFC 3339 times use), else in double quotes with `"`, `\`, `` ` `` and `$` backslash-escaped
/// (systemd unescapes exactly those inside double quotes; a shell reads it the same way).
fn env_value(buf: &mut Vec<u8>, value: &str) {
    let bare = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~+/=:,@%".contains(&b));
    if bare {
        buf.extend_from_slice(value.as_bytes());
        return;
    }
    buf.push(b'"');
    for b in value.bytes() {
        if matches!(b, b'"' | b'\\' | b'`' | b'$') {
            buf.push(b'\\');
        }
        buf.push(b);
    }
    buf.push(b'"');
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::secret::Secret;

    fn token(value: &str, token_type: &str) -> Token {
        Token {
            access_token: Secret::new(value),
            token_type: token_type.into(),
            issued_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_456_800),
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_460_400),
            scope: vec!["files".into(), "upload_files".into()],
        }
    }

    fn output(format: OutputFormat, env_prefix: &str) -> OutputConfig {
        OutputConfig {
            path: "/run/tw/out".into(),
            format,
            mode: 0o600,
            owner: None,
            group: None,
            on_change: Vec::new(),
            env_prefix: env_prefix.into(),
        }
    }

    #[test]
    fn every_format_byte_for_byte() {
        use OutputFormat::*;
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig-_x";
        let cases: &[(OutputFormat, &str, &str, &str, &str)] = &[
            (Token, "", jwt, "Bearer", jwt),
            (
                Json,
                "",
                jwt,
                "Bearer",
                "{\"access_token\":\"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig-_x\",\"token_type\":\"Bearer\",\"expires_at\":\"2026-11-23T19:00:00Z\",\"issued_at\":\"2026-11-23T18:00:00Z\",\"scope\":\"files upload_files\"}\n",
            ),
            (
                Env,
                "",
                jwt,
                "Bearer",
                "ACCESS_TOKEN=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig-_x\nTOKEN_TYPE=Bearer\nTOKEN_EXPIRES_AT=2026-11-23T19:00:00Z\n",
            ),
            (
                Env,
                "TD_",
                "a+b/c==",
                "MAC",
                "TD_ACCESS_TOKEN=a+b/c==\nTD_TOKEN_TYPE=MAC\nTD_TOKEN_EXPIRES_AT=2026-11-23T19:00:00Z\n",
            ),
            (
                Env,
                "X",
                "a b\"c\\d$e`f'g#h",
                "bearer",
                "XACCESS_TOKEN=\"a b\\\"c\\\\d\\$e\\`f'g#h\"\nXTOKEN_TYPE=Bearer\nXTOKEN_EXPIRES_AT=2026-11-23T19:00:00Z\n",
            ),
            (Header, "", "abc", "Bearer", "Authorization: Bearer abc\n"),
            (Header, "", "abc", "bearer", "Authorization: Bearer abc\n"),
            (Header, "", "abc", "BEARER", "Authorization: Bearer abc\n"),
            (Header, "", "abc", "DPoP", "Authorization: DPoP abc\n"),
            (Token, "TD_", "abc", "DPoP", "abc"),
        ];
        for (format, prefix, value, token_type, want) in cases {
            let got = render(&output(*format, prefix), &token(value, token_type)).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&got),
                *want,
                "{format:?} {prefix:?} {token_type:?}"
            );
        }
    }

    #[test]
    fn json_escapes_and_parses_back() {
        let mut t = token("abc", "Bearer");
        t.scope = vec!["a\"b".into(), "c\\d".into(), "é".into()];
        let got = render(&output(OutputFormat::Json, ""), &t).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&got).unwrap();
        assert_eq!(v["scope"], "a\"b c\\d é");
        assert_eq!(v["access_token"], "abc");
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 5);
    }

    #[test]
    fn control_characters_are_refused_in_every_format() {
        use OutputFormat::*;
        for format in [Token, Json, Env, Header] {
            for (value, token_type) in [
                ("a\nb", "Bearer"),
                ("a\rb", "Bearer"),
                ("a\0b", "Bearer"),
                ("ab", "Bearer\nX-Evil: 1"),
            ] {
                let e = render(&output(format, ""), &token(value, token_type)).unwrap_err();
                assert!(matches!(e, OutputError::UnsafeToken { .. }), "{format:?}");
                let msg = format!("{e} {e:?}");
                assert!(msg.contains("/run/tw/out"));
                assert!(!msg.contains("a\nb") && !msg.contains("X-Evil"));
            }
        }
        let e = render(&output(Env, "A=B"), &token("x", "Bearer")).unwrap_err();
        assert!(matches!(e, OutputError::BadEnvPrefix { .. }));
    }
}
