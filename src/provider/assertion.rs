//! Checking JWT assertions the way a strict provider does (RFC 7523 §3): client assertions for
//! `client_secret_jwt` / `private_key_jwt` (§2.2) and grant assertions for the jwt-bearer grant
//! (§2.1). The checks are pure functions of the assertion, the registered rule and the time;
//! replayed `jti`s are caught by the caller, which keeps the ones it has seen.

use jsonwebtoken::{DecodingKey, Validation};
use serde_json::Value;

use crate::keys::SigningAlg;
use crate::secret::Secret;

/// Longest lifetime (`exp - iat`) of a client assertion: Talkdesk's 5-minute rule.
pub const MAX_CLIENT_ASSERTION_LIFETIME: u64 = 300;

/// How far in the future an `iat` may be before the assertion is refused (clock skew).
pub const MAX_IAT_SKEW: u64 = 60;

/// What the caller needs from an assertion that passed.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Checked {
    /// The `jti`, for replay detection.
    pub jti: Option<String>,
    /// The `exp`, in Unix seconds: a seen `jti` may be forgotten after it.
    pub exp: u64,
}

/// What a client assertion must satisfy (RFC 7523 §2.2 and §3).
pub(crate) struct ClientRule<'a> {
    /// `iss` and `sub` must both be this.
    pub client_id: &'a str,
    /// The only `alg` accepted.
    pub alg: SigningAlg,
    /// When registered, the `kid` header must be this.
    pub kid: Option<&'a str>,
    /// Verifies the signature.
    pub key: &'a DecodingKey,
    /// The token URL the client posted to: `aud` must name it.
    pub audience: &'a str,
}

/// What a grant assertion must satisfy (RFC 7523 §2.1 and §3, Talentsoft's claims).
pub(crate) struct GrantRule<'a> {
    /// `iss` must be this.
    pub client_id: &'a str,
    /// The HS256 key: the client secret.
    pub secret: &'a Secret,
    /// `aud` must be this.
    pub audience: &'a str,
}

/// The decoding key for a registered public key (or, for HMAC, a secret).
pub(crate) fn decoding_key(alg: SigningAlg, material: &str) -> Result<DecodingKey, String> {
    let pem = material.as_bytes();
    let key = match alg {
        SigningAlg::HS256 | SigningAlg::HS384 | SigningAlg::HS512 => {
            Ok(DecodingKey::from_secret(pem))
        }
        SigningAlg::ES256 | SigningAlg::ES384 => DecodingKey::from_ec_pem(pem),
        SigningAlg::EdDSA => DecodingKey::from_ed_pem(pem),
        _ => DecodingKey::from_rsa_pem(pem),
    };
    key.map_err(|_| format!("the registered {alg} public key does not parse"))
}

/// The unverified `iss` of a JWT: who an assertion claims to come from, to find the key that
/// will verify it.
pub(crate) fn unverified_issuer(jwt: &str) -> Option<String> {
    let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(jwt).ok()?;
    claims.get("iss")?.as_str().map(String::from)
}

/// Checks a client assertion; the error says which check failed.
pub(crate) fn check_client_assertion(
    jwt: &str,
    rule: &ClientRule<'_>,
    now: u64,
) -> Result<Checked, String> {
    let header = jsonwebtoken::decode_header(jwt)
        .map_err(|_| "client_assertion is not a JWT".to_string())?;
    if header.alg != rule.alg.algorithm() {
        return Err(format!(
            "client_assertion alg {:?} is not the registered {}",
            header.alg, rule.alg
        ));
    }
    if let Some(kid) = rule.kid {
        match header.kid.as_deref() {
            None => return Err("client_assertion has no kid header".into()),
            Some(k) if k != kid => {
                return Err("client_assertion kid is not the registered key id".into());
            }
            Some(_) => {}
        }
    }
    let claims = verified_claims(jwt, rule.alg, rule.key)
        .map_err(|_| "client_assertion signature does not verify".to_string())?;
    let iss = string_claim(&claims, "iss")?;
    if iss != rule.client_id {
        return Err("client_assertion iss is not the client id".into());
    }
    let sub = string_claim(&claims, "sub")?;
    if sub != rule.client_id {
        return Err("client_assertion sub is not the client id".into());
    }
    check_audience(&claims, rule.audience)?;
    let (iat, exp) = check_times(&claims, now)?;
    if exp.saturating_sub(iat) > MAX_CLIENT_ASSERTION_LIFETIME {
        return Err(format!(
            "client_assertion lives {} s (exp - iat); at most {MAX_CLIENT_ASSERTION_LIFETIME} s allowed",
            exp.saturating_sub(iat)
        ));
    }
    let jti =
        string_claim(&claims, "jti").map_err(|_| "client_assertion has no jti".to_string())?;
    Ok(Checked {
        jti: Some(jti.to_string()),
        exp,
    })
}

