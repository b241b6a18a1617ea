//! The relay's metrics, read at scrape time from the counters it keeps anyway (forwarding and
//! control-plane stats, the registry and the route table); served by
//! [`postern_net::runtime::ops::serve`].

use crate::server::RelayHandle;
use postern_net::runtime::ops::{Exposition, Kind, Observe};
use std::sync::atomic::Ordering::Relaxed;

impl Observe for RelayHandle {
    fn render(&self, out: &mut Exposition) {
        let ctl = self.control_stats();
        let fwd = self.forward_stats();
        out.gauge(
            "postern_relay_nodes_connected",
            "Nodes (outlets and inlets) with a live control connection.",
            self.nodes().len() as f64,
        );
        let services = self.services();
        out.gauge(
            "postern_relay_services",
            "Services registered by at least one connected outlet.",
            services.iter().filter(|(_, o)| !o.is_empty()).count() as f64,
        );
        out.family(
            "postern_relay_service_outlets",
            "Connected outlets serving each service.",
            Kind::Gauge,
        );
        for (svc, outlets) in &services {
            out.sample(
                "postern_relay_service_outlets",
                &[("service", svc.as_str())],
                outlets.len() as f64,
            );
        }
        out.family(
            "postern_relay_service_outlets_by_health",
            "Connected outlets of each service by what they report of its target (health=healthy \
             includes outlets that do not report; only healthy ones get new routes).",
            Kind::Gauge,
        );
        for (svc, outlets) in self.service_health() {
            let sick = outlets.iter().filter(|(_, why)| why.is_some()).count();
            for (health, n) in [("healthy", outlets.len() - sick), ("unhealthy", sick)] {
                out.sample(
                    "postern_relay_service_outlets_by_health",
                    &[("service", svc.as_str()), ("health", health)],
                    n as f64,
                );
            }
        }
        let public = self.public_stats();
        out.counter(
            "postern_relay_public_forwarded_total",
            "Connections at the public hostname ingress handed to an outlet.",
            public.forwarded.load(Relaxed),
        );
        out.counter(
            "postern_relay_public_refused_total",
            "Connections at the public hostname ingress refused (bad or slow ClientHello, unknown name, no outlet).",
            public.refused.load(Relaxed),
        );
        out.family(
            "postern_relay_connections_refused_total",
            "Connections closed at once because a listener's cap was reached (reason=cap); \
             closed before being established (public: whole ClientHello read; tcp: node \
             authenticated) to make room for a new one (reason=evicted_pending), because their \
             source opened too many (reason=evicted_source), or for taking too long \
             (reason=preauth_timeout).",
            Kind::Counter,
        );
        let tcp = self.tcp_stats();
        for (listener, reason, n) in [
            ("public", "cap", public.refused_cap.load(Relaxed)),
            (
                "public",
                "evicted_pending",
                public.evicted_pending.load(Relaxed),
            ),
            (
                "public",
                "evicted_source",
                public.evicted_source.load(Relaxed),
            ),
            (
                "public",
                "preauth_timeout",
                public.preauth_timeout.load(Relaxed),
            ),
            ("tcp", "cap", tcp.refused_cap.load(Relaxed)),
            ("tcp", "evicted_pending", tcp.evicted_pending.load(Relaxed)),
            ("tcp", "evicted_source", tcp.evicted_source.load(Relaxed)),
            ("tcp", "preauth_timeout", tcp.preauth_timeout.load(Relaxed)),
        ] {
            out.sample(
                "postern_relay_connections_refused_total",
                &[("listener", listener), ("reason", reason)],
                n as f64,
            );
        }
        out.counter(
            "postern_relay_public_unknown_name_total",
            "Public connections refused because their server name routes nowhere (or was missing).",
            public.refused_unknown_name.load(Relaxed),
        );
        out.gauge(
            "postern_relay_routes",
            "Routes (inlet-outlet pairs) being forwarded.",
            self.routes().len() as f64,
        );
        out.counter(
            "postern_relay_forwarded_packets_total",
            "End-to-end packets forwarded between inlets and outlets.",
            fwd.forwarded_packets.load(Relaxed),
        );
        out.counter(
            "postern_relay_forwarded_bytes_total",
            "Bytes of end-to-end packets forwarded (whole frames, both directions).",
            fwd.forwarded_bytes.load(Relaxed),
        );
        let name = "postern_relay_dropped_packets_total";
        out.family(
            name,
            "Packets the forwarder dropped, by reason.",
            Kind::Counter,
        )
        .sample(
            name,
            &[("reason", "unknown_route")],
            fwd.dropped_unknown_route.load(Relaxed) as f64,
        )
        .sample(
            name,
            &[("reason", "spoofed")],
            fwd.dropped_spoofed.load(Relaxed) as f64,
        )
        .sample(
            name,
            &[("reason", "malformed")],
            fwd.dropped_malformed.load(Relaxed) as f64,
        )
        .sample(
            name,
            &[("reason", "congested")],
            fwd.dropped_congested.load(Relaxed) as f64,
        )
        .sample(
            name,
            &[("reason", "not_postern")],
            fwd.dropped_not_postern.load(Relaxed) as f64,
        )
        .sample(
            name,
            &[("reason", "quic_queue")],
            fwd.dropped_quic_queue.load(Relaxed) as f64,
        );
        let name = "postern_relay_socket_forwarded_packets_total";
        out.family(
            name,
            "End-to-end packets forwarded, by the socket of the UDP port's group that read them (see forward-threads; 0 is the QUIC endpoint's).",
            Kind::Counter,
        );
        for (i, s) in fwd.sockets.iter().enumerate() {
            let socket = i.to_string();
            out.sample(
                name,
                &[("socket", socket.as_str())],
                s.forwarded_packets.load(Relaxed) as f64,
            );
        }
        let name = "postern_relay_socket_quic_packets_total";
        out.family(
            name,
            "QUIC packets (control connections, handshakes) passed to the QUIC endpoint, by the socket of the UDP port's group that read them.",
            Kind::Counter,
        );
        for (i, s) in fwd.sockets.iter().enumerate() {
            let socket = i.to_string();
            out.sample(
                name,
                &[("socket", socket.as_str())],
                s.quic_packets.load(Relaxed) as f64,
            );
        }
        out.counter(
            "postern_relay_handshake_failures_total",
            "Control connections that failed their handshake or presented an unusable or revoked identity.",
            ctl.handshake_failures.load(Relaxed),
        );
        let adm = self.admission_stats();
        let name = "postern_relay_handshake_attempts_total";
        out.family(
            name,
            "QUIC connection attempts, by what the relay did before keeping any state: accepted (a handshake), retry (a stateless Retry to prove the address), or dropped for a reason.",
            Kind::Counter,
        )
        .sample(name, &[("outcome", "accepted")], adm.accepted.load(Relaxed) as f64)
        .sample(name, &[("outcome", "retry")], adm.retried.load(Relaxed) as f64)
        .sample(name, &[("outcome", "pending_cap")], adm.refused_pending.load(Relaxed) as f64)
        .sample(name, &[("outcome", "source_rate")], adm.refused_source_rate.load(Relaxed) as f64)
        .sample(name, &[("outcome", "total_rate")], adm.refused_total_rate.load(Relaxed) as f64);
        out.gauge(
            "postern_relay_handshakes_pending",
            "QUIC handshakes and enrollment exchanges in progress (hard-capped).",
            adm.pending.load(Relaxed) as f64,
        );
        out.counter(
            "postern_relay_control_bad_messages_total",
            "Malformed, late or unexpected control messages.",
            ctl.bad_messages.load(Relaxed),
        );
        let name = "postern_relay_control_refusals_total";
        out.family(
            name,
            "Control requests refused, by reason (not_allowed, drained, unknown_node, \
             shutting_down, no_authority, renewal_refused, bad_message, unexpected, internal).",
            Kind::Counter,
        );
        for (reason, n) in ctl.refusals() {
            out.sample(name, &[("reason", reason)], n as f64);
        }
        let name = "postern_relay_route_requests_total";
        out.family(name, "Route requests, by outcome.", Kind::Counter)
            .sample(
                name,
                &[("outcome", "granted")],
                ctl.routes_granted.load(Relaxed) as f64,
            )
            .sample(
                name,
                &[("outcome", "refused")],
                ctl.routes_refused.load(Relaxed) as f64,
            )
            .sample(
                name,
                &[("outcome", "redirected")],
                ctl.routes_redirected.load(Relaxed) as f64,
            );
        out.counter(
            "postern_relay_routes_closed_by_policy_total",
            "Live routes closed because a reloaded policy no longer allows them.",
            ctl.routes_closed_by_policy.load(Relaxed),
        );
        let name = "postern_relay_enrollments_total";
        out.family(name, "Enrollment requests, by outcome.", Kind::Counter)
            .sample(
                name,
                &[("outcome", "enrolled")],
                ctl.enrollments.load(Relaxed) as f64,
            )
            .sample(
                name,
                &[("outcome", "refused")],
                ctl.enrollments_refused.load(Relaxed) as f64,
            );
        let admin = self.admin_stats();
        let name = "postern_relay_admin_requests_total";
        out.family(name, "Admin API requests, by outcome.", Kind::Counter)
            .sample(
                name,
                &[("outcome", "ok")],
                admin.requests_ok.load(Relaxed) as f64,
            )
            .sample(
                name,
                &[("outcome", "unauthorized")],
                admin.requests_unauthorized.load(Relaxed) as f64,
            )
            .sample(
                name,
                &[("outcome", "failed")],
                admin.requests_failed.load(Relaxed) as f64,
            );
        out.counter(
            "postern_relay_admin_revocations_total",
            "Identities revoked through the admin API.",
            admin.revocations.load(Relaxed),
        );
        out.counter(
            "postern_relay_admin_drains_total",
            "Nodes drained through the admin API.",
            admin.drains.load(Relaxed),
        );
        render_tcp(self, out);
        if let Some(up) = self.fleet_connected() {
            out.gauge(
                "postern_relay_fleet_connected",
                "1 while the fleet's shared state in etcd answers (routes go on without it).",
                if up { 1.0 } else { 0.0 },
            );
        }
        if let Some(h) = self.fleet_health() {
            if let Some(n) = h.members {
                out.gauge(
                    "postern_relay_fleet_members",
                    "Relays registered in the fleet (live etcd leases), as last counted.",
                    n as f64,
                );
            }
            let name = "postern_relay_etcd_failures_total";
            out.family(
                name,
                "etcd requests that failed, by what they were for (follow, membership, \
                 enroll, renew, ticket, revoke, drain, read).",
                Kind::Counter,
            );
            for (op, n) in &h.failures {
                out.sample(name, &[("op", op)], *n as f64);
            }
        }
        out.gauge(
            "postern_relay_ready",
            "1 while the relay is listening and not shutting down.",
            if self.readiness().is_ok() { 1.0 } else { 0.0 },
        );
    }

