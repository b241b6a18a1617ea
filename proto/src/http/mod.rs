//! HTTP/1.1 request filter (sans-IO), run by the inlet and again by the outlet (on leased
//! services and on its public hostname) in front of InfluxDB.
//!
//! The inlet sits between an unmodified InfluxDB client and the server. Whatever credentials the
//! client sends must never reach the server; instead every request carries the short-lived leased
//! credential. That only holds if the inlet and the server agree on where each request starts and
//! ends: if they disagree (request smuggling), bytes the filter took for a body could be a request
//! to the server, carrying the client's own `Authorization`, or none at all. So the filter is
//! stricter than `httparse` alone (which accepts bare LF line endings, for one) and refuses
//! everything RFC 9112 calls ambiguous instead of guessing: a refused request is answered with a
//! 400 and the connection is closed.
//!
//! The filter only looks at the client-to-server direction and never buffers a body: it tells
//! the caller what the next bytes are ([`Step`]): a request head to re-serialize with the leased
//! credential, a number of body bytes to pass on unchanged, a pause until the server has answered
//! a WebSocket upgrade, or the start of an opaque tunnel (only once the server has answered that
//! upgrade with `101 Switching Protocols`, which the caller learns from
//! [`response::ResponseTracker`]). Like mini-redis' `Frame::check`,
//! [`RequestFilter::step`] looks at the unconsumed bytes and either says what they are or that it
//! needs more, so partial reads are natural and the same stream split anywhere gives the same
//! result.
//!
//! Tunnels are where filters get bypassed: a request that *announces* a protocol switch is
//! answered normally by a server that does not switch, and a request pipelined behind it would
//! reach the server unfiltered if the filter had stopped looking. So `CONNECT` and every upgrade
//! other than `websocket` are refused outright, and a WebSocket upgrade turns the stream opaque
//! only after the server's `101`; any other answer and the filter goes on with the next request.
//!
//! This file holds the filter's state machine; the rules it applies live beside it, one concern
//! a file: `head.rs` parses and checks a request head, `chunked.rs` a chunked body's framing,
//! `grammar.rs` the RFC 9110 byte classes both share, `credentials.rs` takes the client's
//! credentials out and puts the lease in, `error.rs` says why a request was refused and answers
//! it, `limits.rs` holds the size limits, and [`response`] follows the server's answers.

mod chunked;
mod credentials;
mod error;
mod grammar;
mod head;
mod limits;
pub mod response;
#[cfg(test)]
mod tests;

pub use credentials::strip_query_credentials;
pub use error::{error_response, json_error_response, HttpError};
pub use head::{BodyFraming, FilterConfig, RequestHead, Version};
pub use limits::{DEFAULT_MAX_HEADERS, DEFAULT_MAX_HEAD_LEN, MAX_CHUNK_LINE_LEN};

use chunked::{parse_chunk_size_line, Chunk};
use grammar::{check_field_line, is_forbidden_trailer};
use head::parse_head;

/// What the next bytes of the client stream are. After `Head { consumed }` or `Body { len }` the
/// caller drops that many bytes from the front of its buffer before calling
/// [`RequestFilter::step`] again; after `NeedMore` it keeps the buffer and appends to it.
#[derive(Debug)]
pub enum Step {
    /// The buffer holds no complete piece yet: read more and call again with the same bytes
    /// plus the new ones.
    NeedMore,
    /// A request head of `consumed` bytes was accepted: send
    /// [`RequestHead::write_with_authorization`] instead of those bytes.
    Head {
        head: Box<RequestHead>,
        consumed: usize,
    },
    /// The next `len` bytes (1 or more, at most the buffer) are body bytes (for chunked bodies:
    /// framing and trailers included): pass them on unchanged.
    Body { len: usize },
    /// A WebSocket upgrade request has been passed on whole: nothing more may go to the server
    /// until it has answered. Call [`RequestFilter::upgrade_answered`] with whether it switched
    /// protocols (`101`), then go on calling `step`.
    AwaitUpgrade,
    /// The server switched protocols: the rest of the stream, from the start of the buffer on,
    /// is opaque. Pass everything on unchanged and stop calling the filter.
    Opaque,
}

/// What comes once the current request's body has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    NextHead,
    AwaitUpgrade,
}

/// Where the filter is in the client's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Waiting for a request head.
    Head,
    /// Inside a `Content-Length` body.
    Length { remaining: u64, then: After },
    /// Inside a chunked body.
    Chunked { chunk: Chunk, then: After },
    /// A WebSocket upgrade was passed on; waiting for the server's answer.
    AwaitUpgrade,
    /// Opaque tunnel for the rest of the stream (the server answered `101`).
    Opaque,
    /// A previous step failed; the stream cannot be resynchronized.
    Failed(HttpError),
}

