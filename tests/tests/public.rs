//! The relay's public hostname ingress: `https://<service>.<domain>` is routed by the TLS server
//! name alone to the outlet offering that service publicly, which terminates TLS; the relay
//! forwards only ciphertext.

use postern_outlet::public::access::AccessStore;
use postern_outlet::public::{Public, PublicService};
use postern_outlet::serve::Services;
use postern_outlet::target::Target;
use postern_tests::kit::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DOMAIN: &str = "relay.test";

type Heads = Arc<Mutex<Vec<String>>>;

/// An HTTP server that answers every request with `tag` and counts the connections it got.
async fn tagged_server(tag: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let (addr, count, _) = recording_server(tag).await;
    (addr, count)
}

/// [`tagged_server`] that also keeps the request heads it received.
async fn recording_server(tag: &'static str) -> (SocketAddr, Arc<AtomicUsize>, Heads) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let count = Arc::new(AtomicUsize::new(0));
    let heads = Heads::default();
    let (c, h) = (count.clone(), heads.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let h = h.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                h.lock()
                    .expect("heads")
                    .push(String::from_utf8_lossy(&head).into_owned());
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
    (addr, count, heads)
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
    get_with(pki, addr, name, path, "").await
}

/// [`get`] with extra header lines (each ending in CRLF).
async fn get_with(
    pki: &Pki,
    addr: SocketAddr,
    name: &str,
    path: &str,
    headers: &str,
) -> std::io::Result<String> {
    let tcp = TcpStream::connect(addr).await?;
    let server = rustls::pki_types::ServerName::try_from(name.to_owned())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut tls =
        tokio::time::timeout(Duration::from_secs(10), connector(pki).connect(server, tcp))
            .await
            .map_err(|_| std::io::Error::other("handshake timed out"))??;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n{headers}\r\n");
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

fn public_of(pki: &Pki, service: &str, state: &std::path::Path) -> Arc<Public> {
    let host = format!("{service}.{DOMAIN}");
    Arc::new(Public {
        services: HashMap::from([(
            svc(service),
            PublicService {
                acceptor: host_acceptor(pki, &host),
                host,
            },
        )]),
        access: Arc::new(AccessStore::open(state).expect("access store")),
        link_port: 443,
    })
}

/// A cookie header line for a new grant of `service` valid for `ttl`.
fn grant_cookie(public: &Public, service: &str, ttl: Duration) -> (String, String) {
    let g = public
        .access
        .create(&svc(service), ttl, Default::default())
        .expect("grant");
    (
        format!("Cookie: postern_access={}\r\n", g.secret.expose()),
        g.info.id,
    )
}

fn services_of(service: &str, to: SocketAddr) -> Services {
    Services {
        targets: HashMap::from([(svc(service), Target::tcp(to.to_string()))]),
        leases: HashMap::new(),
        allow: HashMap::new(),
        inject_at: HashMap::new(),
        udp: HashMap::new(),
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
    let (state_a, state_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let public_a = public_of(&pki, "alpha", state_a.path());
    let public_b = public_of(&pki, "beta", state_b.path());
    let _a = start_outlet_public(
        &pki,
        "outlet-a",
        relay.addr,
        services_of("alpha", alpha_addr),
        public_a.clone(),
    )
    .await;
    let _b = start_outlet_public(
        &pki,
        "outlet-b",
        relay.addr,
        services_of("beta", beta_addr),
        public_b.clone(),
    )
    .await;
    let (cookie_a, _) = grant_cookie(&public_a, "alpha", Duration::from_secs(600));
    let (cookie_b, _) = grant_cookie(&public_b, "beta", Duration::from_secs(600));

    let alpha = get_with(
        &pki,
        ingress,
        "alpha.relay.test",
        "/secret-path-alpha",
        &cookie_a,
    )
    .await
    .expect("alpha");
    assert!(alpha.contains("served by alpha-backend"), "{alpha}");
    let beta = get_with(
        &pki,
        ingress,
        "beta.relay.test",
        "/secret-path-beta",
        &cookie_b,
    )
    .await
    .expect("beta");
    assert!(beta.contains("served by beta-backend"), "{beta}");
    // A grant of one service does not open another.
    let cross = get_with(&pki, ingress, "beta.relay.test", "/", &cookie_a)
        .await
        .expect("cross");
    assert!(cross.starts_with("HTTP/1.1 403"), "{cross}");
    // Case does not matter to DNS, nor to the ingress.
    let upper = get_with(&pki, ingress, "ALPHA.Relay.Test", "/x", &cookie_a)
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

    // The relay counts what it did (connections end on their own tasks: wait for the counts).
    let stats = relay.handle.public_stats();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (fwd, refused, unknown) = (
            stats.forwarded.load(Ordering::SeqCst),
            stats.refused.load(Ordering::SeqCst),
            stats.refused_unknown_name.load(Ordering::SeqCst),
        );
        if (fwd, refused, unknown) == (4, 6, 5) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "forwarded {fwd}, refused {refused}, unknown names {unknown}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_links_open_the_door_and_revocation_or_expiry_closes_it() {
    init_logging();
    let pki = Pki::new();
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [5; 32], None);
    let (ingress, _ingress) = start_public_ingress(&relay, DOMAIN, None).await;
    let (backend, hits, heads) = recording_server("alpha-backend").await;
    let state = tempfile::tempdir().expect("dir");
    let public = public_of(&pki, "alpha", state.path());
    let _o = start_outlet_public(
        &pki,
        "outlet-a",
        relay.addr,
        services_of("alpha", backend),
        public.clone(),
    )
    .await;
    let host = "alpha.relay.test";

    // No grant: a 403 page saying how to get one; the backend is never reached.
    let page = get(&pki, ingress, host, "/").await.expect("403");
    assert!(page.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{page}");
    assert!(
        page.contains("text/html") && page.contains("postern-outlet access create --service alpha"),
        "{page}"
    );
    let bogus = get_with(
        &pki,
        ingress,
        host,
        "/",
        "Cookie: postern_access=made-up\r\n",
    )
    .await
    .expect("403");
    assert!(bogus.starts_with("HTTP/1.1 403"), "{bogus}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);

    // The access link sets a locked-down cookie holding the grant and redirects to `/`.
    let g = public
        .access
        .create(&svc("alpha"), Duration::from_secs(600), Default::default())
        .expect("grant");
    let link = public.link(&svc("alpha"), g.secret.expose()).expect("link");
    assert_eq!(
        link,
        format!("https://{host}/_postern/access?grant={}", g.secret.expose())
    );
    let path = link
        .trim_start_matches(&format!("https://{host}"))
        .to_owned();
    let redirect = get(&pki, ingress, host, &path).await.expect("link");
    assert!(redirect.starts_with("HTTP/1.1 302 Found\r\n"), "{redirect}");
    let set_cookie = redirect
        .lines()
        .find(|l| l.starts_with("Set-Cookie: "))
        .expect("Set-Cookie");
    for attr in ["Secure", "HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(set_cookie.contains(attr), "{set_cookie}");
    }
    let cookie = set_cookie
        .trim_start_matches("Set-Cookie: ")
        .split(';')
        .next()
        .expect("cookie");
    assert_eq!(cookie, format!("postern_access={}", g.secret.expose()));
    let with_cookie = format!("Cookie: theme=dark; {cookie}\r\n");
    let ok = get_with(&pki, ingress, host, "/", &with_cookie)
        .await
        .expect("ok");
    assert!(ok.contains("served by alpha-backend"), "{ok}");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // The grant's secret stays with the gate; the service's own cookies pass.
    let seen = heads.lock().expect("heads").join("");
    assert!(seen.contains("Cookie: theme=dark\r\n"), "{seen}");
    assert!(
        !seen.contains(g.secret.expose()) && !seen.contains("postern_access"),
        "{seen}"
    );

    // Revoked: refused at once, and the link no longer opens.
    public.access.revoke(&g.info.id).expect("revoke");
    let after = get_with(&pki, ingress, host, "/", &with_cookie)
        .await
        .expect("403");
    assert!(after.starts_with("HTTP/1.1 403"), "{after}");
    let relink = get(&pki, ingress, host, &path).await.expect("403");
    assert!(relink.starts_with("HTTP/1.1 403"), "{relink}");
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // A short grant works, then stops working once it expires.
    let (short, _) = grant_cookie(&public, "alpha", Duration::from_secs(2));
    let ok = get_with(&pki, ingress, host, "/", &short)
        .await
        .expect("ok");
    assert!(ok.contains("served by alpha-backend"), "{ok}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = get_with(&pki, ingress, host, "/", &short)
            .await
            .expect("answer");
        if r.starts_with("HTTP/1.1 403") {
            assert!(r.contains("expired"), "{r}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the grant never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
