//! One request head: parsed and checked (request line, target, field lines, framing, upgrade)
//! as strictly as InfluxDB's server parses it, then held for the filter's caller with the
//! client's `Authorization` and `Proxy-Authorization` fields already set aside. Taking the other
//! credentials out (query, cookies) and putting the lease in is `credentials.rs`'s job.

use super::error::{httparse_error_name, HttpError};
use super::grammar::{check_field_line, is_tchar, starts_with_ignore_case, trim_ows};
use super::limits::{DEFAULT_MAX_HEADERS, DEFAULT_MAX_HEAD_LEN};
use std::borrow::Cow;

/// How the filter treats requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterConfig {
    /// Largest request head accepted, in bytes, counting empty lines before the request line.
    /// The caller's read buffer must hold at least this many bytes. Also bounds the size of a
    /// chunked body's trailer section.
    pub max_head_len: usize,
    /// Most header fields accepted in one request head (and trailer fields after a chunked body).
    pub max_headers: usize,
    /// Remove the `u` and `p` query parameters from request targets: InfluxDB 1.x (and the 1.x
    /// compatibility API of 2.x) takes credentials from them, and prefers them to the
    /// `Authorization` header, so a client's own credentials there would win over the lease.
    pub strip_query_credentials: bool,
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            max_head_len: DEFAULT_MAX_HEAD_LEN,
            max_headers: DEFAULT_MAX_HEADERS,
            strip_query_credentials: false,
        }
    }
}

/// HTTP version of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        }
    }
}

/// How the body of a request is delimited (RFC 9112 §6.3, request rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No `Content-Length` and no `Transfer-Encoding` (or `Content-Length: 0`): no body.
    None,
    /// `Content-Length` bytes follow the head.
    Length(u64),
    /// A chunked body follows the head.
    Chunked,
}

/// One accepted request head, with the client's credentials already taken out.
///
/// Holds the request line (target possibly rewritten) and the remaining field lines with their
/// bytes as received. `Debug` shows neither the target (its query may hold secrets when query
/// stripping is off) nor field values.
#[derive(Clone, PartialEq, Eq)]
pub struct RequestHead {
    method: String,
    /// Rewritten in `credentials.rs` (query credentials out).
    pub(super) target: String,
    version: Version,
    /// Kept field lines, each followed by CRLF, bytes as received (`credentials.rs` takes
    /// cookies out of them).
    pub(super) fields: Vec<u8>,
    pub(super) field_count: usize,
    removed_credentials: usize,
    /// The value of each `Authorization` field the client sent (never forwarded, never shown by
    /// `Debug`): the outlet checks it against the peer's lease.
    presented: Vec<Vec<u8>>,
    framing: BodyFraming,
    upgrade: bool,
}

impl std::fmt::Debug for RequestHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestHead")
            .field("method", &self.method)
            .field("version", &self.version)
            .field("field_count", &self.field_count)
            .field("removed_credentials", &self.removed_credentials)
            .field("framing", &self.framing)
            .field("upgrade", &self.upgrade)
            .finish_non_exhaustive()
    }
}

impl RequestHead {
    /// The request method (case-sensitive, as sent).
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The request target as it will be forwarded (`u`/`p` removed when configured). May still
    /// hold secrets in its query when stripping is off: do not log it whole.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The target without its query, safe to log.
    pub fn path(&self) -> &str {
        match self.target.find('?') {
            Some(q) => &self.target[..q],
            None => &self.target,
        }
    }

    /// The request's HTTP version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// How the body that follows is delimited.
    pub fn framing(&self) -> BodyFraming {
        self.framing
    }

    /// Whether this is a WebSocket upgrade request: after its body the filter waits for the
    /// server's answer ([`super::Step::AwaitUpgrade`]).
    pub fn is_upgrade(&self) -> bool {
        self.upgrade
    }

    /// How many `Authorization` / `Proxy-Authorization` fields were removed.
    pub fn removed_credentials(&self) -> usize {
        self.removed_credentials
    }

