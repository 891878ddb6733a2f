//! Signing keys for JWT assertions (RFC 7523 §2.1 and §2.2).
//!
//! Keys are PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), or the bare base64 body of one, for the
//! asymmetric algorithms; RSA keys may also be PKCS#1 (`BEGIN RSA PRIVATE KEY`). HMAC algorithms
//! take the secret's bytes as they are. A key is checked when the config loads by signing a probe,
//! so an algorithm that does not fit its key (ES384 with a P-256 key, RS256 with an EC key) is a
//! config error, not a failure at the first refresh.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::secret::Secret;

/// The signing algorithms of `signing_alg` (docs/configuration.md#clientsname).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SigningAlg {
    HS256,
    HS384,
    HS512,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl SigningAlg {
    /// Every algorithm, in the order the docs list them.
    pub const ALL: [SigningAlg; 12] = [
        SigningAlg::HS256,
        SigningAlg::HS384,
        SigningAlg::HS512,
        SigningAlg::RS256,
        SigningAlg::RS384,
        SigningAlg::RS512,
        SigningAlg::PS256,
        SigningAlg::PS384,
        SigningAlg::PS512,
        SigningAlg::ES256,
        SigningAlg::ES384,
        SigningAlg::EdDSA,
    ];

    /// The `alg` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlg::HS256 => "HS256",
            SigningAlg::HS384 => "HS384",
            SigningAlg::HS512 => "HS512",
            SigningAlg::RS256 => "RS256",
            SigningAlg::RS384 => "RS384",
            SigningAlg::RS512 => "RS512",
            SigningAlg::PS256 => "PS256",
            SigningAlg::PS384 => "PS384",
            SigningAlg::PS512 => "PS512",
            SigningAlg::ES256 => "ES256",
            SigningAlg::ES384 => "ES384",
            SigningAlg::EdDSA => "EdDSA",
        }
    }

    /// Whether the key is a shared secret (HMAC) rather than a private key.
    pub fn is_hmac(self) -> bool {
        matches!(
            self,
            SigningAlg::HS256 | SigningAlg::HS384 | SigningAlg::HS512
        )
    }

    /// The jsonwebtoken algorithm.
    pub fn algorithm(self) -> Algorithm {
        match self {
            SigningAlg::HS256 => Algorithm::HS256,
            SigningAlg::HS384 => Algorithm::HS384,
            SigningAlg::HS512 => Algorithm::HS512,
            SigningAlg::RS256 => Algorithm::RS256,
            SigningAlg::RS384 => Algorithm::RS384,
            SigningAlg::RS512 => Algorithm::RS512,
            SigningAlg::PS256 => Algorithm::PS256,
            SigningAlg::PS384 => Algorithm::PS384,
            SigningAlg::PS512 => Algorithm::PS512,
            SigningAlg::ES256 => Algorithm::ES256,
            SigningAlg::ES384 => Algorithm::ES384,
            SigningAlg::EdDSA => Algorithm::EdDSA,
        }
    }
}

impl fmt::Display for SigningAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SigningAlg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SigningAlg::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = SigningAlg::ALL.iter().map(|a| a.as_str()).collect();
                format!(
                    "unknown signing algorithm {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Why a key cannot be used. Messages describe the key's form, never its content.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// An EC key in SEC1 form, which the signer does not take.
    #[error(
        "the EC key is in SEC1 form (BEGIN EC PRIVATE KEY); convert it to PKCS#8 with \
         `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.p8`"
    )]
    Sec1,
    /// A passphrase-protected key.
    #[error("the key is encrypted (BEGIN ENCRYPTED PRIVATE KEY); give an unencrypted PKCS#8 key")]
    Encrypted,
    /// A public key or certificate where a private key belongs.
    #[error("this is a public key or certificate, not a private key")]
    NotPrivate,
    /// Neither PEM nor a base64 body of one.
    #[error("the key is not PEM and not a base64-encoded PKCS#8 body")]
    NotPem,
    /// PEM that does not hold a key of the algorithm's family.
    #[error("the key does not fit {alg}: {detail}")]
    WrongKind { alg: SigningAlg, detail: String },
    /// An empty HMAC secret.
    #[error("the HMAC key is empty")]
    Empty,
}

