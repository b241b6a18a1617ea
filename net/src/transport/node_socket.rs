//! A node's UDP socket: plain QUIC to the relay, and end-to-end QUIC wrapped in forwarding frames.
//!
//! quinn sees one socket. Each route the node takes part in gets a *virtual* peer address (in
//! 240.0.0.0/8, reserved and never routed); the end-to-end connection is made to that address.
//! On send, a transmit to a virtual address is wrapped — one frame header per GSO segment, so
//! batching survives — and sent to the route's relay. On receive, frames from a relay are
//! unwrapped and presented as coming from the route's virtual address. Everything else passes
//! through untouched, which is how the control connection to the relay shares the socket (and
//! the relay learns, from that connection, the address our frames come from).

use crate::transport::direct::{self, DirectTable, ProbeAction};
use crate::transport::links::StreamLinks;
use crate::transport::udp::canonical;
use crate::transport::udp::{bind_udp, Poller};
use postern_proto::fwd::{self, DatagramKind, RouteId, HEADER_LEN};
use quinn::udp::{EcnCodepoint, RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::Interest;

/// Most bytes one GSO send may carry: one IPv4 datagram's payload.
const MAX_GSO_BYTES: usize = 65_507;

/// How long a closed route's mapping outlives the close (see
/// [`NodeSocket::remove_route_after_close`]); a few round trips on any direct path.
pub const CLOSE_LINGER: Duration = Duration::from_millis(250);

/// First octet of virtual peer addresses (240.0.0.0/4 is reserved, RFC 1112 §4).
const VIRTUAL_OCTET: u8 = 240;

#[derive(Debug, Clone, Copy)]
struct VirtualRoute {
    route: RouteId,
    relay: SocketAddr,
    /// Packets to this virtual address go straight to this peer address, not through `relay`
    /// (see [`crate::transport::direct`]).
    direct: Option<SocketAddr>,
}

/// A verified direct peer address: QUIC packets from it are presented as from `virt`.
#[derive(Debug, Clone)]
struct DirectIn {
    virt: SocketAddr,
    route: RouteId,
    /// Milliseconds after the socket's epoch of the last packet received from it.
    last_rx: Arc<AtomicU64>,
}

#[derive(Debug, Default)]
struct Routes {
    by_route: HashMap<RouteId, (SocketAddr, SocketAddr)>, // route -> (virtual, relay)
    by_virtual: HashMap<SocketAddr, VirtualRoute>,
    by_direct: HashMap<SocketAddr, DirectIn>,
}

impl Routes {
    /// Drops the direct mappings of `route` (its direct virtual addresses and peer addresses).
    fn drop_direct(&mut self, route: RouteId) {
        let primary = self.by_route.get(&route).map(|(v, _)| *v);
        self.by_direct.retain(|_, d| d.route != route);
        self.by_virtual
            .retain(|v, r| !(r.route == route && r.direct.is_some() && Some(*v) != primary));
        if let Some(v) = primary.and_then(|p| self.by_virtual.get_mut(&p)) {
            v.direct = None;
        }
    }
}

/// Counters of the node's forwarding path.
#[derive(Debug, Default)]
pub struct NodeSocketStats {
    /// Frames for a route this node does not know (or from the wrong relay).
    pub dropped_unknown_route: AtomicU64,
    /// Datagrams that are neither QUIC nor a valid frame.
    pub dropped_malformed: AtomicU64,
    /// Packets for a virtual address whose route is gone.
    pub dropped_no_route: AtomicU64,
}

/// One frame segment that did not fit the batch it arrived in.
struct Pending {
    src: SocketAddr,
    data: Vec<u8>,
    ecn: Option<EcnCodepoint>,
    dst_ip: Option<IpAddr>,
}

/// See the module docs.
pub struct NodeSocket {
    io: Arc<tokio::net::UdpSocket>,
    state: UdpSocketState,
    ipv6: bool,
    routes: RwLock<Routes>,
    next_virtual: AtomicU32,
    pending: Mutex<VecDeque<Pending>>,
    stats: NodeSocketStats,
    /// TLS/TCP links to relays that cannot be reached over UDP (see [`crate::transport::links`]).
    links: Arc<StreamLinks>,
    /// Whether links or UDP are read first on the next receive.
    links_turn: AtomicBool,
    /// Probe keys, candidates and counters of the direct path.
    direct: DirectTable,
    /// Number of verified direct peer addresses (skips a lookup per packet when none).
    direct_count: AtomicUsize,
    epoch: Instant,
}

impl fmt::Debug for NodeSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeSocket")
            .field("local", &self.io.local_addr().ok())
            .finish_non_exhaustive()
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl NodeSocket {
    /// Binds a node socket on `addr` (usually the unspecified address of the relay's family).
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let (io, state) = bind_udp(addr)?;
        Ok(Self {
            ipv6: addr.is_ipv6(),
            io,
            state,
            routes: RwLock::default(),
            next_virtual: AtomicU32::new(1),
            pending: Mutex::default(),
            stats: NodeSocketStats::default(),
            links: Arc::default(),
            links_turn: AtomicBool::new(false),
            direct: DirectTable::default(),
            direct_count: AtomicUsize::new(0),
            epoch: Instant::now(),
        })
    }

    /// Binds a node socket on an ephemeral port of the unspecified address of `relay`'s family.
    pub fn bind_for(relay: SocketAddr) -> io::Result<Self> {
        let any: IpAddr = match relay {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        };
        Self::bind(SocketAddr::new(any, 0))
    }

    /// Counters.
    pub fn stats(&self) -> &NodeSocketStats {
        &self.stats
    }

    /// Links to relays over TLS/TCP: while one is attached for a relay's address, everything
    /// this socket sends to that relay (control packets and forwarding frames) goes over it.
    pub fn links(&self) -> Arc<StreamLinks> {
        self.links.clone()
    }

    /// Takes datagrams read from relay links into quinn's buffers (unwrapping forwarding
    /// frames, as for UDP). Returns how many slots were filled.
    fn poll_links(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> usize {
        let mut filled = 0;
        while filled < bufs.len().min(meta.len()) {
            let Poll::Ready(Some(d)) = self.links.poll_inbound(cx) else {
                break;
            };
            let (addr, payload) = match fwd::classify(&d.data) {
                DatagramKind::Quic => (self.present(d.from), &d.data[..]),
                DatagramKind::Forward => match fwd::parse(&d.data) {
                    Ok((route, payload)) => match self.lookup(route, canonical(d.from)) {
                        Some(_) if direct::is_probe(payload) => {
                            self.direct.on_datagram(canonical(d.from), payload, true);
                            continue;
                        }
                        Some(virt) => (virt, payload),
                        None => continue,
                    },
                    Err(_) => {
                        self.stats.dropped_malformed.fetch_add(1, Relaxed);
                        continue;
                    }
                },
                DatagramKind::Unknown => {
                    self.stats.dropped_malformed.fetch_add(1, Relaxed);
                    continue;
                }
            };
            let slot = &mut bufs[filled];
            if payload.len() > slot.len() {
                self.links.oversize();
                continue;
            }
            slot[..payload.len()].copy_from_slice(payload);
            let m = &mut meta[filled];
            m.addr = addr;
            m.len = payload.len();
            m.stride = payload.len();
            m.ecn = None;
            m.dst_ip = None;
            filled += 1;
        }
        filled
    }

    /// Starts using `route` through `relay`; returns the virtual address to connect to (or that
    /// the peer's connection will appear to come from).
    pub fn add_route(&self, route: RouteId, relay: SocketAddr) -> SocketAddr {
        let relay = canonical(relay);
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        if let Some((virt, _)) = routes.by_route.get(&route) {
            return self.present(*virt);
        }
        let n = self.next_virtual.fetch_add(1, Relaxed) & 0x00ff_ffff;
        let [_, b, c, d] = n.to_be_bytes();
        let virt = SocketAddr::new(Ipv4Addr::new(VIRTUAL_OCTET, b, c, d).into(), 443);
        routes.by_route.insert(route, (virt, relay));
        routes.by_virtual.insert(
            virt,
            VirtualRoute {
                route,
                relay,
                direct: None,
            },
        );
        self.present(virt)
    }

    /// Stops using `route`; later packets for it are dropped.
    pub fn remove_route(&self, route: RouteId) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        routes.drop_direct(route);
        if let Some((virt, _)) = routes.by_route.remove(&route) {
            routes.by_virtual.remove(&virt);
        }
        self.direct_count.store(routes.by_direct.len(), Relaxed);
        drop(routes);
        self.direct.forget(route);
    }

    /// [`remove_route`](Self::remove_route) after [`CLOSE_LINGER`], for a route whose
    /// connection was closed just now: its CONNECTION_CLOSE is sent by the connection's driver
    /// a moment later, and on a direct path it must still find the peer (through the relay it
    /// is lost anyway: the relay forgot the route first). Without the linger, a revoked inlet
    /// whose connection ran direct learnt of the close only when its next keep-alive met a
    /// stateless reset, two seconds later.
    pub fn remove_route_after_close(self: &Arc<Self>, route: RouteId) {
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(CLOSE_LINGER).await;
            me.remove_route(route);
        });
    }

    /// Points the virtual address `virt` (from [`add_route`](Self::add_route)) at `route`
    /// through `relay`, replacing the route it stood for. A QUIC connection to `virt` keeps
    /// sending as before and its packets take the new path: this is how an end-to-end
    /// connection moves to another relay (the peer sees a new address and validates it, as in
    /// any QUIC migration).
    pub fn rebind_route(&self, virt: SocketAddr, route: RouteId, relay: SocketAddr) {
        let (virt, relay) = (canonical(virt), canonical(relay));
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let old = routes.by_virtual.get(&virt).map(|v| v.route);
        if let Some(old) = old {
            routes.drop_direct(old);
            routes.by_route.remove(&old);
        }
        routes.by_route.insert(route, (virt, relay));
        routes.by_virtual.insert(
            virt,
            VirtualRoute {
                route,
                relay,
                direct: None,
            },
        );
        self.direct_count.store(routes.by_direct.len(), Relaxed);
        drop(routes);
        if let Some(old) = old {
            self.direct.forget(old);
        }
    }

    /// The relay a route goes through.
    pub fn relay_of(&self, route: RouteId) -> Option<SocketAddr> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        routes.by_route.get(&route).map(|(_, relay)| *relay)
    }

    /// The route a virtual address stands for.
    pub fn route_of(&self, virt: SocketAddr) -> Option<RouteId> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        routes.by_virtual.get(&canonical(virt)).map(|v| v.route)
    }

    /// Removes every route through `relay` (its route table is gone); returns them. With
    /// `keep_direct`, routes running direct now are kept: their connections do not need the
    /// relay while the direct path lasts (if it goes quiet they fall back to a relay that no
    /// longer knows the route, and end at their idle timeout). Without it (the relay refused
    /// this node for good) every route goes.
    pub fn remove_routes_via(&self, relay: SocketAddr, keep_direct: bool) -> Vec<RouteId> {
        let relay = canonical(relay);
        let now = self.now_ms();
        let quiet = direct::QUIET_AFTER.as_millis() as u64;
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let direct_now = |routes: &Routes, id: RouteId| {
            routes
                .by_direct
                .values()
                .any(|d| d.route == id && now.saturating_sub(d.last_rx.load(Relaxed)) < quiet)
        };
        let (gone, kept): (Vec<RouteId>, Vec<RouteId>) = routes
            .by_route
            .iter()
            .filter(|(_, (_, r))| *r == relay)
            .map(|(id, _)| *id)
            .partition(|id| !keep_direct || !direct_now(&routes, *id));
        if !kept.is_empty() {
            tracing::info!(%relay, routes = kept.len(), "relay lost; routes running direct carry on without it");
        }
        for id in &gone {
            routes.drop_direct(*id);
            if let Some((virt, _)) = routes.by_route.remove(id) {
                routes.by_virtual.remove(&virt);
            }
        }
        self.direct_count.store(routes.by_direct.len(), Relaxed);
        drop(routes);
        for id in &gone {
            self.direct.forget(*id);
        }
        gone
    }

    /// The direct path's keys, candidates and counters.
    pub fn direct(&self) -> &DirectTable {
        &self.direct
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Sends a probe straight to `dst` (a peer's candidate). A full socket buffer drops it, as
    /// it would any datagram; probes are repeated.
    pub fn send_probe(&self, dst: SocketAddr, probe: &[u8]) {
        if let Err(e) = self.io.try_send_to(probe, self.present(dst)) {
            tracing::debug!(%dst, error = %e, "direct-path probe not sent");
        }
    }

    /// Sends a probe to the peer of `route` through the route's relay (a wake-up: the peer
    /// probes back, opening its side of the NAT).
    pub fn send_probe_relayed(&self, route: RouteId, probe: &[u8]) {
        let Some(relay) = self.relay_of(route) else {
            return;
        };
        let mut framed = Vec::with_capacity(HEADER_LEN + probe.len());
        framed.extend_from_slice(&fwd::header(route));
        framed.extend_from_slice(probe);
        if self.links.send(relay, &framed, framed.len()) {
            return;
        }
        if let Err(e) = self.io.try_send_to(&framed, self.present(relay)) {
            tracing::debug!(error = %e, "relayed probe not sent");
        }
    }

    /// Sends what quinn addresses to `virt` straight to `peer` from now on, and presents
    /// packets from `peer` as coming from `virt` (the inlet's side of going direct: quinn's
    /// peer address does not change).
    pub fn go_direct(&self, virt: SocketAddr, peer: SocketAddr) -> bool {
        let (virt, peer) = (canonical(virt), canonical(peer));
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let Some(v) = routes.by_virtual.get_mut(&virt) else {
            return false;
        };
        v.direct = Some(peer);
        let route = v.route;
        routes.by_direct.retain(|_, d| d.virt != virt);
        routes.by_direct.insert(
            peer,
            DirectIn {
                virt,
                route,
                last_rx: Arc::new(AtomicU64::new(self.now_ms())),
            },
        );
        self.direct_count.store(routes.by_direct.len(), Relaxed);
        true
    }

    /// Sends what quinn addresses to `virt` through its relay again (see [`go_direct`](Self::go_direct)).
    pub fn go_relayed(&self, virt: SocketAddr) {
        let virt = canonical(virt);
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = routes.by_virtual.get_mut(&virt) {
            v.direct = None;
        }
        routes.by_direct.retain(|_, d| d.virt != virt);
        self.direct_count.store(routes.by_direct.len(), Relaxed);
    }

    /// How long since a packet came from the direct peer address `peer` (None: not mapped).
    pub fn direct_quiet_for(&self, peer: SocketAddr) -> Option<Duration> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let d = routes.by_direct.get(&canonical(peer))?;
        let last = d.last_rx.load(Relaxed);
        Some(Duration::from_millis(self.now_ms().saturating_sub(last)))
    }

    /// The outlet's side: accepts QUIC packets of `route` from the verified address `peer`,
    /// presented as coming from a virtual address of their own, so quinn sees a migration and
    /// validates the path; what quinn then sends there goes straight to `peer`. Replaces an
    /// earlier direct address of the route.
    fn map_direct(&self, route: RouteId, peer: SocketAddr) {
        let peer = canonical(peer);
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        if routes
            .by_direct
            .get(&peer)
            .is_some_and(|d| d.route == route)
        {
            return;
        }
        let Some((_, relay)) = routes.by_route.get(&route).copied() else {
            return;
        };
        routes.drop_direct(route);
        let n = self.next_virtual.fetch_add(1, Relaxed) & 0x00ff_ffff;
        let [_, b, c, d] = n.to_be_bytes();
        let virt = SocketAddr::new(Ipv4Addr::new(VIRTUAL_OCTET, b, c, d).into(), 443);
        routes.by_virtual.insert(
            virt,
            VirtualRoute {
                route,
                relay,
                direct: Some(peer),
            },
        );
        routes.by_direct.insert(
            peer,
            DirectIn {
                virt,
                route,
                last_rx: Arc::new(AtomicU64::new(self.now_ms())),
            },
        );
        self.direct_count.store(routes.by_direct.len(), Relaxed);
        tracing::info!(%peer, "direct path to the inlet verified; the connection moves when the inlet sends on it");
    }

    /// The route's own virtual address for `addr` when `addr` is one of its direct virtual
    /// addresses (connections opened over the direct path belong to the same route).
    pub fn primary_virtual(&self, addr: SocketAddr) -> SocketAddr {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        routes
            .by_virtual
            .get(&canonical(addr))
            .and_then(|v| routes.by_route.get(&v.route))
            .map(|(virt, _)| self.present(*virt))
            .unwrap_or(addr)
    }

    /// Routes whose packets go direct now (a packet came from the direct path within
    /// [`direct::QUIET_AFTER`]), and the others.
    pub fn path_counts(&self) -> (usize, usize) {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let now = self.now_ms();
        let quiet = direct::QUIET_AFTER.as_millis() as u64;
        let direct = routes
            .by_route
            .keys()
            .filter(|r| {
                routes
                    .by_direct
                    .values()
                    .any(|d| d.route == **r && now.saturating_sub(d.last_rx.load(Relaxed)) < quiet)
            })
            .count();
        (direct, routes.by_route.len() - direct)
    }

    /// Presents a QUIC packet from a verified direct peer as coming from its virtual address.
    fn map_direct_in(&self, meta: &mut RecvMeta) {
        if self.direct_count.load(Relaxed) == 0 {
            return;
        }
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = routes.by_direct.get(&canonical(meta.addr)) {
            d.last_rx.store(self.now_ms(), Relaxed);
            meta.addr = self.present(d.virt);
        }
    }

    /// Handles a probe or ack that came straight from `src`.
    fn on_probe(&self, src: SocketAddr, datagram: &[u8]) {
        let src = canonical(src);
        if let ProbeAction::Reply { ack, map } = self.direct.on_datagram(src, datagram, false) {
            if let Some(route) = map {
                self.map_direct(route, src);
            }
            self.send_probe(src, &ack);
        }
    }

    /// A single forwarding frame whose packet is a probe (a wake-up through the relay):
    /// handled here; true if it was one.
    fn relayed_probe(&self, buf: &[u8], meta: &RecvMeta) -> bool {
        let single = meta.stride == 0 || meta.stride >= meta.len;
        if !single || meta.len <= HEADER_LEN || !direct::is_probe(&buf[HEADER_LEN..meta.len]) {
            return false;
        }
        let Ok((route, payload)) = fwd::parse(&buf[..meta.len]) else {
            return false;
        };
        let src = canonical(meta.addr);
        if self.lookup(route, src).is_some() {
            self.direct.on_datagram(src, payload, true);
        }
        true
    }

    /// An address in the form quinn uses for this socket's family.
    fn present(&self, addr: SocketAddr) -> SocketAddr {
        match (self.ipv6, addr) {
            (true, SocketAddr::V4(v4)) => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            _ => addr,
        }
    }

    fn is_virtual(addr: SocketAddr) -> bool {
        matches!(addr.ip(), IpAddr::V4(v4) if v4.octets()[0] == VIRTUAL_OCTET)
    }

    /// Looks up the virtual address of a frame's route, checking it came from that route's relay.
    fn lookup(&self, route: RouteId, src: SocketAddr) -> Option<SocketAddr> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        match routes.by_route.get(&route) {
            Some((virt, relay)) if *relay == src => Some(self.present(*virt)),
            _ => {
                self.stats.dropped_unknown_route.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// Unwraps the frames of one received buffer in place. Segments of a GRO batch that belong to
    /// another route than the first are queued in `pending` for the next call.
    fn unwrap_batch(&self, buf: &mut [u8], meta: &mut RecvMeta) {
        let src = canonical(meta.addr);
        let stride = if meta.stride == 0 {
            meta.len
        } else {
            meta.stride
        };
        let len = meta.len;
        let mut first: Option<(RouteId, SocketAddr)> = None;
        let mut out = 0; // bytes of unwrapped payload written so far
        let mut offset = 0;
        let mut segments = 0;
        while offset < len {
            let end = (offset + stride).min(len);
            let parsed = fwd::parse(&buf[offset..end]).map(|(r, _)| r);
            match (parsed, first) {
                (Ok(r), None) => match self.lookup(r, src) {
                    Some(virt) => first = Some((r, virt)),
                    None => {
                        // Unknown first route: drop the whole batch's first segment and
                        // re-queue the rest, so one bad frame cannot hide good ones.
                        self.queue_rest(buf, offset + stride.min(end - offset), len, stride, meta);
                        meta.len = 0;
                        return;
                    }
                },
                (Ok(r), Some((fr, _))) if r == fr => {}
                (Ok(_), Some(_)) => {
                    self.queue_rest(buf, offset, len, stride, meta);
                    break;
                }
                (Err(_), _) => {
                    self.stats.dropped_malformed.fetch_add(1, Relaxed);
                    self.queue_rest(buf, end, len, stride, meta);
                    break;
                }
            }
            let payload = end - offset - HEADER_LEN;
            buf.copy_within(offset + HEADER_LEN..end, out);
            out += payload;
            segments += 1;
            offset = end;
        }
        match first {
            Some((_, virt)) if segments > 0 => {
                meta.addr = virt;
                meta.len = out;
                meta.stride = stride - HEADER_LEN;
            }
            _ => meta.len = 0,
        }
    }

    fn queue_rest(&self, buf: &[u8], from: usize, len: usize, stride: usize, meta: &RecvMeta) {
        if from >= len {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for chunk in buf[from..len].chunks(stride) {
            pending.push_back(Pending {
                src: meta.addr,
                data: chunk.to_vec(),
                ecn: meta.ecn,
                dst_ip: meta.dst_ip,
            });
        }
    }

    /// Delivers queued segments into quinn's buffers, one per slot.
    fn deliver_pending(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> usize {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let mut filled = 0;
        while filled < bufs.len().min(meta.len()) {
            let Some(p) = pending.pop_front() else { break };
            let Ok((route, payload)) = fwd::parse(&p.data) else {
                self.stats.dropped_malformed.fetch_add(1, Relaxed);
                continue;
            };
            let Some(virt) = self.lookup(route, canonical(p.src)) else {
                continue;
            };
            let slot = &mut bufs[filled];
            if payload.len() > slot.len() {
                self.stats.dropped_malformed.fetch_add(1, Relaxed);
                continue;
            }
            slot[..payload.len()].copy_from_slice(payload);
            let m = &mut meta[filled];
            m.addr = virt;
            m.len = payload.len();
            m.stride = payload.len();
            m.ecn = p.ecn;
            m.dst_ip = p.dst_ip;
            filled += 1;
        }
        filled
    }

    fn has_pending(&self) -> bool {
        !self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }
}

impl AsyncUdpSocket for NodeSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller::new(self.io.clone()))
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let dest = canonical(transmit.destination);
        if !Self::is_virtual(dest) {
            let seg = transmit.segment_size.unwrap_or(transmit.contents.len());
            if self.links.send(dest, transmit.contents, seg) {
                return Ok(());
            }
            return self.io.try_io(Interest::WRITABLE, || {
                self.state.send((&*self.io).into(), transmit)
            });
        }
        let route = {
            let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
            routes.by_virtual.get(&dest).copied()
        };
        let Some(VirtualRoute {
            route,
            relay,
            direct,
        }) = route
        else {
            // The route is gone; behave like a lossy path until quinn gives up.
            self.stats.dropped_no_route.fetch_add(1, Relaxed);
            return Ok(());
        };
        if let Some(peer) = direct {
            let out = Transmit {
                destination: self.present(peer),
                ecn: transmit.ecn,
                contents: transmit.contents,
                segment_size: transmit.segment_size,
                src_ip: transmit.src_ip,
            };
            return self.io.try_io(Interest::WRITABLE, || {
                self.state.send((&*self.io).into(), &out)
            });
        }
        let header = fwd::header(route);
        let seg = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        // The kernel takes at most one IP datagram's worth (64 KiB) per GSO send; with large
        // segments (a path MTU above 1500, as on loopback) quinn's batch can exceed that.
        let per_send = (MAX_GSO_BYTES / (seg + HEADER_LEN)).max(1) * seg;
        SCRATCH.with(|scratch| {
            let mut framed = scratch.borrow_mut();
            for group in transmit.contents.chunks(per_send) {
                framed.clear();
                for chunk in group.chunks(seg) {
                    framed.extend_from_slice(&header);
                    framed.extend_from_slice(chunk);
                }
                // Over a TLS/TCP link to this relay when there is one (UDP blocked).
                if self.links.send(relay, &framed, seg + HEADER_LEN) {
                    continue;
                }
                let out = Transmit {
                    destination: self.present(relay),
                    ecn: transmit.ecn,
                    contents: &framed,
                    segment_size: (group.len() > seg).then_some(seg + HEADER_LEN),
                    src_ip: transmit.src_ip,
                };
                self.io.try_io(Interest::WRITABLE, || {
                    self.state.send((&*self.io).into(), &out)
                })?;
            }
            Ok(())
        })
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        if self.has_pending() {
            let n = self.deliver_pending(bufs, meta);
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
        }
        // Links and UDP take turns going first, so a busy one cannot starve the other (a node
        // may reach one relay over TCP and another over UDP).
        let links_first = self.links_turn.fetch_xor(true, Relaxed);
        if links_first {
            let n = self.poll_links(cx, bufs, meta);
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
        }
        loop {
            match self.io.poll_recv_ready(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let n = match self.io.try_io(Interest::READABLE, || {
                self.state.recv((&*self.io).into(), bufs, meta)
            }) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            };
            for (m, buf) in meta.iter_mut().zip(bufs.iter_mut()).take(n) {
                match fwd::classify(&buf[..m.len]) {
                    DatagramKind::Quic => self.map_direct_in(m),
                    DatagramKind::Forward => {
                        if self.relayed_probe(buf, m) {
                            m.len = 0;
                        } else {
                            self.unwrap_batch(&mut buf[..], m);
                        }
                    }
                    DatagramKind::Unknown if direct::is_probe(&buf[..m.len]) => {
                        // GRO may have joined several probes from one source.
                        let stride = if m.stride == 0 { m.len } else { m.stride };
                        for probe in buf[..m.len].chunks(stride.max(1)) {
                            self.on_probe(m.addr, probe);
                        }
                        m.len = 0;
                    }
                    DatagramKind::Unknown => {
                        self.stats.dropped_malformed.fetch_add(1, Relaxed);
                        m.len = 0;
                    }
                }
            }
            return Poll::Ready(Ok(n));
        }
        if !links_first {
            let n = self.poll_links(cx, bufs, meta);
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
        }
        Poll::Pending
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A quinn batch bigger than one GSO send (10 segments of 16 KiB) must reach the relay
    /// whole: every segment as its own frame, with the route's header, in order.
    #[tokio::test]
    async fn big_batches_are_split_into_sends_the_kernel_takes() {
        let relay = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind relay");
        relay
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let relay_addr = relay.local_addr().expect("addr");
        let node = NodeSocket::bind_for(relay_addr).expect("bind node");
        let virt = node.add_route(RouteId(42), relay_addr);

        let seg = 16_375usize;
        let segments = 10usize;
        let contents: Vec<u8> = (0..seg * segments)
            .map(|i| (i / seg) as u8 ^ i as u8)
            .collect();
        let transmit = Transmit {
            destination: virt,
            ecn: None,
            contents: &contents,
            segment_size: Some(seg),
            src_ip: None,
        };
        // The socket is fresh and the batch small next to its buffer; once tokio has seen it
        // writable, WouldBlock would be a bug.
        node.io.writable().await.expect("writable");
        node.try_send(&transmit).expect("send");

        let mut buf = vec![0u8; 65_536];
        for i in 0..segments {
            let n = relay.recv(&mut buf).expect("segment arrives");
            let (route, payload) = fwd::parse(&buf[..n]).expect("a forwarding frame");
            assert_eq!(route, RouteId(42));
            assert_eq!(payload, &contents[i * seg..(i + 1) * seg], "segment {i}");
        }
    }
}
