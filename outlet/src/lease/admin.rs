//! The lease admin channel: how `postern-outlet lease create|list|show|revoke` reaches the
//! running outlet (which holds the lease store's lock).
//!
//! A Unix socket, by default `<state_dir>/lease.sock`, served by [`crate::admin_socket`]
//! (mode 0600, JSON lines, size and time limits). Requests and answers are [`Request`] and
//! [`Response`], tagged by `"op"` and `"result"`:
//!
//! ```text
//! > {"op":"create","client":"inlet-1"}
//! < {"result":"created","grant":{"lease_id":"…","credential":{"Token":"…"},"expires_at_ms":…}}
//! > {"op":"list"}
//! < {"result":"leases","leases":[{"lease_id":"…","client":"inlet-1","state":"active",…}]}
//! > {"op":"show","lease_id":"…"}
//! < {"result":"lease","lease":{…}}
//! > {"op":"revoke","lease_id":"…"}
//! < {"result":"revoked","lease_id":"…"}
//! < {"result":"error","message":"lease … not found"}
//! ```
//!
//! `create` is the one answer that carries a secret, on purpose: it is how an operator gets a
//! credential by hand.

use super::error::LeaseError;
use super::manager::{LeaseInfo, LeaseManager};
use crate::admin_socket::{self, AdminError, Channel};
use postern_proto::lease::{Credential, LeaseGrant};
use postern_proto::name::NodeName;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

/// The socket's file name inside the state directory.
pub const SOCKET_FILE: &str = "lease.sock";

/// The socket path for a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_FILE)
}

/// A command for the running outlet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Make a lease for `client` (not streamed, not renewed; revoked at expiry), with the
    /// profile `attrs` choose.
    Create {
        client: NodeName,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        attrs: BTreeMap<String, String>,
    },
    /// List every lease.
    List,
    /// Show one lease.
    Show { lease_id: String },
    /// Revoke one lease now.
    Revoke { lease_id: String },
}

/// The outlet's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    /// The new lease, credential included.
    Created {
        grant: LeaseGrant,
    },
    Leases {
        leases: Vec<LeaseInfo>,
    },
    Lease {
        lease: LeaseInfo,
    },
    Revoked {
        lease_id: String,
    },
    Error {
        message: String,
    },
}

impl Response {
    /// Human-readable text for the command line. For `Created` this prints the credential: it
    /// is what `lease create` is for.
    pub fn to_text(&self) -> String {
        match self {
            Response::Created { grant } => {
                let mut out = format!(
                    "lease:      {}\nexpires:    {}\n",
                    grant.lease_id,
                    super::backend::format_rfc3339(grant.expires_at_ms)
                );
                match &grant.credential {
                    Credential::Token(t) => out.push_str(&format!("token:      {t}\n")),
                    Credential::Basic { username, password } => {
                        out.push_str(&format!("username:   {username}\npassword:   {password}\n"))
                    }
                }
                out.push_str(&format!(
                    "header:     Authorization: {}\n",
                    grant.credential.authorization()
                ));
                out
            }
            Response::Leases { leases } => {
                let mut out = format!(
                    "{:<16}  {:<24}  {:<8}  {:<16}  {:<20}  {}\n",
                    "LEASE", "CLIENT", "STATE", "PROFILE", "EXPIRES", "CURRENT"
                );
                for l in leases {
                    out.push_str(&format!(
                        "{:<16}  {:<24}  {:<8}  {:<16}  {:<20}  {}\n",
                        l.lease_id,
                        l.client,
                        l.state,
                        profile_text(l),
                        super::backend::format_rfc3339(l.expires_at_ms),
                        if l.current { "yes" } else { "" }
                    ));
                }
                out
            }
            Response::Lease { lease } => format!(
                "lease:      {}\nclient:     {}\nstate:      {}\nprofile:    {}\nbackend id: {}\n\
                 created:    {}\nexpires:    {}\ncurrent:    {}\nrevoke failures: {}\n",
                lease.lease_id,
                lease.client,
                lease.state,
                profile_text(lease),
                lease.backend_id.as_deref().unwrap_or("-"),
                super::backend::format_rfc3339(lease.created_at_ms),
                super::backend::format_rfc3339(lease.expires_at_ms),
                lease.current,
                lease.revoke_failures
            ),
            Response::Revoked { lease_id } => format!("revoked {lease_id}\n"),
            Response::Error { message } => format!("error: {message}\n"),
        }
    }
}

