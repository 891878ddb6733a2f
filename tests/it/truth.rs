//! What an operator sees must be true (issue 11): an output that could not be written or state
//! that could not be saved shows in `status`, `status --json`, `ListClients`, `STATUS=` and
//! `/readyz` until it heals, and it heals by itself (a retry with backoff, no new token needed).

use std::path::Path;
use std::time::Duration;

use tokenwarden::provider::Dialect;

use crate::support::{DaemonProc, DemoEnv, NotifySocket, READY_WITHIN, read, run, wait_for};

/// Long enough that no scheduled refresh happens during a test.
const LONG: Duration = Duration::from_secs(600);
/// A failed write or save is retried within `retry_max` (2 s here), on a loaded machine.
const HEALS_WITHIN: Duration = Duration::from_secs(15);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The demo's config with a metrics listener on `port` and retries capped at 2 s.
fn configure(env: &DemoEnv, port: u16) {
    env.edit_config(|t| {
        let t = t
            .replace(
                "[daemon]",
                &format!("[daemon]\nmetrics_listen = \"127.0.0.1:{port}\""),
            )
            .replace("retry_max = \"10s\"", "retry_max = \"2s\"")
            .replace("min_interval = \"2s\"", "min_interval = \"0s\"");
        assert!(t.contains("retry_max = \"2s\"") && t.contains("min_interval = \"0s\""));
        t
    });
}

async fn readyz(port: u16) -> (u16, String) {
    let r = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// What every view says about one client: the `status` table's row, the `status --json` entry,
/// and `ListClients`'s (state name, last error).
struct Views {
    row: String,
    json: serde_json::Value,
    listed: (String, String),
}

async fn views(socket: &Path, client: &str) -> Views {
    let s = socket.to_str().unwrap();
    let table = run(&["status", "-s", s]).await;
    assert_eq!(table.code, 0, "{}", table.stderr);
    let row = table
        .stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(client))
        .unwrap_or_else(|| panic!("no row for {client}:\n{}", table.stdout))
        .to_string();
    let json = run(&["status", "-s", s, "--json"]).await;
    assert_eq!(json.code, 0, "{}", json.stderr);
    let all: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let json = all
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client"] == client)
        .unwrap()
        .clone();
    let listed = tokenwarden::client::list(socket)
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.client == client)
        .map(|c| {
            let state = tokenwarden::grpc::pb::State::try_from(c.state)
                .unwrap()
                .as_str_name()
                .to_string();
            (state, c.last_error)
        })
        .unwrap();
    Views { row, json, listed }
}

/// Every view calls `client` STALE with an error containing each of `needles`.
async fn assert_stale(socket: &Path, client: &str, needles: &[&str]) {
    let v = views(socket, client).await;
    assert_eq!(v.row.split_whitespace().nth(1), Some("STALE"), "{}", v.row);
    assert_eq!(v.json["state"], "STALE", "{}", v.json);
    assert_eq!(v.listed.0, "STALE");
    let json_error = v.json["last_error"].as_str().unwrap_or_default();
    for needle in needles {
        assert!(
            v.row.contains(needle),
            "{needle:?} not in the row: {}",
            v.row
        );
        assert!(json_error.contains(needle), "{needle:?} not in {}", v.json);
        assert!(
            v.listed.1.contains(needle),
            "{needle:?} not in {:?}",
            v.listed
        );
    }
}

/// Every view calls `client` VALID with no error.
async fn assert_valid(socket: &Path, client: &str) {
    let v = views(socket, client).await;
    assert_eq!(v.row.split_whitespace().nth(1), Some("VALID"), "{}", v.row);
    assert!(v.row.ends_with(" -"), "{}", v.row);
    assert_eq!(v.json["state"], "VALID", "{}", v.json);
    assert!(v.json["last_error"].is_null(), "{}", v.json);
    assert_eq!(v.listed, ("VALID".to_string(), String::new()));
}

