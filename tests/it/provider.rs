//! End-to-end tests of the built-in provider over real HTTP on 127.0.0.1: each strict behaviour
//! and each fault, seen the way a client sees it.

use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use serde_json::{Value, json};
use tokenwarden::keys::{SigningAlg, SigningKey};
use tokenwarden::provider::{
    CLIENT_ASSERTION_TYPE, Dialect, ExpectedAuth, Fault, JWT_BEARER_GRANT, Provider,
    RegisteredClient, TalkdeskRegion,
};
use tokenwarden::secret::Secret;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

// === helpers ===

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// `Authorization: Basic` as RFC 6749 §2.3.1 wants it: each part form-encoded, then base64.
fn basic(id: &str, secret: &str) -> String {
    let raw = format!("{}:{}", enc(id), enc(secret));
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or("").to_string()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn post(url: &str, authorization: Option<&str>, form: &[(&str, &str)]) -> Answer {
    let client = reqwest::Client::new();
    let mut req = client.post(url).form(form);
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    Answer {
        status,
        headers,
        text,
    }
}

fn now() -> u64 {
    tokenwarden::token::unix_seconds(SystemTime::now())
}

/// Sends raw bytes and reads until the server closes (or 5 s pass).
async fn raw_exchange(provider: &Provider, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(provider.addr()).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("server did not close the connection")
        .ok();
    out
}

fn raw_post(path: &str, authorization: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {authorization}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Waits for `cond` to hold, polling, up to `secs`.
async fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

async fn with_transatel() -> (Provider, String) {
    let p = Provider::start().await.unwrap();
    p.register(RegisteredClient::transatel("tr-client", "tr-secret"));
    let url = p.token_url(Dialect::Transatel);
    (p, url)
}

const CC: &[(&str, &str)] = &[("grant_type", "client_credentials")];

// === request form and client authentication ===

#[tokio::test]
async fn transatel_issues_a_jwt_with_no_store_headers() {
    let (p, url) = with_transatel().await;
    let a = post(&url, Some(&basic("tr-client", "tr-secret")), CC).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(a.header("cache-control"), Some("no-store"));
    assert_eq!(a.header("pragma"), Some("no-cache"));
    let body = a.json();
    assert_eq!(body["token_type"], "bearer");
    assert_eq!(body["expires_in"], 3600);
    assert!(body.get("scope").is_none());
    let token = body["access_token"].as_str().unwrap();
    let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(token).unwrap();
    assert_eq!(claims["sub"], "tr-client");
    let exp = claims["exp"].as_u64().unwrap();
    let iat = claims["iat"].as_u64().unwrap();
    assert_eq!(exp - iat, 3600);
    assert!(p.token_is_live(token));
    assert!(!p.token_is_live("tw_forged"));
    assert_eq!(p.issued("tr-client"), 1);
    assert_eq!(p.token_owner(token).as_deref(), Some("tr-client"));
    let reqs = p.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].path, "/transatel/authentication/api/token");
    assert_eq!(reqs[0].form_value("grant_type"), Some("client_credentials"));
    assert!(
        reqs[0]
            .header("Authorization")
            .unwrap()
            .starts_with("Basic ")
    );
    // Debug output shows names, never values.
    assert!(!format!("{:?}", reqs[0]).contains("Basic "));
}

