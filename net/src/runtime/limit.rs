//! Connection caps and accept-error back-off for every TCP listener.
//!
//! Each connection holds one file descriptor, and a process that runs out of them can accept
//! no client, open no outgoing connection and re-create no socket: it stops serving everyone.
//! So every listener admits at most a fixed number of connections ([`ConnLimit`]), and the
//! default cap stays below the process's descriptor limit ([`default_cap`]), leaving room for
//! the QUIC socket, outgoing connections and new clients. Connections over the cap are closed
//! at once, so the ones already admitted keep working.
//!
//! A flood of idle connections would still fill the cap and lock legitimate clients out. On
//! listeners where the client speaks first (HTTP, TLS), a connection that has not sent a single
//! byte yet is *silent*; when the cap is full, a newcomer evicts the oldest silent connection
//! instead of being refused. A flood of connections that never speak then only ever evicts
//! itself, while a client that connects and sends its request is served.
//!
//! On the relay's public listeners a byte proves nothing (a connection can trickle a
//! ClientHello one byte at a time), so there a connection stays *pending* until the listener
//! says it is established ([`ConnLimit::admit_pending`], [`Slot::establish`]): a whole
//! ClientHello read, a node authenticated. Pending connections are evicted oldest first when
//! the cap is full, and each source address (an IPv4 address, an IPv6 /64) may hold at most a
//! few pending ones: its newcomer evicts its own oldest. A legit client's pending phase lasts a
//! round trip or two, so it gets in unless a cap's worth of junk arrives within that time;
//! junk only ever evicts junk, and one source cannot hold more than its share.
//!
//! When `accept` itself fails (`EMFILE`, `ENFILE`, `ENOBUFS`), the listener waits with a
//! growing delay ([`AcceptBackoff`]) and logs at most once per [`LOG_EVERY`], instead of
//! spinning or flooding the log.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Default cap on one listener's connections (lowered to fit the descriptor limit).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default cap on the pending connections of one source address (see
/// [`ConnLimit::admit_pending`]).
pub const DEFAULT_MAX_PENDING_PER_SOURCE: usize = 32;
/// Smallest cap [`default_cap`] returns, whatever the descriptor limit.
const MIN_CAP: usize = 16;
/// Least number of descriptors left for everything but one listener's clients.
const MIN_RESERVE: u64 = 64;
/// How often a repeated warning (cap reached, accept failing) is logged at most.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// The process's soft limit on open file descriptors (`RLIMIT_NOFILE`), read from
/// `/proc/self/limits`; `None` where that cannot be read or says `unlimited`.
pub fn fd_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_fd_limit(&text)
}

fn parse_fd_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The largest cap that leaves descriptors free under `fd_limit`: a quarter of the limit, at
/// least [`MIN_RESERVE`], is kept for the sockets, files and outgoing connections the process
/// needs besides one listener's clients, and for connections being evicted (see
/// [`ConnLimit::admit`]).
pub fn cap_for_fd_limit(fd_limit: u64) -> usize {
    let reserve = (fd_limit / 4).max(MIN_RESERVE);
    let room = fd_limit.saturating_sub(reserve);
    usize::try_from(room).unwrap_or(usize::MAX).max(MIN_CAP)
}

/// `wanted` (or [`DEFAULT_MAX_CONNECTIONS`]) lowered to fit this process's descriptor limit;
/// says so in the log when a configured value is lowered.
pub fn default_cap(wanted: Option<usize>) -> usize {
    let fit = fd_limit().map(cap_for_fd_limit).unwrap_or(usize::MAX);
    let cap = wanted.unwrap_or(DEFAULT_MAX_CONNECTIONS).max(1);
    if cap > fit {
        if wanted.is_some() {
            tracing::warn!(
                configured = cap,
                used = fit,
                fd_limit = ?fd_limit(),
                "max-connections is above what the open-file limit leaves room for; lowered \
                 (raise the limit with `ulimit -n` or LimitNOFILE= to allow more)"
            );
        }
        return fit;
    }
    cap
}

