//! The relay's UDP sockets: forward end-to-end frames, hand QUIC packets to quinn.
//!
//! Forwarding never goes through quinn: a frame is looked up in the [`RouteTable`], checked
//! (it must come from one of its route's two endpoints) and sent on from the socket that read
//! it, in the receive path, with no cryptography and no task hop. The relay holds only the
//! route table: two addresses and counters per route, nothing per stream. Consecutive frames of
//! one GRO batch going to the same endpoint are sent on as one GSO batch. That per-datagram
//! work (classify, refuse junk and foreign QUIC versions, check and forward frames) is the
//! [`Forwarder`]'s, shared by every socket below.
//!
//! **On every core** (`forward-threads`, N): the relay binds N UDP sockets on the same address
//! and port with `SO_REUSEPORT`, and the kernel spreads incoming datagrams over them by a hash
//! of the 4-tuple, so each node's datagrams (its control connection's and its frames, which
//! share its one UDP socket) keep landing on the same member of the group.
//! - The first ([`RelaySocket`]) is quinn's: forwarding happens inside
//!   [`AsyncUdpSocket::poll_recv`] before quinn ever sees the batch, and a forwarded frame's
//!   slot is emptied (`len = 0`, which quinn's receive loop skips). quinn sends every control
//!   reply from it.
//! - Each of the N-1 others ([`ExtraSockets`]) is read by its own task: it forwards frames the
//!   same way (sending from its own socket: same address and port, so nodes see no
//!   difference) and passes QUIC packets (control connections, handshakes: a trickle next to
//!   the frames) to quinn through a bounded queue that `poll_recv` drains first, as it drains
//!   the TLS/TCP links ([`StreamLinks::poll_inbound`]). When the queue is full the packet is
//!   dropped and counted, as a full socket buffer would drop it; QUIC recovers.
//!
//! With N = 1 there is one socket, bound without `SO_REUSEPORT`, and no queue. With N > 1 a
//! plain bind of the address is tried first and released, so a port some other process (or
//! another relay) holds is refused as before, rather than joined: any process of the same user
//! could join a `SO_REUSEPORT` group. The extra sockets' tasks end when the relay stops (their
//! token) or quinn's socket goes (their queue closes), and the port is free once they have.

use postern_net::transport::links::StreamLinks;
use postern_net::transport::udp::{bind_udp, bind_udp_reuseport, canonical, Poller};
use postern_proto::fwd::{self, DatagramKind, RouteId, HEADER_LEN};
use quinn::udp::{EcnCodepoint, RecvMeta, Transmit, UdpSocketState, BATCH_SIZE};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{ready, Context, Poll};
use tokio::io::Interest;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One route: the two endpoints allowed to use it, and what went through.
#[derive(Debug)]
pub struct Route {
    pub a: SocketAddr,
    pub b: SocketAddr,
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    /// Bytes sent by `a` (the inlet); `bytes` minus this went the other way. For the admin API.
    pub bytes_from_a: AtomicU64,
    /// When the route was made (the admin API shows its age).
    pub opened: std::time::Instant,
}

/// The relay's routes, shared between the control plane (which adds and removes them) and the
/// socket (which reads them for every forwarded batch).
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: RwLock<HashMap<RouteId, Arc<Route>>>,
}

impl RouteTable {
    /// Adds a route between two endpoints.
    pub fn insert(&self, id: RouteId, a: SocketAddr, b: SocketAddr) {
        let route = Arc::new(Route {
            a: canonical(a),
            b: canonical(b),
            packets: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            bytes_from_a: AtomicU64::new(0),
            opened: std::time::Instant::now(),
        });
        self.write().insert(id, route);
    }

    /// Removes a route; returns whether it existed.
    pub fn remove(&self, id: RouteId) -> bool {
        self.write().remove(&id).is_some()
    }

    /// Looks up a route.
    pub fn get(&self, id: RouteId) -> Option<Arc<Route>> {
        self.read().get(&id).cloned()
    }

