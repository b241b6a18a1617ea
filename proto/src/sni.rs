//! Reads the server name (SNI) from the start of a TLS connection without terminating TLS.
//!
//! The relay's public ingress routes `https://<service>.<relay-domain>` connections to the
//! outlet of that service while holding no key for it: it only looks at the client's first
//! flight, the ClientHello, which TLS sends in the clear, takes the `server_name` extension
//! (RFC 6066 §3) and forwards every byte it read, unchanged, to the outlet, which does the
//! handshake. rustls' `Acceptor` would consume the bytes it parses; this parser only reads them.
//!
//! Sans-IO like [`crate::codec`]: [`peek_server_name`] looks at the bytes received so far and
//! says either that more are needed or what the name is. The ClientHello may be split over
//! several TLS records (RFC 8446 §5.1 allows it), which is handled; its total size is capped
//! by the caller's `max_len`, so a peer cannot make the relay buffer more than that.

/// Default cap on the bytes read before the ClientHello must be complete. Browsers send 0.5 to
/// 2 KiB (post-quantum key shares included); 16 KiB leaves room for large session tickets.
pub const DEFAULT_MAX_HELLO: usize = 16 * 1024;

/// Longest host name accepted (RFC 1035 §2.3.4).
pub const MAX_HOST_LEN: usize = 253;

const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;
/// Largest TLSPlaintext fragment (RFC 8446 §5.1).
const MAX_FRAGMENT: usize = 1 << 14;

/// Why the first bytes of a connection are not a usable ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SniError {
    /// The first record is not a TLS handshake record (e.g. plain HTTP on the TLS port).
    #[error("not a TLS handshake record")]
    NotTls,
    /// The first handshake message is not a ClientHello.
    #[error("the first handshake message is not a ClientHello")]
    NotClientHello,
    /// The ClientHello did not end within the cap.
    #[error("ClientHello exceeds {limit} bytes")]
    TooLarge { limit: usize },
    /// A length field points past its container, or a field is missing.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// The `server_name` extension holds a name that is not a valid DNS host name.
    #[error("invalid server name in ClientHello")]
    BadName,
}

/// The answer for a complete ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The `host_name` the client asked for, lowercased, without a trailing dot; `None` when
    /// the client sent no `server_name` extension (e.g. it connected by IP address).
    pub server_name: Option<String>,
}

/// Looks at the first bytes a client sent. `Ok(None)`: the ClientHello is not complete yet,
/// read more and call again with all the bytes so far. Fails once `buf` holds `max_len` bytes
/// or more without a complete ClientHello.
pub fn peek_server_name(buf: &[u8], max_len: usize) -> Result<Option<ClientHelloInfo>, SniError> {
    // Reassemble the handshake message from the fragments of consecutive handshake records.
    let mut hs: Vec<u8> = Vec::new();
    let mut pos = 0;
    loop {
        let Some(header) = buf.get(pos..pos + RECORD_HEADER) else {
            return incomplete(
                buf,
                max_len,
                pos == 0 && !buf.is_empty() && buf[0] != CONTENT_HANDSHAKE,
            );
        };
        if header[0] != CONTENT_HANDSHAKE || header[1] != 3 {
            return Err(if pos == 0 {
                SniError::NotTls
            } else {
                SniError::Malformed("a non-handshake record inside the ClientHello")
            });
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_FRAGMENT {
            return Err(SniError::Malformed("record length"));
        }
        let Some(fragment) = buf.get(pos + RECORD_HEADER..pos + RECORD_HEADER + len) else {
            // Judge the handshake header already, so that a hello announcing more than the cap
            // is refused before its bytes are waited for.
            let partial = buf.get(pos + RECORD_HEADER..).unwrap_or_default();
            let mut head = hs.clone();
            head.extend_from_slice(&partial[..partial.len().min(4)]);
            check_handshake_header(&head, max_len)?;
            return incomplete(buf, max_len, false);
        };
        hs.extend_from_slice(fragment);
        pos += RECORD_HEADER + len;
        if let Some(body_len) = check_handshake_header(&hs, max_len)? {
            if hs.len() >= 4 + body_len {
                return parse_client_hello(&hs[4..4 + body_len]).map(Some);
            }
        }
        if pos >= max_len {
            return Err(SniError::TooLarge { limit: max_len });
        }
    }
}

/// Checks the start of the handshake message: a ClientHello whose announced length fits in
/// `max_len` with at least one record header in front. Returns the body length once known.
fn check_handshake_header(hs: &[u8], max_len: usize) -> Result<Option<usize>, SniError> {
    match hs.first() {
        None => return Ok(None),
        Some(&HANDSHAKE_CLIENT_HELLO) => {}
        Some(_) => return Err(SniError::NotClientHello),
    }
    let Some(len) = hs.get(1..4) else {
        return Ok(None);
    };
    let body_len = (usize::from(len[0]) << 16) | (usize::from(len[1]) << 8) | usize::from(len[2]);
    if RECORD_HEADER + 4 + body_len > max_len {
        return Err(SniError::TooLarge { limit: max_len });
    }
    Ok(Some(body_len))
}

fn incomplete(
    buf: &[u8],
    max_len: usize,
    not_tls: bool,
) -> Result<Option<ClientHelloInfo>, SniError> {
    if not_tls {
        // One byte is enough to tell plain text from a handshake record.
        return Err(SniError::NotTls);
    }
    if buf.len() >= max_len {
        return Err(SniError::TooLarge { limit: max_len });
    }
    Ok(None)
}

/// A cursor over a byte slice whose reads fail instead of panicking.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SniError> {
        if self.rest.len() < n {
            return Err(SniError::Malformed(what));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, SniError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, SniError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let n = usize::from(self.u8(what)?);
        self.take(n, what)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let n = usize::from(self.u16(what)?);
        self.take(n, what)
    }
}