/// Lets one event through per interval and counts the ones held back, for log lines that
/// would otherwise repeat once per connection.
#[derive(Debug)]
pub struct RateLimited {
    every: Duration,
    last: Mutex<Option<Instant>>,
    held_back: AtomicU64,
}

impl RateLimited {
    /// At most one event per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: Mutex::new(None),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this event should be logged, `n` being how many were held back since
    /// the last one logged; `None` when it should not.
    pub fn check(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some(t) if now.duration_since(t) < self.every => {
                self.held_back.fetch_add(1, Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.held_back.swap(0, Relaxed))
            }
        }
    }
}

/// Why [`ConnLimit::admit`] turned a connection away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("connection cap of {max} reached")]
pub struct OverCap {
    pub max: usize,
}

#[derive(Debug, Default)]
struct LimitState {
    open: usize,
    next: u64,
    /// Connections that may be evicted (silent, or pending until established), oldest first.
    evictable: BTreeMap<u64, Evictable>,
    /// Per source, its pending connections (sequence numbers, oldest first).
    sources: HashMap<IpAddr, BTreeSet<u64>>,
}

#[derive(Debug)]
struct Evictable {
    source: Option<IpAddr>,
    evict: CancellationToken,
}

impl LimitState {
    /// Takes `seq` out of the evictable set (and its source's), returning its eviction signal.
    fn take(&mut self, seq: u64) -> Option<CancellationToken> {
        let e = self.evictable.remove(&seq)?;
        if let Some(src) = e.source {
            if let Some(set) = self.sources.get_mut(&src) {
                set.remove(&seq);
                if set.is_empty() {
                    self.sources.remove(&src);
                }
            }
        }
        Some(e.evict)
    }
}

/// The key a source address is counted under: an IPv4 address (IPv4-mapped IPv6 included) or
/// an IPv6 /64, the block one subscriber usually gets.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

/// How a connection may be evicted.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Never (the client may not speak first).
    Fixed,
    /// Until its first byte.
    UntilSpoke,
    /// Until [`Slot::establish`]; counted against its source's pending cap.
    Pending(IpAddr),
}

/// One listener's connection cap (see the module docs).
#[derive(Debug)]
pub struct ConnLimit {
    listener: String,
    max: usize,
    /// Most pending connections of one source.
    per_source: usize,
    state: Mutex<LimitState>,
    refused: AtomicU64,
    evicted: AtomicU64,
    evicted_source: AtomicU64,
    log: RateLimited,
    /// Woken when a slot is given back.
    freed: tokio::sync::Notify,
}

impl ConnLimit {
    /// A cap of `max` connections for the listener named `listener` (in log lines).
    pub fn new(listener: impl Into<String>, max: usize) -> Arc<Self> {
        Self::with_source_cap(listener, max, DEFAULT_MAX_PENDING_PER_SOURCE)
    }

    /// [`new`](Self::new) with at most `per_source` pending connections per source address
    /// (see [`admit_pending`](Self::admit_pending)).
    pub fn with_source_cap(
        listener: impl Into<String>,
        max: usize,
        per_source: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            listener: listener.into(),
            max: max.max(1),
            per_source: per_source.max(1),
            state: Mutex::default(),
            refused: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            evicted_source: AtomicU64::new(0),
            log: RateLimited::new(LOG_EVERY),
            freed: tokio::sync::Notify::new(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LimitState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections admitted and not yet dropped.
    pub fn open(&self) -> usize {
        self.state().open
    }

    /// Connections refused because the cap was reached.
    pub fn refused(&self) -> u64 {
        self.refused.load(Relaxed)
    }

    /// Silent or pending connections closed to make room for a newcomer (the cap was full).
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Relaxed)
    }

    /// Pending connections closed because their source had its fill of pending connections
    /// and opened another.
    pub fn evicted_source(&self) -> u64 {
        self.evicted_source.load(Relaxed)
    }

