//! Settings every node (outlet, inlet) shares: how to reach the relay and who it is.

use crate::control::RelayTarget;
use crate::files;
use anyhow::Context;
use postern_proto::tls::{self, Identity};
use rustls::RootCertStore;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

/// Resolved node settings.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// Relay address, `host:port`.
    pub relay: String,
    /// Name in the relay's certificate.
    pub relay_name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Default relay certificate name.
pub const DEFAULT_RELAY_NAME: &str = "relay";

impl NodeSettings {
    /// Loads the node's identity, the project CA and resolves the relay's address.
    pub fn load(&self) -> anyhow::Result<(RelayTarget, Identity, Arc<RootCertStore>)> {
        let addr: SocketAddr = self
            .relay
            .to_socket_addrs()
            .with_context(|| format!("relay: cannot resolve {:?}", self.relay))?
            .next()
            .with_context(|| format!("relay: {:?} resolves to no address", self.relay))?;
        let cert = files::read(&self.cert).context("cert")?;
        let key = files::read(&self.key).context("key")?;
        let identity = Identity::from_pem(&cert, &key)
            .with_context(|| format!("cert/key: {} / {}", self.cert.display(), self.key.display()))?;
        let roots = tls::roots_from_pem(&files::read(&self.ca).context("ca")?)
            .with_context(|| format!("ca: {}", self.ca.display()))?;
        Ok((
            RelayTarget {
                addr,
                name: self.relay_name.clone(),
            },
            identity,
            roots,
        ))
    }
}

/// Takes the flag, else the file's value, else fails naming the key.
pub fn required<T>(flag: Option<T>, file: Option<T>, key: &str) -> anyhow::Result<T> {
    flag.or(file)
        .with_context(|| format!("missing `{key}`: set it in the config file or pass --{key}"))
}
