//! The state directory (docs/operations.md#files-and-state): round trips, modes, the lock, corrupt
//! files, reuse rules.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use tokenwarden::secret::Secret;
use tokenwarden::state::{StateDir, StateError, StoredState};
use tokenwarden::token::Token;

const ACCESS: &str = "access-SECRET-4f2a9c";
const REFRESH: &str = "refresh-SECRET-77b1e0";

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn stored(fingerprint: &str, issued: u64, expires: u64) -> StoredState {
    StoredState {
        fingerprint: fingerprint.into(),
        token: Some(Token {
            access_token: Secret::new(ACCESS),
            token_type: "Bearer".into(),
            issued_at: at(issued),
            expires_at: at(expires),
            scope: vec!["files".into(), "upload_files".into()],
        }),
        bound_to: None,
        next_refresh_at: None,
        refresh_token: Some(Secret::new(REFRESH)),
        generation: 4,
        spent_bootstrap: None,
    }
}

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

#[test]
fn save_and_load_round_trip_with_strict_modes() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("var/lib/tokenwarden");
    let dir = StateDir::open(&path).unwrap();
    assert_eq!(dir.path(), path);
    assert_eq!(mode_of(&path), 0o700);

    assert_eq!(dir.load("creads").unwrap(), None);
    let s = stored("fp1", 1_795_456_800, 1_795_460_400);
    dir.save("creads", &s).unwrap();
    assert_eq!(mode_of(&path.join("creads.json")), 0o600);
    assert_eq!(dir.load("creads").unwrap(), Some(s.clone()));

    let no_token = StoredState {
        token: None,
        generation: 5,
        ..s.clone()
    };
    dir.save("creads", &no_token).unwrap();
    assert_eq!(dir.load("creads").unwrap(), Some(no_token));

    dir.save("talkdesk", &s).unwrap();
    assert_eq!(dir.clients().unwrap(), ["creads", "talkdesk"]);
    dir.remove("creads").unwrap();
    dir.remove("creads").unwrap();
    assert_eq!(dir.load("creads").unwrap(), None);
    assert_eq!(dir.clients().unwrap(), ["talkdesk"]);

    let names: Vec<String> = fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tw-")), "{names:?}");
}

#[test]
fn the_file_is_readable_json_with_a_version() {
    let root = tempfile::tempdir().unwrap();
    let dir = StateDir::open(root.path()).unwrap();
    dir.save("c", &stored("fp", 1_795_456_800, 1_795_460_400))
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(root.path().join("c.json")).unwrap()).unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(v["client"], "c");
    assert_eq!(v["fingerprint"], "fp");
    assert_eq!(v["generation"], 4);
    assert_eq!(v["token"]["access_token"], ACCESS);
    assert_eq!(v["token"]["expires_at"], "2026-11-23T19:00:00Z");
    assert_eq!(v["token"]["expires_at_unix"], 1_795_460_400u64);
    assert_eq!(v["token"]["issued_at"], "2026-11-23T18:00:00Z");
    assert_eq!(v["refresh_token"], REFRESH);
}

#[test]
fn a_loose_existing_directory_is_tightened() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("state");
    fs::create_dir(&path).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    let _dir = StateDir::open(&path).unwrap();
    assert_eq!(mode_of(&path), 0o700);
}

#[test]
fn a_second_open_is_refused_while_the_first_holds_the_lock() {
    let root = tempfile::tempdir().unwrap();
    let first = StateDir::open(root.path()).unwrap();
    let e = StateDir::open(root.path()).unwrap_err();
    assert!(matches!(e, StateError::Locked(_)), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("another tokenwarden is using"), "{msg}");
    assert!(msg.contains(&root.path().display().to_string()), "{msg}");
    drop(first);
    let _again = StateDir::open(root.path()).unwrap();
}

#[test]
fn a_path_that_is_a_file_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("file");
    fs::write(&path, "x").unwrap();
    let e = StateDir::open(&path).unwrap_err();
    assert!(matches!(e, StateError::NotADirectory(_)), "{e:?}");
}