    /// Connections not yet established now (silent or pending).
    pub fn pending(&self) -> usize {
        self.state().evictable.len()
    }

    /// Pending connections of `source` now.
    pub fn pending_from(&self, source: IpAddr) -> usize {
        self.state()
            .sources
            .get(&source_key(source))
            .map_or(0, BTreeSet::len)
    }

    /// Admits one more connection, or refuses it when the cap is reached. With
    /// `client_speaks_first`, the connection counts as silent until [`Slot::spoke`], and a full
    /// cap evicts the oldest silent connection (which sees [`Slot::evicted`]) to admit this one.
    /// An evicted connection holds its descriptor until its task sees the eviction, so while an
    /// eighth of the cap is still closing this waits (briefly) for them to go.
    pub async fn admit(self: &Arc<Self>, client_speaks_first: bool) -> Result<Slot, OverCap> {
        self.admit_mode(Self::mode(client_speaks_first)).await
    }

    /// Admits a connection from `source` that stays *pending* until [`Slot::establish`]: a full
    /// cap evicts the oldest pending (or silent) connection to admit it, and when `source`
    /// already holds its share of pending connections, its own oldest is evicted instead (see
    /// the module docs). Bytes do not end the pending phase.
    pub async fn admit_pending(self: &Arc<Self>, source: IpAddr) -> Result<Slot, OverCap> {
        self.admit_mode(Mode::Pending(source_key(source))).await
    }

    /// [`admit_pending`](Self::admit_pending) without waiting.
    pub fn try_admit_pending(self: &Arc<Self>, source: IpAddr) -> Result<Slot, OverCap> {
        match self.attempt(Mode::Pending(source_key(source))) {
            Attempt::Admitted(slot) => Ok(slot),
            Attempt::Full | Attempt::Evicting => Err(self.over_cap()),
        }
    }

    fn mode(client_speaks_first: bool) -> Mode {
        if client_speaks_first {
            Mode::UntilSpoke
        } else {
            Mode::Fixed
        }
    }

    async fn admit_mode(self: &Arc<Self>, mode: Mode) -> Result<Slot, OverCap> {
        loop {
            let freed = self.freed.notified();
            match self.attempt(mode) {
                Attempt::Admitted(slot) => return Ok(slot),
                Attempt::Full => return Err(self.over_cap()),
                Attempt::Evicting => {
                    let _ = tokio::time::timeout(Duration::from_millis(100), freed).await;
                }
            }
        }
    }

    /// [`admit`](Self::admit) without waiting: refuses while evicted connections are closing.
    pub fn try_admit(self: &Arc<Self>, client_speaks_first: bool) -> Result<Slot, OverCap> {
        match self.attempt(Self::mode(client_speaks_first)) {
            Attempt::Admitted(slot) => Ok(slot),
            Attempt::Full | Attempt::Evicting => Err(self.over_cap()),
        }
    }

    fn over_cap(&self) -> OverCap {
        self.refused.fetch_add(1, Relaxed);
        if let Some(held_back) = self.log.check() {
            tracing::warn!(
                listener = %self.listener,
                max = self.max,
                refused_since_last_log = held_back,
                "connection cap reached: closing new connections at once"
            );
        }
        OverCap { max: self.max }
    }