/// A lease's profile for listings, marked when the lease was handed out to its client.
fn profile_text(l: &LeaseInfo) -> String {
    let name = l.profile.as_deref().unwrap_or("-");
    if l.handed_out {
        format!("{name} (handed out)")
    } else {
        name.to_owned()
    }
}

/// The lease channel of the admin socket: answers with the lease manager.
struct LeaseChannel(Arc<LeaseManager>);

impl Channel for LeaseChannel {
    type Request = Request;
    type Response = Response;
    const NAME: &'static str = "lease admin";

    fn bad_request(message: String) -> Response {
        Response::Error { message }
    }

    async fn answer(&self, req: Request) -> Response {
        dispatch(&self.0, req).await
    }
}

/// Binds the admin socket at `path` and serves it until `shutdown` is cancelled, then removes
/// it.
pub async fn serve(
    manager: Arc<LeaseManager>,
    path: &Path,
    shutdown: CancellationToken,
) -> Result<(), AdminError> {
    let listener = admin_socket::bind(path)?;
    serve_listener(manager, listener, path, shutdown).await;
    Ok(())
}

/// Serves an already bound admin socket (see [`admin_socket::bind`]) until `shutdown` is
/// cancelled, then removes the socket file at `path`. Binding first lets a caller know the
/// socket is ready before anything connects.
pub async fn serve_listener(
    manager: Arc<LeaseManager>,
    listener: UnixListener,
    path: &Path,
    shutdown: CancellationToken,
) {
    admin_socket::serve(Arc::new(LeaseChannel(manager)), listener, path, shutdown).await;
}

async fn dispatch(manager: &LeaseManager, req: Request) -> Response {
    let result: Result<Response, LeaseError> = match req {
        Request::Create { client, attrs } => manager
            .create_as(&client, &attrs)
            .await
            .map(|grant| Response::Created { grant }),
        Request::List => manager
            .list()
            .await
            .map(|leases| Response::Leases { leases }),
        Request::Show { lease_id } => manager
            .show(&lease_id)
            .await
            .map(|lease| Response::Lease { lease }),
        Request::Revoke { lease_id } => manager
            .revoke(&lease_id)
            .await
            .map(|()| Response::Revoked { lease_id }),
    };
    result.unwrap_or_else(|e| Response::Error {
        message: e.to_string(),
    })
}

/// Sends one request to the outlet listening at `path` and returns its answer.
pub async fn client_request(path: &Path, request: &Request) -> Result<Response, AdminError> {
    admin_socket::json_request(path, request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r: Request =
            serde_json::from_str(r#"{"op":"create","client":"inlet-1"}"#).expect("parse");
        assert_eq!(
            r,
            Request::Create {
                client: NodeName::new("inlet-1").expect("name"),
                attrs: BTreeMap::new(),
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::Show {
                lease_id: "ab".into()
            })
            .expect("json"),
            r#"{"op":"show","lease_id":"ab"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"create","client":"Bad Name"}"#).is_err());
    }

    #[test]
    fn created_text_shows_the_credential_and_debug_does_not() {
        let resp = Response::Created {
            grant: LeaseGrant {
                lease_id: "0123456789abcdef".into(),
                credential: Credential::Token("tok-123".into()),
                expires_at_ms: 0,
            },
        };
        let text = resp.to_text();
        assert!(
            text.contains("tok-123") && text.contains("1970-01-01T00:00:00Z"),
            "{text}"
        );
        assert!(!format!("{resp:?}").contains("tok-123"));
    }
}
