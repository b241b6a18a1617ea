//! How a node reaches a relay: QUIC over UDP, or the same QUIC packets over TLS/TCP.
//!
//! `auto` (the default) tries UDP first and falls back to TLS/TCP when the control handshake
//! does not complete within [`UDP_HANDSHAKE_TIMEOUT`] (UDP dropped by a firewall shows up as
//! silence, not as an error) *and* TLS/TCP works: a relay that is simply down answers neither,
//! and is reported as unreachable rather than as a UDP block. While on TLS/TCP, `auto` probes
//! QUIC over UDP every [`UDP_PROBE_INTERVAL`] from a throwaway socket; when the relay answers,
//! the control connection moves back to UDP (each move is logged). Every reconnection starts
//! with UDP again. `udp` and `tcp` force one path.
//!
//! Over TLS/TCP the node's socket sends to the relay's address through a [`crate::transport::links`] link
//! instead of UDP; the control connection and the end-to-end connections above it are the same
//! QUIC connections either way, so the end-to-end encryption and authentication do not change.

use crate::transport::node_socket::NodeSocket;
use postern_proto::dgram::ALPN_TCP;
use postern_proto::tls::TlsError;
use rustls::pki_types::ServerName;
use rustls::RootCertStore;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long `auto` waits for the QUIC handshake over UDP before trying TLS/TCP.
pub const UDP_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a node that fell back to TLS/TCP checks whether QUIC over UDP works again.
pub const UDP_PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// How long the TCP connect plus TLS handshake to the relay may take.
pub const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to reach a relay.
#[derive(Debug, Clone)]
pub struct RelayTarget {
    pub addr: SocketAddr,
    /// Name in the relay's certificate.
    pub name: String,
}

/// Which paths to the relay a node may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportMode {
    /// UDP, falling back to TLS/TCP when the UDP handshake times out.
    #[default]
    Auto,
    /// UDP only.
    Udp,
    /// TLS/TCP only.
    Tcp,
}

impl FromStr for TransportMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "udp" => Ok(Self::Udp),
            "tcp" => Ok(Self::Tcp),
            other => Err(format!(
                "unknown transport {other:?} (expected auto, udp or tcp)"
            )),
        }
    }
}

/// The path a control connection actually uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    /// Lower-case name, for logs, metrics labels and `/readyz`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node's transport settings (the same for every relay it uses).
#[derive(Debug, Clone, Default)]
pub struct TransportSettings {
    pub mode: TransportMode,
    /// TCP port of the relays' TLS listener [default: the relay's UDP port].
    pub tcp_port: Option<u16>,
    /// How long `auto` waits for UDP [default: [`UDP_HANDSHAKE_TIMEOUT`]].
    pub udp_timeout: Option<Duration>,
    /// How often `auto` on TLS/TCP probes UDP [default: [`UDP_PROBE_INTERVAL`]].
    pub udp_probe_interval: Option<Duration>,
    /// The congestion controller of end-to-end connections (over either path).
    pub congestion: crate::transport::endpoint::Congestion,
    /// Whether end-to-end connections may leave the relay for a direct path
    /// ([`crate::transport::direct`]).
    pub direct: crate::transport::direct::DirectMode,
}

/// Which transport each relay's control connection uses now, for metrics and `/readyz`.
#[derive(Debug, Default)]
pub struct TransportStatus {
    by_relay: Mutex<BTreeMap<SocketAddr, Transport>>,
    /// Relays that refuse this node for good (e.g. its identity is revoked), and why.
    refused: Mutex<BTreeMap<SocketAddr, String>>,
}

impl TransportStatus {
    /// Records that `relay` refuses this node for good (`Some(why)`), or no longer does.
    pub fn set_refused(&self, relay: SocketAddr, why: Option<String>) {
        let mut map = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        match why {
            Some(w) => map.insert(relay, w),
            None => map.remove(&relay),
        };
    }

