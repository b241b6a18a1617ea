//! The TLS/TCP fallback where UDP is really blocked: real `postern-relay`, `postern-outlet` and
//! `postern-inlet` processes in a network namespace this test creates, whose routing policy
//! blackholes every UDP packet (`ip rule ... ipproto udp blackhole`, ahead of the local table),
//! so QUIC over UDP gets no answer while TCP works. The nodes run with the default
//! `transport = auto`: they must find out by themselves and move to TLS/TCP.
//!
//! Needs root and `ip netns` (skipped, saying why, where they are missing); the binaries are
//! those next to this test executable (`cargo build --bins`, as scripts/test.sh does).

use postern_tests::clients::python;
use postern_tests::kit::*;
use postern_tests::ports::free_port;
use postern_tests::procs::{bin, Proc};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::process::Command;

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with loopback up; Err says why it cannot (no root, no `ip`).
    fn create() -> Result<Self, String> {
        let name = format!(
            "postern-fb-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        );
        run_ip(&["netns", "add", &name])?;
        let ns = Self { name };
        run_ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Drops all UDP in the namespace: a blackhole rule for IP protocol 17 placed before the
    /// lookup of the local table (which otherwise delivers loopback traffic first).
    fn block_udp(&self) -> Result<(), String> {
        run_ip(&[
            "-n",
            &self.name,
            "rule",
            "add",
            "pref",
            "10",
            "ipproto",
            "udp",
            "blackhole",
        ])?;
        run_ip(&["-n", &self.name, "rule", "del", "pref", "0"])?;
        run_ip(&[
            "-n", &self.name, "rule", "add", "pref", "100", "lookup", "local",
        ])
    }

    /// `ip netns exec <ns> program args...`
    fn command(&self, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name])
            .arg(program)
            .args(args);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run_ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A postern binary started inside the namespace, its stderr in a log file.
fn spawn_in(ns: &Netns, dir: &Path, name: &str, program: &Path, args: &[&str]) -> Proc {
    Proc::start(ns.command(program, args), dir, name)
}

/// Runs a Python snippet inside the namespace; returns (success, stdout + stderr).
async fn python_in(ns: &Netns, code: &str, args: &[&str]) -> (bool, String) {
    let out = ns
        .command(&python(), &[&["-c", code][..], args].concat())
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

/// GET `path` on `127.0.0.1:port` inside the namespace: (status, body), or None if no answer.
async fn http_get_in(ns: &Netns, port: u16, path: &str) -> Option<(u16, String)> {
    const GET: &str = r#"
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}{sys.argv[2]}", timeout=2)
    print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"#;
    let (ok, out) = python_in(ns, GET, &[&port.to_string(), path]).await;
    if !ok {
        return None;
    }
    let (status, body) = out.split_once('\n')?;
    Some((status.trim().parse().ok()?, body.to_owned()))
}

/// Polls `/readyz` until it answers 200; returns its body.
async fn wait_ready(ns: &Netns, port: u16, proc: &Proc) -> String {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some((200, body)) = http_get_in(ns, port, "/readyz").await {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{} never became ready; log:\n{}",
            proc.name,
            proc.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const UDP_PROBE: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); s.settimeout(0.5)
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    c.sendto(b"probe", s.getsockname())
    s.recv(16)
    print("udp passes")
except OSError as e:
    print("udp blocked:", e)
t = socket.socket(); t.bind(("127.0.0.1", 0)); t.listen()
socket.create_connection(t.getsockname(), timeout=2)
print("tcp passes")
"#;

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

const ECHO_CLIENT: &str = r#"
import hashlib, os, socket, sys, threading
total = int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
sent = hashlib.sha256()
def write():
    left = total
    while left:
        b = os.urandom(min(left, 65536)); sent.update(b); s.sendall(b); left -= len(b)
    s.shutdown(socket.SHUT_WR)
w = threading.Thread(target=write); w.start()
got, n = hashlib.sha256(), 0
while True:
    d = s.recv(65536)
    if not d:
        break
    got.update(d); n += len(d)
w.join()
print(n, sent.hexdigest() == got.hexdigest())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_behind_a_udp_blocking_network_fall_back_to_tls_over_tcp() {
    init_logging();
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(why) => {
            println!(
                "SKIPPED: cannot create a network namespace ({why}); needs root and `ip netns`"
            );
            return;
        }
    };
    if let Err(why) = ns.block_udp() {
        println!("SKIPPED: cannot block UDP in the namespace ({why}); needs `ip rule ... ipproto`");
        return;
    }
    let (ok, probe) = python_in(&ns, UDP_PROBE, &[]).await;
    assert!(ok, "probe failed: {probe}");
    assert!(
        probe.contains("udp blocked") && probe.contains("tcp passes"),
        "the namespace must drop UDP and pass TCP: {probe}"
    );

    // Identities from a throwaway CA, written where the processes read them.
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
    let (outlet_cert, outlet_key) = write("outlet-ns");
    let (inlet_cert, inlet_key) = write("inlet-ns");

    let port = || free_port().to_string();
    let (relay_port, echo_port, listen_port) = (port(), port(), port());
    let (relay_ops, outlet_ops, inlet_ops) = (free_port(), free_port(), free_port());
    let relay_addr = format!("127.0.0.1:{relay_port}");
    let state = |n: &str| dir.path().join(n).display().to_string();

    let _echo = ns
        .command(&python(), &["-c", ECHO_SERVER, &echo_port])
        .kill_on_drop(true)
        .spawn()
        .expect("echo server");
    let relay = spawn_in(
        &ns,
        dir.path(),
        "relay",
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
            "echo=name = \"outlet-ns\"",
            "--allow-route",
            "echo=name = \"inlet-ns\"",
            "--metrics-addr",
            &format!("127.0.0.1:{relay_ops}"),
        ],
    );
    wait_ready(&ns, relay_ops, &relay).await;
    let node_args = |cert: &str, key: &str, st: &str, ops: u16| -> Vec<String> {
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
            st,
            "--metrics-addr",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("127.0.0.1:{ops}")])
        .collect()
    };
    let mut outlet_args = node_args(
        &outlet_cert,
        &outlet_key,
        &state("outlet-state"),
        outlet_ops,
    );
    outlet_args.extend(["--service".into(), format!("echo=127.0.0.1:{echo_port}")]);
    let outlet_args: Vec<&str> = outlet_args.iter().map(String::as_str).collect();
    let outlet = spawn_in(
        &ns,
        dir.path(),
        "outlet",
        &bin("postern-outlet"),
        &outlet_args,
    );
    let mut inlet_args = node_args(&inlet_cert, &inlet_key, &state("inlet-state"), inlet_ops);
    inlet_args.extend(["--service".into(), format!("echo=127.0.0.1:{listen_port}")]);
    let inlet_args: Vec<&str> = inlet_args.iter().map(String::as_str).collect();
    let inlet = spawn_in(&ns, dir.path(), "inlet", &bin("postern-inlet"), &inlet_args);

    // Both nodes try UDP, get silence, and come up over TLS/TCP; /readyz says so.
    let outlet_ready = wait_ready(&ns, outlet_ops, &outlet).await;
    let inlet_ready = wait_ready(&ns, inlet_ops, &inlet).await;
    let via = format!("relay {relay_addr} via tcp");
    assert!(
        outlet_ready.contains(&via),
        "outlet /readyz: {outlet_ready}"
    );
    assert!(inlet_ready.contains(&via), "inlet /readyz: {inlet_ready}");
    for p in [&outlet, &inlet] {
        assert!(
            p.log().contains("using TLS/TCP"),
            "{} tried UDP first and said it fell back; log:\n{}",
            p.name,
            p.log()
        );
    }
    let (_, metrics) = http_get_in(&ns, inlet_ops, "/metrics")
        .await
        .expect("metrics");
    let gauge =
        format!("postern_inlet_relay_transport{{relay=\"{relay_addr}\",transport=\"tcp\"}} 1");
    assert!(metrics.contains(&gauge), "{gauge} in:\n{metrics}");

    // Data flows: 4 MiB each way through inlet, relay (over TLS/TCP) and outlet.
    let total = (4 * 1024 * 1024).to_string();
    let (ok, out) = python_in(&ns, ECHO_CLIENT, &[&listen_port, &total]).await;
    assert!(
        ok && out.trim() == format!("{total} True"),
        "echo through the tunnel: {out}\ninlet log:\n{}\noutlet log:\n{}\nrelay log:\n{}",
        inlet.log(),
        outlet.log(),
        relay.log()
    );
}
