//! Why an inlet could not start, and why a client connection could not be served (with the
//! explanation a client and the log get).

use postern_net::control::exchange::CtlError;
use postern_net::transport::relay_path::TransportStatus;
use postern_net::uplink::UplinkError;
use postern_proto::msg::RefuseReason;
use postern_proto::name::{NodeName, ServiceName};
use std::net::SocketAddr;

/// Why an inlet could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InletError {
    #[error(transparent)]
    Uplink(#[from] UplinkError),
    #[error("cannot listen on {addr} for {service}: {source}")]
    Listen {
        service: ServiceName,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Why a client connection could not be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error("the relay is not reachable")]
    NoRelay,
    #[error("route refused by the relay: {0}")]
    Refused(postern_proto::msg::RefuseReason),
    #[error("control request failed: {0}")]
    Control(#[from] CtlError),
    /// The relay refused the request itself (it is shutting down, or drained this node): another
    /// relay may serve it.
    #[error("the relay refused the route request: {0}")]
    RelayRefused(postern_proto::msg::Refusal),
    #[error("unexpected answer from the relay")]
    Unexpected,
    #[error("end-to-end connection to outlet {outlet} failed: {reason}")]
    E2e { outlet: String, reason: String },
    #[error("cannot open a stream: {0}")]
    Stream(String),
    #[error("relay {relay} routes to another outlet ({outlet}) than the connection's")]
    OtherOutlet { relay: SocketAddr, outlet: NodeName },
}

impl ServeError {
    /// Why `service` cannot be reached, worded for the client (the 503 body) and the log: the
    /// cause and what to check next. `transports` tells a relay's refusal of this node (its
    /// identity is revoked) from a relay that is merely unreachable. Never contains a secret.
    pub(crate) fn explain(&self, service: &ServiceName, transports: &TransportStatus) -> String {
        match self {
            ServeError::NoRelay => match transports.refusals().first() {
                Some((relay, why)) => format!(
                    "the relay {relay} refuses this inlet ({why}); its identity must be \
                     enrolled again"
                ),
                None => "the relay is not reachable from this inlet".to_owned(),
            },
            ServeError::Refused(RefuseReason::NotAllowed) => {
                format!("the relay's policy does not allow this inlet to reach service {service}")
            }
            ServeError::Refused(RefuseReason::UnknownService) => format!(
                "no outlet serves service {service} (check the service name in the inlet's \
                 and the outlet's configuration)"
            ),
            ServeError::Refused(RefuseReason::NoLiveOutlet) => {
                format!("no outlet for service {service} is connected to the relay")
            }
            ServeError::Refused(RefuseReason::OutletRefused(why)) => {
                format!("the outlet of service {service} refused the connection: {why}")
            }
            ServeError::Refused(RefuseReason::NoHealthyOutlet { reason }) => format!(
                "no outlet of service {service} can reach its target now ({reason}); the \
                 relay routes to an outlet again as soon as one reports its target healthy"
            ),
            ServeError::Refused(RefuseReason::OutletUnresponsive) => format!(
                "the outlet of service {service} did not answer the relay in time (overloaded or stopped?)"
            ),
            other => format!("service {service} cannot be reached: {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explanations_name_the_cause_and_the_relay_that_refuses() {
        let service = ServiceName::new("influx").expect("name");
        let status = TransportStatus::default();
        assert_eq!(
            ServeError::NoRelay.explain(&service, &status),
            "the relay is not reachable from this inlet"
        );
        let relay: SocketAddr = "127.0.0.1:4433".parse().expect("addr");
        status.set_refused(relay, Some("identity revoked".into()));
        let why = ServeError::NoRelay.explain(&service, &status);
        assert!(
            why.contains("127.0.0.1:4433") && why.contains("identity revoked"),
            "{why}"
        );
        let why = ServeError::Refused(RefuseReason::UnknownService).explain(&service, &status);
        assert!(why.contains("no outlet serves service influx"), "{why}");
        let why = ServeError::Stream("closed".into()).explain(&service, &status);
        assert_eq!(
            why,
            "service influx cannot be reached: cannot open a stream: closed"
        );
        let why = ServeError::RelayRefused(postern_proto::msg::Refusal::Drained)
            .explain(&service, &status);
        assert_eq!(
            why,
            "service influx cannot be reached: the relay refused the route request: this node \
             is drained by the relay operator"
        );
        let why = ServeError::Refused(RefuseReason::OutletRefused(
            postern_proto::msg::Refusal::ShuttingDown,
        ))
        .explain(&service, &status);
        assert_eq!(
            why,
            "the outlet of service influx refused the connection: shutting down"
        );
        let why = ServeError::Refused(RefuseReason::OutletUnresponsive).explain(&service, &status);
        assert!(why.contains("did not answer the relay in time"), "{why}");
        let why = ServeError::Refused(RefuseReason::NoHealthyOutlet {
            reason: "outlet-1: connect to 10.0.0.5:8086 failed".into(),
        })
        .explain(&service, &status);
        assert!(
            why.contains("no outlet of service influx can reach its target")
                && why.contains("outlet-1: connect to 10.0.0.5:8086 failed"),
            "{why}"
        );
    }
}
