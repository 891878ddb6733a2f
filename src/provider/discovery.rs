//! The provider's authorization server metadata (RFC 8414 §3) and its OpenID Connect
//! Discovery 1.0 (§4) twin, for clients configured with `issuer`.
//!
//! The issuer is the provider's base URL plus a path (default none; [`Provider::set_issuer_path`]).
//! Both documents are served with `GET` only:
//! - RFC 8414 §3.1: `/.well-known/oauth-authorization-server` + the issuer's path;
//! - OpenID Connect Discovery §4: the issuer's path + `/.well-known/openid-configuration`.
//!
//! They name the token endpoint of one dialect ([`Provider::publish_dialect`], default
//! Transatel), its grants, the client authentication methods the provider checks, and an
//! RFC 8705 §5 `mtls_endpoint_aliases.token_endpoint` (the same endpoint under `/mtls`).
//!
//! For the tests (feature `test-provider`): every token endpoint can be moved under a prefix
//! (the old paths then answer 404, [`Provider::move_token_endpoints`]), the documents can name
//! another issuer ([`Provider::serve_wrong_issuer`]), and the RFC 8414 one can be taken away
//! ([`Provider::serve_rfc8414`]) so that only the OpenID Connect one answers.

use serde_json::{Value, json};

use super::dialect::{Dialect, dialects_at};
use super::response::{Body, json_response, raw};
use super::{Endpoint, Provider, RecordedRequest};

/// The path prefix of the RFC 8705 §5 aliases.
pub const MTLS_PREFIX: &str = "/mtls";

/// What the metadata documents say, and where the token endpoints are.
#[derive(Debug)]
pub(super) struct Published {
    /// Appended to the base URL to make the issuer (`""` or `/realm`).
    issuer_path: String,
    /// Whose token endpoint the documents name.
    dialect: Dialect,
    /// Every token endpoint moved under this prefix; the old paths answer 404.
    moved_to: Option<String>,
    /// The documents name another issuer (a mix-up attempt, RFC 8414 §3.3).
    wrong_issuer: bool,
    /// The RFC 8414 document is served (else only the OpenID Connect one).
    rfc8414: bool,
}

impl Default for Published {
    fn default() -> Self {
        Published {
            issuer_path: String::new(),
            dialect: Dialect::Transatel,
            moved_to: None,
            wrong_issuer: false,
            rfc8414: true,
        }
    }
}

/// Which document a path asks for, if any.
#[derive(Debug, PartialEq, Eq)]
enum Document {
    Rfc8414,
    OpenIdConfiguration,
}

fn document_at(published: &Published, path: &str) -> Option<Document> {
    let issuer_path = published.issuer_path.as_str();
    if path == format!("/.well-known/oauth-authorization-server{issuer_path}") {
        return Some(Document::Rfc8414);
    }
    if path == format!("{issuer_path}/.well-known/openid-configuration") {
        return Some(Document::OpenIdConfiguration);
    }
    None
}

/// The token endpoint path of the dialect(s) a request to `path` is for, with the
/// endpoints moved or not: `None` for no token endpoint (404).
pub(super) fn token_path(endpoint: &Endpoint, path: &str) -> Option<String> {
    let moved = endpoint.lock().discovery.moved_to.clone();
    let path = path.strip_prefix(MTLS_PREFIX).unwrap_or(path);
    let path = match &moved {
        Some(prefix) => path.strip_prefix(prefix.as_str())?,
        None => path,
    };
    (!dialects_at(path).is_empty()).then(|| path.to_string())
}

/// The answer to a metadata request, or `None` when `req` is not one.
pub(super) fn answer(endpoint: &Endpoint, req: &RecordedRequest) -> Option<hyper::Response<Body>> {
    let st = endpoint.lock();
    let published = &st.discovery;
    let document = document_at(published, &req.path)?;
    if document == Document::Rfc8414 && !published.rfc8414 {
        return Some(raw(404, "text/plain; charset=utf-8", b"Not Found".to_vec()));
    }
    if req.method != "GET" {
        return Some(raw(
            405,
            "text/plain; charset=utf-8",
            b"metadata is read with GET".to_vec(),
        ));
    }
    let body = metadata(&endpoint.base_url(), published);
    Some(json_response(200, &body))
}

