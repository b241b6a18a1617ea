//! The relay's control-plane state (sans-IO): which node serves what, and the routes between
//! them; [`PublicRegistry`] does the same for services offered at the public hostname ingress.
//! The server layer holds the connections and applies what this decides.

use postern_proto::fwd::RouteId;
use postern_proto::msg::RefuseReason;
use postern_proto::name::{NodeName, ServiceName};
use postern_proto::policy::Attributes;
use std::collections::{BTreeSet, HashMap};

/// A connected node, numbered per connection (a reconnecting node gets a new id).
pub type NodeId = u64;

#[derive(Debug, Default)]
struct Service {
    outlets: Vec<NodeId>,
    cursor: usize,
}

/// Longest reason kept from an outlet's health report: what it says is passed on to inlets in
/// route refusals, whose frames must stay small whatever an outlet sends.
pub const MAX_REASON_LEN: usize = 300;
/// Most outlets whose reasons a refusal lists.
const MAX_REASONS_LISTED: usize = 4;

/// `reason` cut to [`MAX_REASON_LEN`] bytes (at a character boundary).
pub(crate) fn bounded(reason: &str) -> String {
    if reason.len() <= MAX_REASON_LEN {
        return reason.to_owned();
    }
    let mut end = MAX_REASON_LEN;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &reason[..end])
}

/// Most local addresses kept per node (with its public address, a peer probes at most
/// [`MAX_PEER_CANDIDATES`]).
pub const MAX_LOCAL_CANDIDATES: usize = 3;
/// Most candidate addresses the relay announces for one peer (the nodes take no more).
pub const MAX_PEER_CANDIDATES: usize = 4;

use postern_net::transport::udp::canonical as canonical_addr;

/// Where a node whose public (reflexive) address is `me` may reach its peer: the peer's public
/// address `peer`, then the addresses the peer announced on its own network, but only when
/// both public addresses have the same IP (both behind the same NAT, where those addresses
/// mean something; elsewhere they would make the node probe hosts on its own network that
/// are not its peer). Loopback addresses only where both are on loopback. At most
/// [`MAX_PEER_CANDIDATES`], no duplicates.
pub fn peer_candidates(
    me: std::net::SocketAddr,
    peer: std::net::SocketAddr,
    peer_local: &[std::net::SocketAddr],
) -> Vec<std::net::SocketAddr> {
    candidates_for(Sighting::udp(me), Sighting::udp(peer), peer_local)
}

/// Where the relay sees one end of a route, for the direct path's candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sighting {
    /// The node's public IP: the source of its control connection (over UDP, or over the
    /// TLS/TCP fallback: the same NAT's public IP).
    pub ip: std::net::IpAddr,
    /// Where a peer may send it UDP: its reflexive address over UDP. Over TLS/TCP the relay
    /// never saw its UDP, and the TCP source port means nothing for UDP: its public IP with
    /// the port of its UDP socket (as announced in its local addresses), which a NAT that
    /// keeps source ports (most do, for UDP) uses for its UDP too; None when it announced
    /// no local address.
    pub udp: Option<std::net::SocketAddr>,
}

impl Sighting {
    /// A node whose control connection comes over UDP from `reflexive`.
    pub fn udp(reflexive: std::net::SocketAddr) -> Self {
        let reflexive = canonical_addr(reflexive);
        Self {
            ip: reflexive.ip(),
            udp: Some(reflexive),
        }
    }

    /// A node on the TLS/TCP fallback whose link comes from `tcp_source`, with the local
    /// addresses `local` it announced (their port is its UDP socket's).
    pub fn tcp(tcp_source: std::net::SocketAddr, local: &[std::net::SocketAddr]) -> Self {
        let ip = canonical_addr(tcp_source).ip();
        Self {
            ip,
            udp: local
                .first()
                .map(|a| canonical_addr(std::net::SocketAddr::new(ip, a.port()))),
        }
    }
}

