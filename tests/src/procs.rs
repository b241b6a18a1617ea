//! The real binaries of this workspace, run as a test runs them: short commands whose output is
//! checked, long-running processes with their logs, and the identity files they are given.

use crate::kit::{node, Pki};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// A binary of this workspace, built next to this test executable (`cargo build --bins`, which
/// scripts/test.sh runs before the tests).
pub fn bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let here = exe.parent().expect("executable in a directory");
    // A test executable is in <target>/<profile>/deps; the bench binary in <target>/<profile>.
    let dir = match here.parent() {
        Some(up) if here.ends_with("deps") => up,
        _ => here,
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --bins` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Runs a short-lived command of a postern binary; returns its stdout, failing on error.
pub async fn cli(program: &str, args: &[&str]) -> String {
    let out = Command::new(bin(program))
        .args(args)
        .output()
        .await
        .expect("run");
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a postern binary that is to fail; returns its stderr.
pub async fn cli_fails(program: &str, args: &[&str]) -> String {
    let out = Command::new(bin(program))
        .args(args)
        .output()
        .await
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{program} {args:?} succeeded: {}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// Runs a postern binary logging warnings only, for a test that checks success or failure
/// itself; returns (success, stdout, stderr).
pub async fn cli_output(program: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin(program))
        .args(args)
        .env("POSTERN_LOG", "warn")
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running binary whose stderr goes to a log file (printed when a check fails); killed on
/// drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts the workspace binary `program` with `args`, logging at INFO to `dir/NAME.log`.
    pub fn spawn(dir: &Path, name: &str, program: &str, args: &[&str]) -> Self {
        let mut cmd = Command::new(bin(program));
        cmd.args(args);
        Self::start(cmd, dir, name)
    }

    /// Starts `cmd` (e.g. one that enters a network namespace first), logging at INFO to
    /// `dir/NAME.log`.
    pub fn start(mut cmd: Command, dir: &Path, name: &str) -> Self {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        // Nodes keep to the relay unless the test asks otherwise (`--direct auto`, or this
        // variable set by the test): on loopback any route could go direct, and the tests
        // about the relay path (its counters, losing it) must stay on it.
        let asked = cmd.as_std().get_envs().any(|(k, _)| k == "POSTERN_DIRECT");
        if !asked {
            cmd.env("POSTERN_DIRECT", "never");
        }
        let child = cmd
            .env("POSTERN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Self {
            name: name.into(),
            child,
            log,
        }
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Asks it to drain and stop, as a service manager does.
    pub fn sigterm(&self) {
        let pid = self.child.id().expect("process still running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid}");
    }

    /// Asks it to reload its config, as `systemctl reload` does.
    pub fn sighup(&self) {
        let pid = self.child.id().expect("process still running");
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP {pid}");
    }

    /// Waits for the process to exit; returns its status.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(s) => s.expect("wait"),
            Err(_) => panic!(
                "{} did not exit within {timeout:?}; its log:\n{}",
                self.name,
                self.log()
            ),
        }
    }

    /// Waits until `/readyz` on `ops` answers 200.
    pub async fn wait_ready(&mut self, ops: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}); its log:\n{}", self.name, self.log());
            }
            if let Ok(Ok(mut s)) =
                tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(ops)).await
            {
                let _ = s.write_all(b"GET /readyz HTTP/1.1\r\n\r\n").await;
                let mut out = String::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut out)).await;
                if out.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} never became ready; its log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The PEM files of an identity, as a binary is given them.
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl IdentityFiles {
    /// `--cert CERT --key KEY --ca CA`.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--cert".into(),
            self.cert.display().to_string(),
            "--key".into(),
            self.key.display().to_string(),
            "--ca".into(),
            self.ca.display().to_string(),
        ]
    }
}

/// Writes a certificate and key for `name` (`NAME.pem`, `NAME.key`) and the CA (`ca.pem`) into
/// `dir`.
pub fn write_identity(pki: &Pki, name: &str, dir: &Path) -> IdentityFiles {
    let issued = pki
        .ca()
        .issue(&node(name), Duration::from_secs(3600))
        .expect("issue");
    let files = IdentityFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
        ca: dir.join("ca.pem"),
    };
    std::fs::write(&files.cert, issued.cert_pem).expect("write cert");
    std::fs::write(&files.key, issued.key_pem).expect("write key");
    std::fs::write(&files.ca, pki.ca_pem()).expect("write ca");
    files
}

/// A relay's state directory set up by the real `postern-relay ca init`, from which tickets
/// are created as an operator creates them.
pub struct RelayCa {
    /// The state directory (`--state-dir`).
    pub state: String,
    /// The relay address the tickets name (`--relay`).
    pub relay_addr: String,
}

impl RelayCa {
    /// Runs `postern-relay ca init --state-dir STATE`; its tickets will name `relay_addr`.
    pub async fn init(state: &str, relay_addr: &str) -> Self {
        cli("postern-relay", &["ca", "init", "--state-dir", state]).await;
        Self {
            state: state.to_string(),
            relay_addr: relay_addr.to_string(),
        }
    }

    /// `postern-relay ticket create --attr role=ROLE`: the ticket it prints.
    pub async fn ticket(&self, role: &str) -> String {
        self.ticket_with(&[&format!("role={role}")]).await
    }

    /// `postern-relay ticket create --attr KEY=VALUE…`: the ticket it prints.
    pub async fn ticket_with(&self, attrs: &[&str]) -> String {
        let mut args = vec!["ticket", "create"];
        for a in attrs {
            args.extend(["--attr", a]);
        }
        args.extend(["--relay", &self.relay_addr, "--state-dir", &self.state]);
        cli("postern-relay", &args).await.trim().to_owned()
    }
}
