//! Building token requests: the form of each grant and the client authentication of each
//! method (RFC 6749 §2.3, §4.3, §4.4, §6; RFC 7523 §2.1, §2.2, §3).

use std::borrow::Cow;
use std::fmt;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use jsonwebtoken::Header;
use serde_json::{Map, Value, json};

use super::error::OAuthError;
use crate::config::{ClientAuth, ClientConfig, Grant};
use crate::keys::SigningKey;
use crate::secret::Secret;
use crate::token::unix_seconds;

/// RFC 7523 §2.2 `client_assertion_type`.
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Which grant to use for this request.
#[derive(Clone, Copy)]
pub enum Attempt<'a> {
    /// The client's configured grant (or, for `refresh_token` clients, the configured token).
    Primary,
    /// RFC 6749 §6 with this refresh token.
    Refresh(&'a Secret),
}

impl fmt::Debug for Attempt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attempt::Primary => f.write_str("Primary"),
            Attempt::Refresh(_) => f.write_str("Refresh([redacted])"),
        }
    }
}

/// A token request ready to send. Every form value is a [`Secret`] so that `Debug` shows the
/// parameter names only.
#[derive(Debug, Clone)]
pub struct PreparedRequest {
    /// `application/x-www-form-urlencoded` parameters, in order.
    pub form: Vec<(Cow<'static, str>, Secret)>,
    /// `Authorization` header value for `client_secret_basic`.
    pub authorization: Option<Secret>,
    /// `extra_headers`.
    pub headers: Vec<(String, String)>,
    /// The `grant_type` sent.
    pub grant_type: &'static str,
}

impl PreparedRequest {
    /// The form encoded as the request body.
    pub fn body(&self) -> String {
        let mut ser = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in &self.form {
            ser.append_pair(k.as_ref(), v.expose());
        }
        ser.finish()
    }
}

/// Builds the request for `attempt` at time `now`.
pub fn prepare(
    client: &ClientConfig,
    attempt: Attempt<'_>,
    now: SystemTime,
) -> Result<PreparedRequest, OAuthError> {
    let mut form: Vec<(Cow<'static, str>, Secret)> = Vec::new();
    let grant_type = match (attempt, &client.grant) {
        (Attempt::Refresh(rt), _) => {
            form.push(("refresh_token".into(), rt.clone()));
            "refresh_token"
        }
        (Attempt::Primary, Grant::ClientCredentials) => "client_credentials",
        (Attempt::Primary, Grant::Password { username, password }) => {
            form.push(("username".into(), Secret::new(username.clone())));
            form.push(("password".into(), password.value.clone()));
            "password"
        }
        (Attempt::Primary, Grant::RefreshToken { refresh_token }) => {
            form.push(("refresh_token".into(), refresh_token.value.clone()));
            "refresh_token"
        }
        (Attempt::Primary, Grant::JwtBearer { assertion }) => {
            form.push(("assertion".into(), grant_assertion(client, assertion, now)?));
            crate::config::JWT_BEARER_GRANT
        }
        (Attempt::Primary, Grant::AssertionFile { source }) => {
            let jwt = super::assertion_file::read(source, "assertion", true, now)?;
            form.push(("assertion".into(), jwt));
            crate::config::JWT_BEARER_GRANT
        }
        (Attempt::Primary, Grant::TokenExchange(x)) => {
            super::exchange::push_form(x, now, &mut form)?;
            crate::config::TOKEN_EXCHANGE_GRANT
        }
    };
    // `grant_type` goes first, ahead of the grant's own parameters.
    form.insert(0, ("grant_type".into(), Secret::new(grant_type)));
    if !client.scope.is_empty() {
        form.push(("scope".into(), Secret::new(client.scope.join(" "))));
    }
    if let Some(a) = &client.audience {
        form.push(("audience".into(), Secret::new(a.clone())));
    }
    if let Some(r) = &client.resource {
        form.push(("resource".into(), Secret::new(r.clone())));
    }
    let client_id = client.client_id.clone().unwrap_or_default();
    // client_id in the body: not with HTTP Basic, which carries it; where it is optional, if set.
    let id_in_body = match &client.client_auth {
        ClientAuth::Basic { .. } => false,
        ClientAuth::ClientAssertion { .. } | ClientAuth::None => !client_id.is_empty(),
        _ => true,
    };
    if id_in_body {
        form.push(("client_id".into(), Secret::new(client_id.clone())));
    }
    let mut authorization = None;
    // The client assertion (RFC 7523 §2.2), for the methods that send one.
    let assertion = match &client.client_auth {
        ClientAuth::Basic { secret } => {
            authorization = Some(basic_authorization(&client_id, &secret.value));
            None
        }
        ClientAuth::Post { secret } => {
            form.push(("client_secret".into(), secret.value.clone()));
            None
        }
        ClientAuth::SecretJwt { key, lifetime, .. } => {
            Some(client_assertion(client, key, None, *lifetime, now)?)
        }
        ClientAuth::PrivateKeyJwt {
            key,
            key_id,
            lifetime,
            ..
        } => Some(client_assertion(
            client,
            key,
            key_id.as_deref(),
            *lifetime,
            now,
        )?),
        ClientAuth::ClientAssertion { source } => Some(super::assertion_file::read(
            source,
            "client_assertion",
            true,
            now,
        )?),
        // client_id alone: the certificate authenticates (RFC 8705 §2.1, §2.2), or nothing does.
        ClientAuth::TlsClientAuth | ClientAuth::SelfSignedTlsClientAuth | ClientAuth::None => None,
    };
    if let Some(jwt) = assertion {
        let assertion_type = Secret::new(CLIENT_ASSERTION_TYPE);
        form.push(("client_assertion_type".into(), assertion_type));
        form.push(("client_assertion".into(), jwt));
    }
    for (k, v) in &client.extra_params {
        form.push((Cow::Owned(k.clone()), Secret::new(v.clone())));
    }
    Ok(PreparedRequest {
        form,
        authorization,
        headers: client
            .extra_headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        grant_type,
    })
}

/// RFC 6749 §2.3.1: id and secret are form-urlencoded, joined by `:`, then base64.
pub fn basic_authorization(client_id: &str, secret: &Secret) -> Secret {
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let raw = zeroize::Zeroizing::new(format!("{}:{}", enc(client_id), enc(secret.expose())));
    Secret::new(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw.as_bytes())
    ))
}

