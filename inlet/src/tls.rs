//! TLS on a local listener, so a browser can open a service at an `https://` hostname such as
//! `https://influxdb.myproject.localhost:8086/`.
//!
//! The certificate is the user's (PEM chain + key files): issued for the hostname by the project
//! CA (`postern-relay ca issue influxdb.myproject.localhost`), trusted once by the browser
//! through `postern-inlet ca export`, or any other certificate the user has. TLS 1.2 and 1.3,
//! no client certificate, ALPN `http/1.1` so the HTTP filter sees plain HTTP/1.1 requests once
//! the handshake is done.

use postern_net::stream::splice;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

pub use postern_net::stream::tls_server::{
    acceptor, server_config, TlsAcceptor, TlsSetupError, ALPN_HTTP11, HANDSHAKE_TIMEOUT,
};

/// Runs the server side of the handshake on an accepted connection, within
/// [`HANDSHAKE_TIMEOUT`].
pub async fn accept(acceptor: &TlsAcceptor, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
    accept_within(acceptor, tcp, HANDSHAKE_TIMEOUT).await
}

/// [`accept`] with another time limit.
pub async fn accept_within(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    limit: Duration,
) -> io::Result<TlsStream<TcpStream>> {
    match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "TLS handshake timed out",
        )),
    }
}

/// The project CA certificate (PEM) from an enrolled inlet's state directory, checked to hold
/// at least one certificate (`postern-inlet ca export`).
pub fn export_ca(state_dir: &Path) -> anyhow::Result<String> {
    let path = postern_net::control::enroll::NodeState::new(state_dir).ca();
    let pem = std::fs::read_to_string(&path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the project CA {}: {e} (enroll first: postern-inlet enroll TICKET \
             --state-dir {})",
            path.display(),
            state_dir.display()
        )
    })?;
    let certs = postern_proto::pki::certs_from_pem(&pem)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no certificate", path.display());
    }
    Ok(pem)
}

