//! `tokenwarden demo` (docs/cli.md#demo): the real token engine against the built-in provider on
//! loopback, one client of each seed dialect, in a fresh directory, with short lifetimes.
//!
//! [`setup`] writes the secrets, the keys and a config for a running [`Provider`]; the
//! integration tests use it too, so the demo's config is exercised on every test run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::keys::{self, SigningAlg};
use crate::provider::{
    Dialect, ExchangeAuth, ExchangeClient, Provider, RegisteredClient, TalkdeskRegion,
};

/// Client ids and secrets the demo registers. They protect nothing: the provider lives on
/// loopback for the length of the demo.
pub const TRANSATEL_ID: &str = "demo-transatel";
pub const CREADS_ID: &str = "demo-creads";
pub const CREADS_USER: &str = "jean.dupont@example.com";
pub const TALENTSOFT_APP_ID: &str = "demo-talentsoft-app";
pub const TALENTSOFT_USER_ID: &str = "demo-talentsoft-user";
pub const TALENTSOFT_AUDIENCE: &str = "https://api.talentsoft.example";
pub const TALKDESK_ID: &str = "demo-talkdesk";
pub const TALKDESK_KID: &str = "demo-key-1";
/// The secretless client: RFC 8693 token exchange of the Transatel client's token.
pub const EXCHANGE_ID: &str = "demo-exchange";
/// The audience it asks its token for.
pub const EXCHANGE_AUDIENCE: &str = "https://api.demo.example";

/// What [`setup`] made.
#[derive(Debug, Clone)]
pub struct DemoSetup {
    /// The working directory.
    pub dir: PathBuf,
    /// The config file.
    pub config: PathBuf,
    /// Where the token files go.
    pub out_dir: PathBuf,
    /// The state directory.
    pub state_dir: PathBuf,
    /// The gRPC socket (`daemon.socket`).
    pub socket: PathBuf,
    /// The client names in the config.
    pub clients: Vec<String>,
    /// The public half of the Talkdesk client's key (to verify its assertions).
    pub talkdesk_public_key: String,
}

