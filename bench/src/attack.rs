//! The `attack` scenario: what hostile traffic at the relay's UDP port costs the legit.
//!
//! One relay (its own process, logging at INFO to a file), one outlet and one inlet. For each
//! attack in turn (none, garbage datagrams, frames for random route ids, a QUIC Initial flood
//! from many source ports) the bench measures, while the attack runs: a legit stream's
//! throughput through the tunnel, how long a freshly started inlet takes to connect over UDP,
//! and the relay's CPU, RSS (before, peak, a few seconds after) and log bytes written; for the
//! Initial flood also how many bytes the relay sent back per byte of attack.
//!
//! Then slot exhaustion on the relay's two TCP ports (the TLS/TCP fallback and the public
//! hostname port): [`AttackOptions::junk_conns`] connections held from many loopback source
//! addresses (most under the per-source cap, one source far over it), idle or trickling a
//! ClientHello one byte at a time and reopened as soon as the relay closes them. Meanwhile new
//! nodes forced onto TLS/TCP connect (time to get in) and a real HTTPS client fetches a page
//! through the public hostname (time to the whole response).

use crate::cluster::{self, BenchRelay, RelayMode, Tunnel};
use crate::target;
use anyhow::{anyhow, bail, Context, Result};
use postern_inlet::ServiceKind;
use postern_net::transport::relay_path::{TransportMode, TransportSettings};
use postern_outlet::target::Target;
use postern_tests::junk_tcp::{self, Junk, JunkHold};
use postern_tests::kit::{InletSpec, OutletSpec, Pki};
use serde::Serialize;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// Sizes of the `attack` scenario.
#[derive(Debug, Clone)]
pub struct AttackOptions {
    /// How long each attack runs.
    pub secs: f64,
    /// Datagrams per second of the garbage and random-route attacks.
    pub junk_rate: f64,
    /// Initials per second of the handshake flood.
    pub initial_rate: f64,
    /// UDP sockets (source ports) the attacks send from.
    pub sockets: usize,
    /// Junk connections held on a TCP port.
    pub junk_conns: usize,
    /// Of them, connections per source address (the rest from one greedy source).
    pub junk_per_source: usize,
    /// Seconds between the bytes a trickling connection sends.
    pub trickle_secs: f64,
}

impl AttackOptions {
    pub fn quick() -> Self {
        Self {
            secs: 3.0,
            junk_rate: 5_000.0,
            initial_rate: 2_000.0,
            sockets: 16,
            junk_conns: 600,
            junk_per_source: 30,
            trickle_secs: 2.0,
        }
    }

    pub fn standard() -> Self {
        Self {
            secs: 8.0,
            junk_rate: 20_000.0,
            initial_rate: 10_000.0,
            sockets: 256,
            junk_conns: 4_500,
            junk_per_source: 30,
            trickle_secs: 2.0,
        }
    }
}

/// One attack's figures.
#[derive(Debug, Clone, Serialize)]
pub struct AttackRow {
    pub attack: String,
    /// Datagrams the attack sent, and per second actually reached.
    pub sent: u64,
    pub sent_per_s: f64,
    /// Legit throughput through the tunnel while it ran.
    pub legit_gbps: f64,
    /// A new inlet's time to connect to the relay while it ran.
    pub reconnect_ms: f64,
    /// Relay CPU (cores) while it ran.
    pub relay_cpu: f64,
    pub rss_before_kib: u64,
    pub rss_peak_kib: u64,
    pub rss_after_kib: u64,
    /// Bytes the relay wrote to its log during the attack and the settling after it.
    pub log_bytes: u64,
    /// Bytes the relay sent back to the attacker per byte received (Initial flood only).
    pub reply_ratio: Option<f64>,
    /// Junk connections open when the legit clients were measured (TCP attacks only).
    pub junk_held: Option<u64>,
    /// New nodes forced onto TLS/TCP: the slowest one's time to connect, and how many of
    /// [`TCP_NODES`] got in.
    pub tcp_node_ms: Option<f64>,
    pub tcp_nodes_in: u32,
    /// HTTPS requests through the public hostname: the slowest one's time, and how many of
    /// [`HTTPS_REQUESTS`] were answered within 1 s.
    pub https_ms: Option<f64>,
    pub https_within_1s: u32,
}

