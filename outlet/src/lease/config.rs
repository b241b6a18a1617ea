//! The outlet's `[influxdb-outlet]` config section and its validation.
//!
//! Parsing happens in two steps so that no error message can echo a secret:
//!
//! 1. serde reads the section into [`InfluxdbOutletConfig`], where every key is kept as written
//!    (`all-access-token` is a [`SecretRef`], a string whose `Debug` is redacted; serde never
//!    judges its content, so a parser error cannot quote it).
//! 2. [`InfluxdbOutletConfig::validate`] checks every key and returns a [`LeaseConfig`]: the URL
//!    parsed, the permissions parsed (with `INFLUX_ORG_ID` substituted), the admin credential
//!    resolved from its reference into a [`Secret`]. Every error names the key and what is wrong.
//!
//! ```toml
//! [influxdb-outlet]
//! to = "http://127.0.0.1:8086"
//! allow = "role=influxdb-client"
//! org-id = "0123456789abcdef"
//! all-access-token = "env:INFLUX_ADMIN_TOKEN"
//! leased-token-expires-in = 3600
//! leased-token-permissions = '[{"action":"write","resource":{"type":"buckets","name":"telegraf"}}]'
//! api = "v2"
//! ```
//!
//! ## How an InfluxDB 2 permission is scoped (`api = "v2"`)
//!
//! An InfluxDB 2 permission resource has only `type`, `id` and `orgID`: the server drops `name`
//! and `org` when it reads a permission and fills them in only when it shows one. A resource
//! without `id` therefore grants the action on *every* resource of that type in `orgID` (and
//! in every org when `orgID` is missing too). So that a lease is never wider than written, each
//! resource must say which one it means, in exactly one of three ways:
//!
//! - `"id": "<16 hex digits>"`: that resource;
//! - `"name": "<bucket>"` (buckets only): the outlet looks the bucket up by name in `org-id`
//!   (`GET /api/v2/buckets?name=…&orgID=…`) at start-up and again for every lease, and sends
//!   its id; a bucket that does not exist is an error naming it;
//! - `"all": true`: every resource of that type in `org-id`, on purpose. `orgID` is set to
//!   `org-id` if missing. The outlet strips `all` before sending the permission.
//!
//! A resource with none of these is refused at load, as are `org` (InfluxDB ignores it), a
//! `name` on a type other than `buckets`, and an `orgID` other than `org-id` (InfluxDB refuses a
//! permission whose `orgID` differs from the authorization's).
//!
//! ## InfluxDB 1.x (`api = "v1"`)
//!
//! 1.x has users with per-database privileges instead of tokens. The same permission list is
//! used, mapped as follows:
//!
//! - each permission must name its database in `resource.name` (`resource.type` must be
//!   `"buckets"` or `"databases"`); a permission without a name (meaning "all buckets" in v2) is
//!   refused, because 1.x can only grant all databases by making the user an admin;
//! - `read` becomes `GRANT READ ON "<db>"`, `write` becomes `GRANT WRITE ON "<db>"`, and a
//!   database that is both read and written gets `GRANT ALL ON "<db>"` (1.x keeps one privilege
//!   per user and database, so a second `GRANT` would replace the first instead of adding to it);
//! - `org-id`, `id`, `orgID` and `all` have no meaning in 1.x: `org-id` may be left out, and
//!   `INFLUX_ORG_ID` is substituted only if it is set.
//!
//! The admin credential for 1.x is the user and password of an admin user, written
//! `<user>:<password>` in the referenced environment variable or file.

use super::profile::{valid_name, Profile, ProfileConfig};
pub use postern_proto::secret::Secret;
use serde::Deserialize;
use serde_json::Value;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroize;

/// Default lifetime of a leased credential, in seconds.
pub const DEFAULT_EXPIRES_IN_S: u64 = 3600;
/// Shortest lifetime accepted: renewal happens at two thirds of it, so it cannot be tiny.
pub const MIN_EXPIRES_IN_S: u64 = 2;
/// Longest lifetime accepted (30 days): v2 tokens never expire on their own, so our revocation
/// is the only bound on their life and it should stay short.
pub const MAX_EXPIRES_IN_S: u64 = 30 * 24 * 3600;

/// The placeholder in `leased-token-permissions` that is replaced by `org-id`.
pub const ORG_ID_PLACEHOLDER: &str = "INFLUX_ORG_ID";

/// Which InfluxDB API the lease manager talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// InfluxDB 2 (and compatible): tokens from `/api/v2/authorizations`.
    #[default]
    V2,
    /// InfluxDB 1.x: users made with `CREATE USER` and `GRANT` over `/query`.
    V1,
}

/// Where the leased credential is put into requests. Either way the outlet checks every
/// request: only the requesting inlet's own live lease reaches InfluxDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InjectAt {
    /// The lease is streamed to the inlet, whose filter puts it into each request; the outlet
    /// verifies it is the lease of the identity that sent the request.
    #[default]
    Inlet,
    /// The lease never leaves the private network: the inlet sends requests with no
    /// credential and the outlet puts the peer's lease into each.
    Outlet,
}

