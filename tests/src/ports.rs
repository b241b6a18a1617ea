//! Free ports on 127.0.0.1, for the servers and processes that must be told their address up
//! front (a relay that comes back on the same address, a child process, influxd).

use std::net::SocketAddr;

/// A free UDP port on 127.0.0.1 (for a relay that must come back on the same address).
pub fn free_udp_addr() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr")
}

/// A free TCP port for a process started by a test, which must be told its port up front.
///
/// Picked at random below the kernel's ephemeral range (32768+), where `bind(0)` and outgoing
/// connections never land, so another test cannot take it between our check and the child's
/// bind; never the same port twice in one test process.
pub fn free_port() -> u16 {
    use rand::Rng;
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = rand::rng().random_range(20_000..32_000u16);
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}
