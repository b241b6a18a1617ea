//! An in-test HTTP server as strict as InfluxDB 2 for what postern uses.
//!
//! It follows the published API contract (influxdata/openapi, trimmed in
//! `tests/fixtures/influxdb2-openapi.json`; every request and response body is checked against
//! it, see [`Influx2::contract_violations`]) and the OSS server's authorization rules as its
//! source has them (influxdb v2.7 `authorization/`, `authorizer/`, `authz.go`):
//!
//! - a permission resource has only `type`, `id` and `orgID`: `name` and `org` are dropped on
//!   input and filled in on output from the ids. A resource without `id` covers every resource
//!   of its type in `orgID` (every org without `orgID`); `instance` covers everything;
//! - every request except `/ping` and `/health` needs `Authorization: Token <token>` (or
//!   `Bearer`) naming an active authorization, else `401 unauthorized "unauthorized access"`;
//! - `POST /api/v2/authorizations` checks, in the server's order: the body (`400 invalid`:
//!   "authorization must include permissions", "invalid resource type for permission" (also for
//!   a type the flavour lacks), "invalid action type for permission", "org id required");
//!   `write:orgs/<org>/authorizations` (`401 "write:orgs/<org>/authorizations is
//!   unauthorized"`); `write:users/<caller's user>` (`401 "write:users/<id> is unauthorized"`);
//!   that the caller holds every permission it grants (`403 forbidden "permission <p> is not
//!   allowed"`); that each permission's `orgID` is the body's (`400 "permission <p> is not for
//!   org id <org>"`); that the org exists (`400 "unable to create token"`). Tokens are 64 random
//!   bytes in URL-safe base64 (88 characters), as the server makes them;
//! - `GET /api/v2/authorizations` lists only those the caller may read (the authorization and
//!   its owner user); OSS 2.7 shows each token's value, OSS 2.9 and Cloud do not
//!   ([`Flavor`]). `GET|PATCH|DELETE /api/v2/authorizations/{id}` answer `404 {"code":"not
//!   found","message":"authorization not found"}` for an unknown id;
//! - `GET /api/v2/buckets?name=&orgID=` answers `404 not found "bucket \"…\" not found"` for an
//!   unknown name and hides buckets the caller may not read;
//! - `POST /api/v2/write` and a minimal `POST /api/v2/query` check `write`/`read` on the bucket
//!   (`403`); the query finds `from(bucket: "…")` and answers every stored line as CSV;
//! - `GET /ping` answers `204` with `X-Influxdb-Build` and (not on Cloud) `X-Influxdb-Version`;
//!   `/health` exists on OSS only.
//!
//! [`Influx2::inject`] puts answers in front of the server, as a proxy or gateway would (a
//! foreign 404, a 429 with `Retry-After`, a refused DELETE); those are not checked against the
//! contract. Request framing is HTTP/1.1 with keep-alive, `Content-Length` or chunked bodies,
//! and `Expect: 100-continue`.

use crate::openapi::{self, Contract};
use anyhow::{bail, Context};
use base64::Engine;
use postern_net::runtime::clock::now_ms;
use postern_outlet::lease::backend::format_rfc3339;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Resource types InfluxDB OSS 2.7 knows (`influxdb.AllResourceTypes`).
const OSS_RESOURCE_TYPES: &[&str] = &[
    "authorizations",
    "buckets",
    "dashboards",
    "orgs",
    "sources",
    "tasks",
    "telegrafs",
    "users",
    "variables",
    "scrapers",
    "secrets",
    "labels",
    "views",
    "documents",
    "notificationRules",
    "notificationEndpoints",
    "checks",
    "dbrp",
    "notebooks",
    "annotations",
    "remotes",
    "replications",
    "instance",
];

/// Resource types InfluxDB Cloud knows: no instance-wide ones, no edge replication, and the
/// Cloud-only scripts (`functions`), flows and subscriptions.
const CLOUD_RESOURCE_TYPES: &[&str] = &[
    "authorizations",
    "buckets",
    "dashboards",
    "orgs",
    "tasks",
    "telegrafs",
    "users",
    "variables",
    "secrets",
    "labels",
    "views",
    "documents",
    "notificationRules",
    "notificationEndpoints",
    "checks",
    "dbrp",
    "notebooks",
    "annotations",
    "flows",
    "functions",
    "subscriptions",
];

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 16 * 1024 * 1024;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Which InfluxDB the server behaves as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavor {
    /// OSS 2.7: operator token, token values shown in listings, `/health`.
    #[default]
    Oss27,
    /// OSS 2.9: as 2.7, but token values are never shown again after creation.
    Oss29,
    /// Cloud: no operator token (the admin token is an all-access one), no version header,
    /// no `/health`, token values never shown again, Cloud's resource types.
    Cloud,
}

impl Flavor {
    fn version(self) -> Option<&'static str> {
        match self {
            Flavor::Oss27 => Some("v2.7.12"),
            Flavor::Oss29 => Some("v2.9.0"),
            Flavor::Cloud => None,
        }
    }

    fn build(self) -> &'static str {
        match self {
            Flavor::Cloud => "Cloud",
            _ => "OSS",
        }
    }

    fn resource_types(self) -> &'static [&'static str] {
        match self {
            Flavor::Cloud => CLOUD_RESOURCE_TYPES,
            _ => OSS_RESOURCE_TYPES,
        }
    }

    fn contract(self) -> Contract {
        match self {
            Flavor::Cloud => Contract::Cloud,
            _ => Contract::Oss,
        }
    }

    fn shows_tokens(self) -> bool {
        self == Flavor::Oss27
    }
}

