//! One relay and any number of outlets and inlets run as the real binaries, enrolled with
//! tickets from the relay's own `ca init` (outlets get `role=outlet`, inlets `role=client`),
//! each started with the `--service` flags a test gives; and a TCP target that answers each
//! connection with its own tag, so a test sees which of several targets served a connection.

use crate::ports::{free_port, free_udp_addr};
use crate::procs::{cli_output, Proc, RelayCa};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The relay and what starting nodes on it needs.
pub struct BinNet {
    pub dir: tempfile::TempDir,
    pub relay: Proc,
    pub relay_addr: String,
    pub relay_ops: SocketAddr,
    pub admin_addr: SocketAddr,
    state: String,
    outlet_ticket: String,
    client_ticket: String,
}

/// A 127.0.0.1 address with a free TCP port.
pub fn local_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

impl BinNet {
    /// Starts a relay that lets `role=outlet` register and `role=client` reach each of
    /// `services`, with tickets for up to 8 outlets and 16 inlets; waits until it is ready.
    pub async fn start(services: &[&str]) -> BinNet {
        let dir = tempfile::tempdir().expect("tempdir");
        let relay_addr = free_udp_addr().to_string();
        let state = dir.path().join("relay-state").display().to_string();
        let ca = RelayCa::init(&state, &relay_addr).await;
        let ticket = |role: &'static str, uses: &'static str| {
            let (state, relay) = (state.clone(), relay_addr.clone());
            async move {
                let args = [
                    "ticket",
                    "create",
                    "--attr",
                    &format!("role={role}"),
                    "--uses",
                    uses,
                    "--relay",
                    &relay,
                    "--state-dir",
                    &state,
                ];
                let (ok, out, err) = cli_output("postern-relay", &args).await;
                assert!(ok, "ticket create: {err}");
                out.trim().to_owned()
            }
        };
        let outlet_ticket = ticket("outlet", "8").await;
        let client_ticket = ticket("client", "16").await;
        drop(ca);
        let relay_ops = local_addr();
        let admin_addr = local_addr();
        let mut args = vec![
            "run".to_owned(),
            "--state-dir".into(),
            state.clone(),
            "--listen".into(),
            relay_addr.clone(),
            "--metrics-addr".into(),
            relay_ops.to_string(),
            "--admin-addr".into(),
            admin_addr.to_string(),
        ];
        for s in services {
            args.extend([
                "--allow-register".into(),
                format!("{s}=role = \"outlet\""),
                "--allow-route".into(),
                format!("{s}=role = \"client\""),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut relay = Proc::spawn(dir.path(), "relay", "postern-relay", &args);
        relay.wait_ready(relay_ops).await;
        BinNet {
            dir,
            relay,
            relay_addr,
            relay_ops,
            admin_addr,
            state,
            outlet_ticket,
            client_ticket,
        }
    }

    /// Starts outlet `name` with these `--service` values; returns it ready, and its ops
    /// address.
    pub async fn outlet(&self, name: &str, services: &[String]) -> (Proc, SocketAddr) {
        let ops = local_addr();
        let state = self.dir.path().join(format!("{name}-state"));
        let mut args = vec![
            "run".to_owned(),
            "--ticket".into(),
            self.outlet_ticket.clone(),
            "--name".into(),
            name.into(),
            "--state-dir".into(),
            state.display().to_string(),
            "--metrics-addr".into(),
            ops.to_string(),
        ];
        for s in services {
            args.extend(["--service".to_owned(), s.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut p = Proc::spawn(self.dir.path(), name, "postern-outlet", &args);
        p.wait_ready(ops).await;
        (p, ops)
    }

    /// Starts inlet `name` listening for `service`; returns it ready, and its listener.
    pub async fn inlet(&self, name: &str, service: &str) -> (Proc, SocketAddr) {
        let ops = local_addr();
        let listen = local_addr();
        let state = self.dir.path().join(format!("{name}-state"));
        let args = [
            "run".to_owned(),
            "--ticket".into(),
            self.client_ticket.clone(),
            "--name".into(),
            name.into(),
            "--state-dir".into(),
            state.display().to_string(),
            "--service".into(),
            format!("{service}={listen}"),
            "--metrics-addr".into(),
            ops.to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut p = Proc::spawn(self.dir.path(), name, "postern-inlet", &args);
        p.wait_ready(ops).await;
        (p, listen)
    }

    /// What `postern-relay status` prints.
    pub async fn status(&self) -> String {
        let admin = self.admin_addr.to_string();
        let args = [
            "status",
            "--admin-addr",
            admin.as_str(),
            "--state-dir",
            self.state.as_str(),
        ];
        let (ok, out, err) = cli_output("postern-relay", &args).await;
        assert!(ok, "postern-relay status: {err}");
        out
    }
}

/// The value of the sample `series` (name and labels exactly as exposed, e.g.
/// `m{service="echo"}`) on `ops`' `/metrics`, if present.
pub async fn metric(ops: SocketAddr, series: &str) -> Option<f64> {
    let (_, body) = crate::bins::http_get(ops, "/metrics").await;
    body.lines()
        .filter_map(|l| l.strip_prefix(series))
        .find_map(|rest| rest.strip_prefix(' ')?.trim().parse().ok())
}

/// A TCP target that answers each connection, once it has read something, with its tag and a
/// newline, then closes it. Stopped and started again on the same port.
pub struct TaggedTarget {
    pub addr: SocketAddr,
    pub tag: String,
    task: Option<JoinHandle<()>>,
}

impl TaggedTarget {
    /// Listens on a free 127.0.0.1 port.
    pub async fn start(tag: &str) -> TaggedTarget {
        let mut t = TaggedTarget {
            addr: local_addr(),
            tag: tag.to_owned(),
            task: None,
        };
        t.resume().await;
        t
    }

    /// Stops listening (connections are refused from now on).
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Listens again on the same address.
    pub async fn resume(&mut self) {
        self.stop();
        let listener = {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                match TcpListener::bind(self.addr).await {
                    Ok(l) => break l,
                    Err(e) => {
                        assert!(
                            tokio::time::Instant::now() < deadline,
                            "bind {}: {e}",
                            self.addr
                        );
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        };
        let tag = format!("{}\n", self.tag);
        self.task = Some(tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let tag = tag.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    if matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                        let _ = s.write_all(tag.as_bytes()).await;
                    }
                });
            }
        }));
    }
}

impl Drop for TaggedTarget {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Connects to `addr` (an inlet's listener), asks, and returns the tag that answered; `None`
/// when the connection failed or closed without one (within 10 s).
pub async fn which_target(addr: SocketAddr) -> Option<String> {
    let ask = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"which?\n").await.ok()?;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        let text = String::from_utf8(out).ok()?;
        let tag = text.strip_suffix('\n')?;
        (!tag.is_empty()).then(|| tag.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), ask)
        .await
        .ok()
        .flatten()
}
