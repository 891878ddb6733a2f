//! What a reload changes (docs/operations.md#reload): a pure comparison of the running config with
//! the new one, so the daemon does no more than the change needs.
//!
//! Each client present in both configs falls in exactly one class; when several apply, the
//! strongest wins (`Replace` > `Renew` > `Outputs` > `Settings`). The daemon's reload is one
//! `match` over the result: nothing else decides what a reload does.
//!
//! | `ClientConfig` field | class | why |
//! |---|---|---|
//! | `name` | — | the key: a rename is a removal plus an addition |
//! | `token_url` or `issuer`, `client_id`, `scope`, `audience`, `resource` | `Replace` | identity ([`ClientConfig::identity_fingerprint`]): the token, refresh token and state in hand are for something else, so the client starts afresh |
//! | `grant`: its kind, `username`, the refresh token, a `jwt_bearer` assertion's `sub` | `Replace` | identity |
//! | `grant`: password, refresh token, assertion key values | `Renew` | credentials ([`ClientConfig::credentials_digest`]): a rotated secret gets a new token now |
//! | `grant` (`jwt_bearer`): `signing_alg`, `key_id`, `lifetime`, `claims` | `Renew` | the assertion, hence the token it is exchanged for, differs |
//! | `client_auth`: method, secret or key values, `signing_alg`, `key_id`, assertion lifetime | `Renew` | credentials and how they are presented |
//! | `extra_params`, `extra_headers` | `Renew` | they go into the token request |
//! | `ca_file` (the path) | `Renew` | which server is trusted for the token |
//! | `tls_client` (`tls_client_cert`, `tls_client_key`: chain or key content) | `Renew` | credentials: a token bound to the old certificate (RFC 8705 §3) is replaced now |
//! | where a secret is read from (`{ file }` → `{ env }`, another path), same value | — | nothing to do (the watcher's path set follows the new config) |
//! | `outputs` reordered, none with an `on_change` | — | order matters only to the commands |
//! | `outputs`: paths, `format`, `mode`, `owner`, `group`, `env_prefix`; outputs added or removed | `Outputs` | the current token is written to the new outputs |
//! | `outputs`: only `on_change`, or only the order of outputs that carry one (commands run in that order) | `Settings` | no write now: the new command runs after the next new token (writing now would run it for a token the program already has) |
//! | `timing` (every key), `rotate_cron`, `allow_uids`, `allow_gids`, `proxy` | `Settings` | applied to the running client; no token, no write (the next request takes the new route) |
//!
//! A client whose every field is equal is `unchanged` (it keeps its token,
//! docs/operations.md#reload). A changed CA file *content* under the same `ca_file` path is not
//! seen here: `Config` holds the path only.

use super::types::{ClientAuth, ClientConfig, Config, DaemonConfig, Grant, OutputConfig};

/// What differs between the running config and a new one. Client names are in name order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    /// Clients only in the new config: start them.
    pub added: Vec<String>,
    /// Clients only in the old config: stop them (their files are left).
    pub removed: Vec<String>,
    /// Clients equal in both: leave them alone.
    pub unchanged: Vec<String>,
    /// Clients in both that differ, with what to do.
    pub changed: Vec<(String, ClientChange)>,
    /// Which `[daemon]` keys changed.
    pub daemon: DaemonChanges,
}

impl ConfigDiff {
    /// Whether the reload changes nothing at all.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && !self.daemon.any()
    }
}

/// What a changed client needs; the variants are ordered weakest first, so the strongest of
/// several changes is their `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClientChange {
    /// Only settings that need no token and no write changed (timing, `rotate_cron`,
    /// `allow_users`/`allow_groups`, an output's `on_change`): apply them.
    Settings,
    /// Outputs changed (and maybe settings): write the current token to the new outputs.
    Outputs,
    /// Credentials or anything else that affects what token the provider would issue changed,
    /// the identity did not: the running client gets a new token now.
    Renew,
    /// The identity changed: the client's refresher is stopped and a new one started, as for a
    /// removal and an addition (nothing of the old identity is reused).
    Replace,
}

