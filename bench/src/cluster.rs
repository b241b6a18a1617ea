//! What the bench adds to the test kit (`postern_tests::kit`, which starts the nodes): a relay
//! that runs either in this process or as a child process of the bench binary (so its memory
//! and CPU can be measured alone), its counters and process usage, and the one-service tunnel
//! most scenarios measure through.

use anyhow::{anyhow, bail, Context, Result};
use postern_inlet::ServiceKind;
use postern_net::transport::relay_path::{TransportMode, TransportSettings};
use postern_outlet::target::Target;
use postern_proto::tls::{self, Identity};
use postern_relay::{Relay, RelayHandle};
use postern_tests::kit::{
    bind_relay, relay_options, run_relay, InletSpec, OutletSpec, Pki, RelayNode, Running,
    READY_TIMEOUT,
};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// The bench's CA: its node certificates last a day, longer than any run.
pub fn bench_pki() -> Result<Pki> {
    Pki::generate("bench", Duration::from_secs(24 * 3600))
}

/// Where the relay runs.
#[derive(Debug, Clone)]
pub enum RelayMode {
    /// In this process: its memory and CPU cannot be told apart from the nodes' and clients'.
    InProcess,
    /// As `<exe> relay-child`, a separate process measured through /proc.
    Child(PathBuf),
}

/// What the relay reports about its forwarding.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct RelayStats {
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    pub dropped_unknown_route: u64,
    pub dropped_spoofed: u64,
    pub dropped_malformed: u64,
    pub dropped_congested: u64,
    pub routes: u64,
    pub nodes: u64,
    pub routes_granted: u64,
    pub routes_refused: u64,
    pub handshake_failures: u64,
}

impl RelayStats {
    pub fn from_handle(h: &RelayHandle) -> Self {
        let f = h.forward_stats();
        let c = h.control_stats();
        Self {
            forwarded_packets: f.forwarded_packets.load(Ordering::Relaxed),
            forwarded_bytes: f.forwarded_bytes.load(Ordering::Relaxed),
            dropped_unknown_route: f.dropped_unknown_route.load(Ordering::Relaxed),
            dropped_spoofed: f.dropped_spoofed.load(Ordering::Relaxed),
            dropped_malformed: f.dropped_malformed.load(Ordering::Relaxed),
            dropped_congested: f.dropped_congested.load(Ordering::Relaxed),
            routes: h.routes().len() as u64,
            nodes: h.nodes().len() as u64,
            routes_granted: c.routes_granted.load(Ordering::Relaxed),
            routes_refused: c.routes_refused.load(Ordering::Relaxed),
            handshake_failures: c.handshake_failures.load(Ordering::Relaxed),
        }
    }

    /// Frames dropped for any reason.
    pub fn dropped(&self) -> u64 {
        self.dropped_unknown_route
            + self.dropped_spoofed
            + self.dropped_malformed
            + self.dropped_congested
    }
}

/// Memory and CPU time of one process, from /proc.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcUsage {
    pub rss_kib: u64,
    pub cpu_s: f64,
}

/// Reads VmRSS and utime+stime of `pid` ("self" for this process).
pub fn proc_usage(pid: &str) -> Result<ProcUsage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the state.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("bad /proc/{pid}/stat field {i}"))
    };
    // USER_HZ is 100 on every Linux this runs on.
    let cpu_s = (ticks(11)? + ticks(12)?) as f64 / 100.0;
    Ok(ProcUsage { rss_kib, cpu_s })
}

