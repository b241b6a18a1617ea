//! InfluxDB 1.x backend: one user per lease.
//!
//! Statements go to `POST /query` (form field `q`), authenticated as the admin user with HTTP
//! Basic auth (so the admin password never appears in a URL):
//!
//! - create: `CREATE USER "postern_<instance>_<lease>" WITH PASSWORD '<random>'`, then one
//!   `GRANT READ|WRITE|ALL ON "<db>" TO "<user>"` per database (see
//!   [`super::config::v1_grants`]); if a grant fails the user is dropped again;
//! - revoke: `DROP USER "<user>"`; "user not found" means already gone;
//! - list: `SHOW USERS`, keeping the names that carry this outlet's prefix;
//! - start-up: `GET /ping`'s `X-Influxdb-Version` must not be 2.x (InfluxDB 2 answers `/query`
//!   but implements no user management), else the outlet refuses to start.
//!
//! Identifiers are double-quoted and strings single-quoted, with `\` and the quote escaped by a
//! backslash, as InfluxQL's scanner reads them. The leased credential is the user and password,
//! sent by the inlet as HTTP Basic auth.

use super::backend::{
    detect_server, http_client, parse_error_body, parse_v1_user_name, v1_user_name, Backend,
    BackendError, BoxFuture, CreateRequest, Created, Found, ServerKind,
};
use super::config::{v1_grants, LeaseConfig, Secret, V1Grant};
use postern_proto::lease::Credential;
use rand::distr::{Alphanumeric, SampleString};
use serde::Deserialize;
use zeroize::Zeroizing;

/// Length of a leased user's random password (alphanumeric: about 190 bits).
const PASSWORD_LEN: usize = 32;

/// The InfluxDB 1.x backend.
pub struct V1Backend {
    http: reqwest::Client,
    base: reqwest::Url,
    admin_user: String,
    admin_password: Secret,
    instance: String,
}

