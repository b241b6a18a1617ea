//! The credentials of live leases, kept for the outlet's enforcement
//! ([`LeaseManager::accepts`](super::LeaseManager::accepts)): only their digests, so a request's
//! credential is checked in one look-up and no plaintext credential is kept for it.

use postern_proto::lease::Credential;
use postern_proto::name::NodeName;
use std::collections::HashMap;

/// The live credentials by digest (SHA-256 of the `Authorization` value), so that a request's
/// credential is checked in one look-up and no plaintext credential is kept for it.
#[derive(Default)]
pub(super) struct LiveCredentials {
    by_digest: HashMap<[u8; 32], LiveCredential>,
    digest_of: HashMap<String, [u8; 32]>,
}

struct LiveCredential {
    client: NodeName,
    expires_at_ms: u64,
}

fn digest(authorization: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(authorization).into()
}

impl LiveCredentials {
    pub(super) fn insert(
        &mut self,
        lease_id: &str,
        client: &NodeName,
        c: &Credential,
        expires_at_ms: u64,
    ) {
        let d = digest(c.authorization().as_bytes());
        self.by_digest.insert(
            d,
            LiveCredential {
                client: client.clone(),
                expires_at_ms,
            },
        );
        self.digest_of.insert(lease_id.to_owned(), d);
    }

    pub(super) fn remove(&mut self, lease_id: &str) {
        if let Some(d) = self.digest_of.remove(lease_id) {
            self.by_digest.remove(&d);
        }
    }

    pub(super) fn accepts(&self, client: &NodeName, authorization: &[u8], now_ms: u64) -> bool {
        self.by_digest
            .get(&digest(authorization))
            .is_some_and(|l| &l.client == client && now_ms < l.expires_at_ms)
    }
}
