//! The fleet as an operator sees it (`GET /v1/fleet`, `postern-relay status`): its relays
//! with their load, where outlets are attached, and how the connection to etcd is doing.
//! Built the same way by a running relay (which adds itself and its own outlets) and by
//! `postern-relay status --etcd` (which reads etcd alone).

use super::{FleetState, Member};
use crate::authority::now_ms;
use crate::views::{AttachmentView, FleetView, RelayView};
use std::collections::BTreeMap;

/// What `attachments` of a [`FleetView`] were read from.
#[derive(Debug, Clone)]
pub enum Attachments {
    /// The outlets connected to the relay that answers (all there is without a cluster).
    ThisRelay(Vec<AttachmentView>),
    /// Nothing but the fleet's presence records (the CLI reading etcd alone).
    None,
}

/// The fleet view. `me` is the relay answering, with its current load (`None` from the
/// CLI); without a cluster it is the whole fleet.
pub async fn fleet_view(
    fleet: &dyn FleetState,
    me: Option<&Member>,
    attachments: Attachments,
) -> FleetView {
    let now = now_ms();
    let connected = fleet.connected();
    let cluster = connected.is_some();
    let mut view = FleetView {
        state: fleet.describe(),
        cluster,
        connected,
        ..Default::default()
    };
    let members = if cluster {
        match fleet.members().await {
            Ok(m) => m,
            Err(e) => {
                view.relays_error = Some(e.to_string());
                if me.is_none() {
                    // Read from the CLI: this read is the only sign of the connection.
                    view.connected = Some(false);
                }
                Vec::new()
            }
        }
    } else {
        me.cloned().into_iter().collect()
    };
    view.relays = relay_views(members, me.map(|m| m.name.as_str()), now);
    // With a cluster, the fleet's presence records say where every outlet is attached; when
    // etcd cannot be read, what the caller knows (this relay's own outlets) stands in.
    let fleet_wide = if cluster {
        fleet.presence().await.ok().map(|entries| {
            group_attachments(entries.into_iter().map(|p| (p.outlet, p.relay, p.services)))
        })
    } else {
        None
    };
    let (scope, list) = match (fleet_wide, attachments) {
        (Some(list), _) => ("fleet", list),
        (None, Attachments::ThisRelay(list)) => ("this-relay", list),
        (None, Attachments::None) => ("none", Vec::new()),
    };
    view.attachments_scope = scope.into();
    view.attachments = list;
    if let Some(h) = fleet.health() {
        view.etcd_failures = h
            .failures
            .iter()
            .map(|(k, n)| ((*k).to_owned(), *n))
            .collect();
        if let Some((at, msg)) = h.last_error {
            view.last_etcd_error = Some(msg);
            view.last_etcd_error_age_s = Some(now.saturating_sub(at) / 1000);
        }
    }
    view
}

/// Members as views, sorted by name; `this` marks the relay called `me`.
pub fn relay_views(members: Vec<Member>, me: Option<&str>, now_ms: u64) -> Vec<RelayView> {
    let mut out: Vec<RelayView> = members
        .into_iter()
        .map(|m| RelayView {
            this: me == Some(m.name.as_str()),
            updated_age_ms: now_ms.saturating_sub(m.updated_at_ms),
            nodes: m.load.nodes,
            routes: m.load.routes,
            addresses: m.addresses,
            name: m.name,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Groups presence entries (outlet, relay, services) by outlet: one attachment per outlet
/// with every relay it is attached to (sorted, no repeats) and the union of its services.
///
/// The fleet's presence records ([`FleetState::presence`]) go through here into
/// [`FleetView::attachments`] with scope `fleet`.
pub fn group_attachments(
    entries: impl IntoIterator<
        Item = (
            postern_proto::name::NodeName,
            String,
            Vec<postern_proto::name::ServiceName>,
        ),
    >,
) -> Vec<AttachmentView> {
    let mut by_outlet: BTreeMap<_, (Vec<String>, Vec<_>)> = BTreeMap::new();
    for (outlet, relay, services) in entries {
        let e = by_outlet.entry(outlet).or_default();
        e.0.push(relay);
        e.1.extend(services);
    }
    by_outlet
        .into_iter()
        .map(|(outlet, (mut relays, mut services))| {
            relays.sort();
            relays.dedup();
            services.sort();
            services.dedup();
            AttachmentView {
                outlet,
                relays,
                services,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Load;

    fn member(name: &str, nodes: u64, at: u64) -> Member {
        Member {
            name: name.into(),
            addresses: vec![format!("{name}.example:4433")],
            load: Load { nodes, routes: 1 },
            updated_at_ms: at,
        }
    }

    #[test]
    fn relays_are_sorted_with_their_age_and_the_answering_one_marked() {
        let v = relay_views(
            vec![member("relay-c", 3, 9_000), member("relay-a", 1, 10_000)],
            Some("relay-c"),
            10_500,
        );
        let got: Vec<(&str, u64, u64, bool)> = v
            .iter()
            .map(|r| (r.name.as_str(), r.nodes, r.updated_age_ms, r.this))
            .collect();
        assert_eq!(
            got,
            [("relay-a", 1, 500, false), ("relay-c", 3, 1_500, true)]
        );
    }

    #[test]
    fn presence_entries_group_by_outlet() {
        let n = |s: &str| s.parse().expect("name");
        let svc = |s: &str| postern_proto::name::ServiceName::new(s).expect("service");
        let got = group_attachments([
            (n("o2"), "relay-b".to_string(), vec![svc("db")]),
            (n("o1"), "relay-b".to_string(), vec![svc("web")]),
            (n("o1"), "relay-a".to_string(), vec![svc("web"), svc("api")]),
            (n("o1"), "relay-a".to_string(), vec![]),
        ]);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].outlet.as_str(), "o1");
        assert_eq!(got[0].relays, ["relay-a", "relay-b"]);
        assert_eq!(got[0].services, [svc("api"), svc("web")]);
        assert_eq!(got[1].relays, ["relay-b"]);
    }
}
