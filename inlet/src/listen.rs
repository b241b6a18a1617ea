//! Where client connections are accepted and served: one local listener per service, capped
//! (see [`postern_net::runtime::limit`]); each accepted connection (TLS-handshaken first where
//! the listener has TLS) becomes a stream to the service's outlet, spliced as plain TCP or, for
//! InfluxDB, through the HTTP filter with the leased credential put in.

use crate::lease::{CredentialSource, LeaseGate};
use crate::pool::Pool;
use crate::stream::{byte_counter, open_stream, Holding, OpenError};
use crate::tls::{ClientStream, TlsAcceptor};
use postern_net::stream::http_proxy::{self, ProxyError, ProxyOptions, ProxyStats};
use postern_net::stream::splice;
use postern_proto::http::FilterConfig;
use postern_proto::msg::code;
use postern_proto::name::ServiceName;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// What a local listener carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    /// Any TCP protocol, passed through untouched.
    #[default]
    Tcp,
    /// InfluxDB's HTTP API: requests go through the HTTP filter, which puts the leased
    /// credential streamed from the outlet in place of whatever the client sent.
    Influxdb,
}

/// One local listener.
#[derive(Debug, Clone)]
pub struct InletService {
    pub name: ServiceName,
    pub listen: SocketAddr,
    pub kind: ServiceKind,
}

/// How a listener's client connections are served.
#[derive(Clone)]
pub(crate) enum Mode {
    Tcp,
    Http(CredentialSource),
}

/// At most one log line per service this often for failed plain TCP client connections.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

/// Per service: when a failed client connection was last logged, and how many were not since.
#[derive(Default)]
pub(crate) struct FailureLog(Mutex<HashMap<ServiceName, (Option<Instant>, u64)>>);

impl FailureLog {
    /// Whether a failed client connection to `service` is to be logged: `Some(n)` for the first
    /// of a burst (with `n` failures not logged since the last line), `None` within
    /// [`FAILURE_LOG_EVERY`] of the last line, so that a client retrying in a loop does not
    /// flood the log but its cause is still said.
    fn burst(&self, service: &ServiceName) -> Option<u64> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let entry = map.entry(service.clone()).or_insert((None, 0));
        match entry.0 {
            Some(last) if now.duration_since(last) < FAILURE_LOG_EVERY => {
                entry.1 += 1;
                None
            }
            _ => {
                let more = entry.1;
                *entry = (Some(now), 0);
                Some(more)
            }
        }
    }
}

/// Counts a client connection closed by the listener's cap (`reason`: `cap`, or
/// `evicted_silent` for one closed before its first byte to make room for a newer one).
fn refused(service: &ServiceName, reason: &'static str) {
    metrics::counter!(CONNECTIONS_REFUSED, "service" => service.as_str().to_owned(), "reason" => reason)
        .increment(1);
}

/// Client connections closed by a listener's cap, by service and reason.
pub const CONNECTIONS_REFUSED: &str = "postern_inlet_connections_refused_total";

/// Open client connections closed because a reload removed their listener, by service.
pub const CONNECTIONS_CLOSED_BY_RELOAD: &str = "postern_inlet_connections_closed_by_reload_total";

/// Accepts `service`'s client connections until `shutdown`; each is served on its own task,
/// tracked in `streams` (the drain waits for them), until it ends or `close` (the listener
/// removed by a reload: its open connections are closed, not left running).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn accept_loop(
    service: ServiceName,
    mode: Mode,
    listener: TcpListener,
    pool: Arc<Pool>,
    failures: Arc<FailureLog>,
    shutdown: CancellationToken,
    close: CancellationToken,
    streams: TaskTracker,
    tls: Option<TlsAcceptor>,
    limit: Arc<postern_net::runtime::limit::ConnLimit>,
) {
    tracing::info!(%service, addr = ?listener.local_addr().ok(), tls = tls.is_some(), max_connections = limit.max(), "listening");
    // HTTP and TLS clients speak first: one that has sent nothing yet can make room for another.
    let client_speaks_first = tls.is_some() || matches!(mode, Mode::Http(_));
    let mut backoff =
        postern_net::runtime::limit::AcceptBackoff::new(format!("inlet service {service}"));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually EMFILE: back off instead of spinning; open connections are still served.
                backoff.failed(&e).await;
                continue;
            }
        };
        backoff.succeeded();
        let evicted_before = limit.evicted();
        let slot = match limit.admit(client_speaks_first).await {
            Ok(s) => s,
            Err(_) => {
                refused(&service, "cap");
                // Closed at once (dropped here): its descriptor is free again.
                splice::set_reset_on_close(&tcp);
                continue;
            }
        };
        if limit.evicted() > evicted_before {
            refused(&service, "evicted_silent");
        }
        let (pool, failures) = (pool.clone(), failures.clone());
        let service = service.clone();
        let closed_service = service.clone();
        let span = tracing::info_span!("client", %service, %peer);
        metrics::counter!("postern_inlet_streams_total", "service" => service.as_str().to_owned())
            .increment(1);
        let (mode, tls) = (mode.clone(), tls.clone());
        let serve = async move {
            if client_speaks_first {
                // The first bytes must come within the TLS handshake's time limit.
                match tokio::time::timeout(
                    crate::tls::HANDSHAKE_TIMEOUT,
                    slot.wait_first_bytes(&tcp),
                )
                .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::debug!("closing a silent client connection to make room");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("client sent nothing in time; closing");
                        return;
                    }
                }
            }
            let client = match ClientStream::accept(tcp, tls.as_ref()).await {
                Ok(c) => c,
                Err(e) => {
                    postern_net::stream::tls_server::log_handshake_failure(&e, service.as_str());
                    return;
                }
            };
            match mode {
                Mode::Tcp => serve_client(client, service, &pool, &failures).await,
                Mode::Http(cred) => serve_http_client(client, service, &pool, cred).await,
            }
            drop(slot);
        };
        let close = close.clone();
        let serve = async move {
            // Pinned here, not moved into `select!`, so the connection is dropped (its socket
            // and stream closed) only after it has been counted and logged: whoever sees the
            // close then also sees the counter.
            tokio::pin!(serve);
            tokio::select! {
                _ = &mut serve => {}
                _ = close.cancelled() => {
                    tracing::info!("client connection closed: its listener was removed by a reload");
                    metrics::counter!(CONNECTIONS_CLOSED_BY_RELOAD, "service" => closed_service.as_str().to_owned())
                        .increment(1);
                }
            }
        };
        streams.spawn(serve.instrument(span));
    }
}

