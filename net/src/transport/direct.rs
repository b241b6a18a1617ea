//! The direct path: after the relay has put two nodes in touch, their end-to-end connection
//! moves to a direct UDP path between them when their NATs allow it, and back to the relay
//! when that path goes quiet.
//!
//! - **Candidates.** The relay sees each node's control connection come from the node's public
//!   (reflexive) address; at route set-up it tells each side the other's
//!   ([`Ctl::PeerCandidates`](postern_proto::msg::Ctl::PeerCandidates)). Probes go to those
//!   addresses only (at most [`MAX_CANDIDATES`]), a bounded number per round. A node on the
//!   TLS/TCP fallback has no reflexive UDP address: the relay announces its link's public IP
//!   with the port of its UDP socket (from its local candidates), where a NAT that keeps
//!   source ports maps its UDP; it probes from its UDP socket like any node, and the outlet
//!   answers (and maps) whatever address a verified probe comes from.
//! - **Probes.** Both sides send small authenticated datagrams ([`PROBE_LEN`] bytes, first byte
//!   [`PROBE_TAG`], which is neither QUIC nor a forwarding frame) from the node's one UDP socket,
//!   so the NAT mapping is the one the relay already sees. Each carries a sender role, a path id,
//!   a sequence number and an HMAC-SHA256 under a key exported from the end-to-end TLS session
//!   (RFC 5705 exporter, context: the route id): the relay never has it, so it can neither forge
//!   probes nor make a node probe anybody but its peer's announced addresses. A probe is
//!   answered by an ack echoing its sequence number; a probe must carry a higher sequence
//!   number than any taken before on its path (replays are refused), an ack must match a
//!   probe still outstanding.
//! - **Who decides.** The inlet (the QUIC client) drives: it starts a round by sending probes
//!   through the relay (wake-ups: the outlet then probes the inlet's candidates, opening its
//!   own NAT; five in the first 400 ms, since the outlet's side may not be ready for the
//!   first, then one a second) and probes the outlet's candidates directly. The first
//!   ack proves both directions; the inlet then sends the connection's packets, still addressed
//!   to the same virtual peer address, straight to the address the ack came from. The outlet
//!   maps direct packets from a verified address to a second virtual address of the route, so
//!   its quinn sees a peer migration and validates the new path (QUIC path validation) before
//!   answering there; streams carry on.
//! - **Falling back.** When no packet has come over the direct path for [`QUIET_AFTER`] (QUIC
//!   keep-alives cross it every 2 s, which also holds the NAT mappings), the inlet sends through
//!   the relay again, and the outlet's quinn migrates back. The inlet retries direct later,
//!   with a growing back-off.
//! - **Telling the relay.** The inlet reports each move on its control connection
//!   ([`report_path`]), so that the relay's status and admin API show which routes run direct.

use postern_proto::fwd::RouteId;
use ring::hmac;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// First byte of a probe datagram (below `0x40`: not QUIC; not the forwarding frame's tag).
pub const PROBE_TAG: u8 = 0x02;
/// Bytes of a probe or an ack: tag, kind, role, path id, sequence number, HMAC-SHA256.
pub const PROBE_LEN: usize = 3 + 8 + 8 + 32;
/// Most candidate addresses taken for one peer.
pub const MAX_CANDIDATES: usize = 4;
/// Probes the outlet sends to each candidate in one round, [`PROBE_EVERY`] apart.
pub const ROUND_PROBES: u32 = 15;
/// Spacing of a round's probes (the inlet's after its first [`FAST_STEPS_MS`]).
pub const PROBE_EVERY: Duration = Duration::from_millis(200);
/// When the inlet's first probes of a round go out (ms from its start), each with a wake-up
/// through the relay. A route's outlet side may not be ready for the first wake-up (it
/// registers the path once it has accepted the end-to-end connection, and probes once the
/// relay's candidates arrived): waking it again within tens of milliseconds, rather than a
/// second later, is what makes most routes go direct within a few hundred milliseconds.
/// Bounded: five wake-ups in the first 400 ms, then one a second ([`round_steps`]).
pub const FAST_STEPS_MS: [u64; 5] = [0, 50, 100, 200, 400];
/// Length of one of the inlet's rounds.
pub const ROUND_LEN: Duration = Duration::from_secs(3);
/// How long after the last packet from the direct path the inlet goes back to the relay. QUIC
/// keep-alives (every 2 s) and their acks keep a live path busier than this; it is short of
/// the end-to-end idle timeout (10 s) so that the connection survives the move back.
pub const QUIET_AFTER: Duration = Duration::from_millis(3500);
/// First wait before retrying direct after a failed round or a fall-back; doubles up to
/// [`RETRY_MAX`].
pub const RETRY_FIRST: Duration = Duration::from_secs(5);
/// Longest wait between direct attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(300);
/// The outlet answers a wake-up with a round of its own at most this often per path.
const OUTLET_ROUND_GAP: Duration = Duration::from_secs(1);
/// Routes whose candidates wait for their path key (bounded: entries beyond are dropped).
const MAX_PENDING_CANDIDATES: usize = 4096;
/// Probes of ours awaiting an ack, per path.
const MAX_OUTSTANDING: usize = 256;
/// RFC 5705 exporter label of the probe key.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-postern-direct-path-v1";