/// The metadata document (RFC 8414 §2).
fn metadata(base: &str, p: &Published) -> Value {
    let issuer = if p.wrong_issuer {
        format!("{base}/another-issuer{}", p.issuer_path)
    } else {
        format!("{base}{}", p.issuer_path)
    };
    let prefix = p.moved_to.as_deref().unwrap_or_default();
    let path = p.dialect.path();
    let grants: Vec<&str> = p.dialect.grants().iter().map(|g| g.as_str()).collect();
    json!({
        "issuer": issuer,
        "token_endpoint": format!("{base}{prefix}{path}"),
        "grant_types_supported": grants,
        "token_endpoint_auth_methods_supported": [
            "client_secret_basic", "client_secret_post", "client_secret_jwt", "private_key_jwt", "none"
        ],
        "token_endpoint_auth_signing_alg_values_supported": [
            "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
            "ES256", "ES384", "EdDSA"
        ],
        "mtls_endpoint_aliases": {
            "token_endpoint": format!("{base}{MTLS_PREFIX}{prefix}{path}"),
        },
    })
}

// === impl Provider ===

impl Provider {
    /// The issuer its metadata names: the base URL plus the issuer path.
    pub fn issuer(&self) -> String {
        let path = self.ledger().discovery.issuer_path.clone();
        format!("{}{path}", self.base_url())
    }

    /// Sets the issuer's path (`""`, or starting with `/` and not ending with one).
    pub fn set_issuer_path(&self, path: &str) {
        self.ledger().discovery.issuer_path = path.trim_end_matches('/').to_string();
    }

    /// Whose token endpoint the metadata names.
    pub fn publish_dialect(&self, dialect: Dialect) {
        self.ledger().discovery.dialect = dialect;
    }
}

#[cfg(feature = "test-provider")]
impl Provider {
    /// Moves every token endpoint under `prefix` (`Some("/v2")`: `/v2/transatel/…`), the old
    /// paths answering 404, and the metadata naming the new one; `None` moves them back.
    pub fn move_token_endpoints(&self, prefix: Option<&str>) {
        self.ledger().discovery.moved_to = prefix.map(|p| p.trim_end_matches('/').to_string());
    }

    /// Makes the metadata name another issuer than [`Provider::issuer`] (or not).
    pub fn serve_wrong_issuer(&self, wrong: bool) {
        self.ledger().discovery.wrong_issuer = wrong;
    }

    /// Serves the RFC 8414 document (the default) or answers 404 there, leaving the OpenID
    /// Connect one.
    pub fn serve_rfc8414(&self, on: bool) {
        self.ledger().discovery.rfc8414 = on;
    }

    /// The metadata requests received (either document), in order.
    pub fn metadata_requests(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.contains("/.well-known/"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_found_at_both_well_known_paths() {
        let mut p = Published::default();
        assert_eq!(
            document_at(&p, "/.well-known/oauth-authorization-server"),
            Some(Document::Rfc8414)
        );
        assert_eq!(
            document_at(&p, "/.well-known/openid-configuration"),
            Some(Document::OpenIdConfiguration)
        );
        p.issuer_path = "/realm".into();
        assert_eq!(
            document_at(&p, "/.well-known/oauth-authorization-server/realm"),
            Some(Document::Rfc8414)
        );
        assert_eq!(
            document_at(&p, "/realm/.well-known/openid-configuration"),
            Some(Document::OpenIdConfiguration)
        );
        assert_eq!(document_at(&p, "/.well-known/openid-configuration"), None);
        assert_eq!(
            document_at(&p, "/.well-known/oauth-authorization-server"),
            None
        );
    }

    #[test]
    fn metadata_names_the_published_endpoint() {
        let p = Published {
            issuer_path: "/realm".into(),
            moved_to: Some("/v2".into()),
            ..Published::default()
        };
        let m = metadata("https://127.0.0.1:1", &p);
        assert_eq!(m["issuer"], "https://127.0.0.1:1/realm");
        assert_eq!(
            m["token_endpoint"],
            "https://127.0.0.1:1/v2/transatel/authentication/api/token"
        );
        assert_eq!(
            m["mtls_endpoint_aliases"]["token_endpoint"],
            "https://127.0.0.1:1/mtls/v2/transatel/authentication/api/token"
        );
        assert_eq!(m["grant_types_supported"], json!(["client_credentials"]));
        let wrong = metadata(
            "https://127.0.0.1:1",
            &Published {
                wrong_issuer: true,
                ..Published::default()
            },
        );
        assert_ne!(wrong["issuer"], "https://127.0.0.1:1");
    }
}