    fn ready(&self) -> Result<(), String> {
        self.readiness()
    }

    fn ready_detail(&self) -> Option<String> {
        self.fleet_readiness()
    }
}

/// Writes the fallback's metrics: links open, accepted and refused, datagrams each way and
/// those dropped (full write queue) or ending a link (bad length prefix).
fn render_tcp(handle: &RelayHandle, out: &mut Exposition) {
    let (tcp, links) = (handle.tcp_stats(), handle.tcp_links().stats());
    out.gauge(
        "postern_relay_tcp_links_open",
        "Nodes connected over the TLS/TCP fallback now.",
        tcp.open.load(Relaxed) as f64,
    );
    out.counter(
        "postern_relay_tcp_links_accepted_total",
        "TLS/TCP fallback connections accepted (TLS handshake done).",
        tcp.accepted.load(Relaxed),
    );
    out.counter(
        "postern_relay_tcp_links_refused_total",
        "TLS/TCP fallback connections refused (failed or slow TLS handshake, over the limit).",
        tcp.refused.load(Relaxed),
    );
    out.counter(
        "postern_relay_tcp_datagrams_in_total",
        "Datagrams read from TLS/TCP links.",
        links.datagrams_in.load(Relaxed),
    );
    out.counter(
        "postern_relay_tcp_datagrams_out_total",
        "Datagrams queued to TLS/TCP links.",
        links.datagrams_out.load(Relaxed),
    );
    out.counter(
        "postern_relay_tcp_datagrams_dropped_total",
        "Datagrams dropped because a TLS/TCP link's write queue was full.",
        links.dropped_full.load(Relaxed),
    );
    out.counter(
        "postern_relay_tcp_framing_errors_total",
        "TLS/TCP links closed for a bad length prefix.",
        links.framing_errors.load(Relaxed),
    );
}
