//! The inlet's lease client: keeps the current leased credential of a service, as streamed by
//! the outlet, in a watch channel the HTTP filter reads once per request.

use crate::pool::Pool;
use postern_net::control::exchange;
use postern_net::runtime::backoff::Backoff;
use postern_net::stream::http_proxy::{Gate, Verdict};
use postern_proto::http::RequestHead;
use postern_proto::lease::{Credential, LeaseGrant};
use postern_proto::msg::{LeaseMsg, StreamOpen};
use postern_proto::name::ServiceName;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the inlet knows about its lease for the service, as published by the lease client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// A valid credential, put into every request forwarded from now on.
    Held(Credential),
    /// The outlet injects the credential itself: requests go on with no credential (the
    /// client's own are still removed).
    AtOutlet,
    /// No valid credential. `reason` is shown to the client in the 503 body, so it must never
    /// contain a secret (e.g. "no lease received from the outlet yet", "lease expired").
    Missing { reason: String },
    /// The outlet gives this client no lease for who it is (no lease profile matches its
    /// identity): requests get a 403 with `reason` (never a secret).
    Refused { reason: String },
}

impl LeaseState {
    /// The state before the outlet has sent any lease.
    pub fn waiting() -> Self {
        LeaseState::Missing {
            reason: "no lease received from the outlet yet".to_owned(),
        }
    }
}

/// Where the HTTP filter reads the current credential, once per request head.
pub type CredentialSource = watch::Receiver<LeaseState>;

/// The inlet's gate: every request goes on with the lease held at that moment (or with none
/// when the outlet injects it), or gets a 503.
pub struct LeaseGate(pub CredentialSource);

impl Gate for LeaseGate {
    fn check(
        &mut self,
        _head: &mut RequestHead,
    ) -> impl std::future::Future<Output = Verdict> + Send {
        let verdict = match &*self.0.borrow() {
            LeaseState::Held(c) => Verdict::Forward {
                authorization: Some(c.authorization()),
            },
            LeaseState::AtOutlet => Verdict::Forward {
                authorization: None,
            },
            LeaseState::Missing { reason } => Verdict::NoLease {
                reason: reason.clone(),
            },
            LeaseState::Refused { reason } => Verdict::Answer {
                response: postern_proto::http::error_response(
                    403,
                    "Forbidden",
                    &format!("postern inlet: the outlet refuses this client a lease: {reason}"),
                ),
                reason: format!("no lease for this client: {reason}"),
            },
        };
        std::future::ready(verdict)
    }
}

/// Stop using a credential this long before the outlet says it expires, to absorb clock skew
/// and requests in flight; shorter for short leases (see [`until`]).
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(1);

/// How long a credential that expires at `expires_at_ms` may be used from now: its remaining
/// life less [`EXPIRY_MARGIN`], or less a sixth of that life when that is shorter. The outlet
/// sends the next lease at two thirds of the current one's life, so with a fixed margin a
/// lease of 3 s or less would be dropped before its successor arrives and requests would get
/// 503s at every rotation.
fn until(expires_at_ms: u64) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let left = Duration::from_millis(expires_at_ms.saturating_sub(now));
    left.saturating_sub(EXPIRY_MARGIN.min(left / 6))
}

/// When a held lease is re-asked for if no renewal has come: this share of its usable life.
/// The outlet renews at two thirds of a lease's life, so a renewal is late by then; asking
/// again (a new lease stream, which the outlet answers with its current lease) recovers one
/// that was lost, e.g. sent while the path through a restarting relay was gone.
const ASK_AGAIN_AT: (u32, u32) = (9, 10);

/// Keeps `state` up to date for `service` until `shutdown`.
pub(crate) async fn run(
    pool: Arc<Pool>,
    service: ServiceName,
    state: watch::Sender<LeaseState>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    // Expiry of the credential currently held, if any.
    let mut held_until: Option<tokio::time::Instant> = None;
    // The lease already asked for again (once per lease: the answer may be the same lease).
    let mut asked_again: Option<String> = None;
    // Set when a relay says an outlet is back or a connection to one comes up: the wait
    // before asking again ends then.
    let mut retry = pool.retry_signal();
    loop {
        retry.borrow_and_update();
        let session = follow(
            &pool,
            &service,
            &state,
            &mut held_until,
            &mut asked_again,
            &mut backoff,
        );
        let (reason, at_once) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = session => r,
        };
        if at_once {
            tracing::info!(%service, %reason, "asking for the lease again");
            continue;
        }
        tracing::warn!(%service, %reason, "lease stream ended; will ask again");
        let delay = backoff.next_delay();
        let wait = tokio::time::sleep(delay);
        tokio::pin!(wait);
        // Keep honouring the held credential's expiry while we wait to reconnect.
        loop {
            let expiry = expiry_timer(held_until);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = &mut wait => break,
                changed = retry.changed() => {
                    if changed.is_ok() {
                        tracing::info!(%service, "an outlet is back; asking for the lease now");
                        break;
                    }
                }
                _ = expiry => {
                    expire(&state, &mut held_until);
                }
            }
        }
    }
}

