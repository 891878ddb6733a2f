//! The state directory (docs/operations.md#files-and-state): per client, the last token, its expiry
//! and any refresh token, kept across restarts.
//!
//! The directory is mode 0700 and locked with an exclusive `flock` on `.lock` for as long as the
//! daemon holds its [`StateDir`], so a second daemon on the same directory refuses to start.
//! Each client has one file, `NAME.json`, mode 0600, written with
//! [`crate::outputs::write_atomic`] (temporary file, fsync, rename, directory fsync): killing
//! the daemon at any instant leaves the old file or the new one, never a partial one.
//!
//! # File format
//!
//! ```json
//! {
//!   "version": 1,
//!   "client": "transatel",
//!   "fingerprint": "<ClientConfig::identity_fingerprint>",
//!   "generation": 7,
//!   "saved_at": "2026-11-23T18:00:00Z", "saved_at_unix": 1795456800,
//!   "token": {
//!     "access_token": "…", "token_type": "Bearer",
//!     "issued_at": "2026-11-23T18:00:00Z", "issued_at_unix": 1795456800,
//!     "expires_at": "2026-11-23T19:00:00Z", "expires_at_unix": 1795460400,
//!     "scope": ["a", "b"],
//!     "bound_to": "<x5t#S256 of the client certificate it is bound to>"
//!   },
//!   "next_refresh_at": "2026-11-23T18:42:10Z", "next_refresh_at_unix": 1795458130,
//!   "refresh_token": "…",
//!   "spent_bootstrap": "<SHA-256 hex of a configured refresh_token already presented>"
//! }
//! ```
//!
//! `next_refresh_at` is when the schedule planned to refresh `token`: a restart keeps that plan
//! instead of drawing a new one (docs/operations.md#restarts).
//! `token.bound_to` is the `x5t#S256` (RFC 8705 §3.1) of the client certificate the token was
//! had with (`tls_client_cert`): a token bound to another certificate than the configured one is
//! useless to its resource servers, so it is not reused (the refresh token still is).
//! `token`, `next_refresh_at`, `refresh_token`, `spent_bootstrap` and `bound_to` may be `null`
//! (or, for the last three, absent: files written before they existed). The `*_unix` fields are what is read back (the
//! RFC 3339 ones are for people); times are kept to the second, rounded down, so a reloaded
//! token never looks valid for longer than it is. Readers ignore unknown fields: a later version
//! may add fields and keep this file name; a change older versions could not read safely must
//! use another file name.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, fchmod, fstat, mkdirat};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::outputs::{NewFile, OutputError, list_dir, random_suffix, write_in};
use crate::safepath::{self, SafeDir, Trust};
use crate::secret::Secret;
use crate::token::{Token, rfc3339, unix_seconds};

/// The lock file inside the state directory.
pub const LOCK_FILE: &str = ".lock";
/// The version this code writes. Files with a higher version are still read (see the module
/// documentation).
pub const FORMAT_VERSION: u64 = 1;
/// State files larger than this are refused as corrupt.
const MAX_STATE_FILE: u64 = 1 << 20;

