//! Home relays: in a fleet, an outlet attaches to a few relays only (not to all of them), so
//! load spreads and each relay holds a share of the outlets. Which ones is decided by
//! rendezvous (highest-random-weight) hashing of the outlet's name with each relay's name:
//! every outlet computes it alone from the same membership, and when a relay joins or leaves
//! only the outlets whose top choices change move (about `k/n` of them), the rest stay put.
//!
//! The hash is written out here (FNV-1a, then a 64-bit finalizer) rather than taken from the
//! standard library, whose hasher may change between Rust releases: nodes built apart must
//! agree.

use postern_proto::msg::FleetRelay;

/// Home relays an outlet attaches to in a fleet, unless configured otherwise.
pub const DEFAULT_HOME_RELAYS: usize = 2;

/// The weight of `relay` for `outlet`: the relay with the highest weight is the first home.
pub fn weight(outlet: &str, relay: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    // The separator keeps ("ab", "c") and ("a", "bc") apart.
    for b in outlet.bytes().chain([0xff]).chain(relay.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    // splitmix64's finalizer: FNV's low bits mix poorly on their own.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The `k` home relays of `outlet` among `relays` (all of them when there are no more than
/// `k`), best first. Ties (two relays of the same name) fall to the first address.
pub fn home_relays(outlet: &str, relays: &[FleetRelay], k: usize) -> Vec<FleetRelay> {
    let mut ranked: Vec<(u64, &FleetRelay)> = relays
        .iter()
        .map(|r| (weight(outlet, &r.name), r))
        .collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    ranked.into_iter().take(k).map(|(_, r)| r.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const PINNED: u64 = 8_815_609_583_085_102_072;

    fn fleet(n: usize) -> Vec<FleetRelay> {
        (0..n)
            .map(|i| FleetRelay {
                name: format!("relay-{i}"),
                addresses: vec![format!("10.0.0.{i}:4433")],
            })
            .collect()
    }

    fn homes(outlet: &str, relays: &[FleetRelay], k: usize) -> BTreeSet<String> {
        home_relays(outlet, relays, k)
            .into_iter()
            .map(|r| r.name)
            .collect()
    }

    #[test]
    fn the_same_inputs_give_the_same_homes_in_any_order() {
        let relays = fleet(7);
        let mut reversed = relays.clone();
        reversed.reverse();
        for i in 0..50 {
            let o = format!("outlet-{i}");
            let a = home_relays(&o, &relays, 2);
            assert_eq!(a.len(), 2);
            assert_ne!(a[0], a[1]);
            assert_eq!(a, home_relays(&o, &reversed, 2), "{o}");
        }
        // Fewer relays than homes: every relay.
        assert_eq!(homes("o", &fleet(1), 2).len(), 1);
        assert!(home_relays("o", &[], 2).is_empty());
        // Pinned: a change of hash would move every outlet of every fleet on upgrade.
        assert_eq!(weight("outlet-1", "relay-a"), PINNED);
        assert_ne!(weight("ab", "c"), weight("a", "bc"));
    }

    #[test]
    fn outlets_spread_over_the_relays() {
        let relays = fleet(5);
        let mut per_relay = std::collections::BTreeMap::<String, usize>::new();
        for i in 0..1000 {
            for h in homes(&format!("outlet-{i}"), &relays, 2) {
                *per_relay.entry(h).or_default() += 1;
            }
        }
        // 2,000 attachments over 5 relays: 400 each on average.
        for (relay, n) in &per_relay {
            assert!(
                (300..=500).contains(n),
                "{relay}: {n} of 2000 ({per_relay:?})"
            );
        }
    }

    /// Adding a relay moves only the attachments it takes (about 1/n of them): no outlet
    /// trades one old relay for another.
    #[test]
    fn adding_a_relay_moves_about_one_nth_of_the_outlets() {
        let before = fleet(5);
        let after = fleet(6);
        let new = after[5].name.clone();
        let (mut moved, total) = (0usize, 1000 * 2);
        for i in 0..1000 {
            let o = format!("outlet-{i}");
            let (a, b) = (homes(&o, &before, 2), homes(&o, &after, 2));
            for h in b.difference(&a) {
                assert_eq!(*h, new, "{o} moved to an old relay: {a:?} -> {b:?}");
                moved += 1;
            }
        }
        // 1/6 of 2,000 is 333.
        assert!((233..=433).contains(&moved), "moved {moved} of {total}");
        // Removing a relay moves only the outlets it was a home of.
        let without: Vec<FleetRelay> = before
            .iter()
            .filter(|r| r.name != "relay-2")
            .cloned()
            .collect();
        for i in 0..1000 {
            let o = format!("outlet-{i}");
            let (a, b) = (homes(&o, &before, 2), homes(&o, &without, 2));
            if !a.contains("relay-2") {
                assert_eq!(a, b, "{o} moved though its homes stayed");
            } else {
                assert_eq!(a.intersection(&b).count(), 1, "{o}: {a:?} -> {b:?}");
            }
        }
    }
}