    /// Ids of all routes.
    pub fn ids(&self) -> Vec<RouteId> {
        self.read().keys().copied().collect()
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// True when there are no routes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<RouteId, Arc<Route>>> {
        // A poisoned lock only means another thread panicked mid-update of a HashMap whose
        // invariants hold between calls; the data is still usable.
        self.routes.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<RouteId, Arc<Route>>> {
        self.routes.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counters of the forwarding path.
#[derive(Debug, Default)]
pub struct ForwardStats {
    /// Frames forwarded.
    pub forwarded_packets: AtomicU64,
    /// Bytes forwarded (whole frames).
    pub forwarded_bytes: AtomicU64,
    /// Frames for a route the relay does not know.
    pub dropped_unknown_route: AtomicU64,
    /// Frames from an address that is not one of the route's endpoints.
    pub dropped_spoofed: AtomicU64,
    /// Datagrams that are neither QUIC nor a valid frame.
    pub dropped_malformed: AtomicU64,
    /// Frames dropped because the outgoing socket buffer was full.
    pub dropped_congested: AtomicU64,
    /// QUIC packets no postern node sends (a long header of another version than QUIC v1),
    /// dropped before quinn would answer them with a Version Negotiation packet.
    pub dropped_not_postern: AtomicU64,
    /// QUIC packets read by an extra socket of the group that quinn could not take: its queue
    /// was full (or the packet did not fit quinn's buffer).
    pub dropped_quic_queue: AtomicU64,
    /// Per socket of the group (index 0: quinn's), to see how the kernel spread the load.
    pub sockets: Vec<SocketStats>,
}

impl ForwardStats {
    /// Counters for a group of `sockets` sockets.
    pub fn new(sockets: usize) -> Self {
        Self {
            sockets: (0..sockets.max(1))
                .map(|_| SocketStats::default())
                .collect(),
            ..Self::default()
        }
    }

    fn socket(&self, index: usize) -> Option<&SocketStats> {
        self.sockets.get(index)
    }
}

/// What one socket of the group read and forwarded. Each on its own cache line: the sockets'
/// tasks run on different cores and would otherwise fight over the line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct SocketStats {
    /// Frames this socket read and forwarded.
    pub forwarded_packets: AtomicU64,
    /// QUIC packets this socket read and passed to quinn.
    pub quic_packets: AtomicU64,
}

/// Most sockets (and forwarding tasks) a relay binds on its port.
pub const MAX_FORWARD_THREADS: usize = 16;

/// The default of `forward-threads`: one socket per core, at most [`MAX_FORWARD_THREADS`].
pub fn default_forward_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, MAX_FORWARD_THREADS)
}

/// Whether a QUIC packet may come from a postern node: every node speaks QUIC v1 only, so a
/// long-header packet of another version is a scan or a probe, and answering it (Version
/// Negotiation) would only make the relay a reflector.
fn postern_quic(data: &[u8]) -> bool {
    match data.first() {
        Some(b) if b & 0x80 != 0 => data.get(1..5) == Some(&[0, 0, 0, 1][..]),
        _ => true,
    }
}

/// A test hook that sees (and may alter) every forwarded packet's bytes.
pub type Tap = Arc<dyn Fn(&mut [u8]) + Send + Sync>;

/// One socket of the group, as the forwarder sends from it.
struct GroupSocket {
    io: Arc<tokio::net::UdpSocket>,
    state: UdpSocketState,
    ipv6: bool,
    /// Its place in the group (0: quinn's), for [`ForwardStats::sockets`].
    index: usize,
}

impl GroupSocket {
    fn family_addr(&self, addr: SocketAddr) -> SocketAddr {
        // Decided once at bind time: asking the kernel (getsockname) per send showed in profiles.
        match (self.ipv6, addr) {
            (true, SocketAddr::V4(v4)) => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            _ => addr,
        }
    }
}

/// The per-datagram work of every socket of the group (see the module docs).
struct Forwarder {
    routes: Arc<RouteTable>,
    stats: Arc<ForwardStats>,
    tap: Option<Tap>,
    /// Nodes that reach the relay over TLS/TCP (see [`postern_net::transport::links`]).
    links: Arc<StreamLinks>,
}