    /// Relays that refuse this node for good, and why (for `/readyz`).
    pub fn refusals(&self) -> Vec<(SocketAddr, String)> {
        let map = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(a, w)| (*a, w.clone())).collect()
    }

    /// Why the node is not ready when no relay is connected: a relay's refusal if there is
    /// one, else `fallback`.
    pub fn not_ready_reason(&self, fallback: &str) -> String {
        match self.refusals().first() {
            Some((relay, why)) => format!("relay {relay} refuses this node: {why}"),
            None => fallback.to_owned(),
        }
    }

    fn set(&self, relay: SocketAddr, transport: Option<Transport>) {
        let mut map = self.by_relay.lock().unwrap_or_else(|p| p.into_inner());
        match transport {
            Some(t) => map.insert(relay, t),
            None => map.remove(&relay),
        };
    }

    /// Connected relays and the transport each uses.
    pub fn snapshot(&self) -> Vec<(SocketAddr, Transport)> {
        let map = self.by_relay.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(a, t)| (*a, *t)).collect()
    }

    /// The transport used to reach `relay`, if connected.
    pub fn transport(&self, relay: SocketAddr) -> Option<Transport> {
        self.snapshot()
            .into_iter()
            .find(|(a, _)| *a == relay)
            .map(|(_, t)| t)
    }

    /// e.g. `relay 203.0.113.1:4433 via tcp`, one per connected relay (for `/readyz`).
    pub fn describe(&self) -> String {
        self.snapshot()
            .iter()
            .map(|(a, t)| format!("relay {a} via {t}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Renders `<metric>{relay,transport} 1` per connected relay, and 0 for the other
    /// transport, so a dashboard sees a switch as a change of value.
    pub fn render(&self, out: &mut crate::runtime::ops::Exposition, metric: &str) {
        out.family(
            metric,
            "1 for the transport (udp or tcp) each relay's control connection uses now.",
            crate::runtime::ops::Kind::Gauge,
        );
        for (relay, t) in self.snapshot() {
            let relay = relay.to_string();
            for candidate in [Transport::Udp, Transport::Tcp] {
                let v = if candidate == t { 1.0 } else { 0.0 };
                out.sample(
                    metric,
                    &[("relay", &relay), ("transport", candidate.as_str())],
                    v,
                );
            }
        }
    }
}

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    #[error("cannot start connection: {0}")]
    Start(#[from] quinn::ConnectError),
    #[error("QUIC handshake over {transport}: {source}")]
    Handshake {
        transport: Transport,
        source: quinn::ConnectionError,
    },
    #[error("QUIC handshake over {0} timed out")]
    HandshakeTimeout(Transport),
    #[error("TLS/TCP connection to {addr}: {reason}")]
    Tcp { addr: SocketAddr, reason: String },
    /// Neither path answered: the relay is down or unreachable, not merely behind a UDP block.
    #[error("relay unreachable: no answer over UDP ({udp}) and {tcp}")]
    Unreachable {
        udp: Box<PathError>,
        tcp: Box<PathError>,
    },
}

impl PathError {
    /// The peer never answered (what a firewall dropping UDP looks like).
    fn is_silence(&self) -> bool {
        matches!(
            self,
            Self::HandshakeTimeout(_)
                | Self::Handshake {
                    source: quinn::ConnectionError::TimedOut,
                    ..
                }
        )
    }
}

/// One relay's path selection for one node socket.
pub struct RelayPath {
    socket: Arc<NodeSocket>,
    relay: RelayTarget,
    tcp_addr: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    settings: TransportSettings,
    status: Arc<TransportStatus>,
    /// Stops the current TLS/TCP link, if any.
    link: Mutex<Option<CancellationToken>>,
}

impl fmt::Debug for RelayPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayPath")
            .field("relay", &self.relay.addr)
            .field("tcp", &self.tcp_addr)
            .field("mode", &self.settings.mode)
            .finish_non_exhaustive()
    }
}

/// An established control connection and how it got there.
pub struct Connected {
    pub conn: quinn::Connection,
    pub transport: Transport,
    /// Cancelled when the TLS/TCP link under the connection ends (never, for UDP).
    pub link_lost: CancellationToken,
    /// Cancelled when a probe found QUIC over UDP working again while this connection runs
    /// over TLS/TCP in `auto` mode: the caller should reconnect (UDP is tried first).
    pub udp_works: CancellationToken,
}

impl RelayPath {
    /// Paths to `relay` through `socket`; `roots` verify the relay's TLS certificate.
    pub fn new(
        socket: Arc<NodeSocket>,
        relay: RelayTarget,
        roots: Arc<RootCertStore>,
        settings: TransportSettings,
        status: Arc<TransportStatus>,
    ) -> Result<Self, TlsError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(postern_proto::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![ALPN_TCP.to_vec()];
        let tcp_addr = SocketAddr::new(
            relay.addr.ip(),
            settings.tcp_port.unwrap_or(relay.addr.port()),
        );
        Ok(Self {
            socket,
            relay,
            tcp_addr,
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
            settings,
            status,
            link: Mutex::default(),
        })
    }

