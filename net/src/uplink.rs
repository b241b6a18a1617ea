//! A node's way up to its relays, shared by the inlet and the outlet: the one UDP socket and
//! QUIC endpoint that carry both the control connections and the end-to-end connections, one
//! control connection per relay (re-established on loss, over UDP or TLS/TCP), the identity
//! those connections present (swapped on renewal), readiness, and the graceful-shutdown state.
//!
//! What differs between the two nodes stays with them: what they say on each control
//! connection (a [`ControlHandler`]), and their end-to-end role, given as a [`Role`]: the inlet
//! dials outlets, the outlet accepts their connections.

use crate::control::connection::{self, ControlHandler, SharedClientConfig};
use crate::runtime::drain::{self, Drain};
use crate::transport::endpoint::{self, EndpointError};
use crate::transport::node_socket::NodeSocket;
use crate::transport::relay_path::{RelayPath, RelayTarget, TransportSettings, TransportStatus};
use postern_proto::msg::FleetRelay;
use postern_proto::tls::Identity;
use rustls::RootCertStore;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Why a node could not bind its uplink.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UplinkError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("cannot bind UDP socket: {0}")]
    Bind(std::io::Error),
}

/// A relay's control connection as it comes and goes (`None` while disconnected).
pub type ControlWatch = watch::Receiver<Option<quinn::Connection>>;

/// A relay and its control connection.
pub type RelayControl = (SocketAddr, ControlWatch);

/// Which end of end-to-end connections a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Dials outlets (the inlet): its endpoint accepts nothing.
    Client,
    /// Accepts inlets' connections (the outlet); stops accepting them once draining.
    Server,
}

/// The end-to-end configuration that follows the node's identity.
enum E2e {
    /// Each new end-to-end connection takes the current one.
    Client(SharedClientConfig),
    /// Lives in the endpoint.
    Server,
}

/// Starts one relay's control connection once the uplink runs: what stops it, and its task.
/// `None` (logged) when the relay's path cannot be set up.
type Runner = Arc<
    dyn Fn(
            RelayTarget,
            watch::Sender<Option<quinn::Connection>>,
        ) -> Option<(CancellationToken, tokio::task::JoinHandle<()>)>
        + Send
        + Sync,
>;

/// Whether a control connection is up (not closed).
pub fn healthy(c: &Option<quinn::Connection>) -> bool {
    c.as_ref().is_some_and(|c| c.close_reason().is_none())
}

/// The socket, endpoint and control connections of one node (see the module doc). Built by
/// [`bind`](Self::bind), given relays and settings before [`start`](Self::start), and shared
/// (in an `Arc`) by the node, its handle and whatever opens connections.
pub struct Uplink {
    socket: Arc<NodeSocket>,
    endpoint: quinn::Endpoint,
    roots: Arc<RootCertStore>,
    /// For control connections; replaced on renewal, taken by each new connection.
    control_client: SharedClientConfig,
    e2e: E2e,
    /// Every relay in configured order (the first healthy one is used for new routes), then
    /// those added at run time.
    relays: Arc<RwLock<Vec<RelayControl>>>,
    /// The first relay's control connection (see [`control`](Self::control)).
    primary: Arc<watch::Sender<Option<quinn::Connection>>>,
    /// Set by [`start`](Self::start): starts the control connection of a relay added later.
    runner: Mutex<Option<Runner>>,
    /// What stops each started relay's control connection (for [`remove_relay`](Self::remove_relay)).
    stops: Mutex<HashMap<SocketAddr, CancellationToken>>,
    /// The control connections' tasks, awaited when the uplink stops.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The fleet's live relays, as the relays last told (empty without a fleet).
    fleet: watch::Sender<Vec<FleetRelay>>,
    /// The name in the relays' certificates (of the first relay; relays learned later share it).
    relay_name: String,
    /// The relays whose control connections [`start`](Self::start) has yet to run, with the
    /// sending side of their watch. Taken there, so the watches close when the connections'
    /// tasks end.
    pending: Mutex<Vec<(RelayTarget, watch::Sender<Option<quinn::Connection>>)>>,
    transport: Mutex<TransportSettings>,
    /// The end-to-end server configuration in the endpoint (a [`Role::Server`] node), kept to
    /// change its congestion controller.
    e2e_server: Mutex<Option<quinn::ServerConfig>>,
    /// Which transport reaches each relay, and relays' permanent refusals of this node.
    transport_status: Arc<TransportStatus>,
    drain: Drain,
    drain_timeout: Mutex<Duration>,
}

