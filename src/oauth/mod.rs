//! Talking to token endpoints: build the request for a client's grant and authentication
//! method, send it with no redirects and a body limit, and read the answer.
//!
//! - `request`: the form and headers of each grant (RFC 6749 §4.3, §4.4, §6; RFC 7523 §2.1)
//!   and each client authentication method (RFC 6749 §2.3; RFC 7523 §2.2).
//! - `response`: lenient reading and strict checking of answers (RFC 6749 §5.1, §5.2).
//! - `error`: the error type and its one classification into retryable or not.
//! - `route`: whether a request goes through a proxy (the client's `proxy`, the environment's
//!   proxy variables as curl reads them; loopback never).
//! - `discovery`: the token endpoint found from an `issuer` (RFC 8414, OpenID Connect
//!   Discovery), kept in the state directory.
//! - `mtls`: the client certificate and key of mutual TLS (RFC 8705), checked to match.
//! - `assertion_file`: ready-made JWTs read from files before each request (RFC 7521 §4.2).
//! - `exchange`: RFC 8693 token exchange, its subject read from a file or another client.

pub mod assertion_file;
pub mod discovery;
mod error;
pub mod exchange;
mod mtls;
mod request;
mod response;
mod route;
mod trace;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue};

pub use discovery::Discovery;
pub use error::{ErrorClass, Human, OAuthError, hint, printable};
pub use mtls::{CertInfo, ClientCert, EXPIRY_WARNING, cert_info, has_client_cert, thumbprint};
pub use request::{Attempt, CLIENT_ASSERTION_TYPE, PreparedRequest, basic_authorization, prepare};
pub use response::{
    Issued, MAX_BODY, MAX_CLOCK_SKEW, RequestContext, ResponseMeta, clock_skew, httpdate,
    jwt_expiry, parse_expires_in, parse_retry_after, parse_token_response,
};
pub use route::{Route, is_loopback, no_proxy_matches, route};

use crate::config::{ClientAuth, ClientConfig, Grant, ProxyUrl};
use crate::secret::{Redactor, Secret};

/// The `User-Agent` of every token request.
pub const USER_AGENT: &str = concat!("tokenwarden/", env!("CARGO_PKG_VERSION"));

/// Builds an HTTP client for direct token requests: rustls with the OS trust store (plus
/// `ca_file`), no redirects, no proxy (whatever the environment says: [`HttpClients`] decides
/// proxies per client, see [`route`]).
pub fn http_client(ca_file: Option<&Path>) -> Result<reqwest::Client, OAuthError> {
    build_http_client(ca_file, None, None).map_err(OAuthError::Request)
}

/// Checks a `ca_file` the way [`http_client`] uses it: readable, a PEM bundle of at least one
/// certificate, each one accepted as a trust anchor. The error names the file and what is wrong
/// (`tokenwarden check` reports it at the `ca_file` key).
pub fn check_ca_file(path: &Path) -> Result<(), String> {
    build_http_client(Some(path), None, None).map(drop)
}

/// Checks that TLS takes a client certificate pair as [`HttpClients`] will use it (the key type
/// is one rustls signs with, the chain parses); the error names both sources.
pub fn check_client_cert(cert: &ClientCert) -> Result<(), String> {
    // Trusting only the pair's own chain spares reading the system's trust store per client
    // (tens of ms each); the identity is checked the same way.
    let roots = cert.chain_certificates()?;
    reqwest::Client::builder()
        .tls_certs_only(roots)
        .identity(cert.identity()?)
        .build()
        .map(drop)
        .map_err(|e| {
            format!(
                "tls_client_cert {} with tls_client_key {} cannot be used for TLS: {}",
                cert.cert_source,
                cert.key_source,
                chain(&e)
            )
        })
}

