//! A client's `on_change` commands: run without a shell, with a fixed environment, their
//! output captured up to a bound, and their whole process group killed when they end, time out
//! or the daemon stops.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::ClientConfig;
use crate::token::rfc3339;

/// How many bytes of each of stdout and stderr of an `on_change` command are kept for the log.
pub const CAPTURE_LIMIT: usize = 4096;

/// The `PATH` of an `on_change` command: the system's directories, never the daemon's own.
pub const HOOK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The `LANG` of an `on_change` command when the daemon has none.
pub const HOOK_LANG: &str = "C.UTF-8";

/// The new token an `on_change` command is told about, in its environment.
#[derive(Debug, Clone, Copy)]
pub struct OnChangeEvent<'a> {
    /// The client's name (`TOKENWARDEN_CLIENT`).
    pub client: &'a str,
    /// The token's generation, rising by one per new token (`TOKENWARDEN_GENERATION`).
    pub generation: u64,
    /// When the token expires (`TOKENWARDEN_EXPIRES_AT`, RFC 3339 UTC).
    pub expires_at: SystemTime,
}

impl OnChangeEvent<'_> {
    /// The whole environment of an `on_change` command: [`HOOK_PATH`], `LANG` (`lang`, the
    /// daemon's, else [`HOOK_LANG`]) and the three `TOKENWARDEN_*` variables. Nothing else of
    /// the daemon's environment: it may hold secrets (`{ env = NAME }` sources) and
    /// `CREDENTIALS_DIRECTORY`.
    pub fn environment(&self, lang: Option<OsString>) -> Vec<(&'static str, OsString)> {
        vec![
            ("PATH", HOOK_PATH.into()),
            (
                "LANG",
                lang.filter(|l| !l.is_empty())
                    .unwrap_or_else(|| HOOK_LANG.into()),
            ),
            ("TOKENWARDEN_CLIENT", self.client.into()),
            ("TOKENWARDEN_GENERATION", self.generation.to_string().into()),
            ("TOKENWARDEN_EXPIRES_AT", rfc3339(self.expires_at).into()),
        ]
    }
}

/// The result of one `on_change` command.
#[derive(Debug)]
pub struct OnChangeReport {
    /// The command as configured.
    pub argv: Vec<String>,
    /// How it ended, or why it could not run.
    pub result: Result<CommandOutput, OnChangeError>,
}

/// A command that ran to its end (successfully or not: see [`CommandOutput::status`]).
#[derive(Debug)]
pub struct CommandOutput {
    /// Exit status; `status.success()` for exit code 0.
    pub status: ExitStatus,
    /// The first [`CAPTURE_LIMIT`] bytes of standard output, lossily decoded.
    pub stdout: String,
    /// The first [`CAPTURE_LIMIT`] bytes of standard error, lossily decoded.
    pub stderr: String,
    /// How long it ran.
    pub elapsed: Duration,
    /// Processes it left running in its process group when it exited (killed then).
    pub left_running: bool,
}

/// Why an `on_change` command did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum OnChangeError {
    /// The argv is empty.
    #[error("on_change command is empty")]
    Empty,
    /// The program could not be started (not found, not executable, …).
    #[error("cannot run on_change command {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    /// Waiting for the program failed.
    #[error("on_change command {program} could not be waited for: {source}")]
    Wait {
        program: String,
        #[source]
        source: io::Error,
    },
    /// It ran longer than the timeout; it and its process group were killed.
    #[error("on_change command {program} did not finish within {}; killed", humantime::format_duration(*timeout))]
    Timeout { program: String, timeout: Duration },
}

/// Runs each distinct non-empty `on_change` argv of `client`'s outputs once, one after the
/// other in the order the outputs list them: after all of the client's outputs are written,
/// each within `timeout` (30 s in the daemon).
pub async fn run_on_change(
    client: &ClientConfig,
    event: &OnChangeEvent<'_>,
    timeout: Duration,
) -> Vec<OnChangeReport> {
    let mut seen = HashSet::new();
    let mut reports = Vec::new();
    for out in &client.outputs {
        if out.on_change.is_empty() || !seen.insert(&out.on_change) {
            continue;
        }
        reports.push(OnChangeReport {
            argv: out.on_change.clone(),
            result: run_command(&out.on_change, event, timeout).await,
        });
    }
    reports
}

