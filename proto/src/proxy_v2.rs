//! The PROXY protocol version 2 header (HAProxy's `proxy-protocol.txt`, section 2.2) an outlet
//! writes first on a target connection, so that nginx, HAProxy or any PROXY-aware service sees
//! the inlet's client address instead of the outlet's, and the client's identity.
//!
//! Layout: the 12-byte signature, `0x21` (version 2, command PROXY), the family and transport
//! (`0x11` TCP over IPv4, `0x21` TCP over IPv6), the big-endian length of what follows, the
//! source and destination addresses, the source and destination ports, then TLVs (type byte,
//! big-endian 16-bit length, value). A source and a destination of different families are
//! both written as IPv6 (IPv4-mapped), since one header carries one family.
//!
//! postern's TLVs use the range the specification keeps for custom use (`0xE0`-`0xEF`):
//! [`TLV_IDENTITY`] is the client's identity name (its certificate's node name), [`TLV_ATTRIBUTES`] its certificate attributes as a JSON object.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The header's first 12 bytes.
pub const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Version 2 (high nibble), command PROXY (low nibble).
pub const VERSION_PROXY: u8 = 0x21;
/// AF_INET (high nibble), STREAM (low nibble).
pub const TCP_V4: u8 = 0x11;
/// AF_INET6, STREAM.
pub const TCP_V6: u8 = 0x21;
/// AF_UNSPEC, UNSPEC: no addresses follow.
pub const UNSPEC: u8 = 0x00;
/// TLV: the client's identity name (UTF-8).
pub const TLV_IDENTITY: u8 = 0xE0;
/// TLV: the client's attributes, a JSON object of strings.
pub const TLV_ATTRIBUTES: u8 = 0xE1;

/// Why a header could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProxyHeaderError {
    /// A TLV value longer than its 16-bit length field can say.
    #[error("PROXY TLV 0x{kind:02X} of {len} bytes exceeds 65535")]
    TlvTooLong { kind: u8, len: usize },
    /// Addresses and TLVs together longer than the header's 16-bit length field can say.
    #[error("PROXY header of {0} bytes after the fixed part exceeds 65535")]
    TooLong(usize),
}

/// Encodes a PROXY v2 header for a TCP connection from `source` to `destination`, followed by
/// `tlvs` (type, value) in order.
pub fn encode(
    source: SocketAddr,
    destination: SocketAddr,
    tlvs: &[(u8, &[u8])],
) -> Result<Vec<u8>, ProxyHeaderError> {
    encode_with(Some((source, destination)), tlvs)
}

/// [`encode`], or with no addresses (`AF_UNSPEC`: the receiver keeps the connection's own,
/// the TLVs still count) when the client's address is not known.
pub fn encode_with(
    addresses: Option<(SocketAddr, SocketAddr)>,
    tlvs: &[(u8, &[u8])],
) -> Result<Vec<u8>, ProxyHeaderError> {
    let mut body = Vec::with_capacity(36 + tlvs.iter().map(|(_, v)| 3 + v.len()).sum::<usize>());
    let family = match addresses {
        None => UNSPEC,
        Some((source, destination)) => {
            let family = match (source.ip(), destination.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    body.extend_from_slice(&s.octets());
                    body.extend_from_slice(&d.octets());
                    TCP_V4
                }
                (s, d) => {
                    body.extend_from_slice(&v6(s).octets());
                    body.extend_from_slice(&v6(d).octets());
                    TCP_V6
                }
            };
            body.extend_from_slice(&source.port().to_be_bytes());
            body.extend_from_slice(&destination.port().to_be_bytes());
            family
        }
    };
    for (kind, value) in tlvs {
        let len = u16::try_from(value.len()).map_err(|_| ProxyHeaderError::TlvTooLong {
            kind: *kind,
            len: value.len(),
        })?;
        body.push(*kind);
        body.extend_from_slice(&len.to_be_bytes());
        body.extend_from_slice(value);
    }
    let len = u16::try_from(body.len()).map_err(|_| ProxyHeaderError::TooLong(body.len()))?;
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_PROXY);
    out.push(family);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// The header postern sends: from the client to the address it reached (`addresses`, when
