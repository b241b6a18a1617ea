//! Datagrams over a byte stream: how a node's packets travel to the relay where UDP is blocked.
//!
//! The TLS/TCP fallback carries exactly what the UDP socket would: QUIC packets of the node's
//! control connection and forwarding frames ([`crate::fwd`]) of its end-to-end connections.
//! Each datagram is sent as `[u16 big-endian length][datagram]`. The length is checked against
//! [`MAX_DATAGRAM`] before anything is buffered, so a peer cannot make the reader hold more than
//! one maximal datagram plus one read's worth of bytes; a zero length is an error (UDP has no
//! empty datagrams we would send, so a zero is a desynchronised or hostile stream).
//!
//! Decoding is sans-IO, after mini-redis: [`Decoder::push`] takes whatever bytes a read gave,
//! [`Decoder::next_datagram`] hands out complete datagrams one by one.

/// ALPN of the TLS connection that carries datagrams to a relay.
pub const ALPN_TCP: &[u8] = b"postern-tcp/1";
/// Size of the length prefix.
pub const LEN_PREFIX: usize = 2;
/// Largest datagram carried. Control packets stay below 1500 bytes; end-to-end packets grow
/// with path MTU discovery (up to 16 KiB on loopback-like paths), and a bigger one is dropped
/// here like an oversize UDP datagram, so discovery over a TCP link settles below this bound.
/// It keeps a link's queues small (see `postern_net::links`) and stops a peer from announcing
/// large frames.
pub const MAX_DATAGRAM: usize = 4096;

/// Why a stream of datagrams is unusable (the connection is closed: resynchronising a byte
/// stream after a bad length is not possible).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DgramError {
    #[error("datagram of {len} bytes exceeds the limit of {MAX_DATAGRAM} bytes")]
    Oversize { len: usize },
    #[error("zero-length datagram (corrupt or hostile stream)")]
    Empty,
}

/// Appends one datagram, length-prefixed, to `out`.
pub fn encode(datagram: &[u8], out: &mut Vec<u8>) -> Result<(), DgramError> {
    match datagram.len() {
        0 => Err(DgramError::Empty),
        len if len > MAX_DATAGRAM => Err(DgramError::Oversize { len }),
        len => {
            out.extend_from_slice(&(len as u16).to_be_bytes());
            out.extend_from_slice(datagram);
            Ok(())
        }
    }
}

/// Reassembles datagrams from stream reads.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already handed out.
    consumed: usize,
}

impl Decoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.consumed > 0 {
            self.buf.drain(..self.consumed);
            self.consumed = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete datagram, `Ok(None)` if more bytes are needed, or an error if the
    /// stream announced a datagram we refuse.
    pub fn next_datagram(&mut self) -> Result<Option<&[u8]>, DgramError> {
        let rest = &self.buf[self.consumed..];
        if rest.len() < LEN_PREFIX {
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        if len == 0 {
            return Err(DgramError::Empty);
        }
        if len > MAX_DATAGRAM {
            return Err(DgramError::Oversize { len });
        }
        if rest.len() < LEN_PREFIX + len {
            return Ok(None);
        }
        let start = self.consumed + LEN_PREFIX;
        self.consumed = start + len;
        Ok(Some(&self.buf[start..start + len]))
    }

    /// Bytes held but not handed out (bounded by one datagram plus the last push).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.consumed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Writes datagram streams into `fuzz/corpus/dgram` when `$POSTERN_WRITE_SEED_CORPUS` is
    /// set (see fuzz/README.md).
    #[test]
    fn write_seed_corpus() {
        let Some(dir) = crate::seed_corpus_dir("dgram") else {
            return;
        };
        let mut stream = Vec::new();
        for d in [&b"a"[..], &[0xc3; 1200], &[0x41; 5]] {
            encode(d, &mut stream).expect("encode");
        }
        std::fs::write(dir.join("three"), &stream).expect("write seed");
        std::fs::write(dir.join("zero"), [0, 0]).expect("write seed");
        std::fs::write(dir.join("oversize"), [0xff, 0xff, 1]).expect("write seed");
    }

    #[test]
    fn bad_lengths_are_typed_errors() {
        let mut d = Decoder::new();
        d.push(&[0, 0]);
        assert_eq!(d.next_datagram(), Err(DgramError::Empty));
        let mut d = Decoder::new();
        d.push(&[0xff, 0xff, 1]);
        assert_eq!(d.next_datagram(), Err(DgramError::Oversize { len: 0xffff }));
        let mut out = Vec::new();
        assert_eq!(encode(&[], &mut out), Err(DgramError::Empty));
        assert_eq!(
            encode(&vec![1; MAX_DATAGRAM + 1], &mut out),
            Err(DgramError::Oversize {
                len: MAX_DATAGRAM + 1
            })
        );
        assert!(out.is_empty(), "nothing written on error");
    }

    #[test]
    fn oversize_is_refused_before_the_body_arrives() {
        let mut d = Decoder::new();
        d.push(&((MAX_DATAGRAM + 1) as u16).to_be_bytes());
        assert!(d.next_datagram().is_err());
        assert_eq!(d.buffered(), LEN_PREFIX);
    }

    proptest! {
        #[test]
        fn any_split_round_trips(
            grams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..1600), 1..20),
            cut in 1usize..97,
        ) {
            let mut wire = Vec::new();
            for g in &grams {
                encode(g, &mut wire).expect("encode");
            }
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(cut) {
                d.push(chunk);
                while let Some(g) = d.next_datagram().expect("valid") {
                    got.push(g.to_vec());
                }
                prop_assert!(d.buffered() <= MAX_DATAGRAM + LEN_PREFIX + cut);
            }
            prop_assert_eq!(got, grams);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut d = Decoder::new();
            d.push(&bytes);
            while let Ok(Some(_)) = d.next_datagram() {}
        }
    }
}