    /// Whether this node's end-to-end connections may take a direct path.
    pub fn direct_mode(&self) -> crate::transport::direct::DirectMode {
        self.settings.direct
    }

    /// The node socket this path sends from.
    pub fn socket(&self) -> &Arc<NodeSocket> {
        &self.socket
    }

    /// The relay this path leads to.
    pub fn relay(&self) -> &RelayTarget {
        &self.relay
    }

    /// Makes one control connection, over the transport the mode allows (see the module docs).
    pub async fn connect(
        &self,
        endpoint: &quinn::Endpoint,
        client: quinn::ClientConfig,
    ) -> Result<Connected, PathError> {
        self.disconnected();
        match self.settings.mode {
            TransportMode::Udp => self.over_udp(endpoint, client, None).await,
            TransportMode::Tcp => self.over_tcp(endpoint, client).await,
            TransportMode::Auto => {
                let wait = self.settings.udp_timeout.unwrap_or(UDP_HANDSHAKE_TIMEOUT);
                match self.over_udp(endpoint, client.clone(), Some(wait)).await {
                    Ok(c) => Ok(c),
                    // The relay answered over UDP (refused, closed, wrong certificate...): UDP
                    // works, so TCP would not help. Only silence means UDP is blocked.
                    Err(e) if !e.is_silence() => Err(e),
                    Err(udp) => {
                        tracing::debug!(relay = %self.relay.addr, tcp = %self.tcp_addr, error = %udp, "no answer over UDP; trying TLS/TCP");
                        match self.over_tcp(endpoint, client.clone()).await {
                            Ok(c) => {
                                let every = self.probe_interval();
                                tracing::warn!(relay = %self.relay.addr, tcp = %self.tcp_addr, udp_error = %udp, probe_every = ?every, "no QUIC over UDP to the relay but TLS/TCP works: using TLS/TCP, and moving back to UDP when a probe gets through");
                                self.probe_udp(client, &c);
                                Ok(c)
                            }
                            Err(tcp) => Err(PathError::Unreachable {
                                udp: Box::new(udp),
                                tcp: Box::new(tcp),
                            }),
                        }
                    }
                }
            }
        }
    }

    fn probe_interval(&self) -> Duration {
        self.settings
            .udp_probe_interval
            .unwrap_or(UDP_PROBE_INTERVAL)
    }

