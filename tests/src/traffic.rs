//! The services tests tunnel to and the client exchanges that check them: an echo server, a
//! request/response server, one echo exchange, a large hashed echo round.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A TCP echo server: echoes everything, then half-closes when the client does.
pub async fn echo_server() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// A server that reads a whole request until EOF, then answers `reply(request)` and closes.
pub async fn request_response_server(reply: fn(&[u8]) -> Vec<u8>) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                if s.read_to_end(&mut req).await.is_ok() {
                    let _ = s.write_all(&reply(&req)).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    (addr, task)
}

/// One echo exchange; None if the connection was refused or closed without the echo.
pub async fn echo_once(addr: SocketAddr, msg: &[u8]) -> Option<Vec<u8>> {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(msg).await.ok()?;
        s.shutdown().await.ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        Some(out)
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
}

/// Writes `total` random bytes to `addr` (an echo service) while reading the echo; returns
/// (SHA-256 of what was sent, SHA-256 of what came back).
pub async fn echo_round(addr: SocketAddr, total: usize) -> (Vec<u8>, Vec<u8>) {
    use rand::RngCore;
    use sha2::{Digest, Sha256};
    let stream = TcpStream::connect(addr).await.expect("connect inlet");
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = total;
        while left > 0 {
            let n = left.min(buf.len());
            rand::rng().fill_bytes(&mut buf[..n]);
            h.update(&buf[..n]);
            w.write_all(&buf[..n]).await.expect("write");
            left -= n;
        }
        w.shutdown().await.expect("shutdown");
        h.finalize().to_vec()
    });
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    loop {
        let n = r.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        got += n;
    }
    assert_eq!(got, total, "echoed byte count");
    (writer.await.expect("writer"), h.finalize().to_vec())
}