/// Registers one client per seed dialect with `provider` (tokens living `lifetime`) and writes
/// their secrets, a private key and a config under `dir`.
pub fn setup(dir: &Path, provider: &Provider, lifetime: Duration) -> Result<DemoSetup, String> {
    let io = |what: &str, e: std::io::Error| format!("cannot write {what}: {e}");
    let secrets = dir.join("secrets");
    let out_dir = dir.join("out");
    let state_dir = dir.join("state");
    let socket = dir.join("tokenwarden.sock");
    std::fs::create_dir_all(&secrets).map_err(|e| io("the secrets directory", e))?;
    set_mode(&secrets, 0o700).map_err(|e| io("the secrets directory", e))?;
    let write_secret = |name: &str, value: &str| -> Result<PathBuf, String> {
        let p = secrets.join(name);
        std::fs::write(&p, value).map_err(|e| io(name, e))?;
        set_mode(&p, 0o600).map_err(|e| io(name, e))?;
        Ok(p)
    };
    let random = || uuid::Uuid::new_v4().simple().to_string();

    let transatel_secret = random();
    let creads_secret = random();
    let creads_password = random();
    let talentsoft_secret = random();
    let talentsoft_user_secret = random();
    let (talkdesk_private, talkdesk_public) =
        keys::generate_es256().map_err(|e| format!("cannot make the demo key: {e}"))?;

    provider.register(
        RegisteredClient::transatel(TRANSATEL_ID, &transatel_secret).with_lifetime(lifetime),
    );
    provider.register(
        RegisteredClient::creads(CREADS_ID, &creads_secret, CREADS_USER, &creads_password)
            .with_lifetime(lifetime),
    );
    provider.register(
        RegisteredClient::talentsoft_app(TALENTSOFT_APP_ID, &talentsoft_secret)
            .with_lifetime(lifetime),
    );
    provider.register(
        RegisteredClient::talentsoft_user(
            TALENTSOFT_USER_ID,
            &talentsoft_user_secret,
            TALENTSOFT_AUDIENCE,
        )
        .with_lifetime(lifetime),
    );
    provider.register(
        RegisteredClient::talkdesk(
            TALKDESK_ID,
            &talkdesk_public.clone(),
            Some(TALKDESK_KID),
            SigningAlg::ES256,
        )
        .with_lifetime(lifetime),
    );

    let p = |name: &str, v: &str| write_secret(name, v);
    let transatel_file = p("transatel", &transatel_secret)?;
    let creads_file = p("creads", &creads_secret)?;
    let creads_password_file = p("creads-password", &creads_password)?;
    let talentsoft_file = p("talentsoft", &talentsoft_secret)?;
    let talentsoft_user_file = p("talentsoft-user", &talentsoft_user_secret)?;
    let talkdesk_key = p("talkdesk.pem", &talkdesk_private)?;

    let q = |p: &Path| toml_string(&p.display().to_string());
    let out = |name: &str| q(&out_dir.join(name));
    let mut toml = String::new();
    let _ = write!(
        toml,
        r#"# Written by `tokenwarden demo`: one client of each seed provider style, all served by the
# built-in provider on {base}.

[daemon]
state_dir = {state}
socket = {socket}
log_level = "info"

[defaults]
refresh_margin = "5s"
min_interval = "2s"
retry_initial = "1s"
retry_max = "10s"

# Transatel: client_credentials, HTTP Basic; the access token is itself a JWT.
[clients.transatel]
token_url = {transatel_url}
grant_type = "client_credentials"
client_id = "{TRANSATEL_ID}"
client_secret = {{ file = {transatel_file} }}
scope = ["CATALOG_PRODUCTS_READ", "USER_READ"]
[[clients.transatel.outputs]]
path = {transatel_out}
format = "token"
[[clients.transatel.outputs]]
path = {transatel_json}
format = "json"

# Creads Partners: password grant, then rotating refresh tokens; scope "files".
[clients.creads-files]
token_url = {creads_url}
grant_type = "password"
client_id = "{CREADS_ID}"
client_secret = {{ file = {creads_file} }}
username = "{CREADS_USER}"
password = {{ file = {creads_password_file} }}
scope = "files"
[[clients.creads-files.outputs]]
path = {creads_out}
format = "header"

# Talentsoft application: client_secret_post; expires_in arrives as a string.
[clients.talentsoft-app]
token_url = {talentsoft_url}
client_auth = "client_secret_post"
client_id = "{TALENTSOFT_APP_ID}"
client_secret = {{ file = {talentsoft_file} }}
[[clients.talentsoft-app.outputs]]
path = {talentsoft_out}
format = "env"
env_prefix = "TS_"

# Talentsoft user: RFC 7523 jwt-bearer grant, HS256 assertion signed with the client secret.
[clients.talentsoft-user]
token_url = {talentsoft_url}
grant_type = "jwt_bearer"
client_id = "{TALENTSOFT_USER_ID}"
[clients.talentsoft-user.assertion]
signing_alg = "HS256"
key = {{ file = {talentsoft_user_file} }}
lifetime = "5m"
claims = {{ iss = "{TALENTSOFT_USER_ID}", sub = "TalentSoftMarketPlace", aud = "{TALENTSOFT_AUDIENCE}", email = "jean.dupont@example.com", name = "Jean Dupont" }}
[[clients.talentsoft-user.outputs]]
path = {talentsoft_user_out}
format = "json"

# Talkdesk: private_key_jwt with an ES256 key and its kid (EU region URL).
[clients.talkdesk]
token_url = {talkdesk_url}
client_auth = "private_key_jwt"
client_id = "{TALKDESK_ID}"
private_key = {{ file = {talkdesk_key} }}
key_id = "{TALKDESK_KID}"
signing_alg = "ES256"
assertion_lifetime = "5m"
[[clients.talkdesk.outputs]]
path = {talkdesk_out}
format = "token"
"#,
        base = provider.base_url(),
        state = q(&state_dir),
        socket = q(&socket),
        transatel_url = toml_string(&provider.token_url(Dialect::Transatel)),
        transatel_file = q(&transatel_file),
        transatel_out = out("transatel.token"),
        transatel_json = out("transatel.json"),
        creads_url = toml_string(&provider.token_url(Dialect::Creads)),
        creads_file = q(&creads_file),
        creads_password_file = q(&creads_password_file),
        creads_out = out("creads-files.header"),
        talentsoft_url = toml_string(&provider.token_url(Dialect::TalentsoftApp)),
        talentsoft_file = q(&talentsoft_file),
        talentsoft_out = out("talentsoft-app.env"),
        talentsoft_user_file = q(&talentsoft_user_file),
        talentsoft_user_out = out("talentsoft-user.json"),
        talkdesk_url = toml_string(&provider.talkdesk_token_url(TalkdeskRegion::Eu)),
        talkdesk_key = q(&talkdesk_key),
        talkdesk_out = out("talkdesk.token"),
    );
    let config = dir.join("tokenwarden.toml");
    std::fs::write(&config, toml).map_err(|e| io("the config", e))?;
    set_mode(&config, 0o600).map_err(|e| io("the config", e))?;
    Ok(DemoSetup {
        dir: dir.to_path_buf(),
        config,
        out_dir,
        state_dir,
        socket,
        clients: [
            "creads-files",
            "talentsoft-app",
            "talentsoft-user",
            "talkdesk",
            "transatel",
        ]
        .map(String::from)
        .to_vec(),
        talkdesk_public_key: talkdesk_public,
    })
}

