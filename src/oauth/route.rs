//! Whether a token request goes through a proxy, and which one.
//!
//! The rules, in order:
//! 1. A loopback token URL (`127.0.0.0/8`, `::1`, `localhost` and `*.localhost`) is never
//!    proxied, not even through a client's own `proxy`: a proxy elsewhere cannot reach this
//!    host's loopback, and sending a local endpoint's credentials off the host would leak them.
//! 2. A client's `proxy = "none"` goes direct; `proxy = "URL"` goes through that proxy.
//! 3. Otherwise the environment decides as curl reads it: `https_proxy`/`HTTPS_PROXY` for
//!    `https` URLs, `http_proxy`/`HTTP_PROXY` for `http` ones, then `all_proxy`/`ALL_PROXY` (the
//!    lower-case name first; a value without a scheme means `http://`), unless
//!    `no_proxy`/`NO_PROXY` names the host: `*`, a domain (matching it and its subdomains, a
//!    leading dot optional), an IP address or a CIDR block.
//!
//! Pure: the environment comes in as a function, so tests pass their own.

use std::fmt;
use std::net::IpAddr;

use super::error::OAuthError;
use crate::config::{ClientConfig, ProxyConfig, ProxyUrl};

/// How a token request reaches its endpoint. `Display` names it for errors and debug logs,
/// never with the proxy's credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Straight to the endpoint, and why no proxy.
    Direct(String),
    /// Through `url`, chosen by `from` (`HTTPS_PROXY`, the client's `proxy`, …).
    Proxy { url: ProxyUrl, from: String },
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Direct(why) => write!(f, "directly (no proxy: {why})"),
            Route::Proxy { url, from } => write!(f, "through proxy {url} (from {from})"),
        }
    }
}

/// The route of `client`'s token requests, with `env` giving the environment's variables.
/// An unusable proxy variable is an error naming it (not a silent direct connection).
pub fn route(
    client: &ClientConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Route, OAuthError> {
    let url = &client.token_url;
    let host = url.host_str().unwrap_or_default();
    if is_loopback(host) {
        return Ok(Route::Direct("loopback is never proxied".into()));
    }
    match &client.proxy {
        ProxyConfig::None => return Ok(Route::Direct("proxy = \"none\"".into())),
        ProxyConfig::Url(p) => {
            return Ok(Route::Proxy {
                url: p.clone(),
                from: "the client's proxy".into(),
            });
        }
        ProxyConfig::Env => {}
    }
    let names: [&str; 4] = if url.scheme() == "https" {
        ["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]
    } else {
        ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
    };
    let Some((name, value)) = names.iter().find_map(|n| env(n).map(|v| (*n, v))) else {
        return Ok(Route::Direct("no proxy variable is set".into()));
    };
    for n in ["no_proxy", "NO_PROXY"] {
        if let Some(list) = env(n) {
            if no_proxy_matches(&list, host) {
                return Ok(Route::Direct(format!("{n} names {host}")));
            }
            // curl reads the first one set.
            break;
        }
    }
    let text = if value.contains("://") {
        value
    } else {
        format!("http://{}", value.trim())
    };
    let url = ProxyUrl::parse(&text).map_err(|e| {
        OAuthError::Request(format!(
            "{name} is not a usable proxy: {e}; fix it, or set proxy = \"none\" (or a proxy URL) for client {}",
            client.name
        ))
    })?;
    Ok(Route::Proxy {
        url,
        from: name.into(),
    })
}

/// Whether `host` (as a URL spells it) is a loopback name or address.
pub fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => {
            let h = bare.trim_end_matches('.').to_ascii_lowercase();
            h == "localhost" || h.ends_with(".localhost")
        }
    }
}