/// What to set up in the server.
#[derive(Debug, Clone)]
pub struct Influx2Options {
    /// The organization's name.
    pub org: String,
    /// Buckets to create in it.
    pub buckets: Vec<String>,
    /// Which server to behave as.
    pub flavor: Flavor,
}

impl Default for Influx2Options {
    fn default() -> Self {
        Influx2Options {
            org: "postern".into(),
            buckets: vec!["telegraf".into(), "other".into()],
            flavor: Flavor::default(),
        }
    }
}

/// One authorization as the server holds it (for assertions). `permissions` are as stored:
/// resources with `type`, `id` and `orgID` only.
#[derive(Debug, Clone, PartialEq)]
pub struct Authorization {
    pub id: String,
    pub token: String,
    pub status: String,
    pub description: String,
    pub org_id: String,
    pub user_id: String,
    pub permissions: Vec<Value>,
    /// Made by the test set-up (admin tokens), not through the API.
    pub seeded: bool,
    pub created_at_ms: u64,
}

/// One request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub status: u16,
    /// When the answer was made.
    pub at: Instant,
}

/// An answer given in front of the server, as a proxy or gateway would.
#[derive(Debug, Clone)]
pub struct Injection {
    /// Request method to match.
    pub method: String,
    /// Path prefix to match (`/api/v2/authorizations/`).
    pub path_prefix: String,
    pub status: u16,
    /// Extra response headers (`Retry-After`).
    pub headers: Vec<(String, String)>,
    pub content_type: String,
    pub body: String,
    /// How many requests it answers; `usize::MAX` for all.
    pub times: usize,
}

#[derive(Debug, Default)]
struct State {
    flavor: Flavor,
    org_id: String,
    org_name: String,
    user_id: String,
    user_name: String,
    buckets: BTreeMap<String, String>,
    auths: BTreeMap<String, Authorization>,
    points: BTreeMap<String, Vec<String>>,
    log: Vec<Logged>,
    /// Every token ever issued, the admin ones included (for checks that none leaks).
    issued: Vec<String>,
    injections: Vec<Injection>,
    violations: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

/// The running contract server. Stops when dropped.
pub struct Influx2 {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    admin_token: String,
}

fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>() | 1)
}

/// A token as InfluxDB 2 makes them: 64 random bytes, URL-safe base64 with padding.
fn new_token() -> String {
    let bytes: [u8; 64] = rand::random();
    base64::engine::general_purpose::URL_SAFE.encode(bytes)
}

fn is_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn perm(action: &str, rtype: &str, org: Option<&str>, id: Option<&str>) -> Value {
    let mut r = Map::new();
    r.insert("type".into(), json!(rtype));
    if let Some(id) = id {
        r.insert("id".into(), json!(id));
    }
    if let Some(o) = org {
        r.insert("orgID".into(), json!(o));
    }
    json!({"action": action, "resource": r})
}

impl State {
    /// OSS operator permissions: everything, every org.
    fn operator_permissions(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for t in self.flavor.resource_types() {
            for a in ["read", "write"] {
                out.push(perm(a, t, None, None));
            }
        }
        out
    }

    /// An all-access token's permissions, as the UI and CLI make them: every type in the org,
    /// the org itself, and the token's own user.
    fn all_access_permissions(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for t in self.flavor.resource_types() {
            for a in ["read", "write"] {
                match *t {
                    "instance" => {}
                    "orgs" => out.push(perm(a, t, None, Some(&self.org_id))),
                    "users" => out.push(perm(a, t, None, Some(&self.user_id))),
                    _ => out.push(perm(a, t, Some(&self.org_id), None)),
                }
            }
        }
        out
    }

    fn seed(&mut self, description: &str, permissions: Vec<Value>) -> String {
        let a = Authorization {
            id: new_id(),
            token: new_token(),
            status: "active".into(),
            description: description.into(),
            org_id: self.org_id.clone(),
            user_id: self.user_id.clone(),
            permissions,
            seeded: true,
            created_at_ms: now_ms(),
        };
        let token = a.token.clone();
        self.issued.push(token.clone());
        self.auths.insert(a.id.clone(), a);
        token
    }
}