    /// The client's `Authorization` value when it sent exactly one `Authorization` field (and no
    /// `Proxy-Authorization`), else `None`. A secret: compare it, never log it.
    pub fn presented_authorization(&self) -> Option<&[u8]> {
        match self.presented.as_slice() {
            [one] if self.removed_credentials == 1 => Some(one),
            _ => None,
        }
    }

    /// Values of the fields named `name` (case-insensitive), without surrounding whitespace, in
    /// the order received. They may hold secrets (cookies): never log them.
    pub fn field_values(&self, name: &str) -> Vec<&[u8]> {
        self.fields
            .split(|&b| b == b'\n')
            .filter_map(|line| {
                let line = line.strip_suffix(b"\r")?;
                let colon = line.iter().position(|&b| b == b':')?;
                let (n, v) = line.split_at(colon);
                n.eq_ignore_ascii_case(name.as_bytes())
                    .then(|| trim_ows(&v[1..]))
            })
            .collect()
    }

    /// Appends the head to `out` without any `Authorization` field (the client's were removed),
    /// line endings normalized to CRLF.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        self.write_start(out, 16);
        out.extend_from_slice(b"\r\n");
    }

    /// Appends the request line and the kept field lines, reserving room for `more` bytes in
    /// all beyond them: what [`RequestHead::write_to`] and
    /// [`RequestHead::write_with_authorization`] both write before their ends differ.
    pub(super) fn write_start(&self, out: &mut Vec<u8>, more: usize) {
        out.reserve(self.method.len() + self.target.len() + self.fields.len() + more);
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.target.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.version.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.fields);
    }
}

/// Validates a complete head (no leading empty lines, ending with CRLF CRLF, line endings
/// already checked) and builds the [`RequestHead`].
pub(super) fn parse_head(head: &[u8], cfg: &FilterConfig) -> Result<RequestHead, HttpError> {
    // Lines without their CRLF; the head ends with an empty line, which we drop.
    let body = &head[..head.len() - 2];
    let mut lines = body
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let (method, target, version) = parse_request_line(request_line)?;
    check_target(target)?;

    let mut fields = Vec::with_capacity(head.len());
    let mut field_count = 0;
    let mut removed_credentials = 0;
    let mut content_length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut hosts = 0usize;
    let mut upgrades = 0usize;
    let mut websocket = false;
    let mut connection_upgrade = false;
    let mut presented = Vec::new();
    for (idx, line) in lines.filter(|l| !l.is_empty()).enumerate() {
        let n = idx + 1;
        let (name, value) = check_field_line(line, n)?;
        let is = |f: &str| name.eq_ignore_ascii_case(f.as_bytes());
        if is("authorization") || is("proxy-authorization") {
            // Proxy-Authorization is meant for us, the proxy, and we use none: forwarding it
            // would hand the server a credential of the client's.
            removed_credentials += 1;
            if is("authorization") {
                presented.push(value.to_vec());
            }
            continue;
        }
        if is("content-length") {
            if content_length.is_some() {
                return Err(HttpError::DuplicateContentLength);
            }
            content_length = Some(parse_content_length(value)?);
        } else if is("transfer-encoding") {
            if transfer_encoding {
                return Err(HttpError::DuplicateTransferEncoding);
            }
            if !value.eq_ignore_ascii_case(b"chunked") {
                return Err(HttpError::UnsupportedTransferEncoding);
            }
            transfer_encoding = true;
        } else if is("host") {
            if !is_valid_host(value) {
                return Err(HttpError::InvalidHeaderValue { line: n });
            }
            hosts += 1;
        } else if is("upgrade") {
            upgrades += 1;
            websocket = value.eq_ignore_ascii_case(b"websocket");
        } else if is("connection") {
            connection_upgrade |= value
                .split(|&b| b == b',')
                .any(|t| trim_ows(t).eq_ignore_ascii_case(b"upgrade"));
        }
        fields.extend_from_slice(line);
        fields.extend_from_slice(b"\r\n");
        field_count += 1;
    }

    // Second opinion from httparse: anything it refuses, we refuse too.
    let mut parsed = vec![httparse::EMPTY_HEADER; cfg.max_headers];
    let mut req = httparse::Request::new(&mut parsed);
    match req.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Ok(_) => return Err(HttpError::Malformed("incomplete")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::TooManyHeaders {
                limit: cfg.max_headers,
            })
        }
        Err(e) => return Err(HttpError::Malformed(httparse_error_name(e))),
    }

    if hosts > 1 {
        return Err(HttpError::DuplicateHost);
    }
    if hosts == 0 && version == Version::Http11 {
        return Err(HttpError::MissingHost);
    }
    let framing = match (content_length, transfer_encoding) {
        (Some(_), true) => return Err(HttpError::ContentLengthAndTransferEncoding),
        (None, true) if version == Version::Http10 => {
            return Err(HttpError::TransferEncodingInHttp10)
        }
        (None, true) => BodyFraming::Chunked,
        (Some(0), false) | (None, false) => BodyFraming::None,
        (Some(n), false) => BodyFraming::Length(n),
    };
    // One WebSocket upgrade, on GET over HTTP/1.1, announced in `Connection` too. Anything else
    // that names an upgrade is refused: a server that ignores the header answers normally, and
    // we must not guess which way it went.
    let upgrade = upgrades > 0;
    if upgrade
        && !(upgrades == 1
            && websocket
            && connection_upgrade
            && method == "GET"
            && version == Version::Http11)
    {
        return Err(HttpError::UnsupportedUpgrade);
    }
    Ok(RequestHead {
        method: method.to_owned(),
        target: origin_form(target).into_owned(),
        version,
        fields,
        field_count,
        removed_credentials,
        presented,
        framing,
        upgrade,
    })
}

