//! Enrollment tickets, pasted by users and read by nodes before they have an identity: a
//! ticket that decodes encodes to a string that decodes to the same ticket. The first byte
//! picks whether the rest is the ticket string or the JSON inside one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_proto::ticket::{Ticket, PREFIX};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = if mode & 1 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        use base64::Engine;
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rest)
        )
    };
    if let Ok(ticket) = Ticket::decode(&text) {
        let again = Ticket::decode(&ticket.encode()).expect("an encoded ticket decodes");
        assert!(again == ticket);
        let _ = ticket.check_expiry(0);
    }
});
