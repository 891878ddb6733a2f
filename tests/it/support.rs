//! Shared test helpers: a temp dir with the demo's provider and config, the binary, waiting on
//! conditions with deadlines.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokenwarden::demo::{self, DemoSetup};
use tokenwarden::provider::Provider;

/// A running provider with the demo's five clients and their config in a temp dir.
pub struct DemoEnv {
    pub dir: tempfile::TempDir,
    pub provider: Provider,
    pub demo: DemoSetup,
}

impl DemoEnv {
    /// Starts a provider granting `lifetime` tokens and writes the demo config.
    pub async fn start(lifetime: Duration) -> DemoEnv {
        let dir = tempfile::tempdir().unwrap();
        let provider = Provider::start().await.unwrap();
        let demo = demo::setup(dir.path(), &provider, lifetime).unwrap();
        DemoEnv {
            dir,
            provider,
            demo,
        }
    }

    pub fn config(&self) -> tokenwarden::config::Config {
        tokenwarden::config::load(&self.demo.config).unwrap()
    }

    pub fn out(&self, name: &str) -> PathBuf {
        self.demo.out_dir.join(name)
    }

    pub fn secret(&self, name: &str) -> String {
        std::fs::read_to_string(self.demo.dir.join("secrets").join(name)).unwrap()
    }

    pub fn config_path(&self) -> &str {
        self.demo.config.to_str().unwrap()
    }

    /// Rewrites the config text (for fault scenarios: shorter timeouts and the like).
    pub fn edit_config(&self, f: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.demo.config).unwrap();
        std::fs::write(&self.demo.config, f(text)).unwrap();
    }

    /// Lets every local user reach the demo's socket (the directory traversable, the socket
    /// 0666), as an unprivileged attacker or caller in a test needs.
    pub fn open_socket_to_everyone(&self) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        self.edit_config(|t| t.replacen("[daemon]\n", "[daemon]\nsocket_mode = \"0666\"\n", 1));
    }

    /// The grant types the provider saw on paths containing `path_part`, in order.
    pub fn grants_at(&self, path_part: &str) -> Vec<String> {
        self.provider
            .requests()
            .iter()
            .filter(|r| r.path.contains(path_part))
            .filter_map(|r| r.form_value("grant_type").map(str::to_string))
            .collect()
    }
}

/// The client id inside an `Authorization: Basic` value.
pub fn basic_id(header: &str) -> String {
    use base64::Engine as _;
    let Some(b64) = header.strip_prefix("Basic ") else {
        return String::new();
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap_or_default();
    let raw = String::from_utf8(raw).unwrap_or_default();
    let id = raw.split(':').next().unwrap_or("");
    url::form_urlencoded::parse(format!("x={id}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// The tokenwarden binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tokenwarden")
}

/// Output of one CLI run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the binary with `args` to completion (60 s at most).
pub async fn run(args: &[&str]) -> Run {
    run_env(args, &[]).await
}

/// Runs the binary with `args` and extra environment variables.
pub async fn run_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    run_wrapped(&[], args, env).await
}

/// Runs the binary through `setpriv SETPRIV --` (util-linux): as another uid, with other
/// groups or without some capabilities. The test process must be root for most of that.
pub async fn run_setpriv(setpriv: &[&str], args: &[&str]) -> Run {
    let mut wrapper = vec!["setpriv"];
    wrapper.extend_from_slice(setpriv);
    wrapper.push("--");
    run_wrapped(&wrapper, args, &[]).await
}

/// Runs `WRAPPER... tokenwarden ARGS` (just the binary when `wrapper` is empty) to completion
/// (60 s at most), with a clean tokenwarden environment plus `env`.
async fn run_wrapped(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(rest).arg(bin());
            cmd
        }
        None => tokio::process::Command::new(bin()),
    };
    cmd.args(args)
        .env_remove("TOKENWARDEN_CONFIG")
        .env_remove("TOKENWARDEN_SOCKET")
        .env_remove("TOKENWARDEN_LOG")
        .env_remove("JOURNAL_STREAM")
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("tokenwarden did not finish within 60 s")
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Waits until `cond` holds, failing the test after `limit`.
#[allow(dead_code)]
pub async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads a file to a string, empty if absent.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A datagram socket standing in for systemd's `$NOTIFY_SOCKET`, collecting what it hears.
pub struct NotifySocket {
    pub path: PathBuf,
    messages: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    pub fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = tokio::net::UnixDatagram::bind(&path).unwrap();
        let messages = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let m = messages.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf).await {
                m.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
        NotifySocket {
            path,
            messages,
            task,
            _dir: dir,
        }
    }

    /// Every message so far.
    pub fn messages(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }

    /// Waits for a message containing `needle`.
    pub async fn wait_for(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(m) = self.messages().into_iter().find(|m| m.contains(needle)) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "no notify message with {needle:?} in {limit:?}; got {:?}",
                self.messages()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `tokenwarden run` as a child process, its stderr collected.
pub struct DaemonProc {
    pub child: tokio::process::Child,
    logs: std::sync::Arc<std::sync::Mutex<String>>,
    /// The stderr reader: done once the child's stderr is closed.
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl DaemonProc {
    /// Starts `tokenwarden run -c CONFIG` with extra environment variables.
    pub fn start(config: &Path, env: &[(&str, &str)]) -> DaemonProc {
        DaemonProc::start_wrapped(&[], config, env)
    }

    /// Starts `WRAPPER... tokenwarden run -c CONFIG` (just the binary when `wrapper` is empty).
    /// The wrapper must end by exec'ing the binary, so that [`DaemonProc::pid`] is the daemon's.
    pub fn start_wrapped(wrapper: &[&str], config: &Path, env: &[(&str, &str)]) -> DaemonProc {
        use tokio::io::AsyncBufReadExt;
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut cmd = tokio::process::Command::new(program);
                cmd.args(rest).arg(bin());
                cmd
            }
            None => tokio::process::Command::new(bin()),
        };
        cmd.args(["run", "-c"])
            .arg(config)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .env_remove("WATCHDOG_USEC")
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let l = logs.clone();
        let reader = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut g = l.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        DaemonProc {
            child,
            logs,
            reader: Some(reader),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id().unwrap() as i32
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for a log line containing `needle`.
    pub async fn wait_log(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.logs().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} within {limit:?}; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "daemon did not exit within {limit:?}; logs:\n{}",
                    self.logs()
                )
            })
            .unwrap();
        // Every line it wrote is in `logs()` once the reader has seen its stderr close.
        if let Some(reader) = self.reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        status
    }
}

