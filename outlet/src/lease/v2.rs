//! InfluxDB 2 backend: one authorization (API token) per lease.
//!
//! - create: `POST /api/v2/authorizations` with `{orgID, permissions, description, status}`,
//!   expecting `201` and the new authorization (`id`, `token`);
//! - revoke: `DELETE /api/v2/authorizations/{id}`, `204`; `404` means already gone;
//! - list: `GET /api/v2/authorizations?orgID=<org>`, keeping those whose description carries
//!   this outlet's marker (see [`super::backend::v2_description`]).
//!
//! Requests carry `Authorization: Token <all-access-token>`, marked sensitive so that HTTP
//! logging never prints it.

use super::backend::{
    http_client, parse_error_body, parse_v2_description, v2_description, Backend, BackendError,
    BoxFuture, CreateRequest, Created, Found,
};
use super::config::{LeaseConfig, Secret};
use postern_proto::lease::Credential;
use reqwest::header::HeaderValue;
use serde::Deserialize;
use serde_json::Value;
use zeroize::Zeroizing;

/// The InfluxDB 2 backend.
pub struct V2Backend {
    http: reqwest::Client,
    base: reqwest::Url,
    org_id: String,
    admin: Secret,
    permissions: Vec<Value>,
    instance: String,
}

impl V2Backend {
    /// Builds the backend from a validated config; `instance` is this outlet's marker id.
    pub fn new(cfg: &LeaseConfig, instance: &str) -> Result<Self, BackendError> {
        let org_id = cfg
            .org_id
            .clone()
            .ok_or_else(|| BackendError::Setup("org-id is required with api = \"v2\"".into()))?;
        // Check once that the token fits in a header, without ever echoing it.
        HeaderValue::from_str(&format!("Token {}", cfg.admin.expose())).map_err(|_| {
            BackendError::Setup(
                "all-access-token contains characters not allowed in an HTTP header".into(),
            )
        })?;
        Ok(V2Backend {
            http: http_client(cfg)?,
            base: cfg.url.clone(),
            org_id,
            admin: cfg.admin.clone(),
            permissions: cfg.permissions.iter().map(|p| p.to_json()).collect(),
            instance: instance.to_owned(),
        })
    }

    fn url(&self, path: &str) -> Result<reqwest::Url, BackendError> {
        self.base
            .join(path)
            .map_err(|e| BackendError::Setup(format!("bad URL path {path:?}: {e}")))
    }

    fn auth_header(&self) -> Result<HeaderValue, BackendError> {
        let raw = Zeroizing::new(format!("Token {}", self.admin.expose()));
        let mut v = HeaderValue::from_str(&raw).map_err(|_| {
            BackendError::Setup(
                "all-access-token contains characters not allowed in an HTTP header".into(),
            )
        })?;
        v.set_sensitive(true);
        Ok(v)
    }

    async fn refused(op: &'static str, resp: reqwest::Response) -> BackendError {
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        let (code, message) = parse_error_body(&body);
        let hint = hint(op, status, &message);
        BackendError::Refused {
            op,
            status,
            code,
            message,
            hint,
        }
    }
}

/// What to check, given how InfluxDB 2 refused.
fn hint(op: &'static str, status: u16, message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    match status {
        401 => " (the all-access-token was refused: check that it is valid and active)",
        403 => " (the all-access-token lacks permission for this: it needs read/write on authorizations in the org)",
        400 | 404 | 422 if m.contains("org") || m.contains("unable to create token") => {
            " (check org-id: the organization must exist and the all-access-token must be allowed to create tokens in it)"
        }
        400 | 422 if m.contains("permission") || m.contains("resource") || m.contains("action") => {
            " (check leased-token-permissions)"
        }
        _ if op == OP_CREATE && (status == 400 || status == 422) => {
            " (check org-id and leased-token-permissions)"
        }
        _ => "",
    }
}

const OP_CREATE: &str = "create an authorization";
const OP_REVOKE: &str = "delete an authorization";
const OP_LIST: &str = "list authorizations";

#[derive(Deserialize)]
struct CreatedAuth {
    id: String,
    token: String,
}

#[derive(Deserialize)]
struct AuthList {
    #[serde(default)]
    authorizations: Vec<ListedAuth>,
}

#[derive(Deserialize)]
struct ListedAuth {
    id: String,
    #[serde(default)]
    description: String,
}