/// New TLS/TCP nodes started per attack.
pub const TCP_NODES: u32 = 3;
/// HTTPS requests per attack.
pub const HTTPS_REQUESTS: u32 = 10;

/// The scenario's result.
#[derive(Debug, Clone, Serialize)]
pub struct AttackReport {
    pub secs: f64,
    pub rows: Vec<AttackRow>,
}

impl AttackReport {
    /// A Markdown table.
    pub fn table(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "### attack ({} s each; legit stream and a new inlet's connect time while it runs)\n",
            self.secs
        );
        let _ = writeln!(o, "| attack | sent | sent/s | legit Gbit/s | new inlet connects in ms | TLS/TCP nodes in, slowest ms | HTTPS within 1 s, slowest ms | relay CPU (cores) | RSS before / peak / after MiB | log bytes | reply bytes per attack byte |");
        let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|");
        for r in &self.rows {
            let sent = match r.junk_held {
                Some(held) => format!("{} (held {held})", r.sent),
                None => r.sent.to_string(),
            };
            let _ = writeln!(
                o,
                "| {} | {} | {:.0} | {:.2} | {:.0} | {}/{} {} | {}/{} {} | {:.2} | {:.1} / {:.1} / {:.1} | {} | {} |",
                r.attack,
                sent,
                r.sent_per_s,
                r.legit_gbps,
                r.reconnect_ms,
                r.tcp_nodes_in,
                TCP_NODES,
                r.tcp_node_ms.map_or("-".into(), |x| format!("{x:.0}")),
                r.https_within_1s,
                HTTPS_REQUESTS,
                r.https_ms.map_or("-".into(), |x| format!("{x:.0}")),
                r.relay_cpu,
                r.rss_before_kib as f64 / 1024.0,
                r.rss_peak_kib as f64 / 1024.0,
                r.rss_after_kib as f64 / 1024.0,
                r.log_bytes,
                r.reply_ratio.map_or("-".into(), |x| format!("{x:.2}")),
            );
        }
        o
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attack {
    None,
    Garbage,
    RandomRoutes,
    InitialFlood,
    TcpIdle,
    TcpTrickle,
    PublicIdle,
    PublicTrickle,
}

impl Attack {
    fn name(self) -> &'static str {
        match self {
            Attack::None => "none (baseline)",
            Attack::Garbage => "garbage datagrams",
            Attack::RandomRoutes => "frames, random route ids",
            Attack::InitialFlood => "QUIC Initial flood",
            Attack::TcpIdle => "idle connections, TLS/TCP port",
            Attack::TcpTrickle => "trickling ClientHellos, TLS/TCP port",
            Attack::PublicIdle => "idle connections, public port",
            Attack::PublicTrickle => "trickling ClientHellos, public port",
        }
    }

    /// The junk a TCP attack holds, and on which port.
    fn junk(self) -> Option<(Junk, bool)> {
        let trickle = Junk::Trickle(Duration::ZERO);
        match self {
            Attack::TcpIdle => Some((Junk::Idle, false)),
            Attack::TcpTrickle => Some((trickle, false)),
            Attack::PublicIdle => Some((Junk::Idle, true)),
            Attack::PublicTrickle => Some((trickle, true)),
            _ => None,
        }
    }
}

/// The public service the HTTPS client fetches: `web.<domain>`.
const PUBLIC_SERVICE: &str = "web";

