//! The outlet's data plane: end-to-end connections from inlets, one stream per client
//! connection, each joined to a fresh connection to the service's target.

use crate::enforce::LeaseGate;
use crate::lease::{InjectAt, LeaseManager};
use crate::target::{ClientInfo, Target, TargetError};
use postern_net::control::exchange;
use postern_net::runtime::drain::Drain;
use postern_net::stream::http_proxy::{self, ProxyOptions};
use postern_net::stream::splice;
use postern_proto::fwd::RouteId;
use postern_proto::http::FilterConfig;
use postern_proto::msg::{code, HandOutMsg, LeaseMsg, StreamOpen};
use postern_proto::name::{NodeName, ServiceName};
use postern_proto::policy::{Attributes, Expr};
use quinn::VarInt;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// What the outlet offers: where each service's streams go, and which services hand out
/// leased credentials.
#[derive(Default)]
pub struct Services {
    pub targets: HashMap<ServiceName, Target>,
    pub leases: HashMap<ServiceName, Arc<LeaseManager>>,
    /// Per service, who may use it (the seeds' `allow`), checked again here although the
    /// relay already applied its own policy. A service without an entry admits any inlet the
    /// relay routed here.
    pub allow: HashMap<ServiceName, Expr>,
    /// Where each leased service's credential is put into requests (absent: at the inlet).
    /// Every service in `leases` is enforced here either way (see [`crate::enforce`]).
    pub inject_at: HashMap<ServiceName, InjectAt>,
    /// UDP services (`protocol = "udp"`): their datagrams go to these targets, see
    /// [`crate::udp`].
    pub udp: HashMap<ServiceName, crate::udp::UdpTarget>,
}

impl Services {
    /// Where `service`'s leased credential is put into requests.
    pub fn inject_at(&self, service: &ServiceName) -> InjectAt {
        self.inject_at.get(service).copied().unwrap_or_default()
    }

    /// Every service name offered.
    pub fn names(&self) -> Vec<ServiceName> {
        let mut names: Vec<ServiceName> = self
            .targets
            .keys()
            .chain(self.udp.keys())
            .cloned()
            .collect();
        names.sort();
        names
    }
}

/// Room in a request head for the `Authorization` field an inlet's filter adds (a v2 token is
/// about 100 bytes, a v1 Basic credential less).
const INJECTED_FIELD_ROOM: usize = 1024;

/// How long an inlet may take to name the service on a new stream.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A route the relay announced: who will connect through it.
#[derive(Debug, Clone)]
pub struct ExpectedRoute {
    pub route: RouteId,
    pub inlet: NodeName,
    pub service: ServiceName,
}

/// State shared by the control handler and the data plane.
#[derive(Default)]
pub struct Routes {
    /// Virtual address -> the route behind it.
    expected: Mutex<HashMap<SocketAddr, ExpectedRoute>>,
    /// Live end-to-end connections by route (an inlet may run several over one route).
    conns: Mutex<HashMap<RouteId, Vec<quinn::Connection>>>,
    /// Services whose connections stay on the relay (`direct = "never"` on the service).
    direct_never: Mutex<std::collections::HashSet<ServiceName>>,
}

impl Routes {
    fn expected(&self) -> MutexGuard<'_, HashMap<SocketAddr, ExpectedRoute>> {
        self.expected.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<RouteId, Vec<quinn::Connection>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps these services' connections on the relay.
    pub fn set_direct_never(&self, services: std::collections::HashSet<ServiceName>) {
        *self.direct_never.lock().unwrap_or_else(|p| p.into_inner()) = services;
    }

    fn direct_never(&self, service: &ServiceName) -> bool {
        self.direct_never
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(service)
    }

    /// Records a route announced by the relay.
    pub fn expect(&self, virt: SocketAddr, route: ExpectedRoute) {
        self.expected()
            .insert(postern_net::transport::udp::canonical(virt), route);
    }

    /// Forgets a route and closes its connection.
    pub fn close(&self, route: RouteId, why: &'static [u8]) {
        self.close_with(route, code::ROUTE_CLOSED, why);
    }

    fn lookup(&self, virt: SocketAddr) -> Option<ExpectedRoute> {
        self.expected()
            .get(&postern_net::transport::udp::canonical(virt))
            .cloned()
    }

    /// Closes every end-to-end connection from `inlet` (its identity was revoked).
    pub fn close_inlet(&self, inlet: &NodeName) {
        let routes: Vec<RouteId> = self
            .expected()
            .values()
            .filter(|r| &r.inlet == inlet)
            .map(|r| r.route)
            .collect();
        for route in routes {
            self.close_with(route, code::NOT_ALLOWED, b"identity revoked");
        }
    }

