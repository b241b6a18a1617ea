//! In-process postern nodes on 127.0.0.1 (port 0) and a relay that runs either in this process
//! or as a child process of the bench binary (so its memory and CPU can be measured alone).

use anyhow::{anyhow, bail, Context, Result};
use postern_inlet::{Inlet, InletOptions, InletService, ServiceKind};
use postern_net::transport::relay_path::RelayTarget;
use postern_net::transport::relay_path::{TransportMode, TransportSettings};
use postern_outlet::serve::Services;
use postern_outlet::target::Target;
use postern_outlet::{Outlet, OutletOptions};
use postern_proto::name::{NodeName, ServiceName};
use postern_proto::pki::Ca;
use postern_proto::tls::{self, Identity};
use postern_relay::policy::PolicySet;
use postern_relay::{Relay, RelayHandle, RelayOptions};
use rustls::RootCertStore;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a node may take to register or connect.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A throwaway project CA.
pub struct Pki {
    ca: Ca,
}

impl Pki {
    pub fn new() -> Result<Self> {
        Ok(Self {
            ca: Ca::generate("bench").context("generate CA")?,
        })
    }

    /// A certificate and key (PEM) for `name`.
    pub fn issue_pem(&self, name: &str) -> Result<(String, String)> {
        let issued = self
            .ca
            .issue(&node(name)?, Duration::from_secs(24 * 3600))
            .context("issue certificate")?;
        Ok((issued.cert_pem, issued.key_pem))
    }

    /// A fresh identity for `name`.
    pub fn identity(&self, name: &str) -> Result<Identity> {
        let (cert, key) = self.issue_pem(name)?;
        Identity::from_pem(&cert, &key).context("load identity")
    }

    /// The CA as a root store.
    pub fn roots(&self) -> Result<Arc<RootCertStore>> {
        tls::roots_from_pem(self.ca.cert_pem()).context("CA roots")
    }

    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }
}

pub fn node(name: &str) -> Result<NodeName> {
    NodeName::new(name).map_err(|e| anyhow!("node name {name:?}: {e}"))
}

pub fn svc(name: &str) -> Result<ServiceName> {
    ServiceName::new(name).map_err(|e| anyhow!("service name {name:?}: {e}"))
}

