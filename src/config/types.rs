//! The checked runtime configuration: what the rest of tokenwarden reads.
//!
//! The loader (see `load`) turns the raw TOML into these types once: every default filled in,
//! every secret read, every key parsed, every user name resolved. Nothing here is optional
//! "to be filled in later": a `Config` that exists is a config that passed `check`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::keys::SigningKey;
use crate::secret::{Secret, SecretSource};

/// Default config path when neither `-c` nor `$TOKENWARDEN_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tokenwarden/tokenwarden.toml";
/// Default socket when neither the config, `-s` nor `$TOKENWARDEN_SOCKET` name one.
pub const DEFAULT_SOCKET_PATH: &str = "/run/tokenwarden/tokenwarden.sock";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tokenwarden";

/// A whole, checked configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The main config file.
    pub path: PathBuf,
    /// `[daemon]`.
    pub daemon: DaemonConfig,
    /// Every `[clients.NAME]`, from the main file and the included ones, by name.
    pub clients: BTreeMap<String, std::sync::Arc<ClientConfig>>,
    /// The main file and every included file that was read (what a reload watches).
    pub files: Vec<PathBuf>,
    /// Things that are allowed but worth telling the operator (an inline secret in a file
    /// others can read, an `owner` the daemon cannot apply, …). Each is one line.
    pub warnings: Vec<String>,
    /// Where each client's tables lie in the files, for a reload to read only what changed
    /// (see [`crate::config::load_reusing`]).
    pub layout: crate::config::Layout,
    /// `[fleet]`; `None`: every client is local and no etcd code runs (docs/fleet.md).
    pub fleet: Option<FleetConfig>,
    /// Clients written with `fleet = false`: kept local even with `[fleet]`.
    pub fleet_local: std::collections::BTreeSet<String>,
}

impl Config {
    /// The `include` globs, absolute (relative ones are taken from the main file's directory):
    /// a new file matching one is a change like an edited one, for the reload watcher.
    pub fn include_globs(&self) -> Vec<PathBuf> {
        let dir = super::load::parent_dir(&self.path);
        self.daemon.include.iter().map(|g| dir.join(g)).collect()
    }

    /// Every file a reload depends on, for the reload watcher (which sorts them and drops
    /// repeats): the config files that were read and every file a secret is read from.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let secrets = self.clients.values().flat_map(|c| c.secret_paths());
        self.files.iter().cloned().chain(secrets).collect()
    }
}

/// `[fleet]` (docs/fleet.md): the etcd cluster the hosts share tokens through.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetConfig {
    /// etcd client URLs (`http://` or `https://`), tried in turn.
    pub etcd: Vec<url::Url>,
    /// Every key lives under it: starts with `/`, no trailing `/`.
    pub prefix: String,
    /// 32 random bytes, base64: encrypts and authenticates every value (AES-256-GCM).
    pub key: Credential,
    /// This host's etcd lease: how soon a dead holder's clients move to another host.
    pub lease: Duration,
    /// This host's name in the fleet (default: the hostname).
    pub host: String,
    /// Trust anchors (PEM) for `https://` endpoints; without it, none is trusted.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS to etcd, with `cert_key`.
    pub cert: Option<PathBuf>,
    pub cert_key: Option<Credential>,
    /// etcd user and password (etcd's own authentication).
    pub user: Option<String>,
    pub password: Option<Credential>,
}