#[tokio::test]
async fn only_form_posts_are_accepted() {
    let (p, url) = with_transatel().await;
    let auth = basic("tr-client", "tr-secret");
    let http = reqwest::Client::new();
    let get = http
        .get(&url)
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 400);
    assert_eq!(
        get.json::<Value>().await.unwrap()["error"],
        "invalid_request"
    );
    let json_body = http
        .post(&url)
        .header("authorization", &auth)
        .json(&json!({"grant_type": "client_credentials"}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_body.status(), 400);
    assert_eq!(
        json_body.json::<Value>().await.unwrap()["error"],
        "invalid_request"
    );
    let charset = http
        .post(&url)
        .header("authorization", &auth)
        .header(
            "content-type",
            "application/x-www-form-urlencoded; charset=UTF-8",
        )
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap();
    assert_eq!(charset.status(), 200);
    let big = format!(
        "grant_type=client_credentials&pad={}",
        "x".repeat(70 * 1024)
    );
    let too_big = http
        .post(&url)
        .header("authorization", &auth)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(too_big.status(), 413);
    // Repeated parameters (RFC 6749 §3.2).
    let twice = post(
        &url,
        Some(&auth),
        &[
            ("grant_type", "client_credentials"),
            ("scope", "a"),
            ("scope", "b"),
        ],
    )
    .await;
    assert_eq!(
        (twice.status, twice.error().as_str()),
        (400, "invalid_request")
    );
    // Every one of them was recorded.
    assert_eq!(p.requests().len(), 5);
    assert_eq!(p.issued("tr-client"), 1);
    // Another path is no token endpoint.
    let nf = http
        .post(format!("{}/nowhere", p.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(nf.status(), 404);
}

#[tokio::test]
async fn exactly_one_client_authentication_method() {
    let (_p, url) = with_transatel().await;
    let a = post(
        &url,
        Some(&basic("tr-client", "tr-secret")),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "tr-client"),
            ("client_secret", "tr-secret"),
        ],
    )
    .await;
    assert_eq!((a.status, a.error().as_str()), (400, "invalid_request"));
    assert!(
        a.json()["error_description"]
            .as_str()
            .unwrap()
            .contains("more than one")
    );
}

#[tokio::test]
async fn bad_client_credentials_are_invalid_client() {
    let (_p, url) = with_transatel().await;
    let wrong = post(&url, Some(&basic("tr-client", "nope")), CC).await;
    assert_eq!(
        (wrong.status, wrong.error().as_str()),
        (401, "invalid_client")
    );
    assert_eq!(
        wrong.header("www-authenticate"),
        Some("Basic realm=\"tokenwarden-provider\"")
    );
    assert!(!wrong.text.contains("nope") && !wrong.text.contains("tr-secret"));
    let unknown = post(&url, Some(&basic("who", "tr-secret")), CC).await;
    assert_eq!(
        (unknown.status, unknown.error().as_str()),
        (401, "invalid_client")
    );
    assert!(unknown.header("www-authenticate").is_some());
    // The right secret by the wrong method (client_secret_post for a Basic client).
    let post_method = post(
        &url,
        None,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "tr-client"),
            ("client_secret", "tr-secret"),
        ],
    )
    .await;
    assert_eq!(
        (post_method.status, post_method.error().as_str()),
        (401, "invalid_client")
    );
    assert!(post_method.header("www-authenticate").is_none());
    let none = post(&url, None, CC).await;
    assert_eq!(
        (none.status, none.error().as_str()),
        (401, "invalid_client")
    );
}

#[tokio::test]
async fn basic_credentials_are_form_decoded_after_base64() {
    let p = Provider::start().await.unwrap();
    p.register(RegisteredClient::transatel("id with space", "s3:cr%t+&"));
    let url = p.token_url(Dialect::Transatel);
    let ok = post(&url, Some(&basic("id with space", "s3:cr%t+&")), CC).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    // Without the form-encoding step ("+" reads as a space, "%t+" is no escape) it fails.
    let naive = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("id with space:s3:cr%t+&")
    );
    let bad = post(&url, Some(&naive), CC).await;
    assert_eq!((bad.status, bad.error().as_str()), (401, "invalid_client"));
}

// === grants and scope ===

