//! InfluxDB 2 backend: one authorization (API token) per lease.
//!
//! - start-up ([`Backend::check`]): `GET /ping` (or `/health`) tells the server's version; a
//!   1.x server is refused (it has no `/api/v2/authorizations`), and every bucket named by
//!   `name` is looked up, so that a missing one stops the outlet with its name;
//! - create: each bucket named by `name` is looked up again (`GET /api/v2/buckets?name=&orgID=`,
//!   so a bucket re-made under the same name is followed), then `POST /api/v2/authorizations`
//!   with `{orgID, permissions, description, status}`, each permission's resource reduced to
//!   `type`, `id` and `orgID` (the only fields InfluxDB 2 reads), expecting `201` with the new
//!   authorization (`id`, `token`);
//! - revoke: `DELETE /api/v2/authorizations/{id}`, `204`. A `404` counts as "already gone" only
//!   when it is InfluxDB's own `{"code":"not found","message":"authorization not found"}`: any
//!   other 404 (a proxy's, a wrong path) is an error, retried. When DELETE is refused (403,
//!   405, 501: a gateway that forbids it) the authorization is deactivated with
//!   `PATCH {"status":"inactive"}` instead, and the log says so;
//! - list: `GET /api/v2/authorizations?orgID=<org>`, keeping the active ones whose description
//!   carries this outlet's marker (see [`super::backend::v2_description`]).
//!
//! Every request is sent again after the server's `Retry-After` when it answers 429. Requests
//! carry `Authorization: Token <all-access-token>`, marked sensitive so that HTTP logging never
//! prints it. Error hints are read from the server's `{code, message}` bodies (see [`hint`]).

use super::backend::{
    detect_server, http_client, parse_error_body, parse_v2_description, send_honouring_429,
    v2_description, Backend, BackendError, BoxFuture, CreateRequest, Created, Found, ServerKind,
};
use super::config::{Access, LeaseConfig, Secret, V2Scope};
use postern_proto::lease::Credential;
use postern_proto::name::NodeName;
use reqwest::header::HeaderValue;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use zeroize::Zeroizing;

/// One configured permission, as sent once its scope is known.
#[derive(Debug, Clone)]
struct Template {
    action: Access,
    rtype: String,
    org_id: Option<String>,
    scope: V2Scope,
}

/// The InfluxDB 2 backend.
pub struct V2Backend {
    http: reqwest::Client,
    base: reqwest::Url,
    org_id: String,
    admin: Secret,
    /// Every profile's permissions, for the bucket look-ups at start-up.
    all_templates: Vec<Template>,
    instance: String,
}

