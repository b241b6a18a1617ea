//! UDP services at the inlet: a UDP socket whose datagrams travel as QUIC datagrams (RFC 9221)
//! on the service's end-to-end connection (framing: [`postern_proto::udp`]).
//!
//! Each client address is a flow with its own id; every flow of the service shares the one
//! connection. A flow names its service in each datagram until the outlet acknowledges it,
//! then sends bare data frames; replies carry the flow id and go back to that client's address.
//! A flow ends after the service's idle timeout without a datagram either way. Nothing is
//! truncated: a datagram bigger than the connection's current datagram limit is dropped and
//! counted (`reason="oversize"`), as is one that cannot be sent for any other reason.

use crate::pool::Pool;
use bytes::Bytes;
use postern_proto::name::ServiceName;
use postern_proto::udp::{Frame, RefuseCode};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Datagrams through the inlet's UDP services, by service and direction (`up`: client to
/// service, `down`: service to client).
pub const DATAGRAMS: &str = "postern_inlet_udp_datagrams_total";
/// Datagrams not forwarded, by service and reason.
pub const DROPS: &str = "postern_inlet_udp_drops_total";
/// Flows (client addresses) opened, by service.
pub const FLOWS: &str = "postern_inlet_udp_flows_total";

/// Most flows a UDP listener keeps at once; a datagram from a further client address is
/// dropped (`reason="flow_cap"`) until one times out.
pub const MAX_FLOWS: usize = 4096;
/// After the outlet refused a flow, its client's datagrams are dropped here for this long
/// before the outlet is asked again (its policy may have changed meanwhile).
const REFUSED_FOR: Duration = Duration::from_secs(10);
/// After the outlet could not be reached, datagrams are dropped for this long before trying
/// again, so a burst does not queue behind one route set-up after another.
const UNSERVED_FOR: Duration = Duration::from_secs(1);
/// At most one warning per reason this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Flow ids are unique in the process, so a connection never sees one twice.
static NEXT_FLOW: AtomicU32 = AtomicU32::new(1);

struct Flow {
    id: u32,
    /// The outlet acknowledged the flow: data frames need not name the service.
    named: bool,
    last: Instant,
    refused: Option<(RefuseCode, Instant)>,
}

/// A UDP listener's state: its flows and the connection they share.
struct Listener {
    service: ServiceName,
    socket: Arc<UdpSocket>,
    pool: Arc<Pool>,
    idle: Duration,
    flows: HashMap<SocketAddr, Flow>,
    by_id: HashMap<u32, SocketAddr>,
    conn: Option<quinn::Connection>,
    unserved_until: Option<Instant>,
    down_tx: mpsc::Sender<Bytes>,
    warned: HashMap<&'static str, Instant>,
}

/// Serves a UDP listener until `shutdown`.
pub(crate) async fn serve(
    service: ServiceName,
    socket: UdpSocket,
    pool: Arc<Pool>,
    idle: Duration,
    shutdown: CancellationToken,
) {
    tracing::info!(%service, addr = ?socket.local_addr().ok(), protocol = "udp", idle_timeout = ?idle, "listening");
    let (down_tx, mut down_rx) = mpsc::channel(1024);
    let mut l = Listener {
        service,
        socket: Arc::new(socket),
        pool,
        idle,
        flows: HashMap::new(),
        by_id: HashMap::new(),
        conn: None,
        unserved_until: None,
        down_tx,
        warned: HashMap::new(),
    };
    let mut sweep =
        tokio::time::interval((idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; 65_535];
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = l.socket.recv_from(&mut buf) => match r {
                Ok((n, peer)) => l.up(buf.get(..n).unwrap_or_default(), peer).await,
                // ICMP errors of earlier replies surface here; the socket stays usable.
                Err(e) => tracing::debug!(error = %e, "UDP listener receive error"),
            },
            Some(d) = down_rx.recv() => l.down(&d).await,
            _ = sweep.tick() => l.expire(),
        }
    }
    tracing::info!(service = %l.service, flows = l.flows.len(), "UDP listener stopped");
}

impl Listener {
    fn drop_up(&mut self, reason: &'static str, why: &str) {
        metrics::counter!(DROPS, "service" => self.service.as_str().to_owned(), "reason" => reason)
            .increment(1);
        let now = Instant::now();
        let due = self
            .warned
            .get(reason)
            .is_none_or(|t| now.duration_since(*t) >= WARN_EVERY);
        if due {
            self.warned.insert(reason, now);
            tracing::warn!(service = %self.service, reason, "UDP datagram dropped: {why}");
        } else {
            tracing::debug!(service = %self.service, reason, "UDP datagram dropped: {why}");
        }
    }

