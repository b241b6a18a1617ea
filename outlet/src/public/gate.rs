//! The access gate in front of a public service: every request needs a live access grant.
//!
//! A browser gets in by opening an access link, `/_postern/access?grant=<secret>`: if the grant
//! is live, the answer sets a `Secure`, `HttpOnly`, `SameSite=Lax` cookie holding the grant's
//! secret (expiring with the grant) and redirects to `/`. Every later request is checked against
//! the [`AccessStore`] again, so revoking or expiry takes effect at the next request, not only
//! at the next connection. Requests without a live grant get a 403 page saying how to get one.
//!
//! For a service with leased credentials (InfluxDB), each grant gets its own lease from the
//! outlet's lease manager, put into every request it makes by the shared HTTP filter (the
//! client's own `Authorization` and `u`/`p` are removed).

use super::access::{now_ms, AccessStore, Denied, GrantInfo};
use crate::lease::LeaseManager;
use postern_net::stream::http_proxy::{Gate, Verdict};
use postern_proto::http::RequestHead;
use postern_proto::lease::LeaseGrant;
use postern_proto::name::{NodeName, ServiceName};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The path of access links.
pub const ACCESS_PATH: &str = "/_postern/access";
/// The cookie holding the grant's secret.
pub const COOKIE: &str = "postern_access";
/// How long a request waits for its grant's first lease before a 503.
pub const LEASE_WAIT: Duration = Duration::from_secs(15);

/// One connection's gate.
pub struct AccessGate {
    store: Arc<AccessStore>,
    service: ServiceName,
    lease: Option<Arc<LeaseManager>>,
    /// Lease subscriptions by grant id, kept while the connection lasts.
    subs: HashMap<String, watch::Receiver<Option<LeaseGrant>>>,
    /// Cancelled when a grant this connection was let in under is revoked.
    closer: Arc<tokio_util::sync::CancellationToken>,
    /// The grants watched for revocation.
    watched: std::collections::HashSet<String>,
}

impl AccessGate {
    /// A gate for `service`; with `lease`, each grant's requests carry a leased credential.
    pub fn new(
        store: Arc<AccessStore>,
        service: ServiceName,
        lease: Option<Arc<LeaseManager>>,
    ) -> Self {
        Self {
            store,
            service,
            lease,
            subs: HashMap::new(),
            closer: Arc::default(),
            watched: Default::default(),
        }
    }

    async fn decide(&mut self, head: &mut RequestHead) -> Verdict {
        let now = now_ms();
        if head.path() == ACCESS_PATH {
            let secret = query_param(head.target(), "grant").unwrap_or_default();
            return match self.store.check(secret, &self.service, now) {
                Ok(info) => {
                    self.count("link");
                    tracing::info!(target: "postern::audit", event = "access", grant = %info.id, service = %self.service, attrs = ?info.attrs, "access link opened");
                    Verdict::Answer {
                        response: redirect_with_cookie(secret, info.expires_at_ms - now),
                        reason: format!("access link of grant {} opened", info.id),
                    }
                }
                Err(denied) => self.forbidden(denied),
            };
        }
        let mut denied = Denied::Missing;
        let mut granted = None;
        for value in head.field_values("cookie") {
            for secret in cookie_values(value, COOKIE) {
                match self.store.check(secret, &self.service, now) {
                    Ok(info) => {
                        granted = Some(info);
                        break;
                    }
                    Err(d) => denied = d,
                }
            }
        }
        let Some(info) = granted else {
            return self.forbidden(denied);
        };
        if self.watched.insert(info.id.clone()) {
            self.store.watch(&info.id, &self.closer);
        }
        // The grant's secret is for the gate only: the service never sees it.
        head.remove_cookie(COOKIE);
        self.count("allowed");
        match &self.lease {
            None => Verdict::Forward {
                authorization: None,
            },
            Some(manager) => self.leased(manager.clone(), &info).await,
        }
    }

