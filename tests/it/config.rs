//! The config loader against the fixtures in `tests/data/config/`: every valid one loads, every
//! invalid one fails with exactly the errors its `# error: LINE:COL: text` comments list
//! (written by `tests/data/config/gen/make_invalid.py`, which computes the locations).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokenwarden::config::{self, ClientAuth, Config, ConfigErrors, Grant, LogFormat, OutputFormat};
use tokenwarden::keys::SigningAlg;
use tokenwarden::secret::SecretSource;

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/config")
}

fn fixtures(dir: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(data().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    v
}

/// One `# error: [FILE:]LINE:COL: text` line.
#[derive(Debug)]
struct Expected {
    file: PathBuf,
    line: usize,
    column: usize,
    text: String,
}

fn expected_errors(path: &Path) -> Vec<Expected> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# error: ") else {
            if line.starts_with('#') {
                continue;
            }
            break;
        };
        let parts: Vec<&str> = rest.splitn(4, ':').collect();
        let (file, nums) = if parts[0].trim().parse::<usize>().is_ok() {
            (path.to_path_buf(), rest.splitn(3, ':').collect::<Vec<_>>())
        } else {
            (
                path.parent().unwrap().join(parts[0]),
                rest[parts[0].len() + 1..]
                    .splitn(3, ':')
                    .collect::<Vec<_>>(),
            )
        };
        out.push(Expected {
            file,
            line: nums[0].trim().parse().unwrap(),
            column: nums[1].trim().parse().unwrap(),
            text: nums[2].trim().to_string(),
        });
    }
    out
}

fn load(path: &Path) -> Config {
    match config::load(path) {
        Ok(c) => c,
        Err(e) => panic!("{} should load:\n{e}", path.display()),
    }
}

