//! The RFC 9110 byte classes and small parsers that the request head, the chunked body and the
//! credential code share: tokens, whitespace, field values, field lines, quoted strings.

use super::error::HttpError;

/// RFC 9110 §5.6.2 `tchar`.
pub(super) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

pub(super) fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// RFC 9110 §5.5 field-value bytes: VCHAR, obs-text, SP, HTAB.
pub(super) fn is_field_value_byte(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

pub(super) fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = v {
        if !is_ows(*first) {
            break;
        }
        v = rest;
    }
    while let [rest @ .., last] = v {
        if !is_ows(*last) {
            break;
        }
        v = rest;
    }
    v
}

/// Checks one field line (without CRLF) and returns its name and trimmed value. `line` is the
/// 1-based field number, for error messages.
pub(super) fn check_field_line(bytes: &[u8], line: usize) -> Result<(&[u8], &[u8]), HttpError> {
    if bytes.first().is_some_and(|&b| is_ows(b)) {
        return Err(HttpError::ObsFold { line });
    }
    let Some(colon) = bytes.iter().position(|&b| b == b':') else {
        return Err(HttpError::MissingColon { line });
    };
    let name = &bytes[..colon];
    if name.last().is_some_and(|&b| is_ows(b)) {
        return Err(HttpError::WhitespaceBeforeColon { line });
    }
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(HttpError::InvalidHeaderName { line });
    }
    let value = &bytes[colon + 1..];
    if !value.iter().all(|&b| is_field_value_byte(b)) {
        return Err(HttpError::InvalidHeaderValue { line });
    }
    Ok((name, trim_ows(value)))
}

/// Trailer fields a server must not see: credentials (they would bypass the lease), framing and
/// routing (RFC 9110 §6.5.1).
pub(super) fn is_forbidden_trailer(name: &[u8]) -> bool {
    [
        "authorization",
        "proxy-authorization",
        "content-length",
        "transfer-encoding",
        "host",
        "connection",
        "upgrade",
        "te",
        "trailer",
        "expect",
    ]
    .iter()
    .any(|f| name.eq_ignore_ascii_case(f.as_bytes()))
}

/// Given `s[start] == '"'`, returns the index after the closing quote of the quoted-string.
pub(super) fn quoted_string_end(s: &[u8], start: usize) -> Result<usize, HttpError> {
    let mut i = start + 1;
    loop {
        match s.get(i) {
            None => return Err(HttpError::BadChunkExtension),
            Some(b'"') => return Ok(i + 1),
            Some(b'\\') => match s.get(i + 1) {
                Some(&b) if is_field_value_byte(b) => i += 2,
                _ => return Err(HttpError::BadChunkExtension),
            },
            Some(&b) if is_field_value_byte(b) => i += 1,
            Some(_) => return Err(HttpError::BadChunkExtension),
        }
    }
}

pub(super) fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}