    fn attempt(self: &Arc<Self>, mode: Mode) -> Attempt {
        let mut st = self.state();
        // Evicted connections keep their descriptor until their task sees the eviction.
        let closing_too_many = st.open >= self.max + (self.max / 8).max(1);
        let mut made_room = false;
        if let Mode::Pending(src) = mode {
            let oldest = st
                .sources
                .get(&src)
                .filter(|set| set.len() >= self.per_source)
                .and_then(|set| set.first().copied());
            if let Some(seq) = oldest {
                if closing_too_many {
                    return Attempt::Evicting;
                }
                if let Some(victim) = st.take(seq) {
                    victim.cancel();
                    self.evicted_source.fetch_add(1, Relaxed);
                    made_room = true;
                }
            }
        }
        if st.open >= self.max && !made_room {
            if matches!(mode, Mode::Fixed) || st.evictable.is_empty() {
                return Attempt::Full;
            }
            if closing_too_many {
                return Attempt::Evicting;
            }
            if let Some(seq) = st.evictable.first_key_value().map(|(k, _)| *k) {
                if let Some(victim) = st.take(seq) {
                    victim.cancel();
                    self.evicted.fetch_add(1, Relaxed);
                }
            }
        }
        let evict = CancellationToken::new();
        st.open += 1;
        st.next += 1;
        let seq = st.next;
        let source = match mode {
            Mode::Fixed => None,
            Mode::UntilSpoke => {
                st.evictable.insert(
                    seq,
                    Evictable {
                        source: None,
                        evict: evict.clone(),
                    },
                );
                None
            }
            Mode::Pending(src) => {
                st.evictable.insert(
                    seq,
                    Evictable {
                        source: Some(src),
                        evict: evict.clone(),
                    },
                );
                st.sources.entry(src).or_default().insert(seq);
                Some(src)
            }
        };
        let established = CancellationToken::new();
        if matches!(mode, Mode::Fixed) {
            established.cancel();
        }
        Attempt::Admitted(Slot {
            limit: self.clone(),
            seq,
            evict,
            established,
            pending_until_established: source.is_some(),
        })
    }
}

enum Attempt {
    Admitted(Slot),
    /// Full, and nothing silent to evict.
    Full,
    /// Full, and too many evicted connections still closing.
    Evicting,
}

/// A connection's place under a [`ConnLimit`], given back when dropped.
#[derive(Debug)]
pub struct Slot {
    limit: Arc<ConnLimit>,
    seq: u64,
    evict: CancellationToken,
    /// Cancelled once the connection can no longer be evicted.
    established: CancellationToken,
    /// Admitted by [`ConnLimit::admit_pending`]: its first bytes do not establish it.
    pending_until_established: bool,
}

impl Slot {
    /// The connection has sent its first bytes: unless it was admitted pending, it can no
    /// longer be evicted.
    pub fn spoke(&self) {
        if !self.pending_until_established {
            self.establish();
        }
    }

    /// The connection is established (a whole ClientHello read, its node authenticated): it
    /// can no longer be evicted and no longer counts against its source's pending cap.
    pub fn establish(&self) {
        self.mark().establish();
    }

    /// A handle that establishes this slot from elsewhere (e.g. where the node behind the
    /// connection is authenticated).
    pub fn mark(&self) -> SlotMark {
        SlotMark {
            limit: self.limit.clone(),
            seq: self.seq,
            established: self.established.clone(),
        }
    }

    /// Whether the connection is established.
    pub fn is_established(&self) -> bool {
        self.established.is_cancelled()
    }

    /// Resolves once the connection is established.
    pub async fn established(&self) {
        self.established.cancelled().await;
    }

    /// Resolves when a newcomer evicted this (silent or pending) connection.
    pub async fn evicted(&self) {
        self.evict.cancelled().await;
    }

