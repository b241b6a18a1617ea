//! Home relays: in a fleet, the outlet attaches to a few relays (its homes, chosen by
//! rendezvous hashing, see [`postern_net::fleet`]) rather than to every relay, and moves when
//! the fleet changes: a relay joins and takes its share, a relay dies and its outlets go to
//! the next in their ranking. A move opens the new home first (connected and registered)
//! and only then closes the old one, so the outlet is never reachable through fewer relays
//! than it had.
//!
//! "In a fleet" means: a relay has told the outlet the fleet's relays
//! ([`Ctl::Relays`](postern_proto::msg::Ctl::Relays)), and once the fleet has been seen with
//! more relays than the outlet has homes. Before that (a single relay, relays without a
//! cluster, or a fleet no larger than the home count) the outlet keeps every configured relay,
//! as it always did.

use postern_net::control::connection;
use postern_net::uplink::{healthy, Uplink};
use postern_proto::msg::FleetRelay;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long a new home relay may take to connect before the move is tried again.
const HOME_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the homes are checked again when the last move did not complete.
const RETRY: Duration = Duration::from_secs(2);

/// Keeps the outlet attached to its `k` home relays of the fleet it learns, until `close`.
/// `keep_on_relay_loss` is set once in a fleet: end-to-end connections over a relay that goes
/// away are moved by the inlets, not closed.
pub async fn run(
    uplink: Arc<Uplink>,
    outlet: String,
    k: usize,
    keep_on_relay_loss: Arc<AtomicBool>,
    close: CancellationToken,
) {
    let mut learned = uplink.fleet_relays();
    let mut in_fleet = false;
    loop {
        let relays = learned.borrow_and_update().clone();
        if !in_fleet && relays.len() > k {
            tracing::info!(
                relays = relays.len(),
                homes = k,
                "in a fleet: attaching to home relays only"
            );
            in_fleet = true;
            keep_on_relay_loss.store(true, Relaxed);
        }
        let mut settled = true;
        if in_fleet && !relays.is_empty() {
            settled = tokio::select! {
                _ = close.cancelled() => return,
                s = rehome(&uplink, &outlet, &relays, k) => s,
            };
        }
        tokio::select! {
            _ = close.cancelled() => return,
            r = learned.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(RETRY), if !settled => {}
        }
    }
}

/// The address to reach `relay` at: one already in use by this outlet if it has one, else
/// its first address that is an IP address of the family this outlet's socket uses.
pub fn address_of(
    relay: &FleetRelay,
    in_use: &[SocketAddr],
    like: SocketAddr,
) -> Option<SocketAddr> {
    let addrs: Vec<SocketAddr> = relay
        .addresses
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    addrs
        .iter()
        .find(|a| in_use.contains(a))
        .or_else(|| addrs.iter().find(|a| a.is_ipv4() == like.is_ipv4()))
        .copied()
}

/// Which relays to open and which to close for `outlet` to be attached to its `k` homes of
/// `relays`, given the relays `in_use` (`like`: one of them, for the address family).
pub fn plan(
    outlet: &str,
    relays: &[FleetRelay],
    k: usize,
    in_use: &[SocketAddr],
    like: SocketAddr,
) -> (Vec<SocketAddr>, Vec<SocketAddr>, Vec<SocketAddr>) {
    let homes: Vec<SocketAddr> = postern_net::fleet::home_relays(outlet, relays, k)
        .iter()
        .filter_map(|r| address_of(r, in_use, like))
        .collect();
    let open = homes
        .iter()
        .filter(|a| !in_use.contains(a))
        .copied()
        .collect();
    let close = in_use
        .iter()
        .filter(|a| !homes.contains(a))
        .copied()
        .collect();
    (homes, open, close)
}

/// One move towards the homes; true when the outlet is attached to every home and to nothing
/// else.
async fn rehome(uplink: &Uplink, outlet: &str, relays: &[FleetRelay], k: usize) -> bool {
    let in_use: Vec<SocketAddr> = uplink.relays().iter().map(|(a, _)| *a).collect();
    let Some(like) = in_use.first().copied() else {
        return false;
    };
    let (homes, open, close) = plan(outlet, relays, k, &in_use, like);
    if homes.is_empty() {
        return false;
    }
    for addr in &open {
        tracing::info!(relay = %addr, "attaching to a new home relay");
        uplink.add_relay(uplink.relay_at(*addr));
    }
    // Open before close: wait for the new homes to be connected and registered.
    for addr in &open {
        if let Some((_, mut rx)) = uplink.relays().into_iter().find(|(a, _)| a == addr) {
            if connection::wait_connected(&mut rx, HOME_CONNECT_TIMEOUT)
                .await
                .is_none()
            {
                tracing::warn!(relay = %addr, "the new home relay did not answer in time");
            }
        }
    }
    let up = |addr: &SocketAddr| {
        uplink
            .relays()
            .iter()
            .any(|(a, rx)| a == addr && healthy(&rx.borrow()))
    };
    let homes_up = homes.iter().filter(|a| up(a)).count();
    let mut done = homes_up == homes.len();
    for addr in close {
        // A relay still serving is closed only once every home is up; a dead one at once.
        if homes_up < homes.len() && up(&addr) {
            done = false;
            continue;
        }
        tracing::info!(relay = %addr, "leaving a relay that is no longer a home");
        uplink.remove_relay(addr);
        uplink.socket().remove_routes_via(addr, true);
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(name: &str, port: u16) -> FleetRelay {
        FleetRelay {
            name: name.into(),
            addresses: vec![format!("127.0.0.1:{port}")],
        }
    }

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn the_plan_opens_the_missing_homes_and_closes_the_rest() {
        let fleet = [relay("a", 1), relay("b", 2), relay("c", 3), relay("d", 4)];
        let homes = postern_net::fleet::home_relays("outlet-1", &fleet, 2);
        let home_ports: Vec<u16> = homes
            .iter()
            .map(|r| {
                r.addresses[0]
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .expect("port")
            })
            .collect();
        // Bootstrapped from one relay that is not a home: open both homes, close it.
        let other = (1..=4)
            .find(|p| !home_ports.contains(p))
            .expect("a non-home");
        let (h, open, close) = plan("outlet-1", &fleet, 2, &[a(other)], a(other));
        assert_eq!(h, home_ports.iter().map(|p| a(*p)).collect::<Vec<_>>());
        assert_eq!(open, h);
        assert_eq!(close, [a(other)]);
        // Attached to its homes already: nothing to do.
        let (_, open, close) = plan("outlet-1", &fleet, 2, &h, h[0]);
        assert!(open.is_empty() && close.is_empty());
        // A relay with an address this node cannot use is skipped.
        let odd = [FleetRelay {
            name: "x".into(),
            addresses: vec!["relay.example:4433".into()],
        }];
        assert_eq!(
            plan("outlet-1", &odd, 2, &[a(1)], a(1)).0,
            Vec::<SocketAddr>::new()
        );
    }

    #[test]
    fn an_address_in_use_is_preferred() {
        let r = FleetRelay {
            name: "a".into(),
            addresses: vec!["10.0.0.1:1".into(), "127.0.0.1:1".into()],
        };
        assert_eq!(address_of(&r, &[a(1)], a(9)), Some(a(1)));
        assert_eq!(
            address_of(&r, &[], a(9)),
            Some("10.0.0.1:1".parse().expect("addr"))
        );
    }
}
