//! Refusals a node meets and what it does with them, with the real binaries: a relay whose
//! policy refuses an outlet's registration (said once, with the outlet's attributes and the
//! rule, shown by `/readyz`, retried only slowly), and an outlet started with a ticket while
//! its relay (authority) is down (it waits for the relay) or with a spent ticket (it stops and
//! says why).
//!
//! The tests run the binaries next to this test executable; build them first with
//! `cargo build --bins` (scripts/test.sh does).

use postern_tests::kit::*;
use postern_tests::ops::{get, metric};
use postern_tests::ports::{free_port, free_udp_addr};
use postern_tests::procs::RelayCa;
use postern_tests::procs::{cli_output, Proc};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Registration refused by the relay's policy, as the relay counts it in `/metrics`.
async fn policy_refusals(relay_ops: SocketAddr) -> f64 {
    match get(relay_ops, "/metrics").await.ok() {
        Some((200, body)) => metric(
            &body,
            "postern_relay_control_refusals_total",
            &[("reason", "not_allowed")],
        )
        .unwrap_or(0.0),
        _ => 0.0,
    }
}

fn relay_args<'a>(state: &'a str, listen: &'a str, ops: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--state-dir",
        state,
        "--listen",
        listen,
        "--allow-register",
        "influxdb=role = \"outlet\"",
        "--metrics-addr",
        ops,
        "--drain-timeout",
        "1s",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlet_refused_by_policy_says_why_once_and_backs_off() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |p: &str| dir.path().join(p).display().to_string();
    let relay_state = path("relay-state");
    let relay_addr = free_udp_addr().to_string();
    let relay_ops = format!("127.0.0.1:{}", free_port());
    let relay_ca = RelayCa::init(&relay_state, &relay_addr).await;
    // Enrolled fine, but the policy lets only role=outlet register influxdb.
    let ticket = relay_ca.ticket("guest").await;
    let mut relay = Proc::spawn(
        dir.path(),
        "relay",
        "postern-relay",
        &relay_args(&relay_state, &relay_addr, &relay_ops),
    );
    let relay_ops: SocketAddr = relay_ops.parse().expect("addr");
    relay.wait_ready(relay_ops).await;

    let outlet_ops = format!("127.0.0.1:{}", free_port());
    let target = format!("influxdb=127.0.0.1:{},allow=role = \"client\"", free_port());
    let outlet = Proc::spawn(
        dir.path(),
        "outlet",
        "postern-outlet",
        &[
            "run",
            "--ticket",
            &ticket,
            "--name",
            "outlet-g",
            "--state-dir",
            &path("outlet-state"),
            "--service",
            &target,
            "--metrics-addr",
            &outlet_ops,
            "--drain-timeout",
            "1s",
        ],
    );
    let outlet_ops: SocketAddr = outlet_ops.parse().expect("addr");
    let why = "the relay's policy does not allow this node (attributes role=guest) to register \
               influxdb (rule: default deny";

    // /readyz says why the outlet is not ready.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = get(outlet_ops, "/readyz").await.ok();
        if let Some((status, body)) = &ready {
            if body.contains(why) {
                assert_eq!(*status, 503, "{body}");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the outlet's /readyz never named the policy refusal (last: {ready:?}); its log:\n{}",
            outlet.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The relay counts the refusal by its reason; from the first one on, the outlet asks again
    // only a few times in ten seconds (it used to ask several times a second, forever).
    let deadline = Instant::now() + Duration::from_secs(10);
    while policy_refusals(relay_ops).await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the relay never counted a not_allowed refusal; its log:\n{}",
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = Instant::now();
    let window = Duration::from_secs(10);
    // Watching the count over the window is the point here: sample it until the window ends.
    let mut attempts = policy_refusals(relay_ops).await;
    while first.elapsed() < window {
        tokio::time::sleep(Duration::from_millis(250)).await;
        attempts = policy_refusals(relay_ops).await;
        assert!(
            attempts <= 5.0,
            "{attempts} registrations refused within {:?}: a permanent refusal must back off; \
             the outlet's log:\n{}",
            first.elapsed(),
            outlet.log()
        );
    }
    assert!(attempts >= 1.0);

    // Said once in the log, with the attributes and the rule, however often it is retried.
    let log = outlet.log();
    assert_eq!(
        log.matches(why).count(),
        1,
        "the refusal is logged once:\n{log}"
    );
    assert!(
        !log.contains("bad frame") && !log.contains("cannot reach relay"),
        "a refusal is not a broken connection:\n{log}"
    );
    let (status, body) = get(outlet_ops, "/readyz").await.expect("readyz");
    assert_eq!(status, 503);
    assert!(body.contains(why), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlet_with_a_ticket_waits_for_its_relay_and_a_spent_ticket_stops_it() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |p: &str| dir.path().join(p).display().to_string();
    let relay_state = path("relay-state");
    let relay_addr = free_udp_addr().to_string();
    let relay_ops = format!("127.0.0.1:{}", free_port());
    let relay_ca = RelayCa::init(&relay_state, &relay_addr).await;
    let ticket = relay_ca.ticket("outlet").await;

    // The relay is not running yet: the outlet keeps trying to enroll, saying so each time.
    let outlet_ops = format!("127.0.0.1:{}", free_port());
    let target = format!("influxdb=127.0.0.1:{},allow=role = \"client\"", free_port());
    let outlet_args = |state: String, ops: String| {
        vec![
            "run".to_owned(),
            "--ticket".into(),
            ticket.clone(),
            "--state-dir".into(),
            state,
            "--service".into(),
            target.clone(),
            "--metrics-addr".into(),
            ops,
            "--drain-timeout".into(),
            "1s".into(),
        ]
    };
    let args = outlet_args(path("outlet-state"), outlet_ops.clone());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut outlet = Proc::spawn(dir.path(), "outlet", "postern-outlet", &args);
    let failure = format!("the relay (authority) at {relay_addr}");
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Ok(Some(status)) = outlet.child.try_wait() {
            panic!(
                "the outlet exited ({status}) while its relay was down; its log:\n{}",
                outlet.log()
            );
        }
        let log = outlet.log();
        let failures = log
            .lines()
            .filter(|l| l.contains("enrollment failed") && l.contains(&failure))
            .filter(|l| l.contains("retrying in"))
            .count();
        if failures >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the outlet did not retry enrollment twice, naming {failure}; its log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The relay comes up: the outlet enrolls and becomes ready without being restarted.
    let mut relay = Proc::spawn(
        dir.path(),
        "relay",
        "postern-relay",
        &relay_args(&relay_state, &relay_addr, &relay_ops),
    );
    relay.wait_ready(relay_ops.parse().expect("addr")).await;
    outlet.wait_ready(outlet_ops.parse().expect("addr")).await;

    // The same ticket again, for another outlet: spent, which no retry can change. It stops at
    // once and says why, naming the relay (authority).
    let args = outlet_args(path("outlet-2-state"), format!("127.0.0.1:{}", free_port()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _, stderr) =
        tokio::time::timeout(Duration::from_secs(30), cli_output("postern-outlet", &args))
            .await
            .expect("an outlet with a spent ticket stops by itself");
    assert!(!ok, "an outlet with a spent ticket must fail: {stderr}");
    assert!(stderr.contains("ticket already used"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the relay (authority) at {relay_addr} refused the ticket"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("retrying in"), "{stderr}");
}
