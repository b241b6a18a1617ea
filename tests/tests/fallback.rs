//! TLS/TCP fallback: nodes whose network blocks UDP reach the relay over TLS 1.3 on TCP, with
//! the same QUIC control and end-to-end connections inside.

use postern_inlet::ServiceKind;
use postern_net::transport::relay_path::{Transport, TransportMode, TransportSettings};
use postern_outlet::target::Target;
use postern_tests::influxd::{Influxd, InfluxdOptions};
use postern_tests::kit::*;
use postern_tests::traffic::{echo_round, echo_server};
use postern_tests::wait::wait_for;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;

/// `mode`, with the direct path off: these tests are about the path to the relay, and on
/// loopback UDP between the nodes always works, so a route would otherwise leave the relay
/// (the direct path from a TLS/TCP node is tested in the NAT lab, tests/direct_netns.rs).
fn settings(mode: TransportMode) -> TransportSettings {
    TransportSettings {
        mode,
        direct: postern_net::transport::direct::DirectMode::Never,
        ..TransportSettings::default()
    }
}

/// The `/metrics` line of a node's transport gauge for `relay` and `transport`.
fn transport_sample(metrics: &str, component: &str, relay: SocketAddr, t: &str) -> Option<f64> {
    let prefix =
        format!("postern_{component}_relay_transport{{relay=\"{relay}\",transport=\"{t}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_tcp_carries_bulk_data_and_influxdb_http() {
    init_logging();
    let influxd = Influxd::start(InfluxdOptions { auth: false })
        .await
        .expect("start influxd");
    let (echo, _task) = echo_server().await;
    let pki = Pki::new();
    let relay = start_relay_with_tcp(&pki, [3; 32]);
    let outlet = start_outlet_via(
        &pki,
        "outlet-tcp",
        &[relay.addr],
        vec![
            ("echo", Target::tcp(echo.to_string())),
            ("influxdb", Target::tcp(influxd.http_addr().to_string())),
        ],
        settings(TransportMode::Tcp),
    )
    .await;
    let inlet = start_inlet_via(
        &pki,
        "inlet-tcp",
        &[relay.addr],
        &[("echo", ServiceKind::Tcp), ("influxdb", ServiceKind::Tcp)],
        settings(TransportMode::Tcp),
    )
    .await;
    assert_eq!(
        inlet.handle.transports().transport(relay.addr),
        Some(Transport::Tcp)
    );
    assert_eq!(
        outlet.handle.transports().transport(relay.addr),
        Some(Transport::Tcp)
    );
    assert_eq!(
        relay.handle.tcp_stats().open.load(Relaxed),
        2,
        "both nodes hold a TLS/TCP link"
    );

    let t0 = Instant::now();
    let (sent, received) = echo_round(inlet.addr("echo"), 20 * MIB).await;
    assert_eq!(sent, received, "20 MiB each way arrive intact over TLS/TCP");
    let took = t0.elapsed();
    println!(
        "20 MiB each way over TLS/TCP in {took:?} ({:.0} Mbit/s each way, debug build)",
        (20 * MIB * 8) as f64 / took.as_secs_f64() / 1e6
    );
    let forwarded = relay.handle.forward_stats().forwarded_bytes.load(Relaxed);
    assert!(
        forwarded > 40 * MIB as u64,
        "the relay forwarded the data between the two links ({forwarded} bytes)"
    );

    // An InfluxDB HTTP exchange through the inlet: create a database, write, read back.
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let base = format!("http://{}", inlet.addr("influxdb"));
    let ok = |r: reqwest::Response| {
        assert!(r.status().is_success(), "{}", r.status());
        r
    };
    ok(http
        .post(format!("{base}/query"))
        .form(&[("q", "CREATE DATABASE fallback")])
        .send()
        .await
        .expect("create database"));
    let w = http
        .post(format!("{base}/write?db=fallback"))
        .body("cpu,host=a value=42i 1700000000000000000\n")
        .send()
        .await
        .expect("write");
    assert_eq!(w.status().as_u16(), 204, "write accepted");
    let body = ok(http
        .get(format!("{base}/query"))
        .query(&[("db", "fallback"), ("q", "SELECT value FROM cpu")])
        .send()
        .await
        .expect("query"))
    .text()
    .await
    .expect("body");
    assert!(body.contains("42"), "the point came back: {body}");

    // Operators see the transport in metrics and readiness.
    let metrics = postern_net::runtime::ops::render(&inlet.handle, None);
    assert_eq!(
        transport_sample(&metrics, "inlet", relay.addr, "tcp"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        transport_sample(&metrics, "inlet", relay.addr, "udp"),
        Some(0.0)
    );
    let metrics = postern_net::runtime::ops::render(&outlet.handle, None);
    assert_eq!(
        transport_sample(&metrics, "outlet", relay.addr, "tcp"),
        Some(1.0),
        "{metrics}"
    );
    use postern_net::runtime::ops::Observe;
    let detail = inlet.handle.ready_detail().expect("detail");
    assert_eq!(detail, format!("relay {} via tcp", relay.addr));
}

/// A UDP socket that reads and drops everything: what a relay looks like from behind a
/// firewall that drops UDP.
async fn udp_black_hole() -> (SocketAddr, tokio::task::JoinHandle<u64>) {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = sock.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut swallowed = 0u64;
        let mut buf = vec![0u8; 65536];
        while sock.recv_from(&mut buf).await.is_ok() {
            swallowed += 1;
        }
        swallowed
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_tcp_when_udp_gets_no_answer() {
    init_logging();
    let (echo, _task) = echo_server().await;
    let pki = Pki::new();
    let relay = start_relay_with_tcp(&pki, [4; 32]);
    // The nodes are given a relay address whose UDP port is a black hole; its TCP port (set
    // apart with `relay_tcp_port`) is the real relay's TLS listener.
    let (hole, _hole_task) = udp_black_hole().await;
    let auto = TransportSettings {
        mode: TransportMode::Auto,
        tcp_port: Some(relay.addr.port()),
        udp_timeout: None,
        udp_probe_interval: None,
        ..TransportSettings::default()
    };
    let started = Instant::now();
    let outlet = start_outlet_via(
        &pki,
        "outlet-auto",
        &[hole],
        vec![("echo", Target::tcp(echo.to_string()))],
        auto.clone(),
    )
    .await;
    let waited = started.elapsed();
    assert!(
        waited >= postern_net::transport::relay_path::UDP_HANDSHAKE_TIMEOUT,
        "UDP was tried first ({waited:?})"
    );
    assert_eq!(
        outlet.handle.transports().transport(hole),
        Some(Transport::Tcp)
    );
    let inlet = start_inlet_via(
        &pki,
        "inlet-auto",
        &[hole],
        &[("echo", ServiceKind::Tcp)],
        auto,
    )
    .await;
    assert_eq!(
        inlet.handle.transports().transport(hole),
        Some(Transport::Tcp)
    );
    assert_eq!(relay.handle.tcp_stats().accepted.load(Relaxed), 2);
    let (sent, received) = echo_round(inlet.addr("echo"), 4 * MIB).await;
    assert_eq!(sent, received);
    use postern_net::runtime::ops::Observe;
    assert!(inlet
        .handle
        .ready_detail()
        .is_some_and(|d| d.ends_with("via tcp")));

    // The link is a real dependency: when the relay goes, the nodes notice and report it.
    relay.running.stop().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while inlet.handle.relay_connected() || outlet.handle.relay_connected() {
        assert!(
            Instant::now() < deadline,
            "nodes still think they are connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(inlet.handle.transports().transport(hole), None);
}

/// A UDP forwarder to `upstream` that drops everything while `open` is false: a firewall
/// that starts passing UDP again. Each client address gets its own upstream socket, so the
/// relay sees one address per node.
async fn udp_gate(upstream: SocketAddr) -> (SocketAddr, Arc<AtomicBool>) {
    let front = Arc::new(
        tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind"),
    );
    let addr = front.local_addr().expect("addr");
    let open = Arc::new(AtomicBool::new(false));
    let gate = open.clone();
    tokio::spawn(async move {
        let mut backs: HashMap<SocketAddr, Arc<tokio::net::UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = front.recv_from(&mut buf).await {
            if !gate.load(Relaxed) {
                continue;
            }
            let back = match backs.get(&from) {
                Some(b) => b.clone(),
                None => {
                    let b = Arc::new(
                        tokio::net::UdpSocket::bind("127.0.0.1:0")
                            .await
                            .expect("bind"),
                    );
                    let (b2, front2, gate2) = (b.clone(), front.clone(), gate.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        while let Ok((n, _)) = b2.recv_from(&mut buf).await {
                            if gate2.load(Relaxed) {
                                let _ = front2.send_to(&buf[..n], from).await;
                            }
                        }
                    });
                    backs.insert(from, b.clone());
                    b
                }
            };
            let _ = back.send_to(&buf[..n], upstream).await;
        }
    });
    (addr, open)
}

/// Issue 18 item 1: `auto` must not stay on TLS/TCP once UDP works again. A node that fell
/// back (UDP dropped) moves its control connection back to UDP after a probe gets through, and
/// the tunnel keeps working on the new path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_returns_to_udp_when_udp_works_again() {
    init_logging();
    let (echo, _task) = echo_server().await;
    let pki = Pki::new();
    let relay = start_relay_with_tcp(&pki, [6; 32]);
    let (gate, open) = udp_gate(relay.addr).await;
    let auto = TransportSettings {
        mode: TransportMode::Auto,
        tcp_port: Some(relay.addr.port()),
        udp_timeout: Some(Duration::from_millis(500)),
        udp_probe_interval: Some(Duration::from_millis(300)),
        ..TransportSettings::default()
    };
    let outlet = start_outlet_via(
        &pki,
        "outlet-back",
        &[gate],
        vec![("echo", Target::tcp(echo.to_string()))],
        auto.clone(),
    )
    .await;
    let inlet = start_inlet_via(
        &pki,
        "inlet-back",
        &[gate],
        &[("echo", ServiceKind::Tcp)],
        auto,
    )
    .await;
    assert_eq!(
        inlet.handle.transports().transport(gate),
        Some(Transport::Tcp)
    );
    assert_eq!(
        outlet.handle.transports().transport(gate),
        Some(Transport::Tcp)
    );
    let (sent, received) = echo_round(inlet.addr("echo"), MIB).await;
    assert_eq!(sent, received);

    open.store(true, Relaxed);
    wait_for(Duration::from_secs(10), "both nodes back on UDP", || {
        inlet.handle.transports().transport(gate) == Some(Transport::Udp)
            && outlet.handle.transports().transport(gate) == Some(Transport::Udp)
    })
    .await;
    let links = relay.handle.tcp_stats().accepted.load(Relaxed);
    let (sent, received) = echo_round(inlet.addr("echo"), MIB).await;
    assert_eq!(sent, received);
    use postern_net::runtime::ops::Observe;
    assert!(inlet
        .handle
        .ready_detail()
        .is_some_and(|d| d.ends_with("via udp")));
    assert_eq!(
        relay.handle.tcp_stats().accepted.load(Relaxed),
        links,
        "no new TLS/TCP link once UDP works"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_stays_on_udp_when_udp_works() {
    init_logging();
    let (echo, _task) = echo_server().await;
    let pki = Pki::new();
    let relay = start_relay_with_tcp(&pki, [5; 32]);
    let auto = settings(TransportMode::Auto);
    let _outlet = start_outlet_via(
        &pki,
        "outlet-udp",
        &[relay.addr],
        vec![("echo", Target::tcp(echo.to_string()))],
        auto.clone(),
    )
    .await;
    let inlet = start_inlet_via(
        &pki,
        "inlet-udp",
        &[relay.addr],
        &[("echo", ServiceKind::Tcp)],
        auto,
    )
    .await;
    assert_eq!(
        inlet.handle.transports().transport(relay.addr),
        Some(Transport::Udp)
    );
    let (sent, received) = echo_round(inlet.addr("echo"), MIB).await;
    assert_eq!(sent, received);
    assert_eq!(
        relay.handle.tcp_stats().accepted.load(Relaxed),
        0,
        "no TLS/TCP link was needed"
    );
}

/// A TLS client to the relay's fallback listener offering `alpn`.
async fn tls_to_relay(
    pki: &Pki,
    addr: SocketAddr,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(postern_proto::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(pki.roots())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("relay").expect("name");
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
}

/// Reads until the relay closes the connection (EOF or error); false if it stays open.
async fn closed_by_relay<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut buf = [0u8; 1024];
    let read_to_end = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read_to_end)
        .await
        .is_ok()
}

/// How long a counter may take to show what the relay saw.
const WAIT_COUNTED: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_the_tcp_listener_is_refused_and_disturbs_no_route() {
    init_logging();
    let (echo, _task) = echo_server().await;
    let pki = Pki::new();
    let relay = start_relay_with_tcp(&pki, [6; 32]);
    let tcp_mode = settings(TransportMode::Tcp);
    let _outlet = start_outlet_via(
        &pki,
        "outlet-bad",
        &[relay.addr],
        vec![("echo", Target::tcp(echo.to_string()))],
        tcp_mode.clone(),
    )
    .await;
    let inlet = start_inlet_via(
        &pki,
        "inlet-bad",
        &[relay.addr],
        &[("echo", ServiceKind::Tcp)],
        tcp_mode,
    )
    .await;
    let (a, b) = echo_round(inlet.addr("echo"), MIB).await;
    assert_eq!(a, b);
    let stats = relay.handle.tcp_stats();
    let links = relay.handle.tcp_links().stats();
    let fwd = relay.handle.forward_stats();
    let refused0 = stats.refused.load(Relaxed);

    // Not TLS at all.
    let mut raw = TcpStream::connect(relay.addr).await.expect("connect");
    raw.write_all(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await
        .expect("write");
    assert!(closed_by_relay(&mut raw).await, "plain HTTP is closed");
    wait_for(WAIT_COUNTED, "refusal counted", || {
        stats.refused.load(Relaxed) > refused0
    })
    .await;

    // TLS for another protocol.
    let wrong = tls_to_relay(&pki, relay.addr, b"h2").await;
    assert!(wrong.is_err(), "an unknown ALPN is refused");
    wait_for(WAIT_COUNTED, "refusal counted", || {
        stats.refused.load(Relaxed) > refused0 + 1
    })
    .await;

    // A length prefix over the limit ends the link with a framing error.
    let mut tls = tls_to_relay(&pki, relay.addr, postern_proto::dgram::ALPN_TCP)
        .await
        .expect("TLS");
    tls.write_all(&[0xff, 0xff, 1, 2, 3]).await.expect("write");
    tls.flush().await.expect("flush");
    assert!(
        closed_by_relay(&mut tls).await,
        "oversize frame closes the link"
    );
    wait_for(WAIT_COUNTED, "framing error counted", || {
        links.framing_errors.load(Relaxed) == 1
    })
    .await;

    // Well-framed junk: a datagram that is neither QUIC nor a frame, and a forwarding frame
    // for a live route from a link that is not its endpoint. Both are dropped and counted;
    // the link itself may stay (as a UDP sender would).
    let route = relay.handle.routes().ids()[0];
    let mut tls = tls_to_relay(&pki, relay.addr, postern_proto::dgram::ALPN_TCP)
        .await
        .expect("TLS");
    let mut wire = Vec::new();
    postern_proto::dgram::encode(&[0x07; 40], &mut wire).expect("encode");
    let mut spoof = postern_proto::fwd::header(route).to_vec();
    spoof.extend_from_slice(&[0x41; 100]);
    postern_proto::dgram::encode(&spoof, &mut wire).expect("encode");
    let (malformed0, spoofed0) = (
        fwd.dropped_malformed.load(Relaxed),
        fwd.dropped_spoofed.load(Relaxed),
    );
    tls.write_all(&wire).await.expect("write");
    tls.flush().await.expect("flush");
    wait_for(WAIT_COUNTED, "junk counted", || {
        fwd.dropped_malformed.load(Relaxed) > malformed0
            && fwd.dropped_spoofed.load(Relaxed) > spoofed0
    })
    .await;

    // The real nodes never noticed.
    let (a, b) = echo_round(inlet.addr("echo"), MIB).await;
    assert_eq!(a, b, "the route over TLS/TCP still works");
    let metrics = postern_net::runtime::ops::render(&relay.handle, None);
    assert!(
        metrics.contains("postern_relay_tcp_framing_errors_total 1"),
        "{metrics}"
    );
}
