//! Follows the server-to-client half of an HTTP/1.1 connection (sans-IO), to learn one thing:
//! how the server answered a WebSocket upgrade.
//!
//! The request filter ([`crate::http::RequestFilter`]) must not let the client's bytes through
//! unfiltered until the server has switched protocols, and with pipelining the answer to the
//! upgrade may come after answers to earlier requests. So the proxy announces every request it
//! forwards ([`ResponseTracker::expect`]) and feeds every byte it copies back to the client
//! ([`ResponseTracker::feed`]); the tracker finds where each response ends (RFC 9112 §6.3:
//! `HEAD`, `1xx`, `204` and `304` have no body; then `Transfer-Encoding`, `Content-Length`, or
//! the end of the connection) and says when the upgrade's answer arrives and whether it is
//! `101 Switching Protocols`.
//!
//! The tracker never changes or holds back response bytes: the caller copies them as they come.
//! It buffers only a response head in progress (bounded), never a body. Once it cannot follow
//! the stream (a malformed response) it stays failed and says so; the caller then refuses any
//! upgrade, since it can no longer tell which answer belongs to which request.

use super::grammar::trim_ows;
use std::collections::VecDeque;

/// Default limit on one response head.
pub const DEFAULT_MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Most header fields parsed in one response head.
const MAX_RESPONSE_HEADERS: usize = 128;
/// Longest chunk-size line accepted in a response, without its CRLF.
const MAX_RESPONSE_CHUNK_LINE: usize = 4096;

/// What kind of request a response answers, as far as framing is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Any request whose response may carry a body.
    Normal,
    /// A `HEAD` request: its response never has a body, whatever its fields say.
    Head,
    /// A WebSocket upgrade: a `101` switches the connection to raw bytes.
    Upgrade,
}

/// How the server answered a WebSocket upgrade request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeAnswer {
    /// `101 Switching Protocols`: from now on the connection carries raw bytes both ways.
    Switched,
    /// Any other final status: the connection stays HTTP.
    Refused,
}

/// Why the response stream could not be followed. Never carries response bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResponseError {
    #[error("response head exceeds {0} bytes")]
    HeadTooLarge(usize),
    #[error("malformed response head ({0})")]
    Malformed(&'static str),
    #[error("invalid Content-Length in a response")]
    BadContentLength,
    #[error("malformed chunked response body")]
    BadChunk,
    #[error("101 Switching Protocols to a request that asked for no upgrade")]
    UnexpectedSwitch,
    #[error("response after the body that runs until the connection closes")]
    AfterCloseDelimited,
}

/// Where the tracker is in the response stream: in a head, in a body (framed one of three
/// ways), or past a protocol switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a response head (the bytes so far are in `head`).
    Head,
    /// `n` body bytes left.
    Length(u64),
    /// Chunked body.
    Chunked(ChunkPhase),
    /// The body runs to the end of the connection.
    UntilClose,
    /// The connection switched protocols.
    Opaque,
}

/// Where the tracker is inside a chunked response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkPhase {
    /// Reading a chunk-size line (its bytes so far in `line`).
    Size,
    /// `n` chunk data bytes left.
    Data(u64),
    /// The CRLF after chunk data: how many of its two bytes were seen.
    DataEnd(u8),
    /// Trailer lines (each read into `line`), ended by an empty one.
    Trailer,
}

/// Follows responses; see the module docs.
#[derive(Debug)]
pub struct ResponseTracker {
    max_head: usize,
    state: Result<Phase, ResponseError>,
    /// Requests forwarded and not yet answered, oldest first.
    pending: VecDeque<Expect>,
    /// The response head in progress.
    head: Vec<u8>,
    /// The chunk-size or trailer line in progress.
    line: Vec<u8>,
    /// Trailer bytes so far.
    trailer_len: usize,
}

impl Default for ResponseTracker {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_RESPONSE_HEAD)
    }
}

impl ResponseTracker {
    /// A tracker accepting response heads up to `max_head` bytes.
    pub fn new(max_head: usize) -> Self {
        ResponseTracker {
            max_head,
            state: Ok(Phase::Head),
            pending: VecDeque::new(),
            head: Vec::new(),
            line: Vec::new(),
            trailer_len: 0,
        }
    }

    /// Announces a request that was forwarded (call before its first byte goes out, so that
    /// its answer can never arrive first).
    pub fn expect(&mut self, request: Expect) {
        self.pending.push_back(request);
    }

    /// Requests forwarded and not yet fully answered (the one being answered included).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Whether the stream switched protocols (everything after the `101` is opaque).
    pub fn is_opaque(&self) -> bool {
        self.state == Ok(Phase::Opaque)
    }

