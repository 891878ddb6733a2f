//! The raw serde types of the TOML config (docs/configuration.md), one per table, and the parsers
//! of the small value syntaxes (durations, modes, scopes, secrets).
//!
//! Every struct denies unknown keys. Values that later checks must locate are wrapped in
//! [`Spanned`], so an error about them points at the value in the file. Value syntaxes that can
//! be checked alone (a duration, a mode) are checked while deserializing, so a bad one is
//! reported at its value with a clear message. Nothing here reads files or resolves names: that
//! is `load`'s job.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;
use toml::de::DeValue;

use crate::secret::{Secret, SecretSource};

/// `[daemon]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDaemon {
    pub socket: Option<Spanned<PathBuf>>,
    pub socket_mode: Option<Spanned<Mode>>,
    pub state_dir: Option<Spanned<PathBuf>>,
    pub metrics_listen: Option<Spanned<String>>,
    pub log_format: Option<Spanned<String>>,
    pub log_level: Option<Spanned<String>>,
    pub include: Option<Vec<Spanned<String>>>,
    pub max_concurrent_refreshes: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    // Plain HTTP for local programs and the audit of reads (docs/http.md).
    pub http_socket: Option<Spanned<PathBuf>>,
    pub http_listen: Option<Spanned<String>>,
    pub audit: Option<bool>,
}

/// `[fleet]`: many hosts sharing each client's token through etcd (docs/fleet.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFleet {
    pub etcd: Spanned<Vec<Spanned<String>>>,
    pub prefix: Spanned<String>,
    pub key: Spanned<SecretSource>,
    pub lease: Option<Spanned<HumanDuration>>,
    pub host: Option<Spanned<String>>,
    pub ca_file: Option<Spanned<PathBuf>>,
    pub cert: Option<Spanned<PathBuf>>,
    pub cert_key: Option<Spanned<SecretSource>>,
    pub user: Option<Spanned<String>>,
    pub password: Option<Spanned<SecretSource>>,
}

/// `[defaults]`: the per-client timing keys (docs/configuration.md#defaults-and-per-client-timing).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTiming {
    pub refresh_at: Option<Spanned<f64>>,
    pub jitter: Option<Spanned<f64>>,
    pub refresh_margin: Option<Spanned<HumanDuration>>,
    pub min_interval: Option<Spanned<HumanDuration>>,
    pub default_lifetime: Option<Spanned<HumanDuration>>,
    pub retry_initial: Option<Spanned<HumanDuration>>,
    pub retry_max: Option<Spanned<HumanDuration>>,
    pub timeout: Option<Spanned<HumanDuration>>,
}

/// `[clients.NAME]` without its `outputs` and `assertion`, which are read separately so that
/// an error inside one of them does not hide the others.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawClient {
    pub token_url: Option<Spanned<String>>,
    /// RFC 8414 discovery instead of `token_url` (exactly one of the two).
    pub issuer: Option<Spanned<String>>,
    pub grant_type: Option<Spanned<String>>,
    pub client_auth: Option<Spanned<String>>,
    pub client_id: Option<Spanned<String>>,
    pub client_secret: Option<Spanned<SecretSource>>,
    pub username: Option<Spanned<String>>,
    pub password: Option<Spanned<SecretSource>>,
    pub refresh_token: Option<Spanned<SecretSource>>,
    pub private_key: Option<Spanned<SecretSource>>,
    pub key_id: Option<Spanned<String>>,
    pub signing_alg: Option<Spanned<String>>,
    pub assertion_lifetime: Option<Spanned<HumanDuration>>,
    pub scope: Option<Spanned<Scope>>,
    pub audience: Option<Spanned<String>>,
    pub resource: Option<Spanned<String>>,
    pub extra_params: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    pub extra_headers: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    pub ca_file: Option<Spanned<PathBuf>>,
    pub proxy: Option<Spanned<String>>,
    pub rotate_cron: Option<Spanned<String>>,
    pub allow_users: Option<Vec<Spanned<Id>>>,
    pub allow_groups: Option<Vec<Spanned<Id>>>,
    // Mutual TLS (RFC 8705): the client certificate chain and its key.
    pub tls_client_cert: Option<Spanned<SecretSource>>,
    pub tls_client_key: Option<Spanned<SecretSource>>,
    // Ready-made assertions and token exchange (docs/oauth.md#credentials-without-stored-secrets).
    pub client_assertion: Option<Spanned<SecretSource>>,
    pub subject_token: Option<Spanned<RawSubject>>,
    pub subject_token_type: Option<Spanned<String>>,
    pub actor_token: Option<Spanned<SecretSource>>,
    pub actor_token_type: Option<Spanned<String>>,
    pub requested_token_type: Option<Spanned<String>>,
    /// `false`: kept local even with `[fleet]` (docs/fleet.md).
    pub fleet: Option<Spanned<bool>>,
    // The timing keys of `[defaults]`, overriding them for this client. (serde's `flatten`
    // does not work with `deny_unknown_fields`, hence the repetition.)
    pub refresh_at: Option<Spanned<f64>>,
    pub jitter: Option<Spanned<f64>>,
    pub refresh_margin: Option<Spanned<HumanDuration>>,
    pub min_interval: Option<Spanned<HumanDuration>>,
    pub default_lifetime: Option<Spanned<HumanDuration>>,
    pub retry_initial: Option<Spanned<HumanDuration>>,
    pub retry_max: Option<Spanned<HumanDuration>>,
    pub timeout: Option<Spanned<HumanDuration>>,
}

