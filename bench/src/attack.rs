//! The `attack` scenario: what hostile traffic at the relay's UDP port costs the legit.
//!
//! One relay (its own process, logging at INFO to a file), one outlet and one inlet. For each
//! attack in turn (none, garbage datagrams, frames for random route ids, a QUIC Initial flood
//! from many source ports) the bench measures, while the attack runs: a legit stream's
//! throughput through the tunnel, how long a freshly started inlet takes to connect over UDP,
//! and the relay's CPU, RSS (before, peak, a few seconds after) and log bytes written; for the
//! Initial flood also how many bytes the relay sent back per byte of attack.

use crate::cluster::{self, BenchRelay, RelayMode, Tunnel};
use crate::target;
use anyhow::{anyhow, Context, Result};
use postern_inlet::ServiceKind;
use postern_tests::kit::{InletSpec, Pki};
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
}

impl AttackOptions {
    pub fn quick() -> Self {
        Self {
            secs: 3.0,
            junk_rate: 5_000.0,
            initial_rate: 2_000.0,
            sockets: 16,
        }
    }

    pub fn standard() -> Self {
        Self {
            secs: 8.0,
            junk_rate: 20_000.0,
            initial_rate: 10_000.0,
            sockets: 256,
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
}

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
        let _ = writeln!(o, "| attack | sent | sent/s | legit Gbit/s | new inlet connects in ms | relay CPU (cores) | RSS before / peak / after MiB | log bytes | reply bytes per attack byte |");
        let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---|---:|---:|");
        for r in &self.rows {
            let _ = writeln!(
                o,
                "| {} | {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.1} / {:.1} / {:.1} | {} | {} |",
                r.attack,
                r.sent,
                r.sent_per_s,
                r.legit_gbps,
                r.reconnect_ms,
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
}

impl Attack {
    fn name(self) -> &'static str {
        match self {
            Attack::None => "none (baseline)",
            Attack::Garbage => "garbage datagrams",
            Attack::RandomRoutes => "frames, random route ids",
            Attack::InitialFlood => "QUIC Initial flood",
        }
    }
}

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
    // Warm up the end-to-end connection.
    legit_stream(tunnel, Duration::from_millis(500)).await?;

    let mut rows = Vec::new();
    for (i, attack) in [
        Attack::None,
        Attack::Garbage,
        Attack::RandomRoutes,
        Attack::InitialFlood,
    ]
    .into_iter()
    .enumerate()
    {
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
        let left = secs.saturating_sub(t0.elapsed() + secs / 8);
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
        });
    }
    nodes.stop().await;
    Ok(AttackReport { secs: o.secs, rows })
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
            Attack::None => break,
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
