//! A built-in, strict OAuth 2.0 token endpoint on loopback, speaking each seed dialect of
//! docs/oauth.md#provider-styles the way the real provider does. The integration tests run
//! tokenwarden against it, and `tokenwarden demo` shows tokens rotating without any network.
//!
//! It is deliberately unforgiving, so that tokenwarden's client code is tested against
//! realistic behaviour rather than our own assumptions:
//! - only `POST` with `application/x-www-form-urlencoded` (RFC 6749 §3.2), bodies up to 64 KiB,
//!   no repeated parameters;
//! - exactly one client authentication method (RFC 6749 §2.3), Basic credentials form-decoded
//!   after base64 (§2.3.1), client assertions checked per RFC 7523 §2.2 and §3 (signature, `alg`,
//!   `kid`, `iss` = `sub` = client id, `aud` = the token URL posted to, `exp` ≤ 5 min after
//!   `iat`, `jti` never reused);
//! - grants `client_credentials` (§4.4), `password` (§4.3), `refresh_token` (§6, single use,
//!   rotated on every use, unless the client is given a reuse grace:
//!   [`RegisteredClient::refresh_reuse_grace`]; a used one presented again is taken for a
//!   stolen one and revokes every refresh token of the client, RFC 9700 §4.14.2) and
//!   jwt-bearer (RFC 7523 §2.1), each only where its dialect has it;
//! - client certificates (RFC 8705, over [`Provider::start_tls`]): `tls_client_auth` checked
//!   against the client's CA and registered subject, `self_signed_tls_client_auth` against the
//!   registered certificate's thumbprint, and every token issued over a connection with a
//!   certificate bound to it (`cnf.x5t#S256`);
//! - `scope` limited to what the client may ask for;
//! - errors as in RFC 6749 §5.2, successes as in §5.1 with `Cache-Control: no-store`.
//!
//! The tests drive it further through the `test-provider` feature (turned on for them by the
//! dev-dependency of Cargo.toml, never in the shipped binary): faults make it misbehave on
//! demand, `Provider::pause` takes it off the network (connections refused) and
//! `Provider::resume` brings it back on the same port, every request is recorded, its clock can
//! be set wrong, and what it issued can be inspected. Logs are at debug level and never carry
//! secrets or tokens.
//!
//! # Layout
//! - [`dialect`](Dialect): paths, grants and response shapes per provider.
//! - `request`: strict reading of the request and client authentication.
//! - `assertion`: JWT assertion checks.
//! - `mtls`: client certificates (RFC 8705): `tls_client_auth`, `self_signed_tls_client_auth`
//!   and the `cnf.x5t#S256` of certificate-bound tokens.
//! - `response`: the bodies and headers of its answers.
//! - `discovery`: the RFC 8414 and OpenID Connect Discovery metadata documents.
//! - `control` and `fault` (feature `test-provider`): what the tests set and read, and
//!   misbehaviour on demand.
//! - `tls` (feature `test-provider`): HTTPS with the tests' certificates, any client
//!   certificate recorded ([`Provider::start_tls`]).

#![warn(missing_docs)]

mod assertion;
#[cfg(feature = "test-provider")]
mod control;
mod dialect;
mod discovery;
mod exchange;
#[cfg(feature = "test-provider")]
mod fault;
mod mtls;
mod request;
mod response;
#[cfg(feature = "test-provider")]
mod tls;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
#[cfg(feature = "test-provider")]
use hyper::header::CONTENT_TYPE;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

pub use dialect::{Dialect, Grant, JWT_BEARER_GRANT, TalkdeskRegion};
pub use exchange::{
    EXCHANGE_PATH, ExchangeAuth, ExchangeClient, TOKEN_EXCHANGE_GRANT, TOKEN_TYPE_ACCESS_TOKEN,
    TOKEN_TYPE_ID_TOKEN, TOKEN_TYPE_JWT, TrustedIssuer,
};
#[cfg(feature = "test-provider")]
pub use fault::{Fault, HTML_ERROR_PAGE};
pub use mtls::TlsSubject;
pub use request::{CLIENT_ASSERTION_TYPE, MAX_BODY};
#[cfg(feature = "test-provider")]
pub use tls::TlsIdentity;

use crate::keys::SigningAlg;
use crate::secret::{Secret, fingerprint};
use assertion::{ClientRule, GrantRule};
use dialect::Issue;
use mtls::check_certificate;
use request::{Presented, Reject};
use response::{Body, error_response, json_response};

/// The realm of the `WWW-Authenticate: Basic` challenge.
pub const REALM: &str = "tokenwarden-provider";

