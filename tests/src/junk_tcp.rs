//! Hostile TCP clients for tests and the bench: connections held open from many loopback source
//! addresses, either idle or trickling a TLS ClientHello one byte at a time, reopened as soon
//! as the server closes them (what a slot-exhaustion attacker does); and a real HTTPS request,
//! the legit client they compete with.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The TLS client [`https_get`] uses.
pub use tokio_rustls::TlsConnector as HttpsConnector;

/// What the junk connections do once connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Junk {
    /// Send nothing.
    Idle,
    /// Send one byte of a real ClientHello every interval.
    Trickle(Duration),
}

/// Counters of a [`JunkHold`].
#[derive(Debug, Default)]
pub struct JunkStats {
    /// Connections opened.
    pub opened: AtomicU64,
    /// Connections open now.
    pub held: AtomicU64,
    /// Connections the server closed (or reset).
    pub closed: AtomicU64,
    /// Connects that failed.
    pub failed: AtomicU64,
    /// Bytes trickled.
    pub bytes: AtomicU64,
}

/// Junk connections held open until dropped (or [`stop`](Self::stop)ped).
pub struct JunkHold {
    pub stats: Arc<JunkStats>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// `127.0.<x>.<y>` loopback addresses from `first` on: `n` distinct source addresses.
pub fn loopback_sources(first: u32, n: usize) -> Vec<IpAddr> {
    let base = u32::from(std::net::Ipv4Addr::new(127, 0, 0, 0)) + first;
    (0..n as u32)
        .map(|i| IpAddr::V4(std::net::Ipv4Addr::from(base + i)))
        .collect()
}

/// A ClientHello as a TLS client would send it for `server_name` (the bytes to trickle).
pub fn client_hello(server_name: &str) -> Vec<u8> {
    let cfg = rustls::ClientConfig::builder_with_provider(postern_proto::tls::provider())
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        });
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned());
    let mut out = Vec::new();
    if let (Ok(cfg), Ok(name)) = (cfg, name) {
        if let Ok(mut conn) = rustls::ClientConnection::new(Arc::new(cfg), name) {
            let _ = conn.write_tls(&mut out);
        }
    }
    if out.is_empty() {
        // The start of a ClientHello record: enough to look like TLS.
        out = vec![
            0x16, 0x03, 0x01, 0x01, 0x00, 0x01, 0x00, 0x00, 0xfc, 0x03, 0x03,
        ];
        out.resize(260, 0x41);
    }
    out
}

impl JunkHold {
    /// Holds `per_source` connections to `to` from each of `sources`, doing `junk` (bytes of a
    /// ClientHello for `server_name` when trickling), reopening each `reopen` after it is
    /// closed.
    pub fn start(
        to: SocketAddr,
        sources: &[IpAddr],
        per_source: usize,
        junk: Junk,
        server_name: &str,
        reopen: Duration,
    ) -> Self {
        let stats = Arc::new(JunkStats::default());
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let hello = Arc::new(client_hello(server_name));
        for (i, src) in sources.iter().enumerate() {
            for j in 0..per_source {
                let (stats, stop, hello, src) = (stats.clone(), stop.clone(), hello.clone(), *src);
                // Spread the trickles so the server sees a steady rate, not bursts.
                let phase = Duration::from_millis(((i * per_source + j) % 1000) as u64);
                tasks.spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = hold_one(to, src, junk, &hello, phase, reopen, &stats) => {}
                    }
                });
            }
        }
        tasks.close();
        Self { stats, stop, tasks }
    }

    /// Connections open now.
    pub fn held(&self) -> u64 {
        self.stats.held.load(Relaxed)
    }

    /// Closes every junk connection and waits for the tasks to end.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }
}

impl Drop for JunkHold {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One junk connection, reopened whenever it is closed.
async fn hold_one(
    to: SocketAddr,
    src: IpAddr,
    junk: Junk,
    hello: &[u8],
    phase: Duration,
    reopen: Duration,
    stats: &JunkStats,
) {
    loop {
        let tcp = match connect_from(src, to).await {
            Ok(t) => t,
            Err(_) => {
                stats.failed.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        stats.opened.fetch_add(1, Relaxed);
        stats.held.fetch_add(1, Relaxed);
        hold_until_closed(tcp, junk, hello, phase, stats).await;
        stats.held.fetch_sub(1, Relaxed);
        stats.closed.fetch_add(1, Relaxed);
        tokio::time::sleep(reopen).await;
    }
}

async fn hold_until_closed(
    mut tcp: TcpStream,
    junk: Junk,
    hello: &[u8],
    phase: Duration,
    stats: &JunkStats,
) {
    let (mut rd, mut wr) = tcp.split();
    let mut buf = [0u8; 512];
    let closed = async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let trickle = async {
        let Junk::Trickle(every) = junk else {
            return std::future::pending::<()>().await;
        };
        tokio::time::sleep(phase.min(every)).await;
        for b in hello.iter().cycle() {
            if wr.write_all(&[*b]).await.is_err() {
                break;
            }
            stats.bytes.fetch_add(1, Relaxed);
            tokio::time::sleep(every).await;
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = closed => {}
        _ = trickle => {}
    }
}

/// A TCP connection to `to` from the address `src` (port chosen by the kernel).
pub async fn connect_from(src: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = if src.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.bind(SocketAddr::new(src, 0))?;
    sock.connect(to).await
}

/// A TLS client for `https://` requests that trusts only `roots`.
pub fn https_connector(roots: Arc<rustls::RootCertStore>) -> Result<HttpsConnector, rustls::Error> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(postern_proto::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots.as_ref().clone())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(HttpsConnector::from(Arc::new(cfg)))
}

/// `GET https://<host><path>` through `addr` (e.g. a relay's public port) with extra header
/// lines; returns the whole response and how long it took, from connect to the last byte.
pub async fn https_get(
    connector: &HttpsConnector,
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &str,
    timeout: Duration,
) -> std::io::Result<(String, Duration)> {
    let t = Instant::now();
    let work = async {
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut tls = connector.connect(name, tcp).await?;
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{headers}\r\n");
        tls.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        if let Err(e) = tls.read_to_end(&mut out).await {
            // A server that closes without close_notify still answered.
            if out.is_empty() || e.kind() != std::io::ErrorKind::UnexpectedEof {
                return Err(e);
            }
        }
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).into_owned())
    };
    let body = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out"))??;
    Ok((body, t.elapsed()))
}

/// An HTTP/1.1 server on 127.0.0.1 answering every request with 200 and `body`: the target of
/// a public service.
pub async fn http_server(body: &'static str) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}
