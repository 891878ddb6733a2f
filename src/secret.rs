//! Secret values and where they come from.
//!
//! Every credential tokenwarden handles (client secrets, passwords, refresh tokens, private keys,
//! access tokens) lives in a [`Secret`]: its `Debug` and `Display` print `[redacted]`, and its
//! memory is zeroed when it is dropped. The only way to read one is [`Secret::expose`], so a
//! secret reaching a log line takes a visible, greppable call.

use std::fmt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// A secret string: redacted in `Debug`/`Display`, zeroed on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a value that must never be printed.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Zeroizing::new(value.into()))
    }

    /// The secret itself. Call it only where the value goes on the wire or into a file.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A short, stable name for the value: the first 8 hex digits of its SHA-256
    /// (docs/security.md#secrets).
    pub fn fingerprint(&self) -> String {
        fingerprint(self.expose().as_bytes())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The first 8 hex digits of the SHA-256 of `bytes`: how tokens are named in logs and status.
pub fn fingerprint(bytes: &[u8]) -> String {
    hex(&sha256(bytes).as_ref()[..4])
}

/// The full hex SHA-256 of `bytes`, for comparing settings or credentials without keeping them.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(sha256(bytes).as_ref())
}

fn sha256(bytes: &[u8]) -> aws_lc_rs::digest::Digest {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What replaces a masked value in text shown to people.
pub const MASK: &str = "[redacted]";

/// Values shorter than this are not masked inside other text: masking `ab` everywhere would
/// garble messages while hiding nothing worth hiding.
const MIN_MASKED_LEN: usize = 4;

/// Masks secrets in text that came from elsewhere (a provider's error description, an HTML
/// page) before it reaches a log line, an error or a status reply.
///
/// It masks every value added to it (with the encodings a provider may echo it in: form- and
/// percent-encoded, JSON-escaped), then anything shaped like a token: a JWT, and the value of an
/// `access_token`, `refresh_token` or `id_token` field. Mask first, then cut to length: a
/// secret cut in half by a length limit is not recognised any more.
#[derive(Default, Clone)]
pub struct Redactor {
    /// Longest first, so a value containing another is masked whole.
    needles: Vec<Zeroizing<String>>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redactor({} values)", self.needles.len())
    }
}

impl Redactor {
    /// A redactor masking only token-shaped values.
    pub fn new() -> Self {
        Redactor::default()
    }

    /// Masks `value` too, and the forms it takes in a form body, a URL or a JSON string.
    pub fn add(&mut self, value: &str) {
        let form: String = url::form_urlencoded::byte_serialize(value.as_bytes()).collect();
        let percent = form.replace('+', "%20");
        let json = serde_json::to_string(value).unwrap_or_default();
        let json = json
            .strip_prefix('"')
            .and_then(|j| j.strip_suffix('"'))
            .unwrap_or_default()
            .to_string();
        for v in [value.to_string(), form, percent, json] {
            self.push(v);
        }
        // A multi-line value (a PEM key): each line alone too.
        if value.contains('\n') {
            for line in value.lines() {
                let line = line.trim();
                if !line.starts_with("-----") {
                    self.push(line.to_string());
                }
            }
        }
    }

    /// Masks an `Authorization: Basic` value (RFC 7617), its base64 part, and the decoded
    /// `id:secret` with its secret (RFC 6749 §2.3.1 form-encodes both before base64).
    pub fn add_basic(&mut self, header: &str) {
        use base64::Engine as _;
        self.add(header);
        let Some(b64) = header.strip_prefix("Basic ") else {
            return;
        };
        self.add(b64);
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
            return;
        };
        let raw = Zeroizing::new(String::from_utf8_lossy(&raw).into_owned());
        self.add(&raw);
        if let Some((_, secret)) = raw.split_once(':') {
            self.add(secret);
            self.add(&Zeroizing::new(form_decoded(secret)));
        }
    }

    fn push(&mut self, v: String) {
        if v.len() < MIN_MASKED_LEN || self.needles.iter().any(|n| **n == v) {
            return;
        }
        let at = self
            .needles
            .iter()
            .position(|n| n.len() < v.len())
            .unwrap_or(self.needles.len());
        self.needles.insert(at, Zeroizing::new(v));
    }

    /// `text` with every added value and every token-shaped value replaced by `[redacted]`.
    pub fn mask(&self, text: &str) -> String {
        let mut out = text.to_string();
        for n in &self.needles {
            if out.contains(n.as_str()) {
                out = out.replace(n.as_str(), MASK);
            }
        }
        mask_token_shapes(&out)
    }
}

