//! postern inlet: local listeners whose client connections become streams of an end-to-end QUIC
//! connection to an outlet, through a relay.

pub mod http_proxy;
