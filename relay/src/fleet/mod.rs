//! The relay's state that a fleet of relays shares: enrollment tickets, identities and
//! revocations, drains, and the membership of the fleet itself.
//!
//! [`FleetState`] is the one interface the relay's logic sees. Two backends implement it:
//! [`embedded::Embedded`], today's state directory (one relay, nothing new to run), and
//! [`etcd::Etcd`], an etcd cluster that every relay of the fleet talks to. The relay never
//! asks which one it has; the data path (routes already granted) never touches either, so
//! trouble with etcd stops what needs a consistent answer (enrollment, a new revocation or
//! drain) and nothing else.

use crate::authority::{IdentityRecord, TicketRecord, TicketSpec};
use postern_proto::msg::Refusal;
use postern_proto::name::{NodeName, ServiceName};
use postern_proto::policy::Attributes;
use postern_proto::ticket::{EnrollRequest, EnrollResponse, Ticket};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub mod config;
pub mod embedded;
pub mod endpoints;
pub mod etcd;
pub mod health;
pub mod view;

pub use config::{ClusterArgs, ClusterConfig, ClusterFile};

/// A boxed future, so that [`FleetState`] can be used as a trait object.
pub type Fut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why the shared state could not be read or changed. Every etcd failure says "etcd", so an
/// operator sees at once which part of the system to look at.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("the fleet's shared state in etcd is unavailable ({0}); try again once etcd answers")]
    Etcd(String),
    #[error("cannot configure the etcd cluster: {0}")]
    Config(String),
    #[error("this relay does not run the authority (no CA key in its state directory)")]
    NoAuthority,
    #[error("{0}")]
    Internal(String),
}

impl From<etcd_client::Error> for FleetError {
    fn from(e: etcd_client::Error) -> Self {
        FleetError::Etcd(etcd::describe(&e))
    }
}

/// A drain recorded in the shared state: the node gets no routes and is refused at
/// connection on every relay that sees it, until it is undrained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainRecord {
    /// What the node served when it was drained (given back by undrain while it is connected).
    pub services: Vec<ServiceName>,
    pub drained_at_ms: u64,
    /// How long its routes may keep forwarding before its connection is closed (every relay
    /// applies the same).
    #[serde(default)]
    pub timeout_ms: u64,
}

/// What every relay follows: the revoked identities and the drained nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub revoked: BTreeSet<NodeName>,
    pub drained: BTreeMap<NodeName, DrainRecord>,
}

/// A relay of the fleet, as it registers itself (under its etcd lease: the entry vanishes by
/// itself when the relay dies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Unique in the fleet (the `cluster.name` key, else host name and port).
    pub name: String,
    /// Where nodes reach it (`host:port`).
    pub addresses: Vec<String>,
    /// Connected nodes and open routes when it last reported.
    pub load: Load,
    pub updated_at_ms: u64,
}

/// A relay's load, reported with its membership.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    pub nodes: u64,
    pub routes: u64,
}

/// Reads a relay's current load (called every few seconds by the membership task).
pub type LoadFn = Arc<dyn Fn() -> Load + Send + Sync>;

/// An outlet attached to a relay, as the fleet records it: one entry per (outlet, relay),
/// with the services the outlet registered there. Entries live under the holding relay's
/// membership lease, so a dead relay's entries vanish with it. What a relay without the
/// outlet reads to redirect an inlet, and what the fleet's status shows as "where each outlet
/// is attached".
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Presence {
    pub outlet: NodeName,
    /// The holding relay's member name.
    pub relay: String,
    /// Where nodes reach the holding relay (from its membership record).
    pub addresses: Vec<String>,
    /// Sorted.
    pub services: Vec<ServiceName>,
}

/// The fleet as a relay follows it: its live members and where outlets are attached. Kept
/// in memory from a watch, so route look-ups never wait for etcd, and kept as last seen while
/// etcd cannot be reached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetView {
    /// Sorted by name.
    pub members: Vec<Member>,
    /// Sorted.
    pub presence: Vec<Presence>,
}

impl FleetView {
    /// The relays (other than `me`) holding a live outlet of `service`: their first address
    /// each, in name order.
    pub fn holders(&self, service: &ServiceName, me: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for p in &self.presence {
            if p.relay == me || !p.services.contains(service) {
                continue;
            }
            if let Some(a) = p.addresses.first() {
                if !out.contains(a) {
                    out.push(a.clone());
                }
            }
        }
        out
    }

