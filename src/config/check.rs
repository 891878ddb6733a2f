//! Pure checks of single config values: each takes what was written and says what it means or
//! why it is wrong (the message, without the location, which `load` adds).

use std::net::IpAddr;
use std::time::Duration;

use super::error::suggestion;
use super::types::{JWT_BEARER_GRANT, LogFormat, OutputFormat, TOKEN_EXCHANGE_GRANT, Timing};

/// The grants (docs/configuration.md#clientsname), before their keys are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GrantKind {
    ClientCredentials,
    Password,
    RefreshToken,
    JwtBearer,
    TokenExchange,
}

impl GrantKind {
    const ALL: [GrantKind; 5] = [
        GrantKind::ClientCredentials,
        GrantKind::Password,
        GrantKind::RefreshToken,
        GrantKind::JwtBearer,
        GrantKind::TokenExchange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GrantKind::ClientCredentials => "client_credentials",
            GrantKind::Password => "password",
            GrantKind::RefreshToken => "refresh_token",
            GrantKind::JwtBearer => "jwt_bearer",
            GrantKind::TokenExchange => "token_exchange",
        }
    }
}

/// The client authentication methods (RFC 6749 §2.3, RFC 7523 §2.2, OpenID Connect Core §9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AuthKind {
    Basic,
    Post,
    SecretJwt,
    PrivateKeyJwt,
    ClientAssertion,
    None,
    TlsClientAuth,
    SelfSignedTlsClientAuth,
}

impl AuthKind {
    const ALL: [AuthKind; 8] = [
        AuthKind::Basic,
        AuthKind::Post,
        AuthKind::SecretJwt,
        AuthKind::PrivateKeyJwt,
        AuthKind::None,
        AuthKind::ClientAssertion,
        AuthKind::TlsClientAuth,
        AuthKind::SelfSignedTlsClientAuth,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AuthKind::Basic => "client_secret_basic",
            AuthKind::Post => "client_secret_post",
            AuthKind::SecretJwt => "client_secret_jwt",
            AuthKind::PrivateKeyJwt => "private_key_jwt",
            AuthKind::ClientAssertion => "client_assertion",
            AuthKind::None => "none",
            AuthKind::TlsClientAuth => "tls_client_auth",
            AuthKind::SelfSignedTlsClientAuth => "self_signed_tls_client_auth",
        }
    }

    /// docs/oauth.md#client-authentication: the jwt_bearer assertion authenticates the client
    /// itself, so no method is needed there; everything else defaults to HTTP Basic.
    pub fn default_for(grant: GrantKind) -> AuthKind {
        match grant {
            GrantKind::JwtBearer => AuthKind::None,
            _ => AuthKind::Basic,
        }
    }

    /// Whether the method uses `client_secret`.
    pub fn uses_secret(self) -> bool {
        matches!(self, AuthKind::Basic | AuthKind::Post | AuthKind::SecretJwt)
    }

    /// Whether the method signs a client assertion (and so reads `signing_alg`,
    /// `assertion_lifetime`).
    pub fn is_jwt(self) -> bool {
        matches!(self, AuthKind::SecretJwt | AuthKind::PrivateKeyJwt)
    }

    /// Whether the client certificate is the authentication (RFC 8705 §2.1, §2.2).
    pub fn is_mtls(self) -> bool {
        matches!(
            self,
            AuthKind::TlsClientAuth | AuthKind::SelfSignedTlsClientAuth
        )
    }
}

/// The one of `all` whose `name` is `text`; else the error for an unknown `what`, with the
/// nearest name suggested.
fn parse_named<T: Copy>(
    what: &str,
    text: &str,
    all: &[T],
    name: fn(T) -> &'static str,
) -> Result<T, String> {
    all.iter()
        .copied()
        .find(|v| name(*v) == text)
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|v| name(*v)).collect();
            format!("unknown {what} \"{text}\"{}", suggestion(text, &names))
        })
}

