//! Several relays: an outlet registers with each, an inlet uses one and, when it dies, moves
//! its end-to-end connection to another relay's path (QUIC migration) so that open client
//! connections survive and new ones keep working.
//!
//! Two ways to die: a relay that stops (its connections are closed, nodes learn at once), and
//! a relay that silently vanishes (a UDP path in front of it starts dropping everything, as a
//! crashed host or a cut link would; nodes learn from their control keep-alives).

use postern_inlet::ServiceKind;
use postern_net::transport::relay_path::{TransportMode, TransportSettings};
use postern_outlet::target::Target;
use postern_tests::churn::{failures, short_exchange, under_load, Report};
use postern_tests::kit::*;
use postern_tests::ports::free_udp_addr;
use postern_tests::traffic::echo_server;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// Three relays, an outlet registered with all, an inlet using them in order; returns the
/// relays, the outlet and the inlet. `front` optionally replaces the first relay's address
/// as the nodes see it (a path in front of it).
async fn three_relays(
    pki: &Pki,
    front: Option<&dyn Fn(SocketAddr) -> SocketAddr>,
    transport: TransportSettings,
) -> (Vec<RelayNode>, OutletNode, InletNode) {
    let (echo, _task) = echo_server().await;
    // The echo server lives as long as the runtime (the task is not aborted on drop).
    let relays: Vec<RelayNode> = (0..3)
        .map(|i| {
            start_relay(
                pki,
                "127.0.0.1:0".parse().expect("addr"),
                [10 + i; 32],
                None,
            )
        })
        .collect();
    let mut addrs: Vec<SocketAddr> = relays.iter().map(|r| r.addr).collect();
    if let Some(f) = front {
        addrs[0] = f(addrs[0]);
    }
    let outlet = start_outlet_via(
        pki,
        "outlet-ha",
        &addrs,
        vec![("echo", Target::tcp(echo.to_string()))],
        transport.clone(),
    )
    .await;
    for r in &relays {
        assert_eq!(r.handle.services().len(), 1, "registered with every relay");
    }
    let inlet = start_inlet_via(
        pki,
        "inlet-ha",
        &addrs,
        &[("echo", ServiceKind::Tcp)],
        transport,
    )
    .await;
    short_exchange(inlet.addr("echo"))
        .await
        .expect("first exchange");
    assert_eq!(
        relays[0].handle.routes().len(),
        1,
        "the inlet uses the first relay"
    );
    (relays, outlet, inlet)
}

