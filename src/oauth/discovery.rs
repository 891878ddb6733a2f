//! Finding a client's token endpoint from its `issuer` (docs/oauth.md#discovery): the
//! authorization server metadata of RFC 8414, or OpenID Connect Discovery 1.0.
//!
//! - Where: the RFC 8414 §3.1 well-known URI, `/.well-known/oauth-authorization-server`
//!   inserted between the host and the issuer's path; when that answers 404, the OpenID
//!   Connect Discovery §4 one, the issuer followed by `/.well-known/openid-configuration`.
//! - How: a GET through the client's own HTTP client (its `ca_file`, its proxy), no redirects,
//!   the token response's body limit ([`MAX_BODY`]) and the client's `timeout`.
//! - What is accepted (RFC 8414 §3.3): a JSON object whose `issuer` is the configured one,
//!   character for character (a metadata document of another issuer is refused: the mix-up
//!   attack RFC 9207 is about), and whose `token_endpoint` is `https` (or `http` to a loopback
//!   host), like a configured `token_url`. A client presenting a certificate (RFC 8705) uses
//!   `mtls_endpoint_aliases.token_endpoint` when there is one (RFC 8705 §5).
//! - Kept: in the state directory, one file per issuer ([`crate::state::discovery_file`]), so a
//!   restart needs no metadata request. Fetched again when older than [`MAX_AGE`], or after the
//!   token endpoint answered 404 (at most once per [`NOT_FOUND_REFETCH`]); a failed fetch keeps
//!   the metadata in hand (and is not tried again for [`FAILED_RETRY`]). Clients of one issuer
//!   share one [`Discovery`] entry, so they share one fetch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use reqwest::header::{ACCEPT, CONTENT_TYPE};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{OAuthError, printable};
use super::response::{MAX_BODY, json_error};
use crate::config::ClientConfig;
use crate::state::StateDir;
use crate::token::unix_seconds;

/// Metadata is fetched again once it is this old (at most hourly).
pub const MAX_AGE: Duration = Duration::from_secs(3600);
/// After the token endpoint answered 404, the metadata is fetched again, but at most once per
/// this long per issuer: a provider whose endpoint is gone is not asked for its metadata on
/// every retry.
pub const NOT_FOUND_REFETCH: Duration = Duration::from_secs(60);
/// After a failed fetch, the next one waits this long (the metadata in hand is used meanwhile).
pub const FAILED_RETRY: Duration = Duration::from_secs(300);
/// The version of the cache file this code writes.
const CACHE_VERSION: u64 = 1;

/// The RFC 8414 §3.1 suffix.
pub const RFC8414_SUFFIX: &str = "/.well-known/oauth-authorization-server";
/// The OpenID Connect Discovery 1.0 §4 suffix.
pub const OIDC_SUFFIX: &str = "/.well-known/openid-configuration";

/// The two URLs the metadata of `issuer` is looked for at, in order: RFC 8414 §3.1 (the suffix
/// inserted between the host and the path, the path's terminating `/` removed), then OpenID
/// Connect Discovery §4 (the suffix appended to the issuer, its terminating `/` removed).
pub fn well_known_urls(issuer: &url::Url) -> [url::Url; 2] {
    let path = issuer.path().trim_end_matches('/');
    let mut rfc8414 = issuer.clone();
    rfc8414.set_path(&format!("{RFC8414_SUFFIX}{path}"));
    let mut oidc = issuer.clone();
    oidc.set_path(&format!("{path}{OIDC_SUFFIX}"));
    [rfc8414, oidc]
}

/// What tokenwarden reads of an authorization server's metadata (RFC 8414 §2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub issuer: String,
    pub token_endpoint: String,
    /// Absent: `client_secret_basic` only (RFC 8414 §2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_endpoint_auth_methods_supported: Option<Vec<String>>,
    /// Absent: `authorization_code` and `implicit` (RFC 8414 §2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_types_supported: Option<Vec<String>>,
    /// RFC 8705 §5: `mtls_endpoint_aliases.token_endpoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls_token_endpoint: Option<String>,
}

