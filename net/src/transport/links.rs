//! Datagram links over TLS/TCP, plugged into the UDP sockets quinn sees.
//!
//! Where UDP is blocked, a node reaches its relay over one TLS/TCP connection that carries, as
//! length-prefixed datagrams ([`postern_proto::dgram`]), exactly what the UDP socket would have
//! carried: the control connection's QUIC packets and forwarding frames. Each side's socket
//! ([`crate::transport::node_socket::NodeSocket`], the relay crate's `RelaySocket`) keeps a
//! [`StreamLinks`]: a send to an address that has a link goes to that link's bounded write
//! queue instead of the UDP socket, and datagrams read from a link are handed to the socket's
//! receive path as if they came from that address. quinn does not know the difference; QUIC's
//! loss recovery and congestion control work over it unchanged.
//!
//! Memory is bounded everywhere: a link's write queue holds at most [`WRITE_QUEUE`] datagrams
//! (further ones are dropped, as a full UDP buffer would drop them), the shared receive queue
//! holds at most [`INBOUND_QUEUE`] (a full queue stops reading from the links, which pushes
//! back on their TCP senders), and the decoder holds at most one datagram beyond a read.

use postern_proto::dgram::{self, Decoder, DgramError};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Datagrams waiting to be written to one link; more are dropped.
pub const WRITE_QUEUE: usize = 2048;
/// Datagrams read from all links and not yet taken by quinn (or the forwarder).
pub const INBOUND_QUEUE: usize = 4096;
/// A link on which nothing arrives for this long is dead (QUIC keep-alives cross it every
/// second or two while anything uses it).
pub const LINK_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A write that makes no progress for this long means the peer stopped reading.
pub const LINK_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes gathered into one write.
const WRITE_BATCH: usize = 64 * 1024;

/// Why a link ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    #[error("link I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer sent a bad length prefix: {0}")]
    Framing(#[from] DgramError),
    #[error("nothing received for {0:?}")]
    Idle(Duration),
    #[error("peer stopped reading (no write progress for {0:?})")]
    Stalled(Duration),
    #[error("replaced by a newer link to the same address")]
    Replaced,
}

/// Counters of the links.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Datagrams read from links.
    pub datagrams_in: AtomicU64,
    /// Datagrams queued for writing to links.
    pub datagrams_out: AtomicU64,
    /// Datagrams dropped because a link's write queue was full.
    pub dropped_full: AtomicU64,
    /// Datagrams the socket could not take (too large for quinn's buffer).
    pub dropped_oversize: AtomicU64,
    /// Links that ended with a framing error (bad length prefix).
    pub framing_errors: AtomicU64,
}

/// A link registered with [`StreamLinks::attach`], waiting for its stream.
#[derive(Debug)]
pub struct Attached {
    addr: SocketAddr,
    tx: mpsc::Sender<Vec<u8>>,
    rx: mpsc::Receiver<Vec<u8>>,
}

/// One received datagram and the address it stands for.
pub struct Inbound {
    pub from: SocketAddr,
    pub data: Vec<u8>,
}

/// The links of one socket; see the module docs.
#[derive(Debug)]
pub struct StreamLinks {
    out: RwLock<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
    /// Number of links, read on every send to skip the map lookup when there is none.
    count: AtomicUsize,
    inbound_tx: mpsc::Sender<Inbound>,
    inbound_rx: Mutex<mpsc::Receiver<Inbound>>,
    stats: LinkStats,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("from", &self.from)
            .field("len", &self.data.len())
            .finish()
    }
}

impl Default for StreamLinks {
    fn default() -> Self {
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
        Self {
            out: RwLock::default(),
            count: AtomicUsize::new(0),
            inbound_tx,
            inbound_rx: Mutex::new(inbound_rx),
            stats: LinkStats::default(),
        }
    }
}