impl Forwarder {
    /// Handles one received datagram (a GRO batch of `stride`-sized segments) read by `sock`:
    /// forwards frames, drops and counts what no node sends. Returns true when it is a QUIC
    /// packet for quinn.
    fn datagram(
        &self,
        sock: &GroupSocket,
        data: &mut [u8],
        stride: usize,
        src: SocketAddr,
    ) -> bool {
        match fwd::classify(data) {
            DatagramKind::Quic if postern_quic(data) => true,
            DatagramKind::Quic => {
                self.stats.dropped_not_postern.fetch_add(1, Relaxed);
                postern_net::refusal!(info, "quic_version", "dropped QUIC packets of a version no postern node speaks", %src);
                false
            }
            DatagramKind::Forward => {
                self.forward(sock, data, stride, src);
                false
            }
            DatagramKind::Unknown => {
                self.stats.dropped_malformed.fetch_add(1, Relaxed);
                postern_net::refusal!(info, "junk_datagram", "dropped datagrams that are neither QUIC nor a forwarding frame", %src, len = data.len());
                false
            }
        }
    }

    /// Forwards every frame in one received buffer (a GRO batch of `stride`-sized segments).
    fn forward(&self, sock: &GroupSocket, buf: &mut [u8], stride: usize, src: SocketAddr) {
        let src = canonical(src);
        let stride = if stride == 0 { buf.len() } else { stride };
        let max_gso = sock.state.max_gso_segments().max(1);
        // A run of consecutive segments for the same destination, sent as one GSO batch.
        let mut run: Option<(SocketAddr, usize, usize)> = None; // (dst, start, count)
        let mut offset = 0;
        while offset < buf.len() {
            let end = (offset + stride).min(buf.len());
            let dst = self.check(&mut buf[offset..end], src);
            match (dst, run) {
                (Some(d), Some((rd, start, count))) if d == rd && count < max_gso => {
                    run = Some((rd, start, count + 1));
                }
                (Some(d), prev) => {
                    if let Some((rd, start, _)) = prev {
                        self.send(sock, rd, &buf[start..offset], stride);
                    }
                    run = Some((d, offset, 1));
                }
                (None, prev) => {
                    if let Some((rd, start, _)) = prev {
                        self.send(sock, rd, &buf[start..offset], stride);
                    }
                    run = None;
                }
            }
            offset = end;
        }
        if let Some((rd, start, _)) = run {
            self.send(sock, rd, &buf[start..], stride);
        }
    }

    /// Validates one frame; returns where it goes.
    fn check(&self, frame: &mut [u8], src: SocketAddr) -> Option<SocketAddr> {
        let route_id = match fwd::parse(frame) {
            Ok((id, _)) => id,
            Err(e) => {
                self.stats.dropped_malformed.fetch_add(1, Relaxed);
                postern_net::refusal!(info, "malformed_frame", "dropped malformed forwarding frames", %src, error = %e);
                return None;
            }
        };
        let Some(route) = self.routes.get(route_id) else {
            self.stats.dropped_unknown_route.fetch_add(1, Relaxed);
            postern_net::refusal!(info, "unknown_route", "dropped frames for unknown routes", %src);
            return None;
        };
        let dst = if src == route.a {
            route.bytes_from_a.fetch_add(frame.len() as u64, Relaxed);
            route.b
        } else if src == route.b {
            route.a
        } else {
            self.stats.dropped_spoofed.fetch_add(1, Relaxed);
            postern_net::refusal!(info, "spoofed_frame", "dropped frames from an address that is not an endpoint of their route", %src, route = %route_id.short());
            return None;
        };
        if let Some(tap) = &self.tap {
            tap(&mut frame[HEADER_LEN..]);
        }
        route.packets.fetch_add(1, Relaxed);
        route.bytes.fetch_add(frame.len() as u64, Relaxed);
        Some(dst)
    }

    fn send(&self, sock: &GroupSocket, dst: SocketAddr, contents: &[u8], stride: usize) {
        if contents.is_empty() {
            return;
        }
        let segments = contents.len().div_ceil(stride) as u64;
        let sent = self.links.send(dst, contents, stride) || {
            let dst = sock.family_addr(dst);
            let transmit = Transmit {
                destination: dst,
                ecn: None,
                contents,
                segment_size: (contents.len() > stride).then_some(stride),
                src_ip: None,
            };
            sock.io
                .try_io(Interest::WRITABLE, || {
                    sock.state.send((&*sock.io).into(), &transmit)
                })
                .is_ok()
        };
        if sent {
            self.stats.forwarded_packets.fetch_add(segments, Relaxed);
            self.stats
                .forwarded_bytes
                .fetch_add(contents.len() as u64, Relaxed);
            if let Some(s) = self.stats.socket(sock.index) {
                s.forwarded_packets.fetch_add(segments, Relaxed);
            }
        } else {
            // The socket buffer is full: drop, as a router would; QUIC's congestion control on
            // the end-to-end connection reacts to the loss.
            self.stats.dropped_congested.fetch_add(segments, Relaxed);
        }
    }
}

