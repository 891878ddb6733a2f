//! A small etcd v3 client over the stubs `build.rs` generates from the vendored protos in
//! `proto/etcd` (no system `protoc`): one endpoint at a time, etcd's user/password tokens, TLS
//! and mTLS ([`super::tls`]), and the few calls fleet mode makes — ranges, transactions with
//! revision compares (one by one, or many in few round trips), a lease with its keep-alive
//! stream, and a watch over the prefix.

use std::time::Duration;

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::config::FleetConfig;

/// The code generated from `proto/etcd` (etcd's own packages and names).
#[allow(missing_docs, clippy::all, clippy::pedantic, dead_code)]
pub mod pb {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

use pb::etcdserverpb::auth_client::AuthClient;
use pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::etcdserverpb::kv_client::KvClient;
use pb::etcdserverpb::lease_client::LeaseClient;
use pb::etcdserverpb::request_op::Request as Op;
use pb::etcdserverpb::watch_client::WatchClient;
use pb::etcdserverpb::{
    AuthenticateRequest, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest,
};
pub use pb::etcdserverpb::{
    LeaseKeepAliveRequest, RangeResponse, TxnResponse, WatchRequest, WatchResponse,
};
pub use pb::mvccpb::KeyValue;

/// How long one call may take (a stream's keep-alive is watched separately).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Sub-transactions per transaction in [`Etcd::txn_each`]. etcd refuses a transaction with
/// more than `--max-txn-ops` (128 by default) compares or operations in a list, and counts a
/// nested transaction's against what its parent left: n sub-transactions of one compare and
/// one operation each need n <= 128 and 1 <= 128 - n. 64 stays well inside that.
pub const BATCH: usize = 64;

/// The largest message taken from etcd: a range over the prefix holds every client's state.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

type Svc = InterceptedService<Channel, Auth>;

/// Adds etcd's auth token, when there is one, and asks members without a leader to refuse
/// (`hasleader`: a member cut off from the others must not keep a watch quietly silent).
#[derive(Clone, Default)]
pub struct Auth(Option<AsciiMetadataValue>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("token", t.clone());
        }
        req.metadata_mut()
            .insert("hasleader", MetadataValue::from_static("true"));
        Ok(req)
    }
}

/// One connection to one etcd member.
#[derive(Clone)]
pub struct Etcd {
    pub endpoint: String,
    kv: KvClient<Svc>,
    lease: LeaseClient<Svc>,
    watch: WatchClient<Svc>,
}

/// An error talking to etcd, as one line that names the endpoint and no secret.
#[derive(Debug, thiserror::Error)]
#[error("etcd {endpoint}: {message}")]
pub struct EtcdError {
    pub endpoint: String,
    pub message: String,
}

fn err(endpoint: &str, message: impl Into<String>) -> EtcdError {
    EtcdError {
        endpoint: endpoint.to_string(),
        message: message.into(),
    }
}

fn status(endpoint: &str, s: &tonic::Status) -> EtcdError {
    err(
        endpoint,
        format!(
            "{:?}: {}",
            s.code(),
            crate::secret::mask_token_shapes(s.message())
        ),
    )
}

