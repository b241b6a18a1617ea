//! `http`: InfluxDB line-protocol writes (`POST /api/v2/write`, keep-alive) through the inlet's
//! HTTP filter with a leased token, against the same writes straight to the target and through
//! a plain (unfiltered) postern tunnel. The outlet runs a real lease manager with a fake
//! backend that mints tokens in memory; the target checks that every request carries a leased
//! token. Also times `RequestFilter` alone.

use crate::cluster::{BenchRelay, RelayMode};
use crate::progress::progress;
use crate::stats::{nanos, Latency};
use crate::systems::System;
use anyhow::{anyhow, bail, Context, Result};
use postern_inlet::ServiceKind;
use postern_outlet::lease::backend::{BoxFuture, CreateRequest, Created, Found};
use postern_outlet::lease::StartOptions;
use postern_outlet::lease::{Api, Backend, BackendError, LeaseConfig, LeaseManager, Secret};
use postern_outlet::serve::Services;
use postern_outlet::target::Target;
use postern_proto::http::{FilterConfig, RequestFilter, Step};
use postern_proto::lease::Credential;
use postern_tests::kit::{try_svc, InletSpec, OutletSpec, Pki};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Prefix of every token the fake backend mints; the target accepts nothing else.
const LEASED_PREFIX: &str = "Token bench-leased-";

#[derive(Debug, Clone, Serialize)]
pub struct HttpOptions {
    /// Requests per system (over all connections).
    pub requests: usize,
    /// Keep-alive client connections, each sending its requests one after another.
    pub connections: usize,
    /// Line-protocol lines per request body.
    pub lines: usize,
}

impl HttpOptions {
    pub fn standard() -> Self {
        Self {
            requests: 5000,
            connections: 4,
            lines: 50,
        }
    }

    pub fn quick() -> Self {
        Self {
            requests: 200,
            connections: 2,
            lines: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpRow {
    pub system: String,
    pub requests: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub per_sec: f64,
    pub ratio_to_direct: Option<f64>,
    pub latency: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct FilterCost {
    pub body_bytes: usize,
    pub request_bytes: usize,
    pub ns_per_request: f64,
    pub gbytes_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpReport {
    pub what: String,
    pub options: HttpOptions,
    pub rows: Vec<HttpRow>,
    pub filter: Option<FilterCost>,
    pub notes: Vec<String>,
}

/// A backend that mints tokens in memory.
struct FakeBackend;

impl Backend for FakeBackend {
    fn create<'a>(
        &'a self,
        req: &'a CreateRequest,
    ) -> BoxFuture<'a, Result<Created, BackendError>> {
        Box::pin(async move {
            Ok(Created {
                backend_id: format!("fake-{}", req.lease_id),
                credential: Credential::Token(format!("bench-leased-{}", req.lease_id)),
            })
        })
    }

    fn revoke<'a>(&'a self, _backend_id: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async { Ok(()) })
    }

    fn list_ours(&self) -> BoxFuture<'_, Result<Vec<Found>, BackendError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

fn body(lines: usize) -> Vec<u8> {
    let mut b = Vec::new();
    for i in 0..lines {
        b.extend_from_slice(
            format!(
                "cpu,host=server{:02},region=eu-west usage_user={}.5,usage_system=3.25,usage_idle=90.125 {}\n",
                i % 17,
                i % 100,
                1_700_000_000_000_000_000u64 + i as u64
            )
            .as_bytes(),
        );
    }
    b
}

fn request(body: &[u8], authorization: &str) -> Vec<u8> {
    let mut r = format!(
        "POST /api/v2/write?org=bench&bucket=bench&precision=ns HTTP/1.1\r\nHost: influxdb\r\nUser-Agent: postern-bench\r\nAuthorization: {authorization}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// A keep-alive HTTP/1.1 server that answers 204 to requests carrying a leased token and 401
/// to others.
async fn write_target() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let _ = serve_writes(s).await;
            });
        }
    });
    Ok(addr)
}

