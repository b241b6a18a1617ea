//! A node's long-lived control connection to a relay, re-established on loss.

use crate::control::exchange::{self, CtlError, CTL_TIMEOUT};
use crate::runtime::backoff::Backoff;
use crate::transport::relay_path::RelayPath;
use postern_proto::msg::{Ctl, Refusal};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What a node does with the relay's pushes and on each (re)connection.
pub trait ControlHandler: Send + Sync + 'static {
    /// Called once per new control connection, before pushes are served (e.g. to register).
    fn on_connect(
        &self,
        conn: &quinn::Connection,
    ) -> impl Future<Output = Result<(), CtlError>> + Send;
    /// Answers one message pushed by the relay.
    fn on_push(&self, msg: Ctl) -> impl Future<Output = Ctl> + Send;
    /// Called when a control connection is lost (its routes at the relay are gone with it).
    /// `refused`: the relay closed it refusing this node for good (e.g. its identity was
    /// revoked), so nothing of this node's should outlive it, direct connections included.
    fn on_disconnect(&self, relay: SocketAddr, refused: bool);
    /// Takes a stream the relay opened with a `PublicStream` frame (a client of the public
    /// ingress); must not block: spawn what serves it. Nodes without public services refuse it.
    fn on_stream(&self, open: Ctl, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        tracing::warn!(message = ?std::mem::discriminant(&open), "relay opened a public stream, but this node serves none");
        let c = quinn::VarInt::from_u32(postern_proto::msg::code::UNKNOWN_SERVICE);
        let _ = send.reset(c);
        let _ = recv.stop(c);
    }
}

/// A client configuration that can be replaced while in use (e.g. after certificate renewal):
/// each new connection takes the current one.
pub type SharedClientConfig = std::sync::Arc<std::sync::RwLock<quinn::ClientConfig>>;

/// The configuration a new connection should use now.
pub fn current_config(shared: &SharedClientConfig) -> quinn::ClientConfig {
    shared.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Reconnect backoff bounds: quick first retry, capped so a relay that comes back is found
/// within a couple of seconds.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Back-off after the relay refused this node for good (its identity is revoked, its policy
/// does not let it register, it is drained, ...; see [`Refusal::is_permanent`]): retrying
/// cannot help until an operator acts, so attempts slow down to one every few minutes instead
/// of hammering the relay (and its log) several times a second.
pub const REFUSED_BACKOFF_BASE: Duration = Duration::from_secs(2);
pub const REFUSED_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A control connection that stays up this long counts as accepted: the back-off starts over
/// and a refusal recorded earlier is cleared. (A relay refuses a revoked node right after the
/// handshake, so a connection coming up proves nothing by itself.)
pub const SETTLED_AFTER: Duration = Duration::from_secs(2);

/// A refusal of this node by a relay that retrying soon cannot change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermanentRefusal {
    /// Short stable name for the metric's `reason` label.
    pub label: &'static str,
    /// What logs and `/readyz` say.
    pub why: String,
}

impl PermanentRefusal {
    /// The permanent refusal in a relay's answer, if it is one (a transient one is not).
    pub fn from_answer(reason: &Refusal) -> Option<Self> {
        reason.is_permanent().then(|| Self {
            label: reason.label(),
            why: reason.to_string(),
        })
    }

    /// Why the relay closed `conn`, when that is a refusal of this node that retrying soon
    /// cannot change (see [`permanent_refusal`]).
    pub fn from_close(conn: &quinn::Connection) -> Option<Self> {
        permanent_refusal(conn).map(|why| Self {
            label: "closed_not_allowed",
            why,
        })
    }
}

/// Why the relay closed `conn`, when that is a refusal of this node that retrying soon cannot
/// change (the relay closes with [`code::NOT_ALLOWED`](postern_proto::msg::code::NOT_ALLOWED),
/// e.g. "identity revoked").
pub fn permanent_refusal(conn: &quinn::Connection) -> Option<String> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(postern_proto::msg::code::NOT_ALLOWED) =>
        {
            // The reason is the relay's text: keep it short and printable for logs and /readyz.
            let text: String = String::from_utf8_lossy(&c.reason)
                .chars()
                .filter(|ch| !ch.is_control())
                .take(200)
                .collect();
            Some(if text.is_empty() {
                "not allowed".to_owned()
            } else {
                text
            })
        }
        _ => None,
    }
}

/// Why a control connection over TLS/TCP was closed on purpose: a UDP probe got through.
const MOVING_TO_UDP: &str = "moving back to QUIC over UDP";

