//! A chunked request body's framing (RFC 9112 §7.1): where the filter is inside one, and the
//! chunk-size line, checked as strictly as InfluxDB's server checks it so that the two never
//! disagree on where the body ends.

use super::error::HttpError;
use super::grammar::{is_ows, is_tchar, quoted_string_end};

/// Most hex digits in a chunk size, leading zeros included: Go's net/http refuses more.
const MAX_CHUNK_SIZE_DIGITS: usize = 16;

/// Where the filter is inside a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    /// Expecting a chunk-size line.
    SizeLine,
    /// Inside chunk data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataCrlf,
    /// In the trailer section: bytes and fields seen so far.
    Trailers { bytes: usize, fields: usize },
}

/// Parses `chunk-size [ chunk-ext ]` (RFC 9112 §7.1), without the CRLF.
///
/// Stricter than the RFC where Go's net/http (InfluxDB's server) is: the size is at most 16 hex
/// digits and is followed directly by `;` or the end of the line (RFC 9112 allows whitespace
/// before `;`, Go refuses it), so the server never refuses a body the filter passed on.
pub(super) fn parse_chunk_size_line(line: &[u8]) -> Result<u64, HttpError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > MAX_CHUNK_SIZE_DIGITS {
        return Err(HttpError::BadChunkSize);
    }
    let mut size: u64 = 0;
    for &b in &line[..digits] {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => b - b'A' + 10,
        };
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(d)))
            .ok_or(HttpError::ChunkSizeOverflow)?;
    }
    let ext = &line[digits..];
    if ext.first().is_some_and(|&b| b != b';') {
        return Err(HttpError::BadChunkSize);
    }
    check_chunk_ext(ext)?;
    Ok(size)
}

/// `chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )`, with
/// `chunk-ext-val = token / quoted-string`.
fn check_chunk_ext(ext: &[u8]) -> Result<(), HttpError> {
    let skip_ws = |mut i: usize| {
        while ext.get(i).is_some_and(|&b| is_ows(b)) {
            i += 1;
        }
        i
    };
    let token_len = |i: usize| ext[i..].iter().take_while(|&&b| is_tchar(b)).count();
    let mut i = 0;
    while i < ext.len() {
        i = skip_ws(i);
        if ext.get(i) != Some(&b';') {
            return Err(HttpError::BadChunkExtension);
        }
        i = skip_ws(i + 1);
        let n = token_len(i);
        if n == 0 {
            return Err(HttpError::BadChunkExtension);
        }
        i += n;
        let j = skip_ws(i);
        if ext.get(j) == Some(&b'=') {
            i = skip_ws(j + 1);
            if ext.get(i) == Some(&b'"') {
                i = quoted_string_end(ext, i)?;
            } else {
                let n = token_len(i);
                if n == 0 {
                    return Err(HttpError::BadChunkExtension);
                }
                i += n;
            }
        }
    }
    Ok(())
}