const KIND_PROBE: u8 = 1;
const KIND_ACK: u8 = 2;

/// Whether a node (or an outlet's service) may move connections off the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirectMode {
    /// Try the direct path after every route set-up; the relay stays the fallback.
    #[default]
    Auto,
    /// Everything goes through the relay; probes are neither sent nor answered.
    Never,
}

impl std::str::FromStr for DirectMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "never" => Ok(Self::Never),
            other => Err(format!(
                "unknown direct mode {other:?} (expected auto or never)"
            )),
        }
    }
}

/// Which end of the route a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Inlet = 0,
    Outlet = 1,
}

impl Role {
    fn peer(self) -> Self {
        match self {
            Self::Inlet => Self::Outlet,
            Self::Outlet => Self::Inlet,
        }
    }
}

/// The probe key of one end-to-end connection, and the path id derived from it.
pub struct PathKey {
    key: hmac::Key,
    id: [u8; 8],
}

impl std::fmt::Debug for PathKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PathKey(..)")
    }
}

impl PathKey {
    /// The key both ends of `conn` derive for `route` (None if the TLS session cannot export).
    pub fn from_connection(conn: &quinn::Connection, route: RouteId) -> Option<Self> {
        let mut secret = [0u8; 32];
        conn.export_keying_material(&mut secret, EXPORTER_LABEL, &route.0.to_be_bytes())
            .ok()?;
        let key = Self::from_secret(&secret);
        secret.fill(0);
        Some(key)
    }

    fn from_secret(secret: &[u8]) -> Self {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let tag = hmac::sign(&key, b"postern direct path id");
        let mut id = [0u8; 8];
        id.copy_from_slice(&tag.as_ref()[..8]);
        Self { key, id }
    }

    fn seal(&self, kind: u8, role: Role, seq: u64) -> [u8; PROBE_LEN] {
        let mut out = [0u8; PROBE_LEN];
        out[0] = PROBE_TAG;
        out[1] = kind;
        out[2] = role as u8;
        out[3..11].copy_from_slice(&self.id);
        out[11..19].copy_from_slice(&seq.to_be_bytes());
        let tag = hmac::sign(&self.key, &out[..19]);
        out[19..].copy_from_slice(tag.as_ref());
        out
    }

    fn verify(&self, datagram: &[u8]) -> bool {
        datagram.len() == PROBE_LEN
            && hmac::verify(&self.key, &datagram[..19], &datagram[19..]).is_ok()
    }
}

/// Whether a datagram is (shaped like) a probe.
pub fn is_probe(datagram: &[u8]) -> bool {
    datagram.first() == Some(&PROBE_TAG)
}

/// The newest sequence number taken from the peer on one path: only a higher one is taken
/// next. Stricter than a sliding window (a probe overtaken by a later one is refused, which
/// costs nothing: probes are repeated), and it refuses every copy of a probe sent before the
/// last one taken, including one that never arrived the first time (captured on the way and
/// sent later from elsewhere).
#[derive(Debug, Default)]
struct ReplayWindow {
    highest: u64,
}

impl ReplayWindow {
    fn accept(&mut self, seq: u64) -> bool {
        if seq <= self.highest {
            return false;
        }
        self.highest = seq;
        true
    }
}

/// Counters of the direct path (rendered by [`DirectStats::render`]).
#[derive(Debug, Default)]
pub struct DirectStats {
    pub probes_sent: AtomicU64,
    pub probes_received: AtomicU64,
    /// Probes for a path this node does not know (a forger guessing, or a path already gone).
    pub refused_unknown: AtomicU64,
    /// Probes whose HMAC or role is wrong: forged.
    pub refused_forged: AtomicU64,
    /// Authentic probes or acks seen before: replayed.
    pub refused_replayed: AtomicU64,
    pub traversals_ok: AtomicU64,
    pub traversals_failed: AtomicU64,
    pub moves_to_direct: AtomicU64,
    pub moves_to_relay: AtomicU64,
}

