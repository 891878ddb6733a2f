//! Mutual TLS at the token endpoint (RFC 8705): the client certificate and key a client presents
//! on its token requests (`tls_client_cert`, `tls_client_key`), for certificate-bound tokens
//! (§3) or as the client authentication itself (`tls_client_auth`, §2.1;
//! `self_signed_tls_client_auth`, §2.2).
//!
//! The pair is read and checked when the config loads: the chain is PEM certificates (leaf
//! first), the key a PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC) whose public key must be
//! the leaf's. A renewed pair arrives through a reload (the watcher watches both files); a
//! half-renewed one (new certificate, old key) fails that check, so the reload is refused and the
//! running pair stays in use until both files match again.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use zeroize::Zeroizing;

use crate::config::{ClientConfig, Credential};
use crate::secret::{Secret, SecretSource};

/// Under this much validity left, `check` and the loader warn.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

/// A client certificate and its key, checked to belong together. `Debug` hides the key.
#[derive(Clone)]
pub struct ClientCert {
    /// Where the PEM chain is read from.
    pub cert_source: SecretSource,
    /// Where the PEM key is read from.
    pub key_source: SecretSource,
    /// The PEM chain as read (public).
    chain_pem: String,
    /// The PEM key as read: for the TLS identity, and to mask it in provider text.
    pub key_material: Secret,
    /// What `check` and `status` show.
    pub info: CertInfo,
    /// SHA-256 of chain and key: the pair's identity across reloads (no copy of the key kept).
    pub digest: String,
}

/// What is shown about a client certificate (nothing secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// The leaf's subject DN (RFC 4514 string), e.g. `CN=client-1,O=Example`.
    pub subject: String,
    /// The leaf's issuer DN; equal to the subject for a self-signed certificate.
    pub issuer: String,
    /// The leaf's DNS, URI, email and IP subject alternative names.
    pub san: Vec<String>,
    /// The leaf's `notAfter`, seconds since the epoch.
    pub not_after: i64,
    /// `x5t#S256`: base64url (no padding) of the SHA-256 of the leaf's DER (RFC 8705 §3.1).
    pub thumbprint: String,
}

impl CertInfo {
    /// `notAfter` as a time.
    pub fn not_after_time(&self) -> SystemTime {
        let secs = u64::try_from(self.not_after).unwrap_or(0);
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// `notAfter` in RFC 3339 (UTC, seconds).
    pub fn not_after_text(&self) -> String {
        humantime::format_rfc3339_seconds(self.not_after_time()).to_string()
    }

    /// Time left at `now`; `None` once expired.
    pub fn remaining(&self, now: SystemTime) -> Option<Duration> {
        self.not_after_time()
            .duration_since(now)
            .ok()
            .filter(|d| !d.is_zero())
    }
}

impl fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCert")
            .field("cert_source", &self.cert_source)
            .field("key_source", &self.key_source)
            .field("subject", &self.info.subject)
            .field("not_after", &self.info.not_after_text())
            .field("key", &"[redacted]")
            .finish()
    }
}

/// Two pairs are the same when chain and key are (compared by digest).
impl PartialEq for ClientCert {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
            && self.cert_source == other.cert_source
            && self.key_source == other.key_source
    }
}