#[test]
fn fixtures_load_or_fail_as_listed() {
    // git keeps no mode but +x: secret files readable by others would warn.
    for entry in std::fs::read_dir(data().join("secrets")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
        }
    }
    let valid = fixtures("valid");
    assert!(valid.len() >= 8, "{} valid fixtures", valid.len());
    for path in &valid {
        let c = load(path);
        check_valid(path.file_stem().unwrap().to_str().unwrap(), &c);
    }

    let invalid = fixtures("invalid");
    assert!(invalid.len() >= 30, "{} invalid fixtures", invalid.len());
    let mut failures = Vec::new();
    for path in &invalid {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("credential") && std::env::var_os("CREDENTIALS_DIRECTORY").is_some() {
            continue;
        }
        let want = expected_errors(path);
        assert!(!want.is_empty(), "{name} lists no `# error:` lines");
        let got = match config::load(path) {
            Ok(_) => {
                failures.push(format!("{name}: loaded, but should fail"));
                continue;
            }
            Err(e) => e,
        };
        let matches = got.errors.len() == want.len()
            && got.errors.iter().zip(&want).all(|(g, w)| {
                g.file == w.file
                    && g.line == w.line
                    && g.column == w.column
                    && g.message.contains(&w.text)
            });
        if !matches {
            failures.push(format!(
                "{name}: expected\n{}\ngot\n{got}",
                want.iter()
                    .map(|w| format!("  {}:{}:{}: {}", w.file.display(), w.line, w.column, w.text))
                    .collect::<Vec<_>>()
                    .join("\n")
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

/// A few facts about each valid fixture's result.
fn check_valid(name: &str, c: &Config) {
    let secrets = data().join("secrets");
    match name {
        "transatel" => {
            assert_eq!(
                c.daemon.socket.as_deref(),
                Some(Path::new("/run/tokenwarden/tokenwarden.sock"))
            );
            assert_eq!(c.daemon.socket_mode, 0o660);
            assert_eq!(
                c.daemon.metrics_listen,
                Some("127.0.0.1:9464".parse().unwrap())
            );
            assert_eq!(c.daemon.log_format, LogFormat::Json);
            assert_eq!(c.daemon.max_concurrent_refreshes, 4);
            let t = &c.clients["transatel"];
            assert_eq!(t.grant, Grant::ClientCredentials);
            let ClientAuth::Basic { secret } = &t.client_auth else {
                panic!("{:?}", t.client_auth)
            };
            assert_eq!(secret.value.expose(), "transatel-secret");
            assert_eq!(
                secret.source,
                SecretSource::File(data().join("valid/../secrets/transatel"))
            );
            assert_eq!(t.scope, ["CATALOG_PRODUCTS_READ", "USER_READ"]);
            assert_eq!(t.allow_uids, [0, 1000]);
            assert_eq!(t.allow_gids, [0]);
            assert_eq!(t.rotate_cron.as_deref(), Some("0 0 3 * * *"));
            assert_eq!(t.outputs.len(), 2);
            let o = &t.outputs[0];
            assert_eq!(
                (o.mode, o.owner, o.group, o.format),
                (0o640, Some(0), Some(0), OutputFormat::Token)
            );
            assert_eq!(o.on_change, ["/usr/bin/systemctl", "reload", "app"]);
            let o = &t.outputs[1];
            assert_eq!(
                (o.mode, o.format, o.env_prefix.as_str()),
                (0o600, OutputFormat::Env, "TD_")
            );
            assert_eq!(c.files, [data().join("valid/transatel.toml")]);
        }
        "creads" => {
            let Grant::Password { username, password } = &c.clients["creads-files"].grant else {
                panic!()
            };
            assert_eq!(username, "user@example.com");
            assert_eq!(password.value.expose(), "creads-password");
            assert_eq!(c.clients["creads-files"].scope, ["files", "upload_files"]);
            assert_eq!(c.clients["creads-base"].scope, ["base"]);
            assert_eq!(c.clients["creads-base"].outputs[0].mode, 0o600);
            let Grant::RefreshToken { refresh_token } = &c.clients["creads-bootstrap"].grant else {
                panic!()
            };
            assert_eq!(refresh_token.value.expose(), "rt-bootstrap-token");
            // Defaults everywhere.
            assert_eq!(c.daemon, config::DaemonConfig::default());
        }
        "talentsoft-app" => {
            let t = &c.clients["talentsoft-app"];
            let ClientAuth::Post { secret } = &t.client_auth else {
                panic!()
            };
            assert_eq!(secret.source, SecretSource::Env("PATH".into()));
            assert_eq!(t.extra_params["tenant"], "acme");
            assert_eq!(t.extra_headers["X-Api-Version"], "2");
            assert_eq!(t.audience.as_deref(), Some("https://api.talent-soft.com"));
            assert_eq!(
                t.ca_file.as_deref(),
                Some(data().join("valid/../keys/ca.pem").as_path())
            );
        }
        "talentsoft-user" => {
            let t = &c.clients["talentsoft-user"];
            assert_eq!(t.grant_type(), config::JWT_BEARER_GRANT);
            assert_eq!(t.client_auth, ClientAuth::None);
            let Grant::JwtBearer { assertion } = &t.grant else {
                panic!()
            };
            assert_eq!(assertion.key.alg, SigningAlg::HS256);
            assert_eq!(assertion.lifetime, Duration::from_secs(1200));
            assert_eq!(assertion.claims["sub"], "TalentSoftMarketPlace");
            assert_eq!(assertion.claims["level"], 3);
            assert_eq!(assertion.claims["admin"], false);
            let r = &c.clients["jwt-rsa"];
            assert_eq!(r.client_id, None);
            let Grant::JwtBearer { assertion } = &r.grant else {
                panic!()
            };
            assert_eq!(assertion.key.alg, SigningAlg::RS256);
            assert_eq!(assertion.key_id.as_deref(), Some("rsa-1"));
            assert_eq!(assertion.lifetime, Duration::from_secs(300));
        }
        "talkdesk" => {
            let alg = |n: &str| match &c.clients[n].client_auth {
                ClientAuth::PrivateKeyJwt { key, .. } => key.alg,
                other => panic!("{other:?}"),
            };
            assert_eq!(alg("talkdesk-com"), SigningAlg::ES256);
            assert_eq!(alg("talkdesk-eu"), SigningAlg::ES256);
            assert_eq!(alg("talkdesk-ca"), SigningAlg::PS256);
            assert_eq!(alg("ed"), SigningAlg::EdDSA);
            let ClientAuth::PrivateKeyJwt {
                key_id, lifetime, ..
            } = &c.clients["talkdesk-com"].client_auth
            else {
                panic!()
            };
            assert_eq!(key_id.as_deref(), Some("key-1"));
            assert_eq!(*lifetime, Duration::from_secs(300));
        }
        "defaults" => {
            let i = &c.clients["inherits"].timing;
            assert_eq!(i.refresh_at, 0.5);
            assert_eq!(i.jitter, 0.2);
            assert_eq!(i.refresh_margin, Duration::from_secs(60));
            assert_eq!(i.timeout, Duration::from_secs(5400));
            assert_eq!(i.retry_max, Duration::from_secs(600));
            let o = &c.clients["overrides"].timing;
            assert_eq!((o.refresh_at, o.jitter), (0.9, 0.0));
            assert_eq!(o.timeout, Duration::from_secs(5));
            assert_eq!(o.default_lifetime, Duration::from_secs(1800));
        }
        "secret-jwt-and-public" => {
            let ClientAuth::SecretJwt {
                key,
                lifetime,
                secret,
            } = &c.clients["hmac"].client_auth
            else {
                panic!()
            };
            assert_eq!(key.alg, SigningAlg::HS512);
            assert_eq!(*lifetime, Duration::from_secs(300));
            assert!(matches!(secret.source, SecretSource::Inline(_)));
            assert_eq!(c.clients["public"].client_auth, ClientAuth::None);
            let ClientAuth::SecretJwt { key, .. } = &c.clients["jwt-default-alg"].client_auth
            else {
                panic!()
            };
            assert_eq!(key.alg, SigningAlg::HS256);
        }
        "includes" => {
            let names: Vec<&str> = c.clients.keys().map(String::as_str).collect();
            assert_eq!(names, ["from-include-a", "from-include-b", "main"]);
            let conf_d = data().join("valid/../include/conf.d");
            assert_eq!(
                c.files,
                [
                    data().join("valid/includes.toml"),
                    conf_d.join("10-a.toml"),
                    conf_d.join("20-b.toml")
                ]
            );
            let ClientAuth::Basic { secret } = &c.clients["from-include-a"].client_auth else {
                panic!()
            };
            assert_eq!(secret.value.expose(), "creads-secret");
            // [defaults] of the main file reach the included clients.
            assert_eq!(
                c.clients["from-include-a"].timing.timeout,
                Duration::from_secs(3)
            );
            assert_eq!(
                c.clients["from-include-b"].timing.timeout,
                Duration::from_secs(7)
            );
        }
        "inline-forms" => {
            let d = &c.clients["dotted"];
            assert_eq!(d.outputs.len(), 2);
            assert_eq!(d.outputs[1].mode, 0o644);
            assert!(c.clients.contains_key("inline"));
        }
        "minimal" => {
            let m = &c.clients["m"];
            assert_eq!(m.timing, config::Timing::default());
            assert!(m.outputs.is_empty());
            assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        }
        other => panic!("no checks for valid fixture {other}"),
    }
    let _ = secrets;
}

#[test]
fn loading_twice_gives_equal_configs() {
    for path in fixtures("valid") {
        assert_eq!(load(&path), load(&path), "{}", path.display());
    }
}

#[test]
fn secrets_of_any_type_never_reach_errors() {
    let path = data().join("invalid/secret-types.toml");
    let rendered = format!("{}", config::load(&path).unwrap_err());
    for value in [
        "314159265",
        "2.718281828",
        "true",
        "hunter2-in-an-array",
        "271828182",
        "1979-05-27",
        "161803398",
        "hunter2-in-a-table",
        "141421356",
        "173205080",
        "223606797",
    ] {
        assert!(!rendered.contains(value), "{value} in:\n{rendered}");
    }
}

#[test]
fn secrets_never_reach_errors_or_debug() {
    let path = data().join("invalid/inline-secret-redacted.toml");
    let errors: ConfigErrors = config::load(&path).unwrap_err();
    let rendered = format!("{errors}\n{errors:?}");
    for secret in [
        "hunter2-password-value",
        "hunter2-not-a-key",
        "hunter2-client-secret",
    ] {
        assert!(!rendered.contains(secret), "{secret} in:\n{rendered}");
    }

    let c = load(&data().join("valid/secret-jwt-and-public.toml"));
    let debug = format!("{c:?}");
    assert!(!debug.contains("inline-hmac-secret-4f1d2c"), "{debug}");
    assert!(
        !debug.contains(&std::env::var("HOME").unwrap()),
        "env secret in Debug"
    );
    let c = load(&data().join("valid/talkdesk.toml"));
    let key = std::fs::read_to_string(data().join("keys/es256.pem")).unwrap();
    let debug = format!("{c:?}");
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!debug.contains(line), "key material in Debug");
    }
}

#[test]
fn inline_secret_in_a_readable_file_warns() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tw.toml");
    std::fs::write(
        &path,
        "[clients.x]\ntoken_url = \"https://a.example/t\"\nclient_id = \"x\"\nclient_secret = \"s3cr3t-inline\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let c = load(&path);
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(
        c.warnings[0].starts_with(&format!("{}:4:17: client_secret", path.display())),
        "{:?}",
        c.warnings
    );
    assert!(!c.warnings[0].contains("s3cr3t-inline"));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(load(&path).warnings.is_empty());
}

#[test]
fn load_str_resolves_relative_to_the_given_path() {
    let path = data().join("valid/not-on-disk.toml");
    let text = "[clients.x]\ntoken_url = \"https://a.example/t\"\nclient_id = \"x\"\nclient_secret = { file = \"../secrets/creads\" }\n";
    let c = config::load_str(text, &path).unwrap();
    let ClientAuth::Basic { secret } = &c.clients["x"].client_auth else {
        panic!()
    };
    assert_eq!(secret.value.expose(), "creads-secret");
    assert_eq!(c.path, path);
}

#[test]
fn an_unreadable_file_is_one_error() {
    let e = config::load(Path::new("/nonexistent/tokenwarden.toml")).unwrap_err();
    assert_eq!(e.errors.len(), 1);
    assert!(
        e.to_string()
            .starts_with("/nonexistent/tokenwarden.toml: cannot read"),
        "{e}"
    );
}

/// `{ credential = NAME }` needs `$CREDENTIALS_DIRECTORY`, which this process must not set
/// (setting the environment of a threaded process is unsound): run this file's
/// `credential_child` test in a child process with the variable set.
#[test]
fn systemd_credentials_are_read_from_the_credentials_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("creads-password"), "from-credential\n").unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "config::credential_child", "--nocapture"])
        .env("CREDENTIALS_DIRECTORY", dir.path())
        .env("TW_CONFIG_CREDENTIAL_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("credential-child-ok"), "{stdout}");
}