async fn serve_writes(s: TcpStream) -> Result<()> {
    let (r, mut w) = s.into_split();
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let mut line = String::new();
    let mut body = Vec::new();
    loop {
        let mut len = 0usize;
        let mut authorized = false;
        let mut first = true;
        loop {
            line.clear();
            if r.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let l = line.trim_end();
            if l.is_empty() {
                if first {
                    continue;
                }
                break;
            }
            first = false;
            if let Some((k, v)) = l.split_once(':') {
                let v = v.trim();
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.parse()?;
                } else if k.eq_ignore_ascii_case("authorization") {
                    authorized = v.starts_with(LEASED_PREFIX);
                }
            }
        }
        body.resize(len, 0);
        r.read_exact(&mut body).await?;
        let reply: &[u8] = if authorized {
            b"HTTP/1.1 204 No Content\r\n\r\n"
        } else {
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"
        };
        w.write_all(reply).await?;
    }
}

/// Sends `n` requests one after another on one connection; returns each one's latency.
async fn client(addr: SocketAddr, req: Arc<Vec<u8>>, n: usize) -> Result<Vec<u64>> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut lat = Vec::with_capacity(n);
    let mut line = String::new();
    for i in 0..n {
        let t0 = Instant::now();
        w.write_all(&req).await?;
        let mut status = None;
        loop {
            line.clear();
            let got = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
                .await
                .context("response timed out")??;
            if got == 0 {
                bail!("connection closed after {i} responses");
            }
            if status.is_none() {
                status = line.split_whitespace().nth(1).map(str::to_owned);
            } else if line.trim_end().is_empty() {
                break;
            }
        }
        let status = status.unwrap_or_default();
        if status != "204" {
            bail!("request {i}: HTTP {status}");
        }
        lat.push(nanos(t0.elapsed()));
    }
    Ok(lat)
}

async fn run_one(s: &System, req: Arc<Vec<u8>>, opts: &HttpOptions) -> HttpRow {
    progress(&format!(
        "http: {} x{} requests on {} connections",
        s.name, opts.requests, opts.connections
    ));
    let c = opts.connections.max(1);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..c {
        let n = opts.requests / c + usize::from(k < opts.requests % c);
        tasks.spawn(client(s.addr, req.clone(), n));
    }
    let mut lat = Vec::new();
    let mut errors = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(l)) => lat.extend(l),
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(e) => errors.push(format!("task: {e}")),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    HttpRow {
        system: s.name.clone(),
        requests: lat.len() as u64,
        errors: errors.len() as u64,
        error_samples: errors,
        per_sec: lat.len() as f64 / secs,
        ratio_to_direct: None,
        latency: Latency::from_ns(lat),
    }
}

/// Times the filter over a stream of identical requests (head rewritten, body passed).
pub fn filter_cost(req: &[u8], body_len: usize, iterations: usize) -> Result<FilterCost> {
    let mut filter = RequestFilter::new(FilterConfig {
        strip_query_credentials: true,
        ..FilterConfig::default()
    });
    let mut out = Vec::with_capacity(req.len() + 256);
    let auth = "Token bench-leased-0123456789abcdef";
    let start = Instant::now();
    for _ in 0..iterations {
        out.clear();
        let mut buf = req;
        while !buf.is_empty() {
            match filter.step(buf).map_err(|e| anyhow!("filter: {e}"))? {
                Step::Head { head, consumed } => {
                    head.write_with_authorization(auth, &mut out)
                        .map_err(|e| anyhow!("filter: {e}"))?;
                    buf = &buf[consumed..];
                }
                Step::Body { len } => {
                    out.extend_from_slice(&buf[..len]);
                    buf = &buf[len..];
                }
                Step::NeedMore | Step::Opaque | Step::AwaitUpgrade => {
                    bail!("filter did not take a whole request")
                }
            }
        }
        std::hint::black_box(&out);
    }
    let secs = start.elapsed().as_secs_f64();
    let per = secs * 1e9 / iterations.max(1) as f64;
    Ok(FilterCost {
        body_bytes: body_len,
        request_bytes: req.len(),
        ns_per_request: per,
        gbytes_per_s: req.len() as f64 / per,
    })
}

