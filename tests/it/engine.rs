//! The token engine against the built-in provider over real HTTP: the exact request each seed
//! dialect puts on the wire, and every failure mode and malformed answer.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokenwarden::config::ClientConfig;
use tokenwarden::demo;
use tokenwarden::oauth::{self, ErrorClass, OAuthError};
use tokenwarden::provider::{Fault, RecordedRequest};

use crate::support::DemoEnv;

fn client(env: &DemoEnv, name: &str) -> ClientConfig {
    (**env.config().clients.get(name).unwrap()).clone()
}

fn last_request(env: &DemoEnv) -> RecordedRequest {
    env.provider.requests().last().unwrap().clone()
}

fn form_names(r: &RecordedRequest) -> Vec<&str> {
    r.form.iter().map(|(k, _)| k.as_str()).collect()
}

fn decode_basic(r: &RecordedRequest) -> String {
    let h = r.header("authorization").unwrap();
    let b64 = h.strip_prefix("Basic ").unwrap();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

fn common_headers(r: &RecordedRequest) {
    assert_eq!(r.method, "POST");
    assert_eq!(
        r.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(r.header("accept"), Some("application/json"));
    assert!(r.header("user-agent").unwrap().starts_with("tokenwarden/"));
}

async fn get(_env: &DemoEnv, c: &ClientConfig) -> oauth::Acquired {
    let http = oauth::http_client(None).unwrap();
    oauth::acquire(&http, c, None, false).await.unwrap()
}

#[tokio::test]
async fn transatel_client_credentials_with_basic_auth() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let c = client(&env, "transatel");
    let got = get(&env, &c).await;
    let r = last_request(&env);
    common_headers(&r);
    assert_eq!(r.path, "/transatel/authentication/api/token");
    assert_eq!(
        decode_basic(&r),
        format!("{}:{}", demo::TRANSATEL_ID, env.secret("transatel"))
    );
    assert_eq!(form_names(&r), ["grant_type", "scope"]);
    assert_eq!(r.form_value("grant_type"), Some("client_credentials"));
    assert_eq!(
        r.form_value("scope"),
        Some("CATALOG_PRODUCTS_READ USER_READ")
    );
    let t = &got.issued.token;
    assert_eq!(t.token_type, "Bearer", "provider says 'bearer'");
    // The JWT's whole-second `exp` may cut the lifetime by a fraction of a second.
    assert!(t.lifetime() > Duration::from_secs(598) && t.lifetime() <= Duration::from_secs(600));
    assert!(
        oauth::jwt_expiry(t.access_token.expose()).is_some(),
        "Transatel tokens are JWTs"
    );
    assert!(env.provider.token_is_live(t.access_token.expose()));
    assert_eq!(
        t.scope,
        ["CATALOG_PRODUCTS_READ", "USER_READ"],
        "scope not echoed: the requested one"
    );
}

#[tokio::test]
async fn creads_password_then_rotating_refresh_tokens() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let c = client(&env, "creads-files");
    let got = get(&env, &c).await;
    let r = last_request(&env);
    common_headers(&r);
    assert_eq!(
        decode_basic(&r),
        format!("{}:{}", demo::CREADS_ID, env.secret("creads"))
    );
    assert_eq!(
        form_names(&r),
        ["grant_type", "username", "password", "scope"]
    );
    assert_eq!(r.form_value("username"), Some(demo::CREADS_USER));
    assert_eq!(
        r.form_value("password"),
        Some(env.secret("creads-password").as_str())
    );
    assert_eq!(r.form_value("scope"), Some("files"));
    assert_eq!(got.issued.token.scope, ["files"]);
    let rt1 = got.refresh_token.clone().unwrap();

    let http = oauth::http_client(None).unwrap();
    let second = oauth::acquire(&http, &c, Some(&rt1), false).await.unwrap();
    let r = last_request(&env);
    assert_eq!(form_names(&r), ["grant_type", "refresh_token", "scope"]);
    assert_eq!(r.form_value("refresh_token"), Some(rt1.expose()));
    assert_eq!(second.grant_type, "refresh_token");
    let rt2 = second.refresh_token.clone().unwrap();
    assert_ne!(rt1, rt2, "rotated");

    // The used refresh token is dead: the provider refuses it and the password grant steps in.
    let third = oauth::acquire(&http, &c, Some(&rt1), false).await.unwrap();
    assert_eq!(third.grant_type, "password");
    let refused = third.refresh_token_refused.unwrap();
    assert_eq!(refused.oauth_code(), Some("invalid_grant"));
    let grants = env.grants_at("/creads/");
    assert_eq!(
        grants,
        ["password", "refresh_token", "refresh_token", "password"]
    );
}

