//! A relay, an outlet and an inlet run as the real binaries, for tests of how they recover when
//! one of them is killed, restarted or paused: each keeps its state directory and flags, so it
//! can be started again as a service manager would, and can be stopped (`SIGSTOP`) and let go
//! on (`SIGCONT`). The outlet serves a real influxd 1.x with leased users (`influxdb`, lease
//! lifetime chosen by the test) and a TCP echo service (`echo`); the inlet listens for both.

use crate::influxd::Influxd;
use crate::ports::{free_port, free_udp_addr};
use crate::procs::{Proc, RelayCa};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The database the leased users may write to.
pub const DB: &str = "telegraf";

/// Where the nodes live and listen, and what starting (or restarting) each one needs.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub relay_addr: String,
    pub relay_ops: SocketAddr,
    pub outlet_ops: SocketAddr,
    pub inlet_ops: SocketAddr,
    /// The inlet's `influxdb` listener.
    pub influx: SocketAddr,
    /// The inlet's `echo` listener.
    pub echo: SocketAddr,
    echo_target: SocketAddr,
    influxd_url: String,
    ttl_s: u64,
}

/// The three nodes, running.
pub struct Nodes {
    pub setup: Setup,
    pub relay: Proc,
    pub outlet: Proc,
    pub inlet: Proc,
}

/// Runs `kill -SIGNAL pid`.
pub fn signal(proc: &Proc, sig: &str) {
    let pid = proc.child.id().expect("process still running");
    let status = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

impl Nodes {
    /// Starts the relay, the outlet (leases of `ttl_s` seconds on `influxd`, whose database
    /// [`DB`] it creates; `echo_target` behind its `echo` service) and the inlet, and waits
    /// until each is ready.
    pub async fn start(influxd: &Influxd, echo_target: SocketAddr, ttl_s: u64) -> Nodes {
        influxd
            .query(&format!("CREATE DATABASE {DB}"))
            .await
            .expect("create database");
        let dir = tempfile::tempdir().expect("tempdir");
        let relay_addr = free_udp_addr().to_string();
        let ca = RelayCa::init(&path(dir.path(), "relay-state"), &relay_addr).await;
        let outlet_ticket = ca.ticket("outlet").await;
        let inlet_ticket = ca.ticket("client").await;
        let admin = dir.path().join("influx-admin");
        std::fs::write(
            &admin,
            format!("{}:{}", influxd.admin_user(), influxd.admin_password()),
        )
        .expect("admin credential");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&admin, std::fs::Permissions::from_mode(0o600))
                .expect("chmod");
        }
        let local =
            || -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().expect("addr") };
        let setup = Setup {
            dir,
            relay_addr,
            relay_ops: local(),
            outlet_ops: local(),
            inlet_ops: local(),
            influx: local(),
            echo: local(),
            echo_target,
            influxd_url: influxd.url(),
            ttl_s,
        };
        let mut relay = setup.spawn_relay("relay");
        relay.wait_ready(setup.relay_ops).await;
        let mut outlet = setup.spawn_outlet("outlet", Some(&outlet_ticket));
        outlet.wait_ready(setup.outlet_ops).await;
        let mut inlet = setup.spawn_inlet(&inlet_ticket);
        inlet.wait_ready(setup.inlet_ops).await;
        Nodes {
            setup,
            relay,
            outlet,
            inlet,
        }
    }

    /// Writes one point through the inlet with no credentials of its own; returns the status
    /// and the whole answer (status 0: no HTTP answer).
    pub async fn write(&self, n: u64) -> (u16, String) {
        let body = format!("m v={n}i");
        let req = format!(
            "POST /write?db={DB} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        http(self.setup.influx, &req).await
    }
}

impl Setup {
    fn spawn_inlet(&self, ticket: &str) -> Proc {
        let args = [
            "run".to_owned(),
            "--ticket".into(),
            ticket.to_owned(),
            "--name".into(),
            "inlet-a".into(),
            "--state-dir".into(),
            path(self.dir.path(), "inlet-state"),
            "--service".into(),
            format!("influxdb={},kind=influxdb", self.influx),
            "--service".into(),
            format!("echo={}", self.echo),
            "--metrics-addr".into(),
            self.inlet_ops.to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::spawn(self.dir.path(), "inlet", "postern-inlet", &args)
    }

    /// Starts the relay on its state directory and address (again, after a kill).
    pub fn spawn_relay(&self, name: &str) -> Proc {
        let state = path(self.dir.path(), "relay-state");
        let ops = self.relay_ops.to_string();
        Proc::spawn(
            self.dir.path(),
            name,
            "postern-relay",
            &[
                "run",
                "--state-dir",
                &state,
                "--listen",
                &self.relay_addr,
                "--allow-register",
                "influxdb=role = \"outlet\"",
                "--allow-register",
                "echo=role = \"outlet\"",
                "--allow-route",
                "influxdb=role = \"client\"",
                "--allow-route",
                "echo=role = \"client\"",
                "--metrics-addr",
                &ops,
            ],
        )
    }

    /// Starts the outlet (enrolling with `ticket` the first time; its state directory after).
    pub fn spawn_outlet(&self, name: &str, ticket: Option<&str>) -> Proc {
        let config = self.dir.path().join("outlet.toml");
        let permissions = format!(
            r#"[{{"action":"read","resource":{{"type":"databases","name":"{DB}"}}}},{{"action":"write","resource":{{"type":"databases","name":"{DB}"}}}}]"#
        );
        std::fs::write(
            &config,
            format!(
                "[influxdb-outlet]\nto = \"{}\"\napi = \"v1\"\nallow = 'role = \"client\"'\n\
                 all-access-token = \"file:{}\"\nleased-token-expires-in = {}\n\
                 leased-token-permissions = '{permissions}'\n",
                self.influxd_url,
                self.dir.path().join("influx-admin").display(),
                self.ttl_s,
            ),
        )
        .expect("outlet config");
        let mut args = vec!["run".to_owned()];
        if let Some(t) = ticket {
            args.extend(["--ticket".to_owned(), t.to_owned()]);
        }
        args.extend([
            "--name".into(),
            "outlet-a".into(),
            "--state-dir".into(),
            path(self.dir.path(), "outlet-state"),
            "--config".into(),
            config.display().to_string(),
            "--service".into(),
            format!("echo={},allow=role = \"client\"", self.echo_target),
            "--metrics-addr".into(),
            self.outlet_ops.to_string(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::spawn(self.dir.path(), name, "postern-outlet", &args)
    }
}

/// `GET PATH` on `addr` (status 0: no HTTP answer).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .await
}

async fn http(addr: SocketAddr, req: &str) -> (u16, String) {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(req.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text.get(9..12)?.parse().ok()?;
        Some((status, text))
    };
    tokio::time::timeout(Duration::from_secs(15), exchange)
        .await
        .ok()
        .flatten()
        .unwrap_or((0, String::new()))
}

fn path(dir: &Path, name: &str) -> String {
    let p: PathBuf = dir.join(name);
    p.display().to_string()
}