/// `[daemon]`.
#[derive(Clone, Debug, PartialEq)]
pub struct DaemonConfig {
    /// gRPC socket; `None`: no gRPC server.
    pub socket: Option<PathBuf>,
    /// Permission bits of the socket file (default 0o660).
    pub socket_mode: u32,
    /// Where state (last token, refresh token) is kept (default /var/lib/tokenwarden).
    pub state_dir: PathBuf,
    /// Prometheus and health endpoint; `None`: none.
    pub metrics_listen: Option<SocketAddr>,
    /// `auto` | `text` | `json`.
    pub log_format: LogFormat,
    /// A tracing filter directive (`info`, `debug`, `tokenwarden=trace`, …).
    pub log_level: String,
    /// The include globs as written (resolved relative to the main file's directory).
    pub include: Vec<String>,
    /// Token requests in flight at once across all clients (default 32).
    pub max_concurrent_refreshes: usize,
    /// Connections at once on the gRPC socket (default 256); the metrics listener takes at
    /// most 32, and never more than this.
    pub max_connections: usize,
    /// HTTP/1.1 on this Unix socket (mode `socket_mode`); `None`: none (docs/http.md).
    pub http_socket: Option<PathBuf>,
    /// HTTP/1.1 on this loopback address; `None`: none.
    pub http_listen: Option<SocketAddr>,
    /// Log the first read of a client by each (uid, executable) every 10 minutes.
    pub audit: bool,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket: None,
            socket_mode: 0o660,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            metrics_listen: None,
            log_format: LogFormat::Auto,
            log_level: "info".into(),
            include: Vec::new(),
            max_concurrent_refreshes: 32,
            max_connections: crate::limits::DEFAULT_MAX_CONNECTIONS,
            http_socket: None,
            http_listen: None,
            audit: false,
        }
    }
}

/// `daemon.log_format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// journald style when `JOURNAL_STREAM` is set, else text.
    Auto,
    Text,
    Json,
}

impl LogFormat {
    pub(crate) const ALL: [LogFormat; 3] = [LogFormat::Auto, LogFormat::Text, LogFormat::Json];

    /// As written in the config.
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Auto => "auto",
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// When to refresh and how to retry (docs/operations.md#refresh-schedule); `[defaults]` and per
/// client.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    /// Refresh once this fraction of the lifetime has passed (0 < x ≤ 1; default 0.75).
    pub refresh_at: f64,
    /// Minus a random share of up to this fraction of the lifetime (0 ≤ x < refresh_at; 0.10).
    pub jitter: f64,
    /// Never later than this before expiry (30 s).
    pub refresh_margin: Duration,
    /// Never sooner than this after the last token (10 s).
    pub min_interval: Duration,
    /// Lifetime when neither `expires_in` nor a JWT `exp` gives one (1 h).
    pub default_lifetime: Duration,
    /// First retry delay after a failure (1 s).
    pub retry_initial: Duration,
    /// Cap of the retry delay (5 min); `Retry-After` may exceed it.
    pub retry_max: Duration,
    /// Whole token request, connect to last byte (10 s).
    pub timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            refresh_at: 0.75,
            jitter: 0.10,
            refresh_margin: Duration::from_secs(30),
            min_interval: Duration::from_secs(10),
            default_lifetime: Duration::from_secs(3600),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            timeout: Duration::from_secs(10),
        }
    }
}

/// A secret as configured, with the value read when the config loaded.
#[derive(Clone, Debug, PartialEq)]
pub struct Credential {
    pub source: SecretSource,
    pub value: Secret,
}

/// One `[clients.NAME]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientConfig {
    /// `[A-Za-z0-9_.-]{1,64}`.
    pub name: String,
    /// `https`, or `http` to a loopback host. With `issuer`, this is the issuer's URL until
    /// discovery finds the token endpoint ([`crate::oauth::discovery`]): the refresher resolves
    /// it before every token request, so a request is never sent to it.
    pub token_url: url::Url,
    /// `issuer` exactly as configured (RFC 8414 §2): the token endpoint comes from its metadata.
    pub issuer: Option<String>,
    pub grant: Grant,
    pub client_auth: ClientAuth,
    /// Required unless the grant is `jwt_bearer` with `client_auth = "none"`.
    pub client_id: Option<String>,
    /// Requested scope values (RFC 6749 §3.3); empty: no `scope` parameter.
    pub scope: Vec<String>,
    /// `audience` parameter (RFC 8693 style, Auth0 and others).
    pub audience: Option<String>,
    /// `resource` parameter (RFC 8707).
    pub resource: Option<String>,
    /// More form parameters, sent as they are.
    pub extra_params: BTreeMap<String, String>,
    /// More request headers.
    pub extra_headers: BTreeMap<String, String>,
    /// Extra trust anchors (PEM) on top of the OS store.
    pub ca_file: Option<PathBuf>,
    /// How token requests reach the endpoint: the proxy variables, none, or this proxy.
    pub proxy: ProxyConfig,
    /// Forced rotation times: 6-field cron (seconds first), UTC. Checked at load.
    pub rotate_cron: Option<String>,
    /// Users (resolved to uids) who may read this client over gRPC, besides root and the daemon.
    pub allow_uids: Vec<u32>,
    /// Groups (resolved to gids) whose members may read it.
    pub allow_gids: Vec<u32>,
    /// Files the token is written to.
    pub outputs: Vec<OutputConfig>,
    pub timing: Timing,
    /// `tls_client_cert` and `tls_client_key`: the client certificate presented on token
    /// requests (RFC 8705), checked to match its key.
    pub tls_client: Option<std::sync::Arc<crate::oauth::ClientCert>>,
}

