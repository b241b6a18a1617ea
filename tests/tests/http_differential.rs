//! Differential test of the HTTP filter against the server behind it: every input of a corpus
//! of tricky requests goes both straight to a real influxd 1.x (auth enabled; Go's net/http
//! parses it) and through [`RequestFilter`]. The filter must be at least as strict as the
//! server: when the filter lets an input through, influxd must neither refuse it (400) nor see
//! a different number of requests in it, or the two disagree on message boundaries and a
//! request could be smuggled past the filter.
//!
//! The corpus: the filter's own table of malformed and ambiguous requests and valid samples
//! (`fuzz/corpus/http_request`, written from proto/src/http/tests.rs's tables), and the inputs
//! below: chunk extensions, whitespace, header grammar, absolute-form targets and other edges
//! of Go's net/http. Each input is followed by a sentinel request carrying
//! `Connection: close`, so the filter and influxd both have to find where the input ends.

use base64::Engine;
use postern_proto::http::{FilterConfig, HttpError, RequestFilter, RequestHead, Step, Version};
use postern_tests::influxd::{Influxd, InfluxdOptions};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SENTINEL: &[u8] =
    b"GET /ping?sentinel HTTP/1.1\r\nHost: sentinel\r\nConnection: close\r\n\r\n";

/// How long influxd gets to answer one input and close the connection; an input it takes as
/// incomplete (it waits for more body) runs into this, and then shows as fewer answers.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

/// What the filter made of a stream: the heads it let through, and whether it refused the
/// stream (and with what) or it ended between requests.
struct Filtered {
    heads: Vec<RequestHead>,
    error: Option<HttpError>,
    between_requests: bool,
    /// The filter let the rest through as an opaque tunnel (after `Upgrade` or `CONNECT`).
    opaque: bool,
}

fn filter(input: &[u8]) -> Filtered {
    let mut f = RequestFilter::new(FilterConfig::default());
    let mut heads = Vec::new();
    let mut pos = 0;
    loop {
        match f.step(&input[pos..]) {
            Err(e) => {
                return Filtered {
                    heads,
                    error: Some(e),
                    between_requests: false,
                    opaque: false,
                }
            }
            Ok(Step::NeedMore) => {
                return Filtered {
                    heads,
                    error: None,
                    between_requests: pos == input.len() && f.between_requests(),
                    opaque: false,
                }
            }
            Ok(Step::Head { head, consumed }) => {
                heads.push(*head);
                pos += consumed;
            }
            Ok(Step::Body { len }) => pos += len,
            // influxd never switches protocols: the filter goes on with the next request.
            Ok(Step::AwaitUpgrade) => f.upgrade_answered(false),
            Ok(Step::Opaque) => {
                return Filtered {
                    heads,
                    error: None,
                    between_requests: false,
                    opaque: true,
                }
            }
        }
    }
}

/// How many answers the server owes for `heads`, at least and at most: up to and including the
/// first request after which it closes the connection (HTTP/1.0 without keep-alive, or
/// `Connection: close`). It may also close after a request with `Expect: 100-continue` whose
/// body its handler did not read.
fn answers_owed(heads: &[RequestHead]) -> (usize, usize) {
    let expects = |h: &RequestHead| !h.field_values("expect").is_empty();
    let max = answers_until(heads, |_| false);
    let min = answers_until(heads, expects);
    (min.min(max), max)
}

fn answers_until(heads: &[RequestHead], also_closes: impl Fn(&RequestHead) -> bool) -> usize {
    let closes = |h: &RequestHead| {
        let tokens: Vec<String> = h
            .field_values("connection")
            .iter()
            .flat_map(|v| v.split(|&b| b == b','))
            .map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
            .collect();
        tokens.iter().any(|t| t == "close")
            || (h.version() == Version::Http10 && !tokens.iter().any(|t| t == "keep-alive"))
            || also_closes(h)
    };
    heads.iter().position(closes).map_or(heads.len(), |i| i + 1)
}