    /// Waits until `tcp` has bytes to read (or its peer closed) and marks the slot
    /// [`spoke`](Self::spoke); `false` if the connection was evicted first. Peeks, so the
    /// bytes stay for whoever reads the connection next.
    pub async fn wait_first_bytes(&self, tcp: &tokio::net::TcpStream) -> bool {
        let mut byte = [0u8; 1];
        tokio::select! {
            _ = self.evict.cancelled() => false,
            _ = tcp.peek(&mut byte) => {
                self.spoke();
                true
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut st = self.limit.state();
            st.open = st.open.saturating_sub(1);
            st.take(self.seq);
        }
        self.limit.freed.notify_waiters();
    }
}

/// Establishes a [`Slot`] from elsewhere (see [`Slot::mark`]).
#[derive(Debug, Clone)]
pub struct SlotMark {
    limit: Arc<ConnLimit>,
    seq: u64,
    established: CancellationToken,
}

impl SlotMark {
    /// See [`Slot::establish`]; nothing once the slot is gone or evicted.
    pub fn establish(&self) {
        if self.established.is_cancelled() {
            return;
        }
        let taken = self.limit.state().take(self.seq).is_some();
        if taken {
            self.established.cancel();
        }
    }
}

/// Back-off for a listener whose `accept` fails, usually for want of file descriptors: waits
/// 10 ms, doubling to 1 s while failures go on, and logs once per [`LOG_EVERY`].
#[derive(Debug)]
pub struct AcceptBackoff {
    listener: String,
    delay: Duration,
    log: RateLimited,
    failures: AtomicU64,
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl AcceptBackoff {
    /// Back-off for the listener named `listener` (in log lines).
    pub fn new(listener: impl Into<String>) -> Self {
        Self {
            listener: listener.into(),
            delay: ACCEPT_BACKOFF_MIN,
            log: RateLimited::new(LOG_EVERY),
            failures: AtomicU64::new(0),
        }
    }

    /// Accept failures so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Relaxed)
    }

