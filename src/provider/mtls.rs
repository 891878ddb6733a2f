//! Mutual-TLS client authentication and certificate-bound tokens (RFC 8705), as the built-in
//! provider checks them. Pure functions over the leaf certificate the TLS front recorded (DER).
//!
//! - `tls_client_auth` (§2.1): the certificate must chain to the CA registered for the client
//!   (its signature checked with that CA's key, its validity period current) and carry the
//!   registered subject: the subject DN, or one subject alternative name (§2.1.2).
//! - `self_signed_tls_client_auth` (§2.2): the certificate must be the one registered, compared
//!   by its SHA-256 thumbprint.
//! - Any client that presented a certificate, whatever its authentication method, gets a token
//!   bound to it: `cnf: {"x5t#S256": …}` (§3.1).

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::request::Reject;
use super::{ExpectedAuth, RegisteredClient};
use crate::oauth::{cert_info, thumbprint};

/// Which name of a `tls_client_auth` certificate identifies the client (RFC 8705 §2.1.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsSubject {
    /// `tls_client_auth_subject_dn`: the subject DN, as RFC 4514 writes it (`CN=client,O=Org`).
    Dn(String),
    /// `tls_client_auth_san_dns`: a DNS name among the subject alternative names.
    SanDns(String),
    /// `tls_client_auth_san_uri`: a URI among the subject alternative names (a SPIFFE ID).
    SanUri(String),
}

impl std::fmt::Display for TlsSubject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsSubject::Dn(s) => write!(f, "subject DN {s:?}"),
            TlsSubject::SanDns(s) => write!(f, "SAN DNS:{s}"),
            TlsSubject::SanUri(s) => write!(f, "SAN URI:{s}"),
        }
    }
}

/// The client, when its authentication method is a certificate and the presented one is right
/// (RFC 8705 §2); else 401 `invalid_client` saying what is wrong. Other methods pass (their
/// credentials were checked already; a certificate there only binds the token).
pub(super) fn check_certificate(
    client: RegisteredClient,
    client_cert: Option<&[u8]>,
    now: u64,
) -> Result<RegisteredClient, Reject> {
    let now = i64::try_from(now).unwrap_or(i64::MAX);
    let checked = match &client.auth {
        ExpectedAuth::TlsClientAuth { subject, ca_pem } => {
            check_pki(client_cert, subject, ca_pem, now)
        }
        ExpectedAuth::SelfSignedTlsClientAuth { thumbprint } => {
            check_self_signed(client_cert, thumbprint)
        }
        _ => Ok(()),
    };
    checked.map(|()| client).map_err(Reject::invalid_client)
}

/// The `x5t#S256` a token issued over this connection is bound to: the presented leaf's.
pub(super) fn confirmation(client_cert: Option<&[u8]>) -> Option<String> {
    client_cert.map(thumbprint)
}

/// RFC 8705 §2.1: the presented certificate was issued by `ca_pem`'s CA, is valid at `now`, and
/// names the client as `subject` says. The error is the `error_description`.
pub(super) fn check_pki(
    client_cert: Option<&[u8]>,
    subject: &TlsSubject,
    ca_pem: &str,
    now: i64,
) -> Result<(), String> {
    let der = client_cert.ok_or("tls_client_auth: no client certificate was presented")?;
    let (_, leaf) = X509Certificate::from_der(der)
        .map_err(|_| "tls_client_auth: the client certificate cannot be parsed")?;
    let ca_der = x509_parser::pem::Pem::iter_from_buffer(ca_pem.as_bytes())
        .filter_map(Result::ok)
        .find(|p| p.label == "CERTIFICATE")
        .ok_or("tls_client_auth: the provider has no CA registered for this client")?
        .contents;
    let (_, ca) = X509Certificate::from_der(&ca_der)
        .map_err(|_| "tls_client_auth: the registered CA cannot be parsed")?;
    if leaf.issuer() != ca.subject() || leaf.verify_signature(Some(ca.public_key())).is_err() {
        return Err(format!(
            "tls_client_auth: the client certificate ({}) was not issued by the CA this client is registered with",
            leaf.subject()
        ));
    }
    let validity = leaf.validity();
    if now < validity.not_before.timestamp() || now > validity.not_after.timestamp() {
        return Err(format!(
            "tls_client_auth: the client certificate ({}) is not valid now",
            leaf.subject()
        ));
    }
    if names(&leaf, subject) {
        Ok(())
    } else {
        Err(format!(
            "tls_client_auth: the client certificate ({}) does not carry the registered {subject}",
            leaf.subject()
        ))
    }
}

