//! The relay's admin HTTP API (JSON, versioned under `/v1`), bound to loopback by default and
//! authenticated with a bearer token kept in the state directory:
//!
//! | request                               | answer |
//! |---------------------------------------|--------|
//! | `GET /v1/nodes`                       | connected nodes: identity, attributes, address, since when |
//! | `GET /v1/services`                    | services and their live outlets |
//! | `GET /v1/routes`                      | routes: ends, service, bytes each way, age, direct or relayed |
//! | `GET /v1/tickets`                     | enrollment tickets, without their secrets |
//! | `GET /v1/identities`                  | enrolled and revoked identities |
//! | `GET /v1/fleet`                       | the fleet's relays and their load, where outlets are attached, the etcd connection |
//! | `POST /v1/identities/{name}/revoke`   | revoke an identity, effective at once |
//! | `POST /v1/nodes/{name}/drain[?timeout=10s]` | no new routes for the node; closed when its routes end or at the timeout |
//! | `POST /v1/nodes/{name}/undrain`       | let a drained node back in |
//! | `POST /v1/reload`                     | reread the config as `SIGHUP` does; 422 with the error when it is invalid (the old one stays) |
//!
//! Every answer, errors included, is a JSON object; errors are `{"error": "..."}`. Requests
//! without the right token get 401 (with `WWW-Authenticate: Bearer`) whatever their path, so
//! the API's shape is not shown to strangers either. Each connection serves one request, with a
//! deadline, and at most [`MAX_CONNECTIONS`] are served at once.

pub mod client;
pub mod token;

use crate::server::{AdminOpError, RelayHandle};
use crate::views;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use postern_proto::name::NodeName;
use serde::Serialize;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use token::{AdminToken, TokenError, TOKEN_FILE};

/// Where the admin API listens unless told otherwise: loopback, next to the relay's UDP port.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:4434";
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a client has for its whole exchange (request head, answer).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// Parses `--admin-addr`: an address, or `off` to disable the API.
pub fn parse_admin_addr(s: &str) -> Result<Option<SocketAddr>, String> {
    match s.trim() {
        "off" | "none" | "disabled" => Ok(None),
        t => t.parse().map(Some).map_err(|_| {
            format!("{s:?}: expected HOST:PORT such as {DEFAULT_ADMIN_ADDR}, or `off`")
        }),
    }
}

/// Why the admin API could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    #[error("cannot listen on {addr} for the admin API: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// Binds the admin API's TCP listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

/// What the API serves.
pub struct AdminApi {
    relay: RelayHandle,
    token: AdminToken,
    /// Default drain timeout of `POST /v1/nodes/{name}/drain`.
    drain_timeout: Duration,
    /// What `POST /v1/reload` runs (`None`: the relay has no config to reread).
    reloader: Option<Arc<crate::reload::Reloader>>,
}

impl AdminApi {
    pub fn new(relay: RelayHandle, token: AdminToken, drain_timeout: Duration) -> Self {
        Self {
            relay,
            token,
            drain_timeout,
            reloader: None,
        }
    }

    /// Serves `POST /v1/reload` with `reloader`.
    pub fn with_reloader(mut self, reloader: Arc<crate::reload::Reloader>) -> Self {
        self.reloader = Some(reloader);
        self
    }