impl Metadata {
    /// Reads and checks a metadata document fetched for `issuer` (RFC 8414 §3.2, §3.3). The
    /// error says what is wrong by field and JSON position; it quotes only the document's
    /// `issuer` and endpoint URLs (printable, cut to 200 characters), never anything else.
    pub fn parse(body: &[u8], issuer: &str) -> Result<Metadata, Refusal> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| Refusal::NotMetadata(format!("not JSON ({})", json_error(&e))))?;
        let Value::Object(map) = value else {
            return Err(Refusal::NotMetadata("not a JSON object".into()));
        };
        let string = |name: &str| -> Result<Option<String>, Refusal> {
            match map.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(Refusal::NotMetadata(format!("\"{name}\" is not a string"))),
            }
        };
        let list = |name: &str| -> Result<Option<Vec<String>>, Refusal> {
            match map.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .map(Some)
                    .ok_or_else(|| {
                        Refusal::NotMetadata(format!("\"{name}\" is not a list of strings"))
                    }),
                Some(_) => Err(Refusal::NotMetadata(format!("\"{name}\" is not a list"))),
            }
        };
        let found = string("issuer")?
            .ok_or_else(|| Refusal::NotMetadata("no \"issuer\" (RFC 8414 §2)".into()))?;
        if found != issuer {
            return Err(Refusal::IssuerMismatch {
                found: printable(&found, 200),
            });
        }
        let token_endpoint = string("token_endpoint")?
            .ok_or_else(|| Refusal::NotMetadata("no \"token_endpoint\" (RFC 8414 §2)".into()))?;
        check_endpoint("token_endpoint", &token_endpoint)?;
        let mtls_token_endpoint = match map.get("mtls_endpoint_aliases") {
            None | Some(Value::Null) => None,
            Some(Value::Object(aliases)) => match aliases.get("token_endpoint") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => {
                    check_endpoint("mtls_endpoint_aliases.token_endpoint", s)?;
                    Some(s.clone())
                }
                Some(_) => {
                    return Err(Refusal::NotMetadata(
                        "\"mtls_endpoint_aliases.token_endpoint\" is not a string".into(),
                    ));
                }
            },
            Some(_) => {
                return Err(Refusal::NotMetadata(
                    "\"mtls_endpoint_aliases\" is not an object".into(),
                ));
            }
        };
        Ok(Metadata {
            issuer: found,
            token_endpoint,
            token_endpoint_auth_methods_supported: list("token_endpoint_auth_methods_supported")?,
            grant_types_supported: list("grant_types_supported")?,
            mtls_token_endpoint,
        })
    }

    /// The token endpoint for a client that presents a TLS client certificate or not: the
    /// RFC 8705 §5 alias when it does and there is one.
    pub fn token_endpoint_for(&self, presents_certificate: bool) -> &str {
        match (&self.mtls_token_endpoint, presents_certificate) {
            (Some(alias), true) => alias,
            _ => &self.token_endpoint,
        }
    }

    /// What `check` warns about for `client`: its `client_auth` missing from
    /// `token_endpoint_auth_methods_supported` (absent: `client_secret_basic` only), its grant
    /// missing from a `grant_types_supported` that is present (RFC 8414 §2's default for an
    /// absent list names no grant a daemon uses, so an absent list says nothing).
    pub fn warnings(&self, client: &ClientConfig) -> Vec<String> {
        let mut out = Vec::new();
        let method = client.client_auth.method_name();
        let methods = self
            .token_endpoint_auth_methods_supported
            .clone()
            .unwrap_or_else(|| vec!["client_secret_basic".to_string()]);
        if !methods.iter().any(|m| m == method) {
            out.push(format!(
                "client \"{}\": the metadata of issuer {} does not list client_auth {method} in token_endpoint_auth_methods_supported ({}{}); the token endpoint may refuse it",
                client.name,
                self.issuer,
                printable(&methods.join(", "), 200),
                if self.token_endpoint_auth_methods_supported.is_none() {
                    ": absent, so the RFC 8414 §2 default"
                } else {
                    ""
                }
            ));
        }
        if let Some(grants) = &self.grant_types_supported {
            let grant = client.grant_type();
            if !grants.iter().any(|g| g == grant) {
                out.push(format!(
                    "client \"{}\": the metadata of issuer {} does not list grant_type {grant} in grant_types_supported ({}); the token endpoint may refuse it",
                    client.name,
                    self.issuer,
                    printable(&grants.join(", "), 200)
                ));
            }
        }
        out
    }
}

