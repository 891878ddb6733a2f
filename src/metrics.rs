//! Prometheus metrics and health endpoints on `metrics_listen`
//! (docs/operations.md#metrics-and-health).
//!
//! `GET /metrics`: Prometheus text. Per client: `tokenwarden_token_expiry_timestamp_seconds`,
//! `tokenwarden_token_seconds_until_expiry`, `tokenwarden_token_valid`,
//! `tokenwarden_token_generation`; `tokenwarden_refresh_attempts_total{client,result}`,
//! `tokenwarden_refresh_duration_seconds{client}` (histogram),
//! `tokenwarden_output_writes_total{client,result}`; `tokenwarden_config_reloads_total{result}`;
//! `tokenwarden_grpc_requests_total{method,code}`.
//! `GET /healthz`: 200 while the daemon runs. `GET /readyz`: 200 when every client holds a token
//! valid for at least its `refresh_margin`, its outputs hold that token and its state is saved;
//! else 503 naming each client that is not ready and why (`not ready: a (output not written)`).
//!
//! The recorder is installed only when `metrics_listen` is set; the `metrics` macros elsewhere
//! are no-ops otherwise.
//!
//! The listener is bounded like the gRPC socket ([`crate::limits`]): at most
//! [`Limits::metrics_max_connections`] connections (at the cap it stops accepting), of which
//! one peer uid holds at most its [`limits::uid_share`] (peers on other hosts count as one
//! uid), 10 s to send a request's headers (hyper's `header_read_timeout`, which also closes a
//! kept-alive connection that sends nothing more), and a small read buffer.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::limits::{self, ConnGate, ConnPermit, Limits};
use crate::store::Store;

/// hyper's read buffer per connection (its minimum is 8 KiB): a request is a line and a few
/// headers.
const MAX_BUF: usize = 16 * 1024;

/// Buckets of the refresh latency histogram, in seconds.
const LATENCY_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once; later calls return the same handle.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(
                "tokenwarden_refresh_duration_seconds".into(),
            ),
            LATENCY_BUCKETS,
        )?
        .install_recorder()?;
    let _ = HANDLE.set(handle.clone());
    Ok(handle)
}

/// Records one token request's outcome and latency.
pub fn refresh_attempt(client: &str, ok: bool, elapsed: Duration) {
    let result = if ok { "success" } else { "failure" };
    metrics::counter!("tokenwarden_refresh_attempts_total", "client" => client.to_string(), "result" => result).increment(1);
    metrics::histogram!("tokenwarden_refresh_duration_seconds", "client" => client.to_string())
        .record(elapsed.as_secs_f64());
}

/// Records one output write.
pub fn output_write(client: &str, ok: bool) {
    let result = if ok { "success" } else { "failure" };
    metrics::counter!("tokenwarden_output_writes_total", "client" => client.to_string(), "result" => result).increment(1);
}

/// Records one config reload.
pub fn reload(ok: bool) {
    let result = if ok { "success" } else { "failure" };
    metrics::counter!("tokenwarden_config_reloads_total", "result" => result).increment(1);
}

/// Records one gRPC request's outcome: `method` from a fixed set (never the caller's text),
/// `code` as gRPC names it (`OK`, `PERMISSION_DENIED`, …).
pub fn grpc_request(method: &'static str, code: tonic::Code) {
    metrics::counter!("tokenwarden_grpc_requests_total", "method" => method, "code" => code_name(code)).increment(1);
}

/// The canonical name of a gRPC status code (grpc/doc/statuscodes.md).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Records a connection to the gRPC socket closed as soon as it was accepted, and why.
pub fn connection_refused(listener: &'static str, reason: &'static str) {
    metrics::counter!("tokenwarden_connections_refused_total", "listener" => listener, "reason" => reason)
        .increment(1);
}

/// Counts a fleet holder's commit of a new state to etcd (docs/fleet.md).
pub fn fleet_commit() {
    metrics::counter!("tokenwarden_fleet_commits_total").increment(1);
}

/// Counts a failed etcd session, by how it ended (`unreachable`, `wrong-key`, `name-taken`).
pub fn fleet_etcd_failure(kind: &'static str) {
    metrics::counter!("tokenwarden_fleet_etcd_failures_total", "kind" => kind).increment(1);
}

/// Counts a fleet client refreshed by this host alone because etcd was unreachable.
pub fn fleet_local_refresh(client: &str) {
    metrics::counter!("tokenwarden_fleet_local_refreshes_total", "client" => client.to_string())
        .increment(1);
}

