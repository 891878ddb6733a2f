//! Who is calling, and whether they may read a client.
//!
//! The caller is known by what the kernel recorded about the socket's peer when it connected:
//! its uid, primary gid and pid (`SO_PEERCRED`) and its supplementary groups
//! (`SO_PEERGROUPS`), both taken once, when the connection is accepted. Nothing is read from
//! `/proc`: that works under systemd's `ProtectProc=invisible`, and a pid reused by another
//! process cannot lend the caller its groups.

use tokio::net::UnixStream;

/// The peer of a connection on the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Effective uid at connect time.
    pub uid: u32,
    /// Effective primary gid at connect time.
    pub gid: u32,
    /// Process id at connect time, when the kernel gave one (for logs only).
    pub pid: Option<i32>,
    /// Supplementary groups at connect time.
    pub groups: Vec<u32>,
}

impl Caller {
    /// The peer of an accepted connection; `None` when the kernel gives no credentials (not
    /// a Unix socket peer). Supplementary groups that cannot be had (a kernel before 4.13)
    /// are taken as none: membership by supplementary group then fails closed.
    pub fn of_stream(stream: &UnixStream) -> Option<Caller> {
        let cred = stream.peer_cred().ok()?;
        let groups = match crate::sys::peer_groups(stream) {
            Ok(groups) => groups,
            Err(e) => {
                tracing::debug!(
                    uid = cred.uid(),
                    pid = cred.pid(),
                    "cannot read the caller's supplementary groups (SO_PEERGROUPS): {e}"
                );
                Vec::new()
            }
        };
        Some(Caller {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            groups,
        })
    }

    /// A caller with these ids and supplementary groups (tests).
    pub fn with_groups(uid: u32, gid: u32, groups: Vec<u32>) -> Caller {
        Caller {
            uid,
            gid,
            pid: None,
            groups,
        }
    }

    /// Whether this caller may read a client with these allow lists, in a daemon running as
    /// `daemon_uid`.
    pub fn may_read(&self, daemon_uid: u32, allow_uids: &[u32], allow_gids: &[u32]) -> bool {
        may_read(
            self.uid,
            self.gid,
            &self.groups,
            daemon_uid,
            allow_uids,
            allow_gids,
        )
    }

    /// Whether this caller is root or the daemon's own user: the callers told that a client
    /// does not exist (everyone else hears only that they may not read it).
    pub fn is_privileged(&self, daemon_uid: u32) -> bool {
        self.uid == 0 || self.uid == daemon_uid
    }
}

/// The access rule: root, the daemon's own uid, a listed uid, or membership (primary or
/// supplementary) of a listed group.
pub fn may_read(
    uid: u32,
    gid: u32,
    groups: &[u32],
    daemon_uid: u32,
    allow_uids: &[u32],
    allow_gids: &[u32],
) -> bool {
    uid == 0
        || uid == daemon_uid
        || allow_uids.contains(&uid)
        || allow_gids.contains(&gid)
        || groups.iter().any(|g| allow_gids.contains(g))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_rule_table() {
        // (uid, gid, groups, daemon, allow_uids, allow_gids, allowed)
        type Case = (
            u32,
            u32,
            &'static [u32],
            u32,
            &'static [u32],
            &'static [u32],
            bool,
        );
        let cases: &[Case] = &[
            (0, 0, &[], 990, &[], &[], true),
            (990, 990, &[], 990, &[], &[], true),
            (1000, 1000, &[], 990, &[], &[], false),
            (1000, 1000, &[], 990, &[1000], &[], true),
            (1001, 1001, &[], 990, &[1000], &[], false),
            (1000, 50, &[], 990, &[], &[50], true),
            (1000, 1000, &[7, 50], 990, &[], &[50], true),
            (1000, 1000, &[7, 8], 990, &[], &[50], false),
            (65534, 65534, &[], 0, &[], &[], false),
        ];
        for &(uid, gid, groups, daemon, au, ag, want) in cases {
            assert_eq!(
                may_read(uid, gid, groups, daemon, au, ag),
                want,
                "{uid} {gid} {groups:?} {daemon} {au:?} {ag:?}"
            );
        }
        let c = Caller::with_groups(1000, 1000, vec![50]);
        assert!(c.may_read(990, &[], &[50]));
        assert!(!c.may_read(990, &[], &[51]));
    }
}
