//! RFC 8693 token exchange against the built-in provider over TLS: a chained client renews
//! whenever its upstream's token rotates and exchanges the current one; cycles and missing
//! upstreams are config errors; the provider's checks (invalid_target, subjects it never
//! issued, `issued_token_type`, `N_A`); no subject token in any log line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokenwarden::config::load_str;
use tokenwarden::oauth;
use tokenwarden::provider::{
    Dialect, ExchangeAuth, ExchangeClient, Provider, RegisteredClient, TOKEN_EXCHANGE_GRANT,
};

use crate::support::{DaemonProc, run, tls_provider, wait_for};

pub const AUDIENCE: &str = "https://api.example";

/// A temp dir with a TLS provider, its CA file and a secret for the upstream client.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub provider: Provider,
    pub ca: PathBuf,
    pub secret: String,
}

impl Env {
    pub async fn start(lifetime: Duration) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let (provider, ca_pem) = tls_provider().await;
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, ca_pem).unwrap();
        let secret = uuid::Uuid::new_v4().simple().to_string();
        write_private(&dir.path().join("up.secret"), &secret);
        provider
            .register(RegisteredClient::transatel("up-client", &secret).with_lifetime(lifetime));
        let mut ex = ExchangeClient::new("down-client", ExchangeAuth::None);
        ex.targets = vec![AUDIENCE.into()];
        ex.lifetime = lifetime;
        provider.register_exchange(ex);
        Env {
            dir,
            provider,
            ca,
            secret,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `[daemon]` and `[defaults]` for a test daemon in this directory.
    pub fn head(&self) -> String {
        format!(
            "[daemon]\nstate_dir = {:?}\nsocket = {:?}\nlog_level = \"debug\"\n\n[defaults]\nmin_interval = \"1s\"\nrefresh_margin = \"1s\"\nretry_initial = \"1s\"\nretry_max = \"2s\"\n\n",
            self.path("state"),
            self.path("tw.sock"),
        )
    }

    /// The upstream `up` (client_credentials over TLS) and its chained client `down`.
    pub fn chained_config(&self) -> String {
        format!(
            "{head}[clients.up]\ntoken_url = {up_url:?}\nclient_id = \"up-client\"\nclient_secret = {{ file = {secret:?} }}\nca_file = {ca:?}\n[[clients.up.outputs]]\npath = {up_out:?}\n\n{down}",
            head = self.head(),
            up_url = self.provider.token_url(Dialect::Transatel),
            secret = self.path("up.secret"),
            ca = self.ca,
            up_out = self.path("up.token"),
            down = self.down_config(),
        )
    }

    pub fn down_config(&self) -> String {
        format!(
            "[clients.down]\ntoken_url = {url:?}\ngrant_type = \"token_exchange\"\nclient_auth = \"none\"\nclient_id = \"down-client\"\nsubject_token = {{ client = \"up\" }}\naudience = \"{AUDIENCE}\"\nca_file = {ca:?}\n[[clients.down.outputs]]\npath = {out:?}\n",
            url = self.provider.exchange_url(),
            ca = self.ca,
            out = self.path("down.token"),
        )
    }

    /// The form values of the exchange requests the provider received, by `key`.
    pub fn exchange_values(&self, key: &str) -> Vec<String> {
        self.provider
            .requests()
            .iter()
            .filter(|r| r.path == "/exchange/token")
            .filter_map(|r| r.form_value(key).map(str::to_string))
            .collect()
    }
}

