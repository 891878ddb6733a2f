//! `tokenwarden get`, `status` and `refresh`: a tonic client over the daemon's Unix socket,
//! and how their answers are printed.
//!
//! Which socket: `-s`, else `$TOKENWARDEN_SOCKET`, else the config's `daemon.socket`, else
//! [`DEFAULT_SOCKET_PATH`]. The config is only skimmed for that one key ([`socket_from_config`]):
//! reading it needs none of its secrets, and a config with a syntax error elsewhere (the very
//! moment an operator runs `status` to see why a reload was refused) still names its socket.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use crate::config::DEFAULT_SOCKET_PATH;
use crate::grpc::pb;
use crate::grpc::pb::token_service_client::TokenServiceClient;
use crate::oauth::Human;

/// How long a command waits for the daemon's answer (a first token may still be coming).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a command failed. One line each, no secrets.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket file: the daemon is not running (or serves elsewhere).
    #[error("tokenwarden is not running: no socket at {0} (start it, or pass -s SOCKET)")]
    NoSocket(PathBuf),
    /// A socket file nobody listens on.
    #[error("tokenwarden is not running: nothing is listening on {0}")]
    Refused(PathBuf),
    /// The socket file's mode does not let this user connect.
    #[error(
        "permission denied on {0}: this user may not connect to the socket (see daemon.socket_mode)"
    )]
    SocketDenied(PathBuf),
    /// Another failure connecting.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The HTTP/2 connection failed.
    #[error("cannot talk to tokenwarden on {path}: {message}")]
    Transport { path: PathBuf, message: String },
    /// The daemon answered with an error status.
    #[error("{}", describe(.0))]
    Rpc(#[from] tonic::Status),
    /// A token without an expiry time, asked for in a format that must carry one (`k8s-exec`).
    #[error(
        "client {0:?}: the daemon sent the token without an expiry time, which --format k8s-exec \
         needs (upgrade the daemon, or use --format json)"
    )]
    NoExpiry(String),
    /// The answer could not be written to standard output (a full disk, say).
    #[error("cannot write to standard output: {0}")]
    Output(std::io::Error),
}

fn describe(s: &tonic::Status) -> String {
    if s.code() == tonic::Code::FailedPrecondition && !s.message().is_empty() {
        // "client "api": not renewed: …; next possible in 8s" says it all.
        return s.message().lines().next().unwrap_or("").to_string();
    }
    let what = match s.code() {
        tonic::Code::PermissionDenied => "not allowed",
        tonic::Code::NotFound => "not found",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::InvalidArgument => "invalid request",
        tonic::Code::DeadlineExceeded => "timed out",
        _ => "error",
    };
    let message = s.message().lines().next().unwrap_or("");
    if message.is_empty() {
        format!("{what} ({:?})", s.code())
    } else {
        format!("{what}: {message}")
    }
}

/// The socket to use: the flag, else the environment's, else the config's, else the default.
/// `from_config` is only called when neither the flag nor the environment names one.
pub fn resolve_socket(
    flag: Option<&Path>,
    env: Option<&str>,
    from_config: impl FnOnce() -> Option<PathBuf>,
) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    if let Some(e) = env.filter(|e| !e.is_empty()) {
        return PathBuf::from(e);
    }
    from_config().unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_PATH))
}

/// The most of a config file [`socket_from_config`] reads: far more than any real config.
pub const CONFIG_SKIM_LIMIT: u64 = 1 << 20;

/// What [`socket_from_config`] found in a config file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ConfigSocket {
    /// `daemon.socket`, when the config names an absolute path.
    pub socket: Option<PathBuf>,
    /// The file is not valid TOML as a whole (the parser's first line of complaint): the
    /// socket, if any, came from a line-by-line scan of its `[daemon]` table.
    pub broken: Option<String>,
}

impl ConfigSocket {
    /// The note for stderr when the config is broken: say so, and what shows its errors.
    pub fn note(&self, config: &Path) -> Option<String> {
        let first = self.broken.as_deref()?;
        let used = match &self.socket {
            Some(s) => format!("using its daemon.socket {}", s.display()),
            None => format!("it names no daemon.socket; trying {DEFAULT_SOCKET_PATH}"),
        };
        Some(format!(
            "note: {} has errors ({first}); `tokenwarden check -c {}` shows them all; {used}",
            config.display(),
            config.display(),
        ))
    }
}