    /// While `over_tcp` lives, tries a QUIC handshake over UDP every probe interval from a
    /// throwaway socket (the node's own socket sends to this relay through the TLS/TCP link
    /// now, so it cannot tell). The first handshake that completes is closed at once and
    /// `udp_works` is cancelled, so the control connection reconnects, UDP first.
    fn probe_udp(&self, client: quinn::ClientConfig, over_tcp: &Connected) {
        let (relay, every) = (self.relay.clone(), self.probe_interval());
        let wait = self.settings.udp_timeout.unwrap_or(UDP_HANDSHAKE_TIMEOUT);
        let (lost, works) = (over_tcp.link_lost.clone(), over_tcp.udp_works.clone());
        tokio::spawn(async move {
            let local: SocketAddr = match relay.addr {
                SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            loop {
                tokio::select! {
                    _ = lost.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let probe = async {
                    let endpoint = quinn::Endpoint::client(local).ok()?;
                    let connecting = endpoint
                        .connect_with(client.clone(), relay.addr, &relay.name)
                        .ok()?;
                    let conn = tokio::time::timeout(wait, connecting).await.ok()?.ok()?;
                    conn.close(postern_proto::msg::code::OK.into(), b"UDP probe");
                    endpoint.wait_idle().await;
                    Some(())
                };
                let answered = tokio::select! {
                    _ = lost.cancelled() => return,
                    r = probe => r.is_some(),
                };
                if answered {
                    tracing::info!(relay = %relay.addr, "QUIC over UDP reaches the relay again: moving the control connection back from TLS/TCP to UDP");
                    works.cancel();
                    return;
                }
                tracing::debug!(relay = %relay.addr, "UDP probe got no answer; staying on TLS/TCP");
            }
        });
    }

    /// The status this path reports to.
    pub fn status(&self) -> &TransportStatus {
        &self.status
    }

    /// The control connection is gone: drop the link under it (the next attempt starts
    /// afresh) and stop reporting a transport.
    pub fn disconnected(&self) {
        if let Some(stop) = self.link.lock().unwrap_or_else(|p| p.into_inner()).take() {
            stop.cancel();
        }
        self.socket.links().detach(self.relay.addr);
        self.status
            .set(crate::transport::udp::canonical(self.relay.addr), None);
    }

    fn up(
        &self,
        conn: quinn::Connection,
        transport: Transport,
        link_lost: CancellationToken,
    ) -> Connected {
        self.status.set(
            crate::transport::udp::canonical(self.relay.addr),
            Some(transport),
        );
        Connected {
            conn,
            transport,
            link_lost,
            udp_works: CancellationToken::new(),
        }
    }

    async fn over_udp(
        &self,
        endpoint: &quinn::Endpoint,
        client: quinn::ClientConfig,
        timeout: Option<Duration>,
    ) -> Result<Connected, PathError> {
        let connecting = endpoint.connect_with(client, self.relay.addr, &self.relay.name)?;
        let conn = match timeout {
            Some(t) => tokio::time::timeout(t, connecting)
                .await
                .map_err(|_| PathError::HandshakeTimeout(Transport::Udp))?,
            None => connecting.await,
        }
        .map_err(|source| PathError::Handshake {
            transport: Transport::Udp,
            source,
        })?;
        Ok(self.up(conn, Transport::Udp, CancellationToken::new()))
    }

    async fn over_tcp(
        &self,
        endpoint: &quinn::Endpoint,
        client: quinn::ClientConfig,
    ) -> Result<Connected, PathError> {
        let addr = self.tcp_addr;
        let tcp_err = |reason: String| PathError::Tcp { addr, reason };
        let name = ServerName::try_from(self.relay.name.clone())
            .map_err(|e| tcp_err(format!("relay name {:?}: {e}", self.relay.name)))?;
        let open = async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| tcp_err(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            self.tls
                .connect(name, tcp)
                .await
                .map_err(|e| tcp_err(format!("TLS: {e}")))
        };
        let tls = tokio::time::timeout(TCP_CONNECT_TIMEOUT, open)
            .await
            .map_err(|_| tcp_err("timed out".into()))??;
        let stop = CancellationToken::new();
        let lost = CancellationToken::new();
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = Some(stop.clone());
        let (links, relay, lost_tx) = (self.socket.links(), self.relay.addr, lost.clone());
        // Attached before the QUIC handshake starts, so its first packet already takes the link.
        let attached = links.attach(relay);
        tokio::spawn(async move {
            match links.run(attached, tls, stop).await {
                Ok(()) => tracing::debug!(%relay, "TLS/TCP link to relay closed"),
                Err(e) => tracing::warn!(%relay, error = %e, "TLS/TCP link to relay ended"),
            }
            lost_tx.cancel();
        });
        let connecting = endpoint.connect_with(client, self.relay.addr, &self.relay.name)?;
        let conn = tokio::select! {
            r = connecting => r.map_err(|source| PathError::Handshake { transport: Transport::Tcp, source })?,
            _ = lost.cancelled() => return Err(tcp_err("link closed during the QUIC handshake".into())),
        };
        Ok(self.up(conn, Transport::Tcp, lost))
    }
}

/// `relay` in a node's config file: one `host:port` or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(untagged)]
pub enum RelayList {
    One(String),
    Many(Vec<String>),
}

impl RelayList {
    /// The addresses, in order.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(r) => vec![r],
            Self::Many(v) => v,
        }
    }
}

/// Relays from flags (when any were given) or else from the file: the first, and the others.
pub fn merge_relays(flags: Vec<String>, file: Option<RelayList>) -> (Option<String>, Vec<String>) {
    let mut all = if flags.is_empty() {
        file.map(RelayList::into_vec).unwrap_or_default()
    } else {
        flags
    };
    if all.is_empty() {
        return (None, Vec::new());
    }
    let first = all.remove(0);
    (Some(first), all)
}

