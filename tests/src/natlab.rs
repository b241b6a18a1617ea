//! The NAT lab (tests/lab/natlab.sh) from Rust: a lab per test, torn down on drop, and a tunnel
//! of real `postern-relay`, `postern-outlet` and `postern-inlet` processes across it: the relay
//! on the public bridge, the inlet behind router A, the outlet behind router B, an echo server
//! beside the outlet. The tests (tests/direct_netns.rs) and, later, the bench share it.

use crate::clients::python;
use crate::kit::{node, Pki};
use crate::procs::{bin, Proc};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::Command;

/// The relay's address on the lab's public bridge.
pub const RELAY_IP: &str = "198.18.0.1";
/// Router B's public address (the outlet's NAT).
pub const ROUTER_B_IP: &str = "198.18.0.3";
/// The outlet's address on its private network.
pub const OUTLET_IP: &str = "10.2.0.2";
const RELAY_PORT: u16 = 4433;
/// Every process's metrics listen here, on its own namespace's loopback.
pub const OPS_PORT: u16 = 9464;
/// The echo server beside the outlet, and the inlet's listener for it.
pub const ECHO_PORT: u16 = 7000;
pub const LISTEN_PORT: u16 = 7001;

/// The lab script.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("lab/natlab.sh")
}

/// One lab: its namespaces are `<prefix>-{pub,ra,rb,a,a2,b,x}`.
pub struct Lab {
    pub prefix: String,
}

impl Lab {
    /// Creates a lab (both routers doing plain masquerade); Err says why it cannot (no root,
    /// no `ip` or `nft`), for the caller to skip with.
    pub fn up() -> Result<Self, String> {
        for tool in ["ip", "nft"] {
            let found = std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if !found {
                return Err(format!("`{tool}` is not installed"));
            }
        }
        let prefix = format!(
            "pd{}-{}",
            std::process::id() % 100_000,
            rand::random::<u16>()
        );
        let lab = Self { prefix };
        lab.run(&["up"])?;
        Ok(lab)
    }

