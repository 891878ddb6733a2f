//! Token files (docs/configuration.md#how-files-are-written): rendering a token in each output
//! format, writing files atomically, and running a client's `on_change` commands.
//!
//! Every write goes through [`write_atomic`]: the output's directory is opened by the safe walk
//! of [`crate::safepath`] (no symbolic link, no directory others can write), then a temporary
//! file `.NAME.tw-XXXXXX` is created in it exclusively, 0600, without following symlinks, given
//! its group, its final mode and its owner, written, fsynced, renamed over the final name and
//! the directory fsynced, all relative to the opened directory. A reader sees the old file or
//! the new one, never a mix; a
//! failure removes the temporary file and leaves the old file as it was. The state directory
//! ([`crate::state`]) uses the same function. A write killed midway (SIGKILL, power loss) can
//! only leave a temporary file behind, never a partial output: [`remove_stale_temp_files`]
//! clears those at the daemon's start.
//!
//! If the final path is a symlink, the rename replaces the link itself with a regular file; the
//! file the link pointed to is never written. That is deliberate: following a link placed in a
//! shared directory would let whoever placed it choose where tokens land.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::fcntl::OFlag;
use rand::Rng;
use rand::distr::Alphanumeric;
use tokio::io::{AsyncRead, AsyncReadExt};
use zeroize::Zeroizing;

use crate::config::{ClientConfig, OutputConfig, OutputFormat};
use crate::safepath::{self, SafeDir, Trust};
use crate::token::{Token, rfc3339};

/// How many bytes of each of stdout and stderr of an `on_change` command are kept for the log.
pub const CAPTURE_LIMIT: usize = 4096;

/// How many random temporary names are tried before giving up (each collision is a 1 in 56
/// billion event unless something is squatting the names).
const TEMP_ATTEMPTS: usize = 16;

/// Letters and digits in the random part of a temporary name.
const TEMP_SUFFIX_LEN: usize = 6;

/// Why an output could not be rendered or written. Messages name the file and the cause, never
/// the content.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The access token or its type holds a control character (CR, LF, NUL, …) that would break
    /// the file or smuggle extra lines into it; nothing was written.
    #[error("refusing to write {path}: the {field} holds a control character (line break or NUL)")]
    UnsafeToken {
        path: PathBuf,
        /// `access token` or `token type`.
        field: &'static str,
    },
    /// The output's `env_prefix` is not a valid start of an environment variable name.
    #[error("refusing to write {path}: env_prefix {prefix:?} is not made of A-Z, a-z, 0-9 and _")]
    BadEnvPrefix { path: PathBuf, prefix: String },
    /// The path has no file name (it ends in `/`, `.` or `..`).
    #[error("cannot write {0}: not a file path")]
    BadPath(PathBuf),
    /// A directory on the way to the output is a symbolic link, or can be written by a user
    /// other than root and the daemon's user (who could redirect the write); nothing was
    /// written.
    #[error("refusing to write {path}: {source}")]
    UnsafeDir {
        path: PathBuf,
        #[source]
        source: crate::safepath::SafePathError,
    },
    /// A missing parent directory could not be created (or a parent is not a directory).
    #[error("cannot write {path}: cannot create directory {dir}: {source}")]
    CreateDir {
        path: PathBuf,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// No temporary file could be created next to the output (permission denied, read-only
    /// file system, no free inodes, …).
    #[error("cannot write {path}: cannot create a temporary file in {dir}: {source}")]
    CreateTemp {
        path: PathBuf,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Setting the mode of, writing or flushing the temporary file failed (disk full, I/O
    /// error); the old file is intact.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The owner or group could not be applied (the daemon lacks CAP_CHOWN, say); the old file
    /// is intact.
    #[error(
        "cannot write {path}: cannot give it {}: {source}{}",
        owner_and_group(*owner, *group),
        chown_hint(source)
    )]
    Chown {
        path: PathBuf,
        owner: Option<u32>,
        group: Option<u32>,
        #[source]
        source: io::Error,
    },
    /// The rename over the final path failed (it is a directory, say); the old file is intact.
    #[error("cannot write {path}: cannot rename the temporary file into place: {source}")]
    Rename {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The new file is in place but its directory could not be flushed, so it might not survive
    /// a power loss.
    #[error("wrote {path} but could not flush its directory: {source}")]
    SyncDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// `owner 1000`, `group 100` or `owner 1000 and group 100`, for messages.
fn owner_and_group(owner: Option<u32>, group: Option<u32>) -> String {
    match (owner, group) {
        (Some(u), Some(g)) => format!("owner {u} and group {g}"),
        (Some(u), None) => format!("owner {u}"),
        (None, Some(g)) => format!("group {g}"),
        (None, None) => "its owner".into(),
    }
}

/// What to do about a refused chown.
fn chown_hint(e: &io::Error) -> &'static str {
    if e.raw_os_error() == Some(nix::libc::EPERM) {
        " (this needs root with CAP_CHOWN, or AmbientCapabilities=CAP_CHOWN in the unit)"
    } else {
        ""
    }
}

// === Who may chown ===

/// The bit of CAP_CHOWN in the capability sets (`linux/capability.h`).
const CAP_CHOWN: u32 = 0;

/// What owners and groups this process can give the files it creates (chown(2)): any, with
/// CAP_CHOWN in its effective set; without it, only its own uid and one of its groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChownRights {
    /// Effective uid.
    pub euid: u32,
    /// Effective gid and supplementary groups.
    pub gids: Vec<u32>,
    /// Whether CAP_CHOWN is in the effective capability set.
    pub cap_chown: bool,
}