    fn close_with(&self, route: RouteId, c: u32, why: &'static [u8]) {
        self.expected().retain(|_, r| r.route != route);
        for conn in self.conns().remove(&route).unwrap_or_default() {
            conn.close(VarInt::from_u32(c), why);
        }
    }

    /// Closes the end-to-end connections that `services` no longer allow: their route's
    /// service is gone, or its `allow` no longer admits the route's inlet. Returns how many.
    pub fn close_disallowed(&self, services: &Services) -> usize {
        let routes: Vec<ExpectedRoute> = self.expected().values().cloned().collect();
        let mut closed = 0;
        for r in routes {
            let conns = self.conns().get(&r.route).cloned().unwrap_or_default();
            for conn in conns {
                let served = services.targets.contains_key(&r.service)
                    || services.udp.contains_key(&r.service);
                let allowed = served
                    && services.allow.get(&r.service).is_none_or(|rule| {
                        let mut attrs = postern_net::transport::endpoint::peer_attributes(&conn);
                        attrs.insert("name".into(), r.inlet.to_string());
                        rule.eval(&attrs)
                    });
                if !allowed {
                    tracing::info!(target: "postern::audit", event = "policy", action = "reload", node = %r.inlet, service = %r.service, allowed = false, served);
                    tracing::warn!(inlet = %r.inlet, service = %r.service, served, "closing an end-to-end connection the reloaded config no longer allows");
                    conn.close(
                        VarInt::from_u32(code::NOT_ALLOWED),
                        b"no longer allowed by the outlet's config",
                    );
                    closed += 1;
                }
            }
        }
        closed
    }

    /// Number of live end-to-end connections.
    pub fn connection_count(&self) -> usize {
        self.conns().values().map(Vec::len).sum()
    }
}

/// Accepts end-to-end connections until `shutdown`.
pub async fn accept_loop(
    uplink: Arc<postern_net::uplink::Uplink>,
    routes: Arc<Routes>,
    services: Arc<crate::reload::Live>,
    shutdown: CancellationToken,
    drain: Drain,
) {
    let endpoint = uplink.endpoint().clone();
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => return,
            i = endpoint.accept() => i,
        };
        let Some(incoming) = incoming else { return };
        let remote = incoming.remote_address();
        // A connection opened over a route's direct path belongs to that route.
        let Some(expected) = routes.lookup(uplink.socket().primary_virtual(remote)) else {
            // Not a route the relay announced (control connections are never accepted here:
            // the outlet dials the relay, not the other way round).
            tracing::warn!(%remote, "refusing connection on an unknown route");
            incoming.refuse();
            continue;
        };
        let routes = routes.clone();
        let services = services.clone();
        let span =
            tracing::info_span!("e2e", route = %expected.route.short(), inlet = %expected.inlet);
        tokio::spawn(
            serve_connection(
                incoming,
                expected,
                routes,
                services,
                drain.clone(),
                uplink.clone(),
            )
            .instrument(span),
        );
    }
}

