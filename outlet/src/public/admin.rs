//! The access admin channel: how `postern-outlet access create|list|revoke` reaches the running
//! outlet, which holds the access store's lock.
//!
//! Same shape as the lease admin socket ([`crate::lease::admin`], whose helpers it uses): a Unix
//! socket `<state_dir>/access.sock`, mode 0600, one JSON line per request and per answer:
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
use crate::lease::admin::{self as lease_admin, AdminError, REQUEST_TIMEOUT};
use postern_proto::name::ServiceName;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

/// The socket's file name inside the state directory.
pub const SOCKET_FILE: &str = "access.sock";
/// Most connections served at once.
const MAX_CONNECTIONS: usize = 16;

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

/// Binds the access admin socket and serves it until `shutdown`, then removes it.
pub async fn serve(
    public: Arc<Public>,
    path: &Path,
    shutdown: CancellationToken,
) -> Result<(), AdminError> {
    let listener = lease_admin::bind(path)?;
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    tracing::warn!("access admin: too many connections; refusing one");
                    continue;
                };
                let public = public.clone();
                conns.spawn(async move {
                    let _permit = permit;
                    if let Err(e) = handle(&public, stream).await {
                        tracing::debug!(error = %e, "access admin connection ended");
                    }
                });
            }
        }
    }
    conns.abort_all();
    let _ = std::fs::remove_file(path);
    Ok(())
}

async fn handle(public: &Public, stream: UnixStream) -> Result<(), AdminError> {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    loop {
        let line = match tokio::time::timeout(REQUEST_TIMEOUT, lease_admin::read_line(&mut reader))
            .await
        {
            Err(_) => return Err(AdminError::Timeout(REQUEST_TIMEOUT)),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(line))) => line,
        };
        let response = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => dispatch(public, req),
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        let mut out =
            serde_json::to_vec(&response).map_err(|e| AdminError::Protocol(e.to_string()))?;
        out.push(b'\n');
        let written = w.write_all(&out).await;
        zeroize::Zeroize::zeroize(&mut out);
        written.map_err(|source| AdminError::Io {
            path: PathBuf::from(SOCKET_FILE),
            source,
        })?;
    }
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
                        let link = public.link(&service, &g.secret).unwrap_or_default();
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
    lease_admin::json_request(path, request).await
}