/// How a registered client must authenticate (RFC 6749 §2.3; RFC 7523 §2.2). Any other method
/// is answered 401 `invalid_client`.
#[derive(Clone, Debug, PartialEq)]
pub enum ExpectedAuth {
    /// `client_secret_basic`: HTTP Basic with this secret.
    Basic {
        /// The client secret.
        secret: Secret,
    },
    /// `client_secret_post`: `client_id` and `client_secret` in the form body.
    Post {
        /// The client secret.
        secret: Secret,
    },
    /// `client_secret_jwt`: a client assertion signed with the secret (HMAC).
    SecretJwt {
        /// The client secret, the HMAC key.
        secret: Secret,
        /// The only algorithm accepted (HS256, HS384 or HS512).
        alg: SigningAlg,
    },
    /// `private_key_jwt`: a client assertion signed with the private half of this key.
    PrivateKeyJwt {
        /// The public key, PEM (SubjectPublicKeyInfo).
        public_key_pem: String,
        /// The only algorithm accepted.
        alg: SigningAlg,
        /// When set, the assertion's `kid` header must be this.
        kid: Option<String>,
    },
    /// No client authentication: a public client naming itself with `client_id`, or the
    /// jwt-bearer grant, whose assertion's `iss` names the client.
    None,
    /// `tls_client_auth` (RFC 8705 §2.1): a client certificate issued by this CA carrying this
    /// subject.
    TlsClientAuth {
        /// The subject DN or SAN the certificate must carry.
        subject: TlsSubject,
        /// The issuing CA's certificate (PEM).
        ca_pem: String,
    },
    /// `self_signed_tls_client_auth` (RFC 8705 §2.2): this very certificate.
    SelfSignedTlsClientAuth {
        /// The registered certificate's `x5t#S256`.
        thumbprint: String,
    },
}

impl ExpectedAuth {
    /// The method's name as in the config (`client_secret_basic`, …).
    pub fn method_name(&self) -> &'static str {
        match self {
            ExpectedAuth::Basic { .. } => "client_secret_basic",
            ExpectedAuth::Post { .. } => "client_secret_post",
            ExpectedAuth::SecretJwt { .. } => "client_secret_jwt",
            ExpectedAuth::PrivateKeyJwt { .. } => "private_key_jwt",
            ExpectedAuth::None => "none",
            ExpectedAuth::TlsClientAuth { .. } => "tls_client_auth",
            ExpectedAuth::SelfSignedTlsClientAuth { .. } => "self_signed_tls_client_auth",
        }
    }

    /// `self_signed_tls_client_auth` with the certificate `cert_der`.
    pub fn self_signed_tls(cert_der: &[u8]) -> ExpectedAuth {
        ExpectedAuth::SelfSignedTlsClientAuth {
            thumbprint: crate::oauth::thumbprint(cert_der),
        }
    }
}

/// How the jwt-bearer grant's assertion is checked (RFC 7523 §2.1 and §3, Talentsoft user).
#[derive(Clone, Debug, PartialEq)]
pub struct GrantAssertion {
    /// The HS256 key: the client secret.
    pub secret: Secret,
    /// The `aud` the assertion must carry.
    pub audience: String,
}

/// A client the provider knows.
#[derive(Clone, Debug, PartialEq)]
pub struct RegisteredClient {
    /// The client id.
    pub client_id: String,
    /// Its provider style: which path it posts to, which grants it may use, how answers look.
    pub dialect: Dialect,
    /// How it must authenticate.
    pub auth: ExpectedAuth,
    /// Lifetime of the access tokens it gets (`expires_in` is its whole seconds).
    pub lifetime: Duration,
    /// The scope values it may ask for; `None`: any.
    pub allowed_scopes: Option<Vec<String>>,
    /// The scope granted when the request names none.
    pub default_scope: Vec<String>,
    /// Resource owners for the password grant: user name → password.
    pub users: BTreeMap<String, Secret>,
    /// The jwt-bearer grant's assertion settings.
    pub grant_assertion: Option<GrantAssertion>,
    /// Whether it gets refresh tokens (only where its dialect has the refresh grant).
    pub refresh_tokens: bool,
    /// Leave `expires_in` out of responses (to test the JWT `exp` and `default_lifetime` paths).
    pub omit_expires_in: bool,
    /// How long a refresh token stays usable after it was rotated. `None` (the default): it
    /// dies the moment it is used, as RFC 6749 §6 allows and a strict provider does. `Some(d)`:
    /// like Okta's refresh token grace period or Auth0's reuse interval, the previous token may
    /// be presented again for `d` after its first use, and each such use is answered like any
    /// other (a new access token and a new refresh token). A client that lost the response
    /// carrying the new token (killed between the provider's rotation and its own durable save)
    /// recovers with the old one instead of falling back to its primary grant.
    pub refresh_reuse_grace: Option<Duration>,
}

