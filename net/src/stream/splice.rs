//! Joins a TCP connection to a QUIC bidirectional stream.
//!
//! Half-close travels both ways (TCP FIN -> `finish()`, stream end -> `shutdown(Write)`), resets
//! travel both ways (TCP RST -> stream reset; stream reset -> TCP RST via `SO_LINGER 0`), and
//! each direction moves through one bounded buffer, so backpressure reaches the sender end to
//! end through QUIC flow control and TCP windows.

use bytes::{Bytes, BytesMut};
use postern_proto::msg::code;
use quinn::{RecvStream, SendStream, VarInt};
use std::io::{self, IoSlice};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Size of the per-direction copy buffer.
pub const CHUNK: usize = 64 * 1024;

/// First size of a splice buffer. An idle stream (the common case in large fleets) holds only
/// this much per direction; a buffer that a read fills grows by doubling up to [`CHUNK`].
const FIRST_CHUNK: usize = 4 * 1024;

/// The next read's size: doubled (up to [`CHUNK`]) when the last read filled what it asked
/// for, since the peer has more ready than that and larger reads and writes pay off.
fn next_chunk(want: usize, filled: bool) -> usize {
    if filled {
        (want * 2).min(CHUNK)
    } else {
        want
    }
}

/// Counters a splice adds its bytes to as they move (chunk by chunk, so a scrape during a long
/// transfer sees it progress). The default counts nothing.
#[derive(Debug, Clone)]
pub struct ByteCounters {
    /// Bytes read from the TCP side and written into the stream.
    pub tcp_to_stream: metrics::Counter,
    /// Bytes read from the stream and written to the TCP side.
    pub stream_to_tcp: metrics::Counter,
}

impl Default for ByteCounters {
    fn default() -> Self {
        Self {
            tcp_to_stream: metrics::Counter::noop(),
            stream_to_tcp: metrics::Counter::noop(),
        }
    }
}

/// How a spliced connection ended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SpliceOutcome {
    /// Bytes from the TCP side into the stream.
    pub up: u64,
    /// Bytes from the stream to the TCP side.
    pub down: u64,
    /// Set when the stream was reset or stopped by the peer, with its error code.
    pub peer_reset: Option<u64>,
    /// Set when the TCP side failed (e.g. reset by the client or target).
    pub tcp_error: Option<String>,
}

enum Dir {
    Done(u64),
    PeerReset(u64, u64),
    TcpFailed(u64, io::Error),
}

async fn tcp_to_stream<R: AsyncRead + Unpin>(
    mut tcp: R,
    send: &mut SendStream,
    counter: &metrics::Counter,
) -> Dir {
    // Each read lands in a buffer of its own that is handed to quinn as is (`write_chunk`), so
    // the bytes are not copied once more into quinn's send buffer; quinn frees it when the peer
    // has acknowledged them.
    let mut want = FIRST_CHUNK;
    let mut buf = BytesMut::new();
    let mut total = 0u64;
    loop {
        buf.reserve(want);
        match tcp.read_buf(&mut buf).await {
            Ok(0) => {
                // Client half-closed: tell the far end, keep reading its answer.
                let _ = send.finish();
                return Dir::Done(total);
            }
            Ok(n) => {
                let filled = n >= want;
                if let Err(e) = send.write_chunk(buf.split().freeze()).await {
                    let code = match e {
                        quinn::WriteError::Stopped(c) => c.into_inner(),
                        _ => u64::from(code::RESET),
                    };
                    return Dir::PeerReset(total, code);
                }
                total += n as u64;
                counter.increment(n as u64);
                want = next_chunk(want, filled);
            }
            Err(e) => {
                let _ = send.reset(VarInt::from_u32(code::RESET));
                return Dir::TcpFailed(total, e);
            }
        }
    }
}

/// Most chunks taken from quinn in one read: a read returns what is ready, one chunk per
/// STREAM frame received (up to one packet's payload each).
const READ_CHUNKS: usize = 32;

async fn stream_to_tcp<W: AsyncWrite + Unpin>(
    recv: &mut RecvStream,
    mut tcp: W,
    counter: &metrics::Counter,
) -> Dir {
    let mut total = 0u64;
    // `read_chunks` hands over every chunk quinn has ready (often many packets' worth) without
    // copying them, and one vectored write gives them to the TCP side together.
    let mut chunks: [Bytes; READ_CHUNKS] = std::array::from_fn(|_| Bytes::new());
    loop {
        match recv.read_chunks(&mut chunks).await {
            Ok(Some(k)) => {
                let n = match write_all_chunks(&mut tcp, &mut chunks[..k]).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = recv.stop(VarInt::from_u32(code::RESET));
                        return Dir::TcpFailed(total, e);
                    }
                };
                total += n as u64;
                counter.increment(n as u64);
            }
            Ok(None) => {
                let _ = tcp.shutdown().await;
                return Dir::Done(total);
            }
            Err(quinn::ReadError::Reset(c)) => return Dir::PeerReset(total, c.into_inner()),
            Err(e) => {
                tracing::debug!(error = %e, "stream ended abnormally");
                return Dir::PeerReset(total, u64::from(code::RESET));
            }
        }
    }
}

