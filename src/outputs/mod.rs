//! Token files (docs/configuration.md#how-files-are-written): a client's outputs rendered
//! ([`render`](render())), written atomically (`atomic`) with the owners this process may give
//! (`rights`), and its `on_change` commands run (`command`). Here: [`write_outputs`], which
//! leaves an output already up to date alone, and [`OutputError`].

mod atomic;
mod command;
mod render;
mod rights;

use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;

use nix::fcntl::OFlag;
use zeroize::Zeroizing;

pub(crate) use atomic::{NewFile, list_dir, random_suffix, write_in};
pub use atomic::{remove_stale_temp_files, temp_name_target, write_atomic};
pub use command::{
    CAPTURE_LIMIT, CommandOutput, HOOK_LANG, HOOK_PATH, OnChangeError, OnChangeEvent,
    OnChangeReport, run_command, run_on_change,
};
pub use render::render;
pub use rights::{ChownRights, status_has_cap_chown};

use crate::config::{ClientConfig, OutputConfig};
use crate::token::Token;

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