/// Incremental scan of the current line or head, so that a head arriving a byte at a time is not
/// rescanned from its start on every call. Positions are relative to the start of the caller's
/// buffer, which does not move while we answer `NeedMore`.
#[derive(Debug, Clone, Copy, Default)]
struct Scan {
    /// Next byte to look at.
    pos: usize,
    /// Start of the line being scanned.
    line_start: usize,
    /// Start of the request line (after empty lines RFC 9112 §2.2 lets us skip).
    head_start: usize,
    /// Complete non-empty lines seen.
    lines: usize,
}

/// Streaming filter for one client-to-server HTTP/1.1 byte stream. See the module docs.
#[derive(Debug)]
pub struct RequestFilter {
    cfg: FilterConfig,
    state: State,
    scan: Scan,
}

impl RequestFilter {
    /// A filter expecting a request head first.
    pub fn new(cfg: FilterConfig) -> Self {
        RequestFilter {
            cfg,
            state: State::Head,
            scan: Scan::default(),
        }
    }

    /// The configuration this filter runs with.
    pub fn config(&self) -> &FilterConfig {
        &self.cfg
    }

    /// Whether the filter is between requests (the next bytes would start a new head), so that a
    /// client EOF here ends the stream cleanly.
    pub fn between_requests(&self) -> bool {
        self.state == State::Head
    }

    /// Whether the filter waits for the server's answer to a WebSocket upgrade.
    pub fn awaiting_upgrade(&self) -> bool {
        self.state == State::AwaitUpgrade
    }

    /// The server's answer to the upgrade request [`Step::AwaitUpgrade`] is waiting for:
    /// `switched` when it was `101 Switching Protocols` (the stream becomes opaque), else the
    /// next bytes are a new request head. Ignored in any other state.
    pub fn upgrade_answered(&mut self, switched: bool) {
        if self.state == State::AwaitUpgrade {
            self.scan = Scan::default();
            self.state = if switched { State::Opaque } else { State::Head };
        }
    }

    /// Looks at the unconsumed client bytes `buf` and says what the next piece is.
    ///
    /// Once an error is returned the filter stays failed and returns it again: after a framing
    /// error there is no way to know where the next request starts.
    pub fn step(&mut self, buf: &[u8]) -> Result<Step, HttpError> {
        let res = self.step_inner(buf);
        if let Err(e) = &res {
            self.state = State::Failed(e.clone());
        }
        res
    }

    fn step_inner(&mut self, buf: &[u8]) -> Result<Step, HttpError> {
        match self.state.clone() {
            State::Failed(e) => Err(e),
            State::Opaque => Ok(Step::Opaque),
            State::AwaitUpgrade => Ok(Step::AwaitUpgrade),
            State::Head => self.step_head(buf),
            State::Length { remaining, then } => {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let len = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
                let left = remaining - len as u64;
                self.state = if left == 0 {
                    self.after_body(then)
                } else {
                    State::Length {
                        remaining: left,
                        then,
                    }
                };
                Ok(Step::Body { len })
            }
            State::Chunked { chunk, then } => self.step_chunked(buf, chunk, then),
        }
    }

    fn after_body(&mut self, then: After) -> State {
        self.scan = Scan::default();
        match then {
            After::NextHead => State::Head,
            After::AwaitUpgrade => State::AwaitUpgrade,
        }
    }

    fn step_head(&mut self, buf: &[u8]) -> Result<Step, HttpError> {
        let Some((start, end)) = self.scan_head(buf)? else {
            return Ok(Step::NeedMore);
        };
        let mut head = parse_head(&buf[start..end], &self.cfg)?;
        if self.cfg.strip_query_credentials {
            head.remove_query_credentials();
        }
        let then = if head.is_upgrade() {
            After::AwaitUpgrade
        } else {
            After::NextHead
        };
        self.scan = Scan::default();
        self.state = match head.framing() {
            BodyFraming::None => self.after_body(then),
            BodyFraming::Length(n) => State::Length { remaining: n, then },
            BodyFraming::Chunked => State::Chunked {
                chunk: Chunk::SizeLine,
                then,
            },
        };
        Ok(Step::Head {
            head: Box::new(head),
            consumed: end,
        })
    }