/// Adds the demo's secretless client to a [`setup`]: `exchanged`, which holds no secret of its
/// own and gets its token by RFC 8693 token exchange of the `transatel` client's current token
/// (a new one each time that one rotates). Kept apart from [`setup`], whose five clients the
/// tests count on.
pub fn add_exchange(demo: &mut DemoSetup, provider: &Provider) -> Result<(), String> {
    let mut client = ExchangeClient::new(EXCHANGE_ID, ExchangeAuth::None);
    client.targets = vec![EXCHANGE_AUDIENCE.to_string()];
    provider.register_exchange(client);
    let toml = format!(
        r#"
# Secretless: no secret of its own; RFC 8693 token exchange of the transatel client's token,
# renewed whenever that one rotates.
[clients.exchanged]
token_url = {url}
grant_type = "token_exchange"
client_auth = "none"
client_id = "{EXCHANGE_ID}"
subject_token = {{ client = "transatel" }}
audience = "{EXCHANGE_AUDIENCE}"
[[clients.exchanged.outputs]]
path = {out}
format = "token"
"#,
        url = toml_string(&provider.exchange_url()),
        out = toml_string(&demo.out_dir.join("exchanged.token").display().to_string()),
    );
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&demo.config)
        .map_err(|e| format!("cannot write the config: {e}"))?;
    std::io::Write::write_all(&mut file, toml.as_bytes())
        .map_err(|e| format!("cannot write the config: {e}"))?;
    demo.clients.insert(0, "exchanged".to_string());
    Ok(())
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Runs the demo until Ctrl-C: sets up a directory, runs the real daemon on it, and prints
/// each new token as it lands.
pub async fn run(dir: Option<PathBuf>, lifetime: Duration) -> Result<(), String> {
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!(
            "tokenwarden-demo-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let provider = Provider::start()
        .await
        .map_err(|e| format!("cannot start the demo provider: {e}"))?;
    let mut demo = setup(&dir, &provider, lifetime)?;
    add_exchange(&mut demo, &provider)?;
    let config = crate::config::load(&demo.config).map_err(|e| e.to_string())?;
    let daemon = crate::daemon::Daemon::start(config, None)
        .await
        .map_err(|e| e.to_string())?;
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "tokenwarden".into());
    println!("tokenwarden demo: the real daemon against a built-in provider on loopback");
    println!(
        "  provider:    {} (speaks the five seed dialects and RFC 8693 token exchange)",
        provider.base_url()
    );
    println!("  directory:   {}", demo.dir.display());
    println!("  config:      {}", demo.config.display());
    println!("  token files: {}", demo.out_dir.display());
    println!("  socket:      {}", demo.socket.display());
    println!(
        "  lifetime:    {} (refreshed ahead of expiry)",
        humantime::format_duration(lifetime)
    );
    println!();
    println!("Try, in another terminal:");
    println!("  cat {}", demo.out_dir.join("transatel.token").display());
    println!(
        "  cat {}    # secretless: exchanged from transatel's",
        demo.out_dir.join("exchanged.token").display()
    );
    println!(
        "  cat {}",
        demo.out_dir.join("talentsoft-app.env").display()
    );
    println!("  {exe} status -s {}", demo.socket.display());
    println!("  {exe} get transatel -s {}", demo.socket.display());
    println!("  {exe} refresh creads-files -s {}", demo.socket.display());
    println!("  {exe} check -c {}", demo.config.display());
    println!(
        "  kill -HUP {}    # reload; kill -USR1 refreshes every client",
        std::process::id()
    );
    println!();
    println!("Ctrl-C stops. New tokens as they land:");
    let store = daemon.store();
    let printer = tokio::spawn(async move {
        let mut seen: std::collections::HashMap<String, (u64, Option<String>)> =
            std::collections::HashMap::new();
        loop {
            let now = std::time::SystemTime::now();
            for (name, snap) in store.snapshots() {
                let key = (snap.generation, snap.last_error.clone());
                if seen.get(&name) == Some(&key) {
                    continue;
                }
                seen.insert(name.clone(), key);
                let stamp = humantime::format_rfc3339_seconds(now);
                match (&snap.token, &snap.last_error) {
                    (_, Some(e)) => {
                        println!("{stamp}  {name:16} {}  {e}", snap.state_at(now).as_str())
                    }
                    (Some(t), None) => println!(
                        "{stamp}  {name:16} token {}  generation {:<3} expires {}  next refresh {}",
                        t.fingerprint(),
                        snap.generation,
                        crate::token::rfc3339(t.expires_at),
                        snap.next_refresh_at
                            .map(crate::token::rfc3339)
                            .unwrap_or_else(|| "-".into()),
                    ),
                    (None, None) => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let result = daemon.run().await.map_err(|e| e.to_string());
    printer.abort();
    println!("stopped; files left in {}", demo.dir.display());
    result
}