/// The `[influxdb-outlet]` section as written in the outlet's config file.
///
/// Nothing here is checked yet; call [`validate`](Self::validate).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct InfluxdbOutletConfig {
    /// Where InfluxDB listens: a URL (`http://host:8086`, `https://host:8086`) or `host:port`,
    /// in which case `tls` picks the scheme.
    pub to: String,
    /// Connect to InfluxDB with TLS.
    #[serde(default)]
    pub tls: bool,
    /// PEM file with the CA certificate(s) to trust for InfluxDB's TLS certificate. When set,
    /// only these are trusted (not the system's roots).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Attribute expression saying which inlets may use this service (kept as written; the
    /// outlet's policy code evaluates it), or `"*"` for every inlet the relay routes. The
    /// outlet's config file must have it (see `config::influxdb_rule`); in-process callers
    /// may leave it out.
    #[serde(default)]
    pub allow: Option<String>,
    /// InfluxDB 2 organization id (16 hex digits). Required for `api = "v2"`.
    #[serde(default)]
    pub org_id: Option<String>,
    /// Reference to the admin credential: `env:NAME` or `file:PATH`.
    pub all_access_token: SecretRef,
    /// Lifetime of each leased credential, in seconds.
    #[serde(default = "default_expires_in")]
    pub leased_token_expires_in: u64,
    /// JSON list of InfluxDB 2 permission objects granted to each leased credential. Required
    /// without `profile` tables, refused with them (each profile has its own).
    #[serde(default)]
    pub leased_token_permissions: String,
    /// `"v2"` (default) or `"v1"`.
    #[serde(default)]
    pub api: Api,
    /// `"inlet"` (default) or `"outlet"`: where the leased credential is put into requests.
    #[serde(default)]
    pub inject_at: InjectAt,
    /// Whether a client may ask for its own credential (`postern-inlet lease create`), for
    /// the implicit profile of a section without `profile` tables.
    #[serde(default)]
    pub hand_out: bool,
    /// `[[influxdb-outlet.profile]]` tables: permissions and lifetime by client attributes
    /// (see [`super::profile`]). Empty: one implicit profile from the section's own keys.
    #[serde(default)]
    pub profile: Vec<ProfileConfig>,
}

fn default_expires_in() -> u64 {
    DEFAULT_EXPIRES_IN_S
}

/// A validated, resolved lease configuration.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Base URL of InfluxDB (scheme, host, port; no path).
    pub url: reqwest::Url,
    /// CA certificates to trust instead of the system's roots.
    pub tls_ca: Option<PathBuf>,
    /// The `allow` expression, as written.
    pub allow: Option<String>,
    /// The organization id (v2; optional for v1).
    pub org_id: Option<String>,
    /// The admin credential (v2 token, or `user:password` for v1).
    pub admin: Secret,
    /// Lifetime of each leased credential (of the implicit profile when `profiles` is empty).
    pub ttl: Duration,
    /// Permissions granted to each leased credential, `INFLUX_ORG_ID` substituted (of the
    /// implicit profile when `profiles` is empty).
    pub permissions: Vec<Permission>,
    /// Which API to use.
    pub api: Api,
    /// Whether the implicit profile hands credentials out (when `profiles` is empty).
    pub hand_out: bool,
    /// The profiles in the order written; empty: the implicit one made of `ttl`,
    /// `permissions` and `hand_out` (see [`LeaseConfig::profiles`]).
    pub profiles: Vec<Profile>,
}

impl LeaseConfig {
    /// The profiles to choose from, in order: the written ones, or the implicit one.
    pub fn profiles(&self) -> Vec<Arc<Profile>> {
        if self.profiles.is_empty() {
            return vec![Arc::new(Profile::implicit(
                self.ttl,
                self.permissions.clone(),
                self.hand_out,
            ))];
        }
        self.profiles.iter().cloned().map(Arc::new).collect()
    }
}

/// The access a permission grants: InfluxDB's `action`, read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Read,
    Write,
}

/// One InfluxDB 2 permission object (`{"action": ..., "resource": {...}}`).
///
/// The resource is kept as a JSON object so that fields this code does not know about reach
/// InfluxDB unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct Permission {
    pub action: Access,
    /// The `resource` object; it has at least a string `type`.
    pub resource: serde_json::Map<String, Value>,
}

impl Permission {
    /// `resource.type`.
    pub fn resource_type(&self) -> &str {
        self.resource
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// `resource.name`, if any.
    pub fn resource_name(&self) -> Option<&str> {
        self.resource.get("name").and_then(Value::as_str)
    }

    /// The permission as the JSON object InfluxDB 2 expects.
    pub fn to_json(&self) -> Value {
        serde_json::json!({ "action": self.action, "resource": self.resource })
    }
}

/// Which resources of its type an InfluxDB 2 permission covers (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum V2Scope {
    /// The resource with this id.
    Id(String),
    /// The bucket with this name in `org-id`, looked up for every lease.
    BucketName(String),
    /// Every resource of the type in `org-id`, as written with `"all": true`.
    AllInOrg,
}

impl Permission {
    /// The scope of a permission that passed v2 validation.
    pub fn v2_scope(&self) -> V2Scope {
        if let Some(id) = self.resource.get("id").and_then(Value::as_str) {
            V2Scope::Id(id.to_owned())
        } else if let Some(name) = self.resource_name() {
            V2Scope::BucketName(name.to_owned())
        } else {
            V2Scope::AllInOrg
        }
    }
}

