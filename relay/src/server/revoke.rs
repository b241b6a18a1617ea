//! Revocations take effect at once: the revoked node's control connection and routes are
//! dropped, and the other nodes are told so they close its end-to-end connections. They come
//! from the fleet's shared state (the authority's files or etcd, followed here: a revocation
//! made by another relay or by `postern-relay identity revoke`) or from the admin API.

use super::admin_ops::{apply_drain, undrain_local};
use super::shared::{forget_node, Shared};
use crate::fleet::Snapshot;
use crate::registry::NodeId;
use postern_net::control::exchange::{self, CTL_TIMEOUT};
use postern_proto::msg::Ctl;
use postern_proto::name::NodeName;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Applies what the fleet's state says, as soon as it says it: a revocation made anywhere
/// (this relay, another one, `postern-relay identity revoke`) cuts the node off here; a drain
/// made on another relay drains the node here too (closing it after the drain's timeout), and
/// its end lets it back in.
pub(super) async fn follow_fleet(
    shared: Arc<Shared>,
    mut rx: watch::Receiver<Snapshot>,
    shutdown: CancellationToken,
) {
    let mut last = rx.borrow().clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
        let now = rx.borrow_and_update().clone();
        // Revocations are never undone: the known set only grows (it also holds revocations
        // this relay applied in memory only).
        let newly: Vec<NodeName> = {
            let mut known = shared.revoked();
            now.revoked
                .iter()
                .filter(|n| known.insert((*n).clone()))
                .cloned()
                .collect()
        };
        for name in newly {
            apply_revocation(&shared, &name);
        }
        for (name, d) in &now.drained {
            if !shared.admin.is_drained(name) {
                let timeout = Duration::from_millis(d.timeout_ms);
                apply_drain(&shared, name, d.services.clone(), timeout);
            }
        }
        for name in last.drained.keys() {
            if !now.drained.contains_key(name) {
                undrain_local(&shared, name);
            }
        }
        last = now;
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