impl ChownRights {
    /// This process's rights. Capabilities come from `/proc/self/status`; when it cannot be
    /// read, being root is taken for having CAP_CHOWN.
    pub fn of_this_process() -> ChownRights {
        let euid = nix::unistd::geteuid().as_raw();
        let mut gids: Vec<u32> = nix::unistd::getgroups()
            .unwrap_or_default()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        gids.push(nix::unistd::getegid().as_raw());
        let cap_chown = fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| status_has_cap_chown(&s))
            .unwrap_or(euid == 0);
        ChownRights {
            euid,
            gids,
            cap_chown,
        }
    }

    /// Whether a file this process creates can be given `owner` and `group` (each optional).
    pub fn allow(&self, owner: Option<u32>, group: Option<u32>) -> bool {
        self.cap_chown
            || (owner.is_none_or(|u| u == self.euid)
                && group.is_none_or(|g| self.gids.contains(&g)))
    }
}

/// Whether the `CapEff:` line of a `/proc/PID/status` text holds CAP_CHOWN; `None` without a
/// readable `CapEff:` line.
pub fn status_has_cap_chown(status: &str) -> Option<bool> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let bits = u64::from_str_radix(hex, 16).ok()?;
    Some(bits & (1 << CAP_CHOWN) != 0)
}

// === Rendering ===

/// The bytes of `token` in `out`'s format (docs/configuration.md#output-formats). Pure.
///
/// - `token`: the access token, no trailing newline.
/// - `json`: one line `{"access_token":…,"token_type":…,"expires_at":…,"issued_at":…,"scope":…}`
///   and a newline; times RFC 3339 UTC, scope one space-separated string.
/// - `env`: `ACCESS_TOKEN=`, `TOKEN_TYPE=`, `TOKEN_EXPIRES_AT=` lines (each name prefixed with
///   `env_prefix`), values quoted for systemd's `EnvironmentFile=` parser when they need it.
/// - `header`: `Authorization: TYPE TOKEN` and a newline (`Bearer` spelled so for any case).
///
/// A token or token type holding a control character is refused rather than written into a
/// broken file.
pub fn render(out: &OutputConfig, token: &Token) -> Result<Zeroizing<Vec<u8>>, OutputError> {
    let access = token.access_token.expose();
    let token_type = if token.token_type.eq_ignore_ascii_case("bearer") {
        "Bearer"
    } else {
        token.token_type.as_str()
    };
    for (field, value) in [("access token", access), ("token type", token_type)] {
        if value.chars().any(char::is_control) {
            return Err(OutputError::UnsafeToken {
                path: out.path.clone(),
                field,
            });
        }
    }
    let prefix = &out.env_prefix;
    if out.format == OutputFormat::Env
        && !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(OutputError::BadEnvPrefix {
            path: out.path.clone(),
            prefix: prefix.clone(),
        });
    }

    // Room for everything even fully escaped, so the buffer never reallocates and leaves an
    // un-zeroed copy of the token behind.
    let scope_len: usize = token.scope.iter().map(|s| s.len() + 1).sum();
    let capacity = 256 + prefix.len() * 3 + 2 * access.len() + 6 * (token_type.len() + scope_len);
    let mut buf = Zeroizing::new(Vec::with_capacity(capacity));
    match out.format {
        OutputFormat::Token => buf.extend_from_slice(access.as_bytes()),
        OutputFormat::Json => {
            let (expires, issued, scope) = (
                rfc3339(token.expires_at),
                rfc3339(token.issued_at),
                token.scope_string(),
            );
            let fields = [
                ("access_token", access),
                ("token_type", token_type),
                ("expires_at", expires.as_str()),
                ("issued_at", issued.as_str()),
                ("scope", scope.as_str()),
            ];
            buf.push(b'{');
            for (i, (name, value)) in fields.into_iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                json_string(&mut buf, name);
                buf.push(b':');
                json_string(&mut buf, value);
            }
            buf.extend_from_slice(b"}\n");
        }
        OutputFormat::Env => {
            let expires = rfc3339(token.expires_at);
            for (name, value) in [
                ("ACCESS_TOKEN", access),
                ("TOKEN_TYPE", token_type),
                ("TOKEN_EXPIRES_AT", expires.as_str()),
            ] {
                buf.extend_from_slice(prefix.as_bytes());
                buf.extend_from_slice(name.as_bytes());
                buf.push(b'=');
                env_value(&mut buf, value);
                buf.push(b'\n');
            }
        }
        OutputFormat::Header => {
            buf.extend_from_slice(b"Authorization: ");
            buf.extend_from_slice(token_type.as_bytes());
            buf.push(b' ');
            buf.extend_from_slice(access.as_bytes());
            buf.push(b'\n');
        }
    }
    Ok(buf)
}