/// The permissions of one profile as templates.
fn templates(permissions: &[super::config::Permission]) -> Vec<Template> {
    permissions
        .iter()
        .map(|p| Template {
            action: p.action,
            rtype: p.resource_type().to_owned(),
            org_id: p
                .resource
                .get("orgID")
                .and_then(Value::as_str)
                .map(str::to_owned),
            scope: p.v2_scope(),
        })
        .collect()
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
        let all_templates = cfg
            .profiles()
            .iter()
            .flat_map(|p| templates(&p.permissions))
            .collect();
        Ok(V2Backend {
            http: http_client(cfg)?,
            base: cfg.url.clone(),
            org_id,
            admin: cfg.admin.clone(),
            all_templates,
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
        let hint = hint(op, status, code.as_deref(), &message);
        BackendError::Refused {
            op,
            status,
            code,
            message,
            hint,
        }
    }

    /// Looks a bucket up by name in the org and returns its id.
    async fn bucket_id(&self, name: &str) -> Result<String, BackendError> {
        let mut url = self.url("api/v2/buckets")?;
        url.query_pairs_mut()
            .append_pair("name", name)
            .append_pair("orgID", &self.org_id);
        let resp = send_honouring_429(OP_BUCKET, || {
            Ok(self
                .http
                .get(url.clone())
                .header(reqwest::header::AUTHORIZATION, self.auth_header()?))
        })
        .await?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            let body = resp.text().await.unwrap_or_default();
            let (code, message) = parse_error_body(&body);
            if code.as_deref() == Some("not found") && message.contains("bucket") {
                return Err(BackendError::Misconfigured(format!(
                    "bucket {name:?} (named in leased-token-permissions) does not exist in org \
                     {}: create it, or fix the name",
                    self.org_id
                )));
            }
            let hint = hint(OP_BUCKET, 404, code.as_deref(), &message);
            return Err(BackendError::Refused {
                op: OP_BUCKET,
                status: 404,
                code,
                message,
                hint,
            });
        }
        if !status.is_success() {
            return Err(Self::refused(OP_BUCKET, resp).await);
        }
        let list: BucketList = resp.json().await.map_err(|e| BackendError::Protocol {
            op: OP_BUCKET,
            detail: format!("the answer is not a list of buckets: {e}"),
        })?;
        let found = list
            .buckets
            .into_iter()
            .find(|b| b.name == name && b.org_id.eq_ignore_ascii_case(&self.org_id));
        match found {
            Some(b) if is_influx_id(&b.id) => Ok(b.id),
            Some(_) => Err(BackendError::Protocol {
                op: OP_BUCKET,
                detail: format!("bucket {name:?} has no usable id"),
            }),
            // The server hides buckets the token may not read.
            None => Err(BackendError::Misconfigured(format!(
                "bucket {name:?} (named in leased-token-permissions) was not found in org {}, \
                 or the all-access-token may not read it",
                self.org_id
            ))),
        }
    }

    /// The permissions to send, each bucket named by `name` looked up now.
    async fn permissions(&self, templates: &[Template]) -> Result<Vec<Value>, BackendError> {
        let mut ids: BTreeMap<&str, String> = BTreeMap::new();
        let mut out = Vec::with_capacity(templates.len());
        for t in templates {
            let mut resource = Map::new();
            resource.insert("type".into(), Value::String(t.rtype.clone()));
            match &t.scope {
                V2Scope::Id(id) => {
                    resource.insert("id".into(), Value::String(id.clone()));
                }
                V2Scope::BucketName(name) => {
                    let id = match ids.get(name.as_str()) {
                        Some(id) => id.clone(),
                        None => {
                            let id = self.bucket_id(name).await?;
                            ids.insert(name, id.clone());
                            id
                        }
                    };
                    resource.insert("id".into(), Value::String(id));
                }
                V2Scope::AllInOrg => {}
            }
            if let Some(org) = &t.org_id {
                resource.insert("orgID".into(), Value::String(org.clone()));
            }
            out.push(serde_json::json!({ "action": t.action, "resource": resource }));
        }
        Ok(out)
    }

    /// `PATCH {"status":"inactive"}`: the fallback when DELETE is refused.
    async fn deactivate(&self, id: &str, why: &BackendError) -> Result<(), BackendError> {
        let url = self.url(&format!("api/v2/authorizations/{id}"))?;
        let resp = send_honouring_429(OP_DEACTIVATE, || {
            Ok(self
                .http
                .patch(url.clone())
                .header(reqwest::header::AUTHORIZATION, self.auth_header()?)
                .json(&serde_json::json!({ "status": "inactive" })))
        })
        .await?;
        if resp.status().is_success() {
            tracing::warn!(
                authorization_id = %id,
                delete_refused = %why,
                "InfluxDB refused to delete the leased token, so it was deactivated \
                 (PATCH status=inactive) instead: it no longer works, but stays listed in \
                 InfluxDB until deleted by hand"
            );
            return Ok(());
        }
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            return gone_or_refused(OP_DEACTIVATE, status, &body);
        }
        Err(Self::refused(OP_DEACTIVATE, resp).await)
    }
}

/// Whether a 404 body is InfluxDB's own "this authorization does not exist".
fn authorization_gone(code: Option<&str>, message: &str) -> bool {
    code == Some("not found") && message == "authorization not found"
}

/// A 404 on an authorization: gone if InfluxDB says so, an error otherwise.
fn gone_or_refused(op: &'static str, status: u16, body: &str) -> Result<(), BackendError> {
    let (code, message) = parse_error_body(body);
    if authorization_gone(code.as_deref(), &message) {
        return Ok(());
    }
    let hint = hint(op, status, code.as_deref(), &message);
    Err(BackendError::Refused {
        op,
        status,
        code,
        message,
        hint,
    })
}

