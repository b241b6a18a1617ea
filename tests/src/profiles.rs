//! Real outlet and inlet binaries whose identities carry attributes, for the tests of lease
//! profiles (chosen by those attributes) and of `postern-inlet lease create|show`: the outlet
//! runs with an `[influxdb-outlet]` section the test writes, each inlet with one
//! `kind = "influxdb"` listener, each in a state directory of its own under the test's
//! directory, around an in-process relay.

use crate::kit::{node, Pki};
use crate::ports::free_port;
use crate::procs::{cli_output, IdentityFiles, Proc};
use postern_proto::policy::Attributes;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One node run as its binary.
pub struct NodeProc {
    pub proc: Proc,
    pub state: PathBuf,
    pub ops: SocketAddr,
}

/// Writes a certificate for `name` carrying `attrs` (`NAME.pem`, `NAME.key`) and the CA
/// (`ca.pem`) into `dir`.
pub fn identity_with(pki: &Pki, name: &str, attrs: &[(&str, &str)], dir: &Path) -> IdentityFiles {
    let attrs: Attributes = attrs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let issued = pki
        .ca()
        .issue_with(&node(name), &attrs, Duration::from_secs(3600))
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

fn local() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().expect("addr")
}

/// Starts `postern-outlet run` as `outlet-1` with `influxdb_section` (the body of its
/// `[influxdb-outlet]` table) and waits until it is ready.
pub async fn start_outlet(
    pki: &Pki,
    dir: &Path,
    relay: SocketAddr,
    influxdb_section: &str,
) -> NodeProc {
    let ids = identity_with(pki, "outlet-1", &[], dir);
    let state = dir.join("outlet-state");
    let config = dir.join("outlet.toml");
    std::fs::write(
        &config,
        format!(
            "relay = \"{relay}\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\nstate-dir = \"{}\"\n\n\
             [influxdb-outlet]\n{influxdb_section}",
            ids.cert.display(),
            ids.key.display(),
            ids.ca.display(),
            state.display(),
        ),
    )
    .expect("write outlet.toml");
    let ops = local();
    let config = config.display().to_string();
    let ops_s = ops.to_string();
    let mut proc = Proc::spawn(
        dir,
        "outlet",
        "postern-outlet",
        &["run", "--config", &config, "--metrics-addr", &ops_s],
    );
    proc.wait_ready(ops).await;
    NodeProc { proc, state, ops }
}

/// Starts `postern-inlet run` as `name` with `attrs` in its certificate and an `influxdb`
/// listener (`kind=influxdb`) on `listen`; waits until it is ready.
pub async fn start_inlet(
    pki: &Pki,
    dir: &Path,
    relay: SocketAddr,
    name: &str,
    attrs: &[(&str, &str)],
    listen: SocketAddr,
) -> NodeProc {
    let ids = identity_with(pki, name, attrs, dir);
    let state = dir.join(format!("{name}-state"));
    let ops = local();
    let mut args = vec![
        "run".to_owned(),
        "--relay".into(),
        relay.to_string(),
        "--state-dir".into(),
        state.display().to_string(),
        "--service".into(),
        format!("influxdb={listen},kind=influxdb"),
        "--metrics-addr".into(),
        ops.to_string(),
    ];
    args.extend(ids.flags());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proc = Proc::spawn(dir, name, "postern-inlet", &args);
    // Ready means more than up here: a leased service holds its lease. An inlet whose
    // identity gets no lease never is, so wait for its admin socket instead.
    let socket = state.join("inlet.sock");
    crate::wait::eventually(Duration::from_secs(30), "the inlet's admin socket", || {
        let socket = socket.clone();
        async move { socket.exists() }
    })
    .await;
    NodeProc { proc, state, ops }
}

/// `postern-inlet lease ARGS --state-dir STATE`: success, stdout, stderr.
pub async fn inlet_lease(state: &Path, args: &[&str]) -> (bool, String, String) {
    let state = state.display().to_string();
    let mut all = vec!["lease"];
    all.extend_from_slice(args);
    all.extend(["--state-dir", &state]);
    cli_output("postern-inlet", &all).await
}

/// `postern-outlet lease ARGS --state-dir STATE`: success, stdout, stderr.
pub async fn outlet_lease(state: &Path, args: &[&str]) -> (bool, String, String) {
    let state = state.display().to_string();
    let mut all = vec!["lease"];
    all.extend_from_slice(args);
    all.extend(["--state-dir", &state]);
    cli_output("postern-outlet", &all).await
}

/// The value after `name` on the line of `text` that starts with it (`username:   x`).
pub fn field(text: &str, name: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// One line of `postern-outlet lease list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedLease {
    pub lease_id: String,
    pub client: String,
    pub profile: String,
    /// It is the lease streamed to its client now.
    pub current: bool,
}

/// The leases `postern-outlet lease list` shows for the outlet with state directory `state`.
pub async fn listed_leases(state: &Path) -> Vec<ListedLease> {
    let (ok, out, err) = outlet_lease(state, &["list"]).await;
    assert!(ok, "lease list: {err}");
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() >= 5).then(|| ListedLease {
                lease_id: cols[0].to_owned(),
                client: cols[1].to_owned(),
                profile: cols[3].to_owned(),
                current: cols.last() == Some(&"yes"),
            })
        })
        .collect()
}

/// The lease currently streamed to `client`, if any.
pub async fn current_lease_of(state: &Path, client: &str) -> Option<ListedLease> {
    listed_leases(state)
        .await
        .into_iter()
        .find(|l| l.client == client && l.current)
}

/// The InfluxDB 1.x user of a lease among `users` (its name ends with the lease id).
pub fn user_of_lease<'a>(users: &'a [String], lease_id: &str) -> Option<&'a str> {
    let suffix = format!("_{lease_id}");
    users
        .iter()
        .find(|u| u.starts_with("postern_") && u.ends_with(&suffix))
        .map(String::as_str)
}