#[tokio::test]
async fn talentsoft_application_with_client_secret_post_and_string_expires_in() {
    let env = DemoEnv::start(Duration::from_secs(321)).await;
    let c = client(&env, "talentsoft-app");
    let got = get(&env, &c).await;
    let r = last_request(&env);
    common_headers(&r);
    assert_eq!(r.header("authorization"), None);
    assert_eq!(form_names(&r), ["grant_type", "client_id", "client_secret"]);
    assert_eq!(r.form_value("client_id"), Some(demo::TALENTSOFT_APP_ID));
    assert_eq!(
        r.form_value("client_secret"),
        Some(env.secret("talentsoft").as_str())
    );
    assert_eq!(got.issued.token.lifetime(), Duration::from_secs(321));
}

#[tokio::test]
async fn talentsoft_user_jwt_bearer_assertion() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let c = client(&env, "talentsoft-user");
    let before = tokenwarden::token::unix_seconds(SystemTime::now());
    get(&env, &c).await;
    let r = last_request(&env);
    common_headers(&r);
    assert_eq!(r.header("authorization"), None);
    assert_eq!(form_names(&r), ["grant_type", "assertion", "client_id"]);
    assert_eq!(
        r.form_value("grant_type"),
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    );
    let jwt = r.form_value("assertion").unwrap();
    let header = jsonwebtoken::decode_header(jwt).unwrap();
    assert_eq!(header.alg, Algorithm::HS256);
    let mut v = Validation::new(Algorithm::HS256);
    v.set_audience(&[demo::TALENTSOFT_AUDIENCE]);
    let key = DecodingKey::from_secret(env.secret("talentsoft-user").as_bytes());
    let claims = jsonwebtoken::decode::<Value>(jwt, &key, &v).unwrap().claims;
    assert_eq!(claims["iss"], demo::TALENTSOFT_USER_ID);
    assert_eq!(claims["sub"], "TalentSoftMarketPlace");
    assert_eq!(claims["email"], "jean.dupont@example.com");
    assert_eq!(claims["name"], "Jean Dupont");
    let iat = claims["iat"].as_u64().unwrap();
    assert!(iat >= before && iat <= before + 5);
    assert_eq!(claims["exp"].as_u64().unwrap() - iat, 300);
    assert!(uuid::Uuid::parse_str(claims["jti"].as_str().unwrap()).is_ok());
}

#[tokio::test]
async fn talkdesk_private_key_jwt_es256_with_kid() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let c = client(&env, "talkdesk");
    let got = get(&env, &c).await;
    let r = last_request(&env);
    common_headers(&r);
    assert_eq!(r.path, "/talkdesk-eu/oauth/token");
    assert_eq!(r.header("authorization"), None);
    assert_eq!(
        form_names(&r),
        [
            "grant_type",
            "client_id",
            "client_assertion_type",
            "client_assertion"
        ]
    );
    assert_eq!(r.form_value("client_id"), Some(demo::TALKDESK_ID));
    assert_eq!(
        r.form_value("client_assertion_type"),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    let jwt = r.form_value("client_assertion").unwrap();
    let header = jsonwebtoken::decode_header(jwt).unwrap();
    assert_eq!(header.alg, Algorithm::ES256);
    assert_eq!(header.kid.as_deref(), Some(demo::TALKDESK_KID));
    let token_url = c.token_url.as_str();
    let mut v = Validation::new(Algorithm::ES256);
    v.set_audience(&[token_url]);
    let key = DecodingKey::from_ec_pem(env.demo.talkdesk_public_key.as_bytes()).unwrap();
    let claims = jsonwebtoken::decode::<Value>(jwt, &key, &v).unwrap().claims;
    assert_eq!(claims["iss"], demo::TALKDESK_ID);
    assert_eq!(claims["sub"], demo::TALKDESK_ID);
    assert_eq!(claims["aud"], token_url);
    let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert!(lifetime <= 300, "{lifetime}");
    // A fresh jti every time.
    get(&env, &c).await;
    let jwt2 = last_request(&env)
        .form_value("client_assertion")
        .unwrap()
        .to_string();
    let claims2 = jsonwebtoken::decode::<Value>(&jwt2, &key, &v)
        .unwrap()
        .claims;
    assert_ne!(claims["jti"], claims2["jti"]);
    assert!(
        got.refresh_token.is_some(),
        "Talkdesk issues refresh tokens"
    );
}