/// Sends `input` to influxd on a fresh connection and returns the status of every final
/// answer it gave before closing the connection (or going quiet for [`ANSWER_TIMEOUT`]).
async fn statuses(addr: SocketAddr, input: &[u8]) -> Vec<u16> {
    let mut s = TcpStream::connect(addr).await.expect("connect to influxd");
    // influxd may answer and close before reading everything: a failed write is an answer too.
    let _ = s.write_all(input).await;
    let mut buf = Vec::new();
    let mut out = Vec::new();
    loop {
        while let Some((status, len)) = parse_response(&buf) {
            if status >= 200 {
                out.push(status);
            }
            buf.drain(..len.unwrap_or(buf.len()));
            if len.is_none() {
                break;
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(ANSWER_TIMEOUT, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    out
}

/// One response at the start of `buf`: its status and length, or no length when its body runs
/// to the end of the connection (Go's own 400 answers have no `Content-Length`). Responses
/// with `Content-Length`, without a body (1xx, 204, 304) and chunked ones are read whole.
fn parse_response(buf: &[u8]) -> Option<(u16, Option<usize>)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    let status = resp.code?;
    if status < 200 || status == 204 || status == 304 {
        return Some((status, Some(head_len)));
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    if header("transfer-encoding").as_deref() == Some("chunked") {
        let mut pos = head_len;
        loop {
            let line_end = pos + buf[pos..].windows(2).position(|w| w == b"\r\n")?;
            let line = std::str::from_utf8(&buf[pos..line_end]).ok()?;
            let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
            pos = line_end + 2;
            if size == 0 {
                let end = pos + buf[pos..].windows(2).position(|w| w == b"\r\n")?;
                return Some((status, Some(end + 2)));
            }
            pos += size + 2;
            if pos > buf.len() {
                return None;
            }
        }
    }
    match header("content-length") {
        None => Some((status, None)),
        Some(len) => {
            let len: usize = len.parse().ok()?;
            (buf.len() >= head_len + len).then_some((status, Some(head_len + len)))
        }
    }
}

/// Inputs beyond the filter's tables: edges of chunked framing, whitespace, header grammar and
/// targets where HTTP parsers are known to differ. `write` is a request line and credentials
/// for `/write` (a handler that reads the body, so body errors show as 400).
fn go_edge_cases(write: &str) -> Vec<(String, Vec<u8>)> {
    let chunked = |body: &str| {
        format!("{write}Host: h\r\nTransfer-Encoding: chunked\r\n\r\n{body}").into_bytes()
    };
    let lp = "6\r\nm v=1\n\r\n";
    let ping = |fields: &str| format!("GET /ping HTTP/1.1\r\n{fields}\r\n").into_bytes();
    let target = |t: &str| format!("GET {t} HTTP/1.1\r\nHost: h\r\n\r\n").into_bytes();
    let mut v: Vec<(String, Vec<u8>)> = vec![
        ("chunk ext".into(), chunked("6;a\r\nm v=1\n\r\n0\r\n\r\n")),
        ("chunk ext value".into(), chunked("6;a=b\r\nm v=1\n\r\n0\r\n\r\n")),
        ("chunk ext quoted".into(), chunked("6;a=\"b c;d\"\r\nm v=1\n\r\n0\r\n\r\n")),
        ("chunk ext quoted escape".into(), chunked("6;a=\"b\\\"c\"\r\nm v=1\n\r\n0\r\n\r\n")),
        ("chunk ext BWS after semicolon".into(), chunked("6; a = b\r\nm v=1\n\r\n0\r\n\r\n")),
        ("chunk ext two".into(), chunked("6;a=b;c\r\nm v=1\n\r\n0\r\n\r\n")),
        ("chunk ext space before semicolon".into(), chunked("6 ;a\r\nm v=1\n\r\n0\r\n\r\n")),
        ("chunk ext tab before semicolon".into(), chunked("6\t;a\r\nm v=1\n\r\n0\r\n\r\n")),
        ("chunk ext on last chunk".into(), chunked(&format!("{lp}0;end\r\n\r\n"))),
        ("chunk size trailing space".into(), chunked("6 \r\nm v=1\n\r\n0\r\n\r\n")),
        ("chunk size trailing tab".into(), chunked("6\t\r\nm v=1\n\r\n0\r\n\r\n")),
        ("chunk size leading space".into(), chunked(" 6\r\nm v=1\n\r\n0\r\n\r\n")),
        ("chunk size uppercase".into(), chunked("A\r\nm v=1\nm v=\r\n1\r\n2\r\n0\r\n\r\n")),
        ("chunk size 16 digits".into(), chunked("0000000000000006\r\nm v=1\n\r\n0\r\n\r\n")),
        ("chunk size 17 digits".into(), chunked("00000000000000006\r\nm v=1\n\r\n0\r\n\r\n")),
        ("chunk size 0x".into(), chunked("0x6\r\nm v=1\n\r\n0\r\n\r\n")),
        ("chunk size plus".into(), chunked("+6\r\nm v=1\n\r\n0\r\n\r\n")),
        ("chunk data LF only".into(), chunked("6\r\nm v=1\n\n0\r\n\r\n")),
        ("chunk data no CRLF".into(), chunked("6\r\nm v=1\n0\r\n\r\n")),
        ("chunk size bare LF".into(), chunked("6\nm v=1\n\r\n0\r\n\r\n")),
        ("last chunk bare LF".into(), chunked(&format!("{lp}0\n\r\n"))),
        ("end bare LF".into(), chunked(&format!("{lp}0\r\n\n"))),
        ("trailer".into(), chunked(&format!("{lp}0\r\nX-T: v\r\n\r\n"))),
        ("trailer no space".into(), chunked(&format!("{lp}0\r\nX-T:v\r\n\r\n"))),
        ("trailer space before colon".into(), chunked(&format!("{lp}0\r\nX-T : v\r\n\r\n"))),
        ("trailer no colon".into(), chunked(&format!("{lp}0\r\nX-T\r\n\r\n"))),
        ("trailer obs-fold".into(), chunked(&format!("{lp}0\r\nX-T: v\r\n w\r\n\r\n"))),
        ("trailer content-length".into(), chunked(&format!("{lp}0\r\nContent-Length: 4\r\n\r\n"))),
        ("TE Chunked".into(), format!("{write}Host: h\r\nTransfer-Encoding: Chunked\r\n\r\n{lp}0\r\n\r\n").into_bytes()),
        ("TE OWS".into(), format!("{write}Host: h\r\nTransfer-Encoding: \t chunked \t\r\n\r\n{lp}0\r\n\r\n").into_bytes()),
        ("TE empty element".into(), format!("{write}Host: h\r\nTransfer-Encoding: ,chunked\r\n\r\n{lp}0\r\n\r\n").into_bytes()),
        ("CL leading zeros".into(), format!("{write}Host: h\r\nContent-Length: 0006\r\n\r\nm v=1\n").into_bytes()),
        ("CL OWS".into(), format!("{write}Host: h\r\nContent-Length: \t6 \r\n\r\nm v=1\n").into_bytes()),
        ("CL 2^63-1".into(), format!("{write}Host: h\r\nContent-Length: 9223372036854775807\r\n\r\nm v=1\n").into_bytes()),
        ("CL 2^63".into(), format!("{write}Host: h\r\nContent-Length: 9223372036854775808\r\n\r\nm v=1\n").into_bytes()),
        ("CL and TE".into(), format!("{write}Host: h\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n{lp}0\r\n\r\n").into_bytes()),
        ("header empty value".into(), ping("Host: h\r\nX-E:\r\n")),
        ("header OWS value".into(), ping("Host: h\r\nX-E: \t v \t\r\n")),
        ("header obs-text".into(), ping("Host: h\r\nX-E: \u{e9}\r\n")),
        ("header all tchars".into(), ping("Host: h\r\nX!#$%&'*+-.^_`|~9: v\r\n")),
        ("header underscore".into(), ping("Host: h\r\nX_Y: v\r\n")),
        ("header space in name".into(), ping("Host: h\r\nX Y: v\r\n")),
        ("header empty name".into(), ping("Host: h\r\n: v\r\n")),
        ("header space before colon".into(), ping("Host: h\r\nX-E : v\r\n")),
        ("header leading space first".into(), ping(" X-E: v\r\nHost: h\r\n")),
        ("header obs-fold".into(), ping("Host: h\r\nX-E: v\r\n w\r\n")),
        ("header DEL".into(), ping("Host: h\r\nX-E: a\x7fb\r\n")),
        ("header control".into(), ping("Host: h\r\nX-E: a\x01b\r\n")),
        ("header bare CR".into(), ping("Host: h\r\nX-E: a\rb\r\n")),
        ("header NUL".into(), ping("Host: h\r\nX-E: a\0b\r\n")),
        ("Host empty".into(), ping("Host:\r\n")),
        ("Host port".into(), ping("Host: h:8086\r\n")),
        ("Host IPv6".into(), ping("Host: [::1]:8086\r\n")),
        ("Host space".into(), ping("Host: a b\r\n")),
        ("Host slash".into(), ping("Host: a/b\r\n")),
        ("Host at".into(), ping("Host: u@h\r\n")),
        ("Host non-ASCII".into(), ping("Host: h\u{e9}\r\n")),
        ("Host backslash".into(), ping("Host: h\\x\r\n")),
        ("Host twice".into(), ping("Host: h\r\nHost: h\r\n")),
        ("Host missing".into(), ping("")),
        ("HTTP/1.0 no Host".into(), b"GET /ping HTTP/1.0\r\n\r\n".to_vec()),
        ("HTTP/1.0 keep-alive".into(), b"GET /ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".to_vec()),
        ("HTTP/1.2".into(), b"GET /ping HTTP/1.2\r\nHost: h\r\n\r\n".to_vec()),
        ("HTTP/1.10".into(), b"GET /ping HTTP/1.10\r\nHost: h\r\n\r\n".to_vec()),
        ("lowercase method".into(), b"get /ping HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("tchar method".into(), b"G!T /ping HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("target bad percent".into(), target("/ping%zz")),
        ("target short percent".into(), target("/ping%4")),
        ("target percent".into(), target("/p%69ng")),
        ("target bad percent in query".into(), target("/ping?a=%zz")),
        ("target fragment".into(), target("/ping#f")),
        ("target double slash".into(), target("//ping")),
        ("target empty query".into(), target("/ping?")),
        ("target backslash".into(), target("/ping\\x")),
        ("target braces".into(), target("/ping{x}")),
        ("absolute-form".into(), target("http://h/ping")),
        ("absolute-form upper scheme".into(), target("HTTP://h/ping")),
        ("absolute-form https".into(), target("https://h/ping")),
        ("absolute-form port".into(), target("http://h:8086/ping")),
        ("absolute-form empty port".into(), target("http://h:/ping")),
        ("absolute-form userinfo".into(), target("http://u:p@h/ping")),
        ("absolute-form IPv6".into(), target("http://[::1]:8086/ping")),
        ("absolute-form no path".into(), target("http://h")),
        ("absolute-form query".into(), target("http://h?x=1")),
        ("absolute-form bad port".into(), target("http://h:8x/ping")),
        ("absolute-form two ports".into(), target("http://h:1:2/ping")),
        ("absolute-form unclosed bracket".into(), target("http://[::1/ping")),
        ("absolute-form bad host byte".into(), target("http://h|x/ping")),
        ("absolute-form host percent".into(), target("http://h%zz/ping")),
        ("absolute-form host percent-encoded".into(), target("http://h%41/ping")),
        ("absolute-form host space escape".into(), target("http://h%20/ping")),
        ("absolute-form bad userinfo".into(), target("http://u|p@h/ping")),
        ("absolute-form other scheme".into(), target("ftp://h/ping")),
        ("asterisk OPTIONS".into(), b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("expect continue".into(), format!("{write}Host: h\r\nExpect: 100-continue\r\nContent-Length: 6\r\n\r\nm v=1\n").into_bytes()),
        ("pipelined writes".into(), format!("{write}Host: h\r\nContent-Length: 6\r\n\r\nm v=1\n{write}Host: h\r\nTransfer-Encoding: chunked\r\n\r\n{lp}0\r\n\r\n").into_bytes()),
    ];
    let mut long_ext = "6;".to_owned();
    long_ext.push_str(&"e".repeat(postern_proto::http::MAX_CHUNK_LINE_LEN - 2));
    v.push((
        "chunk line at the limit".into(),
        chunked(&format!("{long_ext}\r\nm v=1\n\r\n0\r\n\r\n")),
    ));
    long_ext.push('e');
    v.push((
        "chunk line over the limit".into(),
        chunked(&format!("{long_ext}\r\nm v=1\n\r\n0\r\n\r\n")),
    ));
    v
}

/// The filter's table of malformed requests and its valid samples, as written into the fuzz
/// corpus.
fn table_inputs() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/http_request");
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.expect("entry").path();
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("read corpus file"))
        })
        .collect();
    v.sort();
    assert!(v.len() >= 50, "the corpus is missing: {}", dir.display());
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filter_never_passes_what_influxd_refuses() {
    let influxd = Influxd::start(InfluxdOptions { auth: true })
        .await
        .expect("influxd");
    influxd.query("CREATE DATABASE diff").await.expect("db");
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        influxd.admin_user(),
        influxd.admin_password()
    ));
    let write = format!("POST /write?db=diff HTTP/1.1\r\nAuthorization: Basic {basic}\r\n");
    let mut corpus = table_inputs();
    corpus.extend(go_edge_cases(&write));
    assert!(corpus.len() >= 150);

    let addr = influxd.http_addr();
    let mut runs = Vec::new();
    for (name, input) in corpus {
        let mut stream = input.clone();
        stream.extend_from_slice(SENTINEL);
        runs.push(tokio::spawn(async move {
            let answers = statuses(addr, &stream).await;
            (name, input, stream, answers)
        }));
    }
    let mut disagreements = Vec::new();
    let (mut passed, mut refused_by_both, mut only_filter_refuses) = (0, 0, 0);
    for run in runs {
        let (name, input, stream, answers) = run.await.expect("task");
        let filtered = filter(&stream);
        let influxd_refused = answers.contains(&400);
        match (&filtered.error, influxd_refused) {
            (Some(_), true) => refused_by_both += 1,
            (Some(e), false) => {
                only_filter_refuses += 1;
                eprintln!("stricter than influxd (fine): {name}: {e} / influxd {answers:?}");
            }
            (None, true) => disagreements.push(format!(
                "{name}: the filter passes it (heads: {}), influxd answers {answers:?}: {:?}",
                filtered.heads.len(),
                String::from_utf8_lossy(&input)
            )),
            (None, false) => {
                passed += 1;
                // Same message boundaries: influxd answered every request the filter saw (the
                // sentinel included, unless an earlier request closed the connection).
                // An opaque tunnel (after an upgrade) has no more requests to count.
                let (min, max) = answers_owed(&filtered.heads);
                // influxd refuses a body over its limit (413) before reading it, and closes.
                let framed_alike = filtered.opaque
                    || answers.last() == Some(&413)
                    || (filtered.between_requests && (min..=max).contains(&answers.len()));
                if !framed_alike {
                    disagreements.push(format!(
                        "{name}: the filter sees {} requests (ends between requests: {}; \
                         {min}..={max} answers owed), influxd answers {answers:?}: {:?}",
                        filtered.heads.len(),
                        filtered.between_requests,
                        String::from_utf8_lossy(&input)
                    ));
                }
            }
        }
    }
    eprintln!(
        "{passed} passed by both, {refused_by_both} refused by both, {only_filter_refuses} \
         refused by the filter only"
    );
    assert!(
        disagreements.is_empty(),
        "the filter passes what influxd refuses or frames differently:\n{}",
        disagreements.join("\n")
    );
    assert!(
        passed >= 20 && refused_by_both >= 20,
        "the corpus exercises both sides"
    );
}
