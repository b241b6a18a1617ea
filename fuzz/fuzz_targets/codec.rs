//! The frame codec of the control connection and of stream openings, fed a peer's bytes: every
//! message type a node, an outlet or a relay decodes. A frame that decodes encodes again, and
//! that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_proto::codec;
use postern_proto::msg::{Ctl, LeaseMsg, StreamOpen};
use postern_proto::ticket::{EnrollRequest, EnrollResponse};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8]) {
    if let Ok(Some((msg, used))) = codec::decode::<T>(data) {
        assert!(used <= data.len());
        let frame = codec::to_frame(&msg).expect("a decoded message encodes");
        let again: T = codec::decode_exact(&frame).expect("an encoded message decodes");
        assert_eq!(again, msg);
    }
    let _ = codec::decode_exact::<T>(data);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(len)) = codec::check_prefix(data) {
        assert!(len > 0);
    }
    round_trip::<Ctl>(data);
    round_trip::<StreamOpen>(data);
    round_trip::<LeaseMsg>(data);
    round_trip::<EnrollRequest>(data);
    round_trip::<EnrollResponse>(data);
});
