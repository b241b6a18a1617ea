//! Serves one client connection through the HTTP/1.1 request filter: the inlet's local
//! listeners, the outlet's enforcement of leased credentials and the outlet's public hostname
//! share it.
//!
//! The sans-IO [`postern_proto::http::RequestFilter`] decides what the client's bytes are; this
//! module does the I/O around it. Two directions run concurrently on the caller's task:
//!
//! * client -> upstream: bytes go through the filter; a [`Gate`] decides for every request head
//!   whether it goes on and with which credential (the inlet's gate is its lease, the outlet's
//!   gates check the peer's lease or inject it, and the public gate also checks the client's
//!   access grant); every head is re-serialized with the credential current at that moment (so a
//!   lease rotation applies from the next request on and no request fails because of it); bodies
//!   pass unchanged. A WebSocket upgrade pauses this direction until the server has answered it;
//!   only a `101` turns the rest of the connection into an opaque tunnel.
//! * upstream -> client: bytes are copied unchanged; a
//!   [`postern_proto::http::response::ResponseTracker`] follows their framing to find the
//!   server's answer to an upgrade.
//!
//! Everything written to the client goes through the second direction, which also writes the
//! responses the proxy makes itself (400, 403, 408, 501, 502, 503). That keeps those responses
//! behind the server's responses to earlier pipelined requests instead of interleaving with them.
//!
//! The upstream is opened lazily: only once the first request head has parsed cleanly and the
//! gate let it through, so a malformed request or a client without a credential never reaches
//! the server. Buffers are bounded (64 KiB, or the head limit if larger), so a fast client is
//! slowed down by a slow server and the other way round. A request head must arrive whole within
//! [`ProxyOptions::head_timeout`] of its first byte (slowloris), and a connection with no request
//! in flight is closed after [`ProxyOptions::idle_timeout`].

use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use postern_proto::http::response::{Expect, ResponseTracker, UpgradeAnswer};
use postern_proto::http::{
    error_response, json_error_response, FilterConfig, HttpError, RequestFilter, RequestHead, Step,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Size of each direction's buffer (raised to the filter's head limit when that is larger: a
/// whole head must fit).
pub const BUF_LEN: usize = 64 * 1024;

/// After the proxy refuses a request, how long the server's responses to earlier requests may
/// take to reach the client before the connection is closed, and how long the client's further
/// input is read and discarded (closing a TCP socket with unread input sends a reset, which can
/// destroy the error response before the client reads it).
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// How long opening the upstream stream may take before the client gets a 502.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// Default [`ProxyOptions::head_timeout`].
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Default [`ProxyOptions::idle_timeout`].
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// How one proxied connection behaves.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// The request filter's limits and whether it strips `u`/`p` query credentials.
    pub filter: FilterConfig,
    /// Who speaks in the responses the proxy makes itself ("postern inlet", "postern outlet").
    pub name: &'static str,
    /// Longest time from the first byte of a request head to its end. A client trickling a head
    /// (slowloris) gets a 408 and is closed.
    pub head_timeout: Duration,
    /// Longest time a connection may wait for its next request while no response is due (a
    /// keep-alive connection left idle, or a connection that never sends a request).
    pub idle_timeout: Duration,
}

