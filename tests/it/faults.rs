//! `tokenwarden run` under provider faults (docs/operations.md#failures-and-retries): 500s, 429
//! with `Retry-After`, invalid JSON, an HTML error page, hanging and dropped connections, and the
//! provider down (its port closed, then reopened). For each, while the fault lasts every output
//! keeps a live token until that token expires, the error is logged at WARN three times and then at
//! debug level, the token expires on time, requests thin out under exponential backoff, and a new
//! token lands soon after the provider is back. Also: the trace logs of a faulty run hold no
//! secret, and a failed output write is logged and retried without stopping anything else.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use serde_json::Value;
use tokenwarden::demo;
use tokenwarden::provider::{Fault, Provider, RecordedRequest};

use crate::support::{DaemonProc, DemoEnv, read, secret_material, token_in, wait_for};

/// Token lifetime: refreshed between 3 s and 4.5 s after issue.
const LIFETIME: Duration = Duration::from_secs(6);
const RETRY_INITIAL: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(3);
/// `timeout` for the hang scenario.
const HANG_TIMEOUT: Duration = Duration::from_secs(1);
/// How long each fault lasts: longer than a lifetime, so every token expires meanwhile.
const FAULT_FOR: Duration = Duration::from_secs(10);
/// Room for a loaded machine (2 cores shared with other builds).
const SLACK: Duration = Duration::from_millis(1500);

/// The demo's clients: config name, client id.
const CLIENTS: [(&str, &str); 5] = [
    ("transatel", demo::TRANSATEL_ID),
    ("creads-files", demo::CREADS_ID),
    ("talentsoft-app", demo::TALENTSOFT_APP_ID),
    ("talentsoft-user", demo::TALENTSOFT_USER_ID),
    ("talkdesk", demo::TALKDESK_ID),
];

/// The demo's outputs: file name, client name.
const OUTPUTS: [(&str, &str); 6] = [
    ("transatel.token", "transatel"),
    ("transatel.json", "transatel"),
    ("creads-files.header", "creads-files"),
    ("talentsoft-app.env", "talentsoft-app"),
    ("talentsoft-user.json", "talentsoft-user"),
    ("talkdesk.token", "talkdesk"),
];

/// The output each client's history is followed in.
fn main_output(client: &str) -> &'static str {
    OUTPUTS
        .iter()
        .find(|(_, c)| *c == client)
        .map(|(f, _)| *f)
        .unwrap()
}

fn client_id(client: &str) -> &'static str {
    CLIENTS.iter().find(|(c, _)| *c == client).unwrap().1
}

/// The demo client a request came from.
fn client_of(r: &RecordedRequest) -> Option<&'static str> {
    let p = r.path.as_str();
    Some(if p.starts_with("/transatel/") {
        "transatel"
    } else if p.starts_with("/creads/") {
        "creads-files"
    } else if p.starts_with("/talkdesk") {
        "talkdesk"
    } else if p.starts_with("/talentsoft/") {
        if r.form_value("grant_type")
            .is_some_and(|g| g.contains("jwt-bearer"))
        {
            "talentsoft-user"
        } else {
            "talentsoft-app"
        }
    } else {
        return None;
    })
}

/// The demo config with fast retries, `log_level` and (when given) a `timeout`.
fn tune(env: &DemoEnv, log_level: &str, timeout: Option<Duration>) {
    env.edit_config(|t| {
        let edits = [
            (
                "retry_initial = \"1s\"",
                "retry_initial = \"500ms\"".to_string(),
            ),
            ("retry_max = \"10s\"", "retry_max = \"3s\"".to_string()),
            (
                "log_level = \"info\"",
                format!("log_level = \"{log_level}\""),
            ),
            (
                "[defaults]\n",
                match timeout {
                    Some(d) => format!(
                        "[defaults]\ntimeout = \"{}\"\n",
                        humantime::format_duration(d)
                    ),
                    None => "[defaults]\n".to_string(),
                },
            ),
        ];
        let mut t = t;
        for (from, to) in edits {
            assert!(t.contains(from), "the demo config changed: no {from:?}");
            t = t.replacen(from, &to, 1);
        }
        t
    });
}

// === Sampling the outputs ===

/// What the sampler saw.
#[derive(Default)]
struct Samples {
    /// Per output: each distinct token in the order seen, with when it was first seen.
    history: BTreeMap<&'static str, Vec<(String, Instant)>>,
    /// Access token → `expires_at` as the daemon stored it (state files).
    expiry: HashMap<String, SystemTime>,
    /// Refresh tokens seen in the state files.
    refresh_tokens: HashSet<String>,
    /// Broken promises, described.
    problems: Vec<String>,
    rounds: usize,
}

