//! QUIC endpoint and transport settings for the control and end-to-end planes.

use postern_proto::tls::{self, Identity, TlsError};
use postern_proto::{ALPN_CONTROL, ALPN_E2E_ALL};
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

/// Bytes of QUIC datagrams an end-to-end connection buffers each way (see [`e2e_transport`]).
pub const E2E_DATAGRAM_BUFFER: usize = 4 * 1024 * 1024;

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

/// The congestion controller of end-to-end connections (control connections carry a few small
/// frames and keep quinn's default).
///
/// BBR is the default because of the figures: through 1-5 % loss and 20 ms each way behind a
/// 1,472-byte MTU (bench `lossy`, bench/RESULTS.md "Lossy paths") it carried 18-24 MB/s where
/// CUBIC and NewReno carried 0.16-0.43 MB/s (they halve or cut by 30 % on every loss, so
/// random loss, not capacity, sets their rate), and it matched them on a clean path. Its cost:
/// echo p99 of 210-290 ms under load against CUBIC's 165-175 ms (one sample per 100 in a 5 s
/// cell), and quinn calls its BBR experimental, which is why the other two stay selectable.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Deserialize,
    serde::Serialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// CUBIC (RFC 9438): backs off by 30 % on each loss, so random loss caps its rate.
    Cubic,
    /// BBR: paces at the bottleneck bandwidth it measures and does not treat loss as
    /// congestion. quinn marks its implementation experimental.
    #[default]
    Bbr,
    /// NewReno (RFC 9002's example): halves on each loss.
    #[value(name = "newreno")]
    #[serde(rename = "newreno")]
    NewReno,
}

impl Congestion {
    /// Every controller, in the order the bench reports them.
    pub const ALL: [Congestion; 3] = [Congestion::Bbr, Congestion::Cubic, Congestion::NewReno];

    /// The setting's value (`cubic`, `bbr`, `newreno`).
    pub fn as_str(self) -> &'static str {
        match self {
            Congestion::Cubic => "cubic",
            Congestion::Bbr => "bbr",
            Congestion::NewReno => "newreno",
        }
    }

    fn factory(self) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync + 'static> {
        use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
        match self {
            Congestion::Cubic => Arc::new(CubicConfig::default()),
            Congestion::Bbr => Arc::new(BbrConfig::default()),
            Congestion::NewReno => Arc::new(NewRenoConfig::default()),
        }
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Congestion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Congestion::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                format!("unknown congestion controller {s:?} (expected cubic, bbr or newreno)")
            })
    }
}

/// The transport settings of end-to-end connections with `congestion` as their controller.
pub fn e2e_transport(congestion: Congestion) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.congestion_controller_factory(congestion.factory());
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
    // QUIC datagrams (RFC 9221) carry UDP services' datagrams (postern_proto::udp); several
    // client flows share a connection, so the buffers hold a burst of many flows. A datagram
    // arriving to a full receive buffer pushes out the oldest (counted as lost UDP, as a full
    // socket buffer would be).
    t.datagram_receive_buffer_size(Some(E2E_DATAGRAM_BUFFER));
    t.datagram_send_buffer_size(E2E_DATAGRAM_BUFFER);
    // Every end-to-end packet carries a forwarding header: E2E_MAX_MTU leaves room for it.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    // quinn's search and black-hole settings otherwise: behind a 1,472-byte path it settles
    // within 30 bytes of the limit in about 3 s (some 45 lost probes, both ends of each
    // connection) and then probes no more, also through 5 % loss and after a 3 s outage
    // (tests/tests/lossy.rs, bench/RESULTS.md "Lossy paths").
    mtu.upper_bound(E2E_MAX_MTU);
    t.mtu_discovery_config(Some(mtu));
    t
}