/// A QUIC packet (or GRO batch of them) an extra socket read, on its way to quinn.
struct ForQuinn {
    data: Vec<u8>,
    addr: SocketAddr,
    stride: usize,
    ecn: Option<EcnCodepoint>,
    dst_ip: Option<IpAddr>,
}

/// Room in the queue from the extra sockets to quinn: control traffic is light, so this only
/// has to absorb a burst of handshakes while the endpoint driver is busy.
const QUINN_QUEUE: usize = 1024;

/// Receive buffer per datagram on an extra socket: a whole GRO batch, which the kernel caps at
/// 64 KiB. (quinn sizes its own for 64 segments of its largest datagram, 1 MiB each: too much
/// to repeat per socket.)
const EXTRA_SLOT: usize = 64 * 1024;

/// quinn's socket: the first of the group; see the module docs.
pub struct RelaySocket {
    primary: GroupSocket,
    fwd: Arc<Forwarder>,
    /// QUIC packets the extra sockets read (none with one socket).
    from_extra: Option<Mutex<mpsc::Receiver<ForQuinn>>>,
}

impl fmt::Debug for RelaySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelaySocket")
            .field("local", &self.primary.io.local_addr().ok())
            .finish_non_exhaustive()
    }
}

/// The group's sockets besides quinn's, until the relay starts their tasks
/// ([`spawn`](Self::spawn)); dropping them releases them.
pub struct ExtraSockets {
    sockets: Vec<GroupSocket>,
    fwd: Arc<Forwarder>,
    to_quinn: mpsc::Sender<ForQuinn>,
}

impl fmt::Debug for ExtraSockets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExtraSockets")
            .field("len", &self.sockets.len())
            .finish_non_exhaustive()
    }
}

/// Binds `n` sockets on `addr` (one plain socket when `n` is 1); see the module docs.
fn bind_group(
    addr: SocketAddr,
    n: usize,
) -> io::Result<Vec<(Arc<tokio::net::UdpSocket>, UdpSocketState)>> {
    if n <= 1 {
        return Ok(vec![bind_udp(addr)?]);
    }
    let mut attempts = 0;
    loop {
        attempts += 1;
        // A plain bind fails where anyone holds the port, as a relay with one socket would;
        // for port 0 it also picks the port the group then shares.
        let probe = std::net::UdpSocket::bind(addr).map_err(|e| {
            postern_net::runtime::port_owner::explain_bind_error(
                postern_net::runtime::port_owner::Proto::Udp,
                addr,
                e,
            )
        })?;
        let at = probe.local_addr()?;
        drop(probe);
        match (0..n).map(|_| bind_udp_reuseport(at)).collect() {
            Ok(group) => return Ok(group),
            // Someone took the free port between the probe and the group: pick another.
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && addr.port() == 0 && attempts < 8 => {}
            Err(e) => return Err(e),
        }
    }
}

impl RelaySocket {
    /// Binds the relay's `threads` sockets on `addr` (see the module docs): quinn's, and the
    /// others, whose tasks the relay starts when it runs.
    pub fn bind(
        addr: SocketAddr,
        threads: usize,
        routes: Arc<RouteTable>,
        stats: Arc<ForwardStats>,
        tap: Option<Tap>,
    ) -> io::Result<(Self, Option<ExtraSockets>)> {
        let threads = threads.clamp(1, MAX_FORWARD_THREADS);
        let mut group =
            bind_group(addr, threads)?
                .into_iter()
                .enumerate()
                .map(|(index, (io, state))| GroupSocket {
                    io,
                    state,
                    ipv6: addr.is_ipv6(),
                    index,
                });
        let primary = group
            .next()
            .ok_or_else(|| io::Error::other("no socket bound"))?;
        let fwd = Arc::new(Forwarder {
            routes,
            stats,
            tap,
            links: Arc::default(),
        });
        let sockets: Vec<GroupSocket> = group.collect();
        if sockets.is_empty() {
            let socket = Self {
                primary,
                fwd,
                from_extra: None,
            };
            return Ok((socket, None));
        }
        let (to_quinn, rx) = mpsc::channel(QUINN_QUEUE);
        let extra = ExtraSockets {
            sockets,
            fwd: fwd.clone(),
            to_quinn,
        };
        let socket = Self {
            primary,
            fwd,
            from_extra: Some(Mutex::new(rx)),
        };
        Ok((socket, Some(extra)))
    }

