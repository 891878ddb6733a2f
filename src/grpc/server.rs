//! The socket and the server on it: bind, serve, stop (docs/grpc.md#serving).
//!
//! Binding: a stale socket file at the path (nobody accepts on it) is replaced; a live one (a
//! daemon is serving there) or anything that is not a socket is left alone and refused. The
//! socket is bound inside a fresh 0700 directory next to the final path, given `socket_mode`
//! there, and renamed into place: nobody can connect before the mode is right, and unlike a
//! umask change this touches no other thread's files. The path is removed on stop, if it
//! still is our socket. An `O_PATH` descriptor of the socket file is opened while it is still
//! in the private directory and kept: a later `socket_mode` change is applied through it
//! (`/proc/self/fd/N`), to the file the daemon bound, never through the path, which someone
//! may have swapped for a symlink since.
//!
//! Serving: `tokenwarden.v1.TokenService`, `grpc.health.v1.Health` (SERVING, NOT_SERVING once
//! stopping) and server reflection v1 and v1alpha (Python's grpcio-reflection speaks only
//! v1alpha). Each accepted connection goes through [`super::authority::FixAuthority`] so stock
//! clients sending the socket path as `:authority` work, then is served by [`super::conn`]
//! (HTTP/2 on `h2` directly, `GetToken`'s common case answered inline, the rest through the
//! tonic services). No keep-alive pings: a Unix socket's peer going away closes it.
//!
//! Connections are capped ([`crate::limits::Limits::max_connections`]): at the cap the loop
//! stops accepting until one closes, so peers wait in the kernel's backlog and hold no
//! descriptor of ours. One peer uid holds at most [`crate::limits::uid_share`] of the cap; a
//! connection beyond it is closed as soon as it is accepted, so that a local user holding
//! connections by the thousand cannot keep everyone else in the backlog.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::access::Caller;
use super::conn::{self, Services};
use super::fast::AnswerCache;
use super::pb;
use super::service::TokenApi;
use crate::limits::{self, ConnGate, Limits};
use crate::store::Store;

/// How long stop waits for calls in flight before dropping the connections.
pub const STOP_GRACE: Duration = Duration::from_secs(1);

/// Why the socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Something other than a socket is at the path: not ours to remove.
    #[error("{0}: exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Another process accepts connections on the socket.
    #[error("{0}: another process is serving on this socket")]
    InUse(PathBuf),
    /// A file-system or socket call failed.
    #[error("{path}: cannot {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    /// The reflection service could not read the proto's descriptors (a build problem).
    #[error("cannot build the reflection service: {0}")]
    Reflection(String),
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> ServeError + 'a {
    move |source| ServeError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// A running gRPC server on a Unix socket.
pub struct GrpcServer {
    path: PathBuf,
    mode: u32,
    /// (device, inode) of the socket we bound: removed on stop only if still there.
    inode: (u64, u64),
    /// An `O_PATH` descriptor of the socket file we bound: its mode is changed through it.
    file: OwnedFd,
    /// The connection cap (changed by a reload).
    gate: Arc<ConnGate>,
    stop: CancellationToken,
    health: HealthReporter,
    task: tokio::task::JoinHandle<()>,
}

impl GrpcServer {
    /// Binds `path` with `mode` and serves the API over `store` until [`GrpcServer::stop`],
    /// with the default [`Limits`].
    pub async fn start(
        path: &Path,
        mode: u32,
        store: Arc<Store>,
    ) -> Result<GrpcServer, ServeError> {
        Self::start_limited(path, mode, store, Limits::default()).await
    }

