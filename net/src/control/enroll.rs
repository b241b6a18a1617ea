//! Enrolling a node with a ticket, and the node's enrolled state on disk.
//!
//! The node makes its key pair here and sends only a certificate request: the private key never
//! leaves the machine. The relay is verified against the CA fingerprint in the ticket before
//! anything is sent. The result is written to the node's state directory (key mode 0600), so a
//! restart needs no new ticket.

use crate::control::exchange::{self, CtlError};
use crate::runtime::clock::now_ms;
use crate::runtime::files::{self, FileError};
use crate::transport::endpoint::{self, EndpointError};
use postern_proto::name::NodeName;
use postern_proto::pki::make_csr;
use postern_proto::ticket::{EnrollRefusal, EnrollRequest, EnrollResponse, Ticket, TicketError};
use serde::{Deserialize, Serialize};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Why enrollment failed. Messages say what to do; none contains the ticket secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    #[error(transparent)]
    Ticket(#[from] TicketError),
    #[error("cannot resolve the address of the relay (authority) {0:?}")]
    Resolve(String),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("cannot reach the relay (authority) at {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("enrollment exchange with the relay (authority) at {addr} failed: {source}")]
    Exchange { addr: SocketAddr, source: CtlError },
    #[error("the relay (authority) at {addr} refused the ticket: {reason}")]
    Refused {
        addr: SocketAddr,
        reason: EnrollRefusal,
    },
    #[error("certificate request: {0}")]
    Csr(#[from] postern_proto::pki::PkiError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("the relay (authority) at {addr} did not answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
}

impl EnrollError {
    /// Whether enrolling again with the same ticket cannot succeed (a used, expired, unknown or
    /// altered ticket, a relay that is not the one the ticket trusts, a local fault), as
    /// opposed to a relay that is down, unreachable or busy for now.
    pub fn is_permanent(&self) -> bool {
        match self {
            EnrollError::Resolve(_)
            | EnrollError::Connect { .. }
            | EnrollError::Exchange { .. }
            | EnrollError::Timeout { .. } => false,
            EnrollError::Refused { reason, .. } => reason.is_permanent(),
            EnrollError::Ticket(_)
            | EnrollError::Endpoint(_)
            | EnrollError::Csr(_)
            | EnrollError::File(_) => true,
        }
    }
}

/// How long enrollment may take.
pub const ENROLL_TIMEOUT: Duration = Duration::from_secs(20);

/// What a node knows after enrolling (written to its state directory).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct NodeInfo {
    pub name: NodeName,
    pub attrs: postern_proto::policy::Attributes,
    pub relays: Vec<String>,
    pub relay_name: String,
}

/// Files of an enrolled node.
#[derive(Debug, Clone)]
pub struct NodeState {
    dir: PathBuf,
}

impl NodeState {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join("node.pem")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join("node.key")
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn info_path(&self) -> PathBuf {
        self.dir.join("node.json")
    }

    /// True when the node has enrolled.
    pub fn is_enrolled(&self) -> bool {
        self.cert().exists() && self.key().exists() && self.ca().exists()
    }

    /// What the node learned at enrollment.
    pub fn info(&self) -> Result<NodeInfo, FileError> {
        let text = files::read(&self.info_path())?;
        serde_json::from_str(&text).map_err(|e| FileError::Config {
            path: self.info_path(),
            message: e.to_string(),
        })
    }
}

/// Enrolls with `ticket` (asking for `name` unless the ticket fixes one) and saves the result
/// in `state`.
pub async fn enroll(
    ticket: &Ticket,
    name: &NodeName,
    state: &NodeState,
) -> Result<NodeInfo, EnrollError> {
    ticket.check_expiry(now_ms())?;
    let addr = ticket
        .authority
        .to_socket_addrs()
        .map_err(|_| EnrollError::Resolve(ticket.authority.clone()))?
        .next()
        .ok_or_else(|| EnrollError::Resolve(ticket.authority.clone()))?;
    let asked = ticket.name.clone().unwrap_or_else(|| name.clone());
    let (csr_pem, key) = make_csr(&asked)?;
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0"
            .parse()
            .map_err(|_| EnrollError::Resolve("[::]:0".into()))?
    } else {
        "0.0.0.0:0"
            .parse()
            .map_err(|_| EnrollError::Resolve("0.0.0.0:0".into()))?
    };
    let socket = std::net::UdpSocket::bind(bind).map_err(|e| EnrollError::Connect {
        addr,
        reason: e.to_string(),
    })?;
    let ep = quinn::Endpoint::new(
        endpoint::endpoint_config(None),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| EnrollError::Connect {
        addr,
        reason: e.to_string(),
    })?;
    let client = endpoint::enroll_client(&ticket.ca_fingerprint)?;
    let exchange = async {
        let conn = ep
            .connect_with(client, addr, &ticket.relay_name)
            .map_err(|e| EnrollError::Connect {
                addr,
                reason: e.to_string(),
            })?
            .await
            .map_err(|e| EnrollError::Connect {
                addr,
                reason: e.to_string(),
            })?;
        let failed = |source: CtlError| match conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c))
                if c.reason.as_ref() == postern_proto::ticket::CLOSE_NO_AUTHORITY =>
            {
                EnrollError::Refused {
                    addr,
                    reason: EnrollRefusal::NotAuthority,
                }
            }
            _ => EnrollError::Exchange { addr, source },
        };
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| failed(CtlError::from(e)))?;
        let req = EnrollRequest {
            ticket_id: ticket.id.clone(),
            secret: ticket.secret.clone(),
            csr_pem,
            name: asked,
            attrs: ticket.attrs.clone(),
        };
        exchange::write_message(&mut send, &req)
            .await
            .map_err(failed)?;
        let answer: EnrollResponse = exchange::read_message(&mut recv).await.map_err(failed)?;
        conn.close(0u32.into(), b"enrolled");
        Ok::<_, EnrollError>(answer)
    };
    let answer = tokio::time::timeout(ENROLL_TIMEOUT, exchange)
        .await
        .map_err(|_| EnrollError::Timeout {
            addr,
            timeout: ENROLL_TIMEOUT,
        })??;
    ep.wait_idle().await;
    let (name, attrs, cert_pem, ca_pem) = match answer {
        EnrollResponse::Enrolled {
            name,
            attrs,
            cert_pem,
            ca_pem,
        } => (name, attrs, cert_pem, ca_pem),
        EnrollResponse::Refused { reason } => return Err(EnrollError::Refused { addr, reason }),
    };
    files::private_dir(state.dir())?;
    files::write(&state.key(), key.0.as_bytes(), true)?;
    files::write(&state.cert(), cert_pem.as_bytes(), true)?;
    files::write(&state.ca(), ca_pem.as_bytes(), true)?;
    let info = NodeInfo {
        name,
        attrs,
        relays: ticket.relays.clone(),
        relay_name: ticket.relay_name.clone(),
    };
    let json = serde_json::to_vec_pretty(&info).map_err(|e| FileError::Config {
        path: state.info_path(),
        message: e.to_string(),
    })?;
    files::write(&state.info_path(), &json, true)?;
    Ok(info)
}

