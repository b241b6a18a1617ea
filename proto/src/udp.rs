//! UDP services: client datagrams carried as QUIC datagrams (RFC 9221) on the end-to-end
//! connection between an inlet and an outlet.
//!
//! Many client flows (one per client address at the inlet) share one connection, so every
//! datagram starts with the flow's id, chosen by the inlet. The service is named once per flow:
//! the inlet sends [`Frame::Open`] (id, service, payload) until the outlet answers
//! [`Frame::Ack`], then [`Frame::Data`] (id, payload). QUIC datagrams may be lost, so the
//! naming is repeated until an acknowledgement comes back rather than sent once; and an outlet
//! that no longer knows a flow (it timed out there first) answers [`Frame::Unknown`], after
//! which the inlet names it again. A flow the outlet will not serve is answered
//! [`Frame::Refused`] with the reason, and nothing of it is forwarded.
//!
//! Layout (big-endian): `tag u8, flow u32`, then for `Open` `name_len u8, name, payload`, for
//! `Data` the payload, for `Refused` a reason byte; `Ack` and `Unknown` end after the flow id.
//! Sans-IO: [`Frame::encode`] appends to a buffer, [`Frame::decode`] borrows from one.

use crate::name::{ServiceName, MAX_NAME_LEN};
use std::time::Duration;

/// What a `[[service]]` carries: TCP connections (the default) or UDP datagrams.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

/// How long a UDP flow (one client address) lives without a datagram either way, at the inlet
/// and at the outlet, unless the service sets `udp-idle-timeout`. Telegraf flushes every 10 s
/// by default, so a minute keeps its flow (and the outlet's socket) between flushes.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

const OPEN: u8 = 1;
const DATA: u8 = 2;
const ACK: u8 = 3;
const UNKNOWN: u8 = 4;
const REFUSED: u8 = 5;

/// Bytes a [`Frame::Data`] adds to its payload.
pub const DATA_OVERHEAD: usize = 5;
/// Most bytes a [`Frame::Open`] adds to its payload (with the longest service name). Inlets
/// check a datagram against the connection's limit with this, so that a datagram that fits
/// while its flow is named also fits afterwards, and the other way round.
pub const OPEN_OVERHEAD: usize = 6 + MAX_NAME_LEN;

/// Why an outlet will not serve a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefuseCode {
    /// The outlet's `allow` expression for the service does not admit this inlet.
    NotAllowed,
    /// The outlet offers no UDP service of that name.
    UnknownService,
    /// The outlet could not open a socket to the service's target.
    TargetUnreachable,
}

impl RefuseCode {
    /// The label metrics and logs use.
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseCode::NotAllowed => "not_allowed",
            RefuseCode::UnknownService => "unknown_service",
            RefuseCode::TargetUnreachable => "target_unreachable",
        }
    }

    fn byte(self) -> u8 {
        match self {
            RefuseCode::NotAllowed => 1,
            RefuseCode::UnknownService => 2,
            RefuseCode::TargetUnreachable => 3,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(RefuseCode::NotAllowed),
            2 => Some(RefuseCode::UnknownService),
            3 => Some(RefuseCode::TargetUnreachable),
            _ => None,
        }
    }
}

/// One datagram of a UDP service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Inlet to outlet: a datagram of a flow not yet acknowledged, naming its service.
    Open {
        flow: u32,
        service: ServiceName,
        payload: &'a [u8],
    },
    /// Either way: a datagram of a flow both ends know.
    Data { flow: u32, payload: &'a [u8] },
    /// Outlet to inlet: the flow is set up; the inlet stops naming it.
    Ack { flow: u32 },
    /// Outlet to inlet: the flow is not known here (timed out): name it again.
    Unknown { flow: u32 },
    /// Outlet to inlet: the flow is not served, and why.
    Refused { flow: u32, reason: RefuseCode },
}

/// Why a datagram is not a frame (it is dropped and counted; nothing else is affected).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("datagram of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("unknown frame tag {0}")]
    Tag(u8),
    #[error("bad service name in an open frame")]
    Name,
    #[error("unknown refusal reason {0}")]
    Reason(u8),
    #[error("{0} trailing bytes after a frame that carries no payload")]
    Trailing(usize),
}

impl<'a> Frame<'a> {
    /// The flow this frame belongs to.
    pub fn flow(&self) -> u32 {
        match self {
            Frame::Open { flow, .. }
            | Frame::Data { flow, .. }
            | Frame::Ack { flow }
            | Frame::Unknown { flow }
            | Frame::Refused { flow, .. } => *flow,
        }
    }

    /// The frame's length once encoded.
    pub fn len(&self) -> usize {
        match self {
            Frame::Open {
                service, payload, ..
            } => 6 + service.as_str().len() + payload.len(),
            Frame::Data { payload, .. } => DATA_OVERHEAD + payload.len(),
            Frame::Ack { .. } | Frame::Unknown { .. } => 5,
            Frame::Refused { .. } => 6,
        }
    }

