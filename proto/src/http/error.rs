//! Why a request was refused, and the small complete responses the proxy answers with when it
//! answers a client itself. Errors never carry request bytes: header values may hold secrets.

use super::limits::MAX_CHUNK_LINE_LEN;

/// Why a request was refused. The caller answers with [`HttpError::status`] (400, or 501 for
/// what is never offered) and closes the connection.
///
/// No variant carries bytes of the request: header values may hold secrets (the client's own
/// `Authorization`), so errors say which rule was broken and where, never what was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The head did not end within the configured limit.
    #[error("request head exceeds {limit} bytes")]
    HeadTooLarge { limit: usize },
    /// More header (or trailer) fields than the configured limit.
    #[error("more than {limit} header fields")]
    TooManyHeaders { limit: usize },
    /// A LF not preceded by CR: RFC 9112 §2.2 lets recipients accept it, but a server that does
    /// not would see different line boundaries than we do.
    #[error("bare LF line ending (CRLF required)")]
    BareLf,
    /// A CR not followed by LF (RFC 9112 §2.2).
    #[error("bare CR not followed by LF")]
    BareCr,
    /// The request line is not `method SP request-target SP HTTP-version`.
    #[error("malformed request line")]
    BadRequestLine,
    /// The method is not a token.
    #[error("invalid method")]
    BadMethod,
    /// The request target has bytes outside visible ASCII or is not of a form valid for the method.
    #[error("invalid request target")]
    BadTarget,
    /// Only HTTP/1.1 and HTTP/1.0 are spoken (no HTTP/0.9, no other versions).
    #[error("unsupported HTTP version")]
    BadVersion,
    /// A field line starting with whitespace: obsolete line folding (RFC 9112 §5.2).
    #[error("obsolete line folding in field line {line}")]
    ObsFold { line: usize },
    /// Whitespace between a field name and the colon (RFC 9112 §5.1).
    #[error("whitespace between field name and colon in field line {line}")]
    WhitespaceBeforeColon { line: usize },
    /// A field line without a colon.
    #[error("field line {line} has no colon")]
    MissingColon { line: usize },
    /// A field name that is empty or not a token.
    #[error("invalid field name in field line {line}")]
    InvalidHeaderName { line: usize },
    /// A field value with a control character or other forbidden byte.
    #[error("invalid byte in field value of field line {line}")]
    InvalidHeaderValue { line: usize },
    /// More than one `Content-Length` field (refused even when the values agree).
    #[error("more than one Content-Length field")]
    DuplicateContentLength,
    /// A `Content-Length` that is not a plain decimal number fitting in 64 bits.
    #[error("invalid Content-Length value")]
    InvalidContentLength,
    /// Both `Content-Length` and `Transfer-Encoding` (RFC 9112 §6.3: a classic smuggling vector).
    #[error("both Content-Length and Transfer-Encoding")]
    ContentLengthAndTransferEncoding,
    /// A `Transfer-Encoding` other than exactly `chunked`.
    #[error("unsupported Transfer-Encoding (only a single `chunked` is accepted)")]
    UnsupportedTransferEncoding,
    /// More than one `Transfer-Encoding` field.
    #[error("more than one Transfer-Encoding field")]
    DuplicateTransferEncoding,
    /// `Transfer-Encoding` in an HTTP/1.0 request, whose framing RFC 9112 §6.1 calls faulty.
    #[error("Transfer-Encoding in an HTTP/1.0 request")]
    TransferEncodingInHttp10,
    /// An HTTP/1.1 request without `Host` (RFC 9112 §3.2).
    #[error("missing Host field")]
    MissingHost,
    /// More than one `Host` field (RFC 9112 §3.2).
    #[error("more than one Host field")]
    DuplicateHost,
    /// `httparse` refused a head our own checks passed; kept as a second opinion.
    #[error("malformed request head ({0})")]
    Malformed(&'static str),
    /// A chunk size that is not hexadecimal digits.
    #[error("invalid chunk size")]
    BadChunkSize,
    /// A chunk size that does not fit in 64 bits.
    #[error("chunk size overflows")]
    ChunkSizeOverflow,
    /// A chunk extension that does not follow the RFC 9112 §7.1.1 grammar.
    #[error("invalid chunk extension")]
    BadChunkExtension,
    /// A chunk-size line longer than [`MAX_CHUNK_LINE_LEN`].
    #[error("chunk-size line exceeds {MAX_CHUNK_LINE_LEN} bytes")]
    ChunkLineTooLong,
    /// Chunk data not followed by CRLF.
    #[error("chunk data not followed by CRLF")]
    MissingChunkCrlf,
    /// The trailer section exceeds the head size limit.
    #[error("trailer section exceeds {limit} bytes")]
    TrailersTooLarge { limit: usize },
    /// A trailer field that must not be sent as a trailer (credentials, framing, routing): the
    /// server might merge it into the headers after we inserted the lease.
    #[error("forbidden field in trailer line {line}")]
    ForbiddenTrailer { line: usize },
    /// The caller's `Authorization` value could not be sent safely (empty, or bytes that would
    /// end the field line).
    #[error("invalid Authorization value supplied to the filter")]
    InvalidAuthorizationValue,
    /// `CONNECT`: a tunnel to anywhere the server can reach is never offered.
    #[error("CONNECT is not supported")]
    ConnectRefused,
    /// An `Upgrade` other than a single `websocket` on an HTTP/1.1 `GET` with
    /// `Connection: upgrade` (e.g. `h2c`, `TLS/1.0`, a list of protocols).
    #[error("unsupported protocol upgrade (only a WebSocket upgrade on GET is accepted)")]
    UnsupportedUpgrade,
}

impl HttpError {
    /// The status code the client is answered with: 501 for what is well-formed but never
    /// offered (`CONNECT`, other upgrades), 400 for the rest.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            HttpError::ConnectRefused | HttpError::UnsupportedUpgrade => (501, "Not Implemented"),
            _ => (400, "Bad Request"),
        }
    }
}

/// A complete response for requests the proxy answers itself (400, 403, 502, 503): small
/// `text/plain` body, `Connection: close`. Control bytes in `reason` are replaced so the status
/// line cannot be broken.
pub fn error_response(status: u16, reason: &str, message: &str) -> Vec<u8> {
    let reason: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut body = message.to_owned();
    body.push('\n');
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Like [`error_response`], with the body InfluxDB itself sends on errors
/// (`{"error": "..."}`, `application/json`): InfluxDB clients (the `influx` CLI, the client
/// libraries) show that field to the user, and show nothing useful for a plain-text body.
pub fn json_error_response(status: u16, reason: &str, message: &str) -> Vec<u8> {
    let reason: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut body = serde_json::json!({ "error": message }).to_string();
    body.push('\n');
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A short name for what `httparse` refused, for [`HttpError::Malformed`].
pub(super) fn httparse_error_name(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid version",
    }
}
