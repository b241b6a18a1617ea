//! The response follower (`postern_proto::http::response::ResponseTracker`), fed what a server
//! sends back: never panics, and its answers and end state do not depend on how the bytes are
//! split into reads. The first bytes choose the requests announced (normal, HEAD, upgrade) and
//! the cut points; the rest is the server's stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_proto::http::response::{Expect, ResponseTracker, UpgradeAnswer};

struct Outcome {
    answers: Vec<UpgradeAnswer>,
    failed: bool,
    opaque: bool,
    pending: usize,
}

fn run(expects: &[Expect], stream: &[u8], cuts: &[usize]) -> Outcome {
    let mut t = ResponseTracker::new(4096);
    for e in expects {
        t.expect(*e);
    }
    let mut answers = Vec::new();
    let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(stream.len())).collect();
    bounds.sort_unstable();
    bounds.push(stream.len());
    let mut prev = 0;
    for b in bounds {
        match t.feed(&stream[prev..b]) {
            Ok(Some(a)) => answers.push(a),
            Ok(None) => {}
            Err(_) => break,
        }
        prev = b;
    }
    Outcome {
        answers,
        failed: t.failure().is_some(),
        opaque: t.is_opaque(),
        pending: t.pending(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8).min(rest.len());
    let (kinds, rest) = rest.split_at(n);
    let expects: Vec<Expect> = kinds
        .iter()
        .map(|k| match k % 3 {
            0 => Expect::Normal,
            1 => Expect::Head,
            _ => Expect::Upgrade,
        })
        .collect();
    let Some((&c, stream)) = rest.split_first() else {
        return;
    };
    let cuts: Vec<usize> = (1..=usize::from(c % 6))
        .map(|i| i * stream.len() / 7 + usize::from(c) % 5)
        .collect();
    let whole = run(&expects, stream, &[]);
    let split = run(&expects, stream, &cuts);
    // One read can carry one answer at most in real use (a request may not follow an upgrade
    // before its answer); here several upgrades may be announced at once, so compare only when
    // the whole-stream run could report every answer.
    if whole.answers.len() <= 1 && split.answers.len() <= 1 && !whole.failed {
        assert_eq!(whole.failed, split.failed);
        assert_eq!(whole.opaque, split.opaque);
        assert_eq!(whole.pending, split.pending);
        if !whole.answers.is_empty() {
            assert_eq!(whole.answers, split.answers);
        }
    }
    assert!(whole.pending <= expects.len());
});