#[tokio::test]
async fn wrong_credentials_and_scopes_are_refused_as_a_provider_would() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let http = oauth::http_client(None).unwrap();

    let mut c = client(&env, "transatel");
    if let tokenwarden::config::ClientAuth::Basic { secret } = &mut c.client_auth {
        secret.value = tokenwarden::secret::Secret::new("wrong-secret");
    }
    let e = oauth::acquire(&http, &c, None, false)
        .await
        .unwrap_err()
        .error;
    assert_eq!(e.oauth_code(), Some("invalid_client"));
    assert_eq!(e.class(), ErrorClass::Permanent { retry_after: None });
    assert!(e.to_string().contains("check client_id"), "{e}");
    assert!(!e.to_string().contains("wrong-secret"));

    // Talentsoft application with HTTP Basic instead of client_secret_post.
    let mut c = client(&env, "talentsoft-app");
    if let tokenwarden::config::ClientAuth::Post { secret } = &c.client_auth {
        c.client_auth = tokenwarden::config::ClientAuth::Basic {
            secret: secret.clone(),
        };
    }
    let e = oauth::acquire(&http, &c, None, false)
        .await
        .unwrap_err()
        .error;
    assert_eq!(e.oauth_code(), Some("invalid_client"), "{e}");

    let mut c = client(&env, "creads-files");
    c.scope = vec!["admin".into()];
    let e = oauth::acquire(&http, &c, None, false)
        .await
        .unwrap_err()
        .error;
    assert_eq!(e.oauth_code(), Some("invalid_scope"), "{e}");

    // An assertion for the wrong audience.
    let mut c = client(&env, "talentsoft-user");
    if let tokenwarden::config::Grant::JwtBearer { assertion } = &mut c.grant {
        assertion
            .claims
            .insert("aud".into(), "https://elsewhere.example".into());
    }
    let e = oauth::acquire(&http, &c, None, false)
        .await
        .unwrap_err()
        .error;
    assert_eq!(e.class(), ErrorClass::InvalidGrant, "{e}");

    // A wrong password: invalid_grant from the primary grant, nothing to fall back to.
    let mut c = client(&env, "creads-files");
    if let tokenwarden::config::Grant::Password { password, .. } = &mut c.grant {
        password.value = tokenwarden::secret::Secret::new("nope-nope");
    }
    let f = oauth::acquire(&http, &c, None, false).await.unwrap_err();
    assert_eq!(f.error.oauth_code(), Some("invalid_grant"));
    assert!(!f.forget_refresh_token);
}

/// One fault or malformed answer: what the client must conclude.
struct Case {
    name: &'static str,
    fault: Fault,
    want: fn(&Result<oauth::Acquired, oauth::AcquireFailure>) -> bool,
    message: &'static str,
}

