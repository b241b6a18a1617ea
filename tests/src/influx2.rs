//! An in-test HTTP server that follows the InfluxDB 2 API contract for what postern uses.
//!
//! The contract followed is InfluxDB OSS 2.x's HTTP API as documented in its OpenAPI spec
//! (`/api/v2/authorizations`: `PostAuthorizations`, `GetAuthorizations`,
//! `GetAuthorizationsID`, `DeleteAuthorizationsID`; `PostWrite`; `PostQuery`; `GetPing`;
//! `GetHealth`) and as the OSS server implements it (influxdb `authorization/http_server.go`,
//! `kit/transport/http` error encoding):
//!
//! - every request except `/ping` and `/health` needs `Authorization: Token <token>` (or
//!   `Bearer`) naming an active authorization, else `401 {"code":"unauthorized","message":
//!   "unauthorized access"}`;
//! - `POST /api/v2/authorizations` takes `{orgID, permissions, description?, status?}` and
//!   answers `201` with the authorization (`id`, `token`, `status`, `description`, `orgID`,
//!   `org`, `userID`, `user`, `permissions`, `links`, `createdAt`, `updatedAt`). Refusals:
//!   body not JSON -> `400 invalid "invalid json structure: …"`; no permissions -> `400 invalid
//!   "authorization must include permissions"`; unknown resource type -> `400 invalid "invalid
//!   resource type \"…\" for permission"`; unknown action -> `400 invalid "invalid action type
//!   for permission"`; no orgID -> `400 invalid "org id required"`; an orgID that is not 16 hex
//!   digits -> `400 invalid "invalid json structure: invalid ID"`; an org that does not exist ->
//!   `400 invalid "unable to create token"` (the server's sanitized message); a token without
//!   `write` on the org's `authorizations` -> `401 unauthorized "write:orgs/<id>/authorizations
//!   is unauthorized"`;
//! - `GET /api/v2/authorizations[?orgID=|org=|id=]` answers `200 {"links":…,"authorizations":[…]}`;
//!   `GET|DELETE /api/v2/authorizations/{id}` answer `200` / `204`, or `404 {"code":"not
//!   found","message":"authorization not found"}`. Like InfluxDB Cloud and newer OSS releases,
//!   a token's value is shown only in the `POST` answer, never in listings;
//! - `POST /api/v2/write?org|orgID=&bucket=` stores the lines (`204`); an unknown bucket ->
//!   `404 not found "bucket \"…\" not found"`; no `write` permission on the bucket -> `403
//!   forbidden "insufficient permissions for write"`;
//! - `POST /api/v2/query?org|orgID=` is minimal: it finds `from(bucket: "…")` in the Flux text
//!   (JSON `{"query": …}` or `application/vnd.flux`), checks `read` on that bucket (`403`
//!   otherwise) and answers `200 text/csv` with one row per stored line in a `_raw` column,
//!   preceded by the `#datatype`/`#group`/`#default` annotation rows a JSON body's
//!   `dialect.annotations` asks for (as the client libraries do). It does not evaluate Flux.
//!
//! The admin token made at start is an operator token (all permissions). Request framing is
//! HTTP/1.1 with keep-alive, `Content-Length` or chunked bodies, and `Expect: 100-continue`.

use anyhow::{bail, Context};
use postern_outlet::lease::backend::format_rfc3339;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Resource types InfluxDB 2.7 knows.
const RESOURCE_TYPES: &[&str] = &[
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

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 16 * 1024 * 1024;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What to set up in the server.
#[derive(Debug, Clone)]
pub struct Influx2Options {
    /// The organization's name.
    pub org: String,
    /// Buckets to create in it.
    pub buckets: Vec<String>,
}

impl Default for Influx2Options {
    fn default() -> Self {
        Influx2Options {
            org: "postern".into(),
            buckets: vec!["telegraf".into(), "other".into()],
        }
    }
}

/// One authorization as the server holds it (for assertions).
#[derive(Debug, Clone, PartialEq)]
pub struct Authorization {
    pub id: String,
    pub token: String,
    pub status: String,
    pub description: String,
    pub org_id: String,
    pub user_id: String,
    pub permissions: Vec<Value>,
    pub operator: bool,
    pub created_at_ms: u64,
}

/// One request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub status: u16,
}

