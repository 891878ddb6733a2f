//! The DEBUG line of each token request (`--log-level debug`): method, URL, grant, client
//! authentication method, proxy, HTTP status or why there was none, duration. Never a body or
//! a header value.

use std::time::Duration;

use super::{OAuthError, ResponseMeta, Route};
use crate::config::ClientConfig;

/// One DEBUG line per token request: where it went, how and how it ended. Never a body or a
/// header value; the URL without its query (it may carry a key) or user info.
pub(super) fn token_request(
    client: &ClientConfig,
    grant: &str,
    route: &Route,
    result: &Result<(ResponseMeta, Vec<u8>), OAuthError>,
    took: Duration,
) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let url = loggable_url(&client.token_url);
    let duration_ms = took.as_millis() as u64;
    let (client, client_auth) = (client.name.as_str(), client.client_auth.method_name());
    // "none", or the proxy and what chose it (never its credentials).
    let proxy = match route {
        Route::Direct(_) => "none".to_owned(),
        Route::Proxy { url, from } => format!("{url} (from {from})"),
    };
    let proxy = proxy.as_str();
    let (status, error, message) = match result {
        Ok((meta, _)) => (Some(meta.status), None, "token request"),
        Err(e) => (None, Some(e.to_string()), "token request got no answer"),
    };
    tracing::debug!(
        client,
        method = "POST",
        url = url.as_str(),
        grant,
        client_auth,
        proxy,
        status,
        error = error.as_deref(),
        duration_ms,
        "{message}"
    );
}

/// `url` without user info, and with `?…` for a query.
pub(super) fn loggable_url(url: &url::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    let had_query = u.query().is_some();
    u.set_query(None);
    u.set_fragment(None);
    let mut s = u.to_string();
    if had_query {
        s.push_str("?…");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_loses_user_info_and_query() {
        let cases = [
            (
                "https://idp.example/oauth/token",
                "https://idp.example/oauth/token",
            ),
            (
                "https://u:p4ss@idp.example/t?api_key=k3y#f",
                "https://idp.example/t?…",
            ),
            ("http://127.0.0.1:8080/t", "http://127.0.0.1:8080/t"),
        ];
        for (url, want) in cases {
            assert_eq!(loggable_url(&url::Url::parse(url).unwrap()), want);
        }
    }
}
