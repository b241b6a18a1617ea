//! `proxy-protocol = "v2"`: the outlet opens each target connection with a PROXY v2 header
//! naming the inlet's client, run with the real binaries. Against a real nginx (`listen ...
//! proxy_protocol`), whose access log must show the client's address and port as the inlet
//! saw them; and against a plain listener that reads the header with the small parser below,
//! for the identity TLVs (Debian's nginx 1.22 has no `$proxy_protocol_tlv_*` variables: they
//! came with 1.23.2).

use postern_tests::bin_net::{local_addr, BinNet};
use postern_tests::kit::init_logging;
use postern_tests::wait::eventually;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A PROXY v2 header as read by the target.
#[derive(Debug)]
struct Header {
    source: SocketAddr,
    destination: SocketAddr,
    tlvs: Vec<(u8, Vec<u8>)>,
}

/// Reads one PROXY v2 header (TCP over IPv4 only, which is what loopback gives) from `s`,
/// checking the fixed part against the specification.
async fn read_header(s: &mut TcpStream) -> std::io::Result<Header> {
    let mut fixed = [0u8; 16];
    s.read_exact(&mut fixed).await?;
    assert_eq!(&fixed[..12], b"\r\n\r\n\0\r\nQUIT\n", "the v2 signature");
    assert_eq!(fixed[12], 0x21, "version 2, command PROXY");
    assert_eq!(fixed[13], 0x11, "AF_INET, STREAM");
    let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
    let mut rest = vec![0u8; len];
    s.read_exact(&mut rest).await?;
    let ip = |b: &[u8]| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let source = SocketAddr::new(ip(&rest[0..4]), port(&rest[8..10]));
    let destination = SocketAddr::new(ip(&rest[4..8]), port(&rest[10..12]));
    let mut tlvs = Vec::new();
    let mut at = 12;
    while at < rest.len() {
        let kind = rest[at];
        let n = u16::from_be_bytes([rest[at + 1], rest[at + 2]]) as usize;
        tlvs.push((kind, rest[at + 3..at + 3 + n].to_vec()));
        at += 3 + n;
    }
    assert_eq!(at, rest.len(), "the TLVs fill the announced length exactly");
    Ok(Header {
        source,
        destination,
        tlvs,
    })
}

fn proxied(service: &str, to: SocketAddr) -> Vec<String> {
    // No health checks: their bare connections would reach the header reader too.
    vec![format!("{service}={to},proxy-protocol=v2,health-check=off")]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_gets_the_inlet_clients_address_and_identity() {
    init_logging();
    let Some(nginx_bin) = postern_tests::nginx::find() else {
        eprintln!(
            "SKIPPED: nginx is not installed (scripts/test.sh installs it; or `apt-get install \
             nginx`): the PROXY protocol test needs a real PROXY-aware server"
        );
        return;
    };
    let nginx = postern_tests::nginx::ProxyNginx::start(&nginx_bin).await;
    let raw = TcpListener::bind(local_addr()).await.expect("bind");
    let raw_addr = raw.local_addr().expect("addr");
    let net = BinNet::start(&["web", "raw"]).await;
    let mut services = proxied("web", nginx.addr);
    services.extend(proxied("raw", raw_addr));
    let (_outlet, _) = net.outlet("outlet-pp", &services).await;
    let (_iw, web) = net.inlet("inlet-web", "web").await;
    let (_ir, raw_in) = net.inlet("inlet-raw", "raw").await;

    // nginx: the log line has the client's address and port as the inlet saw them.
    let mut client = TcpStream::connect(web).await.expect("connect");
    let me = client.local_addr().expect("client addr");
    client
        .write_all(b"GET /who HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut answer))
        .await
        .expect("answer in time")
        .expect("read");
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("hello from nginx"),
        "{answer}\nnginx errors:\n{}",
        nginx.error_log()
    );
    let want = format!("pp={}:{} \"GET /who HTTP/1.1\" 200", me.ip(), me.port());
    eventually(
        Duration::from_secs(5),
        "nginx's access log line",
        || async { nginx.access_log().contains(&want) },
    )
    .await;

    // The TLVs: identity name and attributes, as the outlet knows them from the inlet's
    // certificate; the addresses as the inlet saw them.
    let target = tokio::spawn(async move {
        let (mut s, _) = raw.accept().await.expect("accept");
        let header = read_header(&mut s).await.expect("header");
        let mut first = [0u8; 5];
        s.read_exact(&mut first).await.expect("client bytes");
        s.write_all(b"ok").await.expect("answer");
        (header, first)
    });
    let mut client = TcpStream::connect(raw_in).await.expect("connect");
    let me = client.local_addr().expect("client addr");
    client.write_all(b"hello").await.expect("write");
    let mut ok = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut ok))
        .await
        .expect("answer in time")
        .expect("read");
    assert_eq!(ok, b"ok");
    let (header, first) = target.await.expect("target");
    assert_eq!(&first, b"hello", "the client's bytes follow the header");
    assert_eq!(header.source, me, "source: the client as the inlet saw it");
    assert_eq!(
        header.destination, raw_in,
        "destination: the inlet's listener"
    );
    let tlv = |k: u8| {
        header
            .tlvs
            .iter()
            .find(|(t, _)| *t == k)
            .map(|(_, v)| String::from_utf8(v.clone()).expect("utf-8"))
            .unwrap_or_else(|| panic!("TLV 0x{k:02X} missing: {header:?}"))
    };
    assert_eq!(tlv(0xE0), "inlet-raw", "identity name");
    let attrs: serde_json::Value = serde_json::from_str(&tlv(0xE1)).expect("attributes JSON");
    assert_eq!(attrs["role"], "client", "attributes: {attrs}");
}
