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
use postern_proto::ticket::{EnrollRequest, EnrollResponse, Ticket, TicketError};
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
    #[error("cannot resolve the authority address {0:?}")]
    Resolve(String),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("cannot reach the authority at {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("enrollment exchange failed: {0}")]
    Exchange(#[from] CtlError),
    #[error("the authority refused the ticket: {0}")]
    Refused(String),
    #[error("certificate request: {0}")]
    Csr(#[from] postern_proto::pki::PkiError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("the authority did not answer within {0:?}")]
    Timeout(Duration),
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
        let (mut send, mut recv) = conn.open_bi().await.map_err(CtlError::from)?;
        let req = EnrollRequest {
            ticket_id: ticket.id.clone(),
            secret: ticket.secret.clone(),
            csr_pem,
            name: asked,
            attrs: ticket.attrs.clone(),
        };
        exchange::write_message(&mut send, &req).await?;
        let answer: EnrollResponse = exchange::read_message(&mut recv).await?;
        conn.close(0u32.into(), b"enrolled");
        Ok::<_, EnrollError>(answer)
    };
    let answer = tokio::time::timeout(ENROLL_TIMEOUT, exchange)
        .await
        .map_err(|_| EnrollError::Timeout(ENROLL_TIMEOUT))??;
    ep.wait_idle().await;
    let (name, attrs, cert_pem, ca_pem) = match answer {
        EnrollResponse::Enrolled {
            name,
            attrs,
            cert_pem,
            ca_pem,
        } => (name, attrs, cert_pem, ca_pem),
        EnrollResponse::Refused { reason } => return Err(EnrollError::Refused(reason)),
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
