//! The filter's test corpus: streams fed whole, in pieces and a byte at a time, the table of
//! malformed requests (also the fuzz target's seed corpus), and property tests.

use super::*;
use proptest::prelude::*;
use std::borrow::Cow;

#[test]
fn json_error_response_is_json_influxdb_clients_read() {
    let r = json_error_response(503, "Service\r\nUnavailable", "say \"why\"\n");
    let text = String::from_utf8(r).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    assert!(
        head.starts_with("HTTP/1.1 503 Service  Unavailable\r\n"),
        "{head}"
    );
    assert!(
        head.contains("\r\nContent-Type: application/json\r\n"),
        "{head}"
    );
    assert!(
        head.contains(&format!("Content-Length: {}", body.len())),
        "{head}"
    );
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON body");
    assert_eq!(v["error"], "say \"why\"\n");
}

const AUTH: &str = "Token leased";

fn cfg() -> FilterConfig {
    FilterConfig {
        strip_query_credentials: true,
        ..FilterConfig::default()
    }
}

/// What the filter turns a stream into: heads re-serialized with [`AUTH`], everything else
/// passed through. Feeds `input` in pieces cut at `cuts`, keeping unconsumed bytes as a
/// caller would. Returns the output and whether the stream ended between requests.
fn run_pieces(
    cfg: FilterConfig,
    input: &[u8],
    cuts: &[usize],
) -> Result<(Vec<u8>, Vec<RequestHead>, bool), HttpError> {
    run_answered(cfg, input, cuts, true)
}

/// [`run_pieces`], the server answering each WebSocket upgrade with `101` when `switches`,
/// else with something else.
fn run_answered(
    cfg: FilterConfig,
    input: &[u8],
    cuts: &[usize],
    switches: bool,
) -> Result<(Vec<u8>, Vec<RequestHead>, bool), HttpError> {
    let mut f = RequestFilter::new(cfg);
    let mut out = Vec::new();
    let mut heads = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut opaque = false;
    let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
    bounds.sort_unstable();
    bounds.push(input.len());
    let mut prev = 0;
    for b in bounds {
        pending.extend_from_slice(&input[prev..b]);
        prev = b;
        loop {
            if opaque {
                out.append(&mut pending);
                break;
            }
            match f.step(&pending)? {
                Step::NeedMore => break,
                Step::Head { head, consumed } => {
                    assert!(consumed > 0 && consumed <= pending.len());
                    head.write_with_authorization(AUTH, &mut out)?;
                    heads.push(*head);
                    pending.drain(..consumed);
                }
                Step::Body { len } => {
                    assert!(len > 0 && len <= pending.len());
                    out.extend(pending.drain(..len));
                }
                Step::AwaitUpgrade => f.upgrade_answered(switches),
                Step::Opaque => opaque = true,
            }
        }
    }
    let clean = opaque || (pending.is_empty() && f.between_requests());
    Ok((out, heads, clean))
}

fn run(input: &[u8]) -> Result<(Vec<u8>, Vec<RequestHead>, bool), HttpError> {
    run_pieces(cfg(), input, &[])
}

fn run_bytewise(input: &[u8]) -> Result<(Vec<u8>, Vec<RequestHead>, bool), HttpError> {
    let cuts: Vec<usize> = (1..input.len()).collect();
    run_pieces(cfg(), input, &cuts)
}

fn out_str(input: &[u8]) -> String {
    let (out, _, clean) = run(input).unwrap();
    assert!(clean);
    String::from_utf8(out).unwrap()
}

#[test]
fn authorization_removed_and_inserted_once() {
    let out = out_str(
        b"GET /api/v2/buckets HTTP/1.1\r\nHost: db\r\nauthorization: Token mine\r\n\
          X-A: 1\r\nAUTHORIZATION: Basic Zm9vOmJhcg==\r\nProxy-Authorization: x\r\n\
          Accept: */*\r\n\r\n",
    );
    assert_eq!(
        out,
        "GET /api/v2/buckets HTTP/1.1\r\nHost: db\r\nX-A: 1\r\nAccept: */*\r\n\
         Authorization: Token leased\r\n\r\n"
    );
}

#[test]
fn other_headers_keep_order_and_bytes() {
    let out = out_str(
        b"GET / HTTP/1.1\r\nHost:db\r\nX-Odd:   spaced  value \t\r\nx-low: \xc3\xa9\r\n\r\n",
    );
    assert_eq!(
        out.as_bytes(),
        "GET / HTTP/1.1\r\nHost:db\r\nX-Odd:   spaced  value \t\r\nx-low: é\r\nAuthorization: Token leased\r\n\r\n"
            .as_bytes()
    );
}