/// `token_endpoint` must be usable as a `token_url` is: `https`, or `http` to a loopback host.
fn check_endpoint(field: &str, text: &str) -> Result<(), Refusal> {
    crate::config::check_token_url(text)
        .map(drop)
        .map_err(|e| Refusal::BadEndpoint {
            field: field.to_string(),
            reason: printable(&e.replacen("token_url", field, 1), 300),
        })
}

/// Why a metadata document was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not JSON, not an object, a field of the wrong type, or a required field missing.
    #[error("the metadata is refused: {0}")]
    NotMetadata(String),
    /// Its `issuer` is not the configured one (RFC 8414 §3.3).
    #[error(
        "the metadata is refused: it names issuer \"{found}\", not the configured one (RFC 8414 §3.3 requires them identical: a document of another issuer could send the credentials elsewhere); fix issuer in the config if the provider's is right"
    )]
    IssuerMismatch { found: String },
    /// An endpoint that is not `https` (nor `http` to a loopback host).
    #[error("the metadata is refused: {reason}")]
    BadEndpoint { field: String, reason: String },
}

/// Metadata and when and where it was fetched: what the cache file holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cached {
    pub version: u64,
    pub metadata: Metadata,
    /// Seconds since the epoch.
    pub fetched_at_unix: u64,
    /// The URL it was fetched from.
    pub fetched_from: String,
}

impl Cached {
    fn fetched_at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.fetched_at_unix)
    }

    /// Reads a cache file for `issuer`; `None` when it is not one (another issuer, a bad
    /// endpoint: it is fetched again).
    pub fn parse(bytes: &[u8], issuer: &str) -> Option<Cached> {
        let cached: Cached = serde_json::from_slice(bytes).ok()?;
        let m = &cached.metadata;
        let endpoints_ok = check_endpoint("token_endpoint", &m.token_endpoint).is_ok()
            && m.mtls_token_endpoint
                .as_deref()
                .is_none_or(|e| check_endpoint("mtls", e).is_ok());
        (m.issuer == issuer && endpoints_ok).then_some(cached)
    }
}

/// Whether to fetch the metadata now (pure): `fetched_at` of the metadata in hand (`None`:
/// none), `failed_at` of the last failed fetch since. Without metadata, always: the
/// refresher's backoff paces the attempts, and a provider down at start must not cost a
/// client its token for longer than that.
pub fn needs_fetch(
    fetched_at: Option<SystemTime>,
    failed_at: Option<SystemTime>,
    now: SystemTime,
) -> bool {
    let older = |t: SystemTime, d: Duration| now.duration_since(t).is_ok_and(|age| age >= d);
    match fetched_at {
        None => true,
        Some(at) if at > now => true,
        Some(at) => older(at, MAX_AGE) && failed_at.is_none_or(|f| older(f, FAILED_RETRY)),
    }
}

/// One issuer's metadata as the daemon holds it.
#[derive(Default)]
struct Entry {
    /// The state directory's copy was read (or there is no state directory).
    loaded: bool,
    cached: Option<Cached>,
    /// The last fetch that failed since `cached` was fetched.
    failed_at: Option<SystemTime>,
    /// The last fetch made because the token endpoint answered 404.
    refetched_for_404: Option<tokio::time::Instant>,
}