impl Etcd {
    /// Connects to `endpoint` (one of `[fleet] etcd`) and authenticates when `user` is set.
    pub async fn connect(config: &FleetConfig, endpoint: &url::Url) -> Result<Etcd, EtcdError> {
        let name = endpoint.as_str().trim_end_matches('/').to_string();
        let ep = Endpoint::from_shared(name.clone())
            .map_err(|e| err(&name, e.to_string()))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(3))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true);
        let connected = if endpoint.scheme() == "https" {
            let ca = config
                .ca_file
                .as_ref()
                .ok_or_else(|| err(&name, "https:// endpoints need ca_file"))?;
            let ca_pem = std::fs::read(ca)
                .map_err(|e| err(&name, format!("ca_file {}: {e}", ca.display())))?;
            let cert_pem = match &config.cert {
                Some(cert) => Some(
                    std::fs::read(cert)
                        .map_err(|e| err(&name, format!("cert {}: {e}", cert.display())))?,
                ),
                None => None,
            };
            let identity = match (&cert_pem, &config.cert_key) {
                (Some(chain), Some(key)) => Some((chain.as_slice(), key.value.expose().as_bytes())),
                _ => None,
            };
            let connector = super::tls::Connector::new(endpoint, &ca_pem, identity)
                .map_err(|e| err(&name, format!("TLS settings: {e}")))?;
            tokio::time::timeout(CALL_TIMEOUT, ep.connect_with_connector(connector)).await
        } else {
            tokio::time::timeout(CALL_TIMEOUT, ep.connect()).await
        };
        let channel = connected
            .map_err(|_| err(&name, "no answer to connect"))?
            .map_err(|e| err(&name, format!("cannot connect: {e}")))?;
        let mut auth = Auth::default();
        if let (Some(user), Some(password)) = (&config.user, &config.password) {
            let mut client = AuthClient::new(channel.clone());
            let req = AuthenticateRequest {
                name: user.clone(),
                password: password.value.expose().to_string(),
            };
            let resp = tokio::time::timeout(CALL_TIMEOUT, client.authenticate(req))
                .await
                .map_err(|_| err(&name, "no answer to authenticate"))?
                .map_err(|s| {
                    err(
                        &name,
                        format!(
                            "authenticating as user \"{user}\" failed ({:?}); check [fleet] user and password",
                            s.code()
                        ),
                    )
                })?;
            let token = resp.into_inner().token;
            auth = Auth(Some(token.parse().map_err(|_| {
                err(&name, "etcd gave an auth token that is not ASCII")
            })?));
        }
        let svc = || InterceptedService::new(channel.clone(), auth.clone());
        Ok(Etcd {
            endpoint: name,
            kv: KvClient::new(svc())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            lease: LeaseClient::new(svc()),
            watch: WatchClient::new(svc()).max_decoding_message_size(MAX_MESSAGE),
        })
    }

    async fn call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, EtcdError> {
        match tokio::time::timeout(CALL_TIMEOUT, fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(status(&self.endpoint, &s)),
            Err(_) => Err(err(&self.endpoint, "no answer in time")),
        }
    }

    /// One key, if present.
    pub async fn get(&self, key: &str) -> Result<(Option<KeyValue>, i64), EtcdError> {
        let mut kv = self.kv.clone();
        let req = RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        let r = self.call(kv.range(req)).await?;
        let rev = r.header.map_or(0, |h| h.revision);
        Ok((r.kvs.into_iter().next(), rev))
    }

    /// Every key under `prefix` (which ends with `/`), and the revision read at.
    pub async fn range_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let mut kv = self.kv.clone();
        let req = RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            ..Default::default()
        };
        let r = self.call(kv.range(req)).await?;
        let rev = r.header.map_or(0, |h| h.revision);
        Ok((r.kvs, rev))
    }

    /// A transaction: `success` runs when every compare holds. Returns whether it did, and the
    /// revision after it.
    pub async fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<RequestOp>,
    ) -> Result<(bool, i64), EtcdError> {
        let mut kv = self.kv.clone();
        let req = TxnRequest {
            compare,
            success,
            failure: Vec::new(),
        };
        let r = self.call(kv.txn(req)).await?;
        Ok((r.succeeded, r.header.map_or(0, |h| h.revision)))
    }

    /// Many independent conditional writes in few round trips: each `(compare, op)` runs as a
    /// sub-transaction (etcd 3.3 or later) of one transaction per [`BATCH`] of them, so that
    /// one failed compare does not stop the others. Returns, for each in order, whether its
    /// compare held, and the revision of the transaction it was in (the mod_revision of what
    /// it wrote).
    pub async fn txn_each(
        &self,
        each: Vec<(Compare, RequestOp)>,
    ) -> Result<Vec<(bool, i64)>, EtcdError> {
        use pb::etcdserverpb::response_op::Response;
        let mut out = Vec::with_capacity(each.len());
        let mut each = each.into_iter().peekable();
        while each.peek().is_some() {
            let success: Vec<RequestOp> = each
                .by_ref()
                .take(BATCH)
                .map(|(c, op)| RequestOp {
                    request: Some(Op::RequestTxn(TxnRequest {
                        compare: vec![c],
                        success: vec![op],
                        failure: Vec::new(),
                    })),
                })
                .collect();
            let n = success.len();
            let mut kv = self.kv.clone();
            let req = TxnRequest {
                compare: Vec::new(),
                success,
                failure: Vec::new(),
            };
            let r = self.call(kv.txn(req)).await?;
            let rev = r.header.map_or(0, |h| h.revision);
            if r.responses.len() != n {
                return Err(err(
                    &self.endpoint,
                    format!("a transaction of {n} answered {}", r.responses.len()),
                ));
            }
            out.extend(r.responses.into_iter().map(|op| {
                let ok = matches!(op.response, Some(Response::ResponseTxn(t)) if t.succeeded);
                (ok, rev)
            }));
        }
        Ok(out)
    }

    /// A lease of `ttl` seconds.
    pub async fn grant(&self, ttl: i64) -> Result<i64, EtcdError> {
        let mut lease = self.lease.clone();
        let req = pb::etcdserverpb::LeaseGrantRequest { ttl, id: 0 };
        let r = self.call(lease.lease_grant(req)).await?;
        if !r.error.is_empty() || r.id == 0 {
            return Err(err(&self.endpoint, format!("lease refused: {}", r.error)));
        }
        Ok(r.id)
    }

    /// Ends a lease now: the keys attached to it go at once.
    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        let mut lease = self.lease.clone();
        let req = pb::etcdserverpb::LeaseRevokeRequest { id };
        self.call(lease.lease_revoke(req)).await.map(|_| ())
    }

    /// Keeps lease `id` alive every `every` until the stream fails or etcd says the lease is
    /// gone; returns why it ended.
    pub async fn keep_alive(&self, id: i64, every: Duration) -> EtcdError {
        let mut lease = self.lease.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        // The first request goes with the call: etcd answers the call with its first reply.
        if tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
            return err(&self.endpoint, "lease keep-alive stopped");
        }
        let requests = tokio_stream_from(rx);
        let mut responses = match self.call(lease.lease_keep_alive(requests)).await {
            Ok(s) => s,
            Err(e) => return e,
        };
        let mut first = true;
        loop {
            if !std::mem::take(&mut first) && tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
                return err(&self.endpoint, "lease keep-alive stopped");
            }
            match tokio::time::timeout(CALL_TIMEOUT, responses.message()).await {
                Ok(Ok(Some(r))) if r.ttl > 0 => {}
                Ok(Ok(Some(_))) => return err(&self.endpoint, "this host's lease expired"),
                Ok(Ok(None)) => return err(&self.endpoint, "lease keep-alive stream ended"),
                Ok(Err(s)) => return status(&self.endpoint, &s),
                Err(_) => return err(&self.endpoint, "no answer to a lease keep-alive"),
            }
            tokio::time::sleep(every).await;
        }
    }

    /// A watch over every key under `prefix` from revision `from`: the stream of responses
    /// (the sender is kept so the stream stays open).
    pub async fn watch_prefix(
        &self,
        prefix: &str,
        from: i64,
    ) -> Result<
        (
            tonic::Streaming<WatchResponse>,
            tokio::sync::mpsc::Sender<WatchRequest>,
        ),
        EtcdError,
    > {
        use pb::etcdserverpb::watch_request::RequestUnion;
        let mut watch = self.watch.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(
                pb::etcdserverpb::WatchCreateRequest {
                    key: prefix.as_bytes().to_vec(),
                    range_end: prefix_end(prefix.as_bytes()),
                    start_revision: from,
                    ..Default::default()
                },
            )),
        };
        tx.send(create)
            .await
            .map_err(|_| err(&self.endpoint, "watch request not sent"))?;
        let stream = self.call(watch.watch(tokio_stream_from(rx))).await?;
        Ok((stream, tx))
    }
}

/// An mpsc receiver as the request stream of a client-streaming call.
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// The end of the range of keys that start with `prefix` (etcd's `range_end`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// `key`'s mod_revision equals `rev` (0: the key is absent).
pub fn mod_is(key: &str, rev: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Mod as i32,
        key: key.as_bytes().to_vec(),
        range_end: Vec::new(),
        target_union: Some(TargetUnion::ModRevision(rev)),
    }
}

/// `key` is absent.
pub fn absent(key: &str) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.as_bytes().to_vec(),
        range_end: Vec::new(),
        target_union: Some(TargetUnion::CreateRevision(0)),
    }
}

/// Puts `value` at `key`, attached to `lease` (0: none).
pub fn put(key: &str, value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: key.as_bytes().to_vec(),
            value,
            lease,
            ..Default::default()
        })),
    }
}

/// Deletes `key`.
pub fn delete(key: &str) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_are_etcds() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
