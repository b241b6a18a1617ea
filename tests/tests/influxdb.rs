//! Real InfluxDB 1.x (Debian's influxd) behind an outlet, real clients (the `influx` CLI, the
//! Python `influxdb` library) pointed at the inlet.

use postern_inlet::ServiceKind;
use postern_outlet::lease::{InfluxdbOutletConfig, LeaseManager};
use postern_outlet::serve::Services;
use postern_outlet::target::Target;
use postern_tests::harness::*;
use postern_tests::influxd::{Influxd, InfluxdOptions};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const PY_CLIENT: &str = r#"
import sys
from influxdb import InfluxDBClient
host, port, db = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = InfluxDBClient(host=host, port=port, database=db)
c.create_database(db)
c.write_points([
    {"measurement": "temp", "tags": {"room": r}, "fields": {"value": v}}
    for r, v in [("kitchen", 21.5), ("hall", 18.25), ("attic", 30.0)]
])
rows = list(c.query('SELECT "value" FROM "temp"').get_points())
print(len(rows), sorted(r["value"] for r in rows))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influx_cli_and_python_client_through_the_tunnel() {
    init_logging();
    let influxd = Influxd::start(InfluxdOptions { auth: false })
        .await
        .expect("start influxd");
    let pki = Pki::new();
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [9; 32], None);
    let _o = start_outlet(
        &pki,
        "outlet-1",
        relay.addr,
        vec![("influxdb", Target::tcp(influxd.http_addr().to_string()))],
    )
    .await;
    let inlet = start_inlet(&pki, "inlet-1", relay.addr, &["influxdb"]).await;
    let addr = inlet.addr("influxdb");

    influx_cli(addr, &["-execute", "CREATE DATABASE clitest"]).await;
    influx_cli(
        addr,
        &[
            "-database",
            "clitest",
            "-execute",
            "INSERT cpu,host=a usage=0.5",
        ],
    )
    .await;
    influx_cli(
        addr,
        &[
            "-database",
            "clitest",
            "-execute",
            "INSERT cpu,host=b usage=0.75",
        ],
    )
    .await;
    let out = influx_cli(
        addr,
        &[
            "-database",
            "clitest",
            "-format",
            "csv",
            "-execute",
            "SELECT host, usage FROM cpu",
        ],
    )
    .await;
    assert!(out.contains(",a,0.5"), "{out}");
    assert!(out.contains(",b,0.75"), "{out}");

    let out = run_python(
        PY_CLIENT,
        &["127.0.0.1", &addr.port().to_string(), "pytest"],
    )
    .await;
    assert_eq!(out.trim(), "3 [18.25, 21.5, 30.0]");
    // And the data really is in the influxd behind the outlet.
    let v = influxd
        .query("SELECT count(\"value\") FROM pytest.autogen.temp")
        .await
        .expect("query influxd directly");
    assert_eq!(
        v.pointer("/results/0/series/0/values/0/1"),
        Some(&serde_json::json!(3))
    );
}

/// An outlet with a v1 lease manager for `influxd` granting read+write on `db`.
async fn leased_outlet(
    pki: &Pki,
    relay: std::net::SocketAddr,
    influxd: &Influxd,
    state: &std::path::Path,
    ttl_s: u64,
    shutdown: CancellationToken,
) -> (OutletNode, std::sync::Arc<LeaseManager>) {
    let admin = state.join("admin-credential");
    std::fs::write(
        &admin,
        format!("{}:{}", influxd.admin_user(), influxd.admin_password()),
    )
    .expect("write admin credential");
    let toml = format!(
        r#"
to = "{url}"
api = "v1"
all-access-token = "file:{admin}"
leased-token-expires-in = {ttl_s}
leased-token-permissions = '[{{"action":"read","resource":{{"type":"buckets","name":"leased"}}}},{{"action":"write","resource":{{"type":"buckets","name":"leased"}}}}]'
"#,
        url = influxd.url(),
        admin = admin.display(),
    );
    let cfg: InfluxdbOutletConfig = toml::from_str(&toml).expect("lease config");
    let cfg = cfg.validate().expect("valid lease config");
    let manager = LeaseManager::start(cfg, state, shutdown)
        .await
        .expect("start lease manager");
    let mut services = Services::default();
    services.targets.insert(
        svc("influxdb"),
        Target::tcp(influxd.http_addr().to_string()),
    );
    services.leases.insert(svc("influxdb"), manager.clone());
    (
        start_outlet_with(pki, "outlet-1", relay, services).await,
        manager,
    )
}