impl RawClient {
    /// The client's own timing keys.
    pub fn take_timing(&mut self) -> RawTiming {
        RawTiming {
            refresh_at: self.refresh_at.take(),
            jitter: self.jitter.take(),
            refresh_margin: self.refresh_margin.take(),
            min_interval: self.min_interval.take(),
            default_lifetime: self.default_lifetime.take(),
            retry_initial: self.retry_initial.take(),
            retry_max: self.retry_max.take(),
            timeout: self.timeout.take(),
        }
    }
}

/// `[clients.NAME.assertion]` (RFC 7523 §2.1).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAssertion {
    pub signing_alg: Option<Spanned<String>>,
    pub key: Spanned<SecretSource>,
    pub key_id: Option<Spanned<String>>,
    pub lifetime: Option<Spanned<HumanDuration>>,
    pub claims: Option<BTreeMap<String, Claim>>,
}

/// One `[[clients.NAME.outputs]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutput {
    pub path: Spanned<PathBuf>,
    pub format: Option<Spanned<String>>,
    pub mode: Option<Spanned<Mode>>,
    pub owner: Option<Spanned<Id>>,
    pub group: Option<Spanned<Id>>,
    pub on_change: Option<Spanned<Vec<String>>>,
    pub env_prefix: Option<Spanned<String>>,
}

// === value syntaxes ===

/// The visitor of a value written as a string or an integer (a duration, a mode, a user): each
/// form is read by its function, whose error becomes the message at the value.
struct StrOrInt<T> {
    /// What the value should look like, for serde's type errors.
    expecting: &'static str,
    from_str: fn(&str) -> Result<T, String>,
    from_int: fn(i64) -> Result<T, String>,
}

impl<T> Visitor<'_> for StrOrInt<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.from_str)(v).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        (self.from_int)(v).map_err(E::custom)
    }
}

/// A duration written for humans: `"30s"`, `"5m"`, `"1h 30m"` (humantime).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct HumanDuration(pub Duration);

impl From<HumanDuration> for Duration {
    fn from(d: HumanDuration) -> Duration {
        d.0
    }
}

/// Parses a humantime duration, with a message that shows the expected form.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("invalid duration {text:?} ({e}); write it like \"30s\", \"5m\" or \"1h 30m\"")
    })
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrOrInt {
            expecting: "a duration string such as \"30s\", \"5m\" or \"1h 30m\"",
            from_str: |v| parse_duration(v).map(HumanDuration),
            from_int: |v| {
                Err(format!(
                    "a duration needs a unit: write \"{v}s\" rather than {v}"
                ))
            },
        })
    }
}

/// Permission bits written as an octal string: `"0640"` or `"640"`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Mode(pub u32);

/// Parses an octal mode string; at most `0o7777`.
pub(crate) fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    let bad = || format!("invalid mode {text:?}: write it as an octal string such as \"0640\"");
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return Err(bad());
    }
    let mode = u32::from_str_radix(digits, 8).map_err(|_| bad())?;
    if mode > 0o7777 {
        return Err(format!("invalid mode {text:?}: larger than 07777"));
    }
    Ok(mode)
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrOrInt {
            expecting: "an octal mode string such as \"0640\"",
            from_str: |v| parse_mode(v).map(Mode),
            from_int: |v| {
                Err(format!(
                    "a mode must be a quoted octal string such as \"0640\", not the number {v}"
                ))
            },
        })
    }
}

/// Scope values (RFC 6749 §3.3): an array of strings, or one space-separated string.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Scope(pub Vec<String>);

/// Splits a space-separated scope string.
pub(crate) fn parse_scope_string(text: &str) -> Vec<String> {
    let mut scopes: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
    // Kept as long as the client: no spare room (issue 6: memory per client).
    scopes.shrink_to_fit();
    scopes
}

