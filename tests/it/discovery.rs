//! Discovery (docs/oauth.md#discovery): a client configured with `issuer` finds its token
//! endpoint in the provider's metadata (RFC 8414 §3, then OpenID Connect Discovery §4), over
//! real TLS against the built-in provider; the issuer must match exactly; the metadata is kept
//! in the state directory across restarts and fetched again hourly or when the token endpoint
//! answers 404; hostile metadata is refused.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::sys::signal::Signal;
use serde_json::Value;
use tokenwarden::provider::{Dialect, Fault, Provider, RegisteredClient};

use crate::support::{DaemonProc, READY_WITHIN, read, run, tls_provider, wait_for};

const SECRET: &str = "disc-s3cret-5d1f0e";
const RFC8414: &str = "/.well-known/oauth-authorization-server/realm";
const OIDC: &str = "/realm/.well-known/openid-configuration";

/// The TLS provider with issuer `BASE/realm` and one Transatel client, and a config for it.
struct Env {
    dir: tempfile::TempDir,
    provider: Provider,
    config: PathBuf,
}

impl Env {
    async fn start() -> Env {
        let (provider, ca) = tls_provider().await;
        provider.set_issuer_path("/realm");
        provider.publish_dialect(Dialect::Transatel);
        provider.register(RegisteredClient::transatel("disc", SECRET));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca).unwrap();
        std::fs::write(dir.path().join("secret"), SECRET).unwrap();
        std::fs::set_permissions(
            dir.path().join("secret"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("out")).unwrap();
        let config = dir.path().join("tokenwarden.toml");
        let env = Env {
            dir,
            provider,
            config,
        };
        env.write_config(&env.provider.issuer());
        env
    }

    fn write_config(&self, issuer: &str) {
        let d = self.dir.path();
        let text = format!(
            "[daemon]\nstate_dir = \"{}\"\n\n[clients.disc]\nissuer = \"{issuer}\"\nclient_id = \"disc\"\n\
             client_secret = {{ file = \"secret\" }}\nca_file = \"ca.pem\"\nmin_interval = \"0s\"\ntimeout = \"5s\"\n\
             [[clients.disc.outputs]]\npath = \"{}\"\n",
            d.join("state").display(),
            d.join("out/disc.token").display()
        );
        std::fs::write(&self.config, text).unwrap();
    }

    fn cfg(&self) -> &str {
        self.config.to_str().unwrap()
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The one metadata cache file in the state directory.
    fn cache_file(&self) -> PathBuf {
        let found: Vec<PathBuf> = std::fs::read_dir(self.state())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("discovery+")
            })
            .collect();
        assert_eq!(found.len(), 1, "{found:?}");
        found[0].clone()
    }

    /// Paths of the metadata requests, in order.
    fn metadata_paths(&self) -> Vec<String> {
        self.provider
            .metadata_requests()
            .into_iter()
            .map(|r| r.path)
            .collect()
    }

    /// Token requests (POST), by path.
    fn token_posts(&self) -> Vec<String> {
        self.provider
            .requests()
            .into_iter()
            .filter(|r| r.method == "POST")
            .map(|r| r.path)
            .collect()
    }

    async fn once(&self) -> crate::support::Run {
        run(&["once", "-c", self.cfg()]).await
    }
}

fn token_path() -> String {
    Dialect::Transatel.path().to_string()
}

