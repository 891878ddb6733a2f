//! What a reload changed in one client, in words for the log (pure).
//!
//! [`changed_keys`] names every config key whose value differs between the running client and
//! the new one. Plain settings show `old -> new` (`token_url: https://a/token ->
//! https://b/token`); secrets and values that may hold one (`client_secret`, `password`, keys,
//! `extra_headers`, `extra_params`, assertion claims) show their name only, never a value.
//! [`ClientChange`](super::ClientChange) decides what the daemon does; this only says it.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::time::Duration;

use super::types::{ClientAuth, ClientConfig, Grant, OutputConfig, Timing};

/// A changed key, and what it changed from and to when the value may be shown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyChange {
    /// The key as written in the config (`token_url`, `outputs`, `retry_max`, …).
    pub key: &'static str,
    /// `old -> new` for plain values; for secrets `new value`; for maps and outputs what was
    /// added, removed or changed, by name or path.
    pub detail: String,
}

impl std::fmt::Display for KeyChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.detail)
    }
}

/// Every key of `old` that differs in `new`, in config order. Empty when they are equal in
/// everything a reload acts on (only where a secret is read from changed, say).
pub fn changed_keys(old: &ClientConfig, new: &ClientConfig) -> Vec<KeyChange> {
    let mut v = Changes::default();
    v.plain("token_url", &old.token_url, &new.token_url);
    v.plain("issuer", &opt(&old.issuer), &opt(&new.issuer));
    grant(&mut v, &old.grant, &new.grant);
    client_auth(&mut v, &old.client_auth, &new.client_auth);
    v.plain("client_id", &opt(&old.client_id), &opt(&new.client_id));
    v.plain("scope", &list(&old.scope), &list(&new.scope));
    v.plain("audience", &opt(&old.audience), &opt(&new.audience));
    v.plain("resource", &opt(&old.resource), &opt(&new.resource));
    v.names("extra_params", &old.extra_params, &new.extra_params);
    v.names("extra_headers", &old.extra_headers, &new.extra_headers);
    let path = |p: &Option<std::path::PathBuf>| opt(&p.as_ref().map(|p| p.display().to_string()));
    v.plain("ca_file", &path(&old.ca_file), &path(&new.ca_file));
    // The certificate is public (its subject and expiry are shown); the key is not.
    let cert = |c: &ClientConfig| {
        c.tls_client.as_ref().map_or("none".to_string(), |t| {
            format!(
                "{} (not after {}, x5t#S256 {})",
                t.info.subject,
                t.info.not_after_text(),
                t.info.thumbprint
            )
        })
    };
    v.plain("tls_client_cert", &cert(old), &cert(new));
    let key = |c: &ClientConfig| {
        c.tls_client
            .as_ref()
            .map(|t| crate::secret::sha256_hex(t.key_material.expose().as_bytes()))
    };
    v.secret("tls_client_key", key(old) != key(new));
    v.plain(
        "rotate_cron",
        &opt(&old.rotate_cron),
        &opt(&new.rotate_cron),
    );
    v.plain(
        "allow_users",
        &list(&old.allow_uids),
        &list(&new.allow_uids),
    );
    v.plain(
        "allow_groups",
        &list(&old.allow_gids),
        &list(&new.allow_gids),
    );
    outputs(&mut v, &old.outputs, &new.outputs);
    timing(&mut v, &old.timing, &new.timing);
    if v.0.is_empty() && old != new {
        // A key added to ClientConfig after this list was written: still say something.
        v.push("settings", "changed");
    }
    v.0
}

/// The changed keys as one line: `token_url: a -> b; client_secret: new value`.
pub fn describe(changes: &[KeyChange]) -> String {
    changes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Default)]
struct Changes(Vec<KeyChange>);

impl Changes {
    fn push(&mut self, key: &'static str, detail: impl Into<String>) {
        let detail = detail.into();
        self.0.push(KeyChange { key, detail });
    }