/// First wait before enrolling again after the relay (authority) could not be reached.
pub const ENROLL_RETRY_BASE: Duration = Duration::from_secs(1);
/// Longest wait between enrollment attempts.
pub const ENROLL_RETRY_MAX: Duration = Duration::from_secs(60);

/// Enrolls as [`enroll`] does, but keeps trying (with back-off, each failure logged with the
/// wait before the next attempt) while the relay (authority) is down, unreachable or busy, so a
/// node started with a ticket before its relay is up comes up by itself. A refusal that
/// retrying cannot change (see [`EnrollError::is_permanent`]) is returned at once; `None` when
/// `shutdown` came first.
pub async fn enroll_retrying(
    ticket: &Ticket,
    name: &NodeName,
    state: &NodeState,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<Option<NodeInfo>, EnrollError> {
    let mut backoff = crate::runtime::backoff::Backoff::new(ENROLL_RETRY_BASE, ENROLL_RETRY_MAX);
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            r = enroll(ticket, name, state) => r,
        };
        match attempt {
            Ok(info) => return Ok(Some(info)),
            Err(e) if e.is_permanent() => return Err(e),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(retry_in = ?delay, "enrollment failed: {e}; retrying in {delay:?}");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 4433))
    }

    /// A relay that is down or slow is waited for; a ticket the authority turned down for good
    /// is not tried again.
    #[test]
    fn only_a_relay_that_cannot_be_reached_is_tried_again() {
        let retried = [
            EnrollError::Connect {
                addr: addr(),
                reason: "timed out".into(),
            },
            EnrollError::Timeout {
                addr: addr(),
                timeout: ENROLL_TIMEOUT,
            },
            EnrollError::Refused {
                addr: addr(),
                reason: EnrollRefusal::Unavailable,
            },
        ];
        for e in &retried {
            assert!(!e.is_permanent(), "{e}");
        }
        let final_ = [
            EnrollRefusal::Used,
            EnrollRefusal::UnknownTicket,
            EnrollRefusal::Expired { secs_ago: 3 },
            EnrollRefusal::NotAuthority,
        ];
        for reason in final_ {
            let e = EnrollError::Refused {
                addr: addr(),
                reason,
            };
            assert!(e.is_permanent(), "{e}");
        }
        assert!(EnrollError::Ticket(TicketError::Expired(3)).is_permanent());
    }

    /// Every message about the authority says which relay it is.
    #[test]
    fn messages_name_the_relay_authority() {
        let e = EnrollError::Refused {
            addr: addr(),
            reason: EnrollRefusal::Used,
        };
        assert_eq!(
            e.to_string(),
            "the relay (authority) at 127.0.0.1:4433 refused the ticket: ticket already used; \
             tickets are single-use unless created with --uses"
        );
        let e = EnrollError::Connect {
            addr: addr(),
            reason: "timed out".into(),
        };
        assert!(e
            .to_string()
            .starts_with("cannot reach the relay (authority) at 127.0.0.1:4433"));
    }
}