/// `daemon.socket` of the config at `path`: nothing when the file cannot be read. A file that
/// does not parse as a whole is scanned line by line for the `[daemon]` table's `socket = ...`
/// (a syntax error elsewhere must not hide the daemon from `status`).
pub fn socket_from_config(path: &Path) -> ConfigSocket {
    skim(path).map(|text| socket_in(&text)).unwrap_or_default()
}

/// The first [`CONFIG_SKIM_LIMIT`] bytes of a config file, if it can be read as text.
fn skim(path: &Path) -> Option<String> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(CONFIG_SKIM_LIMIT).read_to_string(&mut text))
        .ok()?;
    Some(text)
}

/// [`socket_from_config`] on the file's text.
pub fn socket_in(text: &str) -> ConfigSocket {
    let absolute = |s: &str| Some(PathBuf::from(s)).filter(|p| p.is_absolute());
    match toml::from_str::<toml::Table>(text) {
        Ok(table) => ConfigSocket {
            socket: table
                .get("daemon")
                .and_then(|d| d.get("socket"))
                .and_then(|s| s.as_str())
                .and_then(absolute),
            broken: None,
        },
        Err(e) => ConfigSocket {
            socket: scan_daemon_socket(text).as_deref().and_then(absolute),
            broken: Some(e.message().lines().next().unwrap_or("").to_string()),
        },
    }
}

/// `socket` of the `[daemon]` table (or a top-level `daemon.socket = ...`), found line by line:
/// each candidate line is parsed on its own, so a broken line elsewhere does not matter.
fn scan_daemon_socket(text: &str) -> Option<String> {
    let value_of = |line: &str| -> Option<String> {
        let t: toml::Table = toml::from_str(line).ok()?;
        let v = match t.get("daemon") {
            Some(d) => d.get("socket")?,
            None => t.get("socket")?,
        };
        v.as_str().map(str::to_string)
    };
    // The table a line is in: None before any header.
    let mut table: Option<String> = None;
    let mut found = None;
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            let header = l.split('#').next().unwrap_or("").trim();
            table = Some(
                header
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .trim()
                    .to_string(),
            );
            continue;
        }
        let key = l.split('=').next().unwrap_or("").trim();
        let wanted = match table.as_deref() {
            Some("daemon") => key == "socket" || key == "\"socket\"",
            None => key.replace(' ', "") == "daemon.socket",
            Some(_) => false,
        };
        if wanted && let Some(v) = value_of(l) {
            // The last one wins, as the daemon would see it had the file parsed.
            found = Some(v);
        }
    }
    found
}

