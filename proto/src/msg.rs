//! Control-plane and stream-header messages.
//!
//! Every control exchange runs on its own QUIC bidirectional stream: the opener writes one
//! [`Ctl`] frame, finishes its side, and reads one [`Ctl`] frame back. Node to relay:
//! `Register`, `RouteRequest`, `Heartbeat`, `ServiceHealth` (outlet); relay to node: `RouteOpen`
//! (to the outlet, before the inlet is told), `RouteClosed` and `RouteRetired` (to an inlet). Answers are `Registered`, `RouteGranted`, `RouteRefused`,
//! `HeartbeatAck`, `Ack` and `Refused` (with a typed [`Refusal`]).

use crate::fwd::RouteId;
use crate::name::{NodeName, ServiceName};
use serde::{Deserialize, Serialize};
use std::fmt;

/// One control message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ctl {
    /// Outlet -> relay: I serve these services (replaces any earlier registration).
    Register { services: Vec<ServiceName> },
    /// Relay -> outlet: registration accepted for these services.
    Registered { services: Vec<ServiceName> },
    /// Inlet -> relay: give me a route to an outlet serving `service`.
    RouteRequest { service: ServiceName },
    /// Relay -> inlet: route granted. Forward end-to-end packets with `route`; the outlet's
    /// certificate must name `outlet`.
    RouteGranted {
        route: RouteId,
        service: ServiceName,
        outlet: NodeName,
    },
    /// Relay -> inlet: no route, and why.
    RouteRefused {
        service: ServiceName,
        reason: RefuseReason,
    },
    /// Relay -> outlet: an inlet named `inlet` will connect through `route` for `service`.
    RouteOpen {
        route: RouteId,
        service: ServiceName,
        inlet: NodeName,
    },
    /// Relay -> node: this route is gone (its other end left).
    RouteClosed { route: RouteId, reason: String },
    /// Relay -> outlet: this identity was revoked; close its end-to-end connections.
    Revoked { name: NodeName },
    /// Node -> relay: sign a fresh certificate for my identity (same name and attributes) for
    /// this request's key.
    Renew { csr_pem: String },
    /// Relay -> node: the renewed certificate.
    Renewed { cert_pem: String },
    /// Either way: liveness probe.
    Heartbeat { seq: u64 },
    /// Answer to `Heartbeat`.
    HeartbeatAck { seq: u64 },
    /// Generic positive answer (to `RouteOpen`, `RouteClosed`).
    Ack,
    /// Negative answer: the request was not understood or not allowed, and why (typed, so the
    /// asking side can tell a permanent refusal from a transient one).
    Refused { reason: Refusal },
    /// Outlet -> relay: also take connections for these services (registered with `Register`
    /// first) at the relay's public hostname ingress, `https://<service>.<relay-domain>`.
    /// Answered by `Registered` with the services accepted, or `Refused`.
    RegisterPublic { services: Vec<ServiceName> },
    /// Relay -> outlet, first frame of a stream the relay opens: a client reached the public
    /// ingress asking for `service` (`client` is its address, for logs). After this frame the
    /// stream carries the client's bytes unchanged, its TLS ClientHello first, both ways; the
    /// outlet terminates TLS. Never answered with a frame.
    PublicStream {
        service: ServiceName,
        client: String,
    },
    /// Relay -> inlet: an outlet of `service` has (re)registered. Sent to the inlets that were
    /// refused a route to it for want of a live outlet, so that they ask again now instead of
    /// after their back-off. Answered by `Ack`.
    OutletBack { service: ServiceName },
    /// Relay -> node, after it granted `route`: where the route's other end may be reached
    /// directly (the address its control connection comes from, as the relay sees it). The
    /// nodes may then find a direct path and move their end-to-end connection onto it (see
    /// the net crate's `transport::direct`). Answered by `Ack`; a node that keeps to the
    /// relay ignores it.
    PeerCandidates {
        route: RouteId,
        candidates: Vec<std::net::SocketAddr>,
    },
    /// Relay -> node: the live relays of the relay's fleet (sent once the control connection
    /// is up and whenever the fleet's membership changes; never by a relay without a fleet).
    /// Nodes bootstrap from their configured relays and learn the rest from this, so relays
    /// come and go without reconfiguring any node. Answered by `Ack`.
    Relays { relays: Vec<FleetRelay> },
    /// Relay -> inlet, answer to `RouteRequest`: no outlet of `service` is attached here, but
    /// outlets of it are attached to these relays (`host:port`, one per relay): ask one of
    /// them (opening a control connection to it first).
    RouteRedirect {
        service: ServiceName,
        relays: Vec<String>,
    },
    /// Outlet -> relay: whether this outlet can serve `service` now (its target answers its
    /// checks), and why not (`reason`, for logs and the inlet's 503). Sent on each change and
    /// after each (re)registration. A relay routes new connections only to outlets whose
    /// service is healthy; an outlet that never sends this counts as healthy. Answered by
    /// `Ack` (an older relay answers `Refused`).
    ServiceHealth {
        service: ServiceName,
        healthy: bool,
        reason: String,
    },
    /// Relay -> inlet: stop opening new streams on `route` (its outlet cannot serve the
    /// service now: `reason`) and ask for a new route on the next client connection; streams
    /// already open on it finish. Answered by `Ack` (an older inlet answers `Refused`, and
    /// the relay closes the route instead).
    RouteRetired { route: RouteId, reason: String },
    /// Inlet -> relay: the end-to-end connection of `route` now runs over a direct path
    /// between the two nodes (`direct`), or through the relay again. The relay cannot see
    /// the end-to-end traffic, so this is how its status and admin API tell direct routes
    /// from relayed ones; it takes the report only from the route's inlet (which decides the
    /// move) and changes nothing else. Answered by `Ack` (an older relay answers `Refused`).
    RoutePath { route: RouteId, direct: bool },
    /// Node -> relay, once its control connection is up over UDP: the addresses its UDP socket
    /// has on its own network (behind any NAT), so that two nodes behind the same NAT can go
    /// direct without the router hairpinning. The relay passes them in `PeerCandidates` only
    /// to a peer whose public address has the same IP (the same site), and bounds how many.
    /// Answered by `Ack` (an older relay answers `Refused`).
    LocalCandidates { addrs: Vec<std::net::SocketAddr> },
    /// Outlet -> relay (the authority): sign a certificate for the public hostname
    /// `hostname` (`<service>.<relay's public domain>`) of `service`, which this outlet offers
    /// publicly, for this request's key. The outlet made the key pair and keeps the private
    /// key; only the request travels. Granted only to an outlet the policy allows to register
    /// `service`. Answered by `PublicCertIssued` or `Refused`.
    PublicCertRequest {
        service: ServiceName,
        hostname: String,
        csr_pem: String,
    },
    /// Relay -> outlet: the certificate for the hostname asked for (server authentication
    /// only, signed by the project CA).
    PublicCertIssued { cert_pem: String },
}

