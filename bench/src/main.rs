//! postern-bench: see the library docs and `postern-bench --help`.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use postern_bench::cluster::RelayMode;
use postern_bench::{bulk, fleet, http, lossy, open, rr, Plan};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "postern-bench",
    about = "Benchmarks postern against direct TCP (and other tunnels)"
)]
struct Cli {
    /// Small sizes: every scenario in a few seconds (CI smoke runs). No timing is meaningful.
    #[arg(long, global = true)]
    quick: bool,
    /// Write every figure as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Where the relay runs: its own process (measured through /proc) or inside the bench.
    #[arg(long, global = true, value_enum, default_value_t = RelayArg::Process)]
    relay: RelayArg,
    /// Write PNG charts (throughput, latency CDF, fleet memory) into this directory.
    #[arg(long, global = true)]
    charts: Option<PathBuf>,
    /// Also run rathole and bore (if on PATH; see bench/install-baselines.sh).
    #[arg(long, global = true)]
    baselines: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum RelayArg {
    Process,
    Inproc,
}

#[derive(Subcommand)]
enum Cmd {
    /// Throughput of N concurrent streams to a verifying sink.
    Bulk(BulkArgs),
    /// Small request/response latency at a fixed offered rate (open loop).
    Rr(RrArgs),
    /// New connections per second through a warm tunnel, and open latency.
    Open(OpenArgs),
    /// InfluxDB writes through the inlet's HTTP filter with a leased token.
    Http(HttpArgs),
    /// N outlets x M inlets x K idle streams on one relay: memory, CPU, errors.
    Fleet(FleetArgs),
    /// Hostile traffic at the relay (garbage, random route ids, Initial flood) while a legit
    /// stream runs: throughput, reconnect time, relay CPU, RSS and log bytes.
    Attack(AttackArgs),
    /// Three relays sharing a three-member etcd cluster (real `postern-relay` and `etcd`
    /// processes; `cargo build --bins` first): per-relay memory and CPU, etcd keys and write
    /// rate, time to converge after a relay dies.
    FleetEtcd(FleetEtcdArgs),
    /// Throughput and request latency through a lossy, delayed path with an Internet MTU,
    /// for each congestion controller.
    Lossy(LossyArgs),
    /// The direct path in the NAT lab (network namespaces, both sides behind masquerade; needs
    /// root, `ip`, `nft` and `cargo build --bins`): one-stream bulk and request/response for
    /// plain TCP, postern relayed and postern direct, and the time from a new route to the
    /// direct path.
    Direct(DirectArgs),
    /// Every scenario with its default sizes.
    All,
    /// (internal) a client or server of the `direct` scenario inside a lab namespace.
    #[command(hide = true)]
    LabAgent {
        #[arg(long)]
        job: String,
    },
    /// (internal) a relay in its own process, driven over stdin.
    #[command(hide = true)]
    RelayChild {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Args)]
struct FleetEtcdArgs {
    #[arg(long)]
    outlets: Option<usize>,
    #[arg(long)]
    inlets: Option<usize>,
    /// Membership lease TTL of the relays, in seconds.
    #[arg(long)]
    lease_ttl: Option<u64>,
    /// Seconds of idle fleet over which etcd's write rate is measured.
    #[arg(long)]
    idle: Option<f64>,
}

#[derive(Args)]
struct DirectArgs {
    /// Seconds of one-stream bulk per system.
    #[arg(long)]
    bulk_secs: Option<f64>,
    /// Requests per second offered in rr.
    #[arg(long)]
    rate: Option<u64>,
    /// Seconds of rr per system.
    #[arg(long)]
    rr_secs: Option<f64>,
    /// New routes timed to the direct path.
    #[arg(long)]
    connections: Option<usize>,
}

#[derive(Args)]
struct AttackArgs {
    /// Seconds each attack runs.
    #[arg(long)]
    secs: Option<f64>,
    /// Datagrams per second of the garbage and random-route attacks.
    #[arg(long)]
    junk_rate: Option<f64>,
    /// Initials per second of the handshake flood.
    #[arg(long)]
    initial_rate: Option<f64>,
    /// Source ports the attacks send from.
    #[arg(long)]
    sockets: Option<usize>,
}

#[derive(Args)]
struct BulkArgs {
    /// Concurrent stream counts, comma-separated.
    #[arg(long, value_delimiter = ',')]
    streams: Option<Vec<usize>>,
    /// MiB sent per run in total, split across the streams.
    #[arg(long)]
    total_mib: Option<u64>,
    /// Minimum KiB per stream.
    #[arg(long)]
    min_stream_kib: Option<u64>,
    /// Runs per cell (the median is reported).
    #[arg(long)]
    repeat: Option<usize>,
    /// KiB per client write.
    #[arg(long)]
    write_kib: Option<usize>,
    /// Seconds a run may take before its unfinished streams count as errors.
    #[arg(long)]
    run_timeout: Option<u64>,
}

#[derive(Args)]
struct LossyArgs {
    /// Loss rates in percent (each direction), comma-separated.
    #[arg(long, value_delimiter = ',')]
    loss: Option<Vec<f64>>,
    /// One-way delay in milliseconds.
    #[arg(long)]
    delay_ms: Option<u64>,
    /// Congestion controllers to compare, comma-separated.
    #[arg(long, value_delimiter = ',', value_enum)]
    congestion: Option<Vec<postern_net::transport::endpoint::Congestion>>,
    /// Seconds counted per cell.
    #[arg(long)]
    secs: Option<f64>,
    /// Seconds of warm-up per cell.
    #[arg(long)]
    warmup: Option<f64>,
}

#[derive(Args)]
struct RrArgs {
    /// Requests per second offered.
    #[arg(long)]
    rate: Option<u64>,
    /// Seconds of sending per system.
    #[arg(long)]
    secs: Option<f64>,
    /// Bytes per message (at least 8).
    #[arg(long)]
    size: Option<usize>,
}

#[derive(Args)]
struct OpenArgs {
    /// Opens per run.
    #[arg(long)]
    count: Option<usize>,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',')]
    concurrency: Option<Vec<usize>>,
}

