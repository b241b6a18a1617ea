//! The direct path on loopback, in process: a real relay, outlet and inlet on 127.0.0.1, where
//! every node can reach every other directly, so what is tested is the mechanism (candidates,
//! authenticated probes, the move, the counters), not NAT traversal (that is
//! tests/direct_netns.rs, with real NATs in network namespaces).

use postern_inlet::ServiceKind;
use postern_net::transport::direct::{DirectMode, PROBE_LEN, PROBE_TAG};
use postern_outlet::target::Target;
use postern_tests::kit::*;
use postern_tests::traffic::echo_server;
use postern_tests::wait::wait_for;
use quinn::AsyncUdpSocket;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;

async fn cluster(
    pki: &Pki,
    direct: DirectMode,
    tap: Option<postern_relay::forward::udp::Tap>,
) -> (RelayNode, OutletNode, InletNode) {
    let (echo, _task) = echo_server().await;
    let relay = start_relay(pki, "127.0.0.1:0".parse().expect("addr"), [3; 32], tap);
    let outlet = OutletSpec {
        direct: DirectMode::Auto,
        ..OutletSpec::new("outlet-d", relay.addr)
            .targets(vec![("echo", Target::tcp(echo.to_string()))])
            .expect("service names")
    }
    .start(pki)
    .await
    .expect("outlet");
    let inlet = InletSpec {
        direct,
        ..InletSpec::new("inlet-d", relay.addr, &[("echo", ServiceKind::Tcp)])
    }
    .start(pki)
    .await
    .expect("inlet");
    (relay, outlet, inlet)
}

/// Sends `chunks` MiB through the echo service at `addr`, one every `gap`, and reads them
/// back; returns the SHA-256 of what was sent and of what came back.
async fn paced_echo(addr: SocketAddr, chunks: usize, gap: Duration) -> ([u8; 32], [u8; 32]) {
    let stream = TcpStream::connect(addr).await.expect("connect to inlet");
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut h = Sha256::new();
        for i in 0..chunks {
            let chunk: Vec<u8> = (0..MIB).map(|j| (j * 31 + i * 7) as u8).collect();
            h.update(&chunk);
            wr.write_all(&chunk).await.expect("write");
            tokio::time::sleep(gap).await;
        }
        wr.shutdown().await.expect("shutdown");
        <[u8; 32]>::from(h.finalize())
    });
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(20), rd.read(&mut buf))
            .await
            .expect("echo keeps flowing")
            .expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        got += n;
    }
    assert_eq!(got, chunks * MIB, "every byte came back");
    (writer.await.expect("writer"), h.finalize().into())
}

/// A stream started through the relay finishes on the direct path: intact, with no reset,
/// and the relay stops forwarding once the route went direct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_stream_moves_direct_and_the_relay_stops_forwarding() {
    init_logging();
    let pki = Pki::new();
    let (relay, outlet, inlet) = cluster(&pki, DirectMode::Auto, None).await;
    let fwd = relay.handle.forward_stats();
    let transfer = tokio::spawn(paced_echo(
        inlet.addr("echo"),
        24,
        Duration::from_millis(150),
    ));
    // The first chunks cross the relay while the nodes probe.
    wait_for(Duration::from_secs(10), "the route goes direct", || {
        inlet.handle.socket().path_counts() == (1, 0)
    })
    .await;
    let relayed_before = fwd.forwarded_bytes.load(Relaxed);
    assert!(relayed_before > 0, "the stream started on the relay path");
    let (sent, got) = transfer.await.expect("transfer");
    assert_eq!(sent, got, "SHA-256 of what came back matches");
    let relayed_after = fwd.forwarded_bytes.load(Relaxed);
    assert!(
        // What was in flight on the relay path when the outlet's quinn migrated; the whole
        // transfer is 48 MiB through.
        relayed_after - relayed_before < 4 * MIB as u64,
        "the relay kept forwarding after the move: {relayed_before} then {relayed_after} bytes"
    );
    let stats = inlet.handle.socket().direct().stats();
    assert_eq!(stats.moves_to_direct.load(Relaxed), 1);
    assert_eq!(stats.traversals_ok.load(Relaxed), 1);
    assert_eq!(outlet.handle.socket().path_counts(), (1, 0));
    let metrics = postern_net::runtime::ops::render(&inlet.handle, None);
    assert!(
        metrics.contains("postern_inlet_routes_by_path{path=\"direct\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("postern_inlet_path_moves_total{to=\"direct\"} 1"),
        "{metrics}"
    );
}