impl StreamLinks {
    /// Counters.
    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }

    /// Number of live links.
    pub fn len(&self) -> usize {
        self.count.load(Relaxed)
    }

    /// True when no link is up.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether sends to `addr` go over a link.
    pub fn has(&self, addr: SocketAddr) -> bool {
        !self.is_empty()
            && self
                .read()
                .contains_key(&crate::transport::udp::canonical(addr))
    }

    /// Queues `contents` (segments of `segment` bytes, as in a GSO transmit) for the link to
    /// `dst`. Returns false when `dst` has no link (the caller sends over UDP); segments that
    /// do not fit the queue are dropped and counted, as a full socket buffer would drop them.
    pub fn send(&self, dst: SocketAddr, contents: &[u8], segment: usize) -> bool {
        if self.is_empty() {
            return false;
        }
        let tx = {
            let out = self.read();
            match out.get(&crate::transport::udp::canonical(dst)) {
                Some(tx) => tx.clone(),
                None => return false,
            }
        };
        for seg in contents.chunks(segment.max(1)) {
            match tx.try_send(seg.to_vec()) {
                Ok(()) => {
                    self.stats.datagrams_out.fetch_add(1, Relaxed);
                }
                Err(_) => {
                    self.stats.dropped_full.fetch_add(1, Relaxed);
                }
            }
        }
        true
    }

    /// The next datagram read from any link, registering `cx` for wake-up when none is there.
    pub fn poll_inbound(&self, cx: &mut Context<'_>) -> Poll<Option<Inbound>> {
        let mut rx = self.inbound_rx.lock().unwrap_or_else(|p| p.into_inner());
        rx.poll_recv(cx)
    }

    /// Counts a datagram the socket had to drop because it did not fit quinn's buffer.
    pub fn oversize(&self) {
        self.stats.dropped_oversize.fetch_add(1, Relaxed);
    }

    /// Removes the link to `addr` (its serving task ends with [`LinkError::Replaced`] or when
    /// its stream closes).
    pub fn detach(&self, addr: SocketAddr) {
        let mut out = self.write();
        if out
            .remove(&crate::transport::udp::canonical(addr))
            .is_some()
        {
            self.count.store(out.len(), Relaxed);
        }
    }

    /// Makes `addr` a link now (sends to it are queued from this moment), replacing any link
    /// to it; [`run`](Self::run) then carries the queued datagrams.
    pub fn attach(&self, addr: SocketAddr) -> Attached {
        let addr = crate::transport::udp::canonical(addr);
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let mut out = self.write();
        out.insert(addr, tx.clone());
        self.count.store(out.len(), Relaxed);
        Attached { addr, tx, rx }
    }

    /// Carries datagrams between `stream` and the socket as the link for `addr` until the
    /// stream ends, fails, goes idle, or `stop` is cancelled. A link already serving `addr` is
    /// replaced.
    pub async fn serve<S>(
        &self,
        addr: SocketAddr,
        stream: S,
        stop: CancellationToken,
    ) -> Result<(), LinkError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin,
    {
        let attached = self.attach(addr);
        self.run(attached, stream, stop).await
    }

    /// Serves an [`attach`](Self::attach)ed link over `stream` (see [`serve`](Self::serve)).
    pub async fn run<S>(
        &self,
        attached: Attached,
        stream: S,
        stop: CancellationToken,
    ) -> Result<(), LinkError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin,
    {
        let Attached { addr, tx, rx } = attached;
        let (reader, writer) = tokio::io::split(stream);
        let result = tokio::select! {
            _ = stop.cancelled() => Ok(()),
            r = self.read_loop(addr, reader) => r,
            r = write_loop(rx, writer) => r,
        };
        // Detach only our own entry: a newer link to the same address may have replaced it.
        {
            let mut out = self.write();
            if out.get(&addr).is_some_and(|t| t.same_channel(&tx)) {
                out.remove(&addr);
            }
            self.count.store(out.len(), Relaxed);
        }
        if let Err(LinkError::Framing(_)) = &result {
            self.stats.framing_errors.fetch_add(1, Relaxed);
        }
        result
    }

    async fn read_loop<R: AsyncRead + Unpin>(
        &self,
        from: SocketAddr,
        mut reader: R,
    ) -> Result<(), LinkError> {
        let mut decoder = Decoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match tokio::time::timeout(LINK_IDLE_TIMEOUT, reader.read(&mut buf)).await {
                Ok(r) => r?,
                Err(_) => return Err(LinkError::Idle(LINK_IDLE_TIMEOUT)),
            };
            if n == 0 {
                return Ok(());
            }
            decoder.push(&buf[..n]);
            while let Some(d) = decoder.next_datagram()? {
                self.stats.datagrams_in.fetch_add(1, Relaxed);
                let inbound = Inbound {
                    from,
                    data: d.to_vec(),
                };
                if self.inbound_tx.send(inbound).await.is_err() {
                    return Ok(());
                }
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>> {
        // A poisoned lock only means a panic elsewhere mid-update of a HashMap whose
        // invariants hold between calls.
        self.out.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>> {
        self.out.write().unwrap_or_else(|p| p.into_inner())
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<Vec<u8>>,
    mut writer: W,
) -> Result<(), LinkError> {
    let mut wbuf = Vec::with_capacity(WRITE_BATCH + dgram::MAX_DATAGRAM);
    loop {
        let Some(first) = rx.recv().await else {
            return Err(LinkError::Replaced);
        };
        wbuf.clear();
        encode_or_skip(&first, &mut wbuf);
        while wbuf.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(d) => encode_or_skip(&d, &mut wbuf),
                Err(_) => break,
            }
        }
        if wbuf.is_empty() {
            continue;
        }
        let write = async {
            writer.write_all(&wbuf).await?;
            writer.flush().await
        };
        match tokio::time::timeout(LINK_WRITE_TIMEOUT, write).await {
            Ok(r) => r?,
            Err(_) => return Err(LinkError::Stalled(LINK_WRITE_TIMEOUT)),
        }
    }
}

/// Our own sockets never produce datagrams the codec refuses (quinn's packets are far below the
/// limit); if one ever did, it is dropped like an oversize UDP datagram.
fn encode_or_skip(d: &[u8], out: &mut Vec<u8>) {
    if let Err(e) = dgram::encode(d, out) {
        tracing::debug!(error = %e, "datagram not sent over the link");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    async fn next(links: &StreamLinks) -> Inbound {
        tokio::time::timeout(Duration::from_secs(5), poll_fn(|cx| links.poll_inbound(cx)))
            .await
            .expect("datagram in time")
            .expect("open")
    }

    #[tokio::test]
    async fn datagrams_cross_a_link_both_ways() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (left, right) = (
            std::sync::Arc::new(StreamLinks::default()),
            std::sync::Arc::new(StreamLinks::default()),
        );
        let (pa, pb): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().expect("addr"),
            "240.0.0.1:1".parse().expect("addr"),
        );
        let stop = CancellationToken::new();
        let (l, s) = (left.clone(), stop.clone());
        let t1 = tokio::spawn(async move { l.serve(pa, a, s).await });
        let (r, s) = (right.clone(), stop.clone());
        let t2 = tokio::spawn(async move { r.serve(pb, b, s).await });
        // Wait for both links to be attached.
        tokio::time::timeout(Duration::from_secs(5), async {
            while !(left.has(pa) && right.has(pb)) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("attached");
        assert!(!left.send("10.0.0.1:1".parse().expect("addr"), b"x", 1));
        // Two segments of a GSO-style transmit arrive as two datagrams.
        assert!(left.send(pa, b"hello world!", 6));
        let d1 = next(&right).await;
        let d2 = next(&right).await;
        assert_eq!((d1.from, &d1.data[..]), (pb, &b"hello "[..]));
        assert_eq!(&d2.data[..], b"world!");
        assert!(right.send(pb, b"back", 1500));
        assert_eq!(&next(&left).await.data[..], b"back");
        stop.cancel();
        t1.await.expect("join").expect("clean end");
        t2.await.expect("join").expect("clean end");
        assert!(left.is_empty() && right.is_empty());
    }

    #[tokio::test]
    async fn a_bad_length_prefix_ends_the_link_with_a_clear_error() {
        let (a, mut b) = tokio::io::duplex(1024);
        let links = StreamLinks::default();
        b.write_all(&[0xff, 0xff, 0, 0]).await.expect("write");
        let e = links
            .serve(
                "240.0.0.2:1".parse().expect("addr"),
                a,
                CancellationToken::new(),
            )
            .await
            .expect_err("framing error");
        assert!(e.to_string().contains("65535"), "{e}");
        assert_eq!(links.stats().framing_errors.load(Relaxed), 1);
        assert!(links.is_empty());
    }

    #[tokio::test]
    async fn a_peer_that_never_reads_costs_a_bounded_queue() {
        // The peer end is kept but never read: writes stall once the pipe is full.
        let (a, _b) = tokio::io::duplex(1024);
        let links = std::sync::Arc::new(StreamLinks::default());
        let addr: SocketAddr = "240.0.0.3:1".parse().expect("addr");
        let l = links.clone();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move { l.serve(addr, a, s).await });
        tokio::time::timeout(Duration::from_secs(5), async {
            while !links.has(addr) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("attached");
        for _ in 0..(WRITE_QUEUE * 3) {
            links.send(addr, &[0x41; 1200], 1200);
        }
        let dropped = links.stats().dropped_full.load(Relaxed);
        assert!(
            dropped >= (WRITE_QUEUE as u64),
            "excess datagrams are dropped, not buffered: {dropped}"
        );
        stop.cancel();
        task.await.expect("join").expect("stopped");
    }
}