/// RFC 7523 §2.2/§3 client assertion: `iss` = `sub` = client id, `aud` = token URL, a fresh
/// `jti`, `iat`, and `exp` = `iat` + lifetime.
fn client_assertion(
    client: &ClientConfig,
    key: &SigningKey,
    key_id: Option<&str>,
    lifetime: Duration,
    now: SystemTime,
) -> Result<Secret, OAuthError> {
    let id = client.client_id.clone().unwrap_or_default();
    let iat = unix_seconds(now);
    let claims = json!({
        "iss": id,
        "sub": id,
        "aud": client.token_url.as_str(),
        "jti": uuid::Uuid::new_v4().to_string(),
        "iat": iat,
        "exp": iat + lifetime.as_secs(),
    });
    sign(key, key_id, &claims)
}

/// RFC 7523 §2.1 grant assertion: the configured claims, plus `iss` (client id), `aud` (token
/// URL), `iat`, `exp` and a fresh `jti` where the config does not set them.
fn grant_assertion(
    client: &ClientConfig,
    assertion: &crate::config::Assertion,
    now: SystemTime,
) -> Result<Secret, OAuthError> {
    let mut claims: Map<String, Value> = assertion.claims.clone();
    let iat = unix_seconds(now);
    if let Some(id) = &client.client_id {
        claims.entry("iss").or_insert_with(|| json!(id));
    }
    claims
        .entry("aud")
        .or_insert_with(|| json!(client.token_url.as_str()));
    claims.entry("iat").or_insert_with(|| json!(iat));
    claims
        .entry("exp")
        .or_insert_with(|| json!(iat + assertion.lifetime.as_secs()));
    claims
        .entry("jti")
        .or_insert_with(|| json!(uuid::Uuid::new_v4().to_string()));
    sign(
        &assertion.key,
        assertion.key_id.as_deref(),
        &Value::Object(claims),
    )
}

fn sign(key: &SigningKey, key_id: Option<&str>, claims: &Value) -> Result<Secret, OAuthError> {
    let mut header = Header::new(key.alg.algorithm());
    header.typ = Some("JWT".into());
    header.kid = key_id.map(str::to_string);
    key.sign(header, claims)
        .map(Secret::new)
        .map_err(|e| OAuthError::Request(format!("cannot sign the assertion: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_encodes_before_base64() {
        // RFC 6749 §2.3.1 / Appendix B: "s3cr:t" → "s3cr%3At"; space → "+".
        let h = basic_authorization("my client", &Secret::new("s3cr:t/é"));
        let b64 = h.expose().strip_prefix("Basic ").unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(
            String::from_utf8(raw).unwrap(),
            "my+client:s3cr%3At%2F%C3%A9"
        );
    }

    #[test]
    fn attempt_debug_hides_the_refresh_token() {
        let s = Secret::new("rt-value");
        assert_eq!(format!("{:?}", Attempt::Refresh(&s)), "Refresh([redacted])");
    }
}