async fn serve_connection(
    incoming: quinn::Incoming,
    expected: ExpectedRoute,
    routes: Arc<Routes>,
    live: Arc<crate::reload::Live>,
    drain: Drain,
    uplink: Arc<postern_net::uplink::Uplink>,
) {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "end-to-end handshake failed");
            return;
        }
    };
    match postern_net::transport::endpoint::peer_name(&conn) {
        Ok(name) if name == expected.inlet => {}
        Ok(name) => {
            tracing::warn!(presented = %name, "inlet's certificate does not match the route; closing");
            conn.close(
                VarInt::from_u32(code::NOT_ALLOWED),
                b"identity does not match route",
            );
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "inlet presented no usable identity; closing");
            conn.close(VarInt::from_u32(code::NOT_ALLOWED), b"no identity");
            return;
        }
    }
    let attrs = Arc::new(postern_net::transport::endpoint::peer_attributes(&conn));
    tracing::info!(?attrs, "end-to-end connection up");
    let first = {
        let mut conns = routes.conns();
        let list = conns.entry(expected.route).or_default();
        list.push(conn.clone());
        list.len() == 1
    };
    // The inlet probes with the key of the route's first connection; answer under it.
    if first && uplink.direct_allowed(expected.route) && !routes.direct_never(&expected.service) {
        if let Some(key) =
            postern_net::transport::direct::PathKey::from_connection(&conn, expected.route)
        {
            postern_net::transport::direct::start_outlet(
                uplink.socket().clone(),
                expected.route,
                key,
            );
        }
    }
    tokio::spawn(
        crate::udp::serve_datagrams(
            conn.clone(),
            live.clone(),
            expected.inlet.clone(),
            attrs.clone(),
        )
        .in_current_span(),
    );
    let reason = loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => break e,
        };
        if drain.draining.is_cancelled() {
            // Shutting down: finish what is open, take nothing new.
            refused("draining");
            let _ = send.reset(VarInt::from_u32(code::SHUTDOWN));
            let _ = recv.stop(VarInt::from_u32(code::SHUTDOWN));
            continue;
        }
        // Each stream takes the services in force when it starts (see `crate::reload`).
        let services = live.get();
        let inlet = expected.inlet.clone();
        let attrs = attrs.clone();
        let token = drain.streams.token();
        tokio::spawn(serve_stream(send, recv, services, inlet, attrs, token).in_current_span());
    };
    tracing::info!(reason = %reason, "end-to-end connection closed");
    let mut conns = routes.conns();
    if let Some(list) = conns.get_mut(&expected.route) {
        list.retain(|c| c.stable_id() != conn.stable_id());
        if list.is_empty() {
            conns.remove(&expected.route);
        }
    }
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    services: Arc<Services>,
    inlet: NodeName,
    attrs: Arc<Attributes>,
    token: tokio_util::task::task_tracker::TaskTrackerToken,
) {
    let refuse = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, c: u32| {
        refused(match c {
            code::NOT_ALLOWED => "not_allowed",
            code::UNKNOWN_SERVICE => "unknown_service",
            code::BAD_HEADER => "bad_header",
            code::TARGET_UNREACHABLE => "target_unreachable",
            _ => "other",
        });
        let _ = send.reset(VarInt::from_u32(c));
        let _ = recv.stop(VarInt::from_u32(c));
    };
    let header = tokio::time::timeout(
        HEADER_TIMEOUT,
        exchange::read_frame::<StreamOpen>(&mut recv),
    )
    .await;
    let requested = match &header {
        Ok(Ok(StreamOpen::Connect { service }))
        | Ok(Ok(StreamOpen::ConnectFrom { service, .. }))
        | Ok(Ok(StreamOpen::Lease { service }))
        | Ok(Ok(StreamOpen::HandOut { service, .. })) => Some(service.clone()),
        _ => None,
    };
    if let Some(service) = requested {
        if let Some(rule) = services.allow.get(&service) {
            let mut all = (*attrs).clone();
            all.insert("name".into(), inlet.to_string());
            let allowed = rule.eval(&all);
            tracing::info!(target: "postern::audit", event = "policy", action = "use", node = %inlet, %service, allowed, rule = %rule);
            if !allowed {
                tracing::warn!(%service, rule = %rule, "inlet not allowed by this outlet's `allow`; refusing stream");
                return refuse(&mut send, &mut recv, code::NOT_ALLOWED);
            }
        }
    }
    let (service, addresses) = match header {
        Ok(Ok(StreamOpen::Connect { service })) => (service, None),
        Ok(Ok(StreamOpen::ConnectFrom {
            service,
            client,
            local,
        })) => (service, Some((client, local))),
        Ok(Ok(StreamOpen::Lease { service })) => {
            let Some(manager) = services.leases.get(&service) else {
                tracing::warn!(%service, "lease asked for a service without leased credentials");
                return refuse(&mut send, &mut recv, code::UNKNOWN_SERVICE);
            };
            // A lease stream lasts as long as its connection: it does not hold up a drain.
            drop(token);
            let mode = services.inject_at(&service);
            return serve_lease(send, recv, manager, &inlet, &attrs, mode).await;
        }
        Ok(Ok(StreamOpen::HandOut { service, fresh })) => {
            let Some(manager) = services.leases.get(&service) else {
                tracing::warn!(%service, "hand-out asked for a service without leased credentials");
                return refuse(&mut send, &mut recv, code::UNKNOWN_SERVICE);
            };
            drop(token);
            return serve_hand_out(send, recv, manager, &inlet, &attrs, &service, fresh).await;
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "bad stream header");
            return refuse(&mut send, &mut recv, code::BAD_HEADER);
        }
        Err(_) => {
            tracing::warn!("no stream header in time");
            return refuse(&mut send, &mut recv, code::BAD_HEADER);
        }
    };
    let Some(target) = services.targets.get(&service) else {
        tracing::warn!(%service, "stream for a service this outlet does not serve");
        return refuse(&mut send, &mut recv, code::UNKNOWN_SERVICE);
    };
    // For the PROXY header: the address is the inlet's claim, the identity the outlet's own
    // knowledge (the inlet's certificate).
    let who = ClientInfo {
        addresses,
        identity: Some(inlet.to_string()),
        attributes: (*attrs).clone(),
    };
    let labels = |direction: &'static str| {
        [
            ("service", service.as_str().to_owned()),
            ("direction", direction.to_owned()),
        ]
    };
    // Splice's TCP side is the target: what it reads from there goes down to the client.
    let counters = splice::ByteCounters {
        tcp_to_stream: metrics::counter!(STREAM_BYTES, &labels("down")),
        stream_to_tcp: metrics::counter!(STREAM_BYTES, &labels("up")),
    };
    metrics::counter!("postern_outlet_streams_total", "service" => service.as_str().to_owned())
        .increment(1);
    if let Some(manager) = services.leases.get(&service) {
        // A service with leased credentials: every request is checked here, whatever the
        // inlet did (see `crate::enforce`).
        let gate = LeaseGate::new(
            manager.clone(),
            inlet.clone(),
            service.clone(),
            services.inject_at(&service),
        )
        .with_attributes((*attrs).clone());
        // Held once the proxy drops it: see `splice::HeldSend`.
        let client = splice::Counted::new(
            tokio::io::join(recv, splice::HeldSend::new(send)),
            counters.stream_to_tcp.clone(),
            counters.tcp_to_stream.clone(),
        );
        let inlet_limits = FilterConfig::default();
        let cfg = FilterConfig {
            // InfluxDB takes credentials from `u`/`p` too; only the lease may reach it.
            strip_query_credentials: true,
            // The inlet's filter accepts heads up to its limits and then adds one field (the
            // lease): leave room for it, or a request at the limit passes there and fails here.
            max_headers: inlet_limits.max_headers + 1,
            max_head_len: inlet_limits.max_head_len + INJECTED_FIELD_ROOM,
        };
        let opts = ProxyOptions::new("postern outlet", cfg);
        match http_proxy::proxy(client, || target.connect_io_for(Some(&who)), gate, opts).await {
            Ok(stats) => tracing::debug!(
                %service,
                requests = stats.requests,
                up = stats.bytes_up,
                down = stats.bytes_down,
                "stream done"
            ),
            Err(e) => tracing::info!(%service, error = %e, "stream ended"),
        }
        drop(token);
        return;
    }
    let outcome = match target.connect_for(Some(&who)).await {
        Ok(crate::target::TargetStream::Tcp(tcp)) => {
            splice::splice_counted(tcp, send, recv, &counters).await
        }
        Ok(crate::target::TargetStream::Tls(tls)) => {
            splice::splice_io_counted(*tls, send, recv, &counters).await
        }
        Err(e) => {
            log_target_error(&service, &e);
            return refuse(&mut send, &mut recv, code::TARGET_UNREACHABLE);
        }
    };
    tracing::debug!(%service, up = outcome.up, down = outcome.down, reset = ?outcome.peer_reset, "stream done");
    drop(token);
}

