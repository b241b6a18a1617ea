//! The Unix admin socket of a running node: how its command line (`postern-outlet lease …`,
//! `postern-outlet access …`, `postern-inlet lease …`) reaches the process that holds the state
//! directory's lock. Each channel brings its own requests and answers ([`Channel`]); binding,
//! framing, limits and the serve loop are written once here.
//!
//! The socket lives in the state directory, mode 0600: only the node's own user can connect.
//! It is made under a temporary name, restricted, then renamed into place, so it is never
//! reachable with wider permissions. The protocol is JSON lines: each request is one line, each
//! answer one line. Lines are limited to [`MAX_LINE`] bytes and each request must arrive within
//! [`REQUEST_TIMEOUT`]. Answers may hold a secret (a credential, an access link), so their bytes
//! are wiped once written or read.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// Longest request or answer line.
pub const MAX_LINE: usize = 64 * 1024;
/// How long the server waits for a request line, and the client for an answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Most connections served at once.
const MAX_CONNECTIONS: usize = 16;

/// Why an admin channel failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    #[error("admin socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot reach the running node at {path} (is it running with this state directory?): {source}"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("admin socket: the node did not answer within {0:?}")]
    Timeout(Duration),
    #[error("admin socket: bad message: {0}")]
    Protocol(String),
}

/// One admin channel: what its lines mean and how the node answers them.
pub trait Channel: Send + Sync + 'static {
    /// A request line, parsed.
    type Request: DeserializeOwned + Send;
    /// An answer line, before serializing.
    type Response: Serialize + Send;
    /// How the channel is named in logs (`"lease admin"`).
    const NAME: &'static str;
    /// The answer to a line that is not a request.
    fn bad_request(message: String) -> Self::Response;
    /// Carries out one request.
    fn answer(&self, request: Self::Request) -> impl Future<Output = Self::Response> + Send;
}

/// Binds the admin socket at `path`: under a temporary name, restricted to mode 0600, then
/// renamed into place. A stale socket left at `path` by a previous run is replaced.
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let io = |source| AdminError::Io {
        path: path.to_owned(),
        source,
    };
    // A socket left by a previous run: the state directory's lock guarantees no other process
    // uses it, so it is stale. Anything else at that path is not ours to remove.
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
            .unwrap_or("admin.sock"),
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

/// Serves an already bound admin socket (see [`bind`]) until `shutdown` is cancelled, then
/// removes the socket file at `path`. At most `MAX_CONNECTIONS` connections are served at
/// once; more are refused rather than queued, so a stuck client cannot pile up work.
pub async fn serve<C: Channel>(
    channel: Arc<C>,
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
                        tracing::warn!(error = %e, channel = C::NAME, "admin socket: accept failed");
                        continue;
                    }
                };
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    tracing::warn!(channel = C::NAME, "admin socket: too many connections; refusing one");
                    continue;
                };
                let channel = channel.clone();
                let stop = shutdown.clone();
                let path = path.to_owned();
                conns.spawn(async move {
                    let _permit = permit;
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        r = handle(&*channel, stream, &path) => if let Err(e) = r {
                            tracing::debug!(error = %e, channel = C::NAME, "admin connection ended");
                        }
                    }
                });
            }
        }
    }
    conns.abort_all();
    let _ = std::fs::remove_file(path);
}

/// Answers the requests of one connection, one line each, until the client closes it.
async fn handle<C: Channel>(
    channel: &C,
    stream: UnixStream,
    path: &Path,
) -> Result<(), AdminError> {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    loop {
        let line = match tokio::time::timeout(REQUEST_TIMEOUT, read_line(&mut reader)).await {
            Err(_) => return Err(AdminError::Timeout(REQUEST_TIMEOUT)),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(line))) => line,
        };
        let response = match serde_json::from_slice::<C::Request>(&line) {
            Ok(req) => channel.answer(req).await,
            Err(e) => C::bad_request(format!("bad request: {e}")),
        };
        let mut out =
            serde_json::to_vec(&response).map_err(|e| AdminError::Protocol(e.to_string()))?;
        out.push(b'\n');
        let written = w.write_all(&out).await;
        zeroize::Zeroize::zeroize(&mut out);
        written.map_err(|source| AdminError::Io {
            path: path.to_owned(),
            source,
        })?;
    }
}

/// Reads one line (without the newline); `None` at a clean end of stream.
pub async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
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

/// Sends one JSON-lines request to the admin socket at `path` and reads the answer.
pub async fn json_request<Req: Serialize, Resp: DeserializeOwned>(
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
        .ok_or_else(|| AdminError::Protocol("the node closed the connection".into()))?;
    let response = serde_json::from_slice(&answer).map_err(|e| AdminError::Protocol(e.to_string()));
    let mut answer = answer;
    zeroize::Zeroize::zeroize(&mut answer);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

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
