//! The inlet's metrics: its own state read at scrape time (open client connections, relay
//! connection, key updates), and the process recorder's counters kept where things happen:
//!
//! - `postern_inlet_stream_bytes_total{service,direction}`: `up` is client to service, `down`
//!   service to client, counted as the bytes move;
//! - `postern_inlet_streams_total{service}`: client connections accepted;
//! - `postern_inlet_stream_failures_total{service,reason}`: client connections that could not
//!   be served (`no_relay`, `route_refused`, `control`, `e2e_connect`, `stream`);
//! - `postern_inlet_connections_refused_total{service,reason}`: client connections closed by
//!   the listener's cap (`cap`: closed at once; `evicted_silent`: closed before sending a byte
//!   to make room for a newer one);
//! - `postern_inlet_udp_datagrams_total{service,direction}`, `postern_inlet_udp_flows_total{service}`
//!   and `postern_inlet_udp_drops_total{service,reason}` for UDP services (`oversize`: bigger
//!   than the connection's datagram limit, never truncated; `unserved`, `refused` by the
//!   outlet, `flow_cap`, ...), see [`crate::udp`];
//! - `postern_node_relay_refusals_total{reason}`: times a relay refused this node for good
//!   (`closed_not_allowed`: e.g. revoked; or the refusal's label: `not_allowed`, `drained`, ...).

use crate::node::InletHandle;
use postern_net::runtime::ops::{Exposition, Observe};

/// Gives the recorder's metrics their help texts (call once after installing it).
pub fn describe() {
    metrics::describe_counter!(
        crate::udp::DATAGRAMS,
        "Datagrams through the inlet's UDP services, by service and direction (up: client to service)."
    );
    metrics::describe_counter!(
        crate::udp::DROPS,
        "Datagrams of UDP services not forwarded, by service and reason (oversize, unserved, refused, flow_cap, unknown_flow, bad_frame, client_error)."
    );
    metrics::describe_counter!(
        crate::udp::FLOWS,
        "UDP flows (client addresses) opened, by service."
    );
    metrics::describe_counter!(
        "postern_inlet_stream_bytes_total",
        metrics::Unit::Bytes,
        "Bytes through the inlet's client connections, by service and direction (up: client to service)."
    );
    metrics::describe_counter!(
        "postern_inlet_streams_total",
        "Client connections accepted, by service."
    );
    metrics::describe_counter!(
        "postern_inlet_stream_failures_total",
        "Client connections that could not be served, by service and reason."
    );
    metrics::describe_counter!(
        crate::listen::CONNECTIONS_REFUSED,
        "Client connections closed by the listener's connection cap, by service and reason (cap, evicted_silent)."
    );
    metrics::describe_counter!(
        crate::listen::CONNECTIONS_CLOSED_BY_RELOAD,
        "Open client connections closed because a reload removed their listener, by service."
    );
    metrics::describe_counter!(
        "postern_node_relay_refusals_total",
        "Times a relay refused this node for good, by reason (closed_not_allowed, e.g. a revoked identity; not_allowed; drained; ...)."
    );
}

impl Observe for InletHandle {
    fn render(&self, out: &mut Exposition) {
        out.gauge(
            "postern_inlet_streams_open",
            "Client connections open now.",
            self.open_streams() as f64,
        );
        out.gauge(
            "postern_inlet_relay_connected",
            "1 while the control connection to the relay is up.",
            if self.relay_connected() { 1.0 } else { 0.0 },
        );
        self.transports()
            .render(out, "postern_inlet_relay_transport");
        let socket = self.socket();
        socket
            .direct()
            .stats()
            .render(out, "postern_inlet", socket.path_counts());
        out.counter(
            "postern_inlet_key_updates_total",
            "Key updates made on end-to-end connections.",
            self.key_updates(),
        );
    }

    fn ready(&self) -> Result<(), String> {
        self.readiness()
    }

    fn ready_detail(&self) -> Option<String> {
        let d = self.transports().describe();
        (!d.is_empty()).then_some(d)
    }
}