/// Checks a grant assertion; the error says which check failed.
pub(crate) fn check_grant_assertion(
    jwt: &str,
    rule: &GrantRule<'_>,
    now: u64,
) -> Result<Checked, String> {
    let header =
        jsonwebtoken::decode_header(jwt).map_err(|_| "assertion is not a JWT".to_string())?;
    if header.alg != jsonwebtoken::Algorithm::HS256 {
        return Err(format!("assertion alg {:?} is not HS256", header.alg));
    }
    let key = DecodingKey::from_secret(rule.secret.expose().as_bytes());
    let claims = verified_claims(jwt, SigningAlg::HS256, &key)
        .map_err(|_| "assertion signature does not verify".to_string())?;
    if string_claim(&claims, "iss")? != rule.client_id {
        return Err("assertion iss is not the client id".into());
    }
    for name in ["sub", "email", "name"] {
        string_claim(&claims, name)?;
    }
    check_audience(&claims, rule.audience)?;
    let (_, exp) = check_times(&claims, now)?;
    let jti = match claims.get("jti") {
        None => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(_) => return Err("assertion jti is not a string".into()),
    };
    Ok(Checked { jti, exp })
}

/// What a JWT from a trusted outside issuer must satisfy (a Kubernetes service-account token
/// used as a client assertion or a jwt-bearer grant, RFC 7521 §5.2 and RFC 7523 §3): signed by
/// that issuer's key, `iss`, `sub` and `aud` as registered, `exp` ahead.
pub(crate) struct FederatedRule<'a> {
    /// The only `alg` accepted.
    pub alg: SigningAlg,
    /// The issuer's public key.
    pub key: &'a DecodingKey,
    /// `iss` must be this.
    pub issuer: &'a str,
    /// `sub` must be this.
    pub subject: &'a str,
    /// `aud` must name this.
    pub audience: &'a str,
}

/// Checks a JWT from a trusted issuer; `what` names it in the error (`client_assertion`, …).
pub(crate) fn check_federated(
    jwt: &str,
    rule: &FederatedRule<'_>,
    what: &str,
    now: u64,
) -> Result<Checked, String> {
    let header = jsonwebtoken::decode_header(jwt).map_err(|_| format!("{what} is not a JWT"))?;
    if header.alg != rule.alg.algorithm() {
        return Err(format!(
            "{what} alg {:?} is not the registered {}",
            header.alg, rule.alg
        ));
    }
    let claims = verified_claims(jwt, rule.alg, rule.key)
        .map_err(|_| format!("{what} signature does not verify with the issuer's key"))?;
    if string_claim(&claims, "iss")? != rule.issuer {
        return Err(format!("{what} iss is not the trusted issuer"));
    }
    if string_claim(&claims, "sub")? != rule.subject {
        return Err(format!("{what} sub is not the registered subject"));
    }
    check_audience(&claims, rule.audience)?;
    let (_, exp) = check_times(&claims, now).map_err(|e| format!("{what}: {e}"))?;
    let jti = match claims.get("jti") {
        None => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(_) => return Err(format!("{what} jti is not a string")),
    };
    Ok(Checked { jti, exp })
}

