//! The relay under hostile traffic on loopback: QUIC Initial floods answered with stateless
//! Retries, handshakes capped per source and in total, memory bounded, refusal logs summarised.

use postern_outlet::target::Target;
use postern_relay::admission::{HandshakeLimits, RetryPolicy};
use postern_tests::flood;
use postern_tests::kit::*;
use postern_tests::ports::{free_port, free_udp_addr};
use postern_tests::procs::{bin, cli};
use postern_tests::traffic::{echo_round, echo_server};
use postern_tests::wait::wait_for;
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::process::Command;

fn start_relay_limited(pki: &Pki, limits: HandshakeLimits) -> RelayNode {
    let any = "127.0.0.1:0".parse().expect("addr");
    let mut relay = bind_relay(pki, any, [3; 32], None).expect("bind relay");
    relay.set_handshake_limits(limits);
    run_relay(relay).expect("run relay")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_flood_gets_stateless_retries_while_nodes_still_connect() {
    init_logging();
    let pki = Pki::new();
    let max_pending = 16;
    let relay = start_relay_limited(
        &pki,
        HandshakeLimits {
            retry_above_pending: 4,
            max_pending,
            ..HandshakeLimits::default()
        },
    );
    let (echo, _e) = echo_server().await;
    let cfg =
        postern_net::transport::endpoint::control_client(&pki.identity("flooder"), pki.roots())
            .expect("client config");
    let flood = tokio::spawn(flood::initial_flood(
        relay.addr,
        ip("127.0.0.2"),
        cfg,
        6_000,
        1000.0,
        32,
    ));
    let adm = relay.handle.admission_stats();
    // The flood's first few attempts fill the handshake slots (they never answer), then it
    // is under load: everything unproven gets a Retry.
    wait_for(Duration::from_secs(10), "Retries", || {
        adm.retried.load(Relaxed) > 200
    })
    .await;

    // Nodes arriving in the middle of the flood get in and carry data.
    let t = Instant::now();
    let _outlet = start_outlet(
        &pki,
        "outlet-1",
        relay.addr,
        vec![("echo", Target::tcp(echo.to_string()))],
    )
    .await;
    let inlet = start_inlet(&pki, "inlet-1", relay.addr, &["echo"]).await;
    let (a, b) = echo_round(inlet.addr("echo"), 200_000).await;
    assert_eq!(a, b);
    let took = t.elapsed();
    eprintln!("nodes connected and carried data in {took:?} under the flood");
    assert!(
        !flood.is_finished(),
        "the flood ended before the nodes were tested; nothing was shown"
    );
    let sent = flood.await.expect("flood task");
    eprintln!(
        "sent {sent} Initials; nodes connected in {took:?}; accepted {} retried {} pending peak {}",
        adm.accepted.load(Relaxed),
        adm.retried.load(Relaxed),
        adm.pending_peak.load(Relaxed)
    );
    assert!(
        took < Duration::from_secs(5),
        "nodes needed {took:?} under the flood"
    );
    assert!(
        adm.retried.load(Relaxed) as usize > sent / 2,
        "most of the flood must be answered by a stateless Retry"
    );
    assert!(
        adm.pending_peak.load(Relaxed) <= max_pending,
        "pending handshakes above the cap"
    );
    // Only the few accepted before the load showed, plus the two nodes, got a handshake.
    assert!(
        adm.accepted.load(Relaxed) <= max_pending as u64 + 4,
        "accepted {}",
        adm.accepted.load(Relaxed)
    );
    // Abandoned handshakes time out and give their slots back.
    wait_for(
        Duration::from_secs(10),
        "pending handshakes to drain",
        || adm.pending.load(Relaxed) == 0,
    )
    .await;
}

/// A client endpoint on `from` that connects to the relay as node `name`.
async fn try_node_connect(pki: &Pki, from: &str, name: &str, relay: SocketAddr) -> bool {
    let ep = quinn::Endpoint::client(format!("{from}:0").parse().expect("addr")).expect("ep");
    let cfg = postern_net::transport::endpoint::control_client(&pki.identity(name), pki.roots())
        .expect("client config");
    let connecting = ep.connect_with(cfg, relay, "relay").expect("connect");
    let ok = matches!(
        tokio::time::timeout(Duration::from_millis(1500), connecting).await,
        Ok(Ok(_))
    );
    ep.close(0u32.into(), b"done");
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_take_the_handshake_budget() {
    init_logging();
    let pki = Pki::new();
    let relay = start_relay_limited(
        &pki,
        HandshakeLimits {
            retry: RetryPolicy::Never,
            per_source_rate: 0.1,
            per_source_burst: 3.0,
            ..HandshakeLimits::default()
        },
    );
    let mut ok = 0;
    for i in 0..6 {
        if try_node_connect(&pki, "127.0.0.3", &format!("greedy-{i}"), relay.addr).await {
            ok += 1;
        }
    }
    let adm = relay.handle.admission_stats();
    assert_eq!(ok, 3, "the source's burst is 3 handshakes");
    assert!(adm.refused_source_rate.load(Relaxed) >= 3);
    // Another source is not affected.
    assert!(try_node_connect(&pki, "127.0.0.1", "polite", relay.addr).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_versions_no_node_speaks_get_no_answer() {
    init_logging();
    let pki = Pki::new();
    let relay = start_relay_limited(&pki, HandshakeLimits::default());
    let sock = tokio::net::UdpSocket::bind("127.0.0.2:0")
        .await
        .expect("bind");
    // A long-header Initial of an unknown version, padded like a real one: quinn would answer
    // it with a Version Negotiation packet (a reflection towards a spoofed source).
    let mut probe = vec![0xc0, 0x1a, 0x2a, 0x3a, 0x4a, 8];
    probe.extend_from_slice(&[7; 8]);
    probe.push(8);
    probe.extend_from_slice(&[9; 8]);
    probe.resize(1200, 0);
    sock.send_to(&probe, relay.addr).await.expect("send");
    let fwd = relay.handle.forward_stats();
    wait_for(Duration::from_secs(5), "the probe to be counted", || {
        fwd.dropped_not_postern.load(Relaxed) == 1
    })
    .await;
    let mut buf = [0u8; 2048];
    let answer = tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await;
    assert!(
        answer.is_err(),
        "the relay answered a QUIC version no node speaks"
    );
    // QUIC v1 from a real node still works.
    assert!(try_node_connect(&pki, "127.0.0.1", "node-v1", relay.addr).await);
}

async fn scrape(addr: SocketAddr, metric: &str) -> f64 {
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    body.lines()
        .filter(|l| l.starts_with(metric))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The text of a log without its colour escapes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The real binary under a junk flood and an Initial flood: a bounded number of log lines, with
/// counts; memory bounded while it lasts and given back after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooded_relay_binary_keeps_logs_and_memory_bounded() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("relay-state");
    let state_s = state.display().to_string();
    cli("postern-relay", &["ca", "init", "--state-dir", &state_s]).await;
    let relay_addr = free_udp_addr();
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log_path = dir.path().join("relay.log");
    let mut relay = Command::new(bin("postern-relay"))
        .args([
            "run",
            "--state-dir",
            &state_s,
            "--listen",
            &relay_addr.to_string(),
            "--tcp-listen",
            "off",
            "--admin-addr",
            "off",
            "--metrics-addr",
            &metrics.to_string(),
        ])
        .env("POSTERN_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start postern-relay");
    let pid = relay.id().expect("pid");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log().contains("relay listening") {
        if let Ok(Some(exit)) = relay.try_wait() {
            panic!("relay exited ({exit}): {}", log());
        }
        assert!(Instant::now() < deadline, "relay never listened: {}", log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (idle_rss, _) = flood::rss_kib(pid);
    let log_before = log().len();

    let pki = Pki::new();
    let cfg =
        postern_net::transport::endpoint::control_client(&pki.identity("flooder"), pki.roots())
            .expect("cfg");
    let junk = 30_000;
    let (junk_sent, initials_sent) = tokio::join!(
        flood::junk_flood(relay_addr, junk, 10_000.0),
        flood::initial_flood(relay_addr, ip("127.0.0.2"), cfg, 6_000, 2_000.0, 64),
    );
    // Handshakes that fail for real (an unknown CA) go through the refusal summaries too.
    for i in 0..20 {
        assert!(!try_node_connect(&pki, "127.0.0.1", &format!("stranger-{i}"), relay_addr).await);
    }
    let dropped = scrape(metrics, "postern_relay_dropped_packets_total").await;
    let attempts = scrape(metrics, "postern_relay_handshake_attempts_total").await;
    eprintln!("junk sent {junk_sent}, dropped {dropped}; Initials sent {initials_sent}, attempts {attempts}");
    assert!(
        dropped >= junk_sent as f64 * 0.5,
        "the junk did not reach the relay ({dropped} of {junk_sent} dropped): nothing was tested"
    );
    assert!(attempts >= initials_sent as f64 * 0.5);
    let (_, peak_rss) = flood::rss_kib(pid);

    // Wait for the abandoned handshakes to time out, then for memory to come back.
    let deadline = Instant::now() + Duration::from_secs(20);
    while scrape(metrics, "postern_relay_handshakes_pending").await > 0.0 {
        assert!(Instant::now() < deadline, "handshakes never drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut after_rss = flood::rss_kib(pid).0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while after_rss > idle_rss * 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        after_rss = flood::rss_kib(pid).0;
    }
    // A summary line with the count of what was held back reaches the log.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log().contains("summary of the last interval") {
        assert!(
            Instant::now() < deadline,
            "no summary line: {}",
            &log()[log_before..]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let raw = log();
    let flood_log = &strip_ansi(raw.get(log_before..).unwrap_or_default());
    let lines = flood_log.lines().count();
    eprintln!(
        "RSS idle {idle_rss} KiB, peak {peak_rss} KiB, after {after_rss} KiB; {lines} log lines, {} bytes:\n{flood_log}",
        flood_log.len()
    );
    let reasons: std::collections::BTreeSet<&str> = flood_log
        .lines()
        .filter_map(|l| l.split("reason=").nth(1)?.split_whitespace().next())
        .collect();
    assert!(
        reasons.len() >= 3,
        "the flood's refusals are logged by reason: {reasons:?}"
    );
    // At most: the first line of each reason, one summary each, and a few ordinary lines.
    assert!(
        lines <= 3 * reasons.len() + 10,
        "{lines} log lines for {} refusals",
        junk_sent + initials_sent
    );
    assert!(
        peak_rss < idle_rss + 100 * 1024,
        "peak RSS {peak_rss} KiB from {idle_rss} KiB idle"
    );
    assert!(
        after_rss <= idle_rss * 2,
        "RSS {after_rss} KiB after the flood, {idle_rss} KiB idle"
    );
    relay.kill().await.expect("kill relay");
}
