//! The pool of end-to-end connections: per service, the route to its outlet and up to
//! [`pool_size`] QUIC connections over it, set up on first use and replaced when their route
//! goes away. Which connection a new stream takes is [`least_busy`]; when to open another is
//! [`should_grow`] (both pure, tested below).

use crate::error::ServeError;
use crate::route::Router;
use postern_net::transport::rekey::KeyBudget;
use postern_net::uplink::Uplink;
use postern_proto::fwd::RouteId;
use postern_proto::msg::code;
use postern_proto::name::{NodeName, ServiceName};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long a client connection waits for the relay to be reachable before it is closed.
pub const RELAY_WAIT: Duration = Duration::from_secs(5);
/// How long setting up an end-to-end connection may take.
pub const E2E_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A service's end-to-end connections: one route to its outlet, and the connections over it.
pub(crate) struct RouteConns {
    pub(crate) route: RouteId,
    /// The relay the route goes through.
    pub(crate) relay: SocketAddr,
    /// The address the connection was made to; it stays while the route under it changes.
    pub(crate) virt: SocketAddr,
    pub(crate) outlet: NodeName,
    /// Up to [`pool_size`] QUIC connections over the route: they share its addresses (the
    /// relay tells them apart by nothing, quinn by connection ID), so a move takes them all.
    conns: Vec<Pooled>,
}

impl RouteConns {
    /// Drops connections that have closed; false when none is left.
    pub(crate) fn prune(&mut self) -> bool {
        self.conns.retain(|p| p.conn.close_reason().is_none());
        !self.conns.is_empty()
    }

    /// Closes every connection of the pool (their route is gone).
    pub(crate) fn close(&self) {
        for p in &self.conns {
            p.conn.close(code::ROUTE_CLOSED.into(), b"route closed");
        }
    }

    fn loads(&self) -> Vec<usize> {
        self.conns.iter().map(Pooled::load).collect()
    }

    /// Closes the connections once the client streams on them have ended (the route was
    /// retired: no new stream comes), then forgets the route.
    async fn close_when_idle(mut self, uplink: Arc<Uplink>) {
        while self.prune() && self.loads().iter().any(|&l| l > 0) {
            tokio::time::sleep(RETIRED_POLL).await;
        }
        self.close();
        uplink.socket().remove_route(self.route);
    }
}

/// How often a retired route's connections are looked at until their streams have ended.
const RETIRED_POLL: Duration = Duration::from_millis(250);

/// One end-to-end connection and the number of client streams it carries now.
struct Pooled {
    conn: quinn::Connection,
    active: Arc<AtomicUsize>,
}

impl Pooled {
    fn new(conn: quinn::Connection) -> Self {
        Self {
            conn,
            active: Arc::default(),
        }
    }

    fn load(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// Counts a client stream on its connection while it lives.
pub(crate) struct ActiveStream(Arc<AtomicUsize>);

impl ActiveStream {
    fn on(p: &Pooled) -> Self {
        p.active.fetch_add(1, Ordering::Relaxed);
        Self(p.active.clone())
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Most end-to-end connections per service. quinn drives each connection from one task, so one
/// connection's packet work (crypto, ACKs, stream bookkeeping) runs on one core at a time: the
/// bench on 16 cores showed 8 to 1,000 concurrent streams stuck at the 1-stream rate. More
/// connections spread that work; they are opened only while every existing one carries a
/// stream (see [`should_grow`]), so a single client or an idle fleet still uses one. Half the
/// cores (the other half is the splice tasks' and the outlet's), at most 8; 1 on a 2-core
/// machine.
fn pool_size() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() / 2)
            .unwrap_or(1)
            .clamp(1, 8)
    })
}

/// Whether a new stream should get a connection of its own: every connection of the route
/// (with these `loads`, streams per connection) carries a stream and the pool is under `cap`.
fn should_grow(loads: &[usize], cap: usize) -> bool {
    loads.len() < cap && loads.iter().all(|&l| l > 0)
}