/// A relay of a fleet, as nodes learn it (see [`Ctl::Relays`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FleetRelay {
    /// Unique in the fleet; what an outlet's home relays are chosen by, so that a relay
    /// keeps its share of outlets when its address changes.
    pub name: String,
    /// Where nodes reach it (`host:port`), the first preferred.
    pub addresses: Vec<String>,
}

/// Why the relay refused a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    /// No outlet ever registered this service.
    UnknownService,
    /// Outlets registered it, but none is connected now.
    NoLiveOutlet,
    /// Policy does not allow this node to reach the service.
    NotAllowed,
    /// The outlets tried refused the route; the last one's reason (e.g. it is shutting down).
    OutletRefused(Refusal),
    /// No outlet tried answered the route opening in time (or it answered something else).
    OutletUnresponsive,
    /// Outlets of the service are connected, but none can reach its target now; `reason` is
    /// what their checks said (e.g. `connect to 10.0.0.5:8086 failed: Connection refused`).
    NoHealthyOutlet { reason: String },
}

impl fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefuseReason::UnknownService => f.write_str("no outlet serves this service"),
            RefuseReason::NoLiveOutlet => f.write_str("no outlet for this service is connected"),
            RefuseReason::NotAllowed => f.write_str("not allowed by the relay's policy"),
            RefuseReason::OutletRefused(why) => write!(f, "the outlet refused the route: {why}"),
            RefuseReason::OutletUnresponsive => {
                f.write_str("no outlet for this service answered the relay in time")
            }
            RefuseReason::NoHealthyOutlet { reason } => {
                write!(
                    f,
                    "no outlet for this service can reach its target ({reason})"
                )
            }
        }
    }
}

