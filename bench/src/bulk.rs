//! `bulk`: throughput of N concurrent streams, each carrying S bytes to a sink that verifies
//! their count and checksum.

use crate::cluster::{proc_usage, udp_drops, RelayMode, RelayStats, Tunnel};
use crate::progress::progress;
use crate::stats::median;
use crate::systems::{self, System};
use crate::target::{payload, sink_server, Checksum, SINK_REPLY};
use anyhow::{anyhow, bail, Result};
use postern_tests::kit::Pki;
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

#[derive(Debug, Clone, Serialize)]
pub struct BulkOptions {
    /// Concurrent stream counts to run.
    pub streams: Vec<usize>,
    /// Bytes sent in total per run (split across the streams).
    pub total_bytes: u64,
    /// Each stream carries at least this many bytes.
    pub min_stream_bytes: u64,
    /// Runs per (system, stream count); the median is reported.
    pub repeat: usize,
    /// Size of each client write.
    pub write_size: usize,
    /// A run whose streams have not all finished by then counts the rest as errors.
    pub run_timeout_s: u64,
    pub baselines: bool,
}

impl BulkOptions {
    pub fn standard() -> Self {
        Self {
            streams: vec![1, 8, 64],
            total_bytes: 256 << 20,
            min_stream_bytes: 64 << 10,
            repeat: 3,
            write_size: 64 << 10,
            run_timeout_s: 30,
            baselines: false,
        }
    }

    pub fn quick() -> Self {
        Self {
            streams: vec![1, 8],
            total_bytes: 8 << 20,
            repeat: 1,
            ..Self::standard()
        }
    }
}

/// One (system, stream count) cell.
#[derive(Debug, Clone, Serialize)]
pub struct BulkRow {
    pub system: String,
    pub streams: usize,
    pub bytes_per_stream: u64,
    pub total_bytes: u64,
    /// Each run's aggregate throughput.
    pub runs_gbps: Vec<f64>,
    /// Median of the runs.
    pub gbps: f64,
    /// `gbps` over direct TCP's for the same stream count.
    pub ratio_to_direct: Option<f64>,
    /// Streams whose count and checksum matched at the sink, over all runs.
    pub verified_streams: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    /// CPU seconds of the bench process (clients, sink, inlet, outlet) per GiB moved.
    pub bench_cpu_s_per_gib: f64,
    /// CPU seconds of the process in the middle (postern's relay, rathole's or bore's server)
    /// per GiB moved, when it runs apart from the bench.
    pub relay_cpu_s_per_gib: Option<f64>,
    /// Datagrams the kernel dropped on postern's UDP sockets (relay, inlet, outlet) over all
    /// runs: the receive buffer was full (`drops` of /proc/net/udp, as `ss -uam` shows). None
    /// for systems without UDP sockets.
    pub udp_drops: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BulkReport {
    pub options: BulkOptions,
    pub relay_separate_process: bool,
    pub rows: Vec<BulkRow>,
    /// Relay counters after all runs.
    pub relay_stats: RelayStats,
    pub notes: Vec<String>,
}

struct Transfer {
    secs: f64,
    bytes: u64,
    verified: u64,
    errors: Vec<String>,
}

async fn one_stream(
    mut s: TcpStream,
    len: u64,
    offset: usize,
    data: Arc<Vec<u8>>,
    write_size: usize,
) -> Result<()> {
    let mut sum = Checksum::default();
    let mut left = len;
    let mut pos = offset % data.len();
    while left > 0 {
        let n = (write_size as u64).min(left).min((data.len() - pos) as u64) as usize;
        let chunk = &data[pos..pos + n];
        sum.update(chunk);
        s.write_all(chunk).await?;
        left -= n as u64;
        pos = (pos + n) % data.len();
    }
    s.shutdown().await?;
    let mut reply = [0u8; SINK_REPLY];
    s.read_exact(&mut reply).await?;
    let mut count = [0u8; 8];
    count.copy_from_slice(&reply[..8]);
    let mut check = [0u8; 8];
    check.copy_from_slice(&reply[8..]);
    let (count, check) = (u64::from_le_bytes(count), u64::from_le_bytes(check));
    if count != len {
        bail!("sink received {count} bytes, {len} were sent");
    }
    if check != sum.finish() {
        bail!("checksum mismatch at the sink");
    }
    Ok(())
}

async fn transfer(
    addr: SocketAddr,
    streams: usize,
    per_stream: u64,
    data: Arc<Vec<u8>>,
    write_size: usize,
    deadline: Duration,
) -> Result<Transfer> {
    // Connect every stream first, then start them together.
    let mut conns = Vec::with_capacity(streams);
    let mut errors = Vec::new();
    for _ in 0..streams {
        match TcpStream::connect(addr).await {
            Ok(s) => conns.push(s),
            Err(e) => errors.push(format!("connect: {e}")),
        }
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, s) in conns.into_iter().enumerate() {
        let data = data.clone();
        tasks.spawn(async move {
            match tokio::time::timeout(
                deadline,
                one_stream(s, per_stream, i * 4099, data, write_size),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(anyhow!("stream not done after {} s", deadline.as_secs())),
            }
        });
    }
    let mut verified = 0;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => verified += 1,
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(e) => errors.push(format!("task: {e}")),
        }
    }
    Ok(Transfer {
        secs: start.elapsed().as_secs_f64(),
        bytes: verified * per_stream,
        verified,
        errors,
    })
}