impl DirectStats {
    /// Writes the counters as `<prefix>_direct_*` metrics.
    pub fn render(
        &self,
        out: &mut crate::runtime::ops::Exposition,
        prefix: &str,
        paths: (usize, usize),
    ) {
        let c = |n: &AtomicU64| n.load(Relaxed);
        let name = |s: &str| format!("{prefix}_{s}");
        let by_path = name("routes_by_path");
        out.family(
            &by_path,
            "End-to-end routes by the path their packets take now (direct or relayed).",
            crate::runtime::ops::Kind::Gauge,
        );
        out.sample(&by_path, &[("path", "direct")], paths.0 as f64);
        out.sample(&by_path, &[("path", "relayed")], paths.1 as f64);
        let traversals = name("direct_traversals_total");
        out.family(
            &traversals,
            "Hole-punching rounds, by outcome (ok: an ack came back; failed: none did).",
            crate::runtime::ops::Kind::Counter,
        );
        out.sample(
            &traversals,
            &[("outcome", "ok")],
            c(&self.traversals_ok) as f64,
        );
        out.sample(
            &traversals,
            &[("outcome", "failed")],
            c(&self.traversals_failed) as f64,
        );
        let moves = name("path_moves_total");
        out.family(
            &moves,
            "End-to-end routes moved between paths, by the path moved to.",
            crate::runtime::ops::Kind::Counter,
        );
        out.sample(&moves, &[("to", "direct")], c(&self.moves_to_direct) as f64);
        out.sample(&moves, &[("to", "relayed")], c(&self.moves_to_relay) as f64);
        let refused = name("direct_probes_refused_total");
        out.family(
            &refused,
            "Probes ignored, by reason (unknown path, forged: bad HMAC or role, replayed).",
            crate::runtime::ops::Kind::Counter,
        );
        out.sample(
            &refused,
            &[("reason", "unknown")],
            c(&self.refused_unknown) as f64,
        );
        out.sample(
            &refused,
            &[("reason", "forged")],
            c(&self.refused_forged) as f64,
        );
        out.sample(
            &refused,
            &[("reason", "replayed")],
            c(&self.refused_replayed) as f64,
        );
        out.counter(
            &name("direct_probes_sent_total"),
            "Direct-path probes and acks sent.",
            c(&self.probes_sent),
        );
        out.counter(
            &name("direct_probes_received_total"),
            "Authentic direct-path probes and acks received.",
            c(&self.probes_received),
        );
    }
}

/// What the socket should do after a probe was checked.
#[derive(Debug, PartialEq, Eq)]
pub enum ProbeAction {
    /// Nothing (refused and counted, or an ack already handled).
    Drop,
    /// Send this ack back to the probe's source. `map` is set on the outlet for a probe that
    /// came directly: the route whose direct packets from that source are accepted from now on.
    Reply {
        ack: [u8; PROBE_LEN],
        map: Option<RouteId>,
    },
}

struct PathEntry {
    route: RouteId,
    role: Role,
    key: PathKey,
    next_seq: u64,
    window: ReplayWindow,
    outstanding: VecDeque<u64>,
    /// Inlet: the address of the first ack of the current round.
    acked: watch::Sender<Option<SocketAddr>>,
    /// Outlet: a wake-up came through the relay; run a round.
    wake: std::sync::Arc<Notify>,
    last_round: Option<Instant>,
}

/// The direct-path state of one node socket: path keys, candidates, counters.
#[derive(Default)]
pub struct DirectTable {
    paths: Mutex<HashMap<[u8; 8], PathEntry>>,
    candidates: Mutex<HashMap<RouteId, Vec<SocketAddr>>>,
    candidates_changed: Notify,
    stats: DirectStats,
}

impl std::fmt::Debug for DirectTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectTable").finish_non_exhaustive()
    }
}

/// A path registered with [`DirectTable::register`].
#[derive(Debug)]
pub struct PathHandle {
    pub id: [u8; 8],
    pub acked: watch::Receiver<Option<SocketAddr>>,
    pub wake: std::sync::Arc<Notify>,
}