pub fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn file(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chained_client_renews_whenever_its_upstream_rotates() {
    let env = Env::start(Duration::from_secs(3600)).await;
    let config = env.path("tw.toml");
    write_private(&config, &env.chained_config());
    let (mut daemon, _notify, ready) = DaemonProc::start_ready(&config, &[]).await;
    assert!(ready.contains("2/2 clients valid"), "{ready}");
    let (up1, down1) = (file(&env.path("up.token")), file(&env.path("down.token")));
    assert!(!up1.is_empty() && !down1.is_empty() && up1 != down1);
    assert_eq!(env.provider.exchange_issued("down-client"), 1);
    assert_eq!(
        env.exchange_values("subject_token"),
        std::slice::from_ref(&up1)
    );
    assert_eq!(
        env.exchange_values("grant_type"),
        [TOKEN_EXCHANGE_GRANT.to_string()]
    );
    assert_eq!(env.exchange_values("audience"), [AUDIENCE.to_string()]);

    // Each rotation of the upstream makes the chained client exchange the new token.
    let mut seen = vec![up1.clone(), down1.clone()];
    let socket = env.path("tw.sock");
    for round in 2..=3 {
        let before = file(&env.path("up.token"));
        let r = run(&["refresh", "up", "-s", socket.to_str().unwrap()]).await;
        assert_eq!(r.code, 0, "{}", r.stderr);
        wait_for("the upstream's new token", Duration::from_secs(10), || {
            file(&env.path("up.token")) != before
        })
        .await;
        let rotated = std::time::Instant::now();
        wait_for(
            "the chained client's new token",
            Duration::from_secs(10),
            || env.provider.exchange_issued("down-client") == round,
        )
        .await;
        let up = file(&env.path("up.token"));
        wait_for("down.token rewritten", Duration::from_secs(10), || {
            !seen.contains(&file(&env.path("down.token")))
        })
        .await;
        eprintln!(
            "chained client's new token written {:?} after its upstream's",
            rotated.elapsed()
        );
        assert_eq!(env.exchange_values("subject_token").last(), Some(&up));
        seen.push(up);
        seen.push(file(&env.path("down.token")));
    }

    // `status` shows the chain.
    let r = run(&["status", "-s", socket.to_str().unwrap()]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("subject: client up"), "{}", r.stdout);

    // A reload that replaces the upstream (a new identity: its scope) starts a new refresher
    // for it; the chained client follows the new one and exchanges its token.
    let before = file(&env.path("up.token"));
    write_private(
        &config,
        &env.chained_config().replacen(
            "client_id = \"up-client\"\n",
            "client_id = \"up-client\"\nscope = \"replaced\"\n",
            1,
        ),
    );
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(
        "the replaced upstream's token",
        Duration::from_secs(10),
        || file(&env.path("up.token")) != before,
    )
    .await;
    wait_for(
        "an exchange of the replaced upstream's token",
        Duration::from_secs(10),
        || env.provider.exchange_issued("down-client") == 4,
    )
    .await;
    let up = file(&env.path("up.token"));
    assert_eq!(env.exchange_values("subject_token").last(), Some(&up));
    seen.push(up);
    wait_for("down.token rewritten", Duration::from_secs(10), || {
        !seen.contains(&file(&env.path("down.token")))
    })
    .await;
    seen.push(file(&env.path("down.token")));

    // A reload that removes the upstream while the dependent stays is refused.
    write_private(&config, &format!("{}{}", env.head(), env.down_config()));
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    daemon
        .wait_log("which is not in the config", Duration::from_secs(10))
        .await;
    daemon.stop().await;

    // No token, subject token or secret in any log line.
    let logs = daemon.logs();
    seen.push(env.secret.clone());
    for v in seen.iter().chain(&env.exchange_values("subject_token")) {
        assert!(
            !logs.contains(v.as_str()),
            "a secret reached the logs:\n{logs}"
        );
    }
}

#[tokio::test]
async fn a_cycle_or_a_missing_upstream_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let client = |name: &str, up: &str| {
        format!(
            "[clients.{name}]\ntoken_url = \"https://idp.example/token\"\ngrant_type = \"token_exchange\"\nclient_auth = \"none\"\nclient_id = \"{name}\"\nsubject_token = {{ client = \"{up}\" }}\n\n"
        )
    };
    let config = dir.path().join("tw.toml");
    let text = [
        client("a", "b"),
        client("b", "a"),
        client("c", "c"),
        client("d", "gone"),
        client("e", "a"),
    ]
    .concat();
    write_private(&config, &text);
    let r = run(&["check", "-c", config.to_str().unwrap()]).await;
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("a -> b -> a"), "{}", r.stderr);
    assert!(r.stderr.contains("c -> c"), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("subject_token names client \"gone\", which is not in the config"),
        "{}",
        r.stderr
    );
    // `e` leads into the cycle without being in it: the cycle is reported once.
    assert_eq!(
        r.stderr.matches("a -> b -> a").count() + r.stderr.matches("b -> a -> b").count(),
        1,
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("e -> a"), "{}", r.stderr);
    // A chain that ends is fine.
    write_private(
        &config,
        &format!(
            "{}{}",
            client("x", "y"),
            "[clients.y]\ntoken_url = \"https://idp.example/token\"\nclient_id = \"y\"\nclient_secret = \"s3cr3t-value\"\n"
        ),
    );
    let r = run(&["check", "-c", config.to_str().unwrap()]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[tokio::test]
async fn the_provider_checks_token_exchange_strictly() {
    let env = Env::start(Duration::from_secs(600)).await;
    let http = oauth::http_client(Some(&env.ca)).unwrap();
    let up = load_str(&env.chained_config(), &env.path("tw.toml")).unwrap();
    let up = up.clients["up"].clone();
    let subject = oauth::acquire(&http, &up, None, false).await.unwrap();
    let subject_token = subject.issued.token.access_token.expose().to_string();
    write_private(&env.path("subject"), &subject_token);

    // A file subject: an access token the provider issued.
    let exchange = |extra: &str| {
        let text = format!(
            "{}[clients.x]\ntoken_url = {:?}\ngrant_type = \"token_exchange\"\nclient_auth = \"none\"\nclient_id = \"down-client\"\nsubject_token = {{ file = {:?} }}\nsubject_token_type = \"urn:ietf:params:oauth:token-type:access_token\"\nca_file = {:?}\n{extra}\n",
            env.head(),
            env.provider.exchange_url(),
            env.path("subject"),
            env.ca,
        );
        load_str(&text, &env.path("tw.toml")).unwrap().clients["x"].clone()
    };
    let ok = oauth::acquire(
        &http,
        &exchange(&format!("audience = \"{AUDIENCE}\"")),
        None,
        false,
    )
    .await
    .unwrap();
    assert_eq!(ok.issued.token.token_type, "Bearer");
    // A refresh token (a provider may issue one, RFC 8693 §2.2.1) is never used instead of
    // exchanging the subject as it is now, nor kept.
    let again = oauth::acquire(
        &http,
        &exchange(&format!("audience = \"{AUDIENCE}\"")),
        Some(&tokenwarden::secret::Secret::new("twr_some_refresh_token")),
        false,
    )
    .await
    .unwrap();
    assert_eq!(again.grant_type, TOKEN_EXCHANGE_GRANT);
    assert!(again.refresh_token.is_none());
    // No longer than its subject.
    assert!(ok.issued.token.expires_at <= subject.issued.token.expires_at + Duration::from_secs(1));

    // An audience the client may not ask for: invalid_target (RFC 8693 §2.2.2).
    for extra in [
        "audience = \"https://other.example\"",
        "resource = \"https://other.example/api\"",
    ] {
        let e = oauth::acquire(&http, &exchange(extra), None, false)
            .await
            .unwrap_err();
        assert!(
            e.error.to_string().contains("invalid_target"),
            "{extra}: {}",
            e.error
        );
    }

    // An ID token comes with token_type N_A and issued_token_type id_token: accepted.
    let id = oauth::acquire(
        &http,
        &exchange("requested_token_type = \"urn:ietf:params:oauth:token-type:id_token\""),
        None,
        false,
    )
    .await
    .unwrap();
    assert_eq!(id.issued.token.token_type, "N_A");

    // A subject the provider never issued is refused, and the error does not quote it.
    write_private(&env.path("subject"), "tw_forged_0000000000000000");
    let e = oauth::acquire(&http, &exchange(""), None, false)
        .await
        .unwrap_err();
    let m = e.error.to_string();
    assert!(
        m.contains("invalid_grant") && m.contains("not a token this provider issued"),
        "{m}"
    );
    assert!(!m.contains("tw_forged_0000000000000000"), "{m}");
    // An expired JWT subject file is not sent at all.
    let before = env.provider.requests().len();
    let expired = crate::assertion_file::jwt_with_exp(1000);
    write_private(&env.path("subject"), &expired);
    let jwt_subject = {
        let text = format!(
            "{}[clients.x]\ntoken_url = {:?}\ngrant_type = \"token_exchange\"\nclient_auth = \"none\"\nclient_id = \"down-client\"\nsubject_token = {{ file = {:?} }}\nca_file = {:?}\n",
            env.head(),
            env.provider.exchange_url(),
            env.path("subject"),
            env.ca,
        );
        load_str(&text, &env.path("tw.toml")).unwrap().clients["x"].clone()
    };
    let e = oauth::acquire(&http, &jwt_subject, None, false)
        .await
        .unwrap_err();
    let m = e.error.to_string();
    assert!(
        m.contains("whatever writes it has stopped")
            && m.contains(env.path("subject").to_str().unwrap()),
        "{m}"
    );
    assert_eq!(
        env.provider.requests().len(),
        before,
        "an expired subject token was sent"
    );
}

#[test]
fn config_errors_of_ready_tokens_and_token_exchange() {
    let dir = tempfile::tempdir().unwrap();
    let jwt = crate::assertion_file::jwt_with_exp(4_000_000_000);
    write_private(&dir.path().join("jwt"), &jwt);
    write_private(&dir.path().join("opaque"), "opaque-token-value");
    let base = "[clients.c]\ntoken_url = \"https://idp.example/token\"\nclient_id = \"c\"\n";
    let cases: &[(&str, Option<&str>)] = &[
        (
            "grant_type = \"token_exchange\"\nclient_auth = \"none\"\n",
            Some("needs \"subject_token\""),
        ),
        (
            "client_secret = \"s3cr3t-value\"\nsubject_token = { file = \"jwt\" }\n",
            Some("\"subject_token\" is not used with grant_type = \"client_credentials\""),
        ),
        (
            "client_auth = \"client_assertion\"\n",
            Some("needs \"client_assertion\""),
        ),
        (
            "client_secret = \"s3cr3t-value\"\nclient_assertion = { file = \"jwt\" }\n",
            Some("\"client_assertion\" is not used with client_auth = \"client_secret_basic\""),
        ),
        (
            "client_auth = \"client_assertion\"\nclient_assertion = { file = \"jwt\" }\n",
            None,
        ),
        (
            "client_auth = \"client_assertion\"\nclient_assertion = { file = \"opaque\" }\n",
            Some("does not hold a JWT"),
        ),
        (
            "client_auth = \"client_assertion\"\nclient_assertion = { file = \"missing\" }\n",
            Some("missing"),
        ),
        (
            "grant_type = \"jwt_bearer\"\nassertion = { file = \"jwt\" }\n",
            None,
        ),
        (
            "grant_type = \"jwt_bearer\"\nassertion = { file = \"opaque\" }\n",
            Some("does not hold a JWT"),
        ),
        (
            "grant_type = \"urn:ietf:params:oauth:grant-type:token-exchange\"\nclient_auth = \"none\"\nsubject_token = { file = \"jwt\" }\n",
            None,
        ),
        // An opaque subject is fine when its type says it is not a JWT.
        (
            "grant_type = \"token_exchange\"\nclient_auth = \"none\"\nsubject_token = { file = \"opaque\" }\nsubject_token_type = \"urn:ietf:params:oauth:token-type:access_token\"\n",
            None,
        ),
        (
            "grant_type = \"token_exchange\"\nclient_auth = \"none\"\nsubject_token = { file = \"opaque\" }\n",
            Some("does not hold a JWT"),
        ),
        (
            "grant_type = \"token_exchange\"\nclient_auth = \"none\"\nsubject_token = { file = \"jwt\" }\nsubject_token_type = \"jwt\"\n",
            Some("is not a URI"),
        ),
        (
            "grant_type = \"token_exchange\"\nclient_auth = \"none\"\nsubject_token = { file = \"jwt\" }\nactor_token = { file = \"jwt\" }\n",
            Some("actor_token needs actor_token_type"),
        ),
        (
            "grant_type = \"token_exchange\"\nclient_auth = \"none\"\nsubject_token = { file = \"jwt\" }\nactor_token_type = \"urn:ietf:params:oauth:token-type:jwt\"\n",
            Some("actor_token_type is set without actor_token"),
        ),
        (
            "grant_type = \"token_exchange\"\nclient_auth = \"none\"\nsubject_token = { clinet = \"x\" }\n",
            Some("unknown key \"clinet\" in subject_token"),
        ),
        (
            "client_secret = \"s3cr3t-value\"\nextra_params = { subject_token = \"x\" }\n",
            Some("extra_params may not set \"subject_token\""),
        ),
    ];
    for (extra, want) in cases {
        let text = format!("{base}{extra}");
        let r = load_str(&text, &dir.path().join("tw.toml"));
        match (r, want) {
            (Ok(_), None) => {}
            (Err(e), Some(w)) => {
                let e = e.to_string();
                assert!(e.contains(w), "{extra}: {e}");
                assert!(
                    !e.contains("opaque-token-value") && !e.contains(&jwt),
                    "{e}"
                );
            }
            (Ok(_), Some(w)) => panic!("{extra}: loaded, expected {w}"),
            (Err(e), None) => panic!("{extra}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chained_client_whose_upstream_fails_says_so_and_sends_nothing() {
    let env = Env::start(Duration::from_secs(3600)).await;
    // The upstream's secret is wrong: it never gets a token.
    write_private(&env.path("up.secret"), "wrong-secret-value");
    let config = env.path("tw.toml");
    write_private(&config, &env.chained_config());
    // READY=1 still comes: the chained client settles on its upstream's failure.
    let (mut daemon, _notify, ready) = DaemonProc::start_ready(&config, &[]).await;
    assert!(ready.contains("0/2 clients valid"), "{ready}");
    let r = run(&["status", "-s", env.path("tw.sock").to_str().unwrap()]).await;
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("down "))
        .unwrap_or_else(|| panic!("{}", r.stdout));
    assert!(
        line.contains("subject: client up")
            && line.contains("client \"up\" has no valid token to exchange yet"),
        "{line}"
    );
    assert!(
        env.exchange_values("grant_type").is_empty(),
        "a token exchange was sent without a subject"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn once_runs_a_chained_clients_upstream_too() {
    let env = Env::start(Duration::from_secs(3600)).await;
    let config = env.path("tw.toml");
    write_private(&config, &env.chained_config());
    let r = run(&["once", "down", "-c", config.to_str().unwrap()]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("down") && r.stdout.contains("up"),
        "{}",
        r.stdout
    );
    assert_eq!(env.provider.exchange_issued("down-client"), 1);
    assert_eq!(
        env.exchange_values("subject_token"),
        [file(&env.path("up.token"))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reuses_the_chained_token_without_asking_again() {
    let env = Env::start(Duration::from_secs(3600)).await;
    let config = env.path("tw.toml");
    write_private(&config, &env.chained_config());
    let (mut daemon, _notify, _) = DaemonProc::start_ready(&config, &[]).await;
    daemon.stop().await;
    let (requests, down) = (env.provider.requests().len(), file(&env.path("down.token")));
    assert_eq!(env.provider.exchange_issued("down-client"), 1);
    // Both tokens come from the state directory: the chained one was made from that upstream
    // token, so nothing is asked.
    let (mut daemon, _notify, ready) = DaemonProc::start_ready(&config, &[]).await;
    assert!(ready.contains("2/2 clients valid"), "{ready}");
    assert_eq!(env.provider.requests().len(), requests);
    assert_eq!(file(&env.path("down.token")), down);
    // The next upstream rotation is followed as before.
    let socket = env.path("tw.sock");
    let r = run(&["refresh", "up", "-s", socket.to_str().unwrap()]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    wait_for(
        "the chained client's new token",
        Duration::from_secs(10),
        || env.provider.exchange_issued("down-client") == 2,
    )
    .await;
    daemon.stop().await;
}