/// known), with the client's identity name (when known) and its attributes as TLVs.
pub fn for_client(
    addresses: Option<(SocketAddr, SocketAddr)>,
    identity: Option<&str>,
    attributes: &crate::policy::Attributes,
) -> Result<Vec<u8>, ProxyHeaderError> {
    // A map of strings always serializes; an empty object is the fallback all the same.
    let attrs = serde_json::to_vec(attributes).unwrap_or_else(|_| b"{}".to_vec());
    let mut tlvs: Vec<(u8, &[u8])> = Vec::with_capacity(2);
    if let Some(name) = identity {
        tlvs.push((TLV_IDENTITY, name.as_bytes()));
    }
    tlvs.push((TLV_ATTRIBUTES, attrs.as_slice()));
    encode_with(addresses, &tlvs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header HAProxy wrote for a client 172.19.0.1:42578 reaching 172.19.0.3:80 (a
    /// capture published in seriousben/experiment-proxy-protocol): byte for byte the same.
    #[test]
    fn ipv4_matches_a_header_haproxy_wrote() {
        let got = encode(
            "172.19.0.1:42578".parse().expect("addr"),
            "172.19.0.3:80".parse().expect("addr"),
            &[],
        )
        .expect("encode");
        let haproxy: [u8; 28] = [
            0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x21, 0x11,
            0x00, 0x0c, 0xac, 0x13, 0x00, 0x01, 0xac, 0x13, 0x00, 0x03, 0xa6, 0x52, 0x00, 0x50,
        ];
        assert_eq!(got, haproxy);
    }

    /// IPv6: 16-byte addresses, then ports, length 36; a mixed pair is written as IPv6 with
    /// the IPv4 address mapped.
    #[test]
    fn ipv6_and_mixed_families() {
        let got = encode(
            "[2001:db8::1]:1234".parse().expect("addr"),
            "[::1]:443".parse().expect("addr"),
            &[],
        )
        .expect("encode");
        assert_eq!(&got[..12], &SIGNATURE);
        assert_eq!(got[12], 0x21);
        assert_eq!(got[13], 0x21, "AF_INET6 + STREAM");
        assert_eq!(&got[14..16], &[0, 36]);
        assert_eq!(
            &got[16..32],
            &"2001:db8::1".parse::<Ipv6Addr>().expect("ip").octets()
        );
        assert_eq!(&got[32..48], &Ipv6Addr::LOCALHOST.octets());
        assert_eq!(&got[48..52], &[0x04, 0xD2, 0x01, 0xBB]);
        assert_eq!(got.len(), 52);
        let mixed = encode(
            "10.1.2.3:5".parse().expect("addr"),
            "[::1]:6".parse().expect("addr"),
            &[],
        )
        .expect("encode");
        assert_eq!(mixed[13], TCP_V6);
        assert_eq!(
            &mixed[16..32],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]
        );
    }

    /// TLVs follow the ports, each type, 16-bit length, value, and count in the header length.
    #[test]
    fn tlvs_follow_the_addresses_and_count_in_the_length() {
        let attrs: crate::policy::Attributes = [("role".to_owned(), "sensor".to_owned())].into();
        let got = for_client(
            Some((
                "127.0.0.1:40000".parse().expect("addr"),
                "127.0.0.1:8086".parse().expect("addr"),
            )),
            Some("inlet-7"),
            &attrs,
        )
        .expect("encode");
        let json = br#"{"role":"sensor"}"#;
        let tail = [
            &[TLV_IDENTITY, 0, 7][..],
            b"inlet-7",
            &[TLV_ATTRIBUTES, 0, json.len() as u8],
            json,
        ]
        .concat();
        assert_eq!(&got[28..], tail.as_slice());
        let len = u16::from_be_bytes([got[14], got[15]]) as usize;
        assert_eq!(len, 12 + tail.len());
        assert_eq!(got.len(), 16 + len);
    }

    /// Without the client's address: AF_UNSPEC, no address block, the TLVs right after the
    /// length.
    #[test]
    fn unknown_addresses_are_unspec_with_tlvs() {
        let got = for_client(None, Some("a"), &Default::default()).expect("encode");
        assert_eq!(got[13], UNSPEC);
        assert_eq!(&got[14..16], &[0, 4 + 5]);
        assert_eq!(
            &got[16..],
            &[TLV_IDENTITY, 0, 1, b'a', TLV_ATTRIBUTES, 0, 2, b'{', b'}']
        );
    }

    #[test]
    fn oversize_values_are_refused_not_truncated() {
        let big = vec![b'x'; 70_000];
        let a: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        assert_eq!(
            encode(a, a, &[(TLV_IDENTITY, &big)]),
            Err(ProxyHeaderError::TlvTooLong {
                kind: TLV_IDENTITY,
                len: 70_000
            })
        );
        let half = vec![b'x'; 40_000];
        assert!(matches!(
            encode(a, a, &[(TLV_IDENTITY, &half), (TLV_ATTRIBUTES, &half)]),
            Err(ProxyHeaderError::TooLong(_))
        ));
    }
}
