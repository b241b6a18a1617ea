//! Choosing a relay and asking it for a route: the relays that are up are asked in configured
//! order until one grants a route to the service (to a given outlet, when a connection must
//! keep its outlet), with a short grace for relays that have just come up and not yet heard
//! from every outlet. In a fleet, a relay that holds no outlet of the service redirects to
//! the relays that do: the inlet opens a control connection to them (once, then keeps it) and
//! asks there.

use crate::error::ServeError;
use postern_net::control::exchange::{self, CTL_TIMEOUT};
use postern_net::uplink::Uplink;
use postern_proto::fwd::RouteId;
use postern_proto::msg::{Ctl, RefuseReason};
use postern_proto::name::{NodeName, ServiceName};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long after connecting to a relay a refusal for an unknown service, or one with no outlet
/// connected, is taken as "the outlets have not re-registered yet" and the route asked for again.
/// A relay that restarts forgets every registration, and outlets take a moment to come back.
pub const OUTLET_GRACE: Duration = Duration::from_secs(3);

/// Asks relays for routes, over the uplink's control connections.
pub(crate) struct Router {
    uplink: Arc<Uplink>,
    /// When each control connection (by `stable_id`) came up, for [`OUTLET_GRACE`].
    control_since: Mutex<HashMap<usize, Instant>>,
    /// Relays this inlet was redirected to (not configured): left again once the fleet no
    /// longer lists them.
    redirected: Mutex<Vec<SocketAddr>>,
}

impl Router {
    pub(crate) fn new(uplink: Arc<Uplink>) -> Self {
        Self {
            uplink,
            control_since: Mutex::default(),
            redirected: Mutex::default(),
        }
    }

