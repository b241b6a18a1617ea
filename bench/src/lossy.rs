//! `lossy`: throughput and request latency through a lossy, delayed path with an Internet MTU,
//! for each congestion controller. The inlet reaches the relay through the test kit's
//! impairment proxy (this kernel has no netem); the outlet sits beside the relay. Each cell
//! starts fresh nodes (a fresh congestion controller and path MTU search), writes one bulk
//! stream for its seconds while a second connection sends small echo requests at a steady
//! rate, and counts what reached the sink after a warm-up.

use crate::progress::progress;
use crate::stats::{nanos, Latency};
use anyhow::Result;
use postern_net::transport::endpoint::Congestion;
use postern_tests::impair::{Impairment, INTERNET_MTU};
use postern_tests::kit::Pki;
use postern_tests::lossy::{echo_once, write_until, CountingSink, LossyPath};
use serde::Serialize;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

#[derive(Debug, Clone, Serialize)]
pub struct LossyOptions {
    /// Loss rates in percent, each direction.
    pub loss_pct: Vec<f64>,
    /// One-way delay, each direction.
    pub delay_ms: u64,
    /// Largest UDP payload the path carries.
    pub mtu: usize,
    /// Controllers to compare.
    pub congestion: Vec<Congestion>,
    /// Seconds of bulk before counting starts (slow start, path MTU search).
    pub warmup_s: f64,
    /// Seconds counted.
    pub secs: f64,
    /// Echo requests per second during the bulk.
    pub rr_rate: u64,
    /// Bytes per echo request.
    pub rr_size: usize,
    /// Seed of the proxy's randomness (the same for every cell).
    pub seed: u64,
}

impl LossyOptions {
    pub fn standard() -> Self {
        Self {
            loss_pct: vec![0.0, 1.0, 2.0, 5.0],
            delay_ms: 20,
            mtu: INTERNET_MTU,
            congestion: Congestion::ALL.to_vec(),
            warmup_s: 2.0,
            secs: 5.0,
            rr_rate: 20,
            rr_size: 64,
            seed: 19,
        }
    }

    pub fn quick() -> Self {
        Self {
            loss_pct: vec![2.0],
            congestion: vec![Congestion::Bbr, Congestion::Cubic],
            warmup_s: 0.5,
            secs: 1.0,
            ..Self::standard()
        }
    }
}

/// One (controller, loss) cell.
#[derive(Debug, Clone, Serialize)]
pub struct LossyRow {
    pub congestion: String,
    pub loss_pct: f64,
    /// Bytes the sink received per second after the warm-up.
    pub mbyte_s: f64,
    /// Latency of the echo requests sent after the warm-up.
    pub latency: Latency,
    /// Echo requests that got no answer within 10 s, or failed.
    pub errors: u64,
    pub error_samples: Vec<String>,
    /// Datagrams the proxy dropped for being over the MTU after the warm-up (path MTU
    /// discovery probing again), and during the warm-up.
    pub oversize_after_warmup: u64,
    pub oversize_in_warmup: u64,
    /// Datagrams the proxy dropped at random, both directions, after the warm-up.
    pub lost: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LossyReport {
    pub options: LossyOptions,
    pub rows: Vec<LossyRow>,
    pub notes: Vec<String>,
}

pub async fn run(pki: &Pki, opts: &LossyOptions) -> Result<LossyReport> {
    let sink = CountingSink::start().await?;
    let (echo, _echo_task) = crate::target::echo_server().await?;
    let mut rows = Vec::new();
    let cells = opts.congestion.len() * opts.loss_pct.len();
    for (i, &cc) in opts.congestion.iter().enumerate() {
        for (j, &loss) in opts.loss_pct.iter().enumerate() {
            progress(&format!(
                "lossy {cc} {loss}% ({}/{cells})",
                i * opts.loss_pct.len() + j + 1
            ));
            rows.push(cell(pki, opts, cc, loss, &sink, echo).await?);
        }
    }
    Ok(LossyReport {
        options: opts.clone(),
        rows,
        notes: vec![format!(
            "the inlet reaches the relay through the test kit's impairment proxy: {} ms each way, the loss rate each way, datagrams over {} bytes dropped; the outlet sits beside the relay. One bulk stream inlet -> outlet plus {} echo requests/s of {} bytes on a second connection; {} s counted after {} s of warm-up, fresh nodes per cell",
            opts.delay_ms, opts.mtu, opts.rr_rate, opts.rr_size, opts.secs, opts.warmup_s
        )],
    })
}

async fn cell(
    pki: &Pki,
    opts: &LossyOptions,
    cc: Congestion,
    loss_pct: f64,
    sink: &CountingSink,
    echo: std::net::SocketAddr,
) -> Result<LossyRow> {
    let impairment = Impairment {
        mtu: Some(opts.mtu),
        ..Impairment::lossy(loss_pct / 100.0, Duration::from_millis(opts.delay_ms))
    };
    let path = LossyPath::start(
        pki,
        cc,
        impairment,
        opts.seed,
        &[("sink", sink.addr), ("echo", echo)],
    )
    .await?;
    let mut errors = Vec::new();
    // The end-to-end connection comes up on the first request.
    let mut rr = TcpStream::connect(path.inlet.addr("echo")).await?;
    let _ = rr.set_nodelay(true);
    echo_once(&mut rr, opts.rr_size, Duration::from_secs(20)).await?;
    let start = Instant::now();
    let warm_end = start + Duration::from_secs_f64(opts.warmup_s);
    let end = warm_end + Duration::from_secs_f64(opts.secs);
    let bulk = tokio::spawn(write_until(path.inlet.addr("sink"), end));
    let interval = Duration::from_secs_f64(1.0 / opts.rr_rate.max(1) as f64);
    let mut lat = Vec::new();
    let mut warm = None;
    let mut next = Instant::now();
    while Instant::now() < end {
        if warm.is_none() && Instant::now() >= warm_end {
            warm = Some((sink.bytes(), path.proxy.counters(), Instant::now()));
        }
        match echo_once(&mut rr, opts.rr_size, Duration::from_secs(10)).await {
            Ok(d) if warm.is_some() => lat.push(nanos(d)),
            Ok(_) => {}
            Err(e) => {
                errors.push(e.to_string());
                break;
            }
        }
        next += interval;
        tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
    }
    let (bytes0, counters0, t0) =
        warm.unwrap_or((sink.bytes(), path.proxy.counters(), Instant::now()));
    let (bytes1, counters1, t1) = (sink.bytes(), path.proxy.counters(), Instant::now());
    match bulk.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => errors.push(format!("bulk: {e}")),
        Err(e) => errors.push(format!("bulk task: {e}")),
    }
    if std::env::var_os("LOSSY_DEBUG").is_some() {
        for (t, d, n) in path.proxy.oversize_log() {
            eprintln!("{:8.3} {d:?} {n}", (t - start).as_secs_f64());
        }
    }
    path.stop().await;
    let secs = (t1 - t0).as_secs_f64().max(1e-3);
    let lost = |c: &postern_tests::impair::Counters| c.up.lost + c.down.lost;
    Ok(LossyRow {
        congestion: cc.to_string(),
        loss_pct,
        mbyte_s: (bytes1 - bytes0) as f64 / secs / 1e6,
        latency: Latency::from_ns(lat),
        errors: errors.len() as u64,
        error_samples: errors.into_iter().take(3).collect(),
        oversize_after_warmup: counters1.oversize() - counters0.oversize(),
        oversize_in_warmup: counters0.oversize(),
        lost: lost(&counters1) - lost(&counters0),
    })
}