impl RegisteredClient {
    /// A client of `dialect` authenticating with `auth`, with a one-hour lifetime, any scope,
    /// and the dialect's refresh-token habit.
    pub fn new(client_id: impl Into<String>, dialect: Dialect, auth: ExpectedAuth) -> Self {
        RegisteredClient {
            client_id: client_id.into(),
            dialect,
            auth,
            lifetime: Duration::from_secs(3600),
            allowed_scopes: None,
            default_scope: Vec::new(),
            users: BTreeMap::new(),
            grant_assertion: None,
            refresh_tokens: dialect.issues_refresh_tokens(),
            omit_expires_in: false,
            refresh_reuse_grace: None,
        }
    }

    /// A Transatel client: client credentials with HTTP Basic.
    pub fn transatel(client_id: impl Into<String>, secret: &str) -> Self {
        let auth = ExpectedAuth::Basic {
            secret: Secret::new(secret),
        };
        RegisteredClient::new(client_id, Dialect::Transatel, auth)
    }

    /// A Creads client: HTTP Basic, the password grant for `user`, scopes `base`, `files` and
    /// `upload_files` (`base` when none is asked for), refresh tokens.
    pub fn creads(client_id: impl Into<String>, secret: &str, user: &str, password: &str) -> Self {
        let auth = ExpectedAuth::Basic {
            secret: Secret::new(secret),
        };
        let mut c = RegisteredClient::new(client_id, Dialect::Creads, auth)
            .with_allowed_scopes(Some(&["base", "files", "upload_files"]));
        c.default_scope = vec!["base".into()];
        c.users.insert(user.into(), Secret::new(password));
        c
    }

    /// A Talentsoft application client: client credentials with `client_secret_post`.
    pub fn talentsoft_app(client_id: impl Into<String>, secret: &str) -> Self {
        let auth = ExpectedAuth::Post {
            secret: Secret::new(secret),
        };
        RegisteredClient::new(client_id, Dialect::TalentsoftApp, auth)
    }

    /// A Talentsoft user client: the jwt-bearer grant, its HS256 assertion signed with `secret`
    /// and addressed to `audience`; no other client authentication.
    pub fn talentsoft_user(client_id: impl Into<String>, secret: &str, audience: &str) -> Self {
        let mut c = RegisteredClient::new(client_id, Dialect::TalentsoftUser, ExpectedAuth::None);
        c.grant_assertion = Some(GrantAssertion {
            secret: Secret::new(secret),
            audience: audience.into(),
        });
        c
    }

    /// A Talkdesk client: client credentials with `private_key_jwt`, verified with
    /// `public_key_pem` under `alg`, with `kid` checked when given.
    pub fn talkdesk(
        client_id: impl Into<String>,
        public_key_pem: &str,
        kid: Option<&str>,
        alg: SigningAlg,
    ) -> Self {
        let auth = ExpectedAuth::PrivateKeyJwt {
            public_key_pem: public_key_pem.into(),
            alg,
            kid: kid.map(String::from),
        };
        RegisteredClient::new(client_id, Dialect::Talkdesk, auth)
    }

    /// The same client with another token lifetime.
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// The same client with a reuse grace for rotated refresh tokens (`None`: strict); see
    /// [`RegisteredClient::refresh_reuse_grace`].
    pub fn with_refresh_reuse_grace(mut self, grace: Option<Duration>) -> Self {
        self.refresh_reuse_grace = grace;
        self
    }

    /// The same client with another set of allowed scope values (`None`: any).
    pub fn with_allowed_scopes(mut self, scopes: Option<&[&str]>) -> Self {
        self.allowed_scopes = scopes.map(|s| s.iter().map(|v| v.to_string()).collect());
        self
    }

    /// The same client with another authentication method.
    pub fn with_auth(mut self, auth: ExpectedAuth) -> Self {
        self.auth = auth;
        self
    }
}

/// A request as the provider received it.
#[derive(Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// `POST`, `GET`, …
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// Every header in order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body as read (empty when it was refused for its size).
    pub body: Vec<u8>,
    /// The leaf certificate the client presented over TLS (DER), if any.
    pub client_cert: Option<Vec<u8>>,
    /// The form pairs as sent, when the body was declared `application/x-www-form-urlencoded`.
    #[cfg(feature = "test-provider")]
    pub form: Vec<(String, String)>,
    /// When the provider took it in and decided its answer (and any fault) for it.
    #[cfg(feature = "test-provider")]
    pub received_at: Instant,
}

impl RecordedRequest {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The first value of form parameter `name`.
    #[cfg(feature = "test-provider")]
    pub fn form_value(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Shows method, path, header names and form parameter names: values carry credentials.
impl fmt::Debug for RecordedRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        let mut d = f.debug_struct("RecordedRequest");
        d.field("method", &self.method)
            .field("path", &self.path)
            .field("headers", &headers)
            .field("body_len", &self.body.len())
            .field("client_cert", &self.client_cert.is_some());
        #[cfg(feature = "test-provider")]
        d.field(
            "form",
            &self
                .form
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>(),
        );
        d.finish()
    }
}