/// As [`peer_candidates`], for ends seen over either transport: the peer's public UDP address
/// when there is one (never a TCP address), then its local addresses when both share a
/// public IP. Empty when the relay knows no UDP address of the peer at all.
pub fn candidates_for(
    me: Sighting,
    peer: Sighting,
    peer_local: &[std::net::SocketAddr],
) -> Vec<std::net::SocketAddr> {
    let mut out: Vec<std::net::SocketAddr> = peer.udp.into_iter().collect();
    if me.ip != peer.ip {
        return out;
    }
    for a in peer_local.iter().map(|a| canonical_addr(*a)) {
        if out.len() == MAX_PEER_CANDIDATES {
            break;
        }
        if (a.ip().is_loopback() && !peer.ip.is_loopback()) || out.contains(&a) {
            continue;
        }
        out.push(a);
    }
    out
}

/// A live outlet of a service and why its target is unhealthy (`None`: healthy, or it does not
/// report).
pub type OutletHealth = (NodeName, Option<String>);

/// One route between an inlet and an outlet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    pub inlet: NodeId,
    pub outlet: NodeId,
    pub service: ServiceName,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct Registry {
    names: HashMap<NodeId, NodeName>,
    attrs: HashMap<NodeId, Attributes>,
    services: HashMap<ServiceName, Service>,
    /// Services ever registered, to tell "unknown" from "no live outlet".
    known: BTreeSet<ServiceName>,
    routes: HashMap<RouteId, RouteInfo>,
    /// Routes whose inlet reported their end-to-end connection on a direct path.
    direct: std::collections::HashSet<RouteId>,
    /// The addresses each node announced on its own network (`Ctl::LocalCandidates`).
    local: HashMap<NodeId, Vec<std::net::SocketAddr>>,
    /// Outlets that reported their target of a service unhealthy, and why; absent: healthy
    /// (an outlet that never reports is trusted, as before health reports existed).
    unhealthy: HashMap<(NodeId, ServiceName), String>,
}

impl Registry {
    /// Records a connected node.
    pub fn connect(&mut self, id: NodeId, name: NodeName) {
        self.names.insert(id, name);
    }

    /// Records a connected node's attributes (from its certificate).
    pub fn set_attrs(&mut self, id: NodeId, attrs: Attributes) {
        self.attrs.insert(id, attrs);
    }

    /// A connected node's attributes.
    pub fn attrs(&self, id: NodeId) -> Attributes {
        self.attrs.get(&id).cloned().unwrap_or_default()
    }

    /// Ids of connected nodes.
    pub fn ids(&self) -> Vec<NodeId> {
        self.names.keys().copied().collect()
    }

