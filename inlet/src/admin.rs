//! The inlet's admin socket: how `postern-inlet lease create|show` reaches the running inlet.
//!
//! The running inlet holds the state directory's lock and the end-to-end connections to the
//! outlets, so the command line asks it, through a Unix socket in the state directory
//! (`<state_dir>/inlet.sock`, mode 0600, served by [`postern_net::runtime::admin_socket`]), and
//! the inlet asks the service's outlet over the end-to-end connection it already has
//! ([`postern_proto::msg::StreamOpen::HandOut`]). A second node on the same identity could not
//! run beside it (the lock), and would need a route and a handshake of its own for one answer.
//!
//! ```text
//! > {"op":"lease","service":"influxdb","fresh":true}
//! < {"result":"lease","service":"influxdb","profile":"analysts","grant":{"lease_id":"…","credential":{"Basic":{…}},"expires_at_ms":…}}
//! < {"result":"error","message":"lease profile \"sensors\" of identity … does not hand credentials out …"}
//! ```
//!
//! The answer carries the credential, on purpose: printing it is what the command is for. It
//! is written to stdout only and never logged.

use crate::node::InletHandle;
use postern_net::runtime::admin_socket::{self, AdminError, Channel};
use postern_proto::lease::{Credential, LeaseGrant};
use postern_proto::name::ServiceName;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

/// The socket's file name inside the state directory.
pub const SOCKET_FILE: &str = "inlet.sock";

/// The socket path for a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_FILE)
}

/// A command for the running inlet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// This identity's own credential for `service` (default: the inlet's only leased
    /// service): with `fresh`, a new lease; without, the one last handed out.
    Lease {
        #[serde(default)]
        service: Option<ServiceName>,
        #[serde(default)]
        fresh: bool,
    },
}

/// The inlet's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    /// The credential, its lease and the profile the outlet made it with.
    Lease {
        service: ServiceName,
        profile: String,
        grant: LeaseGrant,
    },
    Error {
        message: String,
    },
}

impl Response {
    /// The text `postern-inlet lease create|show` prints: the credential included.
    pub fn to_text(&self) -> String {
        match self {
            Response::Lease {
                service,
                profile,
                grant,
            } => {
                let mut out = format!(
                    "service:    {service}\nprofile:    {profile}\nlease:      {}\nexpires:    {}\n",
                    grant.lease_id,
                    postern_net::runtime::clock::format_rfc3339(grant.expires_at_ms)
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
            Response::Error { message } => format!("error: {message}\n"),
        }
    }
}

struct InletChannel(InletHandle);

impl Channel for InletChannel {
    type Request = Request;
    type Response = Response;
    const NAME: &'static str = "inlet admin";

    fn bad_request(message: String) -> Response {
        Response::Error { message }
    }

    async fn answer(&self, req: Request) -> Response {
        match req {
            Request::Lease { service, fresh } => {
                match self.0.hand_out(service.as_ref(), fresh).await {
                    Ok((service, profile, grant)) => Response::Lease {
                        service,
                        profile,
                        grant,
                    },
                    Err(message) => Response::Error { message },
                }
            }
        }
    }
}

/// Binds the admin socket at `path` (mode 0600) and serves it with `inlet` until `shutdown`,
/// then removes it.
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    admin_socket::bind(path)
}

/// Serves a bound admin socket (see [`bind`]) until `shutdown`, then removes the file.
pub async fn serve(
    inlet: InletHandle,
    listener: UnixListener,
    path: &Path,
    shutdown: CancellationToken,
) {
    admin_socket::serve(Arc::new(InletChannel(inlet)), listener, path, shutdown).await;
}

/// Sends one request to the inlet listening at `path` and returns its answer.
pub async fn client_request(path: &Path, request: &Request) -> Result<Response, AdminError> {
    admin_socket::json_request(path, request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form_and_answers_hide_secrets_in_debug() {
        let r: Request =
            serde_json::from_str(r#"{"op":"lease","service":"influxdb","fresh":true}"#)
                .expect("parse");
        assert_eq!(
            r,
            Request::Lease {
                service: Some(ServiceName::new("influxdb").expect("name")),
                fresh: true
            }
        );
        let r: Request = serde_json::from_str(r#"{"op":"lease"}"#).expect("defaults");
        assert_eq!(
            r,
            Request::Lease {
                service: None,
                fresh: false
            }
        );
        let resp = Response::Lease {
            service: ServiceName::new("influxdb").expect("name"),
            profile: "analysts".into(),
            grant: LeaseGrant {
                lease_id: "0123456789abcdef".into(),
                credential: Credential::Basic {
                    username: "u".into(),
                    password: "pw-secret".into(),
                },
                expires_at_ms: 1_700_000_000_123,
            },
        };
        let text = resp.to_text();
        assert!(text.contains("pw-secret"), "{text}");
        assert!(text.contains("2023-11-14T22:13:20Z"), "{text}");
        assert!(text.contains("analysts"), "{text}");
        assert!(!format!("{resp:?}").contains("pw-secret"));
    }
}
