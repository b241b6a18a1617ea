//! Moving end-to-end packets between nodes: the relay's UDP socket, which forwards frames
//! without decrypting them ([`udp`]), and the TLS/TCP links for nodes whose network blocks UDP
//! ([`tcp`]). Nothing here knows about nodes, services or policy: the server fills the route
//! table, these modules only follow it.

pub mod tcp;
pub mod udp;