#[tokio::test]
async fn grant_type_is_checked() {
    let (_p, url) = with_transatel().await;
    let auth = basic("tr-client", "tr-secret");
    let missing = post(&url, Some(&auth), &[("scope", "x")]).await;
    assert_eq!(
        (missing.status, missing.error().as_str()),
        (400, "invalid_request")
    );
    for g in [
        "password",
        "refresh_token",
        "authorization_code",
        JWT_BEARER_GRANT,
    ] {
        let a = post(&url, Some(&auth), &[("grant_type", g)]).await;
        assert_eq!(
            (a.status, a.error().as_str()),
            (400, "unsupported_grant_type"),
            "{g}"
        );
    }
}

#[tokio::test]
async fn creads_password_then_single_use_rotating_refresh_tokens() {
    let p = Provider::start().await.unwrap();
    p.register(RegisteredClient::creads(
        "cr",
        "cr-secret",
        "user@example.com",
        "pw d",
    ));
    let url = p.token_url(Dialect::Creads);
    let auth = basic("cr", "cr-secret");
    let pw = |scope: &'static str, password: &'static str| {
        vec![
            ("grant_type", "password"),
            ("username", "user@example.com"),
            ("password", password),
            ("scope", scope),
        ]
    };
    let bad_pw = post(&url, Some(&auth), &pw("files", "wrong")).await;
    assert_eq!(
        (bad_pw.status, bad_pw.error().as_str()),
        (400, "invalid_grant")
    );
    let bad_scope = post(&url, Some(&auth), &pw("files admin", "pw d")).await;
    assert_eq!(
        (bad_scope.status, bad_scope.error().as_str()),
        (400, "invalid_scope")
    );
    let cc = post(&url, Some(&auth), CC).await;
    assert_eq!(cc.error(), "unsupported_grant_type");

    let first = post(&url, Some(&auth), &pw("files upload_files", "pw d")).await;
    assert_eq!(first.status, 200, "{}", first.text);
    let body = first.json();
    assert_eq!(body["scope"], "files upload_files");
    assert_eq!(body["token_type"], "bearer");
    let rt1 = body["refresh_token"].as_str().unwrap().to_string();
    assert_eq!(p.live_refresh_tokens("cr"), 1);

    // Default scope when none is asked for.
    let dflt = post(
        &url,
        Some(&auth),
        &[
            ("grant_type", "password"),
            ("username", "user@example.com"),
            ("password", "pw d"),
        ],
    )
    .await;
    assert_eq!(dflt.json()["scope"], "base");
    p.revoke_refresh_tokens("cr");
    assert_eq!(p.live_refresh_tokens("cr"), 0);
    let revoked = post(
        &url,
        Some(&auth),
        &[("grant_type", "refresh_token"), ("refresh_token", &rt1)],
    )
    .await;
    assert_eq!(revoked.error(), "invalid_grant");

    let again = post(&url, Some(&auth), &pw("files upload_files", "pw d")).await;
    let rt1 = again.json()["refresh_token"].as_str().unwrap().to_string();
    // A wider scope than first granted is refused, and the token survives that.
    let wider = post(
        &url,
        Some(&auth),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &rt1),
            ("scope", "base"),
        ],
    )
    .await;
    assert_eq!(wider.error(), "invalid_scope");
    let refreshed = post(
        &url,
        Some(&auth),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &rt1),
            ("scope", "files"),
        ],
    )
    .await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.text);
    assert_eq!(refreshed.json()["scope"], "files");
    let rt2 = refreshed.json()["refresh_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(rt1, rt2);
    let third = post(
        &url,
        Some(&auth),
        &[("grant_type", "refresh_token"), ("refresh_token", &rt2)],
    )
    .await;
    assert_eq!(third.status, 200);
    assert_eq!(third.json()["scope"], "files", "the scope carries over");
    // Another client cannot use it.
    p.register(RegisteredClient::creads("cr2", "s2", "u", "p"));
    let rt3 = third.json()["refresh_token"].as_str().unwrap().to_string();
    let stolen = post(
        &url,
        Some(&basic("cr2", "s2")),
        &[("grant_type", "refresh_token"), ("refresh_token", &rt3)],
    )
    .await;
    assert_eq!(stolen.error(), "invalid_grant");
    // A used one presented again is taken for a stolen one (RFC 9700 §4.14.2): refused, and
    // the newer ones of the client go with it.
    assert_eq!(p.live_refresh_tokens("cr"), 1);
    let reused = post(
        &url,
        Some(&auth),
        &[("grant_type", "refresh_token"), ("refresh_token", &rt1)],
    )
    .await;
    assert_eq!(
        (reused.status, reused.error().as_str()),
        (400, "invalid_grant")
    );
    assert_eq!(p.reuse_detected("cr"), 1);
    assert_eq!(p.live_refresh_tokens("cr"), 0);
}