/// Appends `s` as a JSON string (RFC 8259 §7).
fn json_string(buf: &mut Vec<u8>, s: &str) {
    buf.push(b'"');
    for c in s.chars() {
        match c {
            '"' => buf.extend_from_slice(b"\\\""),
            '\\' => buf.extend_from_slice(b"\\\\"),
            c if (c as u32) < 0x20 => {
                buf.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes())
            }
            c => {
                let mut utf8 = [0u8; 4];
                buf.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            }
        }
    }
    buf.push(b'"');
}

/// Appends `value` as systemd's `EnvironmentFile=` parser reads it back unchanged: bare when it
/// is made only of characters that parser never treats specially (what JWTs, base64 and
/// RFC 3339 times use), else in double quotes with `"`, `\`, `` ` `` and `$` backslash-escaped
/// (systemd unescapes exactly those inside double quotes; a shell reads it the same way).
fn env_value(buf: &mut Vec<u8>, value: &str) {
    let bare = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~+/=:,@%".contains(&b));
    if bare {
        buf.extend_from_slice(value.as_bytes());
        return;
    }
    buf.push(b'"');
    for b in value.bytes() {
        if matches!(b, b'"' | b'\\' | b'`' | b'$') {
            buf.push(b'\\');
        }
        buf.push(b);
    }
    buf.push(b'"');
}

// === Atomic writes ===

/// Replaces `path` with `contents`, atomically and durably
/// (docs/configuration.md#how-files-are-written), with permission bits exactly `mode` whatever the
/// umask, and the given owner and group when set.
///
/// Missing parent directories are created with mode 0755. A symlink at `path` is replaced by
/// the new file (its target is left alone). On any failure the temporary file is removed, the
/// old file is left intact and the error names the path and the cause.
pub fn write_atomic(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
) -> Result<(), OutputError> {
    write_atomic_named(path, contents, mode, owner, group, &mut random_suffix)
}

/// [`write_atomic`] with the temporary names' suffixes from `suffix` (tests choose them).
fn write_atomic_named(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
    suffix: &mut dyn FnMut() -> String,
) -> Result<(), OutputError> {
    let (dir_path, name) = split_path(path)?;
    let dir = open_parent(path, dir_path)?;
    write_in(&dir, path, &name, contents, mode, owner, group, suffix)
}

/// The directory and file name of `path`.
fn split_path(path: &Path) -> Result<(&Path, String), OutputError> {
    let name = match path.file_name().and_then(|n| n.to_str()) {
        Some(n) => n.to_owned(),
        None => return Err(OutputError::BadPath(path.to_path_buf())),
    };
    match path.parent() {
        Some(d) if d.is_absolute() => Ok((d, name)),
        _ => Err(OutputError::BadPath(path.to_path_buf())),
    }
}

