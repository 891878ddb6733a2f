//! The provider's generic token endpoint at [`EXCHANGE_PATH`]: RFC 8693 token exchange, and the
//! ready-made assertions of workload identity (a Kubernetes service-account token sent as
//! `client_assertion`, RFC 7521 §4.2, or as the jwt-bearer grant, RFC 7523 §2.1), checked
//! strictly:
//! - client authentication: a client secret (Basic or in the body), a client assertion signed
//!   by the client's trusted issuer (`iss`, `sub`, `aud`, `exp`, signature; a `jti` seen before
//!   is a replay and refused), or none for a public client;
//! - `grant_type` `client_credentials`, jwt-bearer (the same issuer checks) or token exchange;
//! - token exchange (§2.1): `subject_token` and `subject_token_type` required; an `access_token`
//!   subject must be one this provider issued and still valid; a `jwt` subject must verify (this
//!   provider's own JWTs, or the client's trusted issuer); `audience` and `resource` must be
//!   ones the client may ask for, else `invalid_target` (§2.2.2); the answer carries
//!   `issued_token_type` (§2.2.1) and lives no longer than the subject;
//! - `requested_token_type` `access_token` (default), `jwt` (a JWT access token) or `id_token`
//!   (`token_type` `N_A`, as §2.2.1 says for a token that is not an access token).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use jsonwebtoken::DecodingKey;
use serde_json::{Value, json};

use super::assertion::{self, FederatedRule};
use super::request::{self, Presented, Reject};
use super::{Endpoint, JWT_BEARER_GRANT, Provider, RecordedRequest};
use crate::keys::SigningAlg;
use crate::secret::Secret;

/// Where the exchange endpoint is served.
pub const EXCHANGE_PATH: &str = "/exchange/token";
/// RFC 8693 §2.1.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693 §3 token type identifiers.
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
/// RFC 8693 §3: a JWT.
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
/// RFC 8693 §3: an OpenID Connect ID token.
pub const TOKEN_TYPE_ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";

/// An outside issuer whose JWTs a client may present (a Kubernetes cluster's service-account
/// issuer, an Entra federated credential's subject).
#[derive(Clone, Debug, PartialEq)]
pub struct TrustedIssuer {
    /// `iss`.
    pub issuer: String,
    /// `sub` (the service account: `system:serviceaccount:NS:NAME`).
    pub subject: String,
    /// The `aud` the JWT must name.
    pub audience: String,
    /// The issuer's public key, PEM (SubjectPublicKeyInfo).
    pub public_key_pem: String,
    /// The only algorithm accepted.
    pub alg: SigningAlg,
}

/// How a client of the exchange endpoint authenticates.
#[derive(Clone, Debug, PartialEq)]
pub enum ExchangeAuth {
    /// A client secret, with HTTP Basic or in the body.
    Secret(Secret),
    /// A client assertion from [`ExchangeClient::issuer`] (`client_id` in the body).
    Assertion,
    /// None: a public client naming itself with `client_id`.
    None,
}

/// A client of the exchange endpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct ExchangeClient {
    /// The client id.
    pub client_id: String,
    /// How it authenticates.
    pub auth: ExchangeAuth,
    /// The issuer of its client assertions and jwt-bearer assertions (and of JWT subjects).
    pub issuer: Option<TrustedIssuer>,
    /// The `audience` and `resource` values it may ask a token exchange for (§2.2.2).
    pub targets: Vec<String>,
    /// Lifetime of the tokens it gets (an exchanged one: no longer than its subject).
    pub lifetime: Duration,
}

impl ExchangeClient {
    /// A client with a secret, one-hour tokens, no targets.
    pub fn new(client_id: impl Into<String>, auth: ExchangeAuth) -> Self {
        ExchangeClient {
            client_id: client_id.into(),
            auth,
            issuer: None,
            targets: Vec::new(),
            lifetime: Duration::from_secs(3600),
        }
    }
}