/// A parsed signing key with its algorithm. `Debug` hides the key.
#[derive(Clone)]
pub struct SigningKey {
    pub alg: SigningAlg,
    pub key: EncodingKey,
    /// SHA-256 of the key material, to notice a rotated key without keeping a copy around.
    pub digest: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        self.alg == other.alg && self.digest == other.digest
    }
}

impl SigningKey {
    /// Parses `material` as a key for `alg` and checks that it signs.
    pub fn parse(alg: SigningAlg, material: &Secret) -> Result<SigningKey, KeyError> {
        let key = if alg.is_hmac() {
            if material.is_empty() {
                return Err(KeyError::Empty);
            }
            EncodingKey::from_secret(material.expose().as_bytes())
        } else {
            let pem = normalize_pem(material.expose())?;
            let parsed = match alg {
                SigningAlg::ES256 | SigningAlg::ES384 => EncodingKey::from_ec_pem(pem.as_bytes()),
                SigningAlg::EdDSA => EncodingKey::from_ed_pem(pem.as_bytes()),
                _ => EncodingKey::from_rsa_pem(pem.as_bytes()),
            };
            parsed.map_err(|e| KeyError::WrongKind {
                alg,
                detail: describe(&e, &pem),
            })?
        };
        let digest = crate::secret::sha256_hex(material.expose().as_bytes());
        let key = SigningKey { alg, key, digest };
        key.probe()?;
        Ok(key)
    }

    /// Parses a private key and picks its algorithm from its kind: ES256 or ES384 for EC keys
    /// (by curve), EdDSA for Ed25519, RS256 for RSA.
    pub fn parse_infer(material: &Secret) -> Result<SigningKey, KeyError> {
        for alg in [
            SigningAlg::ES256,
            SigningAlg::ES384,
            SigningAlg::EdDSA,
            SigningAlg::RS256,
        ] {
            match SigningKey::parse(alg, material) {
                Ok(k) => return Ok(k),
                Err(
                    e @ (KeyError::Sec1
                    | KeyError::Encrypted
                    | KeyError::NotPrivate
                    | KeyError::NotPem),
                ) => return Err(e),
                Err(_) => {}
            }
        }
        Err(KeyError::WrongKind {
            alg: SigningAlg::RS256,
            detail: "not an EC (P-256/P-384), Ed25519 or RSA private key".into(),
        })
    }

    /// Signs a JWT with `header` (whose `alg` is replaced by ours) and `claims`.
    pub fn sign<T: serde::Serialize>(
        &self,
        mut header: Header,
        claims: &T,
    ) -> Result<String, KeyError> {
        header.alg = self.alg.algorithm();
        jsonwebtoken::encode(&header, claims, &self.key).map_err(|e| KeyError::WrongKind {
            alg: self.alg,
            detail: format!("signing failed: {}", error_kind(&e)),
        })
    }

    fn probe(&self) -> Result<(), KeyError> {
        self.sign(Header::default(), &serde_json::json!({"probe": true}))
            .map(|_| ())
    }
}

/// Turns a PEM or a bare base64 PKCS#8 body into PEM, refusing forms we cannot sign with.
fn normalize_pem(material: &str) -> Result<String, KeyError> {
    let trimmed = material.trim();
    if trimmed.contains("-----BEGIN") {
        if trimmed.contains("BEGIN EC PRIVATE KEY") {
            return Err(KeyError::Sec1);
        }
        if trimmed.contains("BEGIN ENCRYPTED PRIVATE KEY") {
            return Err(KeyError::Encrypted);
        }
        if trimmed.contains("PUBLIC KEY-----") || trimmed.contains("BEGIN CERTIFICATE") {
            return Err(KeyError::NotPrivate);
        }
        return Ok(trimmed.to_string());
    }
    let body: String = trimmed.chars().filter(|c| !c.is_whitespace()).collect();
    if body.is_empty()
        || base64::engine::general_purpose::STANDARD
            .decode(body.as_bytes())
            .is_err()
    {
        return Err(KeyError::NotPem);
    }
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(chunk));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    Ok(pem)
}

fn describe(e: &jsonwebtoken::errors::Error, pem: &str) -> String {
    let kind = if pem.contains("BEGIN RSA PRIVATE KEY") {
        "an RSA (PKCS#1) key"
    } else {
        "a PKCS#8 key of another kind, or not a valid key"
    };
    format!("{kind} ({})", error_kind(e))
}