/// Which `[daemon]` keys changed, one boolean each; the reload redoes what each names: rebind
/// the gRPC socket or change its mode (`socket`, `socket_mode`), restart the metrics listener
/// (`metrics_listen`), rebind the HTTP listeners and fit the connection caps counting them
/// (`http`), set the log level (`logging`; a new `log_format` and `state_dir` take effect at the
/// next start, and the reload says so), resize the refresh semaphore
/// (`max_concurrent_refreshes`) and the connection caps (`max_connections`). A change of
/// `include` alone needs nothing beyond the client diff (which already reflects the included
/// files) and the watcher's new path set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DaemonChanges {
    /// `socket` (added, removed or moved).
    pub socket: bool,
    /// `socket_mode`.
    pub socket_mode: bool,
    /// `metrics_listen` (added, removed or moved).
    pub metrics_listen: bool,
    /// `log_level` or `log_format`.
    pub logging: bool,
    /// `state_dir`.
    pub state_dir: bool,
    /// `max_concurrent_refreshes`.
    pub max_concurrent_refreshes: bool,
    /// `max_connections`.
    pub max_connections: bool,
    /// `include` (the globs as written).
    pub include: bool,
    /// `http_socket`, `http_listen` or `audit` (the HTTP API and the audit of reads).
    pub http: bool,
}

impl DaemonChanges {
    /// Compares two `[daemon]` tables.
    pub fn between(old: &DaemonConfig, new: &DaemonConfig) -> DaemonChanges {
        DaemonChanges {
            socket: old.socket != new.socket,
            socket_mode: old.socket_mode != new.socket_mode,
            metrics_listen: old.metrics_listen != new.metrics_listen,
            logging: old.log_level != new.log_level || old.log_format != new.log_format,
            state_dir: old.state_dir != new.state_dir,
            max_concurrent_refreshes: old.max_concurrent_refreshes != new.max_concurrent_refreshes,
            max_connections: old.max_connections != new.max_connections,
            include: old.include != new.include,
            http: old.http_socket != new.http_socket
                || old.http_listen != new.http_listen
                || old.audit != new.audit,
        }
    }

    /// Whether any key changed.
    pub fn any(&self) -> bool {
        *self != DaemonChanges::default()
    }
}

/// Compares the running config with a new one (pure).
pub fn diff(old: &Config, new: &Config) -> ConfigDiff {
    let mut d = ConfigDiff {
        daemon: DaemonChanges::between(&old.daemon, &new.daemon),
        ..ConfigDiff::default()
    };
    for (name, old_client) in &old.clients {
        match new.clients.get(name) {
            None => d.removed.push(name.clone()),
            // The very same config (taken as it was by `load_reusing`): equal, uncompared.
            Some(new_client) if std::sync::Arc::ptr_eq(old_client, new_client) => {
                d.unchanged.push(name.clone())
            }
            Some(new_client) => match client_change(old_client, new_client) {
                None => d.unchanged.push(name.clone()),
                Some(change) => d.changed.push((name.clone(), change)),
            },
        }
    }
    d.added = new
        .clients
        .keys()
        .filter(|name| !old.clients.contains_key(*name))
        .cloned()
        .collect();
    d
}