/// Checks one element of a scope array: RFC 6749 §3.3 scope-tokens have no spaces or quotes.
pub(crate) fn check_scope_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("a scope value may not be empty".into());
    }
    if token
        .chars()
        .any(|c| c.is_whitespace() || c == '"' || c == '\\' || c.is_control())
    {
        return Err(format!(
            "scope value {token:?} contains a space, quote or backslash; give several values as separate array elements"
        ));
    }
    Ok(())
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scope;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of strings or one space-separated string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scope, E> {
                Ok(Scope(parse_scope_string(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scope, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    check_scope_token(&s).map_err(de::Error::custom)?;
                    out.push(s);
                }
                Ok(Scope(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// A user or group: a name or a numeric id.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Id {
    Name(String),
    Number(u32),
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrOrInt {
            expecting: "a user or group name, or a numeric id",
            from_str: |v| match v.parse::<u32>() {
                Ok(n) => Ok(Id::Number(n)),
                Err(_) if v.is_empty() => Err("empty user or group name".into()),
                Err(_) => Ok(Id::Name(v.to_owned())),
            },
            from_int: |v| {
                u32::try_from(v)
                    .map(Id::Number)
                    .map_err(|_| format!("{v} is not a valid uid or gid"))
            },
        })
    }
}

/// The keys of a secret written as a table.
const SECRET_KEYS: [&str; 3] = ["file", "env", "credential"];

/// The secret written as `{ file = … }`, `{ env = … }` or `{ credential = … }`.
fn secret_from_key(key: &str, value: String) -> SecretSource {
    match key {
        "file" => SecretSource::File(PathBuf::from(value)),
        "env" => SecretSource::Env(value),
        _ => SecretSource::Credential(value),
    }
}

/// Whether an `assertion` value is a secret (a string, or `{ file | env | credential }`)
/// rather than the table of how to sign one.
pub(crate) fn is_secret_value(v: &DeValue<'_>) -> bool {
    match v {
        DeValue::String(_) => true,
        DeValue::Table(t) => t
            .iter()
            .any(|(k, _)| SECRET_KEYS.contains(&k.get_ref().as_ref())),
        _ => false,
    }
}

/// A secret as written in the config (docs/configuration.md#secrets). A relative `file` path is
/// resolved later, against the directory of the file the secret is written in.
impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(OneKeyOrStr {
            expecting: "a secret: { file = PATH }, { env = NAME }, { credential = NAME } or a string",
            what: "a secret",
            keys: &SECRET_KEYS,
            choices: "file, env or credential",
            from_key: secret_from_key,
            from_str: |v| SecretSource::Inline(Secret::new(v)),
        })
    }
}

/// `subject_token`: a secret, or `{ client = "NAME" }` (another client's token, RFC 8693).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum RawSubject {
    Secret(SecretSource),
    Client(String),
}

impl<'de> Deserialize<'de> for RawSubject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(OneKeyOrStr {
            expecting: "a subject token: { client = NAME }, { file = PATH }, { env = NAME }, { credential = NAME } or a string",
            what: "subject_token",
            keys: &["client", "file", "env", "credential"],
            choices: "client, file, env or credential",
            from_key: |k, v| match k {
                "client" => RawSubject::Client(v),
                _ => RawSubject::Secret(secret_from_key(k, v)),
            },
            from_str: |v| RawSubject::Secret(SecretSource::Inline(Secret::new(v))),
        })
    }
}

/// The visitor of a value written as a string or as a table of exactly one of `keys`, each
/// holding a string (a secret, a subject token): `from_key` builds the value from the key
/// written and its string, `from_str` from a bare string.
struct OneKeyOrStr<T> {
    /// What the value should look like, for serde's type errors.
    expecting: &'static str,
    /// What the value is called in errors: "a secret", "subject_token".
    what: &'static str,
    keys: &'static [&'static str],
    /// The keys for messages: "file, env or credential".
    choices: &'static str,
    from_key: fn(&str, String) -> T,
    from_str: fn(String) -> T,
}

