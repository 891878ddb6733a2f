//! The routes of the HTTP API (docs/http.md#routes), over the same [`TokenApi`] as gRPC: the
//! same access rule, the same waits for a first token, the same refreshes.
//!
//! - `GET /v1/token/NAME`: the token as `tokenwarden get --format json` prints it;
//!   `?format=token|header|json`, `?min_valid=5m`, `?after_generation=N` (waits up to
//!   [`LONG_POLL`] for a token newer than generation N, then answers the current one).
//! - `POST /v1/token/NAME/refresh`: a new token now, as `RefreshToken` (`?force=true` as
//!   `tokenwarden refresh`); `?format` too.
//! - `GET /v1/clients`: the status of every client the caller may read (`status --json`).
//! - `GET /healthz`: `{"status":"ok"}` while the daemon serves.
//!
//! Before any route, the request is checked ([`refusal`]): a caller the kernel could not name
//! is refused, so is any request carrying `Origin`, `X-Forwarded-For` or `Forwarded` (a
//! browser or a proxy relaying someone else's request), and on TCP a request without
//! `Tokenwarden: 1` (what a server-side request forgery cannot add) or whose `Host` is not a
//! loopback name (DNS rebinding). Errors are `{"error": CODE, "message": TEXT}` with 400, 403,
//! 404, 405, 429 or 503; every answer carries `Cache-Control: no-store`.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Bytes;
use tokio::time::Instant;

use crate::audit::{self, Api};
use crate::client::{self, Format};
use crate::grpc::access::Caller;
use crate::grpc::service::{ApiError, MAX_MIN_VALID, TokenApi, token_message};
use crate::oauth::Human;
use crate::store::ClientSlot;
use crate::token::Token;

/// The longest `after_generation` wait, and the longest wait for a client's first token or a
/// refresh.
pub const LONG_POLL: Duration = Duration::from_secs(60);
/// The header every TCP request must carry, and its value.
pub const REQUIRED_HEADER: (&str, &str) = ("tokenwarden", "1");
/// Headers that mark a request relayed for someone else (a browser's cross-origin request, a
/// proxy): refused on every listener.
pub const REFUSED_HEADERS: [&str; 3] = ["origin", "x-forwarded-for", "forwarded"];

/// The answer type of every route.
pub type Answer = Response<Full<Bytes>>;

/// Which listener a request came in on: the header rules differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `http_socket`: the caller is known by SO_PEERCRED.
    Unix,
    /// `http_listen`: the caller is known by the kernel's socket table.
    Tcp,
}

/// The routes over `api`.
#[derive(Clone)]
pub struct Routes {
    api: TokenApi,
}

/// Why a request is refused, as its answer says.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds before a retry can succeed (429).
    pub retry_after: Option<u64>,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn forbidden(message: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    fn bad_request(message: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl From<ApiError> for Refusal {
    /// The one conversion of the API's errors into HTTP answers.
    fn from(e: ApiError) -> Refusal {
        let message = e.to_string();
        match e {
            ApiError::NotFound(_) => Refusal::new(StatusCode::NOT_FOUND, "not_found", message),
            ApiError::PermissionDenied { .. } | ApiError::UnknownCaller => {
                Refusal::forbidden(message)
            }
            ApiError::InvalidArgument(_) => Refusal::bad_request(message),
            ApiError::NotRenewed { held, .. } => {
                let wait = held.min_interval.saturating_sub(held.age);
                Refusal {
                    retry_after: Some(wait.as_secs() + u64::from(wait.subsec_nanos() > 0)),
                    ..Refusal::new(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", message)
                }
            }
            ApiError::Unavailable { .. } | ApiError::DeadlineExceeded(_) | ApiError::Stopping => {
                Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            }
        }
    }
}

/// Why a request may not be served at all, before its route is looked at (pure); `None`: go
/// on. `caller` is who the kernel says is calling, if it could say.
pub fn refusal(
    transport: Transport,
    caller: Option<&Caller>,
    headers: &HeaderMap,
) -> Option<Refusal> {
    if caller.is_none() {
        return Some(Refusal::forbidden(match transport {
            Transport::Unix => "the caller's identity is unknown (no peer credentials)",
            Transport::Tcp => {
                "the caller's uid is not in the kernel's socket table (connect from this \
                 host's loopback)"
            }
        }));
    }
    if let Some(h) = REFUSED_HEADERS.iter().find(|h| headers.contains_key(**h)) {
        return Some(Refusal::forbidden(format!(
            "requests carrying {h} are refused: the HTTP API serves local programs, not \
             browsers or proxies"
        )));
    }
    if transport == Transport::Tcp {
        let (name, value) = REQUIRED_HEADER;
        if headers.get(name).map(HeaderValue::as_bytes) != Some(value.as_bytes()) {
            return Some(Refusal::forbidden(
                "requests over TCP must carry the header \"Tokenwarden: 1\"",
            ));
        }
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        if !host.is_some_and(is_loopback_host) {
            return Some(Refusal::forbidden(
                "the Host header must be localhost or a loopback address",
            ));
        }
    }
    None
}

/// `localhost`, `127.x.y.z` or `[::1]`, with an optional port (pure).
pub fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, port)) if port.is_empty() || port.strip_prefix(':').is_some_and(is_port) => {
                return ip
                    .parse::<std::net::Ipv6Addr>()
                    .is_ok_and(|ip| ip.is_loopback());
            }
            _ => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return false,
            None => host,
        },
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

