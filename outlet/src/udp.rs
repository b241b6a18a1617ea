//! UDP services at the outlet: datagrams arrive as QUIC datagrams on an inlet's end-to-end
//! connection (framing: [`postern_proto::udp`]); each client flow gets its own UDP socket
//! connected to the service's target, so the target's replies come back on that socket and
//! go to that flow, and so to the client that sent it. A flow is checked against the service's
//! `allow` once, when the inlet names it, as a stream is when it opens; it ends after the
//! service's idle timeout, or with its connection.

use crate::serve::Services;
use bytes::Bytes;
use postern_proto::name::{NodeName, ServiceName};
use postern_proto::policy::Attributes;
use postern_proto::udp::{Frame, RefuseCode};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tracing::Instrument;

/// A UDP service's target and how long its flows live idle.
#[derive(Debug, Clone)]
pub struct UdpTarget {
    /// `host:port`.
    pub to: String,
    pub idle_timeout: Duration,
}

/// Datagrams through the outlet's UDP services, by service and direction (`up`: client to
/// service, `down`: service to client).
pub const DATAGRAMS: &str = "postern_outlet_udp_datagrams_total";
/// Datagrams the outlet did not forward, by reason.
pub const DROPS: &str = "postern_outlet_udp_drops_total";
/// Flows opened, by service.
pub const FLOWS: &str = "postern_outlet_udp_flows_total";

/// Largest datagram read from a target (the UDP maximum): a reply is never truncated here; one
/// too big for the connection is dropped and counted instead.
const MAX_UDP: usize = 65_535;

fn dropped(service: &str, reason: &'static str) {
    metrics::counter!(DROPS, "service" => service.to_owned(), "reason" => reason).increment(1);
}

/// One client flow: its socket to the target and the task reading the target's replies.
struct Flow {
    service: ServiceName,
    socket: Arc<UdpSocket>,
    /// Milliseconds since `epoch` of the last datagram either way.
    last: Arc<AtomicU64>,
    idle: Duration,
    replies: tokio::task::AbortHandle,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

/// Serves the QUIC datagrams of one end-to-end connection until it closes.
pub(crate) async fn serve_datagrams(
    conn: quinn::Connection,
    live: Arc<crate::reload::Live>,
    inlet: NodeName,
    attrs: Arc<Attributes>,
) {
    let epoch = Instant::now();
    let since = move || u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut flows: HashMap<u32, Flow> = HashMap::new();
    let shortest = live
        .get()
        .udp
        .values()
        .map(|t| t.idle_timeout)
        .min()
        .unwrap_or(postern_proto::udp::DEFAULT_IDLE_TIMEOUT);
    let mut sweep = tokio::time::interval(
        (shortest / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)),
    );
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let datagram = tokio::select! {
            d = conn.read_datagram() => d,
            _ = sweep.tick() => {
                let now = since();
                flows.retain(|id, f| {
                    let idle = now.saturating_sub(f.last.load(Ordering::Relaxed));
                    let keep = u128::from(idle) < f.idle.as_millis();
                    if !keep {
                        tracing::debug!(flow = id, service = %f.service, "UDP flow idle; closed");
                    }
                    keep
                });
                continue;
            }
        };
        let datagram = match datagram {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, flows = flows.len(), "datagrams end with the connection");
                return;
            }
        };
        let frame = match Frame::decode(&datagram) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "malformed UDP service datagram dropped");
                dropped("", "bad_frame");
                continue;
            }
        };
        let (flow, payload) = match frame {
            Frame::Open {
                flow,
                service,
                payload,
            } => {
                if let std::collections::hash_map::Entry::Vacant(slot) = flows.entry(flow) {
                    let services = live.get();
                    match open_flow(&conn, &services, &inlet, &attrs, flow, &service, since).await {
                        Ok(f) => {
                            slot.insert(f);
                        }
                        Err(reason) => {
                            dropped(service.as_str(), reason.as_str());
                            let _ = conn.send_datagram(Bytes::from(
                                Frame::Refused { flow, reason }.to_vec(),
                            ));
                            continue;
                        }
                    }
                }
                // Acknowledged each time it is named: the inlet names it until an ack arrives.
                let _ = conn.send_datagram(Bytes::from(Frame::Ack { flow }.to_vec()));
                (flow, payload)
            }
            Frame::Data { flow, payload } => {
                if !flows.contains_key(&flow) {
                    // Timed out here first (or the outlet restarted): the inlet names it again.
                    dropped("", "unknown_flow");
                    let _ = conn.send_datagram(Bytes::from(Frame::Unknown { flow }.to_vec()));
                    continue;
                }
                (flow, payload)
            }
            Frame::Ack { .. } | Frame::Unknown { .. } | Frame::Refused { .. } => {
                // Only the outlet sends these.
                dropped("", "bad_frame");
                continue;
            }
        };
        let Some(f) = flows.get(&flow) else { continue };
        f.last.store(since(), Ordering::Relaxed);
        match f.socket.send(payload).await {
            Ok(_) => {
                metrics::counter!(DATAGRAMS, "service" => f.service.as_str().to_owned(), "direction" => "up")
                    .increment(1);
            }
            Err(e) => {
                // E.g. the target's port answered ICMP unreachable to an earlier datagram.
                tracing::debug!(error = %e, service = %f.service, "sending to the UDP target failed");
                dropped(f.service.as_str(), "target_error");
            }
        }
    }
}