#[tokio::test]
async fn the_rfc_8414_path_is_tried_first_then_the_openid_one() {
    let env = Env::start().await;
    let r = env.once().await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Path insertion (RFC 8414 §3.1) answered: the OpenID path was not needed.
    assert_eq!(env.metadata_paths(), [RFC8414]);
    assert_eq!(env.token_posts(), [token_path()]);
    assert!(!read(&env.dir.path().join("out/disc.token")).is_empty());
    // The cache file is private, like the state files.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(env.cache_file()).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // It is no client's state file (a `+` is not allowed in client names).
    let state = tokenwarden::state::StateDir::open(&env.state()).unwrap();
    assert_eq!(state.clients().unwrap(), ["disc"]);
    drop(state);

    // A provider serving only the OpenID Connect document: 404 at the RFC 8414 path, then §4.
    let env = Env::start().await;
    env.provider.serve_rfc8414(false);
    let r = env.once().await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(env.metadata_paths(), [RFC8414, OIDC]);
    assert_eq!(env.token_posts(), [token_path()]);
    let cached: Value = serde_json::from_str(&read(&env.cache_file())).unwrap();
    assert!(
        cached["fetched_from"].as_str().unwrap().ends_with(OIDC),
        "{cached}"
    );

    // Neither: an error naming both URLs, and no token request.
    let env = Env::start().await;
    env.write_config(&format!("{}/nowhere", env.provider.base_url()));
    let r = env.once().await;
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("no metadata at") && r.stderr.contains("check issuer"),
        "{}",
        r.stderr
    );
    assert!(env.token_posts().is_empty());
}

#[tokio::test]
async fn another_issuers_metadata_is_refused() {
    let env = Env::start().await;
    env.provider.serve_wrong_issuer(true);
    let r = env.once().await;
    assert_ne!(r.code, 0, "{}", r.stdout);
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("names issuer"))
        .unwrap_or_else(|| panic!("{}", r.stderr));
    assert!(
        line.contains("not the configured one")
            && line.contains("RFC 8414 §3.3")
            && line.contains(&env.provider.issuer())
            && line.contains("disc"),
        "{line}"
    );
    // The credentials never went anywhere.
    assert!(env.token_posts().is_empty());
    assert!(!r.stderr.contains(SECRET));

    // An issuer differing only by a trailing slash is another issuer too (RFC 8414 §3.3
    // compares them as strings).
    let env = Env::start().await;
    env.write_config(&format!("{}/", env.provider.issuer()));
    let r = env.once().await;
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("names issuer"), "{}", r.stderr);
    assert!(env.token_posts().is_empty());
}

#[tokio::test]
async fn a_restart_uses_the_cached_metadata_without_a_request() {
    let env = Env::start().await;
    let r = env.once().await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(env.metadata_paths().len(), 1);
    // A restart that needs a new token (its state gone) but not new metadata.
    std::fs::remove_file(env.state().join("disc.json")).unwrap();
    env.provider.clear_requests();
    let r = env.once().await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(env.metadata_paths(), Vec::<String>::new());
    assert_eq!(env.token_posts(), [token_path()]);

    // The daemon too: READY with zero metadata requests.
    std::fs::remove_file(env.state().join("disc.json")).unwrap();
    env.provider.clear_requests();
    let (mut daemon, _notify, ready) = DaemonProc::start_ready(&env.config, &[]).await;
    assert!(ready.contains("1/1 clients valid"), "{ready}");
    assert_eq!(env.metadata_paths(), Vec::<String>::new());
    assert_eq!(env.token_posts(), [token_path()]);
    daemon.stop().await;
}