/// The route a request names (pure).
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    Token(&'a str),
    Refresh(&'a str),
    Clients,
    Health,
}

/// The route of `path`, or `None` (404).
pub fn route(path: &str) -> Option<Route<'_>> {
    match path {
        "/v1/clients" => return Some(Route::Clients),
        "/healthz" => return Some(Route::Health),
        _ => {}
    }
    let rest = path.strip_prefix("/v1/token/")?;
    match rest.split_once('/') {
        None => Some(Route::Token(rest)),
        Some((name, "refresh")) => Some(Route::Refresh(name)),
        Some(_) => None,
    }
}

/// The query parameters of the token routes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Query {
    pub format: Option<Format>,
    pub min_valid: Option<Duration>,
    pub after_generation: Option<u64>,
    pub force: bool,
}

/// The query string of a request to `route`: each parameter at most once, and only those
/// the route takes (a misspelt one is an error, not ignored) (pure).
pub fn query(route: &Route<'_>, q: Option<&str>) -> Result<Query, Refusal> {
    let allowed: &[&str] = match route {
        Route::Token(_) => &["format", "min_valid", "after_generation"],
        Route::Refresh(_) => &["format", "force"],
        Route::Clients | Route::Health => &[],
    };
    let mut out = Query::default();
    let mut seen: Vec<String> = Vec::new();
    for (k, v) in url::form_urlencoded::parse(q.unwrap_or("").as_bytes()) {
        if !allowed.contains(&k.as_ref()) {
            return Err(Refusal::bad_request(if allowed.is_empty() {
                "this route takes no query parameters".to_string()
            } else {
                format!(
                    "unknown query parameter {k:?}; this route takes {}",
                    allowed.join(", ")
                )
            }));
        }
        if seen.iter().any(|s| *s == k) {
            return Err(Refusal::bad_request(format!("{k} given twice")));
        }
        seen.push(k.to_string());
        match k.as_ref() {
            "format" => {
                out.format = Some(match v.as_ref() {
                    "json" => Format::Json,
                    "token" => Format::Token,
                    "header" => Format::Header,
                    _ => {
                        return Err(Refusal::bad_request(format!(
                            "format {v:?}: use json, token or header"
                        )));
                    }
                });
            }
            "min_valid" => {
                let d = humantime::parse_duration(&v).map_err(|_| {
                    Refusal::bad_request(format!(
                        "min_valid {v:?} is not a duration such as 30s or 5m"
                    ))
                })?;
                if d > MAX_MIN_VALID {
                    return Err(Refusal::bad_request(format!(
                        "min_valid {} is longer than the {} allowed",
                        Human(d),
                        Human(MAX_MIN_VALID)
                    )));
                }
                out.min_valid = Some(d).filter(|d| !d.is_zero());
            }
            "after_generation" => {
                out.after_generation = Some(v.parse().map_err(|_| {
                    Refusal::bad_request(format!(
                        "after_generation {v:?} is not a generation number"
                    ))
                })?);
            }
            "force" => {
                out.force = match v.as_ref() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(Refusal::bad_request("force: use true or false")),
                };
            }
            _ => {}
        }
    }
    Ok(out)
}

impl Routes {
    /// The routes over `api`.
    pub fn new(api: TokenApi) -> Routes {
        Routes { api }
    }

    /// Answers one request from `caller` (who the kernel says is calling) on `transport`.
    pub async fn answer<B>(
        &self,
        transport: Transport,
        caller: Option<&Arc<Caller>>,
        req: &http::Request<B>,
    ) -> Answer {
        match self.serve(transport, caller, req).await {
            Ok(answer) => answer,
            Err(refusal) => refused(&refusal),
        }
    }