fn build_http_client(
    ca_file: Option<&Path>,
    proxy: Option<&ProxyUrl>,
    cert: Option<&ClientCert>,
) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(USER_AGENT)
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(90))
        // reqwest's own reading of the proxy variables would proxy loopback too.
        .no_proxy();
    if let Some(p) = proxy {
        let proxy = reqwest::Proxy::all(p.expose().as_str())
            .map_err(|e| format!("proxy {p} cannot be used: {}", chain(&e.without_url())))?;
        builder = builder.proxy(proxy);
    }
    if let Some(cert) = cert {
        builder = builder.identity(cert.identity()?);
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
        let path = path.display();
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            format!(
                "ca_file {path} holds no usable PEM certificate: {}",
                chain(&e)
            )
        })?;
        if certs.is_empty() && pem.windows(16).any(|w| w == b"PRIVATE KEY-----") {
            return Err(format!(
                "ca_file {path} holds a private key, not a certificate: give the PEM certificate of the CA"
            ));
        }
        if certs.is_empty() {
            return Err(format!(
                "ca_file {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
            ));
        }
        builder = builder.tls_certs_merge(certs);
        // A certificate whose PEM is fine but whose content is not is refused only here.
        return builder.build().map_err(|e| {
            format!(
                "ca_file {path} holds a certificate that cannot be used: {}",
                chain(&e)
            )
        });
    }
    builder
        .build()
        .map_err(|e| format!("cannot set up HTTPS: {}", chain(&e)))
}

/// HTTP clients shared by every token client with the same `ca_file` and proxy: one connection
/// pool per trust configuration and route, so many clients of one provider reuse connections.
///
/// A client with a certificate (`tls_client_cert`) gets an HTTP client of its own, built when
/// first used and again when its certificate, key, `ca_file` or proxy change (a renewal arrives
/// with a reload), never per request, and dropped with its key when the client is removed.
#[derive(Default)]
pub struct HttpClients {
    clients: Mutex<HashMap<PoolKey, reqwest::Client>>,
    with_cert: Mutex<HashMap<String, mtls::CertPool>>,
}

/// What sets one pool apart: the `ca_file` and the proxy (`None`: direct).
type PoolKey = (Option<PathBuf>, Option<ProxyUrl>);

impl HttpClients {
    /// The HTTP client for `client`'s next request (its `ca_file`, and the proxy [`route`]
    /// picks from its `proxy` and the daemon's environment now), built on first use.
    pub fn get(&self, client: &ClientConfig) -> Result<reqwest::Client, OAuthError> {
        let proxy = match route(client, env_var)? {
            Route::Proxy { url, .. } => Some(url),
            Route::Direct(_) => None,
        };
        if let Some(cert) = &client.tls_client {
            return self.get_with_cert(client, cert, proxy);
        }
        let key = (client.ca_file.clone(), proxy);
        let mut map = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let c = build_http_client(key.0.as_deref(), key.1.as_ref(), None)
            .map_err(OAuthError::Request)?;
        map.insert(key, c.clone());
        Ok(c)
    }

    /// Drops the HTTP client `name` had with its certificate (its refresher ended: the client
    /// was removed or replaced): its key material is not kept for a client that is gone. A
    /// successor of the same name builds its own again on first use.
    pub fn forget(&self, name: &str) {
        self.with_cert
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }

