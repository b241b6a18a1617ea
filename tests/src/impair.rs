//! A userspace UDP impairment proxy: a lossy, slow, narrow path on 127.0.0.1 for the tests and
//! the bench, since the kernel here has no netem.
//!
//! It sits in front of one upstream address (a relay): nodes send to [`ImpairProxy::addr`]
//! instead, and each client address gets its own upstream socket, as behind a NAT, so the
//! upstream sees one source per node. Both directions pass through the same [`Impairment`]:
//! loss, delay, jitter, reordering, duplication, a bandwidth limit, an MTU limit (datagrams
//! over it dropped, as a path that does not fragment) and a black hole, all changeable while
//! it runs. The randomness is seeded, so a run that sees the same datagrams in the same order
//! makes the same choices; [`ImpairProxy::counters`] says what it did.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The largest UDP payload of an ordinary Internet path (a 1,500-byte Ethernet MTU less the
/// IPv4 and UDP headers).
pub const INTERNET_MTU: usize = 1472;

/// How far a bandwidth-limited direction may queue before it drops (a router's buffer).
pub const RATE_QUEUE: Duration = Duration::from_millis(100);

/// What the path does to each datagram, in each direction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Impairment {
    /// Probability (0..=1) that a datagram is dropped.
    pub loss: f64,
    /// One-way delay of every datagram.
    pub delay: Duration,
    /// Extra delay, uniform in 0..jitter; datagrams keep their order (see `reorder`).
    pub jitter: Duration,
    /// Probability (0..=1) that a datagram skips the delay and overtakes those before it (as
    /// netem's reorder: it needs a delay to have an effect).
    pub reorder: f64,
    /// Probability (0..=1) that a datagram is delivered twice.
    pub duplicate: f64,
    /// Datagrams with a payload over this many bytes are dropped.
    pub mtu: Option<usize>,
    /// Bytes per second each direction carries; beyond [`RATE_QUEUE`] of backlog, datagrams
    /// are dropped.
    pub rate: Option<u64>,
    /// Drops everything while set.
    pub blackhole: bool,
}

impl Impairment {
    /// `loss` (a fraction) and `delay` each way, with an Internet MTU.
    pub fn lossy(loss: f64, delay: Duration) -> Self {
        Self {
            loss,
            delay,
            mtu: Some(INTERNET_MTU),
            ..Self::default()
        }
    }
}

/// Which way a datagram travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From a client (node) to the upstream (relay).
    Up,
    /// From the upstream back to a client.
    Down,
}

/// What happened to the datagrams of one direction so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirCounters {
    /// Datagrams that arrived at the proxy.
    pub received: u64,
    /// Datagrams sent on (duplicates included).
    pub delivered: u64,
    /// Payload bytes sent on (duplicates included).
    pub delivered_bytes: u64,
    /// Dropped at random (`loss`).
    pub lost: u64,
    /// Dropped for being over the MTU.
    pub oversize: u64,
    /// Dropped by the black hole.
    pub blackholed: u64,
    /// Dropped because the bandwidth limit's queue was full.
    pub queue_dropped: u64,
    /// Extra copies sent.
    pub duplicated: u64,
    /// Sent ahead of datagrams that arrived before them.
    pub reordered: u64,
    /// The largest payload sent on since the start or [`ImpairProxy::reset_largest`].
    pub largest: u64,
}

impl DirCounters {
    /// Every datagram dropped, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.lost + self.oversize + self.blackholed + self.queue_dropped
    }
}

/// Both directions' counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub up: DirCounters,
    pub down: DirCounters,
}

impl Counters {
    /// Payload bytes sent on in both directions.
    pub fn delivered_bytes(&self) -> u64 {
        self.up.delivered_bytes + self.down.delivered_bytes
    }

    /// Datagrams dropped as oversize in both directions.
    pub fn oversize(&self) -> u64 {
        self.up.oversize + self.down.oversize
    }
}

