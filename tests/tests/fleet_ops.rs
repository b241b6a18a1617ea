//! Operating a fleet of relays on a real three-member etcd cluster: `postern-relay status`
//! (through a relay's admin API, and straight from etcd) lists the fleet's relays with their
//! load and follows a relay's death; `/readyz` and `/metrics` show the cluster connection,
//! flip when etcd loses quorum and come back with it. The relays are the real
//! `postern-relay` binaries (`cargo build --bins` first).

use postern_outlet::target::Target;
use postern_relay::views::FleetView;
use postern_tests::kit::*;
use postern_tests::ops::{get, metric};
use postern_tests::procs::cli_output;
use postern_tests::relay_fleet::{FleetProject, FleetRelay};
use postern_tests::traffic::echo_server;
use postern_tests::wait::eventually;
use std::time::Duration;

/// One etcd cluster and a few relay processes at a time: the machine is small.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `postern-relay status` against `relay`'s admin API; (success, stdout, stderr).
async fn status(relay: &FleetRelay, json: bool) -> (bool, String, String) {
    let admin = relay.admin.to_string();
    let state = relay.state_dir().display().to_string();
    let mut args = vec!["status", "--admin-addr", &admin, "--state-dir", &state];
    if json {
        args.push("--json");
    }
    cli_output("postern-relay", &args).await
}

/// The fleet part of `status --json` from `relay`.
async fn fleet_of(relay: &FleetRelay) -> FleetView {
    let (ok, out, err) = status(relay, true).await;
    assert!(ok, "status failed: {err}\n{}", relay.log());
    let v: serde_json::Value = serde_json::from_str(&out).expect("status --json");
    serde_json::from_value(v["fleet"].clone()).expect("the fleet in status --json")
}