#[derive(Debug, Default)]
struct State {
    org_id: String,
    org_name: String,
    user_id: String,
    buckets: BTreeMap<String, String>,
    auths: BTreeMap<String, Authorization>,
    points: BTreeMap<String, Vec<String>>,
    log: Vec<Logged>,
    /// Every token ever issued, the operator's included (for checks that none leaks).
    issued: Vec<String>,
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

fn new_token() -> String {
    let bytes: [u8; 48] = rand::random();
    hex::encode(bytes)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn is_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Influx2 {
    /// Starts the server on 127.0.0.1 with a fresh org, buckets and an operator token.
    pub async fn start(opts: Influx2Options) -> anyhow::Result<Influx2> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let admin_token = new_token();
        let mut st = State {
            org_id: new_id(),
            org_name: opts.org.clone(),
            user_id: new_id(),
            ..State::default()
        };
        for b in &opts.buckets {
            st.buckets.insert(b.clone(), new_id());
        }
        let admin = Authorization {
            id: new_id(),
            token: admin_token.clone(),
            status: "active".into(),
            description: "operator token".into(),
            org_id: st.org_id.clone(),
            user_id: st.user_id.clone(),
            permissions: Vec::new(),
            operator: true,
            created_at_ms: now_ms(),
        };
        st.issued.push(admin.token.clone());
        st.auths.insert(admin.id.clone(), admin);
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

    /// A bucket's id.
    pub fn bucket_id(&self, name: &str) -> Option<String> {
        self.shared.lock().buckets.get(name).cloned()
    }

    /// The operator token.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Every authorization except the operator token.
    pub fn authorizations(&self) -> Vec<Authorization> {
        self.shared
            .lock()
            .auths
            .values()
            .filter(|a| !a.operator)
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

    /// Every token the server ever issued, including deleted ones and the operator token.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.lock().issued.clone()
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.shared.lock().log.clone()
    }

    /// Waits until `cond` holds for the non-operator authorizations, re-checking whenever the
    /// server's state changes.
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
                    .map(|a| &a.description)
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
                    br#"{"code":"invalid","message":"bad request"}"#,
                    true,
                )
                .await;
                return;
            }
        };
        let (status, ctype, body) = route(&shared, &req);
        {
            let mut st = shared.lock();
            st.log.push(Logged {
                method: req.method.clone(),
                path: req.target.split('?').next().unwrap_or("").to_owned(),
                status,
            });
        }
        shared.bump();
        let body = if req.method == "HEAD" {
            Vec::new()
        } else {
            body
        };
        if write_response(&mut conn.stream, status, ctype, &body, req.close)
            .await
            .is_err()
            || req.close
        {
            return;
        }
    }
}