/// Sets up flow `flow` of `service` for `inlet`, or says why not.
async fn open_flow(
    conn: &quinn::Connection,
    services: &Services,
    inlet: &NodeName,
    attrs: &Attributes,
    flow: u32,
    service: &ServiceName,
    since: impl Fn() -> u64 + Send + 'static,
) -> Result<Flow, RefuseCode> {
    let Some(target) = services.udp.get(service) else {
        tracing::warn!(%service, "UDP flow for a service this outlet does not serve over UDP");
        return Err(RefuseCode::UnknownService);
    };
    if let Some(rule) = services.allow.get(service) {
        let mut all = attrs.clone();
        all.insert("name".into(), inlet.to_string());
        let allowed = rule.eval(&all);
        tracing::info!(target: "postern::audit", event = "policy", action = "use", node = %inlet, %service, allowed, rule = %rule, protocol = "udp");
        if !allowed {
            tracing::warn!(%service, rule = %rule, "inlet not allowed by this outlet's `allow`; refusing UDP flow");
            return Err(RefuseCode::NotAllowed);
        }
    }
    let socket = match connect(&target.to).await {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::warn!(%service, to = %target.to, error = %e, "cannot open a UDP socket to the service's target; refusing flow");
            return Err(RefuseCode::TargetUnreachable);
        }
    };
    metrics::counter!(FLOWS, "service" => service.as_str().to_owned()).increment(1);
    tracing::debug!(flow, %service, "UDP flow opened");
    let last = Arc::new(AtomicU64::new(since()));
    let replies = tokio::spawn(
        replies(
            conn.clone(),
            socket.clone(),
            flow,
            service.clone(),
            last.clone(),
            since,
        )
        .in_current_span(),
    )
    .abort_handle();
    Ok(Flow {
        service: service.clone(),
        socket,
        last,
        idle: target.idle_timeout,
        replies,
    })
}

/// A UDP socket connected to `to`, bound to the wildcard address of its family.
async fn connect(to: &str) -> std::io::Result<UdpSocket> {
    let addr = tokio::net::lookup_host(to)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{to} resolves to no address")))?;
    let bind: std::net::SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(addr).await?;
    Ok(socket)
}

/// Carries the target's replies of one flow back to the inlet.
async fn replies(
    conn: quinn::Connection,
    socket: Arc<UdpSocket>,
    flow: u32,
    service: ServiceName,
    last: Arc<AtomicU64>,
    since: impl Fn() -> u64,
) {
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let n = match socket.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                // ICMP errors of earlier sends surface here; the socket stays usable.
                tracing::debug!(error = %e, %service, "UDP target socket error");
                continue;
            }
        };
        let payload = buf.get(..n).unwrap_or_default();
        let frame = Frame::Data { flow, payload };
        if conn.max_datagram_size().is_none_or(|max| frame.len() > max) {
            tracing::debug!(len = n, %service, "reply too big for a QUIC datagram; dropped");
            dropped(service.as_str(), "oversize");
            continue;
        }
        match conn.send_datagram(Bytes::from(frame.to_vec())) {
            Ok(()) => {
                last.store(since(), Ordering::Relaxed);
                metrics::counter!(DATAGRAMS, "service" => service.as_str().to_owned(), "direction" => "down")
                    .increment(1);
            }
            Err(quinn::SendDatagramError::ConnectionLost(_)) => return,
            Err(quinn::SendDatagramError::TooLarge) => {
                tracing::debug!(len = n, %service, "reply too big for a QUIC datagram; dropped");
                dropped(service.as_str(), "oversize");
            }
            Err(e) => {
                tracing::debug!(error = %e, %service, "reply not sent");
                dropped(service.as_str(), "unsupported");
            }
        }
    }
}