    /// Answers one request (the whole API, without the transport).
    pub async fn answer<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        let stats = self.relay.admin_stats();
        if !self.authorized(req) {
            stats.requests_unauthorized.fetch_add(1, Relaxed);
            tracing::warn!(method = %req.method(), path = %req.uri().path(), "admin request without a valid token refused");
            let mut resp = error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token: send `Authorization: Bearer <token>` with the token from <state-dir>/admin.token",
            );
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"postern-relay\""),
            );
            return resp;
        }
        let resp = self.route(req).await;
        if resp.status().is_success() {
            stats.requests_ok.fetch_add(1, Relaxed);
        } else {
            stats.requests_failed.fetch_add(1, Relaxed);
        }
        resp
    }

    fn authorized<B>(&self, req: &Request<B>) -> bool {
        let Some(value) = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let Some((scheme, token)) = value.trim().split_once(' ') else {
            return false;
        };
        scheme.eq_ignore_ascii_case("bearer") && self.token.matches(token.trim())
    }

    async fn route<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let method = req.method();
        let only = |allowed: Method| -> Option<Response<Full<Bytes>>> {
            (method != allowed).then(|| {
                let mut resp = error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &format!("{path} answers {allowed} only"),
                );
                if let Ok(v) = HeaderValue::from_str(allowed.as_str()) {
                    resp.headers_mut().insert(header::ALLOW, v);
                }
                resp
            })
        };
        match parts.as_slice() {
            ["v1", "nodes"] => only(Method::GET).unwrap_or_else(|| {
                json(
                    StatusCode::OK,
                    &views::Nodes {
                        nodes: self.relay.node_views(),
                    },
                )
            }),
            ["v1", "services"] => only(Method::GET).unwrap_or_else(|| {
                json(
                    StatusCode::OK,
                    &views::Services {
                        services: self.relay.service_views(),
                    },
                )
            }),
            ["v1", "routes"] => only(Method::GET).unwrap_or_else(|| {
                json(
                    StatusCode::OK,
                    &views::Routes {
                        routes: self.relay.route_views(),
                    },
                )
            }),
            ["v1", "fleet"] => match only(Method::GET) {
                Some(r) => r,
                None => json(StatusCode::OK, &self.relay.fleet_view().await),
            },
            ["v1", "tickets"] => match only(Method::GET) {
                Some(r) => r,
                None => {
                    match self.relay.ticket_views().await {
                        Ok(tickets) => json(
                            StatusCode::OK,
                            &views::Tickets {
                                authority: tickets.is_some(),
                                tickets: tickets.unwrap_or_default(),
                            },
                        ),
                        Err(e) => op_error(e),
                    }
                }
            },
            ["v1", "identities"] => match only(Method::GET) {
                Some(r) => r,
                None => {
                    match self.relay.identity_views().await {
                        Ok((authority, identities)) => json(
                            StatusCode::OK,
                            &views::Identities {
                                authority,
                                identities,
                            },
                        ),
                        Err(e) => op_error(e),
                    }
                }
            },
            ["v1", "identities", name, "revoke"] => {
                if let Some(r) = only(Method::POST) {
                    return r;
                }
                let name = match node_name(name) {
                    Ok(n) => n,
                    Err(e) => return error(StatusCode::BAD_REQUEST, &e),
                };
                match self.relay.revoke_identity(&name).await {
                    Ok(done) => {
                        tracing::info!(node = %name, persisted = done.persisted, "identity revoked through the admin API");
                        json(StatusCode::OK, &done)
                    }
                    Err(e) => op_error(e),
                }
            }
            ["v1", "nodes", name, action @ ("drain" | "undrain")] => {
                if let Some(r) = only(Method::POST) {
                    return r;
                }
                let name = match node_name(name) {
                    Ok(n) => n,
                    Err(e) => return error(StatusCode::BAD_REQUEST, &e),
                };
                if *action == "undrain" {
                    return match self.relay.undrain_node(&name).await {
                        Ok(u) => json(StatusCode::OK, &u),
                        Err(e) => op_error(e),
                    };
                }
                let timeout = match query_param(req.uri().query(), "timeout") {
                    None => self.drain_timeout,
                    Some(t) => match postern_net::runtime::duration::parse_duration(&t) {
                        Ok(d) => d,
                        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("timeout: {e}")),
                    },
                };
                match self.relay.drain_node(&name, timeout).await {
                    Ok(d) => json(StatusCode::ACCEPTED, &d),
                    Err(e) => op_error(e),
                }
            }
            ["v1", "reload"] => {
                if let Some(r) = only(Method::POST) {
                    return r;
                }
                let Some(reloader) = self.reloader.clone() else {
                    return error(
                        StatusCode::NOT_IMPLEMENTED,
                        "this relay was not started by `postern-relay run`, so it has no config to reread",
                    );
                };
                match tokio::task::spawn_blocking(move || reloader.reload("admin API")).await {
                    Ok(Ok(done)) => json(StatusCode::OK, &done),
                    Ok(Err(refused)) => error(StatusCode::UNPROCESSABLE_ENTITY, &refused.0),
                    Err(e) => error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &format!("the reload did not finish: {e}"),
                    ),
                }
            }
            _ => error(
                StatusCode::NOT_FOUND,
                &format!(
                    "no endpoint {path}; try /v1/nodes, /v1/services, /v1/routes, /v1/tickets, /v1/identities, /v1/fleet, POST /v1/reload"
                ),
            ),
        }
    }
}

fn node_name(s: &str) -> Result<NodeName, String> {
    NodeName::new(s).map_err(|e| format!("node name: {e}"))
}

fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_owned())
}

fn op_error(e: AdminOpError) -> Response<Full<Bytes>> {
    let status = match e {
        AdminOpError::NotConnected(_) | AdminOpError::UnknownIdentity(_) => StatusCode::NOT_FOUND,
        AdminOpError::Fleet(_) => {
            tracing::warn!(error = %e, "admin action failed");
            StatusCode::SERVICE_UNAVAILABLE
        }
        AdminOpError::Persist { .. } => {
            tracing::error!(error = %e, "admin action failed");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    error(status, &e.to_string())
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(body) {
        Ok(mut bytes) => {
            bytes.push(b'\n');
            respond(status, bytes)
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode the answer: {e}"),
        ),
    }
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = views::ErrorBody {
        error: message.to_owned(),
    };
    let mut bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
    bytes.push(b'\n');
    respond(status, bytes)
}

fn respond(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Serves the API on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, api: Arc<AdminApi>, shutdown: CancellationToken) {
    tracing::info!(addr = %postern_net::runtime::logging::local_addr(listener.local_addr()), "serving the admin API");
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    while let Some((tcp, peer, permit)) =
        postern_net::runtime::ops::accept_bounded(&listener, &limit, &shutdown, "admin API").await
    {
        let api = api.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(api.answer(&req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "admin API connection failed"),
                Err(_) => tracing::debug!(%peer, "admin API connection timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addr_parses_or_turns_off() {
        assert_eq!(parse_admin_addr("off"), Ok(None));
        assert_eq!(
            parse_admin_addr(DEFAULT_ADMIN_ADDR),
            Ok(Some(DEFAULT_ADMIN_ADDR.parse().expect("addr")))
        );
        assert!(parse_admin_addr("localhost").is_err());
    }

    #[test]
    fn query_params() {
        assert_eq!(
            query_param(Some("a=1&timeout=2s"), "timeout"),
            Some("2s".into())
        );
        assert_eq!(query_param(Some("timeouts=2s"), "timeout"), None);
        assert_eq!(query_param(None, "timeout"), None);
    }
}