    #[cfg(test)]
    pub(crate) fn with_cert_count(&self) -> usize {
        self.with_cert
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn get_with_cert(
        &self,
        client: &ClientConfig,
        cert: &ClientCert,
        proxy: Option<ProxyUrl>,
    ) -> Result<reqwest::Client, OAuthError> {
        let mut map = self
            .with_cert
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(pool) = map.get(&client.name)
            && pool.digest == cert.digest
            && pool.ca_file == client.ca_file
            && pool.proxy == proxy
        {
            return Ok(pool.client.clone());
        }
        let built = build_http_client(client.ca_file.as_deref(), proxy.as_ref(), Some(cert))
            .map_err(OAuthError::Request)?;
        tracing::debug!(
            client = %client.name,
            subject = %cert.info.subject,
            not_after = %cert.info.not_after_text(),
            "HTTP client built with the client certificate"
        );
        map.insert(
            client.name.clone(),
            mtls::CertPool {
                digest: cert.digest.clone(),
                ca_file: client.ca_file.clone(),
                proxy,
                client: built.clone(),
            },
        );
        Ok(built)
    }
}

/// A variable of the daemon's environment, when set and not empty.
pub fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Sends one token request and reads the answer.
pub async fn request_token(
    http: &reqwest::Client,
    client: &ClientConfig,
    attempt: Attempt<'_>,
) -> Result<Issued, OAuthError> {
    let grant = match attempt {
        Attempt::Refresh(_) => "refresh_token",
        Attempt::Primary => client.grant_type(),
    };
    // The one place a token request's error gets its endpoint, grant and client auth.
    exchange(http, client, attempt, grant).await.map_err(|e| {
        e.at(
            &trace::loggable_url(&client.token_url),
            grant,
            client.client_auth.method_name(),
        )
    })
}

async fn exchange(
    http: &reqwest::Client,
    client: &ClientConfig,
    attempt: Attempt<'_>,
    grant: &str,
) -> Result<Issued, OAuthError> {
    let sent_at = SystemTime::now();
    let prepared = prepare(client, attempt, sent_at)?;
    let redactor = redactor(client, &prepared);
    let timeout = client.timing.timeout;
    let route = route(client, env_var)?;
    let started = std::time::Instant::now();
    let exchange = send(http, client, &prepared, &redactor, &route, timeout);
    let result = match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(OAuthError::Timeout(timeout)),
    };
    trace::token_request(client, grant, &route, &result, started.elapsed());
    let (meta, body) = result?;
    tracing::trace!(
        client = %client.name,
        status = meta.status,
        content_type = meta.content_type.as_deref().unwrap_or("none"),
        length = body.len(),
        "token response"
    );
    let ctx = RequestContext {
        requested_scope: &client.scope,
        default_lifetime: client.timing.default_lifetime,
        sent_at,
        redactor: &redactor,
    };
    let issued = parse_token_response(&meta, &body, &ctx)?;
    if prepared.grant_type == crate::config::TOKEN_EXCHANGE_GRANT {
        exchange::check_issued(&meta, &body, &issued.token.token_type)?;
    }
    Ok(issued)
}

/// Form parameters whose values are not secret: shown in provider text as they are.
const PUBLIC_PARAMS: [&str; 10] = [
    "grant_type",
    "client_assertion_type",
    "client_id",
    "username",
    "scope",
    "audience",
    "resource",
    "subject_token_type",
    "actor_token_type",
    "requested_token_type",
];

/// Whether an extra header's value is a credential, judging by its name.
fn secret_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "auth",
        "token",
        "key",
        "secret",
        "password",
        "cookie",
        "session",
        "signature",
        "credential",
    ]
    .iter()
    .any(|w| n.contains(w))
}

/// Masks every secret `client` is configured with (whether or not this request carries it),
/// every value `prepared` carries but the public parameters, and token-shaped values.
pub fn redactor(client: &ClientConfig, prepared: &PreparedRequest) -> Redactor {
    let mut r = Redactor::new();
    match &client.grant {
        Grant::Password { password, .. } => r.add(password.value.expose()),
        Grant::RefreshToken { refresh_token } => r.add(refresh_token.value.expose()),
        Grant::JwtBearer { assertion } => r.add(assertion.key_material.expose()),
        // Read at each request: masked below as values the request carries.
        Grant::AssertionFile { .. } | Grant::TokenExchange(_) | Grant::ClientCredentials => {}
    }
    match &client.client_auth {
        ClientAuth::Basic { secret } | ClientAuth::Post { secret } => r.add(secret.value.expose()),
        ClientAuth::SecretJwt { secret, .. } => r.add(secret.value.expose()),
        ClientAuth::PrivateKeyJwt { key_material, .. } => r.add(key_material.expose()),
        ClientAuth::ClientAssertion { .. }
        | ClientAuth::None
        | ClientAuth::TlsClientAuth
        | ClientAuth::SelfSignedTlsClientAuth => {}
    }
    if let Some(cert) = &client.tls_client {
        r.add(cert.key_material.expose());
    }
    if let crate::config::ProxyConfig::Url(p) = &client.proxy
        && let Some(password) = p.password()
    {
        r.add(&password);
    }
    if let Ok(Route::Proxy { url, .. }) = route(client, env_var)
        && let Some(password) = url.password()
    {
        r.add(&password);
    }
    for (k, v) in &prepared.form {
        if !PUBLIC_PARAMS.contains(&k.as_ref()) {
            r.add(v.expose());
        }
    }
    if let Some(a) = &prepared.authorization {
        r.add_basic(a.expose());
    }
    for (k, v) in &prepared.headers {
        if secret_header(k) {
            r.add(v);
            if let Some((_, credential)) = v.split_once(' ') {
                r.add(credential);
            }
        }
    }
    r
}

