//! The HTTP request filter, fed what a client sends. Checks, besides never panicking: the
//! result does not depend on how the bytes are split into reads (the input is fed whole and
//! cut at points the fuzzer picks), and every head the filter lets through, re-serialized,
//! parses again to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_proto::http::{FilterConfig, HttpError, RequestFilter, RequestHead, Step};

const AUTH: &str = "Token leased";

struct Outcome {
    /// Bytes passed on: heads re-serialized with [`AUTH`], bodies unchanged.
    out: Vec<u8>,
    heads: Vec<RequestHead>,
    error: Option<HttpError>,
    /// Ended between requests with nothing left over, or in an opaque tunnel.
    clean: bool,
}

/// Feeds `input` in pieces ending at `cuts` (then the rest), as a proxy reading a socket
/// would: unconsumed bytes stay in front of the next read's.
fn run(cfg: &FilterConfig, input: &[u8], cuts: &[usize]) -> Outcome {
    let mut f = RequestFilter::new(cfg.clone());
    let mut o = Outcome {
        out: Vec::new(),
        heads: Vec::new(),
        error: None,
        clean: false,
    };
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
                o.out.append(&mut pending);
                break;
            }
            match f.step(&pending) {
                Err(e) => {
                    o.error = Some(e);
                    return o;
                }
                Ok(Step::NeedMore) => break,
                Ok(Step::Head { head, consumed }) => {
                    assert!(consumed > 0 && consumed <= pending.len());
                    if let Err(e) = head.write_with_authorization(AUTH, &mut o.out) {
                        o.error = Some(e);
                        return o;
                    }
                    o.heads.push(*head);
                    pending.drain(..consumed);
                }
                Ok(Step::Body { len }) => {
                    assert!(len > 0 && len <= pending.len());
                    o.out.extend(pending.drain(..len));
                }
                // The server switched (the harder case: the rest is passed on unchanged).
                Ok(Step::AwaitUpgrade) => f.upgrade_answered(true),
                Ok(Step::Opaque) => opaque = true,
            }
        }
    }
    o.clean = opaque || (pending.is_empty() && f.between_requests());
    o
}

/// A head written out parses again, whole, to a head that writes out the same bytes.
fn reparses(cfg: &FilterConfig, head: &RequestHead) {
    let mut bytes = Vec::new();
    head.write_with_authorization(AUTH, &mut bytes)
        .expect("written once already");
    // The written head carries one field more than the client sent (the injected
    // Authorization), so a head at the limits parses again only with room for that field.
    // Found by this target: the filter accepts `max_headers` fields (or `max_head_len` bytes)
    // and then writes one more field, which a second filter with the same limits (the outlet's,
    // verifying the inlet's output) refuses.
    let roomy = FilterConfig {
        max_headers: cfg.max_headers + 1,
        max_head_len: cfg.max_head_len + "Authorization: \r\n".len() + AUTH.len(),
        ..cfg.clone()
    };
    let mut f = RequestFilter::new(roomy);
    match f.step(&bytes) {
        Ok(Step::Head {
            head: again,
            consumed,
        }) => {
            assert_eq!(consumed, bytes.len(), "the whole head, nothing more");
            let mut twice = Vec::new();
            again
                .write_with_authorization(AUTH, &mut twice)
                .expect("write again");
            assert_eq!(twice, bytes, "re-serializing is stable");
            assert_eq!(again.method(), head.method());
            assert_eq!(again.target(), head.target());
            assert_eq!(again.framing(), head.framing());
        }
        other => panic!(
            "a head the filter wrote does not parse again: {other:?}\n{:?}",
            String::from_utf8_lossy(&bytes)
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    // First byte: the configuration and how many cuts; then two bytes per cut.
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let cfg = FilterConfig {
        strip_query_credentials: control & 0x80 != 0,
        ..FilterConfig::default()
    };
    let n_cuts = usize::from(control & 0x07);
    let Some(cut_bytes) = rest.get(..n_cuts * 2) else {
        return;
    };
    let input = &rest[n_cuts * 2..];
    let cuts: Vec<usize> = cut_bytes
        .chunks(2)
        .map(|c| usize::from(u16::from_be_bytes([c[0], c[1]])) % (input.len() + 1))
        .collect();

    let whole = run(&cfg, input, &[]);
    let split = run(&cfg, input, &cuts);
    assert_eq!(
        whole.error, split.error,
        "same verdict fed whole and in pieces"
    );
    if whole.error.is_none() {
        assert_eq!(whole.out, split.out, "same output fed whole and in pieces");
        assert_eq!(whole.clean, split.clean);
        assert_eq!(whole.heads.len(), split.heads.len());
    } else {
        // Before the error, each passed on a prefix of the same filtered stream.
        let n = whole.out.len().min(split.out.len());
        assert_eq!(whole.out[..n], split.out[..n]);
    }
    for head in &whole.heads {
        reparses(&cfg, head);
    }
});