/// The metadata of every issuer the daemon's clients name, shared by them (see the module
/// documentation), kept in the state directory when there is one.
pub struct Discovery {
    state: Option<Arc<StateDir>>,
    entries: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Entry>>>>,
}

impl Discovery {
    /// Discovery keeping its cache in `state` (`None`: in memory only).
    pub fn new(state: Option<Arc<StateDir>>) -> Discovery {
        Discovery {
            state,
            entries: Mutex::default(),
        }
    }

    fn entry(&self, issuer: &str) -> Arc<tokio::sync::Mutex<Entry>> {
        let mut map = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry(issuer.to_string()).or_default().clone()
    }

    /// `client` as its token request needs it: unchanged without `issuer`, else with
    /// `token_url` set to the discovered token endpoint (fetched when the metadata in hand is
    /// missing or stale; see the module documentation). `http` is the client's own HTTP client.
    pub async fn resolve(
        &self,
        client: &Arc<ClientConfig>,
        http: &reqwest::Client,
    ) -> Result<Arc<ClientConfig>, OAuthError> {
        let Some(issuer) = client.issuer.as_deref() else {
            return Ok(client.clone());
        };
        let entry = self.entry(issuer);
        let mut entry = entry.lock().await;
        self.load_once(&mut entry, issuer).await;
        let fetched_at = entry.cached.as_ref().map(Cached::fetched_at);
        if needs_fetch(fetched_at, entry.failed_at, SystemTime::now()) {
            self.fetch_into(&mut entry, client, http).await?;
        }
        let Some(cached) = &entry.cached else {
            return Err(OAuthError::Discovery {
                message: format!("no metadata of issuer {issuer} yet; it is fetched again soon"),
                permanent: false,
            });
        };
        with_endpoint(client, &cached.metadata)
    }

    /// After the token endpoint `tried` answered 404: fetches the metadata again (at most once
    /// per [`NOT_FOUND_REFETCH`] per issuer) and gives `client` at its new token endpoint, when
    /// it moved. `None`: not fetched, the fetch failed, or the endpoint is the same.
    pub async fn after_not_found(
        &self,
        client: &Arc<ClientConfig>,
        http: &reqwest::Client,
        tried: &url::Url,
    ) -> Option<Arc<ClientConfig>> {
        let issuer = client.issuer.as_deref()?;
        let entry = self.entry(issuer);
        let mut entry = entry.lock().await;
        let now = tokio::time::Instant::now();
        if entry
            .refetched_for_404
            .is_some_and(|at| now.duration_since(at) < NOT_FOUND_REFETCH)
        {
            return None;
        }
        entry.refetched_for_404 = Some(now);
        tracing::info!(
            client = %client.name,
            issuer,
            "the token endpoint answered 404: fetching the issuer's metadata again"
        );
        if let Err(e) = self.fetch_into(&mut entry, client, http).await {
            tracing::warn!(client = %client.name, "{e}");
            return None;
        }
        let moved = with_endpoint(client, &entry.cached.as_ref()?.metadata).ok()?;
        (moved.token_url != *tried).then_some(moved)
    }

    /// Reads the state directory's copy, once.
    async fn load_once(&self, entry: &mut Entry, issuer: &str) {
        if entry.loaded {
            return;
        }
        entry.loaded = true;
        let Some(state) = self.state.clone() else {
            return;
        };
        let owned = issuer.to_string();
        let read = tokio::task::spawn_blocking(move || state.load_discovery(&owned)).await;
        match read {
            Ok(Ok(Some(bytes))) => match Cached::parse(&bytes, issuer) {
                Some(c) => entry.cached = Some(c),
                None => tracing::warn!(
                    issuer,
                    "the cached metadata of this issuer is not usable; fetching it again"
                ),
            },
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::warn!(issuer, "{e}; fetching the metadata again"),
            Err(e) => tracing::warn!(issuer, "reading the cached metadata failed: {e}"),
        }
    }