impl DirectTable {
    fn paths(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 8], PathEntry>> {
        self.paths.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cands(&self) -> std::sync::MutexGuard<'_, HashMap<RouteId, Vec<SocketAddr>>> {
        self.candidates.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counters.
    pub fn stats(&self) -> &DirectStats {
        &self.stats
    }

    /// Records the peer's candidate addresses for `route`, as the relay announced them
    /// (at most [`MAX_CANDIDATES`]).
    pub fn set_candidates(&self, route: RouteId, mut addrs: Vec<SocketAddr>) {
        addrs.truncate(MAX_CANDIDATES);
        let addrs: Vec<SocketAddr> = addrs
            .into_iter()
            .map(crate::transport::udp::canonical)
            .collect();
        {
            let mut c = self.cands();
            if c.len() >= MAX_PENDING_CANDIDATES && !c.contains_key(&route) {
                return;
            }
            c.insert(route, addrs);
        }
        self.candidates_changed.notify_waiters();
    }

    /// The peer's candidates for `route`.
    pub fn candidates(&self, route: RouteId) -> Vec<SocketAddr> {
        self.cands().get(&route).cloned().unwrap_or_default()
    }

    /// Waits up to `wait` for the relay to announce `route`'s candidates.
    pub async fn wait_candidates(&self, route: RouteId, wait: Duration) -> Vec<SocketAddr> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.candidates_changed.notified();
            let c = self.candidates(route);
            if !c.is_empty() {
                return c;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Vec::new();
            }
        }
    }

    /// Starts accepting and sending probes for `route` under `key`, as `role`.
    pub fn register(&self, route: RouteId, role: Role, key: PathKey) -> PathHandle {
        let id = key.id;
        let (acked, rx) = watch::channel(None);
        let wake = std::sync::Arc::new(Notify::new());
        self.paths().insert(
            id,
            PathEntry {
                route,
                role,
                key,
                next_seq: 1,
                window: ReplayWindow::default(),
                outstanding: VecDeque::new(),
                acked,
                wake: wake.clone(),
                last_round: None,
            },
        );
        PathHandle {
            id,
            acked: rx,
            wake,
        }
    }

    /// Forgets everything about `route` (it is gone).
    pub fn forget(&self, route: RouteId) {
        self.paths().retain(|_, p| p.route != route);
        self.cands().remove(&route);
    }

    /// Whether the path `id` is still registered.
    pub fn is_registered(&self, id: &[u8; 8]) -> bool {
        self.paths().contains_key(id)
    }

    /// A fresh probe on path `id`, remembered as outstanding; None if the path is gone.
    pub fn new_probe(&self, id: &[u8; 8]) -> Option<[u8; PROBE_LEN]> {
        let mut paths = self.paths();
        let p = paths.get_mut(id)?;
        let seq = p.next_seq;
        p.next_seq += 1;
        if p.outstanding.len() >= MAX_OUTSTANDING {
            p.outstanding.pop_front();
        }
        p.outstanding.push_back(seq);
        self.stats.probes_sent.fetch_add(1, Relaxed);
        Some(p.key.seal(KIND_PROBE, p.role, seq))
    }

    /// Forgets the outstanding probes of path `id` (a new round starts; late acks of the last
    /// round still count until then) and clears its ack.
    pub fn new_round(&self, id: &[u8; 8]) {
        if let Some(p) = self.paths().get_mut(id) {
            p.acked.send_replace(None);
        }
    }

    /// Whether the outlet's side of path `id` should run a round now (rate-limited).
    pub fn outlet_round_due(&self, id: &[u8; 8]) -> bool {
        let mut paths = self.paths();
        let Some(p) = paths.get_mut(id) else {
            return false;
        };
        let now = Instant::now();
        if p.last_round
            .is_some_and(|t| now.duration_since(t) < OUTLET_ROUND_GAP)
        {
            return false;
        }
        p.last_round = Some(now);
        true
    }

    /// Checks a probe or ack that came from `src` (directly, or through the relay when
    /// `via_relay`) and says what to do.
    pub fn on_datagram(&self, src: SocketAddr, datagram: &[u8], via_relay: bool) -> ProbeAction {
        if datagram.len() != PROBE_LEN || datagram[0] != PROBE_TAG {
            self.stats.refused_forged.fetch_add(1, Relaxed);
            return ProbeAction::Drop;
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&datagram[3..11]);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&datagram[11..19]);
        let seq = u64::from_be_bytes(seq);
        let mut paths = self.paths();
        let Some(p) = paths.get_mut(&id) else {
            self.stats.refused_unknown.fetch_add(1, Relaxed);
            return ProbeAction::Drop;
        };
        if !p.key.verify(datagram) || datagram[2] != p.role.peer() as u8 {
            self.stats.refused_forged.fetch_add(1, Relaxed);
            return ProbeAction::Drop;
        }
        match datagram[1] {
            KIND_PROBE => {
                if !p.window.accept(seq) {
                    self.stats.refused_replayed.fetch_add(1, Relaxed);
                    return ProbeAction::Drop;
                }
                self.stats.probes_received.fetch_add(1, Relaxed);
                if via_relay {
                    // A wake-up: the peer is probing now; punch our side of the NAT.
                    if p.role == Role::Outlet {
                        p.wake.notify_one();
                    }
                    return ProbeAction::Drop;
                }
                let map = (p.role == Role::Outlet).then_some(p.route);
                self.stats.probes_sent.fetch_add(1, Relaxed);
                ProbeAction::Reply {
                    ack: p.key.seal(KIND_ACK, p.role, seq),
                    map,
                }
            }
            KIND_ACK => {
                let Some(at) = p.outstanding.iter().position(|s| *s == seq) else {
                    self.stats.refused_replayed.fetch_add(1, Relaxed);
                    return ProbeAction::Drop;
                };
                p.outstanding.remove(at);
                self.stats.probes_received.fetch_add(1, Relaxed);
                if !via_relay && p.acked.borrow().is_none() {
                    p.acked.send_replace(Some(src));
                }
                ProbeAction::Drop
            }
            _ => {
                self.stats.refused_forged.fetch_add(1, Relaxed);
                ProbeAction::Drop
            }
        }
    }
}