/// The claims of a JWT whose signature verifies with `key` under `alg`; no claim is checked.
pub(crate) fn verified_claims(
    jwt: &str,
    alg: SigningAlg,
    key: &DecodingKey,
) -> Result<Value, jsonwebtoken::errors::Error> {
    let mut v = Validation::new(alg.algorithm());
    v.validate_exp = false;
    v.validate_aud = false;
    v.leeway = 0;
    v.required_spec_claims.clear();
    jsonwebtoken::decode::<Value>(jwt, key, &v).map(|d| d.claims)
}

fn string_claim<'a>(claims: &'a Value, name: &str) -> Result<&'a str, String> {
    match claims.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(_) => Err(format!("claim {name} is not a non-empty string")),
        None => Err(format!("claim {name} is missing")),
    }
}

fn numeric_claim(claims: &Value, name: &str) -> Result<u64, String> {
    match claims.get(name) {
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| f as u64)
            .ok_or_else(|| format!("claim {name} is not a NumericDate")),
        None => Err(format!("claim {name} is missing")),
    }
}

/// `aud` is the expected value, or an array holding it (RFC 7519 §4.1.3).
fn check_audience(claims: &Value, expected: &str) -> Result<(), String> {
    let ok = match claims.get("aud") {
        Some(Value::String(s)) => s == expected,
        Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(expected)),
        None => return Err("claim aud is missing".into()),
        Some(_) => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("claim aud does not name {expected}"))
    }
}

