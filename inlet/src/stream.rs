//! Opening a stream to a service's outlet for one client connection: a stream of the pooled
//! end-to-end connection, its `Connect` header written, failures counted by reason (once, for
//! both the plain TCP and the HTTP serve paths), and byte counters for the splice.

use crate::error::ServeError;
use crate::pool::{ActiveStream, Pool};
use postern_net::control::exchange::{self, CtlError};
use postern_proto::msg::StreamOpen;
use postern_proto::name::ServiceName;
use std::net::SocketAddr;

/// An opened stream: its two halves and the count of it on its connection.
pub(crate) type Opened = (quinn::SendStream, quinn::RecvStream, ActiveStream);

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// No connection or stream to the outlet (counted in
    /// `postern_inlet_stream_failures_total`).
    #[error(transparent)]
    Unserved(ServeError),
    /// The stream opened but its header could not be written.
    #[error(transparent)]
    Header(CtlError),
}

/// Opens a stream to `service`'s outlet and writes its `Connect` header: `ConnectFrom`, with
/// the client's address and the one it reached (`from`), where the outlet understands it.
pub(crate) async fn open_stream(
    pool: &Pool,
    service: &ServiceName,
    from: Option<(SocketAddr, SocketAddr)>,
) -> Result<Opened, OpenError> {
    let ((mut send, recv, active), v2) = open(pool, service).await.map_err(|e| {
        failed(service, &e);
        OpenError::Unserved(e)
    })?;
    let header = match from {
        Some((client, local)) if v2 => StreamOpen::ConnectFrom {
            service: service.clone(),
            client,
            local,
        },
        _ => StreamOpen::Connect {
            service: service.clone(),
        },
    };
    exchange::write_frame(&mut send, &header)
        .await
        .map_err(OpenError::Header)?;
    Ok((send, recv, active))
}

/// A new stream on the pool's connection for `service`, and whether that connection speaks
/// [`postern_proto::ALPN_E2E_V2`].
async fn open(pool: &Pool, service: &ServiceName) -> Result<(Opened, bool), ServeError> {
    // One retry: a cached connection may have died since it was last checked.
    for attempt in 0..2 {
        let (conn, active) = pool.stream_connection(service).await?;
        match conn.open_bi().await {
            Ok((send, recv)) => {
                let v2 = postern_net::transport::endpoint::speaks_e2e_v2(&conn);
                return Ok(((send, recv, active), v2));
            }
            Err(e) if attempt == 0 => {
                tracing::debug!(error = %e, "cached end-to-end connection is gone; reconnecting");
            }
            Err(e) => return Err(ServeError::Stream(e.to_string())),
        }
    }
    Err(ServeError::Stream("no connection".into()))
}

/// Bytes through the inlet's client connections, by service and direction (`up`: client to
/// service, `down`: service to client).
const STREAM_BYTES: &str = "postern_inlet_stream_bytes_total";

pub(crate) fn byte_counter(service: &ServiceName, direction: &'static str) -> metrics::Counter {
    metrics::counter!(STREAM_BYTES, "service" => service.as_str().to_owned(), "direction" => direction)
}

/// Counts a client connection that could not be served.
fn failed(service: &ServiceName, e: &ServeError) {
    let reason = match e {
        ServeError::NoRelay => "no_relay",
        ServeError::Refused(_) | ServeError::RelayRefused(_) | ServeError::OtherOutlet { .. } => {
            "route_refused"
        }
        ServeError::Control(_) | ServeError::Unexpected => "control",
        ServeError::E2e { .. } => "e2e_connect",
        ServeError::Stream(_) => "stream",
    };
    metrics::counter!("postern_inlet_stream_failures_total", "service" => service.as_str().to_owned(), "reason" => reason)
        .increment(1);
}

/// A stream that keeps its connection's [`ActiveStream`] count while it lives.
pub(crate) struct Holding<T> {
    pub(crate) io: T,
    pub(crate) _active: ActiveStream,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Holding<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Holding<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
