//! Ready-made assertions read from a file (RFC 7521 §4.2, RFC 7523 §2.1/§2.2), as Kubernetes
//! projects a service-account token, against the built-in provider over TLS: the file rewritten
//! through a `..data` symlink swap, each request carrying the current token; an expired one
//! never sent and reported with the file's name; a replayed `jti` refused by the provider;
//! `check` saying when it expires and never what it holds; no assertion in any log line.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use tokenwarden::config::load_str;
use tokenwarden::keys::SigningAlg;
use tokenwarden::oauth;
use tokenwarden::provider::{ExchangeAuth, ExchangeClient, Provider, TrustedIssuer};

use crate::exchange::write_private;
use crate::support::{DaemonProc, run, tls_provider, wait_for};

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const SUBJECT: &str = "system:serviceaccount:payments:api";
const AUDIENCE: &str = "api://AzureADTokenExchange";

/// An unsigned-looking JWT with only `exp` (for shape and expiry checks that never reach a
/// signature check).
pub fn jwt_with_exp(exp: u64) -> String {
    let b = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!(
        "{}.{}.{}",
        b(r#"{"alg":"ES256","typ":"JWT"}"#),
        b(&format!(
            r#"{{"iss":"{ISSUER}","sub":"{SUBJECT}","exp":{exp}}}"#
        )),
        b("signature")
    )
}

fn now() -> u64 {
    tokenwarden::token::unix_seconds(SystemTime::now())
}

/// A cluster's service-account issuer: signs projected tokens.
struct Cluster {
    key: jsonwebtoken::EncodingKey,
    public_pem: String,
}

impl Cluster {
    fn new() -> Cluster {
        let (private, public_pem) = tokenwarden::keys::generate_es256().unwrap();
        Cluster {
            key: jsonwebtoken::EncodingKey::from_ec_pem(private.as_bytes()).unwrap(),
            public_pem,
        }
    }

    /// A projected token living `life` from now, with a fresh `jti`.
    fn token(&self, life: u64) -> String {
        let now = now();
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": SUBJECT, "aud": [AUDIENCE],
            "iat": now, "nbf": now, "exp": now + life,
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &claims,
            &self.key,
        )
        .unwrap()
    }

    fn trusted(&self) -> TrustedIssuer {
        TrustedIssuer {
            issuer: ISSUER.into(),
            subject: SUBJECT.into(),
            audience: AUDIENCE.into(),
            public_key_pem: self.public_pem.clone(),
            alg: SigningAlg::ES256,
        }
    }
}

/// A Kubernetes projected volume: `dir/token -> ..data/token`, `..data -> ..TIMESTAMP`,
/// updated by writing a new timestamped directory and renaming a `..data_tmp` link over
/// `..data`, as the kubelet's atomic writer does.
struct Projected {
    dir: PathBuf,
    n: u32,
}

impl Projected {
    fn new(dir: PathBuf, first: &str) -> Projected {
        std::fs::create_dir_all(&dir).unwrap();
        let mut p = Projected { dir, n: 0 };
        p.swap(first);
        std::os::unix::fs::symlink("..data/token", p.dir.join("token")).unwrap();
        p
    }

    fn path(&self) -> PathBuf {
        self.dir.join("token")
    }

    fn swap(&mut self, token: &str) {
        self.n += 1;
        let old = format!("..2026_12_06_{:04}", self.n - 1);
        let new = format!("..2026_12_06_{:04}", self.n);
        std::fs::create_dir(self.dir.join(&new)).unwrap();
        write_private(&self.dir.join(&new).join("token"), token);
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&new, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        let _ = std::fs::remove_dir_all(self.dir.join(old));
    }
}

struct Env {
    dir: tempfile::TempDir,
    provider: Provider,
    ca: PathBuf,
    cluster: Cluster,
}

