//! Leased InfluxDB credentials end to end (issue 5), through a real relay, outlet and inlet in
//! this process: clients that hold no credential of their own (the Python `influxdb-client`
//! library, curl with keep-alive, hand-made pipelined requests), rotation under load against a
//! real influxd, malformed and ambiguous requests that must never reach the backend, a 503 that
//! says why when no lease can be had, and no secret in the logs at TRACE level.

use postern_inlet::ServiceKind;
use postern_net::runtime::clock::now_ms;
use postern_outlet::lease::backend::parse_v1_user_name;
use postern_outlet::lease::{
    Api, InfluxdbOutletConfig, LeaseConfig, LeaseError, LeaseManager, SecretRef,
};
use postern_outlet::serve::Services;
use postern_outlet::target::Target;
use postern_proto::lease::{Credential, LeaseGrant};
use postern_proto::name::NodeName;
use postern_tests::clients::run_python;
use postern_tests::influx2::{Influx2, Influx2Options};
use postern_tests::influxd::{Influxd, InfluxdOptions};
use postern_tests::kit::*;
use std::cell::Cell;
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Longest wait for a condition (a lease arriving, a credential disappearing).
const WAIT: Duration = Duration::from_secs(20);
/// What "promptly" means for an answer the inlet makes itself (400, 503).
const PROMPT: Duration = Duration::from_secs(3);
/// The inlet's name (its identity, and so its lease's client).
const INLET: &str = "inlet-1";

const V2_PERMS: &str = r#"[
  {"action":"write","resource":{"type":"buckets","name":"telegraf","orgID":"INFLUX_ORG_ID"}},
  {"action":"read","resource":{"type":"buckets","name":"telegraf","orgID":"INFLUX_ORG_ID"}}
]"#;

const V1_PERMS: &str = r#"[
  {"action":"read","resource":{"type":"buckets","name":"leased"}},
  {"action":"write","resource":{"type":"buckets","name":"leased"}}
]"#;

// ---------------------------------------------------------------------------------------------
// Logging: one global subscriber for this test binary. Everything logged on a thread marked as
// capturing (the threads of the secrets test's runtime) is kept in memory at TRACE level; the
// rest goes to the test writer, filtered by RUST_LOG (default `warn`).

thread_local! {
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
}

/// A `MakeWriter` target that keeps everything in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn captured() -> &'static Captured {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    CAPTURED.get_or_init(Captured::default)
}

fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let writer = captured().clone();
        let capture = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            // Asked at every event (not cached per call site): the answer depends on the thread.
            .with_filter(tracing_subscriber::filter::dynamic_filter_fn(|_, _| {
                CAPTURING.with(Cell::get)
            }));
        let console = tracing_subscriber::fmt::layer()
            .with_test_writer()
            .with_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            );
        // Also installs the `log` -> `tracing` bridge, at TRACE (the capture layer's level), so
        // that dependencies logging through `log` (reqwest, rustls) are captured too.
        let _ = tracing_subscriber::registry()
            .with(capture)
            .with(console)
            .try_init();
    });
}

// ---------------------------------------------------------------------------------------------
// A small HTTP/1.1 client over one TCP connection: exact control over bytes and connections.

struct Resp {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.split("\r\n").skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl std::fmt::Debug for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.head, self.text())
    }
}

struct Http {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Http {
    async fn connect(addr: SocketAddr) -> io::Result<Http> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Http {
            stream,
            buf: Vec::new(),
        })
    }

    /// Writes `bytes` with one `write_all`.
    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    async fn request(&mut self, bytes: &[u8]) -> io::Result<Resp> {
        self.send(bytes).await?;
        self.response().await
    }

    async fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    async fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let mut l: Vec<u8> = self.buf.drain(..i + 2).collect();
                l.truncate(i);
                return Ok(l);
            }
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Reads one final response (interim 1xx responses are skipped).
    async fn response(&mut self) -> io::Result<Resp> {
        loop {
            let (status, head, chunked, length) = loop {
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut r = httparse::Response::new(&mut headers);
                match r.parse(&self.buf) {
                    Ok(httparse::Status::Complete(n)) => {
                        let mut chunked = false;
                        let mut length = None;
                        for h in r.headers.iter() {
                            let v = String::from_utf8_lossy(h.value).trim().to_ascii_lowercase();
                            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                                chunked = v.contains("chunked");
                            } else if h.name.eq_ignore_ascii_case("content-length") {
                                length = v.parse::<usize>().ok();
                            }
                        }
                        let status = r.code.unwrap_or(0);
                        let head = String::from_utf8_lossy(&self.buf[..n]).into_owned();
                        self.buf.drain(..n);
                        break (status, head, chunked, length);
                    }
                    Ok(httparse::Status::Partial) => {
                        if self.fill().await? == 0 {
                            return Err(io::ErrorKind::UnexpectedEof.into());
                        }
                    }
                    Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                }
            };
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            let body = if status == 204 || status == 304 || status == 101 {
                Vec::new()
            } else if chunked {
                let mut body = Vec::new();
                loop {
                    let l = String::from_utf8_lossy(&self.line().await?).into_owned();
                    let size = usize::from_str_radix(l.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    if size == 0 {
                        while !self.line().await?.is_empty() {}
                        break;
                    }
                    body.extend(self.take(size).await?);
                    self.take(2).await?;
                }
                body
            } else if let Some(n) = length {
                self.take(n).await?
            } else {
                while self.fill().await? > 0 {}
                std::mem::take(&mut self.buf)
            };
            return Ok(Resp { status, head, body });
        }
    }

    /// Whether the server closed the connection with nothing more to say.
    async fn closed(&mut self) -> io::Result<bool> {
        Ok(self.buf.is_empty() && self.fill().await? == 0)
    }
}

