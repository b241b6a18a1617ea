//! What the lease manager needs from an InfluxDB: make a credential, delete one, and find the
//! ones it made (for crash recovery).
//!
//! Every credential a backend makes carries a marker that names the lease and the outlet
//! instance that made it (v2: in the authorization's description; v1: in the user name), so
//! that after a crash the manager can find credentials whose lease it never recorded as
//! active, without being able to read any token back (newer InfluxDB 2 servers show a token's
//! value only once). The instance id keeps two outlets that share an InfluxDB from deleting
//! each other's credentials.

use super::config::LeaseConfig;
use postern_proto::lease::Credential;
use postern_proto::name::NodeName;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A boxed future, so that [`Backend`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How long one request to InfluxDB may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// How long connecting to InfluxDB may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// The lease's id (16 lowercase hex digits).
    pub lease_id: String,
    /// The client identity the credential is for.
    pub client: NodeName,
    /// When the lease ends (ms since the Unix epoch); informational for the backend.
    pub expires_at_ms: u64,
    /// The client's profile: the permissions the credential gets.
    pub profile: std::sync::Arc<super::profile::Profile>,
}

/// A credential the backend made.
#[derive(Debug)]
pub struct Created {
    /// The backend's handle for revoking it (v2: authorization id; v1: user name).
    pub backend_id: String,
    /// The credential itself (secret).
    pub credential: Credential,
}

/// A credential found in the backend that carries this outlet's marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The backend's handle for revoking it.
    pub backend_id: String,
    /// The lease id read from the marker.
    pub lease_id: String,
    /// The marker as found (v2: the description; v1: the user name).
    pub marker: String,
}

/// An InfluxDB that can issue and revoke leased credentials.
pub trait Backend: Send + Sync + 'static {
    /// Makes a credential for `req`.
    fn create<'a>(&'a self, req: &'a CreateRequest)
        -> BoxFuture<'a, Result<Created, BackendError>>;
    /// Deletes a credential. A credential that is already gone counts as revoked.
    fn revoke<'a>(&'a self, backend_id: &'a str) -> BoxFuture<'a, Result<(), BackendError>>;
    /// Lists the credentials that carry this outlet instance's marker.
    fn list_ours(&self) -> BoxFuture<'_, Result<Vec<Found>, BackendError>>;
    /// Checks at start-up that the server is the kind this backend talks to and that the
    /// config fits it. Fails only when it surely cannot work ([`BackendError::Misconfigured`]);
    /// a server that cannot be reached or asked is logged and left to the first lease.
    fn check(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Why a backend call failed. Never contains a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// InfluxDB answered with an error.
    #[error("InfluxDB refused to {op}: HTTP {status}{}: {message}{hint}", code_suffix(.code))]
    Refused {
        op: &'static str,
        status: u16,
        /// The `code` of an InfluxDB 2 error body, if there was one.
        code: Option<String>,
        message: String,
        /// What to check in the config, or empty.
        hint: &'static str,
    },
    /// InfluxDB could not be reached or the request failed on the way.
    #[error("cannot {op}: InfluxDB unreachable: {}", transport_cause(source))]
    Transport {
        op: &'static str,
        #[source]
        source: reqwest::Error,
    },
    /// InfluxDB answered something this code does not understand.
    #[error("cannot {op}: unexpected answer from InfluxDB: {detail}")]
    Protocol { op: &'static str, detail: String },
    /// The backend could not be set up (TLS CA file and the like).
    #[error("cannot set up the InfluxDB client: {0}")]
    Setup(String),
    /// The server or its content does not fit the config (wrong API version, a bucket that
    /// does not exist); nothing was made.
    #[error("{0}")]
    Misconfigured(String),
}

fn code_suffix(code: &Option<String>) -> String {
    match code {
        Some(c) => format!(" ({c})"),
        None => String::new(),
    }
}

impl BackendError {
    /// True when InfluxDB refused a request outright (a 4xx answer), so a failed `create` left
    /// nothing behind. Backends return `Refused` from `create` only in that case.
    pub fn nothing_made(&self) -> bool {
        match self {
            BackendError::Refused { status, .. } => (400..500).contains(status),
            BackendError::Misconfigured(_) => true,
            _ => false,
        }
    }
}

/// The HTTP client both backends use: timeouts on every request, no proxies (the outlet talks
/// to InfluxDB directly in its private network), and the configured CA if any.
pub(crate) fn http_client(cfg: &LeaseConfig) -> Result<reqwest::Client, BackendError> {
    let mut b = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none());
    if let Some(path) = &cfg.tls_ca {
        let pem = std::fs::read(path).map_err(|e| {
            BackendError::Setup(format!("tls-ca: cannot read {}: {e}", path.display()))
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            BackendError::Setup(format!(
                "tls-ca: {} holds no PEM certificate: {e}",
                path.display()
            ))
        })?;
        if certs.is_empty() {
            return Err(BackendError::Setup(format!(
                "tls-ca: {} holds no PEM certificate",
                path.display()
            )));
        }
        b = b.tls_built_in_root_certs(false);
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build()
        .map_err(|e| BackendError::Setup(format!("HTTP client: {e}")))
}

/// What answered at the configured URL, as far as its version headers tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerKind {
    /// InfluxDB 1.x (version as reported).
    V1(String),
    /// InfluxDB 2.x OSS or a 2.x-compatible server such as Timestream for InfluxDB.
    V2(String),
    /// InfluxDB Cloud (reports its build, never a version).
    Cloud,
    /// Something else (a newer major version); the text says what it reported.
    Other(String),
    /// Nothing to go by: no version header on `/ping`, no version in `/health`.
    Unknown,
}

