//! `rr`: small request/response latency at a fixed offered rate. The sender follows its
//! schedule whatever the replies do (open loop), so a slow reply cannot hide the ones queued
//! behind it.

use crate::cluster::{RelayMode, Tunnel};
use crate::progress::progress;
use crate::stats::{nanos, Latency};
use crate::systems::{self, System};
use crate::target::echo_server;
use anyhow::{anyhow, bail, Result};
use postern_tests::kit::Pki;
use serde::Serialize;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Serialize)]
pub struct RrOptions {
    /// Requests per second offered.
    pub rate: u64,
    /// How long to send for.
    pub secs: f64,
    /// Bytes per request (and per echoed response); at least 8.
    pub size: usize,
    /// Leading samples left out of the figures.
    pub warmup: usize,
    pub baselines: bool,
}

impl RrOptions {
    pub fn standard() -> Self {
        Self {
            rate: 1000,
            secs: 5.0,
            size: 64,
            warmup: 100,
            baselines: false,
        }
    }

    pub fn quick() -> Self {
        Self {
            secs: 0.5,
            warmup: 20,
            ..Self::standard()
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RrRow {
    pub system: String,
    pub sent: u64,
    pub received: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    /// Offered and achieved request rates.
    pub offered_rate: f64,
    pub achieved_rate: f64,
    pub latency: Latency,
    /// p50/p99/p99.9 minus direct TCP's.
    pub added_p50_us: Option<f64>,
    pub added_p99_us: Option<f64>,
    pub added_p999_us: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RrReport {
    pub options: RrOptions,
    pub rows: Vec<RrRow>,
    pub notes: Vec<String>,
}

pub(crate) struct RrRun {
    pub(crate) sent: u64,
    pub(crate) lat_ns: Vec<u64>,
    pub(crate) errors: Vec<String>,
    pub(crate) secs: f64,
}

/// One open-loop run on one connection, with blocking sockets on two threads so the schedule
/// does not depend on the async runtime that hosts the tunnel.
fn run_blocking(addr: SocketAddr, opts: &RrOptions) -> Result<RrRun> {
    run_on(std::net::TcpStream::connect(addr)?, opts)
}

/// [`run_blocking`] on a connection already made (the `direct` scenario's clients announce
/// what they want first).
pub(crate) fn run_on(mut tx: std::net::TcpStream, opts: &RrOptions) -> Result<RrRun> {
    let size = opts.size.max(8);
    let n = ((opts.rate as f64 * opts.secs) as usize).max(1) + opts.warmup;
    let period = Duration::from_secs_f64(1.0 / opts.rate.max(1) as f64);
    tx.set_nodelay(true)?;
    let mut rx = tx.try_clone()?;
    rx.set_read_timeout(Some(Duration::from_secs(5)))?;
    let sent_at: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
    let base = Instant::now();
    let (sent, recv) = std::thread::scope(|scope| {
        let sent_at = &sent_at;
        let sender = scope.spawn(move || -> (u64, Option<String>) {
            let mut msg = vec![0xA5u8; size];
            for (i, slot) in sent_at.iter().enumerate() {
                let due = base + period * i as u32;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                msg[..8].copy_from_slice(&(i as u64).to_le_bytes());
                slot.store(nanos(base.elapsed()).max(1), Ordering::Release);
                if let Err(e) = tx.write_all(&msg) {
                    return (i as u64, Some(format!("write: {e}")));
                }
            }
            (n as u64, None)
        });
        let mut lat = Vec::with_capacity(n);
        let mut err = None;
        let mut buf = vec![0u8; size];
        for (i, slot) in sent_at.iter().enumerate() {
            if let Err(e) = rx.read_exact(&mut buf) {
                err = Some(format!("read reply {i}: {e}"));
                break;
            }
            let now = nanos(base.elapsed());
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&buf[..8]);
            let seq = u64::from_le_bytes(seq) as usize;
            if seq != i {
                err = Some(format!("reply {i} carries sequence number {seq}"));
                break;
            }
            let at = slot.load(Ordering::Acquire);
            if i >= opts.warmup {
                lat.push(now.saturating_sub(at));
            }
        }
        let (sent, send_err) = sender
            .join()
            .unwrap_or((0, Some("sender thread panicked".into())));
        (sent, (lat, err, send_err))
    });
    let (lat_ns, err, send_err) = recv;
    let errors = err.into_iter().chain(send_err).collect();
    Ok(RrRun {
        sent,
        lat_ns,
        errors,
        secs: base.elapsed().as_secs_f64(),
    })
}

async fn run_one(s: &System, opts: &RrOptions) -> Result<RrRow> {
    progress(&format!(
        "rr: {} at {} req/s for {} s",
        s.name, opts.rate, opts.secs
    ));
    let addr = s.addr;
    let o = opts.clone();
    let r = tokio::task::spawn_blocking(move || run_blocking(addr, &o))
        .await
        .map_err(|e| anyhow!("rr thread: {e}"))??;
    let received = r.lat_ns.len() as u64 + opts.warmup.min(r.sent as usize) as u64;
    Ok(RrRow {
        system: s.name.clone(),
        sent: r.sent,
        received,
        errors: r.errors.len() as u64,
        error_samples: r.errors,
        offered_rate: opts.rate as f64,
        achieved_rate: r.sent as f64 / r.secs,
        latency: Latency::from_ns(r.lat_ns),
        added_p50_us: None,
        added_p99_us: None,
        added_p999_us: None,
    })
}

pub async fn run(pki: &Pki, mode: &RelayMode, opts: &RrOptions) -> Result<RrReport> {
    if opts.rate == 0 {
        bail!("rate must be positive");
    }
    let (echo, _task) = echo_server().await?;
    let mut tunnel = Tunnel::start(pki, mode, echo).await?;
    let tcp_addr = tunnel.add_tcp(pki, echo).await?;
    let mut notes = vec![
        "latency is from the write of a request to the read of its echo, one TCP connection, sends on a fixed schedule".to_string(),
    ];
    let mut systems = vec![
        System::plain("direct", echo),
        System::plain("postern", tunnel.addr).with_relay(tunnel.relay.pid()),
        System::plain("postern-fallback", tcp_addr).with_relay(tunnel.relay.pid()),
    ];
    let mut extra = systems::start_baselines(opts.baselines, echo, &mut notes).await;
    systems.extend(extra.iter_mut().map(|b| b.system()));
    crate::progress::add_steps(systems.len());
    let mut rows = Vec::new();
    for s in &systems {
        rows.push(run_one(s, opts).await?);
    }
    if let Some(d) = rows.iter().find(|r| r.system == "direct").cloned() {
        for r in rows.iter_mut() {
            r.added_p50_us = Some(r.latency.p50_us - d.latency.p50_us);
            r.added_p99_us = Some(r.latency.p99_us - d.latency.p99_us);
            r.added_p999_us = Some(r.latency.p999_us - d.latency.p999_us);
        }
    }
    drop(extra);
    tunnel.stop().await;
    Ok(RrReport {
        options: opts.clone(),
        rows,
        notes,
    })
}
