//! TLS to the token endpoint: verification is always on; `ca_file` adds a private CA on top of
//! the system store; a certificate from an unknown CA is refused.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use rcgen::{CertificateParams, KeyPair};
use tokenwarden::oauth::{self, OAuthError};
use tokenwarden::provider::{Dialect, RegisteredClient};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;

/// A CA (PEM) and a TLS token endpoint on 127.0.0.1 serving a leaf it signed for `localhost`.
async fn tls_endpoint() -> (String, u16) {
    let (ca_pem, leaf_pem, leaf_key_pem) = crate::support::test_ca();
    let leaf = rustls::pki_types::CertificateDer::from_pem_slice(leaf_pem.as_bytes()).unwrap();
    let leaf_key =
        rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf_key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf], leaf_key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_req| async {
                    let mut r = hyper::Response::new(Full::new(Bytes::from_static(
                        br#"{"access_token":"tls-token","token_type":"Bearer","expires_in":60}"#,
                    )));
                    r.headers_mut()
                        .insert("content-type", "application/json".parse().unwrap());
                    Ok::<_, std::convert::Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (ca_pem, port)
}

fn client(
    dir: &std::path::Path,
    port: u16,
    ca_file: Option<&str>,
) -> tokenwarden::config::ClientConfig {
    let ca = ca_file
        .map(|p| format!("ca_file = \"{p}\"\n"))
        .unwrap_or_default();
    let text = format!(
        "[clients.tls]\ntoken_url = \"https://localhost:{port}/token\"\nclient_id = \"c\"\nclient_secret = {{ file = \"secret\" }}\ntimeout = \"5s\"\n{ca}"
    );
    std::fs::write(dir.join("secret"), "s3cret").unwrap();
    let cfg = tokenwarden::config::load_str(&text, &dir.join("c.toml")).unwrap();
    (*cfg.clients["tls"]).clone()
}

#[tokio::test]
async fn a_private_ca_works_only_through_ca_file() {
    let (ca_pem, port) = tls_endpoint().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca_pem).unwrap();

    // Without ca_file the certificate is refused: verification is on.
    let c = client(dir.path(), port, None);
    let http = oauth::http_client(None).unwrap();
    let e = oauth::acquire(&http, &c, None, false)
        .await
        .unwrap_err()
        .error;
    assert!(matches!(e.inner(), OAuthError::Connect(_)), "{e:?}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");

    // With it, the token comes.
    let c = client(dir.path(), port, Some(ca_path.to_str().unwrap()));
    let http = oauth::http_client(c.ca_file.as_deref()).unwrap();
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        oauth::acquire(&http, &c, None, false),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(got.issued.token.access_token.expose(), "tls-token");
    assert_eq!(got.issued.token.lifetime(), Duration::from_secs(60));

    // A ca_file that holds no certificate is a clear error, and a config error at load
    // (`tokenwarden check`), located at the ca_file value.
    std::fs::write(&ca_path, "not a certificate").unwrap();
    let e = oauth::http_client(Some(&ca_path)).unwrap_err();
    assert!(e.to_string().contains("ca_file"), "{e}");
    let text = format!(
        "[clients.tls]\ntoken_url = \"https://localhost:{port}/token\"\nclient_id = \"c\"\n\
         client_secret = {{ file = \"secret\" }}\nca_file = \"ca.pem\"\n"
    );
    let errors = tokenwarden::config::load_str(&text, &dir.path().join("c.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains("c.toml:5:11: ca_file ") && errors.contains("holds no PEM certificate"),
        "{errors}"
    );
}

/// A certificate verification failure is told once: our own error names the client and the
/// failure; rustls-platform-verifier's second, context-free ERROR line is capped.
#[tokio::test]
async fn a_verification_failure_is_one_error_line() {
    let (_ca_pem, port) = tls_endpoint().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[daemon]\nstate_dir = \"{}\"\n[clients.tls]\ntoken_url = \"https://localhost:{port}/token\"\nclient_id = \"c\"\nclient_secret = {{ file = \"secret\" }}\ntimeout = \"5s\"\n",
        dir.path().join("state").display()
    );
    std::fs::write(dir.path().join("secret"), "s3cret").unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, text).unwrap();
    for level in ["warn", "trace"] {
        let r =
            crate::support::run(&["once", "-c", config.to_str().unwrap(), "--log-level", level])
                .await;
        assert_ne!(r.code, 0);
        let errors: Vec<&str> = r
            .stderr
            .lines()
            // The DEBUG line of the request (at trace) names the failure too; it is not an
            // error line.
            .filter(|l| {
                !l.contains(" DEBUG ") && (l.contains("ERROR") || l.contains("certificate"))
            })
            .collect();
        assert_eq!(errors.len(), 1, "at {level}:\n{}", r.stderr);
        assert!(errors[0].contains("tls"), "names the client: {}", errors[0]);
    }
}

/// The built-in provider over HTTPS: a client trusting the test CA through `ca_file` gets its
/// token; a client certificate, when one is presented, is what the provider records.
#[tokio::test]
async fn the_built_in_provider_speaks_https_and_sees_the_client_certificate() {
    let (provider, ca_pem) = crate::support::tls_provider().await;
    assert!(provider.base_url().starts_with("https://127.0.0.1:"));
    provider.register(RegisteredClient::transatel("c", "s3cret"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
    std::fs::write(dir.path().join("secret"), "s3cret").unwrap();
    let text = format!(
        "[clients.tls]\ntoken_url = \"{}\"\nclient_id = \"c\"\nclient_secret = {{ file = \"secret\" }}\nca_file = \"ca.pem\"\n",
        provider.token_url(Dialect::Transatel)
    );
    let cfg = tokenwarden::config::load_str(&text, &dir.path().join("c.toml")).unwrap();
    let c = &cfg.clients["tls"];
    let http = oauth::http_client(c.ca_file.as_deref()).unwrap();
    let got = oauth::acquire(&http, c, None, false).await.unwrap();
    assert!(!got.issued.token.access_token.expose().is_empty());
    assert_eq!(provider.requests().last().unwrap().client_cert, None);

    // With a (self-signed) client certificate, the provider records exactly that certificate.
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["client.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let identity =
        reqwest::Identity::from_pem(format!("{}{}", cert.pem(), key.serialize_pem()).as_bytes())
            .unwrap();
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap();
    let http = reqwest::Client::builder()
        .tls_certs_only([ca])
        .identity(identity)
        .build()
        .unwrap();
    let r = http
        .post(provider.token_url(Dialect::Transatel))
        .basic_auth("c", Some("s3cret"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = provider.requests().last().unwrap().client_cert.clone();
    assert_eq!(seen.as_deref(), Some(cert.der().as_ref()));
}
