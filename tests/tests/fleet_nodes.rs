//! Nodes in a fleet of relays sharing state in a real three-member etcd (the relays are real
//! `postern-relay` processes; `cargo build --bins` first): outlets attach to their home relays
//! (rendezvous hashing over the membership they learn from the relay they first reach), an
//! inlet that reaches a relay without the outlet is redirected to one with it, a home relay's
//! death moves the outlet without failing a client connection, and a relay that joins takes
//! its share of new outlets without any node being reconfigured.

use postern_net::fleet::home_relays;
use postern_outlet::target::Target;
use postern_proto::msg::FleetRelay as Learned;
use postern_relay::fleet::etcd::Etcd;
use postern_relay::fleet::FleetState;
use postern_tests::churn::{failures, under_load};
use postern_tests::fleet::{Fleet, FleetRelay};
use postern_tests::kit::*;
use postern_tests::traffic::{echo_once, echo_server};
use postern_tests::wait::eventually;
use std::collections::BTreeSet;
use std::time::Duration;

/// One etcd cluster and a few relay processes at a time: the machine is small.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The relays as nodes learn them.
fn learned(relays: &[&FleetRelay]) -> Vec<Learned> {
    relays
        .iter()
        .map(|r| Learned {
            name: r.name.clone(),
            addresses: vec![r.addr.to_string()],
        })
        .collect()
}

fn homes(outlet: &str, relays: &[Learned]) -> BTreeSet<String> {
    home_relays(outlet, relays, postern_net::fleet::DEFAULT_HOME_RELAYS)
        .into_iter()
        .map(|r| r.name)
        .collect()
}

/// Waits until the fleet's members are exactly `names`.
async fn members_are(store: &Etcd, names: &[&str]) {
    eventually(Duration::from_secs(15), "the fleet's members", || async {
        let got: Vec<String> = store
            .members()
            .await
            .map(|m| m.into_iter().map(|m| m.name).collect())
            .unwrap_or_default();
        got == names
    })
    .await;
}

/// The relays recorded in the fleet as holding `outlet` (its presence entries).
async fn held_by(store: &Etcd, outlet: &str) -> BTreeSet<String> {
    store
        .presence()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.outlet.as_str() == outlet)
        .map(|p| p.relay)
        .collect()
}

/// A sample of the relay's `/metrics` (0 when absent).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