impl ProxyOptions {
    /// Options for `name` with the default limits and timeouts.
    pub fn new(name: &'static str, filter: FilterConfig) -> Self {
        ProxyOptions {
            filter,
            name,
            head_timeout: HEAD_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

/// What to do with one request head.
pub enum Verdict {
    /// Forward it, with this `Authorization` value (`None`: with none; the client's own is
    /// removed either way).
    Forward { authorization: Option<String> },
    /// No credential can be had: answer 503 with `reason` (never a secret) and close.
    NoLease { reason: String },
    /// Answer the request here with `response` (a complete HTTP response, e.g. a 403 page or a
    /// redirect) and close; `reason` is for logs.
    Answer { response: Vec<u8>, reason: String },
}

/// Decides, request by request, what goes to the upstream and with which credential.
pub trait Gate: Send {
    /// Looks at one accepted request head (the client's credentials already taken out, the one
    /// it presented still readable with [`RequestHead::presented_authorization`]); may edit it
    /// before it is forwarded (e.g. take out a cookie meant for the gate).
    fn check(&mut self, head: &mut RequestHead) -> impl Future<Output = Verdict> + Send;

    /// Cancelled when what let this connection's requests through is withdrawn (an access
    /// grant revoked): the proxy then closes the connection at once, an upgraded one (a
    /// WebSocket, which sends no more requests to check) included. `None`: never.
    fn withdrawn(&self) -> Option<tokio_util::sync::CancellationToken> {
        None
    }
}

/// Counters of one proxied connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Request heads forwarded.
    pub requests: u64,
    /// Bytes written to the upstream (rewritten heads, bodies, tunnel bytes).
    pub bytes_up: u64,
    /// Bytes copied from the upstream to the client.
    pub bytes_down: u64,
    /// Whether the connection became an opaque tunnel (the server switched to WebSocket).
    pub tunneled: bool,
}

/// Why a proxied connection ended abnormally. Where the client could still be answered it was
/// sent a response saying so (unless it went away first).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The client sent a malformed, ambiguous or unsupported request; it got a 400 or 501.
    #[error("refused a request: {0}")]
    BadRequest(#[source] HttpError),
    /// A request head did not arrive whole in time; the client got a 408.
    #[error("request head not complete within {0:?}")]
    HeadTimeout(Duration),
    /// No valid credential was held when a request had to be forwarded; the client got a 503.
    #[error("no valid lease held: {reason}")]
    NoLease { reason: String },
    /// The gate answered a request itself (e.g. 403 without an access grant or with a
    /// credential that is not the peer's lease); the connection was closed after that answer.
    #[error("answered by the gate: {reason}")]
    Answered { reason: String },
    /// The upstream could not be opened; the client got a 502.
    #[error("cannot open the upstream: {0}")]
    UpstreamUnavailable(#[source] io::Error),
    /// The server's responses could not be followed, so an upgrade could not be decided.
    #[error("cannot follow the server's responses: {0}")]
    UpstreamProtocol(String),
    /// Reading from or writing to the client failed.
    #[error("client connection: {0}")]
    Client(#[source] io::Error),
    /// Reading from or writing to the upstream failed.
    #[error("upstream connection: {0}")]
    Upstream(#[source] io::Error),
    /// The gate withdrew what let the connection in (e.g. its access grant was revoked); the
    /// connection, tunnel included, was closed.
    #[error("closed: its access was withdrawn")]
    Withdrawn,
}

/// Serves one client connection: requests go through the filter and the `gate` to a lazily
/// opened upstream, responses come back unchanged. Returns when both directions are done (each
/// side's EOF is passed on as a write shutdown to the other).
///
/// On a malformed request the upstream's write side is shut down, the responses to earlier
/// requests are let through for up to [`DRAIN_DEADLINE`], then the client gets a 400 and the
/// connection is closed. Without a credential when a head must be forwarded, the same happens
/// with a 503. Neither header values nor credentials are ever logged.
pub async fn proxy<C, U, F, Fut, G>(
    client: C,
    open_upstream: F,
    gate: G,
    opts: ProxyOptions,
) -> Result<ProxyStats, ProxyError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce() -> Fut,
    Fut: Future<Output = io::Result<U>>,
    U: AsyncRead + AsyncWrite + Unpin,
    G: Gate,
{
    let withdrawn = gate.withdrawn();
    let (client_r, client_w) = tokio::io::split(client);
    // At most two events: the upstream opened, then a refusal.
    let (events_tx, events_rx) = mpsc::channel(2);
    let (closed_tx, closed_rx) = watch::channel(false);
    // At most one upgrade waits for its answer at a time.
    let (answers_tx, answers_rx) = mpsc::channel(1);
    let tracker = Arc::new(Mutex::new(ResponseTracker::new(
        opts.filter.max_head_len.max(BUF_LEN),
    )));
    let up = Upstreamward {
        filter: RequestFilter::new(opts.filter.clone()),
        gate,
        open: Some(open_upstream),
        upstream: None,
        events: events_tx,
        upstream_closed: closed_rx,
        tracker: tracker.clone(),
        answers: answers_rx,
        opts,
        stats: ProxyStats::default(),
    };
    let down = Downstream {
        tracker,
        answers: answers_tx,
    };
    let both =
        async { tokio::try_join!(up.run(client_r), down.run(client_w, events_rx, closed_tx)) };
    let (up, down) = match withdrawn {
        None => both.await?,
        Some(w) => tokio::select! {
            r = both => r?,
            // Dropping both directions closes the client and the upstream.
            _ = w.cancelled() => return Err(ProxyError::Withdrawn),
        },
    };
    let (outcome, mut stats) = up;
    stats.bytes_down = down;
    match outcome {
        Outcome::Done => Ok(stats),
        Outcome::Failed(e) => Err(e),
    }
}

/// Messages from the client->upstream direction to the upstream->client one.
enum Event<R> {
    /// The upstream was opened: copy its responses to the client.
    Opened(R),
    /// A request was refused: after the earlier responses, send this response and close.
    Refuse(Vec<u8>),
}

/// The server's answer to an upgrade, as the upstream->client direction saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Upgrade(UpgradeAnswer),
    /// The responses could not be followed (malformed), so no answer can be trusted.
    Lost(String),
}

/// How the client->upstream direction ended, when the other direction must still finish.
enum Outcome {
    Done,
    Failed(ProxyError),
}

fn lock(t: &Mutex<ResponseTracker>) -> MutexGuard<'_, ResponseTracker> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the client->upstream direction waits for when it reads.
enum Waiting {
    /// Nothing in flight: the idle timeout applies.
    Idle,
    /// Part of a head has arrived: it must be complete by then.
    Head(Instant),
    /// Inside a body or a tunnel: no deadline (bodies may stream slowly).
    Body,
}

/// The client->upstream direction.
struct Upstreamward<F, U, G> {
    filter: RequestFilter,
    gate: G,
    open: Option<F>,
    upstream: Option<WriteHalf<U>>,
    events: mpsc::Sender<Event<ReadHalf<U>>>,
    /// Becomes true (or its sender goes away) once nothing more comes from the upstream.
    upstream_closed: watch::Receiver<bool>,
    tracker: Arc<Mutex<ResponseTracker>>,
    answers: mpsc::Receiver<Answer>,
    opts: ProxyOptions,
    stats: ProxyStats,
}

impl<F, Fut, U, G> Upstreamward<F, U, G>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = io::Result<U>>,
    U: AsyncRead + AsyncWrite + Unpin,
    G: Gate,
{
    async fn run<R: AsyncRead + Unpin>(
        mut self,
        mut client: R,
    ) -> Result<(Outcome, ProxyStats), ProxyError> {
        let cap = BUF_LEN.max(self.filter.config().max_head_len);
        let mut buf = BytesMut::with_capacity(cap);
        let mut head_out = Vec::new();
        // When the first byte of the head being read arrived.
        let mut head_started: Option<Instant> = None;
        let outcome = loop {
            let step = match self.filter.step(&buf) {
                Ok(step) => step,
                Err(e) => break self.refuse_bad_request(e, &mut client, &mut buf).await,
            };
            match step {
                Step::NeedMore => {
                    if buf.len() >= cap {
                        // The filter's limits keep this from happening; refuse rather than spin.
                        let e = HttpError::HeadTooLarge {
                            limit: self.filter.config().max_head_len,
                        };
                        break self.refuse_bad_request(e, &mut client, &mut buf).await;
                    }
                    let waiting = if !self.filter.between_requests() {
                        Waiting::Body
                    } else if buf.is_empty() {
                        head_started = None;
                        Waiting::Idle
                    } else {
                        Waiting::Head(
                            *head_started.get_or_insert_with(Instant::now) + self.opts.head_timeout,
                        )
                    };
                    match self.read(&mut client, &mut buf, cap, waiting).await {
                        Read::Data => {}
                        Read::Eof => {
                            if !buf.is_empty() || !self.filter.between_requests() {
                                tracing::debug!(
                                    "client closed its side in the middle of a request"
                                );
                            }
                            break self.finish().await;
                        }
                        Read::Failed(e) => return Err(ProxyError::Client(e)),
                        Read::UpstreamClosed => {
                            tracing::debug!("upstream closed while the client was idle");
                            break self.finish().await;
                        }
                        Read::Idle => {
                            tracing::debug!(timeout = ?self.opts.idle_timeout, "closing an idle client connection");
                            break self.finish().await;
                        }
                        Read::HeadTimeout => break self.refuse_slow(&mut client, &mut buf).await,
                    }
                }
                Step::Head { mut head, consumed } => {
                    head_started = None;
                    if head.is_upgrade() && lock(&self.tracker).failure().is_some() {
                        let e = "an earlier response could not be followed".to_owned();
                        break self.refuse_lost(e, &mut client, &mut buf).await;
                    }
                    let authorization = match self.gate.check(&mut head).await {
                        Verdict::Forward { authorization } => Ok(authorization),
                        Verdict::NoLease { reason } => Err(reason),
                        Verdict::Answer { response, reason } => {
                            break self.answer(response, reason, &mut client, &mut buf).await;
                        }
                    };
                    head_out.clear();
                    let unusable = match authorization {
                        Err(reason) => Some(reason),
                        Ok(None) => {
                            head.write_to(&mut head_out);
                            None
                        }
                        Ok(Some(a)) => head
                            .write_with_authorization(&a, &mut head_out)
                            .err()
                            .map(|_| "the leased credential cannot be sent in a header".to_owned()),
                    };
                    if let Some(reason) = unusable {
                        break self.refuse_no_lease(reason, &mut client, &mut buf).await;
                    }
                    tracing::debug!(
                        method = head.method(),
                        path = head.path(),
                        removed_credentials = head.removed_credentials(),
                        "forwarding request"
                    );
                    if self.upstream.is_none() {
                        if let Err(e) = self.open_upstream().await {
                            break self.refuse_unreachable(e, &mut client, &mut buf).await;
                        }
                    }
                    // Announced before any byte goes out, so that its answer cannot come first.
                    lock(&self.tracker).expect(if head.is_upgrade() {
                        Expect::Upgrade
                    } else if head.method() == "HEAD" {
                        Expect::Head
                    } else {
                        Expect::Normal
                    });
                    let sent = self.send(&head_out).await;
                    head_out.clear();
                    if let Err(e) = sent {
                        break Outcome::Failed(e);
                    }
                    self.stats.requests += 1;
                    buf.advance(consumed);
                }
                Step::Body { len } => {
                    if let Err(e) = self.send(&buf[..len]).await {
                        break Outcome::Failed(e);
                    }
                    buf.advance(len);
                }
                Step::AwaitUpgrade => match self.answers.recv().await {
                    Some(Answer::Upgrade(UpgradeAnswer::Switched)) => {
                        tracing::debug!("server switched protocols");
                        self.filter.upgrade_answered(true);
                    }
                    Some(Answer::Upgrade(UpgradeAnswer::Refused)) => {
                        tracing::debug!("server did not switch protocols; filtering goes on");
                        self.filter.upgrade_answered(false);
                    }
                    Some(Answer::Lost(e)) => {
                        break self.refuse_lost(e, &mut client, &mut buf).await;
                    }
                    // The upstream ended without answering.
                    None => break self.finish().await,
                },
                Step::Opaque => {
                    self.stats.tunneled = true;
                    tracing::debug!("switching to opaque passthrough");
                    break self.tunnel(&mut client, &mut buf, cap).await?;
                }
            }
        };
        Ok((outcome, self.stats))
    }

    /// Reads once from the client, within the deadline that applies.
    async fn read<R: AsyncRead + Unpin>(
        &mut self,
        client: &mut R,
        buf: &mut BytesMut,
        cap: usize,
        waiting: Waiting,
    ) -> Read {
        let result = |r: io::Result<usize>| match r {
            Ok(0) => Read::Eof,
            Ok(_) => Read::Data,
            Err(e) => Read::Failed(e),
        };
        match waiting {
            Waiting::Body => result(read_more(client, buf, cap).await),
            Waiting::Head(deadline) => tokio::select! {
                r = read_more(client, buf, cap) => result(r),
                _ = tokio::time::sleep_until(deadline) => Read::HeadTimeout,
            },
            Waiting::Idle => loop {
                // Between requests, a closed upstream ends the connection: the server (e.g.
                // after `Connection: close` or an idle timeout) will answer nothing more, and a
                // keep-alive client would otherwise hold us open.
                let open = self.upstream.is_some();
                let closed = self.upstream_closed.clone();
                let upstream_gone = async move {
                    let mut closed = closed;
                    if open {
                        let _ = closed.wait_for(|c| *c).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    r = read_more(client, buf, cap) => return result(r),
                    () = upstream_gone => return Read::UpstreamClosed,
                    _ = tokio::time::sleep(self.opts.idle_timeout) => {
                        // Idle only counts while no response is due: a long query may stream
                        // its answer for minutes while the client sends nothing.
                        let due = lock(&self.tracker).pending();
                        if due == 0 {
                            return Read::Idle;
                        }
                    }
                }
            },
        }
    }

    /// Opens the upstream and hands its read side to the other direction.
    async fn open_upstream(&mut self) -> io::Result<()> {
        let open = self
            .open
            .take()
            .ok_or_else(|| io::Error::other("upstream already opened"))?;
        let stream = tokio::time::timeout(OPEN_TIMEOUT, open())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "opening the upstream"))??;
        let (r, w) = tokio::io::split(stream);
        self.upstream = Some(w);
        // The receiver only goes away when the other direction failed, which ends us too.
        let _ = self.events.send(Event::Opened(r)).await;
        tracing::debug!("upstream opened");
        Ok(())
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), ProxyError> {
        let up = self
            .upstream
            .as_mut()
            .ok_or_else(|| ProxyError::Upstream(io::Error::other("upstream not open")))?;
        up.write_all(bytes).await.map_err(ProxyError::Upstream)?;
        self.stats.bytes_up += bytes.len() as u64;
        Ok(())
    }

    /// After the server switched protocols: everything else the client sends goes up unchanged.
    async fn tunnel<R: AsyncRead + Unpin>(
        &mut self,
        client: &mut R,
        buf: &mut BytesMut,
        cap: usize,
    ) -> Result<Outcome, ProxyError> {
        loop {
            if !buf.is_empty() {
                if let Err(e) = self.send(buf).await {
                    return Ok(Outcome::Failed(e));
                }
                buf.clear();
            }
            let n = read_more(client, buf, cap)
                .await
                .map_err(ProxyError::Client)?;
            if n == 0 {
                return Ok(self.finish().await);
            }
        }
    }

    /// Client EOF: pass it on as a write shutdown.
    async fn finish(&mut self) -> Outcome {
        if let Some(up) = self.upstream.as_mut() {
            if let Err(e) = up.shutdown().await {
                tracing::debug!(error = %e, "shutting down the upstream's write side failed");
            }
        }
        Outcome::Done
    }

    async fn refuse_bad_request<R: AsyncRead + Unpin>(
        &mut self,
        e: HttpError,
        client: &mut R,
        buf: &mut BytesMut,
    ) -> Outcome {
        tracing::warn!(error = %e, "refusing a request");
        let (status, reason) = e.status();
        let response = error_response(
            status,
            reason,
            &format!("{} refused the request: {e}", self.opts.name),
        );
        self.refuse(response, client, buf).await;
        Outcome::Failed(ProxyError::BadRequest(e))
    }

    async fn refuse_slow<R: AsyncRead + Unpin>(
        &mut self,
        client: &mut R,
        buf: &mut BytesMut,
    ) -> Outcome {
        let limit = self.opts.head_timeout;
        tracing::info!(timeout = ?limit, "request head not complete in time; closing");
        let response = error_response(
            408,
            "Request Timeout",
            &format!(
                "{}: the request head did not arrive within {} s",
                self.opts.name,
                limit.as_secs_f32()
            ),
        );
        self.refuse(response, client, buf).await;
        Outcome::Failed(ProxyError::HeadTimeout(limit))
    }

    async fn refuse_no_lease<R: AsyncRead + Unpin>(
        &mut self,
        reason: String,
        client: &mut R,
        buf: &mut BytesMut,
    ) -> Outcome {
        tracing::warn!(%reason, "no valid lease held, answering 503");
        let response = json_error_response(
            503,
            "Service Unavailable",
            &format!(
                "{} holds no valid lease for this service: {reason}",
                self.opts.name
            ),
        );
        self.refuse(response, client, buf).await;
        Outcome::Failed(ProxyError::NoLease { reason })
    }

    async fn refuse_lost<R: AsyncRead + Unpin>(
        &mut self,
        reason: String,
        client: &mut R,
        buf: &mut BytesMut,
    ) -> Outcome {
        tracing::warn!(%reason, "cannot tell how the server answered an upgrade; closing");
        let response = error_response(
            502,
            "Bad Gateway",
            &format!(
                "{} cannot follow the service's responses, so it cannot switch protocols",
                self.opts.name
            ),
        );
        self.refuse(response, client, buf).await;
        Outcome::Failed(ProxyError::UpstreamProtocol(reason))
    }

    async fn answer<R: AsyncRead + Unpin>(
        &mut self,
        response: Vec<u8>,
        reason: String,
        client: &mut R,
        buf: &mut BytesMut,
    ) -> Outcome {
        tracing::info!(%reason, "request answered by the gate");
        self.refuse(response, client, buf).await;
        Outcome::Failed(ProxyError::Answered { reason })
    }

    async fn refuse_unreachable<R: AsyncRead + Unpin>(
        &mut self,
        e: io::Error,
        client: &mut R,
        buf: &mut BytesMut,
    ) -> Outcome {
        tracing::warn!(error = %e, "cannot open the upstream, answering 502");
        let response = error_response(
            502,
            "Bad Gateway",
            &format!("{} cannot reach the service", self.opts.name),
        );
        self.refuse(response, client, buf).await;
        Outcome::Failed(ProxyError::UpstreamUnavailable(e))
    }

    /// Stops sending upstream, has the other direction send `response` after the earlier
    /// responses, and discards what the client still sends for a while (see [`DRAIN_DEADLINE`]).
    async fn refuse<R: AsyncRead + Unpin>(
        &mut self,
        response: Vec<u8>,
        client: &mut R,
        buf: &mut BytesMut,
    ) {
        // Queue the refusal before shutting the upstream down, so that the other direction knows
        // about it by the time it sees the upstream's EOF.
        let _ = self.events.send(Event::Refuse(response)).await;
        self.finish().await;
        let discard = async {
            loop {
                buf.clear();
                match read_more(client, buf, BUF_LEN).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_DEADLINE, discard).await;
    }
}

/// How one read from the client went.
enum Read {
    Data,
    Eof,
    Failed(io::Error),
    UpstreamClosed,
    Idle,
    HeadTimeout,
}

/// Reads once into `buf`, never letting it grow past `cap` bytes.
async fn read_more<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    cap: usize,
) -> io::Result<usize> {
    let room = cap.saturating_sub(buf.len());
    buf.reserve(room);
    (&mut *r).take(room as u64).read_buf(buf).await
}

/// The upstream->client direction.
struct Downstream {
    tracker: Arc<Mutex<ResponseTracker>>,
    answers: mpsc::Sender<Answer>,
}

impl Downstream {
    /// Waits for the upstream to be opened (or a refusal before that), copies responses, and
    /// sends the proxy's own response when a request was refused. Returns the number of bytes
    /// copied from the upstream.
    async fn run<W, U>(
        self,
        mut client: W,
        mut events: mpsc::Receiver<Event<ReadHalf<U>>>,
        upstream_closed: watch::Sender<bool>,
    ) -> Result<u64, ProxyError>
    where
        W: AsyncWrite + Unpin,
        U: AsyncRead + AsyncWrite + Unpin,
    {
        let mut copied = 0u64;
        let refusal = match events.recv().await {
            // The client went away before sending a request.
            None => None,
            Some(Event::Refuse(response)) => Some(response),
            Some(Event::Opened(mut upstream)) => {
                let copy = self.copy_down(&mut upstream, &mut client, &mut copied);
                tokio::pin!(copy);
                tokio::select! {
                    res = &mut copy => {
                        res?;
                        // The refusal, if any, was queued before the upstream was shut down.
                        match events.try_recv() {
                            Ok(Event::Refuse(response)) => Some(response),
                            _ => None,
                        }
                    }
                    ev = events.recv() => match ev {
                        Some(Event::Refuse(response)) => {
                            match tokio::time::timeout(DRAIN_DEADLINE, &mut copy).await {
                                Ok(res) => {
                                    res?;
                                    Some(response)
                                }
                                Err(_) => {
                                    // We may be in the middle of a response: appending ours would
                                    // only garble it. Just close.
                                    tracing::warn!("upstream did not finish its responses in time");
                                    None
                                }
                            }
                        }
                        _ => {
                            copy.await?;
                            None
                        }
                    }
                }
            }
        };
        upstream_closed.send_replace(true);
        if let Some(response) = refusal {
            client
                .write_all(&response)
                .await
                .map_err(ProxyError::Client)?;
        }
        if let Err(e) = client.shutdown().await {
            tracing::debug!(error = %e, "shutting down the client's write side failed");
        }
        Ok(copied)
    }

    /// Copies until the upstream's EOF, following the responses' framing on the way.
    async fn copy_down<R, W>(
        &self,
        upstream: &mut R,
        client: &mut W,
        copied: &mut u64,
    ) -> Result<(), ProxyError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut buf = vec![0u8; BUF_LEN];
        // Once the stream is opaque or cannot be followed, looking at it is pointless.
        let mut follow = true;
        loop {
            let n = upstream
                .read(&mut buf)
                .await
                .map_err(ProxyError::Upstream)?;
            if n == 0 {
                return Ok(());
            }
            let answer = if follow {
                let mut t = lock(&self.tracker);
                match t.feed(&buf[..n]) {
                    Ok(a) => {
                        follow = !t.is_opaque();
                        a.map(Answer::Upgrade)
                    }
                    Err(e) => {
                        follow = false;
                        tracing::warn!(error = %e, "cannot follow the service's responses");
                        t.pending_upgrade().then(|| Answer::Lost(e.to_string()))
                    }
                }
            } else {
                None
            };
            client
                .write_all(&buf[..n])
                .await
                .map_err(ProxyError::Client)?;
            *copied += n as u64;
            if let Some(a) = answer {
                // Sent after the bytes reached the client, so the client has the 101 before any
                // of its tunnel bytes can go up. Capacity 1 and one upgrade at a time: never
                // blocks for long.
                let _ = self.answers.send(a).await;
            }
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use postern_proto::lease::Credential;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader, DuplexStream};
    use tokio::net::{TcpListener, TcpStream};

    /// One request as the fake server received it.
    #[derive(Debug, Clone)]
    struct Seen {
        head: String,
        body: Vec<u8>,
    }

    impl Seen {
        fn headers(&self, name: &str) -> Vec<String> {
            self.head
                .split("\r\n")
                .skip(1)
                .filter_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                })
                .collect()
        }

        fn request_line(&self) -> &str {
            self.head.split("\r\n").next().unwrap_or_default()
        }
    }

    type Log = Arc<Mutex<Vec<Seen>>>;

    fn header_of(head: &str, name: &str) -> Option<String> {
        head.split("\r\n").skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    async fn read_head<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<Option<String>> {
        let mut head = Vec::new();
        loop {
            let mut line = Vec::new();
            if r.read_until(b'\n', &mut line).await? == 0 {
                if head.is_empty() {
                    return Ok(None);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let end = line == b"\r\n";
            head.extend_from_slice(&line);
            if end {
                return String::from_utf8(head)
                    .map(Some)
                    .map_err(|_| io::ErrorKind::InvalidData.into());
            }
        }
    }

    /// A tiny HTTP/1.1 server that records what it receives. Answers each request with a 200
    /// whose body names the request's number and `Authorization`; answers `Expect:
    /// 100-continue` with a 100 first; answers `Upgrade` with a 101 and then echoes raw bytes.
    /// Closes when the client shuts down its write side, as real servers do.
    async fn fake_server<S: AsyncRead + AsyncWrite + Unpin>(s: S, log: Log) -> io::Result<()> {
        let (r, mut w) = tokio::io::split(s);
        let mut r = BufReader::new(r);
        loop {
            let Some(head) = read_head(&mut r).await? else {
                w.shutdown().await?;
                return Ok(());
            };
            if header_of(&head, "expect").as_deref() == Some("100-continue") {
                w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
            }
            let mut body = Vec::new();
            if let Some(cl) = header_of(&head, "content-length") {
                let n: usize = cl.parse().map_err(|_| io::ErrorKind::InvalidData)?;
                body.resize(n, 0);
                r.read_exact(&mut body).await?;
            } else if header_of(&head, "transfer-encoding").is_some() {
                loop {
                    let mut line = String::new();
                    r.read_line(&mut line).await?;
                    let size = line.trim_end().split(';').next().unwrap_or_default();
                    let size =
                        usize::from_str_radix(size, 16).map_err(|_| io::ErrorKind::InvalidData)?;
                    if size == 0 {
                        while read_head_line(&mut r).await? != "\r\n" {}
                        break;
                    }
                    let mut chunk = vec![0; size + 2];
                    r.read_exact(&mut chunk).await?;
                    body.extend_from_slice(&chunk[..size]);
                }
            }
            let auth = header_of(&head, "authorization");
            let n = {
                let mut log = log.lock().unwrap();
                log.push(Seen {
                    head: head.clone(),
                    body,
                });
                log.len()
            };
            // `/no-ws` plays a server that ignores upgrades and answers normally.
            if header_of(&head, "upgrade").is_some() && !head.starts_with("GET /no-ws ") {
                w.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: test\r\nConnection: Upgrade\r\n\r\n")
                    .await?;
                tokio::io::copy(&mut r, &mut w).await?;
                w.shutdown().await?;
                return Ok(());
            }
            let text = format!("response {n} auth={}", auth.unwrap_or_default());
            w.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                    text.len()
                )
                .as_bytes(),
            )
            .await?;
            if header_of(&head, "connection").as_deref() == Some("close") {
                w.shutdown().await?;
                return Ok(());
            }
        }
    }

    async fn read_head_line<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<String> {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line)
    }

    /// Reads one response with a `Content-Length` body: (status line, body).
    async fn read_response<R: AsyncBufRead + Unpin>(r: &mut R) -> (String, String) {
        let head = read_head(r).await.unwrap().expect("a response");
        let status = head.split("\r\n").next().unwrap().to_owned();
        let len: usize = header_of(&head, "content-length")
            .map(|v| v.parse().unwrap())
            .unwrap_or(0);
        let mut body = vec![0; len];
        r.read_exact(&mut body).await.unwrap();
        (status, String::from_utf8(body).unwrap())
    }

    struct Harness {
        log: Log,
        opened: Arc<AtomicBool>,
        creds: watch::Sender<LeaseState>,
        task: tokio::task::JoinHandle<Result<ProxyStats, ProxyError>>,
    }

    /// The inlet's kind of gate, as the tests see it: a credential held or not.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum LeaseState {
        Held(Credential),
        Missing { reason: String },
    }

