//! `direct`: the direct path in the NAT lab (tests/lab/natlab.sh: network namespaces, both
//! private networks behind routers doing plain masquerade with nftables). Real
//! `postern-relay`, `postern-outlet` and `postern-inlet` processes run in the lab as the
//! direct-path tests run them (tests/src/natlab.rs); the clients and the target server are
//! this binary again, started inside the inlet's and the outlet's namespaces (`lab-agent`),
//! since a process's sockets live in the namespace it was started in.
//!
//! Three systems, one stream each: plain TCP from the inlet's namespace to the outlet's
//! (through router A's masquerade and a port-forward on router B: the hops the direct UDP path
//! takes), postern with `direct = "never"` (relayed), and postern with `direct = "auto"` once
//! the route has gone direct. Then the time from a new route's first client connection to
//! the inlet's move to the direct path, over fresh inlets (each restart makes a new route).

use crate::progress::{add_steps, progress};
use crate::rr::{run_on, RrOptions};
use crate::stats::{nanos, Latency};
use crate::target::{payload, Checksum, SINK_REPLY};
use anyhow::{anyhow, bail, Context, Result};
use postern_tests::natlab::{
    sample_value, Lab, LabTunnel, ECHO_PORT, LISTEN_PORT, OPS_PORT, ROUTER_B_IP,
};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Child;

const MIB: f64 = 1024.0 * 1024.0;
/// First byte of a connection to the lab's target server: what the connection is for.
const SINK: u8 = b'S';
const ECHO: u8 = b'E';
const MOVES_DIRECT: &str = "postern_inlet_path_moves_total{to=\"direct\"}";
const MOVES_RELAYED: &str = "postern_inlet_path_moves_total{to=\"relayed\"}";
const ROUTES_DIRECT: &str = "postern_inlet_routes_by_path{path=\"direct\"}";
const FORWARDED: &str = "postern_relay_forwarded_bytes_total";

#[derive(Debug, Clone, Serialize)]
pub struct DirectOptions {
    /// Seconds of one-stream bulk per system.
    pub bulk_secs: f64,
    /// KiB per bulk write.
    pub write_size: usize,
    /// Request/response at a fixed rate, per system.
    pub rr: RrOptions,
    /// New routes timed from first client connection to the direct path.
    pub connections: usize,
}

impl DirectOptions {
    pub fn standard() -> Self {
        Self {
            bulk_secs: 5.0,
            write_size: 64 << 10,
            rr: RrOptions::standard(),
            connections: 100,
        }
    }