#[tokio::test]
async fn talentsoft_app_uses_client_secret_post_and_string_expires_in() {
    let p = Provider::start().await.unwrap();
    p.register(RegisteredClient::talentsoft_app("ts-app", "ts-secret"));
    let url = p.token_url(Dialect::TalentsoftApp);
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", "ts-app"),
        ("client_secret", "ts-secret"),
    ];
    let a = post(&url, None, &form).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["expires_in"], "3600");
    assert_eq!(a.json()["token_type"], "Bearer");
    let basic_used = post(&url, Some(&basic("ts-app", "ts-secret")), CC).await;
    assert_eq!(
        (basic_used.status, basic_used.error().as_str()),
        (401, "invalid_client")
    );
    assert!(basic_used.header("www-authenticate").is_some());
    // Clients of other dialects are unknown at this endpoint.
    p.register(RegisteredClient::transatel("tr", "x"));
    let elsewhere = post(&url, Some(&basic("tr", "x")), CC).await;
    assert_eq!(elsewhere.error(), "invalid_client");
}

fn talentsoft_assertion(secret: &str, claims: Value) -> String {
    SigningKey::parse(SigningAlg::HS256, &Secret::new(secret))
        .unwrap()
        .sign(jsonwebtoken::Header::default(), &claims)
        .unwrap()
}

#[tokio::test]
async fn talentsoft_user_jwt_bearer_grant() {
    let p = Provider::start().await.unwrap();
    p.register(RegisteredClient::talentsoft_user(
        "ts-user",
        "ts-secret",
        "https://api.site.com",
    ));
    let url = p.token_url(Dialect::TalentsoftUser);
    let claims = |aud: &str, jti: Option<&str>| {
        let mut c = json!({"iss": "ts-user", "sub": "TalentSoftMarketPlace", "aud": aud,
            "email": "jean.dupont@site", "name": "Jean Dupont", "iat": now(), "exp": now() + 1200});
        if let Some(j) = jti {
            c["jti"] = json!(j);
        }
        c
    };
    let url = url.as_str();
    let grant = |a: String| async move {
        post(
            url,
            None,
            &[("grant_type", JWT_BEARER_GRANT), ("assertion", &a)],
        )
        .await
    };
    let ok = grant(talentsoft_assertion(
        "ts-secret",
        claims("https://api.site.com", None),
    ))
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(ok.json()["expires_in"], "3600");
    assert_eq!(p.issued("ts-user"), 1);
    let wrong_aud = grant(talentsoft_assertion(
        "ts-secret",
        claims("https://other", None),
    ))
    .await;
    assert_eq!(
        (wrong_aud.status, wrong_aud.error().as_str()),
        (400, "invalid_grant")
    );
    assert!(wrong_aud.text.contains("aud"));
    let wrong_key = grant(talentsoft_assertion(
        "nope",
        claims("https://api.site.com", None),
    ))
    .await;
    assert_eq!(wrong_key.error(), "invalid_grant");
    let with_jti = talentsoft_assertion("ts-secret", claims("https://api.site.com", Some("j-1")));
    assert_eq!(grant(with_jti.clone()).await.status, 200);
    let replay = grant(with_jti).await;
    assert_eq!(
        (replay.status, replay.error().as_str()),
        (400, "invalid_grant")
    );
    assert!(replay.text.contains("replay"));
    let missing = post(
        &p.token_url(Dialect::TalentsoftUser),
        None,
        &[("grant_type", JWT_BEARER_GRANT)],
    )
    .await;
    assert_eq!(missing.error(), "invalid_client");
}

