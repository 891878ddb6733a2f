//! Mutual TLS at the token endpoint (RFC 8705), against the built-in provider over real TLS with
//! certificates the tests make: `tls_client_auth` and `self_signed_tls_client_auth`, certificate-
//! bound tokens, wrong and missing certificates, a pair that does not match, `check`'s view of a
//! certificate's expiry, and a certificate renewed on disk under a running daemon.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokenwarden::oauth::{self, HttpClients, OAuthError};
use tokenwarden::provider::{Dialect, ExpectedAuth, Provider, RegisteredClient, TlsSubject};

use crate::support::{self, DaemonProc, DemoEnv};

/// A client certificate authority of the tests' own (not the provider's server CA).
struct ClientCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl ClientCa {
    fn new(name: &str) -> ClientCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        ClientCa {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A client `id` registered for `tls_client_auth` with this CA and `subject`.
    fn client(&self, id: &str, subject: TlsSubject) -> RegisteredClient {
        let auth = ExpectedAuth::TlsClientAuth {
            subject,
            ca_pem: self.pem.clone(),
        };
        RegisteredClient::new(id, Dialect::Transatel, auth)
    }

    /// A leaf for `cn` (also its DNS SAN), valid until `valid_for` from now.
    fn issue(&self, cn: &str, valid_for: Duration) -> Pair {
        let key = KeyPair::generate().unwrap();
        let cert = leaf_params(cn, valid_for)
            .signed_by(&key, &self.issuer)
            .unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// A certificate (PEM and DER) and its key (PEM).
#[derive(Clone)]
struct Pair {
    cert: String,
    key: String,
    der: Vec<u8>,
}

fn leaf_params(cn: &str, valid_for: Duration) -> CertificateParams {
    let mut params = CertificateParams::new(vec![cn.to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + (now - Duration::from_secs(3600));
    params.not_after = epoch + (now + valid_for);
    params
}

fn self_signed(cn: &str, valid_for: Duration) -> Pair {
    let key = KeyPair::generate().unwrap();
    let cert = leaf_params(cn, valid_for).self_signed(&key).unwrap();
    Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

const DAY: Duration = Duration::from_secs(86400);

/// A directory with the provider's CA (`server-ca.pem`) and a `secrets/` directory (0700).
struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new(server_ca: &str) -> Dir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("server-ca.pem"), server_ca).unwrap();
        make_secrets_dir(dir.path());
        Dir { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `pair` as `secrets/NAME.crt` and `secrets/NAME.key`.
    fn put(&self, name: &str, pair: &Pair) {
        write_secret(&self.path().join(format!("secrets/{name}.crt")), &pair.cert);
        write_secret(&self.path().join(format!("secrets/{name}.key")), &pair.key);
    }

    /// A config with one client `c` of `client_id` posting to the Transatel path.
    fn config(&self, provider: &Provider, client_id: &str, keys: &str) -> PathBuf {
        let text = format!(
            "[clients.c]\ntoken_url = \"{}\"\nclient_id = \"{client_id}\"\nca_file = \"server-ca.pem\"\ntimeout = \"5s\"\n{keys}\n",
            provider.token_url(Dialect::Transatel)
        );
        let path = self.path().join("tokenwarden.toml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

fn make_secrets_dir(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o700)).unwrap();
}

/// Writes a file 0600 by renaming a complete copy over it (as cert-manager and editors do).
fn write_secret(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The client's key lines, `tls_client_auth` or another method.
fn mtls_keys(method: &str, name: &str) -> String {
    format!(
        "client_auth = \"{method}\"\ntls_client_cert = {{ file = \"secrets/{name}.crt\" }}\ntls_client_key = {{ file = \"secrets/{name}.key\" }}"
    )
}

/// One token for client `c` of the config at `path`, through the daemon's own HTTP clients.
async fn token_for(path: &Path) -> Result<oauth::Acquired, oauth::AcquireFailure> {
    let config = tokenwarden::config::load(path).unwrap();
    let c = &config.clients["c"];
    let http = HttpClients::default().get(c).unwrap();
    tokio::time::timeout(
        Duration::from_secs(20),
        oauth::acquire(&http, c, None, false),
    )
    .await
    .unwrap()
}

/// The claims of a JWT access token (unverified: the test reads what the provider put there).
fn claims(jwt: &str) -> serde_json::Value {
    let payload = jwt.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn x5t(der: &[u8]) -> String {
    use aws_lc_rs::digest::{SHA256, digest};
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest(&SHA256, der).as_ref())
}

fn refused(e: &OAuthError) -> String {
    match e.inner() {
        OAuthError::Provider {
            status,
            error,
            description,
            ..
        } => {
            assert_eq!((*status, error.as_str()), (401, "invalid_client"), "{e}");
            description.clone().unwrap_or_default()
        }
        other => panic!("expected invalid_client, got {other:?}"),
    }
}

#[tokio::test]
async fn tls_client_auth_is_accepted_and_the_token_is_bound_to_the_certificate() {
    let (provider, server_ca) = support::tls_provider().await;
    let ca = ClientCa::new("client CA");
    let pair = ca.issue("client-1.example", 90 * DAY);
    provider.register(ca.client("mtls-1", TlsSubject::Dn("CN=client-1.example".into())));
    let dir = Dir::new(&server_ca);
    dir.put("client", &pair);
    let config = dir.config(&provider, "mtls-1", &mtls_keys("tls_client_auth", "client"));
    let got = token_for(&config).await.unwrap();

    // RFC 8705 §2.1: only client_id in the body; the certificate went over TLS.
    let req = provider.requests().last().unwrap().clone();
    let names: Vec<&str> = req.form.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["grant_type", "client_id"]);
    assert_eq!(req.header("authorization"), None);
    assert_eq!(req.client_cert.as_deref(), Some(pair.der.as_slice()));
    // §3.1: the token carries the certificate's thumbprint.
    let token = got.issued.token.access_token.expose().to_string();
    assert_eq!(claims(&token)["cnf"]["x5t#S256"], x5t(&pair.der));
    assert_eq!(provider.token_cnf(&token), Some(x5t(&pair.der)));

    // The same client registered by a SAN instead of the subject DN.
    provider.register(ca.client("mtls-1", TlsSubject::SanDns("client-1.example".into())));
    token_for(&config).await.unwrap();
}

#[tokio::test]
async fn self_signed_tls_client_auth_is_accepted_and_another_certificate_refused() {
    let (provider, server_ca) = support::tls_provider().await;
    let registered = self_signed("device-7", 30 * DAY);
    let other = self_signed("device-7", 30 * DAY);
    provider.register(RegisteredClient::new(
        "device-7",
        Dialect::Transatel,
        ExpectedAuth::self_signed_tls(&registered.der),
    ));
    let dir = Dir::new(&server_ca);
    dir.put("registered", &registered);
    dir.put("other", &other);
    let keys = mtls_keys("self_signed_tls_client_auth", "registered");
    let got = token_for(&dir.config(&provider, "device-7", &keys))
        .await
        .unwrap();
    let token = got.issued.token.access_token.expose().to_string();
    assert_eq!(claims(&token)["cnf"]["x5t#S256"], x5t(&registered.der));

    // Same subject, another key: not the registered certificate.
    let keys = mtls_keys("self_signed_tls_client_auth", "other");
    let e = token_for(&dir.config(&provider, "device-7", &keys))
        .await
        .unwrap_err()
        .error;
    let why = refused(&e);
    assert!(why.contains("not the one registered"), "{why}");
    assert!(e.to_string().contains("self_signed_tls_client_auth"), "{e}");
}

#[tokio::test]
async fn a_wrong_or_missing_certificate_is_refused_with_a_clear_error() {
    let (provider, server_ca) = support::tls_provider().await;
    let ca = ClientCa::new("client CA");
    let rogue_ca = ClientCa::new("client CA");
    provider.register(ca.client("mtls-2", TlsSubject::Dn("CN=client-2".into())));
    let dir = Dir::new(&server_ca);
    dir.put("rogue", &rogue_ca.issue("client-2", 30 * DAY));
    dir.put("wrong-name", &ca.issue("client-3", 30 * DAY));
    dir.put("self", &self_signed("client-2", 30 * DAY));

    let cases = [
        (
            "rogue",
            "was not issued by the CA this client is registered with",
        ),
        (
            "wrong-name",
            "does not carry the registered subject DN \"CN=client-2\"",
        ),
        ("self", "was not issued by the CA"),
    ];
    for (name, says) in cases {
        let keys = mtls_keys("tls_client_auth", name);
        let e = token_for(&dir.config(&provider, "mtls-2", &keys))
            .await
            .unwrap_err()
            .error;
        let why = refused(&e);
        assert!(why.contains(says), "{name}: {why}");
    }

    // No certificate at all (a client that does not know it must present one).
    let e = token_for(&dir.config(&provider, "mtls-2", "client_auth = \"none\""))
        .await
        .unwrap_err()
        .error;
    let why = refused(&e);
    assert!(why.contains("no client certificate was presented"), "{why}");
    assert!(provider.issued("mtls-2") == 0);
}

#[tokio::test]
async fn any_client_auth_with_a_certificate_gets_a_bound_token() {
    let (provider, server_ca) = support::tls_provider().await;
    provider.register(RegisteredClient::transatel("basic-1", "s3cret-basic-1"));
    let ca = ClientCa::new("client CA");
    let pair = ca.issue("basic-1", 30 * DAY);
    let dir = Dir::new(&server_ca);
    dir.put("client", &pair);
    write_secret(&dir.path().join("secrets/secret"), "s3cret-basic-1");
    let secret = "client_secret = { file = \"secrets/secret\" }";

    let keys = format!("{}\n{secret}", mtls_keys("client_secret_basic", "client"));
    let got = token_for(&dir.config(&provider, "basic-1", &keys))
        .await
        .unwrap();
    let token = got.issued.token.access_token.expose().to_string();
    assert_eq!(claims(&token)["cnf"]["x5t#S256"], x5t(&pair.der));
    assert!(
        provider
            .requests()
            .last()
            .unwrap()
            .header("authorization")
            .is_some()
    );

    // Without a certificate: no binding.
    let got = token_for(&dir.config(&provider, "basic-1", secret))
        .await
        .unwrap();
    let token = got.issued.token.access_token.expose().to_string();
    assert_eq!(claims(&token).get("cnf"), None);
    assert_eq!(provider.token_cnf(&token), None);
}

/// `tokenwarden check` on the config at `path`.
async fn check(path: &Path) -> support::Run {
    support::run(&["check", "-c", path.to_str().unwrap()]).await
}

#[tokio::test]
async fn a_key_that_does_not_match_or_a_missing_half_is_a_config_error() {
    let (provider, server_ca) = support::tls_provider().await;
    let ca = ClientCa::new("client CA");
    let dir = Dir::new(&server_ca);
    let a = ca.issue("a", 30 * DAY);
    let b = ca.issue("b", 30 * DAY);
    write_secret(&dir.path().join("secrets/a.crt"), &a.cert);
    write_secret(&dir.path().join("secrets/a.key"), &b.key);
    let config = dir.config(&provider, "a", &mtls_keys("tls_client_auth", "a"));
    let run = check(&config).await;
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    let key_path = dir.path().join("secrets/a.key");
    assert!(
        run.stderr.contains(&format!(
            "tls_client_key: file {} does not match the certificate",
            key_path.display()
        )),
        "{}",
        run.stderr
    );
    for line in b.key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(
            !run.stderr.contains(line),
            "key material in: {}",
            run.stderr
        );
    }

    // One half only, and tls_client_auth without any certificate.
    let cases = [
        (
            "client_auth = \"none\"\ntls_client_cert = { file = \"secrets/a.crt\" }",
            "tls_client_cert is given without tls_client_key",
        ),
        (
            "client_auth = \"none\"\ntls_client_key = { file = \"secrets/a.key\" }",
            "tls_client_key is given without tls_client_cert",
        ),
        (
            "client_auth = \"tls_client_auth\"",
            "needs \"tls_client_cert\" (client_auth = \"tls_client_auth\")",
        ),
        (
            "client_auth = \"self_signed_tls_client_auth\"",
            "needs \"tls_client_cert\" (client_auth = \"self_signed_tls_client_auth\")",
        ),
    ];
    for (keys, says) in cases {
        let run = check(&dir.config(&provider, "a", keys)).await;
        assert_eq!(run.code, 2, "{keys}: {}", run.stdout);
        assert!(run.stderr.contains(says), "{keys}: {}", run.stderr);
    }
}

#[tokio::test]
async fn check_shows_the_certificate_and_its_expiry() {
    let (provider, server_ca) = support::tls_provider().await;
    let ca = ClientCa::new("client CA");
    let dir = Dir::new(&server_ca);
    let keys = mtls_keys("tls_client_auth", "client");

    dir.put("client", &ca.issue("long-lived", 90 * DAY));
    let run = check(&dir.config(&provider, "c", &keys)).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout
            .contains("  c: client certificate CN=long-lived, not after 20"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("(in 89 days)"), "{}", run.stdout);
    assert!(!run.stderr.contains("warning"), "{}", run.stderr);

    // Under 7 days: a warning, still OK.
    dir.put("client", &ca.issue("short-lived", 3 * DAY));
    let run = check(&dir.config(&provider, "c", &keys)).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("CN=short-lived, not after"),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr.contains("warning: ")
            && run
                .stderr
                .contains("(CN=short-lived) expires in under 7 days"),
        "{}",
        run.stderr
    );

    // Expired: an error naming the file.
    let mut params = leaf_params("expired", DAY);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + (now - DAY);
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + (now - 30 * DAY);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    write_secret(&dir.path().join("secrets/client.crt"), &cert.pem());
    write_secret(&dir.path().join("secrets/client.key"), &key.serialize_pem());
    let run = check(&dir.config(&provider, "c", &keys)).await;
    assert_eq!(run.code, 2, "{}", run.stdout);
    let crt = dir.path().join("secrets/client.crt");
    assert!(
        run.stderr.contains(&format!(
            "tls_client_cert: the certificate in file {} (CN=expired) expired at",
            crt.display()
        )),
        "{}",
        run.stderr
    );
}

/// A certificate renewed on disk under a running daemon: a half-renewed pair (new certificate,
/// old key) is refused and the running pair stays in use; once the key follows, the next
/// request presents the new certificate and gets a token bound to it, without a restart.
#[tokio::test]
async fn a_certificate_renewed_on_disk_is_presented_without_a_restart() {
    let (provider, server_ca) = support::tls_provider().await;
    let dir = tempfile::tempdir().unwrap();
    // The demo's layout (secrets/, state/, out/) so that `secret_material` sees every key here.
    let demo = tokenwarden::demo::setup(dir.path(), &provider, Duration::from_secs(3600)).unwrap();
    let env = DemoEnv {
        dir,
        provider,
        demo,
    };
    let root = env.dir.path();
    std::fs::write(root.join("server-ca.pem"), &server_ca).unwrap();
    let ca = ClientCa::new("client CA");
    env.provider
        .register(ca.client("renewing", TlsSubject::Dn("CN=renewing".into())));
    let old = ca.issue("renewing", 30 * DAY);
    let crt = env.demo.dir.join("secrets/renewing.crt");
    let key = env.demo.dir.join("secrets/renewing.key");
    write_secret(&crt, &old.cert);
    write_secret(&key, &old.key);
    let out = env.demo.out_dir.join("renewing.token");
    let config = root.join("mtls.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nstate_dir = \"{}\"\nlog_level = \"debug\"\n\n[clients.renewing]\ntoken_url = \"{}\"\nclient_id = \"renewing\"\nclient_auth = \"tls_client_auth\"\ntls_client_cert = {{ file = \"{}\" }}\ntls_client_key = {{ file = \"{}\" }}\nca_file = \"server-ca.pem\"\nmin_interval = \"0s\"\n\n[[clients.renewing.outputs]]\npath = \"{}\"\n",
            env.demo.state_dir.display(),
            env.provider.token_url(Dialect::Transatel),
            crt.display(),
            key.display(),
            out.display()
        ),
    )
    .unwrap();

    let (mut daemon, _notify, _ready) = DaemonProc::start_ready(&config, &[]).await;
    let first = support::read(&out);
    assert_eq!(claims(&first)["cnf"]["x5t#S256"], x5t(&old.der));
    let presented = |p: &Provider| p.requests().last().and_then(|r| r.client_cert.clone());
    assert_eq!(presented(&env.provider), Some(old.der.clone()));

    // Half renewed: the new certificate, the old key. The reload is refused, the old pair
    // still works.
    let new = ca.issue("renewing", 60 * DAY);
    write_secret(&crt, &new.cert);
    daemon
        .wait_log("reload refused", Duration::from_secs(10))
        .await;
    assert!(
        daemon.logs().contains("does not match the certificate"),
        "{}",
        daemon.logs()
    );
    let before = env.provider.issued("renewing");
    daemon.signal(nix::sys::signal::Signal::SIGUSR1);
    support::wait_for("a token with the old pair", Duration::from_secs(10), || {
        env.provider.issued("renewing") > before
    })
    .await;
    assert_eq!(presented(&env.provider), Some(old.der.clone()));

    // The key follows: the next request presents the new certificate, the token is bound to it.
    let before = env.provider.issued("renewing");
    let renewed_at = std::time::Instant::now();
    write_secret(&key, &new.key);
    support::wait_for("a token with the new pair", Duration::from_secs(10), || {
        env.provider.issued("renewing") > before
            && claims(&support::read(&out))["cnf"]["x5t#S256"] == x5t(&new.der)
    })
    .await;
    eprintln!(
        "renewal: a token bound to the new certificate {} ms after the key was replaced",
        renewed_at.elapsed().as_millis()
    );
    assert_eq!(presented(&env.provider), Some(new.der.clone()));
    // The reload says what changed: the certificate by subject and expiry, the key by name.
    let logs = daemon.logs();
    assert!(
        logs.contains("tls_client_cert: CN=renewing (not after"),
        "{logs}"
    );
    assert!(logs.contains("tls_client_key: new value"), "{logs}");

    daemon.stop().await;
    let logs = daemon.logs();
    for secret in support::secret_material(&env, [support::read(&out)]) {
        assert!(
            !logs.contains(&secret),
            "secret material in the logs:\n{logs}"
        );
    }
    assert!(logs.contains("renewing"), "{logs}");

    // A restart with the same pair reuses the stored token; a restart after a renewal made
    // while the daemon was down does not (the stored token is bound to the old certificate,
    // RFC 8705 §3) and gets one bound to the new certificate.
    let once = || async {
        let r = support::run(&["once", "-c", config.to_str().unwrap()]).await;
        assert_eq!(r.code, 0, "{}", r.stderr);
    };
    let before = env.provider.issued("renewing");
    once().await;
    assert_eq!(env.provider.issued("renewing"), before, "reused");
    let newer = ca.issue("renewing", 90 * DAY);
    write_secret(&crt, &newer.cert);
    write_secret(&key, &newer.key);
    once().await;
    assert_eq!(env.provider.issued("renewing"), before + 1);
    assert_eq!(presented(&env.provider), Some(newer.der.clone()));
    assert_eq!(
        claims(&support::read(&out))["cnf"]["x5t#S256"],
        x5t(&newer.der)
    );
}