/// `grant_type`: a short name or the RFC 7523 (jwt_bearer) or RFC 8693 (token_exchange) URN.
pub(crate) fn parse_grant(text: &str) -> Result<GrantKind, String> {
    match text {
        JWT_BEARER_GRANT => Ok(GrantKind::JwtBearer),
        TOKEN_EXCHANGE_GRANT => Ok(GrantKind::TokenExchange),
        _ => parse_named("grant_type", text, &GrantKind::ALL, GrantKind::name),
    }
}

/// `client_auth`.
pub(crate) fn parse_client_auth(text: &str) -> Result<AuthKind, String> {
    parse_named("client_auth", text, &AuthKind::ALL, AuthKind::name)
}

/// An output's `format`.
pub(crate) fn parse_output_format(text: &str) -> Result<OutputFormat, String> {
    parse_named(
        "output format",
        text,
        &OutputFormat::ALL,
        OutputFormat::name,
    )
}

/// `daemon.log_format`.
pub(crate) fn parse_log_format(text: &str) -> Result<LogFormat, String> {
    parse_named("log_format", text, &LogFormat::ALL, LogFormat::name)
}

/// Whether `name` is a client name: `[A-Za-z0-9_.-]{1,64}` (docs/configuration.md#clientsname).
pub fn is_client_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// [`is_client_name`], with the config's message.
pub(crate) fn check_client_name(name: &str) -> Result<(), String> {
    if is_client_name(name) {
        Ok(())
    } else {
        Err(format!(
            "invalid client name \"{name}\": use 1 to 64 of the characters A-Z a-z 0-9 _ . -"
        ))
    }
}

/// Whether `host` is a loopback host: `localhost`, 127.0.0.0/8 or ::1.
pub(crate) fn is_loopback(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            d == "localhost" || d.ends_with(".localhost")
        }
        url::Host::Ipv4(ip) => IpAddr::V4(*ip).is_loopback(),
        url::Host::Ipv6(ip) => IpAddr::V6(*ip).is_loopback(),
    }
}

/// `issuer` (RFC 8414 §2): a URL with the `https` scheme (or `http` to a loopback host, as for
/// `token_url`) and no query or fragment. Gives the URL the metadata is fetched from.
pub(crate) fn check_issuer(text: &str) -> Result<url::Url, String> {
    let url = check_token_url(text).map_err(|e| e.replacen("token_url", "issuer", 1))?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "issuer \"{text}\" may not have a ?query or #fragment (RFC 8414 §2)"
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("issuer may not carry user info (user:password@)".to_string());
    }
    Ok(url)
}

/// `token_url`: `https`, or `http` to a loopback host only (the secrets travel in the request).
pub(crate) fn check_token_url(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|e| format!("invalid token_url \"{text}\": {e}"))?;
    let Some(host) = url.host() else {
        return Err(format!("token_url \"{text}\" has no host"));
    };
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&host) => {}
        "http" => {
            return Err(format!(
                "token_url \"{text}\" uses plain http: use https (http is allowed only for \
                 loopback hosts: localhost, 127.0.0.0/8, ::1)"
            ));
        }
        other => return Err(format!("token_url scheme \"{other}\" is not https")),
    }
    if url.fragment().is_some() {
        return Err(format!("token_url \"{text}\" may not have a #fragment"));
    }
    Ok(url)
}

/// `env_prefix`: characters valid in an environment variable name, not starting with a digit.
pub(crate) fn check_env_prefix(prefix: &str) -> Result<(), String> {
    let ok = prefix
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !prefix.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid env_prefix \"{prefix}\": use A-Z a-z 0-9 and _, not starting with a digit"
        ))
    }
}

/// Headers tokenwarden sets itself or the HTTP stack owns.
const RESERVED_HEADERS: [&str; 4] = ["authorization", "content-type", "host", "content-length"];

/// An `extra_headers` name.
pub(crate) fn check_header_name(name: &str) -> Result<(), String> {
    if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Err(format!("invalid HTTP header name \"{name}\""));
    }
    if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "extra_headers may not set \"{name}\": tokenwarden sets it itself"
        ));
    }
    Ok(())
}

