//! Directories reached without following what others can swap, modelled on systemd's
//! `chase()` with `CHASE_SAFE`.
//!
//! A path is walked from `/` one component at a time with
//! `openat(parent, name, O_PATH|O_NOFOLLOW)`, so each step is taken from the directory the
//! previous step really opened, never by name from the top again. A step is refused when:
//! - the component is a symbolic link (links are never followed: whoever can place one could
//!   send the daemon's write anywhere);
//! - it is not a directory;
//! - it leaves a directory that a user other than root and the daemon's user can write (one
//!   they own, or one with the group or other write bit), unless that directory is sticky and
//!   the entry is owned by root or the daemon's user: in a sticky directory (`/tmp`) nobody
//!   else can rename or remove an entry they do not own, so such an entry cannot be swapped.
//!   This is the "unsafe transition" of systemd.
//!
//! The last directory itself must not be writable by others (sticky or not): files are
//! created in it. What the walk returns is an open directory ([`SafeDir`]); the caller creates,
//! renames and fsyncs relative to it (`openat`, `renameat`), so a swap of any component after
//! the walk changes nothing. Missing directories are created on the way (`mkdirat`, then
//! opened again without following links and checked like any other step).
//!
//! [`Checker`] is the same walk without creating anything, for loading a config.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, mkdirat};

/// Who may own (and so write) the directories on a path the daemon writes through: root and
/// the daemon's user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trust {
    /// The daemon's user.
    user: u32,
}

impl Trust {
    /// Root and this process's effective user (the daemon's user, or whoever runs `check`).
    pub fn of_this_process() -> Trust {
        Trust {
            user: nix::unistd::geteuid().as_raw(),
        }
    }

    /// Root and `user`.
    pub fn for_user(user: u32) -> Trust {
        Trust { user }
    }

    /// The daemon's user.
    pub fn user(&self) -> u32 {
        self.user
    }

    /// Whether `uid` is root or the daemon's user.
    pub fn trusts(&self, uid: u32) -> bool {
        uid == 0 || uid == self.user
    }

    /// Whether a directory owned by `uid` with permission bits `mode` can be written by a user
    /// other than root and the daemon's user: its owner is someone else (who may chmod it), or
    /// its group or others may write. Pure.
    pub fn is_open(&self, uid: u32, mode: u32) -> bool {
        !self.trusts(uid) || mode & 0o022 != 0
    }

    /// Whether stepping from a directory (`dir_uid`, `dir_mode`) to an entry owned by
    /// `next_uid` is safe: the directory is not open to others, or it is sticky and the entry
    /// belongs to root or the daemon's user (so nobody but them and the directory's owner, who
    /// must be trusted too, can replace it). Pure.
    pub fn may_step(&self, dir_uid: u32, dir_mode: u32, next_uid: u32) -> bool {
        !self.is_open(dir_uid, dir_mode)
            || (dir_mode & 0o1000 != 0 && self.trusts(dir_uid) && self.trusts(next_uid))
    }
}

/// Why a path was refused or could not be walked. Each message names the component at fault;
/// the caller adds the path it was resolving.
#[derive(Debug, thiserror::Error)]
pub enum SafePathError {
    /// A component is a symbolic link.
    #[error(
        "{0} is a symbolic link; links are not followed on this path (anyone who can place one \
         could redirect the write): use the real path"
    )]
    Symlink(PathBuf),
    /// A component exists and is not a directory.
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    /// A directory on the way (or the last one) can be written by a user other than root and
    /// the daemon's user.
    #[error(
        "directory {dir} (owner uid {owner}, mode {mode:04o}) can be written by users other than \
         root and uid {user}, who could swap what lies under it: make it owned by root or uid \
         {user} and not writable by group or others{}", if *last { "" } else { " (or sticky, like /tmp)" }
    )]
    Untrusted {
        dir: PathBuf,
        owner: u32,
        mode: u32,
        /// The daemon's user.
        user: u32,
        /// The refused directory is the one files are created in (sticky does not help there).
        last: bool,
    },
    /// A file the daemon takes orders or credentials from (the config, an included file, a
    /// secret file) can be written by a user other than root and the daemon's user.
    #[error(
        "{path} (owner uid {owner}, mode {mode:04o}) can be written by users other than root and \
         uid {user}: make it owned by root or uid {user} and not writable by group or others"
    )]
    UntrustedFile {
        path: PathBuf,
        owner: u32,
        mode: u32,
        /// The daemon's user.
        user: u32,
    },
    /// The path is relative or has a `..` component.
    #[error("{0} is not an absolute path without \"..\"")]
    NotAbsolute(PathBuf),
    /// A component could not be opened, created or inspected.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl SafePathError {
    /// Whether the path was refused as unsafe (a link or a directory others can write), as
    /// opposed to missing or failing.
    pub fn is_unsafe(&self) -> bool {
        matches!(
            self,
            SafePathError::Symlink(_)
                | SafePathError::Untrusted { .. }
                | SafePathError::UntrustedFile { .. }
        )
    }

    /// The component the error is about.
    pub fn component(&self) -> &Path {
        match self {
            SafePathError::Symlink(p)
            | SafePathError::NotADirectory(p)
            | SafePathError::NotAbsolute(p)
            | SafePathError::Io { path: p, .. } => p,
            SafePathError::Untrusted { dir, .. } => dir,
            SafePathError::UntrustedFile { path, .. } => path,
        }
    }
}