/// Runs `argv` without a shell, with the environment of [`OnChangeEvent::environment`] only,
/// stdin from /dev/null, stdout and stderr captured (the first [`CAPTURE_LIMIT`] bytes of
/// each), and no other descriptor (the daemon's are all close-on-exec: see
/// [`crate::sys::close_inherited_on_exec`]).
///
/// The command runs in a process group of its own, and nothing in that group outlives it:
/// whatever it left running when it exits, the whole group when it outlives `timeout`, and the
/// whole group when this future is dropped (the daemon stopping) are killed with SIGKILL.
pub async fn run_command(
    argv: &[String],
    event: &OnChangeEvent<'_>,
    timeout: Duration,
) -> Result<CommandOutput, OnChangeError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(OnChangeError::Empty);
    };
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env_clear()
        .envs(event.environment(std::env::var_os("LANG")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| OnChangeError::Spawn {
            program: program.clone(),
            source,
        })?;
    // Armed before anything can fail or be cancelled.
    let mut group = ProcessGroup(
        child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(nix::unistd::Pid::from_raw),
    );

    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    // The readers are aborted when the set is dropped, however this function ends.
    let mut readers = tokio::task::JoinSet::new();
    if let Some(r) = child.stdout.take() {
        readers.spawn(read_capped(r, Arc::clone(&stdout)));
    }
    if let Some(r) = child.stderr.take() {
        readers.spawn(read_capped(r, Arc::clone(&stderr)));
    }

    let status = match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(source)) => {
            group.kill();
            return Err(OnChangeError::Wait {
                program: program.clone(),
                source,
            });
        }
        Err(_elapsed) => {
            // The group first, while its leader (not yet reaped) still holds the group's id.
            group.kill();
            let _ = child.kill().await;
            return Err(OnChangeError::Timeout {
                program: program.clone(),
                timeout,
            });
        }
    };
    // What it left in its group: killed now. The group's id is the leader's pid, which stays
    // reserved while the group has a member; an empty group's id could only have been taken by
    // a new group in the instant since the leader was reaped (pids are handed out in rising
    // order up to pid_max before any is reused).
    let left_running = group.kill();
    // Readers still reading at the deadline (a pipe held open by a grandchild that left the
    // group) are aborted with the set.
    let drained = async { while readers.join_next().await.is_some() {} };
    let _ = tokio::time::timeout_at(deadline, drained).await;
    let text = |buf: &Mutex<Vec<u8>>| {
        buf.lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    Ok(CommandOutput {
        status,
        stdout: text(&stdout),
        stderr: text(&stderr),
        elapsed: started.elapsed(),
        left_running,
    })
}

/// A command's process group, killed (SIGKILL) at the latest when this is dropped.
struct ProcessGroup(Option<nix::unistd::Pid>);

impl ProcessGroup {
    /// Kills every process left in the group, once; whether there was any.
    fn kill(&mut self) -> bool {
        self.0.take().is_some_and(|pgid| {
            nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL).is_ok()
        })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads `r` to its end, keeping the first [`CAPTURE_LIMIT`] bytes in `kept` and draining the
/// rest so the command never blocks on a full pipe.
async fn read_capped(mut r: impl AsyncRead + Unpin, kept: Arc<Mutex<Vec<u8>>>) {
    let mut chunk = [0u8; 4096];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut k) = kept.lock() {
                    let room = CAPTURE_LIMIT.saturating_sub(k.len());
                    k.extend_from_slice(&chunk[..n.min(room)]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_change_environment_is_these_five_only() {
        let event = OnChangeEvent {
            client: "api",
            generation: 7,
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_460_400),
        };
        let env = |lang: Option<&str>| -> Vec<(&str, String)> {
            event
                .environment(lang.map(OsString::from))
                .into_iter()
                .map(|(k, v)| (k, v.to_string_lossy().into_owned()))
                .collect()
        };
        let want = |lang: &str| -> Vec<(&str, String)> {
            vec![
                ("PATH", HOOK_PATH.to_string()),
                ("LANG", lang.to_string()),
                ("TOKENWARDEN_CLIENT", "api".to_string()),
                ("TOKENWARDEN_GENERATION", "7".to_string()),
                ("TOKENWARDEN_EXPIRES_AT", "2026-11-23T19:00:00Z".to_string()),
            ]
        };
        assert_eq!(env(Some("fr_FR.UTF-8")), want("fr_FR.UTF-8"));
        assert_eq!(env(None), want("C.UTF-8"));
        assert_eq!(env(Some("")), want("C.UTF-8"));
    }
}