fn assert_survived(report: &Report, inlet: &InletNode, others: &[RelayNode]) {
    let failed = failures(report);
    assert!(report.after_kill >= 20, "the load went on after the kill");
    assert!(
        failed.is_empty(),
        "client connections failed: {:?}",
        failed.iter().take(5).collect::<Vec<_>>()
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
    let elsewhere: usize = others.iter().map(|r| r.handle.routes().len()).sum();
    assert!(elsewhere >= 1, "the traffic now goes through another relay");
}

fn print(name: &str, r: &Report) {
    println!(
        "{name}: {} connections, {} started after the relay was gone ({:?} to kill it), {} \
         failed; recovery (relay gone to the first success of a connection started after it): \
         {:?}; long transfer: {:?}",
        r.outcomes.len(),
        r.after_kill,
        r.kill_took,
        failures(r).len(),
        r.recovery,
        r.long
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inlet_moves_to_another_relay_when_its_relay_stops_under_load() {
    init_logging();
    let pki = Pki::new();
    let (relays, _outlet, inlet) = three_relays(&pki, None, TransportSettings::default()).await;
    let mut relays = relays.into_iter();
    let first = relays.next().expect("relay 1");
    let others: Vec<RelayNode> = relays.collect();
    // `stop` closes the relay's connections (nodes learn at once) and returns once its socket
    // is released: from then on nothing can go through it.
    let report = under_load(
        inlet.addr("echo"),
        first.running.stop(),
        Duration::from_secs(3),
    )
    .await;
    print("relay stopped", &report);
    assert_survived(&report, &inlet, &others);
}

/// A UDP path to one upstream that can be cut: each client address gets its own upstream
/// socket (as behind a NAT), so the relay sees distinct nodes.
struct CuttablePath {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
}

impl CuttablePath {
    async fn start(upstream: SocketAddr) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let addr = front.local_addr().expect("addr");
        let cut = Arc::new(AtomicBool::new(false));
        let c = cut.clone();
        tokio::spawn(async move {
            let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                if c.load(Relaxed) {
                    continue;
                }
                let up = match clients.get(&from) {
                    Some(u) => u.clone(),
                    None => {
                        let u = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
                        u.connect(upstream).await.expect("connect");
                        let (u2, front2, c2) = (u.clone(), front.clone(), c.clone());
                        tokio::spawn(async move {
                            let mut b = vec![0u8; 65536];
                            while let Ok(n) = u2.recv(&mut b).await {
                                if !c2.load(Relaxed) {
                                    let _ = front2.send_to(&b[..n], from).await;
                                }
                            }
                        });
                        clients.insert(from, u.clone());
                        u
                    }
                };
                let _ = up.send(&buf[..n]).await;
            }
        });
        Self { addr, cut }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inlet_moves_to_another_relay_when_its_relay_vanishes_silently() {
    init_logging();
    let pki = Pki::new();
    // The first relay is reached through a path we can cut; the others directly.
    let relay_1 = free_udp_addr();
    let path = CuttablePath::start(relay_1).await;
    let front_addr = path.addr;
    let relay = start_relay(&pki, relay_1, [9; 32], None);
    let (others, _outlet, inlet) = {
        // Build the cluster by hand: the first relay is the one behind the path.
        let (echo, _task) = echo_server().await;
        let others: Vec<RelayNode> = (0..2)
            .map(|i| {
                start_relay(
                    &pki,
                    "127.0.0.1:0".parse().expect("addr"),
                    [20 + i; 32],
                    None,
                )
            })
            .collect();
        let addrs = [front_addr, others[0].addr, others[1].addr];
        let udp = TransportSettings {
            mode: TransportMode::Udp,
            ..TransportSettings::default()
        };
        let outlet = start_outlet_via(
            &pki,
            "outlet-ha",
            &addrs,
            vec![("echo", Target::tcp(echo.to_string()))],
            udp.clone(),
        )
        .await;
        let inlet =
            start_inlet_via(&pki, "inlet-ha", &addrs, &[("echo", ServiceKind::Tcp)], udp).await;
        short_exchange(inlet.addr("echo"))
            .await
            .expect("first exchange");
        (others, outlet, inlet)
    };
    assert_eq!(
        relay.handle.routes().len(),
        1,
        "the inlet uses the first relay"
    );
    let cut = path.cut.clone();
    let kill = async move { cut.store(true, Relaxed) };
    let report = under_load(inlet.addr("echo"), kill, Duration::from_secs(3)).await;
    print("relay vanished", &report);
    assert!(
        report.recovery < postern_net::transport::endpoint::E2E_IDLE_TIMEOUT,
        "moved before the end-to-end connection would time out"
    );
    assert_survived(&report, &inlet, &others);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_cannot_route_is_skipped_for_the_next_one() {
    init_logging();
    let (echo, _task) = echo_server().await;
    let pki = Pki::new();
    let relays: Vec<RelayNode> = (0..3)
        .map(|i| {
            start_relay(
                &pki,
                "127.0.0.1:0".parse().expect("addr"),
                [30 + i; 32],
                None,
            )
        })
        .collect();
    let addrs: Vec<SocketAddr> = relays.iter().map(|r| r.addr).collect();
    // The outlet is not connected to the first relay (as after a partition between them).
    let _outlet = start_outlet_via(
        &pki,
        "outlet-partial",
        &addrs[1..],
        vec![("echo", Target::tcp(echo.to_string()))],
        TransportSettings::default(),
    )
    .await;
    let inlet = start_inlet_via(
        &pki,
        "inlet-partial",
        &addrs,
        &[("echo", ServiceKind::Tcp)],
        TransportSettings::default(),
    )
    .await;
    // The inlet is connected to every relay (the kit waited for the first only).
    let deadline = Instant::now() + Duration::from_secs(10);
    while relays[1..].iter().any(|r| r.handle.nodes().len() < 2)
        || relays[0].handle.nodes().is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "inlet did not connect to every relay"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    short_exchange(inlet.addr("echo"))
        .await
        .expect("served through a relay that can route");
    assert_eq!(
        relays[0]
            .handle
            .control_stats()
            .routes_refused
            .load(Relaxed),
        1,
        "the first relay was asked and refused"
    );
    assert_eq!(relays[0].handle.routes().len(), 0);
    assert_eq!(relays[1].handle.routes().len(), 1, "the second one routes");
}