/// Why the state directory or a state file could not be used. Messages name paths and clients,
/// never tokens.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The directory could not be created or inspected.
    #[error("cannot create state directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A directory on the way to the state directory is a symbolic link or can be written by
    /// a user other than root and the daemon's user.
    #[error("refusing state directory {path}: {source}")]
    UnsafePath {
        path: PathBuf,
        #[source]
        source: crate::safepath::SafePathError,
    },
    /// The state directory is owned by another user, or group or others may write it: whoever
    /// can write it could plant the token the daemon publishes.
    #[error(
        "refusing state directory {path}: it is owned by uid {owner} with mode {mode:04o}; it must \
         be owned by the daemon's user (uid {user}) and not writable by group or others \
         (chown {user} and chmod 0700 it, or choose another state_dir)"
    )]
    Untrusted {
        path: PathBuf,
        owner: u32,
        mode: u32,
        user: u32,
    },
    /// The path exists but is not a directory (or is a symbolic link).
    #[error("state directory {0} is not a directory")]
    NotADirectory(PathBuf),
    /// The directory's mode could not be tightened to 0700.
    #[error("cannot set mode 0700 on state directory {path}: {source}")]
    Permissions {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The lock file could not be opened or locked for a reason other than another holder.
    #[error("cannot lock state directory {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Another process (another tokenwarden) holds the directory's lock.
    #[error(
        "another tokenwarden is using {0} (its lock file .lock is held); stop it or choose another state_dir"
    )]
    Locked(PathBuf),
    /// A client name that is not a plain file name (`/`, leading `.`, empty, too long, …).
    #[error("client name {0:?} cannot name a state file")]
    BadName(String),
    /// A state file exists but could not be read.
    #[error("cannot read state file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A state file is not valid state. It was moved aside to `kept_as` (when that worked) so
    /// that it is neither used nor lost; the client starts as if it had no state.
    #[error("state file {path} is corrupt ({reason}); {}", match kept_as {
        Some(k) => format!("kept as {}", k.display()),
        None => "it could not be moved aside".to_string(),
    })]
    Corrupt {
        path: PathBuf,
        kept_as: Option<PathBuf>,
        /// What is wrong, by position and kind only: never the file's content.
        reason: String,
    },
    /// The state file could not be written; the previous one is intact.
    #[error("cannot save state of client {client}: {source}")]
    Write {
        client: String,
        #[source]
        source: OutputError,
    },
    /// The state file could not be removed.
    #[error("cannot remove state file {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What is kept for one client.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredState {
    /// [`crate::config::ClientConfig::identity_fingerprint`] of the settings the token was had with.
    pub fingerprint: String,
    /// The last access token, if any.
    pub token: Option<Token>,
    /// `x5t#S256` of the client certificate `token` was had with (RFC 8705 §3.1), if any
    /// ([`crate::config::ClientConfig::token_binding`]).
    pub bound_to: Option<String>,
    /// When the schedule planned to refresh `token` (docs/operations.md#restarts).
    pub next_refresh_at: Option<SystemTime>,
    /// The last refresh token (RFC 6749 §6), if the provider issued one.
    pub refresh_token: Option<Secret>,
    /// The generation of `token` (docs/grpc.md#the-service): rises by one with each new token.
    pub generation: u64,
    /// SHA-256 (hex) of the configured bootstrap `refresh_token` once it has been presented:
    /// a refresh token is never presented twice (RFC 9700 §4.14.2 treats a reused one as
    /// stolen), so this one is not tried again after its chain ends. A new value resumes.
    pub spent_bootstrap: Option<String>,
}

impl StoredState {
    /// The stored token, if it may be reused at `now` instead of asking the provider
    /// (docs/operations.md#restarts): the client's identity is unchanged (`fingerprint` matches),
    /// the token is bound to the certificate the client now presents (`binding`), if any, and it
    /// has more than `margin` left to live.
    pub fn reusable_token(
        &self,
        fingerprint: &str,
        binding: Option<&str>,
        margin: Duration,
        now: SystemTime,
    ) -> Option<&Token> {
        if self.fingerprint != fingerprint || self.bound_to.as_deref() != binding {
            return None;
        }
        let token = self.token.as_ref()?;
        match token.remaining(now) {
            Some(left) if left > margin => Some(token),
            _ => None,
        }
    }

    /// The stored refresh token, if the client's identity is unchanged. It outlives the access
    /// token: an expired access token does not make it stale.
    pub fn refresh_token_for(&self, fingerprint: &str) -> Option<&Secret> {
        if self.fingerprint != fingerprint {
            return None;
        }
        self.refresh_token.as_ref()
    }
}

/// The locked state directory. The lock is held until this value is dropped.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    /// The directory, reached by the safe walk: every file operation is relative to it, so a
    /// path component swapped after the start changes nothing.
    dir: SafeDir,
    /// Open with an exclusive `flock`; closing it releases the lock.
    _lock: File,
}

