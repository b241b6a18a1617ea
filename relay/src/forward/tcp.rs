//! The relay's TLS/TCP listener for nodes that cannot use UDP, bound on request and served
//! beside the UDP socket ([`super::udp`]).
//!
//! Each accepted connection (TLS 1.3 with the relay's certificate, ALPN
//! [`postern_proto::dgram::ALPN_TCP`]) becomes a [`postern_net::transport::links`] link with its
//! own *virtual* address in 240.0.0.0/8 (reserved, never routed). The node's QUIC control
//! connection, carried inside, appears to quinn as coming from that address, so the route table
//! names it as the node's endpoint and forwarding frames to it go back down the same TLS
//! connection. Nothing else in the relay knows a node is on TCP.
//!
//! The TLS layer authenticates the relay only; the node proves who it is inside, on the
//! control connection's mutual TLS, exactly as over UDP.
//!
//! [`TcpFallback`] holds the listener between the relay's `bind` and `run`; [`serve`] accepts
//! links; the datagrams they carry are [`postern_net::transport::links`]' work.
//!
//! Until the node inside is authenticated a link is *pending* ([`PendingLinks`]): it must
//! finish TLS within [`HANDSHAKE_TIMEOUT`] and authenticate within [`PREAUTH_TIMEOUT`], one
//! source address holds at most [`MAX_PENDING_PER_SOURCE`] pending links, and when the cap is
//! full a newcomer evicts the oldest pending link (see [`postern_net::runtime::limit`]). Idle
//! or trickling junk therefore only ever displaces junk, and a node reconnecting gets in.

use postern_net::runtime::limit::{ConnLimit, SlotMark};
use postern_net::transport::links::StreamLinks;
use postern_proto::dgram::ALPN_TCP;
use postern_proto::tls::{self, Identity, TlsError};
use rustls::RootCertStore;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Most TLS/TCP nodes served at once; more are refused until some leave.
pub const MAX_LINKS: usize = 4096;
/// How long a link may take from its accept to a finished TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a link may take from its accept to its node's authenticated control connection.
pub const PREAUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Most links one source address may hold before its node is authenticated.
pub const MAX_PENDING_PER_SOURCE: usize =
    postern_net::runtime::limit::DEFAULT_MAX_PENDING_PER_SOURCE;

/// The links whose node is not authenticated yet, by virtual address: the relay's session
/// code marks one established when a node authenticates from that address. Also where each
/// open link's TCP connection comes from (its node's public address as seen over TCP), for
/// the direct path's candidates ([`PendingLinks::source_of`]).
#[derive(Debug, Default)]
pub struct PendingLinks {
    marks: Mutex<HashMap<SocketAddr, SlotMark>>,
    sources: Mutex<HashMap<SocketAddr, SocketAddr>>,
}

/// Forgets a link's source when the link's task ends, however it ends.
struct SourceGuard {
    pending: Arc<PendingLinks>,
    virt: SocketAddr,
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        self.pending.sources().remove(&self.virt);
    }
}

