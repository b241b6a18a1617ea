//! Datagrams over the TLS/TCP fallback, reassembled from reads: the datagrams and the verdict
//! do not depend on how the stream is split into reads, and re-encoding the datagrams gives
//! back the bytes they came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_proto::dgram::{self, Decoder, DgramError};

/// Datagrams decoded from `stream` pushed `piece` bytes at a time, and the error that ended
/// the stream, if any.
fn decode(stream: &[u8], piece: usize) -> (Vec<Vec<u8>>, Option<DgramError>) {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    for chunk in stream.chunks(piece.max(1)) {
        d.push(chunk);
        loop {
            match d.next_datagram() {
                Ok(Some(datagram)) => out.push(datagram.to_vec()),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&piece, stream)) = data.split_first() else {
        return;
    };
    let whole = decode(stream, stream.len());
    let split = decode(stream, usize::from(piece));
    assert_eq!(whole, split);
    let mut encoded = Vec::new();
    for d in &whole.0 {
        dgram::encode(d, &mut encoded).expect("a decoded datagram encodes");
    }
    assert_eq!(encoded, stream[..encoded.len()]);
});
