//! The lease admin channel: how `postern-outlet lease create|list|show|revoke` reaches the
//! running outlet (which holds the lease store's lock).
//!
//! A Unix socket, by default `<state_dir>/lease.sock`, mode 0600 (only the outlet's own user
//! can connect; it is made under a temporary name, restricted, then renamed into place, so it is
//! never reachable with wider permissions). The protocol is JSON lines: each request is one
//! line, each answer one line. Requests and answers are [`Request`] and [`Response`], tagged by
//! `"op"` and `"result"`:
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
//! credential by hand. Lines are limited to [`MAX_LINE`] bytes and each request must arrive
//! within [`REQUEST_TIMEOUT`].

use super::{LeaseError, LeaseInfo, LeaseManager};
use postern_proto::lease::{Credential, LeaseGrant};
use postern_proto::name::NodeName;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// The socket's file name inside the state directory.
pub const SOCKET_FILE: &str = "lease.sock";
/// Longest request or answer line.
pub const MAX_LINE: usize = 64 * 1024;
/// How long the server waits for a request line, and the client for an answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
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
    /// Make a lease for `client` (not streamed, not renewed; revoked at expiry).
    Create { client: NodeName },
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
                    "{:<16}  {:<24}  {:<8}  {:<20}  {}\n",
                    "LEASE", "CLIENT", "STATE", "EXPIRES", "CURRENT"
                );
                for l in leases {
                    out.push_str(&format!(
                        "{:<16}  {:<24}  {:<8}  {:<20}  {}\n",
                        l.lease_id,
                        l.client,
                        l.state,
                        super::backend::format_rfc3339(l.expires_at_ms),
                        if l.current { "yes" } else { "" }
                    ));
                }
                out
            }
            Response::Lease { lease } => format!(
                "lease:      {}\nclient:     {}\nstate:      {}\nbackend id: {}\ncreated:    {}\n\
                 expires:    {}\ncurrent:    {}\nrevoke failures: {}\n",
                lease.lease_id,
                lease.client,
                lease.state,
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

/// Why the admin channel failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("lease admin socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot reach the outlet at {path} (is it running with this state directory?): {source}"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lease admin: the outlet did not answer within {0:?}")]
    Timeout(Duration),
    #[error("lease admin: bad message: {0}")]
    Protocol(String),
}

/// Binds the admin socket at `path` and serves it until `shutdown` is cancelled, then removes
/// it.
pub async fn serve(
    manager: Arc<LeaseManager>,
    path: &Path,
    shutdown: CancellationToken,
) -> Result<(), AdminError> {
    let listener = bind(path)?;
    serve_listener(manager, listener, path, shutdown).await;
    Ok(())
}

/// Serves an already bound admin socket (see [`bind`]) until `shutdown` is cancelled, then
/// removes the socket file at `path`. Binding first lets a caller know the socket is ready
/// before anything connects.
pub async fn serve_listener(
    manager: Arc<LeaseManager>,
    listener: UnixListener,
    path: &Path,
    shutdown: CancellationToken,
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "lease admin: accept failed");
                        continue;
                    }
                };
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    tracing::warn!("lease admin: too many connections; refusing one");
                    continue;
                };
                let m = manager.clone();
                let stop = shutdown.clone();
                conns.spawn(async move {
                    let _permit = permit;
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        r = handle(m, stream) => if let Err(e) = r {
                            tracing::debug!(error = %e, "lease admin connection ended");
                        }
                    }
                });
            }
        }
    }
    conns.abort_all();
    let _ = std::fs::remove_file(path);
}

/// Binds the admin socket at `path`: under a temporary name, restricted to mode 0600, then
/// renamed into place. A stale socket left at `path` by a previous run is replaced.
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let io = |source| AdminError::Io {
        path: path.to_owned(),
        source,
    };
    // A socket left by a previous run: the store lock guarantees no other outlet uses this
    // state directory, so it is stale. Anything else at that path is not ours to remove.
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(io)?,
        Ok(_) => {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )))
        }
        Err(_) => {}
    }
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(SOCKET_FILE),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(io)?;
    let renamed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = renamed {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(listener)
}