/// `direct = "never"` on the inlet: no probe is sent and every byte crosses the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_keeps_every_byte_on_the_relay() {
    init_logging();
    let pki = Pki::new();
    let (relay, outlet, inlet) = cluster(&pki, DirectMode::Never, None).await;
    let (sent, got) = paced_echo(inlet.addr("echo"), 8, Duration::from_millis(100)).await;
    assert_eq!(sent, got);
    let forwarded = relay.handle.forward_stats().forwarded_bytes.load(Relaxed);
    assert!(
        forwarded > 2 * 8 * MIB as u64,
        "both directions crossed the relay: {forwarded} bytes"
    );
    assert_eq!(inlet.handle.socket().path_counts(), (0, 1));
    assert_eq!(outlet.handle.socket().path_counts(), (0, 1));
    let s = inlet.handle.socket().direct().stats();
    assert_eq!(s.probes_sent.load(Relaxed), 0, "the inlet never probed");
    let o = outlet.handle.socket().direct().stats();
    assert_eq!(o.probes_received.load(Relaxed), 0);
}

/// A forged probe and a replay of an authentic one (captured as it crossed the relay) are
/// ignored and counted; the route still goes direct with the real peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_probes_are_ignored_and_counted() {
    init_logging();
    let pki = Pki::new();
    let captured: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let c = captured.clone();
    let tap: postern_relay::forward::udp::Tap = Arc::new(move |payload: &mut [u8]| {
        if payload.first() == Some(&PROBE_TAG) {
            c.lock().expect("lock").push(payload.to_vec());
        }
    });
    let (_relay, outlet, inlet) = cluster(&pki, DirectMode::Auto, Some(tap)).await;
    let (sent, got) = paced_echo(inlet.addr("echo"), 2, Duration::from_millis(10)).await;
    assert_eq!(sent, got);
    wait_for(Duration::from_secs(10), "the route goes direct", || {
        inlet.handle.socket().path_counts() == (1, 0)
    })
    .await;
    let outlet_port = outlet.handle.socket().local_addr().expect("addr").port();
    let target = SocketAddr::from(([127, 0, 0, 1], outlet_port));
    let third = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let stats = outlet.handle.socket().direct().stats();
    let (forged0, replayed0) = (
        stats.refused_forged.load(Relaxed) + stats.refused_unknown.load(Relaxed),
        stats.refused_replayed.load(Relaxed),
    );
    // Forged: the right shape, a made-up path id and HMAC.
    let mut forged = vec![0u8; PROBE_LEN];
    forged[0] = PROBE_TAG;
    forged[1] = 1;
    forged[3..].iter_mut().for_each(|b| *b = rand::random());
    third.send_to(&forged, target).await.expect("send forged");
    // Replayed: an authentic wake-up probe the relay carried, sent again from elsewhere.
    let replay = captured
        .lock()
        .expect("lock")
        .first()
        .cloned()
        .expect("the relay carried a wake-up probe");
    third.send_to(&replay, target).await.expect("send replay");
    wait_for(Duration::from_secs(5), "both refusals counted", || {
        stats.refused_forged.load(Relaxed) + stats.refused_unknown.load(Relaxed) > forged0
            && stats.refused_replayed.load(Relaxed) > replayed0
    })
    .await;
    // Nothing answered the third party.
    let mut buf = [0u8; 128];
    let answer = tokio::time::timeout(Duration::from_millis(300), third.recv_from(&mut buf)).await;
    assert!(answer.is_err(), "the outlet answered a refused probe");
    // The connection is still direct and works.
    let (sent, got) = paced_echo(inlet.addr("echo"), 1, Duration::ZERO).await;
    assert_eq!(sent, got);
    assert_eq!(inlet.handle.socket().path_counts(), (1, 0));
}
