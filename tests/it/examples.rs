//! The example configs in `config/`: each passes `tokenwarden check` as shipped (the real
//! binary, with a dummy systemd credential for every secret it names), together they install
//! into one `conf.d`, every client is commented, and between them they show what an operator
//! needs (every output format, `on_change`, `rotate_cron`, `allow_*`, secrets as credentials,
//! production paths).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use toml::{Table, Value};

/// Every example, with the clients it defines. A new file in `config/` must be added here.
const EXAMPLES: &[(&str, &[&str])] = &[
    ("creads.toml", &["creads-base", "creads-files"]),
    ("discovery.toml", &["acme-discovery"]),
    ("mtls.toml", &["mtls-billing"]),
    ("kubernetes-client-assertion.toml", &["entra-workload"]),
    ("talentsoft-application.toml", &["talentsoft-app"]),
    ("talentsoft-user.toml", &["talentsoft-user"]),
    ("talkdesk.toml", &["talkdesk", "talkdesk-ca", "talkdesk-eu"]),
    ("token-exchange.toml", &["backend", "orders-api"]),
    ("tokenwarden.toml", &["example"]),
    ("transatel.toml", &["transatel"]),
];

/// Where the Kubernetes example reads its projected token.
const PROJECTED_TOKEN: &str = "/var/run/secrets/azure/tokens/azure-identity-token";

