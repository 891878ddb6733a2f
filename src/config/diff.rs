//! What a reload changes (SPEC §8), as a pure function of the old and the new config.
//!
//! Every field of a client falls in one class, and the strongest class wins:
//! - **Renew** (a new token now): `token_url`, `grant_type` and its credentials (`username`,
//!   `password`, `refresh_token`, `[assertion]`), `client_auth` and its credentials
//!   (`client_secret`, `private_key`, `key_id`, `signing_alg`, `assertion_lifetime`),
//!   `client_id`, `scope`, `audience`, `resource`, `extra_params`, `extra_headers`, `ca_file`.
//!   A secret file whose content changed shows up here, since credentials compare by value.
//! - **Outputs** (write the current token to the new outputs): `outputs` (paths, formats,
//!   modes, owners, `on_change`, `env_prefix`). Writing is skipped for files already current,
//!   so an `on_change`-only change writes nothing.
//! - **Settings** (no request, no write): timing keys, `rotate_cron`, `allow_users`,
//!   `allow_groups`.

use super::types::{ClientConfig, Config};

/// How one client changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientChange {
    /// Identity or credentials changed: get a new token now.
    Renew,
    /// Only outputs (and perhaps settings) changed: write the current token to them.
    Outputs,
    /// Only settings that need no token and no write.
    Settings,
}

/// The difference between two configs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: Vec<String>,
    pub changed: Vec<(String, ClientChange)>,
    /// `[daemon]` differs (the daemon compares its keys itself).
    pub daemon_changed: bool,
}

/// Classifies one client's change; `None` when nothing changed.
pub fn client_change(old: &ClientConfig, new: &ClientConfig) -> Option<ClientChange> {
    if old == new {
        return None;
    }
    // Put the new outputs and settings on a copy of the old: whatever still differs is
    // identity or credentials.
    let mut probe = old.clone();
    probe.outputs = new.outputs.clone();
    probe.timing = new.timing.clone();
    probe.rotate_cron = new.rotate_cron.clone();
    probe.allow_uids = new.allow_uids.clone();
    probe.allow_gids = new.allow_gids.clone();
    if probe != *new {
        return Some(ClientChange::Renew);
    }
    if old.outputs != new.outputs {
        return Some(ClientChange::Outputs);
    }
    Some(ClientChange::Settings)
}

