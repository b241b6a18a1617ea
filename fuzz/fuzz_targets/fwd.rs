//! The forwarding frame header, as the relay and nodes read datagrams from the network: a
//! datagram that parses as a frame is exactly its header followed by its payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_proto::fwd::{self, DatagramKind};

fuzz_target!(|data: &[u8]| {
    let kind = fwd::classify(data);
    if let Ok((route, payload)) = fwd::parse(data) {
        assert_eq!(kind, DatagramKind::Forward);
        assert!(!payload.is_empty());
        let mut again = fwd::header(route).to_vec();
        again.extend_from_slice(payload);
        assert_eq!(again, data);
    }
});