impl Uplink {
    /// Binds the node's socket (for the address family of `relay`, the first relay) and its
    /// endpoint, with `identity` for every connection.
    pub fn bind(
        relay: RelayTarget,
        identity: &Identity,
        roots: Arc<RootCertStore>,
        role: Role,
    ) -> Result<Self, UplinkError> {
        let socket = Arc::new(NodeSocket::bind_for(relay.addr).map_err(UplinkError::Bind)?);
        let server = match role {
            Role::Server => Some(endpoint::e2e_server(identity, roots.clone())?),
            Role::Client => None,
        };
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint::endpoint_config(None),
            server.clone(),
            socket.clone(),
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(UplinkError::Bind)?;
        let e2e = match role {
            Role::Client => E2e::Client(Arc::new(RwLock::new(endpoint::e2e_client(
                identity,
                roots.clone(),
            )?))),
            Role::Server => E2e::Server,
        };
        let control_client = Arc::new(RwLock::new(endpoint::control_client(
            identity,
            roots.clone(),
        )?));
        let (tx, rx) = watch::channel(None);
        Ok(Self {
            socket,
            endpoint,
            roots,
            control_client,
            e2e,
            relays: Arc::new(RwLock::new(vec![(relay.addr, rx)])),
            primary: Arc::new(watch::channel(None).0),
            runner: Mutex::default(),
            stops: Mutex::default(),
            tasks: Mutex::default(),
            fleet: watch::channel(Vec::new()).0,
            relay_name: relay.name.clone(),
            pending: Mutex::new(vec![(relay, tx)]),
            transport: Mutex::default(),
            e2e_server: Mutex::new(server),
            transport_status: Arc::default(),
            drain: Drain::default(),
            drain_timeout: Mutex::new(Duration::ZERO),
        })
    }

    /// The node's socket (routes are bound to it).
    pub fn socket(&self) -> &Arc<NodeSocket> {
        &self.socket
    }

    /// The node's endpoint.
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// The configuration a new end-to-end connection takes now (`None` for a
    /// [`Role::Server`] node, which does not dial).
    pub fn e2e_client(&self) -> Option<quinn::ClientConfig> {
        match &self.e2e {
            E2e::Client(c) => Some(connection::current_config(c)),
            E2e::Server => None,
        }
    }

    /// The graceful-shutdown state every task that takes work holds.
    pub fn drain(&self) -> &Drain {
        &self.drain
    }

    /// Uses `relay` too, with its own control connection (no state shared between relays):
    /// before [`start`](Self::start), or while running (its connection starts at once). False
    /// when a relay at that address is used already.
    pub fn add_relay(&self, relay: RelayTarget) -> bool {
        let (tx, rx) = watch::channel(None);
        {
            let mut relays = self.relays.write().unwrap_or_else(|p| p.into_inner());
            if relays.iter().any(|(a, _)| *a == relay.addr) {
                return false;
            }
            relays.push((relay.addr, rx));
        }
        let runner = self
            .runner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match runner {
            Some(run) => {
                let addr = relay.addr;
                match run(relay, tx) {
                    Some((stop, task)) => {
                        self.stops
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(addr, stop);
                        self.tasks
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(task);
                    }
                    None => {
                        self.relays
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .retain(|(a, _)| *a != addr);
                        return false;
                    }
                }
            }
            None => self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((relay, tx)),
        }
        true
    }

    /// A relay at `addr`, named as the relays this node was given (a relay learned from the
    /// fleet or named by a redirect carries the same certificate name).
    pub fn relay_at(&self, addr: SocketAddr) -> RelayTarget {
        RelayTarget {
            addr,
            name: self.relay_name.clone(),
        }
    }