    /// Fetches the metadata into `entry` and the state directory. On failure the metadata in
    /// hand stays; the error is returned only when there is none.
    async fn fetch_into(
        &self,
        entry: &mut Entry,
        client: &ClientConfig,
        http: &reqwest::Client,
    ) -> Result<(), OAuthError> {
        let issuer = client.issuer.as_deref().unwrap_or_default();
        match fetch(http, client).await {
            Ok(fetched) => {
                entry.failed_at = None;
                if let Some(state) = self.state.clone() {
                    let bytes = serde_json::to_vec_pretty(&fetched).unwrap_or_default();
                    let owned = issuer.to_string();
                    let saved =
                        tokio::task::spawn_blocking(move || state.save_discovery(&owned, &bytes))
                            .await;
                    match saved {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!(issuer, "{e}"),
                        Err(e) => tracing::warn!(issuer, "saving the metadata failed: {e}"),
                    }
                }
                tracing::info!(
                    client = %client.name,
                    issuer,
                    token_endpoint = %fetched.metadata.token_endpoint,
                    from = %fetched.fetched_from,
                    "issuer metadata fetched"
                );
                entry.cached = Some(fetched);
                Ok(())
            }
            Err(e) => {
                entry.failed_at = Some(SystemTime::now());
                if entry.cached.is_some() {
                    tracing::warn!(
                        client = %client.name,
                        "{e}; keeping the metadata fetched before"
                    );
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }
}

/// What `tokenwarden check` says about the clients of `config` configured with `issuer`: one
/// line per client naming the token endpoint found, and warnings (metadata that does not list
/// the client's method or grant; an issuer that cannot be reached or whose metadata is refused:
/// reachability is a matter for run time, not a config error). Each issuer is fetched once.
pub async fn check_report(config: &crate::config::Config) -> (Vec<String>, Vec<String>) {
    let (mut lines, mut warnings) = (Vec::new(), Vec::new());
    let http = super::HttpClients::default();
    let mut seen: HashMap<String, Result<Cached, String>> = HashMap::new();
    for client in config.clients.values() {
        let Some(issuer) = client.issuer.as_deref() else {
            continue;
        };
        if !seen.contains_key(issuer) {
            let fetched = match http.get(client) {
                Ok(h) => fetch(&h, client).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            seen.insert(issuer.to_string(), fetched);
        }
        match seen.get(issuer) {
            Some(Ok(cached)) => {
                let m = &cached.metadata;
                lines.push(format!(
                    "client \"{}\": token endpoint {} (from {})",
                    client.name,
                    m.token_endpoint_for(super::has_client_cert(client)),
                    cached.fetched_from
                ));
                warnings.extend(m.warnings(client));
            }
            Some(Err(e)) => warnings.push(format!(
                "client \"{}\": {e}; the daemon keeps trying at run time",
                client.name
            )),
            None => {}
        }
    }
    (lines, warnings)
}

/// `client` with `token_url` set to the token endpoint `metadata` gives it.
fn with_endpoint(
    client: &Arc<ClientConfig>,
    metadata: &Metadata,
) -> Result<Arc<ClientConfig>, OAuthError> {
    let endpoint = metadata.token_endpoint_for(super::has_client_cert(client));
    let url = crate::config::check_token_url(endpoint).map_err(|e| OAuthError::Discovery {
        message: format!("issuer {}: {e}", metadata.issuer),
        permanent: true,
    })?;
    if url == client.token_url {
        return Ok(client.clone());
    }
    let mut c = (**client).clone();
    c.token_url = url;
    Ok(Arc::new(c))
}

/// Fetches and checks the metadata of `client`'s issuer: the RFC 8414 URL, then on 404 the
/// OpenID Connect one. The whole fetch is bounded by the client's `timeout`.
pub async fn fetch(http: &reqwest::Client, client: &ClientConfig) -> Result<Cached, OAuthError> {
    let issuer = client.issuer.as_deref().unwrap_or_default();
    let fail = |what: String, permanent: bool| OAuthError::Discovery {
        message: format!("discovery of issuer {issuer}: {what}"),
        permanent,
    };
    let timeout = client.timing.timeout;
    // The parsed issuer: token_url holds it until the endpoint is known.
    let [first, second] = well_known_urls(&client.token_url);
    let work = async {
        let mut tried = Vec::new();
        for url in [first, second] {
            let loggable = super::trace::loggable_url(&url);
            let (status, content_type, body) = get(http, &url, timeout)
                .await
                .map_err(|(e, permanent)| fail(format!("{loggable}: {e}"), permanent))?;
            if status == 404 {
                tried.push(loggable);
                continue;
            }
            if !(200..300).contains(&status) {
                return Err(fail(
                    format!("{loggable} answered HTTP {status}"),
                    (400..500).contains(&status) && status != 408 && status != 429,
                ));
            }
            let metadata = Metadata::parse(&body, issuer).map_err(|r| {
                let permanent = !matches!(r, Refusal::NotMetadata(_));
                fail(
                    format!(
                        "{loggable} (HTTP {status}, {}, {} bytes): {r}",
                        content_type.as_deref().unwrap_or("no content type"),
                        body.len()
                    ),
                    permanent,
                )
            })?;
            return Ok(Cached {
                version: CACHE_VERSION,
                metadata,
                fetched_at_unix: unix_seconds(SystemTime::now()),
                fetched_from: url.to_string(),
            });
        }
        Err(fail(
            format!(
                "no metadata at {} (HTTP 404 at both); check issuer",
                tried.join(" nor ")
            ),
            true,
        ))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(fail(no_answer(timeout), false)),
    }
}

fn no_answer(timeout: Duration) -> String {
    let timeout = humantime::format_duration(timeout);
    format!("no answer within {timeout} (the client's timeout)")
}

/// A failed GET in words: a timeout says which.
fn failure(e: reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        no_answer(timeout)
    } else {
        super::chain(&e.without_url())
    }
}

/// One GET, its body read up to [`MAX_BODY`]: (status, content type, body), or what went
/// wrong and whether it is permanent.
async fn get(
    http: &reqwest::Client,
    url: &url::Url,
    timeout: Duration,
) -> Result<(u16, Option<String>, Vec<u8>), (String, bool)> {
    let mut resp = http
        .get(url.clone())
        .header(ACCEPT, "application/json")
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| (failure(e, timeout), false))?;
    let status = resp.status().as_u16();
    if (300..400).contains(&status) {
        return Err((
            format!(
                "answered HTTP {status} redirect; redirects are not followed (RFC 8414 §3: the metadata is at the well-known URL itself)"
            ),
            true,
        ));
    }
    let content_type = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| printable(ct.split(';').next().unwrap_or_default().trim(), 100));
    let too_large = || {
        (
            format!("answer larger than {MAX_BODY} bytes refused (HTTP {status})"),
            false,
        )
    };
    if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| (failure(e, timeout), false))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, content_type, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_urls_insert_then_append() {
        let cases = [
            (
                "https://idp.example/realm",
                "https://idp.example/.well-known/oauth-authorization-server/realm",
                "https://idp.example/realm/.well-known/openid-configuration",
            ),
            (
                "https://idp.example/realms/a/",
                "https://idp.example/.well-known/oauth-authorization-server/realms/a",
                "https://idp.example/realms/a/.well-known/openid-configuration",
            ),
            (
                "https://idp.example",
                "https://idp.example/.well-known/oauth-authorization-server",
                "https://idp.example/.well-known/openid-configuration",
            ),
            (
                "http://127.0.0.1:8080/t1",
                "http://127.0.0.1:8080/.well-known/oauth-authorization-server/t1",
                "http://127.0.0.1:8080/t1/.well-known/openid-configuration",
            ),
        ];
        for (issuer, rfc, oidc) in cases {
            let [a, b] = well_known_urls(&url::Url::parse(issuer).unwrap());
            assert_eq!((a.as_str(), b.as_str()), (rfc, oidc), "{issuer}");
        }
    }