#[test]
fn query_credentials_stripped() {
    let out = out_str(b"GET /query?u=a&db=x&p=b&q=SELECT HTTP/1.1\r\nHost: h\r\n\r\n");
    assert!(
        out.starts_with("GET /query?db=x&q=SELECT HTTP/1.1\r\n"),
        "{out}"
    );
    assert_eq!(strip_query_credentials("/q?u=a&p=b"), "/q");
    assert_eq!(
        strip_query_credentials("/q?db=a%20b&q=x+y"),
        "/q?db=a%20b&q=x+y"
    );
    assert!(matches!(
        strip_query_credentials("/q?db=a"),
        Cow::Borrowed(_)
    ));
    assert_eq!(
        strip_query_credentials("/q?%75=a&%70&db=1&up=2&pu"),
        "/q?db=1&up=2&pu"
    );
    assert_eq!(strip_query_credentials("/q?a=1&&u=&b"), "/q?a=1&&b");
    assert_eq!(strip_query_credentials("/write"), "/write");
    assert_eq!(strip_query_credentials("/q?u"), "/q");
}

#[test]
fn query_kept_when_not_configured() {
    let c = FilterConfig::default();
    let (out, _, _) =
        run_pieces(c, b"GET /query?u=a&p=b HTTP/1.1\r\nHost: h\r\n\r\n", &[]).unwrap();
    assert!(out.starts_with(b"GET /query?u=a&p=b HTTP/1.1\r\n"));
}

#[test]
fn content_length_body_passed_through() {
    let input = b"POST /write?db=x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nHost: h\r\n\r\n";
    let (out, heads, clean) = run_bytewise(input).unwrap();
    assert!(clean);
    assert_eq!(heads.len(), 2);
    assert_eq!(heads[0].framing(), BodyFraming::Length(5));
    assert_eq!(heads[1].method(), "GET");
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("\r\n\r\nhelloGET / HTTP/1.1\r\n"), "{out}");
}

#[test]
fn chunked_pipelined_bytewise() {
    let input = b"POST /write HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
                  5;ext=1;q=\"a b\\\"\"\r\nhello\r\n0000B\r\n0123456789a\r\n0\r\nX-Sum: 1\r\n\r\n\
                  GET /ping HTTP/1.1\r\nHost: h\r\n\r\n";
    let whole = run(input).unwrap();
    let bytewise = run_bytewise(input).unwrap();
    assert_eq!(whole.0, bytewise.0);
    assert!(whole.2 && bytewise.2);
    assert_eq!(whole.1.len(), 2);
    assert_eq!(whole.1[0].framing(), BodyFraming::Chunked);
    assert_eq!(whole.1[1].path(), "/ping");
    let out = String::from_utf8(whole.0).unwrap();
    assert!(out.contains(
        "\r\n\r\n5;ext=1;q=\"a b\\\"\"\r\nhello\r\n0000B\r\n0123456789a\r\n0\r\nX-Sum: 1\r\n\r\nGET /ping"
    ));
}

#[test]
fn body_step_stops_at_body_end() {
    let mut f = RequestFilter::new(cfg());
    let buf = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabcGET";
    let Step::Head { consumed, .. } = f.step(buf).unwrap() else {
        panic!("head expected")
    };
    assert!(matches!(
        f.step(&buf[consumed..]).unwrap(),
        Step::Body { len: 3 }
    ));
    assert!(matches!(
        f.step(&buf[consumed + 3..]).unwrap(),
        Step::NeedMore
    ));
    assert!(matches!(f.step(&[]).unwrap(), Step::NeedMore));
}

