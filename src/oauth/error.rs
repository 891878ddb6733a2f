//! What can go wrong with a token request, and whether waiting helps.

use std::fmt;
use std::time::Duration;

/// A failed token request. Messages carry what the operator needs (the provider's own
/// `error` and `error_description`, the HTTP status, the first characters of an error page) and
/// never a secret: provider text is masked (every secret of the client, every value the request
/// carried, anything token-shaped) before it is cut to length.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OAuthError {
    /// The provider answered with an OAuth error response (RFC 6749 §5.2).
    #[error("{}", provider_message(.status, .error, .description.as_deref(), .uri.as_deref()))]
    Provider {
        /// HTTP status of the error response.
        status: u16,
        /// The `error` code (`invalid_client`, `invalid_grant`, …).
        error: String,
        /// `error_description`, masked, printable characters only, at most 300.
        description: Option<String>,
        /// `error_uri`.
        uri: Option<String>,
        /// `Retry-After`, when the provider sent one.
        retry_after: Option<Duration>,
    },
    /// A non-success HTTP status without an OAuth error body (an HTML page, a proxy error).
    #[error("HTTP {status} from the token endpoint{}", snippet_suffix(.snippet))]
    Http {
        status: u16,
        /// The first 200 printable characters of the masked body.
        snippet: String,
        /// `Retry-After`, when sent.
        retry_after: Option<Duration>,
    },
    /// A redirect: token requests never follow them (a moved endpoint must be configured).
    #[error("the token endpoint answered HTTP {status} redirect{}; redirects are not followed, set token_url to the final address", location_suffix(.location))]
    Redirect {
        status: u16,
        location: Option<String>,
    },
    /// The connection could not be made (refused, DNS, TLS handshake or certificate).
    #[error("cannot connect to the token endpoint: {0}")]
    Connect(String),
    /// No complete answer within `timeout`.
    #[error("token request timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The connection broke mid-request or mid-response (reset, truncated body).
    #[error("the connection broke: {0}")]
    Transport(String),
    /// A success status whose body is not a usable token response. Told by status, content
    /// type, length and what is wrong, never by the body's content: it may hold a token.
    #[error(
        "malformed token response (HTTP {status}, {}, {length} bytes): {reason}",
        .content_type.as_deref().unwrap_or("no content type")
    )]
    Malformed {
        status: u16,
        /// `Content-Type` without parameters.
        content_type: Option<String>,
        /// Length of the body in bytes.
        length: usize,
        /// What is wrong, naming fields and JSON positions, never quoting a value.
        reason: String,
    },
    /// The body was larger than the 1 MiB tokenwarden accepts.
    #[error("token response larger than {limit} bytes refused (HTTP {status})")]
    TooLarge { status: u16, limit: usize },
    /// The request could not be built (an assertion could not be signed).
    #[error("cannot build the token request: {0}")]
    Request(String),
    /// A `refresh_token`-grant client has no refresh token left that was never presented: its
    /// chain died and the configured one was used already. Only a new value helps.
    #[error(
        "supply a new refresh token: {reason}; a refresh token is never presented twice (a provider enforcing rotation revokes the whole chain on reuse), so put a new one in the {supply_in}"
    )]
    ChainEnded {
        /// What ended the chain (the provider's refusal, masked).
        reason: String,
        /// Where the configured refresh token is read from (`file /etc/…`, `environment variable …`).
        supply_in: String,
    },
    /// The token endpoint could not be discovered from the client's `issuer` (RFC 8414): the
    /// metadata could not be fetched, or was refused (another issuer, an endpoint that is not
    /// https, a body that is not metadata). `permanent` when only the operator or the provider
    /// can fix it.
    #[error("{message}")]
    Discovery { message: String, permanent: bool },

    /// A ready-made token (an assertion file, a subject token) cannot be sent: unreadable,
    /// not a JWT, expired, or the upstream client has none yet. Retried: whatever writes it may
    /// come back.
    #[error("{0}")]
    Assertion(String),
    /// Any of the above, with where and how the request was sent: every error of a token
    /// request names its endpoint, grant and client authentication method (never a secret).
    #[error("{error} ({endpoint})")]
    At {
        /// The failure itself.
        error: Box<OAuthError>,
        /// `token_url …, grant_type …, client_auth …`.
        endpoint: Box<str>,
    },
}

fn provider_message(
    status: &u16,
    error: &str,
    description: Option<&str>,
    uri: Option<&str>,
) -> String {
    let mut s = format!("provider refused the token request: {error}");
    if let Some(d) = description {
        s.push_str(&format!(": {d}"));
    }
    s.push_str(&format!(" (HTTP {status}"));
    if let Some(u) = uri {
        s.push_str(&format!(", see {u}"));
    }
    s.push(')');
    if let Some(hint) = hint(error) {
        s.push_str("; ");
        s.push_str(hint);
    }
    s
}