    /// Finds the end of the head in `buf`, checking line endings on the way. Returns the range
    /// of the head without leading empty lines, ending after its blank line.
    fn scan_head(&mut self, buf: &[u8]) -> Result<Option<(usize, usize)>, HttpError> {
        let max = self.cfg.max_head_len;
        let s = &mut self.scan;
        while s.pos < buf.len() {
            if s.pos >= max {
                return Err(HttpError::HeadTooLarge { limit: max });
            }
            match buf[s.pos] {
                b'\r' => {
                    match buf.get(s.pos + 1) {
                        None => break,
                        Some(b'\n') => {}
                        Some(_) => return Err(HttpError::BareCr),
                    }
                    let next = s.pos + 2;
                    if s.pos == s.line_start {
                        if s.line_start == s.head_start {
                            // Empty line before the request line (RFC 9112 §2.2: ignore).
                            s.head_start = next;
                        } else {
                            if next > max {
                                return Err(HttpError::HeadTooLarge { limit: max });
                            }
                            return Ok(Some((s.head_start, next)));
                        }
                    } else {
                        s.lines += 1;
                        // The request line plus at most `max_headers` field lines.
                        if s.lines > self.cfg.max_headers.saturating_add(1) {
                            return Err(HttpError::TooManyHeaders {
                                limit: self.cfg.max_headers,
                            });
                        }
                    }
                    s.pos = next;
                    s.line_start = next;
                }
                // Every CRLF is consumed as a pair above, so any LF seen here is bare.
                b'\n' => return Err(HttpError::BareLf),
                _ => s.pos += 1,
            }
        }
        if buf.len() >= max {
            return Err(HttpError::HeadTooLarge { limit: max });
        }
        Ok(None)
    }

    fn step_chunked(&mut self, buf: &[u8], chunk: Chunk, then: After) -> Result<Step, HttpError> {
        let mut pos = 0;
        let mut chunk = chunk;
        loop {
            match chunk {
                Chunk::SizeLine => {
                    let Some(len) = self.find_line(&buf[pos..], MAX_CHUNK_LINE_LEN, || {
                        HttpError::ChunkLineTooLong
                    })?
                    else {
                        break;
                    };
                    let size = parse_chunk_size_line(&buf[pos..pos + len])?;
                    pos += len + 2;
                    chunk = if size == 0 {
                        Chunk::Trailers {
                            bytes: 0,
                            fields: 0,
                        }
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(left) => {
                    let avail = buf.len() - pos;
                    if avail == 0 {
                        break;
                    }
                    let take = usize::try_from(left).map_or(avail, |l| l.min(avail));
                    pos += take;
                    let left = left - take as u64;
                    chunk = if left == 0 {
                        Chunk::DataCrlf
                    } else {
                        Chunk::Data(left)
                    };
                }
                Chunk::DataCrlf => match &buf[pos..] {
                    [] | [b'\r'] => break,
                    [b'\r', b'\n', ..] => {
                        pos += 2;
                        chunk = Chunk::SizeLine;
                    }
                    _ => return Err(HttpError::MissingChunkCrlf),
                },
                Chunk::Trailers { bytes, fields } => {
                    let limit = self.cfg.max_head_len;
                    let room = limit.saturating_sub(bytes).saturating_sub(2);
                    let Some(len) = self
                        .find_line(&buf[pos..], room, || HttpError::TrailersTooLarge { limit })?
                    else {
                        break;
                    };
                    pos += len + 2;
                    if len == 0 {
                        // End of the chunked body.
                        self.state = self.after_body(then);
                        return Ok(Step::Body { len: pos });
                    }
                    let fields = fields + 1;
                    if fields > self.cfg.max_headers {
                        return Err(HttpError::TooManyHeaders {
                            limit: self.cfg.max_headers,
                        });
                    }
                    let line = &buf[pos - len - 2..pos - 2];
                    let (name, _) = check_field_line(line, fields)?;
                    if is_forbidden_trailer(name) {
                        return Err(HttpError::ForbiddenTrailer { line: fields });
                    }
                    chunk = Chunk::Trailers {
                        bytes: bytes + len + 2,
                        fields,
                    };
                }
            }
        }
        self.state = State::Chunked { chunk, then };
        if pos == 0 {
            Ok(Step::NeedMore)
        } else {
            Ok(Step::Body { len: pos })
        }
    }

    /// Finds the CRLF ending the line at the start of `buf`, refusing bare CR or LF and lines
    /// longer than `max`. Resumes where the previous call stopped for this line.
    fn find_line(
        &mut self,
        buf: &[u8],
        max: usize,
        too_long: impl Fn() -> HttpError,
    ) -> Result<Option<usize>, HttpError> {
        let s = &mut self.scan;
        while s.pos < buf.len() {
            match buf[s.pos] {
                b'\r' => match buf.get(s.pos + 1) {
                    None => break,
                    Some(b'\n') => {
                        let len = s.pos;
                        *s = Scan::default();
                        if len > max {
                            return Err(too_long());
                        }
                        return Ok(Some(len));
                    }
                    Some(_) => return Err(HttpError::BareCr),
                },
                b'\n' => return Err(HttpError::BareLf),
                _ => s.pos += 1,
            }
            if s.pos > max {
                return Err(too_long());
            }
        }
        if s.pos > max {
            return Err(too_long());
        }
        Ok(None)
    }
}