impl PendingLinks {
    fn marks(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, SlotMark>> {
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, SocketAddr>> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the TCP connection of the link with virtual address `virt` comes from (None: no
    /// such link is open). For a node behind a NAT, its IP is the NAT's public IP, the one its
    /// UDP leaves from too.
    pub fn source_of(&self, virt: SocketAddr) -> Option<SocketAddr> {
        self.sources().get(&virt).copied()
    }

    fn track_source(self: &Arc<Self>, virt: SocketAddr, source: SocketAddr) -> SourceGuard {
        self.sources().insert(virt, source);
        SourceGuard {
            pending: self.clone(),
            virt,
        }
    }

    /// A node authenticated from `addr`: if that is a pending link, it is now established.
    pub(crate) fn authenticated(&self, addr: SocketAddr) {
        if let Some(mark) = self.marks().remove(&addr) {
            mark.establish();
        }
    }

    /// Links waiting for their node to authenticate.
    pub fn len(&self) -> usize {
        self.marks().len()
    }

    /// No link is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why the TLS/TCP fallback could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TcpError {
    /// The relay's certificate or key does not make a TLS server configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot bind TCP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The fallback listener of one relay.
pub struct TcpFallback {
    tls: Arc<rustls::ServerConfig>,
    links: Arc<StreamLinks>,
    listener: Option<std::net::TcpListener>,
    stats: Arc<TcpStats>,
    pending: Arc<PendingLinks>,
}

impl TcpFallback {
    /// A fallback that will attach its links to `links` (the UDP socket's, so forwarding
    /// reaches TCP nodes too).
    pub(crate) fn new(
        identity: &Identity,
        roots: Arc<RootCertStore>,
        links: Arc<StreamLinks>,
    ) -> Result<Self, TcpError> {
        Ok(Self {
            tls: server_config(identity, roots)?,
            links,
            listener: None,
            stats: Arc::default(),
            pending: Arc::default(),
        })
    }

    /// Binds the TCP listener (served once the relay runs).
    pub(crate) fn bind(&mut self, addr: SocketAddr) -> Result<SocketAddr, TcpError> {
        let bind_err = |source| TcpError::Bind { addr, source };
        let listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        self.listener = Some(listener);
        Ok(local)
    }

    /// The listener's counters.
    pub(crate) fn stats(&self) -> Arc<TcpStats> {
        self.stats.clone()
    }

    /// The links whose node has not authenticated yet.
    pub(crate) fn pending(&self) -> Arc<PendingLinks> {
        self.pending.clone()
    }

    /// The links TCP nodes are served on.
    pub(crate) fn links(&self) -> Arc<StreamLinks> {
        self.links.clone()
    }

    /// Starts serving links, if a listener was bound.
    pub(crate) fn spawn(&mut self, stop: CancellationToken) -> Option<JoinHandle<()>> {
        let listener = self.listener.take()?;
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot serve the TLS/TCP listener");
                return None;
            }
        };
        Some(tokio::spawn(serve(
            listener,
            self.tls.clone(),
            self.links.clone(),
            self.stats.clone(),
            self.pending.clone(),
            stop,
        )))
    }
}

/// Counters of the TCP listener.
#[derive(Debug, Default)]
pub struct TcpStats {
    /// Links (TLS connections) accepted.
    pub accepted: AtomicU64,
    /// Links open now.
    pub open: AtomicU64,
    /// TLS handshakes that failed or timed out, and connections over the limit.
    pub refused: AtomicU64,
    /// Of `refused`: connections over the cap ([`MAX_LINKS`]), closed at once.
    pub refused_cap: AtomicU64,
    /// Of `refused`: pending links (node not authenticated) closed to make room for a new one.
    pub evicted_pending: AtomicU64,
    /// Of `refused`: pending links closed because their source opened more than
    /// [`MAX_PENDING_PER_SOURCE`].
    pub evicted_source: AtomicU64,
    /// Of `refused`: links whose node did not authenticate within [`PREAUTH_TIMEOUT`].
    pub preauth_timeout: AtomicU64,
}

/// The relay's TLS server configuration for links.
pub fn server_config(
    identity: &Identity,
    roots: Arc<RootCertStore>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    // No client certificate at this layer: the node authenticates inside, on QUIC.
    Ok(Arc::new(tls::server_config_with(
        identity,
        roots,
        &[ALPN_TCP],
        true,
    )?))
}

/// Accepts links on `listener` until `shutdown`, attaching each to `links`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    links: Arc<StreamLinks>,
    stats: Arc<TcpStats>,
    pending: Arc<PendingLinks>,
    shutdown: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let next = AtomicU32::new(1);
    let tasks = TaskTracker::new();
    let limit = ConnLimit::with_source_cap(
        "relay TLS/TCP",
        postern_net::runtime::limit::default_cap(Some(MAX_LINKS)),
        MAX_PENDING_PER_SOURCE,
    );
    let mut backoff = postern_net::runtime::limit::AcceptBackoff::new("relay TLS/TCP");
    tracing::info!(addr = %postern_net::runtime::logging::local_addr(listener.local_addr()), "relay listening on TLS/TCP for nodes without UDP");
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually EMFILE: back off instead of spinning; links already up go on.
                backoff.failed(&e).await;
                continue;
            }
        };
        backoff.succeeded();
        let (evicted, evicted_source) = (limit.evicted(), limit.evicted_source());
        // Pending until its node authenticates: junk makes room for a node reconnecting.
        let Ok(slot) = limit.admit_pending(peer.ip()).await else {
            stats.refused.fetch_add(1, Relaxed);
            stats.refused_cap.fetch_add(1, Relaxed);
            tracing::debug!(%peer, "refusing TLS/TCP node: too many links");
            continue;
        };
        let (evicted, evicted_source) = (
            limit.evicted() - evicted,
            limit.evicted_source() - evicted_source,
        );
        if evicted > 0 {
            stats.refused.fetch_add(evicted, Relaxed);
            stats.evicted_pending.fetch_add(evicted, Relaxed);
            postern_net::refusal!(
                info,
                "tcp_evicted_pending",
                "TLS/TCP links not authenticated closed to make room (link cap full)"
            );
        }
        if evicted_source > 0 {
            stats.refused.fetch_add(evicted_source, Relaxed);
            stats.evicted_source.fetch_add(evicted_source, Relaxed);
            postern_net::refusal!(
                info,
                "tcp_evicted_source",
                "TLS/TCP links not authenticated closed: their source opened too many"
            );
        }
        let _ = tcp.set_nodelay(true);
        let n = next.fetch_add(1, Relaxed) & 0x00ff_ffff;
        let [_, b, c, d] = n.to_be_bytes();
        let virt = SocketAddr::new(Ipv4Addr::new(240, b, c, d).into(), 443);
        let (acceptor, links, stats, pending, stop) = (
            acceptor.clone(),
            links.clone(),
            stats.clone(),
            pending.clone(),
            shutdown.clone(),
        );
        tasks.spawn(
            async move {
                let _source = pending.track_source(virt, peer);
                let accepted_at = tokio::time::Instant::now();
                // Evicted to make room: nothing more to do (counted at the accept).
                let tls = tokio::select! {
                    _ = slot.evicted() => return,
                    t = tokio::time::timeout_at(accepted_at + HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => t,
                };
                let tls = match tls {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        stats.refused.fetch_add(1, Relaxed);
                        postern_net::refusal!(info, "tcp_tls_failed", "TLS/TCP handshakes failed", error = %e);
                        return;
                    }
                    Err(_) => {
                        stats.refused.fetch_add(1, Relaxed);
                        postern_net::refusal!(info, "tcp_tls_timeout", "TLS/TCP handshakes timed out (or sent nothing)");
                        return;
                    }
                };
                stats.accepted.fetch_add(1, Relaxed);
                stats.open.fetch_add(1, Relaxed);
                pending.marks().insert(virt, slot.mark());
                tracing::debug!(%virt, "node link up over TLS/TCP");
                let serve = links.serve(virt, tls, stop);
                tokio::pin!(serve);
                enum Early {
                    Ended,
                    Authenticated,
                    Evicted,
                    TimedOut,
                }
                let early = tokio::select! {
                    r = &mut serve => {
                        tracing::debug!(%virt, result = ?r.err(), "TLS/TCP link ended before its node authenticated");
                        Early::Ended
                    }
                    _ = slot.established() => Early::Authenticated,
                    _ = slot.evicted() => Early::Evicted,
                    _ = tokio::time::sleep_until(accepted_at + PREAUTH_TIMEOUT) => Early::TimedOut,
                };
                pending.marks().remove(&virt);
                match early {
                    Early::Authenticated => {}
                    Early::Ended | Early::Evicted => {
                        stats.open.fetch_sub(1, Relaxed);
                        return;
                    }
                    Early::TimedOut => {
                        stats.open.fetch_sub(1, Relaxed);
                        stats.refused.fetch_add(1, Relaxed);
                        stats.preauth_timeout.fetch_add(1, Relaxed);
                        postern_net::refusal!(info, "tcp_preauth_timeout", "TLS/TCP links closed: no node authenticated in time");
                        return;
                    }
                }
                tracing::info!(%virt, "node link up over TLS/TCP, node authenticated");
                let result = serve.await;
                stats.open.fetch_sub(1, Relaxed);
                match result {
                    Ok(()) => tracing::info!(%virt, "node link closed"),
                    Err(e) => tracing::info!(%virt, error = %e, "node link ended"),
                }
            }
            .instrument(tracing::info_span!("tcp_link", %peer)),
        );
    }
    tasks.close();
    tasks.wait().await;
}
