//! Automatic certificate renewal over the control connection.
//!
//! Enrolled certificates are short-lived. At two thirds of its life the node makes a fresh key
//! pair, asks the relay (the authority) to sign it for the same name and attributes, and writes
//! the new pair to its state directory — key and certificate each written aside and then
//! renamed, so a crash leaves either the old pair or the new one. New connections use the new
//! identity through the caller's `on_renewed` hook; open connections keep theirs.

use crate::control::enroll::NodeState;
use crate::control::exchange::{self, CtlError, CTL_TIMEOUT};
use crate::runtime::files::{self, FileError};
use postern_proto::msg::{Ctl, Refusal};
use postern_proto::pki::{self, PkiError};
use postern_proto::tls::Identity;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Why a renewal failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RenewError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("renewal request failed: {0}")]
    Control(#[from] CtlError),
    #[error("the relay refused: {0}")]
    Refused(Refusal),
    #[error("the relay gave an unexpected answer to a renewal")]
    Unexpected,
}

impl RenewError {
    /// Whether asking again soon cannot help (revoked, or this relay is not the authority).
    pub fn is_permanent(&self) -> bool {
        matches!(self, RenewError::Refused(r) if r.is_permanent())
    }
}

/// The longest wait between renewal attempts (and the wait after a permanent refusal).
const RENEW_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// When a certificate valid from `from` to `until` should be renewed.
pub fn renew_at(from: SystemTime, until: SystemTime) -> SystemTime {
    let life = until.duration_since(from).unwrap_or_default();
    from + life * 2 / 3
}

/// Renews once over `conn`; returns the new identity.
pub async fn renew_once(
    conn: &quinn::Connection,
    state: &NodeState,
) -> Result<Identity, RenewError> {
    let current = files::read(&state.cert())?;
    let name = pki::cert_name(&pki::first_cert(&current)?)?;
    let (csr_pem, key) = pki::make_csr(&name)?;
    let cert_pem = match exchange::request(conn, &Ctl::Renew { csr_pem }, CTL_TIMEOUT).await? {
        Ctl::Renewed { cert_pem } => cert_pem,
        Ctl::Refused { reason } => return Err(RenewError::Refused(reason)),
        _ => return Err(RenewError::Unexpected),
    };
    // The pair must match before anything on disk changes.
    let identity = Identity::from_pem(&cert_pem, &key.0)?;
    store_pair(&state.key(), &state.cert(), &key.0, &cert_pem)?;
    Ok(identity)
}

/// Puts a new key and certificate in place of the pair at `key` and `cert` (both mode 0600):
/// each is written aside, then the key is renamed into place and the certificate after it, so a
/// crash leaves either the old pair or the new one (see [`recover_pair`]).
pub fn store_pair(
    key: &std::path::Path,
    cert: &std::path::Path,
    key_pem: &str,
    cert_pem: &str,
) -> Result<(), FileError> {
    let key_new = key.with_extension("key.new");
    let cert_new = cert.with_extension("pem.new");
    files::write(&key_new, key_pem.as_bytes(), true)?;
    files::write(&cert_new, cert_pem.as_bytes(), true)?;
    let rename = |from: &std::path::Path, to: &std::path::Path| {
        std::fs::rename(from, to).map_err(|source| FileError::Write {
            path: to.to_owned(),
            source,
        })
    };
    rename(&key_new, key)?;
    rename(&cert_new, cert)?;
    Ok(())
}

/// Finishes a [`store_pair`] interrupted between its two renames (call at start-up).
pub fn recover_pair(key: &std::path::Path, cert: &std::path::Path) {
    let key_new = key.with_extension("key.new");
    let cert_new = cert.with_extension("pem.new");
    if cert_new.exists() && !key_new.exists() {
        // The key was renamed into place, the certificate not yet.
        let _ = std::fs::rename(&cert_new, cert);
    } else {
        // Nothing was renamed: the old pair is intact and still valid.
        let _ = std::fs::remove_file(&key_new);
        let _ = std::fs::remove_file(&cert_new);
    }
}