/// An `extra_headers` value (the value is not echoed: it may be a credential).
pub(crate) fn check_header_value(name: &str, value: &str) -> Result<(), String> {
    reqwest::header::HeaderValue::from_str(value)
        .map(|_| ())
        .map_err(|_| {
            format!("invalid value for HTTP header \"{name}\" (control characters or non-ASCII)")
        })
}

/// Form parameters tokenwarden sets itself (RFC 6749 §4, RFC 7521 §4.2, RFC 7523 §2).
pub(crate) const RESERVED_PARAMS: [&str; 15] = [
    "grant_type",
    "client_id",
    "client_secret",
    "assertion",
    "client_assertion",
    "client_assertion_type",
    "scope",
    "username",
    "password",
    "refresh_token",
    "subject_token",
    "subject_token_type",
    "actor_token",
    "actor_token_type",
    "requested_token_type",
];

/// An `extra_params` name.
pub(crate) fn check_param_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty extra_params name".into());
    }
    if RESERVED_PARAMS.contains(&name) {
        let hint = match name {
            "scope" => "; use the scope key",
            "client_id" => "; use the client_id key",
            _ => "",
        };
        return Err(format!(
            "extra_params may not set \"{name}\": tokenwarden sets it itself{hint}"
        ));
    }
    Ok(())
}

/// `rotate_cron`: a 6-field cron expression, seconds first (evaluated in UTC).
pub(crate) fn check_cron(expr: &str) -> Result<(), String> {
    use croner::parser::{CronParser, Seconds, Year};
    let fields = expr.split_whitespace().count();
    if fields != 6 {
        return Err(format!(
            "rotate_cron \"{expr}\" has {fields} fields; it needs 6, seconds first (\"0 0 3 * * *\" is 03:00:00 UTC daily)"
        ));
    }
    CronParser::builder()
        .seconds(Seconds::Required)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map(|_| ())
        .map_err(|e| format!("invalid rotate_cron \"{expr}\": {e}"))
}

/// `daemon.log_level`: a tracing-subscriber `EnvFilter` directive.
pub(crate) fn check_log_level(text: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(text)
        .map(|_| ())
        .map_err(|e| format!("invalid log_level \"{text}\": {e}"))
}

/// Upper bound of an assertion's lifetime: RFC 7523 §3 wants it short, providers cap it.
pub(crate) const MAX_ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);

/// An assertion lifetime: more than zero, at most one hour.
pub(crate) fn check_assertion_lifetime(d: Duration) -> Result<(), String> {
    if d.is_zero() {
        Err("an assertion lifetime must be more than zero".into())
    } else if d > MAX_ASSERTION_LIFETIME {
        Err(format!(
            "an assertion lifetime of {} is over the maximum of 1h",
            humantime::format_duration(d)
        ))
    } else {
        Ok(())
    }
}

/// The timing keys that can be wrong, in the order they are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimingKey {
    RefreshAt,
    Jitter,
    DefaultLifetime,
    RetryInitial,
    Timeout,
}

/// The rules of docs/configuration.md#defaults-and-per-client-timing on one timing:
/// 0 < refresh_at ≤ 1, 0 ≤ jitter < refresh_at, retry_initial ≤ retry_max, and no zero where
/// zero means nothing.
pub(crate) fn check_timing(t: &Timing) -> Vec<(TimingKey, String)> {
    let mut out = Vec::new();
    if !(t.refresh_at > 0.0 && t.refresh_at <= 1.0) {
        out.push((
            TimingKey::RefreshAt,
            format!(
                "refresh_at = {} must be more than 0 and at most 1",
                t.refresh_at
            ),
        ));
    }
    if !(t.jitter >= 0.0 && t.jitter < t.refresh_at) {
        out.push((
            TimingKey::Jitter,
            format!(
                "jitter = {} must be at least 0 and less than refresh_at ({})",
                t.jitter, t.refresh_at
            ),
        ));
    }
    if t.default_lifetime.is_zero() {
        out.push((
            TimingKey::DefaultLifetime,
            "default_lifetime must be more than zero".into(),
        ));
    }
    if t.retry_initial.is_zero() {
        out.push((
            TimingKey::RetryInitial,
            "retry_initial must be more than zero".into(),
        ));
    } else if t.retry_initial > t.retry_max {
        out.push((
            TimingKey::RetryInitial,
            format!(
                "retry_initial ({}) is longer than retry_max ({})",
                humantime::format_duration(t.retry_initial),
                humantime::format_duration(t.retry_max)
            ),
        ));
    }
    if t.timeout.is_zero() {
        out.push((TimingKey::Timeout, "timeout must be more than zero".into()));
    }
    out
}