/// Opens the directory `dir` of output `path` through [`safepath::open_dir`] (no symlinks,
/// no directory others can write), creating missing directories with mode 0755.
pub(crate) fn open_parent(path: &Path, dir: &Path) -> Result<SafeDir, OutputError> {
    use crate::safepath::SafePathError as E;
    safepath::open_dir(dir, &Trust::of_this_process(), Some(0o755)).map_err(|e| match e {
        E::NotADirectory(dir) => OutputError::CreateDir {
            path: path.to_path_buf(),
            dir,
            source: io::Error::from(io::ErrorKind::NotADirectory),
        },
        E::Io { path: dir, source } => OutputError::CreateDir {
            path: path.to_path_buf(),
            dir,
            source,
        },
        E::NotAbsolute(_) => OutputError::BadPath(path.to_path_buf()),
        source => OutputError::UnsafeDir {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// The write of [`write_atomic`] in an already opened directory: temporary file, fill,
/// `renameat`, fsync of the directory. Everything is relative to `dir`, so nothing swapped
/// in the path after `dir` was opened is ever followed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_in(
    dir: &SafeDir,
    path: &Path,
    name: &str,
    contents: &[u8],
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
    suffix: &mut dyn FnMut() -> String,
) -> Result<(), OutputError> {
    let mode = mode & 0o7777;
    let (temp, mut file) = create_temp(path, dir, name, suffix)?;
    let filled = fill(path, &mut file, contents, mode, owner, group);
    let renamed = filled.and_then(|()| {
        drop(file);
        dir.rename(&temp, name)
            .map_err(|source| OutputError::Rename {
                path: path.to_path_buf(),
                source,
            })
    });
    if let Err(e) = renamed {
        // Best effort: the error that matters is the one that stopped the write.
        let _ = dir.unlink(&temp);
        return Err(e);
    }
    dir.sync().map_err(|source| OutputError::SyncDir {
        path: path.to_path_buf(),
        source,
    })
}

/// The temporary file's owner, mode, contents and durability: everything before the rename.
///
/// The file was created 0600, so nobody but the daemon can open it. Its group is given first
/// (the daemon still owns it), then its final mode, then its owner: when the mode lets a group
/// or others read, that is the configured group, never the daemon's, and no byte is written
/// before all three are in place.
fn fill(
    path: &Path,
    file: &mut File,
    contents: &[u8],
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
) -> Result<(), OutputError> {
    let write_err = |source| OutputError::Write {
        path: path.to_path_buf(),
        source,
    };
    let chown_err = |source| OutputError::Chown {
        path: path.to_path_buf(),
        owner,
        group,
        source,
    };
    let euid = nix::unistd::geteuid().as_raw();
    let give_owner = owner.filter(|&u| u != euid);
    if group.is_some() {
        std::os::unix::fs::fchown(&*file, None, group).map_err(chown_err)?;
    }
    // fchmod: the mode given to open() was 0600 (cut down by the umask, besides).
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(write_err)?;
    if give_owner.is_some() {
        std::os::unix::fs::fchown(&*file, give_owner, None).map_err(chown_err)?;
        // chown clears the set-id bits; put back exactly what was asked for.
        if mode & 0o6000 != 0 {
            file.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(write_err)?;
        }
    }
    file.write_all(contents).map_err(write_err)?;
    // After the chown, so that the owner is as durable as the content.
    file.sync_all().map_err(write_err)?;
    Ok(())
}

/// Creates `.NAME.tw-XXXXXX` in `dir` exclusively, mode 0600
/// (`O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC`): an existing file or symlink at that name is never
/// opened, another random name is tried.
fn create_temp(
    path: &Path,
    dir: &SafeDir,
    name: &str,
    suffix: &mut dyn FnMut() -> String,
) -> Result<(String, File), OutputError> {
    let mut last = io::Error::new(io::ErrorKind::AlreadyExists, "no free temporary name");
    for _ in 0..TEMP_ATTEMPTS {
        let temp = format!(".{name}.tw-{}", suffix());
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL;
        match dir.open(&temp, flags, 0o600) {
            Ok(file) => return Ok((temp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = e,
            Err(source) => {
                return Err(OutputError::CreateTemp {
                    path: path.to_path_buf(),
                    dir: dir.path().to_path_buf(),
                    source,
                });
            }
        }
    }
    Err(OutputError::CreateTemp {
        path: path.to_path_buf(),
        dir: dir.path().to_path_buf(),
        source: last,
    })
}

/// Six random letters and digits.
pub(crate) fn random_suffix() -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(TEMP_SUFFIX_LEN)
        .map(char::from)
        .collect()
}

/// Whether `entry` is a temporary name [`write_atomic`] makes for a file named `name`:
/// `.NAME.tw-` then six ASCII letters or digits. Pure.
pub fn is_temp_name_for(entry: &str, name: &str) -> bool {
    temp_name_target(entry) == Some(name)
}

/// The file a temporary name is for: `NAME` of `.NAME.tw-XXXXXX`, or `None` when `entry` is
/// not such a name. Pure.
pub fn temp_name_target(entry: &str) -> Option<&str> {
    let rest = entry.strip_prefix('.')?;
    let cut = rest.len().checked_sub(".tw-".len() + TEMP_SUFFIX_LEN)?;
    let (name, tail) = rest.split_at_checked(cut)?;
    let suffix = tail.strip_prefix(".tw-")?;
    (!name.is_empty() && suffix.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(name)
}

/// Removes the temporary files that writes of these clients' outputs killed midway (SIGKILL,
/// a crash, a power loss) left next to them, and returns (client, path) for each. Only regular
/// files with the names [`write_atomic`] makes for these very outputs are touched; nothing
/// else in the directories is. Each directory is listed once, however many outputs it holds
/// (10,000 outputs in one directory take one listing, not 10,000). Best effort: a file that
/// cannot be listed or removed is left.
///
/// Call it only when no write to these outputs can be in flight: the daemon does at start,
/// holding the state directory's lock, which `tokenwarden once` takes too.
pub fn remove_stale_temp_files<'a>(
    clients: impl IntoIterator<Item = &'a ClientConfig>,
) -> Vec<(String, PathBuf)> {
    // Directory → output file name → client.
    let mut dirs: HashMap<&Path, HashMap<String, &str>> = HashMap::new();
    for client in clients {
        for out in &client.outputs {
            if let (Some(name), Some(dir)) = (out.path.file_name(), out.path.parent()) {
                dirs.entry(dir)
                    .or_default()
                    .insert(name.to_string_lossy().into_owned(), &client.name);
            }
        }
    }
    let mut removed = Vec::new();
    let trust = Trust::of_this_process();
    for (dir, names) in &dirs {
        // Through the safe walk: a directory swapped for a link never sends the removal
        // elsewhere.
        let Ok(safe) = safepath::open_dir(dir, &trust, None) else {
            continue;
        };
        let before = removed.len();
        for entry in list_dir(&safe) {
            let Some(client) = temp_name_target(&entry).and_then(|n| names.get(n)) else {
                continue;
            };
            let regular = safe
                .stat(&entry)
                .is_ok_and(|st| st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFREG);
            if regular && safe.unlink(&entry).is_ok() {
                removed.push((client.to_string(), dir.join(&entry)));
            }
        }
        if removed.len() > before {
            // Best effort, like the removal itself: a lost unlink only leaves the litter again.
            let _ = safe.sync();
        }
    }
    removed
}

/// The UTF-8 names in `dir` (others cannot be ours), `.` and `..` left out; empty when it
/// cannot be listed.
pub(crate) fn list_dir(dir: &SafeDir) -> Vec<String> {
    let Ok(fd) = dir.try_clone_fd() else {
        return Vec::new();
    };
    let Ok(mut listing) = nix::dir::Dir::from_fd(fd) else {
        return Vec::new();
    };
    listing
        .iter()
        .flatten()
        .filter_map(|e| e.file_name().to_str().ok().map(str::to_owned))
        .filter(|n| n != "." && n != "..")
        .collect()
}

// === Writing a client's outputs ===

/// What happened to one output file.
#[derive(Debug)]
pub struct WriteReport {
    /// The output's path.
    pub path: PathBuf,
    /// `Ok(true)`: written; `Ok(false)`: it already held exactly this content with this mode
    /// and owner, left untouched; `Err`: not written, the old file is intact.
    pub result: Result<bool, OutputError>,
}

/// Writes `token` to every output of `client`, in order. An output that already holds exactly
/// the new content (a regular file, not a symlink, with the configured mode, owner and group)
/// is left alone, mtime included. One failure never stops the others.
pub fn write_outputs(client: &ClientConfig, token: &Token) -> Vec<WriteReport> {
    client
        .outputs
        .iter()
        .map(|out| WriteReport {
            path: out.path.clone(),
            result: write_output(out, token),
        })
        .collect()
}

fn write_output(out: &OutputConfig, token: &Token) -> Result<bool, OutputError> {
    let contents = render(out, token)?;
    if is_current(out, &contents) {
        return Ok(false);
    }
    write_atomic(&out.path, &contents, out.mode, out.owner, out.group)?;
    Ok(true)
}

/// Whether `out.path` is a regular file that already holds `contents` with the right mode,
/// owner and group. Any doubt (unreadable, a symlink, …) says no, so the file is rewritten.
fn is_current(out: &OutputConfig, contents: &[u8]) -> bool {
    let Ok(meta) = fs::symlink_metadata(&out.path) else {
        return false;
    };
    if !meta.file_type().is_file()
        || meta.mode() & 0o7777 != out.mode & 0o7777
        || out.owner.is_some_and(|uid| uid != meta.uid())
        || out.group.is_some_and(|gid| gid != meta.gid())
        || meta.len() != contents.len() as u64
    {
        return false;
    }
    let Ok(mut file) = OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
        .open(&out.path)
    else {
        return false;
    };
    let mut existing = Zeroizing::new(Vec::with_capacity(contents.len() + 1));
    // Read one byte more than expected, to notice a file that grew meanwhile.
    match (&mut file)
        .take(contents.len() as u64 + 1)
        .read_to_end(&mut existing)
    {
        Ok(_) => existing.as_slice() == contents,
        Err(_) => false,
    }
}

// === on_change ===

/// The `PATH` of an `on_change` command: the system's directories, never the daemon's own.
pub const HOOK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The `LANG` of an `on_change` command when the daemon has none.
pub const HOOK_LANG: &str = "C.UTF-8";

/// The new token an `on_change` command is told about, in its environment.
#[derive(Debug, Clone, Copy)]
pub struct OnChangeEvent<'a> {
    /// The client's name (`TOKENWARDEN_CLIENT`).
    pub client: &'a str,
    /// The token's generation, rising by one per new token (`TOKENWARDEN_GENERATION`).
    pub generation: u64,
    /// When the token expires (`TOKENWARDEN_EXPIRES_AT`, RFC 3339 UTC).
    pub expires_at: SystemTime,
}

impl OnChangeEvent<'_> {
    /// The whole environment of an `on_change` command: [`HOOK_PATH`], `LANG` (`lang`, the
    /// daemon's, else [`HOOK_LANG`]) and the three `TOKENWARDEN_*` variables. Nothing else of
    /// the daemon's environment: it may hold secrets (`{ env = NAME }` sources) and
    /// `CREDENTIALS_DIRECTORY`.
    pub fn environment(&self, lang: Option<OsString>) -> Vec<(&'static str, OsString)> {
        vec![
            ("PATH", HOOK_PATH.into()),
            (
                "LANG",
                lang.filter(|l| !l.is_empty())
                    .unwrap_or_else(|| HOOK_LANG.into()),
            ),
            ("TOKENWARDEN_CLIENT", self.client.into()),
            ("TOKENWARDEN_GENERATION", self.generation.to_string().into()),
            ("TOKENWARDEN_EXPIRES_AT", rfc3339(self.expires_at).into()),
        ]
    }
}

/// The result of one `on_change` command.
#[derive(Debug)]
pub struct OnChangeReport {
    /// The command as configured.
    pub argv: Vec<String>,
    /// How it ended, or why it could not run.
    pub result: Result<CommandOutput, OnChangeError>,
}

/// A command that ran to its end (successfully or not: see [`CommandOutput::status`]).
#[derive(Debug)]
pub struct CommandOutput {
    /// Exit status; `status.success()` for exit code 0.
    pub status: ExitStatus,
    /// The first [`CAPTURE_LIMIT`] bytes of standard output, lossily decoded.
    pub stdout: String,
    /// The first [`CAPTURE_LIMIT`] bytes of standard error, lossily decoded.
    pub stderr: String,
    /// How long it ran.
    pub elapsed: Duration,
    /// Processes it left running in its process group when it exited (killed then).
    pub left_running: bool,
}

/// Why an `on_change` command did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum OnChangeError {
    /// The argv is empty.
    #[error("on_change command is empty")]
    Empty,
    /// The program could not be started (not found, not executable, …).
    #[error("cannot run on_change command {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    /// Waiting for the program failed.
    #[error("on_change command {program} could not be waited for: {source}")]
    Wait {
        program: String,
        #[source]
        source: io::Error,
    },
    /// It ran longer than the timeout; it and its process group were killed.
    #[error("on_change command {program} did not finish within {}; killed", humantime::format_duration(*timeout))]
    Timeout { program: String, timeout: Duration },
}

/// Runs each distinct non-empty `on_change` argv of `client`'s outputs once, one after the
/// other in the order the outputs list them: after all of the client's outputs are written,
/// each within `timeout` (30 s in the daemon).
pub async fn run_on_change(
    client: &ClientConfig,
    event: &OnChangeEvent<'_>,
    timeout: Duration,
) -> Vec<OnChangeReport> {
    let mut seen = HashSet::new();
    let mut reports = Vec::new();
    for out in &client.outputs {
        if out.on_change.is_empty() || !seen.insert(&out.on_change) {
            continue;
        }
        reports.push(OnChangeReport {
            argv: out.on_change.clone(),
            result: run_command(&out.on_change, event, timeout).await,
        });
    }
    reports
}

/// Runs `argv` without a shell, with the environment of [`OnChangeEvent::environment`] only,
/// stdin from /dev/null, stdout and stderr captured (the first [`CAPTURE_LIMIT`] bytes of
/// each), and no other descriptor (the daemon's are all close-on-exec: see
/// [`crate::sys::close_inherited_on_exec`]).
///
/// The command runs in a process group of its own, and nothing in that group outlives it:
/// whatever it left running when it exits, the whole group when it outlives `timeout`, and the
/// whole group when this future is dropped (the daemon stopping) are killed with SIGKILL.
pub async fn run_command(
    argv: &[String],
    event: &OnChangeEvent<'_>,
    timeout: Duration,
) -> Result<CommandOutput, OnChangeError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(OnChangeError::Empty);
    };
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env_clear()
        .envs(event.environment(std::env::var_os("LANG")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| OnChangeError::Spawn {
            program: program.clone(),
            source,
        })?;
    // Armed before anything can fail or be cancelled.
    let mut group = ProcessGroup(
        child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(nix::unistd::Pid::from_raw),
    );

    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let readers = Readers([
        child
            .stdout
            .take()
            .map(|r| tokio::spawn(read_capped(r, Arc::clone(&stdout)))),
        child
            .stderr
            .take()
            .map(|r| tokio::spawn(read_capped(r, Arc::clone(&stderr)))),
    ]);

    let status = match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(source)) => {
            group.kill();
            return Err(OnChangeError::Wait {
                program: program.clone(),
                source,
            });
        }
        Err(_elapsed) => {
            // The group first, while its leader (not yet reaped) still holds the group's id.
            group.kill();
            let _ = child.kill().await;
            return Err(OnChangeError::Timeout {
                program: program.clone(),
                timeout,
            });
        }
    };
    // What it left in its group: killed now. The group's id is the leader's pid, which stays
    // reserved while the group has a member; an empty group's id could only have been taken by
    // a new group in the instant since the leader was reaped (pids are handed out in rising
    // order up to pid_max before any is reused).
    let left_running = group.kill();
    for reader in readers.take() {
        let abort = reader.abort_handle();
        if tokio::time::timeout_at(deadline, reader).await.is_err() {
            abort.abort();
        }
    }
    let text = |buf: &Mutex<Vec<u8>>| {
        buf.lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    Ok(CommandOutput {
        status,
        stdout: text(&stdout),
        stderr: text(&stderr),
        elapsed: started.elapsed(),
        left_running,
    })
}