/// The example `file` as `check` should read it here: as shipped, except that a projected
/// service-account token path points at a fresh JWT in `dir` (a pod would have the real one).
fn staged(file: &str, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(example(file)).unwrap();
    if !text.contains(PROJECTED_TOKEN) {
        return example(file);
    }
    use base64::Engine as _;
    let b = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let exp = tokenwarden::token::unix_seconds(std::time::SystemTime::now()) + 3600;
    let jwt = format!(
        "{}.{}.{}",
        b(r#"{"alg":"RS256","typ":"JWT"}"#),
        b(&format!(
            r#"{{"aud":["api://AzureADTokenExchange"],"exp":{exp}}}"#
        )),
        b("signature")
    );
    let token = dir.join("azure-identity-token");
    std::fs::write(&token, jwt).unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = dir.join(file);
    std::fs::write(&out, text.replace(PROJECTED_TOKEN, token.to_str().unwrap())).unwrap();
    out
}

/// The main config; every other example is a provider file for its `conf.d`.
const MAIN: &str = "tokenwarden.toml";

/// Keys whose value is a secret (docs/configuration.md#secrets).
const SECRET_KEYS: [&str; 7] = [
    "client_secret",
    "password",
    "refresh_token",
    "private_key",
    "key",
    "tls_client_cert",
    "tls_client_key",
];

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

fn example(name: &str) -> PathBuf {
    config_dir().join(name)
}

fn parse(path: &Path) -> Table {
    let text = std::fs::read_to_string(path).unwrap();
    text.parse::<Table>()
        .unwrap_or_else(|e| panic!("{} is not TOML: {e}", path.display()))
}

/// A secret as an example writes it.
#[derive(Debug, PartialEq)]
enum SecretUse {
    /// `{ credential = NAME }`; `key` is true when it must hold a private key.
    Credential { name: String, key: bool },
    /// Anything else (`file`, `env`, inline), with the key's dotted path.
    Other(String),
}

/// Every secret in `table`, depth first.
fn secrets(table: &Table, at: &str, out: &mut Vec<SecretUse>) {
    for (k, v) in table {
        let path = format!("{at}.{k}");
        if SECRET_KEYS.contains(&k.as_str()) {
            let credential = v
                .as_table()
                .filter(|t| t.len() == 1)
                .and_then(|t| t.get("credential"))
                .and_then(Value::as_str);
            out.push(match credential {
                Some(name) => SecretUse::Credential {
                    name: name.to_owned(),
                    // A private key, or an assertion key of an asymmetric algorithm.
                    key: k == "private_key"
                        || (k == "key"
                            && !table
                                .get("signing_alg")
                                .and_then(Value::as_str)
                                .unwrap_or("HS256")
                                .starts_with("HS")),
                },
                None => SecretUse::Other(path),
            });
        } else if let Some(t) = v.as_table() {
            secrets(t, &path, out);
        } else if let Some(items) = v.as_array() {
            for (i, item) in items.iter().enumerate() {
                if let Some(t) = item.as_table() {
                    secrets(t, &format!("{path}[{i}]"), out);
                }
            }
        }
    }
}

/// The credentials `file` names: name → whether it holds a private key.
fn credentials(file: &Path) -> BTreeMap<String, bool> {
    let mut found = Vec::new();
    secrets(&parse(file), "", &mut found);
    let mut out = BTreeMap::new();
    for s in found {
        match s {
            SecretUse::Credential { name, key } => {
                out.insert(name, key);
            }
            SecretUse::Other(at) => panic!(
                "{}: secret {at} should be a {{ credential = NAME }} (the recommended production way; \
                 show file/env in a comment)",
                file.display()
            ),
        }
    }
    out
}

/// The credential names of each client's `tls_client_cert` and `tls_client_key` in `file`.
fn certificate_pairs(file: &Path) -> Vec<(String, String)> {
    let t = parse(file);
    let credential = |v: Option<&Value>| {
        v.and_then(Value::as_table)
            .and_then(|t| t.get("credential"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let clients = t.get("clients").and_then(Value::as_table);
    clients
        .into_iter()
        .flatten()
        .filter_map(|(_, c)| {
            let c = c.as_table()?;
            Some((
                credential(c.get("tls_client_cert"))?,
                credential(c.get("tls_client_key"))?,
            ))
        })
        .collect()
}

/// A `CREDENTIALS_DIRECTORY` holding a dummy value for every credential of `files`: a fresh
/// ES256 PKCS#8 key for private keys, a self-signed certificate and its key for a
/// `tls_client_cert`/`tls_client_key` pair, a random string otherwise.
fn credentials_dir(files: &[PathBuf]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in files {
        let pairs = certificate_pairs(file);
        for (name, key) in credentials(file) {
            let pair = pairs.iter().find(|(c, k)| *c == name || *k == name);
            let value = if let Some((cert_name, key_name)) = pair {
                // Both files of the pair at once, when the first of them comes.
                if dir.path().join(cert_name).exists() {
                    continue;
                }
                let made =
                    rcgen::generate_simple_self_signed(vec!["client.example".into()]).unwrap();
                for (n, v) in [
                    (key_name, made.signing_key.serialize_pem()),
                    (cert_name, made.cert.pem()),
                ] {
                    std::fs::write(dir.path().join(n), v).unwrap();
                    std::fs::set_permissions(
                        dir.path().join(n),
                        std::os::unix::fs::PermissionsExt::from_mode(0o600),
                    )
                    .unwrap();
                }
                continue;
            } else if key {
                tokenwarden::keys::generate_es256().unwrap().0
            } else {
                format!("dummy-{name}-{}", uuid::Uuid::new_v4().simple())
            };
            std::fs::write(dir.path().join(&name), value).unwrap();
            // As LoadCredential= gives them: not readable by others (that would warn).
            std::fs::set_permissions(
                dir.path().join(&name),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .unwrap();
        }
    }
    dir
}

struct Checked {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// `tokenwarden check -c CONFIG` with the credentials in `creds`.
fn check(config: &Path, creds: &Path) -> Checked {
    let out = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(["check", "-c"])
        .arg(config)
        .env("CREDENTIALS_DIRECTORY", creds)
        .env_remove("TOKENWARDEN_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    Checked {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Asserts a clean pass: exit 0, "OK" naming exactly `clients`, and no warning.
fn assert_ok(config: &Path, r: &Checked, clients: &[&str]) {
    let what = config.display();
    assert_eq!(
        r.code,
        Some(0),
        "`tokenwarden check -c {what}` failed:\n{}{}",
        r.stderr,
        r.stdout
    );
    assert!(r.stdout.contains(": OK, "), "{what}: {}", r.stdout);
    // `check` names the first 10 clients, then "… and N more".
    let listed = match clients.len() {
        n if n > 10 => format!("({}, … and {} more)", clients[..10].join(", "), n - 10),
        _ => format!("({})", clients.join(", ")),
    };
    assert!(
        r.stdout.contains(&listed),
        "{what}: expected the clients {listed}, check says: {}",
        r.stdout
    );
    // The one warning allowed: discovery.toml's issuer (idp.example) cannot be reached from
    // here, and reachability is a matter for run time (docs/oauth.md#discovery).
    let warnings: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| {
            !(l.starts_with("warning: client \"acme-discovery\": discovery of issuer https://idp.example/realms/acme")
                && l.ends_with("the daemon keeps trying at run time"))
        })
        .collect();
    assert!(
        warnings.is_empty(),
        "{what} passes, but with warnings:\n{}",
        r.stderr
    );
}

#[test]
fn config_holds_exactly_the_expected_examples() {
    let found: BTreeSet<String> = std::fs::read_dir(config_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut expected: BTreeSet<String> = EXAMPLES.iter().map(|(f, _)| (*f).to_owned()).collect();
    expected.insert("README.md".into());
    assert_eq!(
        found, expected,
        "config/ changed: add each new example to EXAMPLES in tests/it/examples.rs (and to config/README.md)"
    );
    let readme = std::fs::read_to_string(example("README.md")).unwrap();
    for (file, _) in EXAMPLES {
        assert!(
            readme.contains(file),
            "config/README.md does not mention {file}"
        );
    }
}

#[test]
fn every_example_passes_check() {
    let files: Vec<PathBuf> = EXAMPLES.iter().map(|(f, _)| example(f)).collect();
    let creds = credentials_dir(&files);
    let stage = tempfile::tempdir().unwrap();
    for (file, clients) in EXAMPLES {
        let path = staged(file, stage.path());
        let r = check(&path, creds.path());
        assert_ok(&path, &r, clients);
        if *file == "discovery.toml" {
            // Its issuer cannot be reached from here: a warning, not a config error.
            assert!(
                r.stderr
                    .contains("warning: client \"acme-discovery\": discovery of issuer"),
                "{}",
                r.stderr
            );
        }
    }
}

/// The production layout: the main config, with the provider files in its `conf.d`.
#[test]
fn the_provider_examples_install_together_into_conf_d() {
    let root = tempfile::tempdir().unwrap();
    let conf_d = root.path().join("conf.d");
    std::fs::create_dir(&conf_d).unwrap();
    let main_text = std::fs::read_to_string(example(MAIN)).unwrap();
    let include = r#"include = ["/etc/tokenwarden/conf.d/*.toml"]"#;
    assert!(main_text.contains(include), "{MAIN} should include conf.d");
    let main = root.path().join(MAIN);
    std::fs::write(
        &main,
        main_text.replace(include, r#"include = ["conf.d/*.toml"]"#),
    )
    .unwrap();
    let mut all: Vec<&str> = Vec::new();
    for (file, clients) in EXAMPLES {
        all.extend_from_slice(clients);
        if *file != MAIN {
            std::fs::copy(staged(file, root.path()), conf_d.join(file)).unwrap();
        }
    }
    all.sort_unstable();
    let files: Vec<PathBuf> = EXAMPLES.iter().map(|(f, _)| example(f)).collect();
    let creds = credentials_dir(&files);
    let r = check(&main, creds.path());
    assert_ok(&main, &r, &all);
    assert!(
        r.stdout.contains(&format!("{} files read", EXAMPLES.len())),
        "{}",
        r.stdout
    );
}

/// The `[clients.NAME]` headers of `text`, each with whether a comment line sits right above
/// it or anywhere in its section (its sub-tables included).
fn commented_clients(text: &str) -> Vec<(String, bool)> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let client_of = |line: &str| -> Option<String> {
        let name = line.strip_prefix("[clients.")?.strip_suffix(']')?;
        (!name.contains(['.', '[', ']'])).then(|| name.to_owned())
    };
    let headers: Vec<(usize, String)> = lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| client_of(l).map(|n| (i, n)))
        .collect();
    headers
        .iter()
        .enumerate()
        .map(|(h, (i, name))| {
            let end = headers.get(h + 1).map_or(lines.len(), |(j, _)| *j);
            let above = lines[..*i]
                .iter()
                .rev()
                .take_while(|l| l.starts_with('#'))
                .count();
            let within = lines[*i..end].iter().any(|l| l.starts_with('#'));
            (name.clone(), above > 0 || within)
        })
        .collect()
}

#[test]
fn every_client_of_every_example_is_commented() {
    for (file, clients) in EXAMPLES {
        let text = std::fs::read_to_string(example(file)).unwrap();
        let found = commented_clients(&text);
        let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, *clients, "{file}: the [clients.NAME] headers");
        for (name, commented) in &found {
            assert!(
                commented,
                "{file}: [clients.{name}] has no comment line explaining it"
            );
        }
        // Each credential is named in a comment too, so the operator knows what to load.
        for name in credentials(&example(file)).keys() {
            assert!(
                text.lines()
                    .any(|l| l.trim_start().starts_with('#') && l.contains(name.as_str())),
                "{file}: no comment tells how to provide the credential {name}"
            );
        }
    }
    // The checker of comments itself.
    let text = "# a\n[clients.a]\nx = 1\n\n[clients.b]\ny = 2\n[[clients.b.outputs]]\n# out\n\n[clients.c]\n";
    assert_eq!(
        commented_clients(text),
        [("a".into(), true), ("b".into(), true), ("c".into(), false)]
    );
}

/// Between them the examples show every output format, `on_change`, `rotate_cron`,
/// `allow_users` and `allow_groups`, with production paths and no active `owner`/`group`.
#[test]
fn the_examples_cover_what_an_operator_needs() {
    let mut formats = BTreeSet::new();
    let mut keys = BTreeSet::new();
    for (file, _) in EXAMPLES {
        let t = parse(&example(file));
        if let Some(d) = t.get("daemon").and_then(Value::as_table) {
            assert_eq!(d["state_dir"].as_str(), Some("/var/lib/tokenwarden"));
            assert_eq!(
                d["socket"].as_str(),
                Some("/run/tokenwarden/tokenwarden.sock")
            );
        }
        for (name, c) in t["clients"].as_table().unwrap() {
            let c = c.as_table().unwrap();
            keys.extend(c.keys().cloned());
            let outputs = c.get("outputs").and_then(Value::as_array);
            for o in outputs.into_iter().flatten() {
                let o = o.as_table().unwrap();
                let path = o["path"].as_str().unwrap();
                assert!(
                    path.starts_with("/run/tokenwarden/"),
                    "{file}: output {path} of {name} is not under /run/tokenwarden"
                );
                for k in ["owner", "group"] {
                    assert!(
                        !o.contains_key(k),
                        "{file}: {name} sets {k}; keep it in a comment (it needs CAP_CHOWN)"
                    );
                }
                formats.insert(
                    o.get("format")
                        .and_then(Value::as_str)
                        .unwrap_or("token")
                        .to_owned(),
                );
                keys.extend(o.keys().cloned());
            }
        }
    }
    assert_eq!(
        formats,
        BTreeSet::from(["env", "header", "json", "token"].map(String::from)),
        "every output format is shown"
    );
    for k in [
        "on_change",
        "rotate_cron",
        "allow_users",
        "allow_groups",
        "env_prefix",
    ] {
        assert!(keys.contains(k), "no example sets {k}");
    }
}
