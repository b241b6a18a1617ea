//! The project authority: enrollment tickets, certificate signing, the identity list and
//! revocations. Kept in the relay's state directory; a relay without the CA key cannot mint
//! identities (see the README: running the authority apart from the relay).

use crate::state::{StateDir, StateError};
pub use postern_net::runtime::clock::now_ms;
use postern_net::runtime::files;
use postern_proto::msg::Refusal;
use postern_proto::name::NodeName;
use postern_proto::policy::Attributes;
use postern_proto::ticket::{self, EnrollRefusal, EnrollRequest, EnrollResponse, Ticket};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

/// Lifetime of certificates issued at enrollment and renewal. Nodes renew at two thirds of it
/// over their control connection, so a node offline for longer than this needs a new ticket.
pub const ENROLLED_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Default lifetime of public hostname certificates the authority issues to outlets
/// (`public-cert-validity`). Outlets renew them at two thirds of it, like node certificates.
pub const PUBLIC_CERT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);

/// The authority's record of a ticket. Holds a hash of the secret, never the secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TicketRecord {
    pub id: String,
    pub secret_sha256: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub uses_left: u32,
    pub attrs: Attributes,
    pub name: Option<NodeName>,
    pub used_by: Vec<NodeName>,
}

/// An enrolled node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityRecord {
    pub name: NodeName,
    pub attrs: Attributes,
    pub enrolled_at_ms: u64,
    pub ticket_id: String,
    pub revoked: bool,
}

/// What `ticket create` asks for.
#[derive(Debug, Clone)]
pub struct TicketSpec {
    pub attrs: Attributes,
    pub ttl: Duration,
    pub uses: u32,
    pub name: Option<NodeName>,
    pub relays: Vec<String>,
    pub authority: Option<String>,
    pub relay_name: String,
}

/// See the module docs.
#[derive(Debug)]
pub struct Authority {
    state: StateDir,
    /// Serialises ticket use, so two enrollments cannot both take a ticket's last use.
    lock: Mutex<()>,
}

impl Authority {
    pub fn new(state: StateDir) -> Self {
        Self {
            state,
            lock: Mutex::new(()),
        }
    }

    fn tickets_dir(&self) -> PathBuf {
        self.state.root().join("tickets")
    }

    fn identities_dir(&self) -> PathBuf {
        self.state.root().join("identities")
    }

    fn ticket_path(&self, id: &str) -> Option<PathBuf> {
        // Ticket ids are our own hex strings; anything else cannot name a file of ours.
        if !valid_ticket_id(id) {
            return None;
        }
        Some(self.tickets_dir().join(format!("{id}.json")))
    }

    /// Creates and stores a ticket; returns it (its string form is what a node needs).
    pub fn create_ticket(&self, spec: TicketSpec) -> Result<Ticket, StateError> {
        let ca = self.state.load_ca()?;
        let (ticket, record) = new_ticket(&ca, spec);
        self.write_ticket(&record)?;
        Ok(ticket)
    }

    fn write_ticket(&self, record: &TicketRecord) -> Result<(), StateError> {
        let path = self
            .ticket_path(&record.id)
            .ok_or_else(|| StateError::Invalid("bad ticket id".into()))?;
        let json =
            serde_json::to_vec_pretty(record).map_err(|e| StateError::Invalid(e.to_string()))?;
        files::write(&path, &json, true)?;
        Ok(())
    }

    /// All ticket records.
    pub fn tickets(&self) -> Vec<TicketRecord> {
        read_all(&self.tickets_dir())
    }

    /// All identities.
    pub fn identities(&self) -> Vec<IdentityRecord> {
        read_all(&self.identities_dir())
    }

    /// Names of revoked identities.
    pub fn revoked(&self) -> BTreeSet<NodeName> {
        self.identities()
            .into_iter()
            .filter(|i| i.revoked)
            .map(|i| i.name)
            .collect()
    }