/// Parses a ClientHello body (RFC 8446 §4.1.2; TLS 1.2's is the same up to the extensions).
fn parse_client_hello(body: &[u8]) -> Result<ClientHelloInfo, SniError> {
    let mut r = Reader { rest: body };
    let version = r.take(2, "legacy_version")?;
    if version[0] != 3 {
        return Err(SniError::Malformed("legacy_version"));
    }
    r.take(32, "random")?;
    let session_id = r.vec8("legacy_session_id")?;
    if session_id.len() > 32 {
        return Err(SniError::Malformed("legacy_session_id"));
    }
    let suites = r.vec16("cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(SniError::Malformed("cipher_suites"));
    }
    if r.vec8("legacy_compression_methods")?.is_empty() {
        return Err(SniError::Malformed("legacy_compression_methods"));
    }
    if r.rest.is_empty() {
        // A TLS 1.2 ClientHello may end here: no extensions, so no name.
        return Ok(ClientHelloInfo { server_name: None });
    }
    let mut exts = Reader {
        rest: r.vec16("extensions")?,
    };
    if !r.rest.is_empty() {
        return Err(SniError::Malformed("bytes after the extensions"));
    }
    let mut seen = std::collections::HashSet::new();
    let mut server_name = None;
    while !exts.rest.is_empty() {
        let ty = exts.u16("extension type")?;
        let data = exts.vec16("extension data")?;
        if !seen.insert(ty) {
            // RFC 8446 §4.2: at most one extension of each type.
            return Err(SniError::Malformed("duplicate extension"));
        }
        if ty == EXT_SERVER_NAME {
            server_name = parse_server_name(data)?;
        }
    }
    Ok(ClientHelloInfo { server_name })
}

/// Parses the `server_name` extension's ServerNameList and returns its host name.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, SniError> {
    let mut r = Reader { rest: data };
    let mut list = Reader {
        rest: r.vec16("server_name_list")?,
    };
    if !r.rest.is_empty() || list.rest.is_empty() {
        return Err(SniError::Malformed("server_name_list"));
    }
    let mut host = None;
    while !list.rest.is_empty() {
        let ty = list.u8("name_type")?;
        let name = list.vec16("host_name")?;
        if ty != NAME_TYPE_HOST {
            continue;
        }
        if host.is_some() {
            // RFC 6066 §3: no more than one name of the same name_type.
            return Err(SniError::Malformed("more than one host_name"));
        }
        host = Some(valid_host(name)?);
    }
    Ok(host)
}

/// Checks a host name (letters, digits, `-`, `.`; labels of 1 to 63 bytes) and lowercases it.
fn valid_host(name: &[u8]) -> Result<String, SniError> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > MAX_HOST_LEN {
        return Err(SniError::BadName);
    }
    for label in name.split(|&b| b == b'.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(SniError::BadName);
        }
    }
    let s = std::str::from_utf8(name).map_err(|_| SniError::BadName)?;
    Ok(s.to_ascii_lowercase())
}