    const ISS: &str = "https://idp.example/realm";

    #[test]
    fn metadata_is_checked() {
        let ok = br#"{"issuer":"https://idp.example/realm","token_endpoint":"https://idp.example/realm/token",
            "grant_types_supported":["client_credentials"],
            "mtls_endpoint_aliases":{"token_endpoint":"https://mtls.idp.example/token"}}"#;
        let m = Metadata::parse(ok, ISS).unwrap();
        assert_eq!(
            m.token_endpoint_for(false),
            "https://idp.example/realm/token"
        );
        assert_eq!(m.token_endpoint_for(true), "https://mtls.idp.example/token");
        assert_eq!(m.token_endpoint_auth_methods_supported, None);
        let cases: [(&[u8], &str); 9] = [
            (b"<html>secret-page</html>", "not JSON"),
            (b"[1]", "not a JSON object"),
            (br#"{"token_endpoint":"https://idp.example/t"}"#, "no \"issuer\""),
            (
                br#"{"issuer":"https://idp.example/realm/","token_endpoint":"https://idp.example/t"}"#,
                "names issuer \"https://idp.example/realm/\", not the configured one",
            ),
            (
                br#"{"issuer":"https://evil.example/realm","token_endpoint":"https://idp.example/t"}"#,
                "RFC 8414 §3.3",
            ),
            (br#"{"issuer":"https://idp.example/realm"}"#, "no \"token_endpoint\""),
            (
                br#"{"issuer":"https://idp.example/realm","token_endpoint":"http://evil.example/t"}"#,
                "token_endpoint \"http://evil.example/t\" uses plain http",
            ),
            (
                br#"{"issuer":"https://idp.example/realm","token_endpoint":"https://idp.example/t","grant_types_supported":"client_credentials"}"#,
                "\"grant_types_supported\" is not a list",
            ),
            (
                br#"{"issuer":"https://idp.example/realm","token_endpoint":"https://idp.example/t","mtls_endpoint_aliases":{"token_endpoint":"ftp://x/t"}}"#,
                "mtls_endpoint_aliases.token_endpoint scheme \"ftp\" is not https",
            ),
        ];
        for (body, want) in cases {
            let e = Metadata::parse(body, ISS).unwrap_err().to_string();
            assert!(e.contains(want), "{}: {e}", String::from_utf8_lossy(body));
            assert!(!e.contains("secret-page"), "{e}");
        }
    }

    #[test]
    fn fetch_decisions() {
        let now = SystemTime::now();
        let ago = |s: u64| Some(now - Duration::from_secs(s));
        let cases = [
            (None, None, true),
            (None, ago(10), true),
            (ago(10), None, false),
            (ago(3599), None, false),
            (ago(3600), None, true),
            (ago(7200), ago(10), false),
            (ago(7200), ago(300), true),
            // A cache file from the future (a clock set back): fetched again.
            (Some(now + Duration::from_secs(60)), None, true),
        ];
        for (fetched, failed, want) in cases {
            assert_eq!(
                needs_fetch(fetched, failed, now),
                want,
                "{fetched:?} {failed:?}"
            );
        }
    }

    fn client(grant: &str, auth: &str) -> ClientConfig {
        let text = format!(
            "[clients.c]\nissuer = \"{ISS}\"\ngrant_type = \"{grant}\"\nclient_auth = \"{auth}\"\nclient_id = \"c\"\nclient_secret = \"s\"\nusername = \"u\"\npassword = \"p\"\n"
        );
        let text = if grant == "password" {
            text
        } else {
            text.replace("username = \"u\"\npassword = \"p\"\n", "")
        };
        let cfg =
            crate::config::load_str(&text, std::path::Path::new("/nonexistent/c.toml")).unwrap();
        (*cfg.clients["c"]).clone()
    }

    #[test]
    fn warnings_follow_the_rfc_8414_defaults() {
        let base = Metadata {
            issuer: ISS.into(),
            token_endpoint: "https://idp.example/t".into(),
            token_endpoint_auth_methods_supported: None,
            grant_types_supported: None,
            mtls_token_endpoint: None,
        };
        let cc_basic = client("client_credentials", "client_secret_basic");
        let cc_post = client("client_credentials", "client_secret_post");
        // Absent lists: client_secret_basic only; no grant warning.
        assert!(base.warnings(&cc_basic).is_empty());
        let w = base.warnings(&cc_post);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("client_auth client_secret_post") && w[0].contains("RFC 8414 §2 default"),
            "{w:?}"
        );
        let listed = Metadata {
            token_endpoint_auth_methods_supported: Some(vec!["client_secret_post".into()]),
            grant_types_supported: Some(vec!["authorization_code".into()]),
            ..base.clone()
        };
        let w = listed.warnings(&cc_post);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("grant_type client_credentials"), "{w:?}");
        assert_eq!(listed.warnings(&cc_basic).len(), 2);
    }

    #[test]
    fn another_issuer_is_another_identity() {
        let load = |key: &str, url: &str| {
            let text = format!(
                "[clients.c]\n{key} = \"{url}\"\nclient_id = \"c\"\nclient_secret = \"s\"\n"
            );
            let cfg = crate::config::load_str(&text, std::path::Path::new("/nonexistent/c.toml"))
                .unwrap();
            (*cfg.clients["c"]).clone()
        };
        let a = load("issuer", ISS);
        let cases = [
            load("issuer", "https://idp.example/other"),
            // The same URL, but a trailing slash: another issuer (RFC 8414 §3.3).
            load("issuer", &format!("{ISS}/")),
            // The same URL as a token_url: another way to reach another endpoint.
            load("token_url", ISS),
        ];
        for b in cases {
            assert_eq!(
                crate::config::client_change(&a, &b),
                Some(crate::config::ClientChange::Replace),
                "{:?} -> {:?}",
                a.issuer,
                b.issuer
            );
        }
        let keys: Vec<String> =
            crate::config::changed_keys(&a, &load("issuer", "https://idp.example/other"))
                .iter()
                .map(|k| k.to_string())
                .collect();
        assert!(
            keys.contains(&format!("issuer: {ISS} -> https://idp.example/other")),
            "{keys:?}"
        );
    }

    #[test]
    fn cache_files_round_trip_and_are_checked() {
        let cached = Cached {
            version: CACHE_VERSION,
            metadata: Metadata {
                issuer: ISS.into(),
                token_endpoint: "https://idp.example/t".into(),
                token_endpoint_auth_methods_supported: Some(vec!["client_secret_basic".into()]),
                grant_types_supported: None,
                mtls_token_endpoint: None,
            },
            fetched_at_unix: 1_800_000_000,
            fetched_from: format!("{ISS}/.well-known/openid-configuration"),
        };
        let bytes = serde_json::to_vec(&cached).unwrap();
        assert_eq!(Cached::parse(&bytes, ISS), Some(cached.clone()));
        assert_eq!(Cached::parse(&bytes, "https://other.example"), None);
        let mut bad = cached;
        bad.metadata.token_endpoint = "http://evil.example/t".into();
        assert_eq!(Cached::parse(&serde_json::to_vec(&bad).unwrap(), ISS), None);
        assert_eq!(Cached::parse(b"{", ISS), None);
    }
}