#[test]
fn no_framing_means_no_body() {
    let (_, heads, clean) =
        run(b"POST / HTTP/1.1\r\nHost: h\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
    assert!(clean);
    assert_eq!(heads.len(), 2);
    assert_eq!(heads[0].framing(), BodyFraming::None);
    let (_, heads, _) = run(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n").unwrap();
    assert_eq!(heads[0].framing(), BodyFraming::None);
}

#[test]
fn leading_empty_lines_ignored() {
    let out = out_str(b"\r\n\r\nGET / HTTP/1.0\r\n\r\n");
    assert_eq!(out, "GET / HTTP/1.0\r\nAuthorization: Token leased\r\n\r\n");
}

#[test]
fn websocket_upgrade_turns_opaque_only_after_101() {
    let input = b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\n\x81\x05\nGET\r\n";
    let (out, heads, clean) = run_bytewise(input).unwrap();
    assert!(clean);
    assert!(heads[0].is_upgrade());
    assert!(out.ends_with(b"\r\n\r\n\x81\x05\nGET\r\n"));

    // Until the server has answered, the filter hands out nothing more.
    let mut f = RequestFilter::new(cfg());
    let head = b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\r\n";
    let mut buf = head.to_vec();
    buf.extend_from_slice(b"GET /query?u=admin&p=pw HTTP/1.1\r\nHost: h\r\n\r\n");
    let Step::Head { consumed, .. } = f.step(&buf).unwrap() else {
        panic!("expected the upgrade head");
    };
    buf.drain(..consumed);
    assert!(matches!(f.step(&buf).unwrap(), Step::AwaitUpgrade));
    assert!(matches!(f.step(&buf).unwrap(), Step::AwaitUpgrade));
    assert!(f.awaiting_upgrade());
    // The server answered 200 (it does not speak WebSocket here): the pipelined request
    // behind the upgrade is filtered like any other, its query credentials removed.
    f.upgrade_answered(false);
    let Step::Head { head, .. } = f.step(&buf).unwrap() else {
        panic!("the request behind a refused upgrade must be filtered");
    };
    assert_eq!(head.target(), "/query");
}

#[test]
fn refused_upgrade_keeps_filtering() {
    let input = b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nGET /q?p=x HTTP/1.1\r\nHost: h\r\nAuthorization: Basic b3duOnB3\r\n\r\n";
    let (out, heads, clean) =
        run_answered(cfg(), input, &(1..input.len()).collect::<Vec<_>>(), false).unwrap();
    assert!(clean);
    assert_eq!(heads.len(), 2);
    let out = String::from_utf8(out).unwrap();
    assert!(!out.contains("b3duOnB3"), "client credential leaked: {out}");
    assert!(out.contains("GET /q HTTP/1.1\r\n"));
    assert_eq!(out.matches("Authorization: Token leased").count(), 2);
}

#[test]
fn connect_and_other_upgrades_are_refused() {
    let refused: Vec<(&str, &[u8], HttpError)> = vec![
        ("CONNECT authority", b"CONNECT db:8086 HTTP/1.1\r\nHost: db:8086\r\n\r\n", HttpError::ConnectRefused),
        ("CONNECT origin", b"CONNECT / HTTP/1.1\r\nHost: h\r\n\r\n", HttpError::ConnectRefused),
        ("h2c", b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n", HttpError::UnsupportedUpgrade),
        ("h2c no connection", b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\n\r\n", HttpError::UnsupportedUpgrade),
        ("tls upgrade", b"OPTIONS * HTTP/1.1\r\nHost: h\r\nUpgrade: TLS/1.0\r\nConnection: Upgrade\r\n\r\n", HttpError::UnsupportedUpgrade),
        ("list", b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket, h2c\r\nConnection: Upgrade\r\n\r\n", HttpError::UnsupportedUpgrade),
        ("two fields", b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n", HttpError::UnsupportedUpgrade),
        ("websocket on POST", b"POST / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: upgrade\r\nContent-Length: 2\r\n\r\nab", HttpError::UnsupportedUpgrade),
        ("websocket without Connection", b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n", HttpError::UnsupportedUpgrade),
        ("websocket over 1.0", b"GET / HTTP/1.0\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", HttpError::UnsupportedUpgrade),
    ];
    for (name, input, want) in refused {
        assert_eq!(run(input).err(), Some(want.clone()), "{name}");
        assert_eq!(
            run_bytewise(input).err(),
            Some(want.clone()),
            "{name} bytewise"
        );
        assert_eq!(want.status().0, 501, "{name}");
    }
}

#[test]
fn absolute_form_is_reduced_to_origin_form() {
    let cases = [
        (
            "http://admin:secret@db:8086/write?db=x&u=a&p=b",
            "/write?db=x",
        ),
        ("HTTPS://user@db/query", "/query"),
        ("http://db:8086", "/"),
        ("http://db:8086?q=1", "/?q=1"),
        ("/plain?x=1", "/plain?x=1"),
    ];
    for (target, want) in cases {
        let input = format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n");
        let (out, heads, _) = run(input.as_bytes()).unwrap();
        assert_eq!(heads[0].target(), want, "{target}");
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains("secret") && !out.contains("admin"), "{out}");
    }
    // Go's request-URI parser takes no fragment: a `#` in the authority is refused.
    let input = b"GET http://a:b@db#frag HTTP/1.1\r\nHost: h\r\n\r\n";
    assert_eq!(run(input).err(), Some(HttpError::BadTarget));
}

#[test]
fn presented_authorization_is_kept_aside() {
    let (_, heads, _) =
        run(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Token abc\r\n\r\n").unwrap();
    assert_eq!(heads[0].presented_authorization(), Some(&b"Token abc"[..]));
    assert!(!format!("{:?}", heads[0]).contains("abc"));
    let (_, heads, _) = run(
        b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Token a\r\nAuthorization: Token b\r\n\r\n",
    )
    .unwrap();
    assert_eq!(heads[0].presented_authorization(), None);
    let (_, heads, _) = run(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Token a\r\nProxy-Authorization: Basic x\r\n\r\n").unwrap();
    assert_eq!(heads[0].presented_authorization(), None);
    let (_, heads, _) = run(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
    assert_eq!(heads[0].presented_authorization(), None);
}

#[test]
fn expect_continue_streams_head_first() {
    let mut f = RequestFilter::new(cfg());
    let head = b"PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n";
    let Step::Head { consumed, .. } = f.step(head).unwrap() else {
        panic!("head expected")
    };
    assert_eq!(consumed, head.len());
    assert!(matches!(f.step(b"").unwrap(), Step::NeedMore));
    assert!(matches!(f.step(b"data").unwrap(), Step::Body { len: 4 }));
    assert!(f.between_requests());
}

#[test]
fn errors_do_not_echo_values_and_stick() {
    let mut f = RequestFilter::new(cfg());
    let e = f
        .step(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: secret\x01\r\n\r\n")
        .unwrap_err();
    assert!(!e.to_string().contains("secret"));
    assert_eq!(e, HttpError::InvalidHeaderValue { line: 2 });
    assert_eq!(f.step(b"GET / HTTP/1.1\r\n").unwrap_err(), e);
}

#[test]
fn bad_authorization_value_refused() {
    let (_, heads, _) = run(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
    let mut out = Vec::new();
    for bad in ["", " x", "x ", "Token a\r\nX-Evil: 1", "a\0b"] {
        assert_eq!(
            heads[0].write_with_authorization(bad, &mut out),
            Err(HttpError::InvalidAuthorizationValue)
        );
    }
    assert!(out.is_empty());
}

#[test]
fn head_limit_and_header_count() {
    let small = FilterConfig {
        max_head_len: 64,
        max_headers: 2,
        strip_query_credentials: false,
    };
    let ok = b"GET / HTTP/1.1\r\nHost: h\r\nA: b\r\n\r\n";
    assert!(run_pieces(small.clone(), ok, &[]).is_ok());
    let three = b"GET / HTTP/1.1\r\nHost: h\r\nA: b\r\nC: d\r\n\r\n";
    assert_eq!(
        run_pieces(small.clone(), three, &[]).unwrap_err(),
        HttpError::TooManyHeaders { limit: 2 }
    );
    // Incomplete but already too long: refused without waiting for the end.
    let long = [b'a'; 64];
    assert_eq!(
        run_pieces(small.clone(), &long, &[]).unwrap_err(),
        HttpError::HeadTooLarge { limit: 64 }
    );
    // Exactly at the limit is fine.
    let mut exact = b"GET / HTTP/1.1\r\nHost: h\r\nX: ".to_vec();
    exact.resize(60, b'v');
    exact.extend_from_slice(b"\r\n\r\n");
    assert_eq!(exact.len(), 64);
    assert!(run_pieces(small.clone(), &exact, &[]).is_ok());
    exact.insert(30, b'v');
    assert!(run_pieces(small, &exact, &[]).is_err());
}

#[test]
fn http10_and_absolute_form() {
    let out =
        out_str(b"GET http://db:8086/ping HTTP/1.0\r\n\r\nOPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n");
    assert!(out.starts_with("GET /ping HTTP/1.0\r\nAuthorization"));
    assert!(out.contains("OPTIONS * HTTP/1.1\r\n"));
}

#[test]
fn error_response_is_complete() {
    let r = error_response(400, "Bad\r\nRequest", "bare LF");
    let r = String::from_utf8(r).unwrap();
    assert!(r.starts_with("HTTP/1.1 400 Bad  Request\r\n"));
    assert!(r.contains("Connection: close\r\n"));
    assert!(r.contains("Content-Length: 8\r\n"));
    assert!(r.ends_with("\r\n\r\nbare LF\n"));
}

const CHUNKED_HEAD: &str = "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n";

fn chunked(body: &str) -> Vec<u8> {
    format!("{CHUNKED_HEAD}{body}").into_bytes()
}

/// Malformed and ambiguous requests, request smuggling classics first. Every one must be
/// refused, fed whole and fed a byte at a time.
fn malformed() -> Vec<(&'static str, Vec<u8>)> {
    let mut v: Vec<(&'static str, Vec<u8>)> = vec![
        ("CL.TE", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG".to_vec()),
        ("TE.CL", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n".to_vec()),
        ("TE xchunked", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n".to_vec()),
        ("TE space before colon", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n".to_vec()),
        ("TE tab before colon", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding\t: chunked\r\n\r\n".to_vec()),
        ("TE chunked, identity", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n".to_vec()),
        ("TE identity, chunked", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity, chunked\r\n\r\n".to_vec()),
        ("TE gzip, chunked", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".to_vec()),
        ("TE twice", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()),
        ("TE quoted", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: \"chunked\"\r\n\r\n".to_vec()),
        ("TE vertical tab", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\x0b\r\n\r\n".to_vec()),
        ("TE obs-fold", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\r\n chunked\r\n\r\n".to_vec()),
        ("TE leading space line", b"POST / HTTP/1.1\r\n Transfer-Encoding: chunked\r\nHost: h\r\n\r\n".to_vec()),
        ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec()),
        ("TE with NUL", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\0\r\n\r\n".to_vec()),
        ("CL duplicate equal", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello".to_vec()),
        ("CL duplicate differing", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\ncontent-length: 6\r\n\r\nhello!".to_vec()),
        ("CL list", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\nhello".to_vec()),
        ("CL plus sign", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\nhello".to_vec()),
        ("CL negative", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n".to_vec()),
        ("CL hex", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x5\r\n\r\nhello".to_vec()),
        ("CL overflow", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 18446744073709551616\r\n\r\n".to_vec()),
        ("CL empty", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: \r\n\r\n".to_vec()),
        ("CL inner space", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1 0\r\n\r\n".to_vec()),
        ("CL space before colon", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length : 5\r\n\r\nhello".to_vec()),
        ("bare LF everywhere", b"GET / HTTP/1.1\nHost: h\n\n".to_vec()),
        ("bare LF in one field", b"GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n".to_vec()),
        ("bare LF ending head", b"GET / HTTP/1.1\r\nHost: h\r\n\n".to_vec()),
        ("bare CR", b"GET / HTTP/1.1\rHost: h\r\n\r\n".to_vec()),
        ("bare CR in value", b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n".to_vec()),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: h\r\nX-A: b\r\n c\r\n\r\n".to_vec()),
        ("obs-fold tab", b"GET / HTTP/1.1\r\nHost: h\r\nX-A: b\r\n\tc\r\n\r\n".to_vec()),
        ("NUL in value", b"GET / HTTP/1.1\r\nHost: h\r\nX-A: b\0c\r\n\r\n".to_vec()),
        ("NUL in name", b"GET / HTTP/1.1\r\nHost: h\r\nX\0A: b\r\n\r\n".to_vec()),
        ("DEL in value", b"GET / HTTP/1.1\r\nHost: h\r\nX-A: b\x7f\r\n\r\n".to_vec()),
        ("empty field name", b"GET / HTTP/1.1\r\nHost: h\r\n: b\r\n\r\n".to_vec()),
        ("no colon", b"GET / HTTP/1.1\r\nHost: h\r\nNoColonHere\r\n\r\n".to_vec()),
        ("bad char in name", b"GET / HTTP/1.1\r\nHost: h\r\nX(A): b\r\n\r\n".to_vec()),
        ("missing Host", b"GET / HTTP/1.1\r\nX: y\r\n\r\n".to_vec()),
        ("duplicate Host", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec()),
        ("invalid method", b"G@T / HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("lowercase version", b"GET / http/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("HTTP/2.0", b"GET / HTTP/2.0\r\nHost: h\r\n\r\n".to_vec()),
        ("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: h\r\n\r\n".to_vec()),
        ("HTTP/0.9", b"GET /\r\n\r\n".to_vec()),
        ("double space", b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("tab in request line", b"GET\t/ HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("trailing space after version", b"GET / HTTP/1.1 \r\nHost: h\r\n\r\n".to_vec()),
        ("space in target", b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("non-ASCII target", b"GET /\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("relative target", b"GET a HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("asterisk for GET", b"GET * HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("bad chunk size", chunked("zz\r\nhi\r\n0\r\n\r\n")),
        ("negative chunk size", chunked("-5\r\nhello\r\n0\r\n\r\n")),
        ("0x chunk size", chunked("0x5\r\nhello\r\n0\r\n\r\n")),
        ("empty chunk size", chunked("\r\nhello\r\n0\r\n\r\n")),
        ("chunk size overflow", chunked("10000000000000000\r\n")),
        ("chunk size with space then digits", chunked("5 5\r\nhello\r\n0\r\n\r\n")),
        ("chunk size trailing space", chunked("5 \r\nhello\r\n0\r\n\r\n")),
        ("missing CRLF after chunk", chunked("5\r\nhelloXX0\r\n\r\n")),
        ("LF only after chunk", chunked("5\r\nhello\n0\r\n\r\n")),
        ("bare LF after chunk size", chunked("5\nhello\r\n0\r\n\r\n")),
        ("bare CR after chunk size", chunked("5\rhello\r\n0\r\n\r\n")),
        ("chunk ext NUL", chunked("5;a\0b\r\nhello\r\n0\r\n\r\n")),
        ("chunk ext bare LF", chunked("5;a\nb\r\nhello\r\n0\r\n\r\n")),
        ("chunk ext no name", chunked("5;\r\nhello\r\n0\r\n\r\n")),
        ("chunk ext unterminated quote", chunked("5;a=\"b\r\nhello\r\n0\r\n\r\n")),
        ("chunk ext missing value", chunked("5;a=\r\nhello\r\n0\r\n\r\n")),
        ("last chunk missing final CRLF, next head", chunked("0\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n")),
        ("authorization trailer", chunked("0\r\nAuthorization: Token mine\r\n\r\n")),
        ("content-length trailer", chunked("0\r\nContent-Length: 5\r\n\r\n")),
        ("trailer obs-fold", chunked("0\r\nX-A: b\r\n c\r\n\r\n")),
        ("trailer bare LF", chunked("0\r\nX-A: b\n\r\n")),
        // Found by comparing with influxd (Go's net/http), which refuses each of these.
        ("chunk size space before ext", chunked("5 ;a\r\nhello\r\n0\r\n\r\n")),
        ("chunk size tab before ext", chunked("5\t;a=b\r\nhello\r\n0\r\n\r\n")),
        ("chunk size 17 digits", chunked("00000000000000005\r\nhello\r\n0\r\n\r\n")),
        ("last chunk 17 zeros", chunked("00000000000000000\r\n\r\n")),
        ("CL over 2^63-1", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 9223372036854775808\r\n\r\n".to_vec()),
        ("Host with space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n".to_vec()),
        ("Host with slash", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n".to_vec()),
        ("Host with at", b"GET / HTTP/1.1\r\nHost: u@h\r\n\r\n".to_vec()),
        ("Host with quote", b"GET / HTTP/1.1\r\nHost: \"h\"\r\n\r\n".to_vec()),
        ("Host non-ASCII", b"GET / HTTP/1.1\r\nHost: h\xc3\xa9\r\n\r\n".to_vec()),
        ("Host with brace", b"GET / HTTP/1.1\r\nHost: h{1}\r\n\r\n".to_vec()),
        ("bad percent in path", b"GET /a%zz HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("short percent in path", b"GET /a%2 HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("percent at end of path", b"GET /a% HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("absolute-form bad port", b"GET http://h:8x/ HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("absolute-form two ports", b"GET http://h:1:2/ HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("absolute-form bad host byte", b"GET http://h|x/ HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("absolute-form unclosed bracket", b"GET http://[::1/ HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("absolute-form bad percent in host", b"GET http://h%zz/ HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("second request malformed", b"GET / HTTP/1.1\r\nHost: h\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx".to_vec()),
    ];
    let mut long_ext = "5;".to_owned();
    long_ext.push_str(&"a".repeat(MAX_CHUNK_LINE_LEN + 10));
    long_ext.push_str("\r\nhello\r\n0\r\n\r\n");
    v.push(("oversize chunk line", chunked(&long_ext)));
    let mut big = b"GET / HTTP/1.1\r\nHost: h\r\nX: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', DEFAULT_MAX_HEAD_LEN));
    big.extend_from_slice(b"\r\n\r\n");
    v.push(("oversize head", big));
    let mut many = b"GET / HTTP/1.1\r\nHost: h\r\n".to_vec();
    for i in 0..DEFAULT_MAX_HEADERS {
        many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    v.push(("too many headers", many));
    let mut big_trailer = chunked("0\r\n").clone();
    for i in 0..100 {
        big_trailer
            .extend_from_slice(format!("X-Trailer-{i}: {}\r\n", "v".repeat(1000)).as_bytes());
    }
    big_trailer.extend_from_slice(b"\r\n");
    v.push(("oversize trailers", big_trailer));
    v
}

#[test]
fn malformed_requests_are_refused() {
    let table = malformed();
    assert!(table.len() >= 25);
    for (name, input) in &table {
        let whole = run(input);
        assert!(whole.is_err(), "{name}: accepted whole: {whole:?}");
        if input.len() < 20_000 {
            let bytewise = run_bytewise(input);
            assert!(bytewise.is_err(), "{name}: accepted bytewise: {bytewise:?}");
            assert_eq!(whole.unwrap_err(), bytewise.unwrap_err(), "{name}");
        }
    }
}

/// Valid requests for the fuzzers' seed corpus (see [`write_seed_corpus`]).
fn valid_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("get", b"GET /ping HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("query with credentials", b"GET /query?db=d&u=me&p=pw&q=SHOW+DATABASES HTTP/1.1\r\nHost: h\r\nAuthorization: Token mine\r\n\r\n".to_vec()),
        ("write length", b"POST /write?db=d HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n\r\nm v=1\n".to_vec()),
        ("write chunked with ext and trailer", chunked("3;a=b\r\nm v\r\n3;q=\"x y\"\r\n=1\n\r\n0\r\nX-T: v\r\n\r\n")),
        ("pipelined", b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nPOST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhiGET /c HTTP/1.0\r\n\r\n".to_vec()),
        ("expect continue", b"POST /write HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx".to_vec()),
        ("absolute-form http10", b"GET http://db:8086/ping HTTP/1.0\r\n\r\n".to_vec()),
        ("options asterisk", b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("websocket upgrade", b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n".to_vec()),
        ("cookies", b"GET / HTTP/1.1\r\nHost: h\r\nCookie: a=1; session=s; b=2\r\n\r\n".to_vec()),
    ]
}

/// Writes the malformed table and [`valid_seeds`] as files into `fuzz/corpus/http_request`
/// (the fuzz target's seed corpus, and the corpus of the differential test against
/// influxd) when `$POSTERN_WRITE_SEED_CORPUS` names `fuzz/corpus` (see fuzz/README.md).
#[test]
fn write_seed_corpus() {
    let Some(dir) = crate::seed_corpus_dir("http_request") else {
        return;
    };
    let name = |kind: &str, n: &str| {
        let clean: String = n
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        dir.join(format!("{kind}-{clean}"))
    };
    for (n, input) in malformed() {
        std::fs::write(name("malformed", n), input).expect("write seed");
    }
    for (n, input) in valid_seeds() {
        assert!(run(&input).is_ok(), "{n} is valid");
        std::fs::write(name("valid", n), input).expect("write seed");
    }
}

#[test]
fn specific_errors() {
    let cases: &[(&[u8], HttpError)] = &[
        (b"GET / HTTP/1.1\nHost: h\n\n", HttpError::BareLf),
        (b"GET / HTTP/1.1\rX", HttpError::BareCr),
        (b"GET / HTTP/1.1\r\nHost: h\r\nA: b\r\n c\r\n\r\n", HttpError::ObsFold { line: 3 }),
        (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", HttpError::WhitespaceBeforeColon { line: 1 }),
        (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", HttpError::DuplicateContentLength),
        (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: +1\r\n\r\n", HttpError::InvalidContentLength),
        (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", HttpError::ContentLengthAndTransferEncoding),
        (b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", HttpError::UnsupportedTransferEncoding),
        (b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", HttpError::DuplicateTransferEncoding),
        (b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", HttpError::TransferEncodingInHttp10),
        (b"GET / HTTP/1.1\r\n\r\n", HttpError::MissingHost),
        (b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", HttpError::DuplicateHost),
        (b"GET /\r\n\r\n", HttpError::BadRequestLine),
        (b"GET / HTTP/0.9\r\n\r\n", HttpError::BadVersion),
        (b"G(T / HTTP/1.1\r\n\r\n", HttpError::BadMethod),
        (b"GET x HTTP/1.1\r\n\r\n", HttpError::BadTarget),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: \x01\r\n\r\n", HttpError::InvalidHeaderValue { line: 2 }),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX/A: 1\r\n\r\n", HttpError::InvalidHeaderName { line: 2 }),
        (b"GET / HTTP/1.1\r\nHost: h\r\nXA\r\n\r\n", HttpError::MissingColon { line: 2 }),
    ];
    for (input, want) in cases {
        assert_eq!(
            &run(input).unwrap_err(),
            want,
            "{}",
            String::from_utf8_lossy(input)
        );
    }
    let chunk_cases: &[(&str, HttpError)] = &[
        ("g\r\n", HttpError::BadChunkSize),
        ("1g\r\n", HttpError::BadChunkSize),
        // More than 16 digits: Go's limit, before any overflow.
        ("fffffffffffffffff\r\n", HttpError::BadChunkSize),
        ("1;\r\n", HttpError::BadChunkExtension),
        ("1\r\nab", HttpError::MissingChunkCrlf),
        (
            "0\r\nHost: x\r\n\r\n",
            HttpError::ForbiddenTrailer { line: 1 },
        ),
        (
            "0\r\nX: \x01\r\n\r\n",
            HttpError::InvalidHeaderValue { line: 1 },
        ),
    ];
    for (body, want) in chunk_cases {
        assert_eq!(&run(&chunked(body)).unwrap_err(), want, "{body:?}");
    }
    let mut long = "1".repeat(MAX_CHUNK_LINE_LEN + 1);
    long.push_str("\r\n");
    assert_eq!(
        run(&chunked(&long)).unwrap_err(),
        HttpError::ChunkLineTooLong
    );
    // Leading zeros are fine up to 16 digits in all, as Go's net/http allows.
    let mut zeros = "0".repeat(15);
    zeros.push_str("1\r\na\r\n0\r\n\r\n");
    assert!(run(&chunked(&zeros)).is_ok());
    assert_eq!(
        run(&chunked(&format!("0{zeros}"))).unwrap_err(),
        HttpError::BadChunkSize
    );
    // The longest chunk line Go's net/http takes, with an extension filling it.
    let mut ext = "1;".to_owned();
    ext.push_str(&"e".repeat(MAX_CHUNK_LINE_LEN - 2));
    ext.push_str("\r\na\r\n0\r\n\r\n");
    assert!(run(&chunked(&ext)).is_ok());
}

/// One valid request for the property tests: its bytes and what the filter must make of it.
fn request_strategy() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let auth_names = prop::sample::select(vec![
        "Authorization",
        "authorization",
        "AUTHORIZATION",
        "aUtHoRiZaTiOn",
    ]);
    (
        prop::sample::select(vec!["GET", "POST", "PUT", "DELETE"]),
        prop::collection::vec(auth_names, 0..3),
        any::<bool>(),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 1..40), 0..4),
        0u8..3,
        any::<bool>(),
    )
        .prop_map(|(method, auths, with_query, chunks, framing, trailer)| {
            let (target_in, target_out) = if with_query {
                (
                    "/query?u=me&db=x&p=pw&q=SELECT%201",
                    "/query?db=x&q=SELECT%201",
                )
            } else {
                ("/api/v2/write?org=o", "/api/v2/write?org=o")
            };
            let mut fields = String::from("Host: influx:8086\r\nUser-Agent: t\r\n");
            let mut input_fields = fields.clone();
            for a in &auths {
                input_fields.push_str(&format!("{a}: Basic bWU6cHc=\r\n"));
            }
            let body: Vec<u8> = chunks.concat();
            let mut body_bytes = Vec::new();
            match framing {
                0 => {}
                1 => {
                    let cl = format!("Content-Length: {}\r\n", body.len());
                    input_fields.push_str(&cl);
                    fields.push_str(&cl);
                    body_bytes = body.clone();
                }
                _ => {
                    input_fields.push_str("Transfer-Encoding: chunked\r\n");
                    fields.push_str("Transfer-Encoding: chunked\r\n");
                    for c in &chunks {
                        body_bytes.extend_from_slice(format!("{:x};n=v\r\n", c.len()).as_bytes());
                        body_bytes.extend_from_slice(c);
                        body_bytes.extend_from_slice(b"\r\n");
                    }
                    body_bytes.extend_from_slice(b"0\r\n");
                    if trailer {
                        body_bytes.extend_from_slice(b"X-Checksum: abc\r\n");
                    }
                    body_bytes.extend_from_slice(b"\r\n");
                }
            }
            let mut input =
                format!("{method} {target_in} HTTP/1.1\r\n{input_fields}\r\n").into_bytes();
            input.extend_from_slice(&body_bytes);
            let mut output =
                format!("{method} {target_out} HTTP/1.1\r\n{fields}Authorization: {AUTH}\r\n\r\n")
                    .into_bytes();
            output.extend_from_slice(&body_bytes);
            (input, output)
        })
}

proptest! {
    #[test]
    fn valid_stream_any_split_same_output(
        reqs in prop::collection::vec(request_strategy(), 1..5),
        cuts in prop::collection::vec(0usize..2000, 0..30),
    ) {
        let input: Vec<u8> = reqs.iter().flat_map(|r| r.0.clone()).collect();
        let expected: Vec<u8> = reqs.iter().flat_map(|r| r.1.clone()).collect();
        let (whole, heads, clean) = run(&input).unwrap();
        prop_assert!(clean);
        prop_assert_eq!(heads.len(), reqs.len());
        prop_assert_eq!(&whole, &expected);
        let (split, _, clean) = run_pieces(cfg(), &input, &cuts).unwrap();
        prop_assert!(clean);
        prop_assert_eq!(&split, &expected);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        input in prop::collection::vec(any::<u8>(), 0..600),
        cuts in prop::collection::vec(0usize..600, 0..10),
    ) {
        let _ = run_pieces(cfg(), &input, &cuts);
    }

    #[test]
    fn arbitrary_chunked_bodies_never_panic(
        body in prop::collection::vec(
            prop::sample::select(b"0123456789abcdefABx;= \t\"\\\r\n:GET/".to_vec()), 0..300),
        cuts in prop::collection::vec(0usize..400, 0..10),
    ) {
        let input = chunked(std::str::from_utf8(&body).unwrap());
        let whole = run_pieces(cfg(), &input, &[]);
        let split = run_pieces(cfg(), &input, &cuts);
        // Same verdict and, when accepted, same output however the bytes arrive.
        prop_assert_eq!(whole.as_ref().err(), split.as_ref().err());
        if let (Ok(w), Ok(s)) = (whole, split) {
            prop_assert_eq!(w.0, s.0);
        }
    }

    #[test]
    fn arbitrary_heads_never_panic(
        head in prop::collection::vec(
            prop::sample::select(b"GETPOST /?u=&p HTTP/1.01\r\n:Host Content-Length Transfer-Encoding chunked \t\0".to_vec()), 0..300),
        cuts in prop::collection::vec(0usize..300, 0..10),
    ) {
        let whole = run_pieces(cfg(), &head, &[]);
        let split = run_pieces(cfg(), &head, &cuts);
        prop_assert_eq!(whole.as_ref().err(), split.as_ref().err());
        if let (Ok(w), Ok(s)) = (whole, split) {
            prop_assert_eq!(w.0, s.0);
        }
    }
}

fn head_of(raw: &[u8]) -> RequestHead {
    let mut f = RequestFilter::new(FilterConfig::default());
    match f.step(raw).expect("valid head") {
        Step::Head { head, .. } => *head,
        other => panic!("expected a head, got {other:?}"),
    }
}

#[test]
fn field_values_are_found_case_insensitively_and_trimmed() {
    let head = head_of(
        b"GET / HTTP/1.1\r\nHost: x\r\nCookie: a=1\r\nX-Other: y\r\ncookie:   b=2 \r\n\
          Authorization: Token secret\r\n\r\n",
    );
    assert_eq!(head.field_values("COOKIE"), vec![&b"a=1"[..], &b"b=2"[..]]);
    assert!(
        head.field_values("authorization").is_empty(),
        "removed by the filter"
    );
    assert!(head.field_values("missing").is_empty());
}

#[test]
fn remove_cookie_takes_out_only_that_cookie() {
    let mut head = head_of(
        b"GET / HTTP/1.1\r\nHost: x\r\nCookie: a=1; postern_access=s3cret; b=2\r\n\
          Cookie: postern_access=other\r\nCookie: postern_accessx=keep\r\n\r\n",
    );
    assert_eq!(head.remove_cookie("postern_access"), 2);
    let mut out = Vec::new();
    head.write_to(&mut out);
    assert_eq!(
        String::from_utf8(out).expect("utf8"),
        "GET / HTTP/1.1\r\nHost: x\r\nCookie: a=1; b=2\r\nCookie: postern_accessx=keep\r\n\r\n"
    );
    assert_eq!(head.remove_cookie("postern_access"), 0);
}

#[test]
fn write_to_adds_no_authorization() {
    let head = head_of(b"GET /p HTTP/1.1\r\nHost: x\r\nAuthorization: Basic c2VjcmV0\r\n\r\n");
    let mut out = Vec::new();
    head.write_to(&mut out);
    assert_eq!(out, b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n");
}
