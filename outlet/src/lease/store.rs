//! The crash-safe lease store: one redb file, `<state_dir>/leases.redb`.
//!
//! Each write is one redb transaction committed with immediate durability (fsync) before the
//! call returns, so the manager can rely on "written" meaning "survives a crash". The store
//! holds no secret: only ids, client names, states and times. redb takes an exclusive lock on
//! the file, so a second outlet (or the CLI) cannot open a store that a running outlet holds.
//!
//! Besides the leases it keeps this outlet's instance id, a random 8-hex-digit name made when
//! the store is created, that goes into the marker on every credential (see
//! [`super::backend`]).
//!
//! ## A failed write
//!
//! After one I/O error (a full disk: "No space left on device") redb refuses every later call
//! with "Previous I/O error occurred" until the database is closed and opened again, even once
//! the disk has room. So an operation that fails that way closes the database at once
//! ([`StoreError::cannot_write`] says which errors do), calls fail fast with
//! [`StoreError::Unwritable`] meanwhile, and [`LeaseStore::reopen`] (retried with backoff by the
//! manager) opens it again and proves, by committing some room's worth of data and freeing it,
//! that it can write before it is used again.

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const LEASES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("leases");
const META: TableDefinition<'_, &str, &str> = TableDefinition::new("meta");
const INSTANCE_KEY: &str = "instance";
/// Written and removed again by [`LeaseStore::reopen`]: committed writes are the only proof
/// that the file can be written again.
const PROBE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("probe");
const PROBE_KEY: &str = "room";
/// How much [`LeaseStore::reopen`] writes to prove there is room. A small write proves little:
/// redb reuses pages the file already has, so it succeeds on a full disk and the next lease
/// fails again (the store would flap between broken and fine). 64 KiB, freed again at once,
/// is room for some hundreds of lease records.
const PROBE_SIZE: usize = 64 * 1024;
/// File name of the store inside the state directory.
pub const STORE_FILE: &str = "leases.redb";

/// Where a lease is in its life, as its record says: what a restart must do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum RecordState {
    /// Written before the backend is asked; the backend may or may not hold a credential.
    Creating,
    /// The backend made the credential with this id.
    Active { backend_id: String },
    /// Revocation is under way (or failed and will be retried).
    Revoking { backend_id: String },
}

impl RecordState {
    /// A short name for listings.
    pub fn name(&self) -> &'static str {
        match self {
            RecordState::Creating => "creating",
            RecordState::Active { .. } => "active",
            RecordState::Revoking { .. } => "revoking",
        }
    }

    /// The backend id, once known.
    pub fn backend_id(&self) -> Option<&str> {
        match self {
            RecordState::Creating => None,
            RecordState::Active { backend_id } | RecordState::Revoking { backend_id } => {
                Some(backend_id)
            }
        }
    }
}

