//! postern transport: the pieces every node shares.
//!
//! - [`relay_socket`]: the relay's UDP socket for quinn; forwards end-to-end frames between a
//!   route's two endpoints inside the receive path and hands only QUIC packets to quinn.
//! - [`node_socket`]: a node's UDP socket for quinn; one socket serves both the control
//!   connection to the relay (plain QUIC) and end-to-end connections (wrapped in forwarding
//!   frames and addressed to virtual peer addresses).
//! - [`links`], [`relay_tcp`], [`relay_path`]: the TLS/TCP fallback where UDP is blocked (the
//!   same datagrams over a TLS stream; the relay's listener; a node's choice of UDP or TCP).
//! - [`endpoint`]: QUIC endpoint and transport configuration.
//! - [`ctl`]: one-frame-each-way control exchanges on QUIC streams.
//! - [`control`]: a node's long-lived, self-healing control connection to a relay.
//! - [`splice`]: a client TCP connection joined to a QUIC stream, with half-close and resets.
//! - [`backoff`]: jittered exponential backoff.
//! - [`ops`]: the `/metrics`, `/healthz` and `/readyz` endpoint of every node.
//! - [`logging`]: stderr logs and the JSON-lines audit log.
//! - [`ratelog`]: refusals logged as one summary line per reason per interval.
//! - [`drain`]: graceful shutdown (wait for open streams up to a deadline).

pub mod backoff;
pub mod control;
pub mod ctl;
pub mod drain;
pub mod endpoint;
pub mod enroll;
pub mod files;
pub mod http_proxy;
pub mod limit;
pub mod links;
pub mod logging;
pub mod node_config;
pub mod node_socket;
pub mod ops;
pub mod ratelog;
pub mod rekey;
pub mod relay_path;
pub mod relay_socket;
pub mod relay_tcp;
pub mod renew;
pub mod splice;
pub mod state_lock;
pub mod tls_server;

use std::net::SocketAddr;

/// Maps an IPv4-mapped IPv6 address to plain IPv4, so addresses compare equal whichever family
/// the socket that saw them uses.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Reads the peer's node name from an established connection's certificate chain.
pub fn peer_name(
    conn: &quinn::Connection,
) -> Result<postern_proto::name::NodeName, postern_proto::pki::PkiError> {
    use postern_proto::pki::{cert_name, PkiError};
    let ident = conn
        .peer_identity()
        .ok_or_else(|| PkiError::NoName("peer presented no certificate".into()))?;
    let certs = ident
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| PkiError::NoName("unexpected peer identity type".into()))?;
    let first = certs
        .first()
        .ok_or_else(|| PkiError::NoName("empty certificate chain".into()))?;
    cert_name(first)
}

/// Reads the attributes from an established connection's peer certificate (empty if none).
pub fn peer_attributes(conn: &quinn::Connection) -> postern_proto::policy::Attributes {
    conn.peer_identity()
        .and_then(|i| {
            i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|certs| {
            certs
                .first()
                .map(|c| postern_proto::pki::cert_attributes(c))
        })
        .and_then(Result::ok)
        .unwrap_or_default()
}

/// Resolves when the process is asked to stop (SIGINT or SIGTERM).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