fn post(target: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {target} HTTP/1.1\r\nHost: influxdb\r\n{extra_headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn get(target: &str, extra_headers: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: influxdb\r\n{extra_headers}\r\n").into_bytes()
}

/// Sends `probe` on fresh connections until the inlet stops answering 503 (the first lease
/// races the first request); returns that response.
async fn wait_for_lease(addr: SocketAddr, probe: &[u8]) -> Resp {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut c = Http::connect(addr).await.expect("connect to the inlet");
        let r = tokio::time::timeout(WAIT, c.request(probe))
            .await
            .expect("an answer in time")
            .expect("an answer");
        if r.status != 503 {
            return r;
        }
        assert!(Instant::now() < deadline, "no lease in time: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Set-up helpers.

fn secret_file(dir: &Path, name: &str, value: &str) -> SecretRef {
    let p = dir.join(name);
    std::fs::write(&p, value).expect("write secret file");
    SecretRef::new(format!("file:{}", p.display()))
}

fn v2_config(to: &str, org_id: &str, admin: SecretRef, ttl_s: u64) -> LeaseConfig {
    InfluxdbOutletConfig {
        to: to.to_owned(),
        tls: false,
        tls_ca: None,
        allow: None,
        org_id: Some(org_id.to_owned()),
        all_access_token: admin,
        leased_token_expires_in: ttl_s,
        leased_token_permissions: V2_PERMS.into(),
        api: Api::V2,
        inject_at: Default::default(),
        hand_out: false,
        profile: Vec::new(),
    }
    .validate()
    .expect("valid v2 lease config")
}

fn v1_config(influxd: &Influxd, dir: &Path, ttl_s: u64) -> LeaseConfig {
    let admin = secret_file(
        dir,
        "influxd-admin",
        &format!("{}:{}", influxd.admin_user(), influxd.admin_password()),
    );
    InfluxdbOutletConfig {
        to: influxd.url(),
        tls: false,
        tls_ca: None,
        allow: None,
        org_id: None,
        all_access_token: admin,
        leased_token_expires_in: ttl_s,
        leased_token_permissions: V1_PERMS.into(),
        api: Api::V1,
        inject_at: Default::default(),
        hand_out: false,
        profile: Vec::new(),
    }
    .validate()
    .expect("valid v1 lease config")
}

async fn start_manager(cfg: LeaseConfig, state_dir: &Path) -> Arc<LeaseManager> {
    LeaseManager::start(cfg, state_dir, CancellationToken::new())
        .await
        .expect("start lease manager")
}

/// Services of the outlet: (name, tunnel target, lease manager).
fn services(list: Vec<(&str, SocketAddr, Arc<LeaseManager>)>) -> Services {
    let mut s = Services::default();
    for (name, target, mgr) in list {
        s.targets.insert(svc(name), Target::tcp(target.to_string()));
        s.leases.insert(svc(name), mgr);
    }
    s
}

struct Cluster {
    _pki: Pki,
    _relay: RelayNode,
    outlet: OutletNode,
    inlet: InletNode,
}

impl Cluster {
    async fn start(services: Services, inlet_services: &[&str]) -> Cluster {
        let pki = Pki::new();
        let relay = start_relay(
            &pki,
            "127.0.0.1:0".parse().expect("addr"),
            rand::random(),
            None,
        );
        let outlet = start_outlet_with(&pki, "outlet-1", relay.addr, services).await;
        let kinds: Vec<(&str, ServiceKind)> = inlet_services
            .iter()
            .map(|s| (*s, ServiceKind::Influxdb))
            .collect();
        let inlet = start_inlet_kinds(&pki, INLET, relay.addr, &kinds).await;
        Cluster {
            _pki: pki,
            _relay: relay,
            outlet,
            inlet,
        }
    }

    async fn stop(self) {
        self.inlet.running.stop().await;
        self.outlet.running.stop().await;
    }
}

/// The contract server, its lease manager and a cluster whose `influxdb` service leads to it.
struct V2 {
    server: Influx2,
    mgr: Arc<LeaseManager>,
    cluster: Cluster,
    _dir: tempfile::TempDir,
}

impl V2 {
    async fn start(ttl_s: u64) -> V2 {
        let server = Influx2::start(Influx2Options::default())
            .await
            .expect("contract server");
        let dir = tempfile::tempdir().expect("tempdir");
        let admin = secret_file(dir.path(), "admin-token", server.admin_token());
        let mgr = start_manager(
            v2_config(&server.url(), &server.org_id(), admin, ttl_s),
            &dir.path().join("state"),
        )
        .await;
        let cluster = Cluster::start(
            services(vec![("influxdb", server.addr(), mgr.clone())]),
            &["influxdb"],
        )
        .await;
        V2 {
            server,
            mgr,
            cluster,
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.cluster.inlet.addr("influxdb")
    }

    fn write_target(&self, bucket: &str) -> String {
        format!(
            "/api/v2/write?org={}&bucket={bucket}",
            self.server.org_name()
        )
    }

    fn query_target(&self) -> String {
        format!("/api/v2/query?org={}", self.server.org_name())
    }

    async fn stop(self) {
        self.cluster.stop().await;
        self.mgr.shutdown().await.expect("lease manager shutdown");
        assert!(
            self.server.authorizations().is_empty(),
            "every leased token revoked at shutdown"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 1. The Python `influxdb-client` library (v2 API), with no token, through the inlet.

const PY_V2: &str = r#"
import sys
from influxdb_client import InfluxDBClient, Point
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.rest import ApiException
url, org = sys.argv[1], sys.argv[2]
# No token: the inlet puts the leased one in.
with InfluxDBClient(url=url, token="", org=org, timeout=20000) as c:
    print("ping", c.ping())
    w = c.write_api(write_options=SYNCHRONOUS)
    w.write(bucket="telegraf", record=[
        Point("temp").tag("room", r).field("value", v).time(i + 1)
        for i, (r, v) in enumerate([("kitchen", 21.5), ("hall", 18.25), ("attic", 30.0)])
    ])
    w.write(bucket="telegraf", record="temp,room=cellar value=12.0 4")
    tables = c.query_api().query('from(bucket: "telegraf") |> range(start: 0)')
    rows = sorted(rec.values["_raw"] for t in tables for rec in t.records)
    print("rows", len(rows))
    for r in rows:
        print("row", r)
    try:
        w.write(bucket="other", record="temp value=1.0 1")
        print("other written")
    except ApiException as e:
        print("other", e.status)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influxdb_client_v2_library_with_no_token_of_its_own() {
    init_logging();
    let v2 = V2::start(3600).await;
    let addr = v2.addr();
    wait_for_lease(addr, &get("/ping", "")).await;

    let out = run_python(PY_V2, &[&format!("http://{addr}"), &v2.server.org_name()]).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"ping True"), "{out}");
    assert!(lines.contains(&"rows 4"), "{out}");
    for room in ["kitchen", "hall", "attic", "cellar"] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("row temp,room=") && l.contains(room)),
            "{room} read back: {out}"
        );
    }
    // The lease grants nothing on the other bucket: InfluxDB's 403 reaches the client.
    assert!(lines.contains(&"other 403"), "{out}");

    // What the server stored, and that it never saw a request without the leased token.
    let stored = v2.server.points("telegraf");
    assert_eq!(stored.len(), 4, "{stored:?}");
    assert!(v2.server.points("other").is_empty());
    let requests = v2.server.requests();
    let writes: Vec<_> = requests
        .iter()
        .filter(|r| r.path == "/api/v2/write")
        .map(|r| r.status)
        .collect();
    assert_eq!(writes, vec![204, 204, 403], "{requests:?}");
    assert!(
        requests.iter().all(|r| r.status != 401),
        "a request reached InfluxDB without the leased token: {requests:?}"
    );
    v2.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. curl with keep-alive (several transfers on one connection), and pipelined requests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_keep_alive_and_pipelined_requests() {
    init_logging();
    let v2 = V2::start(3600).await;
    let addr = v2.addr();
    wait_for_lease(addr, &get("/ping", "")).await;
    let base = format!("http://{addr}");
    let write_url = format!("{base}{}", v2.write_target("telegraf"));
    let query_url = format!("{base}{}", v2.query_target());

    // A 2000-line body, sent chunked after a 100-continue.
    let dir = tempfile::tempdir().expect("tempdir");
    let bulk_path = dir.path().join("bulk.lp");
    let bulk: String = (0..2000)
        .map(|i| format!("bulk,n={i} v={i}i {}\n", 1000 + i))
        .collect();
    std::fs::write(&bulk_path, &bulk).expect("write bulk file");

    let mut args: Vec<String> = vec!["--verbose".into()];
    let w = "%{http_code} %{num_connects}\\n";
    for i in 1..=3 {
        args.extend(
            [
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                w,
                // The client's own (wrong) token: replaced by the inlet.
                "-H",
                "Authorization: Token curl-own-token",
                "--data-binary",
                &format!("cpu v={i}i {i}"),
                &write_url,
                "--next",
            ]
            .map(String::from),
        );
    }
    args.extend(
        [
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            w,
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            &format!("@{}", bulk_path.display()),
            &write_url,
            "--next",
            "-sS",
            "-w",
            "\\n%{http_code} %{num_connects}\\n",
            "-H",
            "Content-Type: application/vnd.flux",
            "--data-binary",
            r#"from(bucket: "telegraf") |> range(start: 0)"#,
            &query_url,
        ]
        .map(String::from),
    );
    let out = tokio::process::Command::new("curl")
        .args(&args)
        .output()
        .await
        .expect("run curl (apt-get install curl)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "curl failed: {stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    // One connection for all five transfers: only the first one connected.
    assert_eq!(
        &lines[..4],
        &["204 1", "204 0", "204 0", "204 0"],
        "{stdout}\n{stderr}"
    );
    assert_eq!(lines.last(), Some(&"200 0"), "{stdout}\n{stderr}");
    assert_eq!(
        stderr.matches("Connected to").count(),
        1,
        "curl connected once: {stderr}"
    );
    assert!(
        stderr.matches("Re-using existing connection").count() >= 4,
        "{stderr}"
    );
    assert!(stderr.contains("HTTP/1.1 100 Continue"), "{stderr}");
    for i in 1..=3 {
        assert!(stdout.contains(&format!("cpu v={i}i {i}")), "{stdout}");
    }
    assert!(stdout.contains("bulk,n=1999 v=1999i 2999"), "{stdout}");
    let stored = v2.server.points("telegraf");
    assert_eq!(stored.len(), 3 + 2000);

    // Three requests in one TCP write, three responses, then the connection is still usable.
    let mut c = Http::connect(addr).await.expect("connect");
    let mut batch = post(
        &v2.write_target("telegraf"),
        "Authorization: Token pipelined-own-token\r\n",
        "pipe v=1i 101",
    );
    batch.extend(post(&v2.write_target("telegraf"), "", "pipe v=2i 102"));
    batch.extend(post(
        &v2.query_target(),
        "Content-Type: application/vnd.flux\r\n",
        r#"from(bucket: "telegraf") |> range(start: 0)"#,
    ));
    c.send(&batch).await.expect("send pipelined requests");
    let r1 = c.response().await.expect("first response");
    let r2 = c.response().await.expect("second response");
    let r3 = c.response().await.expect("third response");
    assert_eq!((r1.status, r2.status, r3.status), (204, 204, 200));
    let csv = r3.text();
    assert!(
        csv.contains("pipe v=1i 101") && csv.contains("pipe v=2i 102"),
        "{csv}"
    );
    let r4 = c
        .request(&get("/ping", ""))
        .await
        .expect("after pipelining");
    assert_eq!(r4.status, 204);

    // A pipelined batch whose second request is ambiguous: the first is answered, the second
    // gets a 400, the connection closes, and the second never reaches InfluxDB.
    let mut batch = post(&v2.write_target("telegraf"), "", "pipe v=3i 103");
    batch.extend(
        format!(
            "POST {} HTTP/1.1\r\nHost: influxdb\r\nContent-Length: 16\r\n\
             Transfer-Encoding: chunked\r\n\r\n13\r\npipe,x=smuggled v=1\r\n0\r\n\r\n",
            v2.write_target("telegraf")
        )
        .into_bytes(),
    );
    c.send(&batch).await.expect("send");
    let r5 = c.response().await.expect("first of the bad batch");
    assert_eq!(r5.status, 204);
    let r6 = c.response().await.expect("refusal");
    assert_eq!(r6.status, 400, "{r6:?}");
    assert_eq!(r6.header("connection"), Some("close"));
    assert!(c.closed().await.expect("read"), "connection closed");
    let stored = v2.server.points("telegraf");
    assert!(stored.iter().any(|l| l == "pipe v=3i 103"));
    assert!(
        !stored.iter().any(|l| l.contains("smuggled")),
        "the refused request reached InfluxDB"
    );
    assert!(v2.server.requests().iter().all(|r| r.status != 401));
    v2.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Rotation under load against the real influxd (1.x).

/// What one writer did.
#[derive(Default)]
struct WriterReport {
    ok: u64,
    connections: u64,
    failures: Vec<String>,
}

/// Writes one point per request to `db` until `until`, `per_connection` requests per keep-alive
/// connection, one every `pace`. Some requests carry credentials of the client's own (in the
/// header and in the query), which the inlet must replace.
async fn writer(
    addr: SocketAddr,
    w: usize,
    until: Instant,
    per_connection: usize,
    pace: Duration,
) -> WriterReport {
    let mut report = WriterReport::default();
    let mut tick = tokio::time::interval(pace);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    while Instant::now() < until {
        let mut conn = match Http::connect(addr).await {
            Ok(c) => c,
            Err(e) => {
                report.failures.push(format!("writer {w}: connect: {e}"));
                tick.tick().await;
                continue;
            }
        };
        report.connections += 1;
        for _ in 0..per_connection {
            tick.tick().await;
            if Instant::now() >= until {
                break;
            }
            seq += 1;
            let (target, extra) = match seq % 3 {
                0 => ("/write?db=leased&u=mallory&p=nope", ""),
                1 => (
                    "/write?db=leased",
                    "Authorization: Basic bWFsbG9yeTpub3Bl\r\n",
                ),
                _ => ("/write?db=leased", ""),
            };
            let body = format!("m,w={w} v={seq}i {seq}");
            match tokio::time::timeout(WAIT, conn.request(&post(target, extra, &body))).await {
                Ok(Ok(r)) if r.status == 204 => report.ok += 1,
                Ok(Ok(r)) => {
                    report
                        .failures
                        .push(format!("writer {w} #{seq}: {} {}", r.status, r.text()));
                    break;
                }
                Ok(Err(e)) => {
                    report.failures.push(format!("writer {w} #{seq}: {e}"));
                    break;
                }
                Err(_) => {
                    report
                        .failures
                        .push(format!("writer {w} #{seq}: no answer"));
                    break;
                }
            }
        }
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_loses_nothing_and_leaks_nothing() {
    init_logging();
    let influxd = Influxd::start(InfluxdOptions { auth: true })
        .await
        .expect("start influxd");
    influxd
        .query("CREATE DATABASE leased")
        .await
        .expect("create db");
    let dir = tempfile::tempdir().expect("tempdir");
    let mgr = start_manager(
        v1_config(&influxd, dir.path(), 5),
        &dir.path().join("state"),
    )
    .await;
    let cluster = Cluster::start(
        services(vec![("influxdb", influxd.http_addr(), mgr.clone())]),
        &["influxdb"],
    )
    .await;
    let addr = cluster.inlet.addr("influxdb");
    wait_for_lease(addr, &get("/ping", "")).await;

    // Watch the leases while the load runs.
    let stop_watch = CancellationToken::new();
    let watcher = tokio::spawn({
        let mgr = mgr.clone();
        let stop = stop_watch.clone();
        async move {
            let mut seen = BTreeSet::new();
            let mut max_live = 0;
            while !stop.is_cancelled() {
                let leases = mgr.list().await.expect("list leases");
                max_live = max_live.max(leases.len());
                for l in leases {
                    if l.client == INLET {
                        seen.insert(l.lease_id);
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            (seen, max_live)
        }
    });

    let started = Instant::now();
    let until = started + Duration::from_secs(30);
    let writers: Vec<_> = [(0, 25), (1, 60), (2, 1_000_000)]
        .into_iter()
        .map(|(w, per_conn)| {
            tokio::spawn(writer(addr, w, until, per_conn, Duration::from_millis(8)))
        })
        .collect();
    let mut ok = 0;
    let mut failures = Vec::new();
    let mut per_writer = HashMap::new();
    let mut connections = 0;
    for (w, h) in writers.into_iter().enumerate() {
        let r = h.await.expect("writer task");
        ok += r.ok;
        connections += r.connections;
        per_writer.insert(w, r.ok);
        failures.extend(r.failures);
    }
    stop_watch.cancel();
    let (seen, max_live) = watcher.await.expect("watcher");
    let elapsed = started.elapsed();
    assert!(
        failures.is_empty(),
        "{} failed requests (of {}): {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(20)]
    );
    assert!(ok > 1000, "too little load to mean anything: {ok}");
    assert!(connections > 20, "{connections}");
    assert!(
        seen.len() >= 4,
        "at least 4 leases used over {elapsed:?}: {seen:?}"
    );
    assert!(
        max_live <= 3,
        "current + grace (+ one being made): {max_live}"
    );
    eprintln!(
        "rotation under load: {ok} writes in {elapsed:?} on {connections} connections, {} leases",
        seen.len()
    );

    // Every point is there.
    let v = influxd
        .query(r#"SELECT count("v") FROM leased.autogen.m GROUP BY "w""#)
        .await
        .expect("count points");
    let mut counted = HashMap::new();
    for s in v
        .pointer("/results/0/series")
        .and_then(|s| s.as_array())
        .expect("series")
    {
        let w: usize = s["tags"]["w"].as_str().expect("tag").parse().expect("w");
        counted.insert(w, s["values"][0][1].as_u64().expect("count"));
    }
    assert_eq!(counted, per_writer, "points stored per writer");

    // Only live leases exist in influxd: every user but the admin belongs to a lease the
    // manager holds and that has not expired. (Listed users first, leases second; a lease can
    // end in between, so retry until a consistent view.)
    let deadline = Instant::now() + WAIT;
    loop {
        let users = influxd.users().await.expect("SHOW USERS");
        let at = now_ms();
        let leases = mgr.list().await.expect("list");
        let leased: Vec<&String> = users
            .iter()
            .filter(|u| u.as_str() != influxd.admin_user())
            .collect();
        let stale: Vec<&&String> = leased
            .iter()
            .filter(|u| {
                let id = parse_v1_user_name(mgr.instance_id(), u);
                !leases.iter().any(|l| {
                    Some(&l.lease_id) == id.as_ref()
                        && l.state == "active"
                        && l.expires_at_ms > at
                        && l.backend_id.as_deref() == Some(u.as_str())
                })
            })
            .collect();
        if stale.is_empty() && !leased.is_empty() && leased.len() <= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "users without a live lease: {stale:?}; users {users:?}; leases {leases:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    cluster.stop().await;
    mgr.shutdown().await.expect("shutdown revokes");
    assert_eq!(
        influxd.users().await.expect("users"),
        vec![influxd.admin_user().to_owned()],
        "no leased user left"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Malformed and ambiguous requests: 400, closed, and nothing reaches the backend.

/// A TCP server that records every byte of every connection and never answers.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Received>>>);

/// What one connection to the recorder has received so far.
type Received = Arc<Mutex<Vec<u8>>>;

impl Recorder {
    async fn start() -> (SocketAddr, Recorder) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let rec = Recorder::default();
        let conns = rec.0.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let buf = Arc::new(Mutex::new(Vec::new()));
                conns.lock().expect("lock").push(buf.clone());
                tokio::spawn(async move {
                    let mut chunk = [0u8; 8192];
                    while let Ok(n) = s.read(&mut chunk).await {
                        if n == 0 {
                            break;
                        }
                        buf.lock().expect("lock").extend_from_slice(&chunk[..n]);
                    }
                });
            }
        });
        (addr, rec)
    }

    fn snapshot(&self) -> Vec<Vec<u8>> {
        self.0
            .lock()
            .expect("lock")
            .iter()
            .map(|b| b.lock().expect("lock").clone())
            .collect()
    }

    async fn wait_for(&self, what: &str, cond: impl Fn(&[Vec<u8>]) -> bool) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.snapshot();
            if cond(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "recorder never saw {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Requests that must be refused before anything is forwarded (each the first on its
/// connection). Several carry a client secret that must not be echoed.
fn bad_requests() -> Vec<(&'static str, Vec<u8>)> {
    let mut v: Vec<(&'static str, Vec<u8>)> = vec![
        ("CL.TE", b"POST /write?db=x HTTP/1.1\r\nHost: h\r\nAuthorization: Token client-secret-1\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG".to_vec()),
        ("TE.CL", b"POST /write?db=x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n".to_vec()),
        ("TE xchunked", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n".to_vec()),
        ("TE space before colon", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n".to_vec()),
        ("TE chunked, identity", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n".to_vec()),
        ("TE gzip, chunked", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".to_vec()),
        ("TE twice", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec()),
        ("TE vertical tab", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\x0b\r\n\r\n".to_vec()),
        ("TE obs-fold", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\r\n chunked\r\n\r\n".to_vec()),
        ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec()),
        ("CL twice, equal", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello".to_vec()),
        ("CL twice, differing", b"POST / HTTP/1.1\r\nHost: h\r\nAuthorization: Token client-secret-2\r\nContent-Length: 5\r\ncontent-length: 6\r\n\r\nhello!".to_vec()),
        ("CL list", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\nhello".to_vec()),
        ("CL plus sign", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\nhello".to_vec()),
        ("CL negative", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n".to_vec()),
        ("CL hex", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x5\r\n\r\nhello".to_vec()),
        ("CL overflow", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 18446744073709551616\r\n\r\n".to_vec()),
        ("bare LF everywhere", b"GET /ping HTTP/1.1\nHost: h\n\n".to_vec()),
        ("bare LF in one field", b"GET /ping HTTP/1.1\r\nHost: h\nAuthorization: Token client-secret-3\r\n\r\n".to_vec()),
        ("bare CR", b"GET /ping HTTP/1.1\rHost: h\r\n\r\n".to_vec()),
        ("bare CR in value", b"GET /ping HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n".to_vec()),
        ("obs-fold", b"GET /ping HTTP/1.1\r\nHost: h\r\nX-A: b\r\n c\r\n\r\n".to_vec()),
        ("obs-fold hiding Authorization", b"GET /ping HTTP/1.1\r\nHost: h\r\nX-A: b\r\n\tAuthorization: Token client-secret-4\r\n\r\n".to_vec()),
        ("NUL in value", b"GET /ping HTTP/1.1\r\nHost: h\r\nX-A: b\0c\r\n\r\n".to_vec()),
        ("NUL in name", b"GET /ping HTTP/1.1\r\nHost: h\r\nX\0A: b\r\n\r\n".to_vec()),
        ("DEL in value", b"GET /ping HTTP/1.1\r\nHost: h\r\nX-A: b\x7f\r\n\r\n".to_vec()),
        ("empty field name", b"GET /ping HTTP/1.1\r\nHost: h\r\n: b\r\n\r\n".to_vec()),
        ("no colon", b"GET /ping HTTP/1.1\r\nHost: h\r\nNoColonHere\r\n\r\n".to_vec()),
        ("space before colon", b"GET /ping HTTP/1.1\r\nHost: h\r\nAuthorization : Token client-secret-5\r\n\r\n".to_vec()),
        ("missing Host", b"GET /ping HTTP/1.1\r\nX: y\r\n\r\n".to_vec()),
        ("duplicate Host", b"GET /ping HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec()),
        ("invalid method", b"G@T /ping HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("HTTP/2.0", b"GET /ping HTTP/2.0\r\nHost: h\r\n\r\n".to_vec()),
        ("HTTP/0.9", b"GET /ping\r\n\r\n".to_vec()),
        ("double space", b"GET  /ping HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("space in target", b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("non-ASCII target", b"GET /\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        ("relative target", b"GET ping HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
    ];
    let mut big = b"GET /ping HTTP/1.1\r\nHost: h\r\nX: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 80 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    v.push(("oversize head", big));
    let mut many = b"GET /ping HTTP/1.1\r\nHost: h\r\n".to_vec();
    for i in 0..200 {
        many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    v.push(("too many headers", many));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_never_reach_the_backend() {
    init_logging();
    // The lease comes from the contract server; the tunnel leads to a recorder.
    let server = Influx2::start(Influx2Options::default())
        .await
        .expect("contract server");
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = secret_file(dir.path(), "admin-token", server.admin_token());
    let mgr = start_manager(
        v2_config(&server.url(), &server.org_id(), admin, 3600),
        &dir.path().join("state"),
    )
    .await;
    let (rec_addr, recorder) = Recorder::start().await;
    let cluster = Cluster::start(
        services(vec![("influxdb", rec_addr, mgr.clone())]),
        &["influxdb"],
    )
    .await;
    let addr = cluster.inlet.addr("influxdb");

    // Control: a valid request does reach the recorder, with the leased token in place of the
    // client's. Retried until the lease has arrived (a 503 until then).
    let control = get(
        "/query?db=x&u=mallory&p=client-pass&q=SHOW",
        "Authorization: Token client-own\r\n",
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let mut c = Http::connect(addr).await.expect("connect");
        c.send(&control).await.expect("send");
        // Either the inlet answers 503 (no lease yet), or the request goes to the recorder,
        // which never answers.
        let answered = tokio::select! {
            r = c.response() => Some(r),
            _ = recorder.wait_for("the control request", |s| !s.is_empty()) => None,
        };
        match answered {
            None => break,
            Some(Ok(r)) if r.status == 503 => {}
            Some(other) => panic!("unexpected answer to the control request: {other:?}"),
        }
        assert!(Instant::now() < deadline, "no lease in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = recorder
        .wait_for("the whole control head", |s| {
            s.len() == 1 && s[0].ends_with(b"\r\n\r\n")
        })
        .await;
    let head = String::from_utf8_lossy(&seen[0]).into_owned();
    let leased: Vec<String> = server
        .authorizations()
        .into_iter()
        .map(|a| a.token)
        .collect();
    assert_eq!(leased.len(), 1);
    assert!(
        head.starts_with("GET /query?db=x&q=SHOW HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.contains(&format!("Authorization: Token {}\r\n", leased[0])),
        "leased token inserted"
    );
    assert!(
        !head.contains("client-own") && !head.contains("mallory"),
        "{head}"
    );

    // The table: each on a fresh connection; 400, Connection: close, EOF, promptly.
    let table = bad_requests();
    assert!(table.len() >= 20);
    for (name, bytes) in &table {
        let started = Instant::now();
        let c = TcpStream::connect(addr).await.expect("connect");
        let (mut r, mut w) = c.into_split();
        let bytes = bytes.clone();
        // Written concurrently: the oversize ones are refused before they are fully sent.
        let writing = tokio::spawn(async move {
            let _ = w.write_all(&bytes).await;
            w
        });
        let mut resp = Vec::new();
        let read = tokio::time::timeout(PROMPT, r.read_to_end(&mut resp)).await;
        assert!(
            read.is_ok(),
            "{name}: connection not closed within {PROMPT:?}"
        );
        let text = String::from_utf8_lossy(&resp);
        assert!(
            text.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{name}: {text}"
        );
        assert!(text.contains("\r\nConnection: close\r\n"), "{name}: {text}");
        assert!(!text.contains("client-secret"), "{name}: echoed a secret");
        assert_eq!(
            text.matches("HTTP/1.1").count(),
            1,
            "{name}: one response only: {text}"
        );
        drop(writing.await);
        assert!(started.elapsed() < PROMPT, "{name}: slow");
    }

    // Fence: one more valid request, on a new connection. Once the recorder has it, anything
    // the table had let through would have arrived before it.
    let mut fence = Http::connect(addr).await.expect("connect");
    fence
        .send(&post(
            "/api/v2/write?org=postern&bucket=telegraf",
            "",
            "fence v=1i 1",
        ))
        .await
        .expect("send fence");
    let seen = recorder
        .wait_for("the fence request", |s| {
            s.len() >= 2 && s[1].ends_with(b"fence v=1i 1")
        })
        .await;
    assert_eq!(
        seen.len(),
        2,
        "only the control and fence requests opened a connection to the backend"
    );
    assert_eq!(seen[0], control_forwarded(&leased[0]));
    let all = String::from_utf8_lossy(&seen.concat()).into_owned();
    for marker in [
        "SMUGGLED",
        "client-secret",
        "hello",
        "X-A",
        "NoColon",
        "X-0",
    ] {
        assert!(!all.contains(marker), "{marker} reached the backend");
    }
    drop(fence);
    cluster.stop().await;
    mgr.shutdown().await.expect("shutdown");
}

/// The control request exactly as the inlet forwards it.
fn control_forwarded(token: &str) -> Vec<u8> {
    format!(
        "GET /query?db=x&q=SHOW HTTP/1.1\r\nHost: influxdb\r\nAuthorization: Token {token}\r\n\r\n"
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------------------------
// 5. No lease: 503 with the reason, promptly.

/// A server that answers every request head with a 204 (requests carry no body here).
async fn ok_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(n) = s.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..i + 4);
                        if s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// One request on a fresh connection, answered within [`PROMPT`].
async fn prompt_request(addr: SocketAddr, req: &[u8]) -> (Resp, bool) {
    let started = Instant::now();
    let mut c = Http::connect(addr).await.expect("connect");
    let r = tokio::time::timeout(PROMPT, c.request(req))
        .await
        .expect("answered promptly, no hang")
        .expect("a response");
    let closed = r.status != 503
        || tokio::time::timeout(PROMPT, c.closed())
            .await
            .expect("closed promptly")
            .expect("read");
    assert!(started.elapsed() < PROMPT);
    (r, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_lease_gets_a_prompt_503_saying_why() {
    init_logging();
    let target = ok_server().await;

    // (a) The lease backend is down from the start: a closed port.
    let closed: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = secret_file(dir.path(), "admin-token", "some-admin-token");
    let mgr = start_manager(
        v2_config(&format!("http://{closed}"), "0123456789abcdef", admin, 60),
        &dir.path().join("state-a"),
    )
    .await;
    let cluster = Cluster::start(
        services(vec![("influxdb", target, mgr.clone())]),
        &["influxdb"],
    )
    .await;
    let addr = cluster.inlet.addr("influxdb");
    let (r, closed_conn) = prompt_request(addr, &get("/ping", "")).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(closed_conn, "the connection closes after the 503");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(r.text().contains("no valid lease"), "{r:?}");
    // Once the outlet has tried and failed, the 503 says so.
    let deadline = Instant::now() + WAIT;
    loop {
        let (r, _) = prompt_request(addr, &get("/ping", "")).await;
        assert_eq!(r.status, 503, "{r:?}");
        if r.text().contains("the outlet cannot lease a credential") {
            assert!(r.text().contains("InfluxDB"), "{r:?}");
            break;
        }
        assert!(Instant::now() < deadline, "503 never said why: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Failed creations stay recorded until their clean-up succeeds, but none is active.
    let leases = mgr.list().await.expect("list");
    assert!(leases.iter().all(|l| l.state != "active"), "{leases:?}");
    cluster.stop().await;
    // Their clean-up cannot succeed with the backend down: they stay for the next start.
    let down = mgr.shutdown().await;
    assert!(
        matches!(down, Ok(()) | Err(LeaseError::Unrevoked(_))),
        "{down:?}"
    );

    // (b) The lease backend goes away after the first lease: once that lease runs out, 503.
    let server = Influx2::start(Influx2Options::default())
        .await
        .expect("contract server");
    let admin = secret_file(dir.path(), "admin-token-b", server.admin_token());
    let mgr = start_manager(
        v2_config(&server.url(), &server.org_id(), admin, 3),
        &dir.path().join("state-b"),
    )
    .await;
    let cluster = Cluster::start(
        services(vec![("influxdb", target, mgr.clone())]),
        &["influxdb"],
    )
    .await;
    let addr = cluster.inlet.addr("influxdb");
    assert_eq!(wait_for_lease(addr, &get("/ping", "")).await.status, 204);
    drop(server);
    let deadline = Instant::now() + WAIT;
    let r = loop {
        let (r, _) = prompt_request(addr, &get("/ping", "")).await;
        if r.status == 503 {
            break r;
        }
        assert_eq!(r.status, 204, "{r:?}");
        assert!(Instant::now() < deadline, "the dead lease was still used");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let text = r.text();
    assert!(text.contains("no valid lease"), "{text}");
    assert!(
        text.contains("expired") || text.contains("the outlet cannot lease a credential"),
        "{text}"
    );
    cluster.stop().await;
    // The expired lease could not be revoked (the backend is gone): it stays recorded.
    let _ = mgr.shutdown().await;
}

/// A route the relay refuses (here: a service no outlet serves, as with a misspelt name) is
/// told to the client in the 503, as JSON the InfluxDB clients read, and the `influx` CLI shows
/// it (it printed `ERR: %!s(<nil>)` for the plain-text body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_route_is_told_to_the_client_as_influxdb_json() {
    init_logging();
    let target = ok_server().await;
    let closed: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = secret_file(dir.path(), "admin-token", "some-admin-token");
    let mgr = start_manager(
        v2_config(&format!("http://{closed}"), "0123456789abcdef", admin, 60),
        &dir.path().join("state"),
    )
    .await;
    // The inlet asks for "influxdbx"; the outlet serves "influxdb".
    let cluster = Cluster::start(services(vec![("influxdb", target, mgr)]), &["influxdbx"]).await;
    let addr = cluster.inlet.addr("influxdbx");
    let deadline = Instant::now() + WAIT;
    let r = loop {
        let (r, _) = prompt_request(addr, &get("/ping", "")).await;
        assert_eq!(r.status, 503, "{r:?}");
        if r.text().contains("no outlet serves service influxdbx") {
            break r;
        }
        assert!(Instant::now() < deadline, "503 never said why: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("a JSON body");
    let error = v["error"].as_str().expect("an error field");
    assert!(
        error.contains("no outlet serves service influxdbx"),
        "{error}"
    );

    let out = tokio::process::Command::new("influx")
        .args(["-host", "127.0.0.1", "-port", &addr.port().to_string()])
        .args(["-execute", "SHOW DATABASES"])
        .output()
        .await
        .expect("run influx CLI (apt-get install influxdb-client)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("no outlet serves service influxdbx"),
        "the influx CLI does not show the cause: {said}"
    );
    assert!(
        !out.status.success(),
        "the influx CLI reports success: {said}"
    );
    cluster.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. No secret in the logs, at TRACE level, over creation, rotation, requests and errors.

/// Collects every grant streamed for `client` (a second subscriber sees the same grants).
fn collect_grants(
    mgr: &LeaseManager,
    client: &str,
    into: Arc<Mutex<Vec<LeaseGrant>>>,
) -> tokio::task::JoinHandle<()> {
    let mut rx = mgr
        .subscribe(&NodeName::new(client).expect("name"))
        .expect("subscribe");
    tokio::spawn(async move {
        loop {
            if let Some(g) = rx.borrow_and_update().clone() {
                let mut all = into.lock().expect("lock");
                if !all.iter().any(|x| x.lease_id == g.lease_id) {
                    all.push(g);
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
}

fn secrets_of(c: &Credential) -> Vec<String> {
    match c {
        Credential::Token(t) => vec![t.clone(), c.authorization()],
        Credential::Basic { password, .. } => {
            let header = c.authorization();
            let b64 = header.trim_start_matches("Basic ").to_owned();
            vec![password.clone(), header, b64]
        }
    }
}

/// Runs the scenario; returns every secret it saw.
async fn secrets_scenario() -> Vec<String> {
    let influxd = Influxd::start(InfluxdOptions { auth: true })
        .await
        .expect("start influxd");
    influxd
        .query("CREATE DATABASE leased")
        .await
        .expect("create db");
    let server = Influx2::start(Influx2Options::default())
        .await
        .expect("contract server");
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = secret_file(dir.path(), "admin-token", server.admin_token());
    // TTL 3 s: a rotation every 2 s.
    let v2 = start_manager(
        v2_config(&server.url(), &server.org_id(), admin, 3),
        &dir.path().join("state-v2"),
    )
    .await;
    let v1 = start_manager(
        v1_config(&influxd, dir.path(), 3),
        &dir.path().join("state-v1"),
    )
    .await;
    let grants = Arc::new(Mutex::new(Vec::new()));
    let c2 = collect_grants(&v2, INLET, grants.clone());
    let c1 = collect_grants(&v1, INLET, grants.clone());
    let cluster = Cluster::start(
        services(vec![
            ("influxdb", server.addr(), v2.clone()),
            ("influxdb1", influxd.http_addr(), v1.clone()),
        ]),
        &["influxdb", "influxdb1"],
    )
    .await;
    let a2 = cluster.inlet.addr("influxdb");
    let a1 = cluster.inlet.addr("influxdb1");
    wait_for_lease(a2, &get("/ping", "")).await;
    wait_for_lease(a1, &get("/ping", "")).await;

    // `lease create` and `lease revoke`, as on the command line.
    let cli = NodeName::new("cli-user").expect("name");
    let made = [
        v2.create(&cli).await.expect("v2 create"),
        v1.create(&cli).await.expect("v1 create"),
    ];
    v2.revoke(&made[0].lease_id).await.expect("revoke");

    // Requests through both services across at least two rotations, on keep-alive connections,
    // with credentials of the client's own that must be neither used nor logged.
    let w2 = format!("/api/v2/write?org={}&bucket=telegraf", server.org_name());
    let mut c2conn = Http::connect(a2).await.expect("connect");
    let mut c1conn = Http::connect(a1).await.expect("connect");
    let until = Instant::now() + Duration::from_secs(6);
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let r = c2conn
            .request(&post(
                &w2,
                "Authorization: Token client-own-v2-secret\r\n",
                &format!("s v={n}i {n}"),
            ))
            .await
            .expect("v2 write");
        assert_eq!(r.status, 204, "v2 write #{n}: {r:?}");
        let r = c1conn
            .request(&post(
                "/write?db=leased&u=mallory&p=client-own-v1-secret",
                "",
                &format!("s v={n}i {n}"),
            ))
            .await
            .expect("v1 write");
        assert_eq!(r.status, 204, "v1 write #{n}: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An absolute-form target with userinfo: reduced to origin-form, its userinfo nowhere.
    let r = c1conn
        .request(&post(
            "http://mallory:userinfo-secret-7f3a@influxdb:8086/write?db=leased",
            "",
            "s v=0i 1",
        ))
        .await
        .expect("absolute-form write");
    assert_eq!(r.status, 204, "absolute-form write: {r:?}");
    // Refused requests log why, never the target's userinfo or query credentials.
    let mut refused = Http::connect(a1).await.expect("connect");
    let r = refused
        .request(
            b"CONNECT mallory:connect-secret-1b2c@influxdb:8086 HTTP/1.1\r\nHost: influxdb\r\n\r\n",
        )
        .await
        .expect("CONNECT answered");
    assert_eq!(r.status, 501, "{r:?}");
    // A manager whose admin token InfluxDB does not know: the error is logged.
    let wrong = secret_file(dir.path(), "wrong-token", "wrong-admin-token-9d1e");
    let bad = start_manager(
        v2_config(&server.url(), &server.org_id(), wrong, 3),
        &dir.path().join("state-bad"),
    )
    .await;
    assert!(bad.create(&cli).await.is_err());
    bad.shutdown().await.expect("shutdown");

    cluster.stop().await;
    v2.shutdown().await.expect("shutdown v2");
    v1.shutdown().await.expect("shutdown v1");
    c1.await.expect("collector");
    c2.await.expect("collector");

    let grants = grants.lock().expect("lock").clone();
    let v2_grants = grants
        .iter()
        .filter(|g| matches!(g.credential, Credential::Token(_)))
        .count();
    assert!(
        v2_grants >= 3 && grants.len() - v2_grants >= 3,
        "rotations happened: {v2_grants} v2 and {} v1 grants",
        grants.len() - v2_grants
    );
    let mut secrets = vec![
        "client-own-v2-secret".to_owned(),
        "client-own-v1-secret".to_owned(),
        "wrong-admin-token-9d1e".to_owned(),
        "userinfo-secret-7f3a".to_owned(),
        "connect-secret-1b2c".to_owned(),
        influxd.admin_password().to_owned(),
    ];
    secrets.extend(secrets_of(&Credential::Basic {
        username: influxd.admin_user().to_owned(),
        password: influxd.admin_password().to_owned(),
    }));
    // Every token the contract server ever issued: the admin's, streamed, made on request.
    let issued = server.issued_tokens();
    assert!(issued.len() > v2_grants, "{issued:?}");
    secrets.extend(issued);
    for g in grants.iter().chain(made.iter()) {
        secrets.extend(secrets_of(&g.credential));
    }
    secrets
}

#[test]
fn secrets_never_appear_in_logs() {
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(|| CAPTURING.with(|c| c.set(true)))
        .build()
        .expect("runtime");
    CAPTURING.with(|c| c.set(true));
    let secrets = runtime.block_on(secrets_scenario());
    CAPTURING.with(|c| c.set(false));
    runtime.shutdown_timeout(Duration::from_secs(5));

    let text = captured().text();
    // Logging really was captured, from every part, at every level.
    for expected in [
        "lease issued",            // outlet: lease manager
        "lease sent to inlet",     // outlet: lease stream
        "new lease in use",        // inlet: lease client
        "forwarding request",      // inlet: HTTP filter (debug)
        "cannot list credentials", // outlet: the wrong admin token
        "TRACE",
    ] {
        assert!(
            text.contains(expected),
            "no {expected:?} in the captured logs"
        );
    }
    assert!(secrets.len() > 10);
    for s in &secrets {
        assert!(s.len() >= 8, "a secret too short to search for");
        assert!(
            !text.contains(s.as_str()),
            "a secret appeared in the logs ({} bytes captured)",
            text.len()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Lease profiles and a client's own lease, with the real outlet and inlet binaries and a real
// influxd 1.x: the identities' certificate attributes choose the profile.

const PROFILES: &str = r#"
[[influxdb-outlet.profile]]
name = "sensors"
when = 'role = "sensor"'
leased-token-permissions = '[{"action":"write","resource":{"type":"databases","name":"telemetry"}}]'
leased-token-expires-in = 900

[[influxdb-outlet.profile]]
name = "analysts"
when = 'role = "analyst"'
leased-token-permissions = '[{"action":"read","resource":{"type":"databases","name":"telemetry"}}]'
leased-token-expires-in = 3600
hand-out = true
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_by_attributes_and_hand_out_with_the_real_binaries() {
    use postern_tests::profiles::{field, inlet_lease, outlet_lease, start_inlet, start_outlet};
    let influxd = Influxd::start(InfluxdOptions { auth: true })
        .await
        .expect("start influxd");
    influxd
        .query("CREATE DATABASE telemetry")
        .await
        .expect("create database");
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = dir.path().join("influx-admin");
    std::fs::write(
        &admin,
        format!("{}:{}", influxd.admin_user(), influxd.admin_password()),
    )
    .expect("write admin credential");
    let pki = Pki::new();
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [23; 32], None);
    let section = format!(
        "to = \"{}\"\napi = \"v1\"\nallow = \"*\"\nall-access-token = \"file:{}\"\n{PROFILES}",
        influxd.url(),
        admin.display()
    );
    let outlet = start_outlet(&pki, dir.path(), relay.addr, &section).await;
    let listen = || -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let (sensor_at, analyst_at, visitor_at) = (listen(), listen(), listen());
    let p = dir.path();
    let sensor = start_inlet(
        &pki,
        p,
        relay.addr,
        "sensor-1",
        &[("role", "sensor")],
        sensor_at,
    )
    .await;
    let analyst = start_inlet(
        &pki,
        p,
        relay.addr,
        "analyst-1",
        &[("role", "analyst")],
        analyst_at,
    )
    .await;
    let visitor = start_inlet(
        &pki,
        p,
        relay.addr,
        "visitor-1",
        &[("role", "visitor")],
        visitor_at,
    )
    .await;
    let logs = || {
        format!(
            "outlet:\n{}\nsensor:\n{}\nanalyst:\n{}\nvisitor:\n{}",
            outlet.proc.log(),
            sensor.proc.log(),
            analyst.proc.log(),
            visitor.proc.log()
        )
    };

    // The sensor writes through its inlet (no credential of its own) and may not read.
    let w = wait_for_lease(
        sensor_at,
        &post("/write?db=telemetry", "", "t,dev=s1 v=1i 1"),
    )
    .await;
    assert_eq!(w.status, 204, "{w:?}\n{}", logs());
    let q = wait_for_lease(
        sensor_at,
        &get("/query?db=telemetry&q=SELECT%20*%20FROM%20t", ""),
    )
    .await;
    assert_eq!(q.status, 403, "sensor reads: {q:?}");
    // The analyst reads it and may not write.
    let q = wait_for_lease(
        analyst_at,
        &get("/query?db=telemetry&q=SELECT%20*%20FROM%20t", ""),
    )
    .await;
    assert_eq!(q.status, 200, "{q:?}");
    assert!(q.text().contains("\"t\""), "{}", q.text());
    let w = wait_for_lease(analyst_at, &post("/write?db=telemetry", "", "t v=2i 2")).await;
    assert_eq!(w.status, 403, "analyst writes: {w:?}");

    // The visitor matches no profile: a prompt 403 saying so, and no user is made for it.
    let deadline = Instant::now() + WAIT;
    let r = loop {
        let (r, _) = prompt_request(visitor_at, &get("/ping", "")).await;
        if r.status == 403 {
            break r;
        }
        assert_eq!(r.status, 503, "{r:?}");
        assert!(
            Instant::now() < deadline,
            "no 403 for the visitor: {r:?}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        r.text()
            .contains("no lease profile matches identity visitor-1"),
        "{}",
        r.text()
    );
    assert!(
        outlet
            .proc
            .log()
            .contains("no lease profile matched this identity"),
        "{}",
        logs()
    );
    let (ok, list, err) = outlet_lease(&outlet.state, &["list"]).await;
    assert!(ok, "{err}");
    assert!(!list.contains("visitor-1"), "{list}");
    assert!(
        list.contains("sensors") && list.contains("analysts"),
        "{list}"
    );
    let users: Vec<String> = influxd
        .users()
        .await
        .expect("users")
        .into_iter()
        .filter(|u| u.starts_with("postern_"))
        .collect();
    assert_eq!(
        users.len(),
        2,
        "one user per lease, none for the visitor: {users:?}"
    );

    // Hand-out: refused for the sensors' profile, and nothing is printed to stdout.
    let (ok, out, err) = inlet_lease(&sensor.state, &["create"]).await;
    assert!(!ok && out.is_empty(), "{out}{err}");
    assert!(err.contains("does not hand credentials out"), "{err}");
    // For an analyst: its own user and password, which work against influxd directly.
    assert!(
        !inlet_lease(&analyst.state, &["show"]).await.0,
        "nothing handed out yet"
    );
    let (ok, out, err) = inlet_lease(&analyst.state, &["create", "--service", "influxdb"]).await;
    assert!(ok, "{err}\n{}", logs());
    assert_eq!(field(&out, "profile:"), "analysts");
    let lease_id = field(&out, "lease:");
    let (user, pass) = (field(&out, "username:"), field(&out, "password:"));
    let expires = field(&out, "expires:");
    assert!(expires.ends_with('Z'), "{out}");
    let direct = influxd
        .query_as(Some((&user, &pass)), Some("telemetry"), "SELECT * FROM t")
        .await
        .expect("query");
    assert_eq!(direct.error(), None, "{}", direct.body);
    assert!(direct.body.contains("\"t\""), "{}", direct.body);
    let (ok, again, _) = inlet_lease(&analyst.state, &["show"]).await;
    assert!(ok);
    assert_eq!(field(&again, "lease:"), lease_id);
    let (ok, shown, _) = outlet_lease(&outlet.state, &["show", &lease_id]).await;
    assert!(ok && shown.contains("analysts (handed out)"), "{shown}");
    // The hand-out is audited by the outlet, without the secret anywhere in a log.
    let outlet_log = outlet.proc.log();
    assert!(
        outlet_log
            .lines()
            .any(|l| l.contains("hand_out") && l.contains(&lease_id)),
        "{outlet_log}"
    );
    for log in [outlet_log, analyst.proc.log()] {
        assert!(!log.contains(&pass), "the password was logged:\n{log}");
    }

    // Revoked like any other lease: the handed-out password stops working.
    let (ok, out, err) = outlet_lease(&outlet.state, &["revoke", &lease_id]).await;
    assert!(ok, "{out}{err}");
    let dead = influxd
        .query_as(Some((&user, &pass)), Some("telemetry"), "SELECT * FROM t")
        .await
        .expect("query");
    assert_eq!(dead.status, 401, "{}", dead.body);
    assert!(!inlet_lease(&analyst.state, &["show"]).await.0);
    // The analyst's streamed lease is untouched.
    let q = wait_for_lease(
        analyst_at,
        &get("/query?db=telemetry&q=SELECT%20*%20FROM%20t", ""),
    )
    .await;
    assert_eq!(q.status, 200, "{q:?}");
}

/// Lease profiles changed by `SIGHUP` on the running outlet binary, against the real influxd:
/// the analysts' profile turns from read to write while the sensors' stays. The sensor keeps
/// its lease (the same InfluxDB user, still writing); the analyst's old user is revoked (gone
/// from `SHOW USERS`, audited as `profile_changed`) and a new one with the new grants serves
/// its requests through the inlet. A reload with an invalid profile is refused and the
/// profiles in force stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloaded_profiles_replace_only_the_leases_they_change() {
    use postern_tests::profiles::{current_lease_of, start_inlet, start_outlet, user_of_lease};
    use postern_tests::wait::eventually;
    let influxd = Influxd::start(InfluxdOptions { auth: true })
        .await
        .expect("start influxd");
    influxd
        .query("CREATE DATABASE telemetry")
        .await
        .expect("create database");
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = dir.path().join("influx-admin");
    std::fs::write(
        &admin,
        format!("{}:{}", influxd.admin_user(), influxd.admin_password()),
    )
    .expect("write admin credential");
    let pki = Pki::new();
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [24; 32], None);
    let section = format!(
        "to = \"{}\"\napi = \"v1\"\nallow = \"*\"\nall-access-token = \"file:{}\"\n{PROFILES}",
        influxd.url(),
        admin.display()
    );
    let outlet = start_outlet(&pki, dir.path(), relay.addr, &section).await;
    let listen = || -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let (sensor_at, analyst_at) = (listen(), listen());
    let p = dir.path();
    let sensor = start_inlet(
        &pki,
        p,
        relay.addr,
        "sensor-1",
        &[("role", "sensor")],
        sensor_at,
    )
    .await;
    let analyst = start_inlet(
        &pki,
        p,
        relay.addr,
        "analyst-1",
        &[("role", "analyst")],
        analyst_at,
    )
    .await;
    let logs = || {
        format!(
            "outlet:\n{}\nsensor:\n{}\nanalyst:\n{}",
            outlet.proc.log(),
            sensor.proc.log(),
            analyst.proc.log()
        )
    };
    let read = || get("/query?db=telemetry&q=SELECT%20*%20FROM%20t", "");
    let write = |line: &str| post("/write?db=telemetry", "", line);
    let status = |addr: SocketAddr, req: Vec<u8>| async move {
        let mut c = Http::connect(addr).await.expect("connect to the inlet");
        tokio::time::timeout(WAIT, c.request(&req))
            .await
            .expect("an answer in time")
            .expect("an answer")
            .status
    };

    // Before: the sensor writes, the analyst reads and may not write.
    let w = wait_for_lease(sensor_at, &write("t,dev=s1 v=1i 1")).await;
    assert_eq!(w.status, 204, "{w:?}\n{}", logs());
    let q = wait_for_lease(analyst_at, &read()).await;
    assert_eq!(q.status, 200, "{q:?}\n{}", logs());
    assert_eq!(status(analyst_at, write("t v=2i 2")).await, 403);
    let state = &outlet.state;
    let sensor_lease = current_lease_of(state, "sensor-1")
        .await
        .expect("the sensor's lease");
    let analyst_lease = current_lease_of(state, "analyst-1")
        .await
        .expect("the analyst's lease");
    assert_eq!(
        (
            sensor_lease.profile.as_str(),
            analyst_lease.profile.as_str()
        ),
        ("sensors", "analysts")
    );
    let users = influxd.users().await.expect("SHOW USERS");
    let sensor_user = user_of_lease(&users, &sensor_lease.lease_id)
        .expect("the sensor's user")
        .to_owned();
    let analyst_user = user_of_lease(&users, &analyst_lease.lease_id)
        .expect("the analyst's user")
        .to_owned();

    // Reload: the analysts may now write and no longer read; the sensors' profile is as it was.
    let config = dir.path().join("outlet.toml");
    let written = std::fs::read_to_string(&config).expect("read outlet.toml");
    let reads = r#"[{"action":"read","resource":{"type":"databases","name":"telemetry"}}]"#;
    assert_eq!(written.matches(reads).count(), 1, "{written}");
    let writes = reads.replace("\"read\"", "\"write\"");
    std::fs::write(&config, written.replace(reads, &writes)).expect("rewrite outlet.toml");
    outlet.proc.sighup();
    eventually(WAIT, "the profiles reloaded", || async {
        outlet.proc.log().contains("lease profiles reloaded")
    })
    .await;
    // The analyst's old user is gone from influxd, a new lease of its new terms replaces it.
    eventually(WAIT, "the analyst's old user dropped", || async {
        let users = influxd.users().await.expect("SHOW USERS");
        !users.contains(&analyst_user)
    })
    .await;
    eventually(WAIT, "the analyst writes through its inlet", || async {
        status(analyst_at, write("t v=3i 3")).await == 204
    })
    .await;
    assert_eq!(
        status(analyst_at, read()).await,
        403,
        "the analyst still reads"
    );
    let renewed = current_lease_of(state, "analyst-1")
        .await
        .expect("the analyst's new lease");
    assert_ne!(renewed.lease_id, analyst_lease.lease_id);
    assert_eq!(renewed.profile, "analysts");
    let users = influxd.users().await.expect("SHOW USERS");
    let new_user = user_of_lease(&users, &renewed.lease_id).expect("the analyst's new user");
    let direct = influxd
        .query(&format!("SHOW GRANTS FOR \"{new_user}\""))
        .await
        .expect("SHOW GRANTS");
    let grants = direct.to_string();
    assert!(
        grants.contains("telemetry") && grants.contains("WRITE") && !grants.contains("READ"),
        "{grants}"
    );
    // The sensor's lease is untouched: same lease, same user, still writing.
    assert_eq!(
        current_lease_of(state, "sensor-1").await.as_ref(),
        Some(&sensor_lease)
    );
    assert!(users.contains(&sensor_user), "{users:?}");
    assert_eq!(status(sensor_at, write("t,dev=s1 v=4i 4")).await, 204);
    // The revocation is audited with its reason, for the analyst's old lease only.
    let outlet_log = outlet.proc.log();
    let audited = |id: &str| {
        outlet_log.lines().any(|l| {
            l.contains("postern::audit")
                && l.contains("revoke")
                && l.contains("profile_changed")
                && l.contains(id)
        })
    };
    assert!(audited(&analyst_lease.lease_id), "{outlet_log}");
    assert!(!audited(&sensor_lease.lease_id), "{outlet_log}");

    // An invalid profile: the reload is refused, saying which, and the profiles stay.
    let written = std::fs::read_to_string(&config).expect("read outlet.toml");
    let when = r#"when = 'role = "analyst"'"#;
    assert_eq!(written.matches(when).count(), 1, "{written}");
    std::fs::write(&config, written.replace(when, "when = 'role = '")).expect("rewrite");
    outlet.proc.sighup();
    eventually(WAIT, "the refused reload logged", || async {
        outlet.proc.log().contains("reload refused")
    })
    .await;
    let outlet_log = outlet.proc.log();
    let refusal = outlet_log
        .lines()
        .find(|l| l.contains("reload refused"))
        .expect("the refusal");
    assert!(
        refusal.contains("analysts") && refusal.contains("when"),
        "{refusal}"
    );
    assert_eq!(outlet_log.matches("lease profiles reloaded").count(), 1);
    assert_eq!(
        current_lease_of(state, "analyst-1").await.as_ref(),
        Some(&renewed)
    );
    assert_eq!(
        current_lease_of(state, "sensor-1").await.as_ref(),
        Some(&sensor_lease)
    );
    assert_eq!(status(analyst_at, write("t v=5i 5")).await, 204);
    assert_eq!(status(sensor_at, write("t,dev=s1 v=6i 6")).await, 204);

    // No profile for the analysts any more: the analyst's lease is revoked, and its requests
    // get the 403 of a client without a profile; the sensor's lease goes on.
    let written = std::fs::read_to_string(&config).expect("read outlet.toml");
    let valid = written.replace("when = 'role = '", r#"when = 'role = "nobody"'"#);
    std::fs::write(&config, valid).expect("rewrite");
    outlet.proc.sighup();
    eventually(WAIT, "the second profile reload", || async {
        outlet.proc.log().matches("lease profiles reloaded").count() == 2
    })
    .await;
    let renewed_user = user_of_lease(&users, &renewed.lease_id)
        .expect("the analyst's user")
        .to_owned();
    eventually(WAIT, "the analyst's user dropped", || async {
        let users = influxd.users().await.expect("SHOW USERS");
        !users.contains(&renewed_user)
    })
    .await;
    eventually(
        WAIT,
        "the analyst refused for want of a profile",
        || async {
            let mut c = Http::connect(analyst_at).await.expect("connect");
            let r = c.request(&write("t v=7i 7")).await.expect("an answer");
            r.status == 403
                && r.text()
                    .contains("no lease profile matches identity analyst-1")
        },
    )
    .await;
    assert_eq!(current_lease_of(state, "analyst-1").await, None);
    assert_eq!(
        current_lease_of(state, "sensor-1").await.as_ref(),
        Some(&sensor_lease)
    );
    assert_eq!(status(sensor_at, write("t,dev=s1 v=8i 8")).await, 204);
}