    impl Gate for watch::Receiver<LeaseState> {
        fn check(&mut self, _head: &mut RequestHead) -> impl Future<Output = Verdict> + Send {
            let verdict = match &*self.borrow() {
                LeaseState::Held(c) => Verdict::Forward {
                    authorization: Some(c.authorization()),
                },
                LeaseState::Missing { reason } => Verdict::NoLease {
                    reason: reason.clone(),
                },
            };
            std::future::ready(verdict)
        }
    }

    fn waiting() -> LeaseState {
        LeaseState::Missing {
            reason: "no lease received from the outlet yet".to_owned(),
        }
    }

    fn opts(cfg: FilterConfig) -> ProxyOptions {
        ProxyOptions::new("postern inlet", cfg)
    }

    fn token(t: &str) -> LeaseState {
        LeaseState::Held(Credential::Token(t.to_owned()))
    }

    /// Starts `proxy` on one end of a duplex pipe, with a fake server behind a duplex pipe.
    fn start(initial: LeaseState, cfg: FilterConfig) -> (DuplexStream, Harness) {
        let (client, proxy_side) = tokio::io::duplex(BUF_LEN);
        let log: Log = Arc::default();
        let opened = Arc::new(AtomicBool::new(false));
        let (creds, creds_rx) = watch::channel(initial);
        let open = {
            let log = log.clone();
            let opened = opened.clone();
            move || async move {
                opened.store(true, Ordering::SeqCst);
                let (a, b) = tokio::io::duplex(BUF_LEN);
                tokio::spawn(fake_server(b, log));
                Ok(a)
            }
        };
        let task = tokio::spawn(proxy(proxy_side, open, creds_rx, opts(cfg)));
        (
            client,
            Harness {
                log,
                opened,
                creds,
                task,
            },
        )
    }