/// jsonwebtoken's error kind in words, without any key bytes.
fn error_kind(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidKeyFormat => "invalid key format".into(),
        ErrorKind::InvalidEcdsaKey => "invalid ECDSA key (wrong curve?)".into(),
        ErrorKind::InvalidRsaKey(_) => "invalid RSA key".into(),
        ErrorKind::InvalidAlgorithm => "algorithm does not fit the key".into(),
        ErrorKind::InvalidAlgorithmName => "unknown algorithm".into(),
        other => format!("{other:?}").chars().take(80).collect(),
    }
}

/// Generates a fresh P-256 key pair: the PKCS#8 PEM of the private key and the PEM of the
/// public key (SubjectPublicKeyInfo). Used by the demo and the tests.
pub fn generate_es256() -> Result<(String, String), KeyError> {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    let fail = |what: &str| KeyError::WrongKind {
        alg: SigningAlg::ES256,
        detail: what.into(),
    };
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
        .map_err(|_| fail("key generation failed"))?;
    let private = pair
        .to_pkcs8v1()
        .map_err(|_| fail("PKCS#8 encoding failed"))?;
    let public = pair
        .public_key()
        .as_der()
        .map_err(|_| fail("public key encoding failed"))?;
    Ok((
        to_pem("PRIVATE KEY", private.as_ref()),
        to_pem("PUBLIC KEY", public.as_ref()),
    ))
}

/// Wraps DER in PEM armour.
pub fn to_pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(chunk));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[test]
    fn generated_es256_key_signs_and_verifies() {
        let (private, public) = generate_es256().unwrap();
        let key = SigningKey::parse(SigningAlg::ES256, &Secret::new(private.clone())).unwrap();
        let jwt = key
            .sign(
                Header::default(),
                &serde_json::json!({"sub": "x", "exp": 4_000_000_000u64}),
            )
            .unwrap();
        let dec = DecodingKey::from_ec_pem(public.as_bytes()).unwrap();
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &jwt,
            &dec,
            &Validation::new(Algorithm::ES256),
        )
        .unwrap();
        assert_eq!(data.claims["sub"], "x");
        // Inferred algorithm.
        assert_eq!(
            SigningKey::parse_infer(&Secret::new(private)).unwrap().alg,
            SigningAlg::ES256
        );
    }

    #[test]
    fn bare_base64_body_is_accepted() {
        let (private, _) = generate_es256().unwrap();
        let body: String = private
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        SigningKey::parse(SigningAlg::ES256, &Secret::new(body)).unwrap();
    }

    #[test]
    fn mismatched_algorithm_is_refused() {
        let (private, public) = generate_es256().unwrap();
        let p = Secret::new(private);
        assert!(matches!(
            SigningKey::parse(SigningAlg::ES384, &p),
            Err(KeyError::WrongKind { .. })
        ));
        assert!(matches!(
            SigningKey::parse(SigningAlg::RS256, &p),
            Err(KeyError::WrongKind { .. })
        ));
        assert!(matches!(
            SigningKey::parse(SigningAlg::EdDSA, &p),
            Err(KeyError::WrongKind { .. })
        ));
        assert_eq!(
            SigningKey::parse(SigningAlg::ES256, &Secret::new(public)),
            Err(KeyError::NotPrivate)
        );
    }

    #[test]
    fn unusable_forms_get_their_own_message() {
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n";
        assert_eq!(
            SigningKey::parse(SigningAlg::ES256, &Secret::new(sec1)),
            Err(KeyError::Sec1)
        );
        assert_eq!(
            SigningKey::parse(SigningAlg::ES256, &Secret::new("not a key!")),
            Err(KeyError::NotPem)
        );
        assert_eq!(
            SigningKey::parse(SigningAlg::HS256, &Secret::new("")),
            Err(KeyError::Empty)
        );
        SigningKey::parse(SigningAlg::HS512, &Secret::new("s3cret")).unwrap();
    }

    #[test]
    fn errors_never_contain_key_material() {
        let (private, _) = generate_es256().unwrap();
        let err = SigningKey::parse(SigningAlg::RS256, &Secret::new(private.clone())).unwrap_err();
        let body_line = private.lines().nth(1).unwrap();
        assert!(!err.to_string().contains(body_line));
        let key = SigningKey::parse(SigningAlg::ES256, &Secret::new(private.clone())).unwrap();
        assert!(!format!("{key:?}").contains(body_line));
    }
}