    /// The error the tracker stopped at, if it could not follow the stream.
    pub fn failure(&self) -> Option<&ResponseError> {
        self.state.as_ref().err()
    }

    /// Looks at the next `bytes` the server sent. Returns the answer to an upgrade request
    /// when its status line arrives in them (one at most: the request filter lets no request
    /// follow an upgrade before its answer). After an error every call returns it again.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<Option<UpgradeAnswer>, ResponseError> {
        let mut answer = None;
        while !bytes.is_empty() {
            let state = self.state.clone()?;
            let used = match state {
                Phase::Opaque | Phase::UntilClose => bytes.len(),
                Phase::Head => match self.feed_head(bytes) {
                    Ok((used, a)) => {
                        answer = answer.or(a);
                        used
                    }
                    Err(e) => return Err(self.fail(e)),
                },
                Phase::Length(left) => {
                    let take = usize::try_from(left).map_or(bytes.len(), |l| l.min(bytes.len()));
                    let left = left - take as u64;
                    self.state = Ok(if left == 0 {
                        self.response_done()
                    } else {
                        Phase::Length(left)
                    });
                    take
                }
                Phase::Chunked(chunk) => match self.feed_chunked(bytes, chunk) {
                    Ok(used) => used,
                    Err(e) => return Err(self.fail(e)),
                },
            };
            bytes = &bytes[used..];
        }
        Ok(answer)
    }

    /// Whether an upgrade request is still waiting for its answer.
    pub fn pending_upgrade(&self) -> bool {
        self.pending.contains(&Expect::Upgrade)
    }

    fn fail(&mut self, e: ResponseError) -> ResponseError {
        self.state = Err(e.clone());
        self.head = Vec::new();
        self.line = Vec::new();
        e
    }

    /// A whole response (head and body) has been seen.
    fn response_done(&mut self) -> Phase {
        self.pending.pop_front();
        Phase::Head
    }

    /// Takes head bytes up to the blank line. Returns how many bytes were used.
    fn feed_head(&mut self, bytes: &[u8]) -> Result<(usize, Option<UpgradeAnswer>), ResponseError> {
        // The end of the head is CRLF CRLF; it may straddle calls, so look at what we hold too.
        let held = self.head.len();
        let start = held.saturating_sub(3);
        self.head.extend_from_slice(bytes);
        let Some(end) = find_head_end(&self.head[start..]).map(|e| start + e) else {
            if self.head.len() > self.max_head {
                return Err(ResponseError::HeadTooLarge(self.max_head));
            }
            return Ok((bytes.len(), None));
        };
        if end > self.max_head {
            return Err(ResponseError::HeadTooLarge(self.max_head));
        }
        let used = end - held;
        let head = std::mem::take(&mut self.head);
        let answer = self.on_head(&head[..end])?;
        Ok((used, answer))
    }

    fn on_head(&mut self, head: &[u8]) -> Result<Option<UpgradeAnswer>, ResponseError> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut res = httparse::Response::new(&mut fields);
        match res.parse(head) {
            Ok(httparse::Status::Complete(n)) if n == head.len() => {}
            Ok(_) => return Err(ResponseError::Malformed("incomplete head")),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ResponseError::Malformed("too many fields"))
            }
            Err(_) => return Err(ResponseError::Malformed("invalid head")),
        }
        let status = res.code.unwrap_or(0);
        // An unsolicited response (a 408 before any request, say) answers no request of ours.
        let request = self.pending.front().copied().unwrap_or(Expect::Normal);
        if status == 101 {
            if request != Expect::Upgrade {
                return Err(ResponseError::UnexpectedSwitch);
            }
            self.pending.pop_front();
            self.state = Ok(Phase::Opaque);
            return Ok(Some(UpgradeAnswer::Switched));
        }
        if (100..200).contains(&status) {
            // Interim response (100 Continue, 103 Early Hints): the final one follows.
            self.state = Ok(Phase::Head);
            return Ok(None);
        }
        let answer = (request == Expect::Upgrade).then_some(UpgradeAnswer::Refused);
        let mut content_length = None;
        let mut chunked = false;
        let mut transfer_encoding = false;
        for f in res.headers.iter() {
            if f.name.eq_ignore_ascii_case("content-length") {
                let v = parse_length(f.value).ok_or(ResponseError::BadContentLength)?;
                if content_length.is_some_and(|c| c != v) {
                    return Err(ResponseError::BadContentLength);
                }
                content_length = Some(v);
            } else if f.name.eq_ignore_ascii_case("transfer-encoding") {
                transfer_encoding = true;
                // Chunked only counts as the last coding (RFC 9112 §6.3 rule 4).
                chunked = f
                    .value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|last| trim_ows(last).eq_ignore_ascii_case(b"chunked"));
            }
        }
        let body = if request == Expect::Head || status == 204 || status == 304 {
            None
        } else if transfer_encoding {
            Some(if chunked {
                Phase::Chunked(ChunkPhase::Size)
            } else {
                Phase::UntilClose
            })
        } else {
            match content_length {
                Some(0) => None,
                Some(n) => Some(Phase::Length(n)),
                None => Some(Phase::UntilClose),
            }
        };
        self.state = Ok(match body {
            None => self.response_done(),
            Some(Phase::UntilClose) => {
                // Nothing can follow this response; requests still pending stay unanswered.
                self.pending.clear();
                Phase::UntilClose
            }
            Some(b) => b,
        });
        Ok(answer)
    }

    fn feed_chunked(&mut self, bytes: &[u8], chunk: ChunkPhase) -> Result<usize, ResponseError> {
        match chunk {
            ChunkPhase::Data(left) => {
                let take = usize::try_from(left).map_or(bytes.len(), |l| l.min(bytes.len()));
                let left = left - take as u64;
                self.state = Ok(Phase::Chunked(if left == 0 {
                    ChunkPhase::DataEnd(0)
                } else {
                    ChunkPhase::Data(left)
                }));
                Ok(take)
            }
            ChunkPhase::DataEnd(seen) => {
                let want: &[u8] = if seen == 0 { b"\r\n" } else { b"\n" };
                let n = want.len().min(bytes.len());
                if bytes[..n] != want[..n] {
                    return Err(ResponseError::BadChunk);
                }
                let seen = seen + n as u8;
                self.state = Ok(Phase::Chunked(if seen == 2 {
                    ChunkPhase::Size
                } else {
                    ChunkPhase::DataEnd(seen)
                }));
                Ok(n)
            }
            ChunkPhase::Size | ChunkPhase::Trailer => {
                let (used, line) = match take_line(&mut self.line, bytes, MAX_RESPONSE_CHUNK_LINE)?
                {
                    (used, None) => return Ok(used),
                    (used, Some(line)) => (used, line),
                };
                if chunk == ChunkPhase::Size {
                    let size = parse_chunk_size(&line).ok_or(ResponseError::BadChunk)?;
                    self.state = Ok(Phase::Chunked(if size == 0 {
                        self.trailer_len = 0;
                        ChunkPhase::Trailer
                    } else {
                        ChunkPhase::Data(size)
                    }));
                } else if line.is_empty() {
                    self.state = Ok(self.response_done());
                } else {
                    self.trailer_len += line.len() + 2;
                    if self.trailer_len > self.max_head {
                        return Err(ResponseError::HeadTooLarge(self.max_head));
                    }
                }
                Ok(used)
            }
        }
    }
}