    /// Marks `name` revoked. Returns false if no such identity was enrolled (it is revoked
    /// anyway, so a hand-issued certificate with that name is refused too).
    pub fn revoke(&self, name: &NodeName) -> Result<bool, StateError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.identities_dir().join(format!("{name}.json"));
        let (mut record, existed) = match files::read(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<IdentityRecord>(&t).ok())
        {
            Some(r) => (r, true),
            None => (
                IdentityRecord {
                    name: name.clone(),
                    attrs: Attributes::new(),
                    enrolled_at_ms: 0,
                    ticket_id: String::new(),
                    revoked: true,
                },
                false,
            ),
        };
        record.revoked = true;
        let json =
            serde_json::to_vec_pretty(&record).map_err(|e| StateError::Invalid(e.to_string()))?;
        files::write(&path, &json, true)?;
        Ok(existed)
    }

    /// Signs a renewed certificate for a connected node: same name, same attributes, new key.
    pub fn renew(
        &self,
        name: &NodeName,
        attrs: &Attributes,
        csr_pem: &str,
    ) -> Result<String, Refusal> {
        if self.revoked().contains(name) {
            return Err(Refusal::RenewalRefused {
                why: format!("identity {name} has been revoked"),
            });
        }
        let ca = self.state.load_ca().map_err(|e| {
            tracing::error!(error = %e, "cannot load the CA for renewal");
            Refusal::Internal
        })?;
        let cert = ca
            .sign_csr(csr_pem, name, attrs, ENROLLED_VALIDITY)
            .map_err(|e| Refusal::RenewalRefused {
                why: format!("certificate request refused: {e}"),
            })?;
        tracing::info!(target: "postern::audit", event = "renewal", node = %name, "certificate renewed");
        Ok(cert)
    }

    /// Signs a certificate for public hostname `hostname` for the connected outlet `name`
    /// (which the caller checked may offer it), unless `name` was revoked.
    pub fn issue_hostname(
        &self,
        name: &NodeName,
        hostname: &str,
        csr_pem: &str,
        valid_for: Duration,
    ) -> Result<String, Refusal> {
        if self.revoked().contains(name) {
            return Err(Refusal::RenewalRefused {
                why: format!("identity {name} has been revoked"),
            });
        }
        sign_hostname(&self.state, name, hostname, csr_pem, valid_for)
    }

    /// Handles one enrollment request.
    pub fn enroll(&self, req: &EnrollRequest) -> EnrollResponse {
        audit_enrollment(req, self.try_enroll(req))
    }

    /// The state directory holding the CA.
    pub fn state(&self) -> &StateDir {
        &self.state
    }

    fn try_enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse, EnrollRefusal> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let path = self
            .ticket_path(&req.ticket_id)
            .ok_or(EnrollRefusal::UnknownTicket)?;
        let mut record: TicketRecord = files::read(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .ok_or(EnrollRefusal::UnknownTicket)?;
        let now = now_ms();
        let name = check_ticket(&record, req, now)?;
        if self.revoked().contains(&name) {
            return Err(EnrollRefusal::Revoked { name });
        }
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            tracing::error!(error = %e, "cannot {what} for enrollment");
            EnrollRefusal::Unavailable
        };
        let ca = self
            .state
            .load_ca()
            .map_err(|e| unavailable("load the CA", &e))?;
        let cert_pem = ca
            .sign_csr(&req.csr_pem, &name, &record.attrs, ENROLLED_VALIDITY)
            .map_err(|e| EnrollRefusal::BadRequest {
                detail: e.to_string(),
            })?;
        record.uses_left -= 1;
        record.used_by.push(name.clone());
        self.write_ticket(&record)
            .map_err(|e| unavailable("record the ticket's use", &e))?;
        let identity = IdentityRecord {
            name: name.clone(),
            attrs: record.attrs.clone(),
            enrolled_at_ms: now,
            ticket_id: record.id.clone(),
            revoked: false,
        };
        let json = serde_json::to_vec_pretty(&identity)
            .map_err(|e| unavailable("encode the identity record", &e))?;
        files::write(
            &self.identities_dir().join(format!("{name}.json")),
            &json,
            true,
        )
        .map_err(|e| unavailable("record the identity", &e))?;
        tracing::info!(node = %name, attrs = ?record.attrs, ticket = %record.id, "node enrolled");
        Ok(EnrollResponse::Enrolled {
            name,
            attrs: record.attrs,
            cert_pem,
            ca_pem: ca.cert_pem().to_owned(),
        })
    }
}