/// Why a control request was refused, typed so that the other side can act on it (a permanent
/// refusal is retried every few minutes, a transient one at once) and metrics can count each
/// reason. The `Display` text is what logs and `/readyz` show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Refusal {
    /// The relay has no record of the asking connection's node (it raced a disconnect).
    UnknownNode,
    /// The relay's operator drained this node (`postern-relay drain`).
    Drained,
    /// The relay's policy does not allow this node (with `attrs`, from its certificate) to do
    /// `action` (`register`, `register_public`) for `service`; `rule` is the deciding rule (or
    /// the default deny).
    NotAllowed {
        action: String,
        service: ServiceName,
        attrs: crate::policy::Attributes,
        rule: String,
    },
    /// The answering side is shutting down; another relay or outlet may serve.
    ShuttingDown,
    /// This relay does not hold the authority's key, so it cannot renew certificates.
    NoAuthority,
    /// The authority refused to renew this identity's certificate (e.g. it was revoked).
    RenewalRefused { why: String },
    /// The outlet was asked to open a route for a service it does not serve.
    NotServed { service: ServiceName },
    /// The request could not be read (malformed, or it did not arrive in time).
    BadMessage { detail: String },
    /// A message that is not a request this side answers.
    Unexpected,
    /// The answering side failed internally; trying again may work.
    Internal,
    /// The authority will not sign a certificate for public hostname `hostname`, and why
    /// (the relay has no public domain, or the name is not `<service>.<its domain>`).
    PublicCertRefused { hostname: String, why: String },
}

impl Refusal {
    /// Whether retrying soon cannot help until an operator acts (policy, drain, revocation,
    /// a relay without the authority).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Refusal::Drained
                | Refusal::NotAllowed { .. }
                | Refusal::NoAuthority
                | Refusal::RenewalRefused { .. }
                | Refusal::PublicCertRefused { .. }
        )
    }

    /// A short stable name for metrics labels and structured logs.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::UnknownNode => "unknown_node",
            Refusal::Drained => "drained",
            Refusal::NotAllowed { .. } => "not_allowed",
            Refusal::ShuttingDown => "shutting_down",
            Refusal::NoAuthority => "no_authority",
            Refusal::RenewalRefused { .. } => "renewal_refused",
            Refusal::NotServed { .. } => "not_served",
            Refusal::BadMessage { .. } => "bad_message",
            Refusal::Unexpected => "unexpected",
            Refusal::Internal => "internal",
            Refusal::PublicCertRefused { .. } => "public_cert_refused",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::UnknownNode => f.write_str("the relay does not know this node (reconnect)"),
            Refusal::Drained => f.write_str("this node is drained by the relay operator"),
            Refusal::NotAllowed {
                action,
                service,
                attrs,
                rule,
            } => {
                let verb = match action.as_str() {
                    "register_public" => "offer publicly",
                    "public_cert" => "get a public hostname certificate for",
                    "register" => "register",
                    other => other,
                };
                let attrs = if attrs.is_empty() {
                    "no attributes".to_owned()
                } else {
                    let list: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    format!("attributes {}", list.join(", "))
                };
                write!(
                    f,
                    "the relay's policy does not allow this node ({attrs}) to {verb} {service} \
                     (rule: {rule})"
                )
            }
            Refusal::ShuttingDown => f.write_str("shutting down"),
            Refusal::NoAuthority => f.write_str(
                "this relay is not the authority: certificates are renewed by the relay \
                 (authority) the node enrolled with",
            ),
            Refusal::RenewalRefused { why } => write!(f, "renewal refused: {why}"),
            Refusal::NotServed { service } => write!(f, "this outlet does not serve {service}"),
            Refusal::BadMessage { detail } => write!(f, "bad control message: {detail}"),
            Refusal::Unexpected => f.write_str("unexpected message"),
            Refusal::Internal => f.write_str("internal error; try again"),
            Refusal::PublicCertRefused { hostname, why } => {
                write!(f, "no certificate for public hostname {hostname}: {why}")
            }
        }
    }
}