    fn influx1() -> FilterConfig {
        FilterConfig {
            strip_query_credentials: true,
            ..FilterConfig::default()
        }
    }

    /// Waits for a proxy task, failing the test instead of hanging if it never ends.
    async fn done<T>(task: tokio::task::JoinHandle<T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("proxy did not finish")
            .expect("proxy task panicked")
    }

    fn snapshot(log: &Log) -> Vec<Seen> {
        log.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn credential_injected_and_clients_removed() {
        let (client, h) = start(token("leased-1"), influx1());
        let (r, mut w) = tokio::io::split(client);
        let mut r = BufReader::new(r);
        w.write_all(
            b"GET /query?u=me&db=x&p=pw&q=SHOW%20DATABASES HTTP/1.1\r\nHost: influx\r\n\
              Authorization: Token mine\r\nauthorization: Basic bWU6cHc=\r\nAccept: */*\r\n\r\n",
        )
        .await
        .unwrap();
        let (status, body) = read_response(&mut r).await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body, "response 1 auth=Token leased-1");
        w.shutdown().await.unwrap();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let stats = done(h.task).await.unwrap();
        assert_eq!(stats.requests, 1);
        let seen = snapshot(&h.log);
        assert_eq!(seen.len(), 1);
        assert_eq!(
            seen[0].request_line(),
            "GET /query?db=x&q=SHOW%20DATABASES HTTP/1.1"
        );
        assert_eq!(seen[0].headers("authorization"), ["Token leased-1"]);
        assert_eq!(seen[0].headers("accept"), ["*/*"]);
    }