impl ClientConfig {
    /// The `grant_type` sent for the client's configured grant.
    pub fn grant_type(&self) -> &'static str {
        self.grant.grant_type()
    }

    /// `x5t#S256` of the client certificate presented on token requests (RFC 8705 §3.1): the
    /// token had is bound to it, and is no use with another.
    pub fn token_binding(&self) -> Option<&str> {
        self.tls_client.as_ref().map(|c| c.info.thumbprint.as_str())
    }

    /// A digest of what makes a token this client's (docs/operations.md#restarts): token URL (or
    /// issuer), client id, grant, user, scope, audience and resource (and, for the `refresh_token` grant,
    /// the supplied refresh token). A stored token is reused only when it matches.
    pub fn identity_fingerprint(&self) -> String {
        let username = match &self.grant {
            Grant::Password { username, .. } => username.as_str(),
            _ => "",
        };
        let subject = match &self.grant {
            Grant::JwtBearer { assertion } => assertion
                .claims
                .get("sub")
                .map(|v| v.to_string())
                .unwrap_or_default(),
            // A new bootstrap refresh token starts a new chain: the stored one is not reused.
            Grant::RefreshToken { refresh_token } => refresh_token.value.fingerprint_full(),
            // Whose token is exchanged, and for what, makes the token (RFC 8693 §2.1).
            Grant::TokenExchange(x) => x.identity(),
            Grant::AssertionFile { source } => source.to_string(),
            _ => String::new(),
        };
        // An issuer is another identity than the same URL as a token_url.
        let endpoint = match &self.issuer {
            Some(issuer) => format!("issuer {issuer}"),
            None => self.token_url.to_string(),
        };
        let parts = [
            endpoint.as_str(),
            self.client_id.as_deref().unwrap_or(""),
            self.grant_type(),
            username,
            &subject,
            &self.scope.join(" "),
            self.audience.as_deref().unwrap_or(""),
            self.resource.as_deref().unwrap_or(""),
        ];
        crate::secret::sha256_hex(parts.join("\u{0}").as_bytes())
    }

    /// A digest of every credential the client uses (secrets and keys): when it changes on a
    /// reload, the client needs a new token now.
    pub fn credentials_digest(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        match &self.grant {
            Grant::Password { password, .. } => parts.push(password.value.fingerprint_full()),
            Grant::RefreshToken { refresh_token } => {
                parts.push(refresh_token.value.fingerprint_full())
            }
            Grant::JwtBearer { assertion } => parts.push(assertion.key.digest.clone()),
            // Read at each request: where from is what the config decides.
            Grant::AssertionFile { source } => parts.push(source.to_string()),
            Grant::TokenExchange(x) => parts.push(x.sources()),
            Grant::ClientCredentials => {}
        }
        match &self.client_auth {
            ClientAuth::Basic { secret } | ClientAuth::Post { secret } => {
                parts.push(secret.value.fingerprint_full())
            }
            ClientAuth::SecretJwt { key, .. } | ClientAuth::PrivateKeyJwt { key, .. } => {
                parts.push(key.digest.clone())
            }
            ClientAuth::ClientAssertion { source } => parts.push(source.to_string()),
            ClientAuth::None | ClientAuth::TlsClientAuth | ClientAuth::SelfSignedTlsClientAuth => {}
        }
        if let Some(cert) = &self.tls_client {
            parts.push(cert.digest.clone());
        }
        crate::secret::sha256_hex(parts.join("\u{0}").as_bytes())
    }

    /// Files of ready-made tokens read at each request (assertions, subject and actor tokens).
    pub fn ready_token_paths(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        match &self.grant {
            Grant::AssertionFile { source } => v.extend(source.path()),
            Grant::TokenExchange(x) => v.extend(x.paths()),
            _ => {}
        }
        if let ClientAuth::ClientAssertion { source } = &self.client_auth {
            v.extend(source.path());
        }
        v
    }

    /// Files secrets of this client are read from.
    pub fn secret_paths(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        match &self.grant {
            Grant::Password { password, .. } => v.extend(password.source.path()),
            Grant::RefreshToken { refresh_token } => v.extend(refresh_token.source.path()),
            Grant::JwtBearer { assertion } => v.extend(assertion.key_source.path()),
            Grant::AssertionFile { source } => v.extend(source.path()),
            Grant::TokenExchange(x) => v.extend(x.paths()),
            Grant::ClientCredentials => {}
        }
        match &self.client_auth {
            ClientAuth::Basic { secret } | ClientAuth::Post { secret } => {
                v.extend(secret.source.path())
            }
            ClientAuth::SecretJwt { secret, .. } => v.extend(secret.source.path()),
            ClientAuth::PrivateKeyJwt { key_source, .. } => v.extend(key_source.path()),
            ClientAuth::ClientAssertion { source } => v.extend(source.path()),
            ClientAuth::None | ClientAuth::TlsClientAuth | ClientAuth::SelfSignedTlsClientAuth => {}
        }
        if let Some(cert) = &self.tls_client {
            v.extend(cert.paths());
        }
        v
    }
}

