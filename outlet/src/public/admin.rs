//! The access admin channel: how `postern-outlet access create|list|revoke` reaches the running
//! outlet, which holds the access store's lock.
//!
//! Same shape as the lease admin socket ([`crate::lease::admin`]), served by
//! [`crate::admin_socket`]: a Unix socket `<state_dir>/access.sock`, mode 0600, one JSON line
//! per request and per answer:
//!
//! ```text
//! > {"op":"create","service":"influxdb","ttl_ms":3600000,"attrs":{"team":"ops"}}
//! < {"result":"created","grant":{"id":"…",…},"link":"https://influxdb.…/_postern/access?grant=…"}
//! > {"op":"list"}
//! < {"result":"grants","grants":[{"id":"…","service":"influxdb",…}]}
//! > {"op":"revoke","id":"…"}
//! < {"result":"revoked","grant":{…}}
//! ```
//!
//! `create` is the one answer holding a secret (inside the link), on purpose: it is how an
//! operator hands out access.

use super::access::{now_ms, GrantInfo};
use super::Public;
use crate::admin_socket::{self, AdminError, Channel};
use postern_proto::name::ServiceName;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The socket's file name inside the state directory.
pub const SOCKET_FILE: &str = "access.sock";

/// The socket path for a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_FILE)
}

/// A command for the running outlet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Make a grant for `service`, valid for `ttl_ms`, labelled with `attrs`.
    Create {
        service: ServiceName,
        ttl_ms: u64,
        #[serde(default)]
        attrs: BTreeMap<String, String>,
    },
    /// List the grants.
    List,
    /// Revoke one grant now.
    Revoke { id: String },
}

/// An access link: holds the grant's secret, so `Debug` does not show it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Link(pub String);

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Link(..)")
    }
}

/// The outlet's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Created { grant: GrantInfo, link: Link },
    Grants { grants: Vec<GrantInfo> },
    Revoked { grant: GrantInfo },
    Error { message: String },
}

fn format_time(ms: u64) -> String {
    crate::lease::backend::format_rfc3339(ms)
}

fn format_attrs(attrs: &BTreeMap<String, String>) -> String {
    let v: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

impl Response {
    /// Human-readable text for the command line; for `Created`, the link to hand out.
    pub fn to_text(&self) -> String {
        match self {
            Response::Created { grant, link } => format!(
                "grant:    {}\nservice:  {}\nexpires:  {}\nattrs:    {}\nlink:     {}\n",
                grant.id,
                grant.service,
                format_time(grant.expires_at_ms),
                format_attrs(&grant.attrs),
                link.0
            ),
            Response::Grants { grants } => {
                let now = now_ms();
                let mut out = format!(
                    "{:<16}  {:<16}  {:<20}  {:<8}  {}\n",
                    "GRANT", "SERVICE", "EXPIRES", "STATE", "ATTRS"
                );
                for g in grants {
                    let state = if g.expires_at_ms > now {
                        "active"
                    } else {
                        "expired"
                    };
                    out.push_str(&format!(
                        "{:<16}  {:<16}  {:<20}  {:<8}  {}\n",
                        g.id,
                        g.service.as_str(),
                        format_time(g.expires_at_ms),
                        state,
                        format_attrs(&g.attrs)
                    ));
                }
                out
            }
            Response::Revoked { grant } => format!("revoked {}\n", grant.id),
            Response::Error { message } => format!("error: {message}\n"),
        }
    }
}

/// The access channel of the admin socket: answers with the public services' grant store.
struct AccessChannel(Arc<Public>);

impl Channel for AccessChannel {
    type Request = Request;
    type Response = Response;
    const NAME: &'static str = "access admin";

    fn bad_request(message: String) -> Response {
        Response::Error { message }
    }

    async fn answer(&self, req: Request) -> Response {
        dispatch(&self.0, req)
    }
}

/// Binds the access admin socket and serves it until `shutdown`, then removes it.
pub async fn serve(
    public: Arc<Public>,
    path: &Path,
    shutdown: CancellationToken,
) -> Result<(), AdminError> {
    let listener = admin_socket::bind(path)?;
    admin_socket::serve(Arc::new(AccessChannel(public)), listener, path, shutdown).await;
    Ok(())
}

fn dispatch(public: &Public, req: Request) -> Response {
    let result = match req {
        Request::Create {
            service,
            ttl_ms,
            attrs,
        } => {
            if !public.services.contains_key(&service) {
                Err(super::access::AccessError::NotPublic(service))
            } else {
                public
                    .access
                    .create(&service, Duration::from_millis(ttl_ms), attrs)
                    .map(|g| {
                        tracing::info!(target: "postern::audit", event = "access_grant", grant = %g.info.id, service = %g.info.service, attrs = ?g.info.attrs, expires_at_ms = g.info.expires_at_ms, "access grant created");
                        let link = public.link(&service, g.secret.expose()).unwrap_or_default();
                        Response::Created {
                            grant: g.info,
                            link: Link(link),
                        }
                    })
            }
        }
        Request::List => Ok(Response::Grants {
            grants: public.access.list(),
        }),
        Request::Revoke { id } => public.access.revoke(&id).map(|grant| {
            tracing::info!(target: "postern::audit", event = "access_revoke", grant = %grant.id, service = %grant.service, "access grant revoked");
            Response::Revoked { grant }
        }),
    };
    result.unwrap_or_else(|e| Response::Error {
        message: e.to_string(),
    })
}

/// Sends one request to the outlet listening at `path`.
pub async fn client_request(path: &Path, request: &Request) -> Result<Response, AdminError> {
    admin_socket::json_request(path, request).await
}