impl Influx2 {
    /// Starts the server on 127.0.0.1 with a fresh org, buckets and an admin token (OSS: an
    /// operator token; Cloud: an all-access token).
    pub async fn start(opts: Influx2Options) -> anyhow::Result<Influx2> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut st = State {
            flavor: opts.flavor,
            org_id: new_id(),
            org_name: opts.org.clone(),
            user_id: new_id(),
            user_name: "admin".into(),
            ..State::default()
        };
        for b in &opts.buckets {
            st.buckets.insert(b.clone(), new_id());
        }
        let admin_token = if opts.flavor == Flavor::Cloud {
            let p = st.all_access_permissions();
            st.seed("all-access token", p)
        } else {
            let p = st.operator_permissions();
            st.seed("operator token", p)
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(st),
            changed: watch::channel(0).0,
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), stop.clone()));
        Ok(Influx2 {
            addr,
            shared,
            stop,
            admin_token,
        })
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The organization's id.
    pub fn org_id(&self) -> String {
        self.shared.lock().org_id.clone()
    }

    /// The organization's name.
    pub fn org_name(&self) -> String {
        self.shared.lock().org_name.clone()
    }

    /// The admin user's id (owner of every authorization).
    pub fn user_id(&self) -> String {
        self.shared.lock().user_id.clone()
    }

    /// A bucket's id.
    pub fn bucket_id(&self, name: &str) -> Option<String> {
        self.shared.lock().buckets.get(name).cloned()
    }

    /// Makes a bucket (or gives an existing one a new id, as deleting and re-making it would).
    pub fn make_bucket(&self, name: &str) -> String {
        let id = new_id();
        self.shared.lock().buckets.insert(name.into(), id.clone());
        self.shared.bump();
        id
    }

    /// Deletes a bucket.
    pub fn delete_bucket(&self, name: &str) {
        self.shared.lock().buckets.remove(name);
        self.shared.bump();
    }

    /// The admin token made at start (OSS: operator; Cloud: all-access).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// A new all-access token for the org (every type in the org, the org, its own user).
    pub fn all_access_token(&self) -> String {
        let mut st = self.shared.lock();
        let p = st.all_access_permissions();
        st.seed("all-access token", p)
    }

    /// A new token with exactly these permissions (resources as stored: `type`, `id`,
    /// `orgID`), owned by the admin user.
    pub fn custom_token(&self, permissions: Vec<Value>) -> String {
        self.shared.lock().seed("custom token", permissions)
    }

    /// Every authorization made through the API (not the seeded admin tokens).
    pub fn authorizations(&self) -> Vec<Authorization> {
        self.shared
            .lock()
            .auths
            .values()
            .filter(|a| !a.seeded)
            .cloned()
            .collect()
    }

    /// Lines written to a bucket.
    pub fn points(&self, bucket: &str) -> Vec<String> {
        self.shared
            .lock()
            .points
            .get(bucket)
            .cloned()
            .unwrap_or_default()
    }

    /// Every token the server ever issued, including deleted ones and the admin tokens.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.lock().issued.clone()
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.shared.lock().log.clone()
    }

    /// Answers matching requests in front of the server (see [`Injection`]).
    pub fn inject(&self, injection: Injection) {
        self.shared.lock().injections.push(injection);
    }

    /// Removes every injection.
    pub fn clear_injections(&self) {
        self.shared.lock().injections.clear();
    }

    /// Request and response bodies that did not match the published contract.
    pub fn contract_violations(&self) -> Vec<String> {
        self.shared.lock().violations.clone()
    }

    /// Waits until `cond` holds for the authorizations made through the API, re-checking
    /// whenever the server's state changes.
    pub async fn wait_for_authorizations(
        &self,
        timeout: Duration,
        mut cond: impl FnMut(&[Authorization]) -> bool,
    ) -> anyhow::Result<Vec<Authorization>> {
        let mut rx = self.shared.changed.subscribe();
        let wait = async {
            loop {
                let auths = self.authorizations();
                if cond(&auths) {
                    return auths;
                }
                if rx.changed().await.is_err() {
                    return auths;
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(a) => Ok(a),
            Err(_) => bail!(
                "condition on authorizations not met within {timeout:?}; now: {:?}",
                self.authorizations()
                    .iter()
                    .map(|a| (&a.description, &a.status))
                    .collect::<Vec<_>>()
            ),
        }
    }
}

impl Drop for Influx2 {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = serve_conn(stream, shared) => {}
                    }
                });
            }
        }
    }
}

/// A request as parsed.
struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    close: bool,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn fill(&mut self) -> anyhow::Result<()> {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(IDLE_TIMEOUT, self.stream.read(&mut chunk))
            .await
            .context("idle timeout")??;
        if n == 0 {
            bail!("connection closed");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    async fn take(&mut self, n: usize) -> anyhow::Result<Vec<u8>> {
        while self.buf.len() < n {
            self.fill().await?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn line(&mut self) -> anyhow::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let mut l: Vec<u8> = self.buf.drain(..i + 2).collect();
                l.truncate(i);
                return Ok(l);
            }
            if self.buf.len() > MAX_HEAD {
                bail!("line too long");
            }
            self.fill().await?;
        }
    }

    /// Reads one request; `Ok(None)` on a clean close between requests.
    async fn request(&mut self) -> anyhow::Result<Option<Request>> {
        let head_len = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if self.buf.len() > MAX_HEAD {
                bail!("head too large");
            }
            if self.buf.is_empty() {
                let mut chunk = [0u8; 8192];
                let n = tokio::time::timeout(IDLE_TIMEOUT, self.stream.read(&mut chunk))
                    .await
                    .context("idle timeout")??;
                if n == 0 {
                    return Ok(None);
                }
                self.buf.extend_from_slice(&chunk[..n]);
            } else {
                self.fill().await?;
            }
        };
        let head: Vec<u8> = self.buf.drain(..head_len).collect();
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&head)? {
            httparse::Status::Complete(_) => {}
            httparse::Status::Partial => bail!("partial head"),
        }
        let method = req.method.unwrap_or_default().to_owned();
        let target = req.path.unwrap_or_default().to_owned();
        let http10 = req.version == Some(0);
        let headers: Vec<(String, String)> = req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8_lossy(h.value).trim().to_owned(),
                )
            })
            .collect();
        let mut r = Request {
            method,
            target,
            headers,
            body: Vec::new(),
            close: http10,
        };
        if let Some(c) = r.header("connection") {
            if c.eq_ignore_ascii_case("close") {
                r.close = true;
            }
        }
        if r.header("expect")
            .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
        {
            self.stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await?;
        }
        let chunked = r
            .header("transfer-encoding")
            .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
        if chunked {
            loop {
                let size_line = String::from_utf8(self.line().await?)?;
                let size_hex = size_line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_hex, 16).context("chunk size")?;
                if size == 0 {
                    while !self.line().await?.is_empty() {}
                    break;
                }
                if r.body.len() + size > MAX_BODY {
                    bail!("body too large");
                }
                let data = self.take(size).await?;
                r.body.extend_from_slice(&data);
                if !self.line().await?.is_empty() {
                    bail!("bad chunk end");
                }
            }
        } else if let Some(cl) = r.header("content-length") {
            let n: usize = cl.parse().context("content-length")?;
            if n > MAX_BODY {
                bail!("body too large");
            }
            r.body = self.take(n).await?;
        }
        Ok(Some(r))
    }
}

