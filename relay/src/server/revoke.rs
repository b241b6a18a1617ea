//! Revocations take effect at once: the revoked node's control connection and routes are
//! dropped, and the other nodes are told so they close its end-to-end connections. They come
//! from the authority's files (`postern-relay identity revoke` on a stopped or other process,
//! watched here) or from the admin API.

use super::shared::{forget_node, Shared};
use crate::authority::Authority;
use crate::registry::NodeId;
use postern_net::control::exchange::{self, CTL_TIMEOUT};
use postern_proto::msg::Ctl;
use postern_proto::name::NodeName;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Applies revocations made with `postern-relay identity revoke` within a fraction of a second:
/// the node's control connection and routes are dropped, and outlets are told so they close
/// the node's end-to-end connections.
pub(super) async fn watch_revocations(
    shared: Arc<Shared>,
    authority: Arc<Authority>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let a = authority.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || a.revoked()).await else {
            continue;
        };
        let newly: Vec<NodeName> = {
            let mut known = shared.revoked();
            let newly = now.difference(&known).cloned().collect();
            *known = now;
            newly
        };
        for name in newly {
            apply_revocation(&shared, &name);
        }
    }
}

/// Cuts a newly revoked identity off: its control connection and routes are dropped, and the
/// other nodes are told so they close its end-to-end connections. Returns whether it was
/// connected.
pub(super) fn apply_revocation(shared: &Arc<Shared>, name: &NodeName) -> bool {
    tracing::info!(target: "postern::audit", event = "revocation", node = %name, "identity revoked");
    let (victim, outlets) = {
        let reg = shared.registry();
        let victim = reg.by_name(name);
        let outlets: Vec<NodeId> = reg.ids();
        (victim, outlets)
    };
    if let Some(id) = victim {
        if let Some(c) = shared.conn(id) {
            c.close(
                postern_proto::msg::code::NOT_ALLOWED.into(),
                b"identity revoked",
            );
        }
        forget_node(shared, id);
    }
    for id in outlets {
        if Some(id) == victim {
            continue;
        }
        if let Some(c) = shared.conn(id) {
            let msg = Ctl::Revoked { name: name.clone() };
            tokio::spawn(async move {
                let _ = exchange::request(&c, &msg, CTL_TIMEOUT).await;
            });
        }
    }
    victim.is_some()
}
