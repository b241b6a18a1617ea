//! A fleet of relays sharing their state in a real three-member etcd cluster (Debian's
//! `etcd-server`, on 127.0.0.1): tickets used exactly once however relays race, revocations
//! applied by every relay within a second, drains that outlive a restart, membership that
//! vanishes with a dead relay's lease, and a data path that keeps forwarding while etcd is
//! gone. The relays are the real `postern-relay` binaries (`cargo build --bins` first).

use postern_net::control::enroll::{enroll, EnrollError, NodeState};
use postern_outlet::target::Target;
use postern_proto::ticket::EnrollRefusal;
use postern_relay::admin::client::ClientError;
use postern_relay::fleet::FleetState;
use postern_relay::views::{Revoked, Undrained};
use postern_tests::fleet::{ticket, Fleet};
use postern_tests::kit::*;
use postern_tests::traffic::{echo_once, echo_server};
use postern_tests::wait::eventually;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One etcd cluster and a few relay processes at a time: the machine is small.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_raced_at_three_relays_is_used_exactly_once() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start().await;
    let relays = [
        fleet.relay("relay-a").await,
        fleet.relay("relay-b").await,
        fleet.relay("relay-c").await,
    ];
    for round in 0..3 {
        let t = ticket(&fleet, &relays[0], "outlet").await;
        let attempts = relays.iter().enumerate().map(|(i, r)| {
            let mut t = t.clone();
            t.authority = r.addr.to_string();
            t.relays = vec![r.addr.to_string()];
            let dir = fleet.dir.path().join(format!("node-{round}-{i}"));
            async move {
                let name = node(&format!("racer-{round}-{i}"));
                enroll(&t, &name, &NodeState::new(&dir)).await
            }
        });
        let results = futures_join_all(attempts).await;
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "round {round}: {results:?}");
        for r in &results {
            match r {
                Ok(_) => {}
                Err(EnrollError::Refused { reason, .. }) => {
                    assert_eq!(*reason, EnrollRefusal::Used, "{reason}")
                }
                Err(other) => panic!("round {round}: unexpected failure {other:?}"),
            }
        }
        // The fleet's record agrees: one use, by the winner.
        let store = fleet.store().await;
        let record = store
            .tickets()
            .await
            .expect("tickets")
            .into_iter()
            .find(|r| r.id == t.id)
            .expect("ticket on record");
        assert_eq!((record.uses_left, record.used_by.len()), (0, 1));
    }
}