const PY_NO_CREDENTIALS: &str = r#"
import sys
from influxdb import InfluxDBClient
host, port = sys.argv[1], int(sys.argv[2])
# No username or password: the inlet puts the leased credential in.
c = InfluxDBClient(host=host, port=port, database="leased")
c.write_points([{"measurement": "m", "fields": {"v": float(i)}, "time": i * 1000000000} for i in range(1, 6)])
rows = list(c.query('SELECT count("v") FROM "m"').get_points())
print(rows[0]["count"])
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_credentials_use_a_leased_v1_user() {
    init_logging();
    let influxd = Influxd::start(InfluxdOptions { auth: true })
        .await
        .expect("start influxd");
    influxd
        .query("CREATE DATABASE leased")
        .await
        .expect("create db");
    influxd
        .query("CREATE DATABASE other")
        .await
        .expect("create db");
    let state = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new();
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [10; 32], None);
    let lease_shutdown = CancellationToken::new();
    let (outlet, manager) = leased_outlet(
        &pki,
        relay.addr,
        &influxd,
        state.path(),
        3600,
        lease_shutdown.clone(),
    )
    .await;
    let inlet = start_inlet_kinds(
        &pki,
        "inlet-1",
        relay.addr,
        &[("influxdb", ServiceKind::Influxdb)],
    )
    .await;
    let addr = inlet.addr("influxdb");

    // The real CLI, with no credentials of its own.
    let out = wait_for_cli(
        addr,
        &[
            "-database",
            "leased",
            "-execute",
            "INSERT cpu,host=a usage=1",
        ],
    )
    .await;
    assert!(!out.contains("error"), "{out}");
    let out = influx_cli(
        addr,
        &[
            "-database",
            "leased",
            "-format",
            "csv",
            "-execute",
            "SELECT usage FROM cpu",
        ],
    )
    .await;
    assert!(out.contains(",1"), "{out}");
    // A client's own (wrong) credentials are replaced, not used.
    let out = influx_cli(
        addr,
        &[
            "-username",
            "mallory",
            "-password",
            "nope",
            "-database",
            "leased",
            "-format",
            "csv",
            "-execute",
            "SELECT usage FROM cpu",
        ],
    )
    .await;
    assert!(out.contains(",1"), "{out}");
    // The lease grants nothing on another database.
    let out = tokio::process::Command::new("influx")
        .args(["-host", "127.0.0.1", "-port", &addr.port().to_string()])
        .args([
            "-database",
            "other",
            "-execute",
            "INSERT cpu,host=a usage=1",
        ])
        .output()
        .await
        .expect("influx");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("not authorized") || !out.status.success(),
        "write to another db must be refused: {text}"
    );

    // The Python client, also without credentials.
    let out = run_python(PY_NO_CREDENTIALS, &["127.0.0.1", &addr.port().to_string()]).await;
    assert_eq!(out.trim(), "5");

    // Exactly one leased user exists, for this inlet.
    let leases = manager.list().await.expect("list");
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(leases[0].client, "inlet-1");
    let users = influxd.users().await.expect("users");
    let leased: Vec<_> = users
        .iter()
        .filter(|u| u.as_str() != influxd.admin_user())
        .collect();
    assert_eq!(leased.len(), 1, "{users:?}");

    // Stopping the outlet revokes the lease: the user is gone.
    inlet.running.stop().await;
    outlet.running.stop().await;
    lease_shutdown.cancel();
    manager.closed().await;
    let users = influxd.users().await.expect("users");
    assert_eq!(
        users,
        vec![influxd.admin_user().to_owned()],
        "leased user revoked"
    );
}

/// The first request may race the first lease; the inlet answers 503 until it arrives.
async fn wait_for_cli(addr: std::net::SocketAddr, args: &[&str]) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let out = tokio::process::Command::new("influx")
            .args(["-host", "127.0.0.1", "-port", &addr.port().to_string()])
            .args(args)
            .output()
            .await
            .expect("influx");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() && !text.contains("503") && !text.contains("lease") {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no lease in time: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