    /// The grant's current lease as an `Authorization` value, waiting for the first one.
    async fn leased(&mut self, manager: Arc<LeaseManager>, info: &GrantInfo) -> Verdict {
        // A subscription that ended (a reload left the grant without a profile) is asked for
        // again, and so refused as a new one would be.
        if self
            .subs
            .get(&info.id)
            .is_some_and(|rx| rx.has_changed().is_err())
        {
            self.subs.remove(&info.id);
        }
        let rx = match self.subs.get_mut(&info.id) {
            Some(rx) => rx,
            None => {
                let client = match NodeName::new(&format!("access-{}", info.id)) {
                    Ok(n) => n,
                    Err(e) => {
                        return Verdict::NoLease {
                            reason: format!("grant id unusable as a lease client: {e}"),
                        }
                    }
                };
                // The grant's labels choose its lease profile, as a client's attributes do.
                match manager.subscribe_as(&client, &info.attrs) {
                    Ok(rx) => self.subs.entry(info.id.clone()).or_insert(rx),
                    Err(e) if e.is_refusal() => {
                        return Verdict::Answer {
                            response: postern_proto::http::error_response(
                                403,
                                "Forbidden",
                                &format!("postern: this access grant gets no lease: {e}"),
                            ),
                            reason: e.to_string(),
                        }
                    }
                    Err(e) => {
                        return Verdict::NoLease {
                            reason: e.to_string(),
                        }
                    }
                }
            }
        };
        crate::enforce::current_lease(rx, LEASE_WAIT).await
    }

    fn count(&self, outcome: &'static str) {
        metrics::counter!("postern_outlet_public_requests_total", "service" => self.service.as_str().to_owned(), "outcome" => outcome).increment(1);
    }

    fn forbidden(&self, denied: Denied) -> Verdict {
        self.count("denied");
        tracing::info!(target: "postern::audit", event = "access", service = %self.service, allowed = false, reason = %denied, "request refused");
        Verdict::Answer {
            response: forbidden_page(&self.service, &denied),
            reason: denied.to_string(),
        }
    }
}

impl Gate for AccessGate {
    fn check(&mut self, head: &mut RequestHead) -> impl Future<Output = Verdict> + Send {
        self.decide(head)
    }

    fn withdrawn(&self) -> Option<tokio_util::sync::CancellationToken> {
        Some(self.closer.as_ref().clone())
    }
}

/// The value of query parameter `name` in `target` (not percent-decoded: grant secrets are
/// URL-safe base64).
fn query_param<'a>(target: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = target.split_once('?')?;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The values of cookie `name` in one `Cookie` field (`a=1; b=2`).
fn cookie_values<'a>(field: &'a [u8], name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    std::str::from_utf8(field)
        .unwrap_or_default()
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .filter(move |(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// 302 to `/`, setting the grant cookie for as long as the grant lives.
fn redirect_with_cookie(secret: &str, remaining_ms: u64) -> Vec<u8> {
    let max_age = remaining_ms / 1000;
    format!(
        "HTTP/1.1 302 Found\r\nLocation: /\r\n\
         Set-Cookie: {COOKIE}={secret}; Max-Age={max_age}; Path=/; Secure; HttpOnly; SameSite=Lax\r\n\
         Cache-Control: no-store\r\nReferrer-Policy: no-referrer\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// The 403 page: what is missing and how to get access.
fn forbidden_page(service: &ServiceName, denied: &Denied) -> Vec<u8> {
    let body = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Access needed</title></head>\n\
         <body style=\"font-family: sans-serif; margin: 40px\">\n\
         <h1>Access needed</h1>\n\
         <p>This page ({service}) is reached through postern and needs an access link: {denied}.</p>\n\
         <p>Ask the operator of this service for a link. They make one on the outlet with:</p>\n\
         <pre>postern-outlet access create --service {service} --ttl 1h</pre>\n\
         <p>Open the link it prints in this browser; it lets you in until it expires.</p>\n\
         </body></html>\n"
    );
    format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/html; charset=utf-8\r\n\
         Cache-Control: no-store\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_cookie_parsing() {
        assert_eq!(
            query_param("/_postern/access?x=1&grant=abc-_9", "grant"),
            Some("abc-_9")
        );
        assert_eq!(query_param("/_postern/access", "grant"), None);
        let found: Vec<&str> =
            cookie_values(b"a=1; postern_access=s1;postern_access=\"s2\"", COOKIE).collect();
        assert_eq!(found, vec!["s1", "s2"]);
        assert_eq!(cookie_values(b"\xff\xfe", COOKIE).count(), 0);
    }

    #[test]
    fn redirect_sets_a_locked_down_cookie() {
        let r = String::from_utf8(redirect_with_cookie("sec", 3_600_500)).expect("utf8");
        assert!(r.starts_with("HTTP/1.1 302 Found\r\n"), "{r}");
        assert!(r.contains("\r\nLocation: /\r\n"));
        assert!(r.contains(
            "Set-Cookie: postern_access=sec; Max-Age=3600; Path=/; Secure; HttpOnly; SameSite=Lax\r\n"
        ));
    }
}