/// A command's process group, killed (SIGKILL) at the latest when this is dropped.
struct ProcessGroup(Option<nix::unistd::Pid>);

impl ProcessGroup {
    /// Kills every process left in the group, once; whether there was any.
    fn kill(&mut self) -> bool {
        self.0.take().is_some_and(|pgid| {
            nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL).is_ok()
        })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The tasks reading a command's stdout and stderr, aborted when dropped.
struct Readers([Option<tokio::task::JoinHandle<()>>; 2]);

impl Readers {
    fn take(mut self) -> Vec<tokio::task::JoinHandle<()>> {
        self.0.iter_mut().filter_map(Option::take).collect()
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        for r in self.0.iter().flatten() {
            r.abort();
        }
    }
}

/// Reads `r` to its end, keeping the first [`CAPTURE_LIMIT`] bytes in `kept` and draining the
/// rest so the command never blocks on a full pipe.
async fn read_capped(mut r: impl AsyncRead + Unpin, kept: Arc<Mutex<Vec<u8>>>) {
    let mut chunk = [0u8; 4096];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut k) = kept.lock() {
                    let room = CAPTURE_LIMIT.saturating_sub(k.len());
                    k.extend_from_slice(&chunk[..n.min(room)]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn on_change_environment_is_these_five_only() {
        let event = OnChangeEvent {
            client: "api",
            generation: 7,
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_460_400),
        };
        let env = |lang: Option<&str>| -> Vec<(&str, String)> {
            event
                .environment(lang.map(OsString::from))
                .into_iter()
                .map(|(k, v)| (k, v.to_string_lossy().into_owned()))
                .collect()
        };
        let want = |lang: &str| -> Vec<(&str, String)> {
            vec![
                ("PATH", HOOK_PATH.to_string()),
                ("LANG", lang.to_string()),
                ("TOKENWARDEN_CLIENT", "api".to_string()),
                ("TOKENWARDEN_GENERATION", "7".to_string()),
                ("TOKENWARDEN_EXPIRES_AT", "2026-11-23T19:00:00Z".to_string()),
            ]
        };
        assert_eq!(env(Some("fr_FR.UTF-8")), want("fr_FR.UTF-8"));
        assert_eq!(env(None), want("C.UTF-8"));
        assert_eq!(env(Some("")), want("C.UTF-8"));
    }

    #[test]
    fn chown_rights_table() {
        let rights = |cap_chown| super::ChownRights {
            euid: 1000,
            gids: vec![1000, 27],
            cap_chown,
        };
        // (owner, group, allowed without CAP_CHOWN)
        let cases: [(Option<u32>, Option<u32>, bool); 7] = [
            (None, None, true),
            (Some(1000), None, true),
            (None, Some(27), true),
            (Some(1000), Some(1000), true),
            (Some(0), None, false),
            (None, Some(0), false),
            (Some(1000), Some(4), false),
        ];
        for (owner, group, without) in cases {
            assert_eq!(
                rights(false).allow(owner, group),
                without,
                "{owner:?} {group:?}"
            );
            assert!(rights(true).allow(owner, group), "{owner:?} {group:?}");
        }
    }

    #[test]
    fn cap_chown_from_proc_status() {
        let status = |eff: &str| format!("Name:\tx\nCapPrm:\t0\nCapEff:\t{eff}\nCapBnd:\t1\n");
        let cases: [(&str, Option<bool>); 5] = [
            ("000001ffffffffff", Some(true)),
            ("000001fffefffffe", Some(false)),
            ("0000000000000001", Some(true)),
            ("0000000000000000", Some(false)),
            ("zz", None),
        ];
        for (eff, want) in cases {
            assert_eq!(super::status_has_cap_chown(&status(eff)), want, "{eff}");
        }
        assert_eq!(super::status_has_cap_chown("Name:\tx\n"), None);
    }

    use std::time::SystemTime;

    use super::*;
    use crate::secret::Secret;

    fn token(value: &str, token_type: &str) -> Token {
        Token {
            access_token: Secret::new(value),
            token_type: token_type.into(),
            issued_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_456_800),
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_460_400),
            scope: vec!["files".into(), "upload_files".into()],
        }
    }

    fn output(format: OutputFormat, env_prefix: &str) -> OutputConfig {
        OutputConfig {
            path: "/run/tw/out".into(),
            format,
            mode: 0o600,
            owner: None,
            group: None,
            on_change: Vec::new(),
            env_prefix: env_prefix.into(),
        }
    }

    #[test]
    fn every_format_byte_for_byte() {
        use OutputFormat::*;
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig-_x";
        let cases: &[(OutputFormat, &str, &str, &str, &str)] = &[
            (Token, "", jwt, "Bearer", jwt),
            (
                Json,
                "",
                jwt,
                "Bearer",
                "{\"access_token\":\"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig-_x\",\"token_type\":\"Bearer\",\"expires_at\":\"2026-11-23T19:00:00Z\",\"issued_at\":\"2026-11-23T18:00:00Z\",\"scope\":\"files upload_files\"}\n",
            ),
            (
                Env,
                "",
                jwt,
                "Bearer",
                "ACCESS_TOKEN=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig-_x\nTOKEN_TYPE=Bearer\nTOKEN_EXPIRES_AT=2026-11-23T19:00:00Z\n",
            ),
            (
                Env,
                "TD_",
                "a+b/c==",
                "MAC",
                "TD_ACCESS_TOKEN=a+b/c==\nTD_TOKEN_TYPE=MAC\nTD_TOKEN_EXPIRES_AT=2026-11-23T19:00:00Z\n",
            ),
            (
                Env,
                "X",
                "a b\"c\\d$e`f'g#h",
                "bearer",
                "XACCESS_TOKEN=\"a b\\\"c\\\\d\\$e\\`f'g#h\"\nXTOKEN_TYPE=Bearer\nXTOKEN_EXPIRES_AT=2026-11-23T19:00:00Z\n",
            ),
            (Header, "", "abc", "Bearer", "Authorization: Bearer abc\n"),
            (Header, "", "abc", "bearer", "Authorization: Bearer abc\n"),
            (Header, "", "abc", "BEARER", "Authorization: Bearer abc\n"),
            (Header, "", "abc", "DPoP", "Authorization: DPoP abc\n"),
            (Token, "TD_", "abc", "DPoP", "abc"),
        ];
        for (format, prefix, value, token_type, want) in cases {
            let got = render(&output(*format, prefix), &token(value, token_type)).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&got),
                *want,
                "{format:?} {prefix:?} {token_type:?}"
            );
        }
    }

    #[test]
    fn json_escapes_and_parses_back() {
        let mut t = token("abc", "Bearer");
        t.scope = vec!["a\"b".into(), "c\\d".into(), "é".into()];
        let got = render(&output(OutputFormat::Json, ""), &t).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&got).unwrap();
        assert_eq!(v["scope"], "a\"b c\\d é");
        assert_eq!(v["access_token"], "abc");
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 5);
    }

    #[test]
    fn control_characters_are_refused_in_every_format() {
        use OutputFormat::*;
        for format in [Token, Json, Env, Header] {
            for (value, token_type) in [
                ("a\nb", "Bearer"),
                ("a\rb", "Bearer"),
                ("a\0b", "Bearer"),
                ("ab", "Bearer\nX-Evil: 1"),
            ] {
                let e = render(&output(format, ""), &token(value, token_type)).unwrap_err();
                assert!(matches!(e, OutputError::UnsafeToken { .. }), "{format:?}");
                let msg = format!("{e} {e:?}");
                assert!(msg.contains("/run/tw/out"));
                assert!(!msg.contains("a\nb") && !msg.contains("X-Evil"));
            }
        }
        let e = render(&output(Env, "A=B"), &token("x", "Bearer")).unwrap_err();
        assert!(matches!(e, OutputError::BadEnvPrefix { .. }));
    }

    #[test]
    fn a_symlink_at_the_temporary_name_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let victim = dir.path().join("victim");
        fs::write(&path, "old").unwrap();
        fs::write(&victim, "victim").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join(".out.tw-AAAAAA")).unwrap();

        let mut fixed = || "AAAAAA".to_string();
        let e = write_atomic_named(&path, b"new", 0o600, None, None, &mut fixed).unwrap_err();
        assert!(matches!(e, OutputError::CreateTemp { .. }), "{e:?}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(fs::read(&victim).unwrap(), b"victim");

        // With a fresh name the same write goes through and the link is still untouched.
        let mut names = ["AAAAAA", "BBBBBB"].into_iter().map(String::from);
        let mut next = move || names.next().unwrap_or_default();
        write_atomic_named(&path, b"new", 0o600, None, None, &mut next).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(fs::read(&victim).unwrap(), b"victim");
        assert!(!dir.path().join(".out.tw-BBBBBB").exists());
    }

    #[test]
    fn temporary_names() {
        let cases = [
            (".out.tw-AbC019", "out", true),
            (".a.token.tw-zzzzzz", "a.token", true),
            (".out.tw-AbC01", "out", false),
            (".out.tw-AbC0199", "out", false),
            (".out.tw-AbC-19", "out", false),
            (".out.tw-ÀbC019", "out", false),
            ("out.tw-AbC019", "out", false),
            (".other.tw-AbC019", "out", false),
            (".out.tw-AbC019", "ou", false),
            (".out.json.tw-AbC019", "out", false),
            (".out", "out", false),
            (".lock", "out", false),
        ];
        for (entry, name, want) in cases {
            assert_eq!(is_temp_name_for(entry, name), want, "{entry} for {name}");
        }
        for _ in 0..100 {
            let made = format!(".out.tw-{}", random_suffix());
            assert!(is_temp_name_for(&made, "out"), "{made}");
        }
        assert_eq!(temp_name_target(".a.token.tw-zzzzzz"), Some("a.token"));
        assert_eq!(
            temp_name_target(".x.tw-123456.tw-abcdef"),
            Some("x.tw-123456")
        );
        assert_eq!(temp_name_target("..tw-abcdef"), None);
        assert_eq!(temp_name_target(".tw-abcdef"), None);
        assert_eq!(temp_name_target(".é.tw-abcdef"), Some("é"));
    }
}
