//! The relay's public hostname ingress: `https://<service>.<domain>` is routed by the TLS server
//! name alone to the outlet offering that service publicly, which terminates TLS; the relay
//! forwards only ciphertext.

use postern_outlet::forward::Services;
use postern_outlet::public::{Public, PublicService};
use postern_outlet::target::Target;
use postern_tests::harness::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DOMAIN: &str = "relay.test";

/// An HTTP server that answers every request with `tag` and counts the connections it got.
async fn tagged_server(tag: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!("served by {tag}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, count)
}

/// A TLS client trusting only the project CA.
fn connector(pki: &Pki) -> tokio_rustls::TlsConnector {
    let mut cfg = rustls::ClientConfig::builder_with_provider(postern_proto::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(pki.roots().as_ref().clone())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// Opens `https://<name>/<path>` through the ingress at `addr` (`name` an IP address: no SNI)
/// and returns the whole response.
async fn get(pki: &Pki, addr: SocketAddr, name: &str, path: &str) -> std::io::Result<String> {
    let tcp = TcpStream::connect(addr).await?;
    let server = rustls::pki_types::ServerName::try_from(name.to_owned())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut tls =
        tokio::time::timeout(Duration::from_secs(10), connector(pki).connect(server, tcp))
            .await
            .map_err(|_| std::io::Error::other("handshake timed out"))??;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::other("response timed out"))??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Whether `e` is the TLS alert `unrecognized_name` from the peer.
fn is_unrecognized_name(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| {
            *r == rustls::Error::AlertReceived(rustls::AlertDescription::UnrecognisedName)
        })
}

fn public_of(pki: &Pki, service: &str) -> Public {
    let host = format!("{service}.{DOMAIN}");
    Public {
        services: HashMap::from([(
            svc(service),
            PublicService {
                acceptor: host_acceptor(pki, &host),
                host,
            },
        )]),
    }
}

fn services_of(service: &str, to: SocketAddr) -> Services {
    Services {
        targets: HashMap::from([(svc(service), Target::tcp(to.to_string()))]),
        leases: HashMap::new(),
        allow: HashMap::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_routes_each_name_to_its_outlet_and_the_relay_sees_only_ciphertext() {
    init_logging();
    let pki = Pki::new();
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [3; 32], None);
    let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
    let tap: postern_relay::public::PublicTap = {
        let seen = seen.clone();
        Arc::new(move |_dir, bytes: &[u8]| {
            seen.lock().expect("seen").extend_from_slice(bytes);
        })
    };
    let (ingress, _ingress) = start_public_ingress(&relay, DOMAIN, Some(tap)).await;
    let (alpha_addr, alpha_hits) = tagged_server("alpha-backend").await;
    let (beta_addr, beta_hits) = tagged_server("beta-backend").await;
    let _a = start_outlet_public(
        &pki,
        "outlet-a",
        relay.addr,
        services_of("alpha", alpha_addr),
        public_of(&pki, "alpha"),
    )
    .await;
    let _b = start_outlet_public(
        &pki,
        "outlet-b",
        relay.addr,
        services_of("beta", beta_addr),
        public_of(&pki, "beta"),
    )
    .await;

    let alpha = get(&pki, ingress, "alpha.relay.test", "/secret-path-alpha")
        .await
        .expect("alpha");
    assert!(alpha.contains("served by alpha-backend"), "{alpha}");
    let beta = get(&pki, ingress, "beta.relay.test", "/secret-path-beta")
        .await
        .expect("beta");
    assert!(beta.contains("served by beta-backend"), "{beta}");
    // Case and a trailing dot do not matter to DNS, nor to the ingress.
    let upper = get(&pki, ingress, "ALPHA.Relay.Test", "/x")
        .await
        .expect("upper");
    assert!(upper.contains("served by alpha-backend"), "{upper}");

    // Names that route nowhere get the `unrecognized_name` alert, never another service.
    for name in [
        "gamma.relay.test",
        "alpha.other.test",
        "x.alpha.relay.test",
        "relay.test",
    ] {
        let e = get(&pki, ingress, name, "/").await.expect_err(name);
        assert!(is_unrecognized_name(&e), "{name}: {e}");
    }
    // No SNI (an IP address as the name): refused too.
    let e = get(&pki, ingress, "127.0.0.1", "/")
        .await
        .expect_err("no sni");
    assert!(is_unrecognized_name(&e), "no SNI: {e}");
    // Not TLS at all: closed without an answer.
    let mut plain = TcpStream::connect(ingress).await.expect("connect");
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: alpha.relay.test\r\n\r\n")
        .await
        .expect("write");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    assert!(rest.is_empty(), "plain HTTP got an answer: {rest:?}");

    assert_eq!(
        alpha_hits.load(Ordering::SeqCst),
        2,
        "alpha backend connections"
    );
    assert_eq!(
        beta_hits.load(Ordering::SeqCst),
        1,
        "beta backend connections"
    );

    // The relay forwarded the traffic but saw none of it in the clear.
    let seen = seen.lock().expect("seen");
    assert!(
        seen.len() > 2000,
        "the tap saw the traffic ({} bytes)",
        seen.len()
    );
    for secret in [&b"secret-path"[..], b"served by", b"HTTP/1.1", b"backend"] {
        assert!(
            !seen.windows(secret.len()).any(|w| w == secret),
            "{:?} appeared in the relay's view",
            String::from_utf8_lossy(secret)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_or_oversize_client_hellos_are_cut_off() {
    init_logging();
    let pki = Pki::new();
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [4; 32], None);
    let mut opts =
        postern_relay::public::PublicOptions::new("127.0.0.1:0".parse().expect("addr"), DOMAIN);
    opts.peek_timeout = Duration::from_millis(300);
    let (ingress, _ingress) = start_public_ingress_with(&relay, opts).await;
    // Half a ClientHello, then nothing: closed once the peek times out.
    let hello = [22, 3, 1, 0, 200, 1, 0, 0, 196, 3, 3];
    let mut s = TcpStream::connect(ingress).await.expect("connect");
    s.write_all(&hello).await.expect("write");
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "stalled ClientHello not cut off");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed before the timeout"
    );
    assert!(rest.is_empty());
    // A handshake record announcing a ClientHello far over the cap: closed at once, without
    // waiting for the bytes.
    let mut s = TcpStream::connect(ingress).await.expect("connect");
    s.write_all(&[22, 3, 1, 0x40, 0x00, 1, 0x7f, 0xff, 0xff])
        .await
        .expect("write");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "oversize ClientHello not cut off");
    assert!(rest.is_empty());
}