impl ServerKind {
    /// Reads the version headers: `X-Influxdb-Version` (`1.8.10`, `v2.7.1`) and, for Cloud,
    /// which sends no version, `X-Influxdb-Build`.
    pub fn from_headers(version: Option<&str>, build: Option<&str>) -> ServerKind {
        if let Some(v) = version.map(str::trim).filter(|v| !v.is_empty()) {
            return ServerKind::from_version(v);
        }
        match build {
            Some(b) if b.to_ascii_lowercase().contains("cloud") => ServerKind::Cloud,
            _ => ServerKind::Unknown,
        }
    }

    /// Reads a version string such as `1.8.10`, `v2.7.1` or `2.7.10-…`.
    pub fn from_version(v: &str) -> ServerKind {
        let digits = v.trim().trim_start_matches(['v', 'V']);
        let major: String = digits.chars().take_while(char::is_ascii_digit).collect();
        let shown = clean(v.trim());
        match major.as_str() {
            "1" => ServerKind::V1(shown),
            "2" => ServerKind::V2(shown),
            _ => ServerKind::Other(shown),
        }
    }
}

/// Asks the server what it is: `GET /ping`'s version headers (InfluxDB 1.x and 2.x, no auth
/// needed), then `GET /health`'s `version` when `/ping` carried none.
pub(crate) async fn detect_server(
    http: &reqwest::Client,
    base: &reqwest::Url,
) -> Result<ServerKind, BackendError> {
    const OP: &str = "read the server version";
    let url = |p: &str| {
        base.join(p)
            .map_err(|e| BackendError::Setup(format!("bad URL path {p:?}: {e}")))
    };
    let resp = http
        .get(url("ping")?)
        .send()
        .await
        .map_err(|source| BackendError::Transport { op: OP, source })?;
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let kind = ServerKind::from_headers(
        header("x-influxdb-version").as_deref(),
        header("x-influxdb-build").as_deref(),
    );
    if kind != ServerKind::Unknown {
        return Ok(kind);
    }
    let resp = http
        .get(url("health")?)
        .send()
        .await
        .map_err(|source| BackendError::Transport { op: OP, source })?;
    if !resp.status().is_success() && resp.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE {
        return Ok(ServerKind::Unknown);
    }
    let body: serde_json::Value = match resp.json().await {
        Ok(v) => v,
        Err(_) => return Ok(ServerKind::Unknown),
    };
    Ok(body
        .get("version")
        .and_then(|v| v.as_str())
        .map_or(ServerKind::Unknown, ServerKind::from_version))
}