#[test]
fn a_corrupt_file_is_kept_aside_and_reads_as_absent_next_time() {
    let root = tempfile::tempdir().unwrap();
    let dir = StateDir::open(root.path()).unwrap();
    let file = root.path().join("c.json");
    for garbage in [
        format!("{{\"version\": 1, \"fingerprint\": \"fp\", \"refresh_token\": \"{REFRESH}"),
        format!("{{\"version\": 1, \"refresh_token\": \"{REFRESH}\"}}"),
        format!("{{\"version\": \"{REFRESH}\", \"fingerprint\": \"fp\"}}"),
        REFRESH.to_string(),
        String::new(),
    ] {
        fs::write(&file, &garbage).unwrap();
        let e = dir.load("c").unwrap_err();
        let StateError::Corrupt { kept_as, .. } = &e else {
            panic!("{e:?}")
        };
        let kept = kept_as.clone().expect("moved aside");
        assert!(
            kept.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("c.json.corrupt-"),
            "{kept:?}"
        );
        assert_eq!(
            fs::read_to_string(&kept).unwrap(),
            garbage,
            "kept, not deleted"
        );
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains(REFRESH), "{shown}");
        assert!(shown.contains(&file.display().to_string()), "{shown}");
        assert_eq!(dir.load("c").unwrap(), None);
    }
    // Five corrupt files kept side by side, none of them listed as a client.
    let kept = fs::read_dir(root.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".corrupt-")
        })
        .count();
    assert_eq!(kept, 5);
    assert_eq!(dir.clients().unwrap(), Vec::<String>::new());
}

#[test]
fn names_that_could_escape_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = StateDir::open(root.path()).unwrap();
    let s = stored("fp", 0, 1);
    for bad in ["", ".lock", "../x", "a/b", ".hidden", "..", "x y"] {
        assert!(
            matches!(dir.save(bad, &s), Err(StateError::BadName(_))),
            "{bad:?}"
        );
        assert!(matches!(dir.load(bad), Err(StateError::BadName(_))));
        assert!(matches!(dir.remove(bad), Err(StateError::BadName(_))));
    }
}

#[test]
fn stale_temporary_files_are_removed_on_open() {
    let root = tempfile::tempdir().unwrap();
    fs::write(root.path().join(".c.json.tw-AbC123"), "partial").unwrap();
    fs::write(root.path().join("keep.txt"), "x").unwrap();
    let _dir = StateDir::open(root.path()).unwrap();
    assert!(!root.path().join(".c.json.tw-AbC123").exists());
    assert!(root.path().join("keep.txt").exists());
}

#[test]
fn reuse_needs_the_same_identity_certificate_and_more_than_the_margin() {
    let s = stored("fp", 1000, 2000);
    let bound = StoredState {
        bound_to: Some("cert-a".into()),
        ..s.clone()
    };
    let margin = Duration::from_secs(30);
    let cases = [
        // (state, fingerprint, certificate now, now, token reused?, refresh token given?)
        (&s, "fp", None, 1000, true, true),
        (&s, "fp", None, 1969, true, true),
        (&s, "fp", None, 1970, false, true), // exactly the margin left
        (&s, "fp", None, 1990, false, true),
        (&s, "fp", None, 2000, false, true), // expired: the refresh token lives on
        (&s, "fp", None, 9999, false, true),
        (&s, "other", None, 1000, false, false),
        (&s, "other", None, 9999, false, false),
        // RFC 8705 §3: a token bound to a certificate is reused only with that certificate;
        // the refresh token is the client's, whatever its certificate.
        (&bound, "fp", Some("cert-a"), 1000, true, true),
        (&bound, "fp", Some("cert-b"), 1000, false, true),
        (&bound, "fp", None, 1000, false, true),
        (&s, "fp", Some("cert-a"), 1000, false, true),
    ];
    for (s, fp, cert, now, token, refresh) in cases {
        assert_eq!(
            s.reusable_token(fp, cert, margin, at(now)).is_some(),
            token,
            "{fp} {cert:?} at {now}"
        );
        assert_eq!(
            s.refresh_token_for(fp).map(Secret::expose),
            refresh.then_some(REFRESH),
            "{fp} at {now}"
        );
    }
    let none = StoredState {
        token: None,
        next_refresh_at: None,
        refresh_token: None,
        ..s.clone()
    };
    assert!(none.reusable_token("fp", None, margin, at(1000)).is_none());
    assert!(none.refresh_token_for("fp").is_none());
}

