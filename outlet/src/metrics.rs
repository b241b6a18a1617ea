//! The outlet's metrics: its own state read at scrape time (streams, connections, relay
//! connection), and the process recorder's counters kept where things happen:
//!
//! - `postern_outlet_stream_bytes_total{service,direction}`: `up` is client to service, `down`
//!   service to client, counted as the bytes move;
//! - `postern_outlet_streams_total{service}`: data streams forwarded to a target;
//! - `postern_outlet_stream_refusals_total{reason}`: `not_allowed`, `unknown_service`,
//!   `bad_header`, `target_unreachable`, `draining`;
//! - `postern_outlet_requests_refused_total{service,reason}`: requests of an `[influxdb-outlet]`
//!   service refused by the outlet's enforcement (`no_credential`, `several_credentials`,
//!   `not_own_lease`), see [`crate::enforce`];
//! - `postern_outlet_leases_issued_total`, `..._renewed_total`, `..._revoked_total`,
//!   `postern_outlet_leases_failed_total{operation}` (`create`, `revoke`), whoever asked;
//! - `postern_outlet_lease_store_failures_total{operation}`: failed operations on the lease
//!   store (`put`, `remove`, `get`, `list`, `reopen`), see [`crate::lease::store`];
//! - `postern_outlet_public_connections_total{service}`: connections from the relay's public
//!   hostname whose TLS handshake completed;
//! - `postern_outlet_public_requests_total{service,outcome}`: requests at the public hostname,
//!   `allowed`, `denied` (no live grant) or `link` (an access link opened);
//! - `postern_outlet_target_healthy{service}`: 1 while the service's target passes its checks,
//!   0 once it failed `health-check-failures` in a row (see [`crate::health`]).
//! - `postern_outlet_udp_datagrams_total{service,direction}`, `postern_outlet_udp_flows_total{service}`
//!   and `postern_outlet_udp_drops_total{service,reason}` (`not_allowed`, `unknown_service`,
//!   `target_unreachable`, `target_error`, `unknown_flow`, `oversize`, `bad_frame`) for UDP
//!   services, see [`crate::udp`].

use crate::node::OutletHandle;
use postern_net::runtime::ops::{Exposition, Observe};

/// Gives the recorder's metrics their help texts (call once after installing it).
pub fn describe() {
    metrics::describe_gauge!(
        "postern_outlet_target_healthy",
        "1 while the service's target passes its health checks, 0 while it fails them (reported to the relay)."
    );
    metrics::describe_counter!(
        crate::udp::DATAGRAMS,
        "Datagrams through the outlet's UDP services, by service and direction (up: client to service)."
    );
    metrics::describe_counter!(
        crate::udp::DROPS,
        "Datagrams of UDP services not forwarded, by service and reason (not_allowed, unknown_service, target_unreachable, target_error, unknown_flow, oversize, bad_frame)."
    );
    metrics::describe_counter!(
        crate::udp::FLOWS,
        "UDP flows (client addresses at an inlet) opened, by service."
    );
    metrics::describe_counter!(
        "postern_outlet_stream_bytes_total",
        metrics::Unit::Bytes,
        "Bytes through the outlet's streams, by service and direction (up: client to service)."
    );
    metrics::describe_counter!(
        "postern_outlet_streams_total",
        "Data streams forwarded to a service's target."
    );
    metrics::describe_counter!(
        "postern_outlet_stream_refusals_total",
        "Streams the outlet refused, by reason."
    );
    metrics::describe_counter!(
        "postern_outlet_requests_refused_total",
        "Requests refused because they did not carry the requesting inlet's own lease, by service and reason."
    );
    metrics::describe_counter!(
        "postern_outlet_leases_issued_total",
        "Leased credentials made in the backend (first leases and renewals)."
    );
    metrics::describe_counter!(
        "postern_outlet_leases_renewed_total",
        "Leases that replaced a client's previous lease."
    );
    metrics::describe_counter!(
        "postern_outlet_leases_revoked_total",
        "Leased credentials revoked in the backend."
    );
    metrics::describe_counter!(
        "postern_outlet_leases_failed_total",
        "Lease operations that failed (they are retried), by operation."
    );
    metrics::describe_counter!(
        crate::lease::STORE_FAILURES,
        "Failed operations on the lease store (a full disk), by operation; readiness says 503 while it cannot write."
    );
    metrics::describe_counter!(
        "postern_outlet_public_connections_total",
        "Connections from the relay's public hostname whose TLS handshake completed."
    );
    metrics::describe_counter!(
        "postern_outlet_public_requests_total",
        "Requests at the public hostname, by outcome (allowed, denied, link)."
    );
}

impl Observe for OutletHandle {
    fn render(&self, out: &mut Exposition) {
        let socket = self.socket();
        socket
            .direct()
            .stats()
            .render(out, "postern_outlet", socket.path_counts());
        out.gauge(
            "postern_outlet_streams_open",
            "Client connections being forwarded to a target now.",
            self.open_streams() as f64,
        );
        out.gauge(
            "postern_outlet_connections_open",
            "End-to-end connections from inlets.",
            self.connection_count() as f64,
        );
        out.gauge(
            "postern_outlet_relay_connected",
            "1 while the control connection to the relay is up.",
            if self.relay_connected() { 1.0 } else { 0.0 },
        );
        self.transports()
            .render(out, "postern_outlet_relay_transport");
    }

    fn ready(&self) -> Result<(), String> {
        self.readiness()
    }

    fn ready_detail(&self) -> Option<String> {
        let d = self.transports().describe();
        (!d.is_empty()).then_some(d)
    }
}