/// How long the inlet waits for the relay to announce the outlet's candidates.
const CANDIDATES_WAIT: Duration = Duration::from_secs(5);
/// How often the inlet looks whether the direct path went quiet.
const QUIET_CHECK: Duration = Duration::from_millis(250);
/// A direct period this long resets the retry back-off.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// The inlet's side of one route's direct path, run for as long as the route lives: rounds
/// of probes, the move to the first address that acks, the move back when it goes quiet, and
/// retries with back-off. `virt` is the address the inlet's connections are made to; `path`
/// says whether they run direct now (for [`report_path`]).
pub async fn run_inlet(
    socket: std::sync::Arc<crate::transport::node_socket::NodeSocket>,
    route: RouteId,
    virt: SocketAddr,
    key: PathKey,
    path: watch::Sender<bool>,
) {
    let mut handle = socket.direct().register(route, Role::Inlet, key);
    let id = handle.id;
    let alive = move |s: &crate::transport::node_socket::NodeSocket| {
        s.route_of(virt) == Some(route) && s.direct().is_registered(&id)
    };
    let candidates = socket
        .direct()
        .wait_candidates(route, CANDIDATES_WAIT)
        .await;
    if candidates.is_empty() {
        tracing::debug!(route = %route.short(), "the relay announced no candidates for the outlet; staying relayed");
        return;
    }
    let stats = socket.direct().stats();
    let mut attempt = 0u32;
    loop {
        if !alive(&socket) {
            return;
        }
        socket.direct().new_round(&handle.id);
        let _ = handle.acked.borrow_and_update();
        let start = tokio::time::Instant::now();
        let mut found = None;
        for (at, wake) in round_steps() {
            match ack_by(&mut handle.acked, start + at).await {
                None => return,
                Some(Some(addr)) => {
                    found = Some(addr);
                    break;
                }
                Some(None) => {}
            }
            if wake {
                // Through the relay: wakes the outlet, which then probes us (opening its NAT).
                if let Some(p) = socket.direct().new_probe(&handle.id) {
                    socket.send_probe_relayed(route, &p);
                }
            }
            for c in &candidates {
                if let Some(p) = socket.direct().new_probe(&handle.id) {
                    socket.send_probe(*c, &p);
                }
            }
        }
        if found.is_none() {
            match ack_by(&mut handle.acked, start + ROUND_LEN).await {
                None => return,
                Some(addr) => found = addr,
            }
        }
        let Some(peer) = found else {
            stats.traversals_failed.fetch_add(1, Relaxed);
            let wait = retry_delay(attempt);
            attempt += 1;
            tracing::info!(?candidates, retry_in = ?wait, "no direct path to the outlet (no probe answered); staying on the relay");
            if !sleep_alive(&socket, &alive, wait).await {
                return;
            }
            continue;
        };
        stats.traversals_ok.fetch_add(1, Relaxed);
        if !socket.go_direct(virt, peer) {
            return;
        }
        stats.moves_to_direct.fetch_add(1, Relaxed);
        path.send_replace(true);
        tracing::info!(%peer, "end-to-end connection went direct (the relay is the fallback)");
        let since = Instant::now();
        loop {
            tokio::time::sleep(QUIET_CHECK).await;
            if !alive(&socket) {
                return;
            }
            match socket.direct_quiet_for(peer) {
                Some(q) if q < QUIET_AFTER => continue,
                _ => break,
            }
        }
        socket.go_relayed(virt);
        stats.moves_to_relay.fetch_add(1, Relaxed);
        path.send_replace(false);
        if since.elapsed() >= STABLE_AFTER {
            attempt = 0;
        }
        let wait = retry_delay(attempt);
        attempt += 1;
        tracing::warn!(%peer, quiet_for = ?QUIET_AFTER, retry_in = ?wait, "direct path went quiet; the end-to-end connection is back on the relay");
        if !sleep_alive(&socket, &alive, wait).await {
            return;
        }
    }
}

