//! The gRPC API on a real Unix socket of a real `tokenwarden run`, through a tonic client and
//! through the `get` / `status` / `refresh` commands: every RPC and error code, WatchToken
//! across generations and client removal, peer-credential access from another uid, socket
//! mode, stale and foreign files at the socket path, health, reflection, and the commands
//! with no daemon.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use tokenwarden::client;
use tokenwarden::grpc::pb;
use tokenwarden::grpc::pb::token_service_client::TokenServiceClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::{DaemonProc, DemoEnv, run, run_env, run_setpriv, wait_for};

/// Waits until the daemon answers on `socket`, and returns a client.
async fn connect(socket: &Path, daemon: &DaemonProc) -> TokenServiceClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match client::connect(socket).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no gRPC server on {}: {e}; logs:\n{}",
                    socket.display(),
                    daemon.logs()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// A channel for the health and reflection clients.
async fn channel(socket: &Path) -> Channel {
    let path = socket.to_path_buf();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

fn get(client: &str) -> pb::GetTokenRequest {
    pb::GetTokenRequest {
        client: client.into(),
        min_valid_for: None,
    }
}

fn with_timeout<T>(msg: T, d: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(d);
    r
}

fn expires(t: &pb::Token) -> SystemTime {
    SystemTime::try_from(t.expires_at.unwrap()).unwrap()
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Calls RefreshToken until it answers a generation after `generation` (once `min_interval` has
/// passed), within 10 s.
async fn refreshed_after(
    c: &mut TokenServiceClient<Channel>,
    client: &str,
    generation: u64,
) -> pb::Token {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = c
            .refresh_token(pb::RefreshTokenRequest {
                client: client.into(),
            })
            .await
            .unwrap()
            .into_inner();
        if t.generation > generation {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "{client}: no token after generation {generation}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until a token expiring at `expires` has less than `d` left (within 5 s).
async fn left_under(expires: SystemTime, d: Duration) {
    wait_for("the token to age", Duration::from_secs(5), || {
        expires < SystemTime::now() + d
    })
    .await;
}

/// The demo config without its `min_interval` floor between token requests.
fn no_min_interval(env: &DemoEnv) {
    env.edit_config(|t| t.replace("min_interval = \"2s\"", "min_interval = \"0s\""));
}

fn add_client(env: &DemoEnv, name: &str, url: &str, timeout: &str) {
    env.edit_config(|t| {
        format!(
            "{t}\n[clients.{name}]\ntoken_url = \"{url}\"\nclient_id = \"x\"\n\
             client_secret = \"s\"\ntimeout = \"{timeout}\"\nretry_initial = \"5s\"\n"
        )
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_and_error_code_over_the_socket() {
    let env = DemoEnv::start(Duration::from_secs(20)).await;
    // No min_interval floor but for creads-files, whose RefreshToken coalescing is tested.
    no_min_interval(&env);
    env.edit_config(|t| {
        t.replace(
            "scope = \"files\"\n",
            "scope = \"files\"\nmin_interval = \"2s\"\n",
        )
    });
    let broken = format!("http://127.0.0.1:{}/token", closed_port());
    add_client(&env, "broken", &broken, "2s");
    // A provider that accepts and never answers: the first token stays PENDING.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_url = format!("http://{}/token", hang.local_addr().unwrap());
    add_client(&env, "hanging", &hang_url, "60s");
    let hang_task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let socket = env.demo.socket.clone();
    let mut daemon = DaemonProc::start(&env.demo.config, &[]);
    let mut c = connect(&socket, &daemon).await;

    // GetToken while the first token is being fetched waits for it.
    let t = c.get_token(get("transatel")).await.unwrap().into_inner();
    assert_eq!(t.client, "transatel");
    assert_eq!(
        env.provider.token_owner(&t.access_token).as_deref(),
        Some(tokenwarden::demo::TRANSATEL_ID)
    );
    assert_eq!(t.token_type, "Bearer");
    assert_eq!(t.scopes, vec!["CATALOG_PRODUCTS_READ", "USER_READ"]);
    assert!(t.generation >= 1);
    assert!(expires(&t) > SystemTime::now());
    assert!(t.issued_at.is_some());

    // The socket file: a socket with the default mode 0660.
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);

    // NOT_FOUND, INVALID_ARGUMENT.
    let e = c.get_token(get("nope")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("nope"));
    let e = c.get_token(get("")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c.get_token(get("a/b")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    for (seconds, nanos) in [(-1, 0), (0, -1), (100_000, 0)] {
        let e = c
            .get_token(pb::GetTokenRequest {
                client: "transatel".into(),
                min_valid_for: Some(prost_types::Duration { seconds, nanos }),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{seconds} {nanos}: {e:?}");
    }
    // Longer than the tokens live: no refresh can meet it.
    let e = c
        .get_token(pb::GetTokenRequest {
            client: "transatel".into(),
            min_valid_for: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c
        .refresh_token(pb::RefreshTokenRequest {
            client: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .watch_token(pb::WatchTokenRequest {
            client: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // UNAVAILABLE at once, with the last error, for a client whose attempt failed.
    let start = Instant::now();
    let e = loop {
        let e = c.get_token(get("broken")).await.unwrap_err();
        if e.code() != Code::DeadlineExceeded {
            break e;
        }
    };
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("broken"), "{}", e.message());
    assert!(start.elapsed() < Duration::from_secs(5));
    let e = c
        .refresh_token(pb::RefreshTokenRequest {
            client: "broken".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    // PENDING: the wait ends at the call's deadline.
    let start = Instant::now();
    let e = c
        .get_token(with_timeout(get("hanging"), Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(start.elapsed() < Duration::from_secs(2));

    // min_valid_for longer than what is left: a new token first.
    let before = c.get_token(get("transatel")).await.unwrap().into_inner();
    left_under(expires(&before), Duration::from_secs(19)).await;
    let after = c
        .get_token(pb::GetTokenRequest {
            client: "transatel".into(),
            min_valid_for: Some(prost_types::Duration {
                seconds: 19,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(after.generation > before.generation, "{after:?}");
    assert_ne!(after.access_token, before.access_token);
    assert!(expires(&after) >= SystemTime::now() + Duration::from_secs(18));
    // Satisfied: the same token, no request.
    let same = c
        .get_token(pb::GetTokenRequest {
            client: "transatel".into(),
            min_valid_for: Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.generation, after.generation);

    // RefreshToken: a new token once min_interval (2 s) has passed since the last one; within
    // it, that fresh token is the answer, without a request.
    let creads = tokenwarden::demo::CREADS_ID;
    let first = c.get_token(get("creads-files")).await.unwrap().into_inner();
    let issued = env.provider.issued(creads);
    let r1 = refreshed_after(&mut c, "creads-files", first.generation).await;
    assert_eq!(env.provider.issued(creads), issued + 1);
    let r2 = c
        .refresh_token(pb::RefreshTokenRequest {
            client: "creads-files".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r1.generation, r2.generation,
        "coalesced within min_interval"
    );
    assert_eq!(env.provider.issued(creads), issued + 1);
    let r3 = refreshed_after(&mut c, "creads-files", r2.generation).await;
    assert_eq!(r3.generation, r2.generation + 1);
    assert_eq!(env.provider.issued(creads), issued + 2);
    assert_eq!(r3.scopes, vec!["files"]);

    // ListClients: every client, in name order, with states.
    let list = c
        .list_clients(pb::ListClientsRequest {})
        .await
        .unwrap()
        .into_inner()
        .clients;
    let names: Vec<&str> = list.iter().map(|s| s.client.as_str()).collect();
    assert_eq!(
        names,
        [
            "broken",
            "creads-files",
            "hanging",
            "talentsoft-app",
            "talentsoft-user",
            "talkdesk",
            "transatel"
        ]
    );
    let by = |n: &str| list.iter().find(|s| s.client == n).unwrap();
    assert_eq!(by("transatel").state, pb::State::Valid as i32);
    assert!(by("transatel").expires_at.is_some() && by("transatel").last_refresh_at.is_some());
    assert_eq!(by("broken").state, pb::State::Failed as i32);
    assert!(by("broken").consecutive_failures >= 1);
    assert!(!by("broken").last_error.is_empty());
    assert_eq!(by("hanging").state, pb::State::Pending as i32);

    // Health: SERVING, overall and for the service.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&socket).await);
    for service in ["", "tokenwarden.v1.TokenService"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }

    // Reflection, v1 and v1alpha.
    for services in [reflect_v1(&socket).await, reflect_v1alpha(&socket).await] {
        for want in ["tokenwarden.v1.TokenService", "grpc.health.v1.Health"] {
            assert!(services.iter().any(|s| s == want), "{services:?}");
        }
    }

    // A request over the size limit is refused.
    let e = c.get_token(get(&"x".repeat(5000))).await.unwrap_err();
    assert_ne!(e.code(), Code::Ok);

    // No token in the logs.
    let logs = daemon.logs();
    for t in [&t, &after, &r3] {
        assert!(!logs.contains(&t.access_token), "a token in the logs");
    }

    // Stop: the socket is removed.
    hang_task.abort();
    daemon.stop().await;
    assert!(!socket.exists(), "socket left behind");
}

/// `ListServices` over one version of the reflection protocol (v1 and v1alpha have the same
/// shape in different generated modules).
macro_rules! reflect {
    ($name:ident, $version:ident) => {
        async fn $name(socket: &Path) -> Vec<String> {
            use tonic_reflection::pb::$version::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
            };
            let mut c = ServerReflectionClient::new(channel(socket).await);
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut stream = c
                .server_reflection_info(futures_util::stream::iter([req]))
                .await
                .unwrap()
                .into_inner();
            let msg = stream.message().await.unwrap().unwrap();
            match msg.message_response.unwrap() {
                MessageResponse::ListServicesResponse(l) => {
                    l.service.into_iter().map(|s| s.name).collect()
                }
                other => panic!("{other:?}"),
            }
        }
    };
}
reflect!(reflect_v1, v1);
reflect!(reflect_v1alpha, v1alpha);

#[tokio::test(flavor = "multi_thread")]
async fn watch_token_follows_generations_and_ends_when_the_client_is_removed() {
    let env = DemoEnv::start(Duration::from_secs(4)).await;
    let socket = env.demo.socket.clone();
    let daemon = DaemonProc::start(&env.demo.config, &[]);
    let mut c = connect(&socket, &daemon).await;
    let mut stream = c
        .watch_token(pb::WatchTokenRequest {
            client: "talkdesk".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut generations = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while generations.len() < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        let t = tokio::time::timeout(left, stream.message())
            .await
            .expect("no new token on the watch stream in time")
            .unwrap()
            .unwrap();
        assert_eq!(t.client, "talkdesk");
        assert!(expires(&t) > SystemTime::now(), "an expired token was sent");
        assert_eq!(
            env.provider.token_owner(&t.access_token).as_deref(),
            Some(tokenwarden::demo::TALKDESK_ID)
        );
        generations.push(t.generation);
    }
    assert!(
        generations.windows(2).all(|w| w[1] > w[0]),
        "{generations:?}"
    );

    // Removing the client from the config ends the stream with NOT_FOUND.
    env.edit_config(|t| {
        let start = t.find("# Talkdesk").unwrap();
        t[..start].to_string()
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.message())
            .await
            .expect("the stream did not end after the client was removed")
        {
            Ok(Some(t)) => assert_eq!(t.client, "talkdesk"),
            Ok(None) => panic!("the stream ended without a status"),
            Err(e) => {
                assert_eq!(e.code(), Code::NotFound, "{e:?}");
                break;
            }
        }
    }
}

/// Runs `tokenwarden ARGS` as uid/gid 65534 (nobody), without supplementary groups.
async fn run_as_nobody(args: &[&str]) -> (i32, String, String) {
    run_as(65534, 65534, &[], args).await
}

/// Runs `tokenwarden ARGS` as `uid`, with primary group `gid` and exactly the supplementary
/// `groups`. The test process must be root.
async fn run_as(uid: u32, gid: u32, groups: &[u32], args: &[&str]) -> (i32, String, String) {
    let groups = if groups.is_empty() {
        "--clear-groups".to_string()
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        format!("--groups={}", list.join(","))
    };
    let ids = [format!("--reuid={uid}"), format!("--regid={gid}"), groups];
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let r = run_setpriv(&ids, args).await;
    (r.code, r.stdout, r.stderr)
}

/// The clients `status --json` shows to a caller.
fn listed(status_json: &str) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(status_json).unwrap_or_else(|e| panic!("{e}: {status_json:?}"));
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| c["client"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn peer_credentials_decide_who_may_read() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: needs root to run a child as another uid");
        return;
    }
    let env = DemoEnv::start(Duration::from_secs(30)).await;
    // Let nobody reach the socket: the directory traversable, the socket world-writable.
    env.open_socket_to_everyone();
    let socket = env.demo.socket.clone();
    let s = socket.to_str().unwrap();
    let daemon = DaemonProc::start(&env.demo.config, &[]);
    let mut c = connect(&socket, &daemon).await;
    let root_token = c.get_token(get("transatel")).await.unwrap().into_inner();

    let (code, out, err) = run_as_nobody(&["get", "transatel", "-s", s]).await;
    assert_eq!(code, 1, "{out} {err}");
    assert!(out.is_empty());
    assert!(
        err.contains("not allowed") && err.contains("65534"),
        "{err}"
    );
    assert!(!err.contains(&root_token.access_token));
    assert_eq!(err.lines().count(), 1, "{err}");
    // Nothing readable: an empty status.
    let (code, out, _) = run_as_nobody(&["status", "-s", s, "--json"]).await;
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        serde_json::json!([])
    );

    // Allowed after a reload with allow_users.
    env.edit_config(|t| {
        t.replace(
            "[clients.transatel]\n",
            "[clients.transatel]\nallow_users = [65534]\n",
        )
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let token = loop {
        let (code, out, err) = run_as_nobody(&["get", "transatel", "-s", s]).await;
        if code == 0 {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "still denied after the reload: {err}\n{}",
            daemon.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        env.provider.token_owner(token.trim_end()).as_deref(),
        Some(tokenwarden::demo::TRANSATEL_ID)
    );
    // Only what it may read.
    let (code, out, _) = run_as_nobody(&["status", "-s", s, "--json"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["client"], "transatel");
    // Other clients are still denied.
    let (code, _, err) = run_as_nobody(&["get", "talkdesk", "-s", s]).await;
    assert_eq!(code, 1);
    assert!(err.contains("not allowed"), "{err}");
    // Root reads everything.
    assert_eq!(
        c.list_clients(pb::ListClientsRequest {})
            .await
            .unwrap()
            .into_inner()
            .clients
            .len(),
        5
    );

    // With the default mode 0660, nobody cannot even connect.
    env.edit_config(|t| t.replace("socket_mode = \"0666\"\n", ""));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        if mode == 0o660 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "socket mode not changed on reload: {mode:o}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, _, err) = run_as_nobody(&["get", "transatel", "-s", s]).await;
    assert_eq!(code, 1);
    assert!(err.contains("permission denied on"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_socket_is_replaced_and_a_foreign_file_is_refused() {
    let env = DemoEnv::start(Duration::from_secs(30)).await;
    let socket = env.demo.socket.clone();
    // A socket file nobody listens on (a daemon killed with -9 leaves one).
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let (code, _, err) = {
        let r = run(&["status", "-s", socket.to_str().unwrap()]).await;
        (r.code, r.stdout, r.stderr)
    };
    assert_eq!(code, 1);
    assert!(err.contains("not running"), "{err}");
    let mut daemon = DaemonProc::start(&env.demo.config, &[]);
    let mut c = connect(&socket, &daemon).await;
    c.get_token(get("transatel")).await.unwrap();
    daemon.stop().await;
    assert!(!socket.exists());

    // A regular file at the path: refused, left alone, exit 1.
    std::fs::write(&socket, "not mine").unwrap();
    let mut daemon = DaemonProc::start(&env.demo.config, &[]);
    let status = daemon.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(1), "{}", daemon.logs());
    assert!(daemon.logs().contains("not a socket"), "{}", daemon.logs());
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "not mine");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_moves_the_socket() {
    let env = DemoEnv::start(Duration::from_secs(30)).await;
    let old = env.demo.socket.clone();
    let new: PathBuf = env.dir.path().join("run").join("moved.sock");
    let daemon = DaemonProc::start(&env.demo.config, &[]);
    connect(&old, &daemon).await;
    let old_text = old.display().to_string();
    env.edit_config(|t| t.replace(&old_text, &new.display().to_string()));
    let mut c = connect(&new, &daemon).await;
    c.get_token(get("transatel")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while old.exists() {
        assert!(Instant::now() < deadline, "the old socket was not removed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_get_status_refresh_against_a_daemon_and_without_one() {
    let env = DemoEnv::start(Duration::from_secs(20)).await;
    no_min_interval(&env);
    let socket = env.demo.socket.clone();
    let s = socket.to_str().unwrap();

    // No daemon: one clear line, exit 1.
    for args in [
        vec!["get", "transatel", "-s", s],
        vec!["status", "-s", s],
        vec!["refresh", "transatel", "-s", s],
    ] {
        let r = run(&args).await;
        assert_eq!(r.code, 1, "{args:?}: {}", r.stderr);
        assert!(r.stdout.is_empty());
        assert!(
            r.stderr.contains("tokenwarden is not running") && r.stderr.contains(s),
            "{}",
            r.stderr
        );
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    }

    let daemon = DaemonProc::start(&env.demo.config, &[]);
    let mut grpc = connect(&socket, &daemon).await;

    // get: token (the default), header, json.
    let r = run(&["get", "transatel", "-s", s]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let token = r.stdout.trim_end().to_string();
    assert_eq!(
        env.provider.token_owner(&token).as_deref(),
        Some(tokenwarden::demo::TRANSATEL_ID)
    );
    let r = run(&["get", "transatel", "-s", s, "--format", "header"]).await;
    assert_eq!(r.stdout, format!("Authorization: Bearer {token}\n"));
    let r = run(&["get", "transatel", "-s", s, "--format", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["access_token"], token.as_str());
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["scope"], "CATALOG_PRODUCTS_READ USER_READ");
    assert!(v["expires_at"].as_str().unwrap().ends_with('Z'));
    let generation = v["generation"].as_u64().unwrap();

    // The socket from the config (-c) or the environment, without -s.
    let r = run(&["get", "transatel", "-c", env.config_path()]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run_env(&["get", "transatel"], &[("TOKENWARDEN_SOCKET", s)]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);

    // --min-valid: a new token when the current one expires sooner.
    let current = grpc.get_token(get("transatel")).await.unwrap().into_inner();
    assert_eq!(current.generation, generation);
    left_under(expires(&current), Duration::from_secs(19)).await;
    let r = run(&[
        "get",
        "transatel",
        "-s",
        s,
        "--format",
        "json",
        "--min-valid",
        "19s",
    ])
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(v["generation"].as_u64().unwrap() > generation);

    // refresh: one line naming the new token by fingerprint, never the token.
    let r = run(&["refresh", "transatel", "-s", s]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("transatel: token "), "{}", r.stdout);
    let now = run(&["get", "transatel", "-s", s]).await.stdout;
    assert!(!r.stdout.contains(now.trim_end()));
    assert!(
        r.stdout
            .contains(&tokenwarden::secret::fingerprint(now.trim_end().as_bytes()))
    );

    // status: an aligned table of every client; --json.
    let r = run(&["status", "-s", s]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{}", r.stdout);
    assert!(lines[0].starts_with("CLIENT"));
    for col in [
        "STATE",
        "EXPIRES IN",
        "NEXT REFRESH",
        "FAILURES",
        "LAST ERROR",
    ] {
        let at = lines[0].find(col).unwrap();
        assert!(lines[1..].iter().all(|l| l.len() > at), "{col}");
    }
    let state_col = lines[0].find("STATE").unwrap();
    for l in &lines[1..] {
        assert_eq!(&l[state_col..state_col + 5], "VALID", "{}", r.stdout);
    }
    let r = run(&["status", "-s", s, "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 5);
    assert!(v.as_array().unwrap().iter().all(|c| c["state"] == "VALID"));

    // Errors from the daemon: one line, exit 1.
    let r = run(&["get", "nope", "-s", s]).await;
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("not found") && r.stderr.contains("nope"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.lines().count(), 1);
    let r = run(&["get", "transatel", "-s", s, "--min-valid", "1h"]).await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("invalid request"), "{}", r.stderr);
    drop(daemon);
}

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut v = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    v.extend(stream.to_be_bytes());
    v.extend(payload);
    v
}

/// The bytes a stock grpcio client sends for one unary call on a `unix:` target: the
/// percent-encoded socket path as `:authority` (RECIPE.md pitfall 1).
#[tokio::test(flavor = "multi_thread")]
async fn a_client_sending_the_socket_path_as_authority_is_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = DemoEnv::start(Duration::from_secs(30)).await;
    let socket = env.demo.socket.clone();
    let daemon = DaemonProc::start(&env.demo.config, &[]);
    connect(&socket, &daemon).await;
    let authority = socket.display().to_string().replace('/', "%2F");
    let mut enc = loona_hpack::Encoder::new();
    let mut out = tokenwarden::grpc::authority::PREFACE.to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[]));
    for (stream, method) in [(1u32, "ListClients"), (3, "ListClients")] {
        let path = format!("/tokenwarden.v1.TokenService/{method}");
        let headers = [
            (":scheme", "http"),
            (":method", "POST"),
            (":authority", authority.as_str()),
            (":path", path.as_str()),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
            (
                "user-agent",
                "grpc-python/1.68.0 grpc-c/44.0.0 (linux; chttp2)",
            ),
        ];
        let block = enc.encode(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
        out.extend(h2_frame(0x1, 0x4, stream, &block));
        out.extend(h2_frame(0x0, 0x1, stream, &[0, 0, 0, 0, 0]));
    }
    let mut conn = tokio::net::UnixStream::connect(&socket).await.unwrap();
    conn.write_all(&out).await.unwrap();
    // Read until both streams ended; decode the server's header blocks.
    let mut dec = loona_hpack::Decoder::new();
    let mut got = Vec::new();
    let mut statuses: Vec<(u32, String)> = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while statuses.len() < 2 {
        let n = tokio::time::timeout_at(deadline, conn.read(&mut buf))
            .await
            .expect("no answer to the grpcio-style calls")
            .unwrap();
        assert!(n > 0, "connection closed; statuses so far {statuses:?}");
        got.extend_from_slice(&buf[..n]);
        while got.len() >= 9 {
            let len =
                (usize::from(got[0]) << 16) | (usize::from(got[1]) << 8) | usize::from(got[2]);
            if got.len() < 9 + len {
                break;
            }
            let frame: Vec<u8> = got.drain(..9 + len).collect();
            let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]);
            assert_ne!(frame[3], 0x3, "RST_STREAM on stream {stream}");
            if frame[3] == 0x1 {
                for (name, value) in dec.decode(&frame[9..]).unwrap() {
                    if name == b"grpc-status" {
                        statuses.push((stream, String::from_utf8(value).unwrap()));
                    }
                }
            }
        }
    }
    statuses.sort();
    assert_eq!(statuses, vec![(1, "0".into()), (3, "0".into())]);
}

#[tokio::test(flavor = "multi_thread")]
async fn allow_groups_admits_members_by_primary_and_supplementary_group() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: needs root to run a child as another uid");
        return;
    }
    // Groups that no user of this machine has: only the test's children are in them.
    const READERS: u32 = 47_311;
    const OTHERS: u32 = 47_312;
    let env = DemoEnv::start(Duration::from_secs(30)).await;
    env.open_socket_to_everyone();
    env.edit_config(|t| {
        t.replace(
            "[clients.transatel]\n",
            &format!("[clients.transatel]\nallow_groups = [{READERS}]\n"),
        )
        .replace(
            "[clients.talkdesk]\n",
            &format!("[clients.talkdesk]\nallow_groups = [{OTHERS}, {READERS}]\n"),
        )
    });
    let socket = env.demo.socket.clone();
    let s = socket.to_str().unwrap();
    let daemon = DaemonProc::start(&env.demo.config, &[]);
    connect(&socket, &daemon).await;

    // A member of READERS, by supplementary group or by primary group: transatel and talkdesk
    // may be read, and only they are listed.
    for (how, gid, groups) in [
        ("supplementary", 65534, vec![READERS]),
        ("primary", READERS, vec![]),
    ] {
        let (code, out, err) = run_as(65534, gid, &groups, &["get", "transatel", "-s", s]).await;
        assert_eq!(code, 0, "{how}: {err}\n{}", daemon.logs());
        assert_eq!(
            env.provider.token_owner(out.trim_end()).as_deref(),
            Some(tokenwarden::demo::TRANSATEL_ID),
            "{how}"
        );
        let (code, _, err) = run_as(65534, gid, &groups, &["get", "talkdesk", "-s", s]).await;
        assert_eq!(code, 0, "{how}: {err}");
        let (code, _, err) = run_as(65534, gid, &groups, &["get", "creads-files", "-s", s]).await;
        assert_eq!(code, 1, "{how}");
        assert!(
            err.contains("not allowed"),
            "{how}: PERMISSION_DENIED: {err}"
        );
        let (code, out, err) = run_as(65534, gid, &groups, &["status", "-s", s, "--json"]).await;
        assert_eq!(code, 0, "{how}: {err}");
        assert_eq!(listed(&out), ["talkdesk", "transatel"], "{how}");
    }

    // A member of another group only: transatel is denied with PERMISSION_DENIED, talkdesk
    // (which allows that group too) is readable, and only talkdesk is listed.
    let (code, out, err) = run_as(65534, 65534, &[OTHERS], &["get", "transatel", "-s", s]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.is_empty());
    assert!(
        err.contains("not allowed") && err.contains("65534"),
        "{err}"
    );
    let (code, _, err) = run_as(65534, OTHERS, &[], &["get", "transatel", "-s", s]).await;
    assert_eq!(code, 1);
    assert!(err.contains("not allowed"), "{err}");
    let (code, _, err) = run_as(65534, 65534, &[OTHERS], &["get", "talkdesk", "-s", s]).await;
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run_as(65534, 65534, &[OTHERS], &["status", "-s", s, "--json"]).await;
    assert_eq!(code, 0);
    assert_eq!(listed(&out), ["talkdesk"]);
    // In no listed group: nothing.
    let (code, out, _) = run_as(65534, 65534, &[], &["status", "-s", s, "--json"]).await;
    assert_eq!(code, 0);
    assert!(listed(&out).is_empty(), "{out}");
}