/// The access token in an output file if the file is complete and well-formed in its format.
pub fn token_in(name: &str, text: &str) -> Option<String> {
    if name.ends_with(".token") {
        return Some(text.to_string()).filter(|t| !t.is_empty() && !t.contains('\n'));
    }
    if name.ends_with(".json") {
        let v = serde_json::from_str::<serde_json::Value>(text).ok()?;
        for key in ["token_type", "expires_at", "issued_at", "scope"] {
            v[key].as_str()?;
        }
        return v["access_token"].as_str().map(str::to_string);
    }
    if name.ends_with(".header") {
        let line = text.strip_suffix('\n')?;
        return line
            .strip_prefix("Authorization: Bearer ")
            .map(str::to_string);
    }
    if name.ends_with(".env") {
        let lines: Vec<&str> = text.strip_suffix('\n')?.split('\n').collect();
        let [token, kind, expires] = lines.as_slice() else {
            return None;
        };
        kind.strip_prefix("TS_TOKEN_TYPE=")?;
        expires.strip_prefix("TS_TOKEN_EXPIRES_AT=")?;
        return token.strip_prefix("TS_ACCESS_TOKEN=").map(str::to_string);
    }
    None
}

/// Every secret value a run on `env` could leak: the demo's secret files (and each line of a
/// key), the access and refresh tokens in the state files, what the provider received
/// (passwords, assertions, client secrets, Authorization headers), and `extra` (tokens a test
/// saw elsewhere). Values under 8 characters are left out: too short to mean anything in logs.
pub fn secret_material(env: &DemoEnv, extra: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut v = Vec::new();
    for entry in std::fs::read_dir(env.demo.dir.join("secrets")).unwrap() {
        let text = read(&entry.unwrap().path());
        for line in text
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 8)
        {
            v.push(line.to_string());
        }
        v.push(text);
    }
    for entry in std::fs::read_dir(&env.demo.state_dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "json") {
            let s: serde_json::Value = serde_json::from_str(&read(&p)).unwrap();
            if let Some(t) = s["refresh_token"].as_str() {
                v.push(t.to_string());
            }
            if let Some(t) = s["token"]["access_token"].as_str() {
                v.push(t.to_string());
            }
        }
    }
    const SECRET_FORM_KEYS: [&str; 7] = [
        "password",
        "client_secret",
        "assertion",
        "client_assertion",
        "refresh_token",
        "subject_token",
        "actor_token",
    ];
    for r in env.provider.requests() {
        for (k, val) in &r.form {
            if SECRET_FORM_KEYS.contains(&k.as_str()) {
                v.push(val.clone());
            }
        }
        if let Some(a) = r.header("authorization") {
            v.push(a.to_string());
            v.push(a.trim_start_matches("Basic ").to_string());
        }
    }
    v.extend(extra);
    v.retain(|s| s.len() >= 8);
    v.sort();
    v.dedup();
    v
}