/// Quotes an InfluxQL identifier: `"` + escaped + `"`.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Quotes an InfluxQL string literal: `'` + escaped + `'`.
pub fn quote_string(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[derive(Deserialize)]
struct QueryResponse {
    #[serde(default)]
    results: Vec<StatementResult>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct StatementResult {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    series: Vec<Series>,
}

#[derive(Deserialize)]
struct Series {
    #[serde(default)]
    columns: Vec<String>,
    #[serde(default)]
    values: Vec<Vec<serde_json::Value>>,
}

const OP_CREATE: &str = "create a user";
const OP_GRANT: &str = "grant a privilege";
const OP_REVOKE: &str = "drop a user";
const OP_LIST: &str = "list users";

fn hint(status: u16, message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if status == 401 || m.contains("authorization failed") || m.contains("authentication") {
        " (the admin user in all-access-token was refused: check `<user>:<password>`)"
    } else if status == 403 || m.contains("requires admin privilege") {
        " (the user in all-access-token must be an admin user)"
    } else if m.contains("database not found") {
        " (check the database names in leased-token-permissions)"
    } else {
        ""
    }
}

impl V1Backend {
    /// Builds the backend from a validated config; `instance` is this outlet's marker id.
    pub fn new(cfg: &LeaseConfig, instance: &str) -> Result<Self, BackendError> {
        let (user, password) = cfg.admin.expose().split_once(':').ok_or_else(|| {
            BackendError::Setup(
                "all-access-token must be `<user>:<password>` with api = \"v1\"".into(),
            )
        })?;
        // Checked at load; checked again so that a config made in code fails here, not at
        // the first lease.
        for p in cfg.profiles() {
            v1_grants(&p.permissions).map_err(|e| BackendError::Setup(e.to_string()))?;
        }
        Ok(V1Backend {
            http: http_client(cfg)?,
            base: cfg.url.clone(),
            admin_user: user.to_owned(),
            admin_password: Secret::new(password.to_owned()),
            instance: instance.to_owned(),
        })
    }

    /// Runs one statement as the admin. `secret` is a value that must not appear in an error
    /// message even if InfluxDB echoes part of the statement.
    async fn run(
        &self,
        op: &'static str,
        statement: &str,
        secret: Option<&str>,
    ) -> Result<StatementResult, BackendError> {
        let url = self
            .base
            .join("query")
            .map_err(|e| BackendError::Setup(format!("bad URL: {e}")))?;
        let resp = self
            .http
            .post(url)
            .basic_auth(&self.admin_user, Some(self.admin_password.expose()))
            .form(&[("q", statement)])
            .send()
            .await
            .map_err(|source| BackendError::Transport { op, source })?;
        let status = resp.status().as_u16();
        let body = Zeroizing::new(
            resp.text()
                .await
                .map_err(|source| BackendError::Transport { op, source })?,
        );
        let redact = |m: String| match secret {
            Some(s) if !s.is_empty() => m.replace(s, "<redacted>"),
            _ => m,
        };
        if !(200..300).contains(&status) {
            let (code, message) = parse_error_body(&body);
            let message = redact(message);
            return Err(BackendError::Refused {
                op,
                status,
                code,
                hint: hint(status, &message),
                message,
            });
        }
        let parsed: QueryResponse =
            serde_json::from_str(&body).map_err(|e| BackendError::Protocol {
                op,
                detail: format!("the answer is not a query result: {e}"),
            })?;
        if let Some(message) = parsed.error {
            let message = redact(message);
            return Err(BackendError::Refused {
                op,
                status,
                code: None,
                hint: hint(status, &message),
                message,
            });
        }
        let first = parsed
            .results
            .into_iter()
            .next()
            .ok_or_else(|| BackendError::Protocol {
                op,
                detail: "no statement result".into(),
            })?;
        if let Some(message) = &first.error {
            let message = redact(message.clone());
            return Err(BackendError::Refused {
                op,
                status,
                code: None,
                hint: hint(status, &message),
                message,
            });
        }
        Ok(first)
    }

    async fn drop_user(&self, name: &str) -> Result<(), BackendError> {
        match self
            .run(OP_REVOKE, &format!("DROP USER {}", quote_ident(name)), None)
            .await
        {
            Ok(_) => Ok(()),
            Err(BackendError::Refused { message, .. }) if message.contains("user not found") => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl Backend for V1Backend {
    fn create<'a>(
        &'a self,
        req: &'a CreateRequest,
    ) -> BoxFuture<'a, Result<Created, BackendError>> {
        Box::pin(async move {
            let grants: Vec<V1Grant> = v1_grants(&req.profile.permissions)
                .map_err(|e| BackendError::Setup(e.to_string()))?;
            let name = v1_user_name(&self.instance, &req.lease_id);
            let password =
                Zeroizing::new(Alphanumeric.sample_string(&mut rand::rng(), PASSWORD_LEN));
            let stmt = Zeroizing::new(format!(
                "CREATE USER {} WITH PASSWORD {}",
                quote_ident(&name),
                quote_string(&password)
            ));
            self.run(OP_CREATE, &stmt, Some(&password)).await?;
            for g in &grants {
                let stmt = format!(
                    "GRANT {} ON {} TO {}",
                    g.privilege,
                    quote_ident(&g.database),
                    quote_ident(&name)
                );
                if let Err(e) = self.run(OP_GRANT, &stmt, None).await {
                    return match self.drop_user(&name).await {
                        Ok(()) => Err(e),
                        // The user is left behind: say so (not `Refused`), so that the manager
                        // cleans up by marker.
                        Err(drop_err) => Err(BackendError::Protocol {
                            op: OP_GRANT,
                            detail: format!(
                                "{e}; and the half-made user could not be dropped: {drop_err}"
                            ),
                        }),
                    };
                }
            }
            Ok(Created {
                backend_id: name.clone(),
                credential: Credential::Basic {
                    username: name,
                    password: password.to_string(),
                },
            })
        })
    }

    fn revoke<'a>(&'a self, backend_id: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move { self.drop_user(backend_id).await })
    }

    fn list_ours(&self) -> BoxFuture<'_, Result<Vec<Found>, BackendError>> {
        Box::pin(async move {
            let result = self.run(OP_LIST, "SHOW USERS", None).await?;
            let mut out = Vec::new();
            for s in result.series {
                let col = s.columns.iter().position(|c| c == "user").unwrap_or(0);
                for row in s.values {
                    let Some(name) = row.get(col).and_then(|v| v.as_str()) else {
                        continue;
                    };
                    if let Some(lease_id) = parse_v1_user_name(&self.instance, name) {
                        out.push(Found {
                            backend_id: name.to_owned(),
                            lease_id,
                            marker: name.to_owned(),
                        });
                    }
                }
            }
            Ok(out)
        })
    }

    fn check(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let two = match detect_server(&self.http, &self.base).await {
                Ok(ServerKind::V1(version)) => {
                    tracing::info!(version = %version, "InfluxDB 1.x found");
                    return Ok(());
                }
                Ok(ServerKind::V2(version)) => format!("version {version}"),
                Ok(ServerKind::Cloud) => "InfluxDB Cloud".to_owned(),
                Ok(other) => {
                    tracing::warn!(server = ?other, "cannot tell InfluxDB's version; using the 1.x API");
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read InfluxDB's version at start-up; the first lease will tell");
                    return Ok(());
                }
            };
            Err(BackendError::Misconfigured(format!(
                "InfluxDB at {} is {two}, which does not implement CREATE USER or GRANT: set \
                 api = \"v2\" (with org-id and bucket permissions) to lease tokens. 1.x clients \
                 keep working through the inlet once the database/retention policy is mapped \
                 to a bucket (DBRP mapping, see the README)",
                self.base
            )))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes_quotes_and_backslashes() {
        assert_eq!(quote_ident("telegraf"), "\"telegraf\"");
        assert_eq!(quote_ident(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(quote_string("it's"), r"'it\'s'");
        assert_eq!(quote_string(r"x\'"), r"'x\\\''");
    }

    #[test]
    fn hints_name_the_config_key() {
        assert!(hint(401, "authorization failed").contains("all-access-token"));
        assert!(hint(200, "error authorizing query: x not authorized to execute statement 'CREATE USER', requires admin privilege").contains("admin"));
        assert!(hint(200, "database not found: x").contains("leased-token-permissions"));
    }
}