/// Signs a public hostname certificate with the CA in `state` (both state backends sign
/// through it), and audits it.
pub(crate) fn sign_hostname(
    state: &StateDir,
    name: &NodeName,
    hostname: &str,
    csr_pem: &str,
    valid_for: Duration,
) -> Result<String, Refusal> {
    let ca = state.load_ca().map_err(|e| {
        tracing::error!(error = %e, "cannot load the CA for a public hostname certificate");
        Refusal::Internal
    })?;
    let cert = ca
        .sign_hostname_csr(csr_pem, hostname, valid_for)
        .map_err(|e| Refusal::PublicCertRefused {
            hostname: hostname.to_owned(),
            why: format!("certificate request refused: {e}"),
        })?;
    tracing::info!(target: "postern::audit", event = "public_cert", node = %name, %hostname, valid_for = ?valid_for, "public hostname certificate issued");
    Ok(cert)
}

/// Logs an enrollment's outcome (and its audit event) and turns a refusal into the answer.
pub(crate) fn audit_enrollment(
    req: &EnrollRequest,
    result: Result<EnrollResponse, EnrollRefusal>,
) -> EnrollResponse {
    match result {
        Ok(r) => {
            if let EnrollResponse::Enrolled { name, attrs, .. } = &r {
                tracing::info!(target: "postern::audit", event = "enrollment", allowed = true, node = %name, attrs = ?attrs, ticket = %req.ticket_id, "node enrolled");
            }
            r
        }
        Err(reason) => {
            tracing::warn!(ticket = %req.ticket_id, %reason, "enrollment refused");
            tracing::info!(target: "postern::audit", event = "enrollment", allowed = false, node = %req.name, ticket = %req.ticket_id, %reason, "enrollment refused");
            EnrollResponse::Refused { reason }
        }
    }
}

/// A new ticket for `spec`, signed off by `ca`'s fingerprint, and the record the authority
/// keeps of it (a hash of the secret, never the secret).
pub(crate) fn new_ticket(ca: &postern_proto::pki::Ca, spec: TicketSpec) -> (Ticket, TicketRecord) {
    let id = hex::encode(rand::random::<[u8; 8]>());
    let secret = hex::encode(rand::random::<[u8; 24]>());
    let now = now_ms();
    let expires_at_ms = now + spec.ttl.as_millis() as u64;
    let record = TicketRecord {
        id: id.clone(),
        secret_sha256: ticket::secret_hash(&secret),
        created_at_ms: now,
        expires_at_ms,
        uses_left: spec.uses.max(1),
        attrs: spec.attrs.clone(),
        name: spec.name.clone(),
        used_by: Vec::new(),
    };
    let authority = spec
        .authority
        .or_else(|| spec.relays.first().cloned())
        .unwrap_or_default();
    let ticket = Ticket {
        id,
        secret,
        relays: spec.relays,
        authority,
        relay_name: spec.relay_name,
        ca_fingerprint: ca.fingerprint(),
        expires_at_ms,
        attrs: spec.attrs,
        name: spec.name,
    };
    (ticket, record)
}

/// Checks an enrollment request against the ticket's record (secret, expiry, uses left,
/// attributes); returns the name the node gets. Both state backends enroll through it.
pub(crate) fn check_ticket(
    record: &TicketRecord,
    req: &EnrollRequest,
    now: u64,
) -> Result<NodeName, EnrollRefusal> {
    if !ticket::constant_time_eq(&ticket::secret_hash(&req.secret), &record.secret_sha256) {
        return Err(EnrollRefusal::Altered {
            what: "secret".into(),
        });
    }
    if now >= record.expires_at_ms {
        return Err(EnrollRefusal::Expired {
            secs_ago: (now - record.expires_at_ms) / 1000,
        });
    }
    if record.uses_left == 0 {
        return Err(EnrollRefusal::Used);
    }
    if req.attrs != record.attrs {
        return Err(EnrollRefusal::Altered {
            what: "attributes".into(),
        });
    }
    Ok(record.name.clone().unwrap_or_else(|| req.name.clone()))
}

/// Whether `id` has the form of one of our ticket ids (hex), so it can name a file or key.
pub(crate) fn valid_ticket_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

fn read_all<T: for<'de> Deserialize<'de>>(dir: &std::path::Path) -> Vec<T> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json") {
            if let Some(r) = files::read(&p)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
            {
                out.push(r);
            }
        }
    }
    out
}
