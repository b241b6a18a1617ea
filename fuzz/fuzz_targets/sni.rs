//! The ClientHello reader of the relay's public ingress, fed what an unauthenticated client
//! sends first: a verdict on a complete ClientHello does not change when more bytes follow,
//! and a name it returns is a lowercase host name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_proto::sni;

const MAX: usize = 16 * 1024;

fuzz_target!(|data: &[u8]| {
    let first = sni::peek_server_name(data, MAX);
    if let Ok(Some(info)) = &first {
        let mut more = data.to_vec();
        more.extend_from_slice(b"\x17\x03\x03\x00\x01x");
        assert_eq!(sni::peek_server_name(&more, MAX), Ok(Some(info.clone())));
        if let Some(name) = &info.server_name {
            assert!(!name.is_empty() && !name.ends_with('.'));
            assert_eq!(*name, name.to_ascii_lowercase());
            let _ = sni::service_label(name, "relay.example.com");
        }
    }
});