async fn serve_conn(stream: TcpStream, shared: Arc<Shared>) {
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
    };
    loop {
        let req = match conn.request().await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(_) => {
                let _ = write_response(
                    &mut conn.stream,
                    400,
                    "application/json",
                    &[],
                    br#"{"code":"invalid","message":"bad request"}"#,
                    true,
                )
                .await;
                return;
            }
        };
        let path = req.target.split('?').next().unwrap_or("").to_owned();
        let injected = take_injection(&shared, &req.method, &path);
        let flavor = shared.lock().flavor;
        let (status, ctype, body, mut headers) = match injected {
            Some(inj) => (
                inj.status,
                inj.content_type,
                inj.body.into_bytes(),
                inj.headers,
            ),
            None => {
                let (status, ctype, body) = route(&shared, &req);
                check_contract(&shared, flavor, &req, &path, status, ctype, &body);
                (status, ctype.to_owned(), body, Vec::new())
            }
        };
        headers.push(("X-Influxdb-Build".into(), flavor.build().into()));
        if let Some(v) = flavor.version() {
            headers.push(("X-Influxdb-Version".into(), v.into()));
        }
        {
            let mut st = shared.lock();
            st.log.push(Logged {
                method: req.method.clone(),
                path,
                status,
                at: Instant::now(),
            });
        }
        shared.bump();
        let body = if req.method == "HEAD" {
            Vec::new()
        } else {
            body
        };
        if write_response(&mut conn.stream, status, &ctype, &headers, &body, req.close)
            .await
            .is_err()
            || req.close
        {
            return;
        }
    }
}

fn take_injection(shared: &Shared, method: &str, path: &str) -> Option<Injection> {
    let mut st = shared.lock();
    let i = st
        .injections
        .iter()
        .position(|j| j.times > 0 && j.method == method && path.starts_with(&j.path_prefix))?;
    let inj = &mut st.injections[i];
    inj.times = inj.times.saturating_sub(1);
    Some(inj.clone())
}

/// Checks a request body and the answer against the published contract; records violations.
fn check_contract(
    shared: &Shared,
    flavor: Flavor,
    req: &Request,
    path: &str,
    status: u16,
    ctype: &str,
    body: &[u8],
) {
    let contract = flavor.contract();
    let mut found = Vec::new();
    if matches!(req.method.as_str(), "POST" | "PATCH") {
        // A body that is not JSON is the server's to refuse; the contract covers JSON ones.
        if let Ok(v) = serde_json::from_slice::<Value>(&req.body) {
            found.extend(openapi::check_request(contract, &req.method, path, &v));
        }
    }
    let answer = if body.is_empty() {
        None
    } else if ctype.starts_with("application/json") {
        match serde_json::from_slice::<Value>(body) {
            Ok(v) => Some(v),
            Err(e) => {
                found.push(format!(
                    "{} {path} {status}: body is not JSON: {e}",
                    req.method
                ));
                None
            }
        }
    } else {
        Some(Value::String(String::from_utf8_lossy(body).into_owned()))
    };
    found.extend(openapi::check_response(
        contract,
        &req.method,
        path,
        status,
        answer.as_ref(),
    ));
    if !found.is_empty() {
        shared.lock().violations.extend(found);
    }
}

