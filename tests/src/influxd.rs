//! A private InfluxDB 1.x (`influxd`) for tests.
//!
//! [`Influxd::start`] writes a config file into a temporary directory (meta, data and WAL
//! directories inside it; HTTP and RPC bound to free ports on 127.0.0.1; reporting, monitoring
//! and background services off), starts `influxd run -config …`, waits until `/ping` answers,
//! and creates an admin user (allowed unauthenticated while no user exists). The process is
//! killed when the value is dropped.
//!
//! Ports are picked by binding 127.0.0.1:0 and releasing them; if influxd then finds a port
//! taken by someone else, start-up is retried with new ports.
//!
//! The binary is `$POSTERN_INFLUXD` if set, else `/usr/bin/influxd` (Debian's `influxdb`
//! package, 1.6.x).

use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long influxd may take to answer `/ping` after it is started.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times start-up is retried when a port turns out to be taken.
const PORT_ATTEMPTS: usize = 10;

/// How to run influxd.
#[derive(Debug, Clone, Copy, Default)]
pub struct InfluxdOptions {
    /// `[http] auth-enabled`: every request (except `/ping`) needs a user.
    pub auth: bool,
}

/// An HTTP answer from influxd.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    /// The body as JSON (`Value::Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// The first statement's `error`, or the top-level `error`, if any.
    pub fn error(&self) -> Option<String> {
        let v = self.json();
        v.get("error")
            .or_else(|| v.pointer("/results/0/error"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    }
}

/// A running influxd.
pub struct Influxd {
    child: Child,
    dir: tempfile::TempDir,
    http: SocketAddr,
    admin_user: String,
    admin_password: String,
    client: reqwest::Client,
    /// The `[[udp]]` line protocol listener, if started with one.
    udp: Option<SocketAddr>,
}

/// Two distinct free ports outside the ephemeral range (see [`crate::ports::free_port`]).
fn free_ports() -> anyhow::Result<(u16, u16)> {
    Ok((crate::ports::free_port(), crate::ports::free_port()))
}

fn binary() -> PathBuf {
    std::env::var_os("POSTERN_INFLUXD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/influxd"))
}

/// A `[[udp]]` section: line protocol datagrams on `bind` written to `database`, flushed in
/// small batches so that tests see points soon.
fn udp_section(bind: SocketAddr, database: &str) -> String {
    format!(
        r#"
[[udp]]
  enabled = true
  bind-address = "{bind}"
  database = "{database}"
  batch-size = 1000
  batch-pending = 100
  batch-timeout = "50ms"
  read-buffer = 8388608
"#
    )
}

fn config_text(dir: &Path, http: SocketAddr, rpc: SocketAddr, auth: bool) -> String {
    let d = dir.display();
    format!(
        r#"reporting-disabled = true
bind-address = "{rpc}"

[meta]
  dir = "{d}/meta"
  logging-enabled = false

[data]
  dir = "{d}/data"
  wal-dir = "{d}/wal"
  query-log-enabled = false
  wal-fsync-delay = "0s"

[retention]
  enabled = false

[shard-precreation]
  enabled = false

[monitor]
  store-enabled = false

[http]
  enabled = true
  bind-address = "{http}"
  auth-enabled = {auth}
  log-enabled = false
  pprof-enabled = false

[subscriber]
  enabled = false

[continuous_queries]
  enabled = false
"#
    )
}

impl Influxd {
    /// Starts a private influxd and creates its admin user.
    pub async fn start(opts: InfluxdOptions) -> anyhow::Result<Influxd> {
        Self::start_inner(opts, None).await
    }

    /// [`start`](Self::start) with the `[[udp]]` listener enabled on a free port of 127.0.0.1,
    /// writing to `database` (see [`udp_addr`](Self::udp_addr)).
    pub async fn start_with_udp(opts: InfluxdOptions, database: &str) -> anyhow::Result<Influxd> {
        Self::start_inner(opts, Some(database)).await
    }

