//! The relay's TLS/TCP fallback listener, bound on request and served beside the UDP socket.
//!
//! The work is in [`postern_net::relay_tcp`] (accepting links) and [`postern_net::transport::links`]
//! (carrying datagrams); this module only holds the listener between `bind` and `run`.

use crate::server::RelayError;
use postern_net::relay_tcp::{self, TcpStats};
use postern_net::transport::links::StreamLinks;
use postern_proto::tls::Identity;
use rustls::RootCertStore;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The fallback listener of one relay.
pub struct TcpFallback {
    tls: Arc<rustls::ServerConfig>,
    links: Arc<StreamLinks>,
    listener: Option<std::net::TcpListener>,
    stats: Arc<TcpStats>,
}

impl TcpFallback {
    pub(crate) fn new(
        identity: &Identity,
        roots: Arc<RootCertStore>,
        links: Arc<StreamLinks>,
    ) -> Result<Self, RelayError> {
        let tls = relay_tcp::server_config(identity, roots).map_err(|e| {
            RelayError::Endpoint(postern_net::transport::endpoint::EndpointError::Tls(e))
        })?;
        Ok(Self {
            tls,
            links,
            listener: None,
            stats: Arc::default(),
        })
    }

    /// Binds the TCP listener (served once the relay runs).
    pub(crate) fn bind(&mut self, addr: SocketAddr) -> Result<SocketAddr, RelayError> {
        let bind_err = |source| RelayError::BindTcp { addr, source };
        let listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        self.listener = Some(listener);
        Ok(local)
    }

    pub(crate) fn stats(&self) -> Arc<TcpStats> {
        self.stats.clone()
    }

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
        Some(tokio::spawn(relay_tcp::serve(
            listener,
            self.tls.clone(),
            self.links.clone(),
            self.stats.clone(),
            stop,
        )))
    }
}

/// Writes the fallback's metrics: links open, accepted and refused, datagrams each way and
/// those dropped (full write queue) or ending a link (bad length prefix).
pub fn render(handle: &crate::RelayHandle, out: &mut postern_net::runtime::ops::Exposition) {
    use std::sync::atomic::Ordering::Relaxed;
    let (tcp, links) = (handle.tcp_stats(), handle.tcp_links().stats());
    out.gauge(
        "postern_relay_tcp_links_open",
        "Nodes connected over the TLS/TCP fallback now.",
        tcp.open.load(Relaxed) as f64,
    );
    out.counter(
        "postern_relay_tcp_links_accepted_total",
        "TLS/TCP fallback connections accepted (TLS handshake done).",
        tcp.accepted.load(Relaxed),
    );
    out.counter(
        "postern_relay_tcp_links_refused_total",
        "TLS/TCP fallback connections refused (failed or slow TLS handshake, over the limit).",
        tcp.refused.load(Relaxed),
    );
    out.counter(
        "postern_relay_tcp_datagrams_in_total",
        "Datagrams read from TLS/TCP links.",
        links.datagrams_in.load(Relaxed),
    );
    out.counter(
        "postern_relay_tcp_datagrams_out_total",
        "Datagrams queued to TLS/TCP links.",
        links.datagrams_out.load(Relaxed),
    );
    out.counter(
        "postern_relay_tcp_datagrams_dropped_total",
        "Datagrams dropped because a TLS/TCP link's write queue was full.",
        links.dropped_full.load(Relaxed),
    );
    out.counter(
        "postern_relay_tcp_framing_errors_total",
        "TLS/TCP links closed for a bad length prefix.",
        links.framing_errors.load(Relaxed),
    );
}