    /// The TLS/TCP links of nodes that cannot use UDP; the relay's TCP listener attaches them.
    pub fn links(&self) -> Arc<StreamLinks> {
        self.fwd.links.clone()
    }

    /// Takes datagrams read from TLS/TCP links: forwarding frames are forwarded here, QUIC
    /// packets fill `bufs` for quinn from slot `filled` on. Returns how many slots are filled.
    fn poll_links(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        mut filled: usize,
    ) -> usize {
        // Bounded like the UDP path, so links cannot starve it.
        let mut budget = 256;
        while filled < bufs.len().min(meta.len()) {
            if budget == 0 {
                cx.waker().wake_by_ref();
                break;
            }
            budget -= 1;
            let Poll::Ready(Some(mut d)) = self.fwd.links.poll_inbound(cx) else {
                break;
            };
            let len = d.data.len();
            if !self.fwd.datagram(&self.primary, &mut d.data, len, d.from) {
                continue;
            }
            let slot = &mut bufs[filled];
            if len > slot.len() {
                self.fwd.links.oversize();
                continue;
            }
            slot[..len].copy_from_slice(&d.data);
            let m = &mut meta[filled];
            m.addr = d.from;
            m.len = len;
            m.stride = len;
            m.ecn = None;
            m.dst_ip = None;
            filled += 1;
        }
        filled
    }

    /// Takes the QUIC packets the extra sockets read, into `bufs` from slot `filled` on.
    /// Returns how many slots are filled.
    fn poll_extra(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        mut filled: usize,
    ) -> usize {
        let Some(rx) = &self.from_extra else {
            return filled;
        };
        let mut rx = rx.lock().unwrap_or_else(|p| p.into_inner());
        while filled < bufs.len().min(meta.len()) {
            let Poll::Ready(Some(p)) = rx.poll_recv(cx) else {
                break;
            };
            let slot = &mut bufs[filled];
            if p.data.len() > slot.len() {
                self.fwd.stats.dropped_quic_queue.fetch_add(1, Relaxed);
                continue;
            }
            slot[..p.data.len()].copy_from_slice(&p.data);
            let m = &mut meta[filled];
            m.addr = p.addr;
            m.len = p.data.len();
            m.stride = p.stride;
            m.ecn = p.ecn;
            m.dst_ip = p.dst_ip;
            filled += 1;
        }
        filled
    }
}

impl ExtraSockets {
    /// How many sockets besides quinn's.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// True when there are none (never, as made by [`RelaySocket::bind`]).
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Starts one task per socket on the current runtime. Each ends, releasing its socket,
    /// when `stop` is cancelled or quinn's socket is gone.
    pub fn spawn(self, stop: CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
        self.sockets
            .into_iter()
            .map(|sock| {
                let fwd = self.fwd.clone();
                let to_quinn = self.to_quinn.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = to_quinn.closed() => {}
                        _ = serve_extra(&sock, &fwd, &to_quinn) => {}
                    }
                })
            })
            .collect()
    }
}