/// Reads every output and state file every 50 ms, checking each time that every output holds
/// a whole token of its own client that is live at the provider, or one that has expired there
/// and is past the `expires_at` the daemon stored for it; that a token newly written is live;
/// and that an output never goes back to an older token.
struct Sampler {
    samples: Arc<Mutex<Samples>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    /// Starts sampling `outputs` (file name, path, client), and returns after the first round.
    async fn start(
        env: &DemoEnv,
        outputs: Vec<(&'static str, std::path::PathBuf, &'static str)>,
    ) -> Self {
        let samples = Arc::new(Mutex::new(Samples::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let provider = env.provider.clone();
        let state_dir = env.demo.state_dir.clone();
        let (s, st) = (samples.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while !st.load(Ordering::Relaxed) {
                {
                    let mut s = s.lock().unwrap();
                    sample_state(&mut s, &state_dir);
                    for (name, path, client) in &outputs {
                        sample_output(&mut s, &provider, name, path, client);
                    }
                    s.rounds += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let sampler = Sampler {
            samples,
            stop,
            task,
        };
        wait_for("the first sample", Duration::from_secs(5), || {
            sampler.with(|s| s.rounds > 0)
        })
        .await;
        sampler
    }

    fn with<R>(&self, f: impl FnOnce(&Samples) -> R) -> R {
        f(&self.samples.lock().unwrap())
    }

    /// The token an output holds now (as last sampled).
    fn current(&self, output: &str) -> Option<String> {
        self.with(|s| s.history.get(output)?.last().map(|(t, _)| t.clone()))
    }

    async fn stop(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        Arc::try_unwrap(self.samples)
            .ok()
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

fn sample_state(s: &mut Samples, state_dir: &Path) {
    for (client, _) in CLIENTS {
        let text = read(&state_dir.join(format!("{client}.json")));
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if let (Some(t), Some(exp)) = (
            v["token"]["access_token"].as_str(),
            v["token"]["expires_at_unix"].as_u64(),
        ) {
            s.expiry.insert(
                t.to_string(),
                SystemTime::UNIX_EPOCH + Duration::from_secs(exp),
            );
        }
        if let Some(rt) = v["refresh_token"].as_str() {
            s.refresh_tokens.insert(rt.to_string());
        }
    }
}

fn sample_output(
    s: &mut Samples,
    provider: &Provider,
    name: &'static str,
    path: &Path,
    client: &str,
) {
    let text = read(path);
    let Some(token) = token_in(name, &text) else {
        s.problems.push(format!(
            "{name}: a missing or partial file: {:?}",
            text.len()
        ));
        return;
    };
    let owner = provider.token_owner(&token);
    if owner.as_deref() != Some(client_id(client)) {
        s.problems
            .push(format!("{name}: a foreign token (owner {owner:?})"));
        return;
    }
    let live = provider.token_is_live(&token);
    if !live
        && let Some(exp) = s.expiry.get(&token)
        && *exp > SystemTime::now()
    {
        // The daemon's expires_at counts from when it sent the request, the provider's from
        // when it answered: expired at the provider means past the daemon's expires_at too.
        s.problems.push(format!(
            "{name}: the provider says the token expired, the daemon has it valid until {}",
            humantime::format_rfc3339_seconds(*exp)
        ));
    }
    let history = s.history.entry(name).or_default();
    if history.last().map(|(t, _)| t) == Some(&token) {
        return;
    }
    if history.iter().any(|(t, _)| *t == token) {
        s.problems
            .push(format!("{name}: went back to an older token"));
    }
    if !live {
        s.problems
            .push(format!("{name}: a new token that is already expired"));
    }
    history.push((token, Instant::now()));
}

fn all_outputs(env: &DemoEnv) -> Vec<(&'static str, std::path::PathBuf, &'static str)> {
    OUTPUTS.iter().map(|(f, c)| (*f, env.out(f), *c)).collect()
}

// === Reading the logs ===

/// One text log line: when, level, the rest.
struct Line<'a> {
    at: SystemTime,
    level: &'a str,
    text: &'a str,
}

impl Line<'_> {
    fn client(&self) -> Option<&str> {
        let rest = self.text.split(" client=").nth(1)?;
        let rest = rest.strip_prefix('"').unwrap_or(rest);
        rest.split(['"', ' ']).next()
    }

    fn is(&self, client: &str, needle: &str) -> bool {
        self.client() == Some(client) && self.text.contains(needle)
    }
}

fn lines(logs: &str) -> Vec<Line<'_>> {
    logs.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let at = humantime::parse_rfc3339(parts.next()?).ok()?;
            let level = parts.next()?;
            Some(Line { at, level, text: l })
        })
        .collect()
}

const FAILED: &str = "token request failed";
const EXPIRED: &str = "the token has expired";
const QUIETER: &str = "will be logged at debug level";

// === The fault scenarios ===

/// How the provider misbehaves.
#[derive(Clone)]
enum Outage {
    /// Every request gets this fault.
    Fault(Fault),
    /// The provider's port is closed ([`Provider::pause`]).
    Down,
}

struct Scenario {
    outage: Outage,
    /// In each failure's log line.
    error: &'static str,
    /// `timeout` in `[defaults]`, and how long each attempt then takes.
    timeout: Option<Duration>,
    /// `Retry-After` the provider sends.
    retry_after: Option<Duration>,
    log_level: &'static str,
}

/// Seconds from `t0` to `t`.
fn secs(t0: Instant, t: Instant) -> f64 {
    t.saturating_duration_since(t0).as_secs_f64()
}

fn wall_secs(t0: SystemTime, t: SystemTime) -> f64 {
    t.duration_since(t0).unwrap_or_default().as_secs_f64()
}

/// The ceiling of the backoff draw after `n` earlier failures: `min(retry_max, initial · 2ⁿ)`.
fn ceiling(n: usize) -> f64 {
    (RETRY_INITIAL.as_secs_f64() * 2f64.powi(n.min(30) as i32)).min(RETRY_MAX.as_secs_f64())
}

/// The most attempts one client makes in a window `window` seconds long if its first failure
/// comes at `first` and every full-jitter draw lands at fraction `q` of its ceiling (the mean
/// draw is 0.5), each attempt taking `attempt` seconds.
fn backoff_allows(window: f64, first: f64, q: f64, attempt: f64) -> usize {
    let (mut t, mut n) = (first, 1);
    loop {
        t += attempt + q * ceiling(n - 1);
        if t >= window {
            return n;
        }
        n += 1;
    }
}

/// Checks the attempts of every client during a fault (seconds since the fault began): their
/// number is bounded by exponential backoff and far below a fixed retry at `retry_initial`;
/// each gap stays under its ceiling (capped at `retry_max`) and the gaps average about half
/// their ceilings, as full jitter draws them.
fn check_backoff(attempts: &BTreeMap<&str, Vec<f64>>, window: f64, attempt: f64) {
    let mut total = 0;
    let mut allowed = 0;
    let mut fixed = 0.0;
    let (mut drawn, mut ceilings) = (0.0, 0.0);
    for (client, times) in attempts {
        // The fewest attempts backoff gives if every draw lands at its ceiling, less one for
        // an attempt that ran a little long: a client whose first failure came late in the
        // window may see only three (this asked for four, and failed now and then under load).
        let least = backoff_allows(window, times[0], 1.0, attempt)
            .saturating_sub(1)
            .max(2);
        assert!(
            times.len() >= least,
            "{client}: only {} attempts in the fault window, backoff gives at least {least}: {times:?}",
            times.len()
        );
        total += times.len();
        allowed += backoff_allows(window, times[0], 0.2, attempt);
        fixed += (window - times[0]) / (attempt + RETRY_INITIAL.as_secs_f64() / 2.0);
        for (n, pair) in times.windows(2).enumerate() {
            let delay = pair[1] - pair[0] - attempt;
            assert!(
                delay <= ceiling(n) + 1.0,
                "{client}: waited {delay:.2} s after failure {}, above the ceiling {:.2} s: {times:?}",
                n + 1,
                ceiling(n)
            );
            drawn += delay.max(0.0);
            ceilings += ceiling(n);
        }
    }
    assert!(
        total <= allowed,
        "{total} attempts in {window:.1} s, backoff allows {allowed}: {attempts:?}"
    );
    // When attempts take no time, a fixed retry would be far more frequent; when they hang
    // until the timeout, the timeout itself spaces them.
    assert!(
        attempt > 0.0 || (total as f64) < fixed / 2.0,
        "{total} attempts: not far below {fixed:.0} at a fixed retry_initial: {attempts:?}"
    );
    let ratio = drawn / ceilings;
    assert!(
        (0.25..=0.8).contains(&ratio),
        "delays average {ratio:.2} of their ceilings (full jitter: 0.5): {attempts:?}"
    );
}

/// The daemon on `env`'s config once every output holds a token, and a sampler of them.
async fn start_sampled(env: &DemoEnv) -> (DaemonProc, Sampler) {
    let daemon = DaemonProc::start(&env.demo.config, &[]);
    wait_for("a token in every output", Duration::from_secs(20), || {
        OUTPUTS
            .iter()
            .all(|(f, _)| token_in(f, &read(&env.out(f))).is_some())
    })
    .await;
    let sampler = Sampler::start(env, all_outputs(env)).await;
    (daemon, sampler)
}

async fn outage(sc: Scenario) {
    let env = DemoEnv::start(LIFETIME).await;
    tune(&env, sc.log_level, sc.timeout);
    let (mut daemon, sampler) = start_sampled(&env).await;
    // Past the start-up burst: every client on its second token, each of another age.
    wait_for("a second token for every client", LIFETIME + SLACK, || {
        sampler.with(|s| {
            CLIENTS
                .iter()
                .all(|(c, _)| s.history.get(main_output(c)).is_some_and(|h| h.len() >= 2))
        })
    })
    .await;

    let on_wall = SystemTime::now();
    match &sc.outage {
        Outage::Fault(f) => env.provider.set_fault(Some(f.clone())),
        Outage::Down => env.provider.pause().await,
    }
    let on = Instant::now();
    tokio::time::sleep_until((on + FAULT_FOR).into()).await;
    // The tokens held at the end of the fault: the ones that expired during it.
    let before: HashMap<&str, String> = CLIENTS
        .iter()
        .map(|(c, _)| (*c, sampler.current(main_output(c)).unwrap()))
        .collect();
    let off = Instant::now();
    let off_wall = SystemTime::now();
    match &sc.outage {
        Outage::Fault(_) => env.provider.set_fault(None),
        Outage::Down => env.provider.resume().await.unwrap(),
    }

    // Recovery: a new token in every output within retry_max (or Retry-After, or a hanging
    // attempt's timeout) of the provider's return.
    let bound =
        RETRY_MAX.max(sc.retry_after.unwrap_or_default()) + sc.timeout.unwrap_or_default() + SLACK;
    wait_for("a new token in every output", bound, || {
        OUTPUTS.iter().all(|(f, c)| {
            sampler
                .current(f)
                .is_some_and(|t| t != before[c] && env.provider.token_is_live(&t))
        })
    })
    .await;
    for (c, _) in CLIENTS {
        wait_line(&daemon, c, "recovered", Duration::from_secs(3)).await;
    }
    let samples = sampler.stop().await;
    daemon.stop().await;
    let logs = daemon.logs();
    assert!(
        !logs.contains('\u{1b}'),
        "colour codes in logs to a pipe:\n{logs}"
    );
    let lines = lines(&logs);

    assert!(
        samples.problems.is_empty(),
        "{:#?}\n{logs}",
        samples.problems
    );
    assert!(samples.rounds > 200, "{} rounds", samples.rounds);

    for (client, _) in CLIENTS {
        // The error, as the provider caused it.
        let failures: Vec<&Line> = lines.iter().filter(|l| l.is(client, FAILED)).collect();
        assert!(
            failures.iter().any(|l| l.text.contains(sc.error)),
            "{client}: no {:?} in the logs:\n{logs}",
            sc.error
        );
        // WARN three times, the notice, then no more WARN for it.
        let warns: Vec<usize> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.level == "WARN" && l.is(client, FAILED))
            .map(|(i, _)| i)
            .collect();
        let notices: Vec<usize> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.level == "WARN" && l.is(client, QUIETER))
            .map(|(i, _)| i)
            .collect();
        // Two clients share the Talentsoft token URL: under Retry-After one is held while the
        // other is told to wait, and a hold is logged at debug level only, so a client may see
        // fewer than three 429s of its own in the window.
        let shares_a_held_url = sc.retry_after.is_some() && client.starts_with("talentsoft");
        if shares_a_held_url && warns.len() < 3 {
            assert!(
                !warns.is_empty(),
                "{client}: no WARN line of the failure\n{logs}"
            );
            assert!(
                notices.is_empty(),
                "{client}: a notice before three WARN\n{logs}"
            );
        } else {
            assert_eq!(
                warns.len(),
                3,
                "{client}: WARN lines of the failure\n{logs}"
            );
            assert_eq!(notices.len(), 1, "{client}: the debug-level notice\n{logs}");
            assert!(
                notices[0] > warns[2],
                "{client}: the notice comes after the third\n{logs}"
            );
        }
        if sc.log_level == "debug" {
            assert!(
                lines
                    .iter()
                    .any(|l| l.level == "DEBUG" && l.is(client, FAILED)),
                "{client}: later failures at debug level\n{logs}"
            );
        }

        // The token expired during the fault: logged once, not before its expires_at.
        let expires_at = samples.expiry[&before[client]];
        let lines_expired: Vec<&Line> = lines.iter().filter(|l| l.is(client, EXPIRED)).collect();
        assert_eq!(lines_expired.len(), 1, "{client}: expiry lines\n{logs}");
        let at = lines_expired[0].at;
        assert!(
            at >= expires_at,
            "{client}: \"expired\" logged at {} before expires_at {}",
            humantime::format_rfc3339_micros(at),
            humantime::format_rfc3339_seconds(expires_at)
        );
        assert!(
            at <= expires_at + Duration::from_secs(2) && at < off_wall,
            "{client}: \"expired\" logged late, at {}, expires_at {}",
            humantime::format_rfc3339_micros(at),
            humantime::format_rfc3339_seconds(expires_at)
        );
        assert!(
            lines
                .iter()
                .any(|l| l.level == "INFO" && l.is(client, "recovered")),
            "{client}: no \"recovered\"\n{logs}"
        );
    }

