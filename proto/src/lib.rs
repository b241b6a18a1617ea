//! Wire types and pure logic shared by every postern component.
//!
//! Nothing in this crate opens a socket or reads a clock of its own: codecs work on byte slices,
//! state machines take `now` as an argument. That keeps the protocol testable exhaustively, as
//! `quinn-proto` is, while `postern-net` and the binaries do the I/O.

pub mod codec;
pub mod dgram;
pub mod fwd;
pub mod http;
pub mod lease;
pub mod msg;
pub mod name;
pub mod pki;
pub mod policy;
pub mod proxy_v2;
pub mod secret;
pub mod sni;
pub mod ticket;
pub mod tls;
pub mod udp;

/// Where a test writes the seed corpus of fuzz target `target` (`fuzz/corpus/<target>`, see
/// fuzz/README.md): under `$POSTERN_WRITE_SEED_CORPUS`, or `None` when that is unset.
#[cfg(test)]
pub(crate) fn seed_corpus_dir(target: &str) -> Option<std::path::PathBuf> {
    let dir = std::path::PathBuf::from(std::env::var_os("POSTERN_WRITE_SEED_CORPUS")?).join(target);
    std::fs::create_dir_all(&dir).expect("seed corpus dir");
    Some(dir)
}

/// ALPN of the control connection between a node and a relay.
pub const ALPN_CONTROL: &[u8] = b"postern-ctl/1";
/// ALPN of the end-to-end connection between an inlet and an outlet.
pub const ALPN_E2E: &[u8] = b"postern/1";
/// ALPN of an end-to-end connection whose streams may open with
/// [`msg::StreamOpen::ConnectFrom`] (the client's address). Both ends offer it before
/// [`ALPN_E2E`], so two nodes of this version or later use it and an older one gets
/// `postern/1`, on which the inlet sends plain `Connect`.
pub const ALPN_E2E_V2: &[u8] = b"postern/2";
/// Every end-to-end ALPN, the preferred first.
pub const ALPN_E2E_ALL: &[&[u8]] = &[ALPN_E2E_V2, ALPN_E2E];
