//! Enrollment tickets: how a new node learns where the relay is, how to recognise it, and
//! proves to the authority that an administrator let it in.
//!
//! A ticket string is `postern-ticket-1.` followed by base64url(JSON). It carries the relay
//! address(es) and certificate name, the project CA's SHA-256 fingerprint (so the node can
//! verify the relay before it has any certificate), a ticket id and one-time secret, the expiry
//! and the attributes to be granted. The authority keeps its own record of each ticket (with a
//! hash of the secret, never the secret): the attributes and expiry that count are the
//! authority's, and a ticket whose text was altered is refused.

use crate::name::NodeName;
use crate::policy::Attributes;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Prefix of every ticket string (also its format version).
pub const PREFIX: &str = "postern-ticket-1.";

/// ALPN of enrollment connections (server-authenticated only: the node has no certificate yet).
pub const ALPN_ENROLL: &[u8] = b"postern-enroll/1";

/// Why a relay without the authority closes an enrollment connection at once (so the node can
/// say so rather than report a broken exchange).
pub const CLOSE_NO_AUTHORITY: &[u8] = b"no authority here";

/// A decoded ticket.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// Public id of the ticket.
    pub id: String,
    /// One-time secret (hex). Never logged.
    pub secret: String,
    /// Relay addresses, `host:port`.
    pub relays: Vec<String>,
    /// Where to enroll, `host:port` (the authority; usually the first relay).
    pub authority: String,
    /// Name in the relay's certificate.
    pub relay_name: String,
    /// SHA-256 fingerprint (hex) of the project CA certificate.
    pub ca_fingerprint: String,
    /// Expiry, milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
    /// Attributes the node's certificate will carry.
    pub attrs: Attributes,
    /// The node name the ticket is for, if fixed by the administrator.
    pub name: Option<NodeName>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("id", &self.id)
            .field("relays", &self.relays)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("attrs", &self.attrs)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Why a ticket string could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TicketError {
    #[error("not a postern ticket (it must start with {PREFIX:?})")]
    Prefix,
    #[error("ticket is damaged (not valid base64url): was it copied whole?")]
    Encoding,
    #[error("ticket is damaged (its contents do not parse): {0}")]
    Contents(String),
    #[error("ticket expired {0} s ago; ask for a new one")]
    Expired(u64),
}

impl Ticket {
    /// The ticket as a string to hand to a node.
    pub fn encode(&self) -> String {
        // Serializing plain strings, numbers and maps cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        )
    }

    /// Reads a ticket string (surrounding whitespace is ignored).
    pub fn decode(s: &str) -> Result<Ticket, TicketError> {
        let body = s.trim().strip_prefix(PREFIX).ok_or(TicketError::Prefix)?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TicketError::Encoding)?;
        serde_json::from_slice(&json).map_err(|e| TicketError::Contents(e.to_string()))
    }

    /// Fails if the ticket has expired at `now_ms`.
    pub fn check_expiry(&self, now_ms: u64) -> Result<(), TicketError> {
        if now_ms >= self.expires_at_ms {
            return Err(TicketError::Expired((now_ms - self.expires_at_ms) / 1000));
        }
        Ok(())
    }
}

/// Hash of a ticket secret as the authority stores it.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Compares two strings in time independent of where they differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Node -> authority: enroll me.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub ticket_id: String,
    pub secret: String,
    /// PEM certificate request; the private key stays with the node.
    pub csr_pem: String,
    /// The name the node asks for (ignored if the ticket fixes one).
    pub name: NodeName,
    /// The attributes as written in the node's copy of the ticket, to detect tampering.
    pub attrs: Attributes,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("ticket_id", &self.ticket_id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Authority -> node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollResponse {
    Enrolled {
        name: NodeName,
        attrs: Attributes,
        cert_pem: String,
        ca_pem: String,
    },
    Refused {
        reason: EnrollRefusal,
    },
}

/// Why the authority refused an enrollment, typed so that a node enrolling at start-up can tell
/// a ticket that will never work (exit with the reason) from a moment's trouble (try again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum EnrollRefusal {
    /// The authority never issued this ticket (or its id was altered).
    UnknownTicket,
    /// The ticket's text was changed after it was issued (`what`: secret, attributes).
    Altered { what: String },
    /// The ticket expired `secs_ago` seconds ago.
    Expired { secs_ago: u64 },
    /// Every use of the ticket is spent.
    Used,
    /// The identity the ticket would give was revoked.
    Revoked { name: NodeName },
    /// The certificate request was unusable (`detail` says why).
    BadRequest { detail: String },
    /// The authority cannot sign or record right now (its CA or state is unreadable).
    Unavailable,
    /// The relay asked does not run the authority (it closed the enrollment connection).
    NotAuthority,
}

