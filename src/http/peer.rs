//! Who is at the other end of a loopback TCP connection: the uid the kernel's socket table
//! gives the peer's socket, as identd does (RFC 1413 answers the same question by asking the
//! table).
//!
//! The peer's socket is the row of `/proc/self/net/tcp` (or `tcp6`) whose local address
//! and port are the connection's remote end and whose remote address and port are its local
//! end, in state ESTABLISHED. An IPv6 socket talking to an IPv4 listener shows IPv4-mapped
//! addresses (`::ffff:127.0.0.1`) in `tcp6`: they are compared as the IPv4 address they map.
//! Rows in other states never match: a socket in TIME_WAIT is shown with uid 0, and must not
//! lend anyone root's rights. The tables are read line by line, each line bounded by
//! [`MAX_LINE`], without keeping more than one line; nothing is trusted that does not parse.
//!
//! Groups: the kernel tells only the uid, so the caller's groups are the user database's for
//! that uid (its primary group and the groups listing it), what a login or a systemd service
//! of that user gets.

use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::grpc::access::Caller;

/// The longest line read from a socket table (a `tcp6` row is about 170 bytes).
pub const MAX_LINE: usize = 512;
/// The tables read, in order: this process's network namespace's, through `/proc/self`,
/// which systemd's `ProcSubset=pid` (set by the unit) leaves visible where it hides
/// `/proc/net`.
pub const TABLES: [&str; 2] = ["/proc/self/net/tcp", "/proc/self/net/tcp6"];
/// The state column's value for ESTABLISHED (include/net/tcp_states.h).
const ESTABLISHED: u8 = 0x01;

/// Why the caller of a TCP connection is not known.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerError {
    /// No ESTABLISHED row has this connection's ends: the peer is not on this host's
    /// network namespace, or it closed already.
    #[error("no socket of {peer} connected to {local} in the kernel's socket table")]
    NotFound { peer: SocketAddr, local: SocketAddr },
    /// A table could not be read.
    #[error("cannot read {table}: {error}")]
    Unreadable { table: &'static str, error: String },
}

/// One row of a socket table: (local, remote, state, uid).
#[derive(Debug, PartialEq, Eq)]
pub struct Row {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
    pub uid: u32,
}

/// The uid owning the socket at `peer` that is connected to our `local` end (see the module
/// doc). Blocking: reads files in `/proc`.
pub fn uid_of(peer: SocketAddr, local: SocketAddr) -> Result<u32, PeerError> {
    for table in TABLES {
        let file = match std::fs::File::open(table) {
            Ok(f) => f,
            // No IPv6 in this kernel: no tcp6 table.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && table.ends_with('6') => {
                continue;
            }
            Err(e) => {
                return Err(PeerError::Unreadable {
                    table,
                    error: e.to_string(),
                });
            }
        };
        match find(BufReader::new(file), peer, local) {
            Ok(Some(uid)) => return Ok(uid),
            Ok(None) => {}
            Err(e) => {
                return Err(PeerError::Unreadable {
                    table,
                    error: e.to_string(),
                });
            }
        }
    }
    Err(PeerError::NotFound { peer, local })
}

/// The caller of a TCP connection: its uid from the socket table, its groups from the user
/// database. Blocking.
pub fn caller_of(peer: SocketAddr, local: SocketAddr) -> Result<Caller, PeerError> {
    let uid = uid_of(peer, local)?;
    let (gid, groups) = groups_of(uid);
    Ok(Caller {
        uid,
        gid,
        pid: None,
        groups,
    })
}

/// The primary group and the supplementary groups of `uid` in the user database; a uid with
/// no entry has neither (it matches no `allow_groups`: membership fails closed).
fn groups_of(uid: u32) -> (u32, Vec<u32>) {
    use nix::unistd::{Gid, Uid, User, getgrouplist};
    // No entry: a gid nobody lists in allow_groups, and no supplementary groups.
    let none = (u32::MAX, Vec::new());
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return none;
    };
    let Ok(name) = std::ffi::CString::new(user.name.as_bytes()) else {
        return none;
    };
    let groups = getgrouplist(&name, user.gid)
        .map(|g| g.into_iter().map(Gid::as_raw).collect())
        .unwrap_or_default();
    (user.gid.as_raw(), groups)
}