    // Requests thin out. The provider counts them; with its port closed, the debug log does.
    let attempt = sc.timeout.map_or(0.0, |d| d.as_secs_f64());
    let window = secs(on, off);
    let mut attempts: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let requests = env.provider.requests();
    match sc.outage {
        Outage::Fault(_) => {
            for r in requests
                .iter()
                .filter(|r| r.received_at > on && r.received_at < off)
            {
                let c = client_of(r).unwrap();
                attempts.entry(c).or_default().push(secs(on, r.received_at));
            }
        }
        Outage::Down => {
            assert!(
                !requests
                    .iter()
                    .any(|r| r.received_at > on && r.received_at < off),
                "the provider was reached while down"
            );
            for l in lines.iter().filter(|l| l.text.contains(FAILED)) {
                if let Some(c) = CLIENTS.iter().find(|(c, _)| l.client() == Some(*c)) {
                    attempts
                        .entry(c.0)
                        .or_default()
                        .push(wall_secs(on_wall, l.at));
                }
            }
        }
    }
    assert_eq!(attempts.len(), 5, "{attempts:?}");
    match sc.retry_after {
        None => check_backoff(&attempts, window, attempt),
        Some(ra) => {
            // Per token URL (a Retry-After holds every client of it): never sooner than
            // Retry-After after a 429, the first request after the fault included, except two
            // requests sent together before either answer came back; asked again within about
            // the longer of Retry-After and retry_max.
            let mut paths: Vec<&str> = requests.iter().map(|r| r.path.as_str()).collect();
            paths.sort_unstable();
            paths.dedup();
            for path in paths {
                let mine: Vec<Instant> = requests
                    .iter()
                    .filter(|r| r.path == path && r.received_at > on)
                    .map(|r| r.received_at)
                    .collect();
                let faulted = mine.iter().filter(|t| **t < off).count();
                assert!(faulted >= 3, "{path}: {faulted} requests got a 429");
                for pair in mine[..=faulted.min(mine.len() - 1)].windows(2) {
                    let gap = pair[1] - pair[0];
                    assert!(
                        gap >= ra || gap < Duration::from_millis(50),
                        "{path}: asked again {gap:?} after a 429 with Retry-After {ra:?}"
                    );
                    assert!(gap <= ra.max(RETRY_MAX) + SLACK, "{path}: waited {gap:?}");
                }
            }
        }
    }
    drop(env);
}

