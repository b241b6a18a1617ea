//! A full disk under the outlet's lease store (issue 19, item 4), with the real outlet binary,
//! a real influxd 1.x and an inlet: the outlet's state directory is a small tmpfs of its own
//! (see `postern_tests::small_disk`), filled to "No space left on device" while leases churn
//! (TTL 3 s, renewed every 2 s), then freed again, with no restart.
//!
//! While the disk is full, new leases fail and say that the lease store cannot write (to the
//! command line and to the inlet's clients, not "InfluxDB is unreachable"), `/readyz` answers 503
//! with that reason, and the failures are counted. Once there is room the store is reopened
//! (redb refuses every call after one I/O error until it is) and within a few seconds leases are
//! made again and a lease that expired meanwhile loses its user in InfluxDB.
//!
//! Needs root to mount the tmpfs (in a private mount namespace); elsewhere it says so and skips.

use postern_inlet::ServiceKind;
use postern_tests::influxd::{Influxd, InfluxdOptions};
use postern_tests::kit::*;
use postern_tests::ops;
use postern_tests::ports::free_port;
use postern_tests::procs::{bin, cli_output, write_identity, Proc};
use postern_tests::small_disk;
use postern_tests::wait::eventually;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// Longest wait for something that needs the cluster to come up or a lease to run out.
const WAIT: Duration = Duration::from_secs(30);
/// How soon after the disk has room again leases must work and expired users be gone: the
/// store is reopened every 2 s at most, and what failed meanwhile is retried at once.
const RECOVER: Duration = Duration::from_secs(6);
/// Seconds a lease lives.
const TTL_S: u64 = 3;
/// Size of the outlet's state directory: room for the store (redb makes a 1.5 MiB file, mostly
/// unwritten) and little else.
const DISK: &str = "4m";
/// What the outlet says when its store cannot write.
const STORE_CANNOT_WRITE: &str = "lease store cannot write";

const PERMS: &str = r#"[{"action":"read","resource":{"type":"buckets","name":"leased"}},{"action":"write","resource":{"type":"buckets","name":"leased"}}]"#;