/// What one client's change needs; `None`: nothing changed that matters.
pub fn client_change(old: &ClientConfig, new: &ClientConfig) -> Option<ClientChange> {
    // The common case of a reload (10,000 clients, one edited): equal configs, settled without
    // hashing identities and credentials twice per client.
    if old == new {
        return None;
    }
    if old.identity_fingerprint() != new.identity_fingerprint() {
        return Some(ClientChange::Replace);
    }
    if needs_renew(old, new) {
        return Some(ClientChange::Renew);
    }
    // Exhaustive on purpose: a new field must be classified here to compile.
    let ClientConfig {
        name: _,
        token_url: _,
        issuer: _,
        grant: _,
        client_auth: _,
        client_id: _,
        scope: _,
        audience: _,
        resource: _,
        extra_params: _,
        extra_headers: _,
        ca_file: _,
        proxy,
        rotate_cron,
        allow_uids,
        allow_gids,
        outputs,
        timing,
        tls_client: _,
    } = old;
    let (old_files, old_commands) = split_outputs(outputs);
    let (new_files, new_commands) = split_outputs(&new.outputs);
    if old_files != new_files {
        return Some(ClientChange::Outputs);
    }
    let settings = *proxy != new.proxy
        || *rotate_cron != new.rotate_cron
        || *allow_uids != new.allow_uids
        || *allow_gids != new.allow_gids
        || *timing != new.timing
        || old_commands != new_commands;
    settings.then_some(ClientChange::Settings)
}

/// Whether anything besides the identity that decides the token the provider issues changed
/// (see the module table).
fn needs_renew(old: &ClientConfig, new: &ClientConfig) -> bool {
    old.credentials_digest() != new.credentials_digest()
        || grant_shape(&old.grant) != grant_shape(&new.grant)
        || auth_shape(&old.client_auth) != auth_shape(&new.client_auth)
        || old.extra_params != new.extra_params
        || old.extra_headers != new.extra_headers
        || old.ca_file != new.ca_file
}

/// The parts of a grant that are neither identity nor credential values, nor where a secret
/// is read from: for `jwt_bearer`, the key (algorithm and digest) and how the assertion is
/// built.
fn grant_shape(grant: &Grant) -> Option<impl PartialEq + '_> {
    match grant {
        Grant::JwtBearer { assertion } => Some((
            &assertion.key,
            &assertion.key_id,
            assertion.lifetime,
            &assertion.claims,
        )),
        Grant::ClientCredentials
        | Grant::Password { .. }
        | Grant::RefreshToken { .. }
        | Grant::AssertionFile { .. }
        | Grant::TokenExchange(_) => None,
    }
}

/// The parts of a client authentication besides secret values and their sources: the method,
/// the key (algorithm and digest), `kid` and assertion lifetime.
fn auth_shape(
    auth: &ClientAuth,
) -> (
    &'static str,
    Option<&crate::keys::SigningKey>,
    Option<&String>,
    Option<std::time::Duration>,
) {
    let method = auth.method_name();
    match auth {
        ClientAuth::Basic { .. }
        | ClientAuth::Post { .. }
        | ClientAuth::ClientAssertion { .. }
        | ClientAuth::None
        | ClientAuth::TlsClientAuth
        | ClientAuth::SelfSignedTlsClientAuth => (method, None, None, None),
        ClientAuth::SecretJwt { key, lifetime, .. } => (method, Some(key), None, Some(*lifetime)),
        ClientAuth::PrivateKeyJwt {
            key,
            key_id,
            lifetime,
            ..
        } => (method, Some(key), key_id.as_ref(), Some(*lifetime)),
    }
}