    /// Notes that `ctl_conn` has just come up (see [`OUTLET_GRACE`]).
    pub(crate) fn connected(&self, ctl_conn: &quinn::Connection) {
        self.control_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ctl_conn.stable_id(), Instant::now());
    }

    /// Whether `ctl_conn` came up less than [`OUTLET_GRACE`] ago.
    fn connected_recently(&self, ctl_conn: &quinn::Connection) -> bool {
        let mut since = self.control_since.lock().unwrap_or_else(|p| p.into_inner());
        since.retain(|_, t| t.elapsed() < OUTLET_GRACE);
        since.contains_key(&ctl_conn.stable_id())
    }

    /// Asks the relays that are up (in configured order, other than `avoid`) for a route to
    /// `service` until one grants it (to `outlet`, when given): a relay the outlet is not
    /// connected to refuses, and the next one is asked. Waits up to `wait` for a relay to come
    /// up when none is. A policy refusal is final (relays share policies in practice).
    pub(crate) async fn route_via_any(
        &self,
        service: &ServiceName,
        avoid: Option<SocketAddr>,
        wait: Duration,
        outlet: Option<&NodeName>,
    ) -> Result<(SocketAddr, RouteId, NodeName), ServeError> {
        let grace_end = tokio::time::Instant::now() + OUTLET_GRACE;
        loop {
            let (result, young) = self.route_once(service, avoid, wait, outlet).await;
            match result {
                // A relay that has just (re)started has not heard from every outlet yet: ask
                // again for a little while rather than fail the client at once.
                Err(ServeError::Refused(
                    RefuseReason::UnknownService | RefuseReason::NoLiveOutlet,
                )) if young && tokio::time::Instant::now() < grace_end => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    /// One pass of [`route_via_any`](Self::route_via_any); also says whether the last relay
    /// asked was connected only recently (less than [`OUTLET_GRACE`] ago).
    async fn route_once(
        &self,
        service: &ServiceName,
        avoid: Option<SocketAddr>,
        wait: Duration,
        outlet: Option<&NodeName>,
    ) -> (Result<(SocketAddr, RouteId, NodeName), ServeError>, bool) {
        let mut candidates = self.uplink.healthy_now(avoid);
        if candidates.is_empty() {
            candidates.extend(self.uplink.healthy_relay(avoid, wait).await);
        }
        let mut last = ServeError::NoRelay;
        let mut young = false;
        let mut queue: std::collections::VecDeque<_> = candidates.into();
        let mut asked: Vec<SocketAddr> = Vec::new();
        while let Some((relay, ctl_conn)) = queue.pop_front() {
            if asked.contains(&relay) {
                continue;
            }
            asked.push(relay);
            young = self.connected_recently(&ctl_conn);
            match request_route(&ctl_conn, service).await {
                Ok(Answer::Granted(route, granted))
                    if outlet.is_none_or(|want| *want == granted) =>
                {
                    return (Ok((relay, route, granted)), young);
                }
                // The connection's keys live with the outlet it was made to, so it cannot
                // move to another one. (The unused route goes when this node disconnects.)
                Ok(Answer::Granted(_, granted)) => {
                    last = ServeError::OtherOutlet {
                        relay,
                        outlet: granted,
                    }
                }
                Ok(Answer::Redirect(relays)) => {
                    tracing::debug!(%relay, ?relays, %service, "redirected to the relays holding the service");
                    last = ServeError::Refused(RefuseReason::NoLiveOutlet);
                    let targets: Vec<SocketAddr> = relays
                        .iter()
                        .filter_map(|a| a.parse().ok())
                        .filter(|a| Some(*a) != avoid && !asked.contains(a))
                        .collect();
                    // Asked next, in the order given, before the other relays.
                    for addr in targets.into_iter().rev() {
                        if let Some(c) = self.redirect_to(addr, wait).await {
                            queue.push_front((addr, c));
                        }
                    }
                }
                Err(e @ ServeError::Refused(RefuseReason::NotAllowed)) => return (Err(e), young),
                Err(e) => {
                    tracing::debug!(%relay, error = %e, "relay cannot route; asking the next");
                    last = e;
                }
            }
        }
        (Err(last), young)
    }
}

impl Router {
    /// The control connection to the relay at `addr`, named by a redirect: opened now when
    /// this inlet does not use that relay yet (and kept, so later routes and moves can use
    /// it); waits up to `wait` for it to come up.
    async fn redirect_to(&self, addr: SocketAddr, wait: Duration) -> Option<quinn::Connection> {
        let new = self.uplink.add_relay(self.uplink.relay_at(addr));
        if new {
            tracing::info!(relay = %addr, "redirected: connecting to another relay of the fleet");
            self.redirected
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(addr);
        }
        let (_, mut rx) = self.uplink.relays().into_iter().find(|(a, _)| *a == addr)?;
        // A relay this inlet already uses but cannot reach now is not waited for.
        let wait = if new {
            wait.max(RELAY_CONNECT)
        } else {
            Duration::ZERO
        };
        postern_net::control::connection::wait_connected(&mut rx, wait).await
    }

    /// The fleet's relays changed: relays this inlet was redirected to that left the fleet
    /// are closed (the configured ones are kept); returns them.
    pub(crate) fn fleet_changed(
        &self,
        relays: &[postern_proto::msg::FleetRelay],
    ) -> Vec<SocketAddr> {
        if relays.is_empty() {
            return Vec::new();
        }
        let live: Vec<SocketAddr> = relays
            .iter()
            .flat_map(|r| r.addresses.iter().filter_map(|a| a.parse().ok()))
            .collect();
        let gone: Vec<SocketAddr> = {
            let mut redirected = self.redirected.lock().unwrap_or_else(|p| p.into_inner());
            let gone = redirected
                .iter()
                .filter(|a| !live.contains(a))
                .copied()
                .collect();
            redirected.retain(|a| live.contains(a));
            gone
        };
        for addr in &gone {
            tracing::info!(relay = %addr, "a relay this inlet was redirected to left the fleet");
            self.uplink.remove_relay(*addr);
        }
        gone
    }
}

/// How long a relay named by a redirect may take to connect, at least.
const RELAY_CONNECT: Duration = Duration::from_secs(5);

/// A relay's answer to a route request.
enum Answer {
    Granted(RouteId, NodeName),
    /// No outlet here; these relays hold one.
    Redirect(Vec<String>),
}

/// Asks a relay for a route to `service`.
async fn request_route(
    ctl_conn: &quinn::Connection,
    service: &ServiceName,
) -> Result<Answer, ServeError> {
    let answer = exchange::request(
        ctl_conn,
        &Ctl::RouteRequest {
            service: service.clone(),
        },
        CTL_TIMEOUT,
    )
    .await?;
    match answer {
        Ctl::RouteGranted { route, outlet, .. } => Ok(Answer::Granted(route, outlet)),
        Ctl::RouteRedirect { relays, .. } => Ok(Answer::Redirect(relays)),
        Ctl::RouteRefused { reason, .. } => Err(ServeError::Refused(reason)),
        Ctl::Refused { reason } => Err(ServeError::RelayRefused(reason)),
        _ => Err(ServeError::Unexpected),
    }
}
