//! The relay's UDP socket: forwards end-to-end frames, hands QUIC packets to quinn.
//!
//! Forwarding happens inside [`AsyncUdpSocket::poll_recv`]: a frame is looked up, checked and
//! sent on before quinn ever sees the batch, and its slot is emptied (`len = 0`, which quinn's
//! receive loop skips). The relay therefore spends no cryptography and no task hop on the data
//! path, and holds only the route table: two addresses and counters per route, nothing per
//! stream. Consecutive frames of one GRO batch going to the same endpoint are sent on as one GSO
//! batch.

use postern_net::transport::links::StreamLinks;
use postern_net::transport::udp::{bind_udp, canonical, Poller};
use postern_proto::fwd::{self, DatagramKind, RouteId, HEADER_LEN};
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::task::{ready, Context, Poll};
use tokio::io::Interest;

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

/// The relay's socket; see the module docs.
pub struct RelaySocket {
    io: Arc<tokio::net::UdpSocket>,
    ipv6: bool,
    state: UdpSocketState,
    routes: Arc<RouteTable>,
    stats: Arc<ForwardStats>,
    tap: Option<Tap>,
    /// Nodes that reach the relay over TLS/TCP (see [`postern_net::transport::links`]).
    links: Arc<StreamLinks>,
}

impl fmt::Debug for RelaySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelaySocket")
            .field("local", &self.io.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl RelaySocket {
    /// Binds the relay socket.
    pub fn bind(
        addr: SocketAddr,
        routes: Arc<RouteTable>,
        stats: Arc<ForwardStats>,
        tap: Option<Tap>,
    ) -> io::Result<Self> {
        let (io, state) = bind_udp(addr)?;
        Ok(Self {
            ipv6: addr.is_ipv6(),
            io,
            state,
            routes,
            stats,
            tap,
            links: Arc::default(),
        })
    }

    /// The TLS/TCP links of nodes that cannot use UDP; the relay's TCP listener attaches them.
    pub fn links(&self) -> Arc<StreamLinks> {
        self.links.clone()
    }

    /// Takes datagrams read from TLS/TCP links: forwarding frames are forwarded here, QUIC
    /// packets fill `bufs` for quinn. Returns how many slots were filled.
    fn poll_links(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> usize {
        // Bounded like the UDP path, so links cannot starve it.
        let mut budget = 256;
        let mut filled = 0;
        while filled < bufs.len().min(meta.len()) {
            if budget == 0 {
                cx.waker().wake_by_ref();
                break;
            }
            budget -= 1;
            let Poll::Ready(Some(mut d)) = self.links.poll_inbound(cx) else {
                break;
            };
            match fwd::classify(&d.data) {
                DatagramKind::Forward => {
                    let len = d.data.len();
                    self.forward(&mut d.data, len, d.from);
                }
                DatagramKind::Quic if !postern_quic(&d.data) => {
                    self.stats.dropped_not_postern.fetch_add(1, Relaxed);
                }
                DatagramKind::Quic => {
                    let slot = &mut bufs[filled];
                    if d.data.len() > slot.len() {
                        self.links.oversize();
                        continue;
                    }
                    slot[..d.data.len()].copy_from_slice(&d.data);
                    let m = &mut meta[filled];
                    m.addr = d.from;
                    m.len = d.data.len();
                    m.stride = d.data.len();
                    m.ecn = None;
                    m.dst_ip = None;
                    filled += 1;
                }
                DatagramKind::Unknown => {
                    self.stats.dropped_malformed.fetch_add(1, Relaxed);
                }
            }
        }
        filled
    }

    /// Forwards every frame in one received buffer (a GRO batch of `stride`-sized segments).
    fn forward(&self, buf: &mut [u8], stride: usize, src: SocketAddr) {
        let src = canonical(src);
        let stride = if stride == 0 { buf.len() } else { stride };
        let max_gso = self.state.max_gso_segments().max(1);
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
                        self.send(rd, &buf[start..offset], stride);
                    }
                    run = Some((d, offset, 1));
                }
                (None, prev) => {
                    if let Some((rd, start, _)) = prev {
                        self.send(rd, &buf[start..offset], stride);
                    }
                    run = None;
                }
            }
            offset = end;
        }
        if let Some((rd, start, _)) = run {
            self.send(rd, &buf[start..], stride);
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

    fn send(&self, dst: SocketAddr, contents: &[u8], stride: usize) {
        if contents.is_empty() {
            return;
        }
        let segments = contents.len().div_ceil(stride) as u64;
        if self.links.send(dst, contents, stride) {
            self.stats.forwarded_packets.fetch_add(segments, Relaxed);
            self.stats
                .forwarded_bytes
                .fetch_add(contents.len() as u64, Relaxed);
            return;
        }
        let dst = self.family_addr(dst);
        let transmit = Transmit {
            destination: dst,
            ecn: None,
            contents,
            segment_size: (contents.len() > stride).then_some(stride),
            src_ip: None,
        };
        match self.io.try_io(Interest::WRITABLE, || {
            self.state.send((&*self.io).into(), &transmit)
        }) {
            Ok(()) => {
                self.stats.forwarded_packets.fetch_add(segments, Relaxed);
                self.stats
                    .forwarded_bytes
                    .fetch_add(contents.len() as u64, Relaxed);
            }
            Err(_) => {
                // The socket buffer is full: drop, as a router would; QUIC's congestion
                // control on the end-to-end connection reacts to the loss.
                self.stats.dropped_congested.fetch_add(segments, Relaxed);
            }
        }
    }

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

impl AsyncUdpSocket for RelaySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller::new(self.io.clone()))
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let seg = transmit.segment_size.unwrap_or(transmit.contents.len());
        if self
            .links
            .send(transmit.destination, transmit.contents, seg)
        {
            return Ok(());
        }
        self.io.try_io(Interest::WRITABLE, || {
            self.state.send((&*self.io).into(), transmit)
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
        loop {
            let from_links = self.poll_links(cx, bufs, meta);
            if from_links > 0 {
                return Poll::Ready(Ok(from_links));
            }
            ready!(self.io.poll_recv_ready(cx))?;
            let n = match self.io.try_io(Interest::READABLE, || {
                self.state.recv((&*self.io).into(), bufs, meta)
            }) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            };
            let mut for_quinn = 0;
            for (m, buf) in meta.iter_mut().zip(bufs.iter_mut()).take(n) {
                let data = &mut buf[..m.len];
                match fwd::classify(data) {
                    DatagramKind::Quic if postern_quic(data) => for_quinn += 1,
                    DatagramKind::Quic => {
                        self.stats.dropped_not_postern.fetch_add(1, Relaxed);
                        postern_net::refusal!(info, "quic_version", "dropped QUIC packets of a version no postern node speaks", src = %m.addr);
                        m.len = 0;
                    }
                    DatagramKind::Forward => {
                        self.forward(data, m.stride, m.addr);
                        m.len = 0;
                    }
                    DatagramKind::Unknown => {
                        self.stats.dropped_malformed.fetch_add(1, Relaxed);
                        postern_net::refusal!(info, "junk_datagram", "dropped datagrams that are neither QUIC nor a forwarding frame", src = %m.addr, len = m.len);
                        m.len = 0;
                    }
                }
            }
            if for_quinn > 0 {
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
        self.io.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}