/// What the exchange endpoint remembers.
#[derive(Default)]
pub(super) struct ExchangeLedger {
    clients: HashMap<String, ExchangeClient>,
    /// SHA-256 of every access token the provider issued (any endpoint) → (client id, exp):
    /// what an `access_token` subject is checked against. Expired ones are dropped.
    issued: HashMap<String, (String, u64)>,
    /// client id → jti → exp of the assertions seen.
    seen_jti: HashMap<String, HashMap<String, u64>>,
    /// Tokens issued here, per client.
    count: HashMap<String, usize>,
    serial: u64,
}

impl ExchangeLedger {
    /// Notes an access token the provider issued, valid until `exp` (Unix seconds).
    pub(super) fn note_issued(&mut self, token: &str, client_id: &str, exp: u64, now: u64) {
        self.issued.retain(|_, (_, e)| *e > now);
        self.issued.insert(
            crate::secret::sha256_hex(token.as_bytes()),
            (client_id.to_owned(), exp),
        );
    }

    fn remember_jti(&mut self, client_id: &str, checked: &assertion::Checked, now: u64) -> bool {
        let Some(jti) = &checked.jti else {
            return true;
        };
        let seen = self.seen_jti.entry(client_id.to_owned()).or_default();
        seen.retain(|_, exp| *exp > now);
        seen.insert(jti.clone(), checked.exp).is_none()
    }
}

impl Provider {
    /// Adds a client of the exchange endpoint, or replaces the one with its id.
    pub fn register_exchange(&self, client: ExchangeClient) {
        self.ledger()
            .exchange
            .clients
            .insert(client.client_id.clone(), client);
    }

    /// The exchange endpoint's URL: `http://127.0.0.1:PORT/exchange/token`.
    pub fn exchange_url(&self) -> String {
        format!("{}{EXCHANGE_PATH}", self.base_url())
    }

    /// How many tokens the exchange endpoint issued to `client_id`.
    pub fn exchange_issued(&self, client_id: &str) -> usize {
        self.ledger()
            .exchange
            .count
            .get(client_id)
            .copied()
            .unwrap_or(0)
    }
}

