//! Attacks on who may call the daemon and on what its hooks are given: supplementary groups
//! taken from the socket (not from `/proc`), client names not enumerable by strangers, and
//! `on_change` commands that get a clean environment, no inherited descriptor, and leave
//! nothing running.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::support::{DaemonProc, DemoEnv, NotifySocket, READY_WITHIN, STOPS_WITHIN, wait_for};

/// Whether `pid` no longer runs (gone, or a zombie nobody reaped).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn pids_in(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

/// The demo config with transatel's secret taken from `$TW_ATTACK_SECRET` and one more
/// transatel output whose `on_change` is `script` (run by /bin/sh).
fn with_hook(env: &DemoEnv, script: &str) {
    let hook = env.out("hook.token");
    env.edit_config(|text| {
        let mut out = String::new();
        for line in text.lines() {
            if line.starts_with("client_secret = { file = ") && line.contains("transatel") {
                out.push_str("client_secret = { env = \"TW_ATTACK_SECRET\" }\n");
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        assert!(out.contains("TW_ATTACK_SECRET"), "{text}");
        out.push_str(&format!(
            "\n[[clients.transatel.outputs]]\npath = {:?}\nformat = \"token\"\non_change = [\"/bin/sh\", \"-c\", {:?}]\n",
            hook.display().to_string(),
            script
        ));
        out
    });
}

/// Starts the daemon through a shell that leaves descriptors 7 and 9 open (not
/// close-on-exec) across its exec, as a careless parent would; waits for READY=1.
async fn start_leaky(env: &DemoEnv, vars: &[(&str, &str)]) -> (DaemonProc, NotifySocket) {
    let notify = NotifySocket::bind();
    let mut vars = vars.to_vec();
    vars.push(("NOTIFY_SOCKET", notify.path.to_str().unwrap()));
    let daemon = DaemonProc::start_wrapped(
        &[
            "/bin/sh",
            "-c",
            "exec 7</dev/null 9<\"$0\"; exec \"$@\"",
            env.config_path(),
        ],
        Path::new(env.config_path()),
        &vars,
    );
    notify.wait_for("READY=1", READY_WITHIN).await;
    (daemon, notify)
}

#[tokio::test]
async fn a_hook_gets_a_clean_environment_no_inherited_descriptor_and_leaves_nothing_running() {
    let env = DemoEnv::start(Duration::from_secs(3600)).await;
    let secret = env.secret("transatel");
    let d = env.dir.path().join("hook");
    std::fs::create_dir(&d).unwrap();
    // Its environment as the daemon gave it; a background child; then, once its pid is
    // written, the hook becomes `sleep` (no shell descriptor of its own) for the test to look at.
    let script = format!(
        "d='{}'; tr '\\0' '\\n' < /proc/$$/environ > \"$d/env\"; \
         sleep 300 >/dev/null 2>&1 & echo $! > \"$d/bg\"; echo $$ > \"$d/pid\"; exec sleep 300",
        d.display()
    );
    with_hook(&env, &script);
    let (mut daemon, _notify) = start_leaky(
        &env,
        &[
            ("TW_ATTACK_SECRET", secret.trim()),
            (
                "CREDENTIALS_DIRECTORY",
                "/run/credentials/tokenwarden.service",
            ),
            ("TW_ATTACK_OTHER", "inherited"),
            ("LANG", "de_DE.UTF-8"),
            ("PATH", "/opt/attacker/bin:/usr/bin:/bin"),
        ],
    )
    .await;
    let pid = d.join("pid");
    wait_for("the hook to run", Duration::from_secs(20), || {
        std::fs::read_to_string(&pid).is_ok_and(|p| {
            std::fs::read_to_string(format!("/proc/{}/comm", p.trim()))
                .is_ok_and(|c| c.trim() == "sleep")
        })
    })
    .await;
    let pid = pids_in(&pid)[0];

    // The environment: exactly these five, nothing of the daemon's.
    let text = std::fs::read_to_string(d.join("env")).unwrap();
    let vars: BTreeMap<&str, &str> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.split_once('=').unwrap())
        .collect();
    let names: Vec<&str> = vars.keys().copied().collect();
    assert_eq!(
        names,
        [
            "LANG",
            "PATH",
            "TOKENWARDEN_CLIENT",
            "TOKENWARDEN_EXPIRES_AT",
            "TOKENWARDEN_GENERATION"
        ],
        "{text}"
    );
    assert_eq!(vars["PATH"], tokenwarden::outputs::HOOK_PATH);
    assert_eq!(vars["LANG"], "de_DE.UTF-8");
    assert_eq!(vars["TOKENWARDEN_CLIENT"], "transatel");
    assert_eq!(vars["TOKENWARDEN_GENERATION"], "1");
    let expires = humantime::parse_rfc3339(vars["TOKENWARDEN_EXPIRES_AT"]).unwrap();
    assert!(expires > std::time::SystemTime::now() + Duration::from_secs(3000));
    assert!(!text.contains(secret.trim()), "the secret reached the hook");

    // Descriptors: 0, 1 and 2 only (not the 7 and 9 the daemon inherited, nor its own).
    let mut fds: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    fds.sort_unstable();
    let targets: Vec<String> = fds
        .iter()
        .map(|fd| {
            let t = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap_or_default();
            format!("{fd} -> {}", t.display())
        })
        .collect();
    assert_eq!(fds, [0, 1, 2], "{targets:?}");

    // The hook ends (killed, as it would exit): what it left running in its group goes too.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // What it left running in its group is killed when it exits.
    let bg = pids_in(&d.join("bg"))[0];
    wait_for(
        "the hook's background child to be killed",
        Duration::from_secs(10),
        || gone(bg),
    )
    .await;
    daemon
        .wait_log("on_change left processes running", Duration::from_secs(10))
        .await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_hook_running_when_the_daemon_stops_is_killed_with_its_group() {
    let env = DemoEnv::start(Duration::from_secs(3600)).await;
    let secret = env.secret("transatel");
    let d = env.dir.path().join("hook");
    std::fs::create_dir(&d).unwrap();
    let script = format!(
        "sleep 300 >/dev/null 2>&1 & echo $$ $! > '{}/pids'; wait",
        d.display()
    );
    with_hook(&env, &script);
    let (mut daemon, _notify) = start_leaky(&env, &[("TW_ATTACK_SECRET", secret.trim())]).await;
    let pids = d.join("pids");
    wait_for("the hook to start", Duration::from_secs(20), || {
        std::fs::read_to_string(&pids).is_ok_and(|t| t.split_whitespace().count() == 2)
    })
    .await;
    let pids = pids_in(&pids);
    assert!(pids.iter().all(|&p| !gone(p)));
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let status = daemon.wait_exit(STOPS_WITHIN).await;
    assert!(status.success(), "{status:?}; logs:\n{}", daemon.logs());
    for pid in pids {
        wait_for(
            &format!("hook process {pid} to die"),
            Duration::from_secs(5),
            || gone(pid),
        )
        .await;
    }
}

// === callers ===

/// Groups no user of this machine has: only the test's children are in them.
const READERS: u32 = 47_321;
/// The group allowed to see every process in the daemon's private /proc (none of ours).
const PROC_VIEWERS: u32 = 47_322;

/// Runs `tokenwarden ARGS` as uid/gid 65534 with exactly the supplementary `groups`.
async fn run_as_nobody(groups: &[u32], args: &[&str]) -> crate::support::Run {
    let groups = if groups.is_empty() {
        "--clear-groups".to_string()
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        format!("--groups={}", list.join(","))
    };
    crate::support::run_setpriv(&["--reuid=65534", "--regid=65534", &groups], args).await
}

/// Whether this machine lets a test give a child a private /proc (a mount namespace and
/// `mount -t proc`): root with CAP_SYS_ADMIN, `unshare` and `setpriv` present.
fn private_proc_possible() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root to run children as other users".into());
    }
    let probe = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("mount -t proc -o hidepid=invisible proc /proc")
        .output();
    match probe {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "cannot mount a private /proc: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run unshare: {e}")),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_by_supplementary_group_is_allowed_when_the_daemon_cannot_see_its_process() {
    if let Err(why) = private_proc_possible() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let env = DemoEnv::start(Duration::from_secs(3600)).await;
    env.open_socket_to_everyone();
    env.edit_config(|t| {
        t.replace(
            "[clients.transatel]\n",
            &format!("[clients.transatel]\nallow_groups = [{READERS}]\n"),
        )
    });
    // The daemon as under `ProtectProc=invisible`: its own /proc shows other users'
    // processes only to members of PROC_VIEWERS, and it runs without CAP_SYS_PTRACE.
    let notify = NotifySocket::bind();
    let daemon = DaemonProc::start_wrapped(
        &[
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            &format!(
                "mount -t proc -o hidepid=invisible,gid={PROC_VIEWERS} proc /proc && \
                 exec setpriv --bounding-set=-sys_ptrace --inh-caps=-sys_ptrace -- \"$@\""
            ),
            "sh",
        ],
        Path::new(env.config_path()),
        &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())],
    );
    notify.wait_for("READY=1", READY_WITHIN).await;
    let s = env.demo.socket.to_str().unwrap();

    // The daemon really cannot see a process of uid 65534.
    let mut sleeper = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sleep",
            "300",
        ])
        .spawn()
        .unwrap();
    let seen = std::process::Command::new("nsenter")
        .arg(format!("--mount=/proc/{}/ns/mnt", daemon.pid()))
        .args([
            "setpriv",
            "--bounding-set=-sys_ptrace",
            "--inh-caps=-sys_ptrace",
            "--",
        ])
        .args(["test", "-e", &format!("/proc/{}/status", sleeper.id())])
        .status()
        .unwrap();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(
        !seen.success(),
        "the daemon's /proc shows other users' processes"
    );

    let r = run_as_nobody(&[READERS], &["get", "transatel", "-s", s]).await;
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, daemon.logs());
    assert_eq!(
        env.provider.token_owner(r.stdout.trim_end()).as_deref(),
        Some(tokenwarden::demo::TRANSATEL_ID)
    );
    // Not a member: denied.
    let r = run_as_nobody(&[], &["get", "transatel", "-s", s]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stderr.contains("not allowed"), "{}", r.stderr);
}

