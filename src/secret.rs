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

    /// A short, stable name for the value: the first 8 hex digits of its SHA-256 (SPEC §8).
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
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The full hex SHA-256 of `bytes`, for comparing settings or credentials without keeping them.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a secret comes from (SPEC §3).
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
    let text = std::str::from_utf8(&bytes).map_err(|_| SecretError::NotText(path.to_path_buf()))?;
    let text = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(text);
    Ok(Secret::new(text))
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
        std::fs::write(&p, "abc\n\n").unwrap();
        assert_eq!(
            SecretSource::File(p.clone()).load().unwrap().expose(),
            "abc\n"
        );
        std::fs::write(&p, "abc\r\n").unwrap();
        assert_eq!(
            SecretSource::File(p.clone()).load().unwrap().expose(),
            "abc"
        );
        std::fs::write(&p, "\n").unwrap();
        assert!(matches!(
            SecretSource::File(p).load(),
            Err(SecretError::Empty(_))
        ));
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
}