/// Writes every chunk to `w` with vectored writes; returns the bytes written. The chunks are
/// consumed (left empty). The slices live on the stack: this runs once per read on the data
/// path.
async fn write_all_chunks<W: AsyncWrite + Unpin>(
    w: &mut W,
    chunks: &mut [Bytes],
) -> io::Result<usize> {
    let mut total = 0;
    for group in chunks.chunks(READ_CHUNKS) {
        let mut storage = [IoSlice::new(&[]); READ_CHUNKS];
        for (slot, chunk) in storage.iter_mut().zip(group) {
            *slot = IoSlice::new(chunk);
        }
        let mut slices = &mut storage[..group.len()];
        total += slices.iter().map(|s| s.len()).sum::<usize>();
        IoSlice::advance_slices(&mut slices, 0);
        while !slices.is_empty() {
            let n = w.write_vectored(slices).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut slices, n);
        }
    }
    chunks.fill(Bytes::new());
    Ok(total)
}

/// Makes closing `tcp` send a RST instead of a FIN.
pub fn set_reset_on_close(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

/// Splices `tcp` and the stream until both directions are done or either side resets.
pub async fn splice(tcp: TcpStream, send: SendStream, recv: RecvStream) -> SpliceOutcome {
    splice_counted(tcp, send, recv, &ByteCounters::default()).await
}

/// [`splice`], adding the bytes to `counters` as they move.
pub async fn splice_counted(
    mut tcp: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    counters: &ByteCounters,
) -> SpliceOutcome {
    let _ = tcp.set_nodelay(true);
    let (r, w) = tcp.split();
    let out = splice_halves(r, w, &mut send, &mut recv, counters).await;
    if out.peer_reset.is_some() {
        set_reset_on_close(&tcp);
    }
    release_when_acked(send, &out);
    out
}

/// Hands a cleanly finished send stream to a small task that holds it until the peer has
/// acknowledged everything, or stops it. quinn keeps retransmitting a finished stream's
/// unacknowledged data after the `SendStream` is dropped, and a STOP_SENDING that arrives after
/// the drop is never acted on: on a slow or lossy path, a download whose client died kept
/// crossing the link for a minute after both ends had closed the stream. Held here, a
/// STOP_SENDING resets the stream and quinn drops its buffered data at once.
fn release_when_acked(send: SendStream, out: &SpliceOutcome) {
    if out.peer_reset.is_some() || out.tcp_error.is_some() {
        return; // already reset by the splice
    }
    hold_until_acked(send);
}

/// Keeps a finished send stream until the peer acknowledged it all or stopped it (then resets
/// it, so quinn stops retransmitting); see [`release_when_acked`]. For streams written by
/// something other than a splice (e.g. the HTTP proxy) once they are done.
pub fn hold_until_acked(mut send: SendStream) {
    tokio::spawn(async move {
        if let Ok(Some(code)) = send.stopped().await {
            let _ = send.reset(code);
        }
    });
}

/// A send stream for writers that take the stream and drop it when done (the HTTP proxy,
/// through `tokio::io::join`): dropped, it is finished and handed to [`hold_until_acked`], so a
/// STOP_SENDING that arrives afterwards still resets it, as it does for a splice.
pub struct HeldSend(Option<SendStream>);

impl HeldSend {
    pub fn new(send: SendStream) -> Self {
        Self(Some(send))
    }

    fn inner(&mut self) -> io::Result<&mut SendStream> {
        self.0
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "send stream released"))
    }
}

impl AsyncWrite for HeldSend {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.inner() {
            Ok(s) => AsyncWrite::poll_write(std::pin::Pin::new(s), cx, buf),
            Err(e) => std::task::Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.inner() {
            Ok(s) => AsyncWrite::poll_flush(std::pin::Pin::new(s), cx),
            Err(e) => std::task::Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.inner() {
            Ok(s) => AsyncWrite::poll_shutdown(std::pin::Pin::new(s), cx),
            Err(e) => std::task::Poll::Ready(Err(e)),
        }
    }
}

impl Drop for HeldSend {
    fn drop(&mut self) {
        let Some(mut send) = self.0.take() else {
            return;
        };
        // What quinn does when a stream is dropped unfinished; an error means it was finished
        // or reset already.
        let _ = send.finish();
        // Outside a runtime (only at process exit) there is nothing left to hold it for.
        if tokio::runtime::Handle::try_current().is_ok() {
            hold_until_acked(send);
        }
    }
}

/// Splices any byte stream (e.g. a TLS connection to a target) and the QUIC stream.
pub async fn splice_io<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    send: SendStream,
    recv: RecvStream,
) -> SpliceOutcome {
    splice_io_counted(io, send, recv, &ByteCounters::default()).await
}

