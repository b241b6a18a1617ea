//! Routing only to outlets that can serve, with the real binaries: two outlets serve `echo`,
//! each with its own target. An outlet checks its target and tells the relay; the relay routes
//! new connections only to outlets whose target answers, round robin among them, and refuses
//! with the reason when none does.

use postern_tests::bin_net::{metric, which_target, BinNet, TaggedTarget};
use postern_tests::kit::init_logging;
use postern_tests::wait::eventually;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

const UNHEALTHY: &str =
    r#"postern_relay_service_outlets_by_health{service="echo",health="unhealthy"}"#;
const HEALTHY: &str = r#"postern_relay_service_outlets_by_health{service="echo",health="healthy"}"#;
const OUTLET_GAUGE: &str = r#"postern_outlet_target_healthy{service="echo"}"#;

/// `--service` for an outlet of `echo` in front of `target`, checked every 200 ms.
fn echo_to(target: &TaggedTarget) -> Vec<String> {
    vec![format!(
        "echo={},health-check-interval=200ms,health-check-timeout=1s",
        target.addr
    )]
}

async fn answer(listener: SocketAddr) -> String {
    which_target(listener)
        .await
        .unwrap_or_else(|| panic!("no answer through {listener}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_go_only_to_outlets_whose_target_answers() {
    init_logging();
    let mut a = TaggedTarget::start("target-a").await;
    let mut b = TaggedTarget::start("target-b").await;
    let net = BinNet::start(&["echo"]).await;
    let (_oa, oa_ops) = net.outlet("outlet-a", &echo_to(&a)).await;
    let (_ob, _ob_ops) = net.outlet("outlet-b", &echo_to(&b)).await;
    let (i1, l1) = net.inlet("inlet-1", "echo").await;
    let (i2, l2) = net.inlet("inlet-2", "echo").await;
    let unhealthy = || async { metric(net.relay_ops, UNHEALTHY).await };

    // Both targets answer: the two inlets' routes are spread over both outlets.
    eventually(Duration::from_secs(10), "both outlets healthy", || async {
        metric(net.relay_ops, HEALTHY).await == Some(2.0)
    })
    .await;
    let first = answer(l1).await;
    let second = answer(l2).await;
    assert_eq!(
        BTreeSet::from([first.clone(), second]),
        BTreeSet::from(["target-a".to_owned(), "target-b".to_owned()]),
        "round robin over the two healthy outlets"
    );
    let on_a = if first == "target-a" { &i1 } else { &i2 };

    // Target A stops. Once outlet-a has told the relay (and the relay has retired the route
    // of the inlet that used it), every new connection lands on B and none fails.
    a.stop();
    eventually(
        Duration::from_secs(20),
        "the relay sees outlet-a unhealthy",
        || async { unhealthy().await == Some(1.0) },
    )
    .await;
    assert_eq!(metric(oa_ops, OUTLET_GAUGE).await, Some(0.0));
    let status = net.status().await;
    let line = status
        .lines()
        .find(|l| l.trim_start().starts_with("echo "))
        .unwrap_or_else(|| panic!("no echo line in status:\n{status}"));
    assert!(
        line.contains("outlet-a (UNHEALTHY: connect to the target failed")
            && !line.contains(&a.addr.to_string()),
        "status names the unhealthy outlet and why: {line}"
    );
    assert!(
        line.contains("outlet-b") && !line.contains("outlet-b (UNHEALTHY"),
        "{line}"
    );
    eventually(
        Duration::from_secs(10),
        "the route to outlet-a retired",
        || async { on_a.log().contains("route retired by the relay") },
    )
    .await;
    for i in 0..40 {
        for l in [l1, l2] {
            assert_eq!(
                which_target(l).await.as_deref(),
                Some("target-b"),
                "connection {i} through {l}"
            );
        }
    }

    // Target A is back: the relay routes to outlet-a again, and new routes are shared again.
    a.resume().await;
    eventually(
        Duration::from_secs(20),
        "the relay sees outlet-a healthy again",
        || async {
            unhealthy().await == Some(0.0) && metric(net.relay_ops, HEALTHY).await == Some(2.0)
        },
    )
    .await;
    let (_i3, l3) = net.inlet("inlet-3", "echo").await;
    let (_i4, l4) = net.inlet("inlet-4", "echo").await;
    assert_eq!(
        BTreeSet::from([answer(l3).await, answer(l4).await]),
        BTreeSet::from(["target-a".to_owned(), "target-b".to_owned()]),
        "new routes are spread over both outlets again"
    );
    assert_eq!(answer(l1).await, "target-b", "an existing route stays");

    // Both targets stop: a client is refused, and the inlet says that no outlet can reach
    // its target, naming each outlet's reason.
    a.stop();
    b.stop();
    eventually(
        Duration::from_secs(20),
        "the relay sees both unhealthy",
        || async { unhealthy().await == Some(2.0) },
    )
    .await;
    let why = "no outlet of service echo can reach its target now";
    eventually(
        Duration::from_secs(10),
        "the inlet refusing with the reason",
        || async {
            assert_eq!(which_target(l1).await, None, "no target can answer");
            i1.log().contains(why)
        },
    )
    .await;
    let log = i1.log();
    let refusal = log.lines().find(|l| l.contains(why)).expect("refusal line");
    for (outlet, target) in [("outlet-a", &a), ("outlet-b", &b)] {
        assert!(
            refusal.contains(&format!("{outlet}: connect to the target failed")),
            "{refusal}"
        );
        // What reaches the relay and the client never says where the private target is.
        assert!(!refusal.contains(&target.addr.to_string()), "{refusal}");
    }
}