/// Whether a `NO_PROXY` list names `host`, as curl reads it: comma-separated entries, `*` for
/// every host, a domain for itself and its subdomains (`.example.com` and `example.com` alike),
/// an IP address, or a CIDR block (`10.0.0.0/8`). A `:port` on an entry is ignored.
pub fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let ip = host.parse::<IpAddr>().ok();
    list.split(',').map(str::trim).any(|entry| {
        if entry == "*" {
            return true;
        }
        let entry = entry.to_ascii_lowercase();
        let entry = strip_port(&entry);
        if let Some((net, bits)) = entry.split_once('/') {
            return match (ip, net.parse::<IpAddr>(), bits.parse::<u8>()) {
                (Some(ip), Ok(net), Ok(bits)) => in_cidr(ip, net, bits),
                _ => false,
            };
        }
        if let (Some(ip), Ok(e)) = (ip, entry.parse::<IpAddr>()) {
            return ip == e;
        }
        let domain = entry.trim_start_matches('.').trim_end_matches('.');
        !domain.is_empty()
            && (host == domain
                || host
                    .strip_suffix(domain)
                    .is_some_and(|rest| rest.ends_with('.')))
    })
}

/// `host:port` → `host`; `[v6]:port` and `[v6]` → `v6`; a bare IPv6 address stays whole.
fn strip_port(entry: &str) -> &str {
    if let Some(rest) = entry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    match entry.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => entry,
    }
}

