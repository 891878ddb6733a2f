//! An access token as tokenwarden keeps it: the value, its type, when it was issued and when it
//! expires, and its scope. Times are wall-clock (`SystemTime`) because they are written to files
//! and compared across restarts; expiry is computed from the local time at which the request was
//! sent, so a provider's clock skew never makes a token look valid for longer than it is.

use std::time::{Duration, SystemTime};

use crate::secret::Secret;

/// A token issued by a provider (RFC 6749 §5.1). `Debug` hides the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    /// The access token itself.
    pub access_token: Secret,
    /// `Bearer` for any-case `bearer` or an absent `token_type`; otherwise as the provider said.
    pub token_type: String,
    /// Local time at which the request that produced it was sent.
    pub issued_at: SystemTime,
    /// `issued_at + expires_in` (or the JWT `exp`, or `default_lifetime`).
    pub expires_at: SystemTime,
    /// The granted scope: the response's `scope`, else the requested one (RFC 6749 §5.1).
    pub scope: Vec<String>,
}

impl Token {
    /// Short name for logs and status: the first 8 hex digits of the token's SHA-256.
    pub fn fingerprint(&self) -> String {
        self.access_token.fingerprint()
    }

    /// Whole lifetime from issue to expiry (zero if the provider gave a non-positive one).
    pub fn lifetime(&self) -> Duration {
        self.expires_at
            .duration_since(self.issued_at)
            .unwrap_or(Duration::ZERO)
    }

    /// Time left at `now`, or `None` once expired.
    pub fn remaining(&self, now: SystemTime) -> Option<Duration> {
        self.expires_at
            .duration_since(now)
            .ok()
            .filter(|d| !d.is_zero())
    }

    /// Whether the token may still be served at `now`: strictly before its expiry
    /// (docs/operations.md#expiry: an expired token is never served or reported as valid).
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        now < self.expires_at
    }

    /// The scope as one space-separated string (the `json` format of
    /// docs/configuration.md#output-formats).
    pub fn scope_string(&self) -> String {
        self.scope.join(" ")
    }
}

/// Formats a time as RFC 3339 UTC with whole seconds: `2026-11-23T18:00:00Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Seconds since the Unix epoch (0 for times before it).
pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(issued: u64, expires: u64) -> Token {
        Token {
            access_token: Secret::new("abc"),
            token_type: "Bearer".into(),
            issued_at: SystemTime::UNIX_EPOCH + Duration::from_secs(issued),
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(expires),
            scope: vec!["a".into(), "b".into()],
        }
    }

    #[test]
    fn validity_is_strictly_before_expiry() {
        let t = token(100, 200);
        let at = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        assert!(t.is_valid_at(at(199)));
        assert!(!t.is_valid_at(at(200)));
        assert!(!t.is_valid_at(at(201)));
        assert_eq!(t.remaining(at(150)), Some(Duration::from_secs(50)));
        assert_eq!(t.remaining(at(200)), None);
        assert_eq!(t.lifetime(), Duration::from_secs(100));
        assert_eq!(token(200, 100).lifetime(), Duration::ZERO);
    }

    #[test]
    fn formats() {
        let t = token(1_795_456_800, 1_795_460_400);
        assert_eq!(rfc3339(t.issued_at), "2026-11-23T18:00:00Z");
        assert_eq!(t.scope_string(), "a b");
        assert_eq!(t.fingerprint(), "ba7816bf");
        assert!(!format!("{t:?}").contains("abc"));
    }
}