/// First frame of every stream inside an end-to-end connection: what the stream is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamOpen {
    /// A client TCP connection to `service`; raw bytes follow in both directions.
    Connect { service: ServiceName },
    /// The inlet wants the leased credential for `service`; the outlet answers with a
    /// [`LeaseMsg`] frame now and another each time the lease is renewed.
    Lease { service: ServiceName },
    /// The client asks for its own credential for `service` (`postern-inlet lease create|show`):
    /// with `fresh`, a new lease; without, the one last handed out. The outlet answers with one
    /// [`HandOutMsg`] frame and finishes the stream.
    HandOut { service: ServiceName, fresh: bool },
    /// `Connect`, also saying where the client connection came from (`client`, its peer
    /// address at the inlet) and which inlet address it reached (`local`). Sent only on
    /// connections that negotiated [`crate::ALPN_E2E_V2`] (an older outlet does not know this
    /// variant). For the outlet this is the inlet's claim, used for the PROXY protocol header it
    /// may send its target; the client's identity there comes from the outlet's own knowledge.
    ConnectFrom {
        service: ServiceName,
        client: std::net::SocketAddr,
        local: std::net::SocketAddr,
    },
}

/// The outlet's answer on a [`StreamOpen::HandOut`] stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandOutMsg {
    /// The client's credential, and the lease profile it was made with.
    Granted {
        grant: crate::lease::LeaseGrant,
        profile: String,
    },
    /// Refused or failed, and why (never a secret).
    Refused { reason: String },
}

/// Frames the outlet sends on a lease stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseMsg {
    /// The current lease (a new one replaces the previous one at once).
    Grant(crate::lease::LeaseGrant),
    /// No lease can be had right now, and why (e.g. the backend is down).
    Unavailable { reason: String },
    /// The outlet puts this client's leased credential into its requests itself
    /// (`inject-at = "outlet"`): the credential never leaves the private network. The inlet
    /// sends requests with no credential at all.
    AtOutlet,
    /// This client gets no lease for who it is (no lease profile matches its identity), and
    /// why: its requests are answered 403 rather than 503, and it need not ask again soon.
    Refused { reason: String },
}

/// Application error codes used to reset streams and close connections, so the other side can
/// log *why* without a round trip.
pub mod code {
    /// Normal close.
    pub const OK: u32 = 0;
    /// The stream header named a service this outlet does not serve.
    pub const UNKNOWN_SERVICE: u32 = 1;
    /// The outlet could not connect to the service's target.
    pub const TARGET_UNREACHABLE: u32 = 2;
    /// The client or target connection was reset.
    pub const RESET: u32 = 3;
    /// The stream header was missing or malformed.
    pub const BAD_HEADER: u32 = 4;
    /// The peer is not allowed.
    pub const NOT_ALLOWED: u32 = 5;
    /// The node is shutting down.
    pub const SHUTDOWN: u32 = 6;
    /// The route through the relay was closed.
    pub const ROUTE_CLOSED: u32 = 7;
    /// The relay's operator drained this node: it gets no new routes and must go elsewhere
    /// (or wait until it is let back in).
    pub const DRAINED: u32 = 8;