// === client assertions ===

struct Talkdesk {
    provider: Provider,
    signer: SigningKey,
}

impl Talkdesk {
    fn assertion(&self, aud: &str, jti: &str, lifetime: u64, kid: Option<&str>) -> String {
        let header = jsonwebtoken::Header {
            kid: kid.map(String::from),
            ..jsonwebtoken::Header::default()
        };
        let claims = json!({"iss": "td", "sub": "td", "aud": aud, "jti": jti,
            "iat": now(), "exp": now() + lifetime});
        self.signer.sign(header, &claims).unwrap()
    }
}

async fn talkdesk(alg: SigningAlg, private: &str, public: &str) -> Talkdesk {
    let provider = Provider::start().await.unwrap();
    provider.register(
        RegisteredClient::talkdesk("td", public, Some("key-1"), alg)
            .with_allowed_scopes(Some(&["callbacks:read", "users:read"])),
    );
    let signer = SigningKey::parse(alg, &Secret::new(private)).unwrap();
    Talkdesk { provider, signer }
}

async fn assertion_post(url: &str, assertion: &str, extra: &[(&str, &str)]) -> Answer {
    let mut form = vec![
        ("grant_type", "client_credentials"),
        ("client_assertion_type", CLIENT_ASSERTION_TYPE),
        ("client_assertion", assertion),
    ];
    form.extend_from_slice(extra);
    post(url, None, &form).await
}