/// One write through the inlet: (status, body).
async fn write(client: &reqwest::Client, inlet: SocketAddr) -> (u16, String) {
    let r = client
        .post(format!("http://{inlet}/write?db=leased"))
        .body("disk,host=a value=1")
        .send()
        .await;
    match r {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

/// `postern-outlet lease create CLIENT` against the outlet whose state directory is `state`:
/// (success, everything it printed).
async fn lease_create(state: &Path, client: &str) -> (bool, String) {
    let state = state.display().to_string();
    let (ok, out, err) = cli_output(
        "postern-outlet",
        &["lease", "create", client, "--state-dir", &state],
    )
    .await;
    (ok, format!("{out}{err}"))
}

fn field(text: &str, name: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// The leased users in InfluxDB now.
async fn leased(influxd: &Influxd) -> Vec<String> {
    influxd
        .users()
        .await
        .expect("SHOW USERS")
        .into_iter()
        .filter(|u| u.starts_with("postern_"))
        .collect()
}

async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = ops::get(addr, "/metrics").await.expect("scrape");
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_leases_and_they_come_back_once_it_has_room() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    if let Err(why) = small_disk::available(&dir.path().join("probe")).await {
        eprintln!("SKIPPED a_full_disk_stops_leases_and_they_come_back_once_it_has_room: {why}");
        return;
    }
    let influxd = Influxd::start(InfluxdOptions { auth: true })
        .await
        .expect("start influxd");
    influxd
        .query("CREATE DATABASE leased")
        .await
        .expect("create database");
    let pki = Pki::new();
    let relay = start_relay(&pki, "127.0.0.1:0".parse().expect("addr"), [19; 32], None);

    // The outlet: the real binary, its state directory on a 4 MiB tmpfs of its own.
    let ids = write_identity(&pki, "outlet-1", dir.path());
    let admin = dir.path().join("influx-admin");
    std::fs::write(
        &admin,
        format!("{}:{}", influxd.admin_user(), influxd.admin_password()),
    )
    .expect("write admin credential");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&admin, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let state = dir.path().join("outlet-state");
    std::fs::create_dir(&state).expect("mkdir state");
    let config = dir.path().join("outlet.toml");
    std::fs::write(
        &config,
        format!(
            r#"relay = "{relay}"
cert = "{cert}"
key = "{key}"
ca = "{ca}"
state-dir = "{state}"

[influxdb-outlet]
to = "{url}"
api = "v1"
allow = "*"
all-access-token = "file:{admin}"
leased-token-expires-in = {TTL_S}
leased-token-permissions = '{PERMS}'
"#,
            relay = relay.addr,
            cert = ids.cert.display(),
            key = ids.key.display(),
            ca = ids.ca.display(),
            state = state.display(),
            url = influxd.url(),
            admin = admin.display(),
        ),
    )
    .expect("write outlet.toml");
    let ops_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let args: Vec<String> = vec![
        "run".into(),
        "--config".into(),
        config.display().to_string(),
        "--metrics-addr".into(),
        ops_addr.to_string(),
    ];
    let cmd = small_disk::command(&state, DISK, &bin("postern-outlet"), &args);
    let mut outlet = Proc::start(cmd, dir.path(), "outlet");
    outlet.wait_ready(ops_addr).await;
    let pid = outlet.child.id().expect("outlet pid");
    // The state directory as the outlet sees it: its tmpfs.
    let seen = small_disk::seen_from(pid, &state);
    assert!(
        seen.join("leases.redb").exists(),
        "no store in the outlet's tmpfs at {}; its log:\n{}",
        seen.display(),
        outlet.log()
    );

    // Lease churn: an inlet writing through the tunnel with leased users renewed every 2 s.
    let inlet = start_inlet_kinds(
        &pki,
        "inlet-1",
        relay.addr,
        &[("influxdb", ServiceKind::Influxdb)],
    )
    .await;
    let inlet_addr = inlet.addr("influxdb");
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client");
    eventually(WAIT, "a write through the inlet", || async {
        write(&client, inlet_addr).await.0 == 204
    })
    .await;

    // A lease made by hand works (and is revoked at its expiry).
    let (ok, made) = lease_create(&seen, "by-hand").await;
    assert!(ok, "lease create: {made}\n{}", outlet.log());
    let user = field(&made, "username:");
    let users = influxd.users().await.expect("users");
    assert!(users.contains(&user), "{user} not in {users:?}");

    // Fill the disk.
    let filled = small_disk::fill(&seen).expect("fill the outlet's disk");
    eprintln!("filled the outlet's tmpfs with {filled} bytes");
    // Keep it full: take whatever the store's reopenings free (redb may trim its file).
    let keeper = {
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                small_disk::fill(&seen).expect("keep the disk full");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // New leases need room in the store: made by hand they fail at once, naming the store and
    // the disk. Until the store needs more pages than its file has, leases are still made and
    // revoked (pages are reused): churn until it does.
    let mut refused = None;
    for i in 0..400 {
        let (ok, out) = lease_create(&seen, &format!("full-{i}")).await;
        if !ok {
            refused = Some(out);
            break;
        }
    }
    let refused = refused.unwrap_or_else(|| {
        panic!(
            "400 leases were made on a full disk; the outlet's log:\n{}",
            outlet.log()
        )
    });
    assert!(
        refused.contains(STORE_CANNOT_WRITE) && refused.contains("No space left on device"),
        "a create on a full disk does not name the store and the disk: {refused}"
    );
    // Every leased user now in InfluxDB was made before the store failed: each expires within
    // TTL_S and must then be revoked, which takes a store that writes.
    let stranded = leased(&influxd).await;
    let broke_at = Instant::now();

    // /readyz says 503, and why.
    eventually(
        WAIT,
        "/readyz to answer 503 naming the lease store",
        || async {
            match ops::get(ops_addr, "/readyz").await {
                Ok((503, body)) => body.contains(STORE_CANNOT_WRITE),
                _ => false,
            }
        },
    )
    .await;
    let (_, why) = ops::get(ops_addr, "/readyz").await.expect("readyz");
    assert!(why.contains("No space left on device"), "{why}");

    // The inlet's lease runs out with no successor: its clients are told that the outlet's
    // store cannot write, not that InfluxDB is unreachable.
    let told = Instant::now() + WAIT;
    let last = loop {
        let last = write(&client, inlet_addr).await;
        if last.0 == 503 && last.1.contains(STORE_CANNOT_WRITE) {
            break last;
        }
        assert!(
            Instant::now() < told,
            "the inlet's clients were never told that the lease store cannot write; last answer \
             {last:?}; the outlet's log:\n{}",
            outlet.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        !last.1.contains("unreachable"),
        "the inlet blames InfluxDB: {}",
        last.1
    );

    // Every failure is counted.
    let text = scrape(ops_addr).await;
    let failed_creates = ops::metric(
        &text,
        "postern_outlet_leases_failed_total",
        &[("operation", "create")],
    )
    .unwrap_or(0.0);
    assert!(failed_creates >= 2.0, "failed creates: {failed_creates}");
    let failed_puts = ops::metric(
        &text,
        "postern_outlet_lease_store_failures_total",
        &[("operation", "put")],
    )
    .unwrap_or(0.0);
    assert!(failed_puts >= 2.0, "failed store writes: {failed_puts}");
    let failed_reopens = ops::metric(
        &text,
        "postern_outlet_lease_store_failures_total",
        &[("operation", "reopen")],
    )
    .unwrap_or(0.0);
    assert!(failed_reopens >= 1.0, "failed reopenings: {failed_reopens}");

    // Wait until every lease made before the store failed is past its expiry.
    let expired = Duration::from_secs(TTL_S + 1);
    if let Some(left) = expired.checked_sub(broke_at.elapsed()) {
        tokio::time::sleep(left).await;
    }
    let (status, why) = ops::get(ops_addr, "/readyz").await.expect("readyz");
    assert_eq!(status, 503, "the store writes on a full disk: {why}");
    let outliving: Vec<String> = leased(&influxd)
        .await
        .into_iter()
        .filter(|u| stranded.contains(u))
        .collect();
    assert!(
        !outliving.is_empty(),
        "every lease was revoked while the disk was full, so this test checks nothing about \
         revocations retried once it has room"
    );

    // Room again: within a few seconds, without a restart, everything works.
    keeper.abort();
    let _ = keeper.await;
    small_disk::free(&seen).expect("free the outlet's disk");
    let freed = Instant::now();
    eventually(
        RECOVER,
        "the users of leases that expired while the disk was full to be revoked",
        || async {
            let now = leased(&influxd).await;
            !outliving.iter().any(|u| now.contains(u))
        },
    )
    .await;
    let revoked_after = freed.elapsed();
    eventually(RECOVER, "/readyz to answer 200 again", || async {
        matches!(ops::get(ops_addr, "/readyz").await, Ok((200, _)))
    })
    .await;
    eventually(RECOVER, "a write through the inlet again", || async {
        write(&client, inlet_addr).await.0 == 204
    })
    .await;
    let writes_after = freed.elapsed();
    let (ok, made) = lease_create(&seen, "after").await;
    assert!(ok, "lease create after the disk has room: {made}");
    eprintln!(
        "after freeing the disk: expired user revoked in {revoked_after:?}, writes through the \
         inlet in {writes_after:?}"
    );
    // No leased user is left but those of live leases: the inlet's current lease (and the
    // previous one, in its grace period) and the one just made by hand.
    eventually(
        RECOVER,
        "every expired leased user to be revoked",
        || async { leased(&influxd).await.len() <= 3 },
    )
    .await;
    assert!(
        outlet.child.try_wait().expect("try_wait").is_none(),
        "the outlet exited; its log:\n{}",
        outlet.log()
    );
    assert_eq!(outlet.child.id(), Some(pid), "the outlet was restarted");
    drop(inlet);
}