const GRANTED: &str = "postern_relay_route_requests_total{outcome=\"granted\"}";
const REDIRECTED: &str = "postern_relay_route_requests_total{outcome=\"redirected\"}";

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inlet_is_redirected_to_the_home_relays_and_a_home_relay_dying_fails_no_client() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start().await;
    let mut a = fleet.relay("relay-a").await;
    let b = fleet.relay("relay-b").await;
    let c = fleet.relay("relay-c").await;
    let store = fleet.store().await;
    members_are(&store, &["relay-a", "relay-b", "relay-c"]).await;
    // An outlet whose homes among the three are A and B.
    let members = learned(&[&a, &b, &c]);
    let name = (0..1000)
        .map(|i| format!("outlet-{i}"))
        .find(|n| homes(n, &members) == set(&["relay-a", "relay-b"]))
        .expect("a name homed on A and B");
    let (echo, _e) = echo_server().await;
    // Bootstrapped from C only: it learns the fleet there and moves to its homes.
    let _outlet = start_outlet_via(
        &fleet.pki,
        &name,
        &[c.addr],
        vec![("echo", Target::tcp(echo.to_string()))],
        Default::default(),
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "the outlet attached to A and B, not C",
        || async {
            a.nodes().await.contains(&name)
                && b.nodes().await.contains(&name)
                && !c.nodes().await.contains(&name)
        },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the fleet records the outlet on A and B",
        || async { held_by(&store, &name).await == set(&["relay-a", "relay-b"]) },
    )
    .await;
    let entry = store
        .presence()
        .await
        .expect("presence")
        .into_iter()
        .find(|p| p.outlet.as_str() == name && p.relay == "relay-a")
        .expect("entry on A");
    assert_eq!(entry.addresses, vec![a.addr.to_string()]);
    assert_eq!(
        entry
            .services
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>(),
        ["echo"]
    );

    // An inlet that knows only C: redirected, and the data flows through a home relay.
    let inlet = start_inlet(&fleet.pki, "inlet-1", c.addr, &["echo"]).await;
    assert_eq!(
        echo_once(inlet.addr("echo"), b"through the fleet")
            .await
            .as_deref(),
        Some(&b"through the fleet"[..])
    );
    let on_c = c.metrics().await;
    assert!(sample(&on_c, REDIRECTED) >= 1.0, "C redirected:\n{on_c}");
    assert_eq!(sample(&on_c, GRANTED), 0.0, "C routes nothing itself");
    // The redirect names A first (by name): the route goes through A.
    assert!(sample(&a.metrics().await, GRANTED) >= 1.0);

    // A crashes (no goodbye to anyone) under load: the open transfer survives (its
    // connection moves to B), every new client connection succeeds.
    let kill = async {
        a.proc().child.start_kill().expect("kill relay A");
        a.proc().wait(Duration::from_secs(5)).await;
    };
    let report = under_load(inlet.addr("echo"), kill, Duration::from_secs(3)).await;
    let failed = failures(&report);
    assert!(report.after_kill >= 20, "the load went on after the kill");
    assert!(
        failed.is_empty(),
        "client connections failed: {:?}\n{}",
        failed.iter().take(5).collect::<Vec<_>>(),
        c.log()
    );
    match &report.long {
        Ok((sent, echoed, same)) => {
            assert_eq!(sent, echoed, "every byte of the long transfer came back");
            assert!(same, "and intact");
        }
        Err(e) => panic!("the long transfer broke: {e}"),
    }
    assert!(
        inlet.handle.migrations() >= 1,
        "the connection migrated instead of being replaced"
    );
    // The outlet re-homed: A is gone from the fleet, so its homes are B and C now.
    eventually(
        Duration::from_secs(20),
        "the outlet re-homed to B and C",
        || async { b.nodes().await.contains(&name) && c.nodes().await.contains(&name) },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the fleet records the outlet on B and C",
        || async { held_by(&store, &name).await == set(&["relay-b", "relay-c"]) },
    )
    .await;
    assert_eq!(
        echo_once(inlet.addr("echo"), b"after the move")
            .await
            .as_deref(),
        Some(&b"after the move"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_added_at_run_time_takes_its_share_of_new_outlets() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start().await;
    let a = fleet.relay("relay-a").await;
    let b = fleet.relay("relay-b").await;
    let c = fleet.relay("relay-c").await;
    let store = fleet.store().await;
    members_are(&store, &["relay-a", "relay-b", "relay-c"]).await;
    // A fourth relay joins; no node is told anything.
    let d = fleet.relay("relay-d").await;
    members_are(&store, &["relay-a", "relay-b", "relay-c", "relay-d"]).await;
    let relays = [&a, &b, &c, &d];
    let members = learned(&relays);
    let names: Vec<String> = (0..8).map(|i| format!("outlet-{i}")).collect();
    let on_d: BTreeSet<String> = names
        .iter()
        .filter(|n| homes(n, &members).contains("relay-d"))
        .cloned()
        .collect();
    assert!(
        !on_d.is_empty(),
        "the names were chosen so that D is a home"
    );
    let (echo, _e) = echo_server().await;
    let mut outlets = Vec::new();
    for n in &names {
        // Every outlet is configured with relay A only.
        outlets.push(
            start_outlet_via(
                &fleet.pki,
                n,
                &[a.addr],
                vec![("echo", Target::tcp(echo.to_string()))],
                Default::default(),
            )
            .await,
        );
    }
    // Each relay holds exactly the outlets it is a home of: D its share, A only its own.
    for r in relays {
        let want: BTreeSet<String> = names
            .iter()
            .filter(|n| homes(n, &members).contains(&r.name))
            .cloned()
            .collect();
        eventually(
            Duration::from_secs(30),
            &format!("{} holds its share of the outlets", r.name),
            || {
                let want = want.clone();
                async move {
                    let got: BTreeSet<String> = r
                        .nodes()
                        .await
                        .into_iter()
                        .filter(|n| n.starts_with("outlet-"))
                        .collect();
                    got == want
                }
            },
        )
        .await;
    }
    // The fleet's records agree.
    for n in &on_d {
        assert!(held_by(&store, n).await.contains("relay-d"), "{n}");
    }
    // And an inlet on A reaches an outlet homed elsewhere.
    let inlet = start_inlet(&fleet.pki, "inlet-1", a.addr, &["echo"]).await;
    assert_eq!(
        echo_once(inlet.addr("echo"), b"anywhere").await.as_deref(),
        Some(&b"anywhere"[..])
    );
}
