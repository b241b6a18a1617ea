//! Leased credentials as they travel from the outlet's lease manager to the inlet's HTTP filter.

use base64::Engine;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A credential the inlet puts into requests in place of whatever the client sent.
///
/// `Debug` never shows the secret; the memory is wiped on drop.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub enum Credential {
    /// InfluxDB 2 API token, sent as `Authorization: Token <token>`.
    Token(String),
    /// InfluxDB 1.x user, sent as HTTP Basic auth.
    Basic { username: String, password: String },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Token(_) => f.write_str("Token(<redacted>)"),
            Credential::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
        }
    }
}

impl Credential {
    /// The value of the `Authorization` header for this credential.
    pub fn authorization(&self) -> String {
        match self {
            Credential::Token(t) => format!("Token {t}"),
            Credential::Basic { username, password } => {
                let raw = format!("{username}:{password}");
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(raw.as_bytes())
                )
            }
        }
    }
}

/// One lease as streamed to an inlet: the credential and until when it is valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    /// The lease's id at the outlet (not secret).
    pub lease_id: String,
    pub credential: Credential,
    /// Expiry, milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_secrets() {
        let t = Credential::Token("s3cret-token".into());
        let b = Credential::Basic {
            username: "u1".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{t:?}").contains("s3cret"));
        assert!(!format!("{b:?}").contains("hunter2"));
        assert_eq!(t.authorization(), "Token s3cret-token");
        assert_eq!(b.authorization(), "Basic dTE6aHVudGVyMg==");
    }
}