fn is_influx_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Checks one permission for `api = "v2"` and fills in `orgID` where the scope needs it.
fn scope_v2(i: usize, p: &mut Permission, org_id: &str) -> Result<(), ConfigError> {
    const KEY: &str = "leased-token-permissions";
    let err = |m: String| ConfigError::invalid(KEY, format!("permission {i}: {m}"));
    let ty = p.resource_type().to_owned();
    if let Some(k) = p
        .resource
        .keys()
        .find(|k| !matches!(k.as_str(), "type" | "id" | "orgID" | "name" | "all"))
    {
        return Err(err(if k == "org" {
            "\"org\" is ignored by InfluxDB 2 (it only shows it); use \"orgID\"".to_owned()
        } else {
            format!("unknown resource field {k:?}: InfluxDB 2 would ignore it, so it would scope nothing")
        }));
    }
    let id = match p.resource.get("id") {
        None => None,
        Some(Value::String(id)) if is_influx_id(id) => Some(id.clone()),
        Some(other) => {
            return Err(err(format!(
                "\"id\" must be an InfluxDB id (16 hex digits), not {other}"
            )))
        }
    };
    let name = match p.resource.get("name") {
        None => None,
        Some(Value::String(n)) if !n.is_empty() && !n.chars().any(char::is_control) => {
            Some(n.clone())
        }
        Some(other) => return Err(err(format!("\"name\" must be a bucket name, not {other}"))),
    };
    let all = match p.resource.get("all") {
        None => false,
        Some(Value::Bool(true)) => true,
        Some(other) => {
            return Err(err(format!(
                "\"all\" may only be true (to mean every {ty} of the org), not {other}"
            )))
        }
    };
    match p.resource.get("orgID") {
        None => {}
        Some(Value::String(o)) if o.eq_ignore_ascii_case(org_id) => {}
        Some(other) => {
            return Err(err(format!(
                "\"orgID\" {other} is not org-id {org_id:?}: InfluxDB 2 refuses a permission \
                 for another org than the token's (use INFLUX_ORG_ID)"
            )))
        }
    }
    if name.is_some() && ty != "buckets" {
        return Err(err(format!(
            "\"name\" scopes nothing in InfluxDB 2 (the server drops it); a {ty:?} resource \
             must be named by \"id\""
        )));
    }
    let given = usize::from(id.is_some()) + usize::from(name.is_some()) + usize::from(all);
    if given > 1 {
        return Err(err(
            "give only one of \"id\", \"name\" and \"all\"".to_owned()
        ));
    }
    if given == 0 {
        let hint = if ty == "buckets" {
            "name the bucket with \"name\" or \"id\", or write \"all\": true to mean every \
             bucket of the org"
        } else {
            "give its \"id\", or write \"all\": true to mean every one in the org"
        };
        return Err(err(format!(
            "the {ty:?} resource has no \"id\": InfluxDB 2 would grant {} on every resource of \
             type {ty:?} in the org (or in every org); {hint}",
            match p.action {
                Access::Read => "read",
                Access::Write => "write",
            }
        )));
    }
    if name.is_some() || all {
        p.resource
            .insert("orgID".into(), Value::String(org_id.to_owned()));
    }
    Ok(())
}

/// A 1.x privilege on one database, as derived from the permissions (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Grant {
    pub database: String,
    /// `READ`, `WRITE` or `ALL`.
    pub privilege: &'static str,
}

/// Derives the 1.x grants from a permission list (see the module docs for the mapping).
pub fn v1_grants(perms: &[Permission]) -> Result<Vec<V1Grant>, ConfigError> {
    let mut by_db: Vec<(String, bool, bool)> = Vec::new();
    for (i, p) in perms.iter().enumerate() {
        let ty = p.resource_type();
        if ty != "buckets" && ty != "databases" {
            return Err(ConfigError::invalid(
                "leased-token-permissions",
                format!(
                    "permission {i}: with api = \"v1\" the resource type must be \"buckets\" or \
                     \"databases\", not {ty:?}"
                ),
            ));
        }
        if p.resource.contains_key("all") {
            return Err(ConfigError::invalid(
                "leased-token-permissions",
                format!(
                    "permission {i}: \"all\" has no meaning with api = \"v1\" (1.x cannot grant \
                     all databases to a non-admin user); name the database in \"name\""
                ),
            ));
        }
        let Some(db) = p.resource_name().filter(|n| !n.is_empty()) else {
            return Err(ConfigError::invalid(
                "leased-token-permissions",
                format!(
                    "permission {i}: with api = \"v1\" the resource must name its database in \
                     \"name\" (1.x cannot grant all databases to a non-admin user)"
                ),
            ));
        };
        if db.chars().any(char::is_control) {
            return Err(ConfigError::invalid(
                "leased-token-permissions",
                format!("permission {i}: the database name contains control characters"),
            ));
        }
        let entry = match by_db.iter_mut().find(|(d, _, _)| d == db) {
            Some(e) => e,
            None => {
                by_db.push((db.to_owned(), false, false));
                let last = by_db.len() - 1;
                &mut by_db[last]
            }
        };
        match p.action {
            Access::Read => entry.1 = true,
            Access::Write => entry.2 = true,
        }
    }
    Ok(by_db
        .into_iter()
        .map(|(database, r, w)| V1Grant {
            database,
            privilege: match (r, w) {
                (true, true) => "ALL",
                (false, true) => "WRITE",
                _ => "READ",
            },
        })
        .collect())
}

/// Why the config was refused. Messages name the key; they never contain a secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("influxdb-outlet: `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

impl ConfigError {
    fn invalid(key: &'static str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key,
            message: message.into(),
        }
    }

    /// The key the error is about.
    pub fn key(&self) -> &'static str {
        match self {
            ConfigError::Invalid { key, .. } => key,
        }
    }
}

