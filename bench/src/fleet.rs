//! `fleet`: N outlets x M inlets x K idle streams per (inlet, outlet) route on one relay. Each
//! node runs its own QUIC connections (one control connection to the relay, one end-to-end
//! connection per route). Reports the relay's memory per node, per route and per idle stream,
//! its CPU time, and errors.

use crate::cluster::{proc_usage, BenchRelay, RelayMode, RelayStats};
use crate::progress::progress;
use crate::target::echo_server;
use anyhow::{bail, Result};
use postern_inlet::ServiceKind;
use postern_outlet::target::Target;
use postern_tests::kit::{InletSpec, OutletSpec, Pki, Running};
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Serialize)]
pub struct FleetOptions {
    pub outlets: usize,
    pub inlets: usize,
    /// Idle streams held per route.
    pub streams: usize,
    /// Streams opened at a time.
    pub parallel: usize,
}

impl FleetOptions {
    pub fn standard() -> Self {
        Self {
            outlets: 10,
            inlets: 10,
            streams: 1,
            parallel: 32,
        }
    }

    pub fn quick() -> Self {
        Self {
            outlets: 3,
            inlets: 3,
            streams: 2,
            parallel: 16,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    pub options: FleetOptions,
    pub nodes: usize,
    pub routes: usize,
    pub streams: usize,
    pub relay_separate_process: bool,
    /// Relay RSS after start, after all nodes connected, after every route was used once,
    /// and with every stream open and idle (KiB).
    pub relay_rss_kib: [u64; 4],
    pub relay_kib_per_node: f64,
    pub relay_bytes_per_route: f64,
    pub relay_bytes_per_idle_stream: f64,
    /// The bench process (all nodes, clients and the echo target) per idle stream.
    pub bench_bytes_per_idle_stream: f64,
    pub relay_cpu_s: f64,
    pub setup_nodes_s: f64,
    pub setup_routes_s: f64,
    pub open_streams_s: f64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub relay_stats: RelayStats,
    pub notes: Vec<String>,
}

async fn ping(s: &mut TcpStream, tag: u64) -> Result<()> {
    s.write_all(&tag.to_le_bytes()).await?;
    let mut b = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b)).await??;
    if u64::from_le_bytes(b) != tag {
        bail!("wrong echo");
    }
    Ok(())
}

async fn open_and_ping(addr: SocketAddr, tag: u64) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    ping(&mut s, tag).await?;
    Ok(s)
}

/// Opens one stream per (address, tag), `parallel` at a time; keeps the ones that answered
/// when `keep` (else closes each after its ping, so that big fleets stay within the process's
/// file descriptor limit).
pub(crate) async fn open_many(
    targets: &[(SocketAddr, u64)],
    parallel: usize,
    keep: bool,
    errors: &mut Vec<String>,
) -> Vec<TcpStream> {
    let sem = Arc::new(Semaphore::new(parallel.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for &(addr, tag) in targets {
        let sem = sem.clone();
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await;
            open_and_ping(addr, tag).await.map(|s| keep.then_some(s))
        });
    }
    let mut out = Vec::with_capacity(targets.len());
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(s)) => out.extend(s),
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(e) => errors.push(format!("task: {e}")),
        }
    }
    out
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}

fn rss(relay: &BenchRelay) -> u64 {
    relay.usage().map(|u| u.rss_kib).unwrap_or(0)
}