/// Reads one extra socket until it fails: forwards frames, queues QUIC packets for quinn.
async fn serve_extra(sock: &GroupSocket, fwd: &Forwarder, to_quinn: &mpsc::Sender<ForQuinn>) {
    let mut buf = vec![0u8; EXTRA_SLOT * BATCH_SIZE];
    let mut meta = [RecvMeta::default(); BATCH_SIZE];
    loop {
        // Awaiting readiness each round also spends tokio's cooperative budget, so a flood of
        // frames cannot hold a worker thread forever.
        if let Err(e) = sock.io.readable().await {
            tracing::warn!(error = %e, socket = sock.index, "relay forwarding socket failed");
            return;
        }
        let mut chunks = buf.chunks_mut(EXTRA_SLOT);
        let mut bufs: [IoSliceMut<'_>; BATCH_SIZE] =
            std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
        let n = match sock.io.try_io(Interest::READABLE, || {
            sock.state.recv((&*sock.io).into(), &mut bufs, &mut meta)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // An ICMP error reported on the socket, say: nothing to do but read on.
                tracing::debug!(error = %e, socket = sock.index, "relay forwarding socket read error");
                tokio::task::yield_now().await;
                continue;
            }
        };
        for (m, b) in meta.iter().zip(bufs.iter_mut()).take(n) {
            let data = &mut b[..m.len];
            if !fwd.datagram(sock, data, m.stride, m.addr) {
                continue;
            }
            let packet = ForQuinn {
                data: data.to_vec(),
                addr: m.addr,
                stride: m.stride,
                ecn: m.ecn,
                dst_ip: m.dst_ip,
            };
            match to_quinn.try_send(packet) {
                Ok(()) => {
                    if let Some(s) = fwd.stats.socket(sock.index) {
                        s.quic_packets.fetch_add(1, Relaxed);
                    }
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    fwd.stats.dropped_quic_queue.fetch_add(1, Relaxed);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    }
}

impl AsyncUdpSocket for RelaySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller::new(self.primary.io.clone()))
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let seg = transmit.segment_size.unwrap_or(transmit.contents.len());
        if self
            .fwd
            .links
            .send(transmit.destination, transmit.contents, seg)
        {
            return Ok(());
        }
        let io = &self.primary.io;
        io.try_io(Interest::WRITABLE, || {
            self.primary.state.send((&**io).into(), transmit)
        })
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        // Bound the work done in one call so a flood of frames cannot starve the control plane.
        let mut budget = 64;
        let io = &self.primary.io;
        loop {
            let filled = self.poll_links(cx, bufs, meta, 0);
            let filled = self.poll_extra(cx, bufs, meta, filled);
            if filled > 0 {
                return Poll::Ready(Ok(filled));
            }
            ready!(io.poll_recv_ready(cx))?;
            let n = match io.try_io(Interest::READABLE, || {
                self.primary.state.recv((&**io).into(), bufs, meta)
            }) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            };
            let mut for_quinn = 0;
            for (m, buf) in meta.iter_mut().zip(bufs.iter_mut()).take(n) {
                if self
                    .fwd
                    .datagram(&self.primary, &mut buf[..m.len], m.stride, m.addr)
                {
                    for_quinn += 1;
                } else {
                    m.len = 0;
                }
            }
            if for_quinn > 0 {
                if let Some(s) = self.fwd.stats.socket(0) {
                    s.quic_packets.fetch_add(for_quinn, Relaxed);
                }
                return Poll::Ready(Ok(n));
            }
            budget -= 1;
            if budget == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.primary.io.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.primary.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.primary.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.primary.state.gro_segments()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(addr: SocketAddr, threads: usize) -> io::Result<(RelaySocket, Option<ExtraSockets>)> {
        RelaySocket::bind(
            addr,
            threads,
            Arc::default(),
            Arc::new(ForwardStats::new(threads)),
            None,
        )
    }

    /// A group shares its port with no one else: a second relay (one socket or a group) and a
    /// plain socket are refused, as with a single socket, and the port is free once the group
    /// is dropped.
    #[tokio::test]
    async fn a_group_holds_its_port_alone() {
        let (socket, extra) = bind("127.0.0.1:0".parse().expect("addr"), 4).expect("group");
        assert_eq!(extra.as_ref().map(ExtraSockets::len), Some(3));
        let addr = socket.local_addr().expect("addr");
        for threads in [1, 4] {
            let err = bind(addr, threads).expect_err("port taken");
            assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        }
        assert!(std::net::UdpSocket::bind(addr).is_err());
        drop((socket, extra));
        std::net::UdpSocket::bind(addr).expect("released");
    }

    /// One thread is one plain socket: no queue, no extra sockets.
    #[tokio::test]
    async fn one_thread_is_one_socket() {
        let (socket, extra) = bind("127.0.0.1:0".parse().expect("addr"), 1).expect("bind");
        assert!(extra.is_none() && socket.from_extra.is_none());
    }
}
