//! WebSocket (HTTP `Upgrade`) and streamed responses through both HTTP paths: the inlet's
//! listeners (plain TCP and TLS) and the relay's public hostname (the outlet's access gate).
//!
//! The target is a small real WebSocket server written here (RFC 6455 handshake with
//! `Sec-WebSocket-Accept`, masked client frames, 16- and 64-bit lengths, close) that also serves
//! a chunked response in two pieces, the second only once the test has received the first: a
//! proxy that held responses back until they end would deadlock that exchange.
//!
//! The HTTP filter still puts the leased credential into the upgrade request (the server tells
//! the client which `Authorization` it saw), then switches the stream to raw bytes both ways.
//! Leases come from a lease manager against the in-test InfluxDB 2 contract server.

use base64::Engine;
use postern_inlet::{Inlet, InletOptions, InletService, ServiceKind};
use postern_outlet::lease::{Api, InfluxdbOutletConfig, LeaseManager, SecretRef};
use postern_outlet::public::access::AccessStore;
use postern_outlet::public::{Public, PublicService};
use postern_outlet::serve::Services;
use postern_outlet::target::Target;
use postern_tests::influx2::{Influx2, Influx2Options};
use postern_tests::kit::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const TIMEOUT: Duration = Duration::from_secs(15);
const OP_TEXT: u8 = 1;
const OP_BINARY: u8 = 2;
const OP_CLOSE: u8 = 8;

fn accept_key(key: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{WS_GUID}").as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// Reads a head up to and including the blank line, byte by byte (what follows belongs to the
/// next protocol).
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = s.read_u8().await?;
        head.push(b);
        if head.len() > 64 * 1024 {
            return Err(std::io::Error::other("head too long"));
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Writes one frame (FIN set), masked when `mask` (clients must mask, servers must not).
async fn write_frame<S: AsyncWrite + Unpin>(
    s: &mut S,
    opcode: u8,
    payload: &[u8],
    mask: bool,
) -> std::io::Result<()> {
    let mut out = vec![0x80 | opcode];
    let m = if mask { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n <= 0xffff => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if mask {
        let key: [u8; 4] = rand::random();
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    s.write_all(&out).await?;
    s.flush().await
}

/// Reads one frame; returns its opcode and unmasked payload.
async fn read_frame<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(u8, Vec<u8>)> {
    let b0 = s.read_u8().await?;
    let b1 = s.read_u8().await?;
    let len = match b1 & 0x7f {
        126 => u64::from(s.read_u16().await?),
        127 => s.read_u64().await?,
        n => u64::from(n),
    };
    if len > 16 << 20 {
        return Err(std::io::Error::other("frame too large"));
    }
    let key = if b1 & 0x80 != 0 {
        let mut k = [0u8; 4];
        s.read_exact(&mut k).await?;
        Some(k)
    } else {
        None
    };
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).await?;
    if let Some(k) = key {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= k[i % 4];
        }
    }
    Ok((b0 & 0x0f, payload))
}

/// The target: `/echo` is a WebSocket echo server that first says which `Authorization` it got;
/// `/stream` answers a chunked body in two pieces, the second after `release` is notified.
async fn target_server(release: Arc<Notify>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let release = release.clone();
            tokio::spawn(async move {
                let _ = serve_target(s, release).await;
            });
        }
    });
    addr
}

async fn serve_target(mut s: TcpStream, release: Arc<Notify>) -> std::io::Result<()> {
    loop {
        let head = read_head(&mut s).await?;
        let path = head.split(' ').nth(1).unwrap_or_default().to_owned();
        let auth = header(&head, "authorization").unwrap_or("none").to_owned();
        if path == "/echo" {
            let key = header(&head, "sec-websocket-key").unwrap_or_default();
            let upgrade = header(&head, "upgrade").unwrap_or_default();
            if !upgrade.eq_ignore_ascii_case("websocket") {
                s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    .await?;
                continue;
            }
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\n\r\n",
                accept_key(key)
            );
            s.write_all(resp.as_bytes()).await?;
            write_frame(&mut s, OP_TEXT, format!("auth:{auth}").as_bytes(), false).await?;
            loop {
                let (op, payload) = read_frame(&mut s).await?;
                write_frame(&mut s, op, &payload, false).await?;
                if op == OP_CLOSE {
                    return s.shutdown().await;
                }
            }
        }
        if path == "/stream" {
            s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n\
                  6\r\nfirst\n\r\n",
            )
            .await?;
            s.flush().await?;
            release.notified().await;
            s.write_all(b"7\r\nsecond\n\r\n0\r\n\r\n").await?;
            s.flush().await?;
            continue;
        }
        let body = format!("auth:{auth}");
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes()).await?;
        if header(&head, "connection").is_some_and(|c| c.eq_ignore_ascii_case("close")) {
            return s.shutdown().await;
        }
    }
}