/// How many times a request refused with `429 Too Many Requests` is sent again.
pub const RETRIES_ON_429: u32 = 3;
/// Longest `Retry-After` honoured; a longer one ends the attempt (the caller retries later).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Wait after a 429 without a readable `Retry-After`.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Reads `Retry-After` in its delay-seconds form (InfluxDB sends seconds).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// Sends the request built by `build`, again after the server's `Retry-After` when it answers
/// 429, up to [`RETRIES_ON_429`] times. The last answer is returned whatever it is.
pub(crate) async fn send_honouring_429(
    op: &'static str,
    build: impl Fn() -> Result<reqwest::RequestBuilder, BackendError>,
) -> Result<reqwest::Response, BackendError> {
    let mut tries = 0;
    loop {
        let resp = build()?
            .send()
            .await
            .map_err(|source| BackendError::Transport { op, source })?;
        if resp.status() != reqwest::StatusCode::TOO_MANY_REQUESTS || tries >= RETRIES_ON_429 {
            return Ok(resp);
        }
        let wait = retry_after(resp.headers()).unwrap_or(DEFAULT_RETRY_AFTER);
        if wait > MAX_RETRY_AFTER {
            return Ok(resp);
        }
        tries += 1;
        tracing::warn!(
            op,
            wait_s = wait.as_secs(),
            "InfluxDB is rate-limiting (429); waiting as its Retry-After asks"
        );
        tokio::time::sleep(wait).await;
    }
}

/// Reads an error answer: an InfluxDB 2 body `{"code":..,"message":..}`, a 1.x body
/// `{"error":..}`, or the first bytes of whatever else came back.
pub(crate) fn parse_error_body(body: &str) -> (Option<String>, String) {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
        let code = v.get("code").and_then(|c| c.as_str()).map(clean);
        let message = v
            .get("message")
            .or_else(|| v.get("error"))
            .and_then(|m| m.as_str())
            .map(clean);
        if code.is_some() || message.is_some() {
            return (code, message.unwrap_or_default());
        }
    }
    let text = clean(body.trim());
    if text.is_empty() {
        (None, "(empty body)".to_owned())
    } else {
        (None, text)
    }
}

/// Keeps error text printable and short.
fn clean(s: &str) -> String {
    const MAX: usize = 300;
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX)
        .collect();
    if s.chars().count() > MAX {
        out.push('…');
    }
    out
}

/// Lease ids are 16 lowercase hex digits.
pub fn is_lease_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The v2 description marker: `postern lease <lease_id> outlet=<instance> client=<name>
/// expires=<rfc3339>`.
pub fn v2_description(instance: &str, req: &CreateRequest) -> String {
    format!(
        "postern lease {} outlet={instance} client={} expires={}",
        req.lease_id,
        req.client,
        format_rfc3339(req.expires_at_ms)
    )
}

/// Reads the lease id from a v2 description if it carries `instance`'s marker.
pub fn parse_v2_description(instance: &str, description: &str) -> Option<String> {
    let mut words = description.split_ascii_whitespace();
    if words.next() != Some("postern") || words.next() != Some("lease") {
        return None;
    }
    let lease_id = words.next().filter(|w| is_lease_id(w))?;
    let outlet = format!("outlet={instance}");
    words.any(|w| w == outlet).then(|| lease_id.to_owned())
}

/// The v1 user name for a lease: `postern_<instance>_<lease_id>`.
pub fn v1_user_name(instance: &str, lease_id: &str) -> String {
    format!("postern_{instance}_{lease_id}")
}

/// Reads the lease id from a v1 user name if it carries `instance`'s marker.
pub fn parse_v1_user_name(instance: &str, name: &str) -> Option<String> {
    let rest = name.strip_prefix("postern_")?.strip_prefix(instance)?;
    let id = rest.strip_prefix('_')?;
    is_lease_id(id).then(|| id.to_owned())
}

/// Formats milliseconds since the Unix epoch as RFC 3339 in UTC (kept with the clock, where
/// the inlet uses it too).
pub use postern_net::runtime::clock::format_rfc3339;

