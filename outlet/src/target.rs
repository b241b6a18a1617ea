//! Connections from the outlet to a service's target: plain TCP or TLS.

use postern_proto::tls::roots_from_pem;
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// How long connecting to a target may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a target could not be reached.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    #[error("connect to {to} failed: {source}")]
    Connect { to: String, source: std::io::Error },
    #[error("connect to {0} timed out")]
    Timeout(String),
    #[error("TLS handshake with {to} failed: {source}")]
    Tls { to: String, source: std::io::Error },
    #[error("TLS set-up: {0}")]
    Config(String),
    #[error("sending the PROXY header to {to} failed: {source}")]
    Proxy { to: String, source: std::io::Error },
}

/// A connected target.
pub enum TargetStream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Where a service's streams go.
#[derive(Clone)]
pub struct Target {
    /// `host:port`.
    pub to: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Open each connection with a PROXY protocol v2 header (`proxy-protocol = "v2"`).
    pub proxy_protocol: bool,
    /// How the outlet checks that the target answers (none: it always counts as healthy).
    pub check: Option<crate::health::CheckConfig>,
}

/// Who a target connection is for, written in its PROXY header when the service asks for one.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    /// The client's address at the inlet, and the inlet address it reached (the inlet's
    /// claim; unknown from an inlet that predates it or at the public ingress).
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// The client's identity name, as the outlet knows it (the inlet's certificate).
    pub identity: Option<String>,
    /// Its certificate attributes.
    pub attributes: postern_proto::policy::Attributes,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("to", &self.to)
            .field("tls", &self.tls.is_some())
            .field("proxy_protocol", &self.proxy_protocol)
            .field("check", &self.check)
            .finish()
    }
}

impl Target {
    /// A plain TCP target.
    pub fn tcp(to: impl Into<String>) -> Self {
        Self {
            to: to.into(),
            tls: None,
            proxy_protocol: false,
            check: None,
        }
    }

    /// A TLS target verified against `ca_pem` (the target's CA), checking `server_name`.
    pub fn tls(
        to: impl Into<String>,
        ca_pem: &str,
        server_name: &str,
    ) -> Result<Self, TargetError> {
        let roots = roots_from_pem(ca_pem).map_err(|e| TargetError::Config(e.to_string()))?;
        let cfg = rustls::ClientConfig::builder_with_provider(postern_proto::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TargetError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| TargetError::Config(format!("server name {server_name:?}: {e}")))?;
        Ok(Self {
            to: to.into(),
            tls: Some((TlsConnector::from(Arc::new(cfg)), name)),
            proxy_protocol: false,
            check: None,
        })
    }

    /// Connects (with a timeout).
    pub async fn connect(&self) -> Result<TargetStream, TargetError> {
        self.connect_for(None).await
    }

    /// Connects for `client`: with `proxy-protocol`, the PROXY v2 header naming it goes first
    /// (before any TLS), with the client's address when known.
    pub async fn connect_for(
        &self,
        client: Option<&ClientInfo>,
    ) -> Result<TargetStream, TargetError> {
        let mut tcp = self.connect_tcp(CONNECT_TIMEOUT).await?;
        let _ = tcp.set_nodelay(true);
        if self.proxy_protocol {
            let none = ClientInfo::default();
            let who = client.unwrap_or(&none);
            let header = postern_proto::proxy_v2::for_client(
                who.addresses,
                who.identity.as_deref(),
                &who.attributes,
            )
            .map_err(|e| TargetError::Proxy {
                to: self.to.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            tokio::time::timeout(CONNECT_TIMEOUT, tcp.write_all(&header))
                .await
                .map_err(|_| TargetError::Timeout(self.to.clone()))?
                .map_err(|source| TargetError::Proxy {
                    to: self.to.clone(),
                    source,
                })?;
        }
        match &self.tls {
            None => Ok(TargetStream::Tcp(tcp)),
            Some((connector, name)) => {
                let tls =
                    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp))
                        .await
                        .map_err(|_| TargetError::Timeout(self.to.clone()))?
                        .map_err(|source| TargetError::Tls {
                            to: self.to.clone(),
                            source,
                        })?;
                Ok(TargetStream::Tls(Box::new(tls)))
            }
        }
    }

    /// A TCP connection to the target, in `timeout`.
    pub async fn connect_tcp(&self, timeout: Duration) -> Result<TcpStream, TargetError> {
        tokio::time::timeout(timeout, TcpStream::connect(&self.to))
            .await
            .map_err(|_| TargetError::Timeout(self.to.clone()))?
            .map_err(|source| TargetError::Connect {
                to: self.to.clone(),
                source,
            })
    }

    /// Connects, as one byte stream whatever the transport, for the HTTP filter (which opens
    /// its upstream lazily and only needs bytes both ways). The error names the target, never
    /// a secret.
    pub async fn connect_io(&self) -> std::io::Result<Box<dyn TargetIo>> {
        self.connect_io_for(None).await
    }

    /// [`connect_io`](Self::connect_io) for `client` (see [`connect_for`](Self::connect_for)).
    pub async fn connect_io_for(
        &self,
        client: Option<&ClientInfo>,
    ) -> std::io::Result<Box<dyn TargetIo>> {
        match self.connect_for(client).await {
            Ok(TargetStream::Tcp(t)) => Ok(Box::new(t)),
            Ok(TargetStream::Tls(t)) => Ok(Box::new(*t)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the service's target");
                Err(std::io::Error::other(e.to_string()))
            }
        }
    }
}

/// A connection to a target, plain or TLS.
pub trait TargetIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> TargetIo for T {}