/// Index just past the first CRLF CRLF in `buf`.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Appends `bytes` up to and including the next LF to `line`; returns the bytes used and, when
/// the line is complete, the line without its CRLF (a line must end in CRLF).
fn take_line(
    line: &mut Vec<u8>,
    bytes: &[u8],
    max: usize,
) -> Result<(usize, Option<Vec<u8>>), ResponseError> {
    let (used, done) = match bytes.iter().position(|&b| b == b'\n') {
        Some(i) => (i + 1, true),
        None => (bytes.len(), false),
    };
    line.extend_from_slice(&bytes[..used]);
    if line.len() > max + 2 {
        return Err(ResponseError::BadChunk);
    }
    if !done {
        return Ok((used, None));
    }
    let mut full = std::mem::take(line);
    if !full.ends_with(b"\r\n") {
        return Err(ResponseError::BadChunk);
    }
    full.truncate(full.len() - 2);
    Ok((used, Some(full)))
}

/// `chunk-size [ chunk-ext ]`: hex digits, then nothing or `;...` (extensions are not checked
/// further: they carry no framing).
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    let rest = &line[digits..];
    if !(rest.is_empty() || rest[0] == b';' || rest[0] == b' ' || rest[0] == b'\t') {
        return None;
    }
    std::str::from_utf8(&line[..digits])
        .ok()
        .and_then(|s| u64::from_str_radix(s, 16).ok())
}