/// How long a start may take to READY=1 (every client's first token) on a loaded machine.
pub const READY_WITHIN: Duration = Duration::from_secs(20);

/// SIGTERM's promise (docs/operations.md#signals: in-flight work gets up to 4.5 s, then exit 0),
/// with slack for a busy machine.
pub const STOPS_WITHIN: Duration = Duration::from_secs(6);

impl DaemonProc {
    /// Starts `tokenwarden run -c CONFIG` with `env` and a fresh `$NOTIFY_SOCKET`, and waits for
    /// READY=1. Returns the daemon, its notify socket (keep it: the daemon talks to it until
    /// it stops) and the READY=1 message (with its STATUS=).
    pub async fn start_ready(
        config: &Path,
        env: &[(&str, &str)],
    ) -> (DaemonProc, NotifySocket, String) {
        DaemonProc::start_ready_wrapped(&[], config, env).await
    }

    /// [`DaemonProc::start_ready`] through `WRAPPER...` (see [`DaemonProc::start_wrapped`]).
    pub async fn start_ready_wrapped(
        wrapper: &[&str],
        config: &Path,
        env: &[(&str, &str)],
    ) -> (DaemonProc, NotifySocket, String) {
        let notify = NotifySocket::bind();
        let mut vars = env.to_vec();
        vars.push(("NOTIFY_SOCKET", notify.path.to_str().unwrap()));
        let daemon = DaemonProc::start_wrapped(wrapper, config, &vars);
        let ready = notify.wait_for("READY=1", READY_WITHIN).await;
        (daemon, notify, ready)
    }

    /// Sends SIGTERM and waits for the exit; the daemon must exit 0 within [`STOPS_WITHIN`].
    pub async fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.wait_exit(STOPS_WITHIN).await;
        assert!(
            status.success(),
            "SIGTERM: {status:?}; logs:\n{}",
            self.logs()
        );
    }
}

/// Each named output's content and modification time, to check later that nothing rewrote it.
pub fn output_files<'a>(
    env: &DemoEnv,
    names: impl IntoIterator<Item = &'a str>,
) -> Vec<(String, String, std::time::SystemTime)> {
    names
        .into_iter()
        .map(|name| {
            let p = env.out(name);
            let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
            (name.to_string(), read(&p), mtime)
        })
        .collect()
}

/// A restarted daemon said READY with every client valid, asked the provider nothing more than
/// `requests` in all, and left every output of `files` as it was (content and mtime).
pub fn assert_restart_reused(
    env: &DemoEnv,
    ready: &str,
    requests: usize,
    files: &[(String, String, std::time::SystemTime)],
) {
    assert!(ready.contains("5/5 clients valid"), "{ready}");
    assert_eq!(
        env.provider.requests().len(),
        requests,
        "no provider request on restart"
    );
    for (name, content, mtime) in files {
        let p = env.out(name);
        assert_eq!(&read(&p), content, "{name}");
        assert_eq!(
            std::fs::metadata(&p).unwrap().modified().unwrap(),
            *mtime,
            "{name} rewritten"
        );
    }
}

/// A test CA and a leaf it signed for `localhost` and `127.0.0.1`: (CA PEM, leaf PEM, leaf key
/// PEM).
pub fn test_ca() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    leaf_params.is_ca = IsCa::ExplicitNoCa;
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    (ca_cert.pem(), leaf.pem(), leaf_key.serialize_pem())
}

/// The built-in provider over HTTPS (`https://127.0.0.1:PORT`) with a certificate from a test
/// CA, and that CA's PEM for a client's `ca_file`. Clients may present a certificate; it is
/// recorded in each request's `client_cert`.
pub async fn tls_provider() -> (Provider, String) {
    let (ca, cert_chain_pem, key_pem) = test_ca();
    let identity = tokenwarden::provider::TlsIdentity {
        cert_chain_pem,
        key_pem,
    };
    (Provider::start_tls(&identity).await.unwrap(), ca)
}