fn custom(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Fault {
    Fault::Custom {
        status,
        content_type: content_type.into(),
        body: body.into(),
    }
}

fn err_class(r: &Result<oauth::Acquired, oauth::AcquireFailure>) -> Option<ErrorClass> {
    r.as_ref().err().map(|f| f.error.class())
}

fn retryable(r: &Result<oauth::Acquired, oauth::AcquireFailure>) -> bool {
    matches!(
        err_class(r),
        Some(ErrorClass::Retryable { retry_after: None })
    )
}

fn permanent(r: &Result<oauth::Acquired, oauth::AcquireFailure>) -> bool {
    matches!(err_class(r), Some(ErrorClass::Permanent { .. }))
}

#[tokio::test]
async fn every_failure_mode_gives_the_right_class_and_a_clear_message() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let mut c = client(&env, "talentsoft-app");
    c.timing.timeout = Duration::from_millis(800);
    let http = oauth::http_client(None).unwrap();
    let two_mib = format!(r#"{{"access_token":"{}"}}"#, "a".repeat(2 * 1024 * 1024));
    let cases = vec![
        Case {
            name: "500",
            fault: Fault::ServerError,
            want: retryable,
            message: "HTTP 500",
        },
        Case {
            name: "429 + Retry-After",
            fault: Fault::TooManyRequests { retry_after: 7 },
            want: |r| {
                err_class(r)
                    == Some(ErrorClass::Retryable {
                        retry_after: Some(Duration::from_secs(7)),
                    })
            },
            message: "HTTP 429",
        },
        Case {
            name: "invalid JSON",
            fault: Fault::InvalidJson,
            want: retryable,
            message: "malformed token response",
        },
        Case {
            name: "HTML page",
            fault: Fault::HtmlError,
            want: retryable,
            message: "HTTP 502 from the token endpoint: <!DOCTYPE html>",
        },
        Case {
            name: "hang",
            fault: Fault::Hang,
            want: retryable,
            message: "timed out after 800ms",
        },
        Case {
            name: "dropped connection",
            fault: Fault::DropConnection,
            want: retryable,
            message: "the connection broke",
        },
        Case {
            name: "truncated body",
            fault: Fault::TruncatedBody,
            want: retryable,
            message: "cut short",
        },
        Case {
            name: "missing access_token",
            fault: custom(200, "application/json", r#"{"token_type":"bearer"}"#),
            want: retryable,
            message: "no access_token",
        },
        Case {
            name: "empty access_token",
            fault: custom(200, "application/json", r#"{"access_token":""}"#),
            want: retryable,
            message: "access_token is empty",
        },
        Case {
            name: "number access_token",
            fault: custom(200, "application/json", r#"{"access_token":12345}"#),
            want: retryable,
            message: "access_token is a number",
        },
        Case {
            name: "negative expires_in",
            fault: custom(
                200,
                "application/json",
                r#"{"access_token":"x","expires_in":-60}"#,
            ),
            want: retryable,
            message: "must be positive",
        },
        Case {
            name: "huge expires_in",
            fault: custom(
                200,
                "application/json",
                r#"{"access_token":"x","expires_in":1e40}"#,
            ),
            want: retryable,
            message: "out of range",
        },
        Case {
            name: "text expires_in",
            fault: custom(
                200,
                "application/json",
                r#"{"access_token":"x","expires_in":"an hour"}"#,
            ),
            want: retryable,
            message: "not a number",
        },
        Case {
            name: "non-JSON 200",
            fault: custom(200, "text/html", "<html>hi</html>"),
            want: retryable,
            message: "(HTTP 200, text/html, 15 bytes): body is not a JSON object (syntax error at line 1 column 1)",
        },
        Case {
            name: "empty 200",
            fault: custom(200, "application/json", ""),
            want: retryable,
            message: "empty body",
        },
        Case {
            name: "binary 200",
            fault: custom(200, "application/json", vec![0xffu8, 0x00, 0xfe]),
            want: retryable,
            message: "not UTF-8",
        },
        Case {
            name: "2 MiB body",
            fault: custom(200, "application/json", two_mib),
            want: retryable,
            message: "larger than 1048576 bytes",
        },
        Case {
            name: "token with a newline",
            fault: custom(200, "application/json", r#"{"access_token":"a\nb"}"#),
            want: retryable,
            message: "whitespace or control",
        },
        Case {
            name: "token_type number",
            fault: custom(
                200,
                "application/json",
                r#"{"access_token":"a","token_type":1}"#,
            ),
            want: retryable,
            message: "not a token type",
        },
        Case {
            name: "JSON array",
            fault: custom(200, "application/json", "[]"),
            want: retryable,
            message: "not a JSON object",
        },
        Case {
            name: "wrong content type, valid JSON",
            fault: custom(
                200,
                "text/plain",
                r#"{"access_token":"plain-but-fine","expires_in":60}"#,
            ),
            want: |r| {
                r.as_ref()
                    .is_ok_and(|a| a.issued.token.lifetime() == Duration::from_secs(60))
            },
            message: "",
        },
        Case {
            name: "charset parameter",
            fault: custom(
                200,
                "application/json; charset=utf-8",
                r#"{"access_token":"fine","expires_in":"90"}"#,
            ),
            want: |r| {
                r.as_ref()
                    .is_ok_and(|a| a.issued.token.lifetime() == Duration::from_secs(90))
            },
            message: "",
        },
        Case {
            name: "invalid_request",
            fault: custom(
                400,
                "application/json",
                r#"{"error":"invalid_request","error_description":"Missing param"}"#,
            ),
            want: permanent,
            message: "invalid_request: Missing param (HTTP 400)",
        },
        Case {
            name: "unauthorized_client",
            fault: custom(
                400,
                "application/json",
                r#"{"error":"unauthorized_client"}"#,
            ),
            want: permanent,
            message: "unauthorized_client",
        },
        Case {
            name: "unsupported_grant_type",
            fault: custom(
                400,
                "application/json",
                r#"{"error":"unsupported_grant_type"}"#,
            ),
            want: permanent,
            message: "unsupported_grant_type",
        },
        Case {
            name: "temporarily_unavailable",
            fault: custom(
                503,
                "application/json",
                r#"{"error":"temporarily_unavailable"}"#,
            ),
            want: retryable,
            message: "temporarily_unavailable",
        },
        Case {
            name: "404 HTML",
            fault: custom(404, "text/html", "<h1>Not Found</h1>"),
            want: permanent,
            message: "HTTP 404 from the token endpoint: <h1>Not Found</h1>",
        },
        Case {
            name: "redirect",
            fault: custom(302, "text/html", ""),
            want: permanent,
            message: "redirects are not followed",
        },
        Case {
            name: "error echoing the secret",
            fault: custom(
                401,
                "application/json",
                format!(
                    r#"{{"error":"invalid_client","error_description":"bad secret {}"}}"#,
                    env.secret("talentsoft")
                ),
            ),
            want: permanent,
            message: "bad secret [redacted]",
        },
    ];
    assert!(cases.len() >= 25);
    for case in cases {
        env.provider.fault_next(case.fault, 1);
        let r = oauth::acquire(&http, &c, None, false).await;
        assert!(
            (case.want)(&r),
            "{}: {:?}",
            case.name,
            r.as_ref().map(|a| &a.issued).map_err(|f| &f.error)
        );
        if let Err(f) = &r {
            let msg = f.error.to_string();
            assert!(msg.contains(case.message), "{}: {msg}", case.name);
            assert!(
                !msg.contains(&env.secret("talentsoft")),
                "{}: secret in {msg}",
                case.name
            );
        }
    }
}

#[tokio::test]
async fn an_unreachable_provider_is_a_retryable_connect_error() {
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    let mut c = client(&env, "transatel");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    c.token_url = format!("http://127.0.0.1:{port}/token").parse().unwrap();
    let http = oauth::http_client(None).unwrap();
    let e = oauth::acquire(&http, &c, None, false)
        .await
        .unwrap_err()
        .error;
    assert!(matches!(e.inner(), OAuthError::Connect(_)), "{e:?}");
    assert_eq!(e.class(), ErrorClass::Retryable { retry_after: None });
    assert!(
        e.to_string()
            .starts_with("cannot connect to the token endpoint"),
        "{e}"
    );
    assert!(
        e.to_string().ends_with(&format!(
            "(token_url http://127.0.0.1:{port}/token, grant_type {}, client_auth {})",
            c.grant_type(),
            c.client_auth.method_name()
        )),
        "{e}"
    );
}

/// `once` runs the daemon's own refreshers: an output that cannot be written leaves the token
/// stored and the other outputs written, is named on stderr, and makes the exit code 1
/// (docs/cli.md); a second run reuses the stored token and still exits 1 while the output fails.
#[tokio::test(flavor = "multi_thread")]
async fn once_exits_1_when_an_output_cannot_be_written_and_keeps_the_token() {
    use crate::support::{read, run, token_in};
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    // A non-empty directory where the file should go: the rename into place fails.
    let blocked = env.out("transatel.token");
    std::fs::create_dir_all(blocked.join("in-the-way")).unwrap();

    let r = run(&["once", "-c", env.config_path()]).await;
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let failure: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("transatel: output failed: "))
        .collect();
    assert_eq!(failure.len(), 1, "{}", r.stderr);
    // Said once: printed, not also logged.
    let said = r
        .stderr
        .lines()
        .filter(|l| l.contains(&*blocked.to_string_lossy()));
    assert_eq!(said.count(), 1, "{}", r.stderr);
    assert!(
        failure[0].contains(&blocked.display().to_string()),
        "{}",
        failure[0]
    );
    // The token itself was got, stored and written everywhere else.
    assert_eq!(
        r.stdout.lines().count(),
        env.demo.clients.len(),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("transatel ") && l.contains(" new "))
    );
    assert!(token_in("transatel.json", &read(&env.out("transatel.json"))).is_some());
    let state: Value =
        serde_json::from_str(&read(&env.demo.state_dir.join("transatel.json"))).unwrap();
    assert_eq!(state["generation"], 1);

    let requests = env.provider.requests().len();
    let r = run(&["once", "-c", env.config_path(), "transatel"]).await;
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.starts_with("transatel  reused"), "{}", r.stdout);
    assert!(
        r.stderr.contains("transatel: output failed: "),
        "{}",
        r.stderr
    );
    assert_eq!(
        env.provider.requests().len(),
        requests,
        "the stored token was reused"
    );

    std::fs::remove_dir_all(&blocked).unwrap();
    let r = run(&["once", "-c", env.config_path(), "transatel"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(token_in("transatel.token", &read(&blocked)).is_some());
}

#[tokio::test]
async fn once_says_a_state_save_failure_once() {
    use crate::support::run;
    let env = DemoEnv::start(Duration::from_secs(600)).await;
    // A non-empty directory where the state file should go: the save's rename fails.
    std::fs::create_dir_all(env.demo.state_dir.join("transatel.json").join("in-the-way")).unwrap();
    let r = run(&["once", "-c", env.config_path(), "transatel"]).await;
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let said: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains("cannot save state"))
        .collect();
    assert_eq!(said.len(), 1, "{}", r.stderr);
    assert!(said[0].starts_with("transatel: "), "{}", r.stderr);
}

/// Opening the state directory and sweeping the output directories for stale temporary files
/// walk the file system: that runs off the async workers, so the runtime's other tasks go on
/// meanwhile (on this current-thread runtime, an open on the async thread would keep the ticker
/// from running until it returned).
#[tokio::test(flavor = "current_thread")]
async fn opening_the_engine_leaves_the_async_thread_free() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let mut text = format!("[daemon]\nstate_dir = {:?}\n", dir.path().join("state"));
    for i in 0..300 {
        let out = dir.path().join(format!("out{i}"));
        std::fs::create_dir(&out).unwrap();
        text.push_str(&format!(
            "[clients.c{i}]\ntoken_url = \"https://idp.example/token\"\nclient_id = \"c\"\n\
             client_secret = {{ file = {:?} }}\noutputs = [{{ path = {:?} }}]\n",
            dir.path().join("secret"),
            out.join("token")
        ));
    }
    std::fs::write(dir.path().join("secret"), "s").unwrap();
    std::fs::set_permissions(
        dir.path().join("secret"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let config = tokenwarden::config::load_str(&text, &dir.path().join("c.toml")).unwrap();
    let ticks = Arc::new(AtomicUsize::new(0));
    let ticker = tokio::spawn({
        let ticks = ticks.clone();
        async move {
            loop {
                ticks.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }
    });
    let clients = config.clients.values().cloned().collect();
    let engine = tokenwarden::refresher::Engine::open(&config.daemon, clients).await;
    let during = ticks.load(Ordering::Relaxed);
    ticker.abort();
    assert!(engine.is_ok());
    assert!(
        during > 0,
        "the other task never ran while the engine opened"
    );
}

// === The refresher alone, on a paused clock ===

// The refresher alone, on tokio's paused clock, against a scripted token source: the schedule,
// backoff, coalescing, `min_interval` and expiry, in virtual time (no daemon, no network).
mod paused {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokenwarden::config::ClientConfig;
    use tokenwarden::oauth::{AcquireFailure, Acquired, Issued, OAuthError};
    use tokenwarden::refresher::{BoxFuture, Clock, Engine, Handle, TokenSource, request, spawn};
    use tokenwarden::secret::Secret;
    use tokenwarden::store::{Answer, Reason, Snapshot, State};
    use tokenwarden::token::Token;
    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;

    /// What the fake endpoint does with one request.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        /// A token of the fake's lifetime, after this long.
        Grant(Duration),
        /// A retryable failure (cannot connect), at once.
        Fail,
        /// No answer, ever.
        Hang,
    }

    struct Fake {
        clock: Clock,
        lifetime: Duration,
        /// The steps to take, in order; then `Grant(0)` forever.
        script: Mutex<VecDeque<Step>>,
        /// When each request came, on tokio's clock.
        calls: Mutex<Vec<Instant>>,
    }

    impl TokenSource for Fake {
        fn acquire<'a>(
            &'a self,
            _: &'a reqwest::Client,
            _: &'a ClientConfig,
            _: Option<&'a Secret>,
            _: bool,
        ) -> BoxFuture<'a, Result<Acquired, AcquireFailure>> {
            let n = {
                let mut calls = self.calls.lock().unwrap();
                calls.push(Instant::now());
                calls.len()
            };
            let step = self.script.lock().unwrap().pop_front();
            Box::pin(async move {
                match step.unwrap_or(Step::Grant(Duration::ZERO)) {
                    Step::Hang => std::future::pending().await,
                    Step::Fail => Err(AcquireFailure {
                        error: OAuthError::Connect("refused".into()),
                        forget_refresh_token: false,
                        bootstrap_spent: false,
                    }),
                    Step::Grant(after) => {
                        tokio::time::sleep(after).await;
                        let now = self.clock.now();
                        Ok(Acquired {
                            issued: Issued {
                                token: Token {
                                    access_token: Secret::new(format!("token-{n}")),
                                    token_type: "Bearer".into(),
                                    issued_at: now,
                                    expires_at: now + self.lifetime,
                                    scope: Vec::new(),
                                },
                                refresh_token: None,
                                server_date: None,
                            },
                            refresh_token: None,
                            grant_type: "client_credentials",
                            refresh_token_refused: None,
                            bootstrap_spent: false,
                        })
                    }
                }
            })
        }
    }

    struct Rig {
        _dir: tempfile::TempDir,
        fake: Arc<Fake>,
        clock: Clock,
        handle: Handle,
        shutdown: CancellationToken,
    }

    /// One client (`[defaults]` as given) with tokens of `lifetime` and the `script`.
    async fn rig(lifetime: u64, defaults: &str, script: &[Step]) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret-value").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let text = format!(
            "[daemon]\nstate_dir = \"{d}/state\"\n[defaults]\n{defaults}\n[clients.c]\n\
             token_url = \"https://auth.example/token\"\nclient_id = \"app\"\n\
             client_secret = {{ file = \"{s}\" }}\n",
            d = dir.path().display(),
            s = secret.display()
        );
        let config = tokenwarden::config::load_str(&text, &dir.path().join("c.toml")).unwrap();
        let client = config.clients["c"].clone();
        let clock = Clock::tokio();
        let fake = Arc::new(Fake {
            clock,
            lifetime: Duration::from_secs(lifetime),
            script: Mutex::new(script.iter().copied().collect()),
            calls: Mutex::new(Vec::new()),
        });
        let mut engine = Engine::open(&config.daemon, vec![client.clone()])
            .await
            .unwrap();
        engine.clock = clock;
        engine.source = fake.clone();
        let shutdown = CancellationToken::new();
        let handle = spawn(client, Arc::new(engine), shutdown.clone());
        Rig {
            _dir: dir,
            fake,
            clock,
            handle,
            shutdown,
        }
    }

    impl Rig {
        fn calls(&self) -> Vec<Instant> {
            self.fake.calls.lock().unwrap().clone()
        }

        fn snap(&self) -> Snapshot {
            self.handle.slot.snapshot.borrow().clone()
        }

        /// Lets virtual time run until `cond` holds, at most `limit` of it.
        async fn until(&self, limit: Duration, cond: impl Fn(&Rig) -> bool) {
            let end = Instant::now() + limit;
            while !cond(self) {
                assert!(
                    Instant::now() < end,
                    "not within {limit:?}: {:?}",
                    self.snap()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        async fn demand(&self, reason: Reason) -> Answer {
            request(&self.handle.slot, reason).await
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    const SECS: fn(u64) -> Duration = Duration::from_secs;

    #[tokio::test(start_paused = true)]
    async fn the_schedule_then_backoff_then_recovery() {
        let defaults = "retry_initial = \"1s\"\nretry_max = \"60s\"";
        // Start, the first planned refresh, three failures, then a token.
        let r = rig(
            600,
            defaults,
            &[
                Step::Grant(SECS(0)),
                Step::Grant(SECS(0)),
                Step::Fail,
                Step::Fail,
                Step::Fail,
            ],
        )
        .await;
        r.until(SECS(1), |r| r.snap().settled).await;
        let t0 = r.calls()[0];
        // The first token came from a burst (the start): refreshed 150 s … 450 s after issue.
        r.until(SECS(460), |r| r.calls().len() == 2).await;
        let first = r.calls()[1] - t0;
        assert!((SECS(150)..=SECS(451)).contains(&first), "{first:?}");
        // A plain refresh next: 390 s … 450 s after issue; then failures back off with full
        // jitter under 1 s, 2 s, 4 s; then the token, and the plain schedule again.
        r.until(SECS(460), |r| r.calls().len() == 6).await;
        let calls = r.calls();
        let second = calls[2] - calls[1];
        assert!((SECS(390)..=SECS(451)).contains(&second), "{second:?}");
        for (n, pair) in calls[2..6].windows(2).enumerate() {
            let gap = pair[1] - pair[0];
            assert!(gap <= SECS(1 << n), "retry {n}: {gap:?}");
        }
        r.until(SECS(1), |r| r.snap().consecutive_failures == 0)
            .await;
        assert_eq!(r.snap().generation, 3);
        assert_eq!(r.snap().state_at(r.clock.now()), State::Valid);
    }

    #[tokio::test(start_paused = true)]
    async fn demands_during_a_request_share_its_answer() {
        let r = rig(
            600,
            "min_interval = \"0s\"",
            &[Step::Grant(SECS(0)), Step::Grant(SECS(5))],
        )
        .await;
        r.until(SECS(1), |r| r.snap().settled).await;
        let (a, b, c) = tokio::join!(
            r.demand(Reason::Forced),
            async {
                tokio::time::sleep(SECS(1)).await;
                r.demand(Reason::Forced).await
            },
            async {
                tokio::time::sleep(SECS(2)).await;
                r.demand(Reason::Demand).await
            },
        );
        let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
        assert_eq!(r.calls().len(), 2, "one request for the three demands");
        assert_eq!(a.access_token.expose(), "token-2");
        assert!(Arc::ptr_eq(&a, &b) && Arc::ptr_eq(&a, &c));
    }

    #[tokio::test(start_paused = true)]
    async fn min_interval_answers_a_demand_with_the_current_token() {
        let r = rig(600, "min_interval = \"10s\"", &[]).await;
        r.until(SECS(1), |r| r.snap().settled).await;
        tokio::time::sleep(SECS(9)).await;
        let held = r.demand(Reason::Demand).await.unwrap();
        assert_eq!(held.access_token.expose(), "token-1");
        assert_eq!(r.calls().len(), 1, "no request within min_interval");
        // A forced refresh (root, SIGUSR1) is not held; and past min_interval neither is a demand.
        let forced = r.demand(Reason::Forced).await.unwrap();
        assert_eq!(forced.access_token.expose(), "token-2");
        tokio::time::sleep(SECS(10)).await;
        let again = r.demand(Reason::Demand).await.unwrap();
        assert_eq!(again.access_token.expose(), "token-3");
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_expires_on_time_while_a_request_hangs() {
        // 60 s tokens; every refresh after the first hangs.
        let r = rig(60, "timeout = \"1h\"", &[Step::Grant(SECS(0)), Step::Hang]).await;
        r.until(SECS(1), |r| r.snap().settled).await;
        let expires_at = r.snap().token.unwrap().expires_at;
        r.until(SECS(60), |r| r.calls().len() == 2).await;
        let mut watch = r.handle.slot.snapshot.clone();
        watch.mark_unchanged();
        // Watchers hear of the expiry on time, though the refresher is waiting on the request.
        let left = expires_at.duration_since(r.clock.now()).unwrap();
        tokio::time::timeout(left + SECS(1), watch.changed())
            .await
            .expect("no wake-up at expiry")
            .unwrap();
        assert!(r.clock.now() >= expires_at);
        assert_eq!(r.snap().state_at(r.clock.now()), State::Expired);
    }
}
