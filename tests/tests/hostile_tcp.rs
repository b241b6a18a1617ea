//! The relay's TCP ports under slot exhaustion, on loopback: idle and trickling connections
//! from many source addresses on the public (hostname) port and the TLS/TCP fallback port,
//! while a real HTTPS client and nodes forced onto TCP still get in.

use postern_inlet::ServiceKind;
use postern_net::transport::relay_path::{TransportMode, TransportSettings};
use postern_outlet::public::access::AccessStore;
use postern_outlet::public::{Public, PublicService};
use postern_outlet::serve::Services;
use postern_outlet::target::Target;
use postern_tests::junk_tcp::{
    connect_from, http_server, https_connector, https_get, loopback_sources,
};
use postern_tests::junk_tcp::{Junk, JunkHold};
use postern_tests::kit::*;
use postern_tests::traffic::{echo_round, echo_server};
use postern_tests::wait::wait_for;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

const DOMAIN: &str = "relay.test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_port_serves_https_while_junk_holds_every_slot() {
    init_logging();
    let pki = Pki::new();
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [3; 32], None);
    let max = 64;
    let mut opts =
        postern_relay::public::PublicOptions::new("127.0.0.1:0".parse().expect("addr"), DOMAIN);
    opts.max_connections = max;
    opts.peek_timeout = Duration::from_secs(1);
    let (ingress, _ingress) = start_public_ingress_with(&relay, opts).await;
    let backend = http_server("served through the relay")
        .await
        .expect("backend");
    let state = tempfile::tempdir().expect("dir");
    let host = format!("web.{DOMAIN}");
    let public = Arc::new(Public {
        services: HashMap::from([(
            svc("web"),
            PublicService {
                acceptor: host_acceptor(&pki, &host),
                host: host.clone(),
            },
        )]),
        access: Arc::new(AccessStore::open(state.path()).expect("access store")),
        link_port: 443,
    });
    let _outlet = start_outlet_public(
        &pki,
        "outlet-web",
        relay.addr,
        Services {
            targets: HashMap::from([(svc("web"), Target::tcp(backend.to_string()))]),
            leases: HashMap::new(),
            allow: HashMap::new(),
            inject_at: HashMap::new(),
            udp: HashMap::new(),
        },
        public.clone(),
    )
    .await;
    let grant = public
        .access
        .create(&svc("web"), Duration::from_secs(600), Default::default())
        .expect("grant");
    let cookie = format!("Cookie: postern_access={}\r\n", grant.secret.expose());

    // Alone, a trickling connection is closed at the ClientHello's deadline.
    let stats = relay.handle.public_stats();
    let few = JunkHold::start(
        ingress,
        &loopback_sources(0x0180, 1),
        3,
        Junk::Trickle(Duration::from_millis(200)),
        &host,
        Duration::from_secs(60),
    );
    wait_for(
        Duration::from_secs(5),
        "trickling ClientHellos cut off",
        || few.stats.closed.load(Relaxed) == 3,
    )
    .await;
    assert_eq!(stats.preauth_timeout.load(Relaxed), 3);
    assert!(few.stats.bytes.load(Relaxed) >= 3, "they trickled");
    few.stop().await;

    // 8 sources trickling a ClientHello (12 each, under the per-source cap) and one source
    // opening 60 idle connections (over it): 156 connections at a cap of 64.
    let trickle = JunkHold::start(
        ingress,
        &loopback_sources(0x0100, 8),
        12,
        Junk::Trickle(Duration::from_millis(200)),
        &host,
        Duration::from_millis(20),
    );
    let idle = JunkHold::start(
        ingress,
        &loopback_sources(0x0200, 1),
        60,
        Junk::Idle,
        &host,
        Duration::from_millis(20),
    );
    let churned =
        || stats.evicted_pending.load(Relaxed) > 50 && stats.evicted_source.load(Relaxed) > 20;
    let t = Instant::now();
    while !churned() && t.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        churned(),
        "junk fills the cap and churns: evicted_pending {} evicted_source {} refused {} held {}",
        stats.evicted_pending.load(Relaxed),
        stats.evicted_source.load(Relaxed),
        stats.refused.load(Relaxed),
        trickle.held() + idle.held()
    );
    assert!(trickle.stats.bytes.load(Relaxed) > 0, "the junk trickled");

    let connector = https_connector(pki.roots()).expect("connector");
    for i in 0..5 {
        let (resp, took) = https_get(
            &connector,
            ingress,
            &host,
            "/",
            &cookie,
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|e| panic!("request {i} under the junk: {e}"));
        assert!(resp.contains("served through the relay"), "{resp}");
        assert!(
            took < Duration::from_secs(1),
            "request {i} served in {took:?} while {} junk connections were held",
            trickle.held() + idle.held()
        );
    }
    wait_for(
        Duration::from_secs(5),
        "the requests counted as forwarded",
        || stats.forwarded.load(Relaxed) >= 5,
    )
    .await;
    trickle.stop().await;
    idle.stop().await;
}

