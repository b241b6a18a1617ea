//! `open`: new connections per second through a warm tunnel, and how long each open takes
//! (connect, one byte to the echo target and back).

use crate::cluster::{RelayMode, Tunnel};
use crate::progress::progress;
use crate::stats::{nanos, Latency};
use crate::systems::{self, System};
use crate::target::echo_server;
use anyhow::{bail, Result};
use postern_tests::kit::Pki;
use serde::Serialize;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone, Serialize)]
pub struct OpenOptions {
    /// Opens per run.
    pub count: usize,
    /// Client concurrency levels (one run each).
    pub concurrency: Vec<usize>,
    pub baselines: bool,
}

impl OpenOptions {
    pub fn standard() -> Self {
        Self {
            count: 2000,
            concurrency: vec![1, 16],
            baselines: false,
        }
    }

    pub fn quick() -> Self {
        Self {
            count: 100,
            concurrency: vec![1, 8],
            baselines: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct OpenRow {
    pub system: String,
    pub concurrency: usize,
    pub opened: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub per_sec: f64,
    pub ratio_to_direct: Option<f64>,
    /// From connect() to the echoed byte.
    pub latency: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct OpenReport {
    pub options: OpenOptions,
    pub rows: Vec<OpenRow>,
    pub notes: Vec<String>,
}

async fn open_once(addr: SocketAddr) -> Result<u64> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(b"o").await?;
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b)).await??;
    if b != *b"o" {
        bail!("wrong echo");
    }
    Ok(nanos(t0.elapsed()))
}

async fn run_one(s: &System, count: usize, concurrency: usize) -> OpenRow {
    progress(&format!(
        "open: {} x{count}, {concurrency} at a time",
        s.name
    ));
    let c = concurrency.max(1);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..c {
        let n = count / c + usize::from(w < count % c);
        let addr = s.addr;
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(n);
            let mut errs = Vec::new();
            for _ in 0..n {
                match open_once(addr).await {
                    Ok(ns) => lat.push(ns),
                    Err(e) => errs.push(e.to_string()),
                }
            }
            (lat, errs)
        });
    }
    let mut lat = Vec::with_capacity(count);
    let mut errors = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok((l, e)) => {
                lat.extend(l);
                errors.extend(e);
            }
            Err(e) => errors.push(format!("task: {e}")),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let opened = lat.len() as u64;
    let n_err = errors.len() as u64;
    errors.truncate(5);
    OpenRow {
        system: s.name.clone(),
        concurrency: c,
        opened,
        errors: n_err,
        error_samples: errors,
        per_sec: opened as f64 / secs,
        ratio_to_direct: None,
        latency: Latency::from_ns(lat),
    }
}

pub async fn run(pki: &Pki, mode: &RelayMode, opts: &OpenOptions) -> Result<OpenReport> {
    let (echo, _task) = echo_server().await?;
    let tunnel = Tunnel::start(pki, mode, echo).await?;
    let mut notes = vec![
        "each open: TCP connect, 1 byte to the echo target and back, close; the tunnel is warmed first".to_string(),
    ];
    let mut systems = vec![
        System::plain("direct", echo),
        System::plain("postern", tunnel.addr).with_relay(tunnel.relay.pid()),
    ];
    let mut extra = systems::start_baselines(opts.baselines, echo, &mut notes).await;
    systems.extend(extra.iter_mut().map(|b| b.system()));
    for s in &systems {
        for _ in 0..20 {
            open_once(s.addr).await?;
        }
    }
    crate::progress::add_steps(opts.concurrency.len() * systems.len());
    let mut rows = Vec::new();
    for &c in &opts.concurrency {
        for s in &systems {
            rows.push(run_one(s, opts.count, c).await);
        }
        let direct = rows
            .iter()
            .find(|r| r.concurrency == c && r.system == "direct")
            .map(|r| r.per_sec);
        for r in rows.iter_mut().filter(|r| r.concurrency == c) {
            r.ratio_to_direct = direct.filter(|d| *d > 0.0).map(|d| r.per_sec / d);
        }
    }
    drop(extra);
    tunnel.stop().await;
    Ok(OpenReport {
        options: opts.clone(),
        rows,
        notes,
    })
}