async fn wait_ready(port: u16) {
    let deadline = std::time::Instant::now() + HEALS_WITHIN;
    loop {
        let (code, body) = readyz(port).await;
        if code == 200 {
            assert_eq!(body, "ready\n");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz still says {code} {body:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_output_that_cannot_be_written_shows_everywhere_until_it_is_written() {
    let env = DemoEnv::start(LONG).await;
    let port = free_port();
    configure(&env, port);
    // transatel.json goes under `sub`, which is a regular file: its writes fail.
    let sub = env.demo.out_dir.join("sub");
    let broken = sub.join("transatel.json");
    env.edit_config(|t| t.replace("/transatel.json\"", "/sub/transatel.json\""));
    std::fs::create_dir_all(&env.demo.out_dir).unwrap();
    std::fs::write(&sub, "not a directory").unwrap();
    let (mut daemon, notify, ready) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    let socket = env.demo.socket.clone();
    let path = broken.display().to_string();

    // The token itself is fine: READY=1 counts it valid, and says something is behind.
    assert!(ready.contains("5/5 clients valid"), "{ready}");
    assert!(
        ready.contains("1 with outputs not written or state not saved"),
        "{ready}"
    );
    let token = read(&env.out("transatel.token"));
    assert!(env.provider.token_is_live(&token));
    assert_stale(&socket, "transatel", &["cannot write", &path]).await;
    let (code, body) = readyz(port).await;
    assert_eq!(
        (code, body.as_str()),
        (503, "not ready: transatel (output not written)\n")
    );
    // Other clients are untouched by it.
    assert_valid(&socket, "talkdesk").await;
    // Logged, and retried on its own (not only at the next token).
    daemon.wait_log("retry_in=", Duration::from_secs(5)).await;
    let warned = |d: &DaemonProc| {
        d.logs()
            .lines()
            .filter(|l| l.contains(" WARN ") && l.contains(&path))
            .count()
    };
    wait_for("the failed write retried", HEALS_WITHIN, || {
        warned(&daemon) >= 2
    })
    .await;
    let requests = env.grants_at(Dialect::Transatel.path()).len();

    // Fixed: the next retry creates the directory and writes the current token.
    let table = run(&["status", "-s", socket.to_str().unwrap()])
        .await
        .stdout;
    println!("status while the output fails:\n{table}");
    std::fs::remove_file(&sub).unwrap();
    let fixed = std::time::Instant::now();
    wait_ready(port).await;
    println!("output path fixed -> /readyz ready: {:?}", fixed.elapsed());
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&read(&broken)).unwrap()["access_token"],
        token.as_str()
    );
    assert_valid(&socket, "transatel").await;
    assert_eq!(
        env.grants_at(Dialect::Transatel.path()).len(),
        requests,
        "healing needed no new token"
    );
    daemon
        .wait_log(
            "every output holds the current token again",
            Duration::from_secs(5),
        )
        .await;
    notify
        .wait_for("STATUS=5/5 clients valid\n", Duration::from_secs(5))
        .await;
    daemon.stop().await;
}

/// `unshare` and `mount` work here (root with CAP_SYS_ADMIN): a private mount namespace can
/// be made for the daemon.
fn can_mount() -> bool {
    std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .args(["sh", "-c", "mount -t tmpfs -o size=64k tw-probe /mnt"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `script` with `sh -c` in the mount namespace of `pid`.
fn in_namespace_of(pid: i32, script: &str) -> std::process::Output {
    std::process::Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "--", "sh", "-c", script])
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn state_that_cannot_be_saved_shows_everywhere_until_it_is_saved() {
    if !can_mount() {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs in a private mount namespace (needs root with CAP_SYS_ADMIN)"
        );
        return;
    }
    let env = DemoEnv::start(LONG).await;
    let port = free_port();
    configure(&env, port);
    // The daemon runs in its own mount namespace, with a small tmpfs as its state directory:
    // filling that tmpfs is a full disk for the state and for nothing else.
    let state = env.demo.state_dir.clone();
    std::fs::create_dir_all(&state).unwrap();
    let wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        "mount -t tmpfs -o size=256k,mode=0700 tw-state \"$1\" && shift && exec \"$@\"",
        "sh",
        state.to_str().unwrap(),
    ];
    let notify = NotifySocket::bind();
    let mut daemon = DaemonProc::start_wrapped(
        &wrapper,
        &env.demo.config,
        &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())],
    );
    let ready = notify.wait_for("READY=1", READY_WITHIN).await;
    assert!(ready.contains("5/5 clients valid"), "{ready}");
    wait_ready(port).await;
    let pid = daemon.pid();
    let socket = env.demo.socket.clone();
    let saved = |client: &str| {
        let out = in_namespace_of(pid, &format!("cat '{}/{client}.json'", state.display()));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let old = read(&env.out("transatel.token"));
    assert!(
        saved("transatel").contains(&old),
        "the state holds the first token"
    );

    // The disk fills up.
    let fill = format!("cat /dev/zero > '{}/fill'", state.display());
    let out = in_namespace_of(pid, &fill);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No space left"),
        "{out:?}"
    );
    let requests = env.grants_at(Dialect::Transatel.path()).len();
    let refresh = run(&["refresh", "transatel", "-s", socket.to_str().unwrap()]).await;
    assert_eq!(refresh.code, 1, "{}", refresh.stdout);
    assert!(
        refresh.stderr.contains("could not be saved"),
        "{}",
        refresh.stderr
    );
    assert_eq!(env.grants_at(Dialect::Transatel.path()).len(), requests + 1);

    // The new token is held back: the old one is still served and in the files, and every
    // view says the state is not saved.
    assert_stale(
        &socket,
        "transatel",
        &["cannot save state", "No space left"],
    )
    .await;
    let (code, body) = readyz(port).await;
    assert_eq!(
        (code, body.as_str()),
        (503, "not ready: transatel (state not saved)\n")
    );
    notify
        .wait_for(
            "1 with outputs not written or state not saved",
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(read(&env.out("transatel.token")), old);
    assert_valid(&socket, "talkdesk").await;

    // Space again: the next retry saves the held token (no new request) and publishes it.
    let out = in_namespace_of(pid, &format!("rm '{}/fill'", state.display()));
    assert!(out.status.success(), "{out:?}");
    let fixed = std::time::Instant::now();
    wait_ready(port).await;
    println!("space again -> /readyz ready: {:?}", fixed.elapsed());
    assert_valid(&socket, "transatel").await;
    let new = read(&env.out("transatel.token"));
    assert_ne!(new, old);
    assert!(env.provider.token_is_live(&new));
    assert!(
        saved("transatel").contains(&new),
        "the state holds the new token"
    );
    assert_eq!(
        env.grants_at(Dialect::Transatel.path()).len(),
        requests + 1,
        "saving the held token needed no new request"
    );
    daemon.stop().await;
}

// === reload logs ===

/// The reload lines of `logs` (a client changed, added or removed; the summary), each without
/// its timestamp, level and target, and the summary without its timings.
fn reload_lines(logs: &str) -> Vec<String> {
    logs.lines()
        .filter_map(|l| {
            let at = [
                "client changed ",
                "client added ",
                "client removed ",
                "reloaded ",
            ]
            .iter()
            .filter_map(|m| l.find(m))
            .min()?;
            let line = &l[at..];
            Some(match line.find(" load_ms=") {
                Some(cut) if line.starts_with("reloaded ") => line[..cut].to_string(),
                _ => line.to_string(),
            })
        })
        .collect()
}

/// Saves `text` as the config like an editor does (a temporary file renamed over it).
fn save(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The config text without the lines from `start` up to (not including) `next`.
fn without_section(text: &str, start: &str, next: &str) -> String {
    let a = text.find(start).unwrap();
    let b = text.find(next).unwrap();
    format!("{}{}", &text[..a], &text[b..])
}

/// A change made to the config text.
type Edit<'a> = Box<dyn Fn(String) -> String + 'a>;

#[tokio::test(flavor = "multi_thread")]
async fn each_reload_logs_what_changed_and_what_happens_once_per_client() {
    let env = DemoEnv::start(LONG).await;
    let (mut daemon, _notify, ready) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    assert!(ready.contains("5/5 clients valid"), "{ready}");
    let config = env.demo.config.clone();
    let url = env.provider.token_url(Dialect::Transatel);
    let moved = format!("{url}?tenant=2");
    let added = env.out("talkdesk.json");
    let transatel_requests = || env.grants_at(Dialect::Transatel.path()).len();

    // Each step: an edit, then the exact lines its reload logs.
    let steps: Vec<(&str, Edit<'_>, Vec<String>)> = vec![
        (
            "token_url",
            Box::new(|t: String| t.replacen(&url, &moved, 1)),
            vec![
                format!(
                    "client changed client=\"transatel\" changed=\"token_url: {url} -> {moved}\" action=\"new token requested now\""
                ),
                "reloaded added=0 removed=0 changed=1 unchanged=4".into(),
            ],
        ),
        (
            "scope",
            Box::new(|t: String| {
                t.replace(
                    "scope = [\"CATALOG_PRODUCTS_READ\", \"USER_READ\"]",
                    "scope = [\"CATALOG_PRODUCTS_READ\"]",
                )
            }),
            vec![
                "client changed client=\"transatel\" changed=\"scope: [CATALOG_PRODUCTS_READ USER_READ] -> [CATALOG_PRODUCTS_READ]\" action=\"new token requested now\"".into(),
                "reloaded added=0 removed=0 changed=1 unchanged=4".into(),
            ],
        ),
        (
            "output added",
            Box::new(move |t: String| {
                t + &format!(
                    "[[clients.talkdesk.outputs]]\npath = \"{}\"\nformat = \"json\"\n",
                    added.display()
                )
            }),
            vec![
                format!(
                    "client changed client=\"talkdesk\" changed=\"outputs: +{}\" action=\"current token written to the outputs; schedule kept, no new token\"",
                    env.out("talkdesk.json").display()
                ),
                "reloaded added=0 removed=0 changed=1 unchanged=4".into(),
            ],
        ),
        (
            "output removed",
            Box::new(|t: String| {
                let at = t.rfind("[[clients.talkdesk.outputs]]").unwrap();
                t[..at].to_string()
            }),
            vec![
                format!(
                    "client changed client=\"talkdesk\" changed=\"outputs: -{}\" action=\"current token written to the outputs; schedule kept, no new token\"",
                    env.out("talkdesk.json").display()
                ),
                "reloaded added=0 removed=0 changed=1 unchanged=4".into(),
            ],
        ),
        (
            "allow_users",
            Box::new(|t: String| {
                t.replace(
                    "client_id = \"demo-transatel\"",
                    "client_id = \"demo-transatel\"\nallow_users = [\"65534\"]",
                )
            }),
            vec![
                "client changed client=\"transatel\" changed=\"allow_users: [] -> [65534]\" action=\"applied; schedule kept, no new token\"".into(),
                "reloaded added=0 removed=0 changed=1 unchanged=4".into(),
            ],
        ),
        (
            "timing",
            Box::new(|t: String| {
                t.replace(
                    "client_id = \"demo-transatel\"",
                    "client_id = \"demo-transatel\"\nretry_max = \"20s\"",
                )
            }),
            vec![
                "client changed client=\"transatel\" changed=\"retry_max: 10s -> 20s\" action=\"applied; next refresh planned again, no new token\"".into(),
                "reloaded added=0 removed=0 changed=1 unchanged=4".into(),
            ],
        ),
        (
            "client removed",
            Box::new(|t: String| without_section(&t, "# Talentsoft user:", "# Talkdesk:")),
            vec![
                "client removed client=\"talentsoft-user\" action=\"stopped; its files are left in place\"".into(),
                "reloaded added=0 removed=1 changed=0 unchanged=4".into(),
            ],
        ),
    ];
    let original = read(&config);
    let next_refresh = |list: Vec<tokenwarden::grpc::pb::ClientStatus>, client: &str| {
        list.into_iter()
            .find(|c| c.client == client)
            .and_then(|c| c.next_refresh_at)
    };
    let socket = env.demo.socket.clone();
    let talkdesk_next = next_refresh(
        tokenwarden::client::list(&socket).await.unwrap(),
        "talkdesk",
    );
    assert!(talkdesk_next.is_some());
    let mut seen = 0;
    for (what, edit, want) in &steps {
        let before = read(&config);
        let after = edit(before.clone());
        assert_ne!(before, after, "{what}: the edit changed nothing");
        let requests = transatel_requests();
        save(&config, &after);
        wait_for(
            &format!("the reload of {what}"),
            Duration::from_secs(10),
            || {
                reload_lines(&daemon.logs())
                    .iter()
                    .filter(|l| l.starts_with("reloaded "))
                    .count()
                    > seen
            },
        )
        .await;
        let lines = reload_lines(&daemon.logs());
        let from = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.starts_with("reloaded "))
            .nth(seen)
            .map(|(i, _)| i)
            .unwrap();
        let start = lines[..from]
            .iter()
            .rposition(|l| l.starts_with("reloaded "))
            .map_or(0, |i| i + 1);
        assert_eq!(&lines[start..=from], want.as_slice(), "{what}");
        seen += 1;
        if want[0].contains("new token requested now") {
            wait_for(
                &format!("{what}: a new token"),
                Duration::from_secs(10),
                || transatel_requests() > requests,
            )
            .await;
        }
    }
    // "schedule kept" is true: two output changes left talkdesk's planned refresh alone.
    assert_eq!(
        next_refresh(
            tokenwarden::client::list(&socket).await.unwrap(),
            "talkdesk"
        ),
        talkdesk_next
    );
    // The removed client is added back.
    let section = &original
        [original.find("# Talentsoft user:").unwrap()..original.find("# Talkdesk:").unwrap()];
    save(
        &config,
        &read(&config).replace("# Talkdesk:", &format!("{section}# Talkdesk:")),
    );
    wait_for(
        "the reload adding a client",
        Duration::from_secs(10),
        || {
            reload_lines(&daemon.logs())
                .iter()
                .filter(|l| l.starts_with("reloaded "))
                .count()
                > seen
        },
    )
    .await;
    let lines = reload_lines(&daemon.logs());
    assert_eq!(
        &lines[lines.len() - 2..],
        [
            "client added client=\"talentsoft-user\" action=\"started: a stored token still good is reused, else one is requested now\"".to_string(),
            "reloaded added=1 removed=0 changed=0 unchanged=4".to_string(),
        ]
    );
    let logs = daemon.logs();
    assert!(
        !logs.contains("(Renew)") && !logs.contains("(Outputs)"),
        "{logs}"
    );
    for secret in crate::support::secret_material(&env, []) {
        assert!(!logs.contains(&secret), "a secret in the logs");
    }
    daemon.stop().await;
}

// === debug log of token requests ===

/// The `token request` lines of `logs`, from the message on.
fn request_lines(logs: &str) -> Vec<&str> {
    logs.lines()
        .filter_map(|l| l.find("token request").map(|at| &l[at..]))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn debug_logs_name_each_token_request_and_never_a_secret() {
    let env = DemoEnv::start(LONG).await;
    let config = env.config_path().to_string();
    let once = run(&["once", "-c", &config, "--log-level", "debug"]).await;
    assert_eq!(once.code, 0, "{}", once.stderr);
    let lines = request_lines(&once.stderr);
    // (client, grant, client authentication) of the demo's five clients.
    let cases = [
        ("transatel", "client_credentials", "client_secret_basic"),
        ("creads-files", "password", "client_secret_basic"),
        ("talentsoft-app", "client_credentials", "client_secret_post"),
        (
            "talentsoft-user",
            "urn:ietf:params:oauth:grant-type:jwt-bearer",
            "none",
        ),
        ("talkdesk", "client_credentials", "private_key_jwt"),
    ];
    let parsed = env.config();
    for (client, grant, auth) in cases {
        let url = parsed.clients[client].token_url.as_str();
        let want = format!(
            "token request client=\"{client}\" method=\"POST\" url=\"{url}\" grant=\"{grant}\" client_auth=\"{auth}\" proxy=\"none\" status=200 duration_ms="
        );
        assert!(
            lines.iter().any(|l| l.starts_with(&want)),
            "no {want:?} in:\n{}",
            lines.join("\n")
        );
    }
    assert_eq!(lines.len(), 5, "{}", lines.join("\n"));
    let tokens: Vec<String> = std::fs::read_dir(&env.demo.out_dir)
        .unwrap()
        .map(|e| read(&e.unwrap().path()))
        .collect();

    // Nothing listens: the line says so.
    let closed = free_port();
    let refused = format!("http://127.0.0.1:{closed}/oauth/token");
    env.edit_config(|t| t.replacen(&env.provider.token_url(Dialect::Transatel), &refused, 1));
    let failed = run(&["once", "-c", &config, "--log-level", "debug", "transatel"]).await;
    assert_eq!(failed.code, 1, "{}", failed.stderr);
    let lines = request_lines(&failed.stderr);
    let want = format!(
        "token request got no answer client=\"transatel\" method=\"POST\" url=\"{refused}\" grant=\"client_credentials\" client_auth=\"client_secret_basic\" proxy=\"none\" error=\""
    );
    assert!(
        lines.len() == 1 && lines[0].starts_with(&want) && lines[0].contains("refused"),
        "no {want:?} … refused in:\n{}",
        failed.stderr
    );
    for secret in crate::support::secret_material(&env, tokens) {
        assert!(!once.stderr.contains(&secret), "a secret in the debug log");
        assert!(
            !failed.stderr.contains(&secret),
            "a secret in the debug log"
        );
    }
}

/// Every token-request error names the token URL, the grant and the client authentication
/// method, so an operator with many clients knows which endpoint failed; never a secret.
#[tokio::test(flavor = "multi_thread")]
async fn token_request_errors_name_the_endpoint_grant_and_client_auth() {
    let env = DemoEnv::start(LONG).await;
    let config = env.config_path().to_string();

    // Nothing listens on the port: a refused connection.
    let closed = free_port();
    let refused = format!("http://127.0.0.1:{closed}/oauth/token");
    env.edit_config(|t| t.replacen(&env.provider.token_url(Dialect::Transatel), &refused, 1));
    let refused_run = run(&["once", "-c", &config, "transatel"]).await;
    assert_eq!(refused_run.code, 1, "{}", refused_run.stderr);
    let line = refused_run
        .stderr
        .lines()
        .find(|l| l.starts_with("transatel: cannot connect to the token endpoint"))
        .unwrap_or_else(|| panic!("no connect error in:\n{}", refused_run.stderr));
    assert!(
        line.ends_with(&format!(
            "(token_url {refused}, grant_type client_credentials, client_auth client_secret_basic)"
        )),
        "{line}"
    );

    // An endpoint that accepts the request and never answers: the client's timeout.
    env.provider
        .set_fault(Some(tokenwarden::provider::Fault::Hang));
    env.edit_config(|t| t.replace("[defaults]", "[defaults]\ntimeout = \"1s\""));
    let hang_url = env.config().clients["talkdesk"].token_url.to_string();
    let hung = run(&["once", "-c", &config, "talkdesk"]).await;
    assert_eq!(hung.code, 1, "{}", hung.stderr);
    let line = hung
        .stderr
        .lines()
        .find(|l| l.starts_with("talkdesk: token request timed out after 1s"))
        .unwrap_or_else(|| panic!("no timeout in:\n{}", hung.stderr));
    assert!(
        line.ends_with(&format!(
            "(token_url {hang_url}, grant_type client_credentials, client_auth private_key_jwt)"
        )),
        "{line}"
    );

    for secret in crate::support::secret_material(&env, Vec::new()) {
        assert!(!refused_run.stderr.contains(&secret), "a secret in stderr");
        assert!(!hung.stderr.contains(&secret), "a secret in stderr");
    }
}