    /// The members as nodes learn them (name and addresses; load left out).
    pub fn relays(&self) -> Vec<postern_proto::msg::FleetRelay> {
        self.members
            .iter()
            .map(|m| postern_proto::msg::FleetRelay {
                name: m.name.clone(),
                addresses: m.addresses.clone(),
            })
            .collect()
    }
}

/// The shared state, whichever backend holds it. See the module docs.
pub trait FleetState: Send + Sync + 'static {
    /// Where the state lives, for logs and errors (never a secret).
    fn describe(&self) -> String;

    /// Whether the shared state answers: `None` when there is no cluster (the state
    /// directory), else whether the follower's last read of etcd worked.
    fn connected(&self) -> Option<bool>;

    /// Whether this relay can enroll and renew nodes (it holds the CA key).
    fn runs_authority(&self) -> bool;

    /// Whether revocations made here are recorded (and so outlive a restart).
    fn keeps_identities(&self) -> bool;

    /// Creates a ticket and records it.
    fn create_ticket(&self, spec: TicketSpec) -> Fut<'_, Result<Ticket, FleetError>>;

    /// Enrolls a node from its ticket: the ticket's use is taken exactly once, however many
    /// relays race for it.
    fn enroll(&self, req: EnrollRequest) -> Fut<'_, EnrollResponse>;

    /// Signs a renewed certificate for a connected node (refused when it is revoked).
    fn renew(
        &self,
        name: NodeName,
        attrs: Attributes,
        csr_pem: String,
    ) -> Fut<'_, Result<String, Refusal>>;

    /// Signs a certificate for public hostname `hostname` for connected outlet `name`
    /// (refused when it is revoked); the caller has checked that the outlet may have it.
    fn issue_hostname(
        &self,
        name: NodeName,
        hostname: String,
        csr_pem: String,
        valid_for: std::time::Duration,
    ) -> Fut<'_, Result<String, Refusal>>;

    /// Every ticket on record.
    fn tickets(&self) -> Fut<'_, Result<Vec<TicketRecord>, FleetError>>;

    /// Every identity on record (enrolled or revoked).
    fn identities(&self) -> Fut<'_, Result<Vec<IdentityRecord>, FleetError>>;

    /// Records that `name` is revoked; whether it had been enrolled.
    fn revoke(&self, name: NodeName) -> Fut<'_, Result<bool, FleetError>>;

    /// Records a drain (`Some`) or its end (`None`).
    fn set_drain(
        &self,
        name: NodeName,
        drain: Option<DrainRecord>,
    ) -> Fut<'_, Result<(), FleetError>>;

    /// Reads the revocations and drains now.
    fn snapshot(&self) -> Fut<'_, Result<Snapshot, FleetError>>;

    /// Follows the revocations and drains until `shutdown`, sending every change to `tx`;
    /// keeps the last one it saw while the store cannot be reached.
    fn follow(
        self: Arc<Self>,
        tx: watch::Sender<Snapshot>,
        shutdown: CancellationToken,
    ) -> Fut<'static, ()>;

    /// Keeps `me` registered as a member of the fleet until `shutdown`, with its load from
    /// `load`; leaves at shutdown. The embedded state has no fleet: it returns at once.
    fn serve_membership(
        self: Arc<Self>,
        me: Member,
        load: LoadFn,
        shutdown: CancellationToken,
    ) -> Fut<'static, ()>;

    /// The live members of the fleet.
    fn members(&self) -> Fut<'_, Result<Vec<Member>, FleetError>>;

    /// How the connection to the shared state is doing (members counted, failures by
    /// operation); `None` for a backend that cannot fail that way (the state directory).
    fn health(&self) -> Option<health::HealthView> {
        None
    }
    /// Records which services `outlet` has registered on this relay (empty: it left), under
    /// this relay's membership lease; kept and written again whenever the lease is renewed
    /// after a loss. The embedded state has no fleet: nothing is recorded.
    fn set_presence(
        &self,
        outlet: NodeName,
        services: Vec<ServiceName>,
    ) -> Fut<'_, Result<(), FleetError>>;

    /// Every outlet attached to a live relay of the fleet, read from the store now (the
    /// embedded state: none). For operators' views; routing reads [`FleetView`] instead.
    fn presence(&self) -> Fut<'_, Result<Vec<Presence>, FleetError>>;

    /// Follows the members and the outlets' presence until `shutdown`, sending every change
    /// to `tx`; keeps the last view while the store cannot be reached. The embedded state has
    /// no fleet: it returns at once, leaving the view empty.
    fn follow_fleet(
        self: Arc<Self>,
        tx: watch::Sender<FleetView>,
        shutdown: CancellationToken,
    ) -> Fut<'static, ()>;
}
