//! A private three-member etcd cluster on 127.0.0.1 for the fleet tests.
//!
//! [`EtcdCluster::start`] runs three `etcd` processes (Debian's `etcd-server`; the binary is
//! `$POSTERN_ETCD` if set, else `etcd` on the PATH) with client and peer ports picked by
//! [`free_port`](crate::ports::free_port) and data directories in a temporary directory, and
//! waits until every member says it is healthy. Members can be stopped and started again
//! (with their data) to take quorum away and give it back. All are killed on drop.

use crate::ports::free_port;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a cluster may take to become healthy.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// See the module docs.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    initial_cluster: String,
}

fn binary() -> PathBuf {
    std::env::var_os("POSTERN_ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

impl EtcdCluster {
    /// Starts three members and waits until all are healthy.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("tempdir")?;
        let members: Vec<Member> = (0..3)
            .map(|i| Member {
                name: format!("etcd{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            dir,
            members,
            initial_cluster,
        };
        for i in 0..3 {
            cluster.start_member(i)?;
        }
        for i in 0..3 {
            cluster.wait_healthy(i).await?;
        }
        Ok(cluster)
    }

    /// The client URLs of every member (`http://127.0.0.1:PORT`).
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// The `--etcd URL` flags of a relay for this cluster.
    pub fn flags(&self) -> Vec<String> {
        self.endpoints()
            .into_iter()
            .flat_map(|e| ["--etcd".to_string(), e])
            .collect()
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.log", self.members[i].name))
    }

    /// The log of member `i` so far.
    pub fn member_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log(i)).unwrap_or_default()
    }

    /// Starts member `i` (again, with its data, when it ran before).
    pub fn start_member(&mut self, i: usize) -> anyhow::Result<()> {
        let data = self.dir.path().join(&self.members[i].name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(i))
            .context("etcd log")?;
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new(binary())
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "postern-test"])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "start {} (install Debian's etcd-server, or set POSTERN_ETCD)",
                    binary().display()
                )
            })?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Kills member `i` (SIGKILL, as a crash).
    pub fn stop_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills every member: the cluster is gone (quorum lost).
    pub fn stop_all(&mut self) {
        for i in 0..self.members.len() {
            self.stop_member(i);
        }
    }

    /// Starts every stopped member and waits until all are healthy.
    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.start_member(i)?;
            }
        }
        for i in 0..self.members.len() {
            self.wait_healthy(i).await?;
        }
        Ok(())
    }

    /// Waits until member `i` answers `/health` with `"health":"true"` (it has a leader).
    pub async fn wait_healthy(&mut self, i: usize) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{}/health", self.members[i].client_port);
        let client = reqwest::Client::new();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(c) = self.members[i].child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!(
                        "etcd member {} exited ({status}); its log:\n{}",
                        self.members[i].name,
                        self.member_log(i)
                    );
                }
            }
            if let Ok(r) = client
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                if let Ok(body) = r.text().await {
                    if body.contains("\"health\":\"true\"") {
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd member {} not healthy after {START_TIMEOUT:?}; its log:\n{}",
                    self.members[i].name,
                    self.member_log(i)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The temporary directory (data and logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}