#[test]
fn credential_child() {
    if std::env::var_os("TW_CONFIG_CREDENTIAL_CHILD").is_none() {
        return;
    }
    let text = "[clients.x]\ntoken_url = \"https://a.example/t\"\ngrant_type = \"password\"\nclient_id = \"x\"\n\
                client_secret = { file = \"../secrets/creads\" }\nusername = \"u\"\npassword = { credential = \"creads-password\" }\n";
    let c = config::load_str(text, &data().join("valid/x.toml")).unwrap();
    let Grant::Password { password, .. } = &c.clients["x"].grant else {
        panic!()
    };
    assert_eq!(password.value.expose(), "from-credential");
    assert_eq!(
        password.source,
        SecretSource::Credential("creads-password".into())
    );
    println!("credential-child-ok");
}

/// A reload that reuses the running config (`load_reusing`): unchanged clients are the very
/// same `Arc`s, changed ones are built again, and the result is what a full load gives.
mod reuse {
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use tokenwarden::config::{self, Config, Reuse};

    /// A token exchange client whose subject is client `upstream`'s token.
    fn chained(name: &str, upstream: &str) -> String {
        format!(
            "[clients.{name}]\ntoken_url = \"https://idp.example/token\"\ngrant_type = \"token_exchange\"\n\
             client_auth = \"client_secret_post\"\nclient_id = \"{name}\"\nclient_secret = \"secret-{name}\"\n\
             subject_token = {{ client = \"{upstream}\" }}\n\n"
        )
    }

