//! Public hostname ingress: `https://<service>.<relay-domain>` for browsers, without the relay
//! holding any service's key.
//!
//! A TCP listener reads each connection's TLS ClientHello (in the clear) just far enough to
//! learn the server name ([`postern_proto::sni`]), maps `<service>.<domain>` to an outlet that
//! registered `service` as public (`Ctl::RegisterPublic`), opens a stream to that outlet on its
//! control connection with a `Ctl::PublicStream` frame, and from then on moves bytes: the
//! ClientHello it read, then everything else, both ways. The outlet terminates TLS, so the relay
//! sees only ciphertext. A name that routes nowhere (no SNI, another domain, a service nobody
//! offers publicly) gets a TLS `unrecognized_name` alert and a close, never another service.
//!
//! Limits: the whole ClientHello must arrive within [`PublicOptions::peek_timeout`] of the
//! accept and fit in [`PublicOptions::max_hello`] bytes; at most [`MAX_CONNECTIONS`]
//! connections at once. Until its ClientHello is complete a connection is *pending*: one source
//! address holds at most [`MAX_PENDING_PER_SOURCE`] pending connections, and when the cap is
//! full a newcomer evicts the oldest pending one (see [`postern_net::runtime::limit`]), so idle
//! or trickling junk only ever displaces junk and a browser's connection gets in.

use crate::server::RelayHandle;
use postern_net::control::exchange;
use postern_proto::msg::Ctl;
use postern_proto::name::ServiceName;
use postern_proto::sni::{self, SniError};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Default for how long a client may take to send its whole ClientHello (a browser sends it
/// at once).
pub const PEEK_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections one source address may hold before their ClientHello is complete.
pub const MAX_PENDING_PER_SOURCE: usize =
    postern_net::runtime::limit::DEFAULT_MAX_PENDING_PER_SOURCE;
/// How long opening the stream to the outlet may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Most public connections served at once (lowered to fit the open-file limit); more are
/// closed at once, or make room by closing the oldest that has not sent a byte yet (see
/// [`postern_net::runtime::limit`]).
pub const MAX_CONNECTIONS: usize = 4096;
/// Most public connections handed to one outlet at once. Each is a stream on the outlet's
/// control connection, which admits 256 streams the relay opens: the rest stay free for route
/// set-up, so public clients cannot starve the tunnels.
pub const MAX_STREAMS_PER_OUTLET: usize = 192;

/// Which way bytes were moving when the tap saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the public client to the outlet.
    ToOutlet,
    /// From the outlet to the public client.
    ToClient,
}

/// Test hook that sees every byte the ingress forwards (to show the relay sees no plaintext).
pub type PublicTap = Arc<dyn Fn(Direction, &[u8]) + Send + Sync>;

/// What the public ingress needs.
#[derive(Clone)]
pub struct PublicOptions {
    /// TCP address of the public TLS port, e.g. `0.0.0.0:443`.
    pub listen: SocketAddr,
    /// The relay's public domain: `<service>.<domain>` reaches `service`.
    pub domain: String,
    /// Cap on the bytes read before the ClientHello must be complete.
    pub max_hello: usize,
    /// How long a client may take to send its whole ClientHello.
    pub peek_timeout: Duration,
    /// Sees every forwarded byte (tests).
    pub tap: Option<PublicTap>,
    /// Most connections at once [default: [`MAX_CONNECTIONS`], lowered to fit the open-file
    /// limit].
    pub max_connections: usize,
}