/// What an operator should check for each OAuth error code.
pub fn hint(error: &str) -> Option<&'static str> {
    Some(match error {
        "invalid_client" => {
            "check client_id, the client secret or key, and client_auth (the method the provider expects)"
        }
        "unauthorized_client" => "the provider does not allow this client to use this grant_type",
        "unsupported_grant_type" => "the provider does not support this grant_type",
        "invalid_scope" => "the requested scope is unknown or not allowed for this client",
        "invalid_grant" => {
            "the grant (password, refresh token or assertion) was refused: check the credentials, and the assertion's claims and clock"
        }
        "invalid_request" => {
            "the provider found the request malformed; check extra_params and the grant's settings"
        }
        _ => return None,
    })
}

fn snippet_suffix(snippet: &str) -> String {
    if snippet.is_empty() {
        String::new()
    } else {
        format!(": {snippet}")
    }
}

fn location_suffix(location: &Option<String>) -> String {
    match location {
        Some(l) => format!(" to {l}"),
        None => String::new(),
    }
}

/// How the refresher should react to an error (docs/operations.md#failures-and-retries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// May heal by itself: back off exponentially from `retry_initial` (network, timeout, 5xx,
    /// 429, a malformed answer), or wait `retry_after` when the provider said so.
    Retryable { retry_after: Option<Duration> },
    /// Will not heal without the operator (`invalid_client`, `unauthorized_client`,
    /// `unsupported_grant_type`, `invalid_scope`, other 4xx): retry only at `retry_max`.
    Permanent { retry_after: Option<Duration> },
    /// `invalid_grant`: the refresh token, password or assertion was refused. A refresh token
    /// is dead and must be forgotten; the primary grant is tried instead.
    InvalidGrant,
}

impl ErrorClass {
    /// The delay the provider asked for, if any.
    pub fn retry_after(self) -> Option<Duration> {
        match self {
            ErrorClass::Retryable { retry_after } | ErrorClass::Permanent { retry_after } => {
                retry_after
            }
            ErrorClass::InvalidGrant => None,
        }
    }
}

impl OAuthError {
    /// Adds where and how the request was sent: `token_url` as the caller may log it (without
    /// user info or query), the `grant_type`, the `client_auth` method. Once: an error that
    /// already names its endpoint is returned as it is.
    pub fn at(self, loggable_url: &str, grant: &str, client_auth: &str) -> OAuthError {
        match self {
            e @ OAuthError::At { .. } => e,
            e => OAuthError::At {
                error: Box::new(e),
                endpoint: format!(
                    "token_url {loggable_url}, grant_type {grant}, client_auth {client_auth}"
                )
                .into(),
            },
        }
    }

    /// The failure without the endpoint context [`OAuthError::at`] added.
    pub fn inner(&self) -> &OAuthError {
        match self {
            OAuthError::At { error, .. } => error.inner(),
            e => e,
        }
    }

    /// Classifies the error: the one place that decides what is worth retrying soon.
    pub fn class(&self) -> ErrorClass {
        match self.inner() {
            OAuthError::Provider {
                status,
                error,
                retry_after,
                ..
            } => match error.as_str() {
                "invalid_grant" => ErrorClass::InvalidGrant,
                "invalid_client"
                | "unauthorized_client"
                | "unsupported_grant_type"
                | "invalid_scope"
                | "access_denied" => ErrorClass::Permanent {
                    retry_after: *retry_after,
                },
                // `temporarily_unavailable`, `server_error`, `slow_down` and unknown codes: go
                // by the status.
                _ => status_class(*status, *retry_after),
            },
            OAuthError::Http {
                status,
                retry_after,
                ..
            } => status_class(*status, *retry_after),
            OAuthError::Redirect { .. }
            | OAuthError::Request(_)
            | OAuthError::ChainEnded { .. }
            | OAuthError::Discovery {
                permanent: true, ..
            } => ErrorClass::Permanent { retry_after: None },
            OAuthError::Discovery {
                permanent: false, ..
            } => ErrorClass::Retryable { retry_after: None },
            OAuthError::Connect(_)
            | OAuthError::Timeout(_)
            | OAuthError::Transport(_)
            | OAuthError::Malformed { .. }
            | OAuthError::TooLarge { .. }
            | OAuthError::Assertion(_) => ErrorClass::Retryable { retry_after: None },
            OAuthError::At { error, .. } => error.class(),
        }
    }

    /// The OAuth `error` code, when the provider sent one.
    pub fn oauth_code(&self) -> Option<&str> {
        match self.inner() {
            OAuthError::Provider { error, .. } => Some(error),
            _ => None,
        }
    }

    /// A short label for metrics and logs: the OAuth code, `http_503`, `timeout`, …
    pub fn kind(&self) -> String {
        match self.inner() {
            OAuthError::Provider { error, .. } => error.clone(),
            OAuthError::Http { status, .. } => format!("http_{status}"),
            OAuthError::Redirect { .. } => "redirect".into(),
            OAuthError::Connect(_) => "connect".into(),
            OAuthError::Timeout(_) => "timeout".into(),
            OAuthError::Transport(_) => "transport".into(),
            OAuthError::Malformed { .. } => "malformed".into(),
            OAuthError::TooLarge { .. } => "too_large".into(),
            OAuthError::Request(_) => "request".into(),
            OAuthError::ChainEnded { .. } => "chain_ended".into(),
            OAuthError::Discovery { .. } => "discovery".into(),
            OAuthError::Assertion(_) => "assertion".into(),
            OAuthError::At { error, .. } => error.kind(),
        }
    }
}