fn in_cidr(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) if bits <= 32 => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) if bits <= 128 => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn client(url: &str, proxy: ProxyConfig) -> ClientConfig {
        let mut c = crate::config::load_str(
            &format!(
                "[clients.c]\ntoken_url = \"{url}\"\nclient_id = \"c\"\nclient_secret = \"s3cret\"\n"
            ),
            std::path::Path::new("/nonexistent/c.toml"),
        )
        .map(|cfg| (*cfg.clients["c"]).clone())
        .unwrap();
        c.proxy = proxy;
        c
    }

    fn shown(url: &str, proxy: ProxyConfig, vars: &[(&str, &str)]) -> String {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match route(&client(url, proxy), |n| vars.get(n).cloned()) {
            Ok(r) => r.to_string(),
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn routes() {
        let explicit =
            ProxyConfig::Url(ProxyUrl::parse("http://user:pw-secret@proxy.corp:3128").unwrap());
        let env = ProxyConfig::Env;
        let ext = "https://idp.example/token";
        type Case<'a> = (&'a str, ProxyConfig, Vec<(&'a str, &'a str)>, &'a str);
        let cases: Vec<Case> = vec![
            (
                ext,
                env.clone(),
                vec![],
                "directly (no proxy: no proxy variable is set)",
            ),
            (
                ext,
                env.clone(),
                vec![("HTTPS_PROXY", "http://p:1")],
                "through proxy http://p:1 (from HTTPS_PROXY)",
            ),
            (
                ext,
                env.clone(),
                vec![("HTTPS_PROXY", "http://p:1"), ("https_proxy", "http://q:2")],
                "through proxy http://q:2 (from https_proxy)",
            ),
            (
                ext,
                env.clone(),
                vec![("ALL_PROXY", "p:8080")],
                "through proxy http://p:8080 (from ALL_PROXY)",
            ),
            // HTTP_PROXY is for http URLs only.
            (
                ext,
                env.clone(),
                vec![("HTTP_PROXY", "http://p:1")],
                "directly (no proxy: no proxy variable is set)",
            ),
            (
                ext,
                env.clone(),
                vec![("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", "example")],
                "directly (no proxy: NO_PROXY names idp.example)",
            ),
            // Loopback: never, even with the client's own proxy.
            (
                "http://127.0.0.1:8080/token",
                explicit.clone(),
                vec![("HTTP_PROXY", "http://p:1")],
                "directly (no proxy: loopback is never proxied)",
            ),
            (
                "http://localhost:8080/token",
                env.clone(),
                vec![("http_proxy", "http://p:1"), ("ALL_PROXY", "http://p:1")],
                "directly (no proxy: loopback is never proxied)",
            ),
            (
                "http://[::1]:8080/token",
                env.clone(),
                vec![("http_proxy", "http://p:1")],
                "directly (no proxy: loopback is never proxied)",
            ),
            // The client's setting wins over the environment, and hides the password.
            (
                ext,
                explicit.clone(),
                vec![("NO_PROXY", "*")],
                "through proxy http://proxy.corp:3128 (from the client's proxy)",
            ),
            (
                ext,
                ProxyConfig::None,
                vec![("HTTPS_PROXY", "http://p:1")],
                "directly (no proxy: proxy = \"none\")",
            ),
            (
                ext,
                env.clone(),
                vec![("HTTPS_PROXY", "socks5://u:hunter2@p:1")],
                "error: cannot build the token request: HTTPS_PROXY is not a usable proxy: socks5://p:1: SOCKS proxies are not supported",
            ),
        ];
        for (url, proxy, vars, want) in cases {
            let got = shown(url, proxy, &vars);
            assert!(got.starts_with(want), "{url} {vars:?}: {got}");
            assert!(
                !got.contains("pw-secret") && !got.contains("hunter2"),
                "{got}"
            );
        }
    }

    #[test]
    fn no_proxy_lists() {
        let cases = [
            ("*", "a.example", true),
            ("example.com", "example.com", true),
            ("example.com", "api.example.com", true),
            (".example.com", "api.example.com", true),
            ("example.com", "notexample.com", false),
            ("a.example, b.example", "b.example", true),
            ("example.com:443", "example.com", true),
            ("10.0.0.0/8", "10.1.2.3", true),
            ("10.0.0.0/8", "11.1.2.3", false),
            ("192.168.1.5", "192.168.1.5", true),
            ("[::1]", "[::1]", true),
            ("fd00::/8", "fd12::1", true),
            ("", "example.com", false),
        ];
        for (list, host, want) in cases {
            assert_eq!(no_proxy_matches(list, host), want, "{list:?} {host}");
        }
    }

    #[test]
    fn proxy_key_in_the_config() {
        let load = |url: &str, proxy: &str| {
            crate::config::load_str(
                &format!(
                    "[clients.c]\ntoken_url = \"{url}\"\nclient_id = \"c\"\nclient_secret = \"s3cret\"\nproxy = \"{proxy}\"\n"
                ),
                std::path::Path::new("/nonexistent/c.toml"),
            )
        };
        let c = load("https://idp.example/token", "none").unwrap();
        assert_eq!(c.clients["c"].proxy, ProxyConfig::None);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let c = load("http://127.0.0.1:9/token", "http://u:pw-7@p.example:3128").unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("never proxied"), "{:?}", c.warnings);
        assert!(!c.warnings[0].contains("pw-7"), "{:?}", c.warnings);
        let e = load("https://idp.example/token", "socks5://u:pw-7@p:1080")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("5:9: proxy: socks5://p:1080: SOCKS proxies are not supported"),
            "{e}"
        );
        assert!(!e.contains("pw-7"), "{e}");
    }

    #[test]
    fn proxy_urls() {
        assert!(ProxyUrl::parse("http://p.example:3128").is_ok());
        assert!(ProxyUrl::parse("https://p.example").is_ok());
        for (text, want) in [
            ("socks5://u:pw-9@p:1080", "SOCKS proxies are not supported"),
            ("ftp://u:pw-9@p", "starts with http:// or https://"),
            ("http://u:pw-9@p:3128/path", "no path or query"),
            ("p.example:3128", "starts with http://"),
            ("not a url", "not a URL"),
        ] {
            let e = ProxyUrl::parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
            assert!(!e.contains("pw-9"), "{e}");
        }
        let p = ProxyUrl::parse("http://user:p%40ss@p.example:3128").unwrap();
        assert_eq!(p.to_string(), "http://p.example:3128");
        assert!(!format!("{p:?}").contains("p%40ss"));
        assert_eq!(p.password().as_deref(), Some("p@ss"));
    }
}
