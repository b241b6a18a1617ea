//! The relay's state directory: the project CA, the relay's own certificate, the reset key.

use postern_net::runtime::files::{self, FileError};
use postern_proto::name::NodeName;
use postern_proto::pki::{Ca, PkiError};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Lifetime of certificates issued by `ca issue` (enrollment will make them short-lived).
pub const ISSUED_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why the state directory could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("{0} already exists; refusing to overwrite a CA (pass --force to replace it)")]
    Exists(PathBuf),
    #[error("no CA in {0}; run `postern-relay ca init` first")]
    NoCa(PathBuf),
    #[error("invalid state: {0}")]
    Invalid(String),
}

/// Paths inside a relay state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }

    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }

    pub fn relay_cert(&self) -> PathBuf {
        self.root.join("relay.pem")
    }

    pub fn relay_key(&self) -> PathBuf {
        self.root.join("relay.key")
    }

    fn reset_key_path(&self) -> PathBuf {
        self.root.join("reset.key")
    }

    /// Creates the project CA and the relay's own certificate (named `relay_name`).
    pub fn init_ca(
        &self,
        project: &str,
        relay_name: &NodeName,
        force: bool,
    ) -> Result<Ca, StateError> {
        if self.ca_key().exists() && !force {
            return Err(StateError::Exists(self.ca_key()));
        }
        let ca = Ca::generate(project)?;
        files::private_dir(&self.root)?;
        files::write(&self.ca_key(), ca.key_pem().as_bytes(), true)?;
        files::write(&self.ca_cert(), ca.cert_pem().as_bytes(), true)?;
        let relay = ca.issue(relay_name, ISSUED_VALIDITY)?;
        files::write(&self.relay_key(), relay.key_pem.as_bytes(), true)?;
        files::write(&self.relay_cert(), relay.cert_pem.as_bytes(), true)?;
        Ok(ca)
    }

    /// Loads the project CA.
    pub fn load_ca(&self) -> Result<Ca, StateError> {
        if !self.ca_key().exists() {
            return Err(StateError::NoCa(self.root.clone()));
        }
        let cert = files::read(&self.ca_cert())?;
        let key = files::read(&self.ca_key())?;
        Ok(Ca::from_pem(&cert, &key)?)
    }

    /// Issues a certificate for `name` into `out_dir` as `NAME.pem` / `NAME.key`, with the CA
    /// certificate beside them as `ca.pem`. Returns the paths of the certificate and key. The
    /// certificates are meant to be handed out (0644); the key is private (0600).
    pub fn issue(&self, name: &NodeName, out_dir: &Path) -> Result<(PathBuf, PathBuf), StateError> {
        let ca = self.load_ca()?;
        let issued = ca.issue(name, ISSUED_VALIDITY)?;
        let cert = out_dir.join(format!("{name}.pem"));
        let key = out_dir.join(format!("{name}.key"));
        files::write(&key, issued.key_pem.as_bytes(), true)?;
        files::write(&cert, issued.cert_pem.as_bytes(), false)?;
        files::write(&out_dir.join("ca.pem"), ca.cert_pem().as_bytes(), false)?;
        Ok((cert, key))
    }

    /// The stateless-reset key, created on first use.
    pub fn reset_key(&self) -> Result<[u8; 32], StateError> {
        let path = self.reset_key_path();
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(bytes) = hex::decode(text.trim()) {
                if let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice()) {
                    return Ok(key);
                }
            }
            tracing::warn!(path = %path.display(), "reset key file is malformed; making a new one");
        }
        let key: [u8; 32] = rand::random();
        files::write(&path, hex::encode(key).as_bytes(), true)?;
        Ok(key)
    }
}