/// 5xx, 408 and 429 heal by themselves; other statuses need the operator.
fn status_class(status: u16, retry_after: Option<Duration>) -> ErrorClass {
    if status >= 500 || status == 408 || status == 429 {
        ErrorClass::Retryable { retry_after }
    } else {
        ErrorClass::Permanent { retry_after }
    }
}

/// Keeps printable characters, folds runs of whitespace into one space, and cuts at `max`
/// characters: how provider text reaches a log line.
pub fn printable(text: &str, max: usize) -> String {
    let mut out = String::new();
    let mut count = 0;
    let mut last_space = true;
    for c in text.chars() {
        if count >= max {
            break;
        }
        if c.is_whitespace() {
            if !last_space {
                out.push(' ');
                count += 1;
                last_space = true;
            }
        } else if !c.is_control() {
            out.push(c);
            count += 1;
            last_space = false;
        }
    }
    out.trim_end().to_string()
}

/// A duration for humans in messages.
pub struct Human(pub Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = Duration::from_secs(self.0.as_secs());
        if d.is_zero() {
            write!(f, "{}ms", self.0.as_millis())
        } else {
            write!(f, "{}", humantime::format_duration(d))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(status: u16, error: &str) -> OAuthError {
        OAuthError::Provider {
            status,
            error: error.into(),
            description: None,
            uri: None,
            retry_after: None,
        }
    }

    #[test]
    fn classification_table() {
        let s = Some(Duration::from_secs(7));
        let permanent = ErrorClass::Permanent { retry_after: None };
        let retry = ErrorClass::Retryable { retry_after: None };
        let http = |status, snippet: &str, retry_after| OAuthError::Http {
            status,
            snippet: snippet.into(),
            retry_after,
        };
        let cases: Vec<(OAuthError, ErrorClass)> = vec![
            (provider(401, "invalid_client"), permanent),
            (provider(400, "unauthorized_client"), permanent),
            (provider(400, "unsupported_grant_type"), permanent),
            (provider(400, "invalid_scope"), permanent),
            (provider(400, "invalid_grant"), ErrorClass::InvalidGrant),
            (provider(400, "invalid_request"), permanent),
            (provider(503, "temporarily_unavailable"), retry),
            (provider(500, "server_error"), retry),
            (http(429, "", s), ErrorClass::Retryable { retry_after: s }),
            (http(502, "<html>", None), retry),
            (http(408, "", None), retry),
            (http(404, "", None), permanent),
            (
                OAuthError::Redirect {
                    status: 302,
                    location: None,
                },
                permanent,
            ),
            (OAuthError::Connect("refused".into()), retry),
            (OAuthError::Timeout(Duration::from_secs(1)), retry),
            (OAuthError::Transport("reset".into()), retry),
            (
                OAuthError::Malformed {
                    status: 200,
                    content_type: None,
                    length: 0,
                    reason: "x".into(),
                },
                retry,
            ),
            (
                OAuthError::TooLarge {
                    status: 200,
                    limit: 1,
                },
                retry,
            ),
        ];
        for (err, want) in cases {
            assert_eq!(err.class(), want, "{err}");
        }
    }

    #[test]
    fn provider_message_shows_code_description_and_hint() {
        let e = OAuthError::Provider {
            status: 401,
            error: "invalid_client".into(),
            description: Some("Bad credentials".into()),
            uri: Some("https://docs.example/errors".into()),
            retry_after: None,
        };
        let m = e.to_string();
        assert!(
            m.contains(
                "invalid_client: Bad credentials (HTTP 401, see https://docs.example/errors)"
            ),
            "{m}"
        );
        assert!(m.contains("check client_id"), "{m}");
    }

    #[test]
    fn the_endpoint_is_named_once_and_class_and_kind_see_through_it() {
        let e = provider(401, "invalid_client")
            .at("https://idp.example/t?…", "password", "client_secret_post")
            .at("https://other.example/t", "x", "y");
        let m = e.to_string();
        assert!(
            m.ends_with(
                "(token_url https://idp.example/t?…, grant_type password, client_auth client_secret_post)"
            ),
            "{m}"
        );
        assert_eq!(m.matches("token_url").count(), 1, "{m}");
        assert_eq!(e.class(), ErrorClass::Permanent { retry_after: None });
        assert_eq!(e.kind(), "invalid_client");
        assert_eq!(e.oauth_code(), Some("invalid_client"));
        assert_eq!(e.inner(), &provider(401, "invalid_client"));
    }

    #[test]
    fn printable_folds_and_cuts() {
        assert_eq!(printable("a\n\n b\u{7}c\t", 10), "a bc");
        assert_eq!(printable(&"x".repeat(500), 200).len(), 200);
        assert_eq!(printable("  lead", 10), "lead");
    }
}
