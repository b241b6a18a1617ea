//! Access grants for public services: time-limited links that let a browser in.
//!
//! `postern-outlet access create --service influxdb --ttl 1h` makes a grant: a random secret
//! handed out once, inside the link `https://<host>/_postern/access?grant=<secret>`. The store
//! keeps only the secret's SHA-256, with the service, expiry and attributes, in
//! `<state_dir>/access.redb` (each change durable before it returns), and a copy in memory that
//! every request is checked against, so a revoked or expired grant stops working at the next
//! request. Expired grants are dropped from the store when it opens.

pub use postern_net::runtime::clock::now_ms;
use postern_proto::name::ServiceName;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const GRANTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("grants");
/// File name of the store inside the state directory.
pub const STORE_FILE: &str = "access.redb";
/// Longest grant lifetime accepted.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

/// Why the access store failed. Never holds a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    #[error("access store {path} is in use by another process (is an outlet already running with this state directory?)")]
    Locked { path: PathBuf },
    #[error("access store {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("access store: {0}")]
    Db(#[source] Box<redb::Error>),
    #[error("access store: corrupt record {key:?}: {detail}")]
    Corrupt { key: String, detail: String },
    /// The state directory or the store file could not be made private.
    #[error("access store: {0}")]
    Private(#[source] postern_net::runtime::files::FileError),
    #[error("grant {0} not found")]
    NotFound(String),
    #[error("a grant must last between 1 s and {} days", MAX_TTL.as_secs() / 86400)]
    BadTtl,
    #[error("service {0} is not offered publicly by this outlet")]
    NotPublic(ServiceName),
}

fn db_err(e: impl Into<redb::Error>) -> AccessError {
    AccessError::Db(Box::new(e.into()))
}

/// One grant as stored: no secret, only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    id: String,
    service: ServiceName,
    /// Hex SHA-256 of the secret.
    secret_sha256: String,
    attrs: BTreeMap<String, String>,
    created_at_ms: u64,
    expires_at_ms: u64,
}

/// A grant as shown by `access list` and used for decisions. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantInfo {
    pub id: String,
    pub service: ServiceName,
    pub attrs: BTreeMap<String, String>,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
}

impl From<&Record> for GrantInfo {
    fn from(r: &Record) -> Self {
        GrantInfo {
            id: r.id.clone(),
            service: r.service.clone(),
            attrs: r.attrs.clone(),
            created_at_ms: r.created_at_ms,
            expires_at_ms: r.expires_at_ms,
        }
    }
}

/// A new grant: its details and the secret, which exists nowhere else once this is dropped.
pub struct NewGrant {
    pub info: GrantInfo,
    pub secret: postern_proto::secret::Secret,
}

impl std::fmt::Debug for NewGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewGrant")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// Why a request's grant was not accepted (shown on the 403 page: no secret in it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("no access grant was presented")]
    Missing,
    #[error("the access grant is unknown or was revoked")]
    Unknown,
    #[error("the access grant has expired")]
    Expired,
    #[error("the access grant is for another service")]
    OtherService,
}

fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The grant store. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct AccessStore {
    db: Database,
    /// Hash of the secret -> record.
    cache: Mutex<HashMap<String, Record>>,
    /// Grant id -> the connections let in under it (see [`watch`](Self::watch)).
    watchers: Mutex<HashMap<String, Vec<Weak<CancellationToken>>>>,
}

impl AccessStore {
    /// Opens (or creates) `<state_dir>/access.redb` and drops the grants that have expired.
    pub fn open(state_dir: &Path) -> Result<Self, AccessError> {
        postern_net::runtime::files::private_dir(state_dir).map_err(AccessError::Private)?;
        let path = state_dir.join(STORE_FILE);
        // Made (or tightened to) 0600 before redb opens it: leases and grants are secrets.
        postern_net::runtime::files::private_file(&path).map_err(AccessError::Private)?;
        let db = match Database::create(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(AccessError::Locked { path })
            }
            Err(e) => {
                return Err(AccessError::Open {
                    path,
                    source: Box::new(e.into()),
                })
            }
        };
        let now = now_ms();
        let mut cache = HashMap::new();
        let txn = db.begin_write().map_err(db_err)?;
        {
            let mut t = txn.open_table(GRANTS).map_err(db_err)?;
            let mut expired = Vec::new();
            for item in t.iter().map_err(db_err)? {
                let (k, v) = item.map_err(db_err)?;
                let rec: Record =
                    serde_json::from_slice(v.value()).map_err(|e| AccessError::Corrupt {
                        key: k.value().to_owned(),
                        detail: e.to_string(),
                    })?;
                if rec.expires_at_ms <= now {
                    expired.push(k.value().to_owned());
                } else {
                    cache.insert(rec.secret_sha256.clone(), rec);
                }
            }
            for id in expired {
                t.remove(id.as_str()).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)?;
        Ok(Self {
            db,
            cache: Mutex::new(cache),
            watchers: Mutex::default(),
        })
    }