/// A directory reached by [`open_dir`]: open for reading (listing, fsync) and as the base of
/// `*at` calls.
#[derive(Debug)]
pub struct SafeDir {
    fd: OwnedFd,
    path: PathBuf,
    uid: u32,
    mode: u32,
}

impl SafeDir {
    /// A directory the caller opened and checked itself (the state directory, whose rules are
    /// stricter).
    pub(crate) fn from_fd(fd: OwnedFd, path: PathBuf, uid: u32, mode: u32) -> SafeDir {
        SafeDir {
            fd,
            path,
            uid,
            mode,
        }
    }

    /// The path it was reached by (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its owner.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Its permission bits as walked.
    pub fn mode(&self) -> u32 {
        self.mode
    }

    /// fsync of the directory, so a rename or unlink in it survives a crash.
    pub fn sync(&self) -> io::Result<()> {
        nix::unistd::fsync(&self.fd).map_err(io::Error::from)
    }

    /// A duplicate of the descriptor, as a [`File`] (for `read_dir`-like listing with
    /// `nix::dir::Dir`).
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Opens `name` in this directory with `flags | O_NOFOLLOW | O_CLOEXEC` and `mode` (for
    /// `O_CREAT`).
    pub fn open(&self, name: &str, flags: OFlag, mode: u32) -> io::Result<File> {
        let fd = openat(
            &self.fd,
            name,
            flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )?;
        Ok(File::from(fd))
    }

    /// `renameat(self, from, self, to)`.
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        nix::fcntl::renameat(&self.fd, from, &self.fd, to).map_err(io::Error::from)
    }

    /// `unlinkat(self, name, 0)`.
    pub fn unlink(&self, name: &str) -> io::Result<()> {
        nix::unistd::unlinkat(&self.fd, name, nix::unistd::UnlinkatFlags::NoRemoveDir)
            .map_err(io::Error::from)
    }

    /// `fstatat(self, name, AT_SYMLINK_NOFOLLOW)`.
    pub fn stat(&self, name: &str) -> io::Result<FileStat> {
        nix::sys::stat::fstatat(&self.fd, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(io::Error::from)
    }
}

impl AsFd for SafeDir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Like [`open_dir`], for the directory that holds one entry the caller then opens itself
/// (the state directory in its parent): the directory may be open to others if it is sticky
/// and trusted, like `/tmp`; the caller must then refuse an entry not owned by root or the
/// daemon's user (see [`Trust::may_step`] with [`SafeDir::uid`] and [`SafeDir::mode`]).
pub fn open_parent_dir(
    path: &Path,
    trust: &Trust,
    create: Option<u32>,
) -> Result<SafeDir, SafePathError> {
    open_walked(path, trust, create, Last::Entry)
}

/// What the last directory of a walk must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Last {
    /// Files are created in it: not open to others at all.
    Files,
    /// One entry owned by root or the daemon's user is stepped into: sticky is enough.
    Entry,
}

/// What to do about a missing component.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Missing {
    /// Create it with this mode (exactly, whatever the umask).
    Create(u32),
    /// Fail with `NotFound`.
    Fail,
    /// Stop there: what exists is checked, the rest will be created later (`check`).
    Stop,
}

/// Walks `path` (absolute) as the module describes and opens the directory it names,
/// creating missing directories with mode `create` when given. The returned directory is not
/// writable by others.
pub fn open_dir(path: &Path, trust: &Trust, create: Option<u32>) -> Result<SafeDir, SafePathError> {
    open_walked(path, trust, create, Last::Files)
}