/// A handle on a running provider. Clones share it; it stops when the last handle is dropped or
/// [`Provider::shutdown`] is called.
#[derive(Clone)]
pub struct Provider {
    inner: Arc<Inner>,
}

/// The last handle's drop cancels the server.
struct Inner {
    endpoint: Arc<Endpoint>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.endpoint.cancel.cancel();
    }
}

/// What the server tasks share with the handles.
struct Endpoint {
    addr: SocketAddr,
    /// Signs Transatel's JWT access tokens and Talkdesk's id tokens.
    server_key: Secret,
    cancel: CancellationToken,
    /// The listener, which the tests can take away and give back.
    #[cfg(feature = "test-provider")]
    listening: control::Listening,
    /// HTTPS instead of HTTP ([`Provider::start_tls`]).
    #[cfg(feature = "test-provider")]
    tls: Option<tokio_rustls::TlsAcceptor>,
    ledger: Mutex<Ledger>,
}

/// The provider's memory.
#[derive(Default)]
struct Ledger {
    clients: HashMap<String, RegisteredClient>,
    /// Refresh token → what it may be exchanged for. Removed on use (RFC 6749 §6 rotation), or
    /// marked rotated and kept for the client's reuse grace.
    refresh: HashMap<String, RefreshGrant>,
    /// Refresh token → client id, for every one used up: presenting one again is reuse.
    spent_refresh: HashMap<String, String>,
    /// `kind:client id` → jti → exp of the assertions seen.
    seen_jti: HashMap<String, HashMap<String, u64>>,
    counter: u64,
    /// What the metadata documents say and where the token endpoints are.
    discovery: discovery::Published,
    /// The exchange endpoint's clients, and every token issued (what a subject is checked on).
    exchange: exchange::ExchangeLedger,
    /// What the tests set and read: faults, the requests received, the tokens issued.
    #[cfg(feature = "test-provider")]
    observed: control::Observed,
}

struct RefreshGrant {
    client_id: String,
    scope: Vec<String>,
    /// When it was first used, if it was and the client has a reuse grace.
    rotated_at: Option<Instant>,
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider")
            .field("addr", &self.inner.endpoint.addr)
            .finish()
    }
}

// === impl Provider ===

impl Provider {
    /// Starts a provider on `127.0.0.1:0`, served by tasks on the current tokio runtime.
    ///
    /// Client assertions must carry as `aud` exactly the URL the client posts to, as
    /// [`Provider::token_url`] spells it (`http://127.0.0.1:PORT/...`; `localhost` is another URL).
    pub async fn start() -> std::io::Result<Provider> {
        Provider::start_with(
            #[cfg(feature = "test-provider")]
            None,
        )
        .await
    }

    /// Starts a provider serving HTTPS with `identity` on `127.0.0.1:0` (its URLs are then
    /// `https://127.0.0.1:PORT/...`). Clients may present a certificate; the one presented is
    /// in [`RecordedRequest::client_cert`].
    #[cfg(feature = "test-provider")]
    pub async fn start_tls(identity: &TlsIdentity) -> std::io::Result<Provider> {
        Provider::start_with(Some(tls::acceptor(identity)?)).await
    }

    async fn start_with(
        #[cfg(feature = "test-provider")] tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<Provider> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server_key = Secret::new(format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        ));
        let endpoint = Arc::new(Endpoint {
            addr,
            server_key,
            cancel: CancellationToken::new(),
            #[cfg(feature = "test-provider")]
            listening: control::Listening::default(),
            #[cfg(feature = "test-provider")]
            tls,
            ledger: Mutex::new(Ledger::default()),
        });
        #[cfg(feature = "test-provider")]
        control::serve(&endpoint, listener);
        #[cfg(not(feature = "test-provider"))]
        tokio::spawn(accept_loop(
            listener,
            endpoint.clone(),
            endpoint.cancel.clone(),
        ));
        debug!(%addr, "provider: listening");
        Ok(Provider {
            inner: Arc::new(Inner { endpoint }),
        })
    }

    fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.endpoint().lock()
    }

    /// `http://127.0.0.1:PORT` (`https://` when started with [`Provider::start_tls`]).
    pub fn base_url(&self) -> String {
        self.endpoint().base_url()
    }

    /// The address the provider listens on.
    pub fn addr(&self) -> SocketAddr {
        self.endpoint().addr
    }

    /// The token URL of `dialect` (for Talkdesk, the `.com` region's).
    pub fn token_url(&self, dialect: Dialect) -> String {
        format!("{}{}", self.base_url(), dialect.path())
    }

    /// The token URL of a Talkdesk region.
    pub fn talkdesk_token_url(&self, region: TalkdeskRegion) -> String {
        format!("{}{}", self.base_url(), region.path())
    }

    /// Adds a client, or replaces the one with its id.
    pub fn register(&self, client: RegisteredClient) {
        self.ledger()
            .clients
            .insert(client.client_id.clone(), client);
    }

    /// Stops the server: no new connection is accepted and open ones are closed.
    pub fn shutdown(&self) {
        debug!(addr = %self.endpoint().addr, "provider: shutting down");
        self.endpoint().cancel.cancel();
    }
}

// === serving ===

/// Accepts connections until `serving` is cancelled (pause or shutdown); dropping the listener
/// then closes the port.
async fn accept_loop(listener: TcpListener, endpoint: Arc<Endpoint>, serving: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = serving.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(stream, endpoint.clone(), serving.clone()));
            }
            Err(e) => {
                // Out of file descriptors, say: back off a little rather than spin.
                debug!(error = %e, "provider: accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Serves one connection in its own task, so a hanging answer blocks nothing else. Closed when
/// `cancel` fires (pause or shutdown).
async fn serve_connection(stream: TcpStream, endpoint: Arc<Endpoint>, cancel: CancellationToken) {
    #[cfg(feature = "test-provider")]
    if let Some(acceptor) = endpoint.tls.clone() {
        let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream));
        let tls = tokio::select! {
            _ = cancel.cancelled() => return,
            r = handshake => match r {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(error = %e, "provider: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!("provider: TLS handshake timed out");
                    return;
                }
            },
        };
        let client_cert = tls::peer_leaf(&tls);
        return serve_io(TokioIo::new(tls), endpoint, client_cert, cancel).await;
    }
    serve_io(TokioIo::new(stream), endpoint, None, cancel).await
}

/// Serves HTTP/1.1 on one connection (plain or TLS) until it closes or `cancel` fires.
async fn serve_io<I>(
    io: I,
    endpoint: Arc<Endpoint>,
    client_cert: Option<Vec<u8>>,
    cancel: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| handle(endpoint.clone(), client_cert.clone(), req));
    let conn = http1::Builder::new().serve_connection(io, svc);
    tokio::select! {
        _ = cancel.cancelled() => {}
        r = conn => {
            if let Err(e) = r {
                debug!(error = %e, "provider: connection closed with an error");
            }
        }
    }
}

/// Answers one request: records it, applies any fault, else processes it.
async fn handle(
    endpoint: Arc<Endpoint>,
    client_cert: Option<Vec<u8>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let declared_too_big = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > MAX_BODY as u64);
    let body = if declared_too_big {
        Err(Reject::too_large())
    } else {
        match Limited::new(body, MAX_BODY).collect().await {
            Ok(c) => Ok(c.to_bytes()),
            Err(e) if e.is::<LengthLimitError>() => Err(Reject::too_large()),
            Err(e) => {
                debug!(error = %e, "provider: request body unreadable");
                return Err(std::io::Error::other("request body unreadable"));
            }
        }
    };
    let bytes = body.as_ref().map(|b| b.to_vec()).unwrap_or_default();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let recorded = RecordedRequest {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        headers,
        #[cfg(feature = "test-provider")]
        form: request::form_pairs(parts.headers.get(CONTENT_TYPE), &bytes),
        body: bytes,
        client_cert,
        #[cfg(feature = "test-provider")]
        received_at: Instant::now(),
    };
    #[cfg(feature = "test-provider")]
    if let Some(answer) = control::intercept(&endpoint, &recorded).await {
        return answer;
    }
    if let Some(answer) = discovery::answer(&endpoint, &recorded) {
        return Ok(answer);
    }
    // The exchange endpoint (None), or a dialect's token endpoint.
    let token_path = if recorded.path == EXCHANGE_PATH {
        None
    } else if let Some(path) = discovery::token_path(&endpoint, &recorded.path) {
        Some(path)
    } else {
        debug!(path = %recorded.path, "provider: no token endpoint here");
        return Ok(response::raw(
            404,
            "text/plain; charset=utf-8",
            b"Not Found".to_vec(),
        ));
    };
    let outcome = match body {
        Ok(_) => match &token_path {
            None => exchange::process(&endpoint, &recorded, unix_now()),
            Some(path) => endpoint.process(&recorded, path),
        },
        Err(reject) => Err(reject),
    };
    Ok(match outcome {
        Ok((client_id, value)) => {
            debug!(path = %recorded.path, client = %client_id, "provider: token issued");
            let r = json_response(200, &value);
            #[cfg(feature = "test-provider")]
            let r = control::shift_date(&endpoint, r);
            r
        }
        Err(reject) => {
            debug!(
                path = %recorded.path,
                status = reject.status,
                error = reject.error,
                description = %reject.description,
                "provider: request refused"
            );
            error_response(&reject)
        }
    })
}