    /// Stops using the relay at `addr`: its control connection is closed (the relay forgets
    /// this node's registrations and routes there). False when no such relay is used.
    pub fn remove_relay(&self, addr: SocketAddr) -> bool {
        let removed = {
            let mut relays = self.relays.write().unwrap_or_else(|p| p.into_inner());
            let before = relays.len();
            relays.retain(|(a, _)| *a != addr);
            relays.len() != before
        };
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(r, _)| r.addr != addr);
        if let Some(stop) = self
            .stops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr)
        {
            stop.cancel();
        }
        refresh_primary(&self.relays, &self.primary);
        removed
    }

    /// Records the fleet's live relays as a relay told them ([`postern_proto::msg::Ctl::Relays`]).
    pub fn learn_relays(&self, relays: Vec<FleetRelay>) {
        self.fleet.send_if_modified(|known| {
            let changed = *known != relays;
            if changed {
                tracing::info!(relays = relays.len(), "learned the fleet's relays");
                *known = relays;
            }
            changed
        });
    }

    /// The fleet's live relays as last learned (empty: no fleet, or not heard yet).
    pub fn fleet_relays(&self) -> watch::Receiver<Vec<FleetRelay>> {
        self.fleet.subscribe()
    }

    /// Chooses how relays are reached: UDP, TLS/TCP, or UDP with fallback to TLS/TCP (the
    /// default). Call before [`start`](Self::start).
    pub fn set_transport(&self, transport: TransportSettings) {
        let congestion = transport.congestion;
        *self.transport.lock().unwrap_or_else(|p| p.into_inner()) = transport;
        let e2e = Arc::new(endpoint::e2e_transport(congestion));
        match &self.e2e {
            E2e::Client(c) => {
                c.write()
                    .unwrap_or_else(|p| p.into_inner())
                    .transport_config(e2e);
            }
            E2e::Server => {
                let mut server = self.e2e_server.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(cfg) = server.as_mut() {
                    cfg.transport_config(e2e);
                    self.endpoint.set_server_config(Some(cfg.clone()));
                }
            }
        }
    }

    /// Whether end-to-end connections of `route` may take a direct path. Also over the
    /// TLS/TCP fallback: UDP to the relay may be blocked where UDP to the peer is not, and the
    /// node's UDP socket (the one probes leave from) is there either way; where no UDP gets
    /// through, the probes go unanswered and the route stays relayed.
    pub fn direct_allowed(&self, route: postern_proto::fwd::RouteId) -> bool {
        let mode = self
            .transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .direct;
        mode == crate::transport::direct::DirectMode::Auto && self.socket.relay_of(route).is_some()
    }

    /// The congestion controller end-to-end connections use.
    pub fn congestion(&self) -> endpoint::Congestion {
        self.transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .congestion
    }

    /// After shutdown is asked for, wait up to `timeout` for open streams before closing the
    /// control connections. Default: zero, close at once.
    pub fn set_drain_timeout(&self, timeout: Duration) {
        *self.drain_timeout.lock().unwrap_or_else(|p| p.into_inner()) = timeout;
    }

    /// Uses a renewed identity for every connection made (or, for a [`Role::Server`] node,
    /// accepted) from now on. Nothing changes unless every new configuration can be built.
    pub fn set_identity(&self, identity: &Identity) -> Result<(), EndpointError> {
        let control = endpoint::control_client(identity, self.roots.clone())?;
        let congestion = self.congestion();
        match &self.e2e {
            E2e::Client(e2e_client) => {
                let e2e = endpoint::e2e_client_with(identity, self.roots.clone(), congestion)?;
                *self
                    .control_client
                    .write()
                    .unwrap_or_else(|p| p.into_inner()) = control;
                *e2e_client.write().unwrap_or_else(|p| p.into_inner()) = e2e;
            }
            E2e::Server => {
                let server = endpoint::e2e_server_with(identity, self.roots.clone(), congestion)?;
                *self
                    .control_client
                    .write()
                    .unwrap_or_else(|p| p.into_inner()) = control;
                self.endpoint.set_server_config(Some(server.clone()));
                *self.e2e_server.lock().unwrap_or_else(|p| p.into_inner()) = Some(server);
            }
        }
        Ok(())
    }

    /// Every relay in configured order, with its control connection.
    pub fn relays(&self) -> Vec<RelayControl> {
        self.relays
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// More than one relay is configured (connections can move between them).
    pub fn several_relays(&self) -> bool {
        self.relays.read().unwrap_or_else(|p| p.into_inner()).len() > 1
    }

    /// Renews this node's certificate before it expires, when it was enrolled into `state_dir`
    /// (a certificate given by file is left alone), and uses each renewed identity for new
    /// connections.
    pub fn renew_automatically(
        self: &Arc<Self>,
        state_dir: &std::path::Path,
        cert: &std::path::Path,
        shutdown: CancellationToken,
    ) {
        let me = self.clone();
        crate::control::renew::spawn_if_enrolled(
            state_dir,
            cert,
            self.control(),
            move |identity| {
                if let Err(e) = me.set_identity(&identity) {
                    tracing::error!(error = %e, "cannot use the renewed certificate");
                }
            },
            shutdown,
        );
    }

    /// The first relay's control connection, as it comes and goes (`None` while it is
    /// down). Once that relay is removed (an outlet leaving a relay that is not one of its
    /// home relays), the next relay's.
    pub fn control(&self) -> ControlWatch {
        self.primary.subscribe()
    }

    /// Waits (at most `timeout`) until the first relay's control connection is up.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        connection::wait_connected(&mut self.control(), timeout)
            .await
            .is_some()
    }

    /// Waits (at most `timeout` in all) until every relay's control connection is up.
    pub async fn wait_all_connected(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        for (_, mut rx) in self.relays() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if connection::wait_connected(&mut rx, left).await.is_none() {
                return false;
            }
        }
        true
    }

    /// True while a control connection to a relay is up.
    pub fn relay_connected(&self) -> bool {
        self.relays().iter().any(|(_, rx)| healthy(&rx.borrow()))
    }

    /// Which transport (UDP or TLS/TCP) reaches each connected relay, and which relays refuse
    /// this node for good.
    pub fn transports(&self) -> &TransportStatus {
        &self.transport_status
    }

    /// Whether the node can take work (the `/readyz` answer): not while shutting down, nor
    /// while no relay is connected (then a relay's refusal of this node is the reason given).
    pub fn readiness(&self) -> Result<(), String> {
        readiness(
            self.drain.draining.is_cancelled(),
            self.relay_connected(),
            || {
                self.transport_status
                    .not_ready_reason("no control connection to the relay")
            },
        )
    }

    /// Relays whose control connection is up now, in configured order, other than `avoid`.
    pub fn healthy_now(&self, avoid: Option<SocketAddr>) -> Vec<(SocketAddr, quinn::Connection)> {
        self.relays()
            .into_iter()
            .filter(|(a, _)| Some(*a) != avoid)
            .filter_map(|(a, rx)| {
                let c = rx.borrow().clone()?;
                c.close_reason().is_none().then_some((a, c))
            })
            .collect()
    }

    /// The first relay (in configured order) whose control connection is up, other than
    /// `avoid`; waits up to `timeout` for one to come up.
    pub async fn healthy_relay(
        &self,
        avoid: Option<SocketAddr>,
        timeout: Duration,
    ) -> Option<(SocketAddr, quinn::Connection)> {
        let relays: Vec<RelayControl> = self
            .relays()
            .into_iter()
            .filter(|(a, _)| Some(*a) != avoid)
            .collect();
        for (addr, rx) in &relays {
            if let Some(c) = rx.borrow().as_ref().filter(|c| c.close_reason().is_none()) {
                return Some((*addr, c.clone()));
            }
        }
        let mut waits = tokio::task::JoinSet::new();
        for (addr, mut rx) in relays {
            waits.spawn(async move {
                let c = rx.wait_for(healthy).await.ok()?.clone()?;
                Some((addr, c))
            });
        }
        let first = async {
            while let Some(r) = waits.join_next().await {
                if let Ok(Some(found)) = r {
                    return Some(found);
                }
            }
            None
        };
        tokio::time::timeout(timeout, first).await.ok().flatten()
    }

    /// Starts one control connection per relay, each served by `handler_for(relay)` (relays
    /// added later too), and returns what runs them until `shutdown`, then drains: new work is
    /// refused (a [`Role::Server`] node stops accepting end-to-end connections), open streams
    /// get the drain timeout to finish (`what` names them in the logs), and `close` is
    /// cancelled, which ends the control connections. `None` (logged) if a relay's path cannot
    /// be set up.
    pub fn start<H: ControlHandler>(
        &self,
        handler_for: impl Fn(SocketAddr) -> Arc<H> + Send + Sync + 'static,
        shutdown: CancellationToken,
        close: CancellationToken,
        what: &'static str,
    ) -> Option<impl Future<Output = ()> + '_> {
        let transport = self
            .transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (endpoint, client, socket, roots, status) = (
            self.endpoint.clone(),
            self.control_client.clone(),
            self.socket.clone(),
            self.roots.clone(),
            self.transport_status.clone(),
        );
        let (relays, primary, stop_all) =
            (self.relays.clone(), self.primary.clone(), close.clone());
        let runner: Runner = Arc::new(move |relay: RelayTarget, current| {
            let handler = handler_for(relay.addr);
            let path = match RelayPath::new(
                socket.clone(),
                relay,
                roots.clone(),
                transport.clone(),
                status.clone(),
            ) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    tracing::error!(error = %e, "cannot set up the path to the relay");
                    return None;
                }
            };
            let stop = stop_all.child_token();
            let mut rx = current.subscribe();
            let run = connection::run(
                endpoint.clone(),
                client.clone(),
                path,
                handler,
                current,
                stop.clone(),
            );
            let (relays, primary) = (relays.clone(), primary.clone());
            let task = tokio::spawn(async move {
                // The connection's comings and goings decide which relay is the primary one.
                let follow = async {
                    while rx.changed().await.is_ok() {
                        refresh_primary(&relays, &primary);
                    }
                };
                tokio::join!(run, follow);
                refresh_primary(&relays, &primary);
            });
            Some((stop, task))
        });
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        for (relay, current) in pending {
            let addr = relay.addr;
            let (stop, task) = runner(relay, current)?;
            self.stops
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(addr, stop);
            self.tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(task);
        }
        *self.runner.lock().unwrap_or_else(|p| p.into_inner()) = Some(runner);
        let timeout = *self.drain_timeout.lock().unwrap_or_else(|p| p.into_inner());
        // The runner holds the handlers, which may hold this uplink: it goes with the future
        // (however that ends), so nothing is kept alive in a cycle.
        let forget_runner = ForgetRunner(&self.runner);
        Some(async move {
            let _forget_runner = forget_runner;
            let ctl = async {
                close.cancelled().await;
                // No relay is added from now on: the connections end with `close`.
                self.runner.lock().unwrap_or_else(|p| p.into_inner()).take();
                loop {
                    let tasks =
                        std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
                    if tasks.is_empty() {
                        break;
                    }
                    for t in tasks {
                        let _ = t.await;
                    }
                }
            };
            let drain = async {
                shutdown.cancelled().await;
                self.drain.draining.cancel();
                if matches!(self.e2e, E2e::Server) {
                    // New end-to-end connections are refused from now on.
                    self.endpoint.set_server_config(None);
                }
                if !timeout.is_zero() {
                    drain::drain(&self.drain.streams, timeout, what).await;
                }
                close.cancel();
            };
            tokio::join!(ctl, drain);
        })
    }

    /// Closes the endpoint (every connection, with `reason`) and waits briefly for the peers
    /// to hear of it.
    pub async fn close(&self, reason: &'static [u8]) {
        self.endpoint
            .close(postern_proto::msg::code::SHUTDOWN.into(), reason);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// Drops the uplink's runner when dropped.
struct ForgetRunner<'a>(&'a Mutex<Option<Runner>>);