#[derive(Default)]
struct AtomicDir {
    received: AtomicU64,
    delivered: AtomicU64,
    delivered_bytes: AtomicU64,
    lost: AtomicU64,
    oversize: AtomicU64,
    blackholed: AtomicU64,
    queue_dropped: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    largest: AtomicU64,
}

impl AtomicDir {
    fn snapshot(&self) -> DirCounters {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DirCounters {
            received: g(&self.received),
            delivered: g(&self.delivered),
            delivered_bytes: g(&self.delivered_bytes),
            lost: g(&self.lost),
            oversize: g(&self.oversize),
            blackholed: g(&self.blackholed),
            queue_dropped: g(&self.queue_dropped),
            duplicated: g(&self.duplicated),
            reordered: g(&self.reordered),
            largest: g(&self.largest),
        }
    }
}

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// Per-direction timing state: when the bandwidth-limited link is next free, and the latest
/// departure so far (jitter keeps order).
#[derive(Default)]
struct Lane {
    link_free: Option<Instant>,
    last_departure: Option<Instant>,
}

/// How many oversize drops [`ImpairProxy::oversize_log`] keeps.
const OVERSIZE_LOG_MAX: usize = 100_000;

struct Decider {
    rng: StdRng,
    up: Lane,
    down: Lane,
}

struct Shared {
    settings: Mutex<Impairment>,
    decider: Mutex<Decider>,
    up: AtomicDir,
    down: AtomicDir,
    /// When each oversize datagram was dropped, and its size.
    oversize_log: Mutex<Vec<(Instant, Direction, usize)>>,
}

impl Shared {
    fn dir(&self, d: Direction) -> &AtomicDir {
        match d {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        }
    }

    /// When each copy of a datagram of `len` bytes arriving now leaves (none: dropped).
    fn schedule(&self, d: Direction, len: usize, now: Instant) -> Vec<Instant> {
        let s = self
            .settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let c = self.dir(d);
        bump(&c.received, 1);
        if s.blackhole {
            bump(&c.blackholed, 1);
            return Vec::new();
        }
        if s.mtu.is_some_and(|m| len > m) {
            bump(&c.oversize, 1);
            let mut log = self.oversize_log.lock().unwrap_or_else(|p| p.into_inner());
            if log.len() < OVERSIZE_LOG_MAX {
                log.push((now, d, len));
            }
            return Vec::new();
        }
        let mut guard = self.decider.lock().unwrap_or_else(|p| p.into_inner());
        let Decider { rng, up, down } = &mut *guard;
        let lane = match d {
            Direction::Up => up,
            Direction::Down => down,
        };
        // Every random draw is made for every datagram, so one setting does not shift the
        // sequence another sees.
        let (lost, jitter, reordered, duplicated) = (
            rng.random::<f64>() < s.loss,
            rng.random::<f64>(),
            rng.random::<f64>() < s.reorder,
            rng.random::<f64>() < s.duplicate,
        );
        if lost {
            bump(&c.lost, 1);
            return Vec::new();
        }
        let mut start = now;
        if let Some(rate) = s.rate.filter(|r| *r > 0) {
            let free = lane.link_free.map_or(now, |f| f.max(now));
            if free.saturating_duration_since(now) > RATE_QUEUE {
                bump(&c.queue_dropped, 1);
                return Vec::new();
            }
            let serialise = Duration::from_secs_f64(len as f64 / rate as f64);
            lane.link_free = Some(free + serialise);
            start = free + serialise;
        }
        let at = if reordered {
            bump(&c.reordered, 1);
            start
        } else {
            let mut at = start + s.delay + s.jitter.mul_f64(jitter);
            if let Some(last) = lane.last_departure {
                at = at.max(last);
            }
            lane.last_departure = Some(at);
            at
        };
        if duplicated {
            bump(&c.duplicated, 1);
            vec![at, at]
        } else {
            vec![at]
        }
    }
}

/// A datagram waiting for its departure time.
struct Pending {
    at: Instant,
    seq: u64,
    dir: Direction,
    socket: Arc<UdpSocket>,
    /// `None`: the socket is connected (an upstream socket).
    to: Option<SocketAddr>,
    data: Arc<[u8]>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// A running impairment proxy; stops when dropped.
pub struct ImpairProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    clients: Arc<Mutex<HashMap<SocketAddr, SocketAddr>>>,
    stop: CancellationToken,
}