    fn cache(&self) -> MutexGuard<'_, HashMap<String, Record>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes a grant for `service` valid for `ttl`; durable when this returns.
    pub fn create(
        &self,
        service: &ServiceName,
        ttl: Duration,
        attrs: BTreeMap<String, String>,
    ) -> Result<NewGrant, AccessError> {
        if ttl < Duration::from_secs(1) || ttl > MAX_TTL {
            return Err(AccessError::BadTtl);
        }
        use base64::Engine;
        let secret = zeroize::Zeroizing::new(
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>()),
        );
        let now = now_ms();
        let rec = Record {
            id: format!("{:016x}", rand::random::<u64>()),
            service: service.clone(),
            secret_sha256: hash(&secret),
            attrs,
            created_at_ms: now,
            expires_at_ms: now + ttl.as_millis() as u64,
        };
        let bytes = serde_json::to_vec(&rec).map_err(|e| AccessError::Corrupt {
            key: rec.id.clone(),
            detail: e.to_string(),
        })?;
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = txn.open_table(GRANTS).map_err(db_err)?;
            t.insert(rec.id.as_str(), bytes.as_slice())
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        let info = GrantInfo::from(&rec);
        self.cache().insert(rec.secret_sha256.clone(), rec);
        Ok(NewGrant {
            info,
            secret: postern_proto::secret::Secret::new(secret.as_str()),
        })
    }

    fn watchers(&self) -> MutexGuard<'_, HashMap<String, Vec<Weak<CancellationToken>>>> {
        self.watchers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cancels `closer` when grant `id` is revoked: how a connection let in under the grant
    /// (an upgraded one above all, which sends no more requests to check) is closed. Held
    /// weakly: a connection that ended is forgotten.
    pub fn watch(&self, id: &str, closer: &Arc<CancellationToken>) {
        let mut w = self.watchers();
        let list = w.entry(id.to_owned()).or_default();
        list.retain(|t| t.strong_count() > 0);
        list.push(Arc::downgrade(closer));
        if w.len() > 1024 {
            w.retain(|_, l| {
                l.retain(|t| t.strong_count() > 0);
                !l.is_empty()
            });
        }
    }

    /// Revokes grant `id`: it stops working at the next request, and the connections let in
    /// under it are closed. Durable when this returns.
    pub fn revoke(&self, id: &str) -> Result<GrantInfo, AccessError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = txn.open_table(GRANTS).map_err(db_err)?;
            t.remove(id).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        let closers = self.watchers().remove(id).unwrap_or_default();
        for closer in closers.iter().filter_map(Weak::upgrade) {
            closer.cancel();
        }
        let mut cache = self.cache();
        let key = cache
            .iter()
            .find(|(_, r)| r.id == id)
            .map(|(k, _)| k.clone());
        key.and_then(|k| cache.remove(&k))
            .map(|rec| GrantInfo::from(&rec))
            .ok_or_else(|| AccessError::NotFound(id.to_owned()))
    }

    /// Every grant, expired ones included, ordered by expiry.
    pub fn list(&self) -> Vec<GrantInfo> {
        let mut out: Vec<GrantInfo> = self.cache().values().map(GrantInfo::from).collect();
        out.sort_by(|a, b| (a.expires_at_ms, &a.id).cmp(&(b.expires_at_ms, &b.id)));
        out
    }

    /// Whether `secret` is a live grant for `service` at `now_ms`.
    pub fn check(
        &self,
        secret: &str,
        service: &ServiceName,
        now_ms: u64,
    ) -> Result<GrantInfo, Denied> {
        let cache = self.cache();
        let rec = cache.get(&hash(secret)).ok_or(Denied::Unknown)?;
        if &rec.service != service {
            return Err(Denied::OtherService);
        }
        if rec.expires_at_ms <= now_ms {
            return Err(Denied::Expired);
        }
        Ok(GrantInfo::from(rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(s: &str) -> ServiceName {
        ServiceName::new(s).expect("name")
    }

    #[test]
    fn revoking_a_grant_cancels_the_connections_watching_it() {
        let dir = tempfile::tempdir().expect("dir");
        let store = AccessStore::open(dir.path()).expect("open");
        let ttl = Duration::from_secs(60);
        let a = store.create(&svc("web"), ttl, BTreeMap::new()).expect("a");
        let b = store.create(&svc("web"), ttl, BTreeMap::new()).expect("b");
        let (on_a, on_b) = (
            Arc::new(CancellationToken::new()),
            Arc::new(CancellationToken::new()),
        );
        store.watch(&a.info.id, &on_a);
        store.watch(&b.info.id, &on_b);
        // A connection that ended is forgotten at the next watch of its grant.
        let ended = Arc::new(CancellationToken::new());
        store.watch(&a.info.id, &ended);
        drop(ended);
        store.watch(&a.info.id, &on_a);
        assert_eq!(store.watchers().get(&a.info.id).map(Vec::len), Some(2));
        store.revoke(&a.info.id).expect("revoke");
        assert!(on_a.is_cancelled(), "a's connection is told to close");
        assert!(!on_b.is_cancelled(), "b's connection stays");
        assert!(store.watchers().get(&a.info.id).is_none());
    }

    #[test]
    fn grants_are_checked_revoked_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = AccessStore::open(dir.path()).expect("open");
        let attrs = BTreeMap::from([("team".to_owned(), "ops".to_owned())]);
        let g = store
            .create(&svc("influxdb"), Duration::from_secs(60), attrs.clone())
            .expect("create");
        let short = store
            .create(&svc("influxdb"), Duration::from_secs(1), BTreeMap::new())
            .expect("create");
        let now = now_ms();
        let ok = store
            .check(g.secret.expose(), &svc("influxdb"), now)
            .expect("valid");
        assert_eq!(ok.attrs, attrs);
        assert_eq!(
            store.check(g.secret.expose(), &svc("other"), now),
            Err(Denied::OtherService)
        );
        assert_eq!(
            store.check("not-a-grant", &svc("influxdb"), now),
            Err(Denied::Unknown)
        );
        assert_eq!(
            store.check(short.secret.expose(), &svc("influxdb"), now + 1000),
            Err(Denied::Expired)
        );
        // Only the hash is on disk.
        drop(store);
        let bytes = std::fs::read(dir.path().join(STORE_FILE)).expect("read store");
        assert!(!bytes
            .windows(g.secret.expose().len())
            .any(|w| w == g.secret.expose().as_bytes()));
        let store = AccessStore::open(dir.path()).expect("reopen");
        store
            .check(g.secret.expose(), &svc("influxdb"), now)
            .expect("still valid");
        store.revoke(&g.info.id).expect("revoke");
        assert_eq!(
            store.check(g.secret.expose(), &svc("influxdb"), now),
            Err(Denied::Unknown)
        );
        assert!(matches!(
            store.revoke(&g.info.id),
            Err(AccessError::NotFound(_))
        ));
        drop(store);
        let store = AccessStore::open(dir.path()).expect("reopen");
        assert_eq!(
            store.check(g.secret.expose(), &svc("influxdb"), now),
            Err(Denied::Unknown),
            "revocation is durable"
        );
        assert!(store
            .create(&svc("influxdb"), Duration::ZERO, BTreeMap::new())
            .is_err());
    }

    #[cfg(unix)]
    use crate::test_fs::open_entries;

    #[cfg(unix)]
    #[test]
    fn a_fresh_store_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let _store = AccessStore::open(&state).expect("open");
        let (open, seen) = open_entries(dir.path());
        assert!(open.is_empty(), "open to others: {open:?}");
        assert!(seen >= 2, "the walk saw the directory and access.redb");
    }

    #[cfg(unix)]
    #[test]
    fn an_open_store_from_an_older_install_is_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        drop(AccessStore::open(&state).expect("first open"));
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(
            state.join("access.redb"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        let _store = AccessStore::open(&state).expect("reopen");
        let (open, _) = open_entries(dir.path());
        assert!(open.is_empty(), "still open to others: {open:?}");
    }
}