/// Bytes through the outlet's streams, by service and direction (`up`: client to service,
/// `down`: service to client).
const STREAM_BYTES: &str = "postern_outlet_stream_bytes_total";

/// Counts a refused stream.
fn refused(reason: &'static str) {
    metrics::counter!("postern_outlet_stream_refusals_total", "reason" => reason).increment(1);
}

/// How long an inlet's lease stream may go without a lease before the inlet is told that none
/// can be made now.
const LEASE_NOTICE: Duration = Duration::from_secs(3);

/// Streams the inlet's lease: the current grant, then each renewal, until the inlet goes away.
/// While there is none (the backend failing), the inlet is told so after [`LEASE_NOTICE`].
async fn serve_lease(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    manager: &LeaseManager,
    inlet: &NodeName,
    attrs: &Attributes,
    mode: InjectAt,
) {
    // The inlet never writes after the header; its side ending means it is gone.
    drop(recv);
    let mut grants = match manager.subscribe_as(inlet, attrs) {
        Ok(rx) => rx,
        Err(e) => {
            tracing::warn!(error = %e, "cannot lease a credential");
            let msg = if e.is_refusal() {
                LeaseMsg::Refused {
                    reason: e.to_string(),
                }
            } else {
                LeaseMsg::Unavailable {
                    reason: e.to_string(),
                }
            };
            let _ = exchange::write_frame(&mut send, &msg).await;
            let _ = send.finish();
            return;
        }
    };
    if mode == InjectAt::Outlet {
        // The credential stays here: tell the inlet to send none, and keep the subscription
        // (and so the lease, renewed) for as long as the inlet is connected.
        if let Err(e) = exchange::write_frame(&mut send, &LeaseMsg::AtOutlet).await {
            tracing::debug!(error = %e, "lease stream closed");
            return;
        }
        tracing::info!("inlet told that the outlet injects its lease");
        loop {
            tokio::select! {
                changed = grants.changed() => if changed.is_err() { break },
                _ = send.stopped() => break,
            }
        }
        let _ = send.finish();
        return;
    }
    // Whether the inlet has been told that no lease can be had now; reset by the next grant.
    let mut told = false;
    loop {
        let current = grants.borrow_and_update().clone();
        let waiting = current.is_none();
        if let Some(grant) = current {
            told = false;
            tracing::info!(lease = %grant.lease_id, expires_at_ms = grant.expires_at_ms, "lease sent to inlet");
            if let Err(e) = exchange::write_frame(&mut send, &LeaseMsg::Grant(grant)).await {
                tracing::debug!(error = %e, "lease stream closed");
                return;
            }
        }
        // Without a lease for a while, tell the inlet why, so that its clients' 503s say more
        // than "no lease yet" (the manager keeps retrying; a grant still follows when it can).
        let notice = async {
            if waiting && !told {
                tokio::time::sleep(LEASE_NOTICE).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            changed = grants.changed() => {
                if changed.is_err() {
                    // The subscription ends when the manager stops, or when a reload left this
                    // client without a profile: then it is refused as at subscribing.
                    let msg = match manager.profile_for(inlet, attrs) {
                        Err(e) if e.is_refusal() => LeaseMsg::Refused { reason: e.to_string() },
                        _ => LeaseMsg::Unavailable {
                            reason: "the lease manager stopped".into(),
                        },
                    };
                    let _ = exchange::write_frame(&mut send, &msg).await;
                    let _ = send.finish();
                    return;
                }
            }
            () = notice => {
                told = true;
                tracing::warn!(
                    waited = ?LEASE_NOTICE,
                    "no lease could be made for the inlet; telling it (the lease manager's errors say why)"
                );
                let msg = LeaseMsg::Unavailable {
                    reason: no_lease_reason(manager),
                };
                if let Err(e) = exchange::write_frame(&mut send, &msg).await {
                    tracing::debug!(error = %e, "lease stream closed");
                    return;
                }
            }
            _ = send.stopped() => return,
        }
    }
}

/// Answers a client's request for its own credential (see [`LeaseManager::hand_out`]) with one
/// frame. The credential goes only onto this stream, to the identity it was made for; nothing
/// here logs it.
async fn serve_hand_out(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    manager: &LeaseManager,
    inlet: &NodeName,
    attrs: &Attributes,
    service: &ServiceName,
    fresh: bool,
) {
    drop(recv);
    let msg = match manager.hand_out(inlet, attrs, fresh).await {
        Ok(h) => {
            tracing::info!(target: "postern::audit", event = "lease", action = "hand_out", outcome = "sent", node = %inlet, %service, profile = %h.profile, lease_id = %h.grant.lease_id);
            HandOutMsg::Granted {
                grant: h.grant,
                profile: h.profile,
            }
        }
        Err(e) => {
            tracing::warn!(%service, error = %e, "hand-out refused");
            HandOutMsg::Refused {
                reason: e.to_string(),
            }
        }
    };
    if let Err(e) = exchange::write_message(&mut send, &msg).await {
        tracing::debug!(error = %e, "hand-out stream closed");
    }
    // Wait for the inlet to read it: finishing does not wait, and the connection may close.
    let _ = tokio::time::timeout(HEADER_TIMEOUT, send.stopped()).await;
}

/// What an inlet that has waited [`LEASE_NOTICE`] for a lease is told: the lease store when
/// it cannot write (a full disk), else InfluxDB, the only other thing a lease needs.
fn no_lease_reason(manager: &LeaseManager) -> String {
    let secs = LEASE_NOTICE.as_secs();
    match manager.store_ready() {
        Err(why) => format!(
            "no lease was made for this inlet within {secs} s: {why}; the outlet keeps trying"
        ),
        Ok(()) => format!(
            "no lease was made for this inlet within {secs} s: InfluxDB is unreachable, slow or \
             refusing the outlet's admin credential (the outlet's log says which); the outlet \
             keeps trying"
        ),
    }
}

fn log_target_error(service: &ServiceName, e: &TargetError) {
    tracing::warn!(%service, error = %e, "cannot reach the service's target; refusing stream");
}