/// A client connection to a local listener: plain TCP or TLS over it.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl ClientStream {
    /// Accepts `tcp` as is, or after a TLS handshake when the listener has an acceptor.
    pub async fn accept(tcp: TcpStream, tls: Option<&TlsAcceptor>) -> io::Result<Self> {
        match tls {
            None => Ok(Self::Plain(tcp)),
            Some(a) => Ok(Self::Tls(Box::new(accept(a, tcp).await?))),
        }
    }

    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(t) => t,
            Self::Tls(s) => s.get_ref().0,
        }
    }

    /// Splices the connection with a QUIC stream ([`splice::splice_counted`] for plain TCP);
    /// when the stream is reset, the client's TCP connection is reset too.
    pub async fn splice(
        self,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        counters: &splice::ByteCounters,
    ) -> splice::SpliceOutcome {
        match self {
            Self::Plain(tcp) => splice::splice_counted(tcp, send, recv, counters).await,
            Self::Tls(mut tls) => {
                let _ = tls.get_ref().0.set_nodelay(true);
                let out = splice::splice_io_counted(&mut *tls, send, recv, counters).await;
                if out.peer_reset.is_some() {
                    splice::set_reset_on_close(tls.get_ref().0);
                }
                out
            }
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(t) => Pin::new(t).poll_read(cx, buf),
            // Browsers often close without a close_notify alert: take that as the end of input
            // (HTTP's own framing shows a truncated request) rather than as an error.
            Self::Tls(s) => match Pin::new(s.as_mut()).poll_read(cx, buf) {
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    Poll::Ready(Ok(()))
                }
                other => other,
            },
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(t) => Pin::new(t).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(t) => Pin::new(t).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(t) => Pin::new(t).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(t) => Pin::new(t).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(t) => t.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_proto::name::NodeName;
    use postern_proto::pki::Ca;
    use postern_proto::tls::provider;
    use std::path::PathBuf;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsConnector;

    const HOST: &str = "influxdb.test.localhost";

    fn files(dir: &Path, ca: &Ca) -> (PathBuf, PathBuf) {
        let issued = ca
            .issue(
                &NodeName::new(HOST).expect("name"),
                Duration::from_secs(3600),
            )
            .expect("issue");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, &issued.cert_pem).expect("write cert");
        std::fs::write(&key, &issued.key_pem).expect("write key");
        (cert, key)
    }

    fn client(ca: &Ca, version: &'static rustls::SupportedProtocolVersion) -> TlsConnector {
        let roots = postern_proto::tls::roots_from_pem(ca.cert_pem()).expect("roots");
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[version])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        TlsConnector::from(Arc::new(cfg))
    }

    async fn echo_once(
        acceptor: TlsAcceptor,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.expect("accept");
            let mut s = ClientStream::accept(tcp, Some(&acceptor))
                .await
                .expect("handshake");
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.expect("read");
            s.write_all(&buf).await.expect("write");
            s.shutdown().await.expect("shutdown");
        });
        (addr, task)
    }

    #[tokio::test]
    async fn serves_tls12_and_tls13_with_http11_alpn() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::generate("test").expect("ca");
        let (cert, key) = files(dir.path(), &ca);
        let acceptor = acceptor(&cert, &key).expect("acceptor");
        for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
            let (addr, task) = echo_once(acceptor.clone()).await;
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let mut s = client(&ca, version)
                .connect(HOST.try_into().expect("server name"), tcp)
                .await
                .expect("client handshake");
            let (_, conn) = s.get_ref();
            assert_eq!(conn.alpn_protocol(), Some(ALPN_HTTP11));
            assert_eq!(conn.protocol_version(), Some(version.version));
            s.write_all(b"hello").await.expect("write");
            let mut back = Vec::new();
            s.read_to_end(&mut back).await.expect("read");
            assert_eq!(back, b"hello");
            task.await.expect("server");
        }
    }

    #[tokio::test]
    async fn a_client_checking_another_name_refuses_the_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::generate("test").expect("ca");
        let (cert, key) = files(dir.path(), &ca);
        let (addr, _task) = echo_once(acceptor(&cert, &key).expect("acceptor")).await;
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let r = client(&ca, &rustls::version::TLS13)
            .connect("other.test.localhost".try_into().expect("name"), tcp)
            .await;
        assert!(r.is_err(), "certificate accepted for the wrong name");
    }

    #[test]
    fn export_ca_prints_the_enrolled_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = export_ca(dir.path()).expect_err("not enrolled");
        assert!(e.to_string().contains("ca.pem"), "{e}");
        assert!(e.to_string().contains("enroll"), "{e}");
        let ca = Ca::generate("test").expect("ca");
        let state = postern_net::control::enroll::NodeState::new(dir.path());
        std::fs::write(state.ca(), ca.cert_pem()).expect("write");
        assert_eq!(export_ca(dir.path()).expect("export"), ca.cert_pem());
        std::fs::write(state.ca(), "not a certificate").expect("write");
        assert!(export_ca(dir.path()).is_err());
    }

    #[tokio::test]
    async fn bad_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::generate("test").expect("ca");
        let (cert, key) = files(dir.path(), &ca);
        let missing = dir.path().join("missing.pem");
        let e = acceptor(&missing, &key).err().expect("missing cert");
        assert!(e.to_string().contains("tls-cert"), "{e}");
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let e = acceptor(&key, &key).err().expect("key as cert");
        assert!(e.to_string().contains("key.pem"), "{e}");
        // A key that does not belong to the certificate.
        let other = files(
            &{
                let d = dir.path().join("other");
                std::fs::create_dir(&d).expect("mkdir");
                d
            },
            &ca,
        );
        assert!(acceptor(&cert, &other.1).is_err());
    }

    #[tokio::test]
    async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::generate("test").expect("ca");
        let (cert, key) = files(dir.path(), &ca);
        let acceptor = acceptor(&cert, &key).expect("acceptor");
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let _client = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (tcp, _) = l.accept().await.expect("accept");
        let e = accept_within(&acceptor, tcp, Duration::from_millis(200))
            .await
            .expect_err("no handshake");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