async fn write_response(
    stream: &mut TcpStream,
    status: u16,
    ctype: &str,
    headers: &[(String, String)],
    body: &[u8],
    close: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        _ => "Unknown",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if status != 204 {
        head.push_str(&format!(
            "Content-Type: {ctype}\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    if status != 204 {
        stream.write_all(body).await?;
    }
    stream.flush().await
}

type Answer = (u16, &'static str, Vec<u8>);

fn error(status: u16, code: &str, message: &str) -> Answer {
    (
        status,
        "application/json; charset=utf-8",
        json!({"code": code, "message": message})
            .to_string()
            .into_bytes(),
    )
}

fn ok_json(status: u16, v: Value) -> Answer {
    (
        status,
        "application/json; charset=utf-8",
        v.to_string().into_bytes(),
    )
}

fn no_content() -> Answer {
    (204, "text/plain", Vec::new())
}

fn unauthorized() -> Answer {
    error(401, "unauthorized", "unauthorized access")
}

fn route(shared: &Shared, req: &Request) -> Answer {
    let url = match reqwest::Url::parse(&format!("http://contract{}", req.target)) {
        Ok(u) => u,
        Err(_) => return error(400, "invalid", "bad request target"),
    };
    let path = url.path().trim_end_matches('/').to_owned();
    let query: BTreeMap<String, String> = url.query_pairs().into_owned().collect();
    let m = req.method.as_str();
    let flavor = shared.lock().flavor;
    match (m, path.as_str()) {
        ("GET" | "HEAD", "/ping") => no_content(),
        ("GET" | "HEAD", "/health") if flavor != Flavor::Cloud => ok_json(
            200,
            json!({"name":"influxdb","message":"ready for queries and writes","status":"pass",
                   "checks":[],"version": flavor.version(),"commit":"contract"}),
        ),
        _ => {
            let mut st = shared.lock();
            let Some(caller) = authenticate(&st, req) else {
                return unauthorized();
            };
            const ONE: &str = "/api/v2/authorizations/";
            match (m, path.as_str()) {
                ("POST", "/api/v2/authorizations") => post_authorization(&mut st, &caller, req),
                ("GET", "/api/v2/authorizations") => list_authorizations(&st, &caller, &query),
                ("GET" | "DELETE" | "PATCH", p) if p.starts_with(ONE) => {
                    one_authorization(&mut st, &caller, req, &p[ONE.len()..])
                }
                ("GET", "/api/v2/buckets") => list_buckets(&st, &caller, &query),
                ("POST", "/api/v2/write") => write(&mut st, &caller, &query, &req.body),
                ("POST", "/api/v2/query") => flux_query(&st, &caller, &query, req),
                (_, "/api/v2/authorizations" | "/api/v2/write" | "/api/v2/query") => {
                    error(405, "method not allowed", "method not allowed")
                }
                _ => error(404, "not found", "path not found"),
            }
        }
    }
}

fn authenticate(st: &State, req: &Request) -> Option<Authorization> {
    let h = req.header("authorization")?;
    let (scheme, token) = h.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("token") && !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    st.auths
        .values()
        .find(|a| a.token == token && a.status == "active")
        .cloned()
}

fn field<'a>(p: &'a Value, k: &str) -> Option<&'a str> {
    p["resource"].get(k).and_then(Value::as_str)
}

/// `influxdb.Permission.Matches` (v2.7): whether held permission `p` covers the wanted one.
fn matches(p: &Value, action: &str, rtype: &str, org: Option<&str>, id: Option<&str>) -> bool {
    if p["action"] != action {
        return false;
    }
    let ty = field(p, "type");
    if ty == Some("instance") {
        return true;
    }
    if ty != Some(rtype) {
        return false;
    }
    match (field(p, "orgID"), field(p, "id")) {
        (None, None) => true,
        (Some(po), None) => org == Some(po),
        (_, Some(pid)) => id == Some(pid),
    }
}

/// Whether `auth` may do `action` on the resource (authorizer `IsAllowed`).
fn allowed(
    auth: &Authorization,
    action: &str,
    rtype: &str,
    org: Option<&str>,
    id: Option<&str>,
) -> bool {
    auth.status == "active"
        && auth
            .permissions
            .iter()
            .any(|p| matches(p, action, rtype, org, id))
}

/// `influxdb.Resource.String` after the action: `write:orgs/<org>/buckets/<id>`.
fn permission_string(action: &str, rtype: &str, org: Option<&str>, id: Option<&str>) -> String {
    let r = match (org, id) {
        (Some(o), Some(i)) => format!("orgs/{o}/{rtype}/{i}"),
        (Some(o), None) => format!("orgs/{o}/{rtype}"),
        (None, Some(i)) => format!("{rtype}/{i}"),
        (None, None) => rtype.to_owned(),
    };
    format!("{action}:{r}")
}

/// A stored permission as the server shows it: `name` and `org` filled in from the ids.
fn shown_permission(st: &State, p: &Value) -> Value {
    let mut v = p.clone();
    let (ty, id, org) = (field(p, "type"), field(p, "id"), field(p, "orgID"));
    let name = match (ty, id) {
        (Some("buckets"), Some(id)) => st
            .buckets
            .iter()
            .find(|(_, b)| b.as_str() == id)
            .map(|(n, _)| n.clone()),
        (Some("orgs"), Some(id)) if id == st.org_id => Some(st.org_name.clone()),
        (Some("users"), Some(id)) if id == st.user_id => Some(st.user_name.clone()),
        _ => None,
    };
    if let Some(r) = v.get_mut("resource").and_then(Value::as_object_mut) {
        if let Some(n) = name {
            r.insert("name".into(), json!(n));
        }
        if org == Some(st.org_id.as_str()) {
            r.insert("org".into(), json!(st.org_name));
        }
    }
    v
}

fn auth_json(st: &State, a: &Authorization, with_token: bool) -> Value {
    let mut v = json!({
        "id": a.id,
        "status": a.status,
        "description": a.description,
        "orgID": a.org_id,
        "org": st.org_name,
        "userID": a.user_id,
        "user": st.user_name,
        "permissions": a.permissions.iter().map(|p| shown_permission(st, p)).collect::<Vec<_>>(),
        "links": {
            "self": format!("/api/v2/authorizations/{}", a.id),
            "user": format!("/api/v2/users/{}", a.user_id),
        },
        "createdAt": format_rfc3339(a.created_at_ms),
        "updatedAt": format_rfc3339(a.created_at_ms),
    });
    if with_token {
        v["token"] = Value::String(a.token.clone());
    }
    v
}

/// Reads one permission as the server's JSON decoding does: only `type`, `id` and `orgID`
/// are kept.
fn read_permission(flavor: Flavor, p: &Value) -> Result<Value, Answer> {
    let r = p.get("resource").cloned().unwrap_or(Value::Null);
    let rtype = r.get("type").and_then(Value::as_str).unwrap_or("");
    if !flavor.resource_types().contains(&rtype) {
        return Err(error(
            400,
            "invalid",
            "invalid resource type for permission",
        ));
    }
    let action = match p.get("action").and_then(Value::as_str) {
        Some(a @ ("read" | "write")) => a,
        _ => return Err(error(400, "invalid", "invalid action type for permission")),
    };
    let mut ids = [None, None];
    for (slot, k) in ids.iter_mut().zip(["id", "orgID"]) {
        match r.get(k) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if is_id(s) => *slot = Some(s.as_str()),
            Some(_) => return Err(error(400, "invalid", "invalid json structure: invalid ID")),
        }
    }
    Ok(perm(action, rtype, ids[1], ids[0]))
}