impl Secret {
    /// Full SHA-256 of the value, to compare credentials across reloads without keeping them.
    pub fn fingerprint_full(&self) -> String {
        crate::secret::sha256_hex(self.expose().as_bytes())
    }
}

/// `proxy` of a client. Loopback token URLs are never proxied, whatever this says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ProxyConfig {
    /// Not set: `https_proxy`/`HTTPS_PROXY`, `http_proxy`/`HTTP_PROXY`, `all_proxy`/`ALL_PROXY`
    /// and `no_proxy`/`NO_PROXY`, read as curl reads them.
    #[default]
    Env,
    /// `"none"`: always straight to the token endpoint.
    None,
    /// A proxy URL: this proxy, whatever the environment says.
    Url(ProxyUrl),
}

/// An `http://` or `https://` proxy URL, perhaps with `user:password@`. The password is a
/// secret: `Display` and `Debug` show the URL without its credentials.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ProxyUrl(url::Url);

impl ProxyUrl {
    /// Checks a proxy URL: `http` or `https` (what the HTTP client here speaks), a host, and
    /// nothing after it but `/`. The error never quotes the text (it may hold a password).
    pub fn parse(text: &str) -> Result<ProxyUrl, String> {
        let url = url::Url::parse(text.trim())
            .map_err(|e| format!("not a URL ({e}); write it like \"http://proxy.example:3128\""))?;
        let shown = ProxyUrl(url.clone()).to_string();
        match url.scheme() {
            "http" | "https" => {}
            s if s.starts_with("socks") => {
                return Err(format!(
                    "{shown}: SOCKS proxies are not supported; use an http:// or https:// proxy"
                ));
            }
            _ => {
                return Err(format!(
                    "{shown}: a proxy URL starts with http:// or https://"
                ));
            }
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("{shown}: the proxy URL names no host"));
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "{shown}: a proxy URL has no path or query; write scheme://host:port"
            ));
        }
        Ok(ProxyUrl(url))
    }

    /// The URL with its credentials, for the HTTP client only.
    pub fn expose(&self) -> &url::Url {
        &self.0
    }

    /// The password (percent-decoded), to mask it in provider text.
    pub fn password(&self) -> Option<String> {
        self.0.password().map(crate::secret::form_decoded)
    }
}

impl std::fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = self.0.host_str().unwrap_or_default();
        write!(f, "{}://{host}", self.0.scheme())?;
        if let Some(port) = self.0.port_or_known_default() {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProxyUrl({self})")
    }
}

