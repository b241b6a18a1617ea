//! TLS server side for listeners that browsers reach: the inlet's local `https://` listener
//! and the outlet's public hostname, both serving a PEM certificate and key.
//!
//! TLS 1.2 and 1.3, no client certificate, ALPN `http/1.1` so the HTTP filter sees plain
//! HTTP/1.1 requests once the handshake is done.

use postern_proto::tls::{provider, Identity};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
pub use tokio_rustls::TlsAcceptor;

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The ALPN protocol offered: HTTP/1.1 only (the HTTP filter does not speak HTTP/2).
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Why a listener's TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSetupError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("tls-cert {cert} / tls-key {key}: {message}")]
    Pem {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("tls-cert {cert} / tls-key {key}: {source}")]
    Rustls {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// A TLS acceptor serving the PEM certificate chain in `cert` with the PEM private key in `key`.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsSetupError> {
    let read = |what, path: &Path| {
        std::fs::read_to_string(path).map_err(|source| TlsSetupError::Read {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read("tls-cert", cert)?;
    let key_pem = read("tls-key", key)?;
    let identity = Identity::from_pem(&cert_pem, &key_pem).map_err(|e| TlsSetupError::Pem {
        cert: cert.to_owned(),
        key: key.to_owned(),
        message: e.to_string(),
    })?;
    server_config(&identity)
        .map(|c| TlsAcceptor::from(Arc::new(c)))
        .map_err(|source| TlsSetupError::Rustls {
            cert: cert.to_owned(),
            key: key.to_owned(),
            source,
        })
}

/// The server configuration for a local listener: TLS 1.2 + 1.3, no client certificate, ALPN
/// `http/1.1`. Fails if the key does not match the certificate.
pub fn server_config(identity: &Identity) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut cfg = builder()?.with_single_cert(identity.certs.clone(), identity.key())?;
    cfg.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(cfg)
}

/// The same server configuration, serving whatever certificate `resolver` holds at each
/// handshake: for a certificate that is fetched and renewed while the listener runs (a
/// resolver holding none yet fails the handshake).
pub fn resolving_config(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut cfg = builder()?.with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(cfg)
}

/// A certificate and key ready for [`resolving_config`]'s resolver; fails when the key does
/// not match the certificate.
pub fn certified_key(identity: &Identity) -> Result<rustls::sign::CertifiedKey, rustls::Error> {
    rustls::sign::CertifiedKey::from_der(identity.certs.clone(), identity.key(), &provider())
}

fn builder() -> Result<
    rustls::ConfigBuilder<rustls::ServerConfig, rustls::server::WantsServerCert>,
    rustls::Error,
> {
    Ok(rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth())
}

/// Runs the server side of the handshake on any byte stream within `limit`.
pub async fn accept_io<S: AsyncRead + AsyncWrite + Unpin>(
    acceptor: &TlsAcceptor,
    io: S,
    limit: Duration,
) -> io::Result<tokio_rustls::server::TlsStream<S>> {
    match tokio::time::timeout(limit, acceptor.accept(io)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "TLS handshake timed out",
        )),
    }
}

/// What a failed server-side handshake says about the client, for a log line that helps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The first bytes were not a TLS record: plain HTTP (or another protocol) sent to a TLS
    /// port, typically `http://` where `https://` was meant.
    NotTls,
    /// The client did not finish within the handshake limit.
    TimedOut,
    /// Anything else (bad certificate, no common version, closed early).
    Other,
}

/// Classifies an error from [`accept_io`].
pub fn classify_handshake_error(e: &io::Error) -> HandshakeFailure {
    if e.kind() == io::ErrorKind::TimedOut {
        return HandshakeFailure::TimedOut;
    }
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType
            | rustls::InvalidMessage::UnknownProtocolVersion,
        )) => HandshakeFailure::NotTls,
        _ => HandshakeFailure::Other,
    }
}

/// Logs a failed handshake on a local TLS listener without letting clients flood the log:
/// plain HTTP to a TLS port and timeouts at DEBUG with a hint, once per interval; other
/// failures at INFO, once per interval (see [`crate::runtime::ratelog`]).
pub fn log_handshake_failure(e: &io::Error, listener: &str) {
    match classify_handshake_error(e) {
        HandshakeFailure::NotTls => crate::refusal!(
            debug,
            "tls_not_tls",
            "a client sent plain HTTP (or another protocol) to a TLS port: it should use https://",
            listener
        ),
        HandshakeFailure::TimedOut => crate::refusal!(
            debug,
            "tls_handshake_timeout",
            "a client did not finish its TLS handshake in time",
            listener
        ),
        HandshakeFailure::Other => crate::refusal!(
            info,
            "tls_handshake_failed",
            "TLS handshake failed",
            listener,
            error = %e
        ),
    }
}

#[cfg(test)]
mod handshake_tests {
    use super::*;

    /// A real handshake against plain HTTP bytes, so the classification follows rustls's
    /// actual error rather than a hand-built one.
    #[tokio::test]
    async fn plain_http_to_a_tls_port_is_recognised() {
        let ca = postern_proto::pki::Ca::generate("test").expect("ca");
        let name = postern_proto::name::NodeName::new("localhost").expect("name");
        let issued = ca.issue(&name, Duration::from_secs(3600)).expect("issue");
        let id = Identity::from_pem(&issued.cert_pem, &issued.key_pem).expect("identity");
        let acceptor = TlsAcceptor::from(Arc::new(server_config(&id).expect("config")));
        let (mut client, server) = tokio::io::duplex(4096);
        use tokio::io::AsyncWriteExt;
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let e = accept_io(&acceptor, server, Duration::from_secs(5))
            .await
            .expect_err("not TLS");
        assert_eq!(
            classify_handshake_error(&e),
            HandshakeFailure::NotTls,
            "{e}"
        );

        let (_idle, server) = tokio::io::duplex(4096);
        let e = accept_io(&acceptor, server, Duration::from_millis(50))
            .await
            .expect_err("idle");
        assert_eq!(classify_handshake_error(&e), HandshakeFailure::TimedOut);
    }
}