/// Counts a new state this host could not commit to etcd, kept locally and retried
/// (`result`: `kept` when it happened, `committed` when a retry made it, `superseded` when
/// another host's newer state replaced it).
pub fn fleet_uncommitted(client: &str, result: &'static str) {
    metrics::counter!("tokenwarden_fleet_uncommitted_total", "client" => client.to_string(), "result" => result)
        .increment(1);
}

/// Sets the per-client gauges from the store (at scrape time, so "seconds until expiry" is now).
fn update_gauges(store: &Store) {
    let now = SystemTime::now();
    for (name, snap) in store.snapshots() {
        let (expiry, left) = match &snap.token {
            Some(t) => (
                crate::token::unix_seconds(t.expires_at) as f64,
                t.expires_at
                    .duration_since(now)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or_else(|e| -e.duration().as_secs_f64()),
            ),
            None => (0.0, 0.0),
        };
        let valid = if snap.valid_token(now).is_some() {
            1.0
        } else {
            0.0
        };
        metrics::gauge!("tokenwarden_token_expiry_timestamp_seconds", "client" => name.clone())
            .set(expiry);
        metrics::gauge!("tokenwarden_token_seconds_until_expiry", "client" => name.clone())
            .set(left);
        metrics::gauge!("tokenwarden_token_valid", "client" => name.clone()).set(valid);
        if let Some(role) = snap.fleet_role {
            for r in ["holder", "follower", "local"] {
                metrics::gauge!("tokenwarden_fleet_role", "client" => name.clone(), "role" => r)
                    .set(if r == role { 1.0 } else { 0.0 });
            }
        }
        if let Some(etcd) = snap.fleet_etcd {
            metrics::gauge!("tokenwarden_fleet_etcd_up").set(if etcd == "up" { 1.0 } else { 0.0 });
        }
        metrics::gauge!("tokenwarden_token_generation", "client" => name)
            .set(snap.generation as f64);
    }
}

/// Clients that are not ready, each with why: no token valid for at least its
/// `refresh_margin`, an output that does not hold the current token, or state not saved (what
/// consumers read or what a restart would find is behind).
pub fn not_ready(store: &Store) -> Vec<(String, &'static str)> {
    let now = SystemTime::now();
    store
        .slots()
        .into_iter()
        .filter_map(|(name, slot)| {
            slot.snapshot
                .borrow()
                .not_ready_reason(now, slot.config.timing.refresh_margin)
                .map(|why| (name, why))
        })
        .collect()
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn handle(
    req: &Request<hyper::body::Incoming>,
    prom: &PrometheusHandle,
    store: &Store,
) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            update_gauges(store);
            respond(StatusCode::OK, "text/plain; version=0.0.4", prom.render())
        }
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let missing = not_ready(store);
            if missing.is_empty() {
                respond(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!(
                        "not ready: {}\n",
                        missing
                            .iter()
                            .map(|(name, why)| format!("{name} ({why})"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            }
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// Serves the endpoints on `addr` until `cancel`, within `limits`.
pub async fn serve(
    addr: SocketAddr,
    prom: PrometheusHandle,
    store: Arc<Store>,
    cancel: CancellationToken,
    limits: &Limits,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let gate = ConnGate::new(limits.metrics_max_connections);
    let header_timeout = limits.handshake_timeout;
    let cancel_conn = cancel.clone();
    tracing::info!(address = %local, "metrics and health endpoints listening");
    let serve = move |(stream, peer): (tokio::net::TcpStream, SocketAddr), permit: ConnPermit| {
        let prom = prom.clone();
        let store = store.clone();
        let cancel = cancel_conn.clone();
        async move {
            // Charged to the peer's uid when the peer is on this host (the kernel's socket
            // table, as for `http_listen`); peers on other hosts have none and share one
            // share. So no local user holds every place and keeps the scraper out.
            let uid = match stream.local_addr() {
                Ok(local) => {
                    tokio::task::spawn_blocking(move || crate::http::peer::uid_of(peer, local).ok())
                        .await
                        .ok()
                        .flatten()
                }
                Err(_) => None,
            };
            let Some(held) = permit.charge_or_refuse(uid, "metrics listener", "metrics") else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let r = handle(&req, &prom, &store);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(MAX_BUF)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = conn => if let Err(e) = r { tracing::debug!("metrics connection: {e}"); }
            }
            drop(held);
        }
    };
    tokio::spawn(limits::accept_loop(
        "metrics listener",
        gate,
        cancel,
        listener,
        serve,
    ));
    Ok(local)
}
