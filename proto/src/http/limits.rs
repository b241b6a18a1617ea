//! The filter's size limits, in one place because the request head, the chunked body and the
//! error messages all name them (and the caller sizes its read buffer by them).

/// Default limit on the size of one request head (request line, header fields, blank line).
pub const DEFAULT_MAX_HEAD_LEN: usize = 64 * 1024;
/// Default limit on the number of header fields in one request (and of trailer fields).
pub const DEFAULT_MAX_HEADERS: usize = 128;
/// Longest chunk-size line (size and extensions, without CRLF) we accept. Real clients send a few
/// hex digits; the limit keeps a hostile one from making us scan forever for the line end. Go's
/// net/http (InfluxDB) refuses a line of 4096 bytes or more with its CRLF, so 4093 without.
pub const MAX_CHUNK_LINE_LEN: usize = 4093;