impl PublicOptions {
    /// Options with the default ClientHello cap and no tap.
    pub fn new(listen: SocketAddr, domain: impl Into<String>) -> Self {
        Self {
            listen,
            domain: domain.into(),
            max_hello: sni::DEFAULT_MAX_HELLO,
            peek_timeout: PEEK_TIMEOUT,
            tap: None,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// Why a public connection was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a TLS ClientHello, malformed, or too large.
    BadHello,
    /// The ClientHello did not arrive in time.
    Timeout,
    /// The ClientHello named no server.
    NoName,
    /// The name is not `<service>.<domain>` for a service offered publicly by a live outlet.
    UnknownName,
    /// The outlet could not be reached.
    OutletUnavailable,
}

/// A bound public ingress, ready to [`run`](PublicIngress::run).
pub struct PublicIngress {
    listener: TcpListener,
    opts: PublicOptions,
}

impl PublicIngress {
    /// Binds the public TCP port.
    pub async fn bind(opts: PublicOptions) -> io::Result<Self> {
        let listener = TcpListener::bind(opts.listen).await?;
        Ok(Self { listener, opts })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`; connections already forwarded go on until they end.
    pub async fn run(self, relay: RelayHandle, shutdown: CancellationToken) {
        tracing::info!(addr = %postern_net::runtime::logging::local_addr(self.listener.local_addr()), domain = %self.opts.domain, "public ingress listening");
        let limit = postern_net::runtime::limit::ConnLimit::with_source_cap(
            "relay public ingress",
            postern_net::runtime::limit::default_cap(Some(self.opts.max_connections)),
            MAX_PENDING_PER_SOURCE,
        );
        let mut backoff = postern_net::runtime::limit::AcceptBackoff::new("relay public ingress");
        let opts = Arc::new(self.opts);
        let per_outlet = Arc::new(PerOutlet::default());
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = self.listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        backoff.failed(&e).await;
                        continue;
                    }
                },
            };
            backoff.succeeded();
            let (evicted, evicted_source) = (limit.evicted(), limit.evicted_source());
            // Pending until its ClientHello is whole: junk makes room for a browser.
            let Ok(permit) = limit.admit_pending(peer.ip()).await else {
                relay.public_stats().refused.fetch_add(1, Relaxed);
                relay.public_stats().refused_cap.fetch_add(1, Relaxed);
                continue;
            };
            let stats = relay.public_stats();
            let (evicted, evicted_source) = (
                limit.evicted() - evicted,
                limit.evicted_source() - evicted_source,
            );
            if evicted > 0 {
                stats.refused.fetch_add(evicted, Relaxed);
                stats.evicted_pending.fetch_add(evicted, Relaxed);
                postern_net::refusal!(info, "public_evicted_pending", "public connections without a whole ClientHello closed to make room (connection cap full)");
            }
            if evicted_source > 0 {
                stats.refused.fetch_add(evicted_source, Relaxed);
                stats.evicted_source.fetch_add(evicted_source, Relaxed);
                postern_net::refusal!(info, "public_evicted_source", "public connections without a whole ClientHello closed: their source opened too many");
            }
            let (relay, opts, stats) = (relay.clone(), opts.clone(), relay.public_stats_arc());
            let per_outlet = per_outlet.clone();
            tokio::spawn(
                async move {
                    let deadline = tokio::time::Instant::now() + opts.peek_timeout;
                    let served = tokio::select! {
                        // Evicted to make room (counted at the accept).
                        _ = permit.evicted() => return,
                        r = serve(tcp, peer, &relay, &opts, &per_outlet, &permit, deadline) => r,
                    };
                    if let Err(refusal) = served {
                        if refusal == Refusal::Timeout {
                            stats.preauth_timeout.fetch_add(1, Relaxed);
                        }
                        stats.refused.fetch_add(1, Relaxed);
                        if matches!(refusal, Refusal::NoName | Refusal::UnknownName) {
                            stats.refused_unknown_name.fetch_add(1, Relaxed);
                        }
                    } else {
                        stats.forwarded.fetch_add(1, Relaxed);
                    }
                    drop(permit);
                }
                .instrument(tracing::info_span!("public", %peer)),
            );
        }
        tracing::info!("public ingress stopped");
    }
}

/// Serves one public connection; `Err` when it was refused. Returns once the connection ends.
/// `slot` is established once the ClientHello is whole, which must be by `deadline`.
async fn serve(
    mut tcp: TcpStream,
    peer: SocketAddr,
    relay: &RelayHandle,
    opts: &PublicOptions,
    per_outlet: &PerOutlet,
    slot: &postern_net::runtime::limit::Slot,
    deadline: tokio::time::Instant,
) -> Result<(), Refusal> {
    let _ = tcp.set_nodelay(true);
    let mut hello = Vec::new();
    let peeked = tokio::time::timeout_at(deadline, peek(&mut tcp, &mut hello, opts.max_hello))
        .await
        .unwrap_or(Err(Refusal::Timeout));
    if peeked.is_ok() {
        slot.establish();
    }
    let name = match peeked {
        Ok(Some(name)) => name,
        Ok(None) => {
            postern_net::refusal!(
                info,
                "public_no_name",
                "refusing public connections without a server name"
            );
            return Err(alert_unrecognized_name(tcp, Refusal::NoName).await);
        }
        Err(r) => {
            postern_net::refusal!(info, "public_refused", "refusing public connections", refusal = ?r);
            // Not TLS or cut short: nothing sensible to answer.
            return Err(r);
        }
    };
    let service = sni::service_label(&name, &opts.domain)
        .and_then(|label| ServiceName::new(&label.to_ascii_lowercase()).ok());
    let Some(service) = service else {
        postern_net::refusal!(info, "public_foreign_name", "refusing public connections for names outside the public domain", %name);
        return Err(alert_unrecognized_name(tcp, Refusal::UnknownName).await);
    };
    let candidates = relay.public_candidates(&service);
    if candidates.is_empty() {
        postern_net::refusal!(info, "public_no_outlet", "refusing public connections for services no live outlet offers publicly", %service);
        return Err(alert_unrecognized_name(tcp, Refusal::UnknownName).await);
    }
    for conn in candidates {
        let Some(_slot) = per_outlet.acquire(&conn) else {
            tracing::warn!(%service, "an outlet has {MAX_STREAMS_PER_OUTLET} public connections open; trying another");
            continue;
        };
        let open = Ctl::PublicStream {
            service: service.clone(),
            client: peer.to_string(),
        };
        let opened = tokio::time::timeout(OPEN_TIMEOUT, async {
            let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            exchange::write_frame(&mut send, &open)
                .await
                .map_err(|e| e.to_string())?;
            send.write_all(&hello).await.map_err(|e| e.to_string())?;
            Ok::<_, String>((send, recv))
        })
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
        let (send, recv) = match opened {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%service, error = %e, "cannot open a public stream to an outlet; trying another");
                continue;
            }
        };
        if let Some(tap) = &opts.tap {
            tap(Direction::ToOutlet, &hello);
        }
        tracing::debug!(%service, "public connection forwarded");
        let io = Tapped {
            inner: tcp,
            tap: opts.tap.clone(),
        };
        let out = postern_net::stream::splice::splice_io(io, send, recv).await;
        tracing::debug!(%service, up = out.up, down = out.down, "public connection done");
        return Ok(());
    }
    Err(alert_unrecognized_name(tcp, Refusal::OutletUnavailable).await)
}

/// Public connections open per outlet control connection.
#[derive(Default)]
struct PerOutlet {
    slots: std::sync::Mutex<HashMap<usize, Arc<tokio::sync::Semaphore>>>,
}

impl PerOutlet {
    /// A slot for one more connection to `conn`'s outlet, or `None` when it has its fill.
    fn acquire(&self, conn: &quinn::Connection) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.len() > 1024 {
            // Forget idle entries (outlets that reconnected get a new connection id).
            slots.retain(|_, s| s.available_permits() < MAX_STREAMS_PER_OUTLET);
        }
        let sem = slots
            .entry(conn.stable_id())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS_PER_OUTLET)))
            .clone();
        sem.try_acquire_owned().ok()
    }
}

/// Reads until the ClientHello is complete; `Ok(None)`: it names no server.
async fn peek(
    tcp: &mut TcpStream,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<Option<String>, Refusal> {
    loop {
        match sni::peek_server_name(buf, max) {
            Ok(Some(info)) => return Ok(info.server_name),
            Ok(None) => {}
            Err(e @ (SniError::NotTls | SniError::NotClientHello)) => {
                tracing::debug!(error = %e, "not a TLS client");
                return Err(Refusal::BadHello);
            }
            Err(e) => {
                postern_net::refusal!(info, "public_bad_hello", "bad ClientHellos", error = %e);
                return Err(Refusal::BadHello);
            }
        }
        let room = max.saturating_sub(buf.len()).max(1);
        let n = (&mut *tcp)
            .take(room as u64)
            .read_buf(buf)
            .await
            .map_err(|_| Refusal::BadHello)?;
        if n == 0 {
            return Err(Refusal::BadHello);
        }
    }
}

/// Sends the TLS `unrecognized_name` alert and closes; returns `why` for the caller to count.
async fn alert_unrecognized_name(mut tcp: TcpStream, why: Refusal) -> Refusal {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = tcp.write_all(&sni::ALERT_UNRECOGNIZED_NAME).await;
        let _ = tcp.shutdown().await;
    })
    .await;
    why
}

impl RelayHandle {
    /// Live control connections of the outlets offering `service` publicly, in the order to try.
    fn public_candidates(&self, service: &ServiceName) -> Vec<quinn::Connection> {
        let ids = self.public_registry().candidates(service);
        ids.into_iter()
            .filter_map(|id| self.node_conn(id))
            .filter(|c| c.close_reason().is_none())
            .collect()
    }
}

/// The client's connection, showing every byte that passes to the tap.
struct Tapped {
    inner: TcpStream,
    tap: Option<PublicTap>,
}

impl AsyncRead for Tapped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Some(tap) = &self.tap {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                tap(Direction::ToOutlet, new);
            }
        }
        res
    }
}

impl AsyncWrite for Tapped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let (Some(tap), Poll::Ready(Ok(n))) = (&self.tap, &res) {
            tap(Direction::ToClient, &buf[..*n]);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