/// Diffs two configs, clients in name order.
pub fn diff(old: &Config, new: &Config) -> ConfigDiff {
    let mut d = ConfigDiff {
        daemon_changed: old.daemon != new.daemon,
        ..ConfigDiff::default()
    };
    for (name, o) in &old.clients {
        match new.clients.get(name) {
            None => d.removed.push(name.clone()),
            Some(n) => match client_change(o, n) {
                None => d.unchanged.push(name.clone()),
                Some(c) => d.changed.push((name.clone(), c)),
            },
        }
    }
    for name in new.clients.keys() {
        if !old.clients.contains_key(name) {
            d.added.push(name.clone());
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;
    use std::path::Path;

    const BASE: &str = r#"
[clients.a]
token_url = "https://auth.example/token"
client_id = "id"
client_secret = "SECRET"
scope = "x"
[[clients.a.outputs]]
path = "/run/tw/a.token"

[clients.b]
token_url = "https://auth.example/token"
client_id = "id-b"
client_secret = "SECRET"
"#;

    fn load(text: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        load_str(text, Path::new(&p)).unwrap()
    }

    fn change_of_a(edit: &str, with: &str) -> Option<ClientChange> {
        let old = load(BASE);
        let new = load(&BASE.replacen(edit, with, 1));
        assert_ne!(
            BASE.replacen(edit, with, 1),
            BASE,
            "edit {edit:?} did not apply"
        );
        client_change(&old.clients["a"], &new.clients["a"])
    }

    #[test]
    fn each_field_falls_in_its_class() {
        use ClientChange::*;
        let a = "client_id = \"id\"\n";
        let cases: &[(&str, &str, Option<ClientChange>)] = &[
            (
                "token_url = \"https://auth.example/token\"\nclient_id = \"id\"",
                "token_url = \"https://other.example/token\"\nclient_id = \"id\"",
                Some(Renew),
            ),
            (a, "client_id = \"id2\"\n", Some(Renew)),
            (
                "client_secret = \"SECRET\"\nscope",
                "client_secret = \"SECRET2\"\nscope",
                Some(Renew),
            ),
            ("scope = \"x\"", "scope = \"x y\"", Some(Renew)),
            (a, "client_id = \"id\"\naudience = \"api\"\n", Some(Renew)),
            (
                a,
                "client_id = \"id\"\nresource = \"https://api\"\n",
                Some(Renew),
            ),
            (
                a,
                "client_id = \"id\"\nextra_params = { k = \"v\" }\n",
                Some(Renew),
            ),
            (
                a,
                "client_id = \"id\"\nextra_headers = { X-K = \"v\" }\n",
                Some(Renew),
            ),
            (
                a,
                "client_id = \"id\"\nclient_auth = \"client_secret_post\"\n",
                Some(Renew),
            ),
            (
                "path = \"/run/tw/a.token\"",
                "path = \"/run/tw/a2.token\"",
                Some(Outputs),
            ),
            (
                "path = \"/run/tw/a.token\"",
                "path = \"/run/tw/a.token\"\nformat = \"json\"",
                Some(Outputs),
            ),
            (
                "path = \"/run/tw/a.token\"",
                "path = \"/run/tw/a.token\"\non_change = [\"/bin/true\"]",
                Some(Outputs),
            ),
            (a, "client_id = \"id\"\nrefresh_at = 0.5\n", Some(Settings)),
            (a, "client_id = \"id\"\ntimeout = \"3s\"\n", Some(Settings)),
            (
                a,
                "client_id = \"id\"\nrotate_cron = \"0 0 3 * * *\"\n",
                Some(Settings),
            ),
            (
                a,
                "client_id = \"id\"\nallow_users = [\"root\"]\n",
                Some(Settings),
            ),
            (
                a,
                "client_id = \"id\"\nallow_groups = [\"root\"]\n",
                Some(Settings),
            ),
            (a, "client_id = \"id\" # a comment\n", None),
        ];
        for (edit, with, want) in cases {
            assert_eq!(change_of_a(edit, with), *want, "{with}");
        }
        // Renew beats Outputs; Outputs beats Settings.
        let old = load(BASE);
        let new = load(
            &BASE
                .replacen("scope = \"x\"", "scope = \"z\"\nrefresh_at = 0.5", 1)
                .replacen("a.token", "a3.token", 1),
        );
        assert_eq!(
            client_change(&old.clients["a"], &new.clients["a"]),
            Some(ClientChange::Renew)
        );
        let new = load(
            &BASE
                .replacen("scope = \"x\"", "scope = \"x\"\nrefresh_at = 0.5", 1)
                .replacen("a.token", "a3.token", 1),
        );
        assert_eq!(
            client_change(&old.clients["a"], &new.clients["a"]),
            Some(ClientChange::Outputs)
        );
    }

    #[test]
    fn added_removed_unchanged() {
        let old = load(BASE);
        let new_text = BASE
            .replace("[clients.b]", "[clients.c]")
            .replace("id-b", "id-c");
        let d = diff(&old, &load(&new_text));
        assert_eq!(d.added, ["c"]);
        assert_eq!(d.removed, ["b"]);
        assert_eq!(d.unchanged, ["a"]);
        assert!(d.changed.is_empty());
        assert!(!d.daemon_changed);
        let d = diff(
            &old,
            &load(&format!("[daemon]\nlog_level = \"debug\"\n{BASE}")),
        );
        assert!(d.daemon_changed);
        assert_eq!(d.unchanged, ["a", "b"]);
    }
}