    /// Human-readable meaning of a code, for logs.
    pub fn describe(code: u64) -> &'static str {
        match code {
            0 => "closed",
            1 => "the outlet does not serve this service",
            2 => "the outlet could not reach the service's target",
            3 => "the connection was reset",
            4 => "malformed stream header",
            5 => "not allowed",
            6 => "shutting down",
            7 => "route closed",
            8 => "drained by the relay's operator",
            _ => "unknown error code",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn not_allowed() -> Refusal {
        Refusal::NotAllowed {
            action: "register".into(),
            service: ServiceName::new("influxdb").expect("name"),
            attrs: [("role".to_owned(), "guest".to_owned())].into(),
            rule: "default deny (no policy allows it)".into(),
        }
    }

    /// What an operator reads names the attributes, the service and the rule.
    #[test]
    fn a_policy_refusal_says_who_what_and_which_rule() {
        assert_eq!(
            not_allowed().to_string(),
            "the relay's policy does not allow this node (attributes role=guest) to register \
             influxdb (rule: default deny (no policy allows it))"
        );
    }

    /// Only what an operator must fix is permanent; the rest is worth asking again at once.
    #[test]
    fn permanent_and_transient_refusals() {
        let permanent = [
            not_allowed(),
            Refusal::Drained,
            Refusal::NoAuthority,
            Refusal::RenewalRefused {
                why: "revoked".into(),
            },
        ];
        let transient = [
            Refusal::UnknownNode,
            Refusal::ShuttingDown,
            Refusal::Internal,
            Refusal::BadMessage { detail: "x".into() },
        ];
        for r in &permanent {
            assert!(r.is_permanent(), "{r:?}");
        }
        for r in &transient {
            assert!(!r.is_permanent(), "{r:?}");
        }
        let labels: std::collections::BTreeSet<_> = permanent
            .iter()
            .chain(&transient)
            .map(Refusal::label)
            .collect();
        assert_eq!(labels.len(), 8, "each reason has its own label: {labels:?}");
    }

    /// The health messages and the client's address survive the wire.
    #[test]
    fn health_and_connect_from_round_trip() {
        let msgs = [
            Ctl::ServiceHealth {
                service: ServiceName::new("web").expect("name"),
                healthy: false,
                reason: "connect to 10.0.0.5:80 failed".into(),
            },
            Ctl::RouteRefused {
                service: ServiceName::new("web").expect("name"),
                reason: RefuseReason::NoHealthyOutlet {
                    reason: "o1: timed out".into(),
                },
            },
        ];
        for msg in msgs {
            let frame = crate::codec::to_frame(&msg).expect("encode");
            assert_eq!(crate::codec::decode_exact::<Ctl>(&frame), Ok(msg));
        }
        let open = StreamOpen::ConnectFrom {
            service: ServiceName::new("web").expect("name"),
            client: "[2001:db8::1]:40000".parse().expect("addr"),
            local: "127.0.0.1:8080".parse().expect("addr"),
        };
        let frame = crate::codec::to_frame(&open).expect("encode");
        assert_eq!(crate::codec::decode_exact::<StreamOpen>(&frame), Ok(open));
        assert_eq!(
            RefuseReason::NoHealthyOutlet {
                reason: "o1: timed out".into()
            }
            .to_string(),
            "no outlet for this service can reach its target (o1: timed out)"
        );
    }

    /// The public certificate exchange survives the wire, and its refusals are permanent.
    #[test]
    fn public_certificate_messages_round_trip() {
        let msgs = [
            Ctl::PublicCertRequest {
                service: ServiceName::new("web").expect("name"),
                hostname: "web.relay.example.com".into(),
                csr_pem: "-----BEGIN CERTIFICATE REQUEST-----".into(),
            },
            Ctl::PublicCertIssued {
                cert_pem: "-----BEGIN CERTIFICATE-----".into(),
            },
            Ctl::Refused {
                reason: Refusal::PublicCertRefused {
                    hostname: "web.other.example".into(),
                    why: "not under this relay's public domain".into(),
                },
            },
        ];
        for msg in msgs {
            let frame = crate::codec::to_frame(&msg).expect("encode");
            assert_eq!(crate::codec::decode_exact::<Ctl>(&frame), Ok(msg));
        }
        let refused = Refusal::PublicCertRefused {
            hostname: "web.other.example".into(),
            why: "no".into(),
        };
        assert!(refused.is_permanent());
        assert_eq!(
            refused.to_string(),
            "no certificate for public hostname web.other.example: no"
        );
    }

    /// A refusal survives the wire with its reason intact.
    #[test]
    fn refusals_round_trip() {
        let msg = Ctl::Refused {
            reason: not_allowed(),
        };
        let frame = crate::codec::to_frame(&msg).expect("encode");
        let back: Ctl = crate::codec::decode_exact(&frame).expect("decode");
        assert_eq!(back, msg);
    }
}