/// Reduces an absolute-form target (`http://user:pw@host:8086/write?db=x`) to origin-form
/// (`/write?db=x`): the authority, and with it any userinfo (a credential the server could
/// otherwise read), never reaches the server or a log. Other forms are returned as they are.
fn origin_form(target: &str) -> Cow<'_, str> {
    let rest = if starts_with_ignore_case(target, "http://") {
        &target[7..]
    } else if starts_with_ignore_case(target, "https://") {
        &target[8..]
    } else {
        return Cow::Borrowed(target);
    };
    // The authority ends at the first `/`, `?` or `#` (RFC 3986 §3.2).
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let tail = &rest[end..];
    let tail = tail.split('#').next().unwrap_or_default();
    if tail.starts_with('/') {
        Cow::Owned(tail.to_owned())
    } else {
        Cow::Owned(format!("/{tail}"))
    }
}

/// `method SP request-target SP HTTP-version`, exactly (RFC 9112 §3).
fn parse_request_line(line: &[u8]) -> Result<(&str, &str, Version), HttpError> {
    let mut parts = line.splitn(3, |&b| b == b' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        // Covers HTTP/0.9's `GET /path`.
        return Err(HttpError::BadRequestLine);
    };
    if method.is_empty() || target.is_empty() {
        return Err(HttpError::BadRequestLine);
    }
    if !method.iter().all(|&b| is_tchar(b)) {
        return Err(HttpError::BadMethod);
    }
    if !target.iter().all(|&b| (b'!'..=b'~').contains(&b)) {
        return Err(HttpError::BadTarget);
    }
    let version = match version {
        b"HTTP/1.1" => Version::Http11,
        b"HTTP/1.0" => Version::Http10,
        v if v.contains(&b' ') => return Err(HttpError::BadRequestLine),
        _ => return Err(HttpError::BadVersion),
    };
    // Both are ASCII by the checks above.
    let (Ok(method), Ok(target)) = (std::str::from_utf8(method), std::str::from_utf8(target))
    else {
        return Err(HttpError::BadRequestLine);
    };
    // RFC 9112 §3.2: origin-form, absolute-form, authority-form (CONNECT only), asterisk-form
    // (OPTIONS only).
    let form_ok = if method == "CONNECT" {
        // Refused in any form; say so rather than "bad target".
        return Err(HttpError::ConnectRefused);
    } else {
        target.starts_with('/')
            || (target == "*" && method == "OPTIONS")
            || starts_with_ignore_case(target, "http://")
            || starts_with_ignore_case(target, "https://")
    };
    if !form_ok {
        return Err(HttpError::BadTarget);
    }
    Ok((method, target, version))
}