    /// Logs (rate-limited) and waits after a failed `accept`.
    pub async fn failed(&mut self, error: &std::io::Error) {
        self.failures.fetch_add(1, Relaxed);
        if let Some(held_back) = self.log.check() {
            let out_of_fds = matches!(error.raw_os_error(), Some(24 | 23));
            tracing::warn!(
                listener = %self.listener,
                %error,
                out_of_fds,
                failed_since_last_log = held_back,
                retry_in = ?self.delay,
                "accept failed; backing off (existing connections are still served)"
            );
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(ACCEPT_BACKOFF_MAX);
    }

    /// An accept succeeded: the next failure starts from the shortest delay.
    pub fn succeeded(&mut self) {
        self.delay = ACCEPT_BACKOFF_MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_limit_line_parses() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max cpu time              unlimited            unlimited            seconds   \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(parse_fd_limit(text), Some(1024));
        assert_eq!(
            parse_fd_limit("Max open files            unlimited  unlimited  files"),
            None
        );
        assert!(fd_limit().is_some(), "this process's limit is readable");
    }

    #[test]
    fn cap_leaves_room_under_the_fd_limit() {
        assert_eq!(cap_for_fd_limit(1024), 1024 - 256);
        assert_eq!(cap_for_fd_limit(256), 256 - 64);
        assert_eq!(cap_for_fd_limit(40), MIN_CAP);
        assert!(default_cap(Some(usize::MAX)) < usize::MAX);
        assert_eq!(default_cap(Some(3)), 3);
    }

    #[test]
    fn over_the_cap_is_refused_and_counted() {
        let limit = ConnLimit::new("test", 2);
        let a = limit.try_admit(false).expect("first");
        let _b = limit.try_admit(false).expect("second");
        assert_eq!(
            limit.try_admit(false).expect_err("third"),
            OverCap { max: 2 }
        );
        assert_eq!(limit.refused(), 1);
        drop(a);
        assert_eq!(limit.open(), 1);
        let _c = limit.try_admit(false).expect("room again");
        assert_eq!(limit.open(), 2);
    }

    #[tokio::test]
    async fn a_newcomer_evicts_the_oldest_silent_connection() {
        let limit = ConnLimit::new("test", 2);
        let old = limit.try_admit(true).expect("first");
        let spoke = limit.try_admit(true).expect("second");
        spoke.spoke();
        let _new = limit.try_admit(true).expect("evicts the silent one");
        tokio::time::timeout(Duration::from_secs(1), old.evicted())
            .await
            .expect("the oldest silent connection is told to go");
        assert_eq!(limit.evicted(), 1);
        drop(old);
        // The one that spoke stays; the newcomer is silent and can itself be evicted.
        let _newer = limit.try_admit(true).expect("evicts the newcomer");
        assert_eq!(limit.evicted(), 2);
        let _ = limit
            .try_admit(false)
            .expect_err("a listener whose clients may not speak first refuses");
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[tokio::test]
    async fn one_source_holds_at_most_its_share_of_pending_connections() {
        let limit = ConnLimit::with_source_cap("test", 100, 3);
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let a1 = limit.try_admit_pending(a).expect("a1");
        let _a2 = limit.try_admit_pending(a).expect("a2");
        let _a3 = limit.try_admit_pending(a).expect("a3");
        let _b1 = limit.try_admit_pending(b).expect("b1");
        assert_eq!(limit.pending_from(a), 3);
        // A fourth from `a` evicts a's oldest, never b's.
        let _a4 = limit.try_admit_pending(a).expect("a4");
        tokio::time::timeout(Duration::from_secs(1), a1.evicted())
            .await
            .expect("a's oldest is told to go");
        assert_eq!(limit.evicted_source(), 1);
        assert_eq!(limit.evicted(), 0);
        assert_eq!(limit.pending_from(a), 3);
        assert_eq!(limit.pending_from(b), 1);
        drop(a1);
        assert_eq!(limit.open(), 4);
    }

    #[tokio::test]
    async fn pending_connections_are_evicted_oldest_first_until_established() {
        let limit = ConnLimit::with_source_cap("test", 3, 10);
        let legit = limit.try_admit_pending(ip("192.0.2.1")).expect("legit");
        let junk1 = limit.try_admit_pending(ip("192.0.2.2")).expect("junk1");
        let _junk2 = limit.try_admit_pending(ip("192.0.2.3")).expect("junk2");
        // Bytes alone (a trickled ClientHello) do not make a pending connection safe.
        junk1.spoke();
        assert!(!junk1.is_established());
        // The legit one is established from elsewhere (its node authenticated).
        let mark = legit.mark();
        mark.establish();
        assert!(legit.is_established());
        assert_eq!(limit.pending_from(ip("192.0.2.1")), 0);
        let _junk3 = limit
            .try_admit_pending(ip("192.0.2.4"))
            .expect("evicts junk1");
        tokio::time::timeout(Duration::from_secs(1), junk1.evicted())
            .await
            .expect("the oldest pending connection is told to go");
        assert_eq!(limit.evicted(), 1);
        // Establishing an evicted connection does not bring it back.
        junk1.establish();
        assert!(!junk1.is_established());
        drop(junk1);
        let _junk4 = limit
            .try_admit_pending(ip("192.0.2.5"))
            .expect("evicts junk2");
        assert_eq!(limit.evicted(), 2);
        assert!(
            !legit.evict.is_cancelled(),
            "an established connection stays"
        );
        let _ = limit
            .try_admit(false)
            .expect_err("fixed connections are refused when full");
    }

    #[test]
    fn ipv6_sources_count_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            source_key(ip("2001:db8:1:2:aaaa::1")),
            source_key(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            source_key(ip("2001:db8:1:2::1")),
            source_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(source_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        let limit = ConnLimit::with_source_cap("test", 100, 2);
        let first = limit.try_admit_pending(ip("2001:db8::1")).expect("1");
        let _second = limit.try_admit_pending(ip("2001:db8::2")).expect("2");
        let _third = limit.try_admit_pending(ip("2001:db8::3")).expect("3");
        assert!(first.evict.is_cancelled(), "one /64 is one source");
        assert_eq!(limit.pending_from(ip("2001:db8::ffff")), 2);
    }

    #[test]
    fn rate_limited_logs_once_per_interval() {
        let r = RateLimited::new(Duration::from_secs(3600));
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), None);
        assert_eq!(r.check(), None);
        let r2 = RateLimited::new(Duration::ZERO);
        assert_eq!(r2.check(), Some(0));
        assert_eq!(r2.check(), Some(0));
    }
}