    fn client(name: &str, scope: &str, secret: &str, out: &Path) -> String {
        format!(
            "[clients.{name}]\ntoken_url = \"https://idp.example/token\"\nclient_auth = \"client_secret_post\"\n\
             client_id = \"{name}\"\nclient_secret = {secret}\nscope = \"{scope}\"\n\
             outputs = [{{ path = {:?}, format = \"token\" }}]\n\n",
            out.join(format!("{name}.token"))
        )
    }

    struct Files {
        _dir: tempfile::TempDir,
        root: PathBuf,
        config: PathBuf,
    }

    fn files() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::write(root.join("b.secret"), "secret-b\n").unwrap();
        // Not readable by others: that would warn.
        std::fs::set_permissions(
            root.join("b.secret"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        Files {
            config: root.join("tw.toml"),
            root,
            _dir: dir,
        }
    }

    impl Files {
        fn write(&self, text: &str) {
            std::fs::write(&self.config, text).unwrap();
            std::fs::set_permissions(&self.config, std::fs::Permissions::from_mode(0o600)).unwrap();
        }

        fn text(&self, defaults: &str, a_scope: &str, b_secret_path: &str) -> String {
            let out = self.root.join("out");
            format!(
                "{defaults}{}{}{}",
                client("a", a_scope, "\"secret-a\"", &out),
                client(
                    "b",
                    "read",
                    &format!("{{ file = {b_secret_path:?} }}"),
                    &out
                ),
                client("c", "read", "\"secret-c\"", &out),
            )
        }
    }

    fn same(a: &Config, b: &Config, name: &str) -> bool {
        Arc::ptr_eq(&a.clients[name], &b.clients[name])
    }

    fn reload(f: &Files, previous: &Config, changed: &[PathBuf]) -> Config {
        config::load_reusing(&f.config, Some(Reuse { previous, changed })).unwrap()
    }

    #[test]
    fn unchanged_clients_are_taken_as_they_are() {
        let f = files();
        let secret = f.root.join("b.secret");
        f.write(&f.text("", "read", &secret.to_string_lossy()));
        let first = config::load(&f.config).unwrap();

        // One client's scope changes: only it is built again.
        f.write(&f.text("", "read write", &secret.to_string_lossy()));
        let second = reload(&f, &first, std::slice::from_ref(&f.config));
        assert!(!same(&first, &second, "a"));
        assert!(same(&first, &second, "b") && same(&first, &second, "c"));
        assert_eq!(second, config::load(&f.config).unwrap(), "as a full load");
        assert_eq!(second.clients["a"].scope, ["read", "write"]);
        let d = config::diff(&first, &second);
        assert_eq!(d.unchanged, ["b", "c"]);
        assert_eq!(d.changed.len(), 1);

        // Nothing changed in the text, but b's secret file did: b is built again with it.
        std::fs::write(&secret, "secret-b2\n").unwrap();
        let third = reload(&f, &second, std::slice::from_ref(&secret));
        assert!(!same(&second, &third, "b"));
        assert!(same(&second, &third, "a") && same(&second, &third, "c"));
        assert_eq!(third, config::load(&f.config).unwrap());
        assert_ne!(
            third.clients["b"], second.clients["b"],
            "the new secret is read"
        );

        // [defaults] apply to every client: all are built again.
        f.write(&f.text(
            "[defaults]\nrefresh_at = 0.5\n\n",
            "read write",
            &secret.to_string_lossy(),
        ));
        let fourth = reload(&f, &third, std::slice::from_ref(&f.config));
        for name in ["a", "b", "c"] {
            assert!(!same(&third, &fourth, name), "{name}");
            assert_eq!(fourth.clients[name].timing.refresh_at, 0.5);
        }
    }

    #[test]
    fn a_config_that_warned_is_read_again_and_warns_again() {
        let f = files();
        let secret = f.root.join("b.secret");
        f.write(&f.text("", "read", &secret.to_string_lossy()));
        // Readable by others with inline secrets: a and c warn.
        std::fs::set_permissions(&f.config, std::fs::Permissions::from_mode(0o644)).unwrap();
        let first = config::load(&f.config).unwrap();
        assert_eq!(first.warnings.len(), 2, "{:?}", first.warnings);
        let again = reload(&f, &first, std::slice::from_ref(&f.config));
        assert_eq!(again.warnings, first.warnings);
        assert_eq!(again, first);
        // Made readable by others after a quiet load: the next reload warns too.
        std::fs::set_permissions(&f.config, std::fs::Permissions::from_mode(0o600)).unwrap();
        let quiet = config::load(&f.config).unwrap();
        assert!(quiet.warnings.is_empty());
        std::fs::set_permissions(&f.config, std::fs::Permissions::from_mode(0o644)).unwrap();
        let warned = reload(&f, &quiet, std::slice::from_ref(&f.config));
        assert_eq!(warned.warnings.len(), 2, "{:?}", warned.warnings);
    }

    /// Whatever the edit, a reload gives what a full load of the new text gives (the same
    /// config, or the same errors): the shortcut reads only the clients whose tables changed,
    /// and must fall back to a full load wherever that could differ.
    #[test]
    fn a_reload_reads_what_a_full_load_reads() {
        let f = files();
        let secret = f.root.join("b.secret");
        let out = f.root.join("out");
        let base = format!(
            "[daemon]\nlog_level = \"info\"\n\n{}[clients.g]\ntoken_url = \"https://idp.example/token\"\n\
             client_id = \"g\"\nclient_secret = \"secret-g\"\nscope = \"g\"\n[[clients.g.outputs]]\n\
             path = {:?}\n[clients.g.extra_params]\nx = \"1\"\n",
            f.text("", "read", &secret.to_string_lossy()),
            out.join("g.token")
        );
        let d = client("d", "read", "\"secret-d\"", &out);
        let e = client("e", "read", "\"secret-e\"", &out);
        type Edit = Box<dyn Fn(&str) -> String>;
        let edits: Vec<(&str, Edit)> = vec![
            ("nothing", Box::new(|t| t.to_string())),
            (
                "a scope",
                Box::new(|t| t.replacen("scope = \"read\"", "scope = \"x y\"", 1)),
            ),
            (
                "c scope",
                Box::new(|t| {
                    t.replace(
                        "\"c\"\nclient_secret = \"secret-c\"\nscope = \"read\"",
                        "\"c\"\nclient_secret = \"secret-c\"\nscope = \"z\"",
                    )
                }),
            ),
            (
                "client added at the end",
                Box::new({
                    let d = d.clone();
                    move |t| format!("{t}{d}")
                }),
            ),
            (
                "client added in the middle",
                Box::new({
                    let d = d.clone();
                    move |t| t.replacen("[clients.b]", &format!("{d}[clients.b]"), 1)
                }),
            ),
            (
                "client removed",
                Box::new(|t| match (t.find("[clients.b]"), t.find("[clients.c]")) {
                    (Some(b), Some(c)) if b < c => format!("{}{}", &t[..b], &t[c..]),
                    _ => t.to_string(),
                }),
            ),
            (
                "client renamed",
                Box::new(|t| t.replace("[clients.b]", "[clients.bb]")),
            ),
            (
                "defined twice",
                Box::new(|t| t.replace("[clients.b]", "[clients.a]")),
            ),
            (
                "an output taken",
                Box::new(|t| t.replace("c.token", "a.token")),
            ),
            (
                "a comment",
                Box::new(|t| t.replace("[clients.c]", "# c follows\n[clients.c]")),
            ),
            (
                "a comment in a client",
                Box::new(|t| t.replacen("scope", "# the scope\nscope", 1)),
            ),
            (
                "[daemon] edited",
                Box::new(|t| t.replace("\"info\"", "\"debug\"")),
            ),
            (
                "[defaults] added",
                Box::new(|t| format!("[defaults]\nrefresh_at = 0.6\n{t}")),
            ),
            (
                "a key for [daemon] moved below a client",
                Box::new(|t| format!("{t}[daemon.x]\n")),
            ),
            (
                "a bare [clients] header",
                Box::new(|t| t.replace("[clients.c]", "[clients]\n[clients.c]")),
            ),
            (
                "a dotted client",
                Box::new(|t| format!("{t}[clients.e]\nclients.f.scope = \"x\"\n")),
            ),
            (
                "a header in a string",
                Box::new(|t| {
                    t.replacen(
                        "scope = \"read\"",
                        "scope = \"\"\"\n[clients.z]\nread\"\"\"",
                        1,
                    )
                }),
            ),
            (
                "a string left open",
                Box::new(|t| t.replacen("scope = \"read\"", "scope = \"\"\"read", 1)),
            ),
            (
                "a syntax error",
                Box::new(|t| t.replacen("scope = \"read\"", "scope = = 1", 1)),
            ),
            (
                "a semantic error",
                Box::new(|t| t.replacen("scope = \"read\"", "scope = 5", 1)),
            ),
            (
                "an unknown key",
                Box::new(|t| t.replacen("scope = \"read\"", "scopes = \"read\"", 1)),
            ),
            (
                "no newline at the end, then a client",
                Box::new({
                    let d = d.clone();
                    move |t| format!("{}{d}", t.trim_end())
                }),
            ),
            (
                "a client's header indented",
                Box::new(|t| t.replace("[clients.c]", "  [clients.c]")),
            ),
            (
                "an inline secret made a file",
                Box::new({
                    let s = secret.clone();
                    move |t| t.replace("\"secret-a\"", &format!("{{ file = {s:?} }}"))
                }),
            ),
            ("everything", Box::new(|_| String::from("[clients.q]\n"))),
            ("empty", Box::new(|_| String::new())),
            (
                "g scope",
                Box::new(|t| t.replace("scope = \"g\"", "scope = \"g2\"")),
            ),
            ("g output", Box::new(|t| t.replace("g.token", "g2.token"))),
            (
                "g extra_params",
                Box::new(|t| t.replace("x = \"1\"", "x = \"2\"")),
            ),
            (
                "a's tables apart, then a's scope",
                Box::new(|t| match t.contains("[clients.a.extra_params]") {
                    true => t.replacen("scope = \"read\"", "scope = \"x y\"", 1),
                    false => format!("{t}[clients.a.extra_params]\nfoo = \"1\"\n"),
                }),
            ),
            (
                "a client chained on c, then c removed under it",
                Box::new(|t| match t.find("[clients.x]") {
                    None => format!("{t}{}", chained("x", "c")),
                    Some(_) => {
                        let c = t.find("[clients.c]").unwrap_or(t.len());
                        let next = t[c..]
                            .get(1..)
                            .and_then(|r| r.find("[clients."))
                            .map_or(t.len(), |n| c + 1 + n);
                        format!("{}{}", &t[..c], &t[next..])
                    }
                }),
            ),
            (
                "a client chained on a missing one",
                Box::new(|t| format!("{t}{}", chained("x", "nobody"))),
            ),
            (
                "a chain that loops",
                Box::new(|t| format!("{t}{}{}", chained("x", "y"), chained("y", "x"))),
            ),
        ];
        let fast = [
            "a scope",
            "c scope",
            "client added at the end",
            "client added in the middle",
            "client removed",
            "client renamed",
            "a comment",
            "a comment in a client",
            "an inline secret made a file",
            "g scope",
            "g output",
            "g extra_params",
        ];
        for (what, edit) in &edits {
            for start in [base.clone(), base.trim_end().to_string(), edit(&base)] {
                f.write(&start);
                let Ok(previous) = config::load(&f.config) else {
                    continue;
                };
                let text = edit(&start);
                f.write(&text);
                let full = config::load(&f.config).map_err(|e| e.to_string());
                let reloaded = config::load_reusing(
                    &f.config,
                    Some(Reuse {
                        previous: &previous,
                        changed: std::slice::from_ref(&f.config),
                    }),
                )
                .map_err(|e| e.to_string());
                assert_eq!(reloaded, full, "{what}, from:\n{start}\nto:\n{text}");
                // And the reload after it, from what this one laid out.
                if let Ok(reloaded) = &reloaded {
                    let then = format!(
                        "{}{e}",
                        text.replace("scope = \"read\"\noutputs", "scope = \"r2\"\noutputs")
                    );
                    f.write(&then);
                    let again = config::load_reusing(
                        &f.config,
                        Some(Reuse {
                            previous: reloaded,
                            changed: std::slice::from_ref(&f.config),
                        }),
                    );
                    let full = config::load(&f.config).map_err(|e| e.to_string());
                    assert_eq!(
                        again.map_err(|e| e.to_string()),
                        full,
                        "{what}, then:\n{then}"
                    );
                }
                // Edits of clients' tables alone take the other clients as they were.
                if let (Ok(new), true) = (&reloaded, start == base && fast.contains(what)) {
                    let kept = new.clients.iter().filter(|(n, c)| {
                        previous.clients.get(*n).is_some_and(|p| Arc::ptr_eq(p, c))
                    });
                    assert!(kept.count() >= 2, "{what}: the others were built again");
                }
            }
        }
    }

    #[test]
    fn an_output_clash_with_a_reused_client_is_still_an_error() {
        let f = files();
        let secret = f.root.join("b.secret");
        let good = f.text("", "read", &secret.to_string_lossy());
        f.write(&good);
        let first = config::load(&f.config).unwrap();
        // c now writes to b's file; b's table is unchanged.
        let clash = good.replace("c.token", "b.token");
        f.write(&clash);
        let err = config::load_reusing(
            &f.config,
            Some(Reuse {
                previous: &first,
                changed: std::slice::from_ref(&f.config),
            }),
        )
        .unwrap_err();
        assert_eq!(err.errors.len(), 1, "{err}");
        assert!(
            err.errors[0]
                .message
                .contains("is already used by client \"b\""),
            "{err}"
        );
    }
}

/// How a load judges the files and directories a config names (`safepath::Checker`).
mod judged {
    use std::os::unix::fs::PermissionsExt;