impl StateDir {
    /// Opens (creating it with mode 0700 if missing) and locks the state directory.
    ///
    /// Its parent directories are walked without following symbolic links or trusting a
    /// directory others can write ([`crate::safepath`]). The directory itself must be owned
    /// by this process's user and not writable by group or others
    /// ([`StateError::Untrusted`]: whoever can write it could plant the token the daemon
    /// publishes); read or search bits for group or others on a directory it owns are
    /// removed (mode 0700). The lock is an exclusive, non-blocking `flock` on `PATH/.lock`:
    /// [`StateError::Locked`] if another process (or another open of the same directory)
    /// holds it. Temporary files left by a write that was killed midway are removed.
    pub fn open(path: &Path) -> Result<StateDir, StateError> {
        let create_err = |source| StateError::CreateDir {
            path: path.to_path_buf(),
            source,
        };
        let (parent, name) = match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
            (Some(p), Some(n)) if path.is_absolute() => (p, n),
            _ => {
                return Err(create_err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not an absolute path to a directory",
                )));
            }
        };
        let trust = Trust::of_this_process();
        let parent =
            safepath::open_parent_dir(parent, &trust, Some(0o755)).map_err(|e| match e {
                e if e.is_unsafe() => StateError::UnsafePath {
                    path: path.to_path_buf(),
                    source: e,
                },
                e => create_err(io::Error::other(e.to_string())),
            })?;
        match mkdirat(&parent, name, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(create_err(e.into())),
        }
        let fd = openat(
            &parent,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ENOTDIR | Errno::ELOOP => StateError::NotADirectory(path.to_path_buf()),
            e => create_err(e.into()),
        })?;
        let st = fstat(&fd).map_err(|e| create_err(e.into()))?;
        let (owner, mode) = (st.st_uid, st.st_mode & 0o7777);
        // Owned by us: in a sticky parent (/tmp) nobody else can swap it either.
        if owner != trust.user() || mode & 0o022 != 0 {
            return Err(StateError::Untrusted {
                path: path.to_path_buf(),
                owner,
                mode,
                user: trust.user(),
            });
        }
        if mode & 0o077 != 0 {
            fchmod(&fd, Mode::from_bits_truncate(0o700)).map_err(|e| StateError::Permissions {
                path: path.to_path_buf(),
                source: e.into(),
            })?;
        }
        let dir = SafeDir::from_fd(fd, path.to_path_buf(), owner, 0o700);

        let lock_err = |source| StateError::Lock {
            path: path.to_path_buf(),
            source,
        };
        let lock = dir
            .open(
                LOCK_FILE,
                OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NONBLOCK,
                0o600,
            )
            .map_err(lock_err)?;
        let meta = lock.metadata().map_err(lock_err)?;
        if !meta.file_type().is_file() || meta.uid() != trust.user() {
            return Err(lock_err(io::Error::other(
                "the lock file .lock is not a regular file owned by this user; remove it",
            )));
        }
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StateError::Locked(path.to_path_buf()));
            }
            Err(fs::TryLockError::Error(source)) => return Err(lock_err(source)),
        }

        let dir = StateDir {
            path: path.to_path_buf(),
            dir,
            _lock: lock,
        };
        dir.remove_stale_temp_files();
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored state of `client`: `Ok(None)` when it has none. A corrupt file gives
    /// [`StateError::Corrupt`] after being renamed to `NAME.json.corrupt-TIMESTAMP`; the caller
    /// logs it and goes on as if there were no state. A state file that is not a regular file
    /// owned by this user (a FIFO, a link, a file someone else planted) is never read: it gives
    /// [`StateError::Read`] saying why.
    ///
    /// Blocking file I/O: call it from a blocking thread (`spawn_blocking`), never on an async
    /// worker.
    pub fn load(&self, client: &str) -> Result<Option<StoredState>, StateError> {
        let (name, path) = self.file(client)?;
        let bytes = match self.read_limited(&name) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        match parse(&bytes) {
            Ok(state) => Ok(Some(state)),
            Err(reason) => {
                let kept_as = self.keep_corrupt(&name);
                Err(StateError::Corrupt {
                    path,
                    kept_as,
                    reason,
                })
            }
        }
    }

    /// Stores `state` for `client` atomically and durably (mode 0600). When this returns, the
    /// state (a rotated refresh token in particular) survives a crash. Blocking file I/O, like
    /// [`StateDir::load`].
    pub fn save(&self, client: &str, state: &StoredState) -> Result<(), StateError> {
        let (name, path) = self.file(client)?;
        let contents = serialize(client, state, SystemTime::now());
        let file = NewFile::private(&contents);
        write_in(&self.dir, &path, &name, &file, &mut random_suffix).map_err(|source| {
            StateError::Write {
                client: client.to_string(),
                source,
            }
        })
    }

    /// Forgets `client`'s state (no error if it has none).
    pub fn remove(&self, client: &str) -> Result<(), StateError> {
        let (name, path) = self.file(client)?;
        match self.dir.unlink(&name) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(StateError::Remove { path, source }),
        }
        self.dir
            .sync()
            .map_err(|source| StateError::Remove { path, source })
    }

    /// Names of the clients that have a state file, sorted.
    pub fn clients(&self) -> Result<Vec<String>, StateError> {
        let mut names: Vec<String> = list_dir(&self.dir)
            .into_iter()
            .filter_map(|entry| {
                let name = entry.strip_suffix(".json")?;
                let regular = self
                    .dir
                    .stat(&entry)
                    .is_ok_and(|st| st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFREG);
                (valid_name(name) && regular).then(|| name.to_string())
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// The cached authorization server metadata of `issuer` (RFC 8414), as
    /// [`StateDir::save_discovery`] wrote it: `Ok(None)` when there is none. Read like a state
    /// file (a regular file owned by this user, at most 1 MiB, never through a link); the
    /// caller checks the content. Blocking file I/O, like [`StateDir::load`].
    pub fn load_discovery(&self, issuer: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StateError> {
        let name = discovery_file(issuer);
        match self.read_limited(&name) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Read {
                path: self.path.join(name),
                source,
            }),
        }
    }

    /// Stores the metadata cache of `issuer` atomically (mode 0600), as state files are.
    /// Blocking file I/O, like [`StateDir::load`].
    pub fn save_discovery(&self, issuer: &str, contents: &[u8]) -> Result<(), StateError> {
        let name = discovery_file(issuer);
        let path = self.path.join(&name);
        let file = NewFile::private(contents);
        write_in(&self.dir, &path, &name, &file, &mut random_suffix).map_err(|source| {
            StateError::Write {
                client: format!("(the metadata of issuer {issuer})"),
                source,
            }
        })
    }

    /// `NAME.json` and `PATH/NAME.json`, for a name that cannot escape the directory.
    fn file(&self, client: &str) -> Result<(String, PathBuf), StateError> {
        if !valid_name(client) {
            return Err(StateError::BadName(client.to_string()));
        }
        let name = format!("{client}.json");
        let path = self.path.join(&name);
        Ok((name, path))
    }

    /// Reads `name` if it is a regular file owned by this user and at most
    /// [`MAX_STATE_FILE`] bytes (plus one, for the size check of `parse`). Opened with
    /// `O_NOFOLLOW|O_NONBLOCK`: a link is refused by the kernel, a FIFO never blocks.
    fn read_limited(&self, name: &str) -> io::Result<Zeroizing<Vec<u8>>> {
        let file = self
            .dir
            .open(name, OFlag::O_RDONLY | OFlag::O_NONBLOCK, 0)
            .map_err(|e| match e.raw_os_error() {
                Some(nix::libc::ELOOP) => io::Error::other(
                    "it is a symbolic link, not a regular file; state files are never followed",
                ),
                _ => e,
            })?;
        let meta = file.metadata()?;
        if !meta.file_type().is_file() {
            return Err(io::Error::other(
                "not a regular file (a FIFO, a device or a directory); remove it",
            ));
        }
        let user = nix::unistd::geteuid().as_raw();
        if meta.uid() != user {
            return Err(io::Error::other(format!(
                "owned by uid {}, not by this daemon's user (uid {user}): not trusted; remove it",
                meta.uid()
            )));
        }
        let mut bytes = Zeroizing::new(Vec::with_capacity(
            usize::try_from(meta.len().min(MAX_STATE_FILE) + 1).unwrap_or(0),
        ));
        file.take(MAX_STATE_FILE + 1).read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    /// Renames a corrupt file to `NAME.json.corrupt-TIMESTAMP` (never over an older one).
    fn keep_corrupt(&self, name: &str) -> Option<PathBuf> {
        let stamp = rfc3339(SystemTime::now()).replace(':', "");
        let base = format!("{name}.corrupt-{stamp}");
        let kept = (0..100)
            .map(|i| match i {
                0 => base.clone(),
                i => format!("{base}.{i}"),
            })
            .find(|p| self.dir.stat(p).is_err())?;
        self.dir.rename(name, &kept).ok()?;
        // Best effort: the rename is what matters; the directory is flushed on the next save.
        let _ = self.dir.sync();
        Some(self.path.join(kept))
    }

    /// Removes `.NAME.tw-XXXXXX` files a killed write left behind (we hold the lock: no write
    /// of ours is in flight).
    fn remove_stale_temp_files(&self) {
        for name in list_dir(&self.dir) {
            if name.starts_with('.') && name.contains(".tw-") && name != LOCK_FILE {
                let _ = self.dir.unlink(&name);
            }
        }
    }
}

/// The file the metadata of `issuer` is cached in: `discovery+HEX.json`, HEX the first 16 hex
/// digits of the issuer's SHA-256. A `+` is not allowed in client names, so it never clashes
/// with a client's state file, and [`StateDir::clients`] does not list it.
pub fn discovery_file(issuer: &str) -> String {
    let digest = crate::secret::sha256_hex(issuer.as_bytes());
    format!("discovery+{}.json", &digest[..16])
}

/// Client names as the config allows them ([`crate::config::is_client_name`]: never `/`), and
/// never a leading `.` (which would make hidden files, `..`, or clash with the temporary files).
fn valid_name(name: &str) -> bool {
    crate::config::is_client_name(name) && !name.starts_with('.')
}

// === The file format ===

#[derive(Serialize)]
struct FileOut<'a> {
    version: u64,
    client: &'a str,
    fingerprint: &'a str,
    generation: u64,
    saved_at: String,
    saved_at_unix: u64,
    token: Option<TokenOut<'a>>,
    next_refresh_at: Option<String>,
    next_refresh_at_unix: Option<u64>,
    refresh_token: Option<&'a str>,
    spent_bootstrap: Option<&'a str>,
}

#[derive(Serialize)]
struct TokenOut<'a> {
    access_token: &'a str,
    token_type: &'a str,
    issued_at: String,
    issued_at_unix: u64,
    expires_at: String,
    expires_at_unix: u64,
    scope: &'a [String],
    bound_to: Option<&'a str>,
}