#[derive(Args)]
struct HttpArgs {
    /// Requests per system.
    #[arg(long)]
    requests: Option<usize>,
    /// Keep-alive connections.
    #[arg(long)]
    connections: Option<usize>,
    /// Line-protocol lines per request.
    #[arg(long)]
    lines: Option<usize>,
}

#[derive(Args)]
struct FleetArgs {
    /// Outlets; a comma-separated list runs one fleet per value (for the memory chart).
    #[arg(long, value_delimiter = ',')]
    outlets: Option<Vec<usize>>,
    #[arg(long)]
    inlets: Option<usize>,
    /// Idle streams per (inlet, outlet) route.
    #[arg(long)]
    streams: Option<usize>,
    /// Streams opened at a time.
    #[arg(long)]
    parallel: Option<usize>,
}

fn pick<T>(quick: bool, q: impl FnOnce() -> T, s: impl FnOnce() -> T) -> T {
    if quick {
        q()
    } else {
        s()
    }
}

fn plan(cli: &Cli) -> Plan {
    let q = cli.quick;
    match &cli.cmd {
        Cmd::Bulk(a) => {
            let mut o = pick(q, bulk::BulkOptions::quick, bulk::BulkOptions::standard);
            if let Some(v) = &a.streams {
                o.streams = v.clone();
            }
            if let Some(v) = a.total_mib {
                o.total_bytes = v << 20;
            }
            if let Some(v) = a.min_stream_kib {
                o.min_stream_bytes = v << 10;
            }
            if let Some(v) = a.repeat {
                o.repeat = v.max(1);
            }
            if let Some(v) = a.write_kib {
                o.write_size = (v << 10).max(1);
            }
            if let Some(v) = a.run_timeout {
                o.run_timeout_s = v.max(1);
            }
            o.baselines = cli.baselines;
            Plan {
                bulk: Some(o),
                ..Plan::default()
            }
        }
        Cmd::Rr(a) => {
            let mut o = pick(q, rr::RrOptions::quick, rr::RrOptions::standard);
            if let Some(v) = a.rate {
                o.rate = v;
            }
            if let Some(v) = a.secs {
                o.secs = v;
            }
            if let Some(v) = a.size {
                o.size = v.max(8);
            }
            o.baselines = cli.baselines;
            Plan {
                rr: Some(o),
                ..Plan::default()
            }
        }
        Cmd::Open(a) => {
            let mut o = pick(q, open::OpenOptions::quick, open::OpenOptions::standard);
            if let Some(v) = a.count {
                o.count = v;
            }
            if let Some(v) = &a.concurrency {
                o.concurrency = v.clone();
            }
            o.baselines = cli.baselines;
            Plan {
                open: Some(o),
                ..Plan::default()
            }
        }
        Cmd::Http(a) => {
            let mut o = pick(q, http::HttpOptions::quick, http::HttpOptions::standard);
            if let Some(v) = a.requests {
                o.requests = v;
            }
            if let Some(v) = a.connections {
                o.connections = v;
            }
            if let Some(v) = a.lines {
                o.lines = v;
            }
            Plan {
                http: Some(o),
                ..Plan::default()
            }
        }
        Cmd::Fleet(a) => {
            let mut o = pick(q, fleet::FleetOptions::quick, fleet::FleetOptions::standard);
            if let Some(v) = a.inlets {
                o.inlets = v;
            }
            if let Some(v) = a.streams {
                o.streams = v;
            }
            if let Some(v) = a.parallel {
                o.parallel = v;
            }
            let sizes = a.outlets.clone().unwrap_or_else(|| vec![o.outlets]);
            Plan {
                fleet: sizes
                    .into_iter()
                    .map(|outlets| fleet::FleetOptions {
                        outlets,
                        ..o.clone()
                    })
                    .collect(),
                ..Plan::default()
            }
        }
        Cmd::Lossy(a) => {
            let mut o = pick(q, lossy::LossyOptions::quick, lossy::LossyOptions::standard);
            if let Some(v) = &a.loss {
                o.loss_pct = v.clone();
            }
            if let Some(v) = a.delay_ms {
                o.delay_ms = v;
            }
            if let Some(v) = &a.congestion {
                o.congestion = v.clone();
            }
            if let Some(v) = a.secs {
                o.secs = v.max(0.1);
            }
            if let Some(v) = a.warmup {
                o.warmup_s = v.max(0.0);
            }
            Plan {
                lossy: Some(o),
                ..Plan::default()
            }
        }
        Cmd::All => Plan::all(q, cli.baselines),
        Cmd::Attack(_) | Cmd::FleetEtcd(_) | Cmd::Direct(_) | Cmd::LabAgent { .. } => {
            Plan::default()
        }
        Cmd::RelayChild { .. } => Plan::default(),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Cmd::RelayChild { dir } = &cli.cmd {
        return postern_bench::cluster::relay_child(dir).await;
    }
    if let Cmd::LabAgent { job } = &cli.cmd {
        return postern_bench::direct::agent(job).await;
    }
    let mode = match cli.relay {
        RelayArg::Process => RelayMode::Child(std::env::current_exe().context("own executable")?),
        RelayArg::Inproc => RelayMode::InProcess,
    };
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    if let Cmd::FleetEtcd(a) = &cli.cmd {
        let mut o = if cli.quick {
            postern_bench::fleet_etcd::FleetEtcdOptions::quick()
        } else {
            postern_bench::fleet_etcd::FleetEtcdOptions::standard()
        };
        o.outlets = a.outlets.unwrap_or(o.outlets);
        o.inlets = a.inlets.unwrap_or(o.inlets);
        o.lease_ttl_s = a.lease_ttl.unwrap_or(o.lease_ttl_s).max(1);
        o.idle_s = a.idle.unwrap_or(o.idle_s).max(1.0);
        let report = postern_bench::fleet_etcd::run(&o).await?;
        postern_bench::progress::finish_progress();
        let m = postern_bench::report::Machine::probe();
        println!(
            "machine: {} CPUs, {}, kernel {}\ncommand: {command}\n\n{}",
            m.cpus,
            m.cpu_model,
            m.kernel,
            report.table()
        );
        if let Some(path) = &cli.json {
            std::fs::write(path, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("write {}", path.display()))?;
        }
        if report.errors > 0 {
            anyhow::bail!("{} errors (see the table)", report.errors);
        }
        return Ok(());
    }
    if let Cmd::Direct(a) = &cli.cmd {
        let mut o = if cli.quick {
            postern_bench::direct::DirectOptions::quick()
        } else {
            postern_bench::direct::DirectOptions::standard()
        };
        if let Some(v) = a.bulk_secs {
            o.bulk_secs = v.max(0.1);
        }
        if let Some(v) = a.rate {
            o.rr.rate = v.max(1);
        }
        if let Some(v) = a.rr_secs {
            o.rr.secs = v.max(0.1);
        }
        if let Some(v) = a.connections {
            o.connections = v;
        }
        let report = postern_bench::direct::run(&o).await?;
        postern_bench::progress::finish_progress();
        let m = postern_bench::report::Machine::probe();
        println!(
            "machine: {} CPUs, {}, kernel {}\ncommand: {command}\n\n{}",
            m.cpus,
            m.cpu_model,
            m.kernel,
            report.table()
        );
        if let Some(path) = &cli.json {
            std::fs::write(path, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("write {}", path.display()))?;
        }
        if report.errors() > 0 {
            anyhow::bail!("{} errors (see the table)", report.errors());
        }
        return Ok(());
    }
    if let Cmd::Attack(a) = &cli.cmd {
        let mut o = if cli.quick {
            postern_bench::attack::AttackOptions::quick()
        } else {
            postern_bench::attack::AttackOptions::standard()
        };
        if let Some(v) = a.secs {
            o.secs = v.max(1.0);
        }
        if let Some(v) = a.junk_rate {
            o.junk_rate = v.max(1.0);
        }
        if let Some(v) = a.initial_rate {
            o.initial_rate = v.max(1.0);
        }
        if let Some(v) = a.sockets {
            o.sockets = v.max(1);
        }
        let pki = postern_bench::cluster::bench_pki()?;
        let report = postern_bench::attack::run(&pki, &mode, &o).await?;
        let m = postern_bench::report::Machine::probe();
        println!(
            "machine: {} CPUs, {}, kernel {}\ncommand: {command}\n\n{}",
            m.cpus,
            m.cpu_model,
            m.kernel,
            report.table()
        );
        if let Some(path) = &cli.json {
            std::fs::write(path, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("write {}", path.display()))?;
        }
        return Ok(());
    }
    let report = postern_bench::run(&plan(&cli), &mode, cli.quick, &command).await?;
    postern_bench::progress::finish_progress();
    println!("{}", report.tables());
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("write {}", path.display()))?;
        eprintln!("figures written to {}", path.display());
    }
    if let Some(dir) = &cli.charts {
        match postern_bench::charts::write(&report, dir) {
            Ok(files) => {
                for f in files {
                    eprintln!("chart written to {}", f.display());
                }
            }
            Err(e) => eprintln!("charts skipped: {e:#}"),
        }
    }
    let errors = report.errors();
    if errors > 0 {
        anyhow::bail!("{errors} errors (see the tables and the JSON)");
    }
    Ok(())
}