    fn plain<T: Display + PartialEq + ?Sized>(&mut self, key: &'static str, old: &T, new: &T) {
        if old != new {
            self.push(key, format!("{old} -> {new}"));
        }
    }

    /// A secret: its name, never its value.
    fn secret(&mut self, key: &'static str, changed: bool) {
        if changed {
            self.push(key, "new value");
        }
    }

    /// A map whose values may be secret: the names added, removed or changed.
    fn names<V: PartialEq>(
        &mut self,
        key: &'static str,
        old: &BTreeMap<String, V>,
        new: &BTreeMap<String, V>,
    ) {
        let parts = by_name(old, new, |k, _, _| format!("~{k}"));
        if !parts.is_empty() {
            self.push(key, parts.join(" "));
        }
    }
}

/// Two maps compared by name, in name order: `+NAME` for each added, `changed(NAME, old, new)`
/// for each whose value differs, then `-NAME` for each removed.
fn by_name<V: PartialEq>(
    old: &BTreeMap<String, V>,
    new: &BTreeMap<String, V>,
    changed: impl Fn(&str, &V, &V) -> String,
) -> Vec<String> {
    let mut parts = Vec::new();
    for (k, v) in new {
        match old.get(k) {
            None => parts.push(format!("+{k}")),
            Some(o) if o != v => parts.push(changed(k, o, v)),
            Some(_) => {}
        }
    }
    let removed = old.keys().filter(|k| !new.contains_key(*k));
    parts.extend(removed.map(|k| format!("-{k}")));
    parts
}

fn opt<T: Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map(ToString::to_string)
        .unwrap_or_else(|| "(none)".into())
}

fn list<T: Display>(v: &[T]) -> String {
    let items: Vec<String> = v.iter().map(ToString::to_string).collect();
    format!("[{}]", items.join(" "))
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn grant(v: &mut Changes, old: &Grant, new: &Grant) {
    v.plain("grant_type", old.grant_type(), new.grant_type());
    match (old, new) {
        (
            Grant::Password {
                username: ou,
                password: op,
            },
            Grant::Password {
                username: nu,
                password: np,
            },
        ) => {
            v.plain("username", ou, nu);
            v.secret("password", op.value != np.value);
        }
        (Grant::RefreshToken { refresh_token: o }, Grant::RefreshToken { refresh_token: n }) => {
            v.secret("refresh_token", o.value != n.value)
        }
        (Grant::JwtBearer { assertion: o }, Grant::JwtBearer { assertion: n }) => {
            v.plain("assertion.signing_alg", &o.key.alg, &n.key.alg);
            v.secret("assertion.key", o.key.digest != n.key.digest);
            v.plain("assertion.key_id", &opt(&o.key_id), &opt(&n.key_id));
            v.plain("assertion.lifetime", &human(o.lifetime), &human(n.lifetime));
            // Claims may carry personal data (email, name): names only.
            let claims = |m: &serde_json::Map<String, serde_json::Value>| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<BTreeMap<_, _>>()
            };
            v.names("assertion.claims", &claims(&o.claims), &claims(&n.claims));
        }
        // Where ready-made tokens are read from (never their values).
        (Grant::AssertionFile { source: o }, Grant::AssertionFile { source: n }) => {
            v.plain("assertion", &o.to_string(), &n.to_string())
        }
        (Grant::TokenExchange(o), Grant::TokenExchange(n)) => {
            let subject = |x: &super::TokenExchange| match &x.subject {
                super::Subject::Client(c) => format!("client {c}"),
                super::Subject::Source(s) => s.to_string(),
            };
            v.plain("subject_token", &subject(o), &subject(n));
            v.plain(
                "subject_token_type",
                &o.subject_token_type,
                &n.subject_token_type,
            );
            let actor =
                |x: &super::TokenExchange| x.actor.as_ref().map(|(s, t)| format!("{s} ({t})"));
            v.plain("actor_token", &opt(&actor(o)), &opt(&actor(n)));
            v.plain(
                "requested_token_type",
                &opt(&o.requested_token_type),
                &opt(&n.requested_token_type),
            );
        }
        _ => {}
    }
}

