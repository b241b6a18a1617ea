//! A fleet of relays for the tests: a project CA shared by every relay, a real three-member
//! etcd cluster ([`crate::etcd`]), and real `postern-relay run` processes in it (`cargo build
//! --bins` first), each with its admin API and `/metrics`.

use crate::etcd::EtcdCluster;
use crate::kit::Pki;
use crate::ports::{free_port, free_udp_addr};
use crate::procs::{cli, write_identity, Proc};
use postern_proto::ticket::Ticket;
use postern_relay::admin::client::AdminClient;
use postern_relay::admin::AdminToken;
use postern_relay::fleet::etcd::Etcd;
use postern_relay::fleet::ClusterArgs;
use postern_relay::views::Nodes;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A project (its CA, shared by every relay of the fleet) and the etcd cluster.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub etcd: EtcdCluster,
    /// A state directory with the CA key and the relay's certificate, copied for each relay.
    pub template: PathBuf,
}

impl Fleet {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::new();
        let template = dir.path().join("template");
        std::fs::create_dir_all(&template).expect("template dir");
        write_identity(&pki, "relay", &template);
        std::fs::write(template.join("ca.key"), pki.ca().key_pem()).expect("ca key");
        let etcd = EtcdCluster::start().await.expect("etcd cluster");
        Self {
            dir,
            pki,
            etcd,
            template,
        }
    }

    /// A relay state directory for `name`, holding the project CA (so it enrolls nodes).
    pub fn state_dir(&self, name: &str) -> PathBuf {
        let state = self.dir.path().join(name);
        std::fs::create_dir_all(&state).expect("state dir");
        for f in ["ca.pem", "ca.key", "relay.pem", "relay.key"] {
            std::fs::copy(self.template.join(f), state.join(f)).expect("copy state");
        }
        state
    }

    /// The shared state as a test reads it: the same etcd backend the relays use.
    pub async fn store(&self) -> Etcd {
        let cfg = ClusterArgs {
            etcd: self.etcd.endpoints(),
            ..Default::default()
        }
        .resolve(None)
        .expect("cluster")
        .expect("etcd configured");
        Etcd::connect(
            &cfg,
            Some(postern_relay::state::StateDir::new(&self.template)),
        )
        .await
        .expect("connect to etcd")
    }

    /// Starts relay `name` on a fresh address.
    pub async fn relay(&self, name: &str) -> FleetRelay {
        let r = FleetRelay {
            name: name.into(),
            state: self.state_dir(name),
            addr: free_udp_addr(),
            admin: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
            ops: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
            etcd: self.etcd.flags(),
            proc: None,
        };
        r.start(self.dir.path()).await
    }
}

/// A `postern-relay run` in the fleet.
pub struct FleetRelay {
    pub name: String,
    pub state: PathBuf,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub ops: SocketAddr,
    pub etcd: Vec<String>,
    pub proc: Option<Proc>,
}

impl FleetRelay {
    pub async fn start(mut self, dir: &Path) -> Self {
        let mut args: Vec<String> = [
            "run",
            "--state-dir",
            &self.state.display().to_string(),
            "--listen",
            &self.addr.to_string(),
            "--tcp-listen",
            "off",
            "--admin-addr",
            &self.admin.to_string(),
            "--metrics-addr",
            &self.ops.to_string(),
            "--allow-register",
            "echo=true",
            "--allow-route",
            "echo=true",
            "--drain-timeout",
            "500ms",
            "--cluster-name",
            &self.name,
            "--etcd-lease-ttl",
            "2s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.etcd.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut proc = Proc::spawn(dir, &self.name, "postern-relay", &args);
        proc.wait_ready(self.ops).await;
        self.proc = Some(proc);
        self
    }

    pub fn proc(&mut self) -> &mut Proc {
        self.proc.as_mut().expect("relay running")
    }

    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log).unwrap_or_default()
    }

    pub fn admin(&self) -> AdminClient {
        let token = AdminToken::load(&self.state.join(postern_relay::admin::TOKEN_FILE))
            .expect("admin token");
        AdminClient::new(self.admin, token)
    }

    /// Its `/metrics` page.
    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.ops);
        match reqwest::get(&url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    pub async fn nodes(&self) -> Vec<String> {
        match self.admin().get::<Nodes>("/v1/nodes").await {
            Ok(n) => n.nodes.into_iter().map(|n| n.name.to_string()).collect(),
            Err(e) => panic!("{}: /v1/nodes: {e}\n{}", self.name, self.log()),
        }
    }

    /// Stops it as a service manager does, and waits for it to exit.
    pub async fn stop(&mut self) {
        self.proc().sigterm();
        self.proc().wait(Duration::from_secs(10)).await;
        self.proc = None;
    }
}

pub async fn ticket(fleet: &Fleet, relay: &FleetRelay, role: &str) -> Ticket {
    let state = fleet.template.display().to_string();
    let attr = format!("role={role}");
    let relay_addr = relay.addr.to_string();
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
    let flags = fleet.etcd.flags();
    args.extend(flags.iter().map(String::as_str));
    let out = cli("postern-relay", &args).await;
    Ticket::decode(out.trim()).expect("ticket")
}
