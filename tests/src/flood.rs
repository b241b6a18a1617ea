//! Hostile traffic for tests of the relay's defences: real QUIC Initials that never finish their
//! handshake, and junk datagrams of every kind the relay must drop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// Makes genuine QUIC Initial datagrams (a real ClientHello with the control ALPN, each with a
/// fresh connection id) without doing any I/O: what a handshake flood sends.
pub struct Initials {
    config: quinn::ClientConfig,
    endpoint: quinn_proto::Endpoint,
    made: usize,
}

impl Initials {
    /// Initials as a node would send them (`config` is e.g. `control_client`).
    pub fn new(config: quinn::ClientConfig) -> Self {
        Self {
            config,
            endpoint: Self::endpoint(),
            made: 0,
        }
    }

    fn endpoint() -> quinn_proto::Endpoint {
        quinn_proto::Endpoint::new(
            Arc::new(quinn_proto::EndpointConfig::default()),
            None,
            false,
            None,
        )
    }

    /// One Initial for `to`.
    pub fn next(&mut self, to: SocketAddr) -> Vec<u8> {
        // The client endpoint keeps every connection it started: start afresh now and then.
        self.made += 1;
        if self.made.is_multiple_of(512) {
            self.endpoint = Self::endpoint();
        }
        let now = Instant::now();
        let (_, mut conn) = self
            .endpoint
            .connect(now, self.config.clone(), to, "relay")
            .expect("client connect");
        let mut buf = Vec::with_capacity(1500);
        let t = conn
            .poll_transmit(now, 1, &mut buf)
            .expect("a new connection has an Initial to send");
        buf.truncate(t.size);
        buf
    }
}

/// Sends `count` Initials to `to` from `sockets` UDP sockets bound on `from_ip` (so many source
/// ports), at about `rate` per second; never answers anything. Returns how many were sent.
pub async fn initial_flood(
    to: SocketAddr,
    from_ip: std::net::IpAddr,
    config: quinn::ClientConfig,
    count: usize,
    rate: f64,
    sockets: usize,
) -> usize {
    let mut socks = Vec::new();
    for _ in 0..sockets.max(1) {
        socks.push(
            UdpSocket::bind(SocketAddr::new(from_ip, 0))
                .await
                .expect("bind flood socket"),
        );
    }
    let mut gen = Initials::new(config);
    let start = Instant::now();
    let mut sent = 0;
    for i in 0..count {
        let d = gen.next(to);
        if socks[i % socks.len()].send_to(&d, to).await.is_ok() {
            sent += 1;
        }
        // Pace: sleep whenever ahead of schedule by more than a few ms.
        let due = start + Duration::from_secs_f64((i + 1) as f64 / rate);
        if due > Instant::now() + Duration::from_millis(5) {
            tokio::time::sleep_until(due.into()).await;
        }
    }
    sent
}

/// The kinds of junk [`junk_flood`] sends.
pub const JUNK_KINDS: usize = 3;

/// Sends `count` junk datagrams to `to`, at about `rate` per second: bytes that are neither QUIC
/// nor a frame, frames for random route ids, and truncated frames, in turn.
pub async fn junk_flood(to: SocketAddr, count: usize, rate: f64) -> usize {
    let sock = UdpSocket::bind("127.0.0.2:0")
        .await
        .expect("bind junk socket");
    let start = Instant::now();
    let mut sent = 0;
    for i in 0..count {
        let d = match i % JUNK_KINDS {
            0 => vec![0x02; 200],
            1 => {
                let mut f = postern_proto::fwd::header(postern_proto::fwd::RouteId(rand::random()))
                    .to_vec();
                f.extend_from_slice(&[0x41; 300]);
                f
            }
            _ => vec![postern_proto::fwd::TAG, 1, 2],
        };
        if sock.send_to(&d, to).await.is_ok() {
            sent += 1;
        }
        let due = start + Duration::from_secs_f64((i + 1) as f64 / rate);
        if due > Instant::now() + Duration::from_millis(5) {
            tokio::time::sleep_until(due.into()).await;
        }
    }
    sent
}

/// Resident and peak resident memory of a process, in KiB (`VmRSS`, `VmHWM`).
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