/// Sets the cache file's `fetched_at_unix` to `age` ago.
fn age_cache(file: &Path, age: Duration) {
    let mut v: Value = serde_json::from_str(&read(file)).unwrap();
    let at = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - age.as_secs();
    v["fetched_at_unix"] = at.into();
    std::fs::write(file, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[tokio::test]
async fn metadata_is_fetched_again_at_most_hourly() {
    let env = Env::start().await;
    assert_eq!(env.once().await.code, 0);
    assert_eq!(env.metadata_paths().len(), 1);
    let file = env.cache_file();
    // 59 minutes old: used as it is.
    age_cache(&file, Duration::from_secs(59 * 60));
    std::fs::remove_file(env.state().join("disc.json")).unwrap();
    env.provider.clear_requests();
    assert_eq!(env.once().await.code, 0);
    assert_eq!(env.metadata_paths().len(), 0);
    // 61 minutes old: fetched again first, and the file renewed.
    age_cache(&file, Duration::from_secs(61 * 60));
    std::fs::remove_file(env.state().join("disc.json")).unwrap();
    env.provider.clear_requests();
    assert_eq!(env.once().await.code, 0);
    assert_eq!(env.metadata_paths(), [RFC8414]);
    let v: Value = serde_json::from_str(&read(&file)).unwrap();
    let at = v["fetched_at_unix"].as_u64().unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now - at < 60, "renewed: {v}");

    // Stale, and the provider down for metadata: the old metadata is kept and used.
    age_cache(&file, Duration::from_secs(2 * 3600));
    std::fs::remove_file(env.state().join("disc.json")).unwrap();
    env.provider.clear_requests();
    env.provider.fault_next(Fault::ServerError, 1);
    let r = env.once().await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(env.metadata_paths().len(), 1);
    assert_eq!(env.token_posts(), [token_path()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_moved_token_endpoint_is_found_again_without_a_restart() {
    let env = Env::start().await;
    let (mut daemon, _notify, ready) = DaemonProc::start_ready(&env.config, &[]).await;
    assert!(ready.contains("1/1 clients valid"), "{ready}");
    let out = env.dir.path().join("out/disc.token");
    assert_eq!(env.metadata_paths().len(), 1);
    // Another token within the hour: no metadata request.
    daemon.signal(Signal::SIGUSR1);
    wait_for("a second token", READY_WITHIN, || {
        env.token_posts().len() == 2
    })
    .await;
    assert_eq!(env.metadata_paths().len(), 1);
    let first = read(&out);

    env.provider.move_token_endpoints(Some("/v2"));
    let moved = format!("/v2{}", token_path());
    // SIGUSR1 until a request follows (one sent while the last refresh is still being
    // published is merged into it).
    let deadline = std::time::Instant::now() + READY_WITHIN;
    while env.token_posts().len() == 2 {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.logs());
        daemon.signal(Signal::SIGUSR1);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    while !(env.token_posts().contains(&moved) && read(&out) != first) {
        assert!(
            std::time::Instant::now() < deadline,
            "no token from the moved endpoint: {:?}\n{}",
            env.token_posts(),
            daemon.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The old endpoint answered 404 once; the metadata was fetched once more; no restart.
    // (A SIGUSR1 still queued may have asked once more, at the new endpoint.)
    let posts = env.token_posts();
    assert_eq!(
        posts[..4],
        [token_path(), token_path(), token_path(), moved.clone()],
        "{}",
        daemon.logs()
    );
    assert!(posts[4..].iter().all(|p| *p == moved), "{posts:?}");
    assert_eq!(env.metadata_paths().len(), 2);
    let logs = daemon.logs();
    assert!(logs.contains("answered 404"), "{logs}");
    // The cache file names the new endpoint (a restart goes straight there).
    let cached: Value = serde_json::from_str(&read(&env.cache_file())).unwrap();
    assert!(
        cached["metadata"]["token_endpoint"]
            .as_str()
            .unwrap()
            .ends_with(&moved),
        "{cached}"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn hostile_metadata_is_refused_with_a_clear_error() {
    let issuer_doc = |endpoint: &str, issuer: &str| {
        format!(r#"{{"issuer":"{issuer}","token_endpoint":"{endpoint}"}}"#).into_bytes()
    };
    let env = Env::start().await;
    let issuer = env.provider.issuer();
    let cases: Vec<(Fault, &str)> = vec![
        (
            Fault::Custom {
                status: 200,
                content_type: "application/json".into(),
                body: vec![b' '; 3 << 20],
            },
            "larger than 1048576 bytes",
        ),
        (
            Fault::Custom {
                status: 200,
                content_type: "text/html".into(),
                body: b"<html>metadata-body-7c1e</html>".to_vec(),
            },
            "not JSON",
        ),
        (
            Fault::Custom {
                status: 200,
                content_type: "application/json".into(),
                body: issuer_doc("http://evil.example/token", &issuer),
            },
            "token_endpoint \"http://evil.example/token\" uses plain http",
        ),
        (
            Fault::Custom {
                status: 302,
                content_type: "text/plain".into(),
                body: Vec::new(),
            },
            "redirects are not followed",
        ),
    ];
    for (fault, want) in cases {
        env.provider.clear_requests();
        env.provider.fault_next(fault, 1);
        let r = env.once().await;
        assert_ne!(r.code, 0, "{want}");
        assert!(
            r.stderr.contains(want) && r.stderr.contains("discovery of issuer"),
            "{want}: {}",
            r.stderr
        );
        assert!(!r.stderr.contains("metadata-body-7c1e"), "{}", r.stderr);
        assert!(env.token_posts().is_empty(), "{want}");
    }
}

#[tokio::test]
async fn check_names_the_endpoint_and_warns_about_what_the_metadata_omits() {
    let env = Env::start().await;
    let r = run(&["check", "-c", env.cfg()]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let want = format!(
        "client \"disc\": token endpoint {}{} (from {}{RFC8414})",
        env.provider.base_url(),
        token_path(),
        env.provider.base_url()
    );
    assert!(r.stdout.contains(&want), "{}", r.stdout);
    assert!(r.stderr.is_empty(), "{}", r.stderr);

    // A password client: the metadata (Transatel's grants) does not list it.
    let text = read(&env.config).replace(
        "client_id = \"disc\"",
        "client_id = \"disc\"\ngrant_type = \"password\"\nusername = \"u\"\npassword = { file = \"secret\" }",
    );
    std::fs::write(&env.config, text).unwrap();
    let r = run(&["check", "-c", env.cfg()]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("does not list grant_type password in grant_types_supported"),
        "{}",
        r.stderr
    );

    // Unreachable: a warning, not a config error.
    env.provider.shutdown();
    let r = run(&["check", "-c", env.cfg()]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains(": OK, "), "{}", r.stdout);
    assert!(
        r.stderr
            .contains("warning: client \"disc\": discovery of issuer")
            && r.stderr.contains("keeps trying at run time"),
        "{}",
        r.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_of_one_issuer_share_one_fetch() {
    let env = Env::start().await;
    let mut text = read(&env.config);
    for name in ["disc-b", "disc-c", "disc-d"] {
        env.provider
            .register(RegisteredClient::transatel(name, SECRET));
        text.push_str(&format!(
            "\n[clients.{name}]\nissuer = \"{}\"\nclient_id = \"{name}\"\nclient_secret = {{ file = \"secret\" }}\nca_file = \"ca.pem\"\n",
            env.provider.issuer()
        ));
    }
    std::fs::write(&env.config, text).unwrap();
    let (mut daemon, _notify, ready) = DaemonProc::start_ready(&env.config, &[]).await;
    assert!(ready.contains("4/4 clients valid"), "{ready}");
    assert_eq!(env.metadata_paths(), [RFC8414], "{}", daemon.logs());
    assert_eq!(env.token_posts().len(), 4);
    daemon.stop().await;
}

#[tokio::test]
async fn a_client_assertion_is_addressed_to_the_discovered_endpoint() {
    let env = Env::start().await;
    let (private, public) = tokenwarden::keys::generate_es256().unwrap();
    env.provider.publish_dialect(Dialect::Talkdesk);
    env.provider.move_token_endpoints(Some("/v2"));
    env.provider.register(RegisteredClient::talkdesk(
        "disc-jwt",
        &public,
        Some("k1"),
        tokenwarden::keys::SigningAlg::ES256,
    ));
    std::fs::write(env.dir.path().join("key.pem"), private).unwrap();
    let text = read(&env.config)
        .replace("client_id = \"disc\"", "client_id = \"disc-jwt\"")
        .replace(
            "client_secret = { file = \"secret\" }",
            "client_auth = \"private_key_jwt\"\nprivate_key = { file = \"key.pem\" }\nkey_id = \"k1\"",
        );
    std::fs::write(&env.config, text).unwrap();
    let r = env.once().await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let moved = format!("/v2{}", Dialect::Talkdesk.path());
    assert_eq!(env.token_posts(), std::slice::from_ref(&moved));
    // The provider checked it (RFC 7523 §3: aud = the URL posted to); and so do we.
    let req = env
        .provider
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    let jwt = req.form_value("client_assertion").unwrap();
    let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(jwt).unwrap();
    assert_eq!(
        claims["aud"],
        format!("{}{moved}", env.provider.base_url()),
        "{claims}"
    );
}

#[tokio::test]
async fn a_metadata_endpoint_that_never_answers_is_bounded_by_the_timeout() {
    let env = Env::start().await;
    let text = read(&env.config).replace("timeout = \"5s\"", "timeout = \"1s\"");
    std::fs::write(&env.config, text).unwrap();
    env.provider.fault_next(Fault::Hang, 1);
    let started = std::time::Instant::now();
    let r = env.once().await;
    assert_ne!(r.code, 0);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        r.stderr.contains("discovery of issuer") && r.stderr.contains("no answer within 1s"),
        "{}",
        r.stderr
    );
    assert!(env.token_posts().is_empty());
}

/// A cache file pointing elsewhere, not owned by the daemon's user, or a link, is never used:
/// the metadata is fetched again (and the file replaced).
#[tokio::test]
async fn a_planted_cache_file_is_not_used() {
    let env = Env::start().await;
    assert_eq!(env.once().await.code, 0);
    let file = env.cache_file();
    let planted = read(&file).replace(&token_path(), "/planted/token");
    assert!(planted.contains("/planted/token"));
    let decoy = env.dir.path().join("decoy.json");
    std::fs::write(&decoy, &planted).unwrap();
    type Plant = Box<dyn Fn(&Path, &Path)>;
    let mut plants: Vec<(&str, Plant)> = vec![(
        "a link",
        Box::new(|file: &Path, decoy: &Path| {
            std::fs::remove_file(file).unwrap();
            std::os::unix::fs::symlink(decoy, file).unwrap();
        }),
    )];
    if nix::unistd::geteuid().is_root() {
        plants.push((
            "another user's file",
            Box::new(|file: &Path, decoy: &Path| {
                std::fs::copy(decoy, file).unwrap();
                nix::unistd::chown(file, Some(65534.into()), Some(65534.into())).unwrap();
            }),
        ));
    } else {
        eprintln!("SKIPPED: a cache file owned by another user needs root to plant");
    }
    for (what, plant) in plants {
        plant(&file, &decoy);
        std::fs::remove_file(env.state().join("disc.json")).unwrap();
        env.provider.clear_requests();
        let r = env.once().await;
        assert_eq!(r.code, 0, "{what}: {}", r.stderr);
        assert_eq!(env.metadata_paths(), [RFC8414], "{what}");
        assert_eq!(env.token_posts(), [token_path()], "{what}");
        // Replaced by a regular file of ours naming the real endpoint.
        let meta = std::fs::symlink_metadata(&file).unwrap();
        assert!(meta.file_type().is_file(), "{what}");
        assert!(!read(&file).contains("/planted/"), "{what}");
    }
}

#[tokio::test]
async fn the_metadata_is_fetched_over_verified_tls_only() {
    let env = Env::start().await;
    // Without the test CA (ca_file), the provider's certificate is not trusted.
    let text = read(&env.config).replace("ca_file = \"ca.pem\"\n", "");
    std::fs::write(&env.config, text).unwrap();
    let r = env.once().await;
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("discovery of issuer") && r.stderr.to_lowercase().contains("certificate"),
        "{}",
        r.stderr
    );
    assert!(env.metadata_paths().is_empty(), "no request got through");
    assert!(env.token_posts().is_empty());
}
