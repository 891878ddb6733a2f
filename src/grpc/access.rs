//! Who is calling, and whether they may read a client (SPEC §7).
//!
//! The caller is known by the socket's peer credentials (SO_PEERCRED, taken by the kernel when
//! the caller connected): its uid, primary gid and pid. Its supplementary groups are read from
//! `/proc/PID/status` only when a client's `allow_groups` needs them, and only trusted when that
//! process still has the peer's effective uid (a pid reused by another user's process gives no
//! groups).

use std::sync::OnceLock;

use tokio::net::unix::UCred;

/// The peer of a connection on the socket.
#[derive(Debug)]
pub struct Caller {
    /// Effective uid at connect time.
    pub uid: u32,
    /// Effective primary gid at connect time.
    pub gid: u32,
    /// Process id at connect time, when the kernel gave one.
    pub pid: Option<i32>,
    /// Supplementary groups, read on first need.
    groups: OnceLock<Vec<u32>>,
}

impl Caller {
    /// The caller of a connection with these peer credentials.
    pub fn from_cred(cred: &UCred) -> Caller {
        Caller {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            groups: OnceLock::new(),
        }
    }

    /// A caller with known supplementary groups (tests).
    pub fn with_groups(uid: u32, gid: u32, groups: Vec<u32>) -> Caller {
        let cell = OnceLock::new();
        let _ = cell.set(groups);
        Caller {
            uid,
            gid,
            pid: None,
            groups: cell,
        }
    }

    /// Supplementary groups from `/proc/PID/status`; empty when they cannot be known.
    pub fn groups(&self) -> &[u32] {
        self.groups.get_or_init(|| {
            let Some(pid) = self.pid else {
                return Vec::new();
            };
            match std::fs::read_to_string(format!("/proc/{pid}/status")) {
                Ok(text) => groups_from_status(&text, self.uid).unwrap_or_default(),
                Err(_) => Vec::new(),
            }
        })
    }

    /// Whether this caller may read a client with these allow lists, in a daemon running as
    /// `daemon_uid`.
    pub fn may_read(&self, daemon_uid: u32, allow_uids: &[u32], allow_gids: &[u32]) -> bool {
        if may_read(self.uid, self.gid, &[], daemon_uid, allow_uids, allow_gids) {
            return true;
        }
        !allow_gids.is_empty()
            && may_read(
                self.uid,
                self.gid,
                self.groups(),
                daemon_uid,
                allow_uids,
                allow_gids,
            )
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

/// The `Groups:` of a `/proc/PID/status` text, if its effective uid (the second `Uid:` field)
/// is `uid`.
pub fn groups_from_status(text: &str, uid: u32) -> Option<Vec<u32>> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|rest| rest.split_whitespace().collect::<Vec<_>>())
    };
    let uids = field("Uid:")?;
    if uids.get(1)?.parse::<u32>().ok()? != uid {
        return None;
    }
    let groups = field("Groups:")?;
    Some(groups.iter().filter_map(|g| g.parse().ok()).collect())
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

    #[test]
    fn groups_from_proc_status() {
        let text = "Name:\tcat\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\n\
                    Groups:\t4 24 27 100 \nVmPeak:\t1 kB\n";
        assert_eq!(groups_from_status(text, 1000), Some(vec![4, 24, 27, 100]));
        assert_eq!(
            groups_from_status(text, 1001),
            None,
            "another user's process"
        );
        let empty = "Uid:\t5\t5\t5\t5\nGroups:\t\n";
        assert_eq!(groups_from_status(empty, 5), Some(vec![]));
        assert_eq!(groups_from_status("Name:\tx\n", 5), None);
    }
}