/// The exchange endpoint: the client id and the response body, or the OAuth error.
pub(super) fn process(
    endpoint: &Endpoint,
    req: &RecordedRequest,
    now: u64,
) -> Result<(String, Value), Reject> {
    if req.method != "POST" {
        return Err(Reject::invalid_request(
            "the token endpoint takes only POST (RFC 6749 §3.2)",
        ));
    }
    request::check_content_type(req.header("content-type"))?;
    let form = request::parse_form(&req.body)?;
    let presented = request::presented(req.header("authorization"), &form)?;
    let tried_basic = presented.tried_basic();
    let Some(grant_type) = form.get("grant_type").map(String::as_str) else {
        return Err(Reject::invalid_request("grant_type is missing"));
    };
    let mut st = endpoint.lock();
    let ledger = &mut st.exchange;
    let client =
        authenticate(ledger, &presented, grant_type, now).map_err(|r| r.challenge(tried_basic))?;
    let scope = request::scope_tokens(form.get("scope").map(String::as_str));
    let (lifetime, issued_type) = match grant_type {
        "client_credentials" => (client.lifetime.as_secs(), None),
        JWT_BEARER_GRANT => {
            let Some(jwt) = form.get("assertion") else {
                return Err(Reject::invalid_request(
                    "the jwt-bearer grant needs an assertion (RFC 7523 §2.1)",
                ));
            };
            let checked =
                federated(&client, jwt, "assertion", now).map_err(Reject::invalid_grant)?;
            if !ledger.remember_jti(&client.client_id, &checked, now) {
                return Err(Reject::invalid_grant(
                    "assertion jti was already used (replay)",
                ));
            }
            (client.lifetime.as_secs(), None)
        }
        TOKEN_EXCHANGE_GRANT => {
            let subject_exp = check_exchange(endpoint, ledger, &client, &form, now)?;
            let issued = match form.get("requested_token_type").map(String::as_str) {
                None | Some(TOKEN_TYPE_ACCESS_TOKEN) => TOKEN_TYPE_ACCESS_TOKEN,
                Some(TOKEN_TYPE_JWT) => TOKEN_TYPE_JWT,
                Some(TOKEN_TYPE_ID_TOKEN) => TOKEN_TYPE_ID_TOKEN,
                Some(_) => {
                    return Err(Reject::invalid_request(
                        "requested_token_type is not one this provider issues",
                    ));
                }
            };
            let left = subject_exp.saturating_sub(now);
            (client.lifetime.as_secs().min(left), Some(issued))
        }
        _ => {
            return Err(Reject::unsupported_grant_type(format!(
                "grant_type {grant_type:?} is not supported here"
            )));
        }
    };
    ledger.serial += 1;
    let serial = ledger.serial;
    let exp = now + lifetime;
    let fp = crate::secret::fingerprint(client.client_id.as_bytes());
    let random = uuid::Uuid::new_v4().simple();
    let token = match issued_type {
        Some(TOKEN_TYPE_JWT) | Some(TOKEN_TYPE_ID_TOKEN) => endpoint
            .sign(&json!({
                "iss": format!("{}/exchange", endpoint.base_url()),
                "sub": client.client_id,
                "aud": client.targets.first().cloned().unwrap_or_else(|| client.client_id.clone()),
                "iat": now,
                "exp": exp,
                "jti": format!("x{serial}-{random}"),
            }))
            .ok_or_else(|| Reject::invalid_request("the provider could not sign a token"))?,
        _ => format!("tw_exchange_{fp}_{serial:06}_{random}"),
    };
    ledger.note_issued(&token, &client.client_id, exp, now);
    *ledger.count.entry(client.client_id.clone()).or_default() += 1;
    let mut body = json!({
        "access_token": token,
        "token_type": if issued_type == Some(TOKEN_TYPE_ID_TOKEN) { "N_A" } else { "Bearer" },
        "expires_in": lifetime,
    });
    if let Some(t) = issued_type {
        body["issued_token_type"] = json!(t);
    }
    if !scope.is_empty() {
        body["scope"] = json!(scope.join(" "));
    }
    Ok((client.client_id.clone(), body))
}

/// Client authentication (RFC 6749 §2.3, RFC 7521 §4.2): the client, or 401 `invalid_client`.
fn authenticate(
    ledger: &mut ExchangeLedger,
    presented: &Presented,
    grant_type: &str,
    now: u64,
) -> Result<ExchangeClient, Reject> {
    let find = |id: &str| {
        ledger
            .clients
            .get(id)
            .cloned()
            .ok_or_else(|| Reject::invalid_client("unknown client"))
    };
    let wrong = |c: &ExchangeClient| {
        Reject::invalid_client(format!(
            "this client must authenticate {}",
            match c.auth {
                ExchangeAuth::Secret(_) => "with its client secret",
                ExchangeAuth::Assertion => "with a client assertion",
                ExchangeAuth::None => "with client_id only",
            }
        ))
    };
    match presented {
        Presented::Basic { client_id, secret } | Presented::Post { client_id, secret } => {
            let c = find(client_id)?;
            match &c.auth {
                ExchangeAuth::Secret(s) if s == secret => Ok(c),
                ExchangeAuth::Secret(_) => Err(Reject::invalid_client("wrong client secret")),
                _ => Err(wrong(&c)),
            }
        }
        Presented::Assertion {
            client_id,
            assertion,
        } => {
            let Some(id) = client_id else {
                return Err(Reject::invalid_client(
                    "a client assertion from an outside issuer needs client_id",
                ));
            };
            let c = find(id)?;
            if c.auth != ExchangeAuth::Assertion {
                return Err(wrong(&c));
            }
            let checked = federated(&c, assertion.expose(), "client_assertion", now)
                .map_err(Reject::invalid_client)?;
            if !ledger.remember_jti(&c.client_id, &checked, now) {
                return Err(Reject::invalid_client(
                    "client_assertion jti was already used (replay)",
                ));
            }
            Ok(c)
        }
        Presented::None { client_id } => {
            let Some(id) = client_id else {
                return Err(Reject::invalid_client("client authentication required"));
            };
            let c = find(id)?;
            // The jwt-bearer grant's assertion authenticates the client itself (RFC 7521
            // §4.1); with any other grant, an assertion client must present one.
            match c.auth {
                ExchangeAuth::None => Ok(c),
                ExchangeAuth::Assertion if grant_type == JWT_BEARER_GRANT => Ok(c),
                _ => Err(wrong(&c)),
            }
        }
    }
}

