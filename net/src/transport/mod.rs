//! How packets move between nodes and relays: sockets, links, endpoints, keys.

pub mod direct;
pub mod endpoint;
pub mod links;
pub mod node_socket;
pub mod rekey;
pub mod relay_path;
pub mod udp;
