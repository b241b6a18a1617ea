//! The admin API's client side, used by `postern-relay status`: fetches the relay's state and
//! renders a summary for people.

use super::token::AdminToken;
use crate::views::{FleetView, Identities, Nodes, Routes, Services, Tickets};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

/// Time the relay has to answer one request.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer accepted.
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// Why a call to the admin API failed. Never carries the token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("no relay admin API at {addr} ({source}); is the relay running, and does its --admin-addr match?")]
    NotRunning {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the relay admin API at {addr} did not answer within {TIMEOUT:?}")]
    Timeout { addr: SocketAddr },
    #[error("talking to the relay admin API at {addr}: {message}")]
    Http { addr: SocketAddr, message: String },
    #[error("{path}: the relay answered {status}: {message}")]
    Api {
        path: String,
        status: u16,
        message: String,
    },
    #[error("{path}: unexpected answer: {message}")]
    Decode { path: String, message: String },
}

/// A client for one relay's admin API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    addr: SocketAddr,
    token: AdminToken,
}

impl AdminClient {
    pub fn new(addr: SocketAddr, token: AdminToken) -> Self {
        Self { addr, token }
    }

    /// `GET path`, decoded.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path).await
    }

    /// `POST path` (no body), decoded.
    pub async fn post<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::POST, path).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
    ) -> Result<T, ClientError> {
        let addr = self.addr;
        let http = |e: &dyn std::fmt::Display| ClientError::Http {
            addr,
            message: e.to_string(),
        };
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|source| ClientError::NotRunning { addr, source })?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .map_err(|e| http(&e))?;
            let driver = tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "admin API connection ended");
                }
            });
            let mut auth = HeaderValue::from_str(&format!("Bearer {}", self.token.expose()))
                .map_err(|_| http(&"the admin token is not a valid header value"))?;
            auth.set_sensitive(true);
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, addr.to_string())
                .header(header::AUTHORIZATION, auth)
                .body(Empty::<Bytes>::new())
                .map_err(|e| http(&e))?;
            let resp = sender.send_request(req).await.map_err(|e| http(&e))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| http(&e))?
                .to_bytes();
            driver.abort();
            Ok::<_, ClientError>((status, body))
        };
        let (status, body) = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Timeout { addr })??;
        if !status.is_success() {
            let message = serde_json::from_slice::<crate::views::ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Api {
                path: path.to_owned(),
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Everything `status` shows. Tickets and identities live in etcd in a fleet: when etcd
    /// does not answer (503) they are left out, with the reason, and the rest still shows,
    /// since that is when an operator looks.
    pub async fn status(&self) -> Result<Status, ClientError> {
        let mut unavailable = Vec::new();
        let tickets = optional(self.get("/v1/tickets").await, &mut unavailable)?;
        let identities = optional(self.get("/v1/identities").await, &mut unavailable)?;
        Ok(Status {
            nodes: self.get("/v1/nodes").await?,
            services: self.get("/v1/services").await?,
            routes: self.get("/v1/routes").await?,
            tickets,
            identities,
            unavailable,
            fleet: match self.get("/v1/fleet").await {
                Ok(f) => Some(f),
                // A relay from before the fleet view: everything else still shows.
                Err(ClientError::Api { status: 404, .. }) => None,
                Err(e) => return Err(e),
            },
        })
    }
}

/// An answer `status` can do without: a 503 (etcd unavailable) becomes `None`, its message
/// kept in `unavailable`.
fn optional<T>(
    r: Result<T, ClientError>,
    unavailable: &mut Vec<String>,
) -> Result<Option<T>, ClientError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(ClientError::Api {
            status: 503,
            message,
            ..
        }) => {
            unavailable.push(message);
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The relay's state as `postern-relay status` shows it (`--json` prints this object).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub nodes: Nodes,
    pub services: Services,
    pub routes: Routes,
    /// `None` when the relay could not read them (etcd unavailable; see `unavailable`).
    pub tickets: Option<Tickets>,
    pub identities: Option<Identities>,
    /// Why parts are missing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unavailable: Vec<String>,
    /// The fleet (`None` from a relay older than `GET /v1/fleet`).
    #[serde(default)]
    pub fleet: Option<FleetView>,
}

/// `1.5 KiB`, `3.2 MiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `45s`, `12m`, `3h`, `2d`.
fn age(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

impl Status {
    /// A summary for people: nodes, services, routes, then ticket and identity counts.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let nodes = &self.nodes.nodes;
        let _ = writeln!(out, "nodes: {}", nodes.len());
        for n in nodes {
            let role = n.role.as_deref().unwrap_or("-");
            let _ = write!(
                out,
                "  {}  role={}  {}  up {}  routes {}",
                n.name,
                role,
                n.remote_addr,
                age(n.connected_for_s),
                n.routes
            );
            if !n.services.is_empty() {
                let names: Vec<&str> = n.services.iter().map(|s| s.as_str()).collect();
                let _ = write!(out, "  serves {}", names.join(","));
            }
            if n.drained {
                out.push_str("  DRAINED");
            }
            if let Some(fp) = &n.fingerprint {
                let _ = write!(out, "  cert {}", &fp[..fp.len().min(16)]);
            }
            out.push('\n');
        }
        let services = &self.services.services;
        let _ = writeln!(out, "services: {}", services.len());
        for s in services {
            let outlets: Vec<String> = s
                .outlets
                .iter()
                .map(|o| match s.health.iter().find(|h| &h.outlet == o) {
                    Some(h) if !h.healthy => format!(
                        "{o} (UNHEALTHY: {})",
                        h.reason.as_deref().unwrap_or("no reason given")
                    ),
                    _ => o.to_string(),
                })
                .collect();
            let list = if outlets.is_empty() {
                "(no live outlet)".to_string()
            } else {
                outlets.join(", ")
            };
            let _ = writeln!(out, "  {}  outlets: {}", s.name, list);
        }
        let routes = &self.routes.routes;
        let _ = writeln!(out, "routes: {}", routes.len());
        for r in routes {
            let _ = writeln!(
                out,
                "  {}  {}  {} -> {}  {}  up {}  down {}  age {}",
                r.id,
                r.service,
                r.inlet,
                r.outlet,
                if r.direct { "direct" } else { "relayed" },
                bytes(r.bytes_from_inlet),
                bytes(r.bytes_from_outlet),
                age(r.age_s)
            );
        }
        match &self.tickets {
            Some(tickets) => render_tickets(tickets, &mut out),
            None => out.push_str("tickets: unknown (the relay cannot read them now)\n"),
        }
        match &self.identities {
            Some(ids) => render_identities(ids, &mut out),
            None => out.push_str("identities: unknown (the relay cannot read them now)\n"),
        }
        for why in &self.unavailable {
            let _ = writeln!(out, "  ({why})");
        }
        if let Some(fleet) = &self.fleet {
            out.push_str(&render_fleet(fleet));
        }
        out
    }
}

/// The tickets line of `status`: counts by state.
fn render_tickets(tickets: &Tickets, out: &mut String) {
    if tickets.authority {
        let count = |s: &str| tickets.tickets.iter().filter(|t| t.status == s).count();
        let _ = writeln!(
            out,
            "tickets: {} ({} valid, {} used, {} expired)",
            tickets.tickets.len(),
            count("valid"),
            count("used"),
            count("expired")
        );
    } else {
        out.push_str("tickets: - (this relay does not run the authority)\n");
    }
}

/// The identities line of `status`: how many, and which are revoked.
fn render_identities(ids: &Identities, out: &mut String) {
    let ids = &ids.identities;
    let revoked: Vec<&str> = ids
        .iter()
        .filter(|i| i.revoked)
        .map(|i| i.name.as_str())
        .collect();
    let _ = write!(out, "identities: {} ({} revoked", ids.len(), revoked.len());
    if !revoked.is_empty() {
        let _ = write!(out, ": {}", revoked.join(", "));
    }
    out.push_str(")\n");
}

/// The fleet part of `status`: where the state lives and whether etcd answers, then each
/// relay with its load and the age of its last report, then where outlets are attached.
pub fn render_fleet(f: &FleetView) -> String {
    let mut out = String::new();
    let conn = match f.connected {
        None => "",
        Some(true) => ", connected",
        Some(false) => ", NOT CONNECTED (routes keep forwarding; enrollment, revocations and drains wait for etcd)",
    };
    let _ = writeln!(out, "fleet: {}{conn}", f.state);
    if let Some(e) = &f.relays_error {
        let _ = writeln!(out, "relays: unknown ({e})");
    } else {
        let _ = writeln!(out, "relays: {}", f.relays.len());
    }
    for r in &f.relays {
        let _ = writeln!(
            out,
            "  {}{}  {}  nodes {}  routes {}  updated {} ago",
            r.name,
            if r.this { " (this relay)" } else { "" },
            if r.addresses.is_empty() {
                "-".to_string()
            } else {
                r.addresses.join(",")
            },
            r.nodes,
            r.routes,
            age(r.updated_age_ms / 1000)
        );
    }
    let scope = match f.attachments_scope.as_str() {
        "this-relay" => " (outlets connected to this relay)",
        "none" => " (not known here)",
        _ => "",
    };
    let _ = writeln!(out, "outlets attached: {}{scope}", f.attachments.len());
    for a in &f.attachments {
        let services: Vec<&str> = a.services.iter().map(|s| s.as_str()).collect();
        let _ = writeln!(
            out,
            "  {}  relays {}  serves {}",
            a.outlet,
            a.relays.join(","),
            services.join(",")
        );
    }
    let failures: Vec<String> = f
        .etcd_failures
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if !failures.is_empty() {
        let _ = write!(out, "etcd failures: {}", failures.join(", "));
        if let (Some(e), Some(a)) = (&f.last_etcd_error, f.last_etcd_error_age_s) {
            let _ = write!(out, "; last {} ago: {e}", age(a));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(age(59), "59s");
        assert_eq!(age(600), "10m");
        assert_eq!(age(3 * 3600), "3h");
        assert_eq!(age(3 * 86400), "3d");
    }

    #[test]
    fn the_fleet_shows_relays_load_and_a_lost_etcd() {
        let mut f = FleetView {
            state: "etcd [\"http://10.0.0.1:2379\"] under /postern".into(),
            cluster: true,
            connected: Some(false),
            relays: vec![crate::views::RelayView {
                name: "relay-b".into(),
                addresses: vec!["10.0.0.2:4433".into()],
                nodes: 7,
                routes: 3,
                updated_age_ms: 4_000,
                this: true,
            }],
            attachments_scope: "this-relay".into(),
            ..Default::default()
        };
        f.etcd_failures.insert("follow".into(), 2);
        f.etcd_failures.insert("enroll".into(), 0);
        f.last_etcd_error = Some("etcd: no leader".into());
        f.last_etcd_error_age_s = Some(3);
        let text = render_fleet(&f);
        assert!(text.contains("NOT CONNECTED"), "{text}");
        assert!(
            text.contains("relay-b (this relay)  10.0.0.2:4433  nodes 7  routes 3  updated 4s ago"),
            "{text}"
        );
        assert!(
            text.contains("etcd failures: follow 2; last 3s ago: etcd: no leader"),
            "{text}"
        );
        assert!(!text.contains("enroll 0"), "{text}");
    }
}