/// The underlying cause of a failed request, for the operator: whether it timed out or could
/// not connect, then the chain of causes (e.g. `cannot connect: tcp connect error: Connection
/// refused (os error 111)`, a DNS failure, a TLS error). reqwest's own message is left out: it
/// quotes the URL, which says nothing new and must not reach logs if it ever carried a query.
pub(crate) fn transport_cause(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "the request failed"
    };
    let mut parts: Vec<String> = Vec::new();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        let text = c.to_string();
        if parts.last() != Some(&text) && !text.is_empty() {
            parts.push(text);
        }
        cur = c.source();
    }
    if parts.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {}", parts.join(": "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real refused connection (a port nobody listens on): the message names the cause and
    /// not the URL.
    #[tokio::test]
    async fn an_unreachable_influxdb_names_the_cause() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let url = format!("http://127.0.0.1:{port}/query?u=admin&p=hunter2");
        let err = reqwest::Client::new()
            .get(&url)
            .send()
            .await
            .expect_err("nothing listens");
        let msg = BackendError::Transport {
            op: "create the lease",
            source: err,
        }
        .to_string();
        assert!(msg.contains("cannot connect"), "{msg}");
        assert!(msg.to_lowercase().contains("refused"), "{msg}");
        assert!(!msg.contains("hunter2") && !msg.contains("/query"), "{msg}");
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_rfc3339(1_700_000_000_123), "2023-11-14T22:13:20Z");
        assert_eq!(format_rfc3339(4_102_444_799_000), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn markers_round_trip_and_foreign_ones_are_ignored() {
        let req = CreateRequest {
            lease_id: "0123456789abcdef".into(),
            client: NodeName::new("inlet-1.example").expect("name"),
            expires_at_ms: 1_700_000_000_000,
            profile: std::sync::Arc::new(crate::lease::profile::Profile::implicit(
                Duration::from_secs(60),
                Vec::new(),
                false,
            )),
        };
        let d = v2_description("a1b2c3d4", &req);
        assert_eq!(
            d,
            "postern lease 0123456789abcdef outlet=a1b2c3d4 client=inlet-1.example \
             expires=2023-11-14T22:13:20Z"
        );
        assert_eq!(
            parse_v2_description("a1b2c3d4", &d).as_deref(),
            Some("0123456789abcdef")
        );
        assert_eq!(parse_v2_description("ffffffff", &d), None);
        assert_eq!(parse_v2_description("a1b2c3d4", "my own token"), None);
        assert_eq!(
            parse_v2_description("a1b2c3d4", "postern lease XYZ outlet=a1b2c3d4"),
            None
        );

        let u = v1_user_name("a1b2c3d4", "0123456789abcdef");
        assert_eq!(u, "postern_a1b2c3d4_0123456789abcdef");
        assert_eq!(
            parse_v1_user_name("a1b2c3d4", &u).as_deref(),
            Some("0123456789abcdef")
        );
        assert_eq!(parse_v1_user_name("a1b2c3d5", &u), None);
        assert_eq!(parse_v1_user_name("a1b2c3d4", "admin"), None);
        assert_eq!(
            parse_v1_user_name("a1b2c3d4", "postern_a1b2c3d4_0123"),
            None
        );
    }

    #[test]
    fn server_kinds_are_read_from_version_headers() {
        assert_eq!(
            ServerKind::from_headers(Some("1.6.7~rc0"), Some("OSS")),
            ServerKind::V1("1.6.7~rc0".into())
        );
        assert_eq!(
            ServerKind::from_headers(Some("v2.7.11"), Some("OSS")),
            ServerKind::V2("v2.7.11".into())
        );
        assert_eq!(
            ServerKind::from_headers(None, Some("Cloud")),
            ServerKind::Cloud
        );
        assert_eq!(
            ServerKind::from_headers(Some(""), None),
            ServerKind::Unknown
        );
        assert!(matches!(
            ServerKind::from_version("3.0.1"),
            ServerKind::Other(_)
        ));
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(reqwest::header::RETRY_AFTER, "7".parse().expect("value"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
    }

    #[test]
    fn error_bodies_are_read() {
        assert_eq!(
            parse_error_body(r#"{"code":"unauthorized","message":"unauthorized access"}"#),
            (Some("unauthorized".into()), "unauthorized access".into())
        );
        assert_eq!(
            parse_error_body(r#"{"error":"authorization failed"}"#),
            (None, "authorization failed".into())
        );
        assert_eq!(parse_error_body("oops\n"), (None, "oops".into()));
        assert_eq!(parse_error_body(""), (None, "(empty body)".into()));
    }
}