/// `value` read as a form-urlencoded value (`+` a space, `%XX` a byte), up to any `&`.
pub(crate) fn form_decoded(value: &str) -> String {
    url::form_urlencoded::parse(format!("v={value}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Field names whose values are tokens wherever they appear (`name=value`, `"name": "value"`).
const TOKEN_FIELDS: [&str; 3] = ["access_token", "refresh_token", "id_token"];

/// `text` with JWTs and the values of `access_token`/`refresh_token`/`id_token` fields masked.
pub fn mask_token_shapes(text: &str) -> String {
    let text = mask_jwts(text);
    mask_token_fields(&text)
}

fn is_b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Masks every `eyJ….….…` (a JWS compact serialization whose header is a JSON object; the
/// signature may be empty, as with `alg: none`).
fn mask_jwts(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut cuts = Vec::new();
    let mut i = 0;
    while let Some(found) = text[i..].find("eyJ") {
        let start = i + found;
        let run = |from: usize| {
            let mut j = from;
            while j < bytes.len() && is_b64url(bytes[j]) {
                j += 1;
            }
            j
        };
        let header_end = run(start);
        let is_jwt = header_end - start >= 10 && bytes.get(header_end) == Some(&b'.') && {
            let payload_end = run(header_end + 1);
            payload_end - header_end > 2 && bytes.get(payload_end) == Some(&b'.')
        };
        if is_jwt {
            let payload_end = run(header_end + 1);
            let sig_end = run(payload_end + 1);
            cuts.push((start, sig_end));
            i = sig_end;
        } else {
            i = start + 3;
        }
    }
    masked(text, &cuts)
}

/// Masks the value after `access_token`, `refresh_token` or `id_token` followed by `=` or `:`
/// (quotes and spaces allowed around them), whatever the case of the name.
fn mask_token_fields(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let bytes = text.as_bytes();
    let mut cuts: Vec<(usize, usize)> = Vec::new();
    for name in TOKEN_FIELDS {
        let mut from = 0;
        while let Some(found) = lower[from..].find(name) {
            let mut j = from + found + name.len();
            from = j;
            let skip = |j: &mut usize| {
                while *j < bytes.len() && matches!(bytes[*j], b'"' | b'\'' | b' ' | b'\t') {
                    *j += 1;
                }
            };
            skip(&mut j);
            if matches!(bytes.get(j), Some(b'=' | b':')) {
                j += 1;
                skip(&mut j);
            } else if !matches!(bytes.get(j.wrapping_sub(1)), Some(b'"' | b'\'')) {
                // `the refresh_token is revoked`: a name in a sentence, no value after it;
                // `access_token "…"` quotes one.
                continue;
            }
            let start = j;
            if text[start..].starts_with(MASK) {
                continue;
            }
            while j < bytes.len()
                && !bytes[j].is_ascii_whitespace()
                && !matches!(
                    bytes[j],
                    b'"' | b'\'' | b'&' | b',' | b';' | b'}' | b']' | b')' | b'<'
                )
            {
                j += 1;
            }
            if j > start {
                cuts.push((start, j));
            }
        }
    }
    cuts.sort_unstable();
    masked(text, &cuts)
}

/// `text` with each byte range of `cuts` (sorted by start) replaced by [`MASK`]; a range that
/// starts inside one already masked is skipped.
fn masked(text: &str, cuts: &[(usize, usize)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for &(start, end) in cuts {
        if start < copied {
            continue;
        }
        out.push_str(&text[copied..start]);
        out.push_str(MASK);
        copied = end;
    }
    out.push_str(&text[copied..]);
    out
}

/// Where a secret comes from (docs/configuration.md#secrets).
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `{ file = PATH }`: the file's contents with one trailing newline trimmed.
    File(PathBuf),
    /// `{ env = NAME }`: an environment variable of the daemon.
    Env(String),
    /// `{ credential = NAME }`: a systemd credential, `$CREDENTIALS_DIRECTORY/NAME`.
    Credential(String),
    /// An inline string in the config file.
    Inline(Secret),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::File(p) => write!(f, "File({})", p.display()),
            SecretSource::Env(n) => write!(f, "Env({n})"),
            SecretSource::Credential(n) => write!(f, "Credential({n})"),
            SecretSource::Inline(_) => f.write_str("Inline([redacted])"),
        }
    }
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::File(p) => write!(f, "file {}", p.display()),
            SecretSource::Env(n) => write!(f, "environment variable {n}"),
            SecretSource::Credential(n) => write!(f, "systemd credential {n}"),
            SecretSource::Inline(_) => f.write_str("inline value"),
        }
    }
}