async fn write_response(
    stream: &mut TcpStream,
    status: u16,
    ctype: &str,
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
        _ => "Unknown",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nX-Influxdb-Build: OSS\r\nX-Influxdb-Version: v2.7.0-postern-contract\r\n"
    );
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
    match (m, path.as_str()) {
        ("GET" | "HEAD", "/ping") => (204, "text/plain", Vec::new()),
        ("GET" | "HEAD", "/health") => ok_json(
            200,
            json!({"name":"influxdb","message":"ready for queries and writes","status":"pass",
                   "checks":[],"version":"v2.7.0-postern-contract","commit":"contract"}),
        ),
        _ => {
            let mut st = shared.lock();
            let Some(caller) = authenticate(&st, req) else {
                return unauthorized();
            };
            match (m, path.as_str()) {
                ("POST", "/api/v2/authorizations") => post_authorization(&mut st, &caller, req),
                ("GET", "/api/v2/authorizations") => list_authorizations(&st, &caller, &query),
                ("GET" | "DELETE", p) if p.starts_with("/api/v2/authorizations/") => {
                    let id = &p["/api/v2/authorizations/".len()..];
                    one_authorization(&mut st, &caller, m, id)
                }
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

/// Whether `auth` may do `action` on a resource of `rtype` in `org_id` with `id`/`name`.
fn allowed(
    auth: &Authorization,
    action: &str,
    rtype: &str,
    org_id: &str,
    id: Option<&str>,
    name: Option<&str>,
) -> bool {
    if auth.operator {
        return true;
    }
    auth.permissions.iter().any(|p| {
        let r = &p["resource"];
        let field = |k: &str| r.get(k).and_then(Value::as_str);
        p["action"] == action
            && (field("type") == Some(rtype) || field("type") == Some("instance"))
            && field("orgID").is_none_or(|o| o == org_id)
            && field("id").is_none_or(|i| Some(i) == id)
            && field("name").is_none_or(|n| Some(n) == name)
    })
}

fn auth_json(st: &State, a: &Authorization, with_token: bool) -> Value {
    let mut v = json!({
        "id": a.id,
        "status": a.status,
        "description": a.description,
        "orgID": a.org_id,
        "org": st.org_name,
        "userID": a.user_id,
        "user": "admin",
        "permissions": a.permissions,
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

fn post_authorization(st: &mut State, caller: &Authorization, req: &Request) -> Answer {
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return error(400, "invalid", "invalid json structure: expected an object"),
        Err(e) => return error(400, "invalid", &format!("invalid json structure: {e}")),
    };
    let perms = match body.get("permissions") {
        Some(Value::Array(p)) if !p.is_empty() => p.clone(),
        Some(Value::Array(_)) | None | Some(Value::Null) => {
            return error(400, "invalid", "authorization must include permissions")
        }
        Some(_) => return error(400, "invalid", "invalid json structure: permissions"),
    };
    for p in &perms {
        let r = p.get("resource").cloned().unwrap_or(Value::Null);
        let rtype = r.get("type").and_then(Value::as_str).unwrap_or("");
        if !RESOURCE_TYPES.contains(&rtype) {
            return error(
                400,
                "invalid",
                &format!("invalid resource type {rtype:?} for permission"),
            );
        }
        match p.get("action").and_then(Value::as_str) {
            Some("read" | "write") => {}
            _ => return error(400, "invalid", "invalid action type for permission"),
        }
        for k in ["orgID", "id"] {
            if let Some(v) = r.get(k) {
                if !v.as_str().is_some_and(is_id) {
                    return error(400, "invalid", &format!("invalid {k} for permission"));
                }
            }
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
    if !allowed(caller, "write", "authorizations", &org_id, None, None) {
        return error(
            401,
            "unauthorized",
            &format!("write:orgs/{org_id}/authorizations is unauthorized"),
        );
    }
    if org_id != st.org_id {
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
        user_id: st.user_id.clone(),
        permissions: perms,
        operator: false,
        created_at_ms: now_ms(),
    };
    let v = auth_json(st, &a, true);
    st.issued.push(a.token.clone());
    st.auths.insert(a.id.clone(), a);
    ok_json(201, v)
}

fn list_authorizations(st: &State, caller: &Authorization, q: &BTreeMap<String, String>) -> Answer {
    for k in ["orgID", "userID", "id"] {
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
        .filter(|a| q.get("id").is_none_or(|i| *i == a.id))
        .filter(|a| {
            allowed(
                caller,
                "read",
                "authorizations",
                &a.org_id,
                Some(&a.id),
                None,
            )
        })
        .map(|a| auth_json(st, a, false))
        .collect();
    ok_json(
        200,
        json!({"links": {"self": "/api/v2/authorizations"}, "authorizations": list}),
    )
}

fn one_authorization(st: &mut State, caller: &Authorization, method: &str, id: &str) -> Answer {
    if !is_id(id) {
        return error(400, "invalid", "id must have a length of 16 bytes");
    }
    let Some(a) = st.auths.get(id).cloned() else {
        return error(404, "not found", "authorization not found");
    };
    let action = if method == "DELETE" { "write" } else { "read" };
    if !allowed(caller, action, "authorizations", &a.org_id, Some(id), None) {
        return error(
            401,
            "unauthorized",
            &format!(
                "{action}:orgs/{}/authorizations/{id} is unauthorized",
                a.org_id
            ),
        );
    }
    if method == "DELETE" {
        st.auths.remove(id);
        (204, "text/plain", Vec::new())
    } else {
        ok_json(200, auth_json(st, &a, false))
    }
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
    if !allowed(
        caller,
        "write",
        "buckets",
        &org_id,
        Some(&bucket_id),
        Some(bucket),
    ) {
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
    if !allowed(
        caller,
        "read",
        "buckets",
        &org_id,
        Some(&bucket_id),
        Some(&bucket),
    ) {
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
}