/// (name, nodes) of each relay in the view.
fn loads(f: &FleetView) -> Vec<(String, u64)> {
    f.relays.iter().map(|r| (r.name.clone(), r.nodes)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_the_fleets_relays_with_their_load_and_drops_a_dead_one() {
    let _serial = SERIAL.lock().await;
    let fleet = FleetProject::start(Pki::new()).await.expect("fleet");
    let a = fleet.relay("relay-a", "echo").await.expect("relay a");
    let b = fleet.relay("relay-b", "echo").await.expect("relay b");
    let mut c = fleet.relay("relay-c", "echo").await.expect("relay c");
    let (echo, _e) = echo_server().await;
    // Two outlets on relay B, one on relay C: the load each relay reports differs.
    let _o1 = start_outlet(
        &fleet.pki,
        "outlet-1",
        b.addr,
        vec![("echo", Target::tcp(echo.to_string()))],
    )
    .await;
    let _o2 = start_outlet(
        &fleet.pki,
        "outlet-2",
        b.addr,
        vec![("echo", Target::tcp(echo.to_string()))],
    )
    .await;
    let _o3 = start_outlet(
        &fleet.pki,
        "outlet-3",
        c.addr,
        vec![("echo", Target::tcp(echo.to_string()))],
    )
    .await;
    let want = vec![
        ("relay-a".to_string(), 0),
        ("relay-b".to_string(), 2),
        ("relay-c".to_string(), 1),
    ];
    // Asked at relay A, which holds none of the outlets: the whole fleet, with each load.
    eventually(
        Duration::from_secs(15),
        "the three relays with their load",
        || async { loads(&fleet_of(&a).await) == want },
    )
    .await;
    let view = fleet_of(&a).await;
    assert!(view.cluster && view.connected == Some(true), "{view:?}");
    let this: Vec<&str> = view
        .relays
        .iter()
        .filter(|r| r.this)
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(this, ["relay-a"]);
    let on_b = view
        .relays
        .iter()
        .find(|r| r.name == "relay-b")
        .expect("relay-b");
    assert_eq!(on_b.addresses, vec![b.addr.to_string()]);
    assert!(on_b.updated_age_ms < 10_000, "{on_b:?}");
    // Where outlets are attached: at relay B, its own two.
    let at_b = fleet_of(&b).await;
    let outlets: Vec<(&str, &[String])> = at_b
        .attachments
        .iter()
        .map(|x| (x.outlet.as_str(), x.relays.as_slice()))
        .collect();
    assert_eq!(
        outlets,
        [
            ("outlet-1", &["relay-b".to_string()][..]),
            ("outlet-2", &["relay-b".to_string()][..])
        ]
    );
    // The summary for people says the same.
    let (ok, text, err) = status(&a, false).await;
    assert!(ok, "{err}");
    assert!(text.contains("relays: 3"), "{text}");
    assert!(text.contains("relay-a (this relay)"), "{text}");
    assert!(
        text.contains(&format!("relay-b  {}  nodes 2", b.addr)),
        "{text}"
    );

    // Straight from etcd, without any relay's admin API.
    let mut args = vec!["status".to_string(), "--json".to_string()];
    args.extend(fleet.etcd_flags());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = cli_output("postern-relay", &args).await;
    assert!(ok, "status --etcd: {err}");
    let direct: FleetView = serde_json::from_str(&out).expect("status --etcd --json");
    let names: Vec<&str> = direct.relays.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["relay-a", "relay-b", "relay-c"]);
    assert!(direct.relays.iter().all(|r| !r.this));

    // Relay C dies: once its lease runs out, the fleet is two relays, at A and in etcd.
    c.kill().await;
    eventually(
        Duration::from_secs(15),
        "relay C gone from status",
        || async {
            let names: Vec<String> = fleet_of(&a)
                .await
                .relays
                .into_iter()
                .map(|r| r.name)
                .collect();
            names == ["relay-a", "relay-b"]
        },
    )
    .await;
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_and_metrics_follow_the_etcd_connection() {
    let _serial = SERIAL.lock().await;
    let mut fleet = FleetProject::start(Pki::new()).await.expect("fleet");
    let a = fleet.relay("relay-a", "echo").await.expect("relay a");
    let _b = fleet.relay("relay-b", "echo").await.expect("relay b");
    let scrape = || async {
        get(a.ops, "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default()
    };
    eventually(
        Duration::from_secs(10),
        "connected, two members counted",
        || async {
            let m = scrape().await;
            metric(&m, "postern_relay_fleet_connected", &[]) == Some(1.0)
                && metric(&m, "postern_relay_fleet_members", &[]) == Some(2.0)
        },
    )
    .await;
    let m = scrape().await;
    assert_eq!(
        metric(&m, "postern_relay_etcd_failures_total", &[("op", "follow")]),
        Some(0.0),
        "{m}"
    );
    let (code, body) = get(a.ops, "/readyz").await.expect("readyz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("etcd connected"), "{body}");

    // Two of three members gone: no quorum. The relay stays ready (its routes do not need
    // etcd) and says etcd is gone, in /readyz and in its metrics.
    fleet.etcd.stop_member(1);
    fleet.etcd.stop_member(2);
    eventually(
        Duration::from_secs(20),
        "metrics say etcd is gone",
        || async { metric(&scrape().await, "postern_relay_fleet_connected", &[]) == Some(0.0) },
    )
    .await;
    let (code, body) = get(a.ops, "/readyz").await.expect("readyz");
    assert_eq!(code, 200, "etcd down must not pull the relay: {body}");
    assert!(body.contains("etcd NOT connected"), "{body}");
    let m = scrape().await;
    let follow = metric(&m, "postern_relay_etcd_failures_total", &[("op", "follow")]);
    assert!(follow.is_some_and(|n| n >= 1.0), "{m}");
    // status still answers, saying the same.
    let (ok, text, err) = status(&a, false).await;
    assert!(ok, "status while etcd is down: {err}");
    assert!(text.contains("NOT CONNECTED"), "{text}");

    // The members return: connected again, in both.
    fleet.etcd.start_all().await.expect("etcd back");
    eventually(
        Duration::from_secs(30),
        "metrics say etcd is back",
        || async { metric(&scrape().await, "postern_relay_fleet_connected", &[]) == Some(1.0) },
    )
    .await;
    let (code, body) = get(a.ops, "/readyz").await.expect("readyz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("etcd connected"), "{body}");
}