/// Why a secret could not be read. Messages name the source, never the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read (missing, permission denied, …).
    #[error("cannot read secret file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not UTF-8 text.
    #[error("secret file {0} is not UTF-8 text")]
    NotText(PathBuf),
    /// The environment variable is not set (or not Unicode).
    #[error("environment variable {0} is not set")]
    EnvMissing(String),
    /// `{ credential = … }` used but systemd gave the daemon no credentials directory.
    #[error(
        "systemd credential {0} asked for, but $CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit)"
    )]
    NoCredentialsDirectory(String),
    /// A credential name that would escape the credentials directory.
    #[error("systemd credential name {0:?} is not a plain file name")]
    BadCredentialName(String),
    /// The secret is empty.
    #[error("secret from {0} is empty")]
    Empty(String),
}

impl SecretSource {
    /// Reads the secret now.
    pub fn load(&self) -> Result<Secret, SecretError> {
        let value = match self {
            SecretSource::File(path) => read_secret_file(path)?,
            SecretSource::Env(name) => match std::env::var(name) {
                Ok(v) => Secret::new(v),
                Err(_) => return Err(SecretError::EnvMissing(name.clone())),
            },
            SecretSource::Credential(name) => {
                if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                    return Err(SecretError::BadCredentialName(name.clone()));
                }
                let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") else {
                    return Err(SecretError::NoCredentialsDirectory(name.clone()));
                };
                read_secret_file(&Path::new(&dir).join(name))?
            }
            SecretSource::Inline(secret) => secret.clone(),
        };
        if value.is_empty() {
            return Err(SecretError::Empty(self.to_string()));
        }
        Ok(value)
    }

    /// The file this secret is read from, if any: the daemon watches it for rotation.
    pub fn path(&self) -> Option<PathBuf> {
        match self {
            SecretSource::File(p) => Some(p.clone()),
            SecretSource::Credential(name) => {
                std::env::var_os("CREDENTIALS_DIRECTORY").map(|dir| Path::new(&dir).join(name))
            }
            _ => None,
        }
    }
}

fn read_secret_file(path: &Path) -> Result<Secret, SecretError> {
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| SecretError::File {
        path: path.to_path_buf(),
        source,
    })?);
    file_text(&bytes).ok_or_else(|| SecretError::NotText(path.to_path_buf()))
}