    /// Never true: every frame has at least its tag and flow id.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Appends the frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.len());
        let (tag, flow) = match self {
            Frame::Open { flow, .. } => (OPEN, flow),
            Frame::Data { flow, .. } => (DATA, flow),
            Frame::Ack { flow } => (ACK, flow),
            Frame::Unknown { flow } => (UNKNOWN, flow),
            Frame::Refused { flow, .. } => (REFUSED, flow),
        };
        out.push(tag);
        out.extend_from_slice(&flow.to_be_bytes());
        match self {
            Frame::Open {
                service, payload, ..
            } => {
                let name = service.as_str().as_bytes();
                // Service names are at most MAX_NAME_LEN (63) bytes: the length fits a byte.
                out.push(name.len() as u8);
                out.extend_from_slice(name);
                out.extend_from_slice(payload);
            }
            Frame::Data { payload, .. } => out.extend_from_slice(payload),
            Frame::Refused { reason, .. } => out.push(reason.byte()),
            Frame::Ack { .. } | Frame::Unknown { .. } => {}
        }
    }

    /// The frame as a fresh buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        self.encode(&mut v);
        v
    }

    /// Reads one frame (a whole datagram).
    pub fn decode(buf: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        let [tag, a, b, c, d, rest @ ..] = buf else {
            return Err(FrameError::Short(buf.len()));
        };
        let flow = u32::from_be_bytes([*a, *b, *c, *d]);
        let no_more = |f: Frame<'a>, rest: &[u8]| {
            if rest.is_empty() {
                Ok(f)
            } else {
                Err(FrameError::Trailing(rest.len()))
            }
        };
        match *tag {
            OPEN => {
                let [n, rest @ ..] = rest else {
                    return Err(FrameError::Short(buf.len()));
                };
                let n = usize::from(*n);
                if rest.len() < n {
                    return Err(FrameError::Short(buf.len()));
                }
                let (name, payload) = rest.split_at(n);
                let service = std::str::from_utf8(name)
                    .ok()
                    .and_then(|s| ServiceName::new(s).ok())
                    .ok_or(FrameError::Name)?;
                Ok(Frame::Open {
                    flow,
                    service,
                    payload,
                })
            }
            DATA => Ok(Frame::Data {
                flow,
                payload: rest,
            }),
            ACK => no_more(Frame::Ack { flow }, rest),
            UNKNOWN => no_more(Frame::Unknown { flow }, rest),
            REFUSED => {
                let [r, more @ ..] = rest else {
                    return Err(FrameError::Short(buf.len()));
                };
                let reason = RefuseCode::from_byte(*r).ok_or(FrameError::Reason(*r))?;
                no_more(Frame::Refused { flow, reason }, more)
            }
            t => Err(FrameError::Tag(t)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(s: &str) -> ServiceName {
        ServiceName::new(s).expect("name")
    }

    #[test]
    fn every_frame_round_trips_and_its_length_is_what_is_written() {
        let long = "a".repeat(MAX_NAME_LEN);
        let frames = [
            Frame::Open {
                flow: 7,
                service: svc("influxdb-udp"),
                payload: b"cpu value=1",
            },
            Frame::Open {
                flow: u32::MAX,
                service: svc(&long),
                payload: b"",
            },
            Frame::Data {
                flow: 1,
                payload: b"m,host=a v=2i",
            },
            Frame::Data {
                flow: 0,
                payload: b"",
            },
            Frame::Ack { flow: 3 },
            Frame::Unknown { flow: 4 },
            Frame::Refused {
                flow: 5,
                reason: RefuseCode::NotAllowed,
            },
            Frame::Refused {
                flow: 6,
                reason: RefuseCode::UnknownService,
            },
            Frame::Refused {
                flow: 8,
                reason: RefuseCode::TargetUnreachable,
            },
        ];
        for f in frames {
            let bytes = f.to_vec();
            assert_eq!(bytes.len(), f.len(), "{f:?}");
            assert_eq!(Frame::decode(&bytes).expect("decode"), f);
            assert_eq!(Frame::decode(&bytes).expect("decode").flow(), f.flow());
        }
    }

    #[test]
    fn overheads_bound_the_header() {
        let long = "b".repeat(MAX_NAME_LEN);
        let open = Frame::Open {
            flow: 1,
            service: svc(&long),
            payload: b"xyz",
        };
        assert_eq!(open.len(), OPEN_OVERHEAD + 3);
        let data = Frame::Data {
            flow: 1,
            payload: b"xyz",
        };
        assert_eq!(data.len(), DATA_OVERHEAD + 3);
    }

    #[test]
    fn malformed_datagrams_are_errors_not_panics() {
        assert_eq!(Frame::decode(b""), Err(FrameError::Short(0)));
        assert_eq!(Frame::decode(&[DATA, 0, 0, 0]), Err(FrameError::Short(4)));
        assert_eq!(Frame::decode(&[9, 0, 0, 0, 1]), Err(FrameError::Tag(9)));
        // An open frame whose name runs past the end.
        assert_eq!(
            Frame::decode(&[OPEN, 0, 0, 0, 1, 10, b'a']),
            Err(FrameError::Short(7))
        );
        assert_eq!(
            Frame::decode(&[OPEN, 0, 0, 0, 1]),
            Err(FrameError::Short(5))
        );
        // Not a valid service name.
        assert_eq!(
            Frame::decode(&[OPEN, 0, 0, 0, 1, 2, b'A', b'!']),
            Err(FrameError::Name)
        );
        assert_eq!(
            Frame::decode(&[OPEN, 0, 0, 0, 1, 2, 0xff, 0xfe]),
            Err(FrameError::Name)
        );
        assert_eq!(
            Frame::decode(&[REFUSED, 0, 0, 0, 1, 77]),
            Err(FrameError::Reason(77))
        );
        assert_eq!(
            Frame::decode(&[REFUSED, 0, 0, 0, 1]),
            Err(FrameError::Short(5))
        );
        assert_eq!(
            Frame::decode(&[ACK, 0, 0, 0, 1, 0]),
            Err(FrameError::Trailing(1))
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // Every short prefix of every tag, plus some noise.
        for tag in 0..=6u8 {
            for len in 0..12usize {
                let buf: Vec<u8> = std::iter::once(tag)
                    .chain((0..len).map(|i| (i as u8).wrapping_mul(37)))
                    .collect();
                let _ = Frame::decode(&buf);
            }
        }
    }
}