async fn handle(manager: Arc<LeaseManager>, stream: UnixStream) -> Result<(), AdminError> {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    loop {
        let line = match tokio::time::timeout(REQUEST_TIMEOUT, read_line(&mut reader)).await {
            Err(_) => return Err(AdminError::Timeout(REQUEST_TIMEOUT)),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(line))) => line,
        };
        let response = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => dispatch(&manager, req).await,
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        let mut out =
            serde_json::to_vec(&response).map_err(|e| AdminError::Protocol(e.to_string()))?;
        out.push(b'\n');
        w.write_all(&out).await.map_err(|source| AdminError::Io {
            path: PathBuf::from(SOCKET_FILE),
            source,
        })?;
        zeroize::Zeroize::zeroize(&mut out);
    }
}

async fn dispatch(manager: &LeaseManager, req: Request) -> Response {
    let result: Result<Response, LeaseError> = match req {
        Request::Create { client } => manager
            .create(&client)
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

/// Reads one line (without the newline); `None` at a clean end of stream. Shared with the
/// access admin socket ([`crate::public::admin`]).
pub(crate) async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> Result<Option<Vec<u8>>, AdminError> {
    let mut buf = Vec::new();
    let mut limited = r.take(MAX_LINE as u64 + 1);
    let n = limited
        .read_until(b'\n', &mut buf)
        .await
        .map_err(|e| AdminError::Protocol(e.to_string()))?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(AdminError::Protocol(if buf.len() > MAX_LINE {
            format!("line longer than {MAX_LINE} bytes")
        } else {
            "line not terminated".into()
        }));
    }
    buf.pop();
    Ok(Some(buf))
}

/// Sends one request to the outlet listening at `path` and returns its answer.
pub async fn client_request(path: &Path, request: &Request) -> Result<Response, AdminError> {
    json_request(path, request).await
}

/// Sends one JSON-lines request to the admin socket at `path` and reads the answer (shared with
/// the access admin socket).
pub async fn json_request<Req: Serialize, Resp: serde::de::DeserializeOwned>(
    path: &Path,
    request: &Req,
) -> Result<Resp, AdminError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| AdminError::Connect {
            path: path.to_owned(),
            source,
        })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(request).map_err(|e| AdminError::Protocol(e.to_string()))?;
    line.push(b'\n');
    let io = |source| AdminError::Io {
        path: path.to_owned(),
        source,
    };
    w.write_all(&line).await.map_err(io)?;
    w.shutdown().await.map_err(io)?;
    let mut reader = BufReader::new(r);
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, read_line(&mut reader))
        .await
        .map_err(|_| AdminError::Timeout(REQUEST_TIMEOUT))??
        .ok_or_else(|| AdminError::Protocol("the outlet closed the connection".into()))?;
    let response = serde_json::from_slice(&answer).map_err(|e| AdminError::Protocol(e.to_string()));
    let mut answer = answer;
    zeroize::Zeroize::zeroize(&mut answer);
    response
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
                client: NodeName::new("inlet-1").expect("name")
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

    #[tokio::test]
    async fn oversized_and_unterminated_lines_are_refused() {
        let big = vec![b'a'; MAX_LINE + 10];
        let mut r = BufReader::new(big.as_slice());
        assert!(read_line(&mut r).await.is_err());
        let mut r = BufReader::new(&b"{\"op\":\"list\"}"[..]);
        assert!(read_line(&mut r).await.is_err());
        let mut r = BufReader::new(&b"{\"op\":\"list\"}\n"[..]);
        assert_eq!(
            read_line(&mut r).await.expect("line"),
            Some(b"{\"op\":\"list\"}".to_vec())
        );
        let mut r = BufReader::new(&b""[..]);
        assert_eq!(read_line(&mut r).await.expect("eof"), None);
    }
}