/// The grant a client uses to get its token (RFC 6749 §4, RFC 7523 §2.1).
#[derive(Clone, Debug, PartialEq)]
pub enum Grant {
    /// RFC 6749 §4.4.
    ClientCredentials,
    /// RFC 6749 §4.3, then the refresh tokens it returns (§6).
    Password {
        username: String,
        password: Credential,
    },
    /// RFC 6749 §6 from a refresh token the operator supplied; the rotated ones are kept in
    /// the state directory.
    RefreshToken { refresh_token: Credential },
    /// RFC 7523 §2.1: a signed assertion is the grant.
    JwtBearer { assertion: Assertion },
    /// RFC 7523 §2.1 with a ready-made assertion (`assertion = { file = PATH }`), read again
    /// before each request (RFC 7521 §4.1).
    AssertionFile { source: SecretSource },
    /// RFC 8693 token exchange.
    TokenExchange(Box<TokenExchange>),
}

/// The RFC 8693 §2.1 grant type URN.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693 §3 token type identifiers.
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
/// RFC 8693 §3: an OAuth 2.0 access token.
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

/// Where an RFC 8693 `subject_token` comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Subject {
    /// A secret source (a file Kubernetes projects, say), read before each request.
    Source(SecretSource),
    /// The current token of another client of this daemon (a chained client).
    Client(String),
}

/// `grant_type = "token_exchange"` (RFC 8693 §2.1). `audience`, `resource` and `scope` are the
/// client's own keys.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenExchange {
    pub subject: Subject,
    /// `subject_token_type` (default: `…:jwt` for a source, `…:access_token` for a client).
    pub subject_token_type: String,
    /// `actor_token` and `actor_token_type` (§2.1: the type is required with the token).
    pub actor: Option<(SecretSource, String)>,
    /// `requested_token_type`.
    pub requested_token_type: Option<String>,
}

impl TokenExchange {
    /// The upstream client, for a chained client.
    pub fn upstream(&self) -> Option<&str> {
        match &self.subject {
            Subject::Client(name) => Some(name),
            Subject::Source(_) => None,
        }
    }

    /// What decides the token besides the client's common keys: the subject and the types.
    fn identity(&self) -> String {
        let subject = match &self.subject {
            Subject::Source(s) => s.to_string(),
            Subject::Client(c) => format!("client {c}"),
        };
        let actor = self.actor.as_ref().map(|(s, t)| format!("{s} {t}"));
        [
            subject.as_str(),
            &self.subject_token_type,
            actor.as_deref().unwrap_or(""),
            self.requested_token_type.as_deref().unwrap_or(""),
        ]
        .join("\u{0}")
    }

    /// Where the tokens are read from (never their values: they are read at each request).
    fn sources(&self) -> String {
        self.identity()
    }

    /// Files the tokens are read from.
    fn paths(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        if let Subject::Source(s) = &self.subject {
            v.extend(s.path());
        }
        if let Some((s, _)) = &self.actor {
            v.extend(s.path());
        }
        v
    }
}

/// The RFC 7523 §2.1 grant type URN.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

impl Grant {
    /// The `grant_type` form value.
    pub fn grant_type(&self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
            Grant::Password { .. } => "password",
            Grant::RefreshToken { .. } => "refresh_token",
            Grant::JwtBearer { .. } | Grant::AssertionFile { .. } => JWT_BEARER_GRANT,
            Grant::TokenExchange(_) => TOKEN_EXCHANGE_GRANT,
        }
    }

    /// The client whose token this one exchanges, for a chained client.
    pub fn upstream(&self) -> Option<&str> {
        match self {
            Grant::TokenExchange(x) => x.upstream(),
            _ => None,
        }
    }

    /// Whether a token can be had without a refresh token: what a dead refresh token falls
    /// back to (docs/oauth.md#refresh-tokens).
    pub fn is_primary(&self) -> bool {
        !matches!(self, Grant::RefreshToken { .. })
    }
}