/// What is read back; unknown fields are ignored.
#[derive(Deserialize)]
struct FileIn {
    version: u64,
    fingerprint: String,
    #[serde(default)]
    generation: u64,
    #[serde(default)]
    token: Option<TokenIn>,
    #[serde(default)]
    next_refresh_at_unix: Option<u64>,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    spent_bootstrap: Option<String>,
}

#[derive(Deserialize)]
struct TokenIn {
    access_token: String,
    token_type: String,
    issued_at_unix: u64,
    expires_at_unix: u64,
    #[serde(default)]
    scope: Vec<String>,
    #[serde(default)]
    bound_to: Option<String>,
}

fn serialize(client: &str, state: &StoredState, now: SystemTime) -> Zeroizing<Vec<u8>> {
    let file = FileOut {
        version: FORMAT_VERSION,
        client,
        fingerprint: &state.fingerprint,
        generation: state.generation,
        saved_at: rfc3339(now),
        saved_at_unix: unix_seconds(now),
        token: state.token.as_ref().map(|t| TokenOut {
            access_token: t.access_token.expose(),
            token_type: &t.token_type,
            issued_at: rfc3339(t.issued_at),
            issued_at_unix: unix_seconds(t.issued_at),
            expires_at: rfc3339(t.expires_at),
            expires_at_unix: unix_seconds(t.expires_at),
            scope: &t.scope,
            bound_to: state.bound_to.as_deref(),
        }),
        next_refresh_at: state.next_refresh_at.map(rfc3339),
        next_refresh_at_unix: state.next_refresh_at.map(unix_seconds),
        refresh_token: state.refresh_token.as_ref().map(Secret::expose),
        spent_bootstrap: state.spent_bootstrap.as_deref(),
    };
    // Room for the whole file, so the buffer never reallocates and leaves an un-zeroed copy.
    let secrets_len = state.token.as_ref().map_or(0, |t| {
        t.access_token.expose().len() + t.scope.iter().map(|s| s.len() + 8).sum::<usize>()
    }) + state.refresh_token.as_ref().map_or(0, |r| r.expose().len());
    let mut buf = Zeroizing::new(Vec::with_capacity(4096 + 6 * secrets_len));
    // Serializing these types into a Vec cannot fail; should it ever, the empty file written
    // would be read back as corrupt, not as a wrong token.
    if serde_json::to_writer_pretty(&mut *buf, &file).is_err() {
        buf.clear();
    }
    buf.push(b'\n');
    buf
}