impl ImpairProxy {
    /// Starts a proxy on 127.0.0.1 (a free port) in front of `upstream`, with no impairment
    /// yet and randomness from `seed`.
    pub async fn start(upstream: SocketAddr, seed: u64) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?);
        let addr = front.local_addr()?;
        let shared = Arc::new(Shared {
            settings: Mutex::default(),
            decider: Mutex::new(Decider {
                rng: StdRng::seed_from_u64(seed),
                up: Lane::default(),
                down: Lane::default(),
            }),
            up: AtomicDir::default(),
            down: AtomicDir::default(),
            oversize_log: Mutex::default(),
        });
        let stop = CancellationToken::new();
        let clients = Arc::new(Mutex::new(HashMap::new()));
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(deliver(rx, shared.clone(), stop.clone()));
        tokio::spawn(front_loop(
            front,
            upstream,
            shared.clone(),
            clients.clone(),
            tx,
            stop.clone(),
        ));
        Ok(Self {
            addr,
            upstream,
            shared,
            clients,
            stop,
        })
    }

    /// Where nodes send instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address it forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Applies `impairment` to every datagram from now on (both directions).
    pub fn set(&self, impairment: Impairment) {
        *self
            .shared
            .settings
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = impairment;
    }

    /// Changes part of the impairment in place.
    pub fn update(&self, f: impl FnOnce(&mut Impairment)) {
        f(&mut self
            .shared
            .settings
            .lock()
            .unwrap_or_else(|p| p.into_inner()));
    }

    /// The impairment now.
    pub fn impairment(&self) -> Impairment {
        self.shared
            .settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Drops everything (`true`) or nothing more than the rest of the settings say (`false`).
    pub fn blackhole(&self, on: bool) {
        self.update(|i| i.blackhole = on);
    }

    /// What it has done so far.
    pub fn counters(&self) -> Counters {
        Counters {
            up: self.shared.up.snapshot(),
            down: self.shared.down.snapshot(),
        }
    }

    /// Starts a new window for [`DirCounters::largest`].
    pub fn reset_largest(&self) {
        self.shared.up.largest.store(0, Ordering::Relaxed);
        self.shared.down.largest.store(0, Ordering::Relaxed);
    }

    /// When each datagram over the MTU was dropped, which way it went and its size (the first
    /// 100,000).
    pub fn oversize_log(&self) -> Vec<(Instant, Direction, usize)> {
        self.shared
            .oversize_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Each client address seen so far, with the local address of the upstream socket that
    /// carries it (its address as the upstream sees it).
    pub fn clients(&self) -> HashMap<SocketAddr, SocketAddr> {
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for ImpairProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Largest datagram read (the UDP maximum).
const MAX_DATAGRAM: usize = 65_535;

/// Reads from clients, giving each its own upstream socket on first sight.
async fn front_loop(
    front: Arc<UdpSocket>,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    clients: Arc<Mutex<HashMap<SocketAddr, SocketAddr>>>,
    tx: mpsc::UnboundedSender<Pending>,
    stop: CancellationToken,
) {
    let mut sockets: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut seq = 0u64;
    loop {
        let (n, from) = tokio::select! {
            _ = stop.cancelled() => return,
            r = front.recv_from(&mut buf) => match r {
                Ok(x) => x,
                // ICMP errors from earlier sends surface here on Linux; keep going.
                Err(_) => continue,
            },
        };
        let sock = match sockets.get(&from) {
            Some(s) => s.clone(),
            None => {
                let Ok(s) = bind_upstream(upstream).await else {
                    continue;
                };
                let s = Arc::new(s);
                if let Ok(local) = s.local_addr() {
                    clients
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(from, local);
                }
                tokio::spawn(back_loop(
                    s.clone(),
                    front.clone(),
                    from,
                    shared.clone(),
                    tx.clone(),
                    stop.clone(),
                ));
                sockets.insert(from, s.clone());
                s
            }
        };
        let data: Arc<[u8]> = Arc::from(&buf[..n]);
        for at in shared.schedule(Direction::Up, n, Instant::now()) {
            seq += 1;
            let _ = tx.send(Pending {
                at,
                seq,
                dir: Direction::Up,
                socket: sock.clone(),
                to: None,
                data: data.clone(),
            });
        }
    }
}

async fn bind_upstream(upstream: SocketAddr) -> std::io::Result<UdpSocket> {
    let local = if upstream.is_ipv4() {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))
    };
    let s = UdpSocket::bind(local).await?;
    s.connect(upstream).await?;
    Ok(s)
}

/// Reads what the upstream sends one client and sends it back through the front socket.
async fn back_loop(
    sock: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Pending>,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    // Sequence numbers of this direction start high, so they never tie with the front loop's.
    let mut seq = 1u64 << 62;
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => return,
            r = sock.recv(&mut buf) => match r {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        let data: Arc<[u8]> = Arc::from(&buf[..n]);
        for at in shared.schedule(Direction::Down, n, Instant::now()) {
            seq += 1;
            let _ = tx.send(Pending {
                at,
                seq,
                dir: Direction::Down,
                socket: front.clone(),
                to: Some(client),
                data: data.clone(),
            });
        }
    }
}

/// Sends each datagram at its time.
async fn deliver(
    mut rx: mpsc::UnboundedReceiver<Pending>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut queue: BinaryHeap<Reverse<Pending>> = BinaryHeap::new();
    loop {
        let next = queue.peek().map(|Reverse(p)| p.at);
        tokio::select! {
            _ = stop.cancelled() => return,
            item = rx.recv() => match item {
                Some(p) => queue.push(Reverse(p)),
                None => return,
            },
            _ = sleep_until(next), if next.is_some() => {
                let now = Instant::now();
                while queue.peek().is_some_and(|Reverse(p)| p.at <= now) {
                    let Some(Reverse(p)) = queue.pop() else { break };
                    let sent = match p.to {
                        Some(to) => p.socket.send_to(&p.data, to).await,
                        None => p.socket.send(&p.data).await,
                    };
                    if sent.is_ok() {
                        let c = shared.dir(p.dir);
                        bump(&c.delivered, 1);
                        bump(&c.delivered_bytes, p.data.len() as u64);
                        c.largest.fetch_max(p.data.len() as u64, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP echo server on 127.0.0.1 that also reports each sender's address.
    async fn echo() -> (SocketAddr, mpsc::UnboundedReceiver<SocketAddr>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = s.local_addr().expect("echo addr");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = tx.send(from);
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        (addr, rx)
    }

    async fn client(proxy: &ImpairProxy) -> UdpSocket {
        let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
        c.connect(proxy.addr()).await.expect("connect");
        c
    }

    /// Sends `count` numbered datagrams of `size` bytes and collects the numbers echoed back
    /// until `quiet` passes without one.
    async fn exchange(c: &UdpSocket, count: u32, size: usize, quiet: Duration) -> Vec<u32> {
        for i in 0..count {
            let mut d = vec![0u8; size.max(4)];
            d[..4].copy_from_slice(&i.to_be_bytes());
            c.send(&d).await.expect("send");
        }
        let mut got = Vec::new();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        while let Ok(Ok(n)) = tokio::time::timeout(quiet, c.recv(&mut buf)).await {
            assert!(n >= 4);
            got.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
        }
        got
    }

    #[tokio::test]
    async fn passes_everything_unimpaired_and_counts_it() {
        let (up, _) = echo().await;
        let proxy = ImpairProxy::start(up, 1).await.expect("start");
        let c = client(&proxy).await;
        let got = exchange(&c, 50, 100, Duration::from_millis(300)).await;
        assert_eq!(got, (0..50).collect::<Vec<_>>());
        let n = proxy.counters();
        assert_eq!(
            (n.up.received, n.up.delivered, n.down.delivered),
            (50, 50, 50)
        );
        assert_eq!(n.delivered_bytes(), 2 * 50 * 100);
        assert_eq!((n.up.largest, n.down.largest), (100, 100));
        proxy.reset_largest();
        assert_eq!(proxy.counters().up.largest, 0);
        assert_eq!(n.up.dropped() + n.down.dropped(), 0);
    }

    #[tokio::test]
    async fn loss_is_seeded_and_every_datagram_is_accounted_for() {
        let (up, _) = echo().await;
        let mut runs = Vec::new();
        for _ in 0..2 {
            let proxy = ImpairProxy::start(up, 42).await.expect("start");
            proxy.set(Impairment {
                loss: 0.3,
                ..Impairment::default()
            });
            let c = client(&proxy).await;
            // One at a time, so both runs present the same datagrams in the same order.
            let mut got = Vec::new();
            for i in 0..200u32 {
                got.extend(
                    exchange(&c, 1, 8, Duration::from_millis(20))
                        .await
                        .iter()
                        .map(|_| i),
                );
            }
            let n = proxy.counters();
            assert_eq!(n.up.received, 200);
            assert_eq!(n.up.delivered + n.up.lost, n.up.received);
            assert_eq!(n.down.received, n.up.delivered);
            assert_eq!(n.down.delivered + n.down.lost, n.down.received);
            assert_eq!(got.len() as u64, n.down.delivered);
            // 30 % each way: about half come back.
            assert!((60..140).contains(&got.len()), "{} came back", got.len());
            runs.push(got);
        }
        assert_eq!(runs[0], runs[1], "the same seed drops the same datagrams");
    }

    #[tokio::test]
    async fn drops_datagrams_over_the_mtu_and_logs_them() {
        let (up, _) = echo().await;
        let proxy = ImpairProxy::start(up, 1).await.expect("start");
        proxy.set(Impairment {
            mtu: Some(INTERNET_MTU),
            ..Impairment::default()
        });
        let c = client(&proxy).await;
        let small = exchange(&c, 3, INTERNET_MTU, Duration::from_millis(200)).await;
        let big = exchange(&c, 3, INTERNET_MTU + 1, Duration::from_millis(200)).await;
        assert_eq!((small.len(), big.len()), (3, 0));
        assert_eq!(proxy.counters().up.oversize, 3);
        let log = proxy.oversize_log();
        assert_eq!(log.len(), 3);
        assert!(log
            .iter()
            .all(|(_, d, n)| *d == Direction::Up && *n == INTERNET_MTU + 1));
    }

    #[tokio::test]
    async fn delays_each_way_and_keeps_order_under_jitter() {
        let (up, _) = echo().await;
        let proxy = ImpairProxy::start(up, 7).await.expect("start");
        proxy.set(Impairment {
            delay: Duration::from_millis(40),
            jitter: Duration::from_millis(20),
            ..Impairment::default()
        });
        let c = client(&proxy).await;
        let t = Instant::now();
        let got = exchange(&c, 20, 10, Duration::from_millis(300)).await;
        assert_eq!(got, (0..20).collect::<Vec<_>>(), "jitter alone keeps order");
        // The first answer cannot come back before two one-way delays.
        let mut buf = [0u8; 16];
        let t2 = Instant::now();
        c.send(&[0u8; 8]).await.expect("send");
        c.recv(&mut buf).await.expect("recv");
        assert!(
            t2.elapsed() >= Duration::from_millis(80),
            "{:?}",
            t2.elapsed()
        );
        assert!(t.elapsed() >= Duration::from_millis(80));
    }

    #[tokio::test]
    async fn reordering_lets_datagrams_overtake() {
        let (up, _) = echo().await;
        let proxy = ImpairProxy::start(up, 3).await.expect("start");
        proxy.set(Impairment {
            delay: Duration::from_millis(30),
            reorder: 0.25,
            ..Impairment::default()
        });
        let c = client(&proxy).await;
        let got = exchange(&c, 100, 10, Duration::from_millis(300)).await;
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>(), "none lost");
        assert_ne!(got, sorted, "some overtook others");
        let n = proxy.counters();
        assert!(n.up.reordered + n.down.reordered > 0);
    }

    #[tokio::test]
    async fn duplicates_are_delivered_twice() {
        let (up, mut seen) = echo().await;
        let proxy = ImpairProxy::start(up, 5).await.expect("start");
        proxy.set(Impairment {
            duplicate: 1.0,
            ..Impairment::default()
        });
        let c = client(&proxy).await;
        let got = exchange(&c, 5, 10, Duration::from_millis(300)).await;
        // Each datagram reaches the echo twice, and each of its answers comes back twice.
        assert_eq!(got.len(), 20);
        let mut upstream_saw = 0;
        while seen.try_recv().is_ok() {
            upstream_saw += 1;
        }
        assert_eq!(upstream_saw, 10);
        assert_eq!(proxy.counters().up.duplicated, 5);
    }

    #[tokio::test]
    async fn black_hole_drops_all_until_lifted() {
        let (up, _) = echo().await;
        let proxy = ImpairProxy::start(up, 1).await.expect("start");
        let c = client(&proxy).await;
        proxy.blackhole(true);
        assert!(exchange(&c, 5, 10, Duration::from_millis(200))
            .await
            .is_empty());
        assert_eq!(proxy.counters().up.blackholed, 5);
        proxy.blackhole(false);
        assert_eq!(
            exchange(&c, 5, 10, Duration::from_millis(200)).await.len(),
            5
        );
    }

    #[tokio::test]
    async fn bandwidth_limit_paces_and_drops_beyond_its_queue() {
        let (up, _) = echo().await;
        let proxy = ImpairProxy::start(up, 1).await.expect("start");
        // 100 KB/s: 10 datagrams of 1,000 bytes take 100 ms to leave; a burst of 100 overflows
        // the 100 ms queue.
        proxy.set(Impairment {
            rate: Some(100_000),
            ..Impairment::default()
        });
        let c = client(&proxy).await;
        let t = Instant::now();
        let got = exchange(&c, 10, 1000, Duration::from_millis(300)).await;
        assert_eq!(got.len(), 10);
        // The last answer left after the ten had been paced out (the quiet wait is added).
        assert!(
            t.elapsed() >= Duration::from_millis(390),
            "{:?}",
            t.elapsed()
        );
        let burst = exchange(&c, 100, 1000, Duration::from_millis(400)).await;
        assert!(burst.len() < 100);
        assert!(proxy.counters().up.queue_dropped > 0);
    }

    #[tokio::test]
    async fn each_client_gets_its_own_upstream_socket() {
        let (up, mut seen) = echo().await;
        let proxy = ImpairProxy::start(up, 1).await.expect("start");
        let (a, b) = (client(&proxy).await, client(&proxy).await);
        assert_eq!(
            exchange(&a, 1, 10, Duration::from_millis(200)).await,
            vec![0]
        );
        assert_eq!(
            exchange(&b, 1, 10, Duration::from_millis(200)).await,
            vec![0]
        );
        let (sa, sb) = (
            seen.recv().await.expect("first"),
            seen.recv().await.expect("second"),
        );
        assert_ne!(sa, sb, "the upstream sees two sources");
        let clients = proxy.clients();
        assert_eq!(clients.len(), 2);
        assert_eq!(clients[&a.local_addr().expect("a")], sa);
        assert_eq!(clients[&b.local_addr().expect("b")], sb);
    }

    #[tokio::test]
    async fn settings_change_while_running() {
        let (up, _) = echo().await;
        let proxy = ImpairProxy::start(up, 9).await.expect("start");
        let c = client(&proxy).await;
        proxy.set(Impairment {
            loss: 1.0,
            ..Impairment::default()
        });
        assert!(exchange(&c, 5, 10, Duration::from_millis(150))
            .await
            .is_empty());
        proxy.update(|i| i.loss = 0.0);
        assert_eq!(proxy.impairment(), Impairment::default());
        assert_eq!(
            exchange(&c, 5, 10, Duration::from_millis(150)).await.len(),
            5
        );
        assert_eq!(proxy.counters().up.lost, 5);
    }
}