/// Resolves the relays after the first; they carry the same certificate name as the first.
pub fn resolve_relays(addrs: &[String], name: &str) -> Result<Vec<RelayTarget>, String> {
    use std::net::ToSocketAddrs;
    addrs
        .iter()
        .map(|text| {
            let addr = text
                .to_socket_addrs()
                .map_err(|e| format!("relay: cannot resolve {text:?}: {e}"))?
                .next()
                .ok_or_else(|| format!("relay: {text:?} resolves to no address"))?;
            Ok(RelayTarget {
                addr,
                name: name.to_owned(),
            })
        })
        .collect()
}

/// Every relay `addrs` name, as a node uses them: each address a name resolves to is a relay
/// of its own (a fleet's DNS name resolving to several relays bootstraps a node with all of
/// them), in order, without repeats. Only addresses of `like`'s family are kept (the node's
/// socket is bound for it), unless a name has none of that family.
pub fn resolve_all(
    addrs: &[String],
    name: &str,
    like: SocketAddr,
) -> Result<Vec<RelayTarget>, String> {
    use std::net::ToSocketAddrs;
    let mut resolved = Vec::new();
    for text in addrs {
        let list: Vec<SocketAddr> = text
            .to_socket_addrs()
            .map_err(|e| format!("relay: cannot resolve {text:?}: {e}"))?
            .collect();
        if list.is_empty() {
            return Err(format!("relay: {text:?} resolves to no address"));
        }
        resolved.push(list);
    }
    Ok(expand(resolved, like)
        .into_iter()
        .map(|addr| RelayTarget {
            addr,
            name: name.to_owned(),
        })
        .collect())
}

/// The addresses each name resolved to, flattened as [`resolve_all`] says.
fn expand(resolved: Vec<Vec<SocketAddr>>, like: SocketAddr) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for list in resolved {
        let same: Vec<SocketAddr> = list
            .iter()
            .copied()
            .filter(|a| a.is_ipv4() == like.is_ipv4())
            .collect();
        let keep = if same.is_empty() {
            list.into_iter().take(1).collect()
        } else {
            same
        };
        for a in keep {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_resolving_to_several_addresses_gives_several_relays() {
        let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let like = a("10.0.0.1:4433");
        let got = expand(
            vec![
                vec![a("10.0.0.1:4433"), a("10.0.0.2:4433"), a("[::1]:4433")],
                vec![a("10.0.0.2:4433"), a("10.0.0.3:4433")],
                vec![a("[::2]:4433")],
            ],
            like,
        );
        assert_eq!(
            got,
            [
                a("10.0.0.1:4433"),
                a("10.0.0.2:4433"),
                a("10.0.0.3:4433"),
                a("[::2]:4433")
            ]
        );
        let real = resolve_all(&["127.0.0.1:7".into(), "127.0.0.1:7".into()], "relay", like)
            .expect("resolve");
        assert_eq!(real.len(), 1);
        assert!(resolve_all(&["nope".into()], "relay", like).is_err());
    }

    #[test]
    fn relay_may_be_one_or_a_list() {
        #[derive(serde::Deserialize)]
        struct F {
            relay: RelayList,
        }
        let one: F = toml::from_str("relay = \"a:1\"").expect("one");
        assert_eq!(
            merge_relays(vec![], Some(one.relay)),
            (Some("a:1".into()), vec![])
        );
        let many: F = toml::from_str("relay = [\"a:1\", \"b:2\", \"c:3\"]").expect("many");
        assert_eq!(
            merge_relays(vec![], Some(many.relay.clone())),
            (Some("a:1".into()), vec!["b:2".into(), "c:3".into()])
        );
        // Flags replace the file's list.
        assert_eq!(
            merge_relays(vec!["x:9".into()], Some(many.relay)),
            (Some("x:9".into()), vec![])
        );
        assert_eq!(merge_relays(vec![], None), (None, vec![]));
    }

    #[test]
    fn transport_names_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!("tcp".parse::<TransportMode>(), Ok(TransportMode::Tcp));
        assert_eq!("auto".parse::<TransportMode>(), Ok(TransportMode::Auto));
        let e = "quic".parse::<TransportMode>().expect_err("unknown");
        assert!(e.contains("auto, udp or tcp"), "{e}");
        let resolved = resolve_relays(&["127.0.0.1:5".into()], "relay").expect("resolve");
        assert_eq!(resolved[0].addr.port(), 5);
        assert!(resolve_relays(&["nope".into()], "relay").is_err());
    }
}