fn client_auth(v: &mut Changes, old: &ClientAuth, new: &ClientAuth) {
    v.plain("client_auth", old.method_name(), new.method_name());
    match (old, new) {
        (ClientAuth::Basic { secret: o }, ClientAuth::Basic { secret: n })
        | (ClientAuth::Post { secret: o }, ClientAuth::Post { secret: n }) => {
            v.secret("client_secret", o.value != n.value)
        }
        (
            ClientAuth::SecretJwt {
                secret: os,
                key: ok,
                lifetime: ol,
            },
            ClientAuth::SecretJwt {
                secret: ns,
                key: nk,
                lifetime: nl,
            },
        ) => {
            v.secret("client_secret", os.value != ns.value);
            v.plain("signing_alg", &ok.alg, &nk.alg);
            v.plain("assertion_lifetime", &human(*ol), &human(*nl));
        }
        (
            ClientAuth::PrivateKeyJwt {
                key: ok,
                key_id: oi,
                lifetime: ol,
                ..
            },
            ClientAuth::PrivateKeyJwt {
                key: nk,
                key_id: ni,
                lifetime: nl,
                ..
            },
        ) => {
            v.plain("signing_alg", &ok.alg, &nk.alg);
            v.secret("private_key", ok.digest != nk.digest);
            v.plain("key_id", &opt(oi), &opt(ni));
            v.plain("assertion_lifetime", &human(*ol), &human(*nl));
        }
        (ClientAuth::ClientAssertion { source: o }, ClientAuth::ClientAssertion { source: n }) => {
            v.plain("client_assertion", &o.to_string(), &n.to_string())
        }
        _ => {}
    }
}

/// Outputs by path: `+PATH` added, `-PATH` removed, `PATH (mode 0600 -> 0640)` changed, or
/// `order` when only their order differs.
fn outputs(v: &mut Changes, old: &[OutputConfig], new: &[OutputConfig]) {
    if old == new {
        return;
    }
    let by_path = |outs: &[OutputConfig]| -> BTreeMap<String, OutputConfig> {
        outs.iter()
            .map(|o| (o.path.display().to_string(), o.clone()))
            .collect()
    };
    let mut parts = by_name(&by_path(old), &by_path(new), |path, oout, nout| {
        let mut what = Changes::default();
        what.plain("format", oout.format.name(), nout.format.name());
        what.plain(
            "mode",
            &format!("{:04o}", oout.mode),
            &format!("{:04o}", nout.mode),
        );
        what.plain("owner", &opt(&oout.owner), &opt(&nout.owner));
        what.plain("group", &opt(&oout.group), &opt(&nout.group));
        what.plain("env_prefix", &oout.env_prefix, &nout.env_prefix);
        if oout.on_change != nout.on_change {
            what.push("on_change", "changed");
        }
        format!("{path} ({})", describe(&what.0))
    });
    if parts.is_empty() {
        parts.push("order".into());
    }
    v.push("outputs", parts.join(", "));
}