/// The uid of the ESTABLISHED row whose local end is `peer` and remote end `local`, reading
/// `table` line by line (each line at most [`MAX_LINE`] bytes; a longer one is skipped).
pub fn find(
    mut table: impl BufRead,
    peer: SocketAddr,
    local: SocketAddr,
) -> std::io::Result<Option<u32>> {
    let (peer, local) = (canonical(peer), canonical(local));
    let mut line = Vec::with_capacity(MAX_LINE);
    loop {
        line.clear();
        let n = (&mut table)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(None);
        }
        if line.last() != Some(&b'\n') && n == MAX_LINE {
            // Too long to be a row: skip the rest of it.
            skip_line(&mut table)?;
            continue;
        }
        let Some(row) = std::str::from_utf8(&line).ok().and_then(parse_row) else {
            continue;
        };
        if row.state == ESTABLISHED
            && canonical(row.local) == peer
            && canonical(row.remote) == local
        {
            return Ok(Some(row.uid));
        }
    }
}

fn skip_line(table: &mut impl BufRead) -> std::io::Result<()> {
    loop {
        let buf = table.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                table.consume(i + 1);
                return Ok(());
            }
            None => {
                let len = buf.len();
                table.consume(len);
            }
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it maps.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// One row of `/proc/self/net/tcp{,6}`:
/// `sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid ...`.
/// `None` for the header line or anything malformed.
pub fn parse_row(line: &str) -> Option<Row> {
    let mut fields = line.split_ascii_whitespace();
    let slot = fields.next()?;
    if !slot.ends_with(':') {
        return None;
    }
    let local = parse_addr(fields.next()?)?;
    let remote = parse_addr(fields.next()?)?;
    let state = u8::from_str_radix(fields.next()?, 16).ok()?;
    // tx_queue:rx_queue, tr:tm->when, retrnsmt
    let _ = (fields.next()?, fields.next()?, fields.next()?);
    let uid = fields.next()?.parse().ok()?;
    Some(Row {
        local,
        remote,
        state,
        uid,
    })
}

/// `ADDR:PORT` as the kernel prints it: the address as 8 (IPv4) or 32 (IPv6) hex digits,
/// each 32-bit word in the host's byte order, the port as 4 hex digits.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    if port.len() != 4 {
        return None;
    }
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |h: &str| -> Option<[u8; 4]> {
        if h.len() != 8 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        // The kernel prints the 32-bit word as it lies in memory, read as a native integer.
        u32::from_str_radix(h, 16).ok().map(u32::to_ne_bytes)
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(addr)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(addr.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `addr` as the kernel prints it on this host.
    fn hex(addr: SocketAddr) -> String {
        let words = |b: &[u8]| -> String {
            b.chunks(4)
                .map(|c| format!("{:08X}", u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
                .collect()
        };
        let ip = match addr.ip() {
            IpAddr::V4(v4) => words(&v4.octets()),
            IpAddr::V6(v6) => words(&v6.octets()),
        };
        format!("{ip}:{:04X}", addr.port())
    }

    fn row(sl: u32, local: &str, remote: &str, state: u8, uid: u32) -> String {
        let (l, r): (SocketAddr, SocketAddr) = (local.parse().unwrap(), remote.parse().unwrap());
        format!(
            "{sl:4}: {} {} {state:02X} 00000000:00000000 00:00000000 00000000 {uid:5}        0 12345 1 0000000000000000 20 4 30 10 -1\n",
            hex(l),
            hex(r)
        )
    }

    const HEAD: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    #[test]
    fn kernel_rows_parse() {
        // As printed on little-endian x86-64: 127.0.0.1:631 listening, uid 0.
        if cfg!(target_endian = "little") {
            let r = parse_row("   0: 0100007F:0277 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 21043 1 0000000000000000 100 0 0 10 0").unwrap();
            assert_eq!(r.local, "127.0.0.1:631".parse().unwrap());
            assert_eq!(r.state, 0x0A);
            assert_eq!(r.uid, 0);
            // tcp6: ::1:8080 established with ::ffff:127.0.0.1:40000, uid 1000.
            let r = parse_row("   1: 00000000000000000000000001000000:1F90 0000000000000000FFFF00000100007F:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 1 1 0 20 4 30 10 -1").unwrap();
            assert_eq!(r.local, "[::1]:8080".parse().unwrap());
            assert_eq!(r.remote, "[::ffff:127.0.0.1]:40000".parse().unwrap());
            assert_eq!(r.uid, 1000);
        }
        for bad in [
            HEAD.trim_end(),
            "",
            "0: 0100007F:0277",
            "   0: 0100007F:02777 00000000:0000 0A 0:0 0:0 0 0",
            "   0: 0100007G:0277 00000000:0000 0A 0:0 0:0 0 0",
            "   0: 0100007F:0277 00000000:0000 0A 0:0 0:0 0 -1",
            "   0: 0100007F0:0277 00000000:0000 0A 0:0 0:0 0 0",
        ] {
            assert_eq!(parse_row(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_peer_row_is_found_by_both_ends_in_state_established() {
        let srv = "127.0.0.1:8080";
        let cli = "127.0.0.1:40000";
        let peer: SocketAddr = cli.parse().unwrap();
        let local: SocketAddr = srv.parse().unwrap();
        // (rows, expected uid)
        let cases: Vec<(Vec<String>, Option<u32>)> = vec![
            // The listener, our accepted end (uid 0) and the peer's end (uid 1000).
            (
                vec![
                    row(0, srv, "0.0.0.0:0", 0x0A, 0),
                    row(1, srv, cli, 0x01, 0),
                    row(2, cli, srv, 0x01, 1000),
                ],
                Some(1000),
            ),
            // The peer's end in TIME_WAIT (shown as uid 0) or FIN_WAIT2: no match.
            (vec![row(1, cli, srv, 0x06, 0)], None),
            (vec![row(1, cli, srv, 0x05, 1000)], None),
            // Same ports, another address; another port: no match.
            (vec![row(1, "127.0.0.2:40000", srv, 0x01, 5)], None),
            (vec![row(1, cli, "127.0.0.1:8081", 0x01, 5)], None),
            // Only our own end: no match (it is reversed).
            (vec![row(1, srv, cli, 0x01, 0)], None),
            // An IPv6 socket of the peer with IPv4-mapped addresses.
            (
                vec![row(
                    1,
                    "[::ffff:127.0.0.1]:40000",
                    "[::ffff:127.0.0.1]:8080",
                    0x01,
                    77,
                )],
                Some(77),
            ),
        ];
        for (rows, want) in cases {
            let table = format!("{HEAD}{}", rows.concat());
            let got = find(table.as_bytes(), peer, local).unwrap();
            assert_eq!(got, want, "{table}");
        }
        // A mapped peer address given by the listener matches an IPv4 row too.
        let table = format!("{HEAD}{}", row(1, cli, srv, 0x01, 9));
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        assert_eq!(find(table.as_bytes(), mapped, local).unwrap(), Some(9));
        // IPv6 loopback.
        let (p6, l6): (SocketAddr, SocketAddr) = (
            "[::1]:40000".parse().unwrap(),
            "[::1]:8080".parse().unwrap(),
        );
        let table = format!("{HEAD}{}", row(1, "[::1]:40000", "[::1]:8080", 0x01, 12));
        assert_eq!(find(table.as_bytes(), p6, l6).unwrap(), Some(12));
    }

    #[test]
    fn overlong_lines_are_skipped_not_kept() {
        let srv = "127.0.0.1:8080";
        let cli = "127.0.0.1:40000";
        let long = format!("   0: {}\n", "A".repeat(100_000));
        let table = format!("{HEAD}{long}{}", row(1, cli, srv, 0x01, 42));
        let got = find(table.as_bytes(), cli.parse().unwrap(), srv.parse().unwrap()).unwrap();
        assert_eq!(got, Some(42));
        // A long line without an end, at the end.
        let table = format!("{HEAD}{}", "B".repeat(10_000));
        let got = find(table.as_bytes(), cli.parse().unwrap(), srv.parse().unwrap()).unwrap();
        assert_eq!(got, None);
    }

    #[test]
    fn a_real_connection_is_found_with_our_uid() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let uid = uid_of(peer, server.local_addr().unwrap()).unwrap();
        assert_eq!(uid, nix::unistd::geteuid().as_raw());
        drop(client);
    }
}
