//! Length-prefixed, versioned, size-limited frames carrying bincode-encoded serde values.
//!
//! Layout: `u32` big-endian length of what follows, one version byte, then the bincode payload.
//! The length is checked against a limit *before* anything is buffered, so a peer cannot make us
//! allocate more than [`MAX_FRAME_LEN`] by announcing a huge frame.
//!
//! Decoding follows mini-redis: [`decode`] looks at a buffer and either returns a value and how
//! many bytes it used, or says more bytes are needed, so partial reads are natural.

use serde::{de::DeserializeOwned, Serialize};

/// Current protocol version carried in every frame.
pub const VERSION: u8 = 1;
/// Largest frame body (version byte + payload) we accept or produce.
pub const MAX_FRAME_LEN: usize = 64 * 1024;
/// Size of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    /// The announced or produced frame is larger than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversize { len: usize, max: usize },
    /// The frame is from a protocol version we do not speak.
    #[error("unsupported protocol version {0} (this build speaks version {VERSION})")]
    UnknownVersion(u8),
    /// A zero-length frame has no version byte.
    #[error("empty frame (no version byte)")]
    Empty,
    /// The payload is not a valid encoding of the expected message.
    #[error("malformed frame payload: {0}")]
    Malformed(String),
    /// The input ended in the middle of a frame.
    #[error("input ended in the middle of a frame")]
    Truncated,
    /// The payload decoded but left bytes unused.
    #[error("{0} trailing bytes after the frame payload")]
    Trailing(usize),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_big_endian()
        .with_limit::<MAX_FRAME_LEN>()
}

/// Appends one frame holding `msg` to `out`.
pub fn encode<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let start = out.len();
    out.extend_from_slice(&[0; LEN_PREFIX]);
    out.push(VERSION);
    if let Err(e) = bincode::serde::encode_into_std_write(msg, out, config()) {
        out.truncate(start);
        return Err(CodecError::Malformed(e.to_string()));
    }
    let body = out.len() - start - LEN_PREFIX;
    if body > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(CodecError::Oversize {
            len: body,
            max: MAX_FRAME_LEN,
        });
    }
    out[start..start + LEN_PREFIX].copy_from_slice(&(body as u32).to_be_bytes());
    Ok(())
}

/// Encodes `msg` as a fresh frame.
pub fn to_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(64);
    encode(msg, &mut out)?;
    Ok(out)
}

/// Checks the length prefix at the start of `buf`.
///
/// Returns `Ok(Some(body_len))` when the prefix is complete and acceptable, `Ok(None)` when fewer
/// than four bytes are present.
pub fn check_prefix(buf: &[u8]) -> Result<Option<usize>, CodecError> {
    let Some(prefix) = buf.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let mut len = [0u8; LEN_PREFIX];
    len.copy_from_slice(prefix);
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_LEN {
        return Err(CodecError::Oversize {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    if len == 0 {
        return Err(CodecError::Empty);
    }
    Ok(Some(len))
}

/// Decodes a frame body (version byte + payload), as read after the length prefix.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let (&version, payload) = body.split_first().ok_or(CodecError::Empty)?;
    if version != VERSION {
        return Err(CodecError::UnknownVersion(version));
    }
    let (value, used) =
        bincode::serde::decode_from_slice(payload, config()).map_err(|e| match e {
            bincode::error::DecodeError::UnexpectedEnd { .. } => CodecError::Truncated,
            other => CodecError::Malformed(other.to_string()),
        })?;
    if used != payload.len() {
        return Err(CodecError::Trailing(payload.len() - used));
    }
    Ok(value)
}

/// Decodes one frame from the start of `buf`.
///
/// `Ok(None)` means `buf` holds only part of a frame: read more and call again. On success the
/// second value is the number of bytes consumed.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, CodecError> {
    let Some(len) = check_prefix(buf)? else {
        return Ok(None);
    };
    let Some(body) = buf.get(LEN_PREFIX..LEN_PREFIX + len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, LEN_PREFIX + len)))
}