impl<'de, T> Visitor<'de> for OneKeyOrStr<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        Ok((self.from_str)(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<T, E> {
        Ok((self.from_str)(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        let Self {
            expecting,
            what,
            keys,
            choices,
            from_key,
            ..
        } = self;
        let exactly_one = || de::Error::custom(format!("{what} takes exactly one of {choices}"));
        let mut found: Option<T> = None;
        while let Some(key) = map.next_key::<String>()? {
            if key.starts_with("$__toml_private") {
                // How the toml crate hands over a date-time: never quote it.
                return Err(de::Error::custom(format!(
                    "invalid type: date-time, expected {expecting}"
                )));
            }
            if !keys.contains(&key.as_str()) {
                let hint = super::error::did_you_mean(&key, keys.iter().copied())
                    .map(|s| format!("did you mean \"{s}\"?"))
                    .unwrap_or_else(|| format!("use {choices}"));
                return Err(de::Error::custom(format!(
                    "unknown key \"{key}\" in {what}; {hint}"
                )));
            }
            if found.is_some() {
                return Err(exactly_one());
            }
            let value: String = map.next_value()?;
            found = Some(from_key(&key, value));
        }
        found.ok_or_else(exactly_one)
    }
}

/// One `claims` value of an assertion: a string, number or boolean.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Claim(pub serde_json::Value);

impl<'de> Deserialize<'de> for Claim {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Claim;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Claim, E> {
                Ok(Claim(v.into()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Claim, E> {
                Ok(Claim(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Claim, E> {
                Ok(Claim(v.into()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Claim, E> {
                serde_json::Number::from_f64(v)
                    .map(|n| Claim(serde_json::Value::Number(n)))
                    .ok_or_else(|| E::custom("a claim cannot be NaN or infinite"))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Claim, E> {
                Ok(Claim(v.into()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let cases: &[(&str, Option<u64>)] = &[
            ("30s", Some(30)),
            ("5m", Some(300)),
            ("1h 30m", Some(5400)),
            ("1h30m", Some(5400)),
            (" 10s ", Some(10)),
            ("0s", Some(0)),
            ("10", None),
            ("ten seconds", None),
            ("", None),
            ("5x", None),
        ];
        for (text, want) in cases {
            let got = parse_duration(text).ok().map(|d| d.as_secs());
            assert_eq!(got, *want, "{text:?}");
        }
        assert!(parse_duration("5x").unwrap_err().contains("\"30s\""));
    }

    #[test]
    fn modes() {
        let cases: &[(&str, Option<u32>)] = &[
            ("0640", Some(0o640)),
            ("640", Some(0o640)),
            ("0600", Some(0o600)),
            ("0o755", Some(0o755)),
            ("7777", Some(0o7777)),
            ("0", Some(0)),
            ("17777", None),
            ("0648", None),
            ("rw-r-----", None),
            ("", None),
            ("-640", None),
            ("0000640", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_mode(text).ok(), *want, "{text:?}");
        }
    }

    #[test]
    fn scopes() {
        assert_eq!(
            parse_scope_string("base  files\tupload_files"),
            ["base", "files", "upload_files"]
        );
        assert!(parse_scope_string("  ").is_empty());
        assert!(check_scope_token("files").is_ok());
        assert!(check_scope_token("a b").is_err());
        assert!(check_scope_token("").is_err());
        assert!(check_scope_token("a\"b").is_err());
        let s: Scope = toml::from_str::<BTreeMap<String, Scope>>("s = ['a', 'b']")
            .unwrap()
            .remove("s")
            .unwrap();
        assert_eq!(s.0, ["a", "b"]);
        let s: Scope = toml::from_str::<BTreeMap<String, Scope>>("s = 'a b'")
            .unwrap()
            .remove("s")
            .unwrap();
        assert_eq!(s.0, ["a", "b"]);
    }

    #[test]
    fn secrets_and_ids() {
        let m: BTreeMap<String, SecretSource> = toml::from_str(
            "a = { file = 'x' }\nb = { env = 'E' }\nc = { credential = 'c' }\nd = 'inline'",
        )
        .unwrap();
        assert_eq!(m["a"], SecretSource::File("x".into()));
        assert_eq!(m["b"], SecretSource::Env("E".into()));
        assert_eq!(m["c"], SecretSource::Credential("c".into()));
        assert!(matches!(&m["d"], SecretSource::Inline(s) if s.expose() == "inline"));
        let e = toml::from_str::<BTreeMap<String, SecretSource>>("a = { fiel = 'x' }").unwrap_err();
        assert!(e.message().contains("did you mean \"file\""), "{e}");
        let e = toml::from_str::<BTreeMap<String, SecretSource>>("a = { file = 'x', env = 'y' }")
            .unwrap_err();
        assert!(e.message().contains("exactly one"), "{e}");
        let e =
            toml::from_str::<BTreeMap<String, RawSubject>>("a = 1979-05-27T07:32:00Z").unwrap_err();
        assert!(
            e.message()
                .starts_with("invalid type: date-time, expected a subject token")
        );
        let e = toml::from_str::<BTreeMap<String, RawSubject>>("a = { clinet = 'x' }").unwrap_err();
        assert!(e.message().contains("did you mean \"client\""), "{e}");
        let ids: BTreeMap<String, Id> = toml::from_str("a = 'app'\nb = 1000\nc = '1001'").unwrap();
        assert_eq!(ids["a"], Id::Name("app".into()));
        assert_eq!(ids["b"], Id::Number(1000));
        assert_eq!(ids["c"], Id::Number(1001));
    }
}
