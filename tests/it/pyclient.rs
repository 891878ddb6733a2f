//! A second-language client: `tests/python/client_test.py`, stock Python grpcio with stubs
//! generated from the proto at run time, against a real `tokenwarden run` over its Unix socket
//! with a plain `unix:` target and no channel options (grpcio sends the percent-encoded socket
//! path as `:authority`; the daemon must take it). It gets, watches (two generations of 4 s
//! tokens) and refreshes tokens, lists clients, checks health, lists services by reflection
//! (v1alpha) and sees NOT_FOUND, INVALID_ARGUMENT, UNAVAILABLE and DEADLINE_EXCEEDED.
//!
//! The Python packages come from the venv `bash scripts/test.sh` makes, named by
//! `$TOKENWARDEN_PYTHON`. Without it the test is skipped with a note, except under CI.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokenwarden::secret::fingerprint;

use crate::support::{DaemonProc, DemoEnv, read};

/// The checks client_test.py prints as `ok   NAME: …` when they pass, in order.
const CHECKS: [&str; 12] = [
    "stubs",
    "GetToken",
    "WatchToken",
    "RefreshToken",
    "ListClients",
    "Health",
    "Reflection",
    "NotFound",
    "InvalidArgument",
    "Unavailable",
    "Deadline",
    "NoDaemon",
];

/// The venv's python, or `None` (test skipped) when `$TOKENWARDEN_PYTHON` is unset outside CI.
fn python() -> Option<String> {
    if let Some(p) = std::env::var_os("TOKENWARDEN_PYTHON").filter(|p| !p.is_empty()) {
        return Some(p.to_string_lossy().into_owned());
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(
        !ci,
        "TOKENWARDEN_PYTHON is unset under CI: run the tests with `bash scripts/test.sh`, \
         which installs the Python client's venv and sets it"
    );
    eprintln!(
        "SKIPPED: the Python grpcio client test: TOKENWARDEN_PYTHON is unset; \
         run `bash scripts/test.sh` (it makes .venv with tests/python/requirements.txt and sets it)"
    );
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stock_python_grpcio_client_works_over_the_socket() {
    let Some(python) = python() else {
        return;
    };
    let env = DemoEnv::start(Duration::from_secs(4)).await;
    // A client whose provider is not listening: its first attempt fails, so GetToken answers
    // UNAVAILABLE.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let broken_url = format!("http://{}/token", closed.local_addr().unwrap());
    drop(closed);
    env.edit_config(|t| {
        format!(
            "{t}\n[clients.broken]\ntoken_url = \"{broken_url}\"\nclient_id = \"x\"\n\
             client_secret = \"s\"\ntimeout = \"2s\"\n"
        )
    });

    // Every transatel token the daemon writes, to recognise the client's fingerprints and to
    // look for them in the logs.
    let tokens = Arc::new(Mutex::new(HashSet::new()));
    let collector = {
        let tokens = tokens.clone();
        let file = env.out("transatel.token");
        tokio::spawn(async move {
            loop {
                let t = read(&file);
                if !t.is_empty() {
                    tokens.lock().unwrap().insert(t);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let (mut daemon, _notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/client_test.py");
    let socket = env.demo.socket.to_str().unwrap();
    let start = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(&python)
            .args([script, socket, "transatel", "--failing", "broken"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("GRPC_TRACE")
            .env_remove("GRPC_VERBOSITY")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("client_test.py did not finish within 60 s")
    .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let took = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    println!("client_test.py ({took:.1?}):\n{stdout}{stderr}");
    assert!(
        out.status.success(),
        "client_test.py failed ({}):\n{stdout}\n{stderr}\ndaemon logs:\n{}",
        out.status,
        daemon.logs()
    );
    for check in CHECKS {
        let prefix = format!("ok   {check}: ");
        assert!(
            stdout.lines().any(|l| l.starts_with(&prefix)),
            "no line {prefix:?}:\n{stdout}"
        );
    }
    assert!(
        stdout
            .lines()
            .any(|l| l == format!("client_test: {} passed, 0 failed", CHECKS.len() - 1)),
        "{stdout}"
    );

    // The daemon: stopped cleanly, its log names no token; neither does the client's output,
    // and every fingerprint the client printed is one of the tokens the daemon wrote.
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(6)).await;
    assert!(status.success(), "{}", daemon.logs());
    collector.abort();
    let tokens = tokens.lock().unwrap().clone();
    assert!(
        tokens.len() >= 3,
        "only {} transatel tokens seen",
        tokens.len()
    );
    let logs = daemon.logs();
    let known: HashSet<String> = tokens.iter().map(|t| fingerprint(t.as_bytes())).collect();
    for t in &tokens {
        assert!(!logs.contains(t.as_str()), "a token in the daemon's logs");
        assert!(!stdout.contains(t.as_str()) && !stderr.contains(t.as_str()));
    }
    // Fingerprints are the 8-hex-digit words of the token checks' lines.
    let fingerprints: Vec<&str> = ["GetToken", "WatchToken", "RefreshToken"]
        .iter()
        .filter_map(|c| {
            stdout
                .lines()
                .find(|l| l.starts_with(&format!("ok   {c}: ")))
        })
        .flat_map(|l| l.split([' ', ',']))
        .filter(|w| w.len() == 8 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    assert!(fingerprints.len() >= 4, "{fingerprints:?}\n{stdout}");
    for f in &fingerprints {
        assert!(
            known.contains(*f),
            "fingerprint {f} is no token the daemon wrote"
        );
    }
    assert!(
        took < Duration::from_secs(30),
        "the Python client took {took:?}"
    );
}