async fn send(
    http: &reqwest::Client,
    client: &ClientConfig,
    prepared: &PreparedRequest,
    redactor: &Redactor,
    route: &Route,
    timeout: Duration,
) -> Result<(ResponseMeta, Vec<u8>), OAuthError> {
    let mut req = http
        .post(client.token_url.clone())
        .header(ACCEPT, "application/json")
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(prepared.body())
        .timeout(timeout);
    if let Some(auth) = &prepared.authorization {
        let mut value = HeaderValue::from_str(auth.expose()).map_err(|_| {
            OAuthError::Request("client credentials are not valid in a header".into())
        })?;
        value.set_sensitive(true);
        req = req.header(AUTHORIZATION, value);
    }
    for (k, v) in &prepared.headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| OAuthError::Request(format!("extra header name {k:?} is invalid")))?;
        let value = HeaderValue::from_str(v)
            .map_err(|_| OAuthError::Request(format!("extra header {k} has an invalid value")))?;
        req = req.header(name, value);
    }
    let mut resp = req
        .send()
        .await
        .map_err(|e| match map_reqwest(e, timeout) {
            OAuthError::Connect(m) => {
                OAuthError::Connect(format!("{route}: {}", redactor.mask(&m)))
            }
            other => other,
        })?;
    let status = resp.status().as_u16();
    let header = |name: reqwest::header::HeaderName| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_type = header(CONTENT_TYPE).map(|ct| {
        ct.split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    });
    let date = header(reqwest::header::DATE).and_then(|v| httpdate(&v));
    let retry_after =
        header(reqwest::header::RETRY_AFTER).and_then(|v| parse_retry_after(&v, SystemTime::now()));
    if (300..400).contains(&status) {
        let location =
            header(reqwest::header::LOCATION).map(|l| printable(&redactor.mask(&l), 200));
        return Err(OAuthError::Redirect { status, location });
    }
    if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(OAuthError::TooLarge {
            status,
            limit: MAX_BODY,
        });
    }
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(OAuthError::TooLarge {
                        status,
                        limit: MAX_BODY,
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                return Err(match map_reqwest(e, timeout) {
                    OAuthError::Transport(m) => OAuthError::Transport(format!(
                        "response body cut short (HTTP {status}): {m}"
                    )),
                    other => other,
                });
            }
        }
    }
    Ok((
        ResponseMeta {
            status,
            content_type,
            retry_after,
            date,
        },
        body,
    ))
}

fn map_reqwest(e: reqwest::Error, timeout: Duration) -> OAuthError {
    let e = e.without_url();
    if e.is_timeout() {
        OAuthError::Timeout(timeout)
    } else if e.is_connect() {
        OAuthError::Connect(chain(&e))
    } else {
        OAuthError::Transport(chain(&e))
    }
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let m = inner.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        source = inner.source();
    }
    s
}

/// A token got by [`acquire`], and the refresh token to keep with it.
#[derive(Debug)]
pub struct Acquired {
    pub issued: Issued,
    /// The refresh token to store: the new one if the provider rotated it, else the one used
    /// (RFC 6749 §6: the old one stays valid when no new one is issued), else none.
    pub refresh_token: Option<Secret>,
    /// The `grant_type` that produced the token.
    pub grant_type: &'static str,
    /// The `invalid_grant` that killed the stored refresh token, when the primary grant had to
    /// step in.
    pub refresh_token_refused: Option<OAuthError>,
    /// The configured bootstrap `refresh_token` has now been presented (see [`acquire`]).
    pub bootstrap_spent: bool,
}

/// A failed [`acquire`].
#[derive(Debug)]
pub struct AcquireFailure {
    pub error: OAuthError,
    /// The stored refresh token was refused (`invalid_grant`) and must be forgotten.
    pub forget_refresh_token: bool,
    /// The configured bootstrap `refresh_token` has now been presented (see [`acquire`]).
    pub bootstrap_spent: bool,
}

