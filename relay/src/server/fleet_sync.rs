//! The relay's part in its fleet beyond the shared state: it follows the fleet's members and
//! outlets' presence (a watched copy, see [`FleetState::follow_fleet`]), tells its nodes the
//! live relays whenever they change ([`Ctl::Relays`]), and records in the fleet which outlets
//! are attached here, so that the other relays can redirect inlets to it.
//!
//! [`FleetState::follow_fleet`]: crate::fleet::FleetState::follow_fleet

use super::shared::Shared;
use crate::fleet::FleetView;
use postern_net::control::exchange::{self, CTL_TIMEOUT};
use postern_proto::msg::{Ctl, FleetRelay};
use postern_proto::name::{NodeName, ServiceName};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long a failed presence write waits before it is tried again.
const PRESENCE_RETRY: Duration = Duration::from_secs(1);

/// Keeps the relay's copy of the fleet view current and tells every connected node when the
/// fleet's relays change.
pub(super) async fn follow(
    shared: Arc<Shared>,
    mut rx: watch::Receiver<FleetView>,
    shutdown: CancellationToken,
) {
    let mut told: Vec<FleetRelay> = Vec::new();
    loop {
        let view = rx.borrow_and_update().clone();
        let relays = view.relays();
        shared.set_view(view);
        if relays != told && !relays.is_empty() {
            tracing::info!(
                relays = relays.len(),
                "the fleet's relays changed; telling the nodes"
            );
            let conns: Vec<quinn::Connection> = shared.conns().values().cloned().collect();
            for c in conns {
                push_relays(c, relays.clone());
            }
            told = relays;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// Tells one node the fleet's live relays (when the relay is in a fleet that it has heard
/// from).
pub(super) fn tell_relays(shared: &Shared, conn: &quinn::Connection) {
    let relays = shared.view().relays();
    if !relays.is_empty() {
        push_relays(conn.clone(), relays);
    }
}

fn push_relays(conn: quinn::Connection, relays: Vec<FleetRelay>) {
    tokio::spawn(async move {
        if let Err(e) = exchange::request(&conn, &Ctl::Relays { relays }, CTL_TIMEOUT).await {
            tracing::debug!(error = %e, "could not tell a node the fleet's relays");
        }
    });
}

/// Which services each connected outlet has registered here.
fn attached(shared: &Shared) -> BTreeMap<NodeName, Vec<ServiceName>> {
    let mut out: BTreeMap<NodeName, Vec<ServiceName>> = BTreeMap::new();
    for (service, outlets) in shared.registry().services() {
        for o in outlets {
            out.entry(o).or_default().push(service.clone());
        }
    }
    for services in out.values_mut() {
        services.sort();
    }
    out
}

/// Records the outlets attached here in the fleet: each time registrations change, the
/// difference with what was last written is written (one task, so writes keep their order);
/// a failed write is tried again until it works.
pub(super) async fn publish_presence(shared: Arc<Shared>, shutdown: CancellationToken) {
    let fleet = shared.fleet();
    let mut written: BTreeMap<NodeName, Vec<ServiceName>> = BTreeMap::new();
    loop {
        let changed = shared.presence_changed.notified();
        let want = attached(&shared);
        let mut failed = false;
        let gone: Vec<NodeName> = written
            .keys()
            .filter(|o| !want.contains_key(*o))
            .cloned()
            .collect();
        let updates = gone.into_iter().map(|o| (o, Vec::new())).chain(
            want.iter()
                .filter(|(o, s)| written.get(*o) != Some(*s))
                .map(|(o, s)| (o.clone(), s.clone())),
        );
        for (outlet, services) in updates.collect::<Vec<_>>() {
            match fleet.set_presence(outlet.clone(), services.clone()).await {
                Ok(()) if services.is_empty() => {
                    written.remove(&outlet);
                }
                Ok(()) => {
                    written.insert(outlet, services);
                }
                Err(e) => {
                    if !failed {
                        tracing::warn!(error = %e, "cannot record the outlets attached here in the fleet; trying again");
                    }
                    failed = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = changed => {}
            _ = tokio::time::sleep(PRESENCE_RETRY), if failed => {}
        }
    }
}