/// Finishes a renewal interrupted between its two renames (call at start-up).
pub fn recover(state: &NodeState) {
    recover_pair(&state.key(), &state.cert());
}

/// When the certificate in the PEM file `cert` is due for renewal ([`renew_at`]); `None` when
/// it cannot be read.
pub fn due(cert: &std::path::Path) -> Option<SystemTime> {
    files::read(cert)
        .ok()
        .and_then(|pem| pki::first_cert(&pem).ok())
        .and_then(|der| pki::cert_validity(&der).ok())
        .map(|(from, until)| renew_at(from, until))
}

/// Keeps the node's certificate fresh until `shutdown`, calling `on_renewed` with each new
/// identity.
pub async fn run(
    state: NodeState,
    control: watch::Receiver<Option<quinn::Connection>>,
    on_renewed: impl Fn(Identity) + Send + Sync + 'static,
    shutdown: CancellationToken,
) {
    let cert = state.cert();
    let due_at = move || {
        let due = due(&cert);
        if due.is_none() {
            tracing::warn!("cannot read this node's certificate; automatic renewal is off");
        }
        due
    };
    let renew = move |conn: quinn::Connection| {
        let state = state.clone();
        async move { renew_once(&conn, &state).await }
    };
    keep_fresh("certificate", control, due_at, renew, on_renewed, shutdown).await;
}

/// The renewal schedule every certificate kept over the control connection follows (the
/// node's own, an outlet's public hostname ones): wait until `due` (`None`: stop), ask with
/// `renew` on the control connection once it is up, hand the result to `on_renewed`, and
/// after a failure back off (the longest back-off at once after a permanent refusal). `what`
/// names the certificate in logs.
pub async fn keep_fresh<T, F, Fut>(
    what: &str,
    mut control: watch::Receiver<Option<quinn::Connection>>,
    due: impl Fn() -> Option<SystemTime>,
    renew: F,
    on_renewed: impl Fn(T),
    shutdown: CancellationToken,
) where
    F: Fn(quinn::Connection) -> Fut,
    Fut: std::future::Future<Output = Result<T, RenewError>>,
{
    let mut backoff =
        crate::runtime::backoff::Backoff::new(Duration::from_secs(5), RENEW_BACKOFF_MAX);
    loop {
        let Some(due) = due() else {
            return;
        };
        let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let Some(conn) =
            crate::control::connection::wait_connected(&mut control, Duration::from_secs(30)).await
        else {
            continue;
        };
        match renew(conn).await {
            Ok(renewed) => {
                tracing::info!("{what} renewed");
                backoff.reset();
                on_renewed(renewed);
            }
            Err(e) => {
                // A permanent refusal waits the longest back-off at once: asking again soon
                // cannot help until an operator acts.
                let delay = if e.is_permanent() {
                    RENEW_BACKOFF_MAX
                } else {
                    backoff.next_delay()
                };
                tracing::warn!(error = %e, retry_in = ?delay, "{what} renewal failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Starts renewal if the node runs on its enrolled identity (`cert` is the state directory's).
pub fn spawn_if_enrolled(
    state_dir: &std::path::Path,
    cert: &std::path::Path,
    control: watch::Receiver<Option<quinn::Connection>>,
    on_renewed: impl Fn(Identity) + Send + Sync + 'static,
    shutdown: CancellationToken,
) {
    let state = NodeState::new(state_dir);
    if state.cert() != cert {
        tracing::info!("certificate given by file: automatic renewal is off");
        return;
    }
    recover(&state);
    tokio::spawn(run(state, control, on_renewed, shutdown));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_two_thirds() {
        let from = SystemTime::UNIX_EPOCH;
        let until = from + Duration::from_secs(3000);
        assert_eq!(renew_at(from, until), from + Duration::from_secs(2000));
    }
}