fn post_authorization(st: &mut State, caller: &Authorization, req: &Request) -> Answer {
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return error(400, "invalid", "invalid json structure: expected an object"),
        Err(e) => return error(400, "invalid", &format!("invalid json structure: {e}")),
    };
    let raw = match body.get("permissions") {
        Some(Value::Array(p)) if !p.is_empty() => p.clone(),
        Some(Value::Array(_)) | None | Some(Value::Null) => {
            return error(400, "invalid", "authorization must include permissions")
        }
        Some(_) => return error(400, "invalid", "invalid json structure: permissions"),
    };
    let mut perms = Vec::with_capacity(raw.len());
    for p in &raw {
        match read_permission(st.flavor, p) {
            Ok(p) => perms.push(p),
            Err(a) => return a,
        }
    }
    let org_id = match body.get("orgID") {
        None | Some(Value::Null) => return error(400, "invalid", "org id required"),
        Some(Value::String(s)) if s.is_empty() => return error(400, "invalid", "org id required"),
        Some(Value::String(s)) if is_id(s) => s.clone(),
        Some(_) => return error(400, "invalid", "invalid json structure: invalid ID"),
    };
    let status = match body.get("status").and_then(Value::as_str) {
        None => "active".to_owned(),
        Some(s @ ("active" | "inactive")) => s.to_owned(),
        Some(_) => return error(400, "invalid", "invalid status"),
    };
    // The owner is the caller's user unless the body names one.
    let user_id = match body.get("userID").and_then(Value::as_str) {
        Some(u) if is_id(u) => u.to_owned(),
        Some(_) => return error(400, "invalid", "invalid json structure: invalid ID"),
        None => caller.user_id.clone(),
    };
    // authorizer: create in the org, write the owner user, hold every permission granted.
    if !allowed(caller, "write", "authorizations", Some(&org_id), None) {
        let p = permission_string("write", "authorizations", Some(&org_id), None);
        return error(401, "unauthorized", &format!("{p} is unauthorized"));
    }
    if !allowed(caller, "write", "users", None, Some(&user_id)) {
        let p = permission_string("write", "users", None, Some(&user_id));
        return error(401, "unauthorized", &format!("{p} is unauthorized"));
    }
    for p in &perms {
        let (a, t) = (
            p["action"].as_str().unwrap_or(""),
            field(p, "type").unwrap_or(""),
        );
        let (o, i) = (field(p, "orgID"), field(p, "id"));
        if !allowed(caller, a, t, o, i) {
            return error(
                403,
                "forbidden",
                &format!(
                    "permission {} is not allowed",
                    permission_string(a, t, o, i)
                ),
            );
        }
    }
    // Authorization.Valid: every permission's org is the authorization's.
    for p in &perms {
        if let Some(o) = field(p, "orgID").filter(|o| *o != org_id) {
            let (a, t, i) = (
                p["action"].as_str().unwrap_or(""),
                field(p, "type").unwrap_or(""),
                field(p, "id"),
            );
            return error(
                400,
                "invalid",
                &format!(
                    "permission {} is not for org id {org_id}",
                    permission_string(a, t, Some(o), i)
                ),
            );
        }
    }
    if org_id != st.org_id || user_id != st.user_id {
        return error(400, "invalid", "unable to create token");
    }
    let a = Authorization {
        id: new_id(),
        token: new_token(),
        status,
        description: body
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        org_id,
        user_id,
        permissions: perms,
        seeded: false,
        created_at_ms: now_ms(),
    };
    let v = auth_json(st, &a, true);
    st.issued.push(a.token.clone());
    st.auths.insert(a.id.clone(), a);
    ok_json(201, v)
}

