//! The relay's state as JSON documents: filled by the server, carried by the admin API
//! (`/v1/...`) and read back by its client (`postern-relay status`).
//! Ticket views carry no secret and no secret hash; nothing here carries key material.

use postern_proto::name::{NodeName, ServiceName};
use postern_proto::policy::Attributes;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// A node with a live control connection (`GET /v1/nodes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: NodeName,
    /// The `role` attribute of its certificate, if any.
    pub role: Option<String>,
    /// All attributes of its certificate.
    pub attributes: Attributes,
    /// SHA-256 of its certificate (DER), hex.
    pub fingerprint: Option<String>,
    pub remote_addr: SocketAddr,
    /// When this control connection came up (Unix milliseconds).
    pub connected_at_ms: u64,
    pub connected_for_s: u64,
    /// Services it is a live outlet of.
    pub services: Vec<ServiceName>,
    /// Routes it is an end of.
    pub routes: usize,
    /// The operator drained it: no new routes, closed once its routes end or the drain ends.
    pub drained: bool,
}

/// `GET /v1/nodes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Nodes {
    pub nodes: Vec<NodeView>,
}

/// A service and its live outlets (`GET /v1/services`); a service whose outlets all left is
/// listed with none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: ServiceName,
    pub outlets: Vec<NodeName>,
    /// Each live outlet's target health as it reports it (an outlet that does not report
    /// counts as healthy). Absent from an older relay's answer.
    #[serde(default)]
    pub health: Vec<OutletHealthView>,
}

/// One outlet of a service and whether it can reach the service's target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutletHealthView {
    pub outlet: NodeName,
    pub healthy: bool,
    /// Why not, as its checks said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `GET /v1/services`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Services {
    pub services: Vec<ServiceView>,
}

/// One route between an inlet and an outlet (`GET /v1/routes`): it carries one end-to-end
/// connection, whose streams the relay cannot see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteView {
    /// The route id, hex.
    pub id: String,
    pub service: ServiceName,
    pub inlet: NodeName,
    pub outlet: NodeName,
    /// Forwarded bytes (whole frames) the inlet sent.
    pub bytes_from_inlet: u64,
    /// Forwarded bytes (whole frames) the outlet sent.
    pub bytes_from_outlet: u64,
    pub packets: u64,
    pub age_s: u64,
    /// Whether its inlet reported the end-to-end connection on a direct path between the
    /// nodes (then the relay forwards little or nothing of it; it stays the fallback).
    /// Absent from an older relay's answer.
    #[serde(default)]
    pub direct: bool,
}

/// `GET /v1/routes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Routes {
    pub routes: Vec<RouteView>,
}

/// An enrollment ticket, without its secret or the secret's hash (`GET /v1/tickets`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketView {
    pub id: String,
    pub attributes: Attributes,
    /// The node name it fixes, if any.
    pub name: Option<NodeName>,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub uses_left: u32,
    pub used_by: Vec<NodeName>,
    /// `valid`, `used` or `expired`.
    pub status: String,
}

/// `GET /v1/tickets`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tickets {
    /// Whether this relay runs the authority; without it there are no tickets here.
    pub authority: bool,
    pub tickets: Vec<TicketView>,
}

/// An enrolled or revoked identity (`GET /v1/identities`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityView {
    pub name: NodeName,
    pub attributes: Attributes,
    /// When it enrolled (Unix milliseconds); absent for names revoked without enrolling here.
    pub enrolled_at_ms: Option<u64>,
    pub revoked: bool,
    /// Whether a node with this name has a live control connection.
    pub connected: bool,
}

/// `GET /v1/identities`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Identities {
    pub authority: bool,
    pub identities: Vec<IdentityView>,
}

/// Answer to `POST /v1/identities/{name}/revoke`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub revoked: NodeName,
    /// Written to the authority's identity list (survives restarts). False on a relay without
    /// the authority: the revocation lasts until this relay restarts; revoke at the authority.
    pub persisted: bool,
    /// A node with this name was connected and has been cut off.
    pub was_connected: bool,
}

/// Answer to `POST /v1/nodes/{name}/drain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Draining {
    pub draining: NodeName,
    /// Services it no longer gets routes for.
    pub services: Vec<ServiceName>,
    /// Routes it is an end of; they keep forwarding until they end or the drain timeout.
    pub open_routes: usize,
    /// The control connection is closed at the latest after this long.
    pub timeout_ms: u64,
}

/// Answer to `POST /v1/nodes/{name}/undrain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Undrained {
    pub undrained: NodeName,
    /// Whether it was drained.
    pub was_drained: bool,
}

/// Every error answer: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// A relay of the fleet (`GET /v1/fleet`), as it last registered itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayView {
    pub name: String,
    /// Where nodes reach it (`host:port`).
    pub addresses: Vec<String>,
    /// Nodes with a control connection to it, and routes it forwards, when it last reported.
    pub nodes: u64,
    pub routes: u64,
    /// How long ago it last reported (its load is refreshed a few times per lease TTL).
    pub updated_age_ms: u64,
    /// The relay that answered.
    pub this: bool,
}

/// Where an outlet is attached (`GET /v1/fleet`): the relays holding its control
/// connection, and what it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentView {
    pub outlet: NodeName,
    pub relays: Vec<String>,
    pub services: Vec<ServiceName>,
}

/// `GET /v1/fleet`: the relays of the fleet and where outlets are attached. Without a
/// cluster the fleet is this one relay.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetView {
    /// Where the shared state lives (`etcd [...] under /postern`, or the state directory).
    pub state: String,
    /// Whether the relay keeps its shared state in an etcd cluster.
    pub cluster: bool,
    /// Whether etcd answers the relay's follower; `None` without a cluster.
    pub connected: Option<bool>,
    /// The relays, by name.
    pub relays: Vec<RelayView>,
    /// Why the relays could not be listed (etcd unavailable): the rest still holds.
    pub relays_error: Option<String>,
    /// Outlets and the relays they are attached to, by outlet name.
    pub attachments: Vec<AttachmentView>,
    /// What `attachments` covers: `fleet` (read from the shared state), `this-relay` (the
    /// outlets connected to the relay that answered), or `none`.
    pub attachments_scope: String,
    /// Failed etcd requests by operation (empty without a cluster).
    pub etcd_failures: std::collections::BTreeMap<String, u64>,
    /// The last etcd failure's message and age, if any.
    pub last_etcd_error: Option<String>,
    pub last_etcd_error_age_s: Option<u64>,
}
