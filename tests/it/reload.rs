//! Reloads, signals and systemd notifications (docs/operations.md#reload, #signals, #systemd),
//! against the real binary and the built-in provider with 600 s tokens (so no scheduled refresh
//! interferes): every case counts the provider's token requests per client id and asserts that
//! exactly the expected clients asked. Also: the file watcher (`tokenwarden::triggers::FileWatcher`)
//! on its own, READY / STATUS / STOPPING / WATCHDOG on a test `$NOTIFY_SOCKET`, `rotate_cron`, and
//! (through a proxy that holds a response back) a late answer for an identity a reload replaced.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokenwarden::demo::{
    CREADS_ID, TALENTSOFT_APP_ID, TALENTSOFT_USER_ID, TALKDESK_ID, TRANSATEL_ID,
};
use tokenwarden::provider::{Dialect, Fault, Provider, RecordedRequest, RegisteredClient};
use tokenwarden::triggers::{Event, FileWatcher, ReloadReason};
use tokio::sync::mpsc;

use crate::support::{DaemonProc, DemoEnv, NotifySocket, READY_WITHIN, basic_id, read, wait_for};

/// Token lifetime: long enough that no scheduled refresh happens during a test.
const LONG: Duration = Duration::from_secs(600);
/// A bounded "nothing else happened" wait: well above the daemon's 200 ms debounce.
const QUIET: Duration = Duration::from_millis(1500);
/// How long a reload and the request it causes may take on a busy 2-core machine.
const SOON: Duration = Duration::from_secs(10);

/// The demo's client ids, by config name.
const DEMO: [(&str, &str); 5] = [
    ("creads-files", CREADS_ID),
    ("talentsoft-app", TALENTSOFT_APP_ID),
    ("talentsoft-user", TALENTSOFT_USER_ID),
    ("talkdesk", TALKDESK_ID),
    ("transatel", TRANSATEL_ID),
];

/// The Transatel client's scope line in the demo config.
const TRANSATEL_SCOPE: &str = r#"scope = ["CATALOG_PRODUCTS_READ", "USER_READ"]"#;
/// A line only the Transatel client has, to insert keys after.
const TRANSATEL_GRANT: &str = "grant_type = \"client_credentials\"\n";

// === counting token requests ===

/// Token requests per client id.
type Counts = BTreeMap<String, usize>;

/// The `iss` claim of a JWT, read without verifying it.
fn jwt_iss(jwt: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims["iss"].as_str().map(str::to_string)
}

/// The client id a token request was made for, whatever the client authentication: HTTP
/// Basic, `client_id` in the form, or the `iss` of a (client) assertion.
fn client_of(r: &RecordedRequest) -> String {
    if let Some(h) = r
        .header("authorization")
        .filter(|h| h.starts_with("Basic "))
    {
        return basic_id(h);
    }
    if let Some(id) = r.form_value("client_id") {
        return id.to_string();
    }
    ["assertion", "client_assertion"]
        .iter()
        .find_map(|k| r.form_value(k).and_then(jwt_iss))
        .unwrap_or_else(|| format!("unidentified request to {}", r.path))
}

/// Every token request the provider has seen, counted per client id.
fn counts(provider: &Provider) -> Counts {
    let mut c = Counts::new();
    for r in provider.requests() {
        *c.entry(client_of(&r)).or_default() += 1;
    }
    c
}

