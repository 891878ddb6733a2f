//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the test that replays their
//! corpora on every test run (`tests/it/fuzz_corpus.rs`), so a crash once found stays fixed.
//! Each takes raw bytes and must never panic.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::oauth::{RequestContext, ResponseMeta, parse_token_response};

/// Parses and validates `text` as a config file (secrets resolve relative to a directory that
/// does not exist, so only inline and env secrets can load).
pub fn config(text: &str) {
    let path = Path::new("/nonexistent-tokenwarden-fuzz/tokenwarden.toml");
    if let Err(errors) = crate::config::load_str(text, path) {
        for e in &errors.errors {
            let _ = e.to_string();
        }
    }
}

/// Interprets `data` as a token response: the first byte picks the status class, the second
/// the content type, the rest is the body.
pub fn token_response(data: &[u8]) {
    let (status, content_type, body) = match data {
        [a, b, rest @ ..] => {
            let status = [200u16, 201, 400, 401, 429, 500, 502, 302][(*a % 8) as usize];
            let ct = [
                "application/json",
                "text/html",
                "application/x-www-form-urlencoded",
                "text/plain",
            ][(*b % 4) as usize];
            (status, ct, rest)
        }
        _ => (200, "application/json", data),
    };
    let meta = ResponseMeta {
        status,
        content_type: Some(content_type.to_string()),
        retry_after: None,
        date: None,
    };
    let scope = vec!["a".to_string()];
    let mut redactor = crate::secret::Redactor::new();
    redactor.add("fuzz-secret");
    let ctx = RequestContext {
        requested_scope: &scope,
        default_lifetime: Duration::from_secs(3600),
        sent_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_456_800),
        redactor: &redactor,
    };
    match parse_token_response(&meta, body, &ctx) {
        Ok(issued) => {
            // What the checks promise: a usable token that expires after it was issued.
            assert!(!issued.token.access_token.is_empty());
            assert!(issued.token.expires_at > issued.token.issued_at);
        }
        Err(e) => {
            let m = e.to_string();
            assert!(!m.contains("fuzz-secret"));
            let _ = e.class();
        }
    }
}

/// Reads the `exp` of an arbitrary string taken as a JWT.
pub fn jwt_exp(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = crate::oauth::jwt_expiry(s);
    }
}

/// Feeds the HTTP/2 client preface and then `data`, cut into pieces whose sizes come from the
/// data itself, through the `:authority` adaptor: it must rewrite or refuse, never panic.
pub fn authority(data: &[u8]) {
    use bytes::BytesMut;
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(cut % 64) + 1;
    let mut rw = crate::grpc::authority::Rewriter::new();
    let mut input = BytesMut::from(&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..]);
    let mut out = BytesMut::new();
    if rw.feed(&mut input, &mut out).is_err() {
        return;
    }
    for chunk in rest.chunks(step) {
        input.extend_from_slice(chunk);
        if rw.feed(&mut input, &mut out).is_err() {
            return;
        }
    }
}

/// Serves one whole HTTP/2 connection whose client sends the preface and then `data`, over an
/// in-memory pipe, with the real services (tokens, health, reflection) over an empty store, and
/// reads everything the server answers until it closes. Nothing may panic, and the connection
/// must end (bounded in time by its own deadlines and the peer's end of input).
pub fn connection(data: &[u8]) {
    use std::sync::{Arc, OnceLock};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    static RUNTIME: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    static SERVICES: OnceLock<Option<Arc<crate::grpc::conn::Services>>> = OnceLock::new();
    let Some(rt) = RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()
        })
        .as_ref()
    else {
        return;
    };
    let Some(services) = SERVICES
        .get_or_init(|| {
            let limits = crate::limits::Limits {
                handshake_timeout: Duration::from_millis(200),
                idle_timeout: Duration::from_millis(500),
                close_grace: Duration::from_millis(50),
                ..crate::limits::Limits::default()
            };
            rt.block_on(crate::grpc::server::build_services(
                Arc::new(crate::store::Store::default()),
                tokio_util::sync::CancellationToken::new(),
                limits,
            ))
            .ok()
            .map(|(services, health)| {
                // The reporter stays: health answers SERVING for every input.
                std::mem::forget(health);
                services
            })
        })
        .clone()
    else {
        return;
    };
    rt.block_on(async move {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        // A root caller, so that every call reaches its service.
        let caller = Some(std::sync::Arc::new(
            crate::grpc::access::Caller::with_groups(0, 0, Vec::new()),
        ));
        let stop = tokio_util::sync::CancellationToken::new();
        let serving = tokio::spawn(crate::grpc::conn::serve(
            server,
            caller,
            services,
            stop.clone(),
        ));
        let mut input = crate::grpc::authority::PREFACE.to_vec();
        input.extend_from_slice(data);
        let exchange = async {
            let (mut rx, mut tx) = tokio::io::split(&mut client);
            let write = async {
                let _ = tx.write_all(&input).await;
                let _ = tx.shutdown().await;
            };
            let read = async {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = rx.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            tokio::join!(write, read);
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), exchange).await;
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), serving).await;
    });
}