impl InfluxdbOutletConfig {
    /// Checks every key, resolves the admin credential and returns the config to run with.
    pub fn validate(&self) -> Result<LeaseConfig, ConfigError> {
        let url = parse_to(&self.to, self.tls)?;
        if let Some(ca) = &self.tls_ca {
            if url.scheme() != "https" {
                return Err(ConfigError::invalid(
                    "tls-ca",
                    "is set but the connection to InfluxDB does not use TLS (set `tls = true` or \
                     use an https:// URL in `to`)",
                ));
            }
            if ca.as_os_str().is_empty() {
                return Err(ConfigError::invalid("tls-ca", "is empty"));
            }
        }
        let org_id = match &self.org_id {
            Some(o) if o.trim().is_empty() => {
                return Err(ConfigError::invalid("org-id", "is empty"))
            }
            Some(o) => {
                if self.api == Api::V2
                    && !(o.len() == 16 && o.bytes().all(|b| b.is_ascii_hexdigit()))
                {
                    return Err(ConfigError::invalid(
                        "org-id",
                        format!("{o:?} is not an InfluxDB organization id (16 hex digits)"),
                    ));
                }
                Some(o.clone())
            }
            None if self.api == Api::V2 => {
                return Err(ConfigError::invalid(
                    "org-id",
                    "is required with api = \"v2\"",
                ))
            }
            None => None,
        };
        check_ttl(self.leased_token_expires_in)
            .map_err(|m| ConfigError::invalid("leased-token-expires-in", m))?;
        let (permissions, profiles) = if self.profile.is_empty() {
            if self.leased_token_permissions.trim().is_empty() {
                return Err(ConfigError::invalid(
                    "leased-token-permissions",
                    "is required (or give `[[influxdb-outlet.profile]]` tables, each with its \
                     own permissions)",
                ));
            }
            let p =
                checked_permissions(&self.leased_token_permissions, org_id.as_deref(), self.api)?;
            (p, Vec::new())
        } else {
            (Vec::new(), self.validate_profiles(org_id.as_deref())?)
        };
        let admin = self.all_access_token.resolve("all-access-token")?;
        if self.api == Api::V1 && !admin.expose().contains(':') {
            return Err(ConfigError::invalid(
                "all-access-token",
                "with api = \"v1\" the referenced secret must be `<user>:<password>` of an admin \
                 user",
            ));
        }
        Ok(LeaseConfig {
            url,
            tls_ca: self.tls_ca.clone(),
            allow: self.allow.clone(),
            org_id,
            admin,
            ttl: Duration::from_secs(self.leased_token_expires_in),
            permissions,
            api: self.api,
            hand_out: self.hand_out,
            profiles,
        })
    }

    /// Checks the `profile` tables: names unique, `when` parsed, permissions and lifetime as
    /// for the section's own keys. Every error names the profile.
    fn validate_profiles(&self, org_id: Option<&str>) -> Result<Vec<Profile>, ConfigError> {
        const KEY: &str = "profile";
        if !self.leased_token_permissions.trim().is_empty() {
            return Err(ConfigError::invalid(
                "leased-token-permissions",
                "is set together with `[[influxdb-outlet.profile]]` tables; each profile has its \
                 own `leased-token-permissions`, so move it into the profiles",
            ));
        }
        if self.hand_out {
            return Err(ConfigError::invalid(
                "hand-out",
                "is set together with `[[influxdb-outlet.profile]]` tables; set `hand-out` in \
                 the profiles that may hand credentials out",
            ));
        }
        let mut out: Vec<Profile> = Vec::with_capacity(self.profile.len());
        for (i, p) in self.profile.iter().enumerate() {
            if !valid_name(&p.name) {
                return Err(ConfigError::invalid(
                    KEY,
                    format!(
                        "profile {i}: `name` {:?} must be 1 to 64 letters, digits, `-`, `_` or `.`",
                        p.name
                    ),
                ));
            }
            let err = |m: String| ConfigError::invalid(KEY, format!("profile {:?}: {m}", p.name));
            if out.iter().any(|o| o.name == p.name) {
                return Err(err("the name is used by an earlier profile".into()));
            }
            let when = postern_proto::policy::Expr::parse(&p.when)
                .map_err(|e| err(format!("`when`: {e}")))?;
            let ttl_s = p
                .leased_token_expires_in
                .unwrap_or(self.leased_token_expires_in);
            check_ttl(ttl_s).map_err(|m| err(format!("`leased-token-expires-in`: {m}")))?;
            let permissions = checked_permissions(&p.leased_token_permissions, org_id, self.api)
                .map_err(|e| match e {
                    ConfigError::Invalid { key, message } => err(format!("`{key}`: {message}")),
                })?;
            out.push(Profile {
                name: p.name.clone(),
                when,
                ttl: Duration::from_secs(ttl_s),
                permissions,
                hand_out: p.hand_out,
            });
        }
        Ok(out)
    }
}

/// Checks a lease lifetime in seconds.
fn check_ttl(ttl_s: u64) -> Result<(), String> {
    if (MIN_EXPIRES_IN_S..=MAX_EXPIRES_IN_S).contains(&ttl_s) {
        return Ok(());
    }
    Err(format!(
        "{ttl_s} s is out of range; it must be between {MIN_EXPIRES_IN_S} and {MAX_EXPIRES_IN_S} \
         seconds"
    ))
}

/// Parses a permission list and checks it for `api` (v1: grants per database; v2: scopes).
fn checked_permissions(
    text: &str,
    org_id: Option<&str>,
    api: Api,
) -> Result<Vec<Permission>, ConfigError> {
    let mut permissions = parse_permissions(text, org_id, api)?;
    match (api, org_id) {
        (Api::V1, _) => {
            v1_grants(&permissions)?;
        }
        (Api::V2, Some(org)) => {
            for (i, p) in permissions.iter_mut().enumerate() {
                scope_v2(i, p, org)?;
            }
        }
        // Refused earlier: v2 needs org-id.
        (Api::V2, None) => {}
    }
    Ok(permissions)
}