/// One `[fleet] etcd` endpoint: `http://` or `https://` with a host and port, nothing else.
pub(crate) fn check_etcd_endpoint(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|e| {
        format!(
            "etcd endpoint \"{text}\" is not a URL ({e}); write it like \"https://10.0.0.1:2379\""
        )
    })?;
    let plain = matches!(url.scheme(), "http" | "https")
        && url.host_str().is_some()
        && url.port_or_known_default().is_some()
        && matches!(url.path(), "" | "/")
        && url.query().is_none()
        && url.username().is_empty()
        && url.password().is_none();
    if !plain {
        return Err(format!(
            "etcd endpoint \"{text}\" must be http:// or https:// with a host and port only, like \"https://10.0.0.1:2379\" (user and password go in [fleet] user and password)"
        ));
    }
    Ok(url)
}

/// `[fleet] prefix`: an absolute etcd key prefix of printable ASCII, no trailing `/`.
pub(crate) fn check_fleet_prefix(text: &str) -> Result<String, String> {
    let ok = text.starts_with('/')
        && text.len() > 1
        && text.len() <= 128
        && !text.ends_with('/')
        && !text.contains("//")
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_.-".contains(&b));
    if ok {
        Ok(text.to_string())
    } else {
        Err(format!(
            "prefix \"{text}\" of [fleet] must look like \"/tokenwarden/prod\": starting with /, without a trailing /, of letters, digits and /_.- (at most 128)"
        ))
    }
}

/// `[fleet] lease`: between 3 seconds and 5 minutes (etcd refuses shorter leases, and a
/// longer one leaves a dead holder's clients without one for that long).
pub(crate) fn check_fleet_lease(d: Duration) -> Result<Duration, String> {
    if (Duration::from_secs(3)..=Duration::from_secs(300)).contains(&d) && d.subsec_nanos() == 0 {
        Ok(d)
    } else {
        Err("lease of [fleet] must be whole seconds between \"3s\" and \"5m\"".to_string())
    }
}

