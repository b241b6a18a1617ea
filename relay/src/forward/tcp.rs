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

use postern_net::transport::links::StreamLinks;
use postern_proto::dgram::ALPN_TCP;
use postern_proto::tls::{self, Identity, TlsError};
use rustls::RootCertStore;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Most TLS/TCP nodes served at once; more are refused until some leave.
pub const MAX_LINKS: usize = 4096;
/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Of `refused`: connections that sent nothing and were closed to make room for a new one.
    pub evicted_silent: AtomicU64,
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
    shutdown: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let next = AtomicU32::new(1);
    let tasks = TaskTracker::new();
    let limit = postern_net::runtime::limit::ConnLimit::new(
        "relay TLS/TCP",
        postern_net::runtime::limit::default_cap(Some(MAX_LINKS)),
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
        // The client speaks first (ClientHello): a silent connection makes room for a new one.
        let Ok(permit) = limit.admit(true).await else {
            stats.refused.fetch_add(1, Relaxed);
            stats.refused_cap.fetch_add(1, Relaxed);
            tracing::debug!(%peer, "refusing TLS/TCP node: too many links");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let n = next.fetch_add(1, Relaxed) & 0x00ff_ffff;
        let [_, b, c, d] = n.to_be_bytes();
        let virt = SocketAddr::new(Ipv4Addr::new(240, b, c, d).into(), 443);
        let (acceptor, links, stats, stop) = (
            acceptor.clone(),
            links.clone(),
            stats.clone(),
            shutdown.clone(),
        );
        tasks.spawn(
            async move {
                let slot = permit;
                // One time limit for the first bytes and the whole handshake.
                let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
                match tokio::time::timeout_at(deadline, slot.wait_first_bytes(&tcp)).await {
                    Ok(true) => {}
                    Ok(false) => {
                        stats.refused.fetch_add(1, Relaxed);
                        stats.evicted_silent.fetch_add(1, Relaxed);
                        tracing::debug!("silent TLS/TCP connection closed to make room");
                        return;
                    }
                    Err(_) => {
                        stats.refused.fetch_add(1, Relaxed);
                        postern_net::refusal!(info, "tcp_silent", "TLS/TCP connections sent nothing in time");
                        return;
                    }
                }
                let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        stats.refused.fetch_add(1, Relaxed);
                        postern_net::refusal!(info, "tcp_tls_failed", "TLS/TCP handshakes failed", error = %e);
                        return;
                    }
                    Err(_) => {
                        stats.refused.fetch_add(1, Relaxed);
                        postern_net::refusal!(info, "tcp_tls_timeout", "TLS/TCP handshakes timed out");
                        return;
                    }
                };
                stats.accepted.fetch_add(1, Relaxed);
                stats.open.fetch_add(1, Relaxed);
                tracing::info!(%virt, "node link up over TLS/TCP");
                let result = links.serve(virt, tls, stop).await;
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