#[tokio::test]
async fn talkdesk_private_key_jwt_es256() {
    let (private, public) = tokenwarden::keys::generate_es256().unwrap();
    let td = talkdesk(SigningAlg::ES256, &private, &public).await;
    let url = td.provider.token_url(Dialect::Talkdesk);
    let a = td.assertion(&url, "j1", 300, Some("key-1"));
    let ok = assertion_post(&url, &a, &[("scope", "users:read")]).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    let body = ok.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "users:read");
    assert!(body["refresh_token"].is_string());
    assert!(body["sid"].is_string());
    let id: Value =
        jsonwebtoken::dangerous::insecure_decode_claims(body["id_token"].as_str().unwrap())
            .unwrap();
    assert_eq!(id["sub"], "td");

    let replay = assertion_post(&url, &a, &[]).await;
    assert_eq!(
        (replay.status, replay.error().as_str()),
        (401, "invalid_client")
    );
    assert!(replay.text.contains("replay"));

    let cases = [
        (td.assertion(&url, "j2", 300, Some("key-2")), "kid"),
        (td.assertion(&url, "j3", 301, Some("key-1")), "300"),
        (
            td.assertion(
                "https://acme.talkdeskid.com/oauth/token",
                "j4",
                60,
                Some("key-1"),
            ),
            "aud",
        ),
        (
            td.assertion(
                &td.provider.talkdesk_token_url(TalkdeskRegion::Eu),
                "j5",
                60,
                Some("key-1"),
            ),
            "aud",
        ),
    ];
    for (assertion, why) in cases {
        let a = assertion_post(&url, &assertion, &[]).await;
        assert_eq!(
            (a.status, a.error().as_str()),
            (401, "invalid_client"),
            "{why}"
        );
        assert!(a.text.contains(why), "{why}: {}", a.text);
    }
    // Scope outside the allowed set.
    let a = td.assertion(&url, "j6", 60, Some("key-1"));
    let bad_scope = assertion_post(&url, &a, &[("scope", "admin")]).await;
    assert_eq!(bad_scope.error(), "invalid_scope");
    // The wrong client_assertion_type.
    let a = td.assertion(&url, "j7", 60, Some("key-1"));
    let wrong_type = post(
        &url,
        None,
        &[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", "urn:example:other"),
            ("client_assertion", &a),
        ],
    )
    .await;
    assert_eq!(wrong_type.error(), "invalid_client");
    // Regions: the aud must be the URL posted to.
    let eu = td.provider.talkdesk_token_url(TalkdeskRegion::Eu);
    let a = td.assertion(&eu, "j8", 60, Some("key-1"));
    assert_eq!(assertion_post(&eu, &a, &[]).await.status, 200);
    // The refresh grant, authenticated by a fresh assertion.
    let rt = body["refresh_token"].as_str().unwrap();
    let a = td.assertion(&url, "j9", 60, Some("key-1"));
    let refreshed = post(
        &url,
        None,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", rt),
            ("client_assertion_type", CLIENT_ASSERTION_TYPE),
            ("client_assertion", &a),
        ],
    )
    .await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.text);
    assert_eq!(refreshed.json()["scope"], "users:read");
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/data/keys/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[tokio::test]
async fn talkdesk_rs256_and_eddsa_keys() {
    for (alg, private, public) in [
        (SigningAlg::RS256, "rsa-2048.pem", "rsa-2048.pub.pem"),
        (SigningAlg::PS256, "rsa-2048.pem", "rsa-2048.pub.pem"),
        (SigningAlg::EdDSA, "ed25519.pem", "ed25519.pub.pem"),
    ] {
        let td = talkdesk(alg, &fixture(private), &fixture(public)).await;
        let url = td.provider.token_url(Dialect::Talkdesk);
        let a = td.assertion(&url, "j1", 300, Some("key-1"));
        let ok = assertion_post(&url, &a, &[]).await;
        assert_eq!(ok.status, 200, "{alg}: {}", ok.text);
    }
    // An assertion signed with another alg than the registered one.
    let (private, _) = tokenwarden::keys::generate_es256().unwrap();
    let td = talkdesk(
        SigningAlg::RS256,
        &fixture("rsa-2048.pem"),
        &fixture("rsa-2048.pub.pem"),
    )
    .await;
    let url = td.provider.token_url(Dialect::Talkdesk);
    let es = Talkdesk {
        provider: td.provider.clone(),
        signer: SigningKey::parse(SigningAlg::ES256, &Secret::new(private)).unwrap(),
    };
    let a = es.assertion(&url, "j2", 60, Some("key-1"));
    let refused = assertion_post(&url, &a, &[]).await;
    assert_eq!(refused.error(), "invalid_client");
    assert!(refused.text.contains("alg"));
}

#[tokio::test]
async fn client_secret_jwt_hs256() {
    let p = Provider::start().await.unwrap();
    p.register(
        RegisteredClient::transatel("sj", "unused").with_auth(ExpectedAuth::SecretJwt {
            secret: Secret::new("shared-secret"),
            alg: SigningAlg::HS256,
        }),
    );
    let url = p.token_url(Dialect::Transatel);
    let td = Talkdesk {
        provider: p.clone(),
        signer: SigningKey::parse(SigningAlg::HS256, &Secret::new("shared-secret")).unwrap(),
    };
    let mut a = td.assertion(&url, "j1", 60, None);
    // The helper signs for client "td"; re-sign for "sj".
    a = td
        .signer
        .sign(
            jsonwebtoken::Header::default(),
            &json!({"iss": "sj", "sub": "sj", "aud": url, "jti": "j1", "iat": now(), "exp": now() + 60}),
        )
        .unwrap_or(a);
    let ok = assertion_post(&url, &a, &[]).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    // Basic is the wrong method for this client.
    let basic_used = post(&url, Some(&basic("sj", "shared-secret")), CC).await;
    assert_eq!(basic_used.error(), "invalid_client");
}

// === lifetimes and tokens ===