/// Datagrams the kernel dropped on every UDP socket held by `pids` ("self" for this process):
/// the `drops` column of /proc/net/udp and udp6 (what `ss -uam` shows as `d`), for the sockets
/// whose inodes the processes' fds point at. Drops there are invisible to postern's own
/// counters: the datagram never reached the process. 0 where /proc cannot be read.
pub fn udp_drops(pids: &[String]) -> u64 {
    let mut inodes = std::collections::HashSet::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                let link = link.to_string_lossy();
                if let Some(inode) = link
                    .strip_prefix("socket:[")
                    .and_then(|r| r.strip_suffix(']'))
                {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| {
            t.lines()
                .skip(1)
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
                    let inode = f.get(9)?;
                    inodes
                        .contains(*inode)
                        .then(|| f.last()?.parse::<u64>().ok())
                        .flatten()
                })
                .collect::<Vec<_>>()
        })
        .sum()
}

// One per relay: the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
enum RelayInner {
    InProcess(RelayNode),
    Child {
        child: Child,
        stdin: ChildStdin,
        stdout: Lines<BufReader<ChildStdout>>,
        pid: u32,
        _dir: tempfile::TempDir,
    },
}

/// A running relay.
pub struct BenchRelay {
    pub addr: SocketAddr,
    /// Port of its TLS/TCP fallback listener (a free one, not necessarily the UDP port).
    pub tcp_port: Option<u16>,
    /// Port of its public hostname ingress for [`PUBLIC_DOMAIN`] (a child relay only).
    pub public_port: Option<u16>,
    inner: RelayInner,
}

impl BenchRelay {
    pub async fn start(pki: &Pki, mode: &RelayMode) -> Result<Self> {
        Self::start_logged(pki, mode, None).await
    }

    /// [`start`](Self::start); a child relay also logs at INFO to `log` (the `attack` scenario
    /// measures how much it writes).
    pub async fn start_logged(pki: &Pki, mode: &RelayMode, log: Option<&Path>) -> Result<Self> {
        match mode {
            RelayMode::InProcess => {
                let any = SocketAddr::from(([127, 0, 0, 1], 0));
                let mut relay = bind_relay(pki, any, rand::random(), None)?;
                let tcp_port = listen_tcp(&mut relay);
                let node = run_relay(relay)?;
                Ok(Self {
                    addr: node.addr,
                    tcp_port,
                    public_port: None,
                    inner: RelayInner::InProcess(node),
                })
            }
            RelayMode::Child(exe) => {
                let dir = tempfile::tempdir()?;
                let (cert, key) = pki.issue_pem("relay")?;
                std::fs::write(dir.path().join("relay.crt"), cert)?;
                std::fs::write(dir.path().join("relay.key"), key)?;
                std::fs::write(dir.path().join("ca.crt"), pki.ca_pem())?;
                let mut cmd = Command::new(exe);
                if let Some(log) = log {
                    let file = std::fs::File::create(log)
                        .with_context(|| format!("create {}", log.display()))?;
                    cmd.env("RUST_LOG", "info").stderr(file);
                }
                let mut child = cmd
                    .arg("relay-child")
                    .arg("--dir")
                    .arg(dir.path())
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .with_context(|| format!("start relay child {}", exe.display()))?;
                let pid = child
                    .id()
                    .ok_or_else(|| anyhow!("relay child has no pid"))?;
                let stdin = child
                    .stdin
                    .take()
                    .ok_or_else(|| anyhow!("no child stdin"))?;
                let out = child
                    .stdout
                    .take()
                    .ok_or_else(|| anyhow!("no child stdout"))?;
                let mut stdout = BufReader::new(out).lines();
                let line = tokio::time::timeout(READY_TIMEOUT, stdout.next_line())
                    .await
                    .context("relay child did not start in time")??
                    .ok_or_else(|| anyhow!("relay child exited before reporting its address"))?;
                let mut words = line.split(' ');
                let (Some("ADDR"), Some(addr), Some("TCP"), Some(tcp)) =
                    (words.next(), words.next(), words.next(), words.next())
                else {
                    bail!("unexpected relay child line {line:?}");
                };
                let addr = addr.parse()?;
                let tcp_port = tcp.parse().ok();
                let public_port = match (words.next(), words.next()) {
                    (Some("PUBLIC"), Some(p)) => p.parse().ok(),
                    _ => None,
                };
                Ok(Self {
                    addr,
                    tcp_port,
                    public_port,
                    inner: RelayInner::Child {
                        child,
                        stdin,
                        stdout,
                        pid,
                        _dir: dir,
                    },
                })
            }
        }
    }