/// Authorization ids are hex; anything else must not reach a URL path.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl Backend for V2Backend {
    fn create<'a>(
        &'a self,
        req: &'a CreateRequest,
    ) -> BoxFuture<'a, Result<Created, BackendError>> {
        Box::pin(async move {
            let body = serde_json::json!({
                "orgID": self.org_id,
                "status": "active",
                "description": v2_description(&self.instance, req),
                "permissions": self.permissions,
            });
            let resp = self
                .http
                .post(self.url("api/v2/authorizations")?)
                .header(reqwest::header::AUTHORIZATION, self.auth_header()?)
                .json(&body)
                .send()
                .await
                .map_err(|source| BackendError::Transport {
                    op: OP_CREATE,
                    source,
                })?;
            if !resp.status().is_success() {
                return Err(Self::refused(OP_CREATE, resp).await);
            }
            let bytes = Zeroizing::new(
                resp.bytes()
                    .await
                    .map_err(|source| BackendError::Transport {
                        op: OP_CREATE,
                        source,
                    })?
                    .to_vec(),
            );
            let mut created: CreatedAuth =
                serde_json::from_slice(&bytes).map_err(|e| BackendError::Protocol {
                    op: OP_CREATE,
                    // serde_json's message names the position and expected type, not the input.
                    detail: format!("the answer is not an authorization: {e}"),
                })?;
            let token = std::mem::take(&mut created.token);
            if !valid_id(&created.id) || token.is_empty() {
                return Err(BackendError::Protocol {
                    op: OP_CREATE,
                    detail: "the authorization has no usable id or token".into(),
                });
            }
            Ok(Created {
                backend_id: created.id,
                credential: Credential::Token(token),
            })
        })
    }

    fn revoke<'a>(&'a self, backend_id: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            if !valid_id(backend_id) {
                return Err(BackendError::Protocol {
                    op: OP_REVOKE,
                    detail: format!("{backend_id:?} is not an authorization id"),
                });
            }
            let resp = self
                .http
                .delete(self.url(&format!("api/v2/authorizations/{backend_id}"))?)
                .header(reqwest::header::AUTHORIZATION, self.auth_header()?)
                .send()
                .await
                .map_err(|source| BackendError::Transport {
                    op: OP_REVOKE,
                    source,
                })?;
            let status = resp.status();
            if status.is_success() || status == reqwest::StatusCode::NOT_FOUND {
                Ok(())
            } else {
                Err(Self::refused(OP_REVOKE, resp).await)
            }
        })
    }

    fn list_ours(&self) -> BoxFuture<'_, Result<Vec<Found>, BackendError>> {
        Box::pin(async move {
            let mut url = self.url("api/v2/authorizations")?;
            url.query_pairs_mut().append_pair("orgID", &self.org_id);
            let resp = self
                .http
                .get(url)
                .header(reqwest::header::AUTHORIZATION, self.auth_header()?)
                .send()
                .await
                .map_err(|source| BackendError::Transport {
                    op: OP_LIST,
                    source,
                })?;
            if !resp.status().is_success() {
                return Err(Self::refused(OP_LIST, resp).await);
            }
            // Older servers include every token's value in this list: keep the body in memory
            // that is wiped, and drop the values unread.
            let bytes = Zeroizing::new(
                resp.bytes()
                    .await
                    .map_err(|source| BackendError::Transport {
                        op: OP_LIST,
                        source,
                    })?
                    .to_vec(),
            );
            let list: AuthList =
                serde_json::from_slice(&bytes).map_err(|e| BackendError::Protocol {
                    op: OP_LIST,
                    detail: format!("the answer is not a list of authorizations: {e}"),
                })?;
            Ok(list
                .authorizations
                .into_iter()
                .filter_map(|a| {
                    let lease_id = parse_v2_description(&self.instance, &a.description)?;
                    Some(Found {
                        backend_id: a.id,
                        lease_id,
                        marker: a.description,
                    })
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_point_at_the_config_key() {
        assert!(hint(OP_CREATE, 401, "unauthorized access").contains("all-access-token"));
        assert!(hint(OP_CREATE, 400, "unable to create token").contains("org-id"));
        assert!(hint(OP_CREATE, 404, "organization not found").contains("org-id"));
        assert!(
            hint(OP_CREATE, 400, "invalid resource type \"x\" for permission")
                .contains("leased-token-permissions")
        );
        assert_eq!(hint(OP_REVOKE, 500, "boom"), "");
    }

    #[test]
    fn ids_are_checked_before_reaching_a_path() {
        assert!(valid_id("0a1b2c3d4e5f6789"));
        assert!(!valid_id("../orgs"));
        assert!(!valid_id(""));
    }
}