fn tcp_only() -> TransportSettings {
    TransportSettings {
        mode: TransportMode::Tcp,
        ..TransportSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_fallback_lets_nodes_in_while_junk_holds_links() {
    init_logging();
    let pki = Pki::new();
    let relay = start_relay_with_tcp(&pki, [3; 32]);
    let tcp_addr = relay.addr;
    let (echo, _e) = echo_server().await;
    let trickle = JunkHold::start(
        tcp_addr,
        &loopback_sources(0x0300, 6),
        20,
        Junk::Trickle(Duration::from_millis(300)),
        "relay",
        Duration::from_millis(20),
    );
    let idle = JunkHold::start(
        tcp_addr,
        &loopback_sources(0x0400, 1),
        60,
        Junk::Idle,
        "relay",
        Duration::from_millis(20),
    );
    let stats = relay.handle.tcp_stats();
    wait_for(Duration::from_secs(20), "junk connections held", || {
        trickle.held() + idle.held() >= 150 && stats.evicted_source.load(Relaxed) > 20
    })
    .await;

    // A junk client that finishes TLS but never authenticates a node.
    let tls_junk = {
        let mut cfg = rustls::ClientConfig::builder_with_provider(postern_proto::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(pki.roots().as_ref().clone())
            .with_no_client_auth();
        cfg.alpn_protocols = vec![postern_proto::dgram::ALPN_TCP.to_vec()];
        let tcp = connect_from("127.0.5.1".parse().expect("ip"), tcp_addr)
            .await
            .expect("connect");
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(
                rustls::pki_types::ServerName::try_from("relay").expect("name"),
                tcp,
            )
            .await
            .expect("TLS with the relay")
    };
    let tls_junk_since = Instant::now();

    let t0 = Instant::now();
    let _outlet = start_outlet_via(
        &pki,
        "outlet-tcp",
        &[relay.addr],
        vec![("echo", Target::tcp(echo.to_string()))],
        tcp_only(),
    )
    .await;
    let inlet = start_inlet_via(
        &pki,
        "inlet-tcp",
        &[relay.addr],
        &[("echo", ServiceKind::Tcp)],
        tcp_only(),
    )
    .await;
    let took = t0.elapsed();
    let (sent, got) = echo_round(inlet.addr("echo"), 64 * 1024).await;
    assert_eq!(sent, got);
    println!(
        "two nodes on TLS/TCP in {took:?} while {} junk connections were held",
        trickle.held() + idle.held()
    );
    assert!(
        took < Duration::from_secs(5),
        "nodes on TLS/TCP got in within {took:?}"
    );

    // The unauthenticated TLS link is closed at the pre-authentication deadline; the nodes'
    // links, authenticated, stay.
    let mut tls_junk = tls_junk;
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(
        postern_relay::forward::tcp::PREAUTH_TIMEOUT + Duration::from_secs(5),
        async {
            loop {
                match tls_junk.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        },
    )
    .await;
    assert!(closed.is_ok(), "an unauthenticated link is closed");
    assert!(
        tls_junk_since.elapsed()
            >= postern_relay::forward::tcp::PREAUTH_TIMEOUT - Duration::from_secs(1),
        "closed at the pre-authentication deadline, not before ({:?})",
        tls_junk_since.elapsed()
    );
    assert!(stats.preauth_timeout.load(Relaxed) >= 1);
    let (sent, got) = echo_round(inlet.addr("echo"), 64 * 1024).await;
    assert_eq!(sent, got, "the nodes' links outlived the deadline");
    trickle.stop().await;
    idle.stop().await;
}
