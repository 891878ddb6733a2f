//! Fleet mode (docs/fleet.md): hosts share each client's token through etcd.
pub mod crypt;
pub mod etcd;

/// `[fleet] lease` when unset.
pub const DEFAULT_LEASE: std::time::Duration = std::time::Duration::from_secs(15);

/// This host's name, as the kernel knows it.
pub fn hostname() -> Result<String, String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(|e| format!("cannot read the hostname: {e}"))?;
    let name = raw.trim().to_string();
    crate::config::check_fleet_host_name(&name)
        .map(|()| name)
        .map_err(|e| format!("the hostname cannot name this host in the fleet: {e}"))
}