fn is_influx_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// What to check, given how InfluxDB 2 refused. The messages matched are the server's own
/// (`authorizer`: "<permission> is unauthorized", "permission <p> is not allowed";
/// `Authorization.Valid`: "permission <p> is not for org id <org>").
fn hint(op: &'static str, status: u16, code: Option<&str>, message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    match status {
        401 if m.contains("/authorizations is unauthorized") => {
            " (the all-access-token may not create tokens in this org: check that org-id is the \
             organization the token belongs to, or use an operator token)"
        }
        401 if m.contains("users/") && m.contains("is unauthorized") => {
            " (the all-access-token is a custom token without write permission on its own user, \
             which InfluxDB requires to create tokens: use an all-access or operator token)"
        }
        401 if m.contains("inactive") => {
            " (the all-access-token is inactive: activate it or use another one)"
        }
        401 => " (the all-access-token was refused: check that it is valid and active)",
        403 if m.contains("permission") && m.contains("is not allowed") => {
            " (leased-token-permissions ask for more than the all-access-token holds, and a token \
             can only grant what it has: narrow the permissions or use an all-access or operator \
             token)"
        }
        403 => " (the all-access-token lacks permission for this: use an all-access or operator token)",
        429 => " (InfluxDB kept rate-limiting after waiting as its Retry-After asked; the lease is retried later)",
        400 if m.contains("is not for org id") => {
            " (a permission's orgID differs from org-id: write INFLUX_ORG_ID)"
        }
        400 | 404 | 422 if m.contains("org") || m.contains("unable to create token") => {
            " (check org-id: the organization must exist and the all-access-token must be allowed to create tokens in it)"
        }
        400 | 422 if m.contains("permission") || m.contains("resource") || m.contains("action") => {
            " (check leased-token-permissions)"
        }
        404 if code != Some("not found") => {
            " (this 404 is not InfluxDB's: check that `to` points at InfluxDB itself and not at a proxy path)"
        }
        _ if op == OP_CREATE && (status == 400 || status == 422) => {
            " (check org-id and leased-token-permissions)"
        }
        _ => "",
    }
}

const OP_CREATE: &str = "create an authorization";
const OP_REVOKE: &str = "delete an authorization";
const OP_DEACTIVATE: &str = "deactivate an authorization";
const OP_LIST: &str = "list authorizations";
const OP_BUCKET: &str = "look up a bucket";

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
    #[serde(default)]
    status: String,
}

#[derive(Deserialize)]
struct BucketList {
    #[serde(default)]
    buckets: Vec<ListedBucket>,
}