#[tokio::test]
async fn lifetimes_and_liveness() {
    let p = Provider::start().await.unwrap();
    p.register(
        RegisteredClient::talentsoft_app("short", "s").with_lifetime(Duration::from_secs(1)),
    );
    let url = p.token_url(Dialect::TalentsoftApp);
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", "short"),
        ("client_secret", "s"),
    ];
    let a = post(&url, None, &form).await;
    assert_eq!(a.json()["expires_in"], "1");
    let token = a.json()["access_token"].as_str().unwrap().to_string();
    assert!(p.token_is_live(&token));
    assert!(
        eventually(5, || !p.token_is_live(&token)).await,
        "token never expired"
    );
    p.set_lifetime("short", Duration::from_secs(20));
    let b = post(&url, None, &form).await;
    assert_eq!(b.json()["expires_in"], "20");
    assert_eq!(p.issued("short"), 2);
}

#[tokio::test]
async fn tokens_are_unique_and_name_their_client() {
    let p = Provider::start().await.unwrap();
    p.register(RegisteredClient::talentsoft_app("a", "s"));
    p.register(RegisteredClient::talentsoft_app("b", "s"));
    let url = p.token_url(Dialect::TalentsoftApp);
    let mut seen = std::collections::HashSet::new();
    for id in ["a", "b", "a", "b"] {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", id),
            ("client_secret", "s"),
        ];
        let t = post(&url, None, &form).await.json()["access_token"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(t.contains(&tokenwarden::secret::fingerprint(id.as_bytes())));
        assert!(!t.contains('.'), "opaque tokens must not look like JWTs");
        assert!(seen.insert(t));
    }
}

#[tokio::test]
async fn omitted_expires_in() {
    let p = Provider::start().await.unwrap();
    let mut c = RegisteredClient::transatel("t", "s").with_lifetime(Duration::from_secs(120));
    c.omit_expires_in = true;
    p.register(c);
    let a = post(&p.token_url(Dialect::Transatel), Some(&basic("t", "s")), CC).await;
    assert!(a.json().get("expires_in").is_none());
    let claims: Value =
        jsonwebtoken::dangerous::insecure_decode_claims(a.json()["access_token"].as_str().unwrap())
            .unwrap();
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        120
    );
}

// === faults ===