/// The connection a new stream goes on: the least busy, the first of equals (so an idle pool
/// keeps using its first connection).
fn least_busy(loads: &[usize]) -> Option<usize> {
    loads
        .iter()
        .enumerate()
        .min_by_key(|(_, &l)| l)
        .map(|(i, _)| i)
}

/// One service's slot. The async mutex makes concurrent client connections wait for one route
/// set-up instead of each asking for a route.
pub(crate) type Slot = Arc<tokio::sync::Mutex<Option<RouteConns>>>;

/// The inlet's end-to-end connections, per service.
pub(crate) struct Pool {
    uplink: Arc<Uplink>,
    router: Router,
    key_budget: Mutex<KeyBudget>,
    /// Most end-to-end connections per service (see [`pool_size`]).
    size: AtomicUsize,
    key_updates: Arc<AtomicU64>,
    /// End-to-end connections moved to another relay's path.
    migrations: AtomicU64,
    /// Per service: the current route and its connections.
    slots: Mutex<HashMap<ServiceName, Slot>>,
    /// End-to-end handshakes in progress, by the route they go over: cancelled when the relay
    /// closes that route, so that they end at once instead of at [`E2E_CONNECT_TIMEOUT`].
    handshakes: Mutex<HashMap<RouteId, CancellationToken>>,
    /// Bumped when waiting for an outlet is worth ending early: an end-to-end connection came
    /// up, or a relay said a service's outlet is back (see [`Pool::retry_now`]).
    retry: watch::Sender<u64>,
}

impl Pool {
    pub(crate) fn new(uplink: Arc<Uplink>) -> Self {
        Self {
            router: Router::new(uplink.clone()),
            uplink,
            key_budget: Mutex::default(),
            size: pool_size().into(),
            key_updates: Arc::default(),
            migrations: AtomicU64::default(),
            slots: Mutex::default(),
            handshakes: Mutex::default(),
            retry: watch::channel(0).0,
        }
    }

    /// Tells whoever waits to try again (a lease client in its backoff) that now is a good
    /// time: an outlet came back, or a connection to one is up.
    pub(crate) fn retry_now(&self) {
        self.retry.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Changes when [`retry_now`](Self::retry_now) is called.
    pub(crate) fn retry_signal(&self) -> watch::Receiver<u64> {
        self.retry.subscribe()
    }

    /// Ends at once every end-to-end handshake in progress over `route` (its relay closed it:
    /// the outlet behind it is gone).
    pub(crate) fn abort_handshakes(&self, route: RouteId) {
        if let Some(t) = self
            .handshakes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&route)
        {
            t.cancel();
        }
    }

    pub(crate) fn uplink(&self) -> &Arc<Uplink> {
        &self.uplink
    }

    pub(crate) fn router(&self) -> &Router {
        &self.router
    }

    /// Caps the connections per service from the next stream on.
    pub(crate) fn set_size(&self, connections: usize) {
        self.size.store(connections.max(1), Ordering::Relaxed);
    }

    /// Sets when end-to-end traffic keys are rotated.
    pub(crate) fn set_key_budget(&self, budget: KeyBudget) {
        *self.key_budget.lock().unwrap_or_else(|p| p.into_inner()) = budget;
    }

    /// Key updates made on end-to-end connections so far.
    pub(crate) fn key_updates(&self) -> u64 {
        self.key_updates.load(Ordering::Relaxed)
    }

    /// End-to-end connections moved to another relay's path so far.
    pub(crate) fn migrations(&self) -> u64 {
        self.migrations.load(Ordering::Relaxed)
    }

    /// Counts one connection moved to another relay.
    pub(crate) fn migrated(&self) {
        self.migrations.fetch_add(1, Ordering::Relaxed);
    }

    fn slot(&self, service: &ServiceName) -> Slot {
        self.slot_map().entry(service.clone()).or_default().clone()
    }