/// The outputs in path order without their commands, and the commands in the configured order.
fn split_outputs(outputs: &[OutputConfig]) -> (Vec<OutputConfig>, Vec<&[String]>) {
    let mut files: Vec<OutputConfig> = outputs
        .iter()
        .map(|o| OutputConfig {
            on_change: Vec::new(),
            ..o.clone()
        })
        .collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let commands = outputs.iter().map(|o| o.on_change.as_slice()).collect();
    (files, commands)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use super::*;
    use crate::config::{LogFormat, OutputFormat, load_str};
    use crate::secret::{Secret, SecretSource};

    fn keys() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/config/keys")
    }

    /// One client of each authentication / grant shape, secrets in files under `dir`.
    fn config_text(dir: &Path) -> String {
        let k = keys();
        format!(
            r#"
[daemon]
socket = "{d}/tw.sock"
state_dir = "{d}/state"

[clients.basic]
token_url = "https://auth.example/token"
client_id = "app"
client_secret = {{ file = "{d}/secret" }}
scope = ["a", "b"]
allow_users = [1000]
[[clients.basic.outputs]]
path = "{d}/basic.token"
on_change = ["/bin/true"]
[[clients.basic.outputs]]
path = "{d}/basic.json"
format = "json"

[clients.password]
token_url = "https://auth.example/token"
grant_type = "password"
client_id = "app"
client_secret = {{ file = "{d}/secret" }}
username = "user"
password = {{ file = "{d}/password" }}

[clients.pkjwt]
token_url = "https://auth.example/token"
client_auth = "private_key_jwt"
client_id = "app"
private_key = {{ file = "{k}/rsa.pem" }}
signing_alg = "RS256"
key_id = "k1"

[clients.bearer]
token_url = "https://auth.example/token"
grant_type = "jwt_bearer"
client_id = "app"
client_auth = "none"
[clients.bearer.assertion]
signing_alg = "HS256"
key = {{ file = "{d}/hmac" }}
claims = {{ sub = "me", aud = "https://auth.example" }}

[clients.hmac]
token_url = "https://auth.example/token"
client_auth = "client_secret_jwt"
client_id = "app"
client_secret = {{ file = "{d}/hmac" }}
"#,
            d = dir.display(),
            k = k.display()
        )
    }

    fn write_secrets(dir: &Path) {
        std::fs::write(dir.join("secret"), "s3cret\n").unwrap();
        std::fs::write(dir.join("password"), "pa55\n").unwrap();
        std::fs::write(dir.join("hmac"), "0123456789abcdef0123456789abcdef\n").unwrap();
    }

    fn base() -> (tempfile::TempDir, Config) {
        let tmp = tempfile::tempdir().unwrap();
        write_secrets(tmp.path());
        let path = tmp.path().join("tokenwarden.toml");
        let config = load_str(&config_text(tmp.path()), &path).unwrap();
        (tmp, config)
    }

    fn client<'a>(c: &'a mut Config, name: &str) -> &'a mut ClientConfig {
        std::sync::Arc::make_mut(c.clients.get_mut(name).unwrap())
    }

    /// The `bearer` client's assertion.
    fn assertion(c: &mut Config) -> &mut crate::config::Assertion {
        let Grant::JwtBearer { assertion } = &mut client(c, "bearer").grant else {
            unreachable!("bearer is a jwt_bearer client");
        };
        assertion
    }

    type Edit = fn(&mut Config);

    #[test]
    fn every_client_field_is_classified() {
        use ClientChange::*;
        let (_tmp, old) = base();
        let cases: Vec<(&str, &str, Edit, Option<ClientChange>)> = vec![
            ("nothing", "basic", |_| {}, None),
            // Identity.
            (
                "token_url",
                "basic",
                |c| client(c, "basic").token_url = "https://other.example/t".parse().unwrap(),
                Some(Replace),
            ),
            (
                "client_id",
                "basic",
                |c| client(c, "basic").client_id = Some("other".into()),
                Some(Replace),
            ),
            (
                "scope",
                "basic",
                |c| client(c, "basic").scope.push("c".into()),
                Some(Replace),
            ),
            (
                "audience",
                "basic",
                |c| client(c, "basic").audience = Some("api".into()),
                Some(Replace),
            ),
            (
                "resource",
                "basic",
                |c| client(c, "basic").resource = Some("https://api".into()),
                Some(Replace),
            ),
            (
                "grant kind",
                "password",
                |c| client(c, "password").grant = Grant::ClientCredentials,
                Some(Replace),
            ),
            (
                "username",
                "password",
                |c| {
                    if let Grant::Password { username, .. } = &mut client(c, "password").grant {
                        *username = "someone-else".into();
                    }
                },
                Some(Replace),
            ),
            // Credentials.
            (
                "password value",
                "password",
                |c| {
                    if let Grant::Password { password, .. } = &mut client(c, "password").grant {
                        password.value = Secret::new("rotated");
                    }
                },
                Some(Renew),
            ),
            (
                "client secret value",
                "basic",
                |c| {
                    if let ClientAuth::Basic { secret } = &mut client(c, "basic").client_auth {
                        secret.value = Secret::new("rotated");
                    }
                },
                Some(Renew),
            ),
            (
                "client_auth method",
                "basic",
                |c| {
                    let auth = &mut client(c, "basic").client_auth;
                    if let ClientAuth::Basic { secret } = auth.clone() {
                        *auth = ClientAuth::Post { secret };
                    }
                },
                Some(Renew),
            ),
            (
                "private key id",
                "pkjwt",
                |c| {
                    if let ClientAuth::PrivateKeyJwt { key_id, .. } =
                        &mut client(c, "pkjwt").client_auth
                    {
                        *key_id = Some("k2".into());
                    }
                },
                Some(Renew),
            ),
            (
                "private key assertion lifetime",
                "pkjwt",
                |c| {
                    if let ClientAuth::PrivateKeyJwt { lifetime, .. } =
                        &mut client(c, "pkjwt").client_auth
                    {
                        *lifetime = Duration::from_secs(60);
                    }
                },
                Some(Renew),
            ),
            (
                "private key signing_alg",
                "pkjwt",
                |c| {
                    if let ClientAuth::PrivateKeyJwt { key, .. } =
                        &mut client(c, "pkjwt").client_auth
                    {
                        key.alg = crate::keys::SigningAlg::PS256;
                    }
                },
                Some(Renew),
            ),
            (
                "private key material",
                "pkjwt",
                |c| {
                    if let ClientAuth::PrivateKeyJwt { key, .. } =
                        &mut client(c, "pkjwt").client_auth
                    {
                        key.digest = "another".into();
                    }
                },
                Some(Renew),
            ),
            (
                "client_secret_jwt lifetime",
                "hmac",
                |c| {
                    if let ClientAuth::SecretJwt { lifetime, .. } =
                        &mut client(c, "hmac").client_auth
                    {
                        *lifetime = Duration::from_secs(60);
                    }
                },
                Some(Renew),
            ),
            (
                "assertion claims",
                "bearer",
                |c| {
                    assertion(c).claims.insert("email".into(), "a@b".into());
                },
                Some(Renew),
            ),
            (
                "assertion subject",
                "bearer",
                |c| {
                    assertion(c).claims.insert("sub".into(), "you".into());
                },
                Some(Replace),
            ),
            (
                "assertion key_id",
                "bearer",
                |c| assertion(c).key_id = Some("k".into()),
                Some(Renew),
            ),
            (
                "assertion lifetime",
                "bearer",
                |c| assertion(c).lifetime = Duration::from_secs(1),
                Some(Renew),
            ),
            (
                "assertion key",
                "bearer",
                |c| assertion(c).key.digest = "another".into(),
                Some(Renew),
            ),
            // The request.
            (
                "extra_params",
                "basic",
                |c| {
                    client(c, "basic")
                        .extra_params
                        .insert("k".into(), "v".into());
                },
                Some(Renew),
            ),
            (
                "extra_headers",
                "basic",
                |c| {
                    client(c, "basic")
                        .extra_headers
                        .insert("X-K".into(), "v".into());
                },
                Some(Renew),
            ),
            (
                "ca_file",
                "basic",
                |c| client(c, "basic").ca_file = Some("/etc/ssl/ca.pem".into()),
                Some(Renew),
            ),
            // Where a secret comes from, same value: nothing.
            (
                "secret source only",
                "basic",
                |c| {
                    if let ClientAuth::Basic { secret } = &mut client(c, "basic").client_auth {
                        secret.source = SecretSource::Env("SECRET".into());
                    }
                },
                None,
            ),
            (
                "assertion key source only",
                "bearer",
                |c| assertion(c).key_source = SecretSource::File("/elsewhere".into()),
                None,
            ),
            // Outputs.
            (
                "output added",
                "basic",
                |c| {
                    let o = client(c, "basic").outputs[0].clone();
                    client(c, "basic").outputs.push(OutputConfig {
                        path: "/run/x.env".into(),
                        format: OutputFormat::Env,
                        ..o
                    });
                },
                Some(Outputs),
            ),
            (
                "output removed",
                "basic",
                |c| {
                    client(c, "basic").outputs.pop();
                },
                Some(Outputs),
            ),
            (
                "output path",
                "basic",
                |c| client(c, "basic").outputs[1].path = "/run/other.json".into(),
                Some(Outputs),
            ),
            (
                "output format",
                "basic",
                |c| client(c, "basic").outputs[1].format = OutputFormat::Header,
                Some(Outputs),
            ),
            (
                "output mode",
                "basic",
                |c| client(c, "basic").outputs[1].mode = 0o640,
                Some(Outputs),
            ),
            (
                "output owner",
                "basic",
                |c| client(c, "basic").outputs[1].owner = Some(1000),
                Some(Outputs),
            ),
            (
                "output group",
                "basic",
                |c| client(c, "basic").outputs[1].group = Some(1000),
                Some(Outputs),
            ),
            (
                "output env_prefix",
                "basic",
                |c| client(c, "basic").outputs[1].env_prefix = "APP_".into(),
                Some(Outputs),
            ),
            (
                "on_change only",
                "basic",
                |c| client(c, "basic").outputs[0].on_change = vec!["/bin/false".into()],
                Some(Settings),
            ),
            (
                "outputs reordered",
                "basic",
                |c| client(c, "basic").outputs.reverse(),
                Some(Settings),
            ),
            // Settings.
            (
                "timing",
                "basic",
                |c| client(c, "basic").timing.refresh_at = 0.5,
                Some(Settings),
            ),
            (
                "timeout",
                "basic",
                |c| client(c, "basic").timing.timeout = Duration::from_secs(1),
                Some(Settings),
            ),
            (
                "rotate_cron",
                "basic",
                |c| client(c, "basic").rotate_cron = Some("0 0 3 * * *".into()),
                Some(Settings),
            ),
            (
                "allow_uids",
                "basic",
                |c| client(c, "basic").allow_uids.push(1001),
                Some(Settings),
            ),
            (
                "allow_gids",
                "basic",
                |c| client(c, "basic").allow_gids.push(1001),
                Some(Settings),
            ),
            // The strongest wins.
            (
                "outputs and settings",
                "basic",
                |c| {
                    client(c, "basic").outputs[1].mode = 0o640;
                    client(c, "basic").timing.jitter = 0.0;
                },
                Some(Outputs),
            ),
            (
                "identity and outputs",
                "basic",
                |c| {
                    client(c, "basic").outputs[1].mode = 0o640;
                    client(c, "basic").scope.clear();
                },
                Some(Replace),
            ),
        ];
        for (what, name, edit, expected) in cases {
            let mut new = old.clone();
            edit(&mut new);
            assert_eq!(
                client_change(&old.clients[name], &new.clients[name]),
                expected,
                "{what}"
            );
            let d = diff(&old, &new);
            let others: Vec<String> = old.clients.keys().filter(|n| *n != name).cloned().collect();
            match expected {
                None => assert!(d.is_empty(), "{what}: {d:?}"),
                Some(change) => {
                    assert_eq!(d.changed, vec![(name.to_string(), change)], "{what}");
                    assert_eq!(d.unchanged, others, "{what}");
                }
            }
        }
    }

    #[test]
    fn added_removed_unchanged_in_name_order() {
        let (_tmp, old) = base();
        let mut new = old.clone();
        let basic = new.clients.remove("basic").unwrap();
        new.clients.insert(
            "zeta".into(),
            std::sync::Arc::new(ClientConfig {
                name: "zeta".into(),
                ..(*basic).clone()
            }),
        );
        new.clients.insert(
            "alpha".into(),
            std::sync::Arc::new(ClientConfig {
                name: "alpha".into(),
                ..(*basic).clone()
            }),
        );
        new.clients.remove("pkjwt");
        let d = diff(&old, &new);
        assert_eq!(d.added, vec!["alpha", "zeta"]);
        assert_eq!(d.removed, vec!["basic", "pkjwt"]);
        assert_eq!(d.unchanged, vec!["bearer", "hmac", "password"]);
        assert!(d.changed.is_empty());
        assert!(!d.daemon.any());
        assert!(!d.is_empty());
    }

    #[test]
    fn daemon_keys() {
        let (_tmp, old) = base();
        // Each edit, and the one change it should show.
        type DaemonEdit = fn(&mut DaemonConfig);
        type Shows = fn(&mut DaemonChanges);
        let cases: Vec<(DaemonEdit, Shows)> = vec![
            (|d| d.socket = None, |c| c.socket = true),
            (|d| d.socket_mode = 0o600, |c| c.socket_mode = true),
            (
                |d| d.metrics_listen = "127.0.0.1:9464".parse().ok(),
                |c| c.metrics_listen = true,
            ),
            (|d| d.log_level = "debug".into(), |c| c.logging = true),
            (|d| d.log_format = LogFormat::Json, |c| c.logging = true),
            (
                |d| d.state_dir = "/elsewhere".into(),
                |c| c.state_dir = true,
            ),
            (
                |d| d.max_concurrent_refreshes = 1,
                |c| c.max_concurrent_refreshes = true,
            ),
            (|d| d.max_connections = 8, |c| c.max_connections = true),
            (
                |d| d.include = vec!["conf.d/*.toml".into()],
                |c| c.include = true,
            ),
            (
                |d| d.http_listen = "127.0.0.1:8089".parse().ok(),
                |c| c.http = true,
            ),
            (
                |d| d.http_socket = Some("/run/tw/http.sock".into()),
                |c| c.http = true,
            ),
            (|d| d.audit = true, |c| c.http = true),
        ];
        for (i, (edit, expect)) in cases.into_iter().enumerate() {
            let mut new = old.clone();
            edit(&mut new.daemon);
            let mut expected = DaemonChanges::default();
            expect(&mut expected);
            let d = diff(&old, &new);
            assert_eq!(d.daemon, expected, "case {i}");
            assert!(d.daemon.any() && !d.is_empty(), "case {i}");
            assert_eq!(d.unchanged.len(), old.clients.len(), "case {i}");
        }
    }

    /// The loader end to end: a rotated secret file gives `Renew` for exactly the clients that
    /// read it; the same text reloaded gives nothing.
    #[test]
    fn reloaded_from_files() {
        let (tmp, old) = base();
        let path = tmp.path().join("tokenwarden.toml");
        let text = config_text(tmp.path());
        let same = load_str(&text, &path).unwrap();
        assert!(diff(&old, &same).is_empty());

        std::fs::write(tmp.path().join("secret"), "rotated\n").unwrap();
        let rotated = load_str(&text, &path).unwrap();
        let d = diff(&old, &rotated);
        assert_eq!(
            d.changed,
            vec![
                ("basic".to_string(), ClientChange::Renew),
                ("password".to_string(), ClientChange::Renew)
            ]
        );
        assert_eq!(d.unchanged, vec!["bearer", "hmac", "pkjwt"]);

        let edited = text.replace(
            "scope = [\"a\", \"b\"]",
            "scope = [\"a\", \"b\"]\nrefresh_at = 0.5",
        );
        let d = diff(&rotated, &load_str(&edited, &path).unwrap());
        assert_eq!(
            d.changed,
            vec![("basic".to_string(), ClientChange::Settings)]
        );
    }
}
