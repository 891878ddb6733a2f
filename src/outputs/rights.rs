//! Who may chown: which owners and groups this process can give the files it writes (chown(2)),
//! so that a config asking for more is refused when it is loaded rather than at every write.

use std::fs;

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

#[cfg(test)]
mod tests {
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
}
