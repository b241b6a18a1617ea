//! A node's long-lived control connection to a relay, re-established on loss.

use crate::backoff::Backoff;
use crate::ctl::{self, CtlError, CTL_TIMEOUT};
use crate::relay_path::RelayPath;
use postern_proto::msg::Ctl;
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
    fn on_disconnect(&self, relay: SocketAddr);
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

/// Where and how to reach a relay.
#[derive(Debug, Clone)]
pub struct RelayTarget {
    pub addr: SocketAddr,
    /// Name in the relay's certificate.
    pub name: String,
}

/// Reconnect backoff bounds: quick first retry, capped so a relay that comes back is found
/// within a couple of seconds.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Keeps a control connection to the relay of `path` up until `shutdown`, publishing the
/// current one in `current` (None while disconnected). The path decides between UDP and
/// TLS/TCP on each attempt (see [`crate::relay_path`]).
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
    loop {
        let attempt = async {
            let up = path
                .connect(&endpoint, current_config(&client))
                .await
                .map_err(|e| e.to_string())?;
            if let Err(e) = handler.on_connect(&up.conn).await {
                up.conn.close(
                    postern_proto::msg::code::OK.into(),
                    b"session set-up failed",
                );
                return Err(format!("relay refused our session set-up: {e}"));
            }
            Ok::<_, String>(up)
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
            Err(e) => {
                path.disconnected();
                let delay = backoff.next_delay();
                tracing::warn!(relay = %relay.addr, error = %e, retry_in = ?delay, "cannot reach relay");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        backoff.reset();
        let conn = up.conn;
        tracing::info!(relay = %relay.addr, transport = %up.transport, "control connection up");
        current.send_replace(Some(conn.clone()));
        let reason = tokio::select! {
            _ = shutdown.cancelled() => {
                conn.close(postern_proto::msg::code::SHUTDOWN.into(), b"shutting down");
                current.send_replace(None);
                path.disconnected();
                return;
            }
            _ = up.link_lost.cancelled() => {
                conn.close(postern_proto::msg::code::OK.into(), b"TLS/TCP link lost");
                "the TLS/TCP link to the relay ended".to_owned()
            }
            r = serve_pushes(&conn, handler.as_ref()) => r,
        };
        current.send_replace(None);
        path.disconnected();
        handler.on_disconnect(relay.addr);
        let delay = backoff.next_delay();
        tracing::warn!(relay = %relay.addr, transport = %up.transport, reason = %reason, retry_in = ?delay, "control connection lost");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn serve_pushes<H: ControlHandler>(conn: &quinn::Connection, handler: &H) -> String {
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => return e.to_string(),
        };
        // Pushes are rare and quick; answering them in order keeps route set-up ordered.
        // One frame, not the whole stream: a public stream goes on with the client's bytes.
        let msg = match tokio::time::timeout(CTL_TIMEOUT, ctl::read_frame::<Ctl>(&mut recv)).await {
            Ok(Ok(open @ Ctl::PublicStream { .. })) => {
                handler.on_stream(open, send, recv);
                continue;
            }
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "bad message from relay");
                let _ = ctl::write_message(
                    &mut send,
                    &Ctl::Error {
                        message: e.to_string(),
                    },
                )
                .await;
                continue;
            }
            Err(_) => {
                tracing::warn!("relay opened a stream and sent nothing");
                continue;
            }
        };
        let answer = handler.on_push(msg).await;
        if let Err(e) = ctl::write_message(&mut send, &answer).await {
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