impl Env {
    async fn start() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let (provider, ca_pem) = tls_provider().await;
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, ca_pem).unwrap();
        let cluster = Cluster::new();
        for id in ["entra-app", "grant-app"] {
            let mut c = ExchangeClient::new(id, ExchangeAuth::Assertion);
            c.issuer = Some(cluster.trusted());
            provider.register_exchange(c);
        }
        Env {
            dir,
            provider,
            ca,
            cluster,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `entra` (client_assertion from the file) and `grant` (jwt_bearer with the file as its
    /// assertion), both reading `token`.
    fn config(&self, token: &Path) -> String {
        format!(
            "[daemon]\nstate_dir = {state:?}\nsocket = {sock:?}\nlog_level = \"debug\"\n\n[defaults]\nmin_interval = \"1s\"\nretry_initial = \"1s\"\nretry_max = \"2s\"\n\n\
             [clients.entra]\ntoken_url = {url:?}\nclient_auth = \"client_assertion\"\nclient_id = \"entra-app\"\nclient_assertion = {{ file = {token:?} }}\nca_file = {ca:?}\n[[clients.entra.outputs]]\npath = {out1:?}\n\n\
             [clients.grant]\ntoken_url = {url:?}\ngrant_type = \"jwt_bearer\"\nclient_auth = \"none\"\nclient_id = \"grant-app\"\nassertion = {{ file = {token:?} }}\nca_file = {ca:?}\n[[clients.grant.outputs]]\npath = {out2:?}\n",
            state = self.path("state"),
            sock = self.path("tw.sock"),
            url = self.provider.exchange_url(),
            ca = self.ca,
            out1 = self.path("entra.token"),
            out2 = self.path("grant.token"),
        )
    }

    /// The value of `key` in each request the provider received, in order.
    fn sent(&self, key: &str) -> Vec<String> {
        self.provider
            .requests()
            .iter()
            .filter_map(|r| r.form_value(key).map(str::to_string))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_carries_the_projected_token_current_at_the_time() {
    let env = Env::start().await;
    let mut written = vec![env.cluster.token(3600)];
    let mut projected = Projected::new(env.path("projected"), &written[0]);
    let config = env.path("tw.toml");
    write_private(&config, &env.config(&projected.path()));
    let (mut daemon, _notify, ready) = DaemonProc::start_ready(&config, &[]).await;
    assert!(ready.contains("2/2 clients valid"), "{ready}");
    assert_eq!(env.sent("client_assertion"), [written[0].clone()]);
    assert_eq!(env.sent("assertion"), [written[0].clone()]);
    assert_eq!(
        env.sent("client_assertion_type"),
        ["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"]
    );

    // The kubelet rewrites the token every few seconds; each refresh sends the current one.
    let socket = env.path("tw.sock");
    let mut tokens = vec![
        std::fs::read_to_string(env.path("entra.token")).unwrap(),
        std::fs::read_to_string(env.path("grant.token")).unwrap(),
    ];
    for round in 2..=4 {
        let next = env.cluster.token(3600);
        projected.swap(&next);
        written.push(next.clone());
        for client in ["entra", "grant"] {
            let r = run(&["refresh", client, "-s", socket.to_str().unwrap()]).await;
            assert_eq!(r.code, 0, "{client}: {}", r.stderr);
        }
        wait_for("both clients' new tokens", Duration::from_secs(10), || {
            env.provider.exchange_issued("entra-app") == round
                && env.provider.exchange_issued("grant-app") == round
        })
        .await;
        assert_eq!(env.sent("client_assertion").last(), Some(&next));
        assert_eq!(env.sent("assertion").last(), Some(&next));
        tokens.push(std::fs::read_to_string(env.path("entra.token")).unwrap());
    }
    // Every request carried the token current when it was made: nothing was refused.
    assert_eq!(env.sent("client_assertion"), written);
    assert_eq!(env.sent("assertion"), written);
    daemon.stop().await;
    let logs = daemon.logs();
    for secret in written.iter().chain(&tokens) {
        assert!(
            !logs.contains(secret.as_str()),
            "an assertion or token reached the logs:\n{logs}"
        );
    }
}

#[tokio::test]
async fn an_expired_assertion_file_is_an_error_naming_the_file_and_nothing_is_sent() {
    let env = Env::start().await;
    let expired = jwt_with_exp(now() - 60);
    let projected = Projected::new(env.path("projected"), &expired);
    let config = env.path("tw.toml");
    write_private(&config, &env.config(&projected.path()));
    // `check` warns, naming the file.
    let r = run(&["check", "-c", config.to_str().unwrap()]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let shown = projected.path().display().to_string();
    assert!(
        r.stderr.contains(&shown) && r.stderr.contains("whatever writes it has stopped"),
        "{}",
        r.stderr
    );
    // `once`: both clients fail with the file named; the provider hears nothing.
    let r = run(&["once", "-c", config.to_str().unwrap()]).await;
    assert_ne!(r.code, 0);
    for client in ["entra", "grant"] {
        let line = r
            .stderr
            .lines()
            .find(|l| l.starts_with(&format!("{client}: ")))
            .unwrap_or_else(|| panic!("no line for {client}: {}", r.stderr));
        assert!(
            line.contains(&shown) && line.contains("expired at"),
            "{line}"
        );
    }
    assert!(!r.stderr.contains(&expired) && !r.stdout.contains(&expired));
    assert!(
        env.provider.requests().is_empty(),
        "an expired assertion was sent"
    );
}

#[tokio::test]
async fn a_replayed_jti_is_refused_by_the_provider() {
    let env = Env::start().await;
    let token = env.cluster.token(3600);
    let projected = Projected::new(env.path("projected"), &token);
    let config = load_str(&env.config(&projected.path()), &env.path("tw.toml")).unwrap();
    let http = oauth::http_client(Some(&env.ca)).unwrap();
    let entra = config.clients["entra"].clone();
    oauth::acquire(&http, &entra, None, false).await.unwrap();
    // The same projected token again: its jti was seen (RFC 7523 §3).
    let e = oauth::acquire(&http, &entra, None, false)
        .await
        .unwrap_err();
    let m = e.error.to_string();
    assert!(m.contains("invalid_client") && m.contains("replay"), "{m}");
    assert!(!m.contains(&token), "{m}");
    // A token from another issuer key, or for another subject, is refused too.
    let stranger = Cluster::new();
    let mut p = projected;
    p.swap(&stranger.token(3600));
    let e = oauth::acquire(&http, &entra, None, false)
        .await
        .unwrap_err();
    assert!(e.error.to_string().contains("signature"), "{}", e.error);
    // The kubelet's next token is accepted.
    p.swap(&env.cluster.token(3600));
    oauth::acquire(&http, &entra, None, false).await.unwrap();
    // Without its assertion the client is refused: only the jwt-bearer grant's assertion
    // stands in for client authentication.
    let text = env
        .config(&p.path())
        .replace(
            "client_auth = \"client_assertion\"",
            "client_auth = \"none\"",
        )
        .replace(
            &format!("client_assertion = {{ file = {:?} }}\n", p.path()),
            "",
        );
    let bare = load_str(&text, &env.path("tw.toml")).unwrap().clients["entra"].clone();
    let e = oauth::acquire(&http, &bare, None, false).await.unwrap_err();
    assert!(
        e.error.to_string().contains("invalid_client"),
        "{}",
        e.error
    );
}

#[tokio::test]
async fn check_says_when_a_projected_token_expires_and_never_what_it_holds() {
    let env = Env::start().await;
    let token = env.cluster.token(3600);
    let mut projected = Projected::new(env.path("projected"), &token);
    let config = env.path("tw.toml");
    write_private(&config, &env.config(&projected.path()));
    let r = run(&["check", "-c", config.to_str().unwrap()]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let shown = projected.path().display().to_string();
    for client in ["entra: client_assertion", "grant: assertion"] {
        let line = r
            .stdout
            .lines()
            .find(|l| l.contains(client))
            .unwrap_or_else(|| panic!("no line for {client}: {}", r.stdout));
        assert!(
            line.contains(&shown) && line.contains("expires at"),
            "{line}"
        );
    }
    assert!(!r.stdout.contains(&token) && !r.stderr.contains(&token));
    // Not a JWT: a config error naming the file, without its content.
    projected.swap("not-a-jwt-but-a-secret-value");
    let r = run(&["check", "-c", config.to_str().unwrap()]).await;
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains(&shown) && r.stderr.contains("does not hold a JWT"),
        "{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("not-a-jwt-but-a-secret-value"),
        "{}",
        r.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_failing_on_an_expired_file_asks_again_as_soon_as_it_changes() {
    let env = Env::start().await;
    let mut projected = Projected::new(env.path("projected"), &jwt_with_exp(now() - 60));
    let config = env.path("tw.toml");
    // Retries a minute apart: only the file's change can bring the token sooner.
    let text = env
        .config(&projected.path())
        .replace("retry_initial = \"1s\"", "retry_initial = \"60s\"")
        .replace("retry_max = \"2s\"", "retry_max = \"120s\"");
    write_private(&config, &text);
    let (mut daemon, _notify, ready) = DaemonProc::start_ready(&config, &[]).await;
    assert!(ready.contains("0/2 clients valid"), "{ready}");
    assert!(env.provider.requests().is_empty());
    // The kubelet is back: a fresh token through the symlink swap.
    let fresh = env.cluster.token(3600);
    projected.swap(&fresh);
    wait_for("both clients' tokens", Duration::from_secs(15), || {
        env.provider.exchange_issued("entra-app") == 1
            && env.provider.exchange_issued("grant-app") == 1
    })
    .await;
    assert_eq!(env.sent("client_assertion"), std::slice::from_ref(&fresh));
    daemon.stop().await;
    assert!(!daemon.logs().contains(&fresh));
}