fn unix_now() -> u64 {
    crate::token::unix_seconds(SystemTime::now())
}

// === impl Endpoint ===

impl Endpoint {
    fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn base_url(&self) -> String {
        #[cfg(feature = "test-provider")]
        if self.tls.is_some() {
            return format!("https://{}", self.addr);
        }
        format!("http://{}", self.addr)
    }

    /// The strict token endpoint: the client id and the response body, or the OAuth error.
    /// `token_path` is the dialect's own path (`req.path` unless the endpoints were moved).
    fn process(&self, req: &RecordedRequest, token_path: &str) -> Result<(String, Value), Reject> {
        let dialects = dialect::dialects_at(token_path);
        if req.method != "POST" {
            return Err(Reject::invalid_request(format!(
                "the token endpoint takes only POST, not {} (RFC 6749 §3.2)",
                req.method
            )));
        }
        request::check_content_type(req.header("content-type"))?;
        let form = request::parse_form(&req.body)?;
        let presented = request::presented(req.header("authorization"), &form)?;
        let tried_basic = presented.tried_basic();
        let Some(grant_type) = form.get("grant_type") else {
            return Err(Reject::invalid_request("grant_type is missing"));
        };
        let now = unix_now();
        let token_url = format!("{}{}", self.base_url(), req.path);
        let mut st = self.lock();
        let client_cert = req.client_cert.as_deref();
        let client = st
            .authenticate(&presented, dialects, &form, grant_type, &token_url, now)
            .and_then(|c| check_certificate(c, client_cert, now))
            .map_err(|r| r.challenge(tried_basic))?;
        let Some(grant) = Grant::parse(grant_type).filter(|g| client.dialect.grants().contains(g))
        else {
            return Err(Reject::unsupported_grant_type(format!(
                "grant_type {grant_type:?} is not supported here"
            )));
        };
        let requested = request::scope_tokens(form.get("scope").map(String::as_str));
        if let Some(allowed) = &client.allowed_scopes {
            let bad: Vec<&str> = requested
                .iter()
                .filter(|s| !allowed.contains(s))
                .map(String::as_str)
                .collect();
            if !bad.is_empty() {
                return Err(Reject::invalid_scope(format!(
                    "scope not allowed for this client: {}",
                    bad.join(" ")
                )));
            }
        }
        let or_default = |requested: Vec<String>| {
            if requested.is_empty() {
                client.default_scope.clone()
            } else {
                requested
            }
        };
        let scope = match grant {
            Grant::ClientCredentials => or_default(requested),
            Grant::Password => {
                let (Some(user), Some(password)) = (form.get("username"), form.get("password"))
                else {
                    return Err(Reject::invalid_request(
                        "the password grant needs username and password (RFC 6749 §4.3.2)",
                    ));
                };
                match client.users.get(user) {
                    Some(p) if p.expose() == password => or_default(requested),
                    _ => return Err(Reject::invalid_grant("wrong username or password")),
                }
            }
            Grant::RefreshToken => {
                st.redeem_refresh(&client, form.get("refresh_token"), requested)?
            }
            Grant::JwtBearer => {
                let Some(jwt) = form.get("assertion") else {
                    return Err(Reject::invalid_request(
                        "the jwt-bearer grant needs an assertion (RFC 7523 §2.1)",
                    ));
                };
                let Some(settings) = &client.grant_assertion else {
                    return Err(Reject::invalid_grant(
                        "no assertion settings for this client",
                    ));
                };
                let rule = GrantRule {
                    client_id: &client.client_id,
                    secret: &settings.secret,
                    audience: &settings.audience,
                };
                let checked = assertion::check_grant_assertion(jwt, &rule, now)
                    .map_err(Reject::invalid_grant)?;
                if !st.remember_jti("grant", &client.client_id, &checked, now) {
                    return Err(Reject::invalid_grant(
                        "assertion jti was already used (replay)",
                    ));
                }
                or_default(requested)
            }
        };
        let cnf = mtls::confirmation(client_cert);
        let issue = st.issue(self, &client, scope, now, cnf);
        Ok((
            client.client_id.clone(),
            dialect::token_body(client.dialect, &issue),
        ))
    }
}

// === impl Ledger ===

impl Ledger {
    fn find(&self, client_id: &str, dialects: &[Dialect]) -> Result<RegisteredClient, Reject> {
        self.clients
            .get(client_id)
            .filter(|c| dialects.contains(&c.dialect))
            .cloned()
            .ok_or_else(|| Reject::invalid_client("unknown client"))
    }

