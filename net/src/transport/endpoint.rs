//! QUIC endpoint and transport settings for the control and end-to-end planes.

use postern_proto::tls::{self, Identity, TlsError};
use postern_proto::{ALPN_CONTROL, ALPN_E2E};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{EndpointConfig, TransportConfig, VarInt};
use rustls::RootCertStore;
use std::sync::Arc;
use std::time::Duration;

/// Why an endpoint could not be configured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Keep-alive on control connections; also bounds how fast a dead relay or node is noticed.
pub const CONTROL_KEEP_ALIVE: Duration = Duration::from_secs(1);
/// Idle timeout of control connections.
pub const CONTROL_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Keep-alive on end-to-end connections.
pub const E2E_KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Idle timeout of end-to-end connections.
pub const E2E_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Endpoint-wide settings. The QUIC bit is never greased (RFC 9287): the relay and nodes tell
/// QUIC packets from forwarding frames by that bit. `reset_key` makes stateless resets survive a
/// restart, so peers of a restarted relay learn at once that their connection is gone: the reset
/// token of a connection ID is derived from it, and so is the key that connection IDs are
/// checked with (quinn drops, unanswered, a packet whose connection ID its generator did not
/// make; with a fresh random key after a restart that is every old connection's packet).
pub fn endpoint_config(reset_key: Option<&[u8; 32]>) -> EndpointConfig {
    let mut cfg = match reset_key {
        Some(k) => {
            let mut cfg =
                EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k)));
            let cid_key = cid_key(k);
            cfg.cid_generator(move || {
                Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            });
            cfg
        }
        None => EndpointConfig::default(),
    };
    cfg.grease_quic_bit(false);
    // Accept datagrams as large as the biggest end-to-end packet plus its forwarding header
    // (quinn also sizes its receive buffers from this). The value is in range, so this cannot
    // fail; if it ever did, quinn's default (1472) only limits the path MTU.
    let _ = cfg.max_udp_payload_size(E2E_MAX_MTU + postern_proto::fwd::HEADER_LEN as u16);
    cfg
}

/// The connection-ID check key that follows from `reset_key`: derived (not the reset key
/// itself, which must stay secret: connection IDs are sent in clear).
fn cid_key(reset_key: &[u8; 32]) -> u64 {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key);
    let tag = ring::hmac::sign(&key, b"postern connection-id key");
    let mut first = [0u8; 8];
    first.copy_from_slice(&tag.as_ref()[..8]);
    u64::from_le_bytes(first)
}

/// Upper bound of end-to-end path MTU discovery. quinn probes up from 1200 bytes and settles on
/// what the path carries: about 1450 on the Internet, more on jumbo-frame LANs and loopback.
/// Bigger packets cut the per-packet work at every hop (QUIC packet handling at the nodes, one
/// system call share and one route lookup per packet at the relay): the bench measured relay CPU
/// per GiB halved and node CPU per GiB down by a third at 16 KiB against 1,443 bytes
/// (bench/RESULTS.md). Beyond 16 KiB it gained nothing, while a lost packet costs more.
pub const E2E_MAX_MTU: u16 = 16_384 - postern_proto::fwd::HEADER_LEN as u16;

fn control_transport() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(CONTROL_KEEP_ALIVE));
    t.max_idle_timeout(Some(
        VarInt::from_u32(CONTROL_IDLE_TIMEOUT.as_millis() as u32).into(),
    ));
    t.max_concurrent_bidi_streams(VarInt::from_u32(256));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t
}

fn e2e_transport() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(E2E_KEEP_ALIVE));
    t.max_idle_timeout(Some(
        VarInt::from_u32(E2E_IDLE_TIMEOUT.as_millis() as u32).into(),
    ));
    // One stream per client TCP connection: allow many at once.
    t.max_concurrent_bidi_streams(VarInt::from_u32(8192));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    // Windows sized for a fast path with some latency; memory is only used when data waits.
    t.stream_receive_window(VarInt::from_u32(4 * 1024 * 1024));
    t.receive_window(VarInt::from_u32(32 * 1024 * 1024));
    t.send_window(32 * 1024 * 1024);
    // Every end-to-end packet carries a forwarding header: E2E_MAX_MTU leaves room for it.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(E2E_MAX_MTU);
    t.mtu_discovery_config(Some(mtu));
    t
}

fn quic_client(
    identity: &Identity,
    roots: Arc<RootCertStore>,
    alpn: &[u8],
    transport: TransportConfig,
) -> Result<quinn::ClientConfig, EndpointError> {
    let tls = tls::client_config(identity, roots, &[alpn])?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

fn quic_server(
    identity: &Identity,
    roots: Arc<RootCertStore>,
    alpn: &[u8],
    transport: TransportConfig,
) -> Result<quinn::ServerConfig, EndpointError> {
    let tls = tls::server_config(identity, roots, &[alpn])?;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// Client config for a node's control connection to a relay.
pub fn control_client(
    identity: &Identity,
    roots: Arc<RootCertStore>,
) -> Result<quinn::ClientConfig, EndpointError> {
    quic_client(identity, roots, ALPN_CONTROL, control_transport())
}

/// Server config for a relay: control connections (client certificate required by the
/// application) and enrollment connections (no certificate yet) on one port.
pub fn relay_server(
    identity: &Identity,
    roots: Arc<RootCertStore>,
) -> Result<quinn::ServerConfig, EndpointError> {
    let tls = tls::server_config_with(
        identity,
        roots,
        &[ALPN_CONTROL, postern_proto::ticket::ALPN_ENROLL],
        true,
    )?;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(control_transport()));
    // Attempts waiting for the relay's admission decision (which takes microseconds): quinn's
    // defaults (65,536 of them, 100 MiB of buffered packets) are sized for servers that await
    // slow application checks; a flood would park that much memory here.
    cfg.max_incoming(RELAY_MAX_INCOMING)
        .incoming_buffer_size(64 * 1024)
        .incoming_buffer_size_total(4 * 1024 * 1024);
    Ok(cfg)
}

/// Connection attempts quinn holds for the relay before refusing more (see `relay_server`).
pub const RELAY_MAX_INCOMING: usize = 2048;

/// Client config for enrollment: no client certificate; the relay is verified against the CA
/// fingerprint pinned in the ticket.
pub fn enroll_client(ca_fingerprint: &str) -> Result<quinn::ClientConfig, EndpointError> {
    let tls = tls::pinned_client_config(ca_fingerprint, &[postern_proto::ticket::ALPN_ENROLL])?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(control_transport()));
    Ok(cfg)
}

/// Server config for a relay's control listener (control ALPN only, certificate required).
pub fn control_server(
    identity: &Identity,
    roots: Arc<RootCertStore>,
) -> Result<quinn::ServerConfig, EndpointError> {
    quic_server(identity, roots, ALPN_CONTROL, control_transport())
}

/// Client config for an inlet's end-to-end connection to an outlet.
pub fn e2e_client(
    identity: &Identity,
    roots: Arc<RootCertStore>,
) -> Result<quinn::ClientConfig, EndpointError> {
    quic_client(identity, roots, ALPN_E2E, e2e_transport())
}

/// Server config for an outlet's end-to-end listener.
pub fn e2e_server(
    identity: &Identity,
    roots: Arc<RootCertStore>,
) -> Result<quinn::ServerConfig, EndpointError> {
    quic_server(identity, roots, ALPN_E2E, e2e_transport())
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