fn parse_length(v: &[u8]) -> Option<u64> {
    let v = trim_ows(v);
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `input` in pieces cut at `cuts`; returns every upgrade answer seen.
    fn run(
        expects: &[Expect],
        input: &[u8],
        cuts: &[usize],
    ) -> (Vec<UpgradeAnswer>, ResponseTracker) {
        let mut t = ResponseTracker::default();
        for e in expects {
            t.expect(*e);
        }
        let mut answers = Vec::new();
        let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
        bounds.sort_unstable();
        bounds.push(input.len());
        let mut prev = 0;
        for b in bounds {
            if let Ok(Some(a)) = t.feed(&input[prev..b]) {
                answers.push(a);
            }
            prev = b;
        }
        (answers, t)
    }

    const OK_LEN: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
    const OK_CHUNKED: &[u8] =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: v\r\n\r\n";
    const SWITCH: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";

    #[test]
    fn upgrade_answer_found_after_pipelined_responses() {
        let mut input = Vec::new();
        input.extend_from_slice(OK_LEN);
        input.extend_from_slice(OK_CHUNKED);
        input.extend_from_slice(b"HTTP/1.1 204 No Content\r\n\r\n");
        input.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n");
        input.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        input.extend_from_slice(SWITCH);
        input.extend_from_slice(b"\x81\x05HTTP/1.1 101 raw bytes after the switch");
        let expects = [
            Expect::Normal,
            Expect::Normal,
            Expect::Normal,
            Expect::Head,
            Expect::Upgrade,
        ];
        for cuts in [vec![], (1..input.len()).collect::<Vec<_>>()] {
            let (answers, t) = run(&expects, &input, &cuts);
            assert_eq!(answers, vec![UpgradeAnswer::Switched]);
            assert!(t.is_opaque());
            assert_eq!(t.pending(), 0);
        }
    }

    #[test]
    fn refused_upgrade_is_reported_and_tracking_goes_on() {
        let mut input = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\n\r\nno\n".to_vec();
        input.extend_from_slice(OK_LEN);
        let (answers, t) = run(&[Expect::Upgrade, Expect::Normal], &input, &[7, 40]);
        assert_eq!(answers, vec![UpgradeAnswer::Refused]);
        assert!(!t.is_opaque());
        assert_eq!(t.pending(), 0);
        assert!(t.failure().is_none());
    }

    #[test]
    fn switch_without_upgrade_request_fails() {
        let (answers, t) = run(&[Expect::Normal], SWITCH, &[]);
        assert!(answers.is_empty());
        assert_eq!(t.failure(), Some(&ResponseError::UnexpectedSwitch));
    }

    #[test]
    fn head_response_has_no_body() {
        let mut input = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".to_vec();
        input.extend_from_slice(SWITCH);
        let (answers, _) = run(&[Expect::Head, Expect::Upgrade], &input, &[]);
        assert_eq!(answers, vec![UpgradeAnswer::Switched]);
    }

    #[test]
    fn close_delimited_body_swallows_the_rest() {
        let mut input = b"HTTP/1.1 200 OK\r\n\r\nbody".to_vec();
        input.extend_from_slice(SWITCH);
        let (answers, t) = run(&[Expect::Normal, Expect::Upgrade], &input, &[]);
        assert!(answers.is_empty());
        assert!(!t.pending_upgrade());
    }

    #[test]
    fn malformed_responses_fail() {
        let cases: Vec<(&str, &[u8])> = vec![
            ("bad status line", b"HTTP/1.1 abc\r\n\r\n"),
            (
                "bad length",
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            ),
            (
                "conflicting lengths",
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            ),
            (
                "bad chunk",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            ),
            (
                "chunk without CRLF",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab",
            ),
        ];
        for (name, input) in cases {
            for cuts in [vec![], (1..input.len()).collect::<Vec<_>>()] {
                let (_, t) = run(&[Expect::Upgrade], input, &cuts);
                assert!(t.failure().is_some(), "{name}");
            }
        }
        let mut t = ResponseTracker::new(64);
        assert_eq!(
            t.feed(&[b'a'; 100]),
            Err(ResponseError::HeadTooLarge(64)),
            "oversize head"
        );
    }

    proptest! {
        /// Whatever the cuts, the same answers and the same end state.
        #[test]
        fn split_anywhere_same_result(cuts in proptest::collection::vec(0usize..400, 0..12)) {
            let mut input = Vec::new();
            input.extend_from_slice(OK_CHUNKED);
            input.extend_from_slice(OK_LEN);
            input.extend_from_slice(b"HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n");
            input.extend_from_slice(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
            input.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            let expects = [Expect::Normal, Expect::Normal, Expect::Upgrade, Expect::Normal];
            let (whole, t1) = run(&expects, &input, &[]);
            let (split, t2) = run(&expects, &input, &cuts);
            prop_assert_eq!(&whole, &split);
            prop_assert_eq!(whole, vec![UpgradeAnswer::Refused]);
            prop_assert_eq!(t1.pending(), 0);
            prop_assert_eq!(t2.pending(), 0);
            prop_assert!(t2.failure().is_none());
        }

        /// Arbitrary bytes never panic.
        #[test]
        fn junk_never_panics(input in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = run(&[Expect::Upgrade, Expect::Head, Expect::Normal], &input, &[3, 50]);
        }
    }
}