/// Checks a JWT from the client's trusted issuer.
fn federated(
    c: &ExchangeClient,
    jwt: &str,
    what: &str,
    now: u64,
) -> Result<assertion::Checked, String> {
    let Some(issuer) = &c.issuer else {
        return Err(format!(
            "no trusted issuer is registered for this client's {what}"
        ));
    };
    let key = assertion::decoding_key(issuer.alg, &issuer.public_key_pem)?;
    let rule = FederatedRule {
        alg: issuer.alg,
        key: &key,
        issuer: &issuer.issuer,
        subject: &issuer.subject,
        audience: &issuer.audience,
    };
    assertion::check_federated(jwt, &rule, what, now)
}

/// The token exchange request's checks (RFC 8693 §2.1, §2.2.2); the subject's `exp`.
fn check_exchange(
    endpoint: &Endpoint,
    ledger: &ExchangeLedger,
    client: &ExchangeClient,
    form: &BTreeMap<String, String>,
    now: u64,
) -> Result<u64, Reject> {
    let (Some(subject), Some(subject_type)) =
        (form.get("subject_token"), form.get("subject_token_type"))
    else {
        return Err(Reject::invalid_request(
            "token exchange needs subject_token and subject_token_type (RFC 8693 §2.1)",
        ));
    };
    if form.contains_key("actor_token") != form.contains_key("actor_token_type") {
        return Err(Reject::invalid_request(
            "actor_token and actor_token_type go together (RFC 8693 §2.1)",
        ));
    }
    for key in ["audience", "resource"] {
        if let Some(v) = form.get(key)
            && !client.targets.iter().any(|t| t == v)
        {
            return Err(Reject::invalid_target(format!(
                "{key} is not a target this client may ask for"
            )));
        }
    }
    let subject_exp = validate_token(endpoint, ledger, client, subject, subject_type, now)
        .map_err(|e| Reject::invalid_grant(format!("subject_token: {e}")))?;
    if let (Some(actor), Some(actor_type)) = (form.get("actor_token"), form.get("actor_token_type"))
    {
        validate_token(endpoint, ledger, client, actor, actor_type, now)
            .map_err(|e| Reject::invalid_grant(format!("actor_token: {e}")))?;
    }
    Ok(subject_exp)
}

/// A subject or actor token of `token_type`: one this provider issued and still valid, or a
/// JWT it can verify. Its `exp`.
fn validate_token(
    endpoint: &Endpoint,
    ledger: &ExchangeLedger,
    client: &ExchangeClient,
    token: &str,
    token_type: &str,
    now: u64,
) -> Result<u64, String> {
    match token_type {
        TOKEN_TYPE_ACCESS_TOKEN => {
            match ledger
                .issued
                .get(&crate::secret::sha256_hex(token.as_bytes()))
            {
                Some((_, exp)) if *exp > now => Ok(*exp),
                Some(_) => Err("the token has expired".into()),
                None => Err("not a token this provider issued".into()),
            }
        }
        TOKEN_TYPE_JWT => {
            let own = DecodingKey::from_secret(endpoint.server_key.expose().as_bytes());
            if let Ok(claims) = assertion::verified_claims(token, SigningAlg::HS256, &own) {
                return match claims.get("exp").and_then(Value::as_u64) {
                    Some(exp) if exp > now => Ok(exp),
                    _ => Err("the JWT has expired".into()),
                };
            }
            federated(client, token, "the JWT", now).map(|c| c.exp)
        }
        _ => Err(format!(
            "subject_token_type {token_type:?} is not one this provider accepts"
        )),
    }
}
