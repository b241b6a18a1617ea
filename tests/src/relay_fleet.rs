//! A fleet of real `postern-relay` processes sharing a real three-member etcd cluster
//! ([`crate::etcd`]), for the fleet operations tests and the fleet bench: one project CA
//! copied into every relay's state directory (so each enrolls nodes), each relay on its own
//! UDP, admin and metrics address, registered under its own name.

use crate::etcd::EtcdCluster;
use crate::kit::Pki;
use crate::ports::{free_port, free_udp_addr};
use crate::procs::{cli_output, write_identity, Proc};
use anyhow::Context;
use postern_proto::ticket::Ticket;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The project (its CA) and the etcd cluster the relays share.
pub struct FleetProject {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub etcd: EtcdCluster,
    /// A state directory with the CA key and the relay's certificate, copied for each relay.
    pub template: PathBuf,
    /// The relays' membership lease TTL (`--etcd-lease-ttl`).
    pub lease_ttl: String,
}

impl FleetProject {
    /// Starts the etcd cluster and makes the project CA (`pki`).
    pub async fn start(pki: Pki) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("tempdir")?;
        let template = dir.path().join("template");
        std::fs::create_dir_all(&template).context("template dir")?;
        write_identity(&pki, "relay", &template);
        std::fs::write(template.join("ca.key"), pki.ca().key_pem()).context("ca key")?;
        let etcd = EtcdCluster::start().await?;
        Ok(Self {
            dir,
            pki,
            etcd,
            template,
            lease_ttl: "2s".into(),
        })
    }

    /// A state directory for relay `name`, holding the project CA.
    fn state_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let state = self.dir.path().join(name);
        std::fs::create_dir_all(&state).context("state dir")?;
        for f in ["ca.pem", "ca.key", "relay.pem", "relay.key"] {
            std::fs::copy(self.template.join(f), state.join(f)).context("copy state")?;
        }
        Ok(state)
    }

    /// Starts relay `name` (allowing `service` for every node) and waits until it is ready.
    pub async fn relay(&self, name: &str, service: &str) -> anyhow::Result<FleetRelay> {
        let mut r = FleetRelay {
            name: name.into(),
            state: self.state_dir(name)?,
            addr: free_udp_addr(),
            admin: format!("127.0.0.1:{}", free_port()).parse()?,
            ops: format!("127.0.0.1:{}", free_port()).parse()?,
            proc: None,
        };
        let allow = format!("{service}=true");
        let mut args: Vec<String> = [
            "run",
            "--state-dir",
            &r.state.display().to_string(),
            "--listen",
            &r.addr.to_string(),
            "--tcp-listen",
            "off",
            "--admin-addr",
            &r.admin.to_string(),
            "--metrics-addr",
            &r.ops.to_string(),
            "--allow-register",
            &allow,
            "--allow-route",
            &allow,
            "--drain-timeout",
            "500ms",
            "--cluster-name",
            name,
            "--etcd-lease-ttl",
            &self.lease_ttl,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.etcd.flags());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut proc = Proc::spawn(self.dir.path(), name, "postern-relay", &args);
        proc.wait_ready(r.ops).await;
        r.proc = Some(proc);
        Ok(r)
    }

    /// `--etcd URL` for each member, as the CLI takes them.
    pub fn etcd_flags(&self) -> Vec<String> {
        self.etcd.flags()
    }

    /// A single-use enrollment ticket for `role`, made by `postern-relay ticket create` with
    /// the project CA and recorded in etcd (so any relay of the fleet takes it).
    pub async fn ticket(&self, relay: &FleetRelay, role: &str) -> anyhow::Result<Ticket> {
        let state = self.template.display().to_string();
        let attr = format!("role={role}");
        let relay_addr = relay.addr.to_string();
        let flags = self.etcd.flags();
        let mut args = vec![
            "ticket",
            "create",
            "--attr",
            &attr,
            "--relay",
            &relay_addr,
            "--state-dir",
            &state,
        ];
        args.extend(flags.iter().map(String::as_str));
        let (ok, out, err) = cli_output("postern-relay", &args).await;
        anyhow::ensure!(ok, "ticket create failed: {err}");
        Ticket::decode(out.trim()).context("decode the ticket")
    }
}

/// One `postern-relay run` of the fleet; killed on drop.
pub struct FleetRelay {
    pub name: String,
    pub state: PathBuf,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub ops: SocketAddr,
    pub proc: Option<Proc>,
}

impl FleetRelay {
    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(|p| p.child.id())
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log).unwrap_or_default()
    }

    /// The state directory, as `--state-dir` takes it.
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// Kills it (SIGKILL, a crash: its membership lease is left to expire).
    pub async fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = p.child.start_kill();
            p.wait(Duration::from_secs(10)).await;
        }
    }
}