#[derive(Deserialize)]
struct ListedBucket {
    id: String,
    name: String,
    #[serde(rename = "orgID", default)]
    org_id: String,
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
                "permissions": self.permissions(&templates(&req.profile.permissions)).await?,
            });
            let url = self.url("api/v2/authorizations")?;
            let resp = send_honouring_429(OP_CREATE, || {
                Ok(self
                    .http
                    .post(url.clone())
                    .header(reqwest::header::AUTHORIZATION, self.auth_header()?)
                    .json(&body))
            })
            .await?;
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
            let url = self.url(&format!("api/v2/authorizations/{backend_id}"))?;
            let resp = send_honouring_429(OP_REVOKE, || {
                Ok(self
                    .http
                    .delete(url.clone())
                    .header(reqwest::header::AUTHORIZATION, self.auth_header()?))
            })
            .await?;
            let status = resp.status().as_u16();
            match status {
                200..=299 => Ok(()),
                404 => {
                    let body = resp.text().await.unwrap_or_default();
                    gone_or_refused(OP_REVOKE, status, &body)
                }
                403 | 405 | 501 => {
                    let refused = Self::refused(OP_REVOKE, resp).await;
                    self.deactivate(backend_id, &refused).await
                }
                _ => Err(Self::refused(OP_REVOKE, resp).await),
            }
        })
    }

    fn list_ours(&self) -> BoxFuture<'_, Result<Vec<Found>, BackendError>> {
        Box::pin(async move {
            let mut url = self.url("api/v2/authorizations")?;
            url.query_pairs_mut().append_pair("orgID", &self.org_id);
            let resp = send_honouring_429(OP_LIST, || {
                Ok(self
                    .http
                    .get(url.clone())
                    .header(reqwest::header::AUTHORIZATION, self.auth_header()?))
            })
            .await?;
            if !resp.status().is_success() {
                return Err(Self::refused(OP_LIST, resp).await);
            }
            // OSS up to 2.7 includes every token's value in this list: keep the body in memory
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
                // A deactivated one (DELETE refused) is as good as revoked.
                .filter(|a| a.status != "inactive")
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

    fn check(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            match detect_server(&self.http, &self.base).await {
                Ok(ServerKind::V1(version)) => {
                    return Err(BackendError::Misconfigured(format!(
                        "InfluxDB at {} is version {version}, which has no token API \
                         (/api/v2/authorizations): set api = \"v1\" in [influxdb-outlet] to \
                         lease 1.x users, with the databases named in leased-token-permissions",
                        self.base
                    )))
                }
                Ok(ServerKind::V2(version)) => {
                    tracing::info!(version = %version, "InfluxDB 2 found")
                }
                Ok(ServerKind::Cloud) => tracing::info!("InfluxDB Cloud found"),
                Ok(ServerKind::Other(version)) => tracing::warn!(
                    version = %version,
                    "InfluxDB reports a version this outlet does not know; using the v2 token API"
                ),
                Ok(ServerKind::Unknown) => tracing::warn!(
                    "InfluxDB reported no version on /ping or /health; using the v2 token API"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot read InfluxDB's version at start-up; the first lease will tell"
                ),
            }
            match self.permissions(&self.all_templates).await {
                Ok(_) => Ok(()),
                Err(e @ BackendError::Misconfigured(_)) => Err(e),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "cannot look up the buckets of leased-token-permissions at start-up; \
                         every lease looks them up again"
                    );
                    Ok(())
                }
            }
        })
    }
}

/// The `client=` field of a v2 marker.
pub(super) fn marker_client(marker: &str) -> Option<&str> {
    marker
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("client="))
        .filter(|c| NodeName::new(c).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_point_at_the_config_key() {
        let h = |status, code, m| hint(OP_CREATE, status, Some(code), m);
        assert!(h(401, "unauthorized", "unauthorized access").contains("all-access-token"));
        assert!(h(
            401,
            "unauthorized",
            "write:orgs/0000000000000001/authorizations is unauthorized"
        )
        .contains("org-id"));
        assert!(h(
            401,
            "unauthorized",
            "write:users/0a1b2c3d4e5f6789 is unauthorized"
        )
        .contains("use an all-access or operator token"));
        assert!(h(
            403,
            "forbidden",
            "permission write:orgs/0a1b2c3d4e5f6789/buckets is not allowed"
        )
        .contains("more than the all-access-token holds"));
        assert!(h(
            400,
            "invalid",
            "permission read:orgs/1/buckets is not for org id 2"
        )
        .contains("orgID differs from org-id"));
        assert!(h(400, "invalid", "unable to create token").contains("org-id"));
        assert!(h(404, "not found", "organization not found").contains("org-id"));
        assert!(h(400, "invalid", "invalid resource type for permission")
            .contains("leased-token-permissions"));
        assert!(hint(OP_REVOKE, 404, None, "404 page not found").contains("not InfluxDB's"));
        assert_eq!(hint(OP_REVOKE, 500, Some("internal error"), "boom"), "");
    }

    #[test]
    fn only_influxdbs_own_404_means_gone() {
        assert!(gone_or_refused(
            OP_REVOKE,
            404,
            r#"{"code":"not found","message":"authorization not found"}"#
        )
        .is_ok());
        for body in [
            "<html>404 Not Found</html>",
            r#"{"code":"not found","message":"path not found"}"#,
            r#"{"message":"authorization not found"}"#,
            "",
        ] {
            assert!(gone_or_refused(OP_REVOKE, 404, body).is_err(), "{body}");
        }
    }

    #[test]
    fn ids_are_checked_before_reaching_a_path() {
        assert!(valid_id("0a1b2c3d4e5f6789"));
        assert!(!valid_id("../orgs"));
        assert!(!valid_id(""));
    }
}
