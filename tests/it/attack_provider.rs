//! A hostile token endpoint: successes whose body is not a token response but holds tokens,
//! and errors that quote back every secret the request carried (the client secret, the
//! password, the Basic value and its decoded parts, assertions, refresh tokens), some of them
//! right across the length a description is cut to. Whatever it sends, no secret and no token
//! reaches the daemon's trace logs, `status --json`, the gRPC error text or `once`'s stderr,
//! and the error still names the status, content type and length.

use std::time::Duration;

use tokenwarden::provider::Fault;

use crate::support::{DaemonProc, DemoEnv, run, run_env, secret_material};

/// A body the provider sends, and what the error must still say about it.
struct Hostile {
    name: &'static str,
    fault: Fault,
    says: &'static str,
}

/// Made-up tokens the hostile provider puts in its bodies, never sent by tokenwarden.
struct Planted {
    access: String,
    refresh: String,
    jwt: String,
}

impl Planted {
    fn new() -> Planted {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let id = uuid::Uuid::new_v4().simple().to_string();
        Planted {
            access: format!("AT-planted-{id}"),
            refresh: format!("RT-planted-{id}"),
            jwt: format!(
                "{}.{}.{}",
                b64(r#"{"alg":"HS256","typ":"JWT"}"#),
                b64(&format!(r#"{{"sub":"planted-{id}","exp":4102444800}}"#)),
                b64(&format!("sig-{id}"))
            ),
        }
    }

    fn all(&self) -> Vec<String> {
        vec![self.access.clone(), self.refresh.clone(), self.jwt.clone()]
    }
}

fn custom(status: u16, content_type: &str, body: String) -> Fault {
    Fault::Custom {
        status,
        content_type: content_type.into(),
        body: body.into_bytes(),
    }
}

fn hostile_bodies(p: &Planted) -> Vec<Hostile> {
    let (at, rt, jwt) = (&p.access, &p.refresh, &p.jwt);
    vec![
        Hostile {
            name: "form-encoded success under a JSON-less content type",
            fault: custom(
                200,
                "text/plain",
                format!("access_token={at}&refresh_token={rt}&expires_in=60"),
            ),
            says: "(HTTP 200, text/plain,",
        },
        Hostile {
            name: "trailing bytes after the JSON",
            fault: custom(
                200,
                "application/json",
                format!(r#"{{"access_token":"{at}","refresh_token":"{rt}"}} {at}"#),
            ),
            says: "(HTTP 200, application/json,",
        },
        Hostile {
            name: "expires_in 1e400",
            fault: custom(
                200,
                "application/json",
                format!(r#"{{"access_token":"{at}","refresh_token":"{rt}","expires_in":1e400}}"#),
            ),
            says: "syntax error at line 1",
        },
        Hostile {
            name: "a huge integer expires_in",
            fault: custom(
                200,
                "application/json",
                format!(
                    r#"{{"access_token":"{jwt}","refresh_token":"{rt}","expires_in":1{}}}"#,
                    "0".repeat(400)
                ),
            ),
            says: "(HTTP 200, application/json,",
        },
        Hostile {
            name: "the token in an unexpected type",
            fault: custom(
                200,
                "application/json",
                format!(r#"{{"access_token":{{"value":"{at}"}},"token_type":["{rt}"]}}"#),
            ),
            says: "access_token is a object",
        },
        Hostile {
            name: "expires_in quoting a token",
            fault: custom(
                200,
                "application/json",
                format!(r#"{{"access_token":"{at}","expires_in":"{rt}"}}"#),
            ),
            says: "expires_in is a string that is not a number",
        },
        Hostile {
            name: "an HTML page with tokens in a success",
            fault: custom(
                200,
                "text/html",
                format!("<html><p>your token: {at}</p><p>{jwt}</p></html>"),
            ),
            says: "(HTTP 200, text/html,",
        },
        Hostile {
            name: "an error quoting every value sent",
            fault: Fault::Echo {
                status: 401,
                html: false,
                pad: 0,
            },
            says: "invalid_client: client secret",
        },
        Hostile {
            name: "an error quoting every value sent, the first across the 300-character cut",
            fault: Fault::Echo {
                status: 400,
                html: false,
                pad: 282,
            },
            says: "(HTTP 400",
        },
        Hostile {
            name: "an HTML error page quoting every value sent",
            fault: Fault::Echo {
                status: 502,
                html: true,
                pad: 0,
            },
            says: "HTTP 502 from the token endpoint: <html>",
        },
        Hostile {
            name: "an HTML error page quoting every value sent across the 200-character cut",
            fault: Fault::Echo {
                status: 503,
                html: true,
                pad: 161,
            },
            says: "HTTP 503 from the token endpoint",
        },
        Hostile {
            name: "an error quoting tokens it never issued to us",
            fault: custom(
                400,
                "application/json",
                serde_json::json!({
                    "error": "invalid_grant",
                    "error_description": format!(
                        "refresh_token={rt} is revoked; id_token: {jwt}; access_token \"{at}\""
                    ),
                })
                .to_string(),
            ),
            says: "invalid_grant: refresh_token=[redacted] is revoked",
        },
    ]
}

/// Fails if `text` (shown at `place`) holds any secret so far, then if it does not say `says`.
fn check(env: &DemoEnv, planted: &Planted, place: &str, text: &str, says: &str) {
    let found: Vec<String> = secret_material(env, planted.all())
        .into_iter()
        .filter(|s| text.contains(s.as_str()))
        .collect();
    assert!(found.is_empty(), "{place} shows {found:?}:\n{text}");
    assert!(
        text.contains(says),
        "{place} does not say {says:?}:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_answers_leak_no_secret() {
    let env = DemoEnv::start(Duration::from_secs(3600)).await;
    env.edit_config(|t| {
        t.replace("log_level = \"info\"", "log_level = \"trace\"")
            .replace("retry_initial = \"1s\"", "retry_initial = \"30s\"")
            .replace("retry_max = \"10s\"", "retry_max = \"60s\"")
            // Every `refresh` asks the provider, however soon after the last token.
            .replace("min_interval = \"2s\"", "min_interval = \"0s\"")
    });
    let planted = Planted::new();
    let cases = hostile_bodies(&planted);
    let config = env.config_path().to_string();

    // `once`, with no state: the first request of every client meets the hostile answer.
    for case in &cases {
        env.provider.set_fault(Some(case.fault.clone()));
        let r = run_env(
            &["once", "-c", &config, "--log-level", "trace"],
            &[("TOKENWARDEN_LOG", "trace")],
        )
        .await;
        assert_ne!(r.code, 0, "{}: once succeeded", case.name);
        let place = format!("once, {}", case.name);
        check(&env, &planted, &place, &(r.stderr + &r.stdout), case.says);
    }

    // The daemon: good tokens first (so creads-files holds a refresh token to present), then
    // every hostile answer to a refresh of every client.
    env.provider.set_fault(None);
    let (mut daemon, _notify, ready) = DaemonProc::start_ready(&env.demo.config, &[]).await;
    assert!(ready.contains("5/5 clients valid"), "{ready}");
    let socket = env.demo.socket.to_str().unwrap().to_string();
    for case in &cases {
        env.provider.set_fault(Some(case.fault.clone()));
        for client in &env.demo.clients {
            let r = run(&["refresh", client, "-s", &socket]).await;
            assert_ne!(r.code, 0, "{}: refresh {client} succeeded", case.name);
            let place = format!("the gRPC error of refresh {client}, {}", case.name);
            check(&env, &planted, &place, &(r.stderr + &r.stdout), case.says);
        }
        let status = run(&["status", "--json", "-s", &socket]).await;
        let place = format!("status --json, {}", case.name);
        check(&env, &planted, &place, &status.stdout, case.says);
    }
    daemon.stop().await;

    let secrets = secret_material(&env, planted.all());
    assert!(
        secrets.iter().any(|s| s.starts_with("twr_")),
        "a refresh token was presented"
    );
    assert!(
        secrets.iter().any(|s| s.starts_with("eyJ")),
        "assertions were sent"
    );
    check(
        &env,
        &planted,
        "the daemon's trace log",
        &daemon.logs(),
        "token request failed",
    );
}
