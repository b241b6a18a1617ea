//! Who holds a port: turns "Address already in use" into a message naming the other process
//! (an old relay still draining, a second copy of a node), read from `/proc` on Linux.
//!
//! Best effort: without `/proc`, or when the holder belongs to another user (its file
//! descriptors are unreadable), the message says so instead of naming it.

use std::io;
use std::net::SocketAddr;

/// The socket kind a port belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
}

impl Proto {
    fn as_str(self) -> &'static str {
        match self {
            Proto::Udp => "UDP",
            Proto::Tcp => "TCP",
        }
    }
}

/// A process found holding a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// The process's command name (`/proc/PID/comm`).
    pub name: String,
}

/// Rewrites an `AddrInUse` error from binding `addr` into one that says another process holds
/// the port and, when it can be found, which; other errors pass through unchanged.
pub fn explain_bind_error(proto: Proto, addr: SocketAddr, e: io::Error) -> io::Error {
    if e.kind() != io::ErrorKind::AddrInUse {
        return e;
    }
    let who = match holder(proto, addr.port()) {
        Some(h) if h.pid == std::process::id() => {
            "this process itself (two listeners configured on one port?)".to_owned()
        }
        Some(h) => format!("{} (pid {})", h.name, h.pid),
        None => {
            "another process (not identifiable from here; try `ss -lunp` / `ss -ltnp`)".to_owned()
        }
    };
    io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "address already in use: {} port {} is held by {who}; stop it (a relay that is still draining exits within its --drain-timeout) or choose another port",
            proto.as_str(),
            addr.port()
        ),
    )
}

/// The process holding `port` (bound, or listening for TCP), if `/proc` tells.
pub fn holder(proto: Proto, port: u16) -> Option<Holder> {
    let tables: &[&str] = match proto {
        Proto::Udp => &["/proc/net/udp", "/proc/net/udp6"],
        Proto::Tcp => &["/proc/net/tcp", "/proc/net/tcp6"],
    };
    let inodes: Vec<u64> = tables
        .iter()
        .filter_map(|t| std::fs::read_to_string(t).ok())
        .flat_map(|text| socket_inodes(&text, proto, port))
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if wanted.iter().any(|w| target.as_os_str() == w.as_str()) {
                let name = std::fs::read_to_string(entry.path().join("comm"))
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_else(|_| "?".into());
                return Some(Holder { pid, name });
            }
        }
    }
    None
}

/// Inodes of the sockets bound to `port` in one `/proc/net/{udp,tcp}[6]` table (TCP: only
/// listening ones, state `0A`).
fn socket_inodes(table: &str, proto: Proto, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local = cols.get(1)?;
            let state = cols.get(3)?;
            let inode = cols.get(9)?.parse::<u64>().ok()?;
            let (_, hex_port) = local.rsplit_once(':')?;
            let p = u16::from_str_radix(hex_port, 16).ok()?;
            let listening = proto == Proto::Udp || *state == "0A";
            (p == port && listening && inode != 0).then_some(inode)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lines_are_read_by_port_and_state() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1151 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0
   1: 0100007F:1151 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0
   2: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0
";
        assert_eq!(socket_inodes(table, Proto::Tcp, 0x1151), vec![4242]);
        assert_eq!(socket_inodes(table, Proto::Udp, 0x1151), vec![4242, 4343]);
        assert!(socket_inodes(table, Proto::Tcp, 1).is_empty());
        assert!(socket_inodes("garbage\nnot a table", Proto::Tcp, 1).is_empty());
    }

    #[test]
    fn a_port_held_by_this_process_is_named() {
        let held = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = held.local_addr().expect("addr");
        let e = std::net::UdpSocket::bind(addr).expect_err("port is taken");
        let msg = explain_bind_error(Proto::Udp, addr, e).to_string();
        assert!(msg.contains("address already in use"), "{msg}");
        assert!(msg.contains(&addr.port().to_string()), "{msg}");
        if cfg!(target_os = "linux") {
            assert!(msg.contains("this process itself"), "{msg}");
        }

        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let taddr = tcp.local_addr().expect("addr");
        if cfg!(target_os = "linux") {
            let h = holder(Proto::Tcp, taddr.port()).expect("found");
            assert_eq!(h.pid, std::process::id());
        }
    }

    #[test]
    fn other_errors_pass_through() {
        let e = io::Error::new(io::ErrorKind::PermissionDenied, "no");
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        assert_eq!(explain_bind_error(Proto::Udp, addr, e).to_string(), "no");
    }
}