/// Whether `leaf` carries `subject`.
fn names(leaf: &X509Certificate<'_>, subject: &TlsSubject) -> bool {
    let sans = || {
        leaf.subject_alternative_name()
            .ok()
            .flatten()
            .map(|e| e.value.general_names.clone())
            .unwrap_or_default()
    };
    match subject {
        TlsSubject::Dn(dn) => leaf.subject().to_string() == *dn,
        TlsSubject::SanDns(name) => sans()
            .iter()
            .any(|g| matches!(g, GeneralName::DNSName(s) if s.eq_ignore_ascii_case(name))),
        TlsSubject::SanUri(uri) => sans()
            .iter()
            .any(|g| matches!(g, GeneralName::URI(s) if s == uri)),
    }
}

/// RFC 8705 §2.2: the presented certificate is the registered one (by `x5t#S256`).
pub(super) fn check_self_signed(
    client_cert: Option<&[u8]>,
    registered: &str,
) -> Result<(), String> {
    let der =
        client_cert.ok_or("self_signed_tls_client_auth: no client certificate was presented")?;
    if thumbprint(der) == registered {
        return Ok(());
    }
    let shown = cert_info(der)
        .map(|i| i.subject)
        .unwrap_or_else(|_| "unparsable".into());
    Err(format!(
        "self_signed_tls_client_auth: the client certificate ({shown}) is not the one registered for this client"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    fn ca() -> (String, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), Issuer::new(params, key))
    }

    fn leaf(issuer: &Issuer<'_, KeyPair>, cn: &str, san: &str) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![san.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.signed_by(&key, issuer).unwrap().der().to_vec()
    }

    #[test]
    fn pki_checks_issuer_subject_and_san() {
        let (ca_pem, issuer) = ca();
        let (other_ca, other_issuer) = ca();
        let der = leaf(&issuer, "client-1", "client-1.example");
        let now = unix_now();
        let dn = TlsSubject::Dn("CN=client-1".into());
        assert_eq!(check_pki(Some(&der), &dn, &ca_pem, now), Ok(()));
        let san = TlsSubject::SanDns("client-1.example".into());
        assert_eq!(check_pki(Some(&der), &san, &ca_pem, now), Ok(()));
        let e = check_pki(
            Some(&der),
            &TlsSubject::Dn("CN=client-2".into()),
            &ca_pem,
            now,
        )
        .unwrap_err();
        assert!(
            e.contains("does not carry the registered subject DN"),
            "{e}"
        );
        let e = check_pki(Some(&der), &dn, &other_ca, now).unwrap_err();
        assert!(e.contains("not issued by the CA"), "{e}");
        // Same subject, another CA (the issuer name matches, the signature does not).
        let forged = leaf(&other_issuer, "client-1", "client-1.example");
        let e = check_pki(Some(&forged), &dn, &ca_pem, now).unwrap_err();
        assert!(e.contains("not issued by the CA"), "{e}");
        let e = check_pki(None, &dn, &ca_pem, now).unwrap_err();
        assert!(e.contains("no client certificate"), "{e}");
        let e = check_pki(Some(&der), &dn, &ca_pem, i64::MAX / 2).unwrap_err();
        assert!(e.contains("not valid now"), "{e}");
    }

    #[test]
    fn self_signed_is_compared_by_thumbprint() {
        let a = rcgen::generate_simple_self_signed(vec!["a".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["a".into()]).unwrap();
        let registered = thumbprint(a.cert.der());
        assert_eq!(check_self_signed(Some(a.cert.der()), &registered), Ok(()));
        let e = check_self_signed(Some(b.cert.der()), &registered).unwrap_err();
        assert!(e.contains("not the one registered"), "{e}");
        assert!(check_self_signed(None, &registered).is_err());
        assert_eq!(confirmation(Some(a.cert.der())), Some(registered));
        assert_eq!(confirmation(None), None);
    }

    fn unix_now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }
}
