//! The outlet's enforcement of leased credentials on `[influxdb-outlet]` services.
//!
//! Nothing on the client's side can be trusted: an enrolled client may run a modified inlet, or
//! declare the service as plain TCP in its own inlet and send any bytes it likes. So every stream
//! of a service with leased credentials goes through the same strict HTTP filter at the outlet
//! as at the inlet ([`postern_net::stream::http_proxy`]), and [`LeaseGate`] lets a request reach InfluxDB
//! only with the credential leased to the identity proven by the end-to-end mutual TLS:
//!
//! * `inject-at = "inlet"`: the request must carry exactly one `Authorization` field whose value
//!   is a live lease of that identity ([`LeaseManager::accepts`]); anything else (no credential,
//!   another client's lease, the client's own InfluxDB user, `u`/`p` in the query) gets a 403
//!   and nothing reaches InfluxDB.
//! * `inject-at = "outlet"`: whatever the client sent is removed and the identity's current
//!   lease is put in; the credential never leaves the private network. The one exception is a
//!   credential the identity had handed out to itself (`postern-inlet lease create`, allowed by
//!   its profile's `hand-out = true`): a request presenting a live lease of that identity goes
//!   on with it.
//!
//! Either way the filter removes `u`/`p` query parameters, refuses `CONNECT` and every upgrade
//! but a WebSocket one, and turns the stream into raw bytes only after InfluxDB answered `101`.

use crate::lease::{InjectAt, LeaseManager};
use postern_net::stream::http_proxy::{Gate, Verdict};
use postern_proto::http::{error_response, RequestHead};
use postern_proto::lease::LeaseGrant;
use postern_proto::name::{NodeName, ServiceName};
use postern_proto::policy::Attributes;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long a request waits for the identity's first lease when the outlet injects it.
pub const LEASE_WAIT: Duration = Duration::from_secs(10);

/// Refused requests, by service and reason.
const REFUSED: &str = "postern_outlet_requests_refused_total";

/// Checks (or injects) the peer's lease on every request of one stream.
pub struct LeaseGate {
    manager: Arc<LeaseManager>,
    client: NodeName,
    service: ServiceName,
    mode: InjectAt,
    /// The client's lease, subscribed at the first request (`inject-at = "outlet"` only).
    grants: Option<watch::Receiver<Option<LeaseGrant>>>,
    /// The client's certificate attributes: they choose its lease profile.
    attrs: Attributes,
}

impl LeaseGate {
    /// A gate for requests from `client` (the identity of the end-to-end connection).
    pub fn new(
        manager: Arc<LeaseManager>,
        client: NodeName,
        service: ServiceName,
        mode: InjectAt,
    ) -> Self {
        LeaseGate {
            manager,
            client,
            service,
            mode,
            grants: None,
            attrs: Attributes::new(),
        }
    }

    /// The client's certificate attributes, which choose its lease profile (see
    /// [`crate::lease::profile`]). Without them only its name does.
    pub fn with_attributes(mut self, attrs: Attributes) -> Self {
        self.attrs = attrs;
        self
    }

    fn refuse(&self, reason: &'static str, message: &str) -> Verdict {
        metrics::counter!(REFUSED, "service" => self.service.as_str().to_owned(), "reason" => reason)
            .increment(1);
        tracing::warn!(
            target: "postern::audit",
            event = "policy",
            action = "request",
            node = %self.client,
            service = %self.service,
            allowed = false,
            reason,
        );
        Verdict::Answer {
            response: error_response(403, "Forbidden", message),
            reason: format!("{reason} (client {})", self.client),
        }
    }

    fn verify(&self, head: &RequestHead) -> Verdict {
        let Some(presented) = head.presented_authorization() else {
            let reason = if head.removed_credentials() == 0 {
                "no_credential"
            } else {
                "several_credentials"
            };
            return self.refuse(
                reason,
                &format!(
                    "postern outlet: a request to {} must carry exactly one Authorization field \
                     with the credential leased to this client ({}); use the postern inlet's \
                     HTTP listener for the service",
                    self.service, self.client
                ),
            );
        };
        if !self.manager.accepts(&self.client, presented) {
            return self.refuse(
                "not_own_lease",
                &format!(
                    "postern outlet: the request's credential is not a live lease of this client \
                     ({}) for {}",
                    self.client, self.service
                ),
            );
        }
        match std::str::from_utf8(presented) {
            Ok(a) => Verdict::Forward {
                authorization: Some(a.to_owned()),
            },
            // A lease is ASCII, so this cannot be one.
            Err(_) => self.refuse(
                "not_own_lease",
                "postern outlet: the request's credential is not a lease",
            ),
        }
    }

    async fn inject(&mut self, presented: Option<String>) -> Verdict {
        // A credential handed out to this very identity (`postern-inlet lease create`) is its
        // own lease too: it goes on as presented rather than being swapped for the streamed one.
        if let Some(own) = presented.filter(|p| self.manager.accepts(&self.client, p.as_bytes())) {
            return Verdict::Forward {
                authorization: Some(own),
            };
        }
        // A subscription that ended (a reload left this client without a profile, or the
        // manager stopped) is asked for again, and so refused or answered as for a new one.
        if self
            .grants
            .as_ref()
            .is_some_and(|rx| rx.has_changed().is_err())
        {
            self.grants = None;
        }
        let rx = match &mut self.grants {
            Some(rx) => rx,
            None => match self.manager.subscribe_as(&self.client, &self.attrs) {
                Ok(rx) => self.grants.insert(rx),
                Err(e) if e.is_refusal() => {
                    return self.refuse(
                        "no_profile",
                        &format!(
                            "postern outlet: {} gets no lease for {}: {e}",
                            self.client, self.service
                        ),
                    )
                }
                Err(e) => {
                    return Verdict::NoLease {
                        reason: format!("the outlet cannot lease a credential: {e}"),
                    }
                }
            },
        };
        current_lease(rx, LEASE_WAIT).await
    }
}

/// Waits up to `wait` for a live (unexpired) lease on `rx` and says to forward with it, or
/// why there is none. Shared by the gates that put a lease into requests at the outlet.
pub async fn current_lease(
    rx: &mut watch::Receiver<Option<LeaseGrant>>,
    wait: Duration,
) -> Verdict {
    use crate::public::access::now_ms;
    let live = rx.wait_for(|g| g.as_ref().is_some_and(|g| g.expires_at_ms > now_ms()));
    match tokio::time::timeout(wait, live).await {
        Ok(Ok(grant)) => match grant.as_ref() {
            Some(g) => Verdict::Forward {
                authorization: Some(g.credential.authorization()),
            },
            None => Verdict::NoLease {
                reason: "no lease".into(),
            },
        },
        Ok(Err(_)) => Verdict::NoLease {
            reason: "the lease manager stopped".into(),
        },
        Err(_) => Verdict::NoLease {
            reason: format!(
                "no credential could be leased within {} s (the outlet's log says why)",
                wait.as_secs()
            ),
        },
    }
}

impl Gate for LeaseGate {
    fn check(&mut self, head: &mut RequestHead) -> impl Future<Output = Verdict> + Send {
        let (verify, presented) = match self.mode {
            InjectAt::Inlet => (Some(self.verify(head)), None),
            InjectAt::Outlet => (
                None,
                head.presented_authorization()
                    .and_then(|a| std::str::from_utf8(a).ok())
                    .map(str::to_owned),
            ),
        };
        async move {
            match verify {
                Some(v) => v,
                None => self.inject(presented).await,
            }
        }
    }
}