    /// [`GrpcServer::start`] with the given bounds.
    pub async fn start_limited(
        path: &Path,
        mode: u32,
        store: Arc<Store>,
        limits: Limits,
    ) -> Result<GrpcServer, ServeError> {
        let (listener, file) = bind(path, mode)?;
        let inode = bound_inode(&file, path)?;
        let stop = CancellationToken::new();
        let (services, health) = build_services(store, stop.clone(), limits).await?;
        let gate = ConnGate::new(services.limits.max_connections);
        let task = tokio::spawn(accept_loop(listener, services, gate.clone(), stop.clone()));
        tracing::info!(socket = %path.display(), mode = format!("{mode:04o}"), "gRPC API listening");
        Ok(GrpcServer {
            path: path.to_path_buf(),
            mode,
            inode,
            file,
            gate,
            stop,
            health,
            task,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The socket's mode.
    pub fn mode(&self) -> u32 {
        self.mode
    }

    /// Changes the mode of the socket file the daemon bound, through the descriptor kept
    /// since (never through the path: whatever is at the path now may not be ours).
    pub fn set_mode(&mut self, mode: u32) -> Result<(), ServeError> {
        set_bound_mode(&self.file, &self.path, mode)?;
        self.mode = mode;
        Ok(())
    }

    /// Changes the connection cap; connections over a lowered cap stay until they close.
    pub fn set_max_connections(&self, max: usize) {
        self.gate.set_max(max);
    }

    /// Reports NOT_SERVING, ends waits and streams, lets calls in flight finish (up to
    /// [`STOP_GRACE`]), then removes the socket file if it is still ours.
    pub async fn stop(mut self) {
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        self.health
            .set_not_serving::<pb::token_service_server::TokenServiceServer<TokenApi>>()
            .await;
        self.stop.cancel();
        if tokio::time::timeout(STOP_GRACE, &mut self.task)
            .await
            .is_err()
        {
            tracing::warn!("gRPC calls still open after {STOP_GRACE:?}; closing them");
            self.task.abort();
        }
        remove_if_ours(&self.path, self.inode);
        tracing::info!(socket = %self.path.display(), "gRPC API stopped");
    }
}

/// Changes the mode of a socket file bound by [`bind`] through its `O_PATH` descriptor `file`
/// (`path` names it in errors).
pub fn set_bound_mode(file: &OwnedFd, path: &Path, mode: u32) -> Result<(), ServeError> {
    // fchmod on an O_PATH descriptor fails (EBADF), and on the listening socket it would
    // change the socket object, not the file; the magic link in /proc names the inode.
    let link = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    std::fs::set_permissions(&link, std::fs::Permissions::from_mode(mode)).map_err(io(
        path,
        "change the socket's mode (through /proc/self/fd; restart the daemon to apply it)",
    ))
}

/// The (device, inode) of a socket file bound by [`bind`], from its `O_PATH` descriptor.
pub fn bound_inode(file: &OwnedFd, path: &Path) -> Result<(u64, u64), ServeError> {
    let meta = nix::sys::stat::fstat(file)
        .map_err(|e| io(path, "stat the socket")(std::io::Error::from(e)))?;
    Ok((meta.st_dev, meta.st_ino))
}

/// Removes the socket file at `path` if it still is the one of `inode` (device, inode).
pub fn remove_if_ours(path: &Path, inode: (u64, u64)) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if (m.dev(), m.ino()) == inode => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
        _ => {}
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What every connection serves, over `store`, within `limits`; `stop` ends waits and
/// streams. Health reports SERVING. (The fuzz target serves connections with it too.)
pub async fn build_services(
    store: Arc<Store>,
    stop: CancellationToken,
    limits: Limits,
) -> Result<(Arc<Services>, HealthReporter), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let health_service = health_service.max_decoding_message_size(limits.max_message);
    health.set_service_status("", ServingStatus::Serving).await;
    health
        .set_serving::<pb::token_service_server::TokenServiceServer<TokenApi>>()
        .await;
    // Both reflection versions describe the same two protos.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let unbuilt = |e: tonic_reflection::server::Error| ServeError::Reflection(e.to_string());
    let reflection_v1 = reflection().build_v1().map_err(unbuilt)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(unbuilt)?;
    let api = TokenApi::new(store, nix::unistd::geteuid().as_raw(), stop.clone());
    let tokens = pb::token_service_server::TokenServiceServer::new(api.clone())
        .max_decoding_message_size(limits.max_message);
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection_v1.max_decoding_message_size(limits.max_message))
        .add_service(reflection_v1alpha.max_decoding_message_size(limits.max_message))
        .add_service(tokens)
        .prepare();
    let services = Arc::new(Services {
        routes,
        api,
        answers: Arc::new(AnswerCache::default()),
        watches: Arc::new(Semaphore::new(limits.max_watch_streams)),
        limits,
    });
    Ok((services, health))
}

/// Accepts connections until `stop`, then waits for them to end ([`limits::accept_loop`]).
/// Each is charged to its peer uid, known from the kernel's record of the peer at connect time.
async fn accept_loop(
    listener: UnixListener,
    services: Arc<Services>,
    gate: Arc<ConnGate>,
    stop: CancellationToken,
) {
    let serve = |stream, permit: limits::ConnPermit| {
        let caller = Caller::of_stream(&stream).map(Arc::new);
        let held = permit.charge_or_refuse(caller.as_ref().map(|c| c.uid), "gRPC socket", "grpc");
        let serve =
            (held.is_some()).then(|| conn::serve(stream, caller, services.clone(), stop.clone()));
        async move {
            if let Some(serve) = serve {
                serve.await;
            }
            drop(held);
        }
    };
    limits::accept_loop("gRPC socket", gate, stop.clone(), listener, serve).await;
}

/// Binds a listener at `path` with `mode` (see the module doc), replacing a stale socket.
/// Returns it with an `O_PATH` descriptor of the socket file, opened before the file was
/// moved into place.
pub fn bind(path: &Path, mode: u32) -> Result<(UnixListener, OwnedFd), ServeError> {
    check_existing(path)?;
    let parent = crate::config::parent_dir(path);
    // Reached (and created, 0755, when missing) without following a symlink or trusting a
    // directory others can write: they could move the socket or answer in its place.
    crate::safepath::open_dir(
        &parent,
        &crate::safepath::Trust::of_this_process(),
        Some(0o755),
    )
    .map_err(|e| io(path, "use the socket's directory")(std::io::Error::other(e.to_string())))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "socket".into());
    let private = parent.join(format!(
        ".{name}.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(io(&private, "create a private directory for binding"))?;
    let result = (|| {
        // Short name inside: the full path must fit in sun_path (108 bytes).
        let temp = private.join("s");
        let listener = UnixListener::bind(&temp).map_err(io(path, "bind the socket"))?;
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode))
            .map_err(io(path, "set the socket's mode"))?;
        let file = nix::fcntl::open(
            &temp,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| io(path, "open the socket file")(std::io::Error::from(e)))?;
        std::fs::rename(&temp, path).map_err(io(path, "move the socket into place"))?;
        Ok((listener, file))
    })();
    let _ = std::fs::remove_dir_all(&private);
    result
}

