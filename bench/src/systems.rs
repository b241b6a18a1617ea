//! The systems a scenario compares: direct TCP, postern, and optional third-party tunnels
//! (rathole, bore) started as child processes when their binaries are on PATH.

use crate::progress::progress;
use anyhow::{anyhow, bail, Context, Result};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// Something a client connects to in order to reach the scenario's target.
#[derive(Debug, Clone)]
pub struct System {
    pub name: String,
    pub addr: SocketAddr,
    /// The process in the middle (postern's relay, rathole's or bore's server), when it runs
    /// apart from the bench, so that its CPU time can be read.
    pub relay_pid: Option<u32>,
}

impl System {
    pub fn plain(name: &str, addr: SocketAddr) -> Self {
        Self {
            name: name.into(),
            addr,
            relay_pid: None,
        }
    }

    pub fn with_relay(mut self, pid: Option<u32>) -> Self {
        self.relay_pid = pid;
        self
    }
}

/// A third-party tunnel to `target`, run as child processes killed on drop.
pub struct Baseline {
    pub name: String,
    pub addr: SocketAddr,
    /// Server first, then client.
    children: Vec<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Baseline {
    pub fn system(&mut self) -> System {
        let server = self.children.first().and_then(|c| c.id());
        System::plain(&self.name, self.addr).with_relay(server)
    }
}

/// Looks `name` up on PATH (and in ~/.cargo/bin, where `cargo install` puts it).
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Starts every baseline that is installed; notes the ones that are not.
pub async fn start_baselines(
    enabled: bool,
    target: SocketAddr,
    notes: &mut Vec<String>,
) -> Vec<Baseline> {
    let mut out = Vec::new();
    if !enabled {
        return out;
    }
    type Starter = fn(
        PathBuf,
        SocketAddr,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Baseline>> + Send>,
    >;
    let starters: [(&str, &str, Starter); 3] = [
        ("rathole", "rathole", |b, t| Box::pin(rathole(b, t, false))),
        ("rathole", "rathole-noise", |b, t| {
            Box::pin(rathole(b, t, true))
        }),
        ("bore", "bore", |b, t| Box::pin(bore(b, t))),
    ];
    for (bin, name, start) in starters {
        let Some(path) = find_binary(bin) else {
            let note = format!(
                "{name}: `{bin}` not found on PATH (run bench/install-baselines.sh); skipped"
            );
            progress(&note);
            if !notes.contains(&note) {
                notes.push(note);
            }
            continue;
        };
        progress(&format!("starting baseline {name}"));
        match start(path, target).await {
            Ok(b) => out.push(b),
            Err(e) => notes.push(format!("{name}: could not start: {e:#}")),
        }
    }
    out
}

fn free_port() -> Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until `addr` accepts TCP connections.
async fn wait_listening(addr: SocketAddr, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what} is not listening on {addr}")
}

/// Waits until a connection to `addr` reaches the target: the tunnel's client side may accept
/// before its data channel is up. Echo and sink targets both answer a closed empty stream, so
/// a successful connect + EOF round trip is enough here; give the client a moment instead.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}

fn spawn(cmd: &mut Command) -> Result<Child> {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow!("spawn: {e}"))
}

/// rathole: a server with a public port and a client next to the target, as its README sets
/// them up; `noise` adds its Noise_NK transport (a fresh key pair per run).
async fn rathole(bin: PathBuf, target: SocketAddr, noise: bool) -> Result<Baseline> {
    let dir = tempfile::tempdir()?;
    let (control, public) = (free_port()?, free_port()?);
    let (server_transport, client_transport) = if noise {
        let out = std::process::Command::new(&bin)
            .arg("--genkey")
            .output()
            .context("rathole --genkey")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut private = None;
        let mut public_key = None;
        let mut lines = text.lines();
        while let Some(l) = lines.next() {
            if l.contains("Private Key") {
                private = lines.next().map(|s| s.trim().to_string());
            } else if l.contains("Public Key") {
                public_key = lines.next().map(|s| s.trim().to_string());
            }
        }
        let (private, public_key) = private
            .zip(public_key)
            .ok_or_else(|| anyhow!("cannot parse `rathole --genkey` output"))?;
        (
            format!("[server.transport]\ntype = \"noise\"\n[server.transport.noise]\nlocal_private_key = \"{private}\"\n"),
            format!("[client.transport]\ntype = \"noise\"\n[client.transport.noise]\nremote_public_key = \"{public_key}\"\n"),
        )
    } else {
        (String::new(), String::new())
    };
    let server = dir.path().join("server.toml");
    std::fs::write(
        &server,
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{control}\"\n{server_transport}\n[server.services.bench]\ntoken = \"bench-token\"\nbind_addr = \"127.0.0.1:{public}\"\n"
        ),
    )?;
    let client = dir.path().join("client.toml");
    std::fs::write(
        &client,
        format!(
            "[client]\nremote_addr = \"127.0.0.1:{control}\"\n{client_transport}\n[client.services.bench]\ntoken = \"bench-token\"\nlocal_addr = \"{target}\"\n"
        ),
    )?;
    let s = spawn(Command::new(&bin).arg("--server").arg(&server))?;
    wait_listening(([127, 0, 0, 1], control).into(), "rathole server").await?;
    let c = spawn(Command::new(&bin).arg("--client").arg(&client))?;
    let addr: SocketAddr = ([127, 0, 0, 1], public).into();
    wait_listening(addr, "rathole service").await?;
    settle().await;
    Ok(Baseline {
        name: if noise { "rathole-noise" } else { "rathole" }.into(),
        addr,
        children: vec![s, c],
        _dir: Some(dir),
    })
}

/// bore: `bore server` and `bore local` with a fixed remote port (bore's control port is 7835).
async fn bore(bin: PathBuf, target: SocketAddr) -> Result<Baseline> {
    let public = free_port()?;
    let s = spawn(
        Command::new(&bin)
            .arg("server")
            .arg("--bind-addr")
            .arg("127.0.0.1")
            .arg("--min-port")
            .arg(public.to_string())
            .arg("--max-port")
            .arg(public.to_string()),
    )?;
    wait_listening(([127, 0, 0, 1], 7835).into(), "bore server").await?;
    let c = spawn(
        Command::new(&bin)
            .arg("local")
            .arg(target.port().to_string())
            .arg("--local-host")
            .arg(target.ip().to_string())
            .arg("--to")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(public.to_string()),
    )?;
    let addr: SocketAddr = ([127, 0, 0, 1], public).into();
    wait_listening(addr, "bore tunnel").await?;
    settle().await;
    Ok(Baseline {
        name: "bore".into(),
        addr,
        children: vec![s, c],
        _dir: None,
    })
}