fn open_walked(
    path: &Path,
    trust: &Trust,
    create: Option<u32>,
    last: Last,
) -> Result<SafeDir, SafePathError> {
    let missing = create.map_or(Missing::Fail, Missing::Create);
    match walk_to(path, trust, missing, last)? {
        Walked::Dir(dir) => Ok(dir),
        // Not reached with Create or Fail; kept total.
        Walked::Stopped => Err(SafePathError::Io {
            path: path.to_path_buf(),
            source: io::Error::from(io::ErrorKind::NotFound),
        }),
    }
}

/// The checks of one load of a config: what exists of each path is judged as [`open_dir`]
/// would walk it, creating nothing, and each directory once however many secret files or
/// outputs it holds (10,000 clients: one walk, not 10,000). Only what passed is remembered: a
/// refused path is walked again, and reported, at each use.
#[derive(Debug)]
pub struct Checker {
    trust: Trust,
    /// Directories that passed, with the stricter of the judgements they passed
    /// ([`Last::Files`] implies [`Last::Entry`]).
    passed: HashMap<PathBuf, Last>,
    /// Directories as written → their real path (`None`: it could not be resolved).
    real: HashMap<PathBuf, Option<PathBuf>>,
}

impl Checker {
    /// A pass that trusts root and `trust`'s user.
    pub fn new(trust: Trust) -> Checker {
        Checker {
            trust,
            passed: HashMap::new(),
            real: HashMap::new(),
        }
    }

    /// Who is trusted.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// A directory files will be created in (as [`open_dir`] walks it): a missing tail is fine
    /// when the directory it would be created in may be stepped out of; a component this
    /// process may not search is not judged (the daemon's user may be another).
    pub fn dir(&mut self, path: &Path) -> Result<(), SafePathError> {
        self.judge(path, Last::Files)
    }

    /// [`Checker::dir`] for the directory holding one entry (see [`open_parent_dir`]): it may
    /// be sticky and open, like `/tmp`.
    pub fn parent_dir(&mut self, path: &Path) -> Result<(), SafePathError> {
        self.judge(path, Last::Entry)
    }

    fn judge(&mut self, path: &Path, last: Last) -> Result<(), SafePathError> {
        match self.passed.get(path) {
            Some(Last::Files) => return Ok(()),
            Some(Last::Entry) if last == Last::Entry => return Ok(()),
            _ => {}
        }
        match walk_to(path, &self.trust, Missing::Stop, last) {
            Ok(_) => {}
            // A component this process may not search: the daemon's user may be another.
            Err(SafePathError::Io { source, .. })
                if source.kind() == io::ErrorKind::PermissionDenied => {}
            // Not a matter of trust: the write (or the daemon's start) reports it, and a
            // running daemon shows the output as not written until the path is mended.
            Err(SafePathError::NotADirectory(_)) => {}
            Err(e) => return Err(e),
        }
        self.passed.insert(path.to_path_buf(), last);
        Ok(())
    }

    /// A file the daemon reads orders or credentials from (the config, an included file, a
    /// secret file): neither it nor a directory on its way may be writable by a user other
    /// than root and the daemon's user (sticky directories aside, for an entry root or the
    /// daemon's user owns). Symbolic links are allowed here (Kubernetes secret volumes and
    /// `/var/run -> /run` are made of them): the real path is walked as
    /// [`Checker::parent_dir`] does, and when the file's own name is a link, the directory
    /// holding it is checked too. A file that is missing or that this process may not look
    /// at is not judged (reading it reports that). Gives the file's permission bits when it
    /// was judged.
    pub fn file(&mut self, path: &Path) -> Result<Option<u32>, SafePathError> {
        use std::os::unix::fs::MetadataExt;
        let (Some(dir), Ok(meta)) = (path.parent(), std::fs::symlink_metadata(path)) else {
            return Ok(None);
        };
        let dir = Some(dir)
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let link = meta.file_type().is_symlink();
        let real_dir = if link {
            std::fs::canonicalize(path)
                .ok()
                .and_then(|real| real.parent().map(Path::to_path_buf))
        } else {
            self.real
                .entry(dir.to_path_buf())
                .or_insert_with(|| std::fs::canonicalize(dir).ok())
                .clone()
        };
        let Some(real_dir) = real_dir else {
            return Ok(None);
        };
        self.parent_dir(&real_dir)?;
        let Ok(file) = (if link {
            std::fs::metadata(path)
        } else {
            Ok(meta.clone())
        }) else {
            return Ok(None);
        };
        let (owner, mode) = (file.uid(), file.mode() & 0o7777);
        if self.trust.is_open(owner, mode) {
            return Err(SafePathError::UntrustedFile {
                path: path.to_path_buf(),
                owner,
                mode,
                user: self.trust.user(),
            });
        }
        // The directory holding the name as written, when that name is a link: whoever can
        // write there can point the link elsewhere.
        if link
            && let Ok(holder) = std::fs::metadata(dir)
            && !self
                .trust
                .may_step(holder.uid(), holder.mode() & 0o7777, meta.uid())
        {
            return Err(SafePathError::Untrusted {
                dir: dir.to_path_buf(),
                owner: holder.uid(),
                mode: holder.mode() & 0o7777,
                user: self.trust.user(),
                last: false,
            });
        }
        Ok(Some(mode))
    }
}