/// Whether the caller may read an authorization: the authorization in its org, and its owner.
fn may_read(caller: &Authorization, a: &Authorization) -> bool {
    allowed(
        caller,
        "read",
        "authorizations",
        Some(&a.org_id),
        Some(&a.id),
    ) && allowed(caller, "read", "users", None, Some(&a.user_id))
}

fn list_authorizations(st: &State, caller: &Authorization, q: &BTreeMap<String, String>) -> Answer {
    for k in ["orgID", "userID"] {
        if let Some(v) = q.get(k) {
            if !is_id(v) {
                return error(400, "invalid", "id must have a length of 16 bytes");
            }
        }
    }
    if let Some(org) = q.get("org") {
        if *org != st.org_name {
            return error(
                404,
                "not found",
                &format!("organization name \"{org}\" not found"),
            );
        }
    }
    let list: Vec<Value> = st
        .auths
        .values()
        .filter(|a| q.get("orgID").is_none_or(|o| *o == a.org_id))
        .filter(|a| q.get("userID").is_none_or(|u| *u == a.user_id))
        .filter(|a| may_read(caller, a))
        .map(|a| auth_json(st, a, st.flavor.shows_tokens()))
        .collect();
    ok_json(
        200,
        json!({"links": {"self": "/api/v2/authorizations"}, "authorizations": list}),
    )
}

fn one_authorization(st: &mut State, caller: &Authorization, req: &Request, id: &str) -> Answer {
    if !is_id(id) {
        return error(400, "invalid", "id must have a length of 16 bytes");
    }
    let Some(a) = st.auths.get(id).cloned() else {
        return error(404, "not found", "authorization not found");
    };
    let method = req.method.as_str();
    let action = if method == "GET" { "read" } else { "write" };
    for (t, org, rid) in [
        ("authorizations", Some(a.org_id.as_str()), a.id.as_str()),
        ("users", None, a.user_id.as_str()),
    ] {
        if !allowed(caller, action, t, org, Some(rid)) {
            let p = permission_string(action, t, org, Some(rid));
            return error(401, "unauthorized", &format!("{p} is unauthorized"));
        }
    }
    match method {
        "DELETE" => {
            st.auths.remove(id);
            no_content()
        }
        "PATCH" => {
            let body: Value = match serde_json::from_slice(&req.body) {
                Ok(v @ Value::Object(_)) => v,
                _ => return error(400, "invalid", "invalid json structure"),
            };
            let mut a = a;
            match body.get("status") {
                None => {}
                Some(Value::String(s)) if s == "active" || s == "inactive" => a.status = s.clone(),
                Some(_) => return error(400, "invalid", "invalid status"),
            }
            if let Some(d) = body.get("description").and_then(Value::as_str) {
                a.description = d.to_owned();
            }
            let v = auth_json(st, &a, false);
            st.auths.insert(a.id.clone(), a);
            ok_json(200, v)
        }
        _ => ok_json(200, auth_json(st, &a, false)),
    }
}

fn bucket_json(st: &State, name: &str, id: &str) -> Value {
    json!({
        "id": id,
        "orgID": st.org_id,
        "type": "user",
        "name": name,
        "schemaType": "implicit",
        "retentionRules": [{"type": "expire", "everySeconds": 0, "shardGroupDurationSeconds": 604800}],
        "createdAt": format_rfc3339(0),
        "updatedAt": format_rfc3339(0),
        "links": {"self": format!("/api/v2/buckets/{id}"), "org": format!("/api/v2/orgs/{}", st.org_id)},
        "labels": [],
    })
}

/// `GET /api/v2/buckets`: by name in an org (404 when there is none), or every bucket; the
/// authorizer hides those the caller may not read.
fn list_buckets(st: &State, caller: &Authorization, q: &BTreeMap<String, String>) -> Answer {
    let org_id = match (q.get("orgID"), q.get("org")) {
        (None, None) => None,
        _ => match org_of(st, q) {
            Ok(o) => Some(o),
            Err(a) => return a,
        },
    };
    let name = q.get("name");
    if let (Some(org), Some(name)) = (&org_id, name) {
        if *org != st.org_id || !st.buckets.contains_key(name) {
            return error(404, "not found", &format!("bucket \"{name}\" not found"));
        }
    }
    let list: Vec<Value> = st
        .buckets
        .iter()
        .filter(|(n, _)| name.is_none_or(|w| w == *n))
        .filter(|(_, id)| q.get("id").is_none_or(|w| w == *id))
        .filter(|(_, id)| allowed(caller, "read", "buckets", Some(&st.org_id), Some(id)))
        .map(|(n, id)| bucket_json(st, n, id))
        .collect();
    ok_json(
        200,
        json!({"links": {"self": "/api/v2/buckets"}, "buckets": list}),
    )
}

fn org_of(st: &State, q: &BTreeMap<String, String>) -> Result<String, Answer> {
    match (q.get("orgID"), q.get("org")) {
        (Some(id), _) if *id == st.org_id => Ok(id.clone()),
        (None, Some(name)) if *name == st.org_name => Ok(st.org_id.clone()),
        (Some(id), _) => Err(error(
            404,
            "not found",
            &format!("organization \"{id}\" not found"),
        )),
        (None, Some(name)) => Err(error(
            404,
            "not found",
            &format!("organization name \"{name}\" not found"),
        )),
        (None, None) => Err(error(400, "invalid", "Please provide either orgID or org")),
    }
}