/// `iat` and `exp` present, `exp` in the future, `iat` not ahead of the clock.
fn check_times(claims: &Value, now: u64) -> Result<(u64, u64), String> {
    let exp = numeric_claim(claims, "exp")?;
    let iat = numeric_claim(claims, "iat")?;
    if exp <= now {
        return Err(format!("assertion expired {} s ago", now - exp));
    }
    if iat > now + MAX_IAT_SKEW {
        return Err(format!("claim iat is {} s in the future", iat - now));
    }
    if exp < iat {
        return Err("claim exp is before iat".into());
    }
    Ok((iat, exp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;
    use jsonwebtoken::Header;
    use serde_json::json;

    const NOW: u64 = 1_800_000_000;
    const AUD: &str = "http://127.0.0.1:1/talkdesk/oauth/token";

    fn good_claims() -> Value {
        json!({"iss": "cid", "sub": "cid", "aud": AUD, "jti": "j1", "iat": NOW, "exp": NOW + 300})
    }

    #[test]
    fn client_assertions_table() {
        let (private, public) = crate::keys::generate_es256().unwrap();
        let signer = SigningKey::parse(SigningAlg::ES256, &Secret::new(private)).unwrap();
        let key = decoding_key(SigningAlg::ES256, &public).unwrap();
        let rule = ClientRule {
            client_id: "cid",
            alg: SigningAlg::ES256,
            kid: Some("k1"),
            key: &key,
            audience: AUD,
        };
        let sign = |claims: Value, kid: Option<&str>| {
            let h = Header {
                kid: kid.map(String::from),
                ..Header::default()
            };
            signer.sign(h, &claims).unwrap()
        };
        let with = |k: &str, v: Value| {
            let mut c = good_claims();
            c[k] = v;
            c
        };
        let without = |k: &str| {
            let mut c = good_claims();
            c.as_object_mut().unwrap().remove(k);
            c
        };
        let ok = check_client_assertion(&sign(good_claims(), Some("k1")), &rule, NOW).unwrap();
        assert_eq!(ok.jti.as_deref(), Some("j1"));
        assert_eq!(ok.exp, NOW + 300);
        // An aud array holding the token URL is fine.
        check_client_assertion(
            &sign(with("aud", json!(["x", AUD])), Some("k1")),
            &rule,
            NOW,
        )
        .unwrap();

        let (other_private, _) = crate::keys::generate_es256().unwrap();
        let other = SigningKey::parse(SigningAlg::ES256, &Secret::new(other_private)).unwrap();
        let h = Header {
            kid: Some("k1".into()),
            ..Header::default()
        };
        let foreign = other.sign(h, &good_claims()).unwrap();
        let hs = SigningKey::parse(SigningAlg::HS256, &Secret::new("s"))
            .unwrap()
            .sign(Header::default(), &good_claims())
            .unwrap();

        let table: Vec<(String, &str)> = vec![
            ("garbage".into(), "not a JWT"),
            (hs, "alg"),
            (sign(good_claims(), None), "no kid"),
            (sign(good_claims(), Some("k2")), "kid"),
            (foreign, "signature"),
            (sign(with("iss", json!("x")), Some("k1")), "iss"),
            (sign(with("sub", json!("x")), Some("k1")), "sub"),
            (sign(without("sub"), Some("k1")), "sub is missing"),
            (
                sign(with("aud", json!("http://elsewhere/token")), Some("k1")),
                "aud",
            ),
            (sign(without("aud"), Some("k1")), "aud is missing"),
            (sign(without("exp"), Some("k1")), "exp is missing"),
            (sign(with("exp", json!(NOW - 1)), Some("k1")), "expired"),
            (sign(with("exp", json!(NOW)), Some("k1")), "expired"),
            (sign(without("iat"), Some("k1")), "iat is missing"),
            (
                sign(with("exp", json!(NOW + 301)), Some("k1")),
                "at most 300",
            ),
            (sign(with("iat", json!(NOW + 120)), Some("k1")), "future"),
            (sign(without("jti"), Some("k1")), "jti"),
            (sign(with("exp", json!("soon")), Some("k1")), "NumericDate"),
        ];
        for (jwt, why) in table {
            let e = check_client_assertion(&jwt, &rule, NOW).unwrap_err();
            assert!(e.contains(why), "expected {why:?} in {e:?}");
        }
    }

    #[test]
    fn grant_assertions_table() {
        let secret = Secret::new("talentsoft-secret");
        let rule = GrantRule {
            client_id: "ts",
            secret: &secret,
            audience: "https://api.site.com",
        };
        let good = json!({"iss": "ts", "sub": "TalentSoftMarketPlace", "aud": "https://api.site.com",
            "email": "jean.dupont@site", "name": "Jean Dupont", "iat": NOW, "exp": NOW + 1200});
        let signer = SigningKey::parse(SigningAlg::HS256, &secret).unwrap();
        let sign = |c: &Value| signer.sign(Header::default(), c).unwrap();
        let ok = check_grant_assertion(&sign(&good), &rule, NOW).unwrap();
        assert_eq!(ok.jti, None);
        let mut with_jti = good.clone();
        with_jti["jti"] = json!("j");
        assert_eq!(
            check_grant_assertion(&sign(&with_jti), &rule, NOW)
                .unwrap()
                .jti
                .as_deref(),
            Some("j")
        );
        let wrong_key = SigningKey::parse(SigningAlg::HS256, &Secret::new("other"))
            .unwrap()
            .sign(Header::default(), &good)
            .unwrap();
        let hs512 = SigningKey::parse(SigningAlg::HS512, &secret)
            .unwrap()
            .sign(Header::default(), &good)
            .unwrap();
        let mut table: Vec<(String, &str)> = vec![(wrong_key, "signature"), (hs512, "HS256")];
        for (k, v, why) in [
            ("iss", Some(json!("other")), "iss"),
            ("sub", None, "sub"),
            ("email", None, "email"),
            ("name", Some(json!("")), "name"),
            ("aud", Some(json!("https://other")), "aud"),
            ("iat", None, "iat"),
            ("exp", None, "exp"),
            ("exp", Some(json!(NOW - 5)), "expired"),
        ] {
            let mut c = good.clone();
            match v {
                Some(v) => c[k] = v,
                None => {
                    c.as_object_mut().unwrap().remove(k);
                }
            }
            table.push((sign(&c), why));
        }
        for (jwt, why) in table {
            let e = check_grant_assertion(&jwt, &rule, NOW).unwrap_err();
            assert!(e.contains(why), "expected {why:?} in {e:?}");
        }
    }

    #[test]
    fn issuer_is_read_without_verifying() {
        let jwt = SigningKey::parse(SigningAlg::HS256, &Secret::new("k"))
            .unwrap()
            .sign(Header::default(), &json!({"iss": "me"}))
            .unwrap();
        assert_eq!(unverified_issuer(&jwt).as_deref(), Some("me"));
        assert_eq!(unverified_issuer("nope"), None);
    }
}