/// The requests in `now` that are not in `before`, per client (clients with none left out).
fn delta(before: &Counts, now: &Counts) -> Counts {
    now.iter()
        .map(|(k, n)| (k.clone(), n - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// `{id: n}` for the given ids.
fn each(ids: &[&str], n: usize) -> Counts {
    ids.iter().map(|id| (id.to_string(), n)).collect()
}

// === files ===

/// Replaces `path` the way editors and config managers do: a temporary file in the same
/// directory, renamed over it. Returns the instant of the rename.
fn replace_atomically(path: &Path, content: &str) -> Instant {
    use std::os::unix::fs::PermissionsExt;
    let name = path.file_name().unwrap().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, content).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
    Instant::now()
}

/// The `access_token` of a JSON output.
fn json_token(path: &Path) -> String {
    let v: serde_json::Value = serde_json::from_str(&read(path)).unwrap();
    v["access_token"].as_str().unwrap().to_string()
}

/// The access token in an `env` output with prefix `TS_`.
fn env_token(path: &Path) -> String {
    read(path)
        .lines()
        .find_map(|l| l.strip_prefix("TS_ACCESS_TOKEN="))
        .unwrap_or_default()
        .to_string()
}

/// Waits until `path` holds something other than `old`; returns the time it took since `from`.
async fn wait_changed(path: &Path, old: &str, from: Instant) -> Duration {
    let deadline = Instant::now() + SOON;
    loop {
        let now = read(path);
        if !now.is_empty() && now != old {
            return from.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{} did not change within {SOON:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The config text with `block` (a whole `[clients.NAME]` section and its outputs) removed.
fn without_section(text: &str, start: &str, next: &str) -> String {
    let a = text.find(start).unwrap();
    let b = text.find(next).unwrap();
    format!("{}{}", &text[..a], &text[b..])
}

// === systemd notifications ===

/// The `READY=1` messages that close a `RELOADING=1`, after checking that every reload is
/// bracketed: no `RELOADING=1` before the first `READY=1`, none while one is open.
fn reload_cycles(msgs: &[String]) -> Result<Vec<String>, String> {
    let mut closed = Vec::new();
    let (mut ready, mut open) = (false, false);
    for m in msgs {
        if m.contains("RELOADING=1") {
            if !ready || open {
                return Err(format!("RELOADING=1 out of order: {msgs:?}"));
            }
            open = true;
        } else if m.contains("READY=1") {
            if open {
                closed.push(m.clone());
                open = false;
            }
            ready = true;
        }
    }
    Ok(closed)
}

/// Waits until `n` reloads have been bracketed by `RELOADING=1` / `READY=1`; returns the
/// closing `READY=1` messages.
async fn wait_cycles(notify: &NotifySocket, n: usize) -> Vec<String> {
    let deadline = Instant::now() + SOON;
    loop {
        let msgs = notify.messages();
        let cycles = reload_cycles(&msgs).unwrap();
        if cycles.len() >= n {
            assert_eq!(cycles.len(), n, "{msgs:?}");
            return cycles;
        }
        assert!(
            Instant::now() < deadline,
            "{n} reload cycles not seen: {msgs:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn count_msgs(notify: &NotifySocket, needle: &str) -> usize {
    notify
        .messages()
        .iter()
        .filter(|m| m.contains(needle))
        .count()
}

// === the daemon under test ===

/// The demo's provider and config, the daemon running on it, its notify socket.
struct Rig {
    env: DemoEnv,
    notify: NotifySocket,
    daemon: DaemonProc,
}

impl Rig {
    /// Starts the daemon on the demo config and waits until every client has its first token
    /// (one request each).
    async fn start() -> Rig {
        let rig = Rig::start_with(|_| {}, &[]).await;
        let ids: Vec<&str> = DEMO.iter().map(|(_, id)| *id).collect();
        assert_eq!(rig.counts(), each(&ids, 1));
        rig
    }

    /// Starts the daemon after `prepare` (which may edit the config), with `vars` set, and
    /// waits for READY=1 with every client valid.
    async fn start_with(prepare: impl FnOnce(&DemoEnv), vars: &[(&str, &str)]) -> Rig {
        let env = DemoEnv::start(LONG).await;
        prepare(&env);
        let (daemon, notify, ready) = DaemonProc::start_ready(&env.demo.config, vars).await;
        assert!(ready.contains("STATUS=5/5 clients valid"), "{ready}");
        Rig {
            env,
            notify,
            daemon,
        }
    }

    fn counts(&self) -> Counts {
        counts(&self.env.provider)
    }

    fn config_path(&self) -> &Path {
        &self.env.demo.config
    }

    fn config(&self) -> String {
        read(self.config_path())
    }

    /// Saves a new config like an editor does (temp file renamed over it).
    fn save(&self, text: &str) -> Instant {
        replace_atomically(self.config_path(), text)
    }

    /// How many log lines end a successful reload.
    fn reloads(&self) -> usize {
        self.lines_with("reloaded")
    }

    fn lines_with(&self, needle: &str) -> usize {
        self.daemon
            .logs()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until `n` log lines contain `needle`.
    async fn wait_lines(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + SOON;
        while self.lines_with(needle) < n {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} lines with {needle:?} within {SOON:?}; logs:\n{}",
                self.daemon.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the provider has seen `want` more requests than `before` (per client).
    async fn wait_requests(&self, before: &Counts, want: &Counts) {
        let deadline = Instant::now() + SOON;
        loop {
            let d = delta(before, &self.counts());
            if want
                .iter()
                .all(|(k, n)| d.get(k).copied().unwrap_or(0) >= *n)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "wanted {want:?} more requests, saw {d:?}; logs:\n{}",
                self.daemon.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// After a bounded quiet period, the requests since `before` must be exactly `want`.
    async fn settle(&self, before: &Counts, want: &Counts) {
        tokio::time::sleep(QUIET).await;
        assert_eq!(
            &delta(before, &self.counts()),
            want,
            "token requests per client; logs:\n{}",
            self.daemon.logs()
        );
    }

    /// SIGTERM; the daemon must say STOPPING=1 and exit 0 within 5 s.
    async fn stop(mut self) {
        let t = Instant::now();
        self.daemon.stop().await;
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        self.notify
            .wait_for("STOPPING=1", Duration::from_secs(1))
            .await;
    }
}

// === reloads ===

#[tokio::test(flavor = "multi_thread")]
async fn an_added_client_gets_a_token_and_nobody_else_asks() {
    let rig = Rig::start().await;
    let before = rig.counts();
    let id = "demo-transatel-copy";
    let secret = uuid::Uuid::new_v4().simple().to_string();
    rig.env
        .provider
        .register(RegisteredClient::transatel(id, &secret).with_lifetime(LONG));
    let secret_file = rig.env.demo.dir.join("secrets/transatel-copy");
    replace_atomically(&secret_file, &secret);
    let out = rig.env.out("transatel-copy.token");
    let text = rig.config()
        + &format!(
            r#"
[clients.transatel-copy]
token_url = "{url}"
grant_type = "client_credentials"
client_id = "{id}"
client_secret = {{ file = "{secret}" }}
{TRANSATEL_SCOPE}
[[clients.transatel-copy.outputs]]
path = "{out}"
"#,
            url = rig.env.provider.token_url(Dialect::Transatel),
            secret = secret_file.display(),
            out = out.display(),
        );
    let saved = rig.save(&text);
    let took = wait_changed(&out, "", saved).await;
    println!("added client: rename → token in its file: {took:?}");
    assert_eq!(
        rig.env.provider.token_owner(&read(&out)).as_deref(),
        Some(id)
    );
    rig.settle(&before, &each(&[id], 1)).await;
    assert_eq!(rig.reloads(), 1);
    assert!(rig.daemon.logs().contains("client added"));
    let closing = wait_cycles(&rig.notify, 1).await;
    assert!(closing[0].contains("clients valid"), "{closing:?}");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_scope_or_secret_renews_exactly_that_client() {
    let rig = Rig::start().await;

    // Scope: Transatel gets one new token at once, in both of its outputs.
    let before = rig.counts();
    let (token_out, json_out) = (
        rig.env.out("transatel.token"),
        rig.env.out("transatel.json"),
    );
    let old = read(&token_out);
    let saved = rig.save(
        &rig.config()
            .replace(TRANSATEL_SCOPE, r#"scope = ["CATALOG_PRODUCTS_READ"]"#),
    );
    let took = wait_changed(&token_out, &old, saved).await;
    println!("scope change: rename → new token in the file: {took:?}");
    wait_for("the JSON output", SOON, || {
        json_token(&json_out) == read(&token_out)
    })
    .await;
    let json: serde_json::Value = serde_json::from_str(&read(&json_out)).unwrap();
    assert_eq!(json["scope"], "CATALOG_PRODUCTS_READ");
    assert!(rig.env.provider.token_is_live(&read(&token_out)));
    rig.settle(&before, &each(&[TRANSATEL_ID], 1)).await;

    // Secret file content (replaced atomically): Talentsoft app, and only it.
    let before = rig.counts();
    let env_out = rig.env.out("talentsoft-app.env");
    let old = read(&env_out);
    let secret = uuid::Uuid::new_v4().simple().to_string();
    rig.env
        .provider
        .register(RegisteredClient::talentsoft_app(TALENTSOFT_APP_ID, &secret).with_lifetime(LONG));
    let renamed = replace_atomically(&rig.env.demo.dir.join("secrets/talentsoft"), &secret);
    let took = wait_changed(&env_out, &old, renamed).await;
    println!("secret file replaced: rename → new token in the file: {took:?}");
    let token = env_token(&env_out);
    assert_eq!(
        rig.env.provider.token_owner(&token).as_deref(),
        Some(TALENTSOFT_APP_ID)
    );
    assert!(rig.env.provider.token_is_live(&token));
    rig.settle(&before, &each(&[TALENTSOFT_APP_ID], 1)).await;
    assert_eq!(rig.reloads(), 2);
    let logs = rig.daemon.logs();
    assert!(
        logs.contains(
            "client changed client=\"talentsoft-app\" changed=\"client_secret: new value\" action=\"new token requested now\""
        ),
        "{logs}"
    );
    assert!(!logs.contains(&secret), "a secret in the logs");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outputs_only_change_writes_the_current_token_without_a_request() {
    let rig = Rig::start().await;
    let before = rig.counts();
    let first = rig.env.out("talkdesk.token");
    let token = read(&first);
    let mtime = std::fs::metadata(&first).unwrap().modified().unwrap();
    let second = rig.env.out("talkdesk.json");
    // The Talkdesk client's outputs are the config's last table: append a second one.
    let text = rig.config()
        + &format!(
            "[[clients.talkdesk.outputs]]\npath = \"{}\"\nformat = \"json\"\n",
            second.display()
        );
    let saved = rig.save(&text);
    let took = wait_changed(&second, "", saved).await;
    println!("outputs change: rename → token in the new output: {took:?}");
    assert_eq!(json_token(&second), token);
    rig.settle(&before, &Counts::new()).await;
    assert_eq!(read(&first), token);
    assert_eq!(
        std::fs::metadata(&first).unwrap().modified().unwrap(),
        mtime,
        "the current output was rewritten"
    );
    assert_eq!(rig.reloads(), 1);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_client_stops_and_its_files_stay() {
    let rig = Rig::start().await;
    let out = rig.env.out("talentsoft-user.json");
    let kept = read(&out);
    let text = without_section(&rig.config(), "# Talentsoft user:", "# Talkdesk:");
    assert!(!text.contains("clients.talentsoft-user"));
    rig.save(&text);
    rig.wait_lines("reloaded", 1).await;
    assert!(rig.daemon.logs().contains("client removed"));
    assert_eq!(read(&out), kept, "the removed client's file was touched");

    // SIGUSR1 reaches every client still configured, and not the removed one.
    let before = rig.counts();
    rig.daemon.signal(Signal::SIGUSR1);
    let left = [CREADS_ID, TALENTSOFT_APP_ID, TALKDESK_ID, TRANSATEL_ID];
    rig.wait_requests(&before, &each(&left, 1)).await;
    rig.settle(&before, &each(&left, 1)).await;
    assert_eq!(read(&out), kept);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_config_keeps_the_old_one_running_until_it_is_fixed() {
    let rig = Rig::start().await;
    let before = rig.counts();
    let good = rig.config();
    let path = rig.config_path().display().to_string();
    let tokens: Vec<(PathBuf, String)> = ["transatel.token", "talkdesk.token"]
        .iter()
        .map(|n| (rig.env.out(n), read(&rig.env.out(n))))
        .collect();

    // A syntax error: an unclosed table header on the last line.
    let broken = format!("{good}\n[clients.broken\n");
    let line = broken.lines().count();
    rig.save(&broken);
    rig.wait_lines("reload refused", 1).await;
    let logs = rig.daemon.logs();
    assert!(
        logs.contains(&format!("{path}:{line}:")),
        "no {path}:{line}: in\n{logs}"
    );
    let closing = wait_cycles(&rig.notify, 1).await;
    assert!(closing[0].contains("reload failed"), "{closing:?}");
    assert!(
        closing[0].contains(&format!("{path}:{line}:")),
        "{closing:?}"
    );

    // A semantic error: a value out of range, located on its line.
    let broken = good.replace("[defaults]", "[defaults]\nrefresh_at = 3.0");
    let line = broken
        .lines()
        .position(|l| l.starts_with("refresh_at = 3.0"))
        .unwrap()
        + 1;
    rig.save(&broken);
    rig.wait_lines("reload refused", 2).await;
    let logs = rig.daemon.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains(&format!("{path}:{line}:")) && l.contains("refresh_at")),
        "no {path}:{line}: … refresh_at in\n{logs}"
    );
    let closing = wait_cycles(&rig.notify, 2).await;
    assert!(closing[1].contains("reload failed"), "{closing:?}");
    assert!(closing[1].contains("refresh_at"), "{closing:?}");

    // Meanwhile the old config runs: the same live tokens, no request.
    rig.settle(&before, &Counts::new()).await;
    for (p, t) in &tokens {
        assert_eq!(&read(p), t);
        assert!(rig.env.provider.token_is_live(t));
    }
    assert_eq!(rig.reloads(), 0);

    // Fixed (with a scope change, to see it applied).
    rig.save(&good.replace(TRANSATEL_SCOPE, r#"scope = ["USER_READ"]"#));
    rig.wait_lines("reloaded", 1).await;
    let closing = wait_cycles(&rig.notify, 3).await;
    assert!(!closing[2].contains("failed"), "{closing:?}");
    rig.wait_requests(&before, &each(&[TRANSATEL_ID], 1)).await;
    rig.settle(&before, &each(&[TRANSATEL_ID], 1)).await;
    // A changed identity restarts the client, so STATUS may say 4/5 until its new token lands.
    let last = rig
        .notify
        .messages()
        .into_iter()
        .rev()
        .find(|m| m.contains("STATUS="));
    assert_eq!(last.as_deref(), Some("STATUS=5/5 clients valid\n"));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_without_change_asks_nothing_and_sigusr1_renews_every_client() {
    let rig = Rig::start().await;
    let before = rig.counts();
    rig.daemon.signal(Signal::SIGHUP);
    rig.wait_lines("reloaded", 1).await;
    assert!(rig.daemon.logs().contains("SIGHUP"));
    let closing = wait_cycles(&rig.notify, 1).await;
    assert!(
        closing[0].contains("STATUS=5/5 clients valid"),
        "{closing:?}"
    );
    rig.settle(&before, &Counts::new()).await;

    let files: Vec<(PathBuf, String)> =
        ["transatel.token", "talkdesk.token", "creads-files.header"]
            .iter()
            .map(|n| (rig.env.out(n), read(&rig.env.out(n))))
            .collect();
    rig.daemon.signal(Signal::SIGUSR1);
    let ids: Vec<&str> = DEMO.iter().map(|(_, id)| *id).collect();
    rig.wait_requests(&before, &each(&ids, 1)).await;
    rig.settle(&before, &each(&ids, 1)).await;
    for (p, old) in &files {
        assert_ne!(&read(p), old, "{} not renewed", p.display());
    }
    // SIGUSR1 is no reload.
    assert_eq!(rig.reloads(), 1);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_editor_save_and_a_kubernetes_secret_swap_are_seen_without_sighup() {
    // The Talentsoft app secret lives in a Kubernetes-style projected volume:
    // k8s/talentsoft -> ..data/talentsoft, ..data -> ..v1.
    let rig = Rig::start_with(
        |env| {
            use std::os::unix::fs::symlink;
            let k8s = env.demo.dir.join("k8s");
            std::fs::create_dir_all(k8s.join("..v1")).unwrap();
            std::fs::write(k8s.join("..v1/talentsoft"), env.secret("talentsoft")).unwrap();
            symlink("..v1", k8s.join("..data")).unwrap();
            symlink("..data/talentsoft", k8s.join("talentsoft")).unwrap();
            let old = env.demo.dir.join("secrets/talentsoft");
            let new = k8s.join("talentsoft");
            env.edit_config(|t| {
                t.replace(
                    &format!("\"{}\"", old.display()),
                    &format!("\"{}\"", new.display()),
                )
            });
        },
        &[],
    )
    .await;
    let ids: Vec<&str> = DEMO.iter().map(|(_, id)| *id).collect();
    assert_eq!(rig.counts(), each(&ids, 1));

    // Editor-style save of the config.
    let before = rig.counts();
    let out = rig.env.out("transatel.token");
    let old = read(&out);
    let saved = rig.save(
        &rig.config()
            .replace(TRANSATEL_SCOPE, r#"scope = ["USER_READ"]"#),
    );
    let took = wait_changed(&out, &old, saved).await;
    println!("editor save: rename → new token in the file: {took:?}");
    rig.settle(&before, &each(&[TRANSATEL_ID], 1)).await;

    // The symlink swap: ..v2 made, then `ln -s ..v2 ..data_tmp && mv -T ..data_tmp ..data`.
    let before = rig.counts();
    let out = rig.env.out("talentsoft-app.env");
    let old = read(&out);
    let secret = uuid::Uuid::new_v4().simple().to_string();
    rig.env
        .provider
        .register(RegisteredClient::talentsoft_app(TALENTSOFT_APP_ID, &secret).with_lifetime(LONG));
    let k8s = rig.env.demo.dir.join("k8s");
    std::fs::create_dir(k8s.join("..v2")).unwrap();
    std::fs::write(k8s.join("..v2/talentsoft"), &secret).unwrap();
    std::os::unix::fs::symlink("..v2", k8s.join("..data_tmp")).unwrap();
    std::fs::rename(k8s.join("..data_tmp"), k8s.join("..data")).unwrap();
    let swapped = Instant::now();
    std::fs::remove_dir_all(k8s.join("..v1")).unwrap();
    let took = wait_changed(&out, &old, swapped).await;
    println!("kubernetes symlink swap: rename → new token in the file: {took:?}");
    assert_eq!(
        rig.env.provider.token_owner(&env_token(&out)).as_deref(),
        Some(TALENTSOFT_APP_ID)
    );
    rig.settle(&before, &each(&[TALENTSOFT_APP_ID], 1)).await;

    let logs = rig.daemon.logs();
    assert!(!logs.contains("SIGHUP"));
    assert_eq!(rig.reloads(), 2, "{logs}");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_writes_reloads_once_with_the_last_content() {
    let rig = Rig::start().await;
    let before = rig.counts();
    let good = rig.config();
    // Ten quick in-place writes, each with another scope; only the last one may be applied.
    for i in 0..10 {
        let text = good.replace(TRANSATEL_SCOPE, &format!("scope = [\"S{i}\"]"));
        std::fs::write(rig.config_path(), text).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rig.wait_lines("reloaded", 1).await;
    rig.wait_requests(&before, &each(&[TRANSATEL_ID], 1)).await;
    rig.settle(&before, &each(&[TRANSATEL_ID], 1)).await;
    assert_eq!(rig.reloads(), 1, "{}", rig.daemon.logs());
    assert_eq!(rig.lines_with("reloading"), 1);
    wait_cycles(&rig.notify, 1).await;
    wait_for("the JSON output with the last scope", SOON, || {
        read(&rig.env.out("transatel.json")).contains("\"S9\"")
    })
    .await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_level_change_by_reload_takes_effect() {
    let rig = Rig::start().await;
    // A debug-only line, logged whenever a token's next refresh is planned.
    const DEBUG_LINE: &str = "next refresh planned";
    assert!(!rig.daemon.logs().contains(DEBUG_LINE));
    let before = rig.counts();
    rig.save(
        &rig.config()
            .replace(r#"log_level = "info""#, r#"log_level = "debug""#),
    );
    rig.wait_lines("log level is now debug", 1).await;
    rig.wait_lines("reloaded", 1).await;
    rig.daemon.signal(Signal::SIGUSR1);
    rig.wait_lines(DEBUG_LINE, 1).await;
    let logs = rig.daemon.logs();
    assert!(logs.find("log level is now debug") < logs.find(DEBUG_LINE));
    let ids: Vec<&str> = DEMO.iter().map(|(_, id)| *id).collect();
    rig.settle(&before, &each(&ids, 1)).await;
    rig.stop().await;
}

// === the file watcher on its own ===

const DEBOUNCE: Duration = Duration::from_millis(50);
/// Long enough for any event of a change just made to have come out of the debounce.
const WATCH_QUIET: Duration = Duration::from_secs(1);

/// A watcher on `paths` and its channel.
fn watch(paths: &[&Path]) -> (FileWatcher, mpsc::Receiver<Event>) {
    let (tx, rx) = mpsc::channel(16);
    let w = FileWatcher::start(
        paths.iter().map(|p| p.to_path_buf()).collect(),
        DEBOUNCE,
        tx,
    )
    .unwrap();
    (w, rx)
}

/// The next event's changed paths, within 5 s.
async fn changed(rx: &mut mpsc::Receiver<Event>) -> Vec<PathBuf> {
    match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        Ok(Some(Event::Reload(ReloadReason::Changed(paths)))) => paths,
        other => panic!("expected a change, got {other:?}"),
    }
}

/// No event for [`WATCH_QUIET`].
async fn quiet(rx: &mut mpsc::Receiver<Event>, what: &str) {
    if let Ok(ev) = tokio::time::timeout(WATCH_QUIET, rx.recv()).await {
        panic!("{what}: unexpected {ev:?}");
    }
}

#[tokio::test]
async fn watcher_ignores_same_content_rewrites_and_touches() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("tokenwarden.toml");
    std::fs::write(&f, "a = 1\n").unwrap();
    let (_w, mut rx) = watch(&[&f]);
    std::fs::write(&f, "a = 1\n").unwrap();
    quiet(&mut rx, "in-place rewrite with the same content").await;
    replace_atomically(&f, "a = 1\n");
    quiet(&mut rx, "atomic rewrite with the same content").await;
    std::fs::File::options()
        .append(true)
        .open(&f)
        .unwrap()
        .set_modified(std::time::SystemTime::now())
        .unwrap();
    quiet(&mut rx, "touch").await;
    // The watcher is alive: a real change is seen.
    std::fs::write(&f, "a = 2\n").unwrap();
    assert_eq!(changed(&mut rx).await, vec![f.clone()]);
    quiet(&mut rx, "after one change").await;
}

#[tokio::test]
async fn watcher_sees_delete_then_recreate_as_one_change() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("secret");
    std::fs::write(&f, "old").unwrap();
    let (_w, mut rx) = watch(&[&f]);
    std::fs::remove_file(&f).unwrap();
    std::fs::write(&f, "new").unwrap();
    assert_eq!(changed(&mut rx).await, vec![f.clone()]);
    quiet(&mut rx, "after the recreation").await;
}

#[tokio::test]
async fn watcher_ignores_unwatched_files_in_the_same_directory() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("tokenwarden.toml");
    let other = dir.path().join("app.token");
    std::fs::write(&f, "a").unwrap();
    let (_w, mut rx) = watch(&[&f]);
    std::fs::write(&other, "x").unwrap();
    replace_atomically(&other, "y");
    std::fs::remove_file(&other).unwrap();
    quiet(&mut rx, "an unwatched file").await;
    std::fs::write(&f, "b").unwrap();
    assert_eq!(changed(&mut rx).await, vec![f.clone()]);
}

#[tokio::test]
async fn watcher_set_paths_adds_and_drops_files() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = d1.path().join("a.toml");
    let b = d2.path().join("b.secret");
    std::fs::write(&a, "a").unwrap();
    std::fs::write(&b, "b").unwrap();
    let (w, mut rx) = watch(&[&a]);
    std::fs::write(&b, "b2").unwrap();
    quiet(&mut rx, "a file not yet watched").await;
    w.set_paths(vec![a.clone(), b.clone()]).unwrap();
    // What `b` held when it was added is the baseline: no event for it by itself.
    quiet(&mut rx, "set_paths").await;
    std::fs::write(&b, "b3").unwrap();
    assert_eq!(changed(&mut rx).await, vec![b.clone()]);
    w.set_paths(vec![b.clone()]).unwrap();
    std::fs::write(&a, "a2").unwrap();
    quiet(&mut rx, "a dropped file").await;
    replace_atomically(&b, "b4");
    assert_eq!(changed(&mut rx).await, vec![b.clone()]);
}

#[tokio::test]
async fn watcher_sees_a_file_whose_directory_is_created_later() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("conf.d/deeper/client.toml");
    let (_w, mut rx) = watch(&[&f]);
    std::fs::create_dir_all(f.parent().unwrap()).unwrap();
    std::fs::write(&f, "x").unwrap();
    assert_eq!(changed(&mut rx).await, vec![f.clone()]);
    // The watch moved down to the new directory.
    replace_atomically(&f, "y");
    assert_eq!(changed(&mut rx).await, vec![f.clone()]);
    // A path that disappears is not reported (a reload would only fail on it); when it comes
    // back, it is.
    std::fs::remove_dir_all(dir.path().join("conf.d")).unwrap();
    quiet(&mut rx, "a deleted directory").await;
    std::fs::create_dir_all(f.parent().unwrap()).unwrap();
    std::fs::write(&f, "y").unwrap();
    assert_eq!(changed(&mut rx).await, vec![f.clone()]);
}

// === systemd ===

/// The demo config with Transatel's token URL on another provider (`bad`).
fn transatel_on(env: &DemoEnv, bad: &Provider, extra: &str) {
    let url = env.provider.token_url(Dialect::Transatel);
    let bad_url = bad.token_url(Dialect::Transatel);
    env.edit_config(|t| {
        t.replacen(&format!("\"{url}\""), &format!("\"{bad_url}\""), 1)
            .replacen(TRANSATEL_GRANT, &format!("{TRANSATEL_GRANT}{extra}"), 1)
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_comes_with_a_failing_client_and_sigterm_stops_within_5s() {
    let env = DemoEnv::start(LONG).await;
    let bad = Provider::start().await.unwrap();
    bad.set_fault(Some(Fault::ServerError));
    transatel_on(&env, &bad, "");
    let (mut daemon, notify, ready) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    assert!(ready.contains("STATUS=4/5 clients valid"), "{ready}");
    assert!(!bad.requests().is_empty());
    let ids = [
        CREADS_ID,
        TALENTSOFT_APP_ID,
        TALENTSOFT_USER_ID,
        TALKDESK_ID,
    ];
    assert_eq!(counts(&env.provider), each(&ids, 1));
    assert_eq!(count_msgs(&notify, "READY=1"), 1);

    // It keeps retrying; SIGTERM while a request hangs (10 s timeout) still exits 0 within 5 s.
    bad.set_fault(Some(Fault::Hang));
    let n = bad.requests().len();
    wait_for("a retry that hangs", Duration::from_secs(15), || {
        bad.requests().len() > n
    })
    .await;
    let t = Instant::now();
    daemon.stop().await;
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    notify.wait_for("STOPPING=1", Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_waits_until_a_hanging_first_attempt_has_failed() {
    let env = DemoEnv::start(LONG).await;
    let bad = Provider::start().await.unwrap();
    bad.fault_next(Fault::Hang, 1);
    bad.set_fault(Some(Fault::ServerError));
    transatel_on(&env, &bad, "timeout = \"3s\"\n");
    let notify = NotifySocket::bind();
    let daemon = DaemonProc::start(
        &env.demo.config,
        &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())],
    );
    let mut first_request = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = loop {
        if first_request.is_none() && !bad.requests().is_empty() {
            first_request = Some(Instant::now());
        }
        if let Some(m) = notify
            .messages()
            .into_iter()
            .find(|m| m.contains("READY=1"))
        {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "no READY=1; logs:\n{}",
            daemon.logs()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let waited = first_request
        .expect("READY=1 before transatel's first request")
        .elapsed();
    assert!(
        waited >= Duration::from_millis(2500),
        "READY=1 only {waited:?} after a first request that hangs for 3 s"
    );
    assert!(ready.contains("STATUS=4/5 clients valid"), "{ready}");
    let ids = [
        CREADS_ID,
        TALENTSOFT_APP_ID,
        TALENTSOFT_USER_ID,
        TALKDESK_ID,
    ];
    assert_eq!(counts(&env.provider), each(&ids, 1));
    let rig = Rig {
        env,
        notify,
        daemon,
    };
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watchdog_pings_only_when_asked() {
    let with = Rig::start_with(|_| {}, &[("WATCHDOG_USEC", "200000")]).await;
    let without = Rig::start().await;
    // Half of WATCHDOG_USEC: a ping every 100 ms.
    let n = count_msgs(&with.notify, "WATCHDOG=1");
    let t = Instant::now();
    wait_for("5 more watchdog pings", Duration::from_secs(5), || {
        count_msgs(&with.notify, "WATCHDOG=1") >= n + 5
    })
    .await;
    let took = t.elapsed();
    println!("5 WATCHDOG=1 in {took:?} (every 100 ms)");
    assert!(took >= Duration::from_millis(350), "{took:?}");
    tokio::time::sleep(WATCH_QUIET).await;
    assert_eq!(count_msgs(&without.notify, "WATCHDOG=1"), 0);
    with.stop().await;
    without.stop().await;
}

// === rotate_cron ===

#[tokio::test(flavor = "multi_thread")]
async fn rotate_cron_renews_one_client_until_it_is_removed() {
    let line = "rotate_cron = \"*/2 * * * * *\"\n";
    let rig = Rig::start_with(
        |env| {
            env.edit_config(|t| t.replacen(TRANSATEL_GRANT, &format!("{TRANSATEL_GRANT}{line}"), 1))
        },
        &[],
    )
    .await;
    let before = rig.counts();
    let t = Instant::now();
    rig.wait_requests(&before, &each(&[TRANSATEL_ID], 3)).await;
    let took = t.elapsed();
    println!("3 rotations in {took:?}");
    // Three ticks 2 s apart span at least 4 s (ticks may land up to ~0.5 s late).
    assert!(
        (Duration::from_millis(3500)..Duration::from_secs(9)).contains(&took),
        "{took:?}"
    );
    assert_eq!(delta(&before, &rig.counts()), each(&[TRANSATEL_ID], 3));

    rig.save(&rig.config().replace(line, ""));
    rig.wait_lines("reloaded", 1).await;
    let at_reload = rig.counts();
    // A tick that fired just before the reload may still be served, once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rig.counts();
    let late = delta(&at_reload, &after);
    assert!(
        late.is_empty() || late == each(&[TRANSATEL_ID], 1),
        "{late:?}"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        delta(&after, &rig.counts()),
        Counts::new(),
        "rotations after rotate_cron was removed"
    );
    rig.stop().await;
}

// === a request in flight when its client's identity changes ===

/// A TCP proxy in front of the provider that can hold back the next response for a while
/// (the provider itself only answers at once or never).
struct SlowProxy {
    addr: std::net::SocketAddr,
    /// Delay, in milliseconds, for the next response chunk (0: none).
    delay_next: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Delayed responses passed on so far.
    delivered: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowProxy {
    async fn start(upstream: std::net::SocketAddr) -> SlowProxy {
        use std::sync::atomic::{AtomicU64, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let delay_next = std::sync::Arc::new(AtomicU64::new(0));
        let delay = delay_next.clone();
        let delivered = std::sync::Arc::new(AtomicU64::new(0));
        let done = delivered.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    let _ = sw.shutdown().await;
                });
                let delay = delay.clone();
                let done = done.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = sr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let ms = delay.swap(0, Ordering::SeqCst);
                        if ms > 0 {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        if ms > 0 {
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    let _ = cw.shutdown().await;
                });
            }
        });
        SlowProxy {
            addr,
            delay_next,
            delivered,
            task,
        }
    }

    fn delay_next_response(&self, d: Duration) {
        self.delay_next
            .store(d.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_response_for_the_old_identity_arriving_after_a_reload_is_not_published() {
    let env = DemoEnv::start(LONG).await;
    let proxy = SlowProxy::start(env.provider.addr()).await;
    let direct = env.provider.token_url(Dialect::Transatel);
    let proxied = direct.replace(&env.provider.addr().to_string(), &proxy.addr.to_string());
    env.edit_config(|t| t.replacen(&format!("\"{direct}\""), &format!("\"{proxied}\""), 1));
    let (daemon, notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    let rig = Rig {
        env,
        notify,
        daemon,
    };
    let before = rig.counts();

    // A refresh whose answer takes 3 s…
    proxy.delay_next_response(Duration::from_secs(3));
    rig.daemon.signal(Signal::SIGUSR1);
    rig.wait_requests(&before, &each(&[TRANSATEL_ID], 1)).await;
    // …while the scope changes: the new identity's token lands first.
    rig.save(
        &rig.config()
            .replace(TRANSATEL_SCOPE, r#"scope = ["USER_READ"]"#),
    );
    let json_out = rig.env.out("transatel.json");
    let scope = |p: &Path| {
        serde_json::from_str::<serde_json::Value>(&read(p)).unwrap()["scope"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    wait_for("the new scope's token", SOON, || {
        scope(&json_out) == "USER_READ"
    })
    .await;
    // Then the old identity's answer arrives: it must not replace the new token.
    wait_for("the held-back answer", SOON, || {
        proxy.delivered.load(std::sync::atomic::Ordering::SeqCst) > 0
    })
    .await;
    tokio::time::sleep(QUIET).await;
    let json: serde_json::Value = serde_json::from_str(&read(&json_out)).unwrap();
    assert_eq!(json["scope"], "USER_READ", "{}", rig.daemon.logs());
    assert_eq!(read(&rig.env.out("transatel.token")), json_token(&json_out));
    rig.stop().await;
}

/// At trace level, serving every gRPC call and reloading a rotated secret logs no secret: not
/// the client secret before or after, no token handed out over gRPC, nothing the provider
/// received.
#[tokio::test(flavor = "multi_thread")]
async fn trace_logs_of_grpc_calls_and_a_secret_rotation_hold_no_secret() {
    use tokenwarden::grpc::pb;
    let env = DemoEnv::start(LONG).await;
    env.edit_config(|t| t.replacen("log_level = \"info\"", "log_level = \"trace\"", 1));
    let (mut daemon, _notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    let mut c = tokenwarden::client::connect(&env.demo.socket)
        .await
        .unwrap();
    let mut handed_out = Vec::new();
    for name in &env.demo.clients {
        let get = pb::GetTokenRequest {
            client: name.clone(),
            min_valid_for: None,
        };
        handed_out.push(c.get_token(get).await.unwrap().into_inner().access_token);
        let refresh = pb::RefreshTokenRequest {
            client: name.clone(),
        };
        handed_out.push(
            c.refresh_token(refresh)
                .await
                .unwrap()
                .into_inner()
                .access_token,
        );
    }
    c.list_clients(pb::ListClientsRequest {}).await.unwrap();
    let mut watch = c
        .watch_token(pb::WatchTokenRequest {
            client: "transatel".into(),
        })
        .await
        .unwrap()
        .into_inner();
    handed_out.push(watch.message().await.unwrap().unwrap().access_token);

    // The Talentsoft app's secret rotated at the provider and in its file.
    let old_secret = env.secret("talentsoft");
    let secret = uuid::Uuid::new_v4().simple().to_string();
    env.provider
        .register(RegisteredClient::talentsoft_app(TALENTSOFT_APP_ID, &secret).with_lifetime(LONG));
    let issued = env.provider.issued(TALENTSOFT_APP_ID);
    replace_atomically(&env.demo.dir.join("secrets/talentsoft"), &secret);
    wait_for("a token with the new secret", SOON, || {
        env.provider.issued(TALENTSOFT_APP_ID) > issued
            && daemon.logs().contains("client_secret: new value")
    })
    .await;
    let get = pb::GetTokenRequest {
        client: "talentsoft-app".into(),
        min_valid_for: None,
    };
    handed_out.push(c.get_token(get).await.unwrap().into_inner().access_token);
    drop(watch);
    daemon.stop().await;

    let logs = daemon.logs();
    for needle in ["TRACE", "reloaded"] {
        assert!(logs.contains(needle), "no {needle:?} in the logs:\n{logs}");
    }
    let secrets =
        crate::support::secret_material(&env, handed_out.into_iter().chain([old_secret, secret]));
    assert!(secrets.len() > 20, "{}", secrets.len());
    for s in &secrets {
        assert!(
            !logs.contains(s.as_str()),
            "secret material in the logs: {}…",
            &s[..6]
        );
    }
}

/// A notify socket nobody reads (a stalled service manager), its receive queue filled up front.
fn full_notify_socket(dir: &Path) -> (PathBuf, std::os::unix::net::UnixDatagram) {
    let path = dir.join("stalled-notify.sock");
    let reader = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    reader.set_nonblocking(true).unwrap();
    let filler = std::os::unix::net::UnixDatagram::unbound().unwrap();
    filler.set_nonblocking(true).unwrap();
    let mut queued = 0;
    while filler.send_to(b"filler", &path).is_ok() {
        queued += 1;
    }
    assert!(queued > 0 && queued < 100_000, "{queued} datagrams queued");
    (path, reader)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_notify_socket_blocks_neither_reloads_nor_sigterm() {
    let env = DemoEnv::start(LONG).await;
    let dir = tempfile::tempdir().unwrap();
    let (path, reader) = full_notify_socket(dir.path());
    let mut daemon = DaemonProc::start(
        &env.demo.config,
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    daemon
        .wait_log("ready: 5/5 clients valid", READY_WITHIN)
        .await;
    daemon.signal(Signal::SIGHUP);
    daemon.wait_log("reloaded", SOON).await;

    // Once systemd reads again, READY=1, RELOADING=1 and READY=1 arrive, in that order.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    wait_for("READY, RELOADING, READY", SOON, || {
        while let Ok(n) = reader.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            if m.contains("READY=1") || m.contains("RELOADING=1") {
                got.push(m);
            }
        }
        got.len() >= 3
    })
    .await;
    assert!(got[0].starts_with("READY=1\nSTATUS=5/5"), "{got:?}");
    assert!(got[1].starts_with("RELOADING=1\n"), "{got:?}");
    assert!(got[2].starts_with("READY=1\n"), "{got:?}");

    // Full again: SIGTERM still exits 0 promptly.
    let filler = std::os::unix::net::UnixDatagram::unbound().unwrap();
    filler.set_nonblocking(true).unwrap();
    while filler.send_to(b"filler", &path).is_ok() {}
    let t = Instant::now();
    daemon.stop().await;
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}
