//! A hostile token endpoint: successes whose body is not a token response but holds tokens,
//! and errors that quote back every secret the request carried (the client secret, the
//! password, the Basic value and its decoded parts, assertions, refresh tokens), some of them
//! right across the length a description is cut to. Whatever it sends, no secret and no token
//! reaches the daemon's trace logs, `status --json`, the gRPC error text or `once`'s stderr,
//! and the error still names the status, content type and length.

use std::time::Duration;

use tokenwarden::provider::Fault;

use crate::support::{DaemonProc, DemoEnv, run, run_env, secret_material};

/// A body the provider sends, and what the error must still say about it.
struct Hostile {
    name: &'static str,
    fault: Fault,
    says: &'static str,
}

/// Made-up tokens the hostile provider puts in its bodies, never sent by tokenwarden.
struct Planted {
    access: String,
    refresh: String,
    jwt: String,
}

impl Planted {
    fn new() -> Planted {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let id = uuid::Uuid::new_v4().simple().to_string();
        Planted {
            access: format!("AT-planted-{id}"),
            refresh: format!("RT-planted-{id}"),
            jwt: format!(
                "{}.{}.{}",
                b64(r#"{"alg":"HS256","typ":"JWT"}"#),
                b64(&format!(r#"{{"sub":"planted-{id}","exp":4102444800}}"#)),
                b64(&format!("sig-{id}"))
            ),
        }
    }

    fn all(&self) -> Vec<String> {
        vec![self.access.clone(), self.refresh.clone(), self.jwt.clone()]
    }
}

fn custom(status: u16, content_type: &str, body: String) -> Fault {
    Fault::Custom {
        status,
        content_type: content_type.into(),
        body: body.into_bytes(),
    }
}

fn hostile_bodies(p: &Planted) -> Vec<Hostile> {
    let (at, rt, jwt) = (&p.access, &p.refresh, &p.jwt);
    vec![
        Hostile {
            name: "form-encoded success under a JSON-less content type",
            fault: custom(
                200,
                "text/plain",
                format!("access_token={at}&refresh_token={rt}&expires_in=60"),
            ),
            says: "(HTTP 200, text/plain,",
        },
        Hostile {
            name: "trailing bytes after the JSON",
            fault: custom(
                200,
                "application/json",
                format!(r#"{{"access_token":"{at}","refresh_token":"{rt}"}} {at}"#),
            ),
            says: "(HTTP 200, application/json,",
        },
        Hostile {
            name: "expires_in 1e400",
            fault: custom(
                200,
                "application/json",
                format!(r#"{{"access_token":"{at}","refresh_token":"{rt}","expires_in":1e400}}"#),
            ),
            says: "syntax error at line 1",
        },
        Hostile {
            name: "a huge integer expires_in",
            fault: custom(
                200,
                "application/json",
                format!(
                    r#"{{"access_token":"{jwt}","refresh_token":"{rt}","expires_in":1{}}}"#,
                    "0".repeat(400)
                ),
            ),
            says: "(HTTP 200, application/json,",
        },
        Hostile {
            name: "the token in an unexpected type",
            fault: custom(
                200,
                "application/json",
                format!(r#"{{"access_token":{{"value":"{at}"}},"token_type":["{rt}"]}}"#),
            ),
            says: "access_token is a object",
        },
        Hostile {
            name: "expires_in quoting a token",
            fault: custom(
                200,
                "application/json",
                format!(r#"{{"access_token":"{at}","expires_in":"{rt}"}}"#),
            ),
            says: "expires_in is a string that is not a number",
        },
        Hostile {
            name: "an HTML page with tokens in a success",
            fault: custom(
                200,
                "text/html",
                format!("<html><p>your token: {at}</p><p>{jwt}</p></html>"),
            ),
            says: "(HTTP 200, text/html,",
        },
        Hostile {
            name: "an error quoting every value sent",
            fault: Fault::Echo {
                status: 401,
                html: false,
                pad: 0,
            },
            says: "invalid_client: client secret",
        },
        Hostile {
            name: "an error quoting every value sent, the first across the 300-character cut",
            fault: Fault::Echo {
                status: 400,
                html: false,
                pad: 282,
            },
            says: "(HTTP 400",
        },
        Hostile {
            name: "an HTML error page quoting every value sent",
            fault: Fault::Echo {
                status: 502,
                html: true,
                pad: 0,
            },
            says: "HTTP 502 from the token endpoint: <html>",
        },
        Hostile {
            name: "an HTML error page quoting every value sent across the 200-character cut",
            fault: Fault::Echo {
                status: 503,
                html: true,
                pad: 161,
            },
            says: "HTTP 503 from the token endpoint",
        },
        Hostile {
            name: "an error quoting tokens it never issued to us",
            fault: custom(
                400,
                "application/json",
                serde_json::json!({
                    "error": "invalid_grant",
                    "error_description": format!(
                        "refresh_token={rt} is revoked; id_token: {jwt}; access_token \"{at}\""
                    ),
                })
                .to_string(),
            ),
            says: "invalid_grant: refresh_token=[redacted] is revoked",
        },
    ]
}

/// Fails if `text` (shown at `place`) holds any secret so far, then if it does not say `says`.
fn check(env: &DemoEnv, planted: &Planted, place: &str, text: &str, says: &str) {
    let found: Vec<String> = secret_material(env, planted.all())
        .into_iter()
        .filter(|s| text.contains(s.as_str()))
        .collect();
    assert!(found.is_empty(), "{place} shows {found:?}:\n{text}");
    assert!(
        text.contains(says),
        "{place} does not say {says:?}:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_answers_leak_no_secret() {
    let env = DemoEnv::start(Duration::from_secs(3600)).await;
    env.edit_config(|t| {
        t.replace("log_level = \"info\"", "log_level = \"trace\"")
            .replace("retry_initial = \"1s\"", "retry_initial = \"30s\"")
            .replace("retry_max = \"10s\"", "retry_max = \"60s\"")
            // Every `refresh` asks the provider, however soon after the last token.
            .replace("min_interval = \"2s\"", "min_interval = \"0s\"")
    });
    let planted = Planted::new();
    let cases = hostile_bodies(&planted);
    let config = env.config_path().to_string();

    // `once`, with no state: the first request of every client meets the hostile answer.
    for case in &cases {
        env.provider.set_fault(Some(case.fault.clone()));
        let r = run_env(
            &["once", "-c", &config, "--log-level", "trace"],
            &[("TOKENWARDEN_LOG", "trace")],
        )
        .await;
        assert_ne!(r.code, 0, "{}: once succeeded", case.name);
        let place = format!("once, {}", case.name);
        check(&env, &planted, &place, &(r.stderr + &r.stdout), case.says);
    }

    // The daemon: good tokens first (so creads-files holds a refresh token to present), then
    // every hostile answer to a refresh of every client.
    env.provider.set_fault(None);
    let (mut daemon, _notify, ready) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    assert!(ready.contains("5/5 clients valid"), "{ready}");
    let socket = env.demo.socket.to_str().unwrap().to_string();
    for case in &cases {
        env.provider.set_fault(Some(case.fault.clone()));
        for client in &env.demo.clients {
            let r = run(&["refresh", client, "-s", &socket]).await;
            assert_ne!(r.code, 0, "{}: refresh {client} succeeded", case.name);
            let place = format!("the gRPC error of refresh {client}, {}", case.name);
            check(&env, &planted, &place, &(r.stderr + &r.stdout), case.says);
        }
        let status = run(&["status", "--json", "-s", &socket]).await;
        let place = format!("status --json, {}", case.name);
        check(&env, &planted, &place, &status.stdout, case.says);
    }
    daemon.stop().await;

    let secrets = secret_material(&env, planted.all());
    assert!(
        secrets.iter().any(|s| s.starts_with("twr_")),
        "a refresh token was presented"
    );
    assert!(
        secrets.iter().any(|s| s.starts_with("eyJ")),
        "assertions were sent"
    );
    check(
        &env,
        &planted,
        "the daemon's trace log",
        &daemon.logs(),
        "token request failed",
    );
}

// === refresh-token chains ===

/// Turns the demo's creads-files client into a `refresh_token`-grant client bootstrapped from
/// the refresh token in `secrets/creads-rt`, retrying fast.
fn refresh_token_client(env: &DemoEnv, bootstrap: &str) -> std::path::PathBuf {
    let rt_file = env.demo.dir.join("secrets").join("creads-rt");
    write_secret(&rt_file, bootstrap);
    let q = format!("{:?}", rt_file.display().to_string());
    env.edit_config(|t| {
        t.lines()
            .filter(|l| !l.starts_with("username =") && !l.starts_with("password ="))
            .map(|l| {
                if l == "grant_type = \"password\"" {
                    format!("grant_type = \"refresh_token\"\nrefresh_token = {{ file = {q} }}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            .replace("retry_max = \"10s\"", "retry_max = \"2s\"")
            .replace("min_interval = \"2s\"", "min_interval = \"0s\"")
    });
    rt_file
}

/// Replaces a secret file the way an operator's tooling does: a new file renamed over it.
fn write_secret(path: &std::path::Path, value: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, value).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Every refresh token the provider was shown for creads, in order.
fn presented(env: &DemoEnv) -> Vec<String> {
    env.provider
        .requests()
        .iter()
        .filter(|r| r.path.contains("creads"))
        .filter_map(|r| r.form_value("refresh_token").map(str::to_string))
        .collect()
}

fn assert_never_presented_twice(env: &DemoEnv) {
    let seen = presented(env);
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "a refresh token presented twice");
    assert_eq!(env.provider.reuse_detected(tokenwarden::demo::CREADS_ID), 0);
}

fn creads_status(socket: &str) -> serde_json::Value {
    let out = std::process::Command::new(crate::support::bin())
        .args(["status", "--json", "-s", socket])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .and_then(|a| a.iter().find(|c| c["client"] == "creads-files").cloned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_chain_never_replays_its_bootstrap() {
    use tokenwarden::demo::CREADS_ID;
    let env = DemoEnv::start(Duration::from_secs(3600)).await;
    let bootstrap = env.provider.mint_refresh_token(CREADS_ID, &["files"]);
    let rt_file = refresh_token_client(&env, &bootstrap);
    let socket = env.demo.socket.to_str().unwrap().to_string();
    let (mut daemon, _notify, ready) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    assert!(ready.contains("5/5 clients valid"), "{ready}");
    assert_eq!(presented(&env), std::slice::from_ref(&bootstrap));

    // The provider ends the chain: the stored (rotated) refresh token is refused.
    env.provider.revoke_refresh_tokens(CREADS_ID);
    let r = run(&["refresh", "creads-files", "-s", &socket]).await;
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("supply a new refresh token"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&rt_file.display().to_string()),
        "names the secret file: {}",
        r.stderr
    );
    // Retries come and go (at most 2 s apart) without presenting anything.
    crate::support::wait_for("three failures", Duration::from_secs(20), || {
        creads_status(&socket)["consecutive_failures"]
            .as_u64()
            .is_some_and(|n| n >= 3)
    })
    .await;
    let status = creads_status(&socket);
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("supply a new refresh token")),
        "{status}"
    );
    assert_eq!(presented(&env).len(), 2, "{:?}", presented(&env));
    assert_never_presented_twice(&env);

    // A restart remembers that the bootstrap was used.
    daemon.stop().await;
    let before = env.provider.requests().len();
    let (mut daemon, _notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    let r = run(&["refresh", "creads-files", "-s", &socket]).await;
    assert!(
        r.stderr.contains("supply a new refresh token"),
        "{}",
        r.stderr
    );
    assert_eq!(
        env.provider.requests()[before..]
            .iter()
            .filter(|r| r.path.contains("creads"))
            .count(),
        0,
        "no request for a chain known dead"
    );

    // A new refresh token in the secret file resumes the client.
    let fresh = env.provider.mint_refresh_token(CREADS_ID, &["files"]);
    write_secret(&rt_file, &fresh);
    crate::support::wait_for("creads-files valid again", Duration::from_secs(20), || {
        let s = creads_status(&socket);
        s["state"] == "VALID" && s["consecutive_failures"] == 0
    })
    .await;
    assert!(presented(&env).contains(&fresh));
    assert_never_presented_twice(&env);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_bootstrap_is_not_presented_again() {
    use tokenwarden::demo::CREADS_ID;
    let env = DemoEnv::start(Duration::from_secs(3600)).await;
    let bootstrap = env.provider.mint_refresh_token(CREADS_ID, &["files"]);
    let rt_file = refresh_token_client(&env, &bootstrap);
    env.provider.revoke_refresh_tokens(CREADS_ID);
    let config = env.config_path().to_string();
    for _ in 0..2 {
        let r = run(&["once", "-c", &config, "creads-files"]).await;
        assert_ne!(r.code, 0);
        assert!(
            r.stderr.contains("supply a new refresh token"),
            "{}",
            r.stderr
        );
    }
    assert_eq!(
        presented(&env),
        std::slice::from_ref(&bootstrap),
        "presented once"
    );

    // The daemon starts with it FAILED, asking nothing.
    let socket = env.demo.socket.to_str().unwrap().to_string();
    let (mut daemon, _notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    let status = creads_status(&socket);
    assert_eq!(status["state"], "FAILED", "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("supply a new refresh token")),
        "{status}"
    );
    assert_eq!(
        presented(&env),
        std::slice::from_ref(&bootstrap),
        "presented once"
    );

    let fresh = env.provider.mint_refresh_token(CREADS_ID, &["files"]);
    write_secret(&rt_file, &fresh);
    crate::support::wait_for("creads-files valid", Duration::from_secs(20), || {
        creads_status(&socket)["state"] == "VALID"
    })
    .await;
    assert_never_presented_twice(&env);
    daemon.stop().await;
}

// === proxies ===

/// The host name the proxied token URL uses: never resolved by tokenwarden when proxied.
const PROXIED_HOST: &str = "tokens.example.invalid";

/// A CA (PEM) and a TLS acceptor for a leaf it signed for [`PROXIED_HOST`].
fn proxied_tls() -> (String, tokio_rustls::TlsAcceptor) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use tokio_rustls::rustls;
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(vec![PROXIED_HOST.to_string()]).unwrap();
    leaf_params.is_ca = IsCa::ExplicitNoCa;
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    (
        ca_cert.pem(),
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)),
    )
}

/// A forward proxy on 127.0.0.1:0 that records the head of every request (`CONNECT host:port`
/// and its headers, or a plain `POST http://…`), answers `CONNECT` to [`PROXIED_HOST`]:443 by
/// terminating TLS for it and passing the plaintext on to `upstream`, and anything else 502.
struct FakeProxy {
    port: u16,
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakeProxy {
    async fn start(upstream: std::net::SocketAddr, tls: tokio_rustls::TlsAcceptor) -> FakeProxy {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = heads.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let seen = seen.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
                        if conn.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    seen.lock().unwrap().push(head.clone());
                    if !head.starts_with(&format!("CONNECT {PROXIED_HOST}:443 ")) {
                        let _ = conn
                            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                            .await;
                        return;
                    }
                    if conn
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let Ok(mut tunnel) = tls.accept(conn).await else {
                        return;
                    };
                    let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tunnel, &mut up).await;
                });
            }
        });
        FakeProxy { port, heads }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// The demo's transatel client moved to `https://tokens.example.invalid/…` with the test CA
/// (and `proxy_line` added when not empty); every other client stays on loopback.
fn proxied_config(env: &DemoEnv, ca_pem: &str, proxy_line: &str) {
    let ca = env.demo.dir.join("proxied-ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let base = env.provider.base_url();
    let transatel = env
        .provider
        .token_url(tokenwarden::provider::Dialect::Transatel);
    let path = transatel.strip_prefix(&base).unwrap().to_string();
    let text = std::fs::read_to_string(&env.demo.config).unwrap();
    let original = format!("token_url = {transatel:?}");
    let moved = format!(
        "token_url = \"https://{PROXIED_HOST}{path}\"\nca_file = {:?}\n{proxy_line}",
        ca.display().to_string()
    );
    let text = if text.contains(&original) {
        text.replace(&original, &moved)
    } else {
        // Replace whatever was written after the moved token_url last time.
        let start = text
            .find(&format!("token_url = \"https://{PROXIED_HOST}"))
            .unwrap();
        let end = text[start..].find("grant_type =").unwrap() + start;
        format!("{}{moved}\n{}", &text[..start], &text[end..])
    };
    std::fs::write(&env.demo.config, text).unwrap();
    // A fresh request each time: no stored transatel token to reuse.
    let _ = std::fs::remove_file(env.demo.state_dir.join("transatel.json"));
}

#[tokio::test(flavor = "multi_thread")]
async fn proxies_are_used_where_configured_and_never_for_loopback() {
    let env = DemoEnv::start(Duration::from_secs(3600)).await;
    let (ca_pem, tls) = proxied_tls();
    let proxy = FakeProxy::start(env.provider.addr(), tls).await;
    let config = env.config_path().to_string();
    let with_creds = format!("http://proxyuser:proxy-pass-4f9e2@127.0.0.1:{}", proxy.port);
    let all_vars = [
        ("HTTPS_PROXY", with_creds.as_str()),
        ("HTTP_PROXY", with_creds.as_str()),
        ("ALL_PROXY", with_creds.as_str()),
        ("TOKENWARDEN_LOG", "trace"),
    ];

    // The proxy variables: the non-loopback client goes through the proxy (credentials
    // included), the four loopback ones never do.
    proxied_config(&env, &ca_pem, "");
    let r = run_env(&["once", "-c", &config], &all_vars).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let heads = proxy.heads();
    assert!(!heads.is_empty(), "nothing went through the proxy");
    for h in &heads {
        assert!(
            h.starts_with(&format!("CONNECT {PROXIED_HOST}:443 ")),
            "{h}"
        );
        assert!(
            h.to_ascii_lowercase()
                .contains("proxy-authorization: basic "),
            "{h}"
        );
    }
    assert!(
        r.stderr
            .contains(&format!("proxy=\"{} (from HTTPS_PROXY)\"", proxy.url())),
        "the route is in the debug log:\n{}",
        r.stderr
    );
    assert!(!r.stderr.contains("proxy-pass-4f9e2"), "{}", r.stderr);
    let grants = env.grants_at("transatel");
    assert!(!grants.is_empty(), "the tunnel reached the provider");

    // proxy = "none": straight to a name that does not resolve, and the error says so.
    let before = proxy.heads().len();
    proxied_config(&env, &ca_pem, "proxy = \"none\"");
    let r = run_env(&["once", "-c", &config, "transatel"], &all_vars).await;
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains(
            "cannot connect to the token endpoint: directly (no proxy: proxy = \"none\")"
        ),
        "{}",
        r.stderr
    );
    assert_eq!(
        proxy.heads().len(),
        before,
        "proxy = none went through the proxy"
    );

    // The client's own proxy, no variables at all.
    proxied_config(&env, &ca_pem, &format!("proxy = \"{}\"", proxy.url()));
    let r = run_env(&["once", "-c", &config, "transatel"], &[]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(proxy.heads().len(), before + 1);

    // An unreachable proxy is named in the error.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    proxied_config(
        &env,
        &ca_pem,
        &format!("proxy = \"http://u:proxy-pass-4f9e2@127.0.0.1:{closed}\""),
    );
    let r = run_env(&["once", "-c", &config, "transatel"], &[]).await;
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains(&format!(
            "cannot connect to the token endpoint: through proxy http://127.0.0.1:{closed} (from the client's proxy)"
        )),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("proxy-pass-4f9e2"), "{}", r.stderr);
}