/// How long the relay gets to acknowledge a path report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Tells the relay of `route` (over its control connection, `control`) each change of the
/// route's path that [`run_inlet`] makes, in order, until `path` is dropped (the route is
/// gone): the relay cannot see the end-to-end traffic, and its status and admin API show
/// which routes run direct from these reports. A report that cannot be delivered (the control
/// connection is down, or an older relay refuses the message) is dropped: the next change is
/// reported again.
pub async fn report_path(
    control: crate::uplink::ControlWatch,
    route: RouteId,
    mut path: watch::Receiver<bool>,
) {
    while path.changed().await.is_ok() {
        let direct = *path.borrow_and_update();
        let conn = control
            .borrow()
            .clone()
            .filter(|c| c.close_reason().is_none());
        let Some(conn) = conn else {
            tracing::debug!(route = %route.short(), direct, "no control connection to report the route's path on");
            continue;
        };
        let msg = postern_proto::msg::Ctl::RoutePath { route, direct };
        match crate::control::exchange::request(&conn, &msg, REPORT_TIMEOUT).await {
            Ok(postern_proto::msg::Ctl::Ack) => {}
            Ok(other) => {
                tracing::debug!(answer = ?std::mem::discriminant(&other), "the relay did not take the path report");
            }
            Err(e) => tracing::debug!(error = %e, "could not report the route's path to the relay"),
        }
    }
}