    /// Whether the relay runs in a process of its own (so [`usage`](Self::usage) is its alone).
    pub fn separate_process(&self) -> bool {
        matches!(self.inner, RelayInner::Child { .. })
    }

    /// The relay's process id when it runs in a process of its own.
    pub fn pid(&self) -> Option<u32> {
        match &self.inner {
            RelayInner::InProcess(_) => None,
            RelayInner::Child { pid, .. } => Some(*pid),
        }
    }

    /// The relay's counters.
    pub async fn stats(&mut self) -> Result<RelayStats> {
        match &mut self.inner {
            RelayInner::InProcess(node) => Ok(RelayStats::from_handle(&node.handle)),
            RelayInner::Child { stdin, stdout, .. } => {
                stdin.write_all(b"stats\n").await?;
                stdin.flush().await?;
                let line = tokio::time::timeout(Duration::from_secs(10), stdout.next_line())
                    .await
                    .context("relay child did not answer")??
                    .ok_or_else(|| anyhow!("relay child exited"))?;
                serde_json::from_str(&line).context("relay child stats")
            }
        }
    }

    /// RSS and CPU time of the relay's process (this process when in-process).
    pub fn usage(&self) -> Result<ProcUsage> {
        match &self.inner {
            RelayInner::InProcess(_) => proc_usage("self"),
            RelayInner::Child { pid, .. } => proc_usage(&pid.to_string()),
        }
    }

    pub async fn stop(self) {
        match self.inner {
            RelayInner::InProcess(node) => node.running.stop().await,
            RelayInner::Child {
                mut child, stdin, ..
            } => {
                drop(stdin);
                if tokio::time::timeout(Duration::from_secs(5), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
            }
        }
    }
}

/// Opens the relay's TLS/TCP fallback listener on a free port of 127.0.0.1 (the UDP port's TCP
/// twin, `postern-relay run`'s default, may be held by one of the many client sockets a run
/// leaves behind); the nodes are told the port.
fn listen_tcp(relay: &mut Relay) -> Option<u16> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    match relay.listen_tcp(any) {
        Ok(bound) => Some(bound.port()),
        Err(e) => {
            tracing::warn!(error = %e, "relay: no TLS/TCP listener");
            None
        }
    }
}

/// Body of the hidden `relay-child` subcommand: a relay whose counters are read over stdin.
pub async fn relay_child(dir: &Path) -> Result<()> {
    let cert = std::fs::read_to_string(dir.join("relay.crt"))?;
    let key = std::fs::read_to_string(dir.join("relay.key"))?;
    let ca = std::fs::read_to_string(dir.join("ca.crt"))?;
    let options = relay_options(
        Identity::from_pem(&cert, &key)?,
        tls::roots_from_pem(&ca)?,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        rand::random(),
        None,
    );
    let mut relay = Relay::bind(options).context("bind relay")?;
    let tcp_port = listen_tcp(&mut relay);
    let node = run_relay(relay)?;
    let (addr, handle) = (node.addr, &node.handle);
    let ingress =
        postern_relay::public::PublicIngress::bind(postern_relay::public::PublicOptions::new(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            PUBLIC_DOMAIN,
        ))
        .await
        .context("bind the public ingress")?;
    let public_port = ingress.local_addr()?.port();
    let ingress_stop = tokio_util::sync::CancellationToken::new();
    let ingress_task = tokio::spawn(ingress.run(handle.clone(), ingress_stop.clone()));
    let mut out = tokio::io::stdout();
    let tcp = tcp_port.map_or("none".to_string(), |p| p.to_string());
    out.write_all(format!("ADDR {addr} TCP {tcp} PUBLIC {public_port}\n").as_bytes())
        .await?;
    out.flush().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim() == "stats" {
            let s = serde_json::to_string(&RelayStats::from_handle(handle))?;
            out.write_all(format!("{s}\n").as_bytes()).await?;
            out.flush().await?;
        }
    }
    ingress_stop.cancel();
    let _ = ingress_task.await;
    node.running.stop().await;
    Ok(())
}