/// `join_all` without the futures crate: each attempt on its own task, all at once.
async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_relay_cuts_the_node_off_on_the_others_within_a_second() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start().await;
    let a = fleet.relay("relay-a").await;
    let b = fleet.relay("relay-b").await;
    let (echo, _e) = echo_server().await;
    let _victim = start_outlet_via(
        &fleet.pki,
        "victim",
        &[a.addr, b.addr],
        vec![("echo", Target::tcp(echo.to_string()))],
        Default::default(),
    )
    .await;
    let _bystander = start_outlet(
        &fleet.pki,
        "bystander",
        b.addr,
        vec![("echo", Target::tcp(echo.to_string()))],
    )
    .await;
    eventually(Duration::from_secs(10), "victim on both relays", || async {
        a.nodes().await.contains(&"victim".to_string())
            && b.nodes().await.contains(&"victim".to_string())
    })
    .await;

    let done: Revoked = a
        .admin()
        .post("/v1/identities/victim/revoke")
        .await
        .expect("revoke on relay A");
    assert!(done.persisted && done.was_connected, "{done:?}");
    let revoked_at = Instant::now();
    loop {
        let on_b = b.nodes().await;
        if !on_b.contains(&"victim".to_string()) {
            assert!(on_b.contains(&"bystander".to_string()), "{on_b:?}");
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "relay B still serves the revoked node after {:?}\n{}",
            revoked_at.elapsed(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // B applied the revocation itself (from etcd), not merely saw the node go.
    eventually(
        Duration::from_secs(5),
        "relay B logs the revocation",
        || async { b.log().contains("identity revoked") && b.log().contains("victim") },
    )
    .await;
    // And B refuses the identity from now on.
    let again = postern_tests::kit::OutletSpec {
        ready_timeout: Duration::from_secs(2),
        ..OutletSpec::new("victim", b.addr)
    }
    .start(&fleet.pki)
    .await;
    assert!(again.is_err(), "a revoked identity registered again on B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_outlives_a_relay_restart() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start().await;
    let mut a = fleet.relay("relay-a").await;
    let b = fleet.relay("relay-b").await;
    let (echo, _e) = echo_server().await;
    let _outlet = start_outlet_via(
        &fleet.pki,
        "drained",
        &[a.addr, b.addr],
        vec![("echo", Target::tcp(echo.to_string()))],
        Default::default(),
    )
    .await;
    let _drain: serde_json::Value = a
        .admin()
        .post("/v1/nodes/drained/drain?timeout=0s")
        .await
        .expect("drain");
    // Drained on A, and on B too: the drain is the fleet's.
    eventually(
        Duration::from_secs(5),
        "drained node closed on both",
        || async {
            let drained = "drained".to_string();
            !a.nodes().await.contains(&drained) && !b.nodes().await.contains(&drained)
        },
    )
    .await;

    a.stop().await;
    let mut a = a.start(fleet.dir.path()).await;
    assert!(
        a.log().contains("drained nodes stay drained"),
        "the restarted relay did not read the drain:\n{}",
        a.log()
    );
    // The outlet keeps trying; the relays keep refusing it until it is undrained.
    assert!(!a.nodes().await.contains(&"drained".to_string()));
    assert!(!b.nodes().await.contains(&"drained".to_string()));
    let undrained: Undrained = a
        .admin()
        .post("/v1/nodes/drained/undrain")
        .await
        .expect("undrain");
    assert!(undrained.was_drained, "{undrained:?}");
    eventually(
        Duration::from_secs(20),
        "undrained node back on both",
        || async {
            let drained = "drained".to_string();
            a.nodes().await.contains(&drained) && b.nodes().await.contains(&drained)
        },
    )
    .await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_relay_leaves_the_fleet_when_its_lease_expires() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start().await;
    let mut a = fleet.relay("relay-a").await;
    let b = fleet.relay("relay-b").await;
    let store = fleet.store().await;
    eventually(
        Duration::from_secs(10),
        "both relays registered",
        || async {
            let names: Vec<String> = store
                .members()
                .await
                .expect("members")
                .into_iter()
                .map(|m| m.name)
                .collect();
            names == ["relay-a", "relay-b"]
        },
    )
    .await;
    let members = store.members().await.expect("members");
    assert_eq!(members[0].addresses, vec![a.addr.to_string()]);

    // A crash: no chance to revoke the lease.
    a.proc().child.start_kill().expect("kill relay A");
    a.proc().wait(Duration::from_secs(5)).await;
    let killed = Instant::now();
    eventually(
        Duration::from_secs(10),
        "relay A gone from the fleet",
        || async {
            let names: Vec<String> = store
                .members()
                .await
                .expect("members")
                .into_iter()
                .map(|m| m.name)
                .collect();
            names == ["relay-b"]
        },
    )
    .await;
    // It went with the lease (2 s), not before.
    assert!(killed.elapsed() >= Duration::from_millis(500));
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_gone_routes_keep_forwarding_and_what_needs_etcd_says_so() {
    let _serial = SERIAL.lock().await;
    let mut fleet = Fleet::start().await;
    let a = fleet.relay("relay-a").await;
    let (echo, _e) = echo_server().await;
    let _outlet = start_outlet(
        &fleet.pki,
        "outlet-1",
        a.addr,
        vec![("echo", Target::tcp(echo.to_string()))],
    )
    .await;
    let inlet = start_inlet(&fleet.pki, "inlet-1", a.addr, &["echo"]).await;
    let mut open = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while open.is_none() {
        if let Ok(mut s) = tokio::net::TcpStream::connect(inlet.addr("echo")).await {
            let mut buf = [0u8; 5];
            if s.write_all(b"first").await.is_ok()
                && tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut buf))
                    .await
                    .is_ok_and(|r| r.is_ok())
                && &buf == b"first"
            {
                open = Some(s);
                continue;
            }
        }
        assert!(Instant::now() < deadline, "no echo through the relay");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut open = open.expect("open stream");
    let t = ticket(&fleet, &a, "outlet").await;

    assert!(a
        .metrics()
        .await
        .contains("postern_relay_fleet_connected 1"));
    fleet.etcd.stop_all();
    // The open route keeps carrying data.
    for i in 0..5 {
        let msg = format!("while etcd is down {i}");
        open.write_all(msg.as_bytes()).await.expect("write");
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), open.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(buf, msg.as_bytes());
    }
    // New connections over the existing control connections too (no etcd on that path).
    assert_eq!(
        echo_once(inlet.addr("echo"), b"new").await.as_deref(),
        Some(&b"new"[..])
    );
    // What needs a consistent answer fails, naming etcd.
    match a
        .admin()
        .post::<Revoked>("/v1/identities/inlet-1/revoke")
        .await
    {
        Err(ClientError::Api {
            status, message, ..
        }) => {
            assert_eq!(status, 503, "{message}");
            assert!(message.contains("etcd"), "{message}");
        }
        other => panic!("a revocation without etcd must fail clearly: {other:?}"),
    }
    eventually(
        Duration::from_secs(10),
        "metrics say etcd is gone",
        || async {
            a.metrics()
                .await
                .contains("postern_relay_fleet_connected 0")
        },
    )
    .await;
    let dir = fleet.dir.path().join("late-node");
    match enroll(&t, &node("late"), &NodeState::new(&dir)).await {
        // The relay logs that etcd is unreachable; the node is told the authority cannot
        // enroll right now, a passing refusal that it retries.
        Err(EnrollError::Refused { reason, .. }) => {
            assert_eq!(reason, EnrollRefusal::Unavailable, "{reason}");
            assert!(!reason.is_permanent());
        }
        other => panic!("enrolling without etcd must fail clearly: {other:?}"),
    }
    assert_eq!(
        echo_once(inlet.addr("echo"), b"still").await.as_deref(),
        Some(&b"still"[..])
    );

    // etcd back: enrollment works again, with the same ticket.
    fleet.etcd.start_all().await.expect("etcd back");
    eventually(
        Duration::from_secs(20),
        "metrics say etcd is back",
        || async {
            a.metrics()
                .await
                .contains("postern_relay_fleet_connected 1")
        },
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "enrollment after etcd is back",
        || {
            let (t, dir) = (t.clone(), dir.clone());
            async move {
                enroll(&t, &node("late"), &NodeState::new(&dir))
                    .await
                    .is_ok()
            }
        },
    )
    .await;
}