/// The client's address and the one it reached, for the outlet's PROXY header.
fn addresses(client: &ClientStream) -> Option<(SocketAddr, SocketAddr)> {
    let tcp = client.tcp();
    Some((tcp.peer_addr().ok()?, tcp.local_addr().ok()?))
}

/// Splices a plain TCP client to a stream to the service's outlet.
async fn serve_client(tcp: ClientStream, service: ServiceName, pool: &Pool, failures: &FailureLog) {
    let from = addresses(&tcp);
    let (send, recv, _active) = match open_stream(pool, &service, from).await {
        Ok(s) => s,
        Err(OpenError::Unserved(e)) => {
            let why = e.explain(&service, pool.uplink().transports());
            match failures.burst(&service) {
                Some(0) => tracing::warn!(%service, cause = %why, "closing client connection"),
                Some(more) => tracing::warn!(
                    %service,
                    cause = %why,
                    earlier = more,
                    "closing client connection (and {more} more since the last such line)"
                ),
                None => tracing::debug!(%service, cause = %why, "closing client connection"),
            }
            splice::set_reset_on_close(tcp.tcp());
            return;
        }
        Err(OpenError::Header(e)) => {
            tracing::warn!(error = %e, "closing client connection: cannot start stream");
            splice::set_reset_on_close(tcp.tcp());
            return;
        }
    };
    let counters = splice::ByteCounters {
        tcp_to_stream: byte_counter(&service, "up"),
        stream_to_tcp: byte_counter(&service, "down"),
    };
    let outcome = tcp.splice(send, recv, &counters).await;
    match outcome.peer_reset {
        Some(c) if c != u64::from(code::RESET) => {
            tracing::warn!(
                code = c,
                reason = code::describe(c),
                "outlet refused the stream; client connection closed"
            );
        }
        _ => tracing::debug!(
            up = outcome.up,
            down = outcome.down,
            "client connection done"
        ),
    }
}

/// Serves an InfluxDB client through the HTTP filter; the stream is opened only once a first
/// well-formed request with a credential is ready.
async fn serve_http_client(
    tcp: ClientStream,
    service: ServiceName,
    pool: &Pool,
    credential: CredentialSource,
) {
    let _ = tcp.tcp().set_nodelay(true);
    let from = addresses(&tcp);
    let open = || async {
        let (send, recv, active) = open_stream(pool, &service, from)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Holding {
            // Held once the proxy drops it: see `splice::HeldSend`.
            io: splice::Counted::new(
                tokio::io::join(recv, splice::HeldSend::new(send)),
                byte_counter(&service, "down"),
                byte_counter(&service, "up"),
            ),
            _active: active,
        })
    };
    match proxy(tcp, open, credential).await {
        Ok(stats) => tracing::debug!(
            requests = stats.requests,
            up = stats.bytes_up,
            down = stats.bytes_down,
            "client connection done"
        ),
        Err(e) => tracing::warn!(error = %e, "client connection ended with an error"),
    }
}

/// The HTTP proxy as the inlet runs it: query-string credentials stripped, and every request
/// forwarded with the lease `credential` holds at that moment (or answered 503 without one).
async fn proxy<U, F, Fut>(
    client: ClientStream,
    open_upstream: F,
    credential: CredentialSource,
) -> Result<ProxyStats, ProxyError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<U>>,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let cfg = FilterConfig {
        strip_query_credentials: true,
        ..FilterConfig::default()
    };
    let opts = ProxyOptions::new("postern inlet", cfg);
    http_proxy::proxy(client, open_upstream, LeaseGate(credential), opts).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_logged_once_per_burst_and_counted_meanwhile() {
        let log = FailureLog::default();
        let (a, b) = (
            ServiceName::new("a").expect("name"),
            ServiceName::new("b").expect("name"),
        );
        assert_eq!(log.burst(&a), Some(0));
        assert_eq!(log.burst(&a), None);
        assert_eq!(log.burst(&a), None);
        // Another service has its own burst.
        assert_eq!(log.burst(&b), Some(0));
        // Once the quiet period has passed, the next line says how many were not logged.
        log.0
            .lock()
            .expect("lock")
            .get_mut(&a)
            .expect("entry")
            .0
            .replace(
                Instant::now()
                    .checked_sub(FAILURE_LOG_EVERY)
                    .expect("uptime"),
            );
        assert_eq!(log.burst(&a), Some(2));
        assert_eq!(log.burst(&a), None);
    }
}