    use tokenwarden::safepath::{Checker, SafePathError, Trust};

    /// A pass judges each directory once (10,000 secret files in one directory are one
    /// walk): what passed is not walked again in the same pass, a new pass walks it again, and
    /// a refusal is not remembered, so every use of a refused directory is reported.
    #[test]
    fn a_pass_judges_each_directory_once() {
        let dir = tempfile::tempdir().unwrap();
        let t = Trust::of_this_process();
        let secrets = dir.path().join("secrets");
        std::fs::create_dir(&secrets).unwrap();
        for name in ["a", "b"] {
            std::fs::write(secrets.join(name), "s").unwrap();
            std::fs::set_permissions(secrets.join(name), std::fs::Permissions::from_mode(0o600))
                .unwrap();
        }
        let mut pass = Checker::new(t);
        assert_eq!(pass.file(&secrets.join("a")).unwrap(), Some(0o600));
        pass.dir(&secrets).unwrap();
        // Opened to everyone after it was judged: this pass does not look again.
        std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(pass.file(&secrets.join("b")).unwrap(), Some(0o600));
        pass.dir(&secrets).unwrap();
        let mut next = Checker::new(t);
        for _ in 0..2 {
            let e = next.file(&secrets.join("a")).unwrap_err();
            assert!(e.is_unsafe() && e.to_string().contains("0777"), "{e}");
            assert!(next.dir(&secrets).is_err());
        }
        // A file others can write is refused whatever its directory.
        std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(secrets.join("b"), std::fs::Permissions::from_mode(0o666))
            .unwrap();
        let e = Checker::new(t).file(&secrets.join("b")).unwrap_err();
        assert!(matches!(e, SafePathError::UntrustedFile { .. }), "{e:?}");
        assert_eq!(
            Checker::new(t).file(&secrets.join("missing")).unwrap(),
            None
        );
    }