enum Walked {
    Dir(SafeDir),
    Stopped,
}

fn walk_to(
    path: &Path,
    trust: &Trust,
    missing: Missing,
    last: Last,
) -> Result<Walked, SafePathError> {
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return Err(SafePathError::NotAbsolute(path.to_path_buf()));
    }
    let io_err = |p: &Path| {
        let p = p.to_path_buf();
        move |e: Errno| SafePathError::Io {
            path: p,
            source: io::Error::from(e),
        }
    };
    let root = Path::new("/");
    let mut cur_path = PathBuf::from("/");
    let mut cur = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err(root))?;
    let mut cur_stat = fstat(&cur).map_err(io_err(root))?;

    let names: Vec<&std::ffi::OsStr> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    for name in names {
        let next_path = cur_path.join(name);
        let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let (next, created) = match openat(&cur, name, flags, Mode::empty()) {
            Ok(fd) => (fd, None),
            Err(Errno::ENOENT) => match missing {
                Missing::Fail => return Err(io_err(&next_path)(Errno::ENOENT)),
                Missing::Stop => {
                    // What will be created here is ours: stepping into it is safe when the
                    // directory it is created in may be stepped out of towards our own entry.
                    let (uid, mode) = (cur_stat.st_uid, cur_stat.st_mode & 0o7777);
                    if !trust.may_step(uid, mode, trust.user()) {
                        return Err(untrusted(&cur_path, &cur_stat, trust, false));
                    }
                    return Ok(Walked::Stopped);
                }
                Missing::Create(mode) => {
                    // Nothing is created where the step into it would be refused.
                    if !trust.may_step(cur_stat.st_uid, cur_stat.st_mode & 0o7777, trust.user()) {
                        return Err(untrusted(&cur_path, &cur_stat, trust, false));
                    }
                    let made = match mkdirat(&cur, name, Mode::from_bits_truncate(0o700)) {
                        Ok(()) => true,
                        Err(Errno::EEXIST) => false,
                        Err(e) => return Err(io_err(&next_path)(e)),
                    };
                    let fd =
                        openat(&cur, name, flags, Mode::empty()).map_err(io_err(&next_path))?;
                    (fd, made.then_some(mode))
                }
            },
            Err(e) => return Err(io_err(&next_path)(e)),
        };
        let next_stat = fstat(&next).map_err(io_err(&next_path))?;
        let kind = SFlag::from_bits_truncate(next_stat.st_mode & SFlag::S_IFMT.bits());
        if kind == SFlag::S_IFLNK {
            return Err(SafePathError::Symlink(next_path));
        }
        if kind != SFlag::S_IFDIR {
            return Err(SafePathError::NotADirectory(next_path));
        }
        if !trust.may_step(cur_stat.st_uid, cur_stat.st_mode & 0o7777, next_stat.st_uid) {
            return Err(untrusted(&cur_path, &cur_stat, trust, false));
        }
        let mut next_stat = next_stat;
        if let Some(mode) = created
            && next_stat.st_uid == nix::unistd::geteuid().as_raw()
        {
            // Made by us a moment ago (a directory someone else made meanwhile keeps its mode
            // and is judged like any other): now give it its mode, whatever the umask.
            let rd = openat(
                &next,
                ".",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(io_err(&next_path))?;
            fchmod(&rd, Mode::from_bits_truncate(mode)).map_err(io_err(&next_path))?;
            next_stat = fstat(&rd).map_err(io_err(&next_path))?;
        }
        cur = next;
        cur_stat = next_stat;
        cur_path = next_path;
    }

    let (uid, mode) = (cur_stat.st_uid, cur_stat.st_mode & 0o7777);
    let refused = match last {
        Last::Files => trust.is_open(uid, mode),
        Last::Entry => !trust.may_step(uid, mode, trust.user()),
    };
    if refused {
        return Err(untrusted(&cur_path, &cur_stat, trust, last == Last::Files));
    }
    let fd = openat(
        &cur,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err(&cur_path))?;
    Ok(Walked::Dir(SafeDir {
        fd,
        path: cur_path,
        uid: cur_stat.st_uid,
        mode: cur_stat.st_mode & 0o7777,
    }))
}