/// The public domain of a child relay's ingress: `<service>.relay.test`.
pub const PUBLIC_DOMAIN: &str = "relay.test";

/// One relay, one outlet and one inlet for a single service whose target is `target`.
pub struct Tunnel {
    pub relay: BenchRelay,
    pub outlet: Running,
    pub inlet: Running,
    /// The inlet's listener: connect here to reach `target` through postern.
    pub addr: SocketAddr,
    /// A second outlet and inlet on the same relay that reach it over the TLS/TCP fallback
    /// (`transport = "tcp"`), and that inlet's listener; see [`Tunnel::add_tcp`].
    pub tcp: Option<(Running, Running, SocketAddr)>,
}

impl Tunnel {
    pub async fn start(pki: &Pki, mode: &RelayMode, target: SocketAddr) -> Result<Self> {
        let relay = BenchRelay::start(pki, mode).await?;
        Self::on(pki, relay, target).await
    }

    /// The outlet and inlet of a tunnel to `target` through a relay already running.
    pub async fn on(pki: &Pki, relay: BenchRelay, target: SocketAddr) -> Result<Self> {
        let service = "bench";
        let outlet = OutletSpec::new("outlet-1", relay.addr)
            .targets([(service, Target::tcp(target.to_string()))])?
            .start(pki)
            .await?
            .running;
        let inlet = InletSpec::new("inlet-1", relay.addr, &[(service, ServiceKind::Tcp)])
            .start(pki)
            .await?;
        let addr = inlet.addr(service);
        let inlet = inlet.running;
        Ok(Self {
            relay,
            outlet,
            inlet,
            addr,
            tcp: None,
        })
    }

    /// Adds the `postern-fallback` pair: both nodes forced onto the relay's TLS/TCP fallback, as
    /// when UDP is blocked; the end-to-end connection is still QUIC, carried inside.
    pub async fn add_tcp(&mut self, pki: &Pki, target: SocketAddr) -> Result<SocketAddr> {
        let tcp_port = self
            .relay
            .tcp_port
            .ok_or_else(|| anyhow!("the relay has no TLS/TCP listener"))?;
        // The direct path off: on loopback UDP between the nodes works, and the route would
        // leave the relay's TLS/TCP links this pair measures.
        let tcp = || TransportSettings {
            mode: TransportMode::Tcp,
            tcp_port: Some(tcp_port),
            direct: postern_net::transport::direct::DirectMode::Never,
            ..TransportSettings::default()
        };
        let service = "bench-tcp";
        let outlet = OutletSpec {
            transport: tcp(),
            ..OutletSpec::new("outlet-tcp", self.relay.addr)
        }
        .targets([(service, Target::tcp(target.to_string()))])?
        .start(pki)
        .await?
        .running;
        let inlet = InletSpec {
            transport: tcp(),
            ..InletSpec::new("inlet-tcp", self.relay.addr, &[(service, ServiceKind::Tcp)])
        }
        .start(pki)
        .await?;
        let addr = inlet.addr(service);
        let inlet = inlet.running;
        self.tcp = Some((outlet, inlet, addr));
        Ok(addr)
    }

    pub async fn stop(self) {
        if let Some((outlet, inlet, _)) = self.tcp {
            inlet.stop().await;
            outlet.stop().await;
        }
        self.inlet.stop().await;
        self.outlet.stop().await;
        self.relay.stop().await;
    }
}