/// One lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub lease_id: String,
    /// The client identity, as a string (validated as a node name when it was made).
    pub client: String,
    #[serde(flatten)]
    pub state: RecordState,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
    /// The profile the lease was made with (absent in records made before profiles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// The lease was handed out to its client (`postern-inlet lease create`) rather than
    /// streamed to its inlet or made on the command line.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handed_out: bool,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("lease store {path} is in use by another process (is an outlet already running with this state directory?)")]
    Locked { path: PathBuf },
    #[error("lease store {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("lease store: {0}")]
    Db(#[source] Box<redb::Error>),
    #[error("lease store: corrupt record {key:?}: {detail}")]
    Corrupt { key: String, detail: String },
    /// The state directory or the store file could not be made private.
    #[error("lease store: {0}")]
    Private(#[source] postern_net::runtime::files::FileError),
    /// An earlier write failed (see the module docs): the database is closed until
    /// [`LeaseStore::reopen`] succeeds. `reason` is that write's error, e.g. "No space left on
    /// device (os error 28)".
    #[error("the outlet's lease store cannot write ({reason}); it is reopened and retried")]
    Unwritable { reason: String },
}

impl StoreError {
    /// True for the errors after which redb must be closed and reopened: I/O errors (a full
    /// disk, a failing device) and redb's refusal to go on after one. Also true for
    /// [`StoreError::Unwritable`], which the store answers until that is done.
    pub fn cannot_write(&self) -> bool {
        match self {
            StoreError::Db(e) | StoreError::Open { source: e, .. } => {
                matches!(**e, redb::Error::Io(_) | redb::Error::PreviousIo)
            }
            StoreError::Unwritable { .. } => true,
            _ => false,
        }
    }

    /// What went wrong with the disk, as short as it can be said (for [`StoreError::Unwritable`],
    /// readiness and the inlets): the I/O error itself, without redb's wording.
    pub fn write_reason(&self) -> String {
        match self {
            StoreError::Db(e) | StoreError::Open { source: e, .. } => match &**e {
                redb::Error::Io(io) => io.to_string(),
                other => other.to_string(),
            },
            StoreError::Unwritable { reason } => reason.clone(),
            other => other.to_string(),
        }
    }
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(Box::new(e.into()))
}

/// The store. Its database is closed (`db` is `None`) from a failed write until a successful
/// [`reopen`](LeaseStore::reopen).
pub struct LeaseStore {
    path: PathBuf,
    db: Option<Database>,
    instance: String,
    /// Why the database was closed, while it is.
    closed_by: Option<String>,
}

impl LeaseStore {
    /// Opens (or creates) `<state_dir>/leases.redb` (mode 0600), creating `state_dir` with mode
    /// 0700 if it is missing and tightening it if it is open to other users.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        postern_net::runtime::files::private_dir(state_dir).map_err(StoreError::Private)?;
        let path = state_dir.join(STORE_FILE);
        // Made (or tightened to) 0600 before redb opens it: leases and grants are secrets.
        postern_net::runtime::files::private_file(&path).map_err(StoreError::Private)?;
        let db = open_db(&path)?;
        let txn = db.begin_write().map_err(db_err)?;
        let instance = {
            let _ = txn.open_table(LEASES).map_err(db_err)?;
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let existing = meta
                .get(INSTANCE_KEY)
                .map_err(db_err)?
                .map(|v| v.value().to_owned());
            match existing {
                Some(i) => i,
                None => {
                    let i = format!("{:08x}", rand::random::<u32>());
                    meta.insert(INSTANCE_KEY, i.as_str()).map_err(db_err)?;
                    i
                }
            }
        };
        txn.commit().map_err(db_err)?;
        Ok(LeaseStore {
            path,
            db: Some(db),
            instance,
            closed_by: None,
        })
    }

    /// This outlet's instance id (8 hex digits), stable for the life of the store.
    pub fn instance_id(&self) -> &str {
        &self.instance
    }

    /// The open database, or why there is none.
    fn db(&self) -> Result<&Database, StoreError> {
        match &self.db {
            Some(db) => Ok(db),
            None => Err(StoreError::Unwritable {
                reason: self
                    .closed_by
                    .clone()
                    .unwrap_or_else(|| "closed".to_owned()),
            }),
        }
    }

    /// After an operation failed with `e`: closes the database if `e` says it must be
    /// reopened (see the module docs). True if it did (or it was already closed).
    pub fn close_after(&mut self, e: &StoreError) -> bool {
        if !e.cannot_write() {
            return false;
        }
        if self.db.is_some() {
            self.closed_by = Some(e.write_reason());
            // Dropping it releases the file and its lock; redb skips its own clean-up after an
            // I/O error and repairs the file when it is opened again.
            self.db = None;
        }
        true
    }

    /// True while the database is closed after a failed write.
    pub fn is_closed(&self) -> bool {
        self.db.is_none()
    }

    /// Closes the database (if open) and opens it again, then commits a small write to prove
    /// that it can write. On failure the database stays closed.
    pub fn reopen(&mut self) -> Result<(), StoreError> {
        self.db = None;
        let result = open_db(&self.path).and_then(|db| {
            probe(&db)?;
            Ok(db)
        });
        match result {
            Ok(db) => {
                self.db = Some(db);
                self.closed_by = None;
                Ok(())
            }
            Err(e) => {
                if e.cannot_write() {
                    self.closed_by = Some(e.write_reason());
                }
                Err(e)
            }
        }
    }

    /// Inserts or replaces a record; durable when this returns.
    pub fn put(&self, rec: &LeaseRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(rec).map_err(|e| StoreError::Corrupt {
            key: rec.lease_id.clone(),
            detail: e.to_string(),
        })?;
        let txn = self.db()?.begin_write().map_err(db_err)?;
        {
            let mut t = txn.open_table(LEASES).map_err(db_err)?;
            t.insert(rec.lease_id.as_str(), bytes.as_slice())
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(())
    }

    /// Removes a record (no error if it is not there); durable when this returns.
    pub fn remove(&self, lease_id: &str) -> Result<(), StoreError> {
        let txn = self.db()?.begin_write().map_err(db_err)?;
        {
            let mut t = txn.open_table(LEASES).map_err(db_err)?;
            t.remove(lease_id).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(())
    }

    /// One record.
    pub fn get(&self, lease_id: &str) -> Result<Option<LeaseRecord>, StoreError> {
        let txn = self.db()?.begin_read().map_err(db_err)?;
        let t = txn.open_table(LEASES).map_err(db_err)?;
        let v = t.get(lease_id).map_err(db_err)?;
        v.map(|v| decode(lease_id, v.value())).transpose()
    }

    /// Every record, ordered by lease id.
    pub fn all(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        let txn = self.db()?.begin_read().map_err(db_err)?;
        let t = txn.open_table(LEASES).map_err(db_err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }
}

/// Opens (or creates) the database file, telling a lock held by another process apart.
fn open_db(path: &Path) -> Result<Database, StoreError> {
    match Database::create(path) {
        Ok(db) => Ok(db),
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(StoreError::Locked {
            path: path.to_owned(),
        }),
        Err(e) => Err(StoreError::Open {
            path: path.to_owned(),
            source: Box::new(e.into()),
        }),
    }
}

/// Commits [`PROBE_SIZE`] bytes, then commits their removal.
fn probe(db: &Database) -> Result<(), StoreError> {
    let room = vec![0u8; PROBE_SIZE];
    let txn = db.begin_write().map_err(db_err)?;
    txn.open_table(PROBE)
        .map_err(db_err)?
        .insert(PROBE_KEY, room.as_slice())
        .map_err(db_err)?;
    txn.commit().map_err(db_err)?;
    let txn = db.begin_write().map_err(db_err)?;
    txn.open_table(PROBE)
        .map_err(db_err)?
        .remove(PROBE_KEY)
        .map_err(db_err)?;
    txn.commit().map_err(db_err)?;
    Ok(())
}

fn decode(key: &str, bytes: &[u8]) -> Result<LeaseRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, state: RecordState) -> LeaseRecord {
        LeaseRecord {
            lease_id: id.into(),
            client: "inlet-1".into(),
            state,
            created_at_ms: 1,
            expires_at_ms: 2,
            profile: None,
            handed_out: false,
        }
    }

    #[test]
    fn records_survive_reopen_and_instance_is_stable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let instance = {
            let s = LeaseStore::open(dir.path()).expect("open");
            s.put(&rec("a", RecordState::Creating)).expect("put");
            s.put(&rec(
                "b",
                RecordState::Active {
                    backend_id: "x".into(),
                },
            ))
            .expect("put");
            s.put(&rec(
                "a",
                RecordState::Revoking {
                    backend_id: "y".into(),
                },
            ))
            .expect("replace");
            s.instance_id().to_owned()
        };
        let s = LeaseStore::open(dir.path()).expect("reopen");
        assert_eq!(s.instance_id(), instance);
        assert_eq!(instance.len(), 8);
        let all = s.all().expect("all");
        assert_eq!(all.len(), 2);
        assert_eq!(
            all[0].state,
            RecordState::Revoking {
                backend_id: "y".into()
            }
        );
        assert_eq!(
            s.get("b").expect("get").map(|r| r.lease_id),
            Some("b".into())
        );
        s.remove("b").expect("remove");
        s.remove("b").expect("remove twice");
        assert_eq!(s.get("b").expect("get"), None);
    }

    #[test]
    fn records_keep_their_profile_and_old_records_still_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LeaseStore::open(dir.path()).expect("open");
        let mut r = rec("p1", RecordState::Creating);
        r.profile = Some("sensors".into());
        r.handed_out = true;
        store.put(&r).expect("put");
        assert_eq!(store.get("p1").expect("get"), Some(r));
        // A record written before profiles existed has neither field.
        let old = decode(
            "k",
            br#"{"lease_id":"o","client":"inlet-1","state":"creating","created_at_ms":1,"expires_at_ms":2}"#,
        )
        .expect("old record");
        assert_eq!(old.profile, None);
        assert!(!old.handed_out);
    }

    #[test]
    fn a_second_open_is_refused_while_the_first_holds_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = LeaseStore::open(dir.path()).expect("open");
        match LeaseStore::open(dir.path()) {
            Err(StoreError::Locked { .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("second open succeeded"),
        }
    }

    #[cfg(unix)]
    use crate::test_fs::open_entries;

    #[cfg(unix)]
    #[test]
    fn a_fresh_store_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let _store = LeaseStore::open(&state).expect("open");
        let (open, seen) = open_entries(dir.path());
        assert!(open.is_empty(), "open to others: {open:?}");
        assert!(seen >= 2, "the walk saw the directory and leases.redb");
    }

    #[cfg(unix)]
    #[test]
    fn an_open_store_from_an_older_install_is_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        drop(LeaseStore::open(&state).expect("first open"));
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(
            state.join("leases.redb"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        let _store = LeaseStore::open(&state).expect("reopen");
        let (open, _) = open_entries(dir.path());
        assert!(open.is_empty(), "still open to others: {open:?}");
    }
}