/// Gets a token for `client`: with the stored refresh token when there is one, falling back to
/// the client's primary grant when the provider refuses it as `invalid_grant`.
///
/// A refresh token once presented is never presented again (RFC 9700 §4.14.2: a provider
/// enforcing rotation takes a reused one for a stolen one and revokes the whole chain). So a
/// `refresh_token`-grant client does not fall back to the bootstrap token its chain started
/// from: once the provider has answered a request carrying it (`bootstrap_spent`, kept in the
/// state directory by the caller), a dead chain ends in [`OAuthError::ChainEnded`] until the
/// operator supplies a new value. Password and client-credentials clients fall back to their
/// grant, which replays nothing. Only a definitive answer spends the bootstrap: after a timeout
/// or a 5xx it is presented again, as the provider may never have seen it.
pub async fn acquire(
    http: &reqwest::Client,
    client: &ClientConfig,
    stored_refresh_token: Option<&Secret>,
    bootstrap_spent: bool,
) -> Result<Acquired, AcquireFailure> {
    let bootstrap = match &client.grant {
        Grant::RefreshToken { refresh_token } => Some(refresh_token),
        _ => None,
    };
    // A token exchange client always exchanges its subject as it is now (RFC 8693 §2.1): a
    // refresh token would keep the token of a subject that has since changed.
    let exchange = matches!(client.grant, Grant::TokenExchange(_));
    let stored_refresh_token = stored_refresh_token.filter(|_| !exchange);
    let mut refused = None;
    if let Some(rt) = stored_refresh_token {
        match request_token(http, client, Attempt::Refresh(rt)).await {
            Ok(issued) => {
                let keep = issued.refresh_token.clone().or_else(|| Some(rt.clone()));
                return Ok(Acquired {
                    issued,
                    refresh_token: keep,
                    grant_type: "refresh_token",
                    refresh_token_refused: None,
                    bootstrap_spent: bootstrap.is_some() || bootstrap_spent,
                });
            }
            Err(error) if error.class() == ErrorClass::InvalidGrant => {
                if let Some(bootstrap) = bootstrap {
                    // The chain this token belongs to started from the bootstrap: spent.
                    return Err(AcquireFailure {
                        error: OAuthError::ChainEnded {
                            reason: format!("the stored refresh token was refused: {error}"),
                            supply_in: bootstrap.source.to_string(),
                        },
                        forget_refresh_token: true,
                        bootstrap_spent: true,
                    });
                }
                refused = Some(error);
            }
            Err(error) => {
                return Err(AcquireFailure {
                    error,
                    forget_refresh_token: false,
                    bootstrap_spent,
                });
            }
        }
    }
    if let Some(bootstrap) = bootstrap
        && bootstrap_spent
    {
        return Err(AcquireFailure {
            error: OAuthError::ChainEnded {
                reason: format!(
                    "the configured refresh token (fingerprint {}) was already presented and no refresh token of its chain is left",
                    bootstrap.value.fingerprint()
                ),
                supply_in: bootstrap.source.to_string(),
            },
            forget_refresh_token: false,
            bootstrap_spent: true,
        });
    }
    match request_token(http, client, Attempt::Primary).await {
        Ok(issued) => {
            let keep = issued
                .refresh_token
                .clone()
                .filter(|_| !exchange)
                .or_else(|| bootstrap.map(|b| b.value.clone()));
            Ok(Acquired {
                issued,
                refresh_token: keep,
                grant_type: client.grant_type(),
                refresh_token_refused: refused,
                bootstrap_spent: bootstrap.is_some() || bootstrap_spent,
            })
        }
        Err(error) => {
            let answered = matches!(error.inner(), OAuthError::Provider { .. });
            match bootstrap {
                Some(b) if error.class() == ErrorClass::InvalidGrant => Err(AcquireFailure {
                    error: OAuthError::ChainEnded {
                        reason: format!("the configured refresh token was refused: {error}"),
                        supply_in: b.source.to_string(),
                    },
                    forget_refresh_token: false,
                    bootstrap_spent: true,
                }),
                _ => Err(AcquireFailure {
                    error,
                    forget_refresh_token: refused.is_some(),
                    bootstrap_spent: bootstrap_spent || (bootstrap.is_some() && answered),
                }),
            }
        }
    }
}