    fn slot_map(&self) -> MutexGuard<'_, HashMap<ServiceName, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every service's slot, now.
    pub(crate) fn slots(&self) -> Vec<(ServiceName, Slot)> {
        self.slot_map()
            .iter()
            .map(|(s, v)| (s.clone(), v.clone()))
            .collect()
    }

    /// A live end-to-end connection for `service`, set up if needed (lease streams).
    pub(crate) async fn connection(
        &self,
        service: &ServiceName,
    ) -> Result<quinn::Connection, ServeError> {
        self.stream_connection(service).await.map(|(c, _)| c)
    }

    /// The least busy end-to-end connection for `service` and a count of one more stream on it;
    /// opens another connection over the same route while all are busy and the pool has room.
    pub(crate) async fn stream_connection(
        &self,
        service: &ServiceName,
    ) -> Result<(quinn::Connection, ActiveStream), ServeError> {
        let slot = self.slot(service);
        let mut guard = slot.lock().await;
        if let Some(e) = guard.as_mut() {
            if !e.prune() {
                self.uplink.socket().remove_route(e.route);
                *guard = None;
            }
        }
        if let Some(e) = guard.as_mut() {
            if should_grow(&e.loads(), self.size.load(Ordering::Relaxed)) {
                // Every connection carries a stream: add one over the same route.
                match self.connect_e2e(e.route, e.virt, e.outlet.as_str()).await {
                    Ok(conn) => {
                        tracing::debug!(%service, route = %e.route.short(), pool = e.conns.len() + 1, "extra end-to-end connection up");
                        e.conns.push(Pooled::new(conn));
                    }
                    Err(reason) => {
                        tracing::debug!(%service, %reason, "extra end-to-end connection failed; sharing one");
                    }
                }
            }
            let p = least_busy(&e.loads())
                .and_then(|i| e.conns.get(i))
                .ok_or(ServeError::Unexpected)?;
            return Ok((p.conn.clone(), ActiveStream::on(p)));
        }
        let (relay, route, outlet) = self
            .router
            .route_via_any(service, None, RELAY_WAIT, None)
            .await?;
        let virt = self.uplink.socket().add_route(route, relay);
        let conn = match self.connect_e2e(route, virt, outlet.as_str()).await {
            Ok(c) => c,
            Err(reason) => {
                self.uplink.socket().remove_route(route);
                return Err(ServeError::E2e {
                    outlet: outlet.to_string(),
                    reason,
                });
            }
        };
        tracing::info!(%service, %outlet, "end-to-end connection up");
        self.retry_now();
        if self.uplink.direct_allowed(route) {
            // Probes are keyed from this first connection's TLS session (the outlet does the
            // same with the first connection it accepts on the route).
            if let Some(key) =
                postern_net::transport::direct::PathKey::from_connection(&conn, route)
            {
                use postern_net::transport::direct;
                let (path, path_changes) = tokio::sync::watch::channel(false);
                tokio::spawn(direct::run_inlet(
                    self.uplink.socket().clone(),
                    route,
                    virt,
                    key,
                    path,
                ));
                // The route's own relay shows its path in its status and admin API.
                if let Some((_, control)) =
                    self.uplink.relays().into_iter().find(|(a, _)| *a == relay)
                {
                    tokio::spawn(direct::report_path(control, route, path_changes));
                }
            }
        }
        tracing::debug!(%service, route = %route.short(), "end-to-end connection route");
        let pooled = Pooled::new(conn.clone());
        let active = ActiveStream::on(&pooled);
        *guard = Some(RouteConns {
            route,
            relay,
            virt,
            outlet,
            conns: vec![pooled],
        });
        Ok((conn, active))
    }