    async fn serve<B>(
        &self,
        transport: Transport,
        caller: Option<&Arc<Caller>>,
        req: &http::Request<B>,
    ) -> Result<Answer, Refusal> {
        if let Some(r) = refusal(transport, caller.map(|c| &**c), req.headers()) {
            return Err(r);
        }
        let Some(caller) = caller else {
            return Err(ApiError::UnknownCaller.into());
        };
        let path = req.uri().path();
        let Some(route) = route(path) else {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no route {path:?}; the routes are /v1/token/NAME, /v1/token/NAME/refresh, \
                     /v1/clients and /healthz"
                ),
            ));
        };
        let method = if matches!(route, Route::Refresh(_)) {
            Method::POST
        } else {
            Method::GET
        };
        if req.method() != method {
            let mut r = refused(&Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{path} takes {method} only"),
            ));
            if let Ok(v) = HeaderValue::from_str(method.as_str()) {
                r.headers_mut().insert(header::ALLOW, v);
            }
            return Ok(r);
        }
        let q = query(&route, req.uri().query())?;
        match route {
            Route::Health => Ok(ok(
                "application/json",
                serde_json::json!({"status": "ok"}).to_string() + "\n",
            )),
            Route::Clients => {
                let list = self.api.readable_statuses(caller);
                Ok(ok(
                    "application/json",
                    client::status_json(&list).to_string() + "\n",
                ))
            }
            Route::Token(name) => {
                let (token, generation) = self.token(caller, name, &q).await?;
                Ok(token_answer(caller, name, &token, generation, &q))
            }
            Route::Refresh(name) => {
                let deadline = Some(Instant::now() + LONG_POLL);
                let slot = self.api.slot(caller, name)?;
                let reason = self.api.refresh_reason(caller, name, &slot, q.force)?;
                let (token, generation) = self.api.refresh(name, &slot, reason, deadline).await?;
                Ok(token_answer(caller, name, &token, generation, &q))
            }
        }
    }

    /// `GET /v1/token/NAME`: the current token, or the first newer than `after_generation`
    /// (waiting up to [`LONG_POLL`]), then one valid for `min_valid`.
    async fn token(
        &self,
        caller: &Caller,
        name: &str,
        q: &Query,
    ) -> Result<(Arc<Token>, u64), ApiError> {
        let deadline = Instant::now() + LONG_POLL;
        let mut slot = self.api.slot(caller, name)?;
        let current = match q.after_generation {
            Some(after) => self.newer(caller, name, &mut slot, after, deadline).await?,
            None => self.api.current(name, &slot, Some(deadline)).await?,
        };
        self.api
            .valid_for(name, &slot, current, q.min_valid, Some(deadline))
            .await
    }

    /// The first valid token of generation above `after`, or at `deadline` the current one.
    async fn newer(
        &self,
        caller: &Caller,
        name: &str,
        slot: &mut ClientSlot,
        after: u64,
        deadline: Instant,
    ) -> Result<(Arc<Token>, u64), ApiError> {
        let mut rx = slot.snapshot.clone();
        loop {
            {
                let snap = rx.borrow_and_update();
                if snap.generation > after
                    && let Some(t) = snap.valid_token(std::time::SystemTime::now())
                {
                    return Ok((t.clone(), snap.generation));
                }
            }
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        *slot = self.api.reattach(caller, name, &mut rx)?;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => break,
                _ = self.api.stopping().cancelled() => return Err(ApiError::Stopping),
            }
        }
        // Nothing newer in time: what there is now (no more waiting).
        self.api.current(name, slot, Some(Instant::now())).await
    }
}

/// A token in the asked format, counted and audited.
fn token_answer(caller: &Caller, name: &str, token: &Token, generation: u64, q: &Query) -> Answer {
    audit::read(name, Api::Http, caller, token, generation);
    let format = q.format.unwrap_or(Format::Json);
    let body = match client::format_token(&token_message(name, token, generation), format) {
        Ok(body) => body,
        // Only k8s-exec can fail (a token without an expiry), and ?format= does not offer it.
        Err(e) => {
            return refused(&Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                e.to_string(),
            ));
        }
    };
    let content_type = match format {
        Format::Json | Format::K8sExec => "application/json",
        Format::Token | Format::Header => "text/plain; charset=utf-8",
    };
    ok(content_type, body)
}

fn with_headers(status: StatusCode, content_type: &'static str, body: String) -> Answer {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn ok(content_type: &'static str, body: String) -> Answer {
    with_headers(StatusCode::OK, content_type, body)
}