/// A `Content-Length` value: one or more digits, nothing else (no sign, no list), at most
/// 2^63 - 1 (Go's net/http refuses larger ones).
fn parse_content_length(v: &[u8]) -> Result<u64, HttpError> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return Err(HttpError::InvalidContentLength);
    }
    v.iter()
        .try_fold(0u64, |acc, &d| {
            acc.checked_mul(10)
                .and_then(|a| a.checked_add(u64::from(d - b'0')))
                .ok_or(HttpError::InvalidContentLength)
        })
        .and_then(|n| {
            if n > i64::MAX as u64 {
                Err(HttpError::InvalidContentLength)
            } else {
                Ok(n)
            }
        })
}

/// A `Host` value Go's net/http accepts (`httpguts.ValidHostHeader`): empty, or only the bytes
/// of a URI host and port (letters, digits, `-._~`, sub-delims, `%`, `:`, `[`, `]`). InfluxDB
/// answers anything else with 400, so the filter refuses it first.
fn is_valid_host(v: &[u8]) -> bool {
    v.iter().all(|&b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b'-'
                    | b'.'
                    | b':'
                    | b';'
                    | b'='
                    | b'['
                    | b']'
                    | b'_'
                    | b'~'
            )
    })
}

/// Checks a request target the way Go's `url.ParseRequestURI` (InfluxDB's server) does, or
/// more strictly, so the server never refuses a target the filter passed on: every `%` in the
/// path is followed by two hex digits, and an absolute-form authority holds only the bytes of
/// a plain host name or address, an optional userinfo and a numeric port.
fn check_target(target: &str) -> Result<(), HttpError> {
    let b = target.as_bytes();
    let path_end = b.iter().position(|&c| c == b'?').unwrap_or(b.len());
    let path = &b[..path_end];
    let pct_ok = |s: &[u8]| {
        s.iter().enumerate().all(|(i, &c)| {
            c != b'%'
                || (s.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && s.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
        })
    };
    if !pct_ok(path) {
        return Err(HttpError::BadTarget);
    }
    let Some(rest) = path
        .iter()
        .position(|&c| c == b':')
        .filter(|&i| path[i..].starts_with(b"://") && !path.starts_with(b"/"))
        .map(|i| &path[i + 3..])
    else {
        return Ok(());
    };
    let authority = &rest[..rest.iter().position(|&c| c == b'/').unwrap_or(rest.len())];
    let (userinfo, hostport) = match authority.iter().rposition(|&c| c == b'@') {
        Some(at) => (&authority[..at], &authority[at + 1..]),
        None => (&authority[..0], authority),
    };
    let userinfo_ok = userinfo.iter().all(|&c| {
        c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b':' | b'%')
    });
    let (host, port) = if let Some(inner) = hostport.strip_prefix(b"[") {
        let Some(close) = inner.iter().position(|&c| c == b']') else {
            return Err(HttpError::BadTarget);
        };
        let addr_ok = inner[..close]
            .iter()
            .all(|&c| c.is_ascii_hexdigit() || matches!(c, b':' | b'.'));
        if !addr_ok {
            return Err(HttpError::BadTarget);
        }
        (&inner[..0], &inner[close + 1..])
    } else {
        match hostport.iter().position(|&c| c == b':') {
            Some(i) => (&hostport[..i], &hostport[i..]),
            None => (hostport, &hostport[..0]),
        }
    };
    let host_ok = host
        .iter()
        .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~'));
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    if userinfo_ok && pct_ok(userinfo) && host_ok && port_ok {
        Ok(())
    } else {
        Err(HttpError::BadTarget)
    }
}