/// `[fleet] host`: `[A-Za-z0-9_.-]{1,64}` (it is part of etcd key names).
pub(crate) fn check_fleet_host(text: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "host \"{text}\" of [fleet] must be 1 to 64 letters, digits, '_', '.' or '-'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_and_methods() {
        assert_eq!(parse_grant("password"), Ok(GrantKind::Password));
        assert_eq!(parse_grant("jwt_bearer"), Ok(GrantKind::JwtBearer));
        assert_eq!(parse_grant(JWT_BEARER_GRANT), Ok(GrantKind::JwtBearer));
        let e = parse_grant("client_credential").unwrap_err();
        assert!(e.contains("did you mean \"client_credentials\"?"), "{e}");
        assert_eq!(parse_client_auth("none"), Ok(AuthKind::None));
        let e = parse_client_auth("private_key").unwrap_err();
        assert!(e.contains("did you mean \"private_key_jwt\"?"), "{e}");
        assert_eq!(AuthKind::default_for(GrantKind::JwtBearer), AuthKind::None);
        assert_eq!(AuthKind::default_for(GrantKind::Password), AuthKind::Basic);
        assert!(
            parse_output_format("jsno")
                .unwrap_err()
                .contains("\"json\"")
        );
        assert!(parse_log_format("JSON").is_err());
    }

    #[test]
    fn client_names() {
        for ok in ["transatel", "talentsoft-user", "a.b_c-1", &"x".repeat(64)] {
            assert!(check_client_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "é", "a/b", &"x".repeat(65)] {
            assert!(check_client_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback_and_token_urls() {
        let cases = [
            ("https://api.example.com/token", true),
            ("http://127.0.0.1:8080/token", true),
            ("http://127.1.2.3/token", true),
            ("http://[::1]:80/token", true),
            ("http://localhost:9/token", true),
            ("http://LOCALHOST./token", true),
            ("http://api.example.com/token", false),
            ("http://128.0.0.1/token", false),
            ("http://[::2]/token", false),
            ("http://localhost.example.com/token", false),
            ("ftp://example.com/token", false),
            ("example.com/token", false),
            ("https://", false),
            ("https://example.com/token#frag", false),
        ];
        for (url, ok) in cases {
            assert_eq!(check_token_url(url).is_ok(), ok, "{url}");
        }
        assert!(
            check_token_url("http://example.com/")
                .unwrap_err()
                .contains("loopback")
        );
    }

    #[test]
    fn headers_params_prefixes() {
        assert!(check_header_name("X-Api-Key").is_ok());
        assert!(check_header_name("authorization").is_err());
        assert!(check_header_name("Content-Type").is_err());
        assert!(check_header_name("bad header").is_err());
        assert!(check_header_value("X", "ok value").is_ok());
        assert!(check_header_value("X", "bad\nvalue").is_err());
        assert!(check_param_name("audience2").is_ok());
        assert!(check_param_name("grant_type").is_err());
        assert!(check_param_name("client_assertion_type").is_err());
        assert!(check_env_prefix("TD_").is_ok());
        assert!(check_env_prefix("").is_ok());
        assert!(check_env_prefix("1TD").is_err());
        assert!(check_env_prefix("TD-").is_err());
    }

    #[test]
    fn cron_and_log_level() {
        assert!(check_cron("0 0 3 * * *").is_ok());
        assert!(check_cron("*/30 * * * * MON-FRI").is_ok());
        assert!(check_cron("0 3 * * *").unwrap_err().contains("6"));
        assert!(check_cron("0 0 25 * * *").is_err());
        assert!(check_cron("0 0 3 * * * 2030").is_err());
        assert!(check_log_level("info").is_ok());
        assert!(check_log_level("tokenwarden=debug,hyper=warn").is_ok());
        assert!(check_log_level("info,[").is_err());
    }

    #[test]
    fn timing_rules() {
        use TimingKey::*;
        // Each edit of the default timing, and the keys it is refused at.
        type Edit = fn(&mut Timing);
        let cases: [(Edit, &[TimingKey]); 12] = [
            (|_| {}, &[]),
            (
                |t| (t.refresh_at, t.jitter) = (0.0, 0.0),
                &[RefreshAt, Jitter],
            ),
            (|t| t.refresh_at = 1.0, &[]),
            (|t| t.refresh_at = 1.5, &[RefreshAt]),
            (|t| t.jitter = 0.75, &[Jitter]),
            (|t| t.jitter = -0.1, &[Jitter]),
            (|t| t.jitter = 0.0, &[]),
            (
                |t| t.retry_initial = Duration::from_secs(600),
                &[RetryInitial],
            ),
            (|t| t.retry_initial = Duration::ZERO, &[RetryInitial]),
            (|t| t.timeout = Duration::ZERO, &[Timeout]),
            (|t| t.default_lifetime = Duration::ZERO, &[DefaultLifetime]),
            // A zero margin or floor is allowed: it only disables the clamp.
            (
                |t| (t.refresh_margin, t.min_interval) = (Duration::ZERO, Duration::ZERO),
                &[],
            ),
        ];
        for (i, (edit, want)) in cases.into_iter().enumerate() {
            let mut t = Timing::default();
            edit(&mut t);
            let keys: Vec<TimingKey> = check_timing(&t).into_iter().map(|(k, _)| k).collect();
            assert_eq!(keys, want, "case {i}");
        }
    }

    #[test]
    fn assertion_lifetimes() {
        assert!(check_assertion_lifetime(Duration::from_secs(300)).is_ok());
        assert!(check_assertion_lifetime(Duration::from_secs(3600)).is_ok());
        assert!(check_assertion_lifetime(Duration::from_secs(3601)).is_err());
        assert!(check_assertion_lifetime(Duration::ZERO).is_err());
    }
}