/// Set (to the socket's path) in the environment of the test binary re-run as another user by
/// [`name_enumeration_is_refused_to_strangers`]: [`rpc_helper`] then makes the calls.
const HELPER_SOCKET: &str = "TW_ATTACK_RPC_SOCKET";
/// The names [`rpc_helper`] tries, comma-separated.
const HELPER_NAMES: &str = "TW_ATTACK_RPC_NAMES";

/// Not a test on its own: does nothing unless [`HELPER_SOCKET`] is set. Then calls
/// `GetToken`, `WatchToken` and `RefreshToken` for each of [`HELPER_NAMES`] and prints one
/// `RPC NAME CODE MESSAGE` line per call.
#[tokio::test]
async fn rpc_helper() {
    let (Ok(socket), Ok(names)) = (std::env::var(HELPER_SOCKET), std::env::var(HELPER_NAMES))
    else {
        return;
    };
    use tokenwarden::grpc::pb;
    let mut c = tokenwarden::client::connect(Path::new(&socket))
        .await
        .unwrap();
    let line = |rpc: &str, name: &str, r: Result<(), tonic::Status>| match r {
        Ok(()) => println!("RPC {rpc} {name} Ok"),
        Err(s) => println!("RPC {rpc} {name} {:?} {}", s.code(), s.message()),
    };
    for name in names.split(',') {
        let r = c
            .get_token(pb::GetTokenRequest {
                client: name.into(),
                min_valid_for: None,
            })
            .await;
        line("GetToken", name, r.map(drop));
        let r = c
            .watch_token(pb::WatchTokenRequest {
                client: name.into(),
            })
            .await;
        line("WatchToken", name, r.map(drop));
        let r = c
            .refresh_token(pb::RefreshTokenRequest {
                client: name.into(),
            })
            .await;
        line("RefreshToken", name, r.map(drop));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn name_enumeration_is_refused_to_strangers() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: needs root to run a caller as uid 65534");
        return;
    }
    let env = DemoEnv::start(Duration::from_secs(3600)).await;
    env.open_socket_to_everyone();
    let (mut daemon, _notify, _) = DaemonProc::start_ready(Path::new(env.config_path()), &[]).await;
    let s = env.demo.socket.to_str().unwrap();
    const MISSING: &str = "no-such-client";

    // Every RPC taking a name, as uid 65534: the same answer for a client it may not read
    // and for a name no client has.
    let exe = std::env::current_exe().unwrap();
    let out = tokio::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&exe)
        .args(["--exact", "attack_callers::rpc_helper", "--nocapture"])
        .args(["--test-threads=1"])
        .env(HELPER_SOCKET, s)
        .env(HELPER_NAMES, format!("talkdesk,{MISSING}"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: BTreeMap<(String, String), String> = stdout
        .lines()
        // The test harness may print its "test ... " on the first line.
        .filter_map(|l| l.split_once("RPC ").map(|(_, rest)| rest))
        .map(|l| {
            let mut p = l.splitn(3, ' ');
            let (rpc, name, rest) = (p.next().unwrap(), p.next().unwrap(), p.next().unwrap());
            ((rpc.to_string(), name.to_string()), rest.to_string())
        })
        .collect();
    for rpc in ["GetToken", "WatchToken", "RefreshToken"] {
        let answer = |name: &str| {
            answers
                .get(&(rpc.to_string(), name.to_string()))
                .unwrap_or_else(|| panic!("no {rpc} answer for {name}: {stdout}"))
        };
        let (existing, missing) = (answer("talkdesk"), answer(MISSING));
        assert!(
            existing.starts_with("PermissionDenied "),
            "{rpc}: {existing}"
        );
        assert_eq!(
            missing.replace(MISSING, "NAME"),
            existing.replace("talkdesk", "NAME"),
            "{rpc}: a stranger can tell a missing name from a forbidden one"
        );
    }

    // The command line says the same for both.
    for cmd in ["get", "refresh"] {
        let existing = run_as_nobody(&[], &[cmd, "talkdesk", "-s", s]).await;
        let missing = run_as_nobody(&[], &[cmd, MISSING, "-s", s]).await;
        assert_eq!(existing.code, 1, "{cmd}: {}", existing.stderr);
        assert!(
            existing.stderr.contains("not allowed"),
            "{}",
            existing.stderr
        );
        assert_eq!(
            (missing.code, missing.stderr.replace(MISSING, "NAME")),
            (existing.code, existing.stderr.replace("talkdesk", "NAME")),
            "{cmd}"
        );
    }

    // Root (and the daemon's user) still hear NOT_FOUND.
    let mut c = tokenwarden::client::connect(&env.demo.socket)
        .await
        .unwrap();
    let e = c
        .get_token(tokenwarden::grpc::pb::GetTokenRequest {
            client: MISSING.into(),
            min_valid_for: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let r = crate::support::run(&["get", MISSING, "-s", s]).await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("not found"), "{}", r.stderr);
    daemon.stop().await;
}