/// The addresses `socket` (bound to `bound`) has on the node's own network, for
/// [`Ctl::LocalCandidates`](postern_proto::msg::Ctl::LocalCandidates): the address of the
/// interface the node reaches `relay` through (the one behind the same NAT as any peer at the
/// same site), with the socket's port. Loopback only when the relay is on loopback too; none
/// when the system cannot say (no route).
pub fn local_candidates(bound: SocketAddr, relay: SocketAddr) -> Vec<SocketAddr> {
    let ip = if bound.ip().is_unspecified() {
        let any: SocketAddr = match relay {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        // Connecting a UDP socket sends nothing: it asks the kernel for the route's source.
        let probe = std::net::UdpSocket::bind(any).and_then(|s| {
            s.connect(relay)?;
            s.local_addr()
        });
        match probe {
            Ok(a) => a.ip(),
            Err(_) => return Vec::new(),
        }
    } else {
        bound.ip()
    };
    if ip.is_unspecified() || (ip.is_loopback() && !relay.ip().is_loopback()) {
        return Vec::new();
    }
    vec![crate::transport::udp::canonical(SocketAddr::new(
        ip,
        bound.port(),
    ))]
}

/// When the inlet's probes of one round go out (from its start), and whether each carries a
/// wake-up through the relay: the [`FAST_STEPS_MS`], each with a wake-up, then every
/// [`PROBE_EVERY`] until [`ROUND_LEN`], with a wake-up once a second.
pub fn round_steps() -> Vec<(Duration, bool)> {
    let mut steps: Vec<(Duration, bool)> = FAST_STEPS_MS
        .iter()
        .map(|ms| (Duration::from_millis(*ms), true))
        .collect();
    let mut at = Duration::from_millis(FAST_STEPS_MS[FAST_STEPS_MS.len() - 1]) + PROBE_EVERY;
    while at < ROUND_LEN {
        steps.push((at, at.as_millis().is_multiple_of(1000)));
        at += PROBE_EVERY;
    }
    steps
}

/// Waits until `deadline` for the round's first ack: `Some(Some(addr))` when one came from
/// `addr`, `Some(None)` when none came in time, `None` when the path is gone.
async fn ack_by(
    acked: &mut watch::Receiver<Option<SocketAddr>>,
    deadline: tokio::time::Instant,
) -> Option<Option<SocketAddr>> {
    loop {
        if let Some(addr) = *acked.borrow_and_update() {
            return Some(Some(addr));
        }
        tokio::select! {
            r = acked.changed() => r.ok()?,
            _ = tokio::time::sleep_until(deadline) => return Some(None),
        }
    }
}

/// Sleeps `wait` in short steps; false as soon as `alive` says the route is gone.
async fn sleep_alive(
    socket: &crate::transport::node_socket::NodeSocket,
    alive: &impl Fn(&crate::transport::node_socket::NodeSocket) -> bool,
    wait: Duration,
) -> bool {
    let end = Instant::now() + wait;
    while Instant::now() < end {
        tokio::time::sleep((end - Instant::now()).min(Duration::from_secs(1))).await;
        if !alive(socket) {
            return false;
        }
    }
    true
}

/// The outlet's side of one route's direct path: answers the inlet's probes (the socket does
/// that) and, when the inlet's wake-up comes through the relay, probes the inlet's candidates
/// for one round, which opens the outlet's NAT towards them. Ends when the route is gone.
pub fn start_outlet(
    socket: std::sync::Arc<crate::transport::node_socket::NodeSocket>,
    route: RouteId,
    key: PathKey,
) {
    let handle = socket.direct().register(route, Role::Outlet, key);
    tokio::spawn(async move {
        loop {
            let woken = tokio::time::timeout(Duration::from_secs(5), handle.wake.notified()).await;
            if !socket.direct().is_registered(&handle.id) {
                return;
            }
            if woken.is_err() || !socket.direct().outlet_round_due(&handle.id) {
                continue;
            }
            // A wake-up can come before the relay's candidates: wait for them rather than
            // spend the round (and its rate limit) probing nobody.
            let candidates = socket
                .direct()
                .wait_candidates(route, OUTLET_ROUND_GAP)
                .await;
            for _ in 0..ROUND_PROBES {
                for c in &candidates {
                    if let Some(p) = socket.direct().new_probe(&handle.id) {
                        socket.send_probe(*c, &p);
                    }
                }
                tokio::time::sleep(PROBE_EVERY).await;
                if !socket.direct().is_registered(&handle.id) {
                    return;
                }
            }
        }
    });
}

/// The wait before direct attempt number `attempt` (0-based) after the first.
pub fn retry_delay(attempt: u32) -> Duration {
    RETRY_FIRST
        .saturating_mul(1u32 << attempt.min(16))
        .min(RETRY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (DirectTable, DirectTable, [u8; 8], [u8; 8]) {
        let (inlet, outlet) = (DirectTable::default(), DirectTable::default());
        let secret = [7u8; 32];
        let a = inlet.register(RouteId(1), Role::Inlet, PathKey::from_secret(&secret));
        let b = outlet.register(RouteId(1), Role::Outlet, PathKey::from_secret(&secret));
        assert_eq!(a.id, b.id, "both ends derive the same path id");
        (inlet, outlet, a.id, b.id)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    /// A probe from the inlet is acked by the outlet, which maps the source; the ack makes the
    /// inlet's round succeed with the outlet's address.
    #[test]
    fn a_probe_and_its_ack_prove_the_path() {
        let (inlet, outlet, id, _) = pair();
        let probe = inlet.new_probe(&id).expect("probe");
        let ProbeAction::Reply { ack, map } =
            outlet.on_datagram(addr("192.0.2.1:5"), &probe, false)
        else {
            panic!("the outlet answers an authentic probe");
        };
        assert_eq!(map, Some(RouteId(1)));
        let inlet_handle_ack = inlet.on_datagram(addr("198.51.100.2:7"), &ack, false);
        assert_eq!(inlet_handle_ack, ProbeAction::Drop);
        let acked = inlet.paths().get(&id).map(|p| *p.acked.borrow());
        assert_eq!(acked, Some(Some(addr("198.51.100.2:7"))));
        // The same ack again is a replay.
        inlet.on_datagram(addr("198.51.100.2:7"), &ack, false);
        assert_eq!(inlet.stats().refused_replayed.load(Relaxed), 1);
    }

    #[test]
    fn forged_replayed_and_reflected_probes_are_refused_and_counted() {
        let (inlet, outlet, id, _) = pair();
        let probe = inlet.new_probe(&id).expect("probe");
        let from = addr("192.0.2.1:5");
        assert!(matches!(
            outlet.on_datagram(from, &probe, false),
            ProbeAction::Reply { .. }
        ));
        // Replayed from anywhere: refused.
        assert_eq!(
            outlet.on_datagram(addr("203.0.113.9:1"), &probe, false),
            ProbeAction::Drop
        );
        assert_eq!(outlet.stats().refused_replayed.load(Relaxed), 1);
        // One bit of the HMAC changed: forged.
        let mut bad = inlet.new_probe(&id).expect("probe");
        bad[PROBE_LEN - 1] ^= 1;
        assert_eq!(outlet.on_datagram(from, &bad, false), ProbeAction::Drop);
        // A probe under another key (the relay's guess, say): unknown path.
        let other = PathKey::from_secret(&[9u8; 32]).seal(KIND_PROBE, Role::Inlet, 5);
        assert_eq!(outlet.on_datagram(from, &other, false), ProbeAction::Drop);
        // The outlet's own probe reflected back at it: wrong role.
        let mine = outlet.new_probe(&id).expect("probe");
        assert_eq!(outlet.on_datagram(from, &mine, false), ProbeAction::Drop);
        assert_eq!(outlet.stats().refused_forged.load(Relaxed), 2);
        assert_eq!(outlet.stats().refused_unknown.load(Relaxed), 1);
        // Truncated garbage with the tag.
        assert_eq!(
            outlet.on_datagram(from, &[PROBE_TAG, 1], false),
            ProbeAction::Drop
        );
        assert_eq!(outlet.stats().refused_forged.load(Relaxed), 3);
    }

    #[test]
    fn a_probe_through_the_relay_wakes_the_outlet_and_maps_nothing() {
        let (inlet, outlet, id, _) = pair();
        let handle_wake = outlet
            .paths()
            .get(&id)
            .map(|p| p.wake.clone())
            .expect("path");
        let probe = inlet.new_probe(&id).expect("probe");
        assert_eq!(
            outlet.on_datagram(addr("192.0.2.1:5"), &probe, true),
            ProbeAction::Drop
        );
        // The wake-up is stored as a permit: a waiter sees it at once.
        let notified = handle_wake.notified();
        tokio::pin!(notified);
        assert!(futures_poll_once(notified.as_mut()));
    }

    fn futures_poll_once(f: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        std::future::Future::poll(f, &mut cx).is_ready()
    }

    #[test]
    fn only_a_newer_sequence_number_is_taken() {
        let mut w = ReplayWindow::default();
        assert!(!w.accept(0));
        assert!(w.accept(5));
        assert!(!w.accept(5));
        assert!(!w.accept(3), "older than one taken");
        assert!(w.accept(100));
        assert!(!w.accept(99));
    }

    /// A round starts with quick probes, each waking the outlet, then slows to one probe per
    /// interval and one wake-up a second; it ends within the round.
    #[test]
    fn a_round_wakes_the_outlet_often_at_first_then_once_a_second() {
        let steps = round_steps();
        let ms: Vec<u64> = steps.iter().map(|(d, _)| d.as_millis() as u64).collect();
        assert_eq!(ms[..FAST_STEPS_MS.len()], FAST_STEPS_MS);
        assert!(ms.windows(2).all(|w| w[0] < w[1]), "in order: {ms:?}");
        assert!(steps.iter().all(|(d, _)| *d < ROUND_LEN));
        let wakes: Vec<u64> = steps
            .iter()
            .filter(|(_, w)| *w)
            .map(|(d, _)| d.as_millis() as u64)
            .collect();
        assert_eq!(wakes, vec![0, 50, 100, 200, 400, 1000, 2000]);
        assert_eq!(
            ms[FAST_STEPS_MS.len()..],
            [600, 800, 1000, 1200, 1400, 1600, 1800, 2000, 2200, 2400, 2600, 2800],
            "one probe per interval after the fast steps"
        );
    }

    /// The address towards the relay, with the socket's port; loopback only towards a relay
    /// on loopback.
    #[test]
    fn local_candidates_are_the_address_towards_the_relay() {
        let relay = addr("127.0.0.1:4433");
        assert_eq!(
            local_candidates(addr("0.0.0.0:5000"), relay),
            vec![addr("127.0.0.1:5000")]
        );
        assert_eq!(
            local_candidates(addr("127.0.0.2:5000"), relay),
            vec![addr("127.0.0.2:5000")]
        );
        assert!(local_candidates(addr("127.0.0.1:5000"), addr("192.0.2.1:4433")).is_empty());
    }

    #[test]
    fn retries_back_off_to_a_ceiling() {
        assert_eq!(retry_delay(0), RETRY_FIRST);
        assert_eq!(retry_delay(1), RETRY_FIRST * 2);
        assert_eq!(retry_delay(40), RETRY_MAX);
        assert_eq!("never".parse::<DirectMode>(), Ok(DirectMode::Never));
        assert!("sometimes".parse::<DirectMode>().is_err());
    }
}