#[test]
fn nothing_secret_in_debug_or_errors() {
    let s = stored("fp", 1000, 2000);
    let shown = format!("{s:?}");
    assert!(
        !shown.contains(ACCESS) && !shown.contains(REFRESH),
        "{shown}"
    );

    let root = tempfile::tempdir().unwrap();
    let dir = StateDir::open(root.path()).unwrap();
    let shown = format!("{dir:?}");
    assert!(shown.contains(&root.path().display().to_string()));

    // A save that fails (the state file's place is taken by a non-empty directory).
    fs::create_dir_all(root.path().join("c.json/x")).unwrap();
    let e = dir.save("c", &s).unwrap_err();
    let shown = format!("{e} {e:?}");
    assert!(matches!(e, StateError::Write { .. }), "{shown}");
    assert!(shown.contains("client c"), "{shown}");
    assert!(
        !shown.contains(ACCESS) && !shown.contains(REFRESH),
        "{shown}"
    );
}

/// Issue 12, item 7: each token's planned refresh is kept in its state, and a restart keeps
/// it. 45 stored tokens 500 s into their 600 s, each planned a minute or more ahead: the
/// restart asks the provider for none of them, and every client's next refresh is exactly the
/// stored plan (without the plan, each would be drawn anew over what is left, some at once).
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_keeps_each_tokens_planned_refresh_and_asks_for_nothing_not_due() {
    use crate::support::{DaemonProc, DemoEnv, read, run};
    use serde_json::Value;
    use tokenwarden::token::rfc3339;

    let env = DemoEnv::start(Duration::from_secs(600)).await;
    env.edit_config(|t| {
        let start = t.find("[clients.transatel]\n").unwrap() + "[clients.transatel]\n".len();
        let end = t.find("[[clients.transatel.outputs]]").unwrap();
        let body = t[start..end].to_string();
        let mut t = t;
        for i in 0..40 {
            t.push_str(&format!("\n[clients.bulk-{i}]\n{body}"));
        }
        t
    });
    let status = |socket: String| async move {
        let r = run(&["status", "--json", "-s", &socket]).await;
        assert_eq!(r.code, 0, "{}", r.stderr);
        let v: Value = serde_json::from_str(&r.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let name = c["client"].as_str().unwrap().to_string();
                (name, c["next_refresh_at"].as_str().unwrap().to_string())
            })
            .collect::<std::collections::BTreeMap<String, String>>()
    };
    let socket = env.demo.socket.display().to_string();
    let state_of = |name: &str| -> Value {
        serde_json::from_str(&read(&env.demo.state_dir.join(format!("{name}.json")))).unwrap()
    };

    let (mut daemon, _notify, _) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    let planned = status(socket.clone()).await;
    assert_eq!(planned.len(), 45);
    for (name, at) in &planned {
        assert_eq!(
            &state_of(name)["next_refresh_at"],
            at,
            "{name}: the plan is saved"
        );
    }
    daemon.stop().await;
    let requests = env.provider.requests().len();
    assert_eq!(requests, 45);

    // Every token 500 s old, 100 s left (latest refresh 95 s ahead), planned 60 s + i ahead.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut want = std::collections::BTreeMap::new();
    for (i, name) in planned.keys().enumerate() {
        let mut s = state_of(name);
        s["token"]["issued_at_unix"] = (now - 500).into();
        s["token"]["expires_at_unix"] = (now + 100).into();
        let plan = now + 60 + i as u64 % 30;
        s["next_refresh_at_unix"] = plan.into();
        let path = env.demo.state_dir.join(format!("{name}.json"));
        fs::write(&path, serde_json::to_vec_pretty(&s).unwrap()).unwrap();
        want.insert(name.clone(), rfc3339(at(plan)));
    }

    let (mut daemon, _notify, ready) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    assert!(ready.contains("45/45 clients valid"), "{ready}");
    assert_eq!(status(socket.clone()).await, want, "every plan kept");
    assert_eq!(
        env.provider.requests().len(),
        requests,
        "no provider request for a token not due"
    );
    daemon.stop().await;
}
