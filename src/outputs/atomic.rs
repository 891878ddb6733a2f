//! Atomic, durable file writes (docs/configuration.md#how-files-are-written), and the clean-up
//! of the temporary files a killed write leaves behind.
//!
//! Every write goes through [`write_in`] (outputs through [`write_atomic`]): the directory is
//! opened by the safe walk of [`crate::safepath`] (no symbolic link, no directory others can
//! write), then a temporary file `.NAME.tw-XXXXXX` is created in it exclusively, 0600, without
//! following symlinks, given its group, its final mode and its owner, written, fsynced, renamed
//! over the final name and the directory fsynced, all relative to the opened directory. A
//! reader sees the old file or the new one, never a mix; a failure removes the temporary file
//! and leaves the old file as it was. The state directory ([`crate::state`]) writes the same
//! way. A write killed midway (SIGKILL, power loss) can only leave a temporary file behind,
//! never a partial output: [`remove_stale_temp_files`] clears those at the daemon's start.
//!
//! If the final path is a symlink, the rename replaces the link itself with a regular file; the
//! file the link pointed to is never written. That is deliberate: following a link placed in a
//! shared directory would let whoever placed it choose where tokens land.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use rand::Rng;
use rand::distr::Alphanumeric;

use super::OutputError;
use crate::config::ClientConfig;
use crate::safepath::{self, SafeDir, Trust};

/// How many random temporary names are tried before giving up (each collision is a 1 in 56
/// billion event unless something is squatting the names).
const TEMP_ATTEMPTS: usize = 16;

/// Letters and digits in the random part of a temporary name.
const TEMP_SUFFIX_LEN: usize = 6;

/// A file to write: its bytes, its permission bits (exactly these, whatever the umask), and its
/// owner and group when set. No `Debug`: the contents are a token or a refresh token.
#[derive(Clone, Copy)]
pub(crate) struct NewFile<'a> {
    pub contents: &'a [u8],
    pub mode: u32,
    pub owner: Option<u32>,
    pub group: Option<u32>,
}

impl<'a> NewFile<'a> {
    /// `contents` readable by the daemon's user only: mode 0600, its own owner and group.
    pub(crate) fn private(contents: &'a [u8]) -> NewFile<'a> {
        NewFile {
            contents,
            mode: 0o600,
            owner: None,
            group: None,
        }
    }
}

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
    let (dir_path, name) = split_path(path)?;
    let dir = open_parent(path, dir_path)?;
    let file = NewFile {
        contents,
        mode,
        owner,
        group,
    };
    write_in(&dir, path, &name, &file, &mut random_suffix)
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
/// in the path after `dir` was opened is ever followed. `path` (`dir`/`name`) names the file in
/// errors; the temporary names' suffixes come from `suffix` ([`random_suffix`]; tests choose
/// them).
pub(crate) fn write_in(
    dir: &SafeDir,
    path: &Path,
    name: &str,
    new: &NewFile<'_>,
    suffix: &mut dyn FnMut() -> String,
) -> Result<(), OutputError> {
    let (temp, mut file) = create_temp(path, dir, name, suffix)?;
    let filled = fill(path, &mut file, new);
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
fn fill(path: &Path, file: &mut File, new: &NewFile<'_>) -> Result<(), OutputError> {
    let NewFile {
        contents,
        owner,
        group,
        ..
    } = *new;
    let mode = new.mode & 0o7777;
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

/// The file a temporary name [`write_atomic`] makes is for: `NAME` of `.NAME.tw-XXXXXX` (six
/// ASCII letters or digits), or `None` when `entry` is not such a name. Pure.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_at_the_temporary_name_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let victim = dir.path().join("victim");
        fs::write(&path, "old").unwrap();
        fs::write(&victim, "victim").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join(".out.tw-AAAAAA")).unwrap();

        let opened = open_parent(&path, dir.path()).unwrap();
        let new = NewFile::private(b"new");
        let mut fixed = || "AAAAAA".to_string();
        let e = write_in(&opened, &path, "out", &new, &mut fixed).unwrap_err();
        assert!(matches!(e, OutputError::CreateTemp { .. }), "{e:?}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(fs::read(&victim).unwrap(), b"victim");

        // With a fresh name the same write goes through and the link is still untouched.
        let mut names = ["AAAAAA", "BBBBBB"].into_iter().map(String::from);
        let mut next = move || names.next().unwrap_or_default();
        write_in(&opened, &path, "out", &new, &mut next).unwrap();
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
            assert_eq!(
                temp_name_target(entry) == Some(name),
                want,
                "{entry} for {name}"
            );
        }
        for _ in 0..100 {
            let made = format!(".out.tw-{}", random_suffix());
            assert_eq!(temp_name_target(&made), Some("out"), "{made}");
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