fn untrusted(dir: &Path, st: &FileStat, trust: &Trust, last: bool) -> SafePathError {
    SafePathError::Untrusted {
        dir: dir.to_path_buf(),
        owner: st.st_uid,
        mode: st.st_mode & 0o7777,
        user: trust.user(),
        last,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_table() {
        let t = Trust::for_user(1000);
        // (dir owner, dir mode, next owner, may step)
        let cases: [(u32, u32, u32, bool); 12] = [
            (0, 0o755, 0, true),
            (0, 0o755, 4242, true),
            (1000, 0o700, 4242, true),
            (4242, 0o755, 0, false),
            (4242, 0o755, 1000, false),
            (0, 0o775, 0, false),
            (0, 0o757, 1000, false),
            (0, 0o1777, 0, true),
            (0, 0o1777, 1000, true),
            (0, 0o1777, 4242, false),
            (4242, 0o1777, 1000, false),
            (1000, 0o1770, 1000, true),
        ];
        for (uid, mode, next, want) in cases {
            assert_eq!(
                t.may_step(uid, mode, next),
                want,
                "{uid} {mode:o} -> {next}"
            );
        }
        assert!(!t.is_open(0, 0o755) && !t.is_open(1000, 0o700));
        assert!(t.is_open(0, 0o1777) && t.is_open(4242, 0o700) && t.is_open(1000, 0o770));
        assert!(Trust::for_user(0).trusts(0) && !Trust::for_user(0).trusts(1000));
    }

    #[test]
    fn walks_creates_and_refuses_links() {
        let dir = tempfile::tempdir().unwrap();
        let t = Trust::of_this_process();
        let deep = dir.path().join("a/b/c");
        let d = open_dir(&deep, &t, Some(0o755)).unwrap();
        assert_eq!(d.mode(), 0o755);
        assert!(deep.is_dir());
        Checker::new(t).dir(&dir.path().join("a/b/c/d/e")).unwrap();

        std::os::unix::fs::symlink(dir.path().join("a"), dir.path().join("link")).unwrap();
        let e = open_dir(&dir.path().join("link/b"), &t, Some(0o755)).unwrap_err();
        assert!(matches!(e, SafePathError::Symlink(_)), "{e:?}");
        assert!(e.to_string().contains("link"), "{e}");
        let e = Checker::new(t).dir(&dir.path().join("link/b")).unwrap_err();
        assert!(e.is_unsafe());

        std::fs::write(dir.path().join("file"), "x").unwrap();
        let e = open_dir(&dir.path().join("file/x"), &t, Some(0o755)).unwrap_err();
        assert!(matches!(e, SafePathError::NotADirectory(_)), "{e:?}");
        let e = open_dir(Path::new("relative/x"), &t, None).unwrap_err();
        assert!(matches!(e, SafePathError::NotAbsolute(_)), "{e:?}");
        let e = open_dir(&dir.path().join("a/../a"), &t, None).unwrap_err();
        assert!(matches!(e, SafePathError::NotAbsolute(_)), "{e:?}");
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let t = Trust::of_this_process();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::create_dir(open.join("sub")).unwrap();
        let e = open_dir(&open.join("sub"), &t, None).unwrap_err();
        assert!(
            matches!(e, SafePathError::Untrusted { last: false, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("0777"), "{e}");
        let e = open_dir(&open, &t, None).unwrap_err();
        assert!(
            matches!(e, SafePathError::Untrusted { last: true, .. }),
            "{e:?}"
        );
        // Sticky: stepping into our own entry is fine, writing in it is not.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        open_dir(&open.join("sub"), &t, None).unwrap();
        open_dir(&open.join("new"), &t, Some(0o755)).unwrap();
        Checker::new(t).dir(&open.join("later/x")).unwrap();
        assert!(open_dir(&open, &t, None).is_err());
    }
}