fn parse_to(to: &str, tls: bool) -> Result<reqwest::Url, ConfigError> {
    let to = to.trim();
    if to.is_empty() {
        return Err(ConfigError::invalid("to", "is empty"));
    }
    let with_scheme = if to.contains("://") {
        to.to_owned()
    } else if tls {
        format!("https://{to}")
    } else {
        format!("http://{to}")
    };
    let url = reqwest::Url::parse(&with_scheme).map_err(|e| {
        ConfigError::invalid("to", format!("{to:?} is not a URL or host:port: {e}"))
    })?;
    match url.scheme() {
        "http" if tls => {
            return Err(ConfigError::invalid(
                "to",
                "uses http:// but `tls = true`; use https:// or drop `tls`",
            ))
        }
        "http" | "https" => {}
        other => {
            return Err(ConfigError::invalid(
                "to",
                format!("scheme {other:?} is not supported; use http:// or https://"),
            ))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::invalid("to", "has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::invalid(
            "to",
            "must not carry credentials; use `all-access-token`",
        ));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::invalid(
            "to",
            "must be scheme://host:port without a path or query",
        ));
    }
    Ok(url)
}

/// Parses `leased-token-permissions`, substituting `INFLUX_ORG_ID` in every string value.
fn parse_permissions(
    text: &str,
    org_id: Option<&str>,
    api: Api,
) -> Result<Vec<Permission>, ConfigError> {
    const KEY: &str = "leased-token-permissions";
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ConfigError::invalid(KEY, format!("is not valid JSON: {e}")))?;
    let Value::Array(items) = value else {
        return Err(ConfigError::invalid(
            KEY,
            "must be a JSON list of permission objects",
        ));
    };
    if items.is_empty() {
        return Err(ConfigError::invalid(
            KEY,
            "is empty; a leased credential needs at least one permission",
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, mut item) in items.into_iter().enumerate() {
        substitute_org(&mut item, org_id, api)
            .map_err(|m| ConfigError::invalid(KEY, format!("permission {i}: {m}")))?;
        let Value::Object(mut obj) = item else {
            return Err(ConfigError::invalid(
                KEY,
                format!("permission {i} is not a JSON object"),
            ));
        };
        let action = match obj.remove("action") {
            Some(Value::String(a)) if a == "read" => Access::Read,
            Some(Value::String(a)) if a == "write" => Access::Write,
            Some(other) => {
                return Err(ConfigError::invalid(
                    KEY,
                    format!(
                        "permission {i}: \"action\" must be \"read\" or \"write\", not {other}"
                    ),
                ))
            }
            None => {
                return Err(ConfigError::invalid(
                    KEY,
                    format!("permission {i}: \"action\" is missing"),
                ))
            }
        };
        let resource = match obj.remove("resource") {
            Some(Value::Object(r)) => r,
            Some(_) => {
                return Err(ConfigError::invalid(
                    KEY,
                    format!("permission {i}: \"resource\" must be an object"),
                ))
            }
            None => {
                return Err(ConfigError::invalid(
                    KEY,
                    format!("permission {i}: \"resource\" is missing"),
                ))
            }
        };
        if let Some(extra) = obj.keys().next() {
            return Err(ConfigError::invalid(
                KEY,
                format!("permission {i}: unknown field {extra:?}"),
            ));
        }
        match resource.get("type") {
            Some(Value::String(t)) if !t.is_empty() => {}
            _ => {
                return Err(ConfigError::invalid(
                    KEY,
                    format!("permission {i}: \"resource.type\" must be a non-empty string"),
                ))
            }
        }
        out.push(Permission { action, resource });
    }
    Ok(out)
}

fn substitute_org(v: &mut Value, org_id: Option<&str>, api: Api) -> Result<(), String> {
    match v {
        Value::String(s) if s.contains(ORG_ID_PLACEHOLDER) => match org_id {
            Some(id) => {
                *s = s.replace(ORG_ID_PLACEHOLDER, id);
                Ok(())
            }
            None if api == Api::V1 => Ok(()),
            None => Err(format!(
                "{ORG_ID_PLACEHOLDER} is used but `org-id` is not set"
            )),
        },
        Value::Array(a) => a
            .iter_mut()
            .try_for_each(|x| substitute_org(x, org_id, api)),
        Value::Object(o) => o
            .values_mut()
            .try_for_each(|x| substitute_org(x, org_id, api)),
        _ => Ok(()),
    }
}

/// A reference to a secret, as written in the config: `env:NAME` or `file:PATH`.
///
/// Deserializes from any string so that a plaintext secret written by mistake is never echoed
/// by the parser; [`resolve`](Self::resolve) refuses it. `Debug` shows only well-formed
/// references.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretRef(String);

impl SecretRef {
    /// Wraps a reference string (not checked until [`resolve`](Self::resolve)).
    pub fn new(reference: impl Into<String>) -> Self {
        SecretRef(reference.into())
    }

    fn parsed(&self) -> Option<(&'static str, &str)> {
        if let Some(name) = self.0.strip_prefix("env:") {
            Some(("env", name))
        } else {
            self.0.strip_prefix("file:").map(|path| ("file", path))
        }
    }

    /// Reads the secret. `key` names the config key in errors.
    pub fn resolve(&self, key: &'static str) -> Result<Secret, ConfigError> {
        match self.parsed() {
            Some(("env", name)) => {
                if name.is_empty() {
                    return Err(ConfigError::invalid(key, "`env:` needs a variable name"));
                }
                match std::env::var(name) {
                    Ok(v) if v.is_empty() => Err(ConfigError::invalid(
                        key,
                        format!("environment variable {name} is empty"),
                    )),
                    Ok(v) => Ok(Secret::new(v)),
                    Err(std::env::VarError::NotPresent) => Err(ConfigError::invalid(
                        key,
                        format!("environment variable {name} is not set"),
                    )),
                    Err(std::env::VarError::NotUnicode(_)) => Err(ConfigError::invalid(
                        key,
                        format!("environment variable {name} is not valid UTF-8"),
                    )),
                }
            }
            Some((_, path)) => {
                if path.is_empty() {
                    return Err(ConfigError::invalid(key, "`file:` needs a path"));
                }
                let mut text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::invalid(key, format!("cannot read file {path:?}: {e}"))
                })?;
                let trimmed = text.trim_end_matches(['\r', '\n']).len();
                text.truncate(trimmed);
                let secret = Secret::new(text);
                if secret.expose().is_empty() {
                    return Err(ConfigError::invalid(key, format!("file {path:?} is empty")));
                }
                Ok(secret)
            }
            None => Err(ConfigError::invalid(
                key,
                "must be a reference to the secret (`env:NAME` or `file:PATH`); plaintext values \
                 are not accepted in the config file",
            )),
        }
    }
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.parsed() {
            Some((kind, rest)) => write!(f, "SecretRef({kind}:{rest})"),
            None => f.write_str("SecretRef(<redacted>)"),
        }
    }
}