    /// Client authentication (RFC 6749 §2.3, RFC 7523 §2.2): the client, or 401 `invalid_client`.
    fn authenticate(
        &mut self,
        presented: &Presented,
        dialects: &[Dialect],
        form: &BTreeMap<String, String>,
        grant_type: &str,
        token_url: &str,
        now: u64,
    ) -> Result<RegisteredClient, Reject> {
        let wrong_method = |c: &RegisteredClient, used: &str| {
            Reject::invalid_client(format!(
                "this client must use {}, not {used}",
                c.auth.method_name()
            ))
        };
        match presented {
            Presented::Basic { client_id, secret } | Presented::Post { client_id, secret } => {
                let c = self.find(client_id, dialects)?;
                let expected = match (&c.auth, presented) {
                    (ExpectedAuth::Basic { secret }, Presented::Basic { .. })
                    | (ExpectedAuth::Post { secret }, Presented::Post { .. }) => secret,
                    (_, Presented::Basic { .. }) => {
                        return Err(wrong_method(&c, "client_secret_basic"));
                    }
                    _ => return Err(wrong_method(&c, "client_secret_post")),
                };
                if expected != secret {
                    return Err(Reject::invalid_client("wrong client secret"));
                }
                Ok(c)
            }
            Presented::Assertion {
                client_id,
                assertion,
            } => {
                let id = client_id
                    .clone()
                    .or_else(|| assertion::unverified_issuer(assertion.expose()))
                    .ok_or_else(|| {
                        Reject::invalid_client(
                            "client_assertion names no client (no client_id, no iss)",
                        )
                    })?;
                let c = self.find(&id, dialects)?;
                let (material, alg, kid) = match &c.auth {
                    ExpectedAuth::SecretJwt { secret, alg } => (secret.expose(), *alg, None),
                    ExpectedAuth::PrivateKeyJwt {
                        public_key_pem,
                        alg,
                        kid,
                    } => (public_key_pem.as_str(), *alg, kid.as_deref()),
                    _ => return Err(wrong_method(&c, "a client assertion")),
                };
                let key = assertion::decoding_key(alg, material).map_err(Reject::invalid_client)?;
                let rule = ClientRule {
                    client_id: &c.client_id,
                    alg,
                    kid,
                    key: &key,
                    audience: token_url,
                };
                let checked = assertion::check_client_assertion(assertion.expose(), &rule, now)
                    .map_err(Reject::invalid_client)?;
                if !self.remember_jti("client", &c.client_id, &checked, now) {
                    return Err(Reject::invalid_client(
                        "client_assertion jti was already used (replay)",
                    ));
                }
                Ok(c)
            }
            Presented::None { client_id } => {
                let id = match client_id {
                    Some(id) => id.clone(),
                    None if grant_type == JWT_BEARER_GRANT => form
                        .get("assertion")
                        .and_then(|a| assertion::unverified_issuer(a))
                        .ok_or_else(|| {
                            Reject::invalid_client(
                                "no client authentication, and the assertion names no iss",
                            )
                        })?,
                    None => return Err(Reject::invalid_client("client authentication required")),
                };
                let c = self.find(&id, dialects)?;
                match c.auth {
                    // The certificate is checked by `check_certificate`.
                    ExpectedAuth::None
                    | ExpectedAuth::TlsClientAuth { .. }
                    | ExpectedAuth::SelfSignedTlsClientAuth { .. } => Ok(c),
                    _ => Err(Reject::invalid_client(format!(
                        "client authentication required: this client must use {}",
                        c.auth.method_name()
                    ))),
                }
            }
        }
    }

    /// Notes an assertion's `jti`; false when it was seen before (a replay).
    fn remember_jti(
        &mut self,
        kind: &str,
        client_id: &str,
        checked: &assertion::Checked,
        now: u64,
    ) -> bool {
        let Some(jti) = &checked.jti else {
            return true;
        };
        let seen = self
            .seen_jti
            .entry(format!("{kind}:{client_id}"))
            .or_default();
        // An expired assertion fails its exp check anyway: its jti need not be kept.
        seen.retain(|_, exp| *exp > now);
        seen.insert(jti.clone(), checked.exp).is_none()
    }