/// The client names a config declares, read leniently for shell completion: the `[clients.*]`
/// tables of the file and of the files its `include` globs match; a file that does not parse
/// is scanned line by line for table headers. Sorted, without duplicates; empty when nothing
/// can be read.
pub fn clients_from_config(path: &Path) -> Vec<String> {
    let Some(text) = skim(path) else {
        return Vec::new();
    };
    let mut names = clients_in(&text);
    if let Ok(table) = toml::from_str::<toml::Table>(&text) {
        let globs = table
            .get("daemon")
            .and_then(|d| d.get("include"))
            .and_then(|i| i.as_array())
            .map(|a| a.iter().filter_map(|g| g.as_str()).collect::<Vec<_>>())
            .unwrap_or_default();
        let base = path.parent().unwrap_or(Path::new("/"));
        // Bounded: completion must answer at once, whatever the globs match.
        let files = globs
            .iter()
            .filter_map(|g| glob::glob(&base.join(g).to_string_lossy()).ok())
            .flatten()
            .filter_map(Result::ok)
            .take(1000);
        for f in files {
            if let Some(t) = skim(&f) {
                names.extend(clients_in(&t));
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// The `[clients.NAME]` names in one file's text (whole parse, else a scan of table headers).
fn clients_in(text: &str) -> Vec<String> {
    if let Ok(table) = toml::from_str::<toml::Table>(text) {
        return table
            .get("clients")
            .and_then(|c| c.as_table())
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
    }
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if !l.starts_with('[') {
                return None;
            }
            let header = l.split(']').next()?.trim_start_matches('[').trim();
            // Parsed as a key path: `clients."a.b".outputs` → clients, a.b, outputs.
            let t: toml::Table = toml::from_str(&format!("{header} = 0")).ok()?;
            let clients = t.get("clients")?.as_table()?;
            clients.keys().next().cloned()
        })
        .collect()
}

/// The names `tokenwarden __complete-clients` prints: the running daemon's (those the caller
/// may read), else the config's. The daemon gets one second.
pub async fn complete_clients(socket: &Path, config: &Path) -> Vec<String> {
    let from_daemon = tokio::time::timeout(Duration::from_secs(1), list(socket)).await;
    match from_daemon {
        Ok(Ok(clients)) if !clients.is_empty() => clients.into_iter().map(|c| c.client).collect(),
        _ => clients_from_config(config),
    }
}

/// Connects to the daemon on `socket`.
pub async fn connect(socket: &Path) -> Result<TokenServiceClient<Channel>, ClientError> {
    let first = UnixStream::connect(socket)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ClientError::NoSocket(socket.to_path_buf()),
            std::io::ErrorKind::ConnectionRefused => ClientError::Refused(socket.to_path_buf()),
            std::io::ErrorKind::PermissionDenied => ClientError::SocketDenied(socket.to_path_buf()),
            _ => ClientError::Connect {
                path: socket.to_path_buf(),
                source: e,
            },
        })?;
    // The connector hands out the stream connected above, then reconnects if it must.
    let first = Arc::new(Mutex::new(Some(first)));
    let path = socket.to_path_buf();
    let connector = tower::service_fn(move |_: http::Uri| {
        let first = first.clone();
        let path = path.clone();
        async move {
            let taken = first.lock().unwrap_or_else(PoisonError::into_inner).take();
            let stream = match taken {
                Some(s) => s,
                None => UnixStream::connect(&path).await?,
            };
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    // The authority is never used for routing: the socket is the address.
    let channel = Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .map_err(|e| ClientError::Transport {
            path: socket.to_path_buf(),
            message: error_chain(&e),
        })?;
    Ok(TokenServiceClient::new(channel))
}

/// An error and its sources, `: `-separated.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let chain = std::iter::successors(Some(e), |e| e.source());
    chain.map(|e| e.to_string()).collect::<Vec<_>>().join(": ")
}

fn request<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(CALL_TIMEOUT);
    r
}

/// `GetToken`.
pub async fn get(
    socket: &Path,
    client: &str,
    min_valid: Option<Duration>,
) -> Result<pb::Token, ClientError> {
    let mut c = connect(socket).await?;
    let min_valid_for = min_valid.map(|d| prost_types::Duration {
        seconds: d.as_secs().min(i64::MAX as u64) as i64,
        nanos: d.subsec_nanos() as i32,
    });
    let token = c
        .get_token(request(pb::GetTokenRequest {
            client: client.to_string(),
            min_valid_for,
        }))
        .await?;
    Ok(token.into_inner())
}

/// `RefreshToken`, forced: a new token, or FAILED_PRECONDITION saying when one is possible
/// (never the token `min_interval` would otherwise answer with; see
/// docs/cli.md#refreshing-on-demand-and-min_interval).
pub async fn refresh(socket: &Path, client: &str) -> Result<pb::Token, ClientError> {
    let mut c = connect(socket).await?;
    let mut req = request(pb::RefreshTokenRequest {
        client: client.to_string(),
    });
    req.metadata_mut().insert(
        crate::grpc::service::FORCE_METADATA,
        tonic::metadata::MetadataValue::from_static("force"),
    );
    let token = c.refresh_token(req).await?;
    Ok(token.into_inner())
}

/// `ListClients`.
pub async fn list(socket: &Path) -> Result<Vec<pb::ClientStatus>, ClientError> {
    let mut c = connect(socket).await?;
    let list = c.list_clients(request(pb::ListClientsRequest {})).await?;
    Ok(list.into_inner().clients)
}

/// `--format` of `tokenwarden get` (its variants' docs are the help of the values). Each ends
/// with a newline; `json` holds the fields of the `json` output format
/// (docs/configuration.md#output-formats) plus `client` and `generation`; `k8s-exec` is for
/// client-go's exec credential plugins too (docs/kubernetes.md).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The access token.
    Token,
    /// A JSON object with the token, its type, times, scope and generation.
    Json,
    /// `Authorization: Bearer …`.
    Header,
    /// A Kubernetes `ExecCredential` (client.authentication.k8s.io/v1) for kubectl's exec
    /// credential plugins.
    K8sExec,
}