impl Drop for SecretRef {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const PERMS: &str =
        r#"[{"action":"write","resource":{"type":"buckets","orgID":"INFLUX_ORG_ID","all":true}}]"#;

    fn secret_file(content: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(content.as_bytes()).expect("write");
        f
    }

    fn base(secret: &tempfile::NamedTempFile) -> String {
        format!(
            "to = \"http://127.0.0.1:8086\"\norg-id = \"0123456789abcdef\"\n\
             all-access-token = \"file:{}\"\nleased-token-permissions = '{PERMS}'\n",
            secret.path().display()
        )
    }

    fn parse(text: &str) -> Result<InfluxdbOutletConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn minimal_v2_config_validates_with_defaults() {
        let s = secret_file("admin-token\n");
        let cfg = parse(&base(&s)).expect("parse").validate().expect("valid");
        assert_eq!(cfg.api, Api::V2);
        assert_eq!(cfg.ttl, Duration::from_secs(DEFAULT_EXPIRES_IN_S));
        assert_eq!(cfg.admin.expose(), "admin-token");
        assert_eq!(cfg.url.as_str(), "http://127.0.0.1:8086/");
        assert_eq!(cfg.permissions.len(), 1);
        assert_eq!(
            cfg.permissions[0].to_json(),
            serde_json::json!({"action":"write","resource":{"type":"buckets","orgID":"0123456789abcdef","all":true}})
        );
        assert_eq!(cfg.permissions[0].v2_scope(), V2Scope::AllInOrg);
    }

    fn v2_perms(perms: &str) -> Result<Vec<Permission>, ConfigError> {
        let s = secret_file("t");
        let text = base(&s).replace(PERMS, perms);
        parse(&text)
            .expect("parse")
            .validate()
            .map(|c| c.permissions)
    }

