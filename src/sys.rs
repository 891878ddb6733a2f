//! The Linux calls that neither std nor nix wraps, each behind one audited `unsafe` block (the
//! rest of the crate has none):
//!
//! - [`peer_groups`]: a Unix socket peer's supplementary groups (`SO_PEERGROUPS`, Linux 4.13),
//!   recorded by the kernel when the peer connected, so no `/proc` read and no reused pid.
//! - [`close_inherited_on_exec`]: close-on-exec for every descriptor from 3 up
//!   (`close_range(2)` with `CLOSE_RANGE_CLOEXEC`, Linux 5.11; older kernels get `fcntl(2)` on
//!   each descriptor in `/proc/self/fd`), so an `on_change` command never inherits what the
//!   daemon inherited from its parent.
//! - [`trim_heap`]: the allocator's free memory given back after a reload.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Most supplementary groups a process can have (`NGROUPS_MAX` on Linux): the largest buffer
/// [`peer_groups`] will allocate (256 KiB).
pub const MAX_GROUPS: usize = 65536;

/// Groups asked for on the first try; a peer with more is asked again with the size the
/// kernel reports.
const FIRST_TRY: usize = 64;

/// The supplementary groups of the peer of `socket` (a connected Unix stream socket), as they
/// were when it connected.
pub fn peer_groups(socket: impl AsFd) -> io::Result<Vec<u32>> {
    let fd = socket.as_fd().as_raw_fd();
    let size = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; FIRST_TRY];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * size)
            .map_err(|_| io::Error::from_raw_os_error(libc::ERANGE))?;
        // SAFETY: `fd` is a descriptor borrowed for this call; the kernel writes at most `len`
        // bytes into `groups`, which owns exactly `len` bytes of initialised `gid_t`s, and
        // writes the length it used (or, on ERANGE, the length it needs) into `len`, a live
        // local.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let len = len as usize;
        if rc == 0 {
            groups.truncate(len.min(groups.len() * size) / size);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        let needed = len / size;
        if e.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() && needed <= MAX_GROUPS {
            groups.resize(needed, 0);
            continue;
        }
        return Err(e);
    }
}

/// Marks every descriptor from 3 up close-on-exec. Called once at start-up, before any thread
/// is started: the daemon opens its own descriptors close-on-exec (std and tokio always do),
/// this covers those it inherited.
pub fn close_inherited_on_exec() -> io::Result<()> {
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC takes three integers, touches no memory
    // of ours and closes nothing: it only sets a flag that matters at exec time.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // ENOSYS (before Linux 5.9) or EINVAL (the flag, before 5.11): one descriptor at a time.
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd >= 3)
        .collect();
    for fd in fds {
        // SAFETY: F_SETFD on an integer descriptor touches no memory; on a number that is not
        // open (the directory's own descriptor, closed by now) it fails with EBADF, ignored.
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
    Ok(())
}

/// Gives the allocator's free memory back to the kernel (glibc's `malloc_trim(0)`). A reload
/// of a large config frees tens of MiB of parse buffers and tables (70 MiB at 10,000 clients)
/// in the middle of the heap, where glibc keeps them resident: without this the daemon's RSS
/// stays at its peak after the first reload (docs/performance.md).
pub fn trim_heap() {
    // SAFETY: malloc_trim takes an integer and touches only the allocator's own free chunks,
    // under the allocator's locks.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_groups_of_a_socket_pair_are_ours() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut got = peer_groups(&a).unwrap();
        let mut ours: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        got.sort_unstable();
        ours.sort_unstable();
        assert_eq!(got, ours);
    }

    #[test]
    fn peer_groups_of_something_else_is_an_error() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(peer_groups(&f).is_err());
    }
}