async fn expiry_timer(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn expire(state: &watch::Sender<LeaseState>, held_until: &mut Option<tokio::time::Instant>) {
    *held_until = None;
    state.send_replace(LeaseState::Missing {
        reason: "the lease expired and no new one has arrived from the outlet".into(),
    });
}

/// One lease stream: ask, then apply every grant until the stream ends. Returns why it ended,
/// and whether to ask again at once (a renewal is late) rather than after the back-off.
async fn follow(
    pool: &Pool,
    service: &ServiceName,
    state: &watch::Sender<LeaseState>,
    held_until: &mut Option<tokio::time::Instant>,
    asked_again: &mut Option<String>,
    backoff: &mut Backoff,
) -> (String, bool) {
    let conn = match pool.connection(service).await {
        Ok(c) => c,
        Err(e) => {
            let reason = e.explain(service, pool.uplink().transports());
            // A held credential stays usable until it expires; without one, clients are told
            // why there is none instead of "not received yet".
            if held_until.is_none() {
                state.send_if_modified(|s| {
                    let new = LeaseState::Missing {
                        reason: reason.clone(),
                    };
                    let changed = *s != new;
                    *s = new;
                    changed
                });
            }
            return (reason, false);
        }
    };
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return (e.to_string(), false),
    };
    let open = StreamOpen::Lease {
        service: service.clone(),
    };
    if let Err(e) = exchange::write_message(&mut send, &open).await {
        return (e.to_string(), false);
    }
    // When to ask again for the lease held, if no renewal has come by then.
    let mut ask_again: Option<(tokio::time::Instant, String)> = None;
    loop {
        let next = exchange::read_frame::<LeaseMsg>(&mut recv);
        let msg = tokio::select! {
            m = next => m,
            _ = expiry_timer(*held_until) => {
                expire(state, held_until);
                continue;
            }
            _ = expiry_timer(ask_again.as_ref().map(|(at, _)| *at)) => {
                *asked_again = ask_again.take().map(|(_, id)| id);
                return ("no renewal of the lease has arrived near its expiry".into(), true);
            }
        };
        match msg {
            Ok(LeaseMsg::Grant(grant)) => {
                backoff.reset();
                let lease_id = grant.lease_id.clone();
                ask_again = apply(state, held_until, grant)
                    .filter(|_| asked_again.as_deref() != Some(lease_id.as_str()))
                    .map(|left| {
                        let (num, den) = ASK_AGAIN_AT;
                        (tokio::time::Instant::now() + left * num / den, lease_id)
                    });
            }
            Ok(LeaseMsg::AtOutlet) => {
                backoff.reset();
                *held_until = None;
                ask_again = None;
                if *state.borrow() != LeaseState::AtOutlet {
                    tracing::info!(%service, "the outlet injects the leased credential itself");
                }
                state.send_replace(LeaseState::AtOutlet);
            }
            Ok(LeaseMsg::Refused { reason }) => {
                // Who this client is does not change while it runs; the stream ends and is
                // asked for again after the back-off, in case the outlet's profiles change.
                tracing::warn!(%service, %reason, "the outlet refuses this client a lease");
                *held_until = None;
                ask_again = None;
                state.send_replace(LeaseState::Refused { reason });
            }
            Ok(LeaseMsg::Unavailable { reason }) => {
                tracing::warn!(%service, %reason, "the outlet cannot lease a credential now");
                if held_until.is_none() {
                    state.send_replace(LeaseState::Missing {
                        reason: format!("the outlet cannot lease a credential: {reason}"),
                    });
                }
            }
            Err(e) => return (e.to_string(), false),
        }
    }
}

/// Puts `grant` in use; returns how long it may be used (`None`: it has expired already).
fn apply(
    state: &watch::Sender<LeaseState>,
    held_until: &mut Option<tokio::time::Instant>,
    grant: LeaseGrant,
) -> Option<Duration> {
    let left = until(grant.expires_at_ms);
    if left.is_zero() {
        tracing::warn!(lease = %grant.lease_id, "received a lease that has already expired");
        return None;
    }
    tracing::info!(lease = %grant.lease_id, valid_for = ?left, "new lease in use");
    *held_until = Some(tokio::time::Instant::now() + left);
    // Swapped atomically: requests already forwarded keep the old (still valid) credential,
    // the next request head gets the new one.
    state.send_replace(LeaseState::Held(grant.credential.clone()));
    Some(left)
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_net::runtime::clock::now_ms;

    #[test]
    fn short_leases_get_a_shorter_margin() {
        // Long lease: the full margin.
        let d = until(now_ms() + 60_000);
        assert!(
            d <= Duration::from_secs(59) && d > Duration::from_millis(58_900),
            "{d:?}"
        );
        // A 3 s lease (renewed at 2 s) stays usable past its renewal: 2.5 s.
        let d = until(now_ms() + 3_000);
        assert!(
            d <= Duration::from_millis(2_500) && d > Duration::from_millis(2_400),
            "{d:?}"
        );
        // A 2 s lease (renewed at 1.33 s): 1.67 s.
        let d = until(now_ms() + 2_000);
        assert!(
            d > Duration::from_millis(1_550) && d <= Duration::from_millis(1_667),
            "{d:?}"
        );
        assert_eq!(until(now_ms().saturating_sub(1)), Duration::ZERO);
    }
}