pub async fn run(pki: &Pki, mode: &RelayMode, opts: &BulkOptions) -> Result<BulkReport> {
    let (sink, _sink_task) = sink_server().await?;
    let mut tunnel = Tunnel::start(pki, mode, sink).await?;
    let tcp_addr = tunnel.add_tcp(pki, sink).await?;
    let data = Arc::new(payload(4 << 20));
    let mut notes = Vec::new();
    let mut systems = vec![
        System::plain("direct", sink),
        System::plain("postern", tunnel.addr).with_relay(tunnel.relay.pid()),
        System::plain("postern-fallback", tcp_addr).with_relay(tunnel.relay.pid()),
    ];
    notes.push("postern-fallback: the same relay, with an outlet and an inlet that reach it over its TLS/TCP fallback (transport = tcp, as when UDP is blocked); the end-to-end QUIC connection is carried inside".into());
    let mut extra = systems::start_baselines(opts.baselines, sink, &mut notes).await;
    systems.extend(extra.iter_mut().map(|b| b.system()));
    // Warm every path up (postern's end-to-end connection is set up on first use); a
    // baseline that fails here is left out with a note.
    let mut warm = Vec::new();
    for s in systems {
        let t = transfer(
            s.addr,
            1,
            1 << 20,
            data.clone(),
            opts.write_size,
            Duration::from_secs(opts.run_timeout_s),
        )
        .await?;
        if t.verified == 1 {
            warm.push(s);
        } else if s.name == "direct" || s.name == "postern" {
            bail!("{}: warm-up transfer failed: {:?}", s.name, t.errors);
        } else {
            notes.push(format!(
                "{}: warm-up transfer failed ({:?}); left out",
                s.name, t.errors
            ));
        }
    }
    let systems = warm;
    crate::progress::add_steps(opts.streams.len() * systems.len() * opts.repeat);
    let mut rows = Vec::new();
    for &n in &opts.streams {
        let per_stream = (opts.total_bytes / n.max(1) as u64).max(opts.min_stream_bytes);
        for s in &systems {
            let mut row = BulkRow {
                system: s.name.clone(),
                streams: n,
                bytes_per_stream: per_stream,
                total_bytes: per_stream * n as u64,
                runs_gbps: Vec::new(),
                gbps: 0.0,
                ratio_to_direct: None,
                verified_streams: 0,
                errors: 0,
                error_samples: Vec::new(),
                bench_cpu_s_per_gib: 0.0,
                relay_cpu_s_per_gib: None,
                udp_drops: None,
            };
            let (mut bench_cpu, mut relay_cpu, mut moved) = (0.0, 0.0, 0u64);
            // The bench process holds postern's inlet and outlet; the relay may be a child.
            let drop_pids: Vec<String> = std::iter::once("self".to_string())
                .chain(s.relay_pid.map(|p| p.to_string()))
                .collect();
            let drops0 = s.name.starts_with("postern").then(|| udp_drops(&drop_pids));
            for r in 0..opts.repeat {
                progress(&format!(
                    "bulk: {} x{n} streams of {} KiB, run {}/{}",
                    s.name,
                    per_stream >> 10,
                    r + 1,
                    opts.repeat
                ));
                let b0 = proc_usage("self")?;
                let r0 = relay_cpu_now(s.relay_pid);
                let t = transfer(
                    s.addr,
                    n,
                    per_stream,
                    data.clone(),
                    opts.write_size,
                    Duration::from_secs(opts.run_timeout_s),
                )
                .await?;
                let b1 = proc_usage("self")?;
                let r1 = relay_cpu_now(s.relay_pid);
                bench_cpu += b1.cpu_s - b0.cpu_s;
                relay_cpu += r1 - r0;
                moved += t.bytes;
                row.runs_gbps.push(t.bytes as f64 * 8.0 / t.secs / 1e9);
                row.verified_streams += t.verified;
                row.errors += t.errors.len() as u64;
                for e in t.errors {
                    if row.error_samples.len() < 5 {
                        row.error_samples.push(e);
                    }
                }
            }
            row.gbps = median(&row.runs_gbps);
            row.udp_drops = drops0.map(|d0| udp_drops(&drop_pids).saturating_sub(d0));
            let gib = moved as f64 / GIB;
            if gib > 0.0 {
                row.bench_cpu_s_per_gib = bench_cpu / gib;
                if s.relay_pid.is_some() {
                    row.relay_cpu_s_per_gib = Some(relay_cpu / gib);
                }
            }
            rows.push(row);
        }
        let direct = rows
            .iter()
            .find(|r| r.streams == n && r.system == "direct")
            .map(|r| r.gbps);
        for r in rows.iter_mut().filter(|r| r.streams == n) {
            r.ratio_to_direct = direct.filter(|d| *d > 0.0).map(|d| r.gbps / d);
        }
    }
    let relay_stats = tunnel.relay.stats().await?;
    let relay_separate_process = tunnel.relay.separate_process();
    if !relay_separate_process {
        notes.push("relay in-process: its CPU is part of the bench process's".into());
    }
    notes.push("CPU time is read from /proc with 10 ms resolution; the bench process holds the clients and the sink, and for postern also the inlet and the outlet (rathole's and bore's clients run in processes of their own, not counted)".into());
    drop(extra);
    tunnel.stop().await;
    // Let the sockets of the finished transfers go before the next scenario.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(BulkReport {
        options: opts.clone(),
        relay_separate_process,
        rows,
        relay_stats,
        notes,
    })
}

fn relay_cpu_now(pid: Option<u32>) -> f64 {
    pid.and_then(|p| proc_usage(&p.to_string()).ok())
        .map(|u| u.cpu_s)
        .unwrap_or(0.0)
}