impl Drop for ForgetRunner<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// Publishes, in `primary`, the control connection of the first relay in `relays` (when up).
fn refresh_primary(
    relays: &RwLock<Vec<RelayControl>>,
    primary: &watch::Sender<Option<quinn::Connection>>,
) {
    let first = relays
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .first()
        .and_then(|(_, rx)| rx.borrow().clone().filter(|c| c.close_reason().is_none()));
    primary.send_if_modified(|now| {
        let changed = now.as_ref().map(|c| c.stable_id()) != first.as_ref().map(|c| c.stable_id());
        if changed {
            *now = first;
        }
        changed
    });
}

/// The `/readyz` rule: shutting down beats everything; then a node with no relay connected is
/// not ready, for the reason `why_not_connected` gives.
fn readiness(
    draining: bool,
    relay_connected: bool,
    why_not_connected: impl FnOnce() -> String,
) -> Result<(), String> {
    if draining {
        Err("shutting down".into())
    } else if !relay_connected {
        Err(why_not_connected())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_proto::name::NodeName;
    use postern_proto::pki::Ca;

    /// A fresh identity for `name` from `ca`.
    fn issue(ca: &Ca, name: &str) -> Identity {
        let issued = ca
            .issue(
                &NodeName::new(name).expect("name"),
                Duration::from_secs(3600),
            )
            .expect("issue");
        Identity::from_pem(&issued.cert_pem, &issued.key_pem).expect("identity")
    }

    fn target(port: u16) -> RelayTarget {
        RelayTarget {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            name: "relay".to_owned(),
        }
    }

    /// A bound uplink whose relays are not running: it keeps their order, is not ready for the
    /// right reason, takes a renewed identity in either role, and says "shutting down" once
    /// draining. (Nothing listens on the relays' ports; `start` is never called.)
    #[tokio::test]
    async fn a_bound_uplink_without_relays_up_keeps_order_and_explains_readiness() {
        let ca = Ca::generate("test").expect("CA");
        let roots = postern_proto::tls::roots_from_pem(ca.cert_pem()).expect("roots");
        let identity = issue(&ca, "node-1");
        for role in [Role::Client, Role::Server] {
            let uplink = Uplink::bind(target(9), &identity, roots.clone(), role).expect("bind");
            assert_eq!(uplink.e2e_client().is_some(), role == Role::Client);
            assert!(!uplink.several_relays());
            uplink.add_relay(target(10));
            assert!(uplink.several_relays());
            let order: Vec<u16> = uplink.relays().iter().map(|(a, _)| a.port()).collect();
            assert_eq!(order, [9, 10]);
            assert!(!uplink.relay_connected());
            assert!(uplink.healthy_now(None).is_empty());
            assert!(uplink
                .healthy_relay(None, Duration::from_millis(50))
                .await
                .is_none());
            assert!(!uplink.wait_all_connected(Duration::from_millis(50)).await);
            assert_eq!(
                uplink.readiness(),
                Err("no control connection to the relay".to_owned())
            );
            uplink
                .transports()
                .set_refused(target(10).addr, Some("identity revoked".into()));
            let why = uplink.readiness().expect_err("not ready");
            assert!(
                why.contains("127.0.0.1:10") && why.contains("revoked"),
                "{why}"
            );

            // A renewed identity (same name, new key) is taken for the next connections.
            uplink
                .set_identity(&issue(&ca, "node-1"))
                .expect("renewed identity");

            uplink.drain().draining.cancel();
            assert_eq!(uplink.readiness(), Err("shutting down".to_owned()));
        }
    }

    /// Relays come and go by address: a second add of one is refused, a removed one is gone
    /// from the list (and its pending connection with it), the first relay's successor takes
    /// its place, and a relay named later (a redirect) carries the configured certificate name.
    #[tokio::test]
    async fn relays_are_added_once_and_removed_by_address() {
        let ca = Ca::generate("test").expect("CA");
        let roots = postern_proto::tls::roots_from_pem(ca.cert_pem()).expect("roots");
        let uplink =
            Uplink::bind(target(9), &issue(&ca, "node-1"), roots, Role::Client).expect("bind");
        assert!(uplink.add_relay(target(10)));
        assert!(!uplink.add_relay(target(10)), "a relay is used once");
        assert!(uplink.add_relay(target(11)));
        assert!(uplink.remove_relay(target(9).addr));
        assert!(!uplink.remove_relay(target(9).addr));
        let order: Vec<u16> = uplink.relays().iter().map(|(a, _)| a.port()).collect();
        assert_eq!(order, [10, 11]);
        assert_eq!(
            uplink
                .pending
                .lock()
                .expect("pending")
                .iter()
                .map(|(r, _)| r.addr.port())
                .collect::<Vec<_>>(),
            [10, 11]
        );
        let named = uplink.relay_at(target(12).addr);
        assert_eq!((named.addr.port(), named.name.as_str()), (12, "relay"));
        uplink.learn_relays(vec![FleetRelay {
            name: "relay-a".into(),
            addresses: vec!["127.0.0.1:10".into()],
        }]);
        assert_eq!(uplink.fleet_relays().borrow().len(), 1);
    }

    #[test]
    fn readiness_says_shutting_down_first_then_why_no_relay() {
        let why = || "relay 127.0.0.1:1 refuses this node: revoked".to_owned();
        assert_eq!(readiness(true, false, why), Err("shutting down".into()));
        assert_eq!(readiness(true, true, why), Err("shutting down".into()));
        assert_eq!(readiness(false, false, why), Err(why()));
        assert_eq!(readiness(false, true, why), Ok(()));
    }
}