fn relay_target(addr: SocketAddr) -> RelayTarget {
    RelayTarget {
        addr,
        name: "relay".into(),
    }
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

// One per relay: the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
enum RelayInner {
    InProcess {
        handle: RelayHandle,
        shutdown: CancellationToken,
        task: JoinHandle<()>,
    },
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
                let mut relay = Relay::bind(RelayOptions {
                    listen: "127.0.0.1:0".parse()?,
                    identity: pki.identity("relay")?,
                    roots: pki.roots()?,
                    reset_key: Some(rand::random()),
                    tap: None,
                    policy: PolicySet::allow_all(),
                    authority: None,
                })
                .context("bind relay")?;
                let addr = relay.local_addr()?;
                let tcp_port = listen_tcp(&mut relay);
                let handle = relay.handle();
                let shutdown = CancellationToken::new();
                let task = tokio::spawn(relay.run(shutdown.clone()));
                Ok(Self {
                    addr,
                    tcp_port,
                    inner: RelayInner::InProcess {
                        handle,
                        shutdown,
                        task,
                    },
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
                Ok(Self {
                    addr,
                    tcp_port,
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
            RelayInner::InProcess { .. } => None,
            RelayInner::Child { pid, .. } => Some(*pid),
        }
    }

    /// The relay's counters.
    pub async fn stats(&mut self) -> Result<RelayStats> {
        match &mut self.inner {
            RelayInner::InProcess { handle, .. } => Ok(RelayStats::from_handle(handle)),
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
            RelayInner::InProcess { .. } => proc_usage("self"),
            RelayInner::Child { pid, .. } => proc_usage(&pid.to_string()),
        }
    }

    pub async fn stop(self) {
        match self.inner {
            RelayInner::InProcess { shutdown, task, .. } => {
                shutdown.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
            }
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
    let mut relay = Relay::bind(RelayOptions {
        listen: "127.0.0.1:0".parse()?,
        identity: Identity::from_pem(&cert, &key)?,
        roots: tls::roots_from_pem(&ca)?,
        reset_key: Some(rand::random()),
        tap: None,
        policy: PolicySet::allow_all(),
        authority: None,
    })
    .context("bind relay")?;
    let addr = relay.local_addr()?;
    let tcp_port = listen_tcp(&mut relay);
    let handle = relay.handle();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(relay.run(shutdown.clone()));
    let mut out = tokio::io::stdout();
    let tcp = tcp_port.map_or("none".to_string(), |p| p.to_string());
    out.write_all(format!("ADDR {addr} TCP {tcp}\n").as_bytes())
        .await?;
    out.flush().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim() == "stats" {
            let s = serde_json::to_string(&RelayStats::from_handle(&handle))?;
            out.write_all(format!("{s}\n").as_bytes()).await?;
            out.flush().await?;
        }
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    Ok(())
}

/// A node task, cancelled on drop.
pub struct Running {
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Running {
    fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(
        f: impl FnOnce(CancellationToken) -> F,
    ) -> Self {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(f(shutdown.clone()));
        Self {
            shutdown,
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Starts an outlet serving `services` (name, target address) and waits until it registered.
pub async fn start_outlet(
    pki: &Pki,
    name: &str,
    relay: SocketAddr,
    services: &[(String, SocketAddr)],
) -> Result<Running> {
    let mut targets = HashMap::new();
    for (n, addr) in services {
        targets.insert(svc(n)?, Target::tcp(addr.to_string()));
    }
    start_outlet_services(
        pki,
        name,
        relay,
        Services {
            targets,
            ..Services::default()
        },
    )
    .await
}

/// Starts an outlet with full control over its services (e.g. with lease managers).
pub async fn start_outlet_services(
    pki: &Pki,
    name: &str,
    relay: SocketAddr,
    services: Services,
) -> Result<Running> {
    start_outlet_via(pki, name, relay, services, TransportSettings::default()).await
}

/// [`start_outlet_services`], reaching the relay as `transport` says.
pub async fn start_outlet_via(
    pki: &Pki,
    name: &str,
    relay: SocketAddr,
    services: Services,
    transport: TransportSettings,
) -> Result<Running> {
    let mut outlet = Outlet::bind(OutletOptions {
        relay: relay_target(relay),
        identity: pki.identity(name)?,
        roots: pki.roots()?,
        services,
    })
    .with_context(|| format!("bind outlet {name}"))?;
    outlet.set_transport(transport);
    let mut handle = outlet.handle();
    let running = Running::spawn(|s| outlet.run(s));
    if !handle.wait_registered(READY_TIMEOUT).await {
        bail!("outlet {name} did not register");
    }
    Ok(running)
}

/// Starts an inlet with a TCP listener on 127.0.0.1:0 per service and waits for its control
/// connection; returns the listeners' addresses by service name.
pub async fn start_inlet(
    pki: &Pki,
    name: &str,
    relay: SocketAddr,
    services: &[(String, ServiceKind)],
) -> Result<(Running, HashMap<String, SocketAddr>)> {
    start_inlet_via(pki, name, relay, services, TransportSettings::default()).await
}

/// [`start_inlet`], reaching the relay as `transport` says.
pub async fn start_inlet_via(
    pki: &Pki,
    name: &str,
    relay: SocketAddr,
    services: &[(String, ServiceKind)],
    transport: TransportSettings,
) -> Result<(Running, HashMap<String, SocketAddr>)> {
    let mut list = Vec::new();
    for (s, kind) in services {
        list.push(InletService {
            name: svc(s)?,
            listen: "127.0.0.1:0".parse()?,
            kind: *kind,
        });
    }
    let mut inlet = Inlet::bind(InletOptions {
        relay: relay_target(relay),
        identity: pki.identity(name)?,
        roots: pki.roots()?,
        services: list,
    })
    .await
    .with_context(|| format!("bind inlet {name}"))?;
    inlet.set_transport(transport);
    let mut addrs = HashMap::new();
    for (s, _) in services {
        let a = inlet
            .listen_addr(&svc(s)?)
            .ok_or_else(|| anyhow!("inlet {name} has no listener for {s}"))?;
        addrs.insert(s.clone(), a);
    }
    let mut handle = inlet.handle();
    let running = Running::spawn(|s| inlet.run(s));
    if !handle.wait_connected(READY_TIMEOUT).await {
        bail!("inlet {name} did not connect to the relay");
    }
    Ok((running, addrs))
}

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
        let service = "bench".to_string();
        let outlet =
            start_outlet(pki, "outlet-1", relay.addr, &[(service.clone(), target)]).await?;
        let (inlet, addrs) = start_inlet(
            pki,
            "inlet-1",
            relay.addr,
            &[(service.clone(), ServiceKind::Tcp)],
        )
        .await?;
        let addr = addrs[&service];
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
        let tcp = || TransportSettings {
            mode: TransportMode::Tcp,
            tcp_port: Some(tcp_port),
            ..TransportSettings::default()
        };
        let service = "bench-tcp".to_string();
        let mut targets = HashMap::new();
        targets.insert(svc(&service)?, Target::tcp(target.to_string()));
        let services = Services {
            targets,
            ..Services::default()
        };
        let outlet = start_outlet_via(pki, "outlet-tcp", self.relay.addr, services, tcp()).await?;
        let (inlet, addrs) = start_inlet_via(
            pki,
            "inlet-tcp",
            self.relay.addr,
            &[(service.clone(), ServiceKind::Tcp)],
            tcp(),
        )
        .await?;
        let addr = addrs[&service];
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
