//! Reloading the relay's config without a restart, asked for by `SIGHUP` or by the admin API
//! (`POST /v1/reload`, which `postern-relay reload` sends). Both go through one [`Reloader`],
//! so they have the same effect: the command line and config file are read again, and their
//! `[[policy]]` and `log-level` put in force. The policy applies to live registrations and
//! routes as well as to new ones (see [`RelayHandle::set_policy`]). A config that does not read
//! or validate changes nothing and its error is given back; everything else in the file
//! (addresses, certificates, cluster) takes a restart.

use crate::config::RelayConfig;
use crate::server::{PolicyApplied, RelayHandle};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

/// Reads the configuration again (the binary: the same command line and config file).
pub type Reread = Box<dyn Fn() -> anyhow::Result<RelayConfig> + Send + Sync>;

/// What a reload put in force (the answer of `POST /v1/reload`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloaded {
    /// What the new policy changed in what was live.
    #[serde(flatten)]
    pub policy: PolicyApplied,
    /// The stderr log filter now in force (`None`: left as it was).
    pub log_level: Option<String>,
}

/// Why a reload was refused; the config in force stays.
#[derive(Debug, thiserror::Error)]
#[error("reload refused, the config in force stays: {0}")]
pub struct ReloadRefused(pub String);

/// Rereads and applies the config, one reload at a time.
pub struct Reloader {
    reread: Reread,
    relay: RelayHandle,
    /// Held through a reload: a `SIGHUP` and an admin request at once apply one after the
    /// other, never interleaved.
    busy: Mutex<()>,
}

impl Reloader {
    pub fn new(reread: Reread, relay: RelayHandle) -> Self {
        Self {
            reread,
            relay,
            busy: Mutex::new(()),
        }
    }

    /// Rereads the config and puts it in force; `asked_by` names who asked, for the log.
    pub fn reload(&self, asked_by: &str) -> Result<Reloaded, ReloadRefused> {
        let _busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        tracing::info!(asked_by, "reloading the config");
        tracing::debug!(asked_by, "rereading the command line and config file");
        let cfg = match (self.reread)() {
            Ok(cfg) => cfg,
            Err(e) => {
                let message = format!("{e:#}");
                tracing::error!(
                    asked_by,
                    error = %message,
                    "reload refused: the new config is invalid; the one in force stays"
                );
                return Err(ReloadRefused(message));
            }
        };
        // The filter was checked when the config was read, so this fails only if logging
        // itself cannot change; then nothing else changes either.
        if let Some(level) = &cfg.log_level {
            if let Err(e) = postern_net::runtime::logging::set_filter(level) {
                let message = e.to_string();
                tracing::error!(asked_by, error = %message, "reload refused: the new log level cannot be put in force; the config in force stays");
                return Err(ReloadRefused(message));
            }
        }
        let policy = self.relay.set_policy(cfg.policy);
        tracing::info!(
            asked_by,
            log_level = cfg.log_level.as_deref().unwrap_or("(unchanged)"),
            routes_closed = policy.routes_closed,
            "config reloaded"
        );
        Ok(Reloaded {
            policy,
            log_level: cfg.log_level,
        })
    }
}