/// Reads a state file. The error says what is wrong by position and kind only: serde's own
/// messages may quote the content.
fn parse(bytes: &[u8]) -> Result<StoredState, String> {
    if bytes.len() as u64 > MAX_STATE_FILE {
        return Err(format!("larger than {MAX_STATE_FILE} bytes"));
    }
    let file: FileIn = serde_json::from_slice(bytes).map_err(|e| {
        let kind = match e.classify() {
            serde_json::error::Category::Io => "read error",
            serde_json::error::Category::Syntax => "not JSON",
            serde_json::error::Category::Data => "a field is missing or has the wrong type",
            serde_json::error::Category::Eof => "truncated",
        };
        format!("{kind} at line {} column {}", e.line(), e.column())
    })?;
    if file.version == 0 {
        return Err("version 0 is not a state file version".into());
    }
    let at = |secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    Ok(StoredState {
        fingerprint: file.fingerprint,
        bound_to: file.token.as_ref().and_then(|t| t.bound_to.clone()),
        token: file.token.map(|t| Token {
            access_token: Secret::new(t.access_token),
            token_type: t.token_type,
            issued_at: at(t.issued_at_unix),
            expires_at: at(t.expires_at_unix),
            scope: t.scope,
        }),
        next_refresh_at: file.next_refresh_at_unix.map(at),
        refresh_token: file.refresh_token.map(Secret::new),
        generation: file.generation,
        spent_bootstrap: file.spent_bootstrap,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> StoredState {
        StoredState {
            fingerprint: "fp".into(),
            token: Some(Token {
                access_token: Secret::new("tok\"en"),
                token_type: "Bearer".into(),
                issued_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_456_800),
                expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_460_400),
                scope: vec!["a".into(), "b".into()],
            }),
            bound_to: Some("x5t".into()),
            next_refresh_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_459_000)),
            refresh_token: Some(Secret::new("refresh")),
            generation: 7,
            spent_bootstrap: None,
        }
    }

    #[test]
    fn serialize_parse_round_trip() {
        let s = state();
        let bytes = serialize("c", &s, SystemTime::UNIX_EPOCH);
        assert_eq!(parse(&bytes).unwrap(), s);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["token"]["expires_at"], "2026-11-23T19:00:00Z");
        assert_eq!(v["token"]["expires_at_unix"], 1_795_460_400u64);
    }

    #[test]
    fn later_versions_with_more_fields_are_read() {
        let text = r#"{"version": 3, "fingerprint": "fp", "new_field": {"x": 1},
            "token": null, "refresh_token": "r", "generation": 2}"#;
        let s = parse(text.as_bytes()).unwrap();
        assert_eq!(s.refresh_token.unwrap().expose(), "r");
        assert_eq!(s.generation, 2);
    }

    #[test]
    fn parse_errors_never_quote_the_content() {
        for text in [
            r#"{"version": 1, "fingerprint": "fp", "refresh_token": 12345678}"#,
            r#"{"version": 1, "fingerprint": "fp", "token": {"access_token": "secret-value"}}"#,
            r#"{"version": "secret-value"}"#,
            "secret-value",
            r#"{"version": 1, "fingerprint": "fp", "refresh_token": "secret-value"#,
        ] {
            let e = parse(text.as_bytes()).unwrap_err();
            assert!(
                !e.contains("secret-value") && !e.contains("12345678"),
                "{e}"
            );
        }
    }

    #[test]
    fn names() {
        for ok in ["a", "talkdesk", "creads-files", "a.b_c-9", &"x".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "a b",
            &"x".repeat(65),
            "é",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