/// [`splice_io`], adding the bytes to `counters` as they move.
pub async fn splice_io_counted<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    mut send: SendStream,
    mut recv: RecvStream,
    counters: &ByteCounters,
) -> SpliceOutcome {
    let (r, w) = tokio::io::split(io);
    let out = splice_halves(r, w, &mut send, &mut recv, counters).await;
    release_when_acked(send, &out);
    out
}

async fn splice_halves<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    tcp_r: R,
    tcp_w: W,
    send: &mut SendStream,
    recv: &mut RecvStream,
    counters: &ByteCounters,
) -> SpliceOutcome {
    let mut out = SpliceOutcome::default();
    let abort = {
        let up = tcp_to_stream(tcp_r, send, &counters.tcp_to_stream);
        let down = stream_to_tcp(recv, tcp_w, &counters.stream_to_tcp);
        tokio::pin!(up, down);
        let mut up_done = false;
        let mut down_done = false;
        let mut abort = false;
        while !(up_done && down_done) {
            let (res, is_up) = tokio::select! {
                r = &mut up, if !up_done => (r, true),
                r = &mut down, if !down_done => (r, false),
            };
            let bytes = match &res {
                Dir::Done(b) | Dir::PeerReset(b, _) | Dir::TcpFailed(b, _) => *b,
            };
            if is_up {
                up_done = true;
                out.up = bytes;
            } else {
                down_done = true;
                out.down = bytes;
            }
            match res {
                Dir::Done(_) => {}
                Dir::PeerReset(_, c) => {
                    out.peer_reset = Some(c);
                    abort = true;
                    break;
                }
                Dir::TcpFailed(_, e) => {
                    out.tcp_error = Some(e.to_string());
                    abort = true;
                    break;
                }
            }
        }
        abort
    };
    if abort {
        // Whatever direction is still open ends now, with a reset rather than a clean end.
        let _ = send.reset(VarInt::from_u32(code::RESET));
        let _ = recv.stop(VarInt::from_u32(code::RESET));
    }
    out
}

/// A byte stream that adds what is read from it and written to it to two counters, as it
/// happens (for streams that are not spliced, e.g. the inlet's HTTP filter).
pub struct Counted<S> {
    inner: S,
    read: metrics::Counter,
    written: metrics::Counter,
}

impl<S> Counted<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, read: metrics::Counter, written: metrics::Counter) -> Self {
        Self {
            inner,
            read,
            written,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.read.increment(n as u64);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let res = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &res {
            self.written.increment(*n as u64);
        }
        res
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod buffer_tests {
    use super::*;

    #[test]
    fn reads_start_small_and_grow_only_when_filled() {
        let mut want = FIRST_CHUNK;
        want = next_chunk(want, false);
        assert_eq!(
            want, FIRST_CHUNK,
            "a partial read does not grow the next one"
        );
        let mut sizes = Vec::new();
        for _ in 0..10 {
            want = next_chunk(want, true);
            sizes.push(want);
        }
        assert_eq!(sizes[..4], [8 * 1024, 16 * 1024, 32 * 1024, CHUNK]);
        assert!(
            sizes.iter().all(|&s| s <= CHUNK),
            "never beyond CHUNK: {sizes:?}"
        );
    }

    /// A writer that takes at most `max` bytes per call, to exercise partial vectored writes.
    struct Trickle {
        got: Vec<u8>,
        max: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let n = buf.len().min(self.max);
            self.got.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.max - n);
                self.got.extend_from_slice(&b[..take]);
                n += take;
                if n == self.max {
                    break;
                }
            }
            std::task::Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn chunks_are_written_whole_and_in_order_through_partial_writes() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for max in [1, 7, 100, 4096, 20_000] {
            let mut chunks: Vec<Bytes> = [0, 1, 1000, 1000, 0, 3000, 5000]
                .windows(2)
                .map(|w| Bytes::copy_from_slice(&data[w[0].min(w[1])..w[1].max(w[0])]))
                .collect();
            chunks.push(Bytes::copy_from_slice(&data[5000..]));
            let want: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
            let mut w = Trickle {
                got: Vec::new(),
                max,
            };
            let n = write_all_chunks(&mut w, &mut chunks).await.expect("write");
            assert_eq!(n, want.len(), "max {max}");
            assert_eq!(w.got, want, "max {max}");
            assert!(chunks.iter().all(|c| c.is_empty()), "chunks consumed");
        }
    }
}