fn timing(v: &mut Changes, old: &Timing, new: &Timing) {
    v.plain("refresh_at", &old.refresh_at, &new.refresh_at);
    v.plain("jitter", &old.jitter, &new.jitter);
    let d = |v: &mut Changes, key, o: Duration, n: Duration| v.plain(key, &human(o), &human(n));
    d(v, "refresh_margin", old.refresh_margin, new.refresh_margin);
    d(v, "min_interval", old.min_interval, new.min_interval);
    d(
        v,
        "default_lifetime",
        old.default_lifetime,
        new.default_lifetime,
    );
    d(v, "retry_initial", old.retry_initial, new.retry_initial);
    d(v, "retry_max", old.retry_max, new.retry_max);
    d(v, "timeout", old.timeout, new.timeout);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Credential, load_str};
    use crate::secret::Secret;

    fn config(extra: &str) -> ClientConfig {
        let text = format!(
            "[clients.a]\ntoken_url = \"https://idp.example/token\"\nclient_id = \"a\"\n\
             client_secret = \"s3cr3t-value-one\"\n{extra}"
        );
        let c = load_str(&text, std::path::Path::new("/etc/t.toml")).unwrap();
        (*c.clients["a"]).clone()
    }

    #[test]
    fn each_kind_of_change_is_named_and_secrets_never_shown() {
        let base = config("scope = \"x y\"\n");
        let with = |f: &dyn Fn(&mut ClientConfig)| {
            let mut c = base.clone();
            f(&mut c);
            describe(&changed_keys(&base, &c))
        };
        let cases: Vec<(String, &str)> = vec![
            (with(&|_| {}), ""),
            (
                with(&|c| c.token_url = url::Url::parse("https://idp2.example/t").unwrap()),
                "token_url: https://idp.example/token -> https://idp2.example/t",
            ),
            (with(&|c| c.scope = vec!["x".into()]), "scope: [x y] -> [x]"),
            (
                with(&|c| {
                    c.client_auth = ClientAuth::Basic {
                        secret: Credential {
                            source: crate::secret::SecretSource::Inline(Secret::new(
                                "s3cr3t-value-two",
                            )),
                            value: Secret::new("s3cr3t-value-two"),
                        },
                    }
                }),
                "client_secret: new value",
            ),
            (
                with(&|c| {
                    c.extra_headers
                        .insert("X-Api-Key".into(), "k3y-value".into());
                }),
                "extra_headers: +X-Api-Key",
            ),
            (
                with(&|c| {
                    c.timing.retry_max = Duration::from_secs(60);
                    c.audience = Some("api".into());
                }),
                "audience: (none) -> api; retry_max: 5m -> 1m",
            ),
            (
                with(&|c| c.allow_uids = vec![1000]),
                "allow_users: [] -> [1000]",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
            assert!(
                !got.contains("s3cr3t") && !got.contains("k3y-value"),
                "{got}"
            );
        }
    }

    #[test]
    fn token_exchange_changes_name_where_tokens_come_from_never_what_they_hold() {
        let x = |subject: &str| {
            let text = format!(
                "[clients.up]\ntoken_url = \"https://idp.example/token\"\nclient_id = \"up\"\nclient_secret = \"s3cr3t-value-one\"\n\
                 [clients.other]\ntoken_url = \"https://idp.example/token\"\nclient_id = \"o\"\nclient_secret = \"s3cr3t-value-one\"\n\
                 [clients.a]\ntoken_url = \"https://idp.example/token\"\ngrant_type = \"token_exchange\"\nclient_auth = \"none\"\nclient_id = \"a\"\n{subject}"
            );
            let c = load_str(&text, std::path::Path::new("/etc/t.toml")).unwrap();
            (*c.clients["a"]).clone()
        };
        let old = x("subject_token = { client = \"up\" }\n");
        let new = x(
            "subject_token = { client = \"other\" }\nrequested_token_type = \"urn:ietf:params:oauth:token-type:jwt\"\n",
        );
        assert_eq!(
            describe(&changed_keys(&old, &new)),
            "subject_token: client up -> client other; requested_token_type: (none) -> urn:ietf:params:oauth:token-type:jwt"
        );
    }

    #[test]
    fn outputs_by_path() {
        let out = |path: &str, mode: &str| {
            format!("[[clients.a.outputs]]\npath = \"{path}\"\nmode = \"{mode}\"\n")
        };
        let old = config(&(out("/run/a", "0600") + &out("/run/b", "0600")));
        let cases = [
            (
                out("/run/a", "0600") + &out("/run/c", "0600"),
                "outputs: +/run/c, -/run/b",
            ),
            (
                out("/run/a", "0640") + &out("/run/b", "0600"),
                "outputs: /run/a (mode: 0600 -> 0640)",
            ),
            (
                out("/run/b", "0600") + &out("/run/a", "0600"),
                "outputs: order",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(describe(&changed_keys(&old, &config(&text))), want);
        }
    }
}