/// Waits for a log line of `client` containing `needle`.
async fn wait_line(daemon: &DaemonProc, client: &str, needle: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let logs = daemon.logs();
        if lines(&logs).iter().any(|l| l.is(client, needle)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{client}: no {needle:?} log line within {limit:?}\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn server_errors() {
    outage(Scenario {
        outage: Outage::Fault(Fault::ServerError),
        error: "HTTP 500",
        timeout: None,
        retry_after: None,
        log_level: "info",
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn too_many_requests_with_retry_after() {
    outage(Scenario {
        outage: Outage::Fault(Fault::TooManyRequests { retry_after: 2 }),
        error: "HTTP 429",
        timeout: None,
        retry_after: Some(Duration::from_secs(2)),
        log_level: "info",
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_json() {
    outage(Scenario {
        outage: Outage::Fault(Fault::InvalidJson),
        error: "malformed token response",
        timeout: None,
        retry_after: None,
        log_level: "info",
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn html_error_page() {
    outage(Scenario {
        outage: Outage::Fault(Fault::HtmlError),
        error: "HTTP 502",
        timeout: None,
        retry_after: None,
        log_level: "info",
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hanging_provider() {
    outage(Scenario {
        outage: Outage::Fault(Fault::Hang),
        error: "timed out",
        timeout: Some(HANG_TIMEOUT),
        retry_after: None,
        log_level: "info",
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_connections() {
    outage(Scenario {
        outage: Outage::Fault(Fault::DropConnection),
        error: "connection closed before message completed",
        timeout: None,
        retry_after: None,
        log_level: "info",
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn provider_down_then_back_on_the_same_port() {
    outage(Scenario {
        outage: Outage::Down,
        error: "cannot connect to the token endpoint",
        timeout: None,
        retry_after: None,
        log_level: "debug",
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_provider_refuses_connections_and_comes_back_on_the_same_port() {
    use tokio::io::AsyncReadExt as _;
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let addr = env.provider.addr();
    let mut open = tokio::net::TcpStream::connect(addr).await.unwrap();
    env.provider.pause().await;
    let refused = tokio::net::TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    // Open connections are closed too: kept-alive ones must not outlive the outage.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), open.read(&mut buf))
        .await
        .expect("an open connection survived the pause");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    env.provider.resume().await.unwrap();
    env.provider.resume().await.unwrap();
    assert_eq!(env.provider.addr(), addr);
    let c = env.config().clients.get("transatel").unwrap().clone();
    let http = tokenwarden::oauth::http_client(None).unwrap();
    let got = tokenwarden::oauth::acquire(&http, &c, None, false)
        .await
        .unwrap();
    assert!(
        env.provider
            .token_is_live(got.issued.token.access_token.expose())
    );

    env.provider.shutdown();
    assert!(env.provider.resume().await.is_err());
}

// === Secrets in the logs of a faulty run ===

/// What the sampler saw that must not be logged either: every access and refresh token.
fn sampled_secrets(samples: &Samples) -> Vec<String> {
    let mut v: Vec<String> = samples
        .history
        .values()
        .flat_map(|h| h.iter().map(|(t, _)| t.clone()))
        .collect();
    v.extend(samples.expiry.keys().cloned());
    v.extend(samples.refresh_tokens.iter().cloned());
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn trace_logs_of_a_faulty_run_hold_no_secret() {
    let env = DemoEnv::start(LIFETIME).await;
    tune(&env, "trace", Some(HANG_TIMEOUT));
    let (mut daemon, sampler) = start_sampled(&env).await;
    let p = &env.provider;

    // Each fault for a moment, every client asked at once (SIGUSR1) while it lasts.
    let faults = [
        (Fault::ServerError, Some("HTTP 500")),
        (Fault::TooManyRequests { retry_after: 1 }, Some("HTTP 429")),
        (Fault::InvalidJson, Some("malformed token response")),
        (Fault::HtmlError, Some("HTTP 502")),
        (
            Fault::DropConnection,
            Some("connection closed before message completed"),
        ),
        (Fault::TruncatedBody, None),
        (Fault::Hang, Some("timed out")),
    ];
    for (f, needle) in faults {
        let seen = p.requests().len();
        p.set_fault(Some(f));
        daemon.signal(Signal::SIGUSR1);
        wait_for("faulted requests", Duration::from_secs(5), || {
            p.requests().len() >= seen + 5
        })
        .await;
        if let Some(needle) = needle {
            daemon.wait_log(needle, Duration::from_secs(5)).await;
        }
        p.set_fault(None);
    }
    // The provider down, then back; and a dead refresh token (invalid_grant, then the
    // password grant).
    p.pause().await;
    daemon.signal(Signal::SIGUSR1);
    wait_line(
        &daemon,
        "transatel",
        "Connection refused",
        Duration::from_secs(5),
    )
    .await;
    p.resume().await.unwrap();
    p.revoke_refresh_tokens(demo::CREADS_ID);
    let before: HashMap<&str, String> = OUTPUTS
        .iter()
        .map(|(f, _)| (*f, sampler.current(f).unwrap()))
        .collect();
    wait_for(
        "a new token in every output",
        RETRY_MAX + HANG_TIMEOUT + SLACK * 2,
        || {
            OUTPUTS
                .iter()
                .all(|(f, _)| sampler.current(f).is_some_and(|t| t != before[f]))
        },
    )
    .await;
    wait_line(
        &daemon,
        "creads-files",
        "refresh token was refused",
        LIFETIME + SLACK,
    )
    .await;

    let samples = sampler.stop().await;
    daemon.stop().await;
    let logs = daemon.logs();
    assert!(samples.problems.is_empty(), "{:#?}", samples.problems);
    for needle in [
        "TRACE",
        "DEBUG",
        "HTTP 500",
        "HTTP 429",
        "malformed token response",
        "HTTP 502",
        "timed out",
        "connection closed before message completed",
        "Connection refused",
        "invalid_grant",
        "recovered",
    ] {
        assert!(logs.contains(needle), "no {needle:?} in the logs:\n{logs}");
    }
    let secrets = secret_material(&env, sampled_secrets(&samples));
    let tokens: usize = samples.history.values().map(Vec::len).sum();
    assert!(tokens >= 12, "{tokens} tokens seen");
    assert!(secrets.len() > 30, "{}", secrets.len());
    for s in &secrets {
        assert!(
            !logs.contains(s.as_str()),
            "secret material in the logs: {}…",
            &s[..6]
        );
        // Nor a telling part of one (a token cut short by a snippet, say).
        if s.len() >= 32 {
            let middle = &s[s.len() / 2 - 8..s.len() / 2 + 8];
            assert!(
                !logs.contains(middle),
                "part of secret material in the logs: {}…",
                &s[..6]
            );
        }
    }
}

// === A failed output write ===

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_output_write_is_logged_retried_and_stops_nothing_else() {
    let env = DemoEnv::start(LIFETIME).await;
    tune(&env, "info", None);
    let sub = env.demo.out_dir.join("sub");
    let broken_path = sub.join("transatel.json");
    env.edit_config(|t| {
        assert_eq!(t.matches("/transatel.json\"").count(), 1);
        t.replace("/transatel.json\"", "/sub/transatel.json\"")
    });
    let mut daemon = DaemonProc::start(&env.demo.config, &[]);
    wait_for("a token in every output", Duration::from_secs(20), || {
        token_in("transatel.json", &read(&broken_path)).is_some()
            && OUTPUTS
                .iter()
                .filter(|(f, _)| *f != "transatel.json")
                .all(|(f, _)| token_in(f, &read(&env.out(f))).is_some())
    })
    .await;
    let others: Vec<_> = all_outputs(&env)
        .into_iter()
        .filter(|(f, _, _)| *f != "transatel.json")
        .collect();
    let sampler = Sampler::start(&env, others.clone()).await;

    // The output's parent becomes a regular file.
    std::fs::remove_dir_all(&sub).unwrap();
    std::fs::write(&sub, "not a directory").unwrap();
    let at_break: HashMap<&str, String> = others
        .iter()
        .map(|(f, _, _)| (*f, sampler.current(f).unwrap()))
        .collect();
    let failures = |daemon: &DaemonProc| {
        let logs = daemon.logs();
        lines(&logs)
            .iter()
            .filter(|l| {
                l.level == "WARN"
                    && l.is("transatel", "cannot write")
                    && l.text.contains(&broken_path.display().to_string())
            })
            .count()
    };
    // Logged, and retried.
    wait_for("the failed write logged", LIFETIME + SLACK, || {
        failures(&daemon) >= 1
    })
    .await;
    wait_for("the failed write retried", RETRY_MAX + SLACK, || {
        failures(&daemon) >= 2
    })
    .await;
    // Every other output, the same client's included, keeps getting new tokens.
    wait_for("new tokens in every other output", LIFETIME + SLACK, || {
        others
            .iter()
            .all(|(f, _, _)| sampler.current(f).is_some_and(|t| t != at_break[f]))
    })
    .await;
    // Fixed: the next retry recreates the directory and writes the current token.
    std::fs::remove_file(&sub).unwrap();
    wait_for("the output written again", RETRY_MAX + SLACK, || {
        token_in("transatel.json", &read(&broken_path)).is_some_and(|t| {
            env.provider.token_is_live(&t) && t == read(&env.out("transatel.token"))
        })
    })
    .await;
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&sub).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755, "{mode:o}");

    let samples = sampler.stop().await;
    daemon.stop().await;
    assert!(samples.problems.is_empty(), "{:#?}", samples.problems);
    let logs = daemon.logs();
    assert!(
        !lines(&logs)
            .iter()
            .any(|l| l.level == "WARN" && l.is("transatel", FAILED)),
        "no token request failed\n{logs}"
    );
}

// === Log lines themselves ===

#[tokio::test(flavor = "multi_thread")]
async fn logs_to_a_pipe_or_journald_carry_no_colour_codes() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    for journal in [false, true] {
        let envs: &[(&str, &str)] = if journal {
            &[("JOURNAL_STREAM", "8:1234")]
        } else {
            &[]
        };
        let mut daemon = DaemonProc::start(&env.demo.config, envs);
        daemon.wait_log("ready", Duration::from_secs(10)).await;
        daemon.stop().await;
        let logs = daemon.logs();
        assert!(!logs.contains('\u{1b}'), "journal {journal}:\n{logs:?}");
        if journal {
            assert!(logs.lines().all(|l| l.starts_with('<')), "{logs}");
            assert!(logs.contains("client=\"transatel\""), "{logs}");
        } else {
            assert!(lines(&logs).iter().any(|l| l.level == "INFO"), "{logs}");
        }
    }
}

// === Promises at their edges ===

/// GetToken's fast path (docs/grpc.md): a client whose token expired during an outage, its last
/// attempt failed, answers UNAVAILABLE at once with that error, not at the call's deadline; and
/// a new token as soon as the provider is back.
#[tokio::test(flavor = "multi_thread")]
async fn get_token_answers_unavailable_at_once_after_the_token_expired_in_an_outage() {
    use tokenwarden::grpc::pb;
    let env = DemoEnv::start(LIFETIME).await;
    tune(&env, "info", None);
    let (mut daemon, _notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    let mut c = tokenwarden::client::connect(&env.demo.socket)
        .await
        .unwrap();
    let get = || {
        let mut r = tonic::Request::new(pb::GetTokenRequest {
            client: "transatel".into(),
            min_valid_for: None,
        });
        r.set_timeout(Duration::from_secs(20));
        r
    };
    let first = c.get_token(get()).await.unwrap().into_inner();

    env.provider.pause().await;
    wait_for("transatel's token to expire", LIFETIME + SLACK, || {
        daemon
            .logs()
            .lines()
            .any(|l| l.contains("client=\"transatel\"") && l.contains("the token has expired"))
    })
    .await;
    let asked = Instant::now();
    let e = c.get_token(get()).await.unwrap_err();
    let took = asked.elapsed();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    assert!(
        e.message().contains("transatel") && e.message().contains("cannot connect"),
        "{}",
        e.message()
    );

    env.provider.resume().await.unwrap();
    let deadline = Instant::now() + RETRY_MAX + SLACK * 2;
    let again = loop {
        match c.get_token(get()).await {
            Ok(t) => break t.into_inner(),
            Err(e) => assert!(Instant::now() < deadline, "no token again: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(again.generation > first.generation, "{again:?}");
    daemon.stop().await;
}

/// The one window where a rotated refresh token lives only in memory: its state cannot be
/// saved. The new token is held back (not published), no other request is made while the save
/// fails, and once it succeeds the rotated refresh token is on disk and used next: the chain
/// survives, the password is never needed again.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_refresh_token_held_while_its_state_cannot_be_saved_is_kept_and_used() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    tune(&env, "info", None);
    let (mut daemon, _notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    let state_file = env.demo.state_dir.join("creads-files.json");
    let stored = |what: &str| -> Value {
        serde_json::from_str::<Value>(&read(&state_file)).unwrap()[what].clone()
    };
    let first_refresh = stored("refresh_token");
    let out = env.out("creads-files.header");
    let published = read(&out);
    assert_eq!(env.grants_at("/creads/"), ["password"]);

    // A non-empty directory where the state file goes: every save fails at the rename.
    std::fs::remove_file(&state_file).unwrap();
    std::fs::create_dir_all(state_file.join("in-the-way")).unwrap();
    let r = crate::support::run(&[
        "refresh",
        "creads-files",
        "-s",
        env.demo.socket.to_str().unwrap(),
    ])
    .await;
    assert_ne!(r.code, 0, "the new token is held back: {}", r.stdout);
    wait_for("the save failure", SLACK * 4, || {
        daemon.logs().contains("holding the new token back")
    })
    .await;
    // Rotated once, with the stored refresh token; held back, not published.
    assert_eq!(env.grants_at("/creads/"), ["password", "refresh_token"]);
    assert_eq!(read(&out), published);
    let status =
        crate::support::run(&["status", "--json", "-s", env.demo.socket.to_str().unwrap()]).await;
    assert!(
        status.stdout.contains("cannot save state"),
        "{}",
        status.stdout
    );

    // The disk is back: the held state is saved (no new request) and then published.
    std::fs::remove_dir_all(&state_file).unwrap();
    wait_for("the held token published", RETRY_MAX * 2 + SLACK, || {
        read(&out) != published
    })
    .await;
    assert_eq!(env.grants_at("/creads/"), ["password", "refresh_token"]);
    let rotated = stored("refresh_token");
    assert!(rotated.is_string() && rotated != first_refresh, "{rotated}");

    // The rotated token is what the chain goes on with.
    let r = crate::support::run(&[
        "refresh",
        "creads-files",
        "-s",
        env.demo.socket.to_str().unwrap(),
    ])
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        env.grants_at("/creads/"),
        ["password", "refresh_token", "refresh_token"]
    );
    assert!(
        !daemon.logs().contains("refresh token was refused"),
        "{}",
        daemon.logs()
    );
    daemon.stop().await;
}
