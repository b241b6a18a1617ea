//! One node's control connection, from handshake to goodbye: the handshake within its time
//! limit, enrollment connections handed to [`super::enroll`], revoked and drained identities
//! turned away, the node entered in the registry (replacing an older connection of the same
//! name), then every control stream it opens answered by [`super::dispatch`] until it leaves.

use super::dispatch::{handle, refused};
use super::enroll::serve_enrollment;
use super::shared::{forget_node, Shared};
use crate::admission::Pending;
use postern_net::control::exchange::{self, CTL_TIMEOUT};
use postern_proto::msg::{Ctl, Refusal};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// Serves one incoming connection: `pending` holds its handshake slot until the node is
/// authenticated (or, for enrollment, until the exchange ends).
pub(super) async fn serve_node(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    pending: Pending,
    timeout: Duration,
) {
    let conn = match tokio::time::timeout(timeout, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            shared.ctl.handshake_failures.fetch_add(1, Relaxed);
            postern_net::refusal!(warn, "handshake_failed", "control handshakes failed", error = %e);
            return;
        }
        Err(_) => {
            shared.ctl.handshake_failures.fetch_add(1, Relaxed);
            postern_net::refusal!(warn, "handshake_timeout", "control handshakes timed out");
            return;
        }
    };
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    if alpn.as_deref() == Some(postern_proto::ticket::ALPN_ENROLL) {
        // Unauthenticated until the ticket is checked: the exchange keeps its pending slot.
        serve_enrollment(&shared, conn, timeout).await;
        drop(pending);
        return;
    }
    let name = match postern_net::transport::endpoint::peer_name(&conn) {
        Ok(n) => n,
        Err(e) => {
            shared.ctl.handshake_failures.fetch_add(1, Relaxed);
            postern_net::refusal!(warn, "no_node_name", "node certificates naming no node", error = %e);
            conn.close(
                postern_proto::msg::code::NOT_ALLOWED.into(),
                b"no node name",
            );
            return;
        }
    };
    if shared.revoked().contains(&name) {
        shared.ctl.handshake_failures.fetch_add(1, Relaxed);
        postern_net::refusal!(warn, "revoked_identity", "refusing revoked identities", node = %name);
        conn.close(
            postern_proto::msg::code::NOT_ALLOWED.into(),
            b"identity revoked",
        );
        return;
    }
    if shared.admin.is_drained(&name) {
        tracing::debug!(node = %name, "refusing a drained node");
        conn.close(
            postern_proto::msg::code::DRAINED.into(),
            b"node drained by the relay operator",
        );
        return;
    }
    // Authenticated: the slot is for handshakes, not for connected nodes; a TLS/TCP link
    // carrying this connection is no longer pending either.
    drop(pending);
    shared
        .tcp_pending
        .authenticated(postern_net::transport::udp::canonical(
            conn.remote_address(),
        ));
    let attrs = postern_net::transport::endpoint::peer_attributes(&conn);
    let id = shared.next_id.fetch_add(1, Relaxed);
    let replaced = {
        let mut reg = shared.registry();
        let old = reg.by_name(&name);
        reg.connect(id, name.clone());
        reg.set_attrs(id, attrs.clone());
        old
    };
    if let Some(old) = replaced {
        // The same node reconnected before its old connection timed out.
        if let Some(c) = shared.conn(old) {
            c.close(
                postern_proto::msg::code::OK.into(),
                b"replaced by a newer connection",
            );
        }
        forget_node(&shared, old);
    }
    shared.conns().insert(id, conn.clone());
    shared.admin.connected(id);
    shared.ctl.nodes_connected.fetch_add(1, Relaxed);
    tracing::info!(node = %name, ?attrs, "node connected");
    super::fleet_sync::tell_relays(&shared, &conn);

    let reason = loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => break e,
        };
        let shared = shared.clone();
        let conn = conn.clone();
        tokio::spawn(
            async move {
                let answer =
                    match tokio::time::timeout(CTL_TIMEOUT, exchange::read_message::<Ctl>(&mut recv))
                        .await
                    {
                        Ok(Ok(msg)) => handle(&shared, id, &conn, msg).await,
                        Ok(Err(e)) => {
                            shared.ctl.bad_messages.fetch_add(1, Relaxed);
                            postern_net::refusal!(warn, "bad_control_message", "bad control messages", error = %e);
                            refused(Refusal::BadMessage {
                                detail: e.to_string(),
                            })
                        }
                        Err(_) => {
                            shared.ctl.bad_messages.fetch_add(1, Relaxed);
                            postern_net::refusal!(warn, "control_message_timeout", "control streams opened but no message arrived in time");
                            refused(Refusal::BadMessage {
                                detail: "timed out waiting for a message".into(),
                            })
                        }
                    };
                if let Ctl::Refused { reason } = &answer {
                    shared.ctl.refused(reason);
                }
                if let Err(e) = exchange::write_message(&mut send, &answer).await {
                    tracing::debug!(error = %e, "could not answer control message");
                }
            }
            .in_current_span(),
        );
    };
    tracing::info!(node = %name, reason = %reason, "node disconnected");
    shared.ctl.nodes_connected.fetch_sub(1, Relaxed);
    shared.conns().remove(&id);
    shared.admin.disconnected(id);
    forget_node(&shared, id);
}