/// Decodes a buffer that must hold exactly one complete frame (e.g. a whole stream's contents).
pub fn decode_exact<T: DeserializeOwned>(buf: &[u8]) -> Result<T, CodecError> {
    match decode(buf)? {
        None => Err(CodecError::Truncated),
        Some((v, used)) if used == buf.len() => Ok(v),
        Some((_, used)) => Err(CodecError::Trailing(buf.len() - used)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{Ctl, RefuseReason};
    use crate::name::ServiceName;
    use proptest::prelude::*;

    fn svc(s: &str) -> ServiceName {
        ServiceName::new(s).expect("valid name")
    }

    /// Writes frames of every message type a node or relay decodes into `fuzz/corpus/codec`
    /// when `$POSTERN_WRITE_SEED_CORPUS` is set (see fuzz/README.md).
    #[test]
    fn write_seed_corpus() {
        use crate::msg::{LeaseMsg, StreamOpen};
        use crate::name::NodeName;
        let Some(dir) = crate::seed_corpus_dir("codec") else {
            return;
        };
        let node = NodeName::new("inlet-1").expect("name");
        let ctl = [
            Ctl::Register {
                services: vec![svc("influxdb"), svc("web")],
            },
            Ctl::RouteRequest {
                service: svc("influxdb"),
            },
            Ctl::RouteGranted {
                route: crate::fwd::RouteId(7),
                service: svc("influxdb"),
                outlet: node.clone(),
            },
            Ctl::RouteRefused {
                service: svc("influxdb"),
                reason: RefuseReason::NoLiveOutlet,
            },
            Ctl::Revoked { name: node },
            Ctl::Renew {
                csr_pem: "-----BEGIN CERTIFICATE REQUEST-----".into(),
            },
            Ctl::Heartbeat { seq: 42 },
            Ctl::Ack,
            Ctl::Refused {
                reason: crate::msg::Refusal::NotAllowed {
                    action: "register".into(),
                    service: svc("influxdb"),
                    attrs: [("role".to_owned(), "guest".to_owned())].into(),
                    rule: "default deny (no policy allows it)".into(),
                },
            },
            Ctl::PublicStream {
                service: svc("web"),
                client: "127.0.0.1:1".into(),
            },
            Ctl::ServiceHealth {
                service: svc("web"),
                healthy: false,
                reason: "connect to 127.0.0.1:1 failed".into(),
            },
            Ctl::RouteRetired {
                route: crate::fwd::RouteId(7),
                reason: "unhealthy".into(),
            },
        ];
        for (i, m) in ctl.iter().enumerate() {
            let frame = to_frame(m).expect("encode");
            std::fs::write(dir.join(format!("ctl-{i}")), frame).expect("write seed");
        }
        let open = [
            StreamOpen::Connect {
                service: svc("influxdb"),
            },
            StreamOpen::Lease {
                service: svc("influxdb"),
            },
            StreamOpen::ConnectFrom {
                service: svc("web"),
                client: "127.0.0.1:40000".parse().expect("addr"),
                local: "[::1]:8086".parse().expect("addr"),
            },
        ];
        for (i, m) in open.iter().enumerate() {
            let frame = to_frame(m).expect("encode");
            std::fs::write(dir.join(format!("open-{i}")), frame).expect("write seed");
        }
        let lease = to_frame(&LeaseMsg::Unavailable {
            reason: "down".into(),
        })
        .expect("encode");
        std::fs::write(dir.join("lease-unavailable"), lease).expect("write seed");
    }

    #[test]
    fn hand_out_messages_round_trip_and_old_stream_opens_keep_their_encoding() {
        use crate::lease::{Credential, LeaseGrant};
        use crate::msg::{HandOutMsg, LeaseMsg, StreamOpen};
        fn back<T: Serialize + DeserializeOwned>(m: &T) -> T {
            let frame = to_frame(m).expect("encode");
            decode_body(&frame[4..]).expect("decode")
        }
        let open = StreamOpen::HandOut {
            service: svc("influxdb"),
            fresh: true,
        };
        assert_eq!(back(&open), open);
        let granted = HandOutMsg::Granted {
            grant: LeaseGrant {
                lease_id: "0123456789abcdef".into(),
                credential: Credential::Token("t".into()),
                expires_at_ms: 7,
            },
            profile: "analysts".into(),
        };
        assert_eq!(back(&granted), granted);
        let refused = LeaseMsg::Refused {
            reason: "no profile".into(),
        };
        assert_eq!(back(&refused), refused);
        // The new variants come last: what older nodes send still means the same.
        let lease = to_frame(&StreamOpen::Lease {
            service: svc("influxdb"),
        })
        .expect("encode");
        assert_eq!(lease[5], 1, "StreamOpen::Lease is still variant 1");
    }

    #[test]
    fn round_trip_and_consumed_length() {
        let msg = Ctl::RouteRequest {
            service: svc("influxdb"),
        };
        let mut buf = to_frame(&msg).expect("encode");
        let n = buf.len();
        buf.extend_from_slice(b"next");
        let (back, used): (Ctl, usize) = decode(&buf).expect("decode").expect("complete");
        assert_eq!(back, msg);
        assert_eq!(used, n);
    }

    #[test]
    fn every_truncation_asks_for_more() {
        let buf = to_frame(&Ctl::RouteRefused {
            service: svc("influxdb"),
            reason: RefuseReason::NoLiveOutlet,
        })
        .expect("encode");
        for cut in 0..buf.len() {
            assert_eq!(decode::<Ctl>(&buf[..cut]), Ok(None), "cut at {cut}");
            assert_eq!(decode_exact::<Ctl>(&buf[..cut]), Err(CodecError::Truncated));
        }
    }

    #[test]
    fn oversize_prefix_is_refused_before_buffering() {
        let mut buf = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec();
        buf.push(VERSION);
        assert!(matches!(
            decode::<Ctl>(&buf),
            Err(CodecError::Oversize { .. })
        ));
        let huge = u32::MAX.to_be_bytes();
        assert!(matches!(
            decode::<Ctl>(&huge),
            Err(CodecError::Oversize { .. })
        ));
    }

    #[test]
    fn oversize_message_is_refused_on_encode() {
        let big = vec![ServiceName::new("a").expect("name"); MAX_FRAME_LEN];
        let mut out = b"keep".to_vec();
        let err = encode(&Ctl::Register { services: big }, &mut out).expect_err("too big");
        assert!(matches!(err, CodecError::Oversize { .. }));
        assert_eq!(out, b"keep", "a failed encode leaves the buffer as it was");
    }

    #[test]
    fn unknown_version_is_named() {
        let mut buf = to_frame(&Ctl::Heartbeat { seq: 7 }).expect("encode");
        buf[LEN_PREFIX] = 9;
        assert_eq!(decode::<Ctl>(&buf), Err(CodecError::UnknownVersion(9)));
    }

    #[test]
    fn empty_frame_is_an_error() {
        assert_eq!(decode::<Ctl>(&[0, 0, 0, 0]), Err(CodecError::Empty));
    }

    #[test]
    fn trailing_bytes_inside_a_frame_are_an_error() {
        let mut buf = to_frame(&Ctl::Heartbeat { seq: 1 }).expect("encode");
        buf.push(0);
        let len = (buf.len() - LEN_PREFIX) as u32;
        buf[..LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(decode::<Ctl>(&buf), Err(CodecError::Trailing(1))));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Ctl>(&bytes);
            let _ = decode_exact::<crate::msg::StreamOpen>(&bytes);
        }

        #[test]
        fn heartbeat_round_trips(seq in any::<u64>()) {
            let m = Ctl::Heartbeat { seq };
            let buf = to_frame(&m).expect("encode");
            prop_assert_eq!(decode_exact::<Ctl>(&buf).expect("decode"), m);
        }

        #[test]
        fn route_messages_round_trip(route in any::<u64>(), name in "[a-z][a-z0-9-]{0,30}") {
            let m = Ctl::RouteOpen {
                route: crate::fwd::RouteId(route),
                service: svc(&name),
                inlet: crate::name::NodeName::new(&name).expect("node name"),
            };
            let buf = to_frame(&m).expect("encode");
            prop_assert_eq!(decode_exact::<Ctl>(&buf).expect("decode"), m);
        }
    }
}