/// The `apiVersion` of the `ExecCredential` that `--format k8s-exec` prints.
pub const EXEC_CREDENTIAL_API: &str = "client.authentication.k8s.io/v1";

fn time_of(t: Option<&prost_types::Timestamp>) -> Option<SystemTime> {
    SystemTime::try_from(*t?).ok()
}

fn rfc3339_of(t: Option<&prost_types::Timestamp>) -> Option<String> {
    time_of(t).map(crate::token::rfc3339)
}

/// What `get` prints for `token` in `format`: the whole text, or an error and nothing (never
/// a part of it).
pub fn format_token(token: &pb::Token, format: Format) -> Result<String, ClientError> {
    Ok(match format {
        Format::Token => format!("{}\n", token.access_token),
        Format::Header => format!("Authorization: Bearer {}\n", token.access_token),
        Format::K8sExec => {
            // kubectl and client-go cache the credential until expirationTimestamp: it is the
            // token's own expiry, in whole seconds rounded down (never later). Without one
            // they would keep the token until a 401, so no expiry is an error.
            let Some(expires) = rfc3339_of(token.expires_at.as_ref()) else {
                return Err(ClientError::NoExpiry(token.client.clone()));
            };
            let v = serde_json::json!({
                "apiVersion": EXEC_CREDENTIAL_API,
                "kind": "ExecCredential",
                "spec": {"interactive": false},
                "status": {
                    "token": token.access_token,
                    "expirationTimestamp": expires,
                },
            });
            format!("{v}\n")
        }
        Format::Json => {
            let v = serde_json::json!({
                "client": token.client,
                "access_token": token.access_token,
                "token_type": token.token_type,
                "expires_at": rfc3339_of(token.expires_at.as_ref()),
                "issued_at": rfc3339_of(token.issued_at.as_ref()),
                "scope": token.scopes.join(" "),
                "generation": token.generation,
            });
            format!("{v}\n")
        }
    })
}

/// One line for `refresh`: which token arrived (by fingerprint, never the token).
pub fn describe_token(token: &pb::Token, now: SystemTime) -> String {
    let left = time_of(token.expires_at.as_ref())
        .and_then(|t| t.duration_since(now).ok())
        .map(|d| Human(d).to_string())
        .unwrap_or_else(|| "0s".into());
    format!(
        "{}: token {} generation {}, expires {} (in {left})",
        token.client,
        crate::secret::fingerprint(token.access_token.as_bytes()),
        token.generation,
        rfc3339_of(token.expires_at.as_ref()).unwrap_or_else(|| "-".into()),
    )
}

fn state_name(s: &pb::ClientStatus) -> &'static str {
    pb::State::try_from(s.state)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN")
}

/// A short relative time: `in 12s`, `3s ago`.
fn relative(t: Option<SystemTime>, now: SystemTime, future_word: bool) -> String {
    let Some(t) = t else { return "-".into() };
    let whole = |d: Duration| Human(Duration::from_secs(d.as_secs())).to_string();
    match t.duration_since(now) {
        Ok(d) if future_word => format!("in {}", whole(d)),
        Ok(d) => whole(d),
        Err(e) => format!("{} ago", whole(e.duration())),
    }
}

/// The `status` table: one aligned row per client.
pub fn status_table(clients: &[pb::ClientStatus], now: SystemTime) -> String {
    let table = status_rows(clients, now);
    // Fleet mode: each client's role and etcd's health, in a second table.
    let fleet: Vec<&pb::ClientStatus> = clients
        .iter()
        .filter(|c| !c.fleet_role.is_empty())
        .collect();
    if fleet.is_empty() {
        return table;
    }
    let width = fleet
        .iter()
        .map(|c| c.client.chars().count())
        .max()
        .unwrap_or(0)
        .max(6);
    let mut out = table;
    out.push_str(&format!("\n{:width$}  {:8}  ETCD\n", "CLIENT", "ROLE"));
    for c in fleet {
        out.push_str(&format!(
            "{:width$}  {:8}  {}\n",
            c.client, c.fleet_role, c.fleet_etcd
        ));
    }
    out
}