    fn run(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec![args[0], &self.prefix];
        all.extend(&args[1..]);
        let out = std::process::Command::new(script())
            .args(&all)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script().display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "natlab.sh {}: {}",
                all.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Switches router `side` (`a` or `b`) to `eim` or `symmetric` NAT.
    pub fn nat(&self, side: &str, mode: &str) {
        self.run(&["nat", side, mode]).expect("switch NAT mode");
    }

    /// The routers drop UDP between the private networks (not to or from the relay).
    pub fn block_udp(&self) {
        self.run(&["block-udp"]).expect("block UDP");
    }

    /// Lets UDP between the private networks through again.
    pub fn unblock_udp(&self) {
        self.run(&["unblock-udp"]).expect("unblock UDP");
    }

    /// Router `side` drops UDP from its private network to the relay (its nodes fall back to
    /// TLS/TCP); UDP between the private networks still passes.
    pub fn block_relay_udp(&self, side: &str) {
        self.run(&["block-relay-udp", side])
            .expect("block UDP to the relay");
    }

    /// A NAT rebinding on router `side`: the host's UDP to the other network leaves from a new
    /// public port from now on (its mapping towards the relay is kept). Err where the lab
    /// cannot do it (no `conntrack` tool), for the caller to skip with.
    pub fn rebind(&self, side: &str) -> Result<(), String> {
        self.run(&["rebind", side])
    }

    /// Port-forwards TCP `port` on router `side`'s public address to the same port of the host
    /// behind it: plain TCP across both NATs, the bench's baseline for the direct path.
    pub fn forward(&self, side: &str, port: u16) -> Result<(), String> {
        self.run(&["forward", side, &port.to_string()])
    }

    /// The name of namespace `n`.
    pub fn ns(&self, n: &str) -> String {
        format!("{}-{n}", self.prefix)
    }

    /// `program args` inside namespace `n`.
    pub fn command(&self, n: &str, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(n)])
            .arg(program)
            .args(args);
        c
    }

    /// Runs Python `code` in namespace `n`: (success, stdout and stderr).
    pub async fn python(&self, n: &str, code: &str, args: &[&str]) -> (bool, String) {
        let out = self
            .command(n, &python(), &[&["-c", code][..], args].concat())
            .output()
            .await
            .expect("run python");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// GET `path` from the metrics endpoint of namespace `n`: (status, body).
    pub async fn get(&self, n: &str, path: &str) -> Option<(u16, String)> {
        const GET: &str = r#"
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}{sys.argv[2]}", timeout=2)
    print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"#;
        let (ok, out) = self.python(n, GET, &[&OPS_PORT.to_string(), path]).await;
        if !ok {
            return None;
        }
        let (status, body) = out.split_once('\n')?;
        Some((status.trim().parse().ok()?, body.to_owned()))
    }

    /// The value of the metric sample `sample` (name and labels, as rendered) in namespace `n`.
    pub async fn metric(&self, n: &str, sample: &str) -> Option<f64> {
        let (_, body) = self.get(n, "/metrics").await?;
        sample_value(&body, sample)
    }

    /// Waits until `/readyz` in namespace `n` answers 200.
    pub async fn wait_ready(&self, n: &str, proc: &Proc) {
        let deadline = Instant::now() + Duration::from_secs(40);
        while !matches!(self.get(n, "/readyz").await, Some((200, _))) {
            assert!(
                Instant::now() < deadline,
                "{} never became ready; log:\n{}",
                proc.name,
                proc.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}

/// The value of `sample` (e.g. `name{label="x"}`) in a Prometheus text exposition.
pub fn sample_value(body: &str, sample: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

const ECHO_SERVER: &str = r#"
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(64)
def serve(c):
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.shutdown(socket.SHUT_WR); c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Sends `total` random bytes through the echo service in 1 MiB chunks, `pause` seconds
/// apart, reading the echo as it comes; prints the bytes received and whether the SHA-256 of
/// what came back matches what was sent.
pub const PACED_ECHO_CLIENT: &str = r#"
import hashlib, os, socket, sys, threading, time
total, pause = int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=60)
sent = hashlib.sha256()
def write():
    left = total
    while left:
        b = os.urandom(min(left, 1 << 20)); sent.update(b); s.sendall(b); left -= len(b)
        time.sleep(pause)
    s.shutdown(socket.SHUT_WR)
w = threading.Thread(target=write); w.start()
got, n = hashlib.sha256(), 0
while True:
    d = s.recv(1 << 16)
    if not d:
        break
    got.update(d); n += len(d)
w.join()
print(n, sent.hexdigest() == got.hexdigest())
"#;

/// A tunnel across the lab: relay on the bridge, inlet (namespace `a`) behind router A,
/// outlet (namespace `b`) behind router B with an echo server beside it.
pub struct LabTunnel {
    pub relay: Proc,
    pub outlet: Proc,
    pub inlet: Proc,
    inlet_args: Vec<String>,
    _echo: tokio::process::Child,
    dir: tempfile::TempDir,
}

impl LabTunnel {
    /// Starts the tunnel, the inlet with `direct = inlet_direct`, the outlet with
    /// `outlet_direct`; waits until both nodes are ready.
    pub async fn start(lab: &Lab, inlet_direct: &str, outlet_direct: &str) -> Self {
        Self::start_beside(lab, inlet_direct, outlet_direct, "b").await
    }

    /// As [`LabTunnel::start`], with the outlet and its echo server in namespace `outlet_ns`
    /// (`a2`: beside the inlet, behind the same router).
    pub async fn start_beside(
        lab: &Lab,
        inlet_direct: &str,
        outlet_direct: &str,
        outlet_ns: &str,
    ) -> Self {
        let echo = lab
            .command(
                outlet_ns,
                &python(),
                &["-c", ECHO_SERVER, &ECHO_PORT.to_string()],
            )
            .kill_on_drop(true)
            .spawn()
            .expect("echo server");
        Self::start_in(lab, inlet_direct, outlet_direct, echo, outlet_ns, "udp").await
    }

    /// As [`LabTunnel::start`] (both nodes `direct = auto`), with the inlet's `transport` set
    /// to `inlet_transport` (`auto`: it falls back to TLS/TCP where UDP to the relay is
    /// blocked, see [`Lab::block_relay_udp`]); the outlet uses UDP.
    pub async fn start_inlet_transport(lab: &Lab, inlet_transport: &str) -> Self {
        let echo = lab
            .command("b", &python(), &["-c", ECHO_SERVER, &ECHO_PORT.to_string()])
            .kill_on_drop(true)
            .spawn()
            .expect("echo server");
        Self::start_in(lab, "auto", "auto", echo, "b", inlet_transport).await
    }

    /// As [`LabTunnel::start`], with `server` (already running in namespace `b` on
    /// `127.0.0.1:ECHO_PORT`, kept until the tunnel is dropped) in place of the echo server.
    pub async fn start_with(
        lab: &Lab,
        inlet_direct: &str,
        outlet_direct: &str,
        server: tokio::process::Child,
    ) -> Self {
        Self::start_in(lab, inlet_direct, outlet_direct, server, "b", "udp").await
    }

    async fn start_in(
        lab: &Lab,
        inlet_direct: &str,
        outlet_direct: &str,
        server: tokio::process::Child,
        outlet_ns: &str,
        inlet_transport: &str,
    ) -> Self {
        let echo = server;
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::new();
        let write = |name: &str| {
            let issued = pki
                .ca()
                .issue(&node(name), Duration::from_secs(3600))
                .expect("issue");
            let cert = dir.path().join(format!("{name}.pem"));
            let key = dir.path().join(format!("{name}.key"));
            std::fs::write(&cert, &issued.cert_pem).expect("write cert");
            std::fs::write(&key, &issued.key_pem).expect("write key");
            (cert.display().to_string(), key.display().to_string())
        };
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, pki.ca_pem()).expect("write ca");
        let ca = ca.display().to_string();
        let (relay_cert, relay_key) = write("relay");
        let (outlet_cert, outlet_key) = write("outlet-lab");
        let (inlet_cert, inlet_key) = write("inlet-lab");
        let state = |n: &str| dir.path().join(n).display().to_string();
        let relay_addr = format!("{RELAY_IP}:{RELAY_PORT}");
        let ops = format!("127.0.0.1:{OPS_PORT}");

        let relay = Proc::start(
            lab.command(
                "pub",
                &bin("postern-relay"),
                &[
                    "run",
                    "--listen",
                    &relay_addr,
                    "--cert",
                    &relay_cert,
                    "--key",
                    &relay_key,
                    "--ca",
                    &ca,
                    "--state-dir",
                    &state("relay-state"),
                    "--allow-register",
                    "echo=name = \"outlet-lab\"",
                    "--allow-route",
                    "echo=name = \"inlet-lab\"",
                    "--metrics-addr",
                    &ops,
                ],
            ),
            dir.path(),
            "relay",
        );
        lab.wait_ready("pub", &relay).await;
        let node_args = |cert: &str, key: &str, st: String, direct: &str| -> Vec<String> {
            [
                "run",
                "--relay",
                &relay_addr,
                "--cert",
                cert,
                "--key",
                key,
                "--ca",
                &ca,
                "--state-dir",
                &st,
                "--metrics-addr",
                &ops,
                "--transport",
                "udp",
                "--direct",
                direct,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        let mut args = node_args(
            &outlet_cert,
            &outlet_key,
            state("outlet-state"),
            outlet_direct,
        );
        args.extend(["--service".into(), format!("echo=127.0.0.1:{ECHO_PORT}")]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let outlet = Proc::start(
            lab.command(outlet_ns, &bin("postern-outlet"), &args),
            dir.path(),
            "outlet",
        );
        let mut inlet_args = node_args(&inlet_cert, &inlet_key, state("inlet-state"), inlet_direct);
        if let Some(i) = inlet_args.iter().position(|a| a == "--transport") {
            inlet_args[i + 1] = inlet_transport.to_owned();
        }
        inlet_args.extend(["--service".into(), format!("echo=127.0.0.1:{LISTEN_PORT}")]);
        let args: Vec<&str> = inlet_args.iter().map(String::as_str).collect();
        let inlet = Proc::start(
            lab.command("a", &bin("postern-inlet"), &args),
            dir.path(),
            "inlet",
        );
        lab.wait_ready(outlet_ns, &outlet).await;
        lab.wait_ready("a", &inlet).await;
        Self {
            relay,
            outlet,
            inlet,
            inlet_args,
            _echo: echo,
            dir,
        }
    }

    /// Kills the inlet and starts it again with the same flags and state; waits until it is
    /// ready. Its next client connection sets up a new route (the bench times how long that
    /// route takes to go direct).
    pub async fn restart_inlet(&mut self, lab: &Lab) {
        let _ = self.inlet.child.start_kill();
        let _ = self.inlet.child.wait().await;
        let args: Vec<&str> = self.inlet_args.iter().map(String::as_str).collect();
        self.inlet = Proc::start(
            lab.command("a", &bin("postern-inlet"), &args),
            self.dir.path(),
            "inlet",
        );
        lab.wait_ready("a", &self.inlet).await;
    }

    /// `postern-relay status` (`--json` when `json`) against the lab's relay, run in its
    /// namespace: (success, output).
    pub async fn relay_status(&self, lab: &Lab, json: bool) -> (bool, String) {
        let state = self.dir.path().join("relay-state").display().to_string();
        let mut args = vec!["status", "--state-dir", &state];
        if json {
            args.push("--json");
        }
        let out = lab
            .command("pub", &bin("postern-relay"), &args)
            .output()
            .await
            .expect("run postern-relay status");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Whether the relay's admin API (through `postern-relay status --json`) shows every route
    /// it has as direct (`Some(true)`), every one relayed (`Some(false)`); `None` while it
    /// has no route or mixed answers, or cannot be asked.
    pub async fn relay_shows_direct(&self, lab: &Lab) -> Option<bool> {
        let (ok, out) = self.relay_status(lab, true).await;
        if !ok {
            return None;
        }
        let doc: serde_json::Value = serde_json::from_str(&out).ok()?;
        let flags: Vec<bool> = doc["routes"]["routes"]
            .as_array()?
            .iter()
            .map(|r| r["direct"].as_bool())
            .collect::<Option<_>>()?;
        match flags.first() {
            Some(first) if flags.iter().all(|f| f == first) => Some(*first),
            _ => None,
        }
    }

    /// The three logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "inlet log:\n{}\noutlet log:\n{}\nrelay log:\n{}",
            self.inlet.log(),
            self.outlet.log(),
            self.relay.log()
        )
    }
}