    #[test]
    fn v2_scopes_are_explicit() {
        // By name (resolved later), by id, or all of the org on purpose.
        let p = v2_perms(r#"[{"action":"write","resource":{"type":"buckets","name":"telegraf"}}]"#)
            .expect("by name");
        assert_eq!(p[0].v2_scope(), V2Scope::BucketName("telegraf".into()));
        assert_eq!(
            p[0].resource["orgID"], "0123456789abcdef",
            "orgID filled in"
        );
        let p = v2_perms(
            r#"[{"action":"read","resource":{"type":"buckets","id":"00000000000000aa"}}]"#,
        )
        .expect("by id");
        assert_eq!(p[0].v2_scope(), V2Scope::Id("00000000000000aa".into()));
        let p = v2_perms(r#"[{"action":"read","resource":{"type":"dashboards","all":true}}]"#)
            .expect("all");
        assert_eq!(p[0].v2_scope(), V2Scope::AllInOrg);
        assert_eq!(p[0].resource["orgID"], "0123456789abcdef");

        // Anything that InfluxDB 2 would read as wider than written is refused at load.
        for (perms, says) in [
            (
                r#"[{"action":"write","resource":{"type":"buckets","orgID":"INFLUX_ORG_ID"}}]"#,
                "every resource of type \"buckets\"",
            ),
            (
                r#"[{"action":"write","resource":{"type":"buckets"}}]"#,
                "\"all\": true",
            ),
            (
                r#"[{"action":"read","resource":{"type":"dashboards","name":"d"}}]"#,
                "scopes nothing",
            ),
            (
                r#"[{"action":"read","resource":{"type":"buckets","name":"a","org":"o"}}]"#,
                "\"org\" is ignored",
            ),
            (
                r#"[{"action":"read","resource":{"type":"buckets","name":"a","id":"00000000000000aa"}}]"#,
                "only one of",
            ),
            (
                r#"[{"action":"read","resource":{"type":"buckets","name":"a","orgID":"00000000000000bb"}}]"#,
                "is not org-id",
            ),
            (
                r#"[{"action":"read","resource":{"type":"buckets","id":"telegraf"}}]"#,
                "16 hex digits",
            ),
            (
                r#"[{"action":"read","resource":{"type":"buckets","all":false}}]"#,
                "only be true",
            ),
        ] {
            let err = v2_perms(perms).expect_err(perms);
            assert_eq!(err.key(), "leased-token-permissions");
            assert!(err.to_string().contains(says), "{perms}: {err}");
        }
    }

    #[test]
    fn plaintext_admin_token_is_refused_without_echoing_it() {
        let text = format!(
            "to = \"127.0.0.1:8086\"\norg-id = \"0123456789abcdef\"\n\
             all-access-token = \"sup3r-s3cret\"\nleased-token-permissions = '{PERMS}'\n"
        );
        let raw = parse(&text).expect("parse");
        assert!(!format!("{raw:?}").contains("sup3r"));
        let err = raw.validate().expect_err("plaintext refused");
        assert_eq!(err.key(), "all-access-token");
        let msg = err.to_string();
        assert!(
            msg.contains("all-access-token") && msg.contains("plaintext"),
            "{msg}"
        );
        assert!(!msg.contains("sup3r"), "{msg}");
    }

    #[test]
    fn env_reference_resolves_and_missing_env_is_named() {
        let var = "POSTERN_LEASE_CONFIG_TEST_TOKEN";
        let r = SecretRef::new(format!("env:{var}"));
        let err = r.resolve("all-access-token").expect_err("unset");
        assert!(err.to_string().contains(var));
        std::env::set_var(var, "from-env");
        assert_eq!(
            r.resolve("all-access-token").expect("set").expose(),
            "from-env"
        );
        std::env::remove_var(var);
        assert_eq!(format!("{r:?}"), format!("SecretRef(env:{var})"));
    }

    #[test]
    fn secret_debug_and_display_are_redacted() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{s}").contains("hunter2"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let s = secret_file("t");
        let text = format!("{}colour = \"blue\"\n", base(&s));
        let err = parse(&text).expect_err("unknown key");
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let s = secret_file("t");
        let cases: &[(&str, &str, &str)] = &[
            ("to = \"http://127.0.0.1:8086\"", "to = \"ftp://x:1\"", "to"),
            (
                "to = \"http://127.0.0.1:8086\"",
                "to = \"http://h:1/x\"",
                "to",
            ),
            (
                "to = \"http://127.0.0.1:8086\"",
                "to = \"http://h:1\"\ntls = true",
                "to",
            ),
            (
                "org-id = \"0123456789abcdef\"",
                "org-id = \"my-org\"",
                "org-id",
            ),
            ("org-id = \"0123456789abcdef\"", "", "org-id"),
            (PERMS, "[]", "leased-token-permissions"),
            (PERMS, "{}", "leased-token-permissions"),
            (PERMS, "not json", "leased-token-permissions"),
            (
                PERMS,
                r#"[{"action":"delete","resource":{"type":"buckets"}}]"#,
                "leased-token-permissions",
            ),
            (PERMS, r#"[{"action":"read"}]"#, "leased-token-permissions"),
            (
                PERMS,
                r#"[{"action":"read","resource":{"id":"x"}}]"#,
                "leased-token-permissions",
            ),
        ];
        for (from, to, key) in cases {
            let text = base(&s).replace(from, to);
            let err = parse(&text)
                .expect("parse")
                .validate()
                .expect_err(&format!("{to} should be refused"));
            assert_eq!(err.key(), *key, "{to}: {err}");
        }
        for ttl in [0, 1, MAX_EXPIRES_IN_S + 1] {
            let text = format!("{}leased-token-expires-in = {ttl}\n", base(&s));
            let err = parse(&text).expect("parse").validate().expect_err("ttl");
            assert_eq!(err.key(), "leased-token-expires-in");
        }
    }

    #[test]
    fn tls_picks_the_scheme_for_host_port() {
        let s = secret_file("t");
        let text =
            base(&s).replace("http://127.0.0.1:8086", "influx.internal:8086") + "tls = true\n";
        let cfg = parse(&text).expect("parse").validate().expect("valid");
        assert_eq!(cfg.url.as_str(), "https://influx.internal:8086/");
    }

    #[test]
    fn v1_maps_permissions_to_grants() {
        let s = secret_file("admin:pw");
        let perms = r#"[{"action":"write","resource":{"type":"buckets","name":"telegraf"}},
            {"action":"read","resource":{"type":"buckets","name":"telegraf"}},
            {"action":"read","resource":{"type":"databases","name":"metrics"}},
            {"action":"write","resource":{"type":"buckets","name":"logs"}}]"#;
        let text = format!(
            "to = \"127.0.0.1:8086\"\napi = \"v1\"\nall-access-token = \"file:{}\"\n\
             leased-token-permissions = '''{perms}'''\n",
            s.path().display()
        );
        let cfg = parse(&text).expect("parse").validate().expect("valid");
        let grants = v1_grants(&cfg.permissions).expect("grants");
        let got: Vec<(&str, &str)> = grants
            .iter()
            .map(|g| (g.database.as_str(), g.privilege))
            .collect();
        assert_eq!(
            got,
            vec![("telegraf", "ALL"), ("metrics", "READ"), ("logs", "WRITE")]
        );
    }

    #[test]
    fn v1_refuses_unnamed_databases_and_bad_admin() {
        let s = secret_file("admin:pw");
        let text = format!(
            "to = \"127.0.0.1:8086\"\napi = \"v1\"\nall-access-token = \"file:{}\"\n\
             leased-token-permissions = '{PERMS}'\n",
            s.path().display()
        );
        let err = parse(&text)
            .expect("parse")
            .validate()
            .expect_err("no name");
        assert_eq!(err.key(), "leased-token-permissions");
        assert!(err.to_string().contains("name"), "{err}");

        let s2 = secret_file("just-a-token");
        let text = format!(
            "to = \"127.0.0.1:8086\"\napi = \"v1\"\nall-access-token = \"file:{}\"\n\
             leased-token-permissions = '[{{\"action\":\"read\",\"resource\":{{\"type\":\"buckets\",\"name\":\"db\"}}}}]'\n",
            s2.path().display()
        );
        let err = parse(&text)
            .expect("parse")
            .validate()
            .expect_err("bad admin");
        assert_eq!(err.key(), "all-access-token");
        assert!(!err.to_string().contains("just-a-token"));
    }

    const SENSOR_PERMS: &str =
        r#"[{"action":"write","resource":{"type":"databases","name":"telemetry"}}]"#;
    const ANALYST_PERMS: &str =
        r#"[{"action":"read","resource":{"type":"databases","name":"telemetry"}}]"#;

    fn v1_with_profiles(s: &tempfile::NamedTempFile, extra: &str, profiles: &str) -> String {
        format!(
            "to = \"127.0.0.1:8086\"\napi = \"v1\"\nall-access-token = \"file:{}\"\n\
             leased-token-expires-in = 600\n{extra}{profiles}",
            s.path().display()
        )
    }

    fn two_profiles() -> String {
        format!(
            "[[profile]]\nname = \"sensors\"\nwhen = 'role = \"sensor\"'\n\
             leased-token-permissions = '{SENSOR_PERMS}'\nleased-token-expires-in = 900\n\
             [[profile]]\nname = \"analysts\"\nwhen = 'role = \"analyst\"'\n\
             leased-token-permissions = '{ANALYST_PERMS}'\nhand-out = true\n"
        )
    }

    #[test]
    fn profiles_validate_in_order_with_their_own_lifetimes() {
        let s = secret_file("admin:pw");
        let cfg = parse(&v1_with_profiles(&s, "", &two_profiles()))
            .expect("parse")
            .validate()
            .expect("valid");
        let profiles = cfg.profiles();
        let got: Vec<(&str, u64, bool)> = profiles
            .iter()
            .map(|p| (p.name.as_str(), p.ttl.as_secs(), p.hand_out))
            .collect();
        // The second takes the section's lifetime.
        assert_eq!(got, vec![("sensors", 900, false), ("analysts", 600, true)]);
        let grants = v1_grants(&profiles[0].permissions).expect("grants");
        assert_eq!(
            (grants[0].database.as_str(), grants[0].privilege),
            ("telemetry", "WRITE")
        );
        let mut attrs = postern_proto::policy::Attributes::new();
        attrs.insert("role".into(), "analyst".into());
        assert_eq!(
            crate::lease::profile::select(&profiles, &attrs).map(|p| p.name.as_str()),
            Some("analysts")
        );
    }

    #[test]
    fn without_profiles_the_section_is_the_default_profile() {
        let s = secret_file("admin:pw");
        let text = v1_with_profiles(
            &s,
            &format!("leased-token-permissions = '{SENSOR_PERMS}'\nhand-out = true\n"),
            "",
        );
        let cfg = parse(&text).expect("parse").validate().expect("valid");
        let profiles = cfg.profiles();
        assert_eq!(profiles.len(), 1);
        assert_eq!(profiles[0].name, crate::lease::DEFAULT_PROFILE);
        assert_eq!(profiles[0].ttl, Duration::from_secs(600));
        assert!(profiles[0].hand_out);
        assert!(profiles[0]
            .when
            .eval(&postern_proto::policy::Attributes::new()));
    }

    #[test]
    fn bad_profiles_are_refused_naming_the_profile() {
        let s = secret_file("admin:pw");
        let one = |name: &str, when: &str, perms: &str, extra: &str| {
            format!(
                "[[profile]]\nname = \"{name}\"\nwhen = '{when}'\n\
                 leased-token-permissions = '{perms}'\n{extra}"
            )
        };
        let ok = one("sensors", r#"role = "sensor""#, SENSOR_PERMS, "");
        let cases: Vec<(String, String, &str, &str)> = vec![
            (
                String::new(),
                one("a b", "true", SENSOR_PERMS, ""),
                "profile",
                "name",
            ),
            (
                String::new(),
                format!("{ok}{ok}"),
                "profile",
                "earlier profile",
            ),
            (
                String::new(),
                one("s", "role = ", SENSOR_PERMS, ""),
                "profile",
                "`when`",
            ),
            (
                String::new(),
                one("s", "true", PERMS, ""),
                "profile",
                "name the database",
            ),
            (
                String::new(),
                one("s", "true", SENSOR_PERMS, "leased-token-expires-in = 1\n"),
                "profile",
                "out of range",
            ),
            (
                format!("leased-token-permissions = '{SENSOR_PERMS}'\n"),
                ok.clone(),
                "leased-token-permissions",
                "move it into the profiles",
            ),
            (
                "hand-out = true\n".into(),
                ok.clone(),
                "hand-out",
                "in the profiles",
            ),
            (
                String::new(),
                String::new(),
                "leased-token-permissions",
                "is required",
            ),
        ];
        for (extra, profiles, key, says) in cases {
            let err = parse(&v1_with_profiles(&s, &extra, &profiles))
                .expect("parse")
                .validate()
                .expect_err(&profiles);
            assert_eq!(err.key(), key, "{profiles}: {err}");
            assert!(err.to_string().contains(says), "{profiles}: {err}");
        }
        let unknown = format!("{ok}colour = \"blue\"\n");
        let err = parse(&v1_with_profiles(&s, "", &unknown)).expect_err("unknown key");
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn org_placeholder_without_org_id_is_refused_for_v2_only() {
        let err = parse_permissions(PERMS, None, Api::V2).expect_err("v2 needs org");
        assert!(err.to_string().contains(ORG_ID_PLACEHOLDER));
        assert!(parse_permissions(PERMS, None, Api::V1).is_ok());
    }
}