    /// The node currently connected under `name`, if any.
    pub fn by_name(&self, name: &NodeName) -> Option<NodeId> {
        self.names
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(id, _)| *id)
    }

    /// The name of a connected node.
    pub fn name(&self, id: NodeId) -> Option<&NodeName> {
        self.names.get(&id)
    }

    /// Makes `node` the (or one more) outlet of each of `services`, replacing its earlier list.
    pub fn register(&mut self, node: NodeId, services: &[ServiceName]) {
        for svc in self.services.values_mut() {
            svc.outlets.retain(|n| *n != node);
        }
        // A registration starts healthy: the outlet reports again what is not.
        self.unhealthy.retain(|(n, _), _| *n != node);
        for name in services {
            self.known.insert(name.clone());
            let svc = self.services.entry(name.clone()).or_default();
            if !svc.outlets.contains(&node) {
                svc.outlets.push(node);
            }
        }
    }

    /// Takes `node` off the outlets of `service` (a reloaded policy no longer allows it), its
    /// other registrations and health reports kept.
    pub fn withdraw(&mut self, node: NodeId, service: &ServiceName) {
        if let Some(svc) = self.services.get_mut(service) {
            svc.outlets.retain(|n| *n != node);
        }
    }

    /// Picks an outlet for `service`, spreading routes over the live, healthy ones in turn.
    pub fn pick_outlet(&mut self, service: &ServiceName) -> Result<NodeId, RefuseReason> {
        let healthy = self.outlets_of(service);
        let svc = match self.services.get_mut(service) {
            Some(s) if !s.outlets.is_empty() => s,
            _ if self.known.contains(service) => return Err(RefuseReason::NoLiveOutlet),
            _ => return Err(RefuseReason::UnknownService),
        };
        if healthy.is_empty() {
            let mut reasons: Vec<String> = svc
                .outlets
                .iter()
                .filter_map(|o| {
                    let why = self.unhealthy.get(&(*o, service.clone()))?;
                    let name = self.names.get(o)?;
                    Some(format!("{name}: {why}"))
                })
                .collect();
            reasons.sort();
            let more = reasons.len().saturating_sub(MAX_REASONS_LISTED);
            reasons.truncate(MAX_REASONS_LISTED);
            if more > 0 {
                reasons.push(format!("and {more} more"));
            }
            return Err(RefuseReason::NoHealthyOutlet {
                reason: reasons.join("; "),
            });
        }
        let i = svc.cursor % healthy.len();
        svc.cursor = svc.cursor.wrapping_add(1);
        Ok(healthy[i])
    }

    /// The healthy outlets of `service`, in pick order (for retrying elsewhere).
    pub fn outlets_of(&self, service: &ServiceName) -> Vec<NodeId> {
        self.services
            .get(service)
            .map(|s| {
                s.outlets
                    .iter()
                    .copied()
                    .filter(|o| !self.unhealthy.contains_key(&(*o, service.clone())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records what outlet `node` reported about its target of `service`. Returns whether
    /// that changed its state, and the routes of that service it is the outlet of (to retire
    /// when it turned unhealthy). A report for a service the node does not serve is ignored.
    pub fn set_health(
        &mut self,
        node: NodeId,
        service: &ServiceName,
        healthy: bool,
        reason: &str,
    ) -> (bool, Vec<(RouteId, NodeId)>) {
        let serves = self
            .services
            .get(service)
            .is_some_and(|s| s.outlets.contains(&node));
        if !serves {
            return (false, Vec::new());
        }
        let key = (node, service.clone());
        let changed = if healthy {
            self.unhealthy.remove(&key).is_some()
        } else {
            self.unhealthy.insert(key, bounded(reason)).is_none()
        };
        let routes = if healthy {
            Vec::new()
        } else {
            self.routes
                .iter()
                .filter(|(_, r)| r.outlet == node && &r.service == service)
                .map(|(id, r)| (*id, r.inlet))
                .collect()
        };
        (changed, routes)
    }

    /// Why outlet `node`'s target of `service` is unhealthy; `None` while it is healthy.
    pub fn unhealthy_reason(&self, node: NodeId, service: &ServiceName) -> Option<&str> {
        self.unhealthy
            .get(&(node, service.clone()))
            .map(String::as_str)
    }

    /// Per service, each live outlet's name and why it is unhealthy (`None`: healthy).
    pub fn service_health(&self) -> Vec<(ServiceName, Vec<OutletHealth>)> {
        let mut out: Vec<_> = self
            .services
            .iter()
            .map(|(s, svc)| {
                let outlets = svc
                    .outlets
                    .iter()
                    .filter_map(|id| {
                        let name = self.names.get(id)?.clone();
                        Some((name, self.unhealthy.get(&(*id, s.clone())).cloned()))
                    })
                    .collect();
                (s.clone(), outlets)
            })
            .collect();
        out.sort();
        out
    }

    /// Records a route.
    pub fn add_route(&mut self, id: RouteId, info: RouteInfo) {
        self.routes.insert(id, info);
    }

    /// Forgets a route.
    pub fn remove_route(&mut self, id: RouteId) -> Option<RouteInfo> {
        self.direct.remove(&id);
        self.routes.remove(&id)
    }

    /// Number of routes.
    pub fn route_count(&self) -> usize {
        self.routes.len()
    }

    /// Every route, for the admin API.
    pub fn routes(&self) -> Vec<(RouteId, RouteInfo)> {
        let mut out: Vec<_> = self.routes.iter().map(|(id, r)| (*id, r.clone())).collect();
        out.sort_by_key(|(id, _)| *id);
        out
    }

    /// Records what `node` reports of `route`'s path: direct or through the relay. Only the
    /// route's inlet decides the move, so only its report counts; false (nothing changed)
    /// for a report from any other node or about a route that is not here.
    pub fn set_route_path(&mut self, route: RouteId, node: NodeId, direct: bool) -> bool {
        if self.routes.get(&route).is_none_or(|r| r.inlet != node) {
            return false;
        }
        if direct {
            self.direct.insert(route);
        } else {
            self.direct.remove(&route);
        }
        true
    }

    /// Records the addresses `node` announced on its own network, keeping at most
    /// [`MAX_LOCAL_CANDIDATES`] that could be a host's (not unspecified, multicast or
    /// broadcast, not port 0). Ignored for a node not connected.
    pub fn set_local_candidates(&mut self, node: NodeId, addrs: &[std::net::SocketAddr]) {
        if !self.names.contains_key(&node) {
            return;
        }
        let mut kept: Vec<std::net::SocketAddr> = Vec::new();
        for a in addrs {
            let a = canonical_addr(*a);
            let host = match a.ip() {
                std::net::IpAddr::V4(v4) => !v4.is_broadcast() && !v4.is_multicast(),
                std::net::IpAddr::V6(v6) => !v6.is_multicast(),
            };
            if host && !a.ip().is_unspecified() && a.port() != 0 && !kept.contains(&a) {
                kept.push(a);
            }
            if kept.len() == MAX_LOCAL_CANDIDATES {
                break;
            }
        }
        self.local.insert(node, kept);
    }

    /// The addresses `node` announced on its own network.
    pub fn local_candidates(&self, node: NodeId) -> Vec<std::net::SocketAddr> {
        self.local.get(&node).cloned().unwrap_or_default()
    }

    /// Whether `route`'s inlet last reported it direct.
    pub fn route_is_direct(&self, route: RouteId) -> bool {
        self.direct.contains(&route)
    }

    /// How many routes `node` is an end of (a drained node is closed once this reaches zero).
    pub fn routes_of(&self, node: NodeId) -> usize {
        self.routes
            .values()
            .filter(|r| r.inlet == node || r.outlet == node)
            .count()
    }

    /// The services `node` is a live outlet of.
    pub fn services_of(&self, node: NodeId) -> Vec<ServiceName> {
        let mut out: Vec<_> = self
            .services
            .iter()
            .filter(|(_, s)| s.outlets.contains(&node))
            .map(|(name, _)| name.clone())
            .collect();
        out.sort();
        out
    }

    /// Services and their live outlets' names.
    pub fn services(&self) -> Vec<(ServiceName, Vec<NodeName>)> {
        let mut out: Vec<_> = self
            .services
            .iter()
            .map(|(s, svc)| {
                let names = svc
                    .outlets
                    .iter()
                    .filter_map(|id| self.names.get(id).cloned())
                    .collect();
                (s.clone(), names)
            })
            .collect();
        out.sort();
        out
    }

    /// Forgets a node that disconnected: its registrations and every route it was an end of.
    /// Returns those routes with the node at their other end, to be told.
    pub fn disconnect(&mut self, node: NodeId) -> Vec<(RouteId, NodeId)> {
        self.names.remove(&node);
        self.attrs.remove(&node);
        self.unhealthy.retain(|(n, _), _| *n != node);
        for svc in self.services.values_mut() {
            svc.outlets.retain(|n| *n != node);
        }
        let gone: Vec<(RouteId, NodeId)> = self
            .routes
            .iter()
            .filter_map(|(id, r)| {
                if r.inlet == node {
                    Some((*id, r.outlet))
                } else if r.outlet == node {
                    Some((*id, r.inlet))
                } else {
                    None
                }
            })
            .collect();
        for (id, _) in &gone {
            self.routes.remove(id);
            self.direct.remove(id);
        }
        self.local.remove(&node);
        gone
    }
}

/// Which outlets offer which services publicly (sans-IO; the server applies it).
#[derive(Debug, Default)]
pub struct PublicRegistry {
    services: HashMap<ServiceName, Vec<NodeId>>,
    cursor: usize,
}

impl PublicRegistry {
    /// Makes `node` a public outlet of each of `services`, replacing its earlier list.
    pub fn register(&mut self, node: NodeId, services: &[ServiceName]) {
        self.remove_node(node);
        for s in services {
            let outlets = self.services.entry(s.clone()).or_default();
            if !outlets.contains(&node) {
                outlets.push(node);
            }
        }
    }

    /// Forgets a node (it disconnected).
    pub fn remove_node(&mut self, node: NodeId) {
        for outlets in self.services.values_mut() {
            outlets.retain(|n| *n != node);
        }
        self.services.retain(|_, o| !o.is_empty());
    }

    /// The public outlets of `service`, starting at a different one each call.
    pub fn candidates(&mut self, service: &ServiceName) -> Vec<NodeId> {
        let Some(outlets) = self.services.get(service) else {
            return Vec::new();
        };
        let start = self.cursor % outlets.len();
        self.cursor = self.cursor.wrapping_add(1);
        outlets[start..]
            .iter()
            .chain(&outlets[..start])
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(s: &str) -> ServiceName {
        ServiceName::new(s).expect("name")
    }

    fn node(s: &str) -> NodeName {
        NodeName::new(s).expect("name")
    }

    #[test]
    fn unknown_and_dead_services_are_told_apart() {
        let mut r = Registry::default();
        assert_eq!(r.pick_outlet(&svc("db")), Err(RefuseReason::UnknownService));
        r.connect(1, node("o1"));
        r.register(1, &[svc("db")]);
        assert_eq!(r.pick_outlet(&svc("db")), Ok(1));
        r.disconnect(1);
        assert_eq!(r.pick_outlet(&svc("db")), Err(RefuseReason::NoLiveOutlet));
    }

    #[test]
    fn routes_spread_over_outlets_and_skip_the_departed() {
        let mut r = Registry::default();
        for id in 1..=3 {
            r.connect(id, node(&format!("o{id}")));
            r.register(id, &[svc("db")]);
        }
        let picks: Vec<_> = (0..6)
            .map(|_| r.pick_outlet(&svc("db")).expect("pick"))
            .collect();
        assert_eq!(picks, vec![1, 2, 3, 1, 2, 3]);
        r.disconnect(2);
        let picks: BTreeSet<_> = (0..4)
            .map(|_| r.pick_outlet(&svc("db")).expect("pick"))
            .collect();
        assert_eq!(picks, BTreeSet::from([1, 3]));
    }

    #[test]
    fn routes_go_only_to_healthy_outlets_and_none_healthy_names_why() {
        let mut r = Registry::default();
        for id in 1..=2 {
            r.connect(id, node(&format!("o{id}")));
            r.register(id, &[svc("db")]);
        }
        r.add_route(
            RouteId(9),
            RouteInfo {
                inlet: 7,
                outlet: 1,
                service: svc("db"),
            },
        );
        let (changed, routes) = r.set_health(1, &svc("db"), false, "connect refused");
        assert!(changed);
        assert_eq!(
            routes,
            vec![(RouteId(9), 7)],
            "its routes of the service to retire"
        );
        assert!(
            !r.set_health(1, &svc("db"), false, "refused again").0,
            "no change of state (the reason is the latest)"
        );
        let picks: BTreeSet<_> = (0..4)
            .map(|_| r.pick_outlet(&svc("db")).expect("pick"))
            .collect();
        assert_eq!(picks, BTreeSet::from([2]));
        assert_eq!(r.outlets_of(&svc("db")), vec![2]);
        r.set_health(2, &svc("db"), false, "timed out");
        assert_eq!(
            r.pick_outlet(&svc("db")),
            Err(RefuseReason::NoHealthyOutlet {
                reason: "o1: refused again; o2: timed out".into()
            })
        );
        assert!(r.set_health(1, &svc("db"), true, "").0);
        assert_eq!(r.pick_outlet(&svc("db")), Ok(1));
        // Re-registering starts healthy; a report for a service not served is ignored.
        r.register(2, &[svc("db")]);
        assert_eq!(r.unhealthy_reason(2, &svc("db")), None);
        assert_eq!(r.set_health(2, &svc("other"), false, "x"), (false, vec![]));
        let picks: BTreeSet<_> = (0..4)
            .map(|_| r.pick_outlet(&svc("db")).expect("pick"))
            .collect();
        assert_eq!(picks, BTreeSet::from([1, 2]), "shared again");
    }

    /// Whatever outlets report, a refusal stays small: each reason is cut, and only a few
    /// outlets are listed.
    #[test]
    fn refusal_reasons_are_bounded() {
        let mut r = Registry::default();
        for id in 1..=10 {
            r.connect(id, node(&format!("o{id}")));
            r.register(id, &[svc("db")]);
            r.set_health(id, &svc("db"), false, &"é".repeat(10_000));
        }
        let Err(RefuseReason::NoHealthyOutlet { reason }) = r.pick_outlet(&svc("db")) else {
            panic!("refused");
        };
        assert!(reason.len() < 5 * (MAX_REASON_LEN + 16), "{}", reason.len());
        assert!(reason.ends_with("; and 6 more"), "{reason}");
    }

    #[test]
    fn disconnect_reports_routes_with_their_other_end() {
        let mut r = Registry::default();
        r.connect(1, node("o1"));
        r.connect(2, node("i1"));
        r.connect(3, node("i2"));
        r.register(1, &[svc("db")]);
        let info = |inlet| RouteInfo {
            inlet,
            outlet: 1,
            service: svc("db"),
        };
        r.add_route(RouteId(10), info(2));
        r.add_route(RouteId(11), info(3));
        assert_eq!(r.routes_of(1), 2);
        assert_eq!(r.routes_of(2), 1);
        assert_eq!(r.routes().len(), 2);
        let mut gone = r.disconnect(1);
        gone.sort();
        assert_eq!(gone, vec![(RouteId(10), 2), (RouteId(11), 3)]);
        assert_eq!(r.route_count(), 0);
        assert_eq!(r.routes_of(2), 0);
    }

    /// Only the route's inlet reports its path; the mark goes with the route.
    #[test]
    fn only_the_inlet_of_a_route_reports_its_path() {
        let mut r = Registry::default();
        r.connect(1, node("o1"));
        r.connect(2, node("i1"));
        r.connect(3, node("i2"));
        r.register(1, &[svc("db")]);
        let info = |inlet| RouteInfo {
            inlet,
            outlet: 1,
            service: svc("db"),
        };
        r.add_route(RouteId(10), info(2));
        r.add_route(RouteId(11), info(3));
        assert!(!r.set_route_path(RouteId(10), 3, true), "not its route");
        assert!(
            !r.set_route_path(RouteId(10), 1, true),
            "the outlet does not decide"
        );
        assert!(!r.set_route_path(RouteId(99), 2, true), "no such route");
        assert!(!r.route_is_direct(RouteId(10)));
        assert!(r.set_route_path(RouteId(10), 2, true));
        assert!(r.route_is_direct(RouteId(10)));
        assert!(!r.route_is_direct(RouteId(11)));
        assert!(r.set_route_path(RouteId(10), 2, false));
        assert!(!r.route_is_direct(RouteId(10)));
        assert!(r.set_route_path(RouteId(10), 2, true));
        r.remove_route(RouteId(10));
        r.add_route(RouteId(10), info(2));
        assert!(
            !r.route_is_direct(RouteId(10)),
            "a new route starts relayed"
        );
        assert!(r.set_route_path(RouteId(11), 3, true));
        r.disconnect(1);
        r.add_route(RouteId(11), info(3));
        assert!(!r.route_is_direct(RouteId(11)), "gone with its outlet");
    }

    fn sa(s: &str) -> std::net::SocketAddr {
        s.parse().expect("addr")
    }

    /// A node on the TLS/TCP fallback: its peers get its public IP with its UDP socket's port,
    /// never its TCP source address; none at all when it announced no local address; and
    /// it is told its UDP peer's reflexive address as usual.
    #[test]
    fn a_tcp_node_is_announced_by_its_public_ip_and_udp_port_never_its_tcp_address() {
        let tcp_src = sa("198.51.100.7:40001");
        let local = [sa("10.1.0.2:5300")];
        let tcp = Sighting::tcp(tcp_src, &local);
        let udp_peer = Sighting::udp(sa("203.0.113.5:6000"));
        let to_udp_peer = candidates_for(udp_peer, tcp, &local);
        assert_eq!(to_udp_peer, vec![sa("198.51.100.7:5300")]);
        assert!(!to_udp_peer.contains(&tcp_src));
        assert_eq!(
            candidates_for(tcp, udp_peer, &[sa("10.2.0.2:6000")]),
            vec![sa("203.0.113.5:6000")],
            "the UDP peer's reflexive address, not its local ones (another site)"
        );
        let silent = Sighting::tcp(tcp_src, &[]);
        assert!(candidates_for(udp_peer, silent, &[]).is_empty());
        // Behind the same NAT as its peer: its local addresses too.
        let beside = Sighting::udp(sa("198.51.100.7:7000"));
        assert_eq!(
            candidates_for(beside, tcp, &local),
            vec![sa("198.51.100.7:5300"), sa("10.1.0.2:5300")]
        );
    }

    /// Local addresses go only to a peer behind the same public IP, never loopback ones to a
    /// peer off loopback, at most four candidates in all.
    #[test]
    fn local_candidates_reach_only_a_peer_behind_the_same_nat() {
        let local = [
            sa("10.1.0.3:5000"),
            sa("127.0.0.1:5000"),
            sa("[::ffff:192.168.1.9]:5000"),
            sa("10.1.0.3:5000"),
            sa("172.16.0.2:5000"),
            sa("172.16.0.3:5000"),
        ];
        assert_eq!(
            peer_candidates(sa("198.51.100.1:4000"), sa("203.0.113.5:5000"), &local),
            vec![sa("203.0.113.5:5000")],
            "another site: its public address only"
        );
        assert_eq!(
            peer_candidates(
                sa("203.0.113.5:4000"),
                sa("[::ffff:203.0.113.5]:5000"),
                &local
            ),
            vec![
                sa("203.0.113.5:5000"),
                sa("10.1.0.3:5000"),
                sa("192.168.1.9:5000"),
                sa("172.16.0.2:5000"),
            ],
            "the same NAT: public first, then local ones, no loopback, four at most"
        );
        assert_eq!(
            peer_candidates(
                sa("127.0.0.1:4000"),
                sa("127.0.0.1:5000"),
                &[sa("127.0.0.1:5000"), sa("127.0.0.2:5000")]
            ),
            vec![sa("127.0.0.1:5000"), sa("127.0.0.2:5000")],
            "both on loopback"
        );
    }

    #[test]
    fn announced_local_addresses_are_bounded_and_forgotten_with_the_node() {
        let mut r = Registry::default();
        r.set_local_candidates(1, &[sa("10.0.0.1:1")]);
        assert!(r.local_candidates(1).is_empty(), "not connected");
        r.connect(1, node("i1"));
        r.set_local_candidates(
            1,
            &[
                sa("0.0.0.0:5"),
                sa("224.0.0.1:5"),
                sa("255.255.255.255:5"),
                sa("10.0.0.1:0"),
                sa("10.0.0.1:5"),
                sa("10.0.0.1:5"),
                sa("10.0.0.2:5"),
                sa("10.0.0.3:5"),
                sa("10.0.0.4:5"),
            ],
        );
        assert_eq!(
            r.local_candidates(1),
            vec![sa("10.0.0.1:5"), sa("10.0.0.2:5"), sa("10.0.0.3:5")]
        );
        r.disconnect(1);
        assert!(r.local_candidates(1).is_empty());
    }

    #[test]
    fn a_withdrawn_registration_leaves_the_others_and_their_health() {
        let mut r = Registry::default();
        r.connect(1, node("o1"));
        r.connect(2, node("o2"));
        r.register(1, &[svc("a"), svc("b")]);
        r.register(2, &[svc("a")]);
        r.set_health(1, &svc("b"), false, "down");
        r.withdraw(1, &svc("a"));
        assert_eq!(r.services_of(1), vec![svc("b")]);
        assert_eq!(r.outlets_of(&svc("a")), vec![2]);
        assert_eq!(r.unhealthy_reason(1, &svc("b")), Some("down"));
    }

    #[test]
    fn re_registering_replaces_the_service_list() {
        let mut r = Registry::default();
        r.connect(1, node("o1"));
        r.register(1, &[svc("a"), svc("b")]);
        assert_eq!(r.services_of(1), vec![svc("a"), svc("b")]);
        r.register(1, &[svc("b")]);
        assert_eq!(r.services_of(1), vec![svc("b")]);
        assert_eq!(r.pick_outlet(&svc("a")), Err(RefuseReason::NoLiveOutlet));
        assert_eq!(r.pick_outlet(&svc("b")), Ok(1));
    }

    #[test]
    fn public_registry_spreads_and_forgets() {
        let mut r = PublicRegistry::default();
        assert!(r.candidates(&svc("db")).is_empty());
        r.register(1, &[svc("db"), svc("ui")]);
        r.register(2, &[svc("db")]);
        let firsts: BTreeSet<NodeId> = (0..4).map(|_| r.candidates(&svc("db"))[0]).collect();
        assert_eq!(firsts, [1, 2].into());
        assert_eq!(r.candidates(&svc("ui")), vec![1]);
        r.register(1, &[svc("db")]);
        assert!(r.candidates(&svc("ui")).is_empty());
        r.remove_node(1);
        assert_eq!(r.candidates(&svc("db")), vec![2]);
        r.remove_node(2);
        assert!(r.candidates(&svc("db")).is_empty());
    }
}