    async fn start_inner(opts: InfluxdOptions, udp_db: Option<&str>) -> anyhow::Result<Influxd> {
        let bin = binary();
        if !bin.exists() {
            bail!(
                "{} not found: install InfluxDB 1.x (Debian package `influxdb`) or set POSTERN_INFLUXD",
                bin.display()
            );
        }
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()?;
        let mut last_err = anyhow!("influxd did not start");
        for _ in 0..PORT_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("postern-influxd-")
                .tempdir()?;
            let (http_port, rpc_port) = free_ports()?;
            let http: SocketAddr = format!("127.0.0.1:{http_port}").parse()?;
            let rpc: SocketAddr = format!("127.0.0.1:{rpc_port}").parse()?;
            let conf = dir.path().join("influxdb.conf");
            let udp = udp_db.map(|db| (crate::ports::free_udp_addr(), db));
            let mut text = config_text(dir.path(), http, rpc, opts.auth);
            if let Some((bind, db)) = udp {
                text.push_str(&udp_section(bind, db));
            }
            std::fs::write(&conf, text)?;
            let log = std::fs::File::create(dir.path().join("influxd.log"))?;
            let child = Command::new(&bin)
                .arg("run")
                .arg("-config")
                .arg(&conf)
                .env("INFLUXDB_DATA_QUERY_LOG_ENABLED", "false")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("spawn {}", bin.display()))?;
            let mut me = Influxd {
                child,
                dir,
                http,
                admin_user: "admin".into(),
                admin_password: format!("pw-{:016x}", rand::random::<u64>()),
                client: client.clone(),
                udp: udp.map(|(bind, _)| bind),
            };
            match me.wait_ready().await {
                Ok(()) => {
                    me.create_admin().await?;
                    return Ok(me);
                }
                Err(e) => {
                    let log = me.log();
                    let port_taken = log.contains("address already in use");
                    last_err = e.context(format!("influxd log:\n{log}"));
                    if !port_taken {
                        return Err(last_err);
                    }
                    // Dropping `me` kills the process; try again with new ports.
                }
            }
        }
        Err(last_err)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let url = format!("{}/ping", self.url());
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("influxd exited during start-up with {status}");
            }
            if let Ok(r) = self.client.get(&url).send().await {
                if r.status().as_u16() == 204 {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!("influxd did not answer /ping within {START_TIMEOUT:?}");
            }
            // Polling the process for readiness: there is no event to wait on.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn create_admin(&self) -> anyhow::Result<()> {
        let q = format!(
            "CREATE USER \"{}\" WITH PASSWORD '{}' WITH ALL PRIVILEGES",
            self.admin_user, self.admin_password
        );
        let r = self.query_as(None, None, &q).await?;
        if r.status != 200 || r.error().is_some() {
            bail!("creating the admin user failed: {} {}", r.status, r.body);
        }
        Ok(())
    }

    /// The HTTP API address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// The `[[udp]]` listener's address, when started with [`start_with_udp`](Self::start_with_udp).
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp
    }

    /// The admin user's name.
    pub fn admin_user(&self) -> &str {
        &self.admin_user
    }

    /// The admin user's password.
    pub fn admin_password(&self) -> &str {
        &self.admin_password
    }

    /// The temporary directory holding influxd's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// influxd's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("influxd.log")).unwrap_or_default()
    }

    /// Runs a statement as the admin user; fails on any HTTP or statement error.
    pub async fn query(&self, q: &str) -> anyhow::Result<Value> {
        let r = self
            .query_as(Some((&self.admin_user, &self.admin_password)), None, q)
            .await?;
        if r.status != 200 {
            bail!("{q}: HTTP {}: {}", r.status, r.body);
        }
        if let Some(e) = r.error() {
            bail!("{q}: {e}");
        }
        Ok(r.json())
    }

    /// Runs a statement with the given Basic credentials (or none) against `db`.
    pub async fn query_as(
        &self,
        auth: Option<(&str, &str)>,
        db: Option<&str>,
        q: &str,
    ) -> anyhow::Result<Reply> {
        let mut form = vec![("q", q)];
        if let Some(db) = db {
            form.push(("db", db));
        }
        let mut req = self
            .client
            .post(format!("{}/query", self.url()))
            .form(&form);
        if let Some((u, p)) = auth {
            req = req.basic_auth(u, Some(p));
        }
        let r = req.send().await.context("POST /query")?;
        Ok(Reply {
            status: r.status().as_u16(),
            body: r.text().await?,
        })
    }

    /// Writes line protocol to `db` with the given Basic credentials (or none).
    pub async fn write_as(
        &self,
        auth: Option<(&str, &str)>,
        db: &str,
        lines: &str,
    ) -> anyhow::Result<Reply> {
        let mut req = self
            .client
            .post(format!("{}/write", self.url()))
            .query(&[("db", db)])
            .body(lines.to_owned());
        if let Some((u, p)) = auth {
            req = req.basic_auth(u, Some(p));
        }
        let r = req.send().await.context("POST /write")?;
        Ok(Reply {
            status: r.status().as_u16(),
            body: r.text().await?,
        })
    }

    /// Names of every user (`SHOW USERS`).
    pub async fn users(&self) -> anyhow::Result<Vec<String>> {
        let v = self.query("SHOW USERS").await?;
        let values = v
            .pointer("/results/0/series/0/values")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        Ok(values
            .iter()
            .filter_map(|row| row.get(0).and_then(Value::as_str).map(str::to_owned))
            .collect())
    }
}

impl Drop for Influxd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