    /// A secret file's name may be a link (Kubernetes volumes): its target is judged, and so
    /// is the directory holding the link.
    #[test]
    fn a_linked_file_is_judged_at_its_target_and_at_the_link() {
        let dir = tempfile::tempdir().unwrap();
        let t = Trust::of_this_process();
        let real = dir.path().join("real");
        let links = dir.path().join("links");
        std::fs::create_dir(&real).unwrap();
        std::fs::create_dir(&links).unwrap();
        std::fs::write(real.join("s"), "s").unwrap();
        std::fs::set_permissions(real.join("s"), std::fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::symlink(real.join("s"), links.join("s")).unwrap();
        assert_eq!(Checker::new(t).file(&links.join("s")).unwrap(), Some(0o640));
        std::fs::set_permissions(&links, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Checker::new(t).file(&links.join("s")).unwrap_err();
        assert!(matches!(e, SafePathError::Untrusted { .. }), "{e:?}");
        assert_eq!(e.component(), links.as_path());
        std::fs::set_permissions(&links, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Checker::new(t).file(&links.join("s")).unwrap_err();
        assert_eq!(e.component(), real.as_path(), "{e}");
    }
}

/// A reload of a large config, with each client's secret in a file of its own.
mod large {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::time::Duration;

    use crate::support::{DaemonProc, DemoEnv, read, wait_for};

    /// Clients besides the demo's five.
    const CLIENTS: usize = 2000;

    /// The demo config with `CLIENTS` more clients (client_secret_post against the demo's
    /// provider, a secret file each); `round` is client bulk0's scope.
    fn large_config(env: &DemoEnv, demo: &str, round: usize) -> String {
        let start = demo.find("[clients.talentsoft-app]\n").unwrap();
        let header_end = start + "[clients.talentsoft-app]\n".len();
        let end = demo.find("[[clients.talentsoft-app.outputs]]").unwrap();
        let body = &demo[header_end..end];
        let secret = env.secret("talentsoft");
        let secrets = env.dir.path().join("bulk-secrets");
        let mut text = demo.to_string();
        for i in 0..CLIENTS {
            let file = secrets.join(format!("bulk{i}"));
            if round == 0 {
                std::fs::create_dir_all(&secrets).unwrap();
                std::fs::write(&file, &secret).unwrap();
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
            let body: String = body
                .lines()
                .map(|l| match l.starts_with("client_secret") {
                    true => format!("client_secret = {{ file = {file:?} }}\n"),
                    false => format!("{l}\n"),
                })
                .collect();
            let scope = if i == 0 {
                format!("r{round}")
            } else {
                "r".into()
            };
            text.push_str(&format!(
                "\n[clients.bulk{i}]\n{body}scope = \"{scope}\"\n[[clients.bulk{i}.outputs]]\n\
                 path = {:?}\nformat = \"token\"\n",
                env.out(&format!("bulk{i}.token"))
            ));
        }
        text
    }

    fn write_by_rename(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    /// (VmRSS, VmHWM) of `pid` in KiB.
    fn memory(pid: i32) -> (u64, u64) {
        let status = read(Path::new(&format!("/proc/{pid}/status")));
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// The parse of a large config takes tens of times the file's size (the TOML parser's
    /// tokens, events and tables), freed in the middle of the heap where glibc kept it
    /// resident: at 10,000 clients one reload took the daemon from 60 to 135 MiB for good.
    /// After three reloads RSS must be back within five times the file's size of where it was.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_reload_of_a_large_config_gives_its_memory_back() {
        let env = DemoEnv::start(Duration::from_secs(600)).await;
        let demo = read(&env.demo.config);
        let config = env.demo.config.clone();
        write_by_rename(&config, &large_config(&env, &demo, 0));
        let size = std::fs::metadata(&config).unwrap().len() / 1024;
        let mut daemon = DaemonProc::start(&config, &[]);
        daemon
            .wait_log(
                &format!("ready: {n}/{n} clients valid", n = CLIENTS + 5),
                Duration::from_secs(120),
            )
            .await;
        let (ready, _) = memory(daemon.pid());
        for round in 1..=3 {
            write_by_rename(&config, &large_config(&env, &demo, round));
            wait_for("the reload", Duration::from_secs(60), || {
                daemon.logs().matches("reloaded added=0").count() == round
            })
            .await;
        }
        assert!(!daemon.logs().contains("reload refused"));
        // The memory is given back after each reload's new config is in place.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (rss, hwm) = memory(daemon.pid());
            if rss <= ready + 5 * size {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "RSS {rss} KiB (peak {hwm}) after 3 reloads of a {size} KiB config; {ready} KiB \
                 before"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        daemon.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(daemon.wait_exit(Duration::from_secs(30)).await.success());
    }
}