fn quic_client(
    identity: &Identity,
    roots: Arc<RootCertStore>,
    alpn: &[&[u8]],
    transport: TransportConfig,
) -> Result<quinn::ClientConfig, EndpointError> {
    let tls = tls::client_config(identity, roots, alpn)?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

fn quic_server(
    identity: &Identity,
    roots: Arc<RootCertStore>,
    alpn: &[&[u8]],
    transport: TransportConfig,
) -> Result<quinn::ServerConfig, EndpointError> {
    let tls = tls::server_config(identity, roots, alpn)?;
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
    quic_client(identity, roots, &[ALPN_CONTROL], control_transport())
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
    quic_server(identity, roots, &[ALPN_CONTROL], control_transport())
}

/// Client config for an inlet's end-to-end connection to an outlet.
pub fn e2e_client(
    identity: &Identity,
    roots: Arc<RootCertStore>,
) -> Result<quinn::ClientConfig, EndpointError> {
    e2e_client_with(identity, roots, Congestion::default())
}

/// [`e2e_client`] with `congestion` as the controller.
pub fn e2e_client_with(
    identity: &Identity,
    roots: Arc<RootCertStore>,
    congestion: Congestion,
) -> Result<quinn::ClientConfig, EndpointError> {
    quic_client(identity, roots, ALPN_E2E_ALL, e2e_transport(congestion))
}

/// Server config for an outlet's end-to-end listener.
pub fn e2e_server(
    identity: &Identity,
    roots: Arc<RootCertStore>,
) -> Result<quinn::ServerConfig, EndpointError> {
    e2e_server_with(identity, roots, Congestion::default())
}

/// [`e2e_server`] with `congestion` as the controller.
pub fn e2e_server_with(
    identity: &Identity,
    roots: Arc<RootCertStore>,
    congestion: Congestion,
) -> Result<quinn::ServerConfig, EndpointError> {
    quic_server(identity, roots, ALPN_E2E_ALL, e2e_transport(congestion))
}

/// Whether the connection negotiated [`postern_proto::ALPN_E2E_V2`] (both ends know
/// `StreamOpen::ConnectFrom`).
pub fn speaks_e2e_v2(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol)
        .is_some_and(|p| p == postern_proto::ALPN_E2E_V2)
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

#[cfg(test)]
mod tests {
    use super::*;
    use postern_proto::pki::Ca;
    use postern_proto::{ALPN_E2E, ALPN_E2E_V2};

    fn identity(ca: &Ca, name: &str) -> Identity {
        let name = postern_proto::name::NodeName::new(name).expect("name");
        let issued = ca.issue(&name, Duration::from_secs(600)).expect("issue");
        Identity::from_pem(&issued.cert_pem, &issued.key_pem).expect("identity")
    }

    /// Connects a client offering `client_alpn` to a server offering `server_alpn` on
    /// loopback; says whether each side sees `postern/2`.
    async fn speaks_v2(server_alpn: &[&[u8]], client_alpn: &[&[u8]]) -> (bool, bool) {
        let ca = Ca::generate("alpn-test").expect("ca");
        let roots = tls::roots_from_pem(ca.cert_pem()).expect("roots");
        let server = quic_server(
            &identity(&ca, "outlet-1"),
            roots.clone(),
            server_alpn,
            TransportConfig::default(),
        )
        .expect("server config");
        let client = quic_client(
            &identity(&ca, "inlet-1"),
            roots,
            client_alpn,
            TransportConfig::default(),
        )
        .expect("client config");
        let server_ep =
            quinn::Endpoint::server(server, "127.0.0.1:0".parse().expect("addr")).expect("server");
        let addr = server_ep.local_addr().expect("addr");
        let client_ep =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
        let accept = tokio::spawn(async move {
            let conn = server_ep
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("handshake");
            speaks_e2e_v2(&conn)
        });
        let conn = client_ep
            .connect_with(client, addr, "outlet-1")
            .expect("connect")
            .await
            .expect("handshake");
        (speaks_e2e_v2(&conn), accept.await.expect("server side"))
    }

    /// Two nodes of this version use `postern/2`; with a node that offers only `postern/1`
    /// (an older inlet or outlet) both sides see `postern/1`, so the inlet sends the plain
    /// `Connect` the older outlet understands.
    #[tokio::test]
    async fn e2e_alpn_prefers_v2_and_falls_back_to_v1() {
        assert_eq!(speaks_v2(ALPN_E2E_ALL, ALPN_E2E_ALL).await, (true, true));
        assert_eq!(speaks_v2(&[ALPN_E2E], ALPN_E2E_ALL).await, (false, false));
        assert_eq!(speaks_v2(ALPN_E2E_ALL, &[ALPN_E2E]).await, (false, false));
        assert_eq!(ALPN_E2E_ALL.first(), Some(&ALPN_E2E_V2));
    }
}