fn status_rows(clients: &[pb::ClientStatus], now: SystemTime) -> String {
    let header = [
        "CLIENT",
        "STATE",
        "EXPIRES IN",
        "NEXT REFRESH",
        "FAILURES",
        "LAST ERROR",
    ];
    let rows = clients.iter().map(|c| {
        [
            c.client.clone(),
            state_name(c).to_string(),
            relative(time_of(c.expires_at.as_ref()), now, false),
            relative(time_of(c.next_refresh_at.as_ref()), now, true),
            c.consecutive_failures.to_string(),
            last_error_cell(c),
        ]
    });
    // The header is a row like the others: its cells count in the widths too.
    let lines: Vec<[String; 6]> = std::iter::once(header.map(String::from))
        .chain(rows)
        .collect();
    let mut widths = [0; 6];
    for r in &lines {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in &lines {
        let mut l = String::new();
        for (i, cell) in r.iter().enumerate() {
            l.push_str(cell);
            if i + 1 < r.len() {
                let pad = widths[i] - cell.chars().count() + 2;
                l.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    }
    out
}

/// The LAST ERROR cell, led by a chained client's subject (`subject: client up`).
fn last_error_cell(c: &pb::ClientStatus) -> String {
    let error = c.last_error.lines().next().unwrap_or("");
    match (c.subject_client.is_empty(), error.is_empty()) {
        (true, true) => "-".into(),
        (true, false) => error.to_string(),
        (false, true) => format!("subject: client {}", c.subject_client),
        (false, false) => format!("subject: client {}; {error}", c.subject_client),
    }
}

/// The `status --json` document: an array of client objects.
pub fn status_json(clients: &[pb::ClientStatus]) -> serde_json::Value {
    serde_json::Value::Array(
        clients
            .iter()
            .map(|c| {
                serde_json::json!({
                    "client": c.client,
                    "state": state_name(c),
                    "expires_at": rfc3339_of(c.expires_at.as_ref()),
                    "next_refresh_at": rfc3339_of(c.next_refresh_at.as_ref()),
                    "last_refresh_at": rfc3339_of(c.last_refresh_at.as_ref()),
                    "consecutive_failures": c.consecutive_failures,
                    "last_error": Some(&c.last_error).filter(|e| !e.is_empty()),
                    "subject_client": Some(&c.subject_client).filter(|e| !e.is_empty()),
                    "fleet_role": Some(&c.fleet_role).filter(|r| !r.is_empty()),
                    "fleet_etcd": Some(&c.fleet_etcd).filter(|r| !r.is_empty()),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn ts(s: u64) -> Option<prost_types::Timestamp> {
        Some(at(s).into())
    }

    #[test]
    fn socket_precedence() {
        let p = |s: &str| PathBuf::from(s);
        // The flag, then the environment, then the config, then the default.
        let cases = [
            (Some("/f"), Some("/e"), Some("/c"), "/f"),
            (None, Some("/e"), Some("/c"), "/e"),
            (None, Some(""), Some("/c"), "/c"),
            (None, None, Some("/c"), "/c"),
            (None, Some(""), None, DEFAULT_SOCKET_PATH),
            (None, None, None, DEFAULT_SOCKET_PATH),
        ];
        for (flag, env, config, want) in cases {
            let flag = flag.map(p);
            assert_eq!(
                resolve_socket(flag.as_deref(), env, || config.map(p)),
                p(want),
                "{flag:?} {env:?} {config:?}"
            );
        }
        // The config is not even read when the flag or the environment names the socket.
        let read = std::cell::Cell::new(false);
        resolve_socket(None, Some("/e"), || {
            read.set(true);
            None
        });
        assert!(!read.get());
    }

    #[test]
    fn socket_from_a_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[daemon]\nsocket = \"/run/x.sock\"\n[clients.a]\n").unwrap();
        assert_eq!(
            socket_from_config(&f),
            ConfigSocket {
                socket: Some(PathBuf::from("/run/x.sock")),
                broken: None
            }
        );
        assert_eq!(
            socket_from_config(&dir.path().join("absent")),
            ConfigSocket::default()
        );
    }

    /// A config that does not parse as a whole still names its socket: the `[daemon]` table
    /// is scanned line by line.
    #[test]
    fn socket_of_a_broken_config_table() {
        let s = |text: &str| socket_in(text).socket.map(|p| p.display().to_string());
        let broken = |text: &str| socket_in(text).broken.is_some();
        let cases: [(&str, Option<&str>, bool); 12] = [
            (
                "[daemon]\nsocket = \"/run/a.sock\"\n",
                Some("/run/a.sock"),
                false,
            ),
            ("[daemon]\nstate_dir = \"/x\"\n", None, false),
            ("[daemon]\nsocket = \"relative.sock\"\n", None, false),
            // A syntax error after the socket, and before it.
            (
                "[daemon]\nsocket = \"/run/b.sock\"\n[clients.a]\ntoken_url = \"https://x\n",
                Some("/run/b.sock"),
                true,
            ),
            (
                "[clients.a]\nscope = [\n[daemon] # the daemon\n  socket   =  '/run/c.sock'  # here\n",
                Some("/run/c.sock"),
                true,
            ),
            (
                "daemon.socket = \"/run/d.sock\"\nbad line\n",
                Some("/run/d.sock"),
                true,
            ),
            // `socket` of another table is not the daemon's.
            (
                "[clients.a]\nsocket = \"/run/e.sock\"\nbad line\n",
                None,
                true,
            ),
            ("[daemon.x]\nsocket = \"/run/f.sock\"\nbad\n", None, true),
            ("socket = \"/run/g.sock\"\nbad\n", None, true),
            // A broken socket line itself gives nothing.
            ("[daemon]\nsocket = \"/run/h.sock\nbad\n", None, true),
            (
                "[daemon]\n\"socket\" = \"/run/i.sock\"\n=\n",
                Some("/run/i.sock"),
                true,
            ),
            ("not toml [", None, true),
        ];
        for (text, want, is_broken) in cases {
            assert_eq!(s(text).as_deref(), want, "{text:?}");
            assert_eq!(broken(text), is_broken, "{text:?}");
        }
        let found = socket_in("[daemon]\nsocket = \"/run/a.sock\"\nx\n");
        let note = found.note(Path::new("/etc/tw.toml")).unwrap();
        assert!(
            note.contains("/etc/tw.toml has errors")
                && note.contains("tokenwarden check -c /etc/tw.toml")
                && note.contains("/run/a.sock"),
            "{note}"
        );
        assert_eq!(socket_in("").note(Path::new("/x")), None);
    }

    #[test]
    fn client_names_for_completion() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("tw.toml");
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::write(
            &main,
            "[daemon]\ninclude = [\"conf.d/*.toml\"]\n[clients.b]\n[clients.\"a.v2\"]\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("conf.d/x.toml"), "[clients.c]\n").unwrap();
        assert_eq!(clients_from_config(&main), ["a.v2", "b", "c"]);
        // Broken: the headers, outputs and assertion tables counted once.
        std::fs::write(
            &main,
            "[clients.b]\nx = \"\n[[clients.b.outputs]]\n[clients.\"a.v2\".assertion]\n\
             [daemon]\n[ clients . d ] # d\n",
        )
        .unwrap();
        assert_eq!(clients_from_config(&main), ["a.v2", "b", "d"]);
        assert!(clients_from_config(&dir.path().join("absent")).is_empty());
    }

    fn token() -> pb::Token {
        pb::Token {
            client: "transatel".into(),
            access_token: "abc".into(),
            token_type: "Bearer".into(),
            expires_at: ts(1_795_460_400),
            issued_at: ts(1_795_456_800),
            scopes: vec!["a".into(), "b".into()],
            generation: 7,
        }
    }

    #[test]
    fn token_formats() {
        let t = token();
        assert_eq!(format_token(&t, Format::Token).unwrap(), "abc\n");
        assert_eq!(
            format_token(&t, Format::Header).unwrap(),
            "Authorization: Bearer abc\n"
        );
        let v: serde_json::Value =
            serde_json::from_str(&format_token(&t, Format::Json).unwrap()).unwrap();
        assert_eq!(v["access_token"], "abc");
        assert_eq!(v["expires_at"], "2026-11-23T19:00:00Z");
        assert_eq!(v["issued_at"], "2026-11-23T18:00:00Z");
        assert_eq!(v["scope"], "a b");
        assert_eq!(v["generation"], 7);
        let line = describe_token(&t, at(1_795_460_000));
        assert!(!line.contains("abc"), "{line}");
        assert!(
            line.contains("ba7816bf") && line.contains("in 6m 40s"),
            "{line}"
        );
    }

    #[test]
    fn k8s_exec_is_an_exec_credential_expiring_with_the_token() {
        let mut t = token();
        // A sub-second expiry: the credential must not outlive the token, so it rounds down.
        t.expires_at = Some(prost_types::Timestamp {
            seconds: 1_795_460_400,
            nanos: 999_000_000,
        });
        let text = format_token(&t, Format::K8sExec).unwrap();
        assert!(text.ends_with("}\n") && text.lines().count() == 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "apiVersion": "client.authentication.k8s.io/v1",
                "kind": "ExecCredential",
                "spec": {"interactive": false},
                "status": {"token": "abc", "expirationTimestamp": "2026-11-23T19:00:00Z"},
            })
        );
        let expiry = v["status"]["expirationTimestamp"].as_str().unwrap();
        assert_eq!(
            humantime::parse_rfc3339(expiry).unwrap(),
            at(1_795_460_400),
            "RFC 3339 in UTC, equal to the token's expiry"
        );

        // No expiry: an error naming the client, no output, and no token in the message.
        t.expires_at = None;
        let e = format_token(&t, Format::K8sExec).unwrap_err().to_string();
        assert!(e.contains("\"transatel\"") && !e.contains("abc"), "{e}");
    }

    /// A status row of `client` in `state`, nothing else set.
    fn row(client: &str, state: pb::State) -> pb::ClientStatus {
        pb::ClientStatus {
            client: client.into(),
            state: state as i32,
            ..Default::default()
        }
    }

    #[test]
    fn table_is_aligned() {
        let rows = vec![
            pb::ClientStatus {
                expires_at: ts(1_090),
                next_refresh_at: ts(1_060),
                last_refresh_at: ts(1_000),
                ..row("transatel", pb::State::Valid)
            },
            pb::ClientStatus {
                next_refresh_at: ts(1_005),
                last_error: "invalid_client: bad secret".into(),
                consecutive_failures: 3,
                ..row("creads-files", pb::State::Failed)
            },
            pb::ClientStatus {
                expires_at: ts(990),
                ..row("old", pb::State::Expired)
            },
            pb::ClientStatus {
                expires_at: ts(1_090),
                subject_client: "transatel".into(),
                ..row("exchanged", pb::State::Valid)
            },
        ];
        let table = status_table(&rows, at(1_000));
        let want = "\
CLIENT        STATE    EXPIRES IN  NEXT REFRESH  FAILURES  LAST ERROR
transatel     VALID    1m 30s      in 1m         0         -
creads-files  FAILED   -           in 5s         3         invalid_client: bad secret
old           EXPIRED  10s ago     -             0         -
exchanged     VALID    1m 30s      -             0         subject: client transatel
";
        assert_eq!(table, want);
        let json = status_json(&rows);
        assert_eq!(json[0]["state"], "VALID");
        assert_eq!(json[1]["last_error"], "invalid_client: bad secret");
        assert!(json[0]["last_error"].is_null());
        assert!(json[1]["expires_at"].is_null());
        assert_eq!(json[3]["subject_client"], "transatel");
        assert!(json[0]["subject_client"].is_null());
        assert!(json[0]["fleet_role"].is_null());
    }

    #[test]
    fn fleet_roles_get_their_own_table() {
        let rows = vec![
            pb::ClientStatus {
                fleet_role: "holder".into(),
                fleet_etcd: "up".into(),
                ..row("transatel", pb::State::Valid)
            },
            row("local-one", pb::State::Valid),
        ];
        let table = status_table(&rows, at(1_000));
        assert!(
            table.ends_with("\nCLIENT     ROLE      ETCD\ntransatel  holder    up\n"),
            "{table}"
        );
        assert_eq!(status_json(&rows)[0]["fleet_role"], "holder");
    }
}