/// Upgrades `s` to a WebSocket at `/echo`, checks the handshake and the echo of text, a 70 KB
/// binary frame (64-bit length) and close. Returns the `Authorization` the server saw.
async fn websocket_round_trip<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    host: &str,
    extra: &str,
) -> String {
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
    let req = format!(
        "GET /echo HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Basic Y2xpZW50OnNlY3JldA==\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("send upgrade");
    let head = tokio::time::timeout(TIMEOUT, read_head(s))
        .await
        .expect("101 in time")
        .expect("read 101");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert_eq!(
        header(&head, "sec-websocket-accept"),
        Some(accept_key(&key).as_str())
    );
    let (op, hello) = read_frame(s).await.expect("hello frame");
    assert_eq!(op, OP_TEXT);
    let auth = String::from_utf8(hello).expect("utf8");
    for i in 0..3 {
        let msg = format!("message {i}");
        write_frame(s, OP_TEXT, msg.as_bytes(), true)
            .await
            .expect("send");
        let (op, back) = tokio::time::timeout(TIMEOUT, read_frame(s))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!((op, back), (OP_TEXT, msg.into_bytes()));
    }
    let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    write_frame(s, OP_BINARY, &big, true)
        .await
        .expect("send big");
    let (op, back) = read_frame(s).await.expect("big echo");
    assert_eq!(op, OP_BINARY);
    assert!(back == big, "binary frame came back altered");
    write_frame(s, OP_CLOSE, &1000u16.to_be_bytes(), true)
        .await
        .expect("close");
    let (op, _) = read_frame(s).await.expect("close echo");
    assert_eq!(op, OP_CLOSE);
    auth.trim_start_matches("auth:").to_owned()
}

/// Asks for `/stream` and checks the first chunk arrives while the response is still open;
/// only then lets the server finish it.
async fn streamed_response<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    host: &str,
    extra: &str,
    release: &Notify,
) {
    let req = format!("GET /stream HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let head = tokio::time::timeout(TIMEOUT, read_head(s))
        .await
        .expect("head in time")
        .expect("head");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let mut got = Vec::new();
    let first = b"6\r\nfirst\n\r\n";
    let wait_first = async {
        while !got.ends_with(first) {
            got.push(s.read_u8().await.expect("chunk byte"));
        }
    };
    tokio::time::timeout(TIMEOUT, wait_first)
        .await
        .expect("the first chunk did not arrive before the response ended: it was held back");
    release.notify_one();
    let rest = b"7\r\nsecond\n\r\n0\r\n\r\n";
    let mut tail = vec![0u8; rest.len()];
    tokio::time::timeout(TIMEOUT, s.read_exact(&mut tail))
        .await
        .expect("rest in time")
        .expect("rest");
    assert_eq!(&tail[..], &rest[..]);
}

/// A lease manager issuing InfluxDB 2 tokens from the contract server.
async fn lease_manager(server: &Influx2, dir: &std::path::Path) -> Arc<LeaseManager> {
    let admin = dir.join("admin-token");
    std::fs::write(&admin, server.admin_token()).expect("write admin token");
    let cfg = InfluxdbOutletConfig {
        to: server.url(),
        tls: false,
        tls_ca: None,
        allow: None,
        org_id: Some(server.org_id()),
        all_access_token: SecretRef::new(format!("file:{}", admin.display())),
        leased_token_expires_in: 3600,
        leased_token_permissions: r#"[{"action":"read","resource":{"type":"buckets","name":"telegraf","orgID":"INFLUX_ORG_ID"}}]"#.into(),
        api: Api::V2,
        inject_at: Default::default(),
        hand_out: false,
        profile: Vec::new(),
    }
    .validate()
    .expect("lease config");
    LeaseManager::start(cfg, &dir.join("state"), CancellationToken::new())
        .await
        .expect("lease manager")
}

/// Waits until a plain request through `connect()` carries a leased token; returns it.
async fn leased_token<S, F, Fut>(connect: F, host: &str, extra: &str) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut s = connect().await;
        let req =
            format!("GET /whoami HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n");
        s.write_all(req.as_bytes()).await.expect("send");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(TIMEOUT, s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some(auth) = text.split("auth:").nth(1) {
            if auth.starts_with("Token ") {
                return auth.trim().to_owned();
            }
        }
        assert!(std::time::Instant::now() < deadline, "no lease: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tls_connector(pki: &Pki) -> tokio_rustls::TlsConnector {
    let cfg = rustls::ClientConfig::builder_with_provider(postern_proto::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(pki.roots().as_ref().clone())
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

async fn tls_connect(
    pki: &Pki,
    addr: SocketAddr,
    host: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).expect("name");
    tls_connector(pki)
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_streaming_through_the_inlet_plain_and_tls() {
    init_logging();
    let pki = Pki::new();
    let influx2 = Influx2::start(Influx2Options::default())
        .await
        .expect("contract server");
    let dir = tempfile::tempdir().expect("tempdir");
    let manager = lease_manager(&influx2, dir.path()).await;
    let release = Arc::new(Notify::new());
    let target = target_server(release.clone()).await;
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [21; 32], None);
    let mut services = Services::default();
    for name in ["ws", "wss"] {
        services
            .targets
            .insert(svc(name), Target::tcp(target.to_string()));
        services.leases.insert(svc(name), manager.clone());
    }
    let _outlet = start_outlet_with(&pki, "outlet-1", relay.addr, services).await;

    let host = "wss.test.localhost";
    let mut inlet = Inlet::bind(InletOptions {
        relay: relay_target(relay.addr),
        identity: pki.identity("inlet-1"),
        roots: pki.roots(),
        services: ["ws", "wss"]
            .iter()
            .map(|n| InletService {
                name: svc(n),
                listen: "127.0.0.1:0".parse().expect("addr"),
                kind: ServiceKind::Influxdb,
            })
            .collect(),
    })
    .await
    .expect("bind inlet");
    assert!(inlet.set_tls(&svc("wss"), host_acceptor(&pki, host)));
    let plain = inlet.listen_addr(&svc("ws")).expect("ws listener");
    let tls = inlet.listen_addr(&svc("wss")).expect("wss listener");
    let mut handle = inlet.handle();
    let _inlet = Running::spawn(|s| inlet.run(s));
    assert!(handle.wait_connected(Duration::from_secs(10)).await);

    // Plain TCP listener.
    let token = leased_token(
        || async { TcpStream::connect(plain).await.expect("connect") },
        "localhost",
        "",
    )
    .await;
    let mut s = TcpStream::connect(plain).await.expect("connect");
    let seen = websocket_round_trip(&mut s, "localhost", "").await;
    assert_eq!(
        seen, token,
        "the upgrade request carried the leased token, not the client's"
    );
    let mut s = TcpStream::connect(plain).await.expect("connect");
    streamed_response(&mut s, "localhost", "", &release).await;

    // TLS listener.
    let token = leased_token(|| tls_connect(&pki, tls, host), host, "").await;
    let mut s = tls_connect(&pki, tls, host).await;
    let seen = websocket_round_trip(&mut s, host, "").await;
    assert_eq!(seen, token);
    let mut s = tls_connect(&pki, tls, host).await;
    streamed_response(&mut s, host, "", &release).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_streaming_through_the_public_hostname() {
    init_logging();
    let pki = Pki::new();
    let influx2 = Influx2::start(Influx2Options::default())
        .await
        .expect("contract server");
    let dir = tempfile::tempdir().expect("tempdir");
    let manager = lease_manager(&influx2, dir.path()).await;
    let release = Arc::new(Notify::new());
    let target = target_server(release.clone()).await;
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [22; 32], None);
    let (ingress, _ingress) = start_public_ingress(&relay, "relay.test", None).await;
    let host = "ws.relay.test";
    let mut services = Services::default();
    services
        .targets
        .insert(svc("ws"), Target::tcp(target.to_string()));
    services.leases.insert(svc("ws"), manager.clone());
    let public = Arc::new(Public {
        services: HashMap::from([(
            svc("ws"),
            PublicService {
                acceptor: host_acceptor(&pki, host),
                host: host.to_owned(),
            },
        )]),
        access: Arc::new(AccessStore::open(&dir.path().join("access")).expect("access store")),
        link_port: ingress.port(),
    });
    let _outlet = start_outlet_public(&pki, "outlet-1", relay.addr, services, public.clone()).await;
    let grant = public
        .access
        .create(&svc("ws"), Duration::from_secs(600), Default::default())
        .expect("grant");
    let cookie = format!("Cookie: postern_access={}\r\n", grant.secret.expose());

    // Without the grant, the upgrade is refused like any request.
    let mut s = tls_connect(&pki, ingress, host).await;
    s.write_all(
        format!(
            "GET /echo HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("send");
    let head = read_head(&mut s).await.expect("answer");
    assert!(head.starts_with("HTTP/1.1 403 "), "{head}");

    let token = leased_token(|| tls_connect(&pki, ingress, host), host, &cookie).await;
    let mut s = tls_connect(&pki, ingress, host).await;
    let seen = websocket_round_trip(&mut s, host, &cookie).await;
    assert_eq!(
        seen, token,
        "the upgrade request carried the grant's leased token"
    );
    let mut s = tls_connect(&pki, ingress, host).await;
    streamed_response(&mut s, host, &cookie, &release).await;
}

/// With `inject-at = "outlet"` the inlet sends no credential, the outlet puts the lease into the
/// upgrade request, and the WebSocket works once the server answered `101`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_with_the_lease_injected_at_the_outlet() {
    init_logging();
    let pki = Pki::new();
    let influx2 = Influx2::start(Influx2Options::default())
        .await
        .expect("contract server");
    let dir = tempfile::tempdir().expect("tempdir");
    let manager = lease_manager(&influx2, dir.path()).await;
    let release = Arc::new(Notify::new());
    let target = target_server(release.clone()).await;
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [22; 32], None);
    let mut services = Services::default();
    services
        .targets
        .insert(svc("ws"), Target::tcp(target.to_string()));
    services.leases.insert(svc("ws"), manager.clone());
    services
        .inject_at
        .insert(svc("ws"), postern_outlet::lease::InjectAt::Outlet);
    let _outlet = start_outlet_with(&pki, "outlet-1", relay.addr, services).await;
    let inlet = start_inlet_kinds(
        &pki,
        "inlet-1",
        relay.addr,
        &[("ws", ServiceKind::Influxdb)],
    )
    .await;
    let plain = inlet.addr("ws");
    // The client's own token is removed at the inlet and replaced at the outlet.
    let token = leased_token(
        || async { TcpStream::connect(plain).await.expect("connect") },
        "localhost",
        "Authorization: Token the-clients-own\r\n",
    )
    .await;
    let mut rx = manager.subscribe(&node("inlet-1")).expect("subscribe");
    let grant = rx
        .borrow_and_update()
        .clone()
        .expect("a lease while the inlet is connected");
    assert_eq!(token, grant.credential.authorization());
    let mut s = TcpStream::connect(plain).await.expect("connect");
    let seen = websocket_round_trip(
        &mut s,
        "localhost",
        "Authorization: Token the-clients-own\r\n",
    )
    .await;
    assert_eq!(seen, token);
    let mut s = TcpStream::connect(plain).await.expect("connect");
    streamed_response(&mut s, "localhost", "", &release).await;
    inlet.running.stop().await;
}