    /// The refresh grant (RFC 6749 §6): the token is single use (or usable again within the
    /// client's reuse grace after its first use); the scope may only narrow.
    fn redeem_refresh(
        &mut self,
        client: &RegisteredClient,
        refresh_token: Option<&String>,
        requested: Vec<String>,
    ) -> Result<Vec<String>, Reject> {
        let Some(rt) = refresh_token else {
            return Err(Reject::invalid_request(
                "the refresh_token grant needs refresh_token (RFC 6749 §6)",
            ));
        };
        let now = Instant::now();
        let grace = client.refresh_reuse_grace;
        let in_grace = |at: Instant| grace.is_some_and(|g| now.duration_since(at) <= g);
        // Rotated tokens past their grace are dead: forget them.
        self.refresh
            .retain(|_, g| g.client_id != client.client_id || g.rotated_at.is_none_or(&in_grace));
        let original = match self.refresh.get(rt) {
            Some(g) if g.client_id == client.client_id => g.scope.clone(),
            Some(_) => {
                return Err(Reject::invalid_grant(
                    "the refresh token was issued to another client",
                ));
            }
            None if self.spent_refresh.get(rt) == Some(&client.client_id) => {
                // RFC 9700 §4.14.2: a used refresh token presented again may be a stolen
                // one; whoever holds the newer ones loses them too.
                self.refresh.retain(|_, g| g.client_id != client.client_id);
                #[cfg(feature = "test-provider")]
                self.observed.note_reuse(&client.client_id);
                return Err(Reject::invalid_grant(
                    "refresh token reuse detected: every refresh token of this client is revoked",
                ));
            }
            None => {
                return Err(Reject::invalid_grant(
                    "the refresh token is unknown, revoked or already used",
                ));
            }
        };
        if let Some(extra) = requested.iter().find(|s| !original.contains(s)) {
            return Err(Reject::invalid_scope(format!(
                "scope {extra} was not granted with the refresh token"
            )));
        }
        match (grace, self.refresh.get_mut(rt)) {
            // The grace runs from the first use: reusing it does not extend it.
            (Some(_), Some(g)) => {
                g.rotated_at.get_or_insert(now);
            }
            _ => {
                self.refresh.remove(rt);
                self.spent_refresh
                    .insert(rt.clone(), client.client_id.clone());
            }
        }
        Ok(if requested.is_empty() {
            original
        } else {
            requested
        })
    }

    /// Issues an access token (and a refresh token, an id token, a sid as the dialect does).
    fn issue(
        &mut self,
        endpoint: &Endpoint,
        c: &RegisteredClient,
        scope: Vec<String>,
        now: u64,
        cnf: Option<String>,
    ) -> Issue {
        self.counter += 1;
        let n = self.counter;
        let fp = fingerprint(c.client_id.as_bytes());
        let random = || uuid::Uuid::new_v4().simple().to_string();
        let expires_in = c.lifetime.as_secs();
        let opaque = format!("tw_{}_{fp}_{n:06}_{}", c.dialect.short_name(), random());
        let access_token = if c.dialect == Dialect::Transatel {
            let mut claims = json!({
                "iss": format!("{}/transatel", endpoint.base_url()),
                "sub": c.client_id,
                "aud": "transatel-api",
                "iat": now,
                "exp": now + expires_in,
                "jti": format!("{n}-{}", random()),
            });
            // RFC 8705 §3.1: bound to the certificate the request came with.
            if let Some(x5t) = &cnf {
                claims["cnf"] = json!({ "x5t#S256": x5t });
            }
            endpoint.sign(&claims).unwrap_or(opaque)
        } else {
            opaque
        };
        #[cfg(feature = "test-provider")]
        self.observed.note_issued(&access_token, c, cnf.clone());
        self.exchange
            .note_issued(&access_token, &c.client_id, now + expires_in, now);
        let refresh_token = (c.refresh_tokens && c.dialect.grants().contains(&Grant::RefreshToken))
            .then(|| {
                let rt = format!("twr_{fp}_{n:06}_{}", random());
                self.refresh.insert(
                    rt.clone(),
                    RefreshGrant {
                        client_id: c.client_id.clone(),
                        scope: scope.clone(),
                        rotated_at: None,
                    },
                );
                rt
            });
        let (id_token, sid) = if c.dialect == Dialect::Talkdesk {
            let sid = random();
            let claims = json!({
                "iss": format!("{}/talkdesk", endpoint.base_url()),
                "sub": c.client_id,
                "aud": c.client_id,
                "iat": now,
                "exp": now + expires_in,
                "sid": sid,
            });
            (endpoint.sign(&claims), Some(sid))
        } else {
            (None, None)
        };
        Issue {
            access_token,
            expires_in,
            omit_expires_in: c.omit_expires_in,
            scope,
            refresh_token,
            id_token,
            sid,
        }
    }
}

impl Endpoint {
    /// An HS256 JWT signed with the server key.
    fn sign(&self, claims: &Value) -> Option<String> {
        let key = jsonwebtoken::EncodingKey::from_secret(self.server_key.expose().as_bytes());
        match jsonwebtoken::encode(&jsonwebtoken::Header::default(), claims, &key) {
            Ok(jwt) => Some(jwt),
            Err(e) => {
                debug!(error = %e, "provider: signing a token failed");
                None
            }
        }
    }
}