fn write(
    st: &mut State,
    caller: &Authorization,
    q: &BTreeMap<String, String>,
    body: &[u8],
) -> Answer {
    let org_id = match org_of(st, q) {
        Ok(o) => o,
        Err(a) => return a,
    };
    let Some(bucket) = q.get("bucket") else {
        return error(400, "invalid", "bucket is required");
    };
    let Some(bucket_id) = st.buckets.get(bucket).cloned() else {
        return error(404, "not found", &format!("bucket \"{bucket}\" not found"));
    };
    if !allowed(caller, "write", "buckets", Some(&org_id), Some(&bucket_id)) {
        return error(403, "forbidden", "insufficient permissions for write");
    }
    let text = String::from_utf8_lossy(body);
    let mut lines = Vec::new();
    for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !l.contains(' ') {
            return error(
                400,
                "invalid",
                &format!("unable to parse '{l}': missing fields"),
            );
        }
        lines.push(l.to_owned());
    }
    st.points.entry(bucket.clone()).or_default().extend(lines);
    (204, "text/plain", Vec::new())
}

fn flux_bucket(flux: &str) -> Option<String> {
    let i = flux.find("from(")?;
    let rest = &flux[i + 5..];
    let j = rest.find("bucket")?;
    let rest = rest[j + 6..].trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let end = rest.find('"')?;
    Some(rest[..end].to_owned())
}

fn flux_query(
    st: &State,
    caller: &Authorization,
    q: &BTreeMap<String, String>,
    req: &Request,
) -> Answer {
    let org_id = match org_of(st, q) {
        Ok(o) => o,
        Err(a) => return a,
    };
    let is_json = req
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/json"));
    // Annotation rows the client asked for in `dialect.annotations` (JSON bodies only).
    let mut annotations: Vec<String> = Vec::new();
    let flux = if is_json {
        match serde_json::from_slice::<Map<String, Value>>(&req.body) {
            Ok(m) => {
                if let Some(Value::Array(a)) = m.get("dialect").and_then(|d| d.get("annotations")) {
                    annotations = a
                        .iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect();
                }
                m.get("query")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            }
            Err(e) => {
                return error(
                    400,
                    "invalid",
                    &format!("failed to decode request body: {e}"),
                )
            }
        }
    } else {
        String::from_utf8_lossy(&req.body).into_owned()
    };
    let Some(bucket) = flux_bucket(&flux) else {
        return error(
            400,
            "invalid",
            "compilation failed: no from(bucket: ...) found",
        );
    };
    let Some(bucket_id) = st.buckets.get(&bucket).cloned() else {
        return error(
            404,
            "not found",
            &format!("could not find bucket \"{bucket}\""),
        );
    };
    if !allowed(caller, "read", "buckets", Some(&org_id), Some(&bucket_id)) {
        return error(403, "forbidden", "insufficient permissions for read");
    }
    // Annotated CSV as InfluxDB writes it when the dialect asks for annotations.
    let mut csv = String::new();
    for a in &annotations {
        match a.as_str() {
            "datatype" => csv.push_str("#datatype,string,long,string\r\n"),
            "group" => csv.push_str("#group,false,false,false\r\n"),
            "default" => csv.push_str("#default,_result,,\r\n"),
            _ => {}
        }
    }
    csv.push_str(",result,table,_raw\r\n");
    for l in st.points.get(&bucket).map(Vec::as_slice).unwrap_or(&[]) {
        csv.push_str(&format!(",_result,0,\"{}\"\r\n", l.replace('"', "\"\"")));
    }
    (200, "text/csv; charset=utf-8", csv.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_bucket_in_flux() {
        assert_eq!(
            flux_bucket(r#"from(bucket: "telegraf") |> range(start: -1h)"#).as_deref(),
            Some("telegraf")
        );
        assert_eq!(flux_bucket(r#"from(bucket:"a")"#).as_deref(), Some("a"));
        assert_eq!(flux_bucket("buckets()"), None);
    }

    #[test]
    fn tokens_have_the_real_format() {
        let t = new_token();
        assert_eq!(t.len(), 88);
        assert!(t.ends_with("=="));
        assert!(t
            .trim_end_matches('=')
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    }

    #[test]
    fn permissions_match_as_the_server_matches_them() {
        let org = "00000000000000aa";
        let all_buckets = perm("write", "buckets", Some(org), None);
        assert!(matches(
            &all_buckets,
            "write",
            "buckets",
            Some(org),
            Some("00000000000000bb")
        ));
        assert!(!matches(
            &all_buckets,
            "write",
            "buckets",
            Some("00000000000000cc"),
            None
        ));
        assert!(!matches(&all_buckets, "read", "buckets", Some(org), None));
        let one = perm("write", "buckets", Some(org), Some("00000000000000bb"));
        assert!(!matches(&one, "write", "buckets", Some(org), None));
        assert!(!matches(
            &one,
            "write",
            "buckets",
            Some(org),
            Some("00000000000000dd")
        ));
        let inst = perm("write", "instance", None, None);
        assert!(matches(
            &inst,
            "write",
            "users",
            None,
            Some("00000000000000ee")
        ));
        assert_eq!(
            permission_string("write", "buckets", Some(org), None),
            "write:orgs/00000000000000aa/buckets"
        );
    }
}