/// The service a public host name asks for: `<service>.<domain>` gives `<service>` (one label,
/// compared case-insensitively, a trailing dot ignored); any other name gives `None`.
pub fn service_label<'a>(host: &'a str, domain: &str) -> Option<&'a str> {
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.len() <= domain.len() + 1 {
        return None;
    }
    let split = host.len() - domain.len();
    let (label, suffix) = host.split_at(split);
    let label = label.strip_suffix('.')?;
    (suffix.eq_ignore_ascii_case(domain) && !label.is_empty() && !label.contains('.'))
        .then_some(label)
}

/// A TLS alert record `unrecognized_name` (fatal): what the relay sends before closing a
/// connection whose name routes nowhere (RFC 6066 §3).
pub const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [21, 3, 3, 0, 2, 2, 112];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A ClientHello as rustls' client sends it, so the tests see real-world bytes.
    fn real_hello(name: Option<&str>) -> Vec<u8> {
        use std::sync::Arc;
        let roots = rustls::RootCertStore::empty();
        let mut cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.enable_sni = name.is_some();
        let server =
            rustls::pki_types::ServerName::try_from(name.unwrap_or("127.0.0.1").to_owned())
                .expect("server name");
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), server).expect("client");
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).expect("write");
        }
        out
    }

    /// Writes real ClientHellos (whole and split over records) and a few non-TLS openings into
    /// `fuzz/corpus/sni` when `$POSTERN_WRITE_SEED_CORPUS` is set (see fuzz/README.md).
    #[test]
    fn write_seed_corpus() {
        let Some(dir) = crate::seed_corpus_dir("sni") else {
            return;
        };
        let hello = real_hello(Some("influxdb.relay.example.com"));
        std::fs::write(dir.join("hello"), &hello).expect("write seed");
        std::fs::write(dir.join("hello-no-sni"), real_hello(None)).expect("write seed");
        std::fs::write(dir.join("hello-fragmented"), refragment(&hello, 100)).expect("write seed");
        std::fs::write(dir.join("http"), b"GET / HTTP/1.1\r\n").expect("write seed");
        std::fs::write(dir.join("alert"), ALERT_UNRECOGNIZED_NAME).expect("write seed");
    }

    #[test]
    fn real_client_hello_names_the_host() {
        let hello = real_hello(Some("InfluxDB.Relay.Example.com"));
        let info = peek_server_name(&hello, DEFAULT_MAX_HELLO)
            .expect("parse")
            .expect("complete");
        assert_eq!(
            info.server_name.as_deref(),
            Some("influxdb.relay.example.com")
        );
    }

    #[test]
    fn missing_sni_is_none() {
        let hello = real_hello(None);
        let info = peek_server_name(&hello, DEFAULT_MAX_HELLO)
            .expect("parse")
            .expect("complete");
        assert_eq!(info.server_name, None);
    }

    #[test]
    fn every_truncation_asks_for_more() {
        let hello = real_hello(Some("a.example.com"));
        for cut in 0..hello.len() {
            assert_eq!(
                peek_server_name(&hello[..cut], DEFAULT_MAX_HELLO),
                Ok(None),
                "cut at {cut}"
            );
        }
    }

    /// Splits one handshake message into records of `size` bytes of fragment each.
    fn refragment(hello: &[u8], size: usize) -> Vec<u8> {
        let hs = &hello[RECORD_HEADER..];
        let mut out = Vec::new();
        for piece in hs.chunks(size) {
            out.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            out.extend_from_slice(piece);
        }
        out
    }

    #[test]
    fn hello_split_over_records_is_reassembled() {
        let hello = real_hello(Some("svc.example.com"));
        for size in [1, 3, 7, 100] {
            let split = refragment(&hello, size);
            let info = peek_server_name(&split, 64 * 1024)
                .expect("parse")
                .expect("complete");
            assert_eq!(info.server_name.as_deref(), Some("svc.example.com"));
            for cut in 0..split.len() {
                assert_eq!(peek_server_name(&split[..cut], 64 * 1024), Ok(None));
            }
        }
    }

    #[test]
    fn oversize_hello_is_refused() {
        let hello = real_hello(Some("a.example.com"));
        let cap = hello.len() - 1;
        assert_eq!(
            peek_server_name(&hello, cap),
            Err(SniError::TooLarge { limit: cap })
        );
        // A handshake header announcing 16 MiB is refused before the bytes arrive.
        let huge = [CONTENT_HANDSHAKE, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff];
        assert_eq!(
            peek_server_name(&huge, DEFAULT_MAX_HELLO),
            Err(SniError::TooLarge {
                limit: DEFAULT_MAX_HELLO
            })
        );
        // Many tiny records never completing the message are cut off at the cap.
        let tiny = refragment(&real_hello(Some("a.example.com")), 1);
        assert!(matches!(
            peek_server_name(&tiny, 200),
            Err(SniError::TooLarge { .. })
        ));
    }

    #[test]
    fn plain_http_and_other_messages_are_not_tls() {
        assert_eq!(
            peek_server_name(b"GET / HTTP/1.1\r\n", DEFAULT_MAX_HELLO),
            Err(SniError::NotTls)
        );
        assert_eq!(
            peek_server_name(b"G", DEFAULT_MAX_HELLO),
            Err(SniError::NotTls)
        );
        let mut hello = real_hello(Some("a.example.com"));
        hello[RECORD_HEADER] = 2; // ServerHello
        assert_eq!(
            peek_server_name(&hello, DEFAULT_MAX_HELLO),
            Err(SniError::NotClientHello)
        );
        let zero = [CONTENT_HANDSHAKE, 3, 1, 0, 0];
        assert!(matches!(
            peek_server_name(&zero, DEFAULT_MAX_HELLO),
            Err(SniError::Malformed(_))
        ));
    }

    /// Builds a ClientHello record around `extensions`.
    fn hello_with_extensions(extensions: &[u8]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(extensions);
        let mut hs = vec![HANDSHAKE_CLIENT_HELLO, 0];
        hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
        hs.extend_from_slice(&body);
        let mut rec = vec![CONTENT_HANDSHAKE, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    fn sni_ext(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (ty, name) in entries {
            list.push(*ty);
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        let mut ext = EXT_SERVER_NAME.to_be_bytes().to_vec();
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(&data);
        ext
    }

    #[test]
    fn malformed_server_names_are_refused() {
        let parse =
            |ext: Vec<u8>| peek_server_name(&hello_with_extensions(&ext), DEFAULT_MAX_HELLO);
        assert_eq!(
            parse(sni_ext(&[(0, b"ok.example")])),
            Ok(Some(ClientHelloInfo {
                server_name: Some("ok.example".into())
            }))
        );
        assert_eq!(parse(sni_ext(&[(0, b"bad name")])), Err(SniError::BadName));
        assert_eq!(parse(sni_ext(&[(0, b"a..b")])), Err(SniError::BadName));
        assert_eq!(parse(sni_ext(&[(0, b"")])), Err(SniError::BadName));
        assert_eq!(parse(sni_ext(&[(0, b"a\0b")])), Err(SniError::BadName));
        let long = vec![b'a'; 64];
        assert_eq!(parse(sni_ext(&[(0, &long)])), Err(SniError::BadName));
        assert!(matches!(
            parse(sni_ext(&[(0, b"a.x"), (0, b"b.x")])),
            Err(SniError::Malformed(_))
        ));
        let mut twice = sni_ext(&[(0, b"a.x")]);
        twice.extend(sni_ext(&[(0, b"a.x")]));
        assert!(matches!(parse(twice), Err(SniError::Malformed(_))));
        // A length pointing past the extension.
        let mut bad = sni_ext(&[(0, b"a.x")]);
        bad[5] = 0xff;
        assert!(matches!(parse(bad), Err(SniError::Malformed(_))));
        // An unknown name type alone gives no name.
        assert_eq!(
            parse(sni_ext(&[(7, b"whatever")])),
            Ok(Some(ClientHelloInfo { server_name: None }))
        );
    }

    #[test]
    fn service_label_takes_one_label_under_the_domain() {
        let d = "relay.example.com";
        assert_eq!(
            service_label("influxdb.relay.example.com", d),
            Some("influxdb")
        );
        assert_eq!(
            service_label("influxdb.relay.example.com.", d),
            Some("influxdb")
        );
        assert_eq!(
            service_label("InfluxDB.RELAY.example.com", d),
            Some("InfluxDB")
        );
        assert_eq!(service_label("relay.example.com", d), None);
        assert_eq!(service_label("a.b.relay.example.com", d), None);
        assert_eq!(service_label("influxdbrelay.example.com", d), None);
        assert_eq!(service_label("influxdb.other.com", d), None);
        assert_eq!(service_label(".relay.example.com", d), None);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = peek_server_name(&bytes, DEFAULT_MAX_HELLO);
        }

        #[test]
        fn mutated_real_hello_never_panics(pos in 0usize..512, val in any::<u8>()) {
            let mut hello = real_hello(Some("svc.example.com"));
            let i = pos % hello.len();
            hello[i] = val;
            let _ = peek_server_name(&hello, DEFAULT_MAX_HELLO);
        }
    }
}