impl ClientCert {
    /// Checks a chain and a key read from their sources: the chain holds a certificate, the key
    /// is a private key, and the key's public key is the leaf's. Errors name the sources, never
    /// key bytes.
    pub fn new(cert: Credential, key: Credential) -> Result<ClientCert, String> {
        let chain = pem_blocks(cert.value.expose());
        let Some(leaf) = chain.iter().find(|(label, _)| label == "CERTIFICATE") else {
            return Err(format!(
                "tls_client_cert: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                cert.source
            ));
        };
        if chain.iter().any(|(label, _)| label.contains("PRIVATE KEY")) {
            return Err(format!(
                "tls_client_cert: {} holds a private key: give the certificate chain there and the key in tls_client_key",
                cert.source
            ));
        }
        let info =
            cert_info(&leaf.1).map_err(|e| format!("tls_client_cert: {}: {e}", cert.source))?;
        let leaf_key = leaf_public_key(&leaf.1)
            .map_err(|e| format!("tls_client_cert: {}: {e}", cert.source))?;
        let key_public = private_key_public(key.value.expose())
            .map_err(|e| format!("tls_client_key: {}: {e}", key.source))?;
        if *key_public != leaf_key {
            return Err(format!(
                "tls_client_key: {} does not match the certificate of tls_client_cert {} (their public keys differ); \
                 install the key the certificate was issued for (a renewal replaces both files)",
                key.source, cert.source
            ));
        }
        let mut digest_input = Zeroizing::new(cert.value.expose().as_bytes().to_vec());
        digest_input.push(0);
        digest_input.extend_from_slice(key.value.expose().as_bytes());
        Ok(ClientCert {
            cert_source: cert.source,
            key_source: key.source,
            chain_pem: cert.value.expose().to_string(),
            key_material: key.value,
            info,
            digest: crate::secret::sha256_hex(&digest_input),
        })
    }

    /// The TLS client identity for reqwest: the chain, then the key.
    pub fn identity(&self) -> Result<reqwest::Identity, String> {
        let mut pem = Zeroizing::new(String::with_capacity(
            self.chain_pem.len() + self.key_material.expose().len() + 2,
        ));
        pem.push_str(self.chain_pem.trim_end());
        pem.push('\n');
        pem.push_str(self.key_material.expose().trim_end());
        pem.push('\n');
        reqwest::Identity::from_pem(pem.as_bytes()).map_err(|e| {
            format!(
                "tls_client_cert {} with tls_client_key {} cannot be used for TLS: {}",
                self.cert_source,
                self.key_source,
                super::chain(&e)
            )
        })
    }

    /// The chain's certificates, for a TLS client that checks the pair alone.
    pub fn chain_certificates(&self) -> Result<Vec<reqwest::Certificate>, String> {
        reqwest::Certificate::from_pem_bundle(self.chain_pem.as_bytes()).map_err(|e| {
            format!(
                "tls_client_cert: {} cannot be read as PEM certificates: {}",
                self.cert_source,
                super::chain(&e)
            )
        })
    }

    /// Files the pair is read from (the reload watcher watches them).
    pub fn paths(&self) -> Vec<std::path::PathBuf> {
        self.cert_source
            .path()
            .into_iter()
            .chain(self.key_source.path())
            .collect()
    }

    /// A one-line description for `check`: subject, expiry and time left at `now`.
    pub fn describe(&self, now: SystemTime) -> String {
        let left = match self.info.remaining(now).map(|d| d.as_secs()) {
            Some(s) if s >= 2 * 86400 => format!("in {} days", s / 86400),
            Some(s) if s >= 2 * 3600 => format!("in {} hours", s / 3600),
            Some(s) => format!("in {} minutes", s / 60),
            None => "EXPIRED".into(),
        };
        format!(
            "client certificate {}, not after {} ({left})",
            self.info.subject,
            self.info.not_after_text()
        )
    }

    /// The loader's verdict at `now`: `Err` once expired, a warning under
    /// [`EXPIRY_WARNING`] left.
    pub fn expiry_check(&self, now: SystemTime) -> Result<Option<String>, String> {
        let source = &self.cert_source;
        match self.info.remaining(now) {
            None => Err(format!(
                "tls_client_cert: the certificate in {source} ({}) expired at {}; renew it",
                self.info.subject,
                self.info.not_after_text()
            )),
            Some(left) if left < EXPIRY_WARNING => Ok(Some(format!(
                "tls_client_cert: the certificate in {source} ({}) expires in under 7 days, at {}; renew it",
                self.info.subject,
                self.info.not_after_text()
            ))),
            Some(_) => Ok(None),
        }
    }
}

/// Whether `client` presents a client certificate on its token requests (and so, with
/// discovery, uses `mtls_endpoint_aliases`, RFC 8705 §5).
pub fn has_client_cert(client: &ClientConfig) -> bool {
    client.tls_client.is_some()
}

/// A pool of one: the HTTP client of one token client with a certificate, and what it was built
/// from.
pub(super) struct CertPool {
    pub digest: String,
    pub ca_file: Option<std::path::PathBuf>,
    pub proxy: Option<crate::config::ProxyUrl>,
    pub client: reqwest::Client,
}