/// Keeps a control connection to the relay of `path` up until `shutdown`, publishing the
/// current one in `current` (None while disconnected). The path decides between UDP and
/// TLS/TCP on each attempt (see [`crate::transport::relay_path`]). A relay that refuses this
/// node for good (a permanent [`Refusal`] of its session set-up, or a close as in
/// [`permanent_refusal`]) is retried only every few minutes, said once in the log and reported
/// in the path's status (for `/readyz`); a transient refusal is retried at once, on the usual
/// back-off.
pub async fn run<H: ControlHandler>(
    endpoint: quinn::Endpoint,
    client: SharedClientConfig,
    path: Arc<RelayPath>,
    handler: Arc<H>,
    current: watch::Sender<Option<quinn::Connection>>,
    shutdown: CancellationToken,
) {
    let relay = path.relay().clone();
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
    let mut refused = Refused::new(&path);
    loop {
        let attempt = async {
            let up = path
                .connect(&endpoint, current_config(&client))
                .await
                .map_err(|e| (format!("cannot reach relay: {e}"), None))?;
            if let Err(e) = handler.on_connect(&up.conn).await {
                // Read before closing: the relay may have closed it with its reason first.
                let closed = PermanentRefusal::from_close(&up.conn);
                up.conn.close(
                    postern_proto::msg::code::OK.into(),
                    b"session set-up failed",
                );
                let permanent = match &e {
                    CtlError::Refused(reason) => PermanentRefusal::from_answer(reason),
                    _ => None,
                }
                .or(closed);
                let what = match &e {
                    CtlError::Refused(_) => "the relay refused our session set-up",
                    _ => "session set-up with the relay failed",
                };
                return Err((format!("{what}: {e}"), permanent));
            }
            Ok::<_, (String, Option<PermanentRefusal>)>(up)
        };
        let up = tokio::select! {
            _ = shutdown.cancelled() => {
                path.disconnected();
                return;
            }
            r = attempt => r,
        };
        let up = match up {
            Ok(c) => c,
            Err((e, refusal)) => {
                path.disconnected();
                let delay = match refusal {
                    Some(why) => refused.delay(why),
                    None => {
                        let delay = backoff.next_delay();
                        tracing::warn!(relay = %relay.addr, retry_in = ?delay, "{e}");
                        delay
                    }
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        let conn = up.conn;
        if refused.why.is_none() {
            tracing::info!(relay = %relay.addr, transport = %up.transport, "control connection up");
        }
        current.send_replace(Some(conn.clone()));
        // Over TLS/TCP too: the relay announces such a node by its public IP and the port
        // of its UDP socket, which it learns from these addresses.
        if path.direct_mode() == crate::transport::direct::DirectMode::Auto {
            announce_local(&conn, path.socket(), relay.addr);
        }
        let pushes = serve_pushes(&conn, handler.as_ref(), path.socket());
        tokio::pin!(pushes);
        let mut settled = false;
        let reason = loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    conn.close(postern_proto::msg::code::SHUTDOWN.into(), b"shutting down");
                    current.send_replace(None);
                    path.disconnected();
                    return;
                }
                _ = up.link_lost.cancelled() => {
                    conn.close(postern_proto::msg::code::OK.into(), b"TLS/TCP link lost");
                    break "the TLS/TCP link to the relay ended".to_owned();
                }
                _ = up.udp_works.cancelled() => {
                    conn.close(postern_proto::msg::code::OK.into(), b"moving to UDP");
                    break MOVING_TO_UDP.to_owned();
                }
                r = &mut pushes => break r,
                _ = tokio::time::sleep(SETTLED_AFTER), if !settled => {
                    settled = true;
                    backoff.reset();
                    refused.accepted();
                }
            }
        };
        current.send_replace(None);
        path.disconnected();
        let refusal = PermanentRefusal::from_close(&conn);
        handler.on_disconnect(relay.addr, refusal.is_some());
        let delay = match refusal {
            Some(why) => refused.delay(why),
            // Not a failure: reconnect at once, UDP first.
            None if reason == MOVING_TO_UDP => Duration::ZERO,
            None => {
                let delay = backoff.next_delay();
                tracing::warn!(relay = %relay.addr, transport = %up.transport, reason = %reason, retry_in = ?delay, "control connection lost");
                delay
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// The state of a relay's permanent refusal of this node: its own slow back-off, and whether
/// it has been logged and reported already.
struct Refused<'a> {
    path: &'a RelayPath,
    why: Option<String>,
    backoff: Backoff,
}

impl<'a> Refused<'a> {
    fn new(path: &'a RelayPath) -> Self {
        Self {
            path,
            why: None,
            backoff: Backoff::new(REFUSED_BACKOFF_BASE, REFUSED_BACKOFF_MAX),
        }
    }

    /// The relay refused this node again: the delay before the next attempt. Logged at error
    /// level the first time (and when the reason changes), at debug level after that.
    fn delay(&mut self, refusal: PermanentRefusal) -> Duration {
        let PermanentRefusal { label, why } = refusal;
        let delay = self.backoff.next_delay();
        let relay = self.path.relay().addr;
        metrics::counter!("postern_node_relay_refusals_total", "reason" => label).increment(1);
        if self.why.as_deref() != Some(why.as_str()) {
            tracing::error!(
                %relay, reason = label, retry_in = ?delay, max_retry_in = ?REFUSED_BACKOFF_MAX,
                "{why}; the relay at {relay} refuses this node, so it is retried only every few \
                 minutes from now on (change the relay's policy, re-enroll the node or ask the \
                 relay's operator)"
            );
            self.path.status().set_refused(relay, Some(why.clone()));
            self.why = Some(why);
        } else {
            tracing::debug!(%relay, reason = %why, retry_in = ?delay, "the relay still refuses this node");
        }
        delay
    }

    /// A connection stayed up: the relay accepts this node (again).
    fn accepted(&mut self) {
        self.backoff.reset();
        if self.why.take().is_some() {
            let relay = self.path.relay().addr;
            tracing::info!(%relay, "the relay accepts this node again");
            self.path.status().set_refused(relay, None);
        }
    }
}

/// Tells the relay where this node's socket is on its own network, so that a peer behind the
/// same NAT can reach it directly ([`crate::transport::direct::local_candidates`]), and, for a
/// node on the TLS/TCP fallback, which port its UDP socket has. An older
/// relay refuses the message; that costs a debug line.
fn announce_local(
    conn: &quinn::Connection,
    socket: &crate::transport::node_socket::NodeSocket,
    relay: SocketAddr,
) {
    use quinn::AsyncUdpSocket;
    let Ok(bound) = socket.local_addr() else {
        return;
    };
    let addrs = crate::transport::direct::local_candidates(bound, relay);
    if addrs.is_empty() {
        return;
    }
    let conn = conn.clone();
    tokio::spawn(async move {
        let msg = Ctl::LocalCandidates { addrs };
        match exchange::request(&conn, &msg, CTL_TIMEOUT).await {
            Ok(Ctl::Ack) => {}
            Ok(_) => tracing::debug!("the relay did not take this node's local addresses"),
            Err(e) => {
                tracing::debug!(error = %e, "could not tell the relay this node's local addresses")
            }
        }
    });
}

async fn serve_pushes<H: ControlHandler>(
    conn: &quinn::Connection,
    handler: &H,
    socket: &crate::transport::node_socket::NodeSocket,
) -> String {
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => return e.to_string(),
        };
        // Pushes are rare and quick; answering them in order keeps route set-up ordered.
        // One frame, not the whole stream: a public stream goes on with the client's bytes.
        let msg =
            match tokio::time::timeout(CTL_TIMEOUT, exchange::read_frame::<Ctl>(&mut recv)).await {
                Ok(Ok(open @ Ctl::PublicStream { .. })) => {
                    handler.on_stream(open, send, recv);
                    continue;
                }
                Ok(Ok(m)) => m,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "bad message from relay");
                    let answer = Ctl::Refused {
                        reason: Refusal::BadMessage {
                            detail: e.to_string(),
                        },
                    };
                    let _ = exchange::write_message(&mut send, &answer).await;
                    continue;
                }
                Err(_) => {
                    tracing::warn!("relay opened a stream and sent nothing");
                    continue;
                }
            };
        let answer = match msg {
            // Every node keeps its peers' candidates the same way; the direct path uses them.
            Ctl::PeerCandidates { route, candidates } => {
                socket.direct().set_candidates(route, candidates);
                Ctl::Ack
            }
            msg => handler.on_push(msg).await,
        };
        if let Err(e) = exchange::write_message(&mut send, &answer).await {
            tracing::debug!(error = %e, "could not answer relay push");
        }
    }
}

/// Waits (at most `timeout`) until a control connection is up and returns it.
pub async fn wait_connected(
    current: &mut watch::Receiver<Option<quinn::Connection>>,
    timeout: Duration,
) -> Option<quinn::Connection> {
    let wait = current.wait_for(|c| c.as_ref().is_some_and(|c| c.close_reason().is_none()));
    match tokio::time::timeout(timeout, wait).await {
        Ok(Ok(c)) => c.clone(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A permanent refusal in an answer takes the slow back-off, labelled by its reason; a
    /// transient one is no such refusal and is retried on the usual back-off.
    #[test]
    fn only_permanent_answers_slow_down() {
        let drained = PermanentRefusal::from_answer(&Refusal::Drained).expect("permanent");
        assert_eq!(drained.label, "drained");
        assert_eq!(drained.why, Refusal::Drained.to_string());
        assert_eq!(PermanentRefusal::from_answer(&Refusal::ShuttingDown), None);
        assert_eq!(PermanentRefusal::from_answer(&Refusal::UnknownNode), None);
    }
}