use std::os::unix::fs::DirBuilderExt;

/// Refuses a path holding something other than a socket, or a socket someone serves on;
/// removes nothing (the rename replaces a stale socket atomically).
fn check_existing(path: &Path) -> Result<(), ServeError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(path, "stat the socket path")(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ServeError::NotASocket(path.to_path_buf()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ServeError::InUse(path.to_path_buf())),
        Err(_) => {
            tracing::info!(socket = %path.display(), "replacing a stale socket file");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_sets_the_mode_replaces_stale_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("tw.sock");
        let (l, _file) = bind(&path, 0o660).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
        // Live: refused.
        assert!(matches!(bind(&path, 0o600), Err(ServeError::InUse(_))));
        drop(l);
        // Stale: replaced.
        let _l = bind(&path, 0o600).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        // Not a socket: refused and left alone.
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(matches!(bind(&file, 0o600), Err(ServeError::NotASocket(_))));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
        // No leftovers of the private directories.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("run"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("tw.sock")]);
    }

    #[tokio::test]
    async fn a_mode_change_applies_to_the_bound_socket_not_to_a_swapped_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tw.sock");
        let mut server = GrpcServer::start(&path, 0o600, Arc::new(Store::default()))
            .await
            .unwrap();
        // Someone able to write the directory moves our socket aside and leaves a symlink to
        // a file of root's in its place.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "secret").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        let moved = dir.path().join("moved.sock");
        std::fs::rename(&path, &moved).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        server.set_mode(0o666).unwrap();
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&victim), 0o600, "the symlink's target was chmodded");
        assert_eq!(mode(&moved), 0o666, "our socket did not get the new mode");
        assert_eq!(server.mode(), 0o666);
        server.stop().await;
        assert!(
            victim.exists() && path.is_symlink(),
            "stop removed what is not ours"
        );
    }

    #[tokio::test]
    async fn health_turns_not_serving_on_stop_and_the_socket_goes() {
        use tonic_health::pb::health_check_response::ServingStatus as S;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tw.sock");
        let server = GrpcServer::start(&path, 0o600, Arc::new(Store::default()))
            .await
            .unwrap();
        let p = path.clone();
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let p = p.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let mut watch = health
            .watch(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.status, S::Serving as i32);
        let stopping = tokio::spawn(server.stop());
        let next = watch.message().await.unwrap().unwrap();
        assert_eq!(next.status, S::NotServing as i32);
        tokio::time::timeout(STOP_GRACE * 3, stopping)
            .await
            .unwrap()
            .unwrap();
        assert!(!path.exists(), "socket left behind");
    }
}