/// `x5t#S256` of a DER certificate (RFC 8705 §3.1).
pub fn thumbprint(der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// The PEM blocks of `text` (label, decoded contents, zeroed on drop); malformed blocks are
/// skipped.
fn pem_blocks(text: &str) -> Vec<(String, Zeroizing<Vec<u8>>)> {
    x509_parser::pem::Pem::iter_from_buffer(text.as_bytes())
        .filter_map(Result::ok)
        .map(|p| (p.label, Zeroizing::new(p.contents)))
        .collect()
}

/// What is shown about a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, String> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("the certificate cannot be parsed ({e})"))?;
    let mut san = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(s) => san.push(format!("DNS:{s}")),
                GeneralName::URI(s) => san.push(format!("URI:{s}")),
                GeneralName::RFC822Name(s) => san.push(format!("email:{s}")),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        san.push(format!("IP:{ip}"));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        san,
        not_after: cert.validity().not_after.timestamp(),
        thumbprint: thumbprint(der),
    })
}

/// The subjectPublicKey bits of a DER certificate.
fn leaf_public_key(der: &[u8]) -> Result<Vec<u8>, String> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("the certificate cannot be parsed ({e})"))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// The public key (as a certificate's subjectPublicKey bits hold it) of a PEM private key:
/// the uncompressed point for EC, RSAPublicKey DER for RSA, the 32 bytes for Ed25519.
fn private_key_public(pem: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING,
        ECDSA_P521_SHA512_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair,
    };
    let blocks = pem_blocks(pem);
    let mut keys = blocks.iter().filter(|(l, _)| l.ends_with("PRIVATE KEY"));
    let Some((label, der)) = keys.next() else {
        return Err(if blocks.iter().any(|(l, _)| l == "CERTIFICATE") {
            "holds a certificate, not a private key: give the key here and the certificate in tls_client_cert".into()
        } else {
            "holds no PEM private key (-----BEGIN PRIVATE KEY-----)".into()
        });
    };
    if keys.next().is_some() {
        return Err("holds more than one private key: give exactly one".into());
    }
    let public = |bytes: &[u8]| Ok(Zeroizing::new(bytes.to_vec()));
    let ec_curves = [
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        &ECDSA_P384_SHA384_ASN1_SIGNING,
        &ECDSA_P521_SHA512_ASN1_SIGNING,
    ];
    match label.as_str() {
        "ENCRYPTED PRIVATE KEY" => Err(
            "the key is encrypted; give an unencrypted PEM key (openssl pkcs8 -topk8 -nocrypt)"
                .into(),
        ),
        "RSA PRIVATE KEY" => RsaKeyPair::from_der(der)
            .map_err(|_| "not a valid RSA (PKCS#1) private key".to_string())
            .and_then(|k| public(k.public_key().as_ref())),
        "EC PRIVATE KEY" | "PRIVATE KEY" => {
            for curve in ec_curves {
                if let Ok(k) = EcdsaKeyPair::from_private_key_der(curve, der) {
                    return public(k.public_key().as_ref());
                }
            }
            if label == "PRIVATE KEY" {
                if let Ok(k) = RsaKeyPair::from_pkcs8(der) {
                    return public(k.public_key().as_ref());
                }
                if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
                    return public(k.public_key().as_ref());
                }
            }
            Err("not a usable private key (EC P-256/P-384/P-521, RSA or Ed25519)".into())
        }
        other => Err(format!("a {other} block is not a supported private key")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credential(text: &str) -> Credential {
        Credential {
            source: SecretSource::Inline(Secret::new("x")),
            value: Secret::new(text),
        }
    }

    fn self_signed(name: &str) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    #[test]
    fn thumbprint_is_base64url_sha256() {
        // sha256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
        assert_eq!(
            thumbprint(b"abc"),
            "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0"
        );
    }

    #[test]
    fn a_pair_is_checked_by_its_public_keys() {
        let (cert, key) = self_signed("client-a");
        let (_, other_key) = self_signed("client-b");
        let ok = ClientCert::new(credential(&cert), credential(&key)).unwrap();
        assert!(ok.info.subject.contains("rcgen"), "{:?}", ok.info);
        assert_eq!(ok.info.san, ["DNS:client-a"]);
        assert!(ok.identity().is_ok());
        let e = ClientCert::new(credential(&cert), credential(&other_key)).unwrap_err();
        assert!(e.contains("does not match"), "{e}");
        assert!(!e.contains(other_key.lines().nth(1).unwrap()), "{e}");
        // Swapped files, and a key where the chain belongs.
        let e = ClientCert::new(credential(&key), credential(&cert)).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
        let both = format!("{cert}{key}");
        let e = ClientCert::new(credential(&both), credential(&key)).unwrap_err();
        assert!(e.contains("holds a private key"), "{e}");
        // Debug shows no key.
        let shown = format!("{ok:?}");
        assert!(!shown.contains(key.lines().nth(1).unwrap()), "{shown}");
    }

    #[test]
    fn a_removed_clients_http_client_and_key_are_dropped() {
        let (cert, key) = self_signed("client-a");
        let mut c = crate::config::load_str(
            "[clients.c]\ntoken_url = \"https://127.0.0.1:9/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n",
            std::path::Path::new("/nonexistent/c.toml"),
        )
        .map(|cfg| (*cfg.clients["c"]).clone())
        .unwrap();
        c.tls_client = Some(std::sync::Arc::new(
            ClientCert::new(credential(&cert), credential(&key)).unwrap(),
        ));
        let http = crate::oauth::HttpClients::default();
        http.get(&c).unwrap();
        http.get(&c).unwrap();
        assert_eq!(http.with_cert_count(), 1, "built once, kept");
        http.forget("other");
        assert_eq!(http.with_cert_count(), 1);
        http.forget("c");
        assert_eq!(http.with_cert_count(), 0);
    }

    #[test]
    fn rsa_and_ed25519_keys_are_compared_too() {
        for alg in [
            &rcgen::PKCS_RSA_SHA256,
            &rcgen::PKCS_ED25519,
            &rcgen::PKCS_ECDSA_P384_SHA384,
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let other = rcgen::KeyPair::generate_for(alg).unwrap();
            let params = rcgen::CertificateParams::new(vec!["c".to_string()]).unwrap();
            let cert = params.self_signed(&key).unwrap().pem();
            ClientCert::new(credential(&cert), credential(&key.serialize_pem())).unwrap();
            let e =
                ClientCert::new(credential(&cert), credential(&other.serialize_pem())).unwrap_err();
            assert!(e.contains("does not match"), "{alg:?}: {e}");
        }
    }

    #[test]
    fn expiry_warns_under_seven_days_and_fails_once_past() {
        let (cert, key) = self_signed("c");
        let pair = ClientCert::new(credential(&cert), credential(&key)).unwrap();
        let at = |left: i64| {
            let t = pair.info.not_after - left;
            UNIX_EPOCH + Duration::from_secs(t as u64)
        };
        assert_eq!(pair.expiry_check(at(8 * 86400)), Ok(None));
        let w = pair.expiry_check(at(6 * 86400)).unwrap().unwrap();
        assert!(w.contains("under 7 days"), "{w}");
        let e = pair.expiry_check(at(-10)).unwrap_err();
        assert!(e.contains("expired"), "{e}");
        assert!(pair.describe(at(-10)).contains("EXPIRED"));
        assert!(pair.describe(at(3600)).ends_with("(in 60 minutes)"));
        assert!(pair.describe(at(5 * 3600)).ends_with("(in 5 hours)"));
        assert!(pair.describe(at(3 * 86400 + 5)).ends_with("(in 3 days)"));
    }

    #[test]
    fn key_errors_name_the_form_not_the_bytes() {
        let (cert, _) = self_signed("c");
        let e = private_key_public(&cert).unwrap_err();
        assert!(e.contains("certificate, not a private key"), "{e}");
        let e = private_key_public("hello").unwrap_err();
        assert!(e.contains("no PEM private key"), "{e}");
        let enc =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let e = private_key_public(enc).unwrap_err();
        assert!(e.contains("encrypted"), "{e}");
    }
}