/// The JSON error answer of `r`.
pub fn refused(r: &Refusal) -> Answer {
    let body = serde_json::json!({"error": r.code, "message": r.message}).to_string() + "\n";
    let mut answer = with_headers(r.status, "application/json", body);
    if let Some(secs) = r.retry_after
        && let Ok(v) = HeaderValue::from_str(&secs.to_string())
    {
        answer.headers_mut().insert(header::RETRY_AFTER, v);
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_table() {
        let cases = [
            ("/v1/token/api", Some(Route::Token("api"))),
            ("/v1/token/api/refresh", Some(Route::Refresh("api"))),
            ("/v1/token/api/other", None),
            ("/v1/token/", Some(Route::Token(""))),
            ("/v1/clients", Some(Route::Clients)),
            ("/healthz", Some(Route::Health)),
            ("/", None),
            ("/v1/clients/", None),
            ("/v2/token/api", None),
        ];
        for (path, want) in cases {
            assert_eq!(route(path), want, "{path}");
        }
    }

    #[test]
    fn query_table() {
        let token = Route::Token("api");
        let refresh = Route::Refresh("api");
        let q = query(&token, Some("format=token&min_valid=5m&after_generation=7")).unwrap();
        assert_eq!(
            q,
            Query {
                format: Some(Format::Token),
                min_valid: Some(Duration::from_secs(300)),
                after_generation: Some(7),
                force: false
            }
        );
        assert_eq!(query(&token, None).unwrap(), Query::default());
        assert_eq!(query(&token, Some("min_valid=0s")).unwrap().min_valid, None);
        assert!(query(&refresh, Some("force=true")).unwrap().force);
        for (route, bad) in [
            (&token, "format=xml"),
            (&token, "min_valid=soon"),
            (&token, "min_valid=25h"),
            (&token, "after_generation=-1"),
            (&token, "format=json&format=token"),
            (&token, "formt=json"),
            (&token, "force=true"),
            (&refresh, "force=maybe"),
            (&Route::Clients, "x=1"),
        ] {
            let e = query(route, Some(bad)).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn loopback_hosts() {
        for good in [
            "localhost",
            "localhost:8080",
            "LOCALHOST",
            "127.0.0.1",
            "127.0.0.1:1",
            "127.1.2.3:65535",
            "[::1]",
            "[::1]:80",
        ] {
            assert!(is_loopback_host(good), "{good}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:80",
            "localhost.evil.example",
            "10.0.0.1",
            "0.0.0.0",
            "[::]:80",
            "[::1]x",
            "localhost:",
            "localhost:abc",
            "[::ffff:127.0.0.1]",
            "127.0.0.1:80:80",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn requests_are_refused_by_their_headers() {
        let c = Caller::with_groups(1000, 1000, vec![]);
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        let good_tcp = [("host", "127.0.0.1:8080"), ("tokenwarden", "1")];
        // (transport, caller known, headers, refused)
        let cases: Vec<(Transport, bool, HeaderMap, bool)> = vec![
            (Transport::Unix, true, h(&[]), false),
            (Transport::Unix, true, h(&[("host", "evil.example")]), false),
            (Transport::Unix, false, h(&[]), true),
            (Transport::Unix, true, h(&[("origin", "null")]), true),
            (
                Transport::Unix,
                true,
                h(&[("x-forwarded-for", "1.2.3.4")]),
                true,
            ),
            (
                Transport::Unix,
                true,
                h(&[("forwarded", "for=1.2.3.4")]),
                true,
            ),
            (Transport::Tcp, true, h(&good_tcp), false),
            (Transport::Tcp, false, h(&good_tcp), true),
            (Transport::Tcp, true, h(&[("host", "localhost")]), true),
            (
                Transport::Tcp,
                true,
                h(&[("host", "localhost"), ("tokenwarden", "2")]),
                true,
            ),
            (
                Transport::Tcp,
                true,
                h(&[("host", "rebound.example"), ("tokenwarden", "1")]),
                true,
            ),
            (Transport::Tcp, true, h(&[("tokenwarden", "1")]), true),
            (
                Transport::Tcp,
                true,
                h(&[
                    ("host", "localhost"),
                    ("tokenwarden", "1"),
                    ("origin", "http://localhost"),
                ]),
                true,
            ),
        ];
        for (t, known, headers, want) in cases {
            let got = refusal(t, known.then_some(&c), &headers);
            assert_eq!(got.is_some(), want, "{t:?} {known} {headers:?}: {got:?}");
            if let Some(r) = got {
                assert_eq!(r.status, StatusCode::FORBIDDEN);
            }
        }
    }

    #[test]
    fn errors_map_to_statuses() {
        let st = |e: ApiError| Refusal::from(e).status;
        assert_eq!(st(ApiError::NotFound("x".into())), StatusCode::NOT_FOUND);
        assert_eq!(
            st(ApiError::PermissionDenied {
                client: "x".into(),
                uid: 1
            }),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            st(ApiError::InvalidArgument("x".into())),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(st(ApiError::Stopping), StatusCode::SERVICE_UNAVAILABLE);
        let r = Refusal::from(ApiError::NotRenewed {
            client: "x".into(),
            held: crate::refresher::HeldBack {
                age: Duration::from_millis(2500),
                min_interval: Duration::from_secs(10),
            },
        });
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.retry_after, Some(8));
        let a = refused(&r);
        assert_eq!(a.headers()["retry-after"], "8");
        assert_eq!(a.headers()["cache-control"], "no-store");
    }
}