pub async fn run(pki: &Pki, mode: &RelayMode, opts: &FleetOptions) -> Result<FleetReport> {
    let (echo, _task) = echo_server().await?;
    let mut relay = BenchRelay::start(pki, mode).await?;
    settle().await;
    let cpu0 = relay.usage()?.cpu_s;
    let rss0 = rss(&relay);
    let mut errors = Vec::new();
    // One step per outlet and inlet started, then the routes, then the idle streams.
    crate::progress::add_steps(opts.outlets + opts.inlets + 2);

    let t = Instant::now();
    let services: Vec<String> = (0..opts.outlets).map(|j| format!("fleet-{j}")).collect();
    let mut nodes: Vec<Running> = Vec::new();
    for (j, s) in services.iter().enumerate() {
        progress(&format!("fleet: outlet {}/{}", j + 1, opts.outlets));
        let outlet = OutletSpec::new(&format!("outlet-{j}"), relay.addr)
            .targets([(s.as_str(), Target::tcp(echo.to_string()))])?
            .start(pki)
            .await?;
        nodes.push(outlet.running);
    }
    let kinds: Vec<(&str, ServiceKind)> = services
        .iter()
        .map(|s| (s.as_str(), ServiceKind::Tcp))
        .collect();
    let mut inlet_addrs: Vec<HashMap<String, SocketAddr>> = Vec::new();
    for i in 0..opts.inlets {
        progress(&format!("fleet: inlet {}/{}", i + 1, opts.inlets));
        let inlet = InletSpec::new(&format!("inlet-{i}"), relay.addr, &kinds)
            .start(pki)
            .await?;
        nodes.push(inlet.running);
        inlet_addrs.push(inlet.addrs);
    }
    let setup_nodes_s = t.elapsed().as_secs_f64();
    settle().await;
    let rss1 = rss(&relay);

    // Every route once: sets up each (inlet, outlet) end-to-end connection.
    let mut route_targets = Vec::new();
    for addrs in &inlet_addrs {
        for s in &services {
            route_targets.push((addrs[s], route_targets.len() as u64));
        }
    }
    progress(&format!("fleet: {} routes", route_targets.len()));
    let t = Instant::now();
    let first = open_many(&route_targets, opts.parallel, false, &mut errors).await;
    let setup_routes_s = t.elapsed().as_secs_f64();
    drop(first);
    settle().await;
    let rss2 = rss(&relay);
    let bench2 = proc_usage("self")?.rss_kib;

    // K idle streams per route.
    let mut stream_targets = Vec::new();
    for _ in 0..opts.streams {
        for &(addr, _) in &route_targets {
            stream_targets.push((addr, 1_000_000 + stream_targets.len() as u64));
        }
    }
    progress(&format!("fleet: {} idle streams", stream_targets.len()));
    let t = Instant::now();
    let mut held = open_many(&stream_targets, opts.parallel, true, &mut errors).await;
    let open_streams_s = t.elapsed().as_secs_f64();
    settle().await;
    let rss3 = rss(&relay);
    let bench3 = proc_usage("self")?.rss_kib;

    // The held streams still work.
    for (k, s) in held.iter_mut().enumerate() {
        if let Err(e) = ping(s, 2_000_000 + k as u64).await {
            errors.push(format!("idle stream: {e}"));
        }
    }
    drop(held);
    let relay_stats = relay.stats().await?;
    let relay_cpu_s = relay.usage()?.cpu_s - cpu0;
    let relay_separate_process = relay.separate_process();
    let routes = route_targets.len();
    let streams = stream_targets.len();
    let node_count = opts.outlets + opts.inlets;
    let per = |a: u64, b: u64, n: usize| -> f64 {
        if n == 0 {
            0.0
        } else {
            (b as f64 - a as f64) * 1024.0 / n as f64
        }
    };
    let mut notes = vec![
        "RSS deltas come from VmRSS (4 KiB pages, allocator caching), so small per-item figures are noisy; grow the fleet for precision".to_string(),
        format!("each inlet listens for all {} services; each route is its own end-to-end QUIC connection through the relay", opts.outlets),
    ];
    if !relay_separate_process {
        notes.push(
            "relay in-process: its RSS and CPU include every node, client and the echo target"
                .into(),
        );
    }
    notes.push("bench process RSS holds both inlet and outlet ends, the client sockets and the echo target's tasks".into());
    if relay_stats.routes_refused > 0 {
        errors.push(format!("{} routes refused", relay_stats.routes_refused));
    }
    let mut stops = tokio::task::JoinSet::new();
    for n in nodes {
        stops.spawn(n.stop());
    }
    while stops.join_next().await.is_some() {}
    relay.stop().await;
    let n_err = errors.len() as u64;
    errors.truncate(5);
    Ok(FleetReport {
        options: opts.clone(),
        nodes: node_count,
        routes,
        streams,
        relay_separate_process,
        relay_rss_kib: [rss0, rss1, rss2, rss3],
        relay_kib_per_node: per(rss0, rss1, node_count) / 1024.0,
        relay_bytes_per_route: per(rss1, rss2, routes),
        relay_bytes_per_idle_stream: per(rss2, rss3, streams),
        bench_bytes_per_idle_stream: per(bench2, bench3, streams),
        relay_cpu_s,
        setup_nodes_s,
        setup_routes_s,
        open_streams_s,
        errors: n_err,
        error_samples: errors,
        relay_stats,
        notes,
    })
}