/// `[clients.NAME.assertion]` for the `jwt_bearer` grant.
#[derive(Clone, Debug, PartialEq)]
pub struct Assertion {
    /// Parsed key with its algorithm (`signing_alg`, default HS256).
    pub key: SigningKey,
    pub key_source: SecretSource,
    /// The key as read, only to mask it in provider text.
    pub key_material: Secret,
    /// Optional `kid` header.
    pub key_id: Option<String>,
    /// `exp - iat` (default 5 min).
    pub lifetime: Duration,
    /// Claims from the config; `iat`, `exp` and `jti` are added unless set here.
    pub claims: serde_json::Map<String, serde_json::Value>,
}

/// How the client authenticates at the token endpoint (RFC 6749 §2.3, RFC 7523 §2.2).
#[derive(Clone, Debug, PartialEq)]
pub enum ClientAuth {
    /// `client_secret_basic`: HTTP Basic with the form-urlencoded id and secret (§2.3.1).
    Basic { secret: Credential },
    /// `client_secret_post`: `client_id` and `client_secret` in the form body.
    Post { secret: Credential },
    /// `client_secret_jwt`: an HMAC assertion keyed with the client secret.
    SecretJwt {
        secret: Credential,
        key: SigningKey,
        lifetime: Duration,
    },
    /// `private_key_jwt`: an assertion signed with the client's private key.
    PrivateKeyJwt {
        key: SigningKey,
        key_source: SecretSource,
        /// The PEM as read, only to mask it in provider text.
        key_material: Secret,
        key_id: Option<String>,
        lifetime: Duration,
    },
    /// `client_assertion`: a ready-made JWT (a Kubernetes projected token, a SPIFFE JWT-SVID)
    /// read before each request and sent as `client_assertion` (RFC 7521 §4.2, RFC 7523 §2.2).
    ClientAssertion { source: SecretSource },
    /// `none`: a public client; `client_id` in the form body.
    None,
    /// `tls_client_auth`: the client certificate (`tls_client`, PKI-issued) authenticates;
    /// `client_id` in the form body (RFC 8705 §2.1).
    TlsClientAuth,
    /// `self_signed_tls_client_auth`: a self-signed client certificate registered with the
    /// provider authenticates; `client_id` in the form body (RFC 8705 §2.2).
    SelfSignedTlsClientAuth,
}

impl ClientAuth {
    /// The config name of the method.
    pub fn method_name(&self) -> &'static str {
        match self {
            ClientAuth::Basic { .. } => "client_secret_basic",
            ClientAuth::Post { .. } => "client_secret_post",
            ClientAuth::SecretJwt { .. } => "client_secret_jwt",
            ClientAuth::PrivateKeyJwt { .. } => "private_key_jwt",
            ClientAuth::ClientAssertion { .. } => "client_assertion",
            ClientAuth::None => "none",
            ClientAuth::TlsClientAuth => "tls_client_auth",
            ClientAuth::SelfSignedTlsClientAuth => "self_signed_tls_client_auth",
        }
    }
}

/// One `[[clients.NAME.outputs]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputConfig {
    /// Absolute path of the file.
    pub path: PathBuf,
    pub format: OutputFormat,
    /// Permission bits (default 0o600).
    pub mode: u32,
    /// Owner uid to chown to, resolved from a name or number at load.
    pub owner: Option<u32>,
    /// Group gid, likewise.
    pub group: Option<u32>,
    /// argv run (no shell) after all the client's outputs are written; empty: nothing.
    pub on_change: Vec<String>,
    /// Prefix of the variable names of the `env` format (default empty).
    pub env_prefix: String,
}

/// `format` of an output (docs/configuration.md#output-formats).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// The access token, no trailing newline.
    Token,
    /// `{"access_token", "token_type", "expires_at", "issued_at", "scope"}`.
    Json,
    /// `ACCESS_TOKEN=…`, `TOKEN_TYPE=…`, `TOKEN_EXPIRES_AT=…` lines.
    Env,
    /// `Authorization: Bearer …` and a newline.
    Header,
}

impl OutputFormat {
    pub(crate) const ALL: [OutputFormat; 4] = [
        OutputFormat::Token,
        OutputFormat::Json,
        OutputFormat::Env,
        OutputFormat::Header,
    ];

    /// As written in the config.
    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Token => "token",
            OutputFormat::Json => "json",
            OutputFormat::Env => "env",
            OutputFormat::Header => "header",
        }
    }
}