/// A secret file's contents (docs/configuration.md#secrets): UTF-8 text with one trailing
/// newline trimmed; `None` if it is not text.
pub(crate) fn file_text(bytes: &[u8]) -> Option<Secret> {
    let text = std::str::from_utf8(bytes).ok()?;
    let text = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(text);
    Some(Secret::new(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        let src = SecretSource::Inline(s);
        assert!(!format!("{src:?}").contains("hunter2"));
        assert!(!format!("{src}").contains("hunter2"));
    }

    #[test]
    fn fingerprint_is_8_hex_of_sha256() {
        // sha256("abc") = ba7816bf...
        assert_eq!(fingerprint(b"abc"), "ba7816bf");
        assert_eq!(Secret::new("abc").fingerprint(), "ba7816bf");
    }

    #[test]
    fn file_loses_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let load = |text: &str| {
            std::fs::write(&p, text).unwrap();
            SecretSource::File(p.clone()).load()
        };
        assert_eq!(load("abc\n\n").unwrap().expose(), "abc\n");
        assert_eq!(load("abc\r\n").unwrap().expose(), "abc");
        assert!(matches!(load("\n"), Err(SecretError::Empty(_))));
    }

    #[test]
    fn missing_sources_name_themselves() {
        let e = SecretSource::File("/nonexistent/x".into())
            .load()
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x"));
        let e = SecretSource::Env("TW_TEST_SURELY_UNSET_VAR".into())
            .load()
            .unwrap_err();
        assert!(e.to_string().contains("TW_TEST_SURELY_UNSET_VAR"));
        let e = SecretSource::Credential("../x".into()).load().unwrap_err();
        assert!(matches!(e, SecretError::BadCredentialName(_)));
    }

    #[test]
    fn redactor_masks_values_in_every_encoding() {
        let mut r = Redactor::new();
        r.add("s3cr:t/é x");
        r.add("ab");
        for shown in [
            "secret s3cr:t/é x is wrong",
            "secret s3cr%3At%2F%C3%A9+x is wrong",
            "secret s3cr%3At%2F%C3%A9%20x is wrong",
        ] {
            assert_eq!(r.mask(shown), "secret [redacted] is wrong", "{shown}");
        }
        // Too short to mask inside text.
        assert_eq!(r.mask("ab cd"), "ab cd");
    }

    #[test]
    fn redactor_masks_basic_and_its_parts() {
        use base64::Engine as _;
        let raw = "my+id:p%40ss-word";
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        let mut r = Redactor::new();
        r.add_basic(&format!("Basic {b64}"));
        for (shown, want) in [
            (format!("got Basic {b64}"), "got [redacted]"),
            (format!("got {b64}"), "got [redacted]"),
            (format!("got {raw}"), "got [redacted]"),
            ("secret p@ss-word".to_string(), "secret [redacted]"),
            ("secret p%40ss-word".to_string(), "secret [redacted]"),
        ] {
            assert_eq!(r.mask(&shown), want, "{shown}");
        }
    }

    #[test]
    fn token_shapes_are_masked() {
        let r = Redactor::new();
        let cases = [
            (
                "bad eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln here",
                "bad [redacted] here",
            ),
            (
                "unsigned eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
                "unsigned [redacted]",
            ),
            (
                "eyJ alone and eyJabc.d are not JWTs",
                "eyJ alone and eyJabc.d are not JWTs",
            ),
            ("refresh_token=abc123&x=1", "refresh_token=[redacted]&x=1"),
            (
                r#"{"Access_Token" : "tok-1", "id_token":"z"}"#,
                r#"{"Access_Token" : "[redacted]", "id_token":"[redacted]"}"#,
            ),
            (
                "refresh_token: r-1 is revoked",
                "refresh_token: [redacted] is revoked",
            ),
            (
                "the refresh_token is revoked",
                "the refresh_token is revoked",
            ),
            (
                r#"access_token "tok-2" is bad"#,
                r#"access_token "[redacted]" is bad"#,
            ),
            (
                "refresh_token=[redacted] again",
                "refresh_token=[redacted] again",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(r.mask(text), want, "{text}");
        }
    }
}
