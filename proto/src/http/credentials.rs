//! The client's credentials out, the lease in: `u`/`p` query parameters and a proxy cookie
//! removed from an accepted head, and the head written with the leased `Authorization`.
//! (`head.rs` already set the client's `Authorization` fields aside while parsing.)

use super::error::HttpError;
use super::grammar::{is_field_value_byte, is_ows, trim_ows};
use super::head::RequestHead;
use std::borrow::Cow;

/// Removes every `u` and `p` query parameter from `target`, keeping the other parameters in
/// order and byte for byte. Keys are compared after percent-decoding and `+` to space, as Go's
/// `url.ParseQuery` (InfluxDB's parser) does, so `%75=` is removed too.
pub fn strip_query_credentials(target: &str) -> Cow<'_, str> {
    let Some(q) = target.find('?') else {
        return Cow::Borrowed(target);
    };
    let (path, query) = (&target[..q], &target[q + 1..]);
    let pairs: Vec<&str> = query.split('&').collect();
    let kept: Vec<&str> = pairs
        .iter()
        .copied()
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or_default();
            let key = percent_decode_query(key.as_bytes());
            key != b"u" && key != b"p"
        })
        .collect();
    if kept.len() == pairs.len() {
        return Cow::Borrowed(target);
    }
    if kept.is_empty() {
        return Cow::Owned(path.to_owned());
    }
    Cow::Owned(format!("{path}?{}", kept.join("&")))
}

/// Decodes `%XX` and `+` like Go's `QueryUnescape`; an invalid escape is kept as is (Go would
/// drop the whole pair, so it cannot name `u` or `p` either way).
fn percent_decode_query(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => match (
                s.get(i + 1).and_then(|&b| hex(b)),
                s.get(i + 2).and_then(|&b| hex(b)),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

impl RequestHead {
    /// Removes the `u` and `p` query parameters from the target ([`strip_query_credentials`]),
    /// when [`super::FilterConfig::strip_query_credentials`] asks for it.
    pub(super) fn remove_query_credentials(&mut self) {
        if let Cow::Owned(stripped) = strip_query_credentials(&self.target) {
            self.target = stripped;
        }
    }

    /// Removes cookie `name` from every `Cookie` field (a field left empty goes), so that a
    /// cookie meant for the proxy itself (an access grant) never reaches the server. Returns how
    /// many were removed.
    pub fn remove_cookie(&mut self, name: &str) -> usize {
        let mut removed = 0;
        let mut out = Vec::with_capacity(self.fields.len());
        for line in self.fields.split_inclusive(|&b| b == b'\n') {
            let body = line.strip_suffix(b"\r\n").unwrap_or(line);
            let cookie = body
                .iter()
                .position(|&b| b == b':')
                .filter(|&c| body[..c].eq_ignore_ascii_case(b"cookie"));
            let Some(colon) = cookie else {
                out.extend_from_slice(line);
                continue;
            };
            let pairs: Vec<&[u8]> = trim_ows(&body[colon + 1..])
                .split(|&b| b == b';')
                .map(trim_ows)
                .filter(|p| !p.is_empty())
                .collect();
            let kept: Vec<&[u8]> = pairs
                .iter()
                .copied()
                .filter(|p| {
                    let n = p.split(|&b| b == b'=').next().unwrap_or_default();
                    trim_ows(n) != name.as_bytes()
                })
                .collect();
            removed += pairs.len() - kept.len();
            if kept.len() == pairs.len() {
                out.extend_from_slice(line);
            } else if kept.is_empty() {
                self.field_count -= 1;
            } else {
                out.extend_from_slice(&body[..colon]);
                out.extend_from_slice(b": ");
                out.extend_from_slice(&kept.join(&b"; "[..]));
                out.extend_from_slice(b"\r\n");
            }
        }
        self.fields = out;
        removed
    }

    /// Appends the head to `out` with one `Authorization: <authorization>` field after the
    /// client's other fields, line endings normalized to CRLF.
    ///
    /// The value is checked first (non-empty, no surrounding whitespace, no control bytes) so
    /// that a bad credential can never end the field line and inject fields of its own; on error
    /// nothing is appended.
    pub fn write_with_authorization(
        &self,
        authorization: &str,
        out: &mut Vec<u8>,
    ) -> Result<(), HttpError> {
        let value = authorization.as_bytes();
        let ok = !value.is_empty()
            && !is_ows(value[0])
            && !is_ows(value[value.len() - 1])
            && value.iter().all(|&b| is_field_value_byte(b));
        if !ok {
            return Err(HttpError::InvalidAuthorizationValue);
        }
        self.write_start(out, value.len() + 40);
        out.extend_from_slice(b"Authorization: ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n\r\n");
        Ok(())
    }
}