    #[tokio::test]
    async fn keep_alive_three_sequential_requests() {
        let (client, h) = start(token("t"), FilterConfig::default());
        let (r, mut w) = tokio::io::split(client);
        let mut r = BufReader::new(r);
        for i in 1..=3 {
            let body = format!("cpu value={i}");
            w.write_all(
                format!(
                    "POST /api/v2/write?org=o&bucket=b HTTP/1.1\r\nHost: i\r\n\
                     Content-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await
            .unwrap();
            let (status, text) = read_response(&mut r).await;
            assert_eq!(status, "HTTP/1.1 200 OK");
            assert_eq!(text, format!("response {i} auth=Token t"));
        }
        w.shutdown().await.unwrap();
        let stats = done(h.task).await.unwrap();
        assert_eq!(stats.requests, 3);
        let seen = snapshot(&h.log);
        assert_eq!(seen.len(), 3);
        for (i, s) in seen.iter().enumerate() {
            assert_eq!(s.body, format!("cpu value={}", i + 1).as_bytes());
        }
    }

    #[tokio::test]
    async fn pipelined_requests_with_chunked_body() {
        let (client, h) = start(token("t"), FilterConfig::default());
        let (r, mut w) = tokio::io::split(client);
        let mut r = BufReader::new(r);
        w.write_all(
            b"GET /ping HTTP/1.1\r\nHost: i\r\nAuthorization: Token x\r\n\r\n\
              POST /write HTTP/1.1\r\nHost: i\r\nTransfer-Encoding: chunked\r\n\r\n\
              4\r\nabcd\r\n3;x=y\r\nefg\r\n0\r\nX-T: 1\r\n\r\n\
              POST /write HTTP/1.1\r\nHost: i\r\nContent-Length: 3\r\n\r\nxyz",
        )
        .await
        .unwrap();
        for i in 1..=3 {
            let (_, text) = read_response(&mut r).await;
            assert_eq!(text, format!("response {i} auth=Token t"));
        }
        w.shutdown().await.unwrap();
        done(h.task).await.unwrap();
        let seen = snapshot(&h.log);
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0].headers("authorization"), ["Token t"]);
        assert_eq!(seen[1].body, b"abcdefg");
        assert_eq!(seen[2].body, b"xyz");
    }