#[tokio::test]
async fn plain_faults_as_a_client_sees_them() {
    let (p, url) = with_transatel().await;
    let auth = basic("tr-client", "tr-secret");

    p.set_fault(Some(Fault::ServerError));
    let a = post(&url, Some(&auth), CC).await;
    assert_eq!(a.status, 500);
    assert!(serde_json::from_str::<Value>(&a.text).is_err());
    // A standing fault holds for every request until cleared.
    assert_eq!(post(&url, Some(&auth), CC).await.status, 500);

    p.set_fault(Some(Fault::TooManyRequests { retry_after: 7 }));
    let a = post(&url, Some(&auth), CC).await;
    assert_eq!(a.status, 429);
    assert_eq!(a.header("retry-after"), Some("7"));

    p.set_fault(Some(Fault::InvalidJson));
    let a = post(&url, Some(&auth), CC).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert!(serde_json::from_str::<Value>(&a.text).is_err());

    p.set_fault(Some(Fault::HtmlError));
    let a = post(&url, Some(&auth), CC).await;
    assert_eq!(a.status, 502);
    assert!(a.header("content-type").unwrap().starts_with("text/html"));
    assert!(a.text.contains("<html>"));

    p.set_fault(Some(Fault::Custom {
        status: 418,
        content_type: "application/json".into(),
        body: br#"{"access_token": 42}"#.to_vec(),
    }));
    let a = post(&url, Some(&auth), CC).await;
    assert_eq!(a.status, 418);
    assert_eq!(a.text, r#"{"access_token": 42}"#);

    p.set_fault(None);
    assert_eq!(post(&url, Some(&auth), CC).await.status, 200);
    // Faults are applied after recording, and no token was issued under them.
    assert_eq!(p.requests().len(), 7);
    assert_eq!(p.issued("tr-client"), 1);
}

#[tokio::test]
async fn queued_faults_apply_to_the_next_requests_only() {
    let (p, url) = with_transatel().await;
    let auth = basic("tr-client", "tr-secret");
    p.fault_next(Fault::ServerError, 2);
    assert_eq!(post(&url, Some(&auth), CC).await.status, 500);
    assert_eq!(post(&url, Some(&auth), CC).await.status, 500);
    assert_eq!(post(&url, Some(&auth), CC).await.status, 200);
}

#[tokio::test]
async fn hang_never_answers_but_blocks_nothing_else() {
    let (p, url) = with_transatel().await;
    let auth = basic("tr-client", "tr-secret");
    p.fault_next(Fault::Hang, 1);
    let (u, a) = (url.clone(), auth.clone());
    let hung = tokio::spawn(async move {
        reqwest::Client::new()
            .post(&u)
            .header("authorization", a)
            .form(CC)
            .send()
            .await
    });
    assert!(eventually(5, || p.requests().len() == 1).await);
    // Another connection is served while the first one hangs.
    assert_eq!(post(&url, Some(&auth), CC).await.status, 200);
    assert!(!hung.is_finished());
    // A client with a timeout gives up.
    p.fault_next(Fault::Hang, 1);
    let timed_out = reqwest::Client::new()
        .post(&url)
        .header("authorization", &auth)
        .form(CC)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(timed_out.unwrap_err().is_timeout());
    // Shutting down closes the hung connection.
    p.shutdown();
    let r = tokio::time::timeout(Duration::from_secs(5), hung)
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_err());
}

#[tokio::test]
async fn drop_connection_closes_without_a_response() {
    let (p, _url) = with_transatel().await;
    p.set_fault(Some(Fault::DropConnection));
    let req = raw_post(
        "/transatel/authentication/api/token",
        &basic("tr-client", "tr-secret"),
        "grant_type=client_credentials",
    );
    let out = raw_exchange(&p, &req).await;
    assert!(out.is_empty(), "got {:?}", String::from_utf8_lossy(&out));
    assert_eq!(p.requests().len(), 1);
}

#[tokio::test]
async fn truncated_body_promises_more_than_it_sends() {
    let (p, _url) = with_transatel().await;
    p.set_fault(Some(Fault::TruncatedBody));
    let req = raw_post(
        "/transatel/authentication/api/token",
        &basic("tr-client", "tr-secret"),
        "grant_type=client_credentials",
    );
    let out = raw_exchange(&p, &req).await;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let declared: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("a Content-Length");
    assert!(!body.is_empty());
    assert!(body.len() < declared, "{} < {declared}", body.len());
    // reqwest sees a body error.
    let auth = basic("tr-client", "tr-secret");
    let resp = reqwest::Client::new()
        .post(p.token_url(Dialect::Transatel))
        .header("authorization", auth)
        .form(CC)
        .send()
        .await
        .unwrap();
    assert!(resp.text().await.is_err());
}

// === lifecycle ===

#[tokio::test]
async fn shutdown_and_last_drop_stop_the_server() {
    let (p, _) = with_transatel().await;
    let addr = p.addr();
    assert!(TcpStream::connect(addr).await.is_ok());
    p.shutdown();
    assert!(refuses(addr).await, "still accepting after shutdown()");

    let (p, _) = with_transatel().await;
    let addr = p.addr();
    let clone = p.clone();
    drop(p);
    assert!(
        TcpStream::connect(addr).await.is_ok(),
        "a clone keeps it running"
    );
    drop(clone);
    assert!(
        refuses(addr).await,
        "still accepting after the last handle was dropped"
    );
}

async fn refuses(addr: std::net::SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
