//! UDP services end to end with the real binaries: line protocol datagrams through an inlet's
//! UDP listener and an outlet to a real influxd's `[[udp]]` listener (none lost at a steady
//! rate, an oversize one refused and counted, not truncated), and replies from a UDP echo
//! target back to the right client while two send at once, with the outlet's `allow` applied
//! per flow.
//!
//! Build the binaries first with `cargo build --bins` (scripts/test.sh does).

use postern_tests::influxd::{Influxd, InfluxdOptions};
use postern_tests::kit::init_logging;
use postern_tests::udp::{udp_echo_server, udp_metric, UdpStack};
use postern_tests::wait::eventually;
use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

const DB: &str = "udp";

/// `SELECT count(seq) FROM <measurement>` in [`DB`]: the rows that arrived (0 if none yet).
async fn rows(influxd: &Influxd, measurement: &str) -> u64 {
    let v = influxd
        .query(&format!(
            "SELECT count(seq) FROM \"{DB}\".\"autogen\".\"{measurement}\""
        ))
        .await
        .expect("count query");
    v.pointer("/results/0/series/0/values/0/1")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0)
}

/// Sends `n` points of `measurement` (each its own datagram, a unique `seq` field and
/// timestamp) at `per_second`, paced against the clock.
fn send_paced(socket: &UdpSocket, to: SocketAddr, measurement: &str, n: u64, per_second: u64) {
    let start = Instant::now();
    let base_ns: u64 = 1_700_000_000_000_000_000;
    for i in 0..n {
        let due = start + Duration::from_micros(i * 1_000_000 / per_second);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let line = format!("{measurement},client=udp-test seq={i}i {}", base_ns + i);
        socket.send_to(line.as_bytes(), to).expect("send point");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_protocol_over_udp_reaches_influxd_and_none_is_lost() {
    init_logging();
    let influxd = Influxd::start_with_udp(InfluxdOptions { auth: false }, DB)
        .await
        .expect("start influxd with [[udp]]");
    influxd
        .query(&format!("CREATE DATABASE \"{DB}\""))
        .await
        .expect("create database");
    let target = influxd.udp_addr().expect("udp listener");
    let stack = UdpStack::start("influxdb-udp", target, "", &["inlet-a"]).await;
    let inlet = &stack.inlets[0];
    let client = UdpSocket::bind("127.0.0.1:0").expect("client socket");

    // The first datagram sets up the route and the end-to-end connection.
    client
        .send_to(b"warmup,client=udp-test seq=0i", inlet.listen)
        .expect("send");
    eventually(
        Duration::from_secs(30),
        "the first point over UDP",
        || async { rows(&influxd, "warmup").await == 1 },
    )
    .await;

    // 10,000 points at 2,000 a second: every one arrives.
    let (socket, to) = (client.try_clone().expect("clone socket"), inlet.listen);
    tokio::task::spawn_blocking(move || send_paced(&socket, to, "paced", 10_000, 2_000))
        .await
        .expect("sender");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = 0;
    while Instant::now() < deadline {
        got = rows(&influxd, "paced").await;
        if got >= 10_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        got,
        10_000,
        "points lost on loopback; logs:\n{}\ninfluxd:\n{}",
        stack.logs(),
        influxd.log()
    );
    let up = udp_metric(
        inlet.ops,
        "postern_inlet_udp_datagrams_total",
        &[("service", "influxdb-udp"), ("direction", "up")],
    )
    .await;
    assert!(up >= 10_001.0, "inlet counted {up} datagrams up");
    let outlet_up = udp_metric(
        stack.outlet_ops,
        "postern_outlet_udp_datagrams_total",
        &[("service", "influxdb-udp"), ("direction", "up")],
    )
    .await;
    assert!(
        outlet_up >= 10_001.0,
        "outlet counted {outlet_up} datagrams up"
    );
    let ops = inlet.ops;
    let drops = move |reason: &'static str| async move {
        udp_metric(
            ops,
            "postern_inlet_udp_drops_total",
            &[("service", "influxdb-udp"), ("reason", reason)],
        )
        .await
    };
    assert_eq!(drops("oversize").await, 0.0);

    // A datagram bigger than any QUIC datagram of the connection is refused and counted, not
    // truncated (a truncated one would reach influxd as a shorter, still valid point).
    let mut big = String::from("oversize,client=udp-test seq=1i,pad=\"");
    big.push_str(&"x".repeat(20_000));
    big.push('"');
    client
        .send_to(big.as_bytes(), inlet.listen)
        .expect("send oversize");
    eventually(
        Duration::from_secs(10),
        "the oversize drop counted",
        || async { drops("oversize").await == 1.0 },
    )
    .await;
    // The next normal datagram goes through.
    client
        .send_to(b"after,client=udp-test seq=1i", inlet.listen)
        .expect("send");
    eventually(
        Duration::from_secs(20),
        "the point after the oversize one",
        || async { rows(&influxd, "after").await == 1 },
    )
    .await;
    assert_eq!(
        rows(&influxd, "oversize").await,
        0,
        "an oversize point arrived"
    );
    assert!(
        stack.logs().contains("not truncated"),
        "the inlet's log names the oversize drop"
    );
}

/// Sends `n` datagrams `<tag>-<i>` from `socket` and collects what comes back until all have
/// or `within` passes.
async fn echo_round(
    socket: tokio::net::UdpSocket,
    to: SocketAddr,
    tag: &'static str,
    n: usize,
    within: Duration,
) -> (Vec<String>, usize) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 2048];
    let deadline = tokio::time::Instant::now() + within;
    let mut sent = 0;
    while got.len() < n && tokio::time::Instant::now() < deadline {
        if sent < n {
            socket
                .send_to(format!("{tag}-{sent}").as_bytes(), to)
                .await
                .expect("send");
            sent += 1;
        }
        if let Ok(Ok((len, _))) =
            tokio::time::timeout(Duration::from_millis(5), socket.recv_from(&mut buf)).await
        {
            got.push(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
    }
    (got, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_go_back_to_each_client_and_allow_applies_per_flow() {
    init_logging();
    let (echo, _task) = udp_echo_server().await;
    let stack = UdpStack::start(
        "echo-udp",
        echo,
        ",allow=name = \"inlet-good\"",
        &["inlet-good", "inlet-other"],
    )
    .await;
    let (good, other) = (&stack.inlets[0], &stack.inlets[1]);

    // The first datagram sets up the connection; wait for its echo.
    let probe = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let (first, _) = echo_round(probe, good.listen, "probe", 1, Duration::from_secs(30)).await;
    assert_eq!(first, ["probe-0"], "logs:\n{}", stack.logs());

    // Two clients at once: each gets its own replies and none of the other's.
    let a = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let b = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let within = Duration::from_secs(20);
    let (ra, rb) = tokio::join!(
        echo_round(a, good.listen, "alpha", 200, within),
        echo_round(b, good.listen, "beta", 200, within),
    );
    for ((got, sent), tag, other_tag) in [(ra, "alpha", "beta"), (rb, "beta", "alpha")] {
        assert_eq!(sent, 200);
        assert!(
            got.iter().all(|g| g.starts_with(tag)),
            "client {tag} got another client's reply: {:?}",
            got.iter().find(|g| g.starts_with(other_tag))
        );
        let unique: HashSet<&String> = got.iter().collect();
        assert_eq!(
            unique.len(),
            200,
            "client {tag} got {} of its 200 echoes",
            unique.len()
        );
    }
    let flows = udp_metric(
        good.ops,
        "postern_inlet_udp_flows_total",
        &[("service", "echo-udp")],
    )
    .await;
    assert_eq!(flows, 3.0, "one flow per client address");

    // The other inlet is not allowed by the outlet: its client gets nothing, and both ends
    // count the refusal.
    let c = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let (got, _) = echo_round(c, other.listen, "denied", 5, Duration::from_secs(5)).await;
    assert!(got.is_empty(), "a client not allowed got replies: {got:?}");
    eventually(
        Duration::from_secs(10),
        "the outlet counting the refusal",
        || async {
            udp_metric(
                stack.outlet_ops,
                "postern_outlet_udp_drops_total",
                &[("service", "echo-udp"), ("reason", "not_allowed")],
            )
            .await
                >= 1.0
        },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the inlet counting the refusal",
        || async {
            udp_metric(
                other.ops,
                "postern_inlet_udp_drops_total",
                &[("service", "echo-udp"), ("reason", "refused")],
            )
            .await
                >= 1.0
        },
    )
    .await;
    assert_eq!(
        udp_metric(
            stack.outlet_ops,
            "postern_outlet_udp_datagrams_total",
            &[("service", "echo-udp"), ("direction", "up")],
        )
        .await,
        401.0,
        "only the allowed inlet's datagrams reached the target"
    );
}
