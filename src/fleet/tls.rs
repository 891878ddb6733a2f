//! TLS (and mTLS) to etcd with the rustls and aws-lc-rs that reqwest already brings, so that
//! tonic's own TLS layer (its `tls-aws-lc` feature) stays out of the binary: it turned rustls'
//! logging on, which compiles in a log call and its formatting at every handshake step, and
//! carried a second connector and config builder. The channel is given this connector
//! ([`tonic::transport::Endpoint::connect_with_connector`]): TCP, then a TLS handshake that
//! offers HTTP/2 (ALPN `h2`) and checks etcd's certificate against `ca_file` only.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// Connects to one etcd member over TLS, whatever URI the channel asks for (its own).
#[derive(Clone)]
pub struct Connector {
    tls: TlsConnector,
    server: ServerName<'static>,
    addr: String,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// For `endpoint` (`https://HOST:PORT`): trusts the certificates in `ca_pem`; presents
    /// `identity` (certificate chain PEM, private key PEM) when given. Errors name what is
    /// wrong, never a key's content.
    pub fn new(
        endpoint: &url::Url,
        ca_pem: &[u8],
        identity: Option<(&[u8], &[u8])>,
    ) -> Result<Connector, String> {
        let host = endpoint
            .host_str()
            .ok_or_else(|| "the endpoint has no host".to_string())?;
        let port = endpoint.port_or_known_default().unwrap_or(2379);
        // An IPv6 address comes bracketed from the URL; the certificate names it bare.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let server = ServerName::try_from(bare.to_string())
            .map_err(|e| format!("{host} cannot name a TLS server: {e}"))?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| format!("ca_file: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("ca_file: a certificate is not usable: {e}"))?;
        }
        if roots.is_empty() {
            return Err("ca_file holds no certificate".into());
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS settings: {e}"))?
            .with_root_certificates(roots);
        let mut config = match identity {
            Some((chain, key)) => {
                let chain = CertificateDer::pem_slice_iter(chain)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("cert: {e}"))?;
                if chain.is_empty() {
                    return Err("cert holds no certificate".into());
                }
                // The key's own error could quote it: say only that it did not parse.
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|_| "cert_key is not a PEM private key".to_string())?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("cert and cert_key: {e}"))?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Connector {
            tls: TlsConnector::from(Arc::new(config)),
            server,
            addr: format!("{host}:{port}"),
        })
    }
}

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let (tls, server, addr) = (self.tls.clone(), self.server.clone(), self.addr.clone());
        Box::pin(async move {
            let tcp = TcpStream::connect(addr.as_str()).await?;
            tcp.set_nodelay(true)?;
            let stream = tls.connect(server, tcp).await?;
            Ok(TokioIo::new(stream))
        })
    }
}
