//! The forwarding frame: how end-to-end QUIC packets travel through a relay.
//!
//! A node wraps each packet of its end-to-end connection as `[TAG][route id: u64 BE][packet]` and
//! sends it to the relay, which checks that the sender is one of the route's two endpoints and
//! passes the frame, unchanged, to the other one. The first byte tells a frame from a QUIC packet
//! on the same socket: QUIC sets the fixed bit `0x40` in every packet (RFC 9000 §17, and we never
//! negotiate RFC 9287 greasing), so any first byte below `0x40` cannot be QUIC. RFC 9443 uses the
//! same trick to share a port between protocols.

use serde::{Deserialize, Serialize};
use std::fmt;

/// First byte of a forwarding frame, version 1.
pub const TAG: u8 = 0x01;
/// Bytes the frame adds in front of each packet.
pub const HEADER_LEN: usize = 9;

/// Identifies one route (one inlet/outlet pair) at a relay. Chosen at random by the relay, so a
/// third party cannot guess a live one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RouteId(pub u64);

impl fmt::Debug for RouteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl RouteId {
    /// A short hash of the id for DEBUG logs: enough to tell routes apart in one log and to match
    /// the relay's lines with a node's, useless for forging frames (16 bits of a hash, while the
    /// relay needs the whole 64-bit id). The id itself never goes to a log.
    pub fn short(&self) -> RouteTag {
        use sha2::Digest;
        let d = sha2::Sha256::digest(self.0.to_be_bytes());
        RouteTag(u16::from_be_bytes([d[0], d[1]]))
    }
}

/// See [`RouteId::short`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RouteTag(pub u16);

impl fmt::Display for RouteTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{:04x}", self.0)
    }
}

impl fmt::Display for RouteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What a datagram's first byte says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramKind {
    /// A QUIC packet (fixed bit set).
    Quic,
    /// A forwarding frame we understand.
    Forward,
    /// Neither: empty, or a first byte below `0x40` that is not a tag we know (e.g. a future
    /// frame version).
    Unknown,
}

/// Classifies a datagram by its first byte.
pub fn classify(datagram: &[u8]) -> DatagramKind {
    match datagram.first() {
        None => DatagramKind::Unknown,
        Some(&b) if b & 0x40 != 0 => DatagramKind::Quic,
        Some(&TAG) => DatagramKind::Forward,
        Some(_) => DatagramKind::Unknown,
    }
}

/// Why a datagram is not a usable forwarding frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FwdError {
    #[error("empty datagram")]
    Empty,
    #[error("datagram is a QUIC packet, not a forwarding frame")]
    NotAFrame,
    #[error("unknown frame tag {0:#04x}")]
    UnknownTag(u8),
    #[error("forwarding frame of {0} bytes is shorter than its header")]
    Truncated(usize),
    #[error("forwarding frame carries no packet")]
    NoPayload,
}

/// Writes the frame header for `route` into `out` (which must hold [`HEADER_LEN`] bytes).
pub fn write_header(route: RouteId, out: &mut [u8; HEADER_LEN]) {
    out[0] = TAG;
    out[1..].copy_from_slice(&route.0.to_be_bytes());
}

/// Returns the frame header for `route`.
pub fn header(route: RouteId) -> [u8; HEADER_LEN] {
    let mut h = [0; HEADER_LEN];
    write_header(route, &mut h);
    h
}

/// Splits a forwarding frame into its route id and the packet it carries.
pub fn parse(datagram: &[u8]) -> Result<(RouteId, &[u8]), FwdError> {
    match classify(datagram) {
        DatagramKind::Quic => return Err(FwdError::NotAFrame),
        DatagramKind::Unknown => {
            return Err(match datagram.first() {
                None => FwdError::Empty,
                Some(&b) => FwdError::UnknownTag(b),
            })
        }
        DatagramKind::Forward => {}
    }
    if datagram.len() < HEADER_LEN {
        return Err(FwdError::Truncated(datagram.len()));
    }
    if datagram.len() == HEADER_LEN {
        return Err(FwdError::NoPayload);
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&datagram[1..HEADER_LEN]);
    Ok((RouteId(u64::from_be_bytes(id)), &datagram[HEADER_LEN..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Writes frames and QUIC-like packets into `fuzz/corpus/fwd` when
    /// `$POSTERN_WRITE_SEED_CORPUS` is set (see fuzz/README.md).
    #[test]
    fn write_seed_corpus() {
        let Some(dir) = crate::seed_corpus_dir("fwd") else {
            return;
        };
        let mut frame = header(RouteId(0x0102_0304_0506_0708)).to_vec();
        frame.extend_from_slice(&[0x41; 32]);
        std::fs::write(dir.join("frame"), frame).expect("write seed");
        std::fs::write(dir.join("header-only"), header(RouteId(5))).expect("write seed");
        std::fs::write(dir.join("quic-long"), [0xc3; 40]).expect("write seed");
        std::fs::write(dir.join("quic-short"), [0x41, 0, 0]).expect("write seed");
    }

    #[test]
    fn quic_packets_are_not_frames() {
        // Long header (Initial) and short header first bytes both carry 0x40.
        assert_eq!(classify(&[0xc3, 0, 0]), DatagramKind::Quic);
        assert_eq!(classify(&[0x41, 0, 0]), DatagramKind::Quic);
        assert_eq!(parse(&[0xc3; 40]), Err(FwdError::NotAFrame));
    }

    #[test]
    fn bad_frames_are_typed_errors() {
        assert_eq!(parse(&[]), Err(FwdError::Empty));
        assert_eq!(parse(&[0x02, 1, 2]), Err(FwdError::UnknownTag(0x02)));
        assert_eq!(parse(&[TAG, 1, 2]), Err(FwdError::Truncated(3)));
        assert_eq!(parse(&header(RouteId(5))), Err(FwdError::NoPayload));
    }

    proptest! {
        #[test]
        fn round_trip(route in any::<u64>(), packet in proptest::collection::vec(any::<u8>(), 1..1500)) {
            let mut d = header(RouteId(route)).to_vec();
            d.extend_from_slice(&packet);
            let (r, p) = parse(&d).expect("frame");
            prop_assert_eq!(r, RouteId(route));
            prop_assert_eq!(p, &packet[..]);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse(&bytes);
        }
    }
}