pub async fn run(pki: &Pki, mode: &RelayMode, opts: &HttpOptions) -> Result<HttpReport> {
    let target = write_target().await?;
    let relay = BenchRelay::start(pki, mode).await?;
    let state = tempfile::tempdir()?;
    let leases_stop = CancellationToken::new();
    let config = LeaseConfig {
        url: "http://127.0.0.1:1".parse()?,
        tls_ca: None,
        allow: None,
        org_id: Some("0123456789abcdef".into()),
        admin: Secret::new("unused"),
        ttl: Duration::from_secs(3600),
        permissions: Vec::new(),
        api: Api::V2,
        hand_out: false,
        profiles: Vec::new(),
    };
    let manager = LeaseManager::start_with(
        config,
        state.path(),
        leases_stop.clone(),
        StartOptions {
            backend: Some(Arc::new(FakeBackend)),
            crash_at: None,
        },
    )
    .await
    .map_err(|e| anyhow!("start lease manager: {e}"))?;
    let (filtered, plain, at_outlet) = (
        "influxdb".to_string(),
        "influxdb-tcp".to_string(),
        "influxdb-at-outlet".to_string(),
    );
    let mut services = Services::default();
    services
        .targets
        .insert(try_svc(&filtered)?, Target::tcp(target.to_string()));
    services
        .targets
        .insert(try_svc(&plain)?, Target::tcp(target.to_string()));
    services
        .targets
        .insert(try_svc(&at_outlet)?, Target::tcp(target.to_string()));
    services.leases.insert(try_svc(&filtered)?, manager.clone());
    services.leases.insert(try_svc(&at_outlet)?, manager);
    services.inject_at.insert(
        try_svc(&at_outlet)?,
        postern_outlet::lease::InjectAt::Outlet,
    );
    let outlet = OutletSpec {
        services,
        ..OutletSpec::new("outlet-1", relay.addr)
    }
    .start(pki)
    .await?
    .running;
    let inlet = InletSpec::new(
        "inlet-1",
        relay.addr,
        &[
            (filtered.as_str(), ServiceKind::Influxdb),
            (plain.as_str(), ServiceKind::Tcp),
            (at_outlet.as_str(), ServiceKind::Influxdb),
        ],
    )
    .start(pki)
    .await?;
    let addrs = inlet.addrs.clone();
    let inlet = inlet.running;
    let body = body(opts.lines);
    // The inlet replaces the client's credential; direct and plain-tunnel clients send a
    // leased-looking one themselves.
    let leased_req = Arc::new(request(&body, "Token bench-leased-direct"));
    let client_req = Arc::new(request(&body, "Token placeholder-from-client"));
    let systems = [
        (System::plain("direct", target), leased_req.clone()),
        (
            System::plain("postern-tcp", addrs[&plain]),
            leased_req.clone(),
        ),
        (
            System::plain("postern-http", addrs[&filtered]),
            client_req.clone(),
        ),
        (
            System::plain("postern-http-at-outlet", addrs[&at_outlet]),
            client_req.clone(),
        ),
    ];
    // Warm up; the filtered service answers 503 until the inlet holds its first lease.
    for (s, req) in &systems {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match client(s.addr, req.clone(), 5).await {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => {
                    bail!("{}: warm-up requests failed: {e:#}", s.name)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    crate::progress::add_steps(systems.len());
    let mut rows = Vec::new();
    for (s, req) in &systems {
        rows.push(run_one(s, req.clone(), opts).await);
    }
    let direct = rows
        .iter()
        .find(|r| r.system == "direct")
        .map(|r| r.per_sec);
    for r in rows.iter_mut() {
        r.ratio_to_direct = direct.filter(|d| *d > 0.0).map(|d| r.per_sec / d);
    }
    let iterations = if opts.requests < 1000 { 2_000 } else { 200_000 };
    let filter = filter_cost(&client_req, body.len(), iterations)?;
    inlet.stop().await;
    outlet.stop().await;
    leases_stop.cancel();
    relay.stop().await;
    Ok(HttpReport {
        what: format!(
            "POST /api/v2/write, {} lines ({} B) per request, {} keep-alive connections, closed loop",
            opts.lines,
            body.len(),
            opts.connections
        ),
        options: opts.clone(),
        rows,
        filter: Some(filter),
        notes: vec![
            "postern-http: inlet service kind influxdb (the inlet's HTTP filter puts the leased token in every request, the outlet's filter checks it is the inlet's own lease; lease manager with an in-memory backend); postern-http-at-outlet: inject-at = outlet (the inlet's filter strips credentials, the outlet's puts the lease in); postern-tcp: same outlet, a service without leases (no filter on either side)".into(),
            "the target answers 204 only to requests that carry a leased token".into(),
        ],
    })
}