    /// One end-to-end QUIC connection to the outlet behind `virt` (over `route`), with its
    /// key-update task. Ends early if the relay closes the route meanwhile.
    async fn connect_e2e(
        &self,
        route: RouteId,
        virt: SocketAddr,
        outlet: &str,
    ) -> Result<quinn::Connection, String> {
        let config = self
            .uplink
            .e2e_client()
            .ok_or("this node does not dial end-to-end connections")?;
        let connecting = self
            .uplink
            .endpoint()
            .connect_with(config, virt, outlet)
            .map_err(|e| e.to_string())?;
        let closed = self
            .handshakes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(route)
            .or_default()
            .clone();
        // Closed between its grant and now (checked after registering, so a close from here on
        // cancels the handshake).
        if self.uplink.socket().relay_of(route).is_none() {
            self.abort_handshakes(route);
        }
        let outcome = tokio::select! {
            r = tokio::time::timeout(E2E_CONNECT_TIMEOUT, connecting) => r,
            _ = closed.cancelled() => {
                return Err("the relay closed the route: the outlet went away".into());
            }
        };
        self.handshakes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&route);
        let conn = match outcome {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("timed out".into()),
        };
        let budget = *self.key_budget.lock().unwrap_or_else(|p| p.into_inner());
        tokio::spawn(postern_net::transport::rekey::run(
            conn.clone(),
            budget,
            self.key_updates.clone(),
        ));
        Ok(conn)
    }

    /// Takes `route` out of use: the next client connection of its service gets a new route,
    /// while streams open on it finish (its outlet cannot serve new ones; see
    /// `Ctl::RouteRetired`).
    pub(crate) fn route_retired(&self, route: RouteId) {
        let slots: Vec<_> = self.slot_map().values().cloned().collect();
        for slot in slots {
            let uplink = self.uplink.clone();
            tokio::spawn(async move {
                let retired = {
                    let mut guard = slot.lock().await;
                    if guard.as_ref().is_some_and(|e| e.route == route) {
                        guard.take()
                    } else {
                        None
                    }
                };
                if let Some(e) = retired {
                    e.close_when_idle(uplink).await;
                }
            });
        }
    }

    /// Drops the end-to-end connections using `route` (its relay route is gone).
    pub(crate) fn route_closed(&self, route: RouteId) {
        self.abort_handshakes(route);
        // After the closes below, so their CONNECTION_CLOSE still leaves on a direct path.
        self.uplink.socket().remove_route_after_close(route);
        let slots: Vec<_> = self.slot_map().values().cloned().collect();
        for slot in slots {
            if let Ok(mut guard) = slot.try_lock() {
                if guard.as_ref().is_some_and(|e| e.route == route) {
                    if let Some(e) = guard.take() {
                        e.close();
                    }
                }
            } else {
                // A set-up is in progress on this slot; a closed connection found there later
                // is replaced on next use.
                let s = slot.clone();
                tokio::spawn(async move {
                    let mut guard = s.lock().await;
                    if guard.as_ref().is_some_and(|e| e.route == route) {
                        if let Some(e) = guard.take() {
                            e.close();
                        }
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_only_while_every_connection_is_busy_and_there_is_room() {
        // One idle connection: a single client keeps using it.
        assert!(!should_grow(&[0], 4));
        // It carries a stream: a second stream gets a connection of its own.
        assert!(should_grow(&[1], 4));
        // One of several is idle: no new connection.
        assert!(!should_grow(&[3, 0, 2], 4));
        // All busy, but the pool is full.
        assert!(!should_grow(&[5, 5, 5, 5], 4));
        assert!(should_grow(&[5, 5, 5], 4));
        // A pool of one never grows (2-core machines, or `set_pool_size(1)`).
        assert!(!should_grow(&[9], 1));
    }

    #[test]
    fn a_stream_goes_on_the_least_busy_connection_first_of_equals() {
        assert_eq!(least_busy(&[]), None);
        assert_eq!(least_busy(&[0]), Some(0));
        assert_eq!(least_busy(&[3, 1, 2]), Some(1));
        assert_eq!(least_busy(&[2, 1, 1]), Some(1));
        // A connection just added (no stream yet) takes the stream that asked for it.
        assert_eq!(least_busy(&[1, 1, 0]), Some(2));
    }
}