/// Runs the scenario; the relay must run in its own process (`mode` = Child) to be measured.
pub async fn run(pki: &Pki, mode: &RelayMode, o: &AttackOptions) -> Result<AttackReport> {
    let dir = tempfile::tempdir()?;
    let log_path = dir.path().join("relay.log");
    let (sink, _sink_task) = target::sink_server().await?;
    let relay = BenchRelay::start_logged(pki, mode, Some(&log_path)).await?;
    let pid = relay
        .pid()
        .ok_or_else(|| anyhow!("the attack scenario needs --relay process"))?;
    let nodes = Tunnel::on(pki, relay, sink).await?;
    let tunnel = nodes.addr;
    let relay_addr = nodes.relay.addr;
    let loopback = |p: Option<u16>, what: &str| {
        p.map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .ok_or_else(|| anyhow!("the relay has no {what}"))
    };
    let tcp_addr = loopback(nodes.relay.tcp_port, "TLS/TCP listener")?;
    let public_addr = loopback(nodes.relay.public_port, "public ingress")?;
    if let Some(limit) = postern_net::runtime::limit::fd_limit() {
        let need = o.junk_conns as u64 + 1024;
        if limit < need {
            bail!(
                "holding {} junk connections needs about {need} open files; the limit is \
                 {limit} (raise it with `ulimit -n {need}`)",
                o.junk_conns
            );
        }
    }
    let web = PublicWeb::start(pki, relay_addr).await?;
    // Warm up the end-to-end connection.
    legit_stream(tunnel, Duration::from_millis(500)).await?;

    let mut rows = Vec::new();
    for (i, attack) in [
        Attack::None,
        Attack::Garbage,
        Attack::RandomRoutes,
        Attack::InitialFlood,
        Attack::TcpIdle,
        Attack::TcpTrickle,
        Attack::PublicIdle,
        Attack::PublicTrickle,
    ]
    .into_iter()
    .enumerate()
    {
        if let Some((junk, public)) = attack.junk() {
            let to = if public { public_addr } else { tcp_addr };
            let legit = Legit {
                pki,
                relay: relay_addr,
                tcp_port: tcp_addr.port(),
                tunnel,
                web: &web,
                public: public_addr,
            };
            rows.push(tcp_attack(attack, junk, to, &legit, o, pid, &log_path, i).await?);
            continue;
        }
        // Generated up front so that making them does not compete with the measurement.
        let initials = if attack == Attack::InitialFlood {
            let n = (o.initial_rate * o.secs) as usize;
            let cfg = postern_net::transport::endpoint::control_client(
                &pki.try_identity("flooder")?,
                pki.try_roots()?,
            )
            .context("flood client config")?;
            let to = relay_addr;
            tokio::task::spawn_blocking(move || make_initials(cfg, to, n)).await??
        } else {
            Vec::new()
        };
        let before = cluster::proc_usage(&pid.to_string())?;
        let log_before = file_len(&log_path);
        let t0 = Instant::now();
        let secs = Duration::from_secs_f64(o.secs);
        let rate = match attack {
            Attack::InitialFlood => o.initial_rate,
            _ => o.junk_rate,
        };
        let replies = Arc::new(AtomicU64::new(0));
        let attacker = tokio::spawn(send_attack(
            attack,
            relay_addr,
            rate,
            secs,
            o.sockets,
            initials,
            replies.clone(),
        ));
        let peak = Arc::new(AtomicU64::new(before.rss_kib));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    if let Ok(u) = cluster::proc_usage(&pid.to_string()) {
                        peak.fetch_max(u.rss_kib, Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        // Let the attack get going, then measure the legit while it lasts.
        tokio::time::sleep(secs / 8).await;
        let reconnect = new_inlet_connect_time(pki, relay_addr, i).await?;
        let (tcp_node_ms, tcp_nodes_in) =
            tcp_nodes_connect(pki, relay_addr, tcp_addr.port(), i).await;
        let (https_ms, https_within_1s) = web.probe(public_addr).await;
        let left = secs.saturating_sub(t0.elapsed());
        let bytes = legit_stream(tunnel, left.max(Duration::from_millis(300))).await?;
        let legit_gbps = bytes.0 as f64 * 8.0 / bytes.1.as_secs_f64() / 1e9;
        let (sent, sent_bytes) = attacker.await??;
        let during = cluster::proc_usage(&pid.to_string())?;
        let elapsed = t0.elapsed().as_secs_f64();
        // Settle: abandoned handshakes time out (5 s), then memory is read again.
        tokio::time::sleep(Duration::from_secs(if attack == Attack::InitialFlood {
            7
        } else {
            2
        }))
        .await;
        sampler.abort();
        let after = cluster::proc_usage(&pid.to_string())?;
        let reply = replies.load(Relaxed);
        rows.push(AttackRow {
            attack: attack.name().into(),
            sent,
            sent_per_s: sent as f64 / o.secs,
            legit_gbps,
            reconnect_ms: reconnect.as_secs_f64() * 1e3,
            relay_cpu: (during.cpu_s - before.cpu_s) / elapsed,
            rss_before_kib: before.rss_kib,
            rss_peak_kib: peak.load(Relaxed),
            rss_after_kib: after.rss_kib,
            log_bytes: file_len(&log_path).saturating_sub(log_before),
            reply_ratio: (attack == Attack::InitialFlood && sent_bytes > 0)
                .then(|| reply as f64 / sent_bytes as f64),
            junk_held: None,
            tcp_node_ms,
            tcp_nodes_in,
            https_ms,
            https_within_1s,
        });
    }
    web.outlet.stop().await;
    nodes.stop().await;
    Ok(AttackReport { secs: o.secs, rows })
}

/// What the legit side of a TCP attack uses.
struct Legit<'a> {
    pki: &'a Pki,
    relay: SocketAddr,
    tcp_port: u16,
    tunnel: SocketAddr,
    web: &'a PublicWeb,
    public: SocketAddr,
}

/// One slot-exhaustion attack on a TCP port (`to`): junk held from many source addresses while
/// new TLS/TCP nodes connect, HTTPS requests go through the public hostname and the legit
/// stream runs.
#[allow(clippy::too_many_arguments)]
async fn tcp_attack(
    attack: Attack,
    junk: Junk,
    to: SocketAddr,
    legit: &Legit<'_>,
    o: &AttackOptions,
    pid: u32,
    log_path: &std::path::Path,
    i: usize,
) -> Result<AttackRow> {
    let junk = match junk {
        Junk::Trickle(_) => Junk::Trickle(Duration::from_secs_f64(o.trickle_secs)),
        j => j,
    };
    let before = cluster::proc_usage(&pid.to_string())?;
    let log_before = file_len(log_path);
    let peak = Arc::new(AtomicU64::new(before.rss_kib));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(u) = cluster::proc_usage(&pid.to_string()) {
                    peak.fetch_max(u.rss_kib, Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let t0 = Instant::now();
    // Most sources under the per-source cap; one greedy source far over it.
    let per = o.junk_per_source.max(1);
    let greedy = (4 * per).min(o.junk_conns);
    let sources = junk_tcp::loopback_sources(0x0101, (o.junk_conns - greedy) / per);
    let host = format!("{PUBLIC_SERVICE}.{}", cluster::PUBLIC_DOMAIN);
    let reopen = Duration::from_millis(100);
    let crowd = JunkHold::start(to, &sources, per, junk, &host, reopen);
    let greedy_hold = JunkHold::start(
        to,
        &junk_tcp::loopback_sources(0xc801, 1),
        greedy,
        junk,
        &host,
        reopen,
    );
    let opened = || crowd.stats.opened.load(Relaxed) + greedy_hold.stats.opened.load(Relaxed);
    let want = (sources.len() * per + greedy) as u64;
    while opened() < want && t0.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held = crowd.held() + greedy_hold.held();
    let reconnect = new_inlet_connect_time(legit.pki, legit.relay, i).await?;
    let (tcp_node_ms, tcp_nodes_in) =
        tcp_nodes_connect(legit.pki, legit.relay, legit.tcp_port, i).await;
    let (https_ms, https_within_1s) = legit.web.probe(legit.public).await;
    let left = Duration::from_secs_f64(o.secs).saturating_sub(t0.elapsed());
    let bytes = legit_stream(legit.tunnel, left.max(Duration::from_secs(2))).await?;
    let legit_gbps = bytes.0 as f64 * 8.0 / bytes.1.as_secs_f64() / 1e9;
    let sent = opened();
    let during = cluster::proc_usage(&pid.to_string())?;
    let elapsed = t0.elapsed().as_secs_f64();
    crowd.stop().await;
    greedy_hold.stop().await;
    // Settle: pending connections close at their deadline (5-10 s), then memory is read again.
    tokio::time::sleep(Duration::from_secs(7)).await;
    sampler.abort();
    let after = cluster::proc_usage(&pid.to_string())?;
    Ok(AttackRow {
        attack: attack.name().into(),
        sent,
        sent_per_s: sent as f64 / elapsed,
        legit_gbps,
        reconnect_ms: reconnect.as_secs_f64() * 1e3,
        relay_cpu: (during.cpu_s - before.cpu_s) / elapsed,
        rss_before_kib: before.rss_kib,
        rss_peak_kib: peak.load(Relaxed),
        rss_after_kib: after.rss_kib,
        log_bytes: file_len(log_path).saturating_sub(log_before),
        reply_ratio: None,
        junk_held: Some(held),
        tcp_node_ms,
        tcp_nodes_in,
        https_ms,
        https_within_1s,
    })
}

/// Starts [`TCP_NODES`] fresh inlets forced onto TLS/TCP, one after another (as nodes
/// reconnecting); returns the slowest one's connect time and how many got in within 10 s.
async fn tcp_nodes_connect(
    pki: &Pki,
    relay: SocketAddr,
    tcp_port: u16,
    i: usize,
) -> (Option<f64>, u32) {
    let (mut slowest, mut ok) = (None::<f64>, 0);
    for k in 0..TCP_NODES {
        let spec = InletSpec {
            transport: TransportSettings {
                mode: TransportMode::Tcp,
                tcp_port: Some(tcp_port),
                ..TransportSettings::default()
            },
            ..InletSpec::new(
                &format!("inlet-tcp-{i}-{k}"),
                relay,
                &[("bench", ServiceKind::Tcp)],
            )
        };
        let t = Instant::now();
        if let Ok(Ok(node)) = tokio::time::timeout(Duration::from_secs(10), spec.start(pki)).await {
            let took = t.elapsed().as_secs_f64() * 1e3;
            slowest = Some(slowest.map_or(took, |s| s.max(took)));
            ok += 1;
            node.running.stop().await;
        }
    }
    (slowest, ok)
}

/// An outlet offering [`PUBLIC_SERVICE`] at the relay's public hostname, its web server, and
/// an access grant for the HTTPS client.
struct PublicWeb {
    outlet: postern_tests::kit::Running,
    connector: junk_tcp::HttpsConnector,
    cookie: String,
    host: String,
    _state: tempfile::TempDir,
}

impl PublicWeb {
    const BODY: &'static str = "served through the public hostname";

    async fn start(pki: &Pki, relay: SocketAddr) -> Result<Self> {
        let backend = junk_tcp::http_server(Self::BODY).await?;
        let state = tempfile::tempdir()?;
        let host = format!("{PUBLIC_SERVICE}.{}", cluster::PUBLIC_DOMAIN);
        let service = postern_proto::name::ServiceName::new(PUBLIC_SERVICE)?;
        let public = Arc::new(postern_outlet::public::Public {
            services: std::collections::HashMap::from([(
                service.clone(),
                postern_outlet::public::PublicService {
                    acceptor: postern_tests::kit::host_acceptor(pki, &host),
                    host: host.clone(),
                },
            )]),
            access: Arc::new(postern_outlet::public::access::AccessStore::open(
                state.path(),
            )?),
            link_port: 443,
        });
        let grant =
            public
                .access
                .create(&service, Duration::from_secs(3600), Default::default())?;
        let cookie = format!("Cookie: postern_access={}\r\n", grant.secret.expose());
        let outlet = OutletSpec {
            public: Some(public),
            ..OutletSpec::new("outlet-web", relay)
        }
        .targets([(PUBLIC_SERVICE, Target::tcp(backend.to_string()))])?
        .start(pki)
        .await?
        .running;
        Ok(Self {
            outlet,
            connector: junk_tcp::https_connector(pki.try_roots()?)?,
            cookie,
            host,
            _state: state,
        })
    }

    /// [`HTTPS_REQUESTS`] requests one after another: the slowest answered one's time, and
    /// how many were answered (with the page) within 1 s.
    async fn probe(&self, public: SocketAddr) -> (Option<f64>, u32) {
        let (mut slowest, mut ok) = (None::<f64>, 0);
        for _ in 0..HTTPS_REQUESTS {
            let got = junk_tcp::https_get(
                &self.connector,
                public,
                &self.host,
                "/",
                &self.cookie,
                Duration::from_secs(5),
            )
            .await;
            if let Ok((body, took)) = got {
                if body.contains(Self::BODY) {
                    let ms = took.as_secs_f64() * 1e3;
                    slowest = Some(slowest.map_or(ms, |s| s.max(ms)));
                    if took < Duration::from_secs(1) {
                        ok += 1;
                    }
                }
            }
        }
        (slowest, ok)
    }
}

fn file_len(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Streams into the tunnel for `d`; returns (bytes the sink confirmed, time taken).
async fn legit_stream(tunnel: SocketAddr, d: Duration) -> Result<(u64, Duration)> {
    let mut s = TcpStream::connect(tunnel).await?;
    let chunk = target::payload(256 * 1024);
    let t = Instant::now();
    let mut sent = 0u64;
    while t.elapsed() < d {
        s.write_all(&chunk).await?;
        sent += chunk.len() as u64;
    }
    s.shutdown().await?;
    let mut reply = [0u8; target::SINK_REPLY];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut reply))
        .await
        .context("sink reply")??;
    let got = u64::from_le_bytes(reply[..8].try_into()?);
    anyhow::ensure!(got == sent, "sink got {got} of {sent} bytes");
    Ok((got, t.elapsed()))
}

/// Starts a fresh inlet (as a restarted node) and times its connection to the relay over UDP.
async fn new_inlet_connect_time(pki: &Pki, relay: SocketAddr, i: usize) -> Result<Duration> {
    let t = Instant::now();
    let name = format!("inlet-new-{i}");
    let inlet = InletSpec::new(&name, relay, &[("bench", ServiceKind::Tcp)])
        .start(pki)
        .await?
        .running;
    let took = t.elapsed();
    inlet.stop().await;
    Ok(took)
}

/// Genuine QUIC Initials (a real ClientHello each, fresh connection ids), made without I/O.
fn make_initials(cfg: quinn::ClientConfig, to: SocketAddr, n: usize) -> Result<Vec<Vec<u8>>> {
    let mk = || {
        quinn_proto::Endpoint::new(
            Arc::new(quinn_proto::EndpointConfig::default()),
            None,
            false,
            None,
        )
    };
    let mut ep = mk();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        if i % 512 == 511 {
            ep = mk();
        }
        let now = Instant::now();
        let (_, mut conn) = ep
            .connect(now, cfg.clone(), to, "relay")
            .map_err(|e| anyhow!("connect: {e}"))?;
        let mut buf = Vec::with_capacity(1500);
        let t = conn
            .poll_transmit(now, 1, &mut buf)
            .ok_or_else(|| anyhow!("no Initial"))?;
        buf.truncate(t.size);
        out.push(buf);
    }
    Ok(out)
}

/// Sends the attack for `d` at `rate` from `sockets` source ports on 127.0.0.2 (the legit nodes
/// use 127.0.0.1); counts bytes coming back. Returns (datagrams, bytes) sent.
async fn send_attack(
    attack: Attack,
    to: SocketAddr,
    rate: f64,
    d: Duration,
    sockets: usize,
    initials: Vec<Vec<u8>>,
    replies: Arc<AtomicU64>,
) -> Result<(u64, u64)> {
    if attack == Attack::None {
        tokio::time::sleep(d).await;
        return Ok((0, 0));
    }
    let mut socks = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..sockets.max(1) {
        let s = Arc::new(UdpSocket::bind("127.0.0.2:0").await?);
        let r = s.clone();
        let replies = replies.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = r.recv(&mut buf).await {
                replies.fetch_add(n as u64, Relaxed);
            }
        }));
        socks.push(s);
    }
    let start = Instant::now();
    let (mut sent, mut bytes) = (0u64, 0u64);
    let mut i = 0usize;
    while start.elapsed() < d {
        let datagram = match attack {
            Attack::Garbage => vec![0x02; 200 + i % 1000],
            Attack::RandomRoutes => {
                let mut f = postern_proto::fwd::header(postern_proto::fwd::RouteId(rand::random()))
                    .to_vec();
                f.extend_from_slice(&[0x41; 1200]);
                f
            }
            Attack::InitialFlood => match initials.get(i) {
                Some(d) => d.clone(),
                None => break,
            },
            Attack::None
            | Attack::TcpIdle
            | Attack::TcpTrickle
            | Attack::PublicIdle
            | Attack::PublicTrickle => break,
        };
        let sock = &socks[i % socks.len()];
        if sock.send_to(&datagram, to).await.is_ok() {
            sent += 1;
            bytes += datagram.len() as u64;
        }
        i += 1;
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        if due > Instant::now() + Duration::from_millis(2) {
            tokio::time::sleep_until(due.into()).await;
        }
    }
    // Replies still in flight.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for r in readers {
        r.abort();
    }
    Ok((sent, bytes))
}
