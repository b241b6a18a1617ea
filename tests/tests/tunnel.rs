//! End-to-end tests of the tunnel core: relay, outlet and inlet in-process on 127.0.0.1.

use postern_outlet::target::Target;
use postern_tests::kit::*;
use postern_tests::ports::free_udp_addr;
use postern_tests::traffic::{echo_round, echo_server, request_response_server};
use postern_tests::wait::wait_for;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;

async fn cluster_with_echo(
    pki: &Pki,
    tap: Option<postern_relay::forward::udp::Tap>,
) -> (RelayNode, OutletNode, InletNode) {
    let (echo, _task) = echo_server().await;
    let relay = start_relay(pki, "127.0.0.1:0".parse().expect("addr"), [7; 32], tap);
    let outlet = start_outlet(
        pki,
        "outlet-1",
        relay.addr,
        vec![("echo", Target::tcp(echo.to_string()))],
    )
    .await;
    let inlet = start_inlet(pki, "inlet-1", relay.addr, &["echo"]).await;
    (relay, outlet, inlet)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_each_way_arrive_intact() {
    init_logging();
    let pki = Pki::new();
    let (relay, _o, inlet) = cluster_with_echo(&pki, None).await;
    let (sent, received) = echo_round(inlet.addr("echo"), 100 * MIB).await;
    assert_eq!(sent, received);
    let fwd = relay.handle.forward_stats();
    assert!(
        fwd.forwarded_bytes.load(Ordering::Relaxed) > 200 * MIB as u64,
        "the data went through the relay's forwarder"
    );
    // Path MTU discovery lifts end-to-end packets above Ethernet size on loopback (whose MTU is
    // 64 KiB); frames averaging well over 1,500 bytes show it did (ACK-only frames pull the
    // average down, so the bound is loose).
    let packets = fwd.forwarded_packets.load(Ordering::Relaxed).max(1);
    let average = fwd.forwarded_bytes.load(Ordering::Relaxed) / packets;
    eprintln!("average forwarded frame: {average} bytes over {packets} frames");
    assert!(
        average > 4096,
        "average forwarded frame {average} bytes: end-to-end MTU discovery did not raise the packet size"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_still_gets_the_full_response() {
    init_logging();
    let pki = Pki::new();
    let (target, _t) = request_response_server(|req| {
        let mut out = b"got ".to_vec();
        out.extend_from_slice(req.len().to_string().as_bytes());
        out.extend(std::iter::repeat_n(b'x', 300_000));
        out
    })
    .await;
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [1; 32], None);
    let _o = start_outlet(
        &pki,
        "outlet-1",
        relay.addr,
        vec![("rr", Target::tcp(target.to_string()))],
    )
    .await;
    let inlet = start_inlet(&pki, "inlet-1", relay.addr, &["rr"]).await;
    let mut s = TcpStream::connect(inlet.addr("rr")).await.expect("connect");
    s.write_all(&[b'q'; 12345]).await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.expect("read");
    assert!(
        resp.starts_with(b"got 12345"),
        "{:?}",
        &resp[..20.min(resp.len())]
    );
    assert_eq!(resp.len(), 9 + 300_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections() {
    init_logging();
    let pki = Pki::new();
    let (_r, outlet, inlet) = cluster_with_echo(&pki, None).await;
    let addr = inlet.addr("echo");
    let mut tasks = Vec::new();
    for i in 0..200usize {
        tasks.push(tokio::spawn(async move {
            let (a, b) = echo_round(addr, 20_000 + i * 97).await;
            assert_eq!(a, b, "connection {i}");
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    assert_eq!(
        outlet.handle.connection_count(),
        1,
        "all streams shared one end-to-end connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_spread_over_a_pool_of_connections_on_one_route() {
    init_logging();
    let pki = Pki::new();
    let (relay, outlet, inlet) = cluster_with_echo(&pki, None).await;
    inlet.handle.set_pool_size(4);
    let addr = inlet.addr("echo");
    let mut tasks = Vec::new();
    for i in 0..32usize {
        tasks.push(tokio::spawn(async move {
            let (a, b) = echo_round(addr, 2 * MIB + i * 4099).await;
            assert_eq!(a, b, "connection {i}");
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let conns = outlet.handle.connection_count();
    assert!(
        (2..=4).contains(&conns),
        "32 concurrent streams with a pool of 4 ran over {conns} end-to-end connections"
    );
    assert_eq!(
        relay.handle.routes().len(),
        1,
        "the pool shares one route through the relay"
    );
    // A later client still gets through.
    let (a, b) = echo_round(addr, 100_000).await;
    assert_eq!(a, b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_never_sees_plaintext_and_cannot_alter_data() {
    init_logging();
    let pki = Pki::new();
    let record = Arc::new(Mutex::new(Vec::<u8>::new()));
    let flipped = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(AtomicU64::new(0));
    let tap: postern_relay::forward::udp::Tap = {
        let record = record.clone();
        let flipped = flipped.clone();
        let seen = seen.clone();
        Arc::new(move |packet: &mut [u8]| {
            record.lock().expect("record").extend_from_slice(packet);
            // Corrupt one packet in 25 (the rest pass intact).
            if seen.fetch_add(1, Ordering::Relaxed) % 25 == 24 {
                let i = packet.len() / 2;
                packet[i] ^= 0x5a;
                flipped.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let (target, _t) = request_response_server(|req| req.to_vec()).await;
    let relay = start_relay(
        &pki,
        "127.0.0.1:0".parse().expect("addr"),
        [2; 32],
        Some(tap),
    );
    let _o = start_outlet(
        &pki,
        "outlet-1",
        relay.addr,
        vec![("rr", Target::tcp(target.to_string()))],
    )
    .await;
    let inlet = start_inlet(&pki, "inlet-1", relay.addr, &["rr"]).await;
    let marker = b"POSTERN-MARKER-7f3c9a1e-the-relay-must-never-see-this";
    let mut payload = Vec::new();
    for _ in 0..4000 {
        payload.extend_from_slice(marker);
    }
    let mut s = TcpStream::connect(inlet.addr("rr")).await.expect("connect");
    s.write_all(&payload).await.expect("write");
    s.shutdown().await.expect("shutdown");
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.expect("read");
    assert_eq!(
        back, payload,
        "data arrives unaltered despite corrupted packets"
    );
    assert!(
        flipped.load(Ordering::Relaxed) > 0,
        "the tap corrupted some packets"
    );
    let rec = record.lock().expect("record");
    assert!(rec.len() > payload.len(), "the tap saw the traffic");
    assert!(
        !rec.windows(marker.len()).any(|w| w == marker),
        "the marker appeared in the relay's view"
    );
    assert!(!rec.windows(8).any(|w| w == b"POSTERN-"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_from_a_non_endpoint_are_dropped() {
    init_logging();
    let pki = Pki::new();
    let (relay, _o, inlet) = cluster_with_echo(&pki, None).await;
    let (a, b) = echo_round(inlet.addr("echo"), 1000).await;
    assert_eq!(a, b);
    let routes = relay.handle.routes().ids();
    assert_eq!(routes.len(), 1);
    let spoofer = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mut frame = postern_proto::fwd::header(routes[0]).to_vec();
    frame.extend_from_slice(&[0x40; 1200]);
    let before = relay
        .handle
        .forward_stats()
        .dropped_spoofed
        .load(Ordering::Relaxed);
    for _ in 0..10 {
        spoofer.send_to(&frame, relay.addr).await.expect("send");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while relay
        .handle
        .forward_stats()
        .dropped_spoofed
        .load(Ordering::Relaxed)
        < before + 10
    {
        assert!(
            Instant::now() < deadline,
            "spoofed frames were not counted as dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (a, b) = echo_round(inlet.addr("echo"), 100_000).await;
    assert_eq!(a, b, "the real route still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_recover_after_the_relay_restarts() {
    init_logging();
    let pki = Pki::new();
    let (echo, _t) = echo_server().await;
    let addr = free_udp_addr();
    let relay = start_relay(&pki, addr, [3; 32], None);
    let _o = start_outlet(
        &pki,
        "outlet-1",
        addr,
        vec![("echo", Target::tcp(echo.to_string()))],
    )
    .await;
    let inlet = start_inlet(&pki, "inlet-1", addr, &["echo"]).await;
    let (a, b) = echo_round(inlet.addr("echo"), 10_000).await;
    assert_eq!(a, b);

    relay.running.stop().await;
    let relay = start_relay(&pki, addr, [3; 32], None);
    let back = Instant::now();
    loop {
        if ping(inlet.addr("echo"), 0, Duration::from_secs(2)).await {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "no working connection within 5 s of the relay coming back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(relay.handle.nodes().len(), 2, "both nodes reconnected");
}

/// One short echo through `addr`; true when it came back whole `within` the time given.
async fn ping(addr: std::net::SocketAddr, i: usize, within: Duration) -> bool {
    let payload = format!("ping {i}").into_bytes();
    tokio::time::timeout(within, async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(&payload).await.ok()?;
        s.shutdown().await.ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        (out == payload).then_some(())
    })
    .await
    .ok()
    .flatten()
    .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restarted_under_load_loses_no_connection_started_after_it_is_back() {
    init_logging();
    let pki = Pki::new();
    let (echo, _t) = echo_server().await;
    let addr = free_udp_addr();
    let relay = start_relay(&pki, addr, [4; 32], None);
    let _o = start_outlet(
        &pki,
        "outlet-1",
        addr,
        vec![("echo", Target::tcp(echo.to_string()))],
    )
    .await;
    let inlet = start_inlet(&pki, "inlet-1", addr, &["echo"]).await;
    let target = inlet.addr("echo");
    assert!(ping(target, 0, Duration::from_secs(10)).await);

    // Clients keep opening connections, 8 at a time, before, during and after the restart;
    // each records when it started and whether it got its echo.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let results = Arc::new(Mutex::new(Vec::<(Instant, bool)>::new()));
    let mut load = Vec::new();
    for w in 0..8usize {
        let (stop, results) = (stop.clone(), results.clone());
        load.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let ok = ping(target, i, Duration::from_secs(10)).await;
                results.lock().expect("results").push((started, ok));
                i += 8;
            }
        }));
    }
    let done = |since: Option<Instant>| {
        let results = results.lock().expect("results");
        results
            .iter()
            .filter(|(started, ok)| *ok && since.is_none_or(|s| *started >= s))
            .count()
    };
    wait_for(Duration::from_secs(10), "the load to get going", || {
        done(None) >= 8
    })
    .await;
    relay.running.stop().await;
    // The outage itself: the relay stays away a while, as a restarting one does.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let relay = start_relay(&pki, addr, [4; 32], None);
    let back = Instant::now();
    // Let the load run on past the nodes' reconnection.
    wait_for(
        Duration::from_secs(30),
        "both nodes back and the load running on",
        || relay.handle.nodes().len() == 2 && done(Some(back)) > 20,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.expect("load task");
    }
    let results = results.lock().expect("results");
    let after: Vec<bool> = results
        .iter()
        .filter(|(started, _)| *started >= back)
        .map(|(_, ok)| *ok)
        .collect();
    let failed = after.iter().filter(|ok| !**ok).count();
    eprintln!(
        "{} connections in all, {} started after the relay was back, {failed} of those failed",
        results.len(),
        after.len()
    );
    // That the load kept going after the restart, the wait above has checked.
    assert_eq!(
        failed, 0,
        "connections started after the relay came back failed"
    );
    assert_eq!(relay.handle.nodes().len(), 2, "both nodes reconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_arriving_before_the_outlet_registers_waits_for_it_briefly() {
    // Just after an inlet connects to a relay (a relay that restarted forgets every outlet),
    // "unknown service" may only mean the outlet has not registered again yet.
    init_logging();
    let pki = Pki::new();
    let (echo, _t) = echo_server().await;
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [5; 32], None);
    let inlet = start_inlet(&pki, "inlet-1", relay.addr, &["echo"]).await;
    let client = tokio::spawn(ping(inlet.addr("echo"), 1, Duration::from_secs(10)));
    // The client has come before the outlet: its route request was refused (unknown service).
    let refused = || {
        relay
            .handle
            .control_stats()
            .routes_refused
            .load(Ordering::Relaxed)
    };
    wait_for(
        Duration::from_secs(10),
        "the client's route refused",
        || refused() >= 1,
    )
    .await;
    let _o = start_outlet(
        &pki,
        "outlet-1",
        relay.addr,
        vec![("echo", Target::tcp(echo.to_string()))],
    )
    .await;
    assert!(
        client.await.expect("client"),
        "the client that came before the outlet registered got no echo"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_target_closes_the_client_promptly_and_spares_other_services() {
    init_logging();
    let pki = Pki::new();
    let (echo, _t) = echo_server().await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    }; // listener dropped: nothing listens there now
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [4; 32], None);
    let _o = start_outlet(
        &pki,
        "outlet-1",
        relay.addr,
        vec![
            ("echo", Target::tcp(echo.to_string())),
            ("dead", Target::tcp(dead.to_string())),
        ],
    )
    .await;
    let inlet = start_inlet(&pki, "inlet-1", relay.addr, &["echo", "dead"]).await;
    let started = Instant::now();
    // The inlet may reset the connection so fast that connect() itself reports it.
    if let Ok(mut s) = TcpStream::connect(inlet.addr("dead")).await {
        let _ = s.write_all(b"hello").await;
        let mut buf = [0u8; 16];
        let res = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        match res {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(n)) => panic!("unexpected {n} bytes from a dead target"),
            Err(_) => panic!("client connection left hanging"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    let (a, b) = echo_round(inlet.addr("echo"), 50_000).await;
    assert_eq!(a, b, "the other service still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_is_refused_and_the_client_closed() {
    init_logging();
    let pki = Pki::new();
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [5; 32], None);
    let inlet = start_inlet(&pki, "inlet-1", relay.addr, &["nowhere"]).await;
    // The inlet resets the connection so fast that even connect() may report it.
    if let Ok(mut s) = TcpStream::connect(inlet.addr("nowhere")).await {
        let mut buf = [0u8; 16];
        let res = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(
            matches!(res, Ok(Ok(0)) | Ok(Err(_))),
            "closed promptly: {res:?}"
        );
    }
    assert!(
        relay
            .handle
            .control_stats()
            .routes_refused
            .load(Ordering::Relaxed)
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_spread_over_outlets_and_move_when_one_leaves() {
    init_logging();
    let pki = Pki::new();
    let (echo, _t) = echo_server().await;
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [6; 32], None);
    let o1 = start_outlet(
        &pki,
        "outlet-1",
        relay.addr,
        vec![("echo", Target::tcp(echo.to_string()))],
    )
    .await;
    let o2 = start_outlet(
        &pki,
        "outlet-2",
        relay.addr,
        vec![("echo", Target::tcp(echo.to_string()))],
    )
    .await;
    let i1 = start_inlet(&pki, "inlet-1", relay.addr, &["echo"]).await;
    let i2 = start_inlet(&pki, "inlet-2", relay.addr, &["echo"]).await;
    for i in [&i1, &i2] {
        let (a, b) = echo_round(i.addr("echo"), 1000).await;
        assert_eq!(a, b);
    }
    assert_eq!(
        o1.handle.connection_count() + o2.handle.connection_count(),
        2
    );
    assert_eq!(o1.handle.connection_count(), 1, "one route on each outlet");
    o1.running.stop().await;
    // Both inlets keep working: the one routed to outlet-1 gets a new route.
    for i in [&i1, &i2] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = tokio::time::timeout(Duration::from_secs(3), echo_round(i.addr("echo"), 1000))
                .await;
            if matches!(ok, Ok((a, b)) if a == b) {
                break;
            }
            assert!(Instant::now() < deadline, "inlet did not get a new route");
        }
    }
    assert_eq!(o2.handle.connection_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_keys_rotate_on_budget_without_disturbing_data() {
    init_logging();
    let pki = Pki::new();
    set_key_budget(Some(postern_net::transport::rekey::KeyBudget {
        bytes: 4 * MIB as u64,
        time: Duration::from_secs(3600),
    }));
    let (_r, _o, inlet) = cluster_with_echo(&pki, None).await;
    set_key_budget(None);
    let (a, b) = echo_round(inlet.addr("echo"), 32 * MIB).await;
    assert_eq!(a, b);
    // The budget is checked twice a second; the transfer may finish first, so keep the
    // connection busy until a rotation has been seen, then check data again.
    let deadline = Instant::now() + Duration::from_secs(20);
    while inlet.handle.key_updates() == 0 {
        assert!(Instant::now() < deadline, "no key update happened");
        let (a, b) = echo_round(inlet.addr("echo"), 8 * MIB).await;
        assert_eq!(a, b);
    }
    let (a, b) = echo_round(inlet.addr("echo"), 16 * MIB).await;
    assert_eq!(a, b, "data intact after key updates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_to_the_relay_is_counted_and_disturbs_no_route() {
    use std::sync::atomic::Ordering::Relaxed;
    init_logging();
    let pki = Pki::new();
    let (relay, _o, inlet) = cluster_with_echo(&pki, None).await;
    let (a, b) = echo_round(inlet.addr("echo"), 10_000).await;
    assert_eq!(a, b);
    let fwd = relay.handle.forward_stats();
    let ctl = relay.handle.control_stats();

    // Garbage datagrams: unknown first bytes, truncated frames, unknown routes.
    let junk = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let malformed_before = fwd.dropped_malformed.load(Relaxed);
    let unknown_before = fwd.dropped_unknown_route.load(Relaxed);
    for d in [
        vec![0x00u8; 50],
        vec![0x3f; 3],
        vec![postern_proto::fwd::TAG, 1, 2],
        vec![0x02; 1200],
    ] {
        junk.send_to(&d, relay.addr).await.expect("send");
    }
    let mut unknown_route = postern_proto::fwd::header(postern_proto::fwd::RouteId(42)).to_vec();
    unknown_route.extend_from_slice(&[0x41; 100]);
    junk.send_to(&unknown_route, relay.addr)
        .await
        .expect("send");
    let deadline = Instant::now() + Duration::from_secs(5);
    while fwd.dropped_malformed.load(Relaxed) < malformed_before + 4
        || fwd.dropped_unknown_route.load(Relaxed) < unknown_before + 1
    {
        assert!(Instant::now() < deadline, "garbage was not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A client with the wrong ALPN: the handshake fails and is counted.
    let hs_before = ctl.handshake_failures.load(Relaxed);
    let ident = pki.identity("wrong-alpn");
    let mut tls = postern_proto::tls::client_config(&ident, pki.roots(), &[b"h3"]).expect("tls");
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic");
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let res = ep
        .connect_with(quinn::ClientConfig::new(Arc::new(qc)), relay.addr, "relay")
        .expect("connect")
        .await;
    assert!(res.is_err(), "wrong ALPN must not connect");
    let deadline = Instant::now() + Duration::from_secs(5);
    while ctl.handshake_failures.load(Relaxed) == hs_before {
        assert!(Instant::now() < deadline, "wrong ALPN not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A real node sending an oversize frame and an unknown-version frame on control streams.
    let client =
        postern_net::transport::endpoint::control_client(&pki.identity("prober"), pki.roots())
            .expect("client");
    let conn = ep
        .connect_with(client, relay.addr, "relay")
        .expect("connect")
        .await
        .expect("control connection");
    let bad_before = ctl.bad_messages.load(Relaxed);
    let mut oversize = ((postern_proto::codec::MAX_FRAME_LEN + 10) as u32)
        .to_be_bytes()
        .to_vec();
    oversize.extend(std::iter::repeat_n(
        1u8,
        postern_proto::codec::MAX_FRAME_LEN + 10,
    ));
    let mut unknown_version =
        postern_proto::codec::to_frame(&postern_proto::msg::Ctl::Heartbeat { seq: 1 })
            .expect("frame");
    unknown_version[postern_proto::codec::LEN_PREFIX] = 99;
    for bytes in [oversize, unknown_version] {
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        let _ = send.write_all(&bytes).await;
        let _ = send.finish();
        let answer = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 20))
            .await
            .expect("answered in time")
            .expect("answer");
        let msg: postern_proto::msg::Ctl =
            postern_proto::codec::decode_exact(&answer).expect("frame");
        assert!(
            matches!(
                msg,
                postern_proto::msg::Ctl::Refused {
                    reason: postern_proto::msg::Refusal::BadMessage { .. }
                }
            ),
            "{msg:?}"
        );
    }
    assert_eq!(ctl.bad_messages.load(Relaxed), bad_before + 2);
    // ...counted by reason for /metrics.
    assert!(
        ctl.refusals().contains(&("bad_message", 2)),
        "{:?}",
        ctl.refusals()
    );
    // The relay still answers a good request on the same connection...
    let pong = postern_net::control::exchange::request(
        &conn,
        &postern_proto::msg::Ctl::Heartbeat { seq: 7 },
        Duration::from_secs(5),
    )
    .await
    .expect("heartbeat");
    assert_eq!(pong, postern_proto::msg::Ctl::HeartbeatAck { seq: 7 });
    // ...and the existing route never noticed.
    let (a, b) = echo_round(inlet.addr("echo"), 1_000_000).await;
    assert_eq!(a, b);
}

/// With `forward-threads = 4` the relay binds four sockets on its port and the kernel spreads
/// the nodes over them: many inlets' streams arrive intact, more than one socket forwards, and
/// control connections whose packets land on an extra socket (handed to quinn through its
/// queue) still register, get routes and carry on. The port is free again once it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_threads_spread_routes_over_the_sockets_of_one_port() {
    init_logging();
    let pki = Pki::new();
    let (echo, _task) = echo_server().await;
    let mut opts = relay_options(
        pki.identity("relay"),
        pki.roots(),
        "127.0.0.1:0".parse().expect("addr"),
        [5; 32],
        None,
    );
    opts.forward_threads = 4;
    let relay = run_relay(postern_relay::server::Relay::bind(opts).expect("bind")).expect("run");
    let _outlet = start_outlet(
        &pki,
        "outlet-1",
        relay.addr,
        vec![("echo", Target::tcp(echo.to_string()))],
    )
    .await;
    // Each inlet is its own node, with its own UDP socket: 16 source ports for the kernel's
    // hash to spread (all on one socket of four: 4^-15).
    let mut inlets = Vec::new();
    for i in 0..16 {
        inlets.push(start_inlet(&pki, &format!("inlet-{i}"), relay.addr, &["echo"]).await);
    }
    let rounds = inlets.iter().flat_map(|inlet| {
        let addr = inlet.addr("echo");
        (0..2).map(move |_| tokio::spawn(echo_round(addr, 512 * 1024)))
    });
    for round in rounds.collect::<Vec<_>>() {
        let (sent, received) = round.await.expect("echo round");
        assert_eq!(sent, received, "echoed bytes");
    }
    let fwd = relay.handle.forward_stats();
    let per_socket: Vec<(u64, u64)> = fwd
        .sockets
        .iter()
        .map(|s| {
            (
                s.forwarded_packets.load(Ordering::Relaxed),
                s.quic_packets.load(Ordering::Relaxed),
            )
        })
        .collect();
    eprintln!("per socket (forwarded, quic): {per_socket:?}");
    assert_eq!(per_socket.len(), 4, "four sockets in the group");
    assert!(
        per_socket.iter().filter(|(f, _)| *f > 0).count() > 1,
        "frames forwarded by more than one socket: {per_socket:?}"
    );
    assert!(
        per_socket[1..].iter().any(|(_, q)| *q > 0),
        "control packets read by an extra socket reached quinn: {per_socket:?}"
    );
    assert_eq!(
        per_socket.iter().map(|(f, _)| f).sum::<u64>(),
        fwd.forwarded_packets.load(Ordering::Relaxed),
        "per-socket counts add up to the total"
    );
    assert_eq!(fwd.dropped_spoofed.load(Ordering::Relaxed), 0);
    let addr = relay.addr;
    drop(inlets);
    relay.running.stop().await;
    std::net::UdpSocket::bind(addr).expect("the relay's port is free once it has stopped");
}