    /// The connection the service's flows share, set up (or replaced) if needed.
    async fn connection(&mut self) -> Result<quinn::Connection, String> {
        if let Some(c) = &self.conn {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        if self.unserved_until.is_some_and(|t| Instant::now() < t) {
            return Err("the outlet could not be reached a moment ago".into());
        }
        match self.pool.connection(&self.service).await {
            Ok(c) => {
                self.unserved_until = None;
                if self.conn.as_ref().map(quinn::Connection::stable_id) != Some(c.stable_id()) {
                    // A new connection: the outlet knows none of the flows on it yet.
                    for f in self.flows.values_mut() {
                        f.named = false;
                    }
                    let (conn, tx) = (c.clone(), self.down_tx.clone());
                    tokio::spawn(async move {
                        while let Ok(d) = conn.read_datagram().await {
                            if tx.send(d).await.is_err() {
                                return;
                            }
                        }
                    });
                    self.conn = Some(c.clone());
                }
                Ok(c)
            }
            Err(e) => {
                self.unserved_until = Some(Instant::now() + UNSERVED_FOR);
                Err(e.explain(&self.service, self.pool.uplink().transports()))
            }
        }
    }

    /// A client's datagram: to the outlet.
    async fn up(&mut self, payload: &[u8], peer: SocketAddr) {
        metrics::counter!(DATAGRAMS, "service" => self.service.as_str().to_owned(), "direction" => "up")
            .increment(1);
        let now = Instant::now();
        if !self.flows.contains_key(&peer) {
            if self.flows.len() >= MAX_FLOWS {
                return self.drop_up("flow_cap", "too many client addresses at once");
            }
            let id = NEXT_FLOW.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(service = %self.service, %peer, flow = id, "UDP flow opened");
            metrics::counter!(FLOWS, "service" => self.service.as_str().to_owned()).increment(1);
            self.by_id.insert(id, peer);
            self.flows.insert(
                peer,
                Flow {
                    id,
                    named: false,
                    last: now,
                    refused: None,
                },
            );
        }
        let Some(flow) = self.flows.get_mut(&peer) else {
            return;
        };
        flow.last = now;
        if let Some((reason, at)) = flow.refused {
            if now.duration_since(at) < REFUSED_FOR {
                let why = format!(
                    "the outlet refused this client's flow ({})",
                    reason.as_str()
                );
                return self.drop_up("refused", &why);
            }
            flow.refused = None;
            flow.named = false;
        }
        let conn = match self.connection().await {
            Ok(c) => c,
            Err(why) => return self.drop_up("unserved", &why),
        };
        let Some(flow) = self.flows.get(&peer) else {
            return;
        };
        let frame = if flow.named {
            Frame::Data {
                flow: flow.id,
                payload,
            }
        } else {
            Frame::Open {
                flow: flow.id,
                service: self.service.clone(),
                payload,
            }
        };
        // Checked with the naming header whether or not this flow still needs it, so that
        // whether a datagram passes does not depend on when it is sent.
        let limit = conn.max_datagram_size();
        let need = payload.len() + 6 + self.service.as_str().len();
        if limit.is_none_or(|max| need > max) {
            let why = format!(
                "{} bytes do not fit a QUIC datagram of this connection (at most {} with the \
                 header); not truncated",
                payload.len(),
                limit.unwrap_or(0)
            );
            return self.drop_up("oversize", &why);
        }
        match conn.send_datagram(Bytes::from(frame.to_vec())) {
            Ok(()) => {}
            Err(quinn::SendDatagramError::TooLarge) => self.drop_up(
                "oversize",
                "too big for the connection's datagrams; not truncated",
            ),
            Err(e) => self.drop_up("unserved", &e.to_string()),
        }
    }

    /// A datagram from the outlet: a reply to its client, or news about a flow.
    async fn down(&mut self, datagram: &[u8]) {
        let frame = match Frame::decode(datagram) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "malformed datagram from the outlet dropped");
                return self.drop_down("bad_frame");
            }
        };
        let Some(peer) = self.by_id.get(&frame.flow()).copied() else {
            return self.drop_down("unknown_flow");
        };
        let Some(flow) = self.flows.get_mut(&peer) else {
            return self.drop_down("unknown_flow");
        };
        match frame {
            Frame::Data { payload, .. } => {
                flow.last = Instant::now();
                match self.socket.send_to(payload, peer).await {
                    Ok(_) => {
                        metrics::counter!(DATAGRAMS, "service" => self.service.as_str().to_owned(), "direction" => "down")
                            .increment(1);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, %peer, "reply to a UDP client failed");
                        self.drop_down("client_error");
                    }
                }
            }
            Frame::Ack { .. } => flow.named = true,
            Frame::Unknown { .. } => flow.named = false,
            Frame::Refused { reason, .. } => {
                flow.refused = Some((reason, Instant::now()));
                tracing::warn!(service = %self.service, %peer, reason = reason.as_str(), "the outlet refused this client's UDP flow; its datagrams are dropped");
                metrics::counter!(DROPS, "service" => self.service.as_str().to_owned(), "reason" => "refused")
                    .increment(1);
            }
            Frame::Open { .. } => self.drop_down("bad_frame"),
        }
    }

    fn drop_down(&self, reason: &'static str) {
        metrics::counter!(DROPS, "service" => self.service.as_str().to_owned(), "reason" => reason)
            .increment(1);
    }

    /// Ends flows idle for longer than the timeout.
    fn expire(&mut self) {
        let now = Instant::now();
        let idle = self.idle;
        let by_id = &mut self.by_id;
        self.flows.retain(|peer, f| {
            let keep = now.duration_since(f.last) < idle;
            if !keep {
                tracing::debug!(%peer, flow = f.id, "UDP flow idle; closed");
                by_id.remove(&f.id);
            }
            keep
        });
    }
}