    #[tokio::test]
    async fn large_chunked_upload_streams_through() {
        let (client, h) = start(token("t"), FilterConfig::default());
        let (r, mut w) = tokio::io::split(client);
        let mut r = BufReader::new(r);
        let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let writer = async {
            w.write_all(b"POST /write HTTP/1.1\r\nHost: i\r\nTransfer-Encoding: chunked\r\n\r\n")
                .await
                .unwrap();
            for c in payload.chunks(7777) {
                w.write_all(format!("{:x}\r\n", c.len()).as_bytes())
                    .await
                    .unwrap();
                w.write_all(c).await.unwrap();
                w.write_all(b"\r\n").await.unwrap();
            }
            w.write_all(b"0\r\n\r\n").await.unwrap();
        };
        let ((), (status, _)) = tokio::join!(writer, read_response(&mut r));
        assert_eq!(status, "HTTP/1.1 200 OK");
        w.shutdown().await.unwrap();
        let stats = done(h.task).await.unwrap();
        assert!(stats.bytes_up > 1_000_000);
        assert_eq!(snapshot(&h.log)[0].body, payload);
    }

    #[tokio::test]
    async fn expect_100_continue() {
        let (client, h) = start(token("t"), FilterConfig::default());
        let (r, mut w) = tokio::io::split(client);
        let mut r = BufReader::new(r);
        w.write_all(
            b"PUT /write HTTP/1.1\r\nHost: i\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        )
        .await
        .unwrap();
        let interim = read_head(&mut r).await.unwrap().unwrap();
        assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
        w.write_all(b"hello").await.unwrap();
        let (status, text) = read_response(&mut r).await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(text, "response 1 auth=Token t");
        w.shutdown().await.unwrap();
        done(h.task).await.unwrap();
        assert_eq!(snapshot(&h.log)[0].body, b"hello");
    }

    #[tokio::test]
    async fn upgrade_passes_opaque_bytes_both_ways() {
        let (client, h) = start(token("t"), FilterConfig::default());
        let (r, mut w) = tokio::io::split(client);
        let mut r = BufReader::new(r);
        w.write_all(
            b"GET /ws HTTP/1.1\r\nHost: i\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        )
        .await
        .unwrap();
        let head = read_head(&mut r).await.unwrap().unwrap();
        assert!(head.starts_with("HTTP/1.1 101 "));
        // Bytes the filter would refuse (bare LF, an Authorization) go through untouched.
        let raw = b"\x81\x05hello\nGET / HTTP/1.1\nAuthorization: raw\n\n\x00\xff";
        w.write_all(raw).await.unwrap();
        let mut echoed = vec![0; raw.len()];
        r.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, raw);
        w.shutdown().await.unwrap();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let stats = done(h.task).await.unwrap();
        assert!(stats.tunneled);
        assert_eq!(snapshot(&h.log)[0].headers("authorization"), ["Token t"]);
    }

    #[tokio::test]
    async fn malformed_request_gets_400_and_upstream_never_opened() {
        let (mut client, h) = start(token("t"), FilterConfig::default());
        client
            .write_all(b"POST / HTTP/1.1\r\nHost: i\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nAuthorization: Token secret-of-client\r\n\r\n")
            .await
            .unwrap();
        let mut resp = Vec::new();
        client.read_to_end(&mut resp).await.unwrap();
        let resp = String::from_utf8(resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{resp}");
        assert!(resp.contains("Connection: close\r\n"));
        assert!(resp.contains("Content-Length and Transfer-Encoding"));
        assert!(!resp.contains("secret-of-client"));
        drop(client);
        let err = done(h.task).await.unwrap_err();
        assert!(matches!(err, ProxyError::BadRequest(_)), "{err}");
        assert!(!h.opened.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn malformed_pipelined_request_after_valid_one() {
        let (mut client, h) = start(token("t"), FilterConfig::default());
        client
            .write_all(b"GET /a HTTP/1.1\r\nHost: i\r\n\r\nGET /b HTTP/1.1\nHost: i\n\n")
            .await
            .unwrap();
        let mut resp = Vec::new();
        client.read_to_end(&mut resp).await.unwrap();
        let resp = String::from_utf8(resp).unwrap();
        let first = "HTTP/1.1 200 OK\r\nContent-Length: 23\r\n\r\nresponse 1 auth=Token t";
        assert!(resp.starts_with(first), "{resp}");
        assert!(
            resp[first.len()..].starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{resp}"
        );
        drop(client);
        assert!(matches!(
            done(h.task).await,
            Err(ProxyError::BadRequest(HttpError::BareLf))
        ));
        assert_eq!(snapshot(&h.log).len(), 1);
    }

    #[tokio::test]
    async fn no_credential_gets_503() {
        let missing = LeaseState::Missing {
            reason: "lease expired".to_owned(),
        };
        let (mut client, h) = start(missing, FilterConfig::default());
        client
            .write_all(b"GET /ping HTTP/1.1\r\nHost: i\r\n\r\n")
            .await
            .unwrap();
        let mut resp = Vec::new();
        client.read_to_end(&mut resp).await.unwrap();
        let resp = String::from_utf8(resp).unwrap();
        assert!(
            resp.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{resp}"
        );
        assert!(resp.contains("no valid lease"));
        assert!(resp.contains("lease expired"));
        drop(client);
        assert!(matches!(
            done(h.task).await,
            Err(ProxyError::NoLease { .. })
        ));
        assert!(!h.opened.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn lease_lost_between_requests_gets_503_after_first_response() {
        let (client, h) = start(token("t"), FilterConfig::default());
        let (r, mut w) = tokio::io::split(client);
        let mut r = BufReader::new(r);
        w.write_all(b"GET /a HTTP/1.1\r\nHost: i\r\n\r\n")
            .await
            .unwrap();
        let (_, text) = read_response(&mut r).await;
        assert_eq!(text, "response 1 auth=Token t");
        h.creds.send_replace(waiting());
        w.write_all(b"GET /b HTTP/1.1\r\nHost: i\r\n\r\n")
            .await
            .unwrap();
        let (status, text) = read_response(&mut r).await;
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
        assert!(text.contains("no lease received"));
        w.shutdown().await.unwrap();
        assert!(done(h.task).await.is_err());
        assert_eq!(snapshot(&h.log).len(), 1);
    }

    #[tokio::test]
    async fn rotation_applies_to_next_request() {
        let (client, h) = start(token("first"), FilterConfig::default());
        let (r, mut w) = tokio::io::split(client);
        let mut r = BufReader::new(r);
        w.write_all(b"GET /a HTTP/1.1\r\nHost: i\r\n\r\n")
            .await
            .unwrap();
        let (_, text) = read_response(&mut r).await;
        assert_eq!(text, "response 1 auth=Token first");
        h.creds.send_replace(LeaseState::Held(Credential::Basic {
            username: "u".into(),
            password: "p".into(),
        }));
        w.write_all(b"GET /b HTTP/1.1\r\nHost: i\r\n\r\n")
            .await
            .unwrap();
        let (_, text) = read_response(&mut r).await;
        assert_eq!(text, "response 2 auth=Basic dTpw");
        w.shutdown().await.unwrap();
        done(h.task).await.unwrap();
        let seen = snapshot(&h.log);
        assert_eq!(seen[0].headers("authorization"), ["Token first"]);
        assert_eq!(seen[1].headers("authorization"), ["Basic dTpw"]);
    }

    #[tokio::test]
    async fn server_closing_ends_idle_connection() {
        let (client, h) = start(token("t"), FilterConfig::default());
        let (r, mut w) = tokio::io::split(client);
        let mut r = BufReader::new(r);
        w.write_all(b"GET /a HTTP/1.1\r\nHost: i\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let (_, text) = read_response(&mut r).await;
        assert_eq!(text, "response 1 auth=Token t");
        // The client keeps its write side open; the server's close still ends the proxy.
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert_eq!(done(h.task).await.unwrap().requests, 1);
        drop(w);
    }

    #[tokio::test]
    async fn client_leaving_without_request_never_opens_upstream() {
        let (client, h) = start(token("t"), FilterConfig::default());
        drop(client);
        assert_eq!(done(h.task).await.unwrap(), ProxyStats::default());
        assert!(!h.opened.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn unreachable_upstream_gets_502() {
        let (mut client, proxy_side) = tokio::io::duplex(BUF_LEN);
        let (_tx, rx) = watch::channel(token("t"));
        let open = || async {
            Err::<DuplexStream, _>(io::Error::new(io::ErrorKind::ConnectionRefused, "refused"))
        };
        let task = tokio::spawn(proxy(proxy_side, open, rx, opts(FilterConfig::default())));
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: i\r\n\r\n")
            .await
            .unwrap();
        let mut resp = Vec::new();
        client.read_to_end(&mut resp).await.unwrap();
        assert!(resp.starts_with(b"HTTP/1.1 502 Bad Gateway\r\n"));
        drop(client);
        assert!(matches!(
            done(task).await,
            Err(ProxyError::UpstreamUnavailable(_))
        ));
    }

    /// Real TCP on both sides: the client half-closes after its request and still reads the
    /// whole response, then sees EOF once the server closed.
    #[tokio::test]
    async fn request_behind_an_ignored_upgrade_is_filtered() {
        let (client, h) = start(token("t"), influx1());
        let (r, mut w) = tokio::io::split(client);
        let mut r = BufReader::new(r);
        // The server answers the upgrade with a plain 200; the request pipelined behind it must
        // still lose the client's credentials and carry the lease.
        w.write_all(
            b"GET /no-ws HTTP/1.1\r\nHost: i\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\
              GET /query?u=admin&p=pw HTTP/1.1\r\nHost: i\r\nAuthorization: Basic YWRtaW46cHc=\r\n\r\n",
        )
        .await
        .unwrap();
        let (status, _) = read_response(&mut r).await;
        assert!(status.starts_with("HTTP/1.1 200 "), "{status}");
        let (status, body) = read_response(&mut r).await;
        assert!(status.starts_with("HTTP/1.1 200 "), "{status}");
        assert_eq!(body, "response 2 auth=Token t");
        w.shutdown().await.unwrap();
        let stats = done(h.task).await.unwrap();
        assert!(!stats.tunneled);
        let seen = snapshot(&h.log);
        assert_eq!(seen[1].request_line(), "GET /query HTTP/1.1");
        assert_eq!(seen[1].headers("authorization"), ["Token t"]);
    }

    #[tokio::test]
    async fn h2c_and_connect_are_refused_and_nothing_behind_them_passes() {
        for first in [
            &b"GET / HTTP/1.1\r\nHost: i\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"[..],
            &b"CONNECT db:8086 HTTP/1.1\r\nHost: db:8086\r\n\r\n"[..],
        ] {
            let (client, h) = start(token("t"), influx1());
            let (r, mut w) = tokio::io::split(client);
            let mut r = BufReader::new(r);
            let mut input = first.to_vec();
            input.extend_from_slice(b"GET /query?u=admin&p=pw HTTP/1.1\r\nHost: i\r\n\r\n");
            w.write_all(&input).await.unwrap();
            let (status, body) = read_response(&mut r).await;
            assert!(status.starts_with("HTTP/1.1 501 "), "{status}");
            assert!(body.contains("postern inlet refused"), "{body}");
            drop(w);
            assert!(matches!(done(h.task).await, Err(ProxyError::BadRequest(_))));
            assert!(!h.opened.load(Ordering::SeqCst), "upstream opened");
            assert!(snapshot(&h.log).is_empty());
        }
    }

    #[tokio::test]
    async fn slow_head_gets_408() {
        let (client, proxy_side) = tokio::io::duplex(BUF_LEN);
        let (_tx, rx) = watch::channel(token("t"));
        let mut o = opts(influx1());
        o.head_timeout = Duration::from_millis(300);
        let task = tokio::spawn(proxy(
            proxy_side,
            || async { Ok::<_, io::Error>(tokio::io::duplex(16).0) },
            rx,
            o,
        ));
        let (r, mut w) = tokio::io::split(client);
        let mut r = BufReader::new(r);
        let started = Instant::now();
        // A byte every 50 ms: each read is quick, the head never completes.
        let trickle = tokio::spawn(async move {
            for b in b"GET / HTTP/1.1\r\nHost: i\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
                if w.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let (status, _) = read_response(&mut r).await;
        let answered = started.elapsed();
        assert!(status.starts_with("HTTP/1.1 408 "), "{status}");
        assert!(
            answered >= Duration::from_millis(300) && answered < Duration::from_secs(2),
            "{answered:?}"
        );
        trickle.abort();
        assert!(matches!(done(task).await, Err(ProxyError::HeadTimeout(_))));
    }

    #[tokio::test]
    async fn idle_connection_is_closed() {
        let (client, proxy_side) = tokio::io::duplex(BUF_LEN);
        let (_tx, rx) = watch::channel(token("t"));
        let mut o = opts(influx1());
        o.idle_timeout = Duration::from_millis(200);
        let task = tokio::spawn(proxy(
            proxy_side,
            || async { Ok::<_, io::Error>(tokio::io::duplex(16).0) },
            rx,
            o,
        ));
        let (mut r, _w) = tokio::io::split(client);
        let mut rest = Vec::new();
        // The proxy closes its side without a response.
        r.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert!(done(task).await.is_ok());
    }

    #[tokio::test]
    async fn half_close_over_tcp() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let log: Log = Arc::default();
        let server_log = log.clone();
        tokio::spawn(async move {
            let (s, _) = server.accept().await.unwrap();
            fake_server(s, server_log).await.unwrap();
        });
        let inlet = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let inlet_addr = inlet.local_addr().unwrap();
        let (_tx, rx) = watch::channel(token("t"));
        let proxy_task = tokio::spawn(async move {
            let (c, _) = inlet.accept().await.unwrap();
            proxy(
                c,
                move || TcpStream::connect(server_addr),
                rx,
                opts(FilterConfig::default()),
            )
            .await
        });
        let mut client = TcpStream::connect(inlet_addr).await.unwrap();
        client
            .write_all(b"POST /write HTTP/1.1\r\nHost: i\r\nContent-Length: 4\r\n\r\ndata")
            .await
            .unwrap();
        client.shutdown().await.unwrap();
        let mut resp = Vec::new();
        client.read_to_end(&mut resp).await.unwrap();
        assert_eq!(
            resp,
            b"HTTP/1.1 200 OK\r\nContent-Length: 23\r\n\r\nresponse 1 auth=Token t"
        );
        let stats = done(proxy_task).await.unwrap();
        assert_eq!(stats.requests, 1);
        assert_eq!(stats.bytes_down, resp.len() as u64);
        assert_eq!(log.lock().unwrap()[0].body, b"data");
    }

    #[test]
    fn proxy_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let (a, _b) = tokio::io::duplex(16);
        let (_tx, rx) = watch::channel(waiting());
        let fut = proxy(
            a,
            || async { Ok::<_, io::Error>(tokio::io::duplex(16).0) },
            rx,
            opts(FilterConfig::default()),
        );
        assert_send(&fut);
    }
}