impl EnrollRefusal {
    /// Whether enrolling again with the same ticket cannot succeed.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, EnrollRefusal::Unavailable)
    }
}

impl std::fmt::Display for EnrollRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EnrollRefusal::UnknownTicket => f.write_str(
                "unknown ticket: this authority never issued it (was it altered, or is it for \
                 another project?)",
            ),
            EnrollRefusal::Altered { what } => {
                write!(
                    f,
                    "the ticket was altered: its {what} is not what was issued"
                )
            }
            EnrollRefusal::Expired { secs_ago } => {
                write!(f, "ticket expired {secs_ago} s ago; ask for a new one")
            }
            EnrollRefusal::Used => f.write_str(
                "ticket already used; tickets are single-use unless created with --uses",
            ),
            EnrollRefusal::Revoked { name } => write!(f, "identity {name} has been revoked"),
            EnrollRefusal::BadRequest { detail } => {
                write!(f, "certificate request refused: {detail}")
            }
            EnrollRefusal::Unavailable => {
                f.write_str("it cannot sign certificates right now; try again later")
            }
            EnrollRefusal::NotAuthority => f.write_str(
                "that relay does not run the authority; the ticket must name the relay that \
                 issued it (`--authority` at `ticket create`)",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes ticket strings into `fuzz/corpus/ticket` when `$POSTERN_WRITE_SEED_CORPUS` is
    /// set (see fuzz/README.md).
    #[test]
    fn write_seed_corpus() {
        let Some(dir) = crate::seed_corpus_dir("ticket") else {
            return;
        };
        std::fs::write(dir.join("sample"), sample().encode()).expect("write seed");
        let mut named = sample();
        named.name = Some("inlet-1".parse().expect("name"));
        std::fs::write(dir.join("named"), named.encode()).expect("write seed");
    }

    fn sample() -> Ticket {
        Ticket {
            id: "abc".into(),
            secret: "s3cret".into(),
            relays: vec!["127.0.0.1:4433".into()],
            authority: "127.0.0.1:4433".into(),
            relay_name: "relay".into(),
            ca_fingerprint: "00ff".into(),
            expires_at_ms: 10_000,
            attrs: [("role".to_string(), "influxdb-client".to_string())].into(),
            name: None,
        }
    }

    #[test]
    fn round_trip_and_errors() {
        let t = sample();
        let s = t.encode();
        assert!(s.starts_with(PREFIX));
        assert_eq!(Ticket::decode(&format!("  {s}\n")), Ok(t.clone()));
        assert_eq!(Ticket::decode("hello"), Err(TicketError::Prefix));
        assert_eq!(
            Ticket::decode(&format!("{PREFIX}!!!")),
            Err(TicketError::Encoding)
        );
        assert!(matches!(
            Ticket::decode(&format!("{PREFIX}AAAA")),
            Err(TicketError::Contents(_))
        ));
        let cut = &s[..s.len() - 5];
        assert!(Ticket::decode(cut).is_err());
        assert_eq!(t.check_expiry(9_999), Ok(()));
        assert_eq!(t.check_expiry(15_000), Err(TicketError::Expired(5)));
    }

    #[test]
    fn debug_hides_the_secret() {
        assert!(!format!("{:?}", sample()).contains("s3cret"));
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "ab"));
    }
}