    pub fn quick() -> Self {
        Self {
            bulk_secs: 1.0,
            rr: RrOptions::quick(),
            connections: 3,
            ..Self::standard()
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DirectRow {
    pub system: String,
    pub bulk_gbps: f64,
    pub bulk_bytes: u64,
    pub bulk_error: Option<String>,
    /// Bytes the relay forwarded while this system's bulk run went on (none for plain TCP).
    pub relay_forwarded_mib: Option<f64>,
    pub rr: Latency,
    pub rr_sent: u64,
    pub rr_errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SetupTimes {
    pub connections: usize,
    pub went_direct: usize,
    /// From the client's connect to its first echo (route set-up through the relay), ms.
    pub first_echo_ms: Latency,
    /// From the client's connect to the inlet's `path_moves_total{to="direct"}`, ms.
    pub to_direct_ms: Latency,
    pub failures: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DirectReport {
    pub options: DirectOptions,
    pub rows: Vec<DirectRow>,
    pub setup: SetupTimes,
    pub notes: Vec<String>,
}

impl DirectReport {
    pub fn table(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "### direct (NAT lab, both sides behind plain masquerade; one stream, bulk {} s, rr {} req/s of {} B for {} s)\n",
            self.options.bulk_secs, self.options.rr.rate, self.options.rr.size, self.options.rr.secs
        );
        let _ = writeln!(
            o,
            "| system | bulk Gbit/s | relay forwarded during bulk, MiB | rr p50 µs | rr p90 µs | rr p99 µs | rr p99.9 µs | errors |"
        );
        let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|---:|");
        for r in &self.rows {
            let errors = r.rr_errors.len() + usize::from(r.bulk_error.is_some());
            let _ = writeln!(
                o,
                "| {} | {:.2} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
                r.system,
                r.bulk_gbps,
                r.relay_forwarded_mib
                    .map_or("-".into(), |m| format!("{m:.1}")),
                r.rr.p50_us,
                r.rr.p90_us,
                r.rr.p99_us,
                r.rr.p999_us,
                errors
            );
        }
        let s = &self.setup;
        let _ = writeln!(
            o,
            "\n| new routes | went direct | first echo p50 / p99 ms | to direct p50 / p90 / p99 / max ms |"
        );
        let _ = writeln!(o, "|---:|---:|---|---|");
        let _ = writeln!(
            o,
            "| {} | {} | {:.1} / {:.1} | {:.0} / {:.0} / {:.0} / {:.0} |",
            s.connections,
            s.went_direct,
            s.first_echo_ms.p50_us,
            s.first_echo_ms.p99_us,
            s.to_direct_ms.p50_us,
            s.to_direct_ms.p90_us,
            s.to_direct_ms.p99_us,
            s.to_direct_ms.max_us,
        );
        for f in s.failures.iter().take(5) {
            let _ = writeln!(o, "\nset-up failure: {f}");
        }
        for n in &self.notes {
            let _ = writeln!(o, "\n- {n}");
        }
        o
    }

    pub fn errors(&self) -> usize {
        self.rows
            .iter()
            .map(|r| r.rr_errors.len() + usize::from(r.bulk_error.is_some()))
            .sum::<usize>()
            + self.setup.failures.len()
    }
}

/// What a `lab-agent` process does (passed as JSON; it prints one JSON [`AgentOut`] line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Job {
    /// The target server: echo or sink, by the connection's first byte. Prints "ready".
    Serve { listen: SocketAddr },
    /// One stream of `secs` seconds to the sink.
    Bulk {
        addr: SocketAddr,
        secs: f64,
        write_size: usize,
    },
    /// Open-loop request/response on one connection.
    Rr {
        addr: SocketAddr,
        rate: u64,
        secs: f64,
        size: usize,
        warmup: usize,
    },
    /// Connects (a new route), waits for the first echo, then polls the inlet's metrics
    /// (`metrics`, every 2 ms) until the route has moved to the direct path.
    Setup {
        addr: SocketAddr,
        metrics: SocketAddr,
        timeout_s: f64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentOut {
    Bulk {
        bytes: u64,
        secs: f64,
        error: Option<String>,
    },
    Rr {
        sent: u64,
        lat_ns: Vec<u64>,
        errors: Vec<String>,
    },
    Setup {
        first_echo_ns: u64,
        direct_ns: Option<u64>,
        error: Option<String>,
    },
}

/// Runs one `lab-agent` job (inside a lab namespace).
pub async fn agent(job: &str) -> Result<()> {
    let job: Job = serde_json::from_str(job).context("lab-agent job")?;
    let out = match job {
        Job::Serve { listen } => return serve(listen).await,
        Job::Bulk {
            addr,
            secs,
            write_size,
        } => bulk_client(addr, secs, write_size).await,
        Job::Rr {
            addr,
            rate,
            secs,
            size,
            warmup,
        } => {
            let opts = RrOptions {
                rate,
                secs,
                size,
                warmup,
                baselines: false,
            };
            tokio::task::spawn_blocking(move || -> Result<AgentOut> {
                use std::io::Write as _;
                let mut s = std::net::TcpStream::connect(addr)?;
                s.write_all(&[ECHO])?;
                let r = run_on(s, &opts)?;
                Ok(AgentOut::Rr {
                    sent: r.sent,
                    lat_ns: r.lat_ns,
                    errors: r.errors,
                })
            })
            .await
            .map_err(|e| anyhow!("rr thread: {e}"))??
        }
        Job::Setup {
            addr,
            metrics,
            timeout_s,
        } => setup_client(addr, metrics, Duration::from_secs_f64(timeout_s)).await,
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

async fn serve(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    println!("ready");
    loop {
        let (mut s, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut kind = [0u8; 1];
            if s.read_exact(&mut kind).await.is_err() {
                return;
            }
            if kind[0] == ECHO {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
                return;
            }
            let mut sum = Checksum::default();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => sum.update(&buf[..n]),
                    Err(_) => return,
                }
            }
            let mut reply = [0u8; SINK_REPLY];
            reply[..8].copy_from_slice(&sum.len().to_le_bytes());
            reply[8..].copy_from_slice(&sum.finish().to_le_bytes());
            let _ = s.write_all(&reply).await;
            let _ = s.shutdown().await;
        });
    }
}

async fn bulk_client(addr: SocketAddr, secs: f64, write_size: usize) -> AgentOut {
    let start = Instant::now();
    let mut sent = 0u64;
    let r: Result<()> = async {
        let data = payload(4 << 20);
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(&[SINK]).await?;
        let mut sum = Checksum::default();
        let until = start + Duration::from_secs_f64(secs);
        let mut pos = 0;
        while Instant::now() < until {
            let n = write_size.min(data.len() - pos);
            let chunk = &data[pos..pos + n];
            sum.update(chunk);
            s.write_all(chunk).await?;
            sent += n as u64;
            pos = (pos + n) % data.len();
        }
        s.shutdown().await?;
        let mut reply = [0u8; SINK_REPLY];
        s.read_exact(&mut reply).await?;
        let mut count = [0u8; 8];
        count.copy_from_slice(&reply[..8]);
        let mut check = [0u8; 8];
        check.copy_from_slice(&reply[8..]);
        if u64::from_le_bytes(count) != sent {
            bail!(
                "sink received {} bytes, {sent} were sent",
                u64::from_le_bytes(count)
            );
        }
        if u64::from_le_bytes(check) != sum.finish() {
            bail!("checksum mismatch at the sink");
        }
        Ok(())
    }
    .await;
    AgentOut::Bulk {
        bytes: sent,
        secs: start.elapsed().as_secs_f64(),
        error: r.err().map(|e| e.to_string()),
    }
}

async fn setup_client(addr: SocketAddr, metrics: SocketAddr, timeout: Duration) -> AgentOut {
    let start = Instant::now();
    let mut first_echo_ns = 0;
    let r: Result<Option<u64>> = async {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        s.write_all(&[ECHO, 1, 2, 3, 4, 5, 6, 7, 8]).await?;
        let mut back = [0u8; 8];
        tokio::time::timeout(timeout, s.read_exact(&mut back))
            .await
            .map_err(|_| anyhow!("no echo within {timeout:?}"))??;
        first_echo_ns = nanos(start.elapsed());
        while start.elapsed() < timeout {
            if scrape(metrics, MOVES_DIRECT).await.unwrap_or(0.0) >= 1.0 {
                return Ok(Some(nanos(start.elapsed())));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Keep the client connection (and so the route) until here.
        drop(s);
        Ok(None)
    }
    .await;
    let (direct_ns, error) = match r {
        Ok(d) => (d, None),
        Err(e) => (None, Some(e.to_string())),
    };
    AgentOut::Setup {
        first_echo_ns,
        direct_ns,
        error,
    }
}

/// One sample of a node's `/metrics` (plain HTTP/1.1 on its ops address).
async fn scrape(ops: SocketAddr, sample: &str) -> Result<f64> {
    let mut s = TcpStream::connect(ops).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    sample_value(&body, sample).ok_or_else(|| anyhow!("{sample} not in /metrics"))
}

/// Runs `job` in namespace `ns` and reads its one line of output.
async fn run_agent(lab: &Lab, ns: &str, job: &Job) -> Result<AgentOut> {
    let exe = std::env::current_exe().context("own executable")?;
    let out = lab
        .command(
            ns,
            &exe,
            &["lab-agent", "--job", &serde_json::to_string(job)?],
        )
        .kill_on_drop(true)
        .output()
        .await
        .context("run lab-agent")?;
    if !out.status.success() {
        bail!(
            "lab-agent in {ns} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("lab-agent output {text:?}"))
}

/// Starts the target server in the outlet's namespace, on every address (the outlet reaches
/// it on loopback, plain TCP through router B's port-forward); returns once it listens.
async fn start_server(lab: &Lab) -> Result<Child> {
    let exe = std::env::current_exe().context("own executable")?;
    let job = Job::Serve {
        listen: SocketAddr::from(([0, 0, 0, 0], ECHO_PORT)),
    };
    let mut child = lab
        .command(
            "b",
            &exe,
            &["lab-agent", "--job", &serde_json::to_string(&job)?],
        )
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start the lab's target server")?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout from the target server"))?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .map_err(|_| anyhow!("the target server did not start within 10 s"))??;
    if line.trim() != "ready" {
        bail!("the target server did not start: {line:?}");
    }
    Ok(child)
}

async fn measure(
    lab: &Lab,
    system: &str,
    addr: SocketAddr,
    via_relay: bool,
    opts: &DirectOptions,
) -> Result<DirectRow> {
    progress(&format!("direct: {system} bulk, {} s", opts.bulk_secs));
    let before = if via_relay {
        lab.metric("pub", FORWARDED).await
    } else {
        None
    };
    let bulk = run_agent(
        lab,
        "a",
        &Job::Bulk {
            addr,
            secs: opts.bulk_secs,
            write_size: opts.write_size,
        },
    )
    .await?;
    let after = if via_relay {
        lab.metric("pub", FORWARDED).await
    } else {
        None
    };
    let AgentOut::Bulk { bytes, secs, error } = bulk else {
        bail!("bulk agent answered something else");
    };
    progress(&format!(
        "direct: {system} rr, {} req/s for {} s",
        opts.rr.rate, opts.rr.secs
    ));
    let rr = run_agent(
        lab,
        "a",
        &Job::Rr {
            addr,
            rate: opts.rr.rate,
            secs: opts.rr.secs,
            size: opts.rr.size,
            warmup: opts.rr.warmup,
        },
    )
    .await?;
    let AgentOut::Rr {
        sent,
        lat_ns,
        errors,
    } = rr
    else {
        bail!("rr agent answered something else");
    };
    Ok(DirectRow {
        system: system.into(),
        bulk_gbps: if error.is_none() && secs > 0.0 {
            bytes as f64 * 8.0 / secs / 1e9
        } else {
            0.0
        },
        bulk_bytes: bytes,
        bulk_error: error,
        relay_forwarded_mib: before.zip(after).map(|(b, a)| (a - b) / MIB),
        rr: Latency::from_ns(lat_ns),
        rr_sent: sent,
        rr_errors: errors,
    })
}

/// Polls the inlet's metric `sample` until `pred` holds (false after `within`).
async fn wait_metric(
    lab: &Lab,
    sample: &str,
    within: Duration,
    pred: impl Fn(f64) -> bool,
) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if lab.metric("a", sample).await.is_some_and(&pred) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

pub async fn run(opts: &DirectOptions) -> Result<DirectReport> {
    let lab = Lab::up().map_err(|why| {
        anyhow!(
            "cannot build the NAT lab ({why}); the direct scenario needs root, `ip netns` and nft"
        )
    })?;
    lab.forward("b", ECHO_PORT)
        .map_err(|e| anyhow!("port-forward on router B: {e}"))?;
    add_steps(6 + opts.connections);
    let inlet: SocketAddr = SocketAddr::from(([127, 0, 0, 1], LISTEN_PORT));
    let tcp: SocketAddr = format!("{ROUTER_B_IP}:{ECHO_PORT}").parse()?;
    let mut notes = vec![
        format!("tcp: plain TCP from the inlet's namespace to the outlet's, through router A's masquerade and a port-forward (DNAT) of {ROUTER_B_IP}:{ECHO_PORT} on router B: the same hops as the direct UDP path"),
        "postern-relayed: inlet and outlet with direct = \"never\"; postern-direct: both with direct = \"auto\", measured once the route has moved to the direct path (and checked to have stayed there)".into(),
        "each client and the target server are separate processes inside the lab's namespaces; the lab's veth pairs and bridge are all on this one machine".into(),
    ];
    let mut rows = Vec::new();
    {
        let server = start_server(&lab).await?;
        let tunnel = LabTunnel::start_with(&lab, "never", "never", server).await;
        rows.push(measure(&lab, "tcp (port-forward)", tcp, false, opts).await?);
        rows.push(measure(&lab, "postern-relayed", inlet, true, opts).await?);
        drop(tunnel);
    }
    let server = start_server(&lab).await?;
    let mut tunnel = LabTunnel::start_with(&lab, "auto", "auto", server).await;
    // The route is set up by the first client connection and goes direct soon after.
    let warm = run_agent(
        &lab,
        "a",
        &Job::Setup {
            addr: inlet,
            metrics: SocketAddr::from(([127, 0, 0, 1], OPS_PORT)),
            timeout_s: 30.0,
        },
    )
    .await?;
    if !wait_metric(&lab, ROUTES_DIRECT, Duration::from_secs(30), |v| v >= 1.0).await {
        bail!("the route never went direct ({warm:?})\n{}", tunnel.logs());
    }
    rows.push(measure(&lab, "postern-direct", inlet, true, opts).await?);
    let fell_back = lab.metric("a", MOVES_RELAYED).await.unwrap_or(0.0);
    if fell_back > 0.0 {
        notes.push(format!("postern-direct: the route fell back to the relay {fell_back} times during the runs (figures mix both paths)"));
    }
    for r in &rows {
        if let Some(e) = &r.bulk_error {
            notes.push(format!("{}: bulk error: {e}", r.system));
        }
        for e in r.rr_errors.iter().take(3) {
            notes.push(format!("{}: rr error: {e}", r.system));
        }
    }

    let mut first = Vec::new();
    let mut direct = Vec::new();
    let mut failures = Vec::new();
    for i in 0..opts.connections {
        progress(&format!(
            "direct: new route {}/{}, time to the direct path",
            i + 1,
            opts.connections
        ));
        tunnel.restart_inlet(&lab).await;
        let out = run_agent(
            &lab,
            "a",
            &Job::Setup {
                addr: inlet,
                metrics: SocketAddr::from(([127, 0, 0, 1], OPS_PORT)),
                timeout_s: 30.0,
            },
        )
        .await?;
        let AgentOut::Setup {
            first_echo_ns,
            direct_ns,
            error,
        } = out
        else {
            bail!("set-up agent answered something else");
        };
        if let Some(e) = error {
            failures.push(format!("route {}: {e}", i + 1));
            continue;
        }
        first.push(first_echo_ns);
        match direct_ns {
            Some(d) => direct.push(d),
            None => failures.push(format!("route {}: not direct within 30 s", i + 1)),
        }
    }
    // Latency::from_ns reports microseconds: hand it microseconds to read milliseconds.
    let ms = |v: Vec<u64>| Latency::from_ns(v.into_iter().map(|n| n / 1000).collect());
    let setup = SetupTimes {
        connections: opts.connections,
        went_direct: direct.len(),
        first_echo_ms: ms(first),
        to_direct_ms: ms(direct),
        failures,
    };
    notes.push("set-up: each sample restarts the inlet (same identity and flags; a new process, so a new route), then times from the client's connect to its first echo (route set-up through the relay) and to the inlet's postern_inlet_path_moves_total{to=\"direct\"} turning 1 (polled every 2 ms from inside the inlet's namespace)".into());
    drop(tunnel);
    Ok(DirectReport {
        options: opts.clone(),
        rows,
        setup,
        notes,
    })
}
